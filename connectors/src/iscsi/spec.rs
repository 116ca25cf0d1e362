//! `iscsi://` device specs, in libiscsi's (and qemu's) form:
//! `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET_IQN/LUN[?QUERY]`.
//!
//! The port defaults to 3260; an IPv6 host is written in brackets. As in
//! libiscsi the password is everything between the first `%` and the last
//! `@`, taken literally. Mutual CHAP (the target proves itself to us) takes
//! the target's user and secret from the query:
//! `?target_user=NAME&target_password=SECRET` (percent-encoded). The query
//! may also set `initiator_name=IQN`, and `max_recv_data_segment_length=BYTES`
//! (512 to 16777215): the largest data segment we declare we accept, in place
//! of [`crate::iscsi::IscsiOptions`]'s. Secrets are held in [`Secret`], which
//! never prints, and neither [`IscsiSpec::name`] nor `Display` shows them.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use percent_encoding::percent_decode_str;

const FORM: &str =
    "iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET_IQN/LUN[?target_user=..&target_password=..]";

/// The largest MaxRecvDataSegmentLength RFC 7143 allows (2^24 - 1).
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// Default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;

/// A secret (a CHAP password): prints as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the CHAP computation only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// CHAP credentials: a user name and its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: Secret,
}

impl Chap {
    pub fn new(user: impl Into<String>, secret: impl Into<String>) -> Self {
        Chap {
            user: user.into(),
            secret: Secret::new(secret),
        }
    }

    /// Credentials whose secret is the content of a file (one trailing
    /// newline removed). The error names the file, never its content.
    pub fn from_secret_file(user: impl Into<String>, path: &Path) -> Result<Self, SpecError> {
        let s = std::fs::read_to_string(path).map_err(|e| {
            SpecError(format!(
                "cannot read the CHAP secret file {}: {e}",
                path.display()
            ))
        })?;
        let s = s.strip_suffix('\n').unwrap_or(&s);
        let s = s.strip_suffix('\r').unwrap_or(s);
        if s.is_empty() {
            return Err(SpecError(format!(
                "the CHAP secret file {} is empty",
                path.display()
            )));
        }
        Ok(Chap::new(user, s))
    }
}

/// Which LUN of which target to attach, how to reach it, and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiSpec {
    /// Portal host name or address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub target_iqn: String,
    pub lun: u64,
    /// One-way CHAP: our user and secret, checked by the target.
    pub chap: Option<Chap>,
    /// Mutual CHAP: the target's user and secret, checked by us.
    pub mutual: Option<Chap>,
    /// Our initiator name.
    pub initiator_iqn: String,
    /// The MaxRecvDataSegmentLength to declare, when the spec sets one.
    pub max_recv_data_segment_length: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid iscsi spec: {0} (expected {FORM})")]
pub struct SpecError(String);

/// The initiator name used when none is given: volback's prefix and the
/// host name.
pub fn default_initiator_iqn() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2026-01.io.volback:{host}")
}

fn parse_portal(portal: &str) -> Result<(String, u16), SpecError> {
    let err = |m: &str| SpecError(format!("bad portal {portal:?}: {m}"));
    let (host, port) = if let Some(rest) = portal.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| err("unclosed '['"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(p.strip_prefix(':').ok_or_else(|| err("junk after ']'"))?),
            ),
        }
    } else if portal.matches(':').count() > 1 {
        (portal, None) // a bare IPv6 address
    } else {
        match portal.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (portal, None),
        }
    };
    if host.is_empty() {
        return Err(err("no host"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| err("bad port"))?,
    };
    Ok((host.to_string(), port))
}

