//! The `tgt` backend's configuration, and its checks.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::Deserialize;
use tracing::warn;

use super::iqn::{target_iqn, MAX_IQN_LEN};
use crate::{DriverError, DriverErrorKind, ExportTarget, Result};

/// The IQN prefix when none is configured.
pub const DEFAULT_IQN_PREFIX: &str = "iqn.2026-11.org.volback";
/// Highest control port tgtadm accepts (`-C`).
const MAX_CONTROL_PORT: u32 = 32767;
/// Longest CHAP secret accepted.
const MAX_SECRET_LEN: usize = 255;

/// A CHAP account: user name and the file holding its secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    pub user: String,
    /// The secret is the file's content, one trailing newline removed.
    pub secret_file: PathBuf,
}

/// Configuration of a `tgt` backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TgtConfig {
    /// Where initiators connect, "host:port" (port 3260 when left out).
    pub portal: String,
    /// tgtd's control port (`tgtd -C N`, `tgtadm -C N`, 0 to 32767): the
    /// number in its unix socket /var/run/tgtd/socket.N; tgt's default (0)
    /// when absent.
    #[serde(default)]
    pub control_port: Option<u32>,
    /// Pool name to directory (which must exist).
    pub pools: BTreeMap<String, PathBuf>,
    #[serde(default = "default_iqn_prefix")]
    pub iqn_prefix: String,
    /// CHAP: initiators log in as this account.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
    /// Mutual CHAP: the target answers as this account (needs `chap`).
    #[serde(default)]
    pub mutual_chap: Option<ChapConfig>,
    /// iSCSI parameters set on every target (`tgtadm --mode target --op
    /// update --name K --value V`), e.g. MaxRecvDataSegmentLength.
    #[serde(default)]
    pub target_params: BTreeMap<String, String>,
}

fn default_iqn_prefix() -> String {
    DEFAULT_IQN_PREFIX.to_string()
}

/// "host:port" with the host lowercased, IPv6 in brackets, port 3260 when
/// absent; None when it is not a portal.
pub(super) fn normalize_portal(portal: &str) -> Option<String> {
    let p = portal.trim();
    if let Ok(sa) = p.parse::<std::net::SocketAddr>() {
        return Some(sa.to_string());
    }
    if let Ok(ip) = p.parse::<std::net::IpAddr>() {
        return Some(std::net::SocketAddr::new(ip, 3260).to_string());
    }
    let (host, port) = match p.rsplit_once(':') {
        Some((h, port)) => (h, port.parse::<u16>().ok().filter(|&n| n > 0)?),
        None => (p, 3260),
    };
    let host = host.to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then(|| format!("{host}:{port}"))
}

/// Whether an IQN prefix is usable: `iqn.` then `[a-z0-9.:-]`, short
/// enough to leave room for pool and id.
fn valid_iqn_prefix(p: &str) -> bool {
    p.starts_with("iqn.")
        && p.len() <= 120
        && !p.ends_with(':')
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".:-".contains(&b))
}

/// CHAP user names: tgtadm takes them as a plain argument and shows them
/// one per line.
fn valid_chap_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b))
}

/// Reads a CHAP secret: the file's content without one trailing newline,
/// 1 to 255 printable ASCII characters without spaces. Errors name the
/// file, never the content.
pub(super) fn read_secret(label: &str, chap: &ChapConfig) -> Result<String> {
    let object = format!("CHAP secret file {}", chap.secret_file.display());
    let mut s = String::new();
    std::fs::File::open(&chap.secret_file)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| DriverError::io(label, &object, "cannot read the CHAP secret", e))?;
    if let Ok(meta) = std::fs::metadata(&chap.secret_file) {
        if meta.mode() & 0o077 != 0 {
            warn!(
                file = %chap.secret_file.display(),
                "CHAP secret file is readable by group or others"
            );
        }
    }
    let s = s
        .strip_suffix("\r\n")
        .or_else(|| s.strip_suffix('\n'))
        .unwrap_or(&s);
    if s.is_empty() || s.len() > MAX_SECRET_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DriverError::new(
            DriverErrorKind::InvalidArgument,
            label,
            object,
            format!(
                "the secret must be 1 to {MAX_SECRET_LEN} printable ASCII characters without \
                 spaces (one trailing newline allowed)"
            ),
        ));
    }
    Ok(s.to_string())
}

pub(super) fn invalid(label: &str, object: &str, message: impl Into<String>) -> DriverError {
    DriverError::new(DriverErrorKind::InvalidArgument, label, object, message)
}

const CFG: &str = "configuration";

/// Checks a configuration (not the pool directories: the file driver
/// does) and reads the CHAP secrets once; the normalized portal.
pub(super) fn check(label: &str, config: &TgtConfig) -> Result<String> {
    let label = label.to_string();
    let portal = normalize_portal(&config.portal).ok_or_else(|| {
        invalid(
            &label,
            CFG,
            format!("portal '{}' is not host:port", config.portal),
        )
    })?;
    if !valid_iqn_prefix(&config.iqn_prefix) {
        return Err(invalid(
            &label,
            CFG,
            format!(
                "iqn_prefix '{}' is not an IQN prefix: 'iqn.' then up to 120 of [a-z0-9.:-], \
                 not ending in ':'",
                config.iqn_prefix
            ),
        ));
    }
    for (name, dir) in &config.pools {
        // Names become part of target names, paths tgtadm arguments and
        // lines of its output.
        if target_iqn(&config.iqn_prefix, name, &ExportTarget::Volume("x".into())).len()
            > MAX_IQN_LEN - 40
        {
            return Err(invalid(
                &label,
                CFG,
                format!("pool name '{name}' is too long"),
            ));
        }
        let ok = dir
            .to_str()
            .is_some_and(|s| !s.chars().any(char::is_control));
        if !ok {
            return Err(invalid(
                &label,
                CFG,
                format!(
                    "pool '{name}': the directory path must be UTF-8 without control characters"
                ),
            ));
        }
    }
    if config.control_port.is_some_and(|p| p > MAX_CONTROL_PORT) {
        return Err(invalid(
            &label,
            CFG,
            format!("control_port must be 0 to {MAX_CONTROL_PORT} (tgtadm's range)"),
        ));
    }
    if config.mutual_chap.is_some() && config.chap.is_none() {
        return Err(invalid(&label, CFG, "mutual_chap needs chap"));
    }
    for chap in config.chap.iter().chain(&config.mutual_chap) {
        if !valid_chap_user(&chap.user) {
            return Err(invalid(
                &label,
                CFG,
                format!("CHAP user '{}': use 1 to 64 of [A-Za-z0-9._-@:]", chap.user),
            ));
        }
        read_secret(&label, chap)?;
    }
    if let (Some(a), Some(b)) = (&config.chap, &config.mutual_chap) {
        if a.user == b.user {
            return Err(invalid(
                &label,
                CFG,
                "chap and mutual_chap must be different accounts",
            ));
        }
    }
    for (k, v) in &config.target_params {
        let ok = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !v.is_empty()
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b',');
        if !ok {
            return Err(invalid(
                &label,
                CFG,
                format!("target_params: '{k}' = '{v}' is not a tgt target parameter"),
            ));
        }
    }
    Ok(portal)
}
