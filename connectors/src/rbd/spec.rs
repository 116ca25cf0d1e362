//! `rbd:` device specs, in qemu's form:
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]`.
//!
//! As in qemu, a backslash escapes the next character (`\:` for a colon in
//! a path). Inline keys (`key=`) are refused rather than accepted: they
//! would show in process listings and shell history, and a spec is echoed
//! in logs. Errors name the part that is wrong, never the whole input.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::cluster::ClusterConfig;

const FORM: &str = "rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]";

/// Which image (or snapshot) to open, and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snap: Option<String>,
    pub cluster: ClusterConfig,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid rbd spec: {0} (expected {FORM})")]
pub struct SpecError(String);

impl RbdSpec {
    /// The spec a driver's connection info describes: properties `pool`,
    /// `image`, optional `namespace` and `snapshot`, and how to reach the
    /// cluster: `conf`, `id`, `keyring` (paths and a user name, never a
    /// key) and `connect_timeout_ms`, `op_timeout_ms`.
    pub fn from_properties(props: &BTreeMap<String, String>) -> Result<RbdSpec, SpecError> {
        let prop = |k: &str| props.get(k).filter(|v| !v.is_empty()).cloned();
        let required = |k: &str| {
            prop(k).ok_or_else(|| SpecError(format!("connection info has no '{k}' property")))
        };
        let millis = |k: &str| -> Result<Option<Duration>, SpecError> {
            prop(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map(Duration::from_millis)
                        .map_err(|_| SpecError(format!("property '{k}' is not a number of ms")))
                })
                .transpose()
        };
        let defaults = ClusterConfig::default();
        Ok(RbdSpec {
            pool: required("pool")?,
            namespace: prop("namespace"),
            image: required("image")?,
            snap: prop("snapshot"),
            cluster: ClusterConfig {
                conf: prop("conf").map(PathBuf::from),
                id: prop("id"),
                keyring: prop("keyring").map(PathBuf::from),
                connect_timeout: millis("connect_timeout_ms")?.unwrap_or(defaults.connect_timeout),
                op_timeout: millis("op_timeout_ms")?.unwrap_or(defaults.op_timeout),
            },
        })
    }

    /// `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]`: the short name used for the
    /// device in logs and errors.
    pub fn image_spec(&self) -> String {
        let mut s = format!("rbd:{}/", escape(&self.pool));
        if let Some(ns) = &self.namespace {
            s += &escape(ns);
            s.push('/');
        }
        s += &escape(&self.image);
        if let Some(snap) = &self.snap {
            s.push('@');
            s += &escape(snap);
        }
        s
    }
}

impl FromStr for RbdSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = |m: String| Err(SpecError(m));
        let Some(rest) = s.strip_prefix("rbd:") else {
            return err("it does not start with 'rbd:'".into());
        };
        let mut parts = split_unescaped(rest, ':').into_iter();
        let target = parts.next().unwrap_or_default();
        let (names, snap) = match split_unescaped(&target, '@').as_slice() {
            [names] => (names.clone(), None),
            [names, snap] => (names.clone(), Some(unescape(snap))),
            _ => return err("more than one '@' in the image name".into()),
        };
        let names: Vec<String> = split_unescaped(&names, '/')
            .iter()
            .map(|n| unescape(n))
            .collect();
        let (pool, namespace, image) = match names.as_slice() {
            [p, i] => (p.clone(), None, i.clone()),
            [p, ns, i] => (p.clone(), Some(ns.clone()), i.clone()),
            [_] => return err("no pool: the image must be given as POOL/IMAGE".into()),
            _ => return err("too many '/' in POOL/NAMESPACE/IMAGE".into()),
        };
        for (what, v) in [
            ("pool", Some(&pool)),
            ("namespace", namespace.as_ref()),
            ("image", Some(&image)),
            ("snapshot", snap.as_ref()),
        ] {
            if v.is_some_and(|v| v.is_empty()) {
                return err(format!("the {what} name is empty"));
            }
        }
        let mut cluster = ClusterConfig::default();
        for opt in parts {
            let Some((key, value)) = opt.split_once('=') else {
                return err("an option is not KEY=VALUE".into());
            };
            let value = unescape(value);
            if matches!(key, "key" | "secret" | "password") {
                // The value is a secret: never repeat it.
                return err(format!("inline '{key}=' is not accepted: put the key in a keyring file and pass keyring=PATH"));
            }
            if value.is_empty() {
                return err(format!("option '{key}' has an empty value"));
            }
            let dup = match key {
                "conf" => cluster.conf.replace(PathBuf::from(value)).is_some(),
                "id" => cluster.id.replace(value).is_some(),
                "keyring" => cluster.keyring.replace(PathBuf::from(value)).is_some(),
                _ => return err(format!("unknown option '{key}' (known: conf, id, keyring; put other ceph options in the conf file)")),
            };
            if dup {
                return err(format!("option '{key}' given twice"));
            }
        }
        Ok(RbdSpec {
            pool,
            namespace,
            image,
            snap,
            cluster,
        })
    }
}

/// The full spec, round-trippable through `FromStr`. It holds no secret:
/// keys live in the keyring file, which is shown only by path.
impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.image_spec())?;
        if let Some(c) = &self.cluster.conf {
            write!(f, ":conf={}", escape(&c.to_string_lossy()))?;
        }
        if let Some(id) = &self.cluster.id {
            write!(f, ":id={}", escape(id))?;
        }
        if let Some(k) = &self.cluster.keyring {
            write!(f, ":keyring={}", escape(&k.to_string_lossy()))?;
        }
        Ok(())
    }
}

/// Splits at each `sep` not preceded by a backslash; escapes are kept (they
/// are removed by [`unescape`] once the pieces are final).
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        let cur = out.last_mut().expect("never empty");
        match c {
            '\\' => {
                cur.push(c);
                cur.extend(chars.next());
            }
            c if c == sep => out.push(String::new()),
            c => cur.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ':' | '@' | '/' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RbdSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn minimal_and_full_forms() {
        let s = parse("rbd:rbd/vm-disk").unwrap();
        assert_eq!((s.pool.as_str(), s.image.as_str()), ("rbd", "vm-disk"));
        assert_eq!((s.namespace, s.snap), (None, None));
        assert_eq!(s.cluster, ClusterConfig::default());

        let s = parse("rbd:pool/ns/img@snap1:conf=/etc/ceph/a.conf:id=backup:keyring=/k").unwrap();
        assert_eq!(s.namespace.as_deref(), Some("ns"));
        assert_eq!(s.snap.as_deref(), Some("snap1"));
        assert_eq!(s.cluster.conf, Some(PathBuf::from("/etc/ceph/a.conf")));
        assert_eq!(s.cluster.id.as_deref(), Some("backup"));
        assert_eq!(s.cluster.keyring, Some(PathBuf::from("/k")));
        assert_eq!(s.image_spec(), "rbd:pool/ns/img@snap1");
    }

    #[test]
    fn escapes_and_round_trip() {
        let s = parse(r"rbd:p/im\:g@s\@1:conf=/a\:b/c.conf").unwrap();
        assert_eq!(s.image, "im:g");
        assert_eq!(s.snap.as_deref(), Some("s@1"));
        assert_eq!(s.cluster.conf, Some(PathBuf::from("/a:b/c.conf")));
        assert_eq!(parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            ("rbd/img", "start with 'rbd:'"),
            ("rbd:img", "no pool"),
            ("rbd:a/b/c/d", "too many '/'"),
            ("rbd:p/i@a@b", "more than one '@'"),
            ("rbd:p/", "image name is empty"),
            ("rbd:p/i@", "snapshot name is empty"),
            ("rbd:p/i:conf", "not KEY=VALUE"),
            ("rbd:p/i:conf=", "empty value"),
            ("rbd:p/i:mon_host=1.2.3.4", "unknown option 'mon_host'"),
            ("rbd:p/i:id=a:id=b", "given twice"),
        ];
        for (input, want) in cases {
            let e = parse(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn inline_keys_refused_without_echo() {
        let e = parse("rbd:p/i:key=AQBsecretsecret==")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keyring=PATH"), "{e}");
        assert!(!e.contains("AQBsecret"), "{e}");
    }
}