impl IscsiSpec {
    /// Builds a spec from connection-info parts: a portal `HOST[:PORT]`, the
    /// target's IQN, the LUN, and optional one-way and mutual credentials
    /// (see [`Chap::from_secret_file`]).
    pub fn from_parts(
        portal: &str,
        target_iqn: &str,
        lun: u64,
        chap: Option<Chap>,
        mutual: Option<Chap>,
    ) -> Result<Self, SpecError> {
        let (host, port) = parse_portal(portal)?;
        let spec = IscsiSpec {
            host,
            port,
            target_iqn: target_iqn.to_string(),
            lun,
            chap,
            mutual,
            initiator_iqn: default_initiator_iqn(),
            max_recv_data_segment_length: None,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SpecError> {
        if self.target_iqn.is_empty() || self.target_iqn.contains(['/', '?', '\0']) {
            return Err(SpecError("bad target name".into()));
        }
        if self.lun >= 16384 {
            return Err(SpecError(format!("LUN {} is out of range", self.lun)));
        }
        if self.mutual.is_some() && self.chap.is_none() {
            return Err(SpecError(
                "mutual CHAP needs one-way CHAP credentials too".into(),
            ));
        }
        if self.initiator_iqn.is_empty() {
            return Err(SpecError("empty initiator name".into()));
        }
        Ok(())
    }

    /// `HOST:PORT`, with brackets around an IPv6 host.
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `iscsi://[USER@]HOST:PORT/IQN/LUN`: the name for logs and errors,
    /// without any secret.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for IscsiSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("iscsi://")?;
        if let Some(c) = &self.chap {
            write!(f, "{}@", c.user)?;
        }
        write!(f, "{}/{}/{}", self.portal(), self.target_iqn, self.lun)
    }
}

impl FromStr for IscsiSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = |m: &str| Err(SpecError(m.into()));
        let Some(rest) = s.strip_prefix("iscsi://") else {
            return err("it does not start with 'iscsi://'");
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (userinfo, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let Some((portal, path)) = rest.split_once('/') else {
            return err("no target: expected HOST/TARGET_IQN/LUN");
        };
        let Some((iqn, lun)) = path.rsplit_once('/') else {
            return err("no LUN: expected TARGET_IQN/LUN");
        };
        let Ok(lun) = lun.parse::<u64>() else {
            return err("the LUN is not a number");
        };
        let chap = match userinfo {
            None => None,
            Some(u) => match u.split_once('%') {
                Some((user, pass)) if !user.is_empty() => Some(Chap::new(user, pass)),
                None if !u.is_empty() => {
                    return err("a CHAP user needs a password (USER%PASSWORD@)")
                }
                _ => return err("empty CHAP user"),
            },
        };
        let (mut tuser, mut tpass, mut initiator, mut mrdsl) = (None, None, None, None);
        for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
            match k {
                "target_user" => tuser = Some(v),
                "target_password" => tpass = Some(v),
                "initiator_name" => initiator = Some(v),
                "max_recv_data_segment_length" => match v.parse::<u32>() {
                    Ok(n) if (512..=MAX_DATA_SEGMENT).contains(&n) => mrdsl = Some(n),
                    _ => {
                        return Err(SpecError(format!(
                            "max_recv_data_segment_length {v:?} is not a number of bytes \
                             from 512 to {MAX_DATA_SEGMENT}"
                        )))
                    }
                },
                _ => return Err(SpecError(format!("unknown query parameter {k:?}"))),
            }
        }
        let mutual = match (tuser, tpass) {
            (Some(u), Some(p)) => Some(Chap::new(u, p)),
            (None, None) => None,
            _ => return err("mutual CHAP needs both target_user and target_password"),
        };
        let (host, port) = parse_portal(portal)?;
        let spec = IscsiSpec {
            host,
            port,
            target_iqn: iqn.to_string(),
            lun,
            chap,
            mutual,
            initiator_iqn: initiator.unwrap_or_else(default_initiator_iqn),
            max_recv_data_segment_length: mrdsl,
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_libiscsi_form() {
        let s: IscsiSpec = "iscsi://10.0.0.5/iqn.2003-01.org.x:disk1/1"
            .parse()
            .unwrap();
        assert_eq!(s.host, "10.0.0.5");
        assert_eq!(s.port, 3260);
        assert_eq!(s.target_iqn, "iqn.2003-01.org.x:disk1");
        assert_eq!(s.lun, 1);
        assert!(s.chap.is_none() && s.mutual.is_none());
        assert!(s.initiator_iqn.starts_with("iqn.2026-01.io.volback:"));
        assert_eq!(s.max_recv_data_segment_length, None);

        let s: IscsiSpec = "iscsi://bob%p@ss%w0rd@[::1]:3261/iqn.x:y/0?target_user=tgt&target_password=a%26b&initiator_name=iqn.z:me"
            .parse()
            .unwrap();
        assert_eq!(s.host, "::1");
        assert_eq!(s.port, 3261);
        assert_eq!(s.portal(), "[::1]:3261");
        let c = s.chap.as_ref().unwrap();
        assert_eq!(c.user, "bob");
        assert_eq!(c.secret.expose(), "p@ss%w0rd");
        let m = s.mutual.as_ref().unwrap();
        assert_eq!(m.user, "tgt");
        assert_eq!(m.secret.expose(), "a&b");
        assert_eq!(s.initiator_iqn, "iqn.z:me");

        let s: IscsiSpec = "iscsi://h/iqn.x:y/1?max_recv_data_segment_length=262144"
            .parse()
            .unwrap();
        assert_eq!(s.max_recv_data_segment_length, Some(262_144));
        for bad in ["511", "16777216", "1M", ""] {
            let e = format!("iscsi://h/iqn.x:y/1?max_recv_data_segment_length={bad}")
                .parse::<IscsiSpec>()
                .unwrap_err();
            assert!(
                e.to_string().contains("max_recv_data_segment_length"),
                "{e}"
            );
        }
    }

    #[test]
    fn never_shows_secrets() {
        let s: IscsiSpec =
            "iscsi://bob%hunter2@host:3300/iqn.x:y/2?target_user=t&target_password=sesame"
                .parse()
                .unwrap();
        assert_eq!(s.name(), "iscsi://bob@host:3300/iqn.x:y/2");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("sesame"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
        assert_eq!(Secret::new("x").to_string(), "<redacted>");
        let e = "iscsi://bob%hunter2@host/iqn.x:y/zz"
            .parse::<IscsiSpec>()
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "rbd:pool/img",
            "iscsi://host",
            "iscsi://host/iqn.x:y",
            "iscsi://host/iqn.x:y/abc",
            "iscsi://host:99999/iqn.x:y/1",
            "iscsi://bob@host/iqn.x:y/1",
            "iscsi://host/iqn.x:y/1?target_user=t",
            "iscsi://host/iqn.x:y/1?target_user=t&target_password=p",
            "iscsi://host/iqn.x:y/1?bogus=1",
            "iscsi://host/iqn.x:y/20000",
        ] {
            assert!(bad.parse::<IscsiSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn from_parts_reads_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "s3cret\n").unwrap();
        let chap = Chap::from_secret_file("alice", &p).unwrap();
        assert_eq!(chap.secret.expose(), "s3cret");
        let s = IscsiSpec::from_parts("192.168.1.9:3270", "iqn.a:b", 4, Some(chap), None).unwrap();
        assert_eq!((s.host.as_str(), s.port, s.lun), ("192.168.1.9", 3270, 4));
        let s = IscsiSpec::from_parts("san", "iqn.a:b", 0, None, None).unwrap();
        assert_eq!(s.port, 3260);
        let missing = Chap::from_secret_file("alice", &dir.path().join("nope"));
        assert!(missing.is_err());
        let mutual_only =
            IscsiSpec::from_parts("san", "iqn.a:b", 0, None, Some(Chap::new("t", "p")));
        assert!(mutual_only.is_err());
    }
}
