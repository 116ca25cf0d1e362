//! volback's configuration file (YAML): the backends with their drivers and
//! pools, and the backup policy (where backups go, copy engine settings).
//!
//! ```yaml
//! backends:
//!   - name: primary
//!     driver: file
//!     options:
//!       loop_devices: true
//!     pools:
//!       gold: /srv/volback/gold
//!     backup_target: backup:vault     # optional, else backup.default_target
//!   - name: backup
//!     driver: file
//!     pools:
//!       vault: /srv/volback/vault
//! backup:
//!   default_target: backup:vault
//!   catalog: /var/lib/volback/catalog.db
//!   bwlimit: 200M
//!   copy: { block_size: 1M, queue_depth: 16, sparse: auto, verify: true }
//! ```
//!
//! Loading validates everything it can before any backup runs, and in
//! particular refuses a configuration in which a backup target is the same
//! storage as a pool it backs up (compared by [`PoolIdentity`], so two paths,
//! a symlink or a bind mount of one directory are caught).
//!
//! Driver options may hold secrets (CHAP passwords, Ceph keys) in later
//! drivers: errors about them name the key, never the value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_norway::Value;
use volback_connectors::rbd::ClusterConfig;
use volback_drivers::file::FileDriver;
use volback_drivers::rbd::RbdDriver;
use volback_drivers::tgt::{ChapConfig, TgtConfig, TgtDriver};
use volback_drivers::{DriverError, PoolIdentity, VolumeDriver};

use crate::copy::{CopyOptions, SparseMode, DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH};
use crate::units::parse_bytes;

/// The catalog's location when `backup.catalog` is not given.
pub const DEFAULT_CATALOG: &str = "/var/lib/volback/catalog.db";

/// Block sizes must be a multiple of this.
pub const BLOCK_SIZE_ALIGN: u64 = 4096;
/// The largest block size the copy engine accepts.
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;
/// The largest queue depth the copy engine accepts.
pub const MAX_QUEUE_DEPTH: usize = 1024;

/// The drivers this build knows, as written in `driver:`.
pub const KNOWN_DRIVERS: &[&str] = &["file", "rbd", "tgt"];

const FILE_OPTIONS: &[&str] = &["loop_devices"];

const RBD_OPTIONS: &[&str] = &["conf", "connect_timeout", "id", "keyring"];

const TGT_OPTIONS: &[&str] = &[
    "chap",
    "control_port",
    "iqn_prefix",
    "mutual_chap",
    "portal",
    "target_params",
];

/// The longest `connect_timeout` accepted, in seconds.
const MAX_CONNECT_TIMEOUT: f64 = 3600.0;

// ---------------------------------------------------------------------------
// Errors

/// Everything that can be wrong with a configuration. Each message says what
/// is wrong and where (the file, the backend, the pool); none prints the
/// value of a driver option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: YAML syntax error: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}:{column}: unknown key `{key}` in {section} ({expected})")]
    UnknownKey {
        file: String,
        line: usize,
        column: usize,
        /// Where the key is, e.g. "backends[0]" or "the top level".
        section: String,
        key: String,
        /// The keys allowed there, as the parser lists them.
        expected: String,
    },
    /// A value of the wrong type, a missing required key, an unknown
    /// `sparse` mode and the like.
    #[error("{file}{at}: {message}", at = fmt_at(*line, *column))]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: no backends configured (`backends:` must list at least one)")]
    NoBackends { file: String },
    #[error("{file}: backend name `{backend}` is used more than once")]
    DuplicateBackend { file: String, backend: String },
    #[error(
        "{file}: bad backend name `{backend}`: names may only use letters, digits, `_` and `-`"
    )]
    BadBackendName { file: String, backend: String },
    #[error("{file}: backend `{backend}`: bad pool name `{pool}`: names may only use letters, digits, `_` and `-`")]
    BadPoolName {
        file: String,
        backend: String,
        pool: String,
    },
    #[error("{file}: backend `{backend}`: unknown driver `{driver}` (known drivers: {known})")]
    UnknownDriver {
        file: String,
        backend: String,
        driver: String,
        known: String,
    },
    #[error("{file}: backend `{backend}` (driver {driver}) has no pools (`pools:` must list at least one)")]
    NoPools {
        file: String,
        backend: String,
        driver: String,
    },
    #[error("{file}: backend `{backend}`: unknown option `{key}` for driver {driver} (known options: {known})")]
    UnknownOption {
        file: String,
        backend: String,
        driver: String,
        key: String,
        known: String,
    },
    /// A driver option with a value of the wrong kind. The value itself is
    /// never shown: options may be secrets.
    #[error("{file}: backend `{backend}`: option `{key}` must be {expected}")]
    BadOption {
        file: String,
        backend: String,
        key: String,
        expected: String,
    },
    /// The driver refused a pool (for file pools: the directory does not
    /// exist or is not a directory), or could not tell its identity.
    #[error("{file}: backend `{backend}`, pool `{pool}`: {source}")]
    Pool {
        file: String,
        backend: String,
        pool: String,
        #[source]
        source: Box<DriverError>,
    },
    /// The driver could not be set up, for a reason not tied to one pool.
    #[error("{file}: backend `{backend}`: {source}")]
    Driver {
        file: String,
        backend: String,
        #[source]
        source: Box<DriverError>,
    },
    /// A `backend:pool` reference that does not parse (outside the file).
    #[error("bad pool reference: {reason}")]
    BadPoolRef { value: String, reason: String },
    #[error("{file}: {key}: `{value}` is not a BACKEND:POOL reference: {reason}")]
    BadTarget {
        file: String,
        /// Which setting, e.g. "backup.default_target".
        key: String,
        value: String,
        reason: String,
    },
    #[error("{file}: {key}: target `{target}` names unknown backend `{}` (known backends: {known})", .target.backend)]
    UnknownTargetBackend {
        file: String,
        key: String,
        target: PoolRef,
        known: String,
    },
    #[error("{file}: {key}: target `{target}` names unknown pool `{}` of backend `{}` (its pools: {known})", .target.pool, .target.backend)]
    UnknownTargetPool {
        file: String,
        key: String,
        target: PoolRef,
        known: String,
    },
    #[error("{file}: {key}: {message}")]
    BadSize {
        file: String,
        key: String,
        message: String,
    },
    #[error("{file}: backup.copy.queue_depth: {value} is out of range (1 to {MAX_QUEUE_DEPTH})")]
    BadQueueDepth { file: String, value: u64 },
    #[error("{file}: backup.copy.block_size: {value} bytes is not allowed: it must be a multiple of {BLOCK_SIZE_ALIGN} bytes, from 4 KiB to 64 MiB")]
    BadBlockSize { file: String, value: u64 },
    /// A backup target is the same storage as a pool it would back up.
    #[error("{context}: backup target {target} and pool {source_pool} are the same storage (pool identity {identity}): a backup must never be stored in the pool it protects")]
    SamePool {
        /// Where: the configuration file and backend, or "backup request".
        context: String,
        source_pool: Box<PoolRef>,
        target: Box<PoolRef>,
        identity: PoolIdentity,
    },
    #[error("unknown backend `{backend}` (known backends: {known})")]
    UnknownBackend { backend: String, known: String },
    #[error("backend `{backend}` has no pool `{pool}` (its pools: {known})")]
    UnknownPool {
        backend: String,
        pool: String,
        known: String,
    },
    /// A driver failed to tell a pool's identity for a per-request check.
    #[error("pool {pool}: {source}")]
    PoolIdentity {
        pool: PoolRef,
        #[source]
        source: Box<DriverError>,
    },
}

fn fmt_at(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| format!("`{s}`")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

// ---------------------------------------------------------------------------
// Pool references

/// A pool of a backend, written `backend:pool`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolRef {
    pub backend: String,
    pub pool: String,
}

impl PoolRef {
    pub fn new(backend: impl Into<String>, pool: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            pool: pool.into(),
        }
    }
}

impl fmt::Display for PoolRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.backend, self.pool)
    }
}

impl FromStr for PoolRef {
    /// Always [`ConfigError::BadPoolRef`].
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_pool_ref(s).map_err(|reason| ConfigError::BadPoolRef {
            value: s.into(),
            reason,
        })
    }
}

/// Parses `backend:pool`, or says why not.
fn parse_pool_ref(s: &str) -> Result<PoolRef, String> {
    let Some((backend, pool)) = s.split_once(':') else {
        return Err(format!(
            "`{s}` has no `:`; expected BACKEND:POOL, e.g. backup:vault"
        ));
    };
    if pool.contains(':') {
        return Err(format!(
            "`{s}` has more than one `:`; expected BACKEND:POOL"
        ));
    }
    for (what, name) in [("backend", backend), ("pool", pool)] {
        if name.is_empty() {
            return Err(format!(
                "`{s}` has an empty {what} name; expected BACKEND:POOL"
            ));
        }
        if !valid_name(name) {
            return Err(format!(
                "`{s}`: {what} name `{name}` may only use letters, digits, `_` and `-`"
            ));
        }
    }
    Ok(PoolRef::new(backend, pool))
}

impl Serialize for PoolRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PoolRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Backend and pool names: `[A-Za-z0-9_-]+`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

// ---------------------------------------------------------------------------
// The validated configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    File,
    Rbd,
    Tgt,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::File => "file",
            DriverKind::Rbd => "rbd",
            DriverKind::Tgt => "tgt",
        }
    }
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DriverKind {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "file" => Ok(DriverKind::File),
            "rbd" => Ok(DriverKind::Rbd),
            "tgt" => Ok(DriverKind::Tgt),
            _ => Err(()),
        }
    }
}

/// Settings of a file backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSettings {
    /// Export volumes through loop devices (option `loop_devices`, default
    /// true) rather than handing out the image file.
    pub loop_devices: bool,
    /// Pool name to directory, relative paths resolved against the
    /// configuration file's directory (not canonicalized).
    pub pool_dirs: BTreeMap<String, PathBuf>,
}

/// Settings of an rbd backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSettings {
    /// How to reach the cluster: options `conf` (required), `id`,
    /// `keyring` (paths relative to the configuration file's directory)
    /// and `connect_timeout` (seconds).
    pub cluster: ClusterConfig,
    /// Pool name to Ceph pool name.
    pub ceph_pools: BTreeMap<String, String>,
}

/// The driver-specific part of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverSettings {
    File(FileSettings),
    Rbd(RbdSettings),
    /// An iSCSI array served by tgtd (pool directories resolved against
    /// the configuration file's directory, as are the CHAP secret files).
    Tgt(TgtConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub driver: DriverKind,
    /// Pool name to its location as written in the file (for file pools a
    /// directory; see [`FileSettings::pool_dirs`] for the resolved path).
    pub pools: BTreeMap<String, String>,
    pub settings: DriverSettings,
    /// Where this backend's volumes are backed up, if not the default.
    pub backup_target: Option<PoolRef>,
}

impl BackendConfig {
    /// Whether to export this backend's volumes through loop devices
    /// (meaningful for file backends; false for others).
    pub fn loop_devices(&self) -> bool {
        match &self.settings {
            DriverSettings::File(f) => f.loop_devices,
            DriverSettings::Rbd(_) | DriverSettings::Tgt(_) => false,
        }
    }

    pub fn has_pool(&self, pool: &str) -> bool {
        self.pools.contains_key(pool)
    }

    pub fn pool_names(&self) -> impl Iterator<Item = &str> {
        self.pools.keys().map(String::as_str)
    }
}

/// Copy engine settings (`backup.copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySettings {
    pub block_size: u64,
    pub queue_depth: usize,
    pub sparse: SparseMode,
    pub verify: bool,
}

impl Default for CopySettings {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            sparse: SparseMode::Auto,
            verify: true,
        }
    }
}

/// The `backup:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPolicy {
    pub default_target: PoolRef,
    /// The catalog database, resolved against the configuration file's
    /// directory; [`DEFAULT_CATALOG`] if not given.
    pub catalog: PathBuf,
    /// Bytes per second, None for no limit.
    pub bwlimit: Option<u64>,
    pub copy: CopySettings,
    /// Block size of every backup's checksum map (the hash-map change
    /// tracking granularity). Changing it forces the next backup full.
    pub map_block_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub backends: Vec<BackendConfig>,
    pub backup: BackupPolicy,
}

impl Config {
    /// Reads, validates and instantiates the configuration in `path`.
    /// Relative paths in it are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let file = path.display().to_string();
        let yaml = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base_dir = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        load_str(&yaml, &base_dir, file, Some(abs))
    }

    /// As [`Config::load`] for a configuration given as text; relative
    /// paths are relative to `base_dir`.
    pub fn parse(yaml: &str, base_dir: &Path) -> Result<Loaded, ConfigError> {
        let file = format!("configuration (in {})", base_dir.display());
        load_str(yaml, base_dir, file, None)
    }

    pub fn backend(&self, name: &str) -> Option<&BackendConfig> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The target of a backend's backups: its own override, or the default.
    pub fn target_for(&self, backend: &str) -> PoolRef {
        self.backend(backend)
            .and_then(|b| b.backup_target.clone())
            .unwrap_or_else(|| self.backup.default_target.clone())
    }

    /// The copy engine options for backups.
    pub fn copy_options(&self) -> CopyOptions {
        CopyOptions {
            block_size: self.backup.copy.block_size,
            queue_depth: self.backup.copy.queue_depth,
            sparse: self.backup.copy.sparse,
            bwlimit: self.backup.bwlimit,
            verify: self.backup.copy.verify,
            // Other fields (destination_is_zero, ...) are per request.
            ..CopyOptions::default()
        }
    }
}

// ---------------------------------------------------------------------------
// Registry of instantiated drivers

struct Entry {
    config: BackendConfig,
    driver: Arc<dyn VolumeDriver>,
}

/// The configured backends with their drivers.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, e)| (k, e.driver.kind())))
            .finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend (for tests with other drivers; [`Config::load`] fills
    /// the registry itself). Replaces a backend of the same name.
    pub fn insert(&mut self, config: BackendConfig, driver: Arc<dyn VolumeDriver>) {
        self.entries
            .insert(config.name.clone(), Entry { config, driver });
    }

    /// Backend names, sorted.
    pub fn backends(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn driver(&self, backend: &str) -> Result<&Arc<dyn VolumeDriver>, ConfigError> {
        self.entry(backend).map(|e| &e.driver)
    }

    /// The configuration of a backend (pools, options such as `loop_devices`).
    pub fn backend(&self, backend: &str) -> Result<&BackendConfig, ConfigError> {
        self.entry(backend).map(|e| &e.config)
    }

    /// Checks that `pool` is a configured pool and returns its driver.
    pub fn pool_driver(&self, pool: &PoolRef) -> Result<&Arc<dyn VolumeDriver>, ConfigError> {
        let e = self.entry(&pool.backend)?;
        if !e.config.has_pool(&pool.pool) {
            return Err(ConfigError::UnknownPool {
                backend: pool.backend.clone(),
                pool: pool.pool.clone(),
                known: list(e.config.pool_names()),
            });
        }
        Ok(&e.driver)
    }

    /// The pool's identity, asked of its driver now.
    pub fn pool_identity(&self, pool: &PoolRef) -> Result<PoolIdentity, ConfigError> {
        self.pool_driver(pool)?
            .pool_identity(&pool.pool)
            .map_err(|source| ConfigError::PoolIdentity {
                pool: pool.clone(),
                source: Box::new(source),
            })
    }

    fn entry(&self, backend: &str) -> Result<&Entry, ConfigError> {
        self.entries
            .get(backend)
            .ok_or_else(|| ConfigError::UnknownBackend {
                backend: backend.to_string(),
                known: list(self.backends()),
            })
    }
}

// ---------------------------------------------------------------------------
// Loaded configuration

/// A validated configuration with its drivers.
#[derive(Debug)]
pub struct Loaded {
    /// Validated: change it only through a new load.
    pub config: Config,
    pub registry: Registry,
    path: Option<PathBuf>,
}

impl Loaded {
    /// Validates the backup targets of `config` (they exist, and none is
    /// the same storage as a pool it backs up) against drivers built
    /// elsewhere. [`Config::load`] does this itself; this is for tests with
    /// other drivers.
    pub fn new(config: Config, registry: Registry) -> Result<Loaded, ConfigError> {
        check_targets(&config, &registry, "configuration")?;
        Ok(Loaded {
            config,
            registry,
            path: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The configuration file (absolute), if loaded from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn copy_options(&self) -> CopyOptions {
        self.config.copy_options()
    }

    /// The target of `backend`'s backups: its `backup_target`, or the
    /// default target. An unknown backend is an error.
    pub fn target_for(&self, backend: &str) -> Result<PoolRef, ConfigError> {
        self.registry.backend(backend)?;
        Ok(self.config.target_for(backend))
    }

    /// Whether to export `backend`'s volumes through loop devices.
    pub fn loop_devices(&self, backend: &str) -> Result<bool, ConfigError> {
        Ok(self.registry.backend(backend)?.loop_devices())
    }

    /// Every backend (in configuration order) with its pool names (sorted).
    pub fn pools(&self) -> Vec<(String, Vec<String>)> {
        self.config
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.pools.keys().cloned().collect()))
            .collect()
    }

    /// The catalog database (`backup.catalog`, resolved).
    pub fn catalog_path(&self) -> &Path {
        &self.config.backup.catalog
    }

    /// The per-request same-pool check: refuses to back up `source` onto
    /// `target` when they are the same pool by name or the same storage by
    /// identity (asked of the drivers now, so a mount made since loading is
    /// seen). Both pools must be configured.
    pub fn check_not_same_pool(
        &self,
        source: &PoolRef,
        target: &PoolRef,
    ) -> Result<(), ConfigError> {
        let source_id = self.registry.pool_identity(source)?;
        let target_id = self.registry.pool_identity(target)?;
        if source == target || source_id == target_id {
            return Err(ConfigError::SamePool {
                context: "backup request".into(),
                source_pool: Box::new(source.clone()),
                target: Box::new(target.clone()),
                identity: target_id,
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Parsing

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    backends: Vec<RawBackend>,
    backup: Option<RawBackup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    driver: String,
    /// Driver-specific; checked key by key so that errors never show values.
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    pools: Option<BTreeMap<String, String>>,
    #[serde(default)]
    backup_target: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    default_target: String,
    #[serde(default)]
    catalog: Option<PathBuf>,
    #[serde(default)]
    bwlimit: Option<Value>,
    #[serde(default)]
    copy: Option<RawCopy>,
    #[serde(default)]
    map_block_size: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    #[serde(default)]
    block_size: Option<Value>,
    #[serde(default)]
    queue_depth: Option<u64>,
    #[serde(default)]
    sparse: Option<RawSparse>,
    #[serde(default)]
    verify: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawSparse {
    Auto,
    Always,
    Never,
}

fn load_str(
    yaml: &str,
    base_dir: &Path,
    file: String,
    path: Option<PathBuf>,
) -> Result<Loaded, ConfigError> {
    let config = parse_config(yaml, base_dir, &file)?;
    let registry = build_registry(&config, &file)?;
    check_targets(&config, &registry, &file)?;
    tracing::debug!(file = %file, backends = config.backends.len(), "configuration loaded");
    Ok(Loaded {
        config,
        registry,
        path,
    })
}

fn yaml_error(e: serde_norway::Error, file: &str, syntax: bool) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let text = e.to_string();
    // Drop the parser's own " at line L column C": the location is in front.
    let message = match text.rfind(" at line ") {
        Some(i) if line != 0 => text[..i].to_string(),
        _ => text.clone(),
    };
    if syntax {
        return ConfigError::Syntax {
            file: file.to_string(),
            line,
            column,
            message,
        };
    }
    // serde's deny_unknown_fields: "[path: ]unknown field `k`, expected ...".
    if let Some(i) = message.find("unknown field `") {
        let section = message[..i].trim_end_matches(": ").to_string();
        let rest = &message[i + "unknown field `".len()..];
        if let Some(end) = rest.find('`') {
            let expected = rest[end + 1..].trim_start_matches(", ").to_string();
            return ConfigError::UnknownKey {
                file: file.to_string(),
                line,
                column,
                section: if section.is_empty() {
                    "the top level".into()
                } else {
                    format!("`{section}`")
                },
                key: rest[..end].to_string(),
                expected,
            };
        }
    }
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

fn parse_config(yaml: &str, base_dir: &Path, file: &str) -> Result<Config, ConfigError> {
    // First as a plain YAML tree: syntax errors, and duplicate keys (which a
    // typed map would silently let the last one win).
    let tree: Value = serde_norway::from_str(yaml).map_err(|e| yaml_error(e, file, true))?;
    let raw: RawConfig = if tree.is_null() {
        RawConfig {
            backends: Vec::new(),
            backup: None,
        }
    } else {
        serde_norway::from_str(yaml).map_err(|e| yaml_error(e, file, false))?
    };

    if raw.backends.is_empty() {
        return Err(ConfigError::NoBackends { file: file.into() });
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backends.len());
    for b in raw.backends {
        backends.push(parse_backend(b, base_dir, file)?);
        let name = &backends.last().expect("just pushed").name;
        if backends.iter().filter(|o| &o.name == name).count() > 1 {
            return Err(ConfigError::DuplicateBackend {
                file: file.into(),
                backend: name.clone(),
            });
        }
    }

    let Some(rb) = raw.backup else {
        return Err(ConfigError::Invalid {
            file: file.into(),
            line: 0,
            column: 0,
            message: "missing section `backup` (it needs at least `default_target: BACKEND:POOL`)"
                .into(),
        });
    };
    let default_target = parse_target(&rb.default_target, "backup.default_target", file)?;
    let catalog = base_dir.join(rb.catalog.unwrap_or_else(|| DEFAULT_CATALOG.into()));
    let bwlimit = match rb.bwlimit {
        None | Some(Value::Null) => None,
        Some(v) => {
            let n = size_value(&v, "backup.bwlimit", file)?;
            if n == 0 {
                return Err(ConfigError::BadSize {
                    file: file.into(),
                    key: "backup.bwlimit".into(),
                    message: "must be more than 0 (leave it out for no limit)".into(),
                });
            }
            Some(n)
        }
    };
    let mut copy = CopySettings::default();
    if let Some(rc) = rb.copy {
        if let Some(v) = rc.block_size.filter(|v| !v.is_null()) {
            copy.block_size = size_value(&v, "backup.copy.block_size", file)?;
            if copy.block_size == 0
                || copy.block_size % BLOCK_SIZE_ALIGN != 0
                || copy.block_size > MAX_BLOCK_SIZE
            {
                return Err(ConfigError::BadBlockSize {
                    file: file.into(),
                    value: copy.block_size,
                });
            }
        }
        if let Some(q) = rc.queue_depth {
            if q == 0 || q > MAX_QUEUE_DEPTH as u64 {
                return Err(ConfigError::BadQueueDepth {
                    file: file.into(),
                    value: q,
                });
            }
            copy.queue_depth = q as usize;
        }
        if let Some(s) = rc.sparse {
            copy.sparse = match s {
                RawSparse::Auto => SparseMode::Auto,
                RawSparse::Always => SparseMode::Always,
                RawSparse::Never => SparseMode::Never,
            };
        }
        if let Some(v) = rc.verify {
            copy.verify = v;
        }
    }
    let mut map_block_size = crate::copy::DEFAULT_MAP_BLOCK;
    if let Some(v) = rb.map_block_size.filter(|v| !v.is_null()) {
        map_block_size = size_value(&v, "backup.map_block_size", file)?;
        if map_block_size == 0
            || map_block_size % BLOCK_SIZE_ALIGN != 0
            || copy.block_size % map_block_size != 0
        {
            return Err(ConfigError::BadSize {
                file: file.into(),
                key: "backup.map_block_size".into(),
                message: format!(
                    "{map_block_size} must be a multiple of {BLOCK_SIZE_ALIGN} that divides backup.copy.block_size ({})",
                    copy.block_size
                ),
            });
        }
    }
    Ok(Config {
        backends,
        backup: BackupPolicy {
            default_target,
            catalog,
            bwlimit,
            copy,
            map_block_size,
        },
    })
}

fn parse_backend(b: RawBackend, base_dir: &Path, file: &str) -> Result<BackendConfig, ConfigError> {
    if !valid_name(&b.name) {
        return Err(ConfigError::BadBackendName {
            file: file.into(),
            backend: b.name,
        });
    }
    let Ok(driver) = b.driver.parse::<DriverKind>() else {
        return Err(ConfigError::UnknownDriver {
            file: file.into(),
            backend: b.name,
            driver: b.driver,
            known: list(KNOWN_DRIVERS.iter().copied()),
        });
    };
    let pools = b.pools.unwrap_or_default();
    if pools.is_empty() {
        return Err(ConfigError::NoPools {
            file: file.into(),
            backend: b.name,
            driver: driver.to_string(),
        });
    }
    if let Some(p) = pools.keys().find(|p| !valid_name(p)) {
        return Err(ConfigError::BadPoolName {
            file: file.into(),
            backend: b.name.clone(),
            pool: p.clone(),
        });
    }
    let options = match b.options {
        None | Some(Value::Null) => serde_norway::Mapping::new(),
        Some(Value::Mapping(m)) => m,
        Some(_) => {
            return Err(ConfigError::BadOption {
                file: file.into(),
                backend: b.name,
                key: "options".into(),
                expected: "a mapping of option names to values".into(),
            })
        }
    };
    let settings = match driver {
        DriverKind::File => {
            let opts = OptionErrors::new(file, &b.name, driver);
            let mut loop_devices = true;
            for (key, v) in opts.entries(&options)? {
                match key {
                    "loop_devices" => {
                        loop_devices = v.as_bool().ok_or_else(|| opts.bad(key, "true or false"))?
                    }
                    _ => return Err(opts.unknown(key)),
                }
            }
            DriverSettings::File(FileSettings {
                loop_devices,
                pool_dirs: pools
                    .iter()
                    .map(|(k, v)| (k.clone(), base_dir.join(v)))
                    .collect(),
            })
        }
        DriverKind::Rbd => DriverSettings::Rbd(parse_rbd_options(
            &b.name, &options, &pools, base_dir, file,
        )?),
        DriverKind::Tgt => DriverSettings::Tgt(parse_tgt_options(
            &b.name, &options, &pools, base_dir, file,
        )?),
    };
    let backup_target = match &b.backup_target {
        None => None,
        Some(t) => Some(parse_target(
            t,
            &format!("backend `{}`: backup_target", b.name),
            file,
        )?),
    };
    Ok(BackendConfig {
        name: b.name,
        driver,
        pools,
        settings,
        backup_target,
    })
}

/// Reading one backend's options: its (name, value) pairs, and the errors
/// about them, which name the key and never the value (it may be a secret).
struct OptionErrors<'a> {
    file: &'a str,
    backend: &'a str,
    driver: DriverKind,
}

impl<'a> OptionErrors<'a> {
    fn new(file: &'a str, backend: &'a str, driver: DriverKind) -> Self {
        Self {
            file,
            backend,
            driver,
        }
    }

    fn bad(&self, key: &str, expected: &str) -> ConfigError {
        ConfigError::BadOption {
            file: self.file.into(),
            backend: self.backend.into(),
            key: key.into(),
            expected: expected.into(),
        }
    }

    fn unknown(&self, key: &str) -> ConfigError {
        let known = match self.driver {
            DriverKind::File => FILE_OPTIONS,
            DriverKind::Rbd => RBD_OPTIONS,
            DriverKind::Tgt => TGT_OPTIONS,
        };
        ConfigError::UnknownOption {
            file: self.file.into(),
            backend: self.backend.into(),
            driver: self.driver.to_string(),
            key: key.into(),
            known: list(known.iter().copied()),
        }
    }

    /// The options' (name, value) pairs; a name that is not a string is an error.
    fn entries<'m>(
        &self,
        options: &'m serde_norway::Mapping,
    ) -> Result<Vec<(&'m str, &'m Value)>, ConfigError> {
        options
            .iter()
            .map(|(k, v)| match k.as_str() {
                Some(key) => Ok((key, v)),
                None => Err(self.bad("options", "a mapping with string keys")),
            })
            .collect()
    }

    /// Option `key`'s value as a non-empty string.
    fn string(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| self.bad(key, "a non-empty string"))
    }
}

/// The options of an rbd backend, key by key; errors name the key, never
/// the value.
fn parse_rbd_options(
    backend: &str,
    options: &serde_norway::Mapping,
    pools: &BTreeMap<String, String>,
    base_dir: &Path,
    file: &str,
) -> Result<RbdSettings, ConfigError> {
    let opts = OptionErrors::new(file, backend, DriverKind::Rbd);
    let bad = |key: &str, expected: &str| opts.bad(key, expected);
    let mut cluster = ClusterConfig::default();
    for (key, v) in opts.entries(options)? {
        let string = || opts.string(key, v);
        match key {
            "conf" => cluster.conf = Some(base_dir.join(string()?)),
            "keyring" => cluster.keyring = Some(base_dir.join(string()?)),
            "id" => cluster.id = Some(string()?),
            "connect_timeout" => {
                let secs = v
                    .as_f64()
                    .filter(|s| *s > 0.0 && *s <= MAX_CONNECT_TIMEOUT)
                    .ok_or_else(|| {
                        bad(
                            key,
                            &format!("a number of seconds above 0, at most {MAX_CONNECT_TIMEOUT}"),
                        )
                    })?;
                cluster.connect_timeout = std::time::Duration::from_secs_f64(secs);
            }
            _ => return Err(opts.unknown(key)),
        }
    }
    if cluster.conf.is_none() {
        return Err(bad(
            "conf",
            "given: the path of the cluster's ceph.conf (option `conf` is required for driver rbd)",
        ));
    }
    if let Some((pool, _)) = pools.iter().find(|(_, ceph)| ceph.is_empty()) {
        return Err(ConfigError::Invalid {
            file: file.into(),
            line: 0,
            column: 0,
            message: format!("backend `{backend}`: pool `{pool}`: the ceph pool name is empty"),
        });
    }
    Ok(RbdSettings {
        cluster,
        ceph_pools: pools.clone(),
    })
}

/// The options of a tgt backend, key by key; errors name the key, never
/// the value.
fn parse_tgt_options(
    backend: &str,
    options: &serde_norway::Mapping,
    pools: &BTreeMap<String, String>,
    base_dir: &Path,
    file: &str,
) -> Result<TgtConfig, ConfigError> {
    let opts = OptionErrors::new(file, backend, DriverKind::Tgt);
    let bad = |key: &str, expected: &str| opts.bad(key, expected);
    let mut config = TgtConfig {
        portal: String::new(),
        control_port: None,
        pools: pools
            .iter()
            .map(|(k, v)| (k.clone(), base_dir.join(v)))
            .collect(),
        iqn_prefix: volback_drivers::tgt::DEFAULT_IQN_PREFIX.to_string(),
        chap: None,
        mutual_chap: None,
        target_params: BTreeMap::new(),
    };
    let chap = |key: &str, v: &Value| -> Result<ChapConfig, ConfigError> {
        let mut c: ChapConfig = serde_norway::from_value(v.clone())
            .map_err(|_| bad(key, "a mapping with `user` and `secret_file` (a path)"))?;
        c.secret_file = base_dir.join(&c.secret_file);
        Ok(c)
    };
    for (key, v) in opts.entries(options)? {
        let string = || opts.string(key, v);
        match key {
            "portal" => config.portal = string()?,
            "iqn_prefix" => config.iqn_prefix = string()?,
            "control_port" => {
                let port = v.as_u64().and_then(|n| u32::try_from(n).ok());
                config.control_port =
                    Some(port.ok_or_else(|| bad(key, "tgtd's control port, a whole number"))?);
            }
            "chap" => config.chap = Some(chap(key, v)?),
            "mutual_chap" => config.mutual_chap = Some(chap(key, v)?),
            "target_params" => {
                config.target_params = serde_norway::from_value(v.clone())
                    .map_err(|_| bad(key, "a mapping of iSCSI parameter names to values"))?;
            }
            _ => return Err(opts.unknown(key)),
        }
    }
    if config.portal.is_empty() {
        return Err(bad(
            "portal",
            "given: the iSCSI portal initiators connect to, HOST:PORT (required for driver tgt)",
        ));
    }
    if config.mutual_chap.is_some() && config.chap.is_none() {
        return Err(bad("mutual_chap", "given only together with `chap`"));
    }
    Ok(config)
}

fn parse_target(s: &str, key: &str, file: &str) -> Result<PoolRef, ConfigError> {
    parse_pool_ref(s).map_err(|reason| ConfigError::BadTarget {
        file: file.into(),
        key: key.into(),
        value: s.into(),
        reason,
    })
}

/// A size as an integer or a string like "1M".
fn size_value(v: &Value, key: &str, file: &str) -> Result<u64, ConfigError> {
    let bad = |message: String| ConfigError::BadSize {
        file: file.into(),
        key: key.into(),
        message,
    };
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            bad(format!(
                "{n} is not a size (a whole number of bytes, or e.g. 64K, 1M, 2GiB)"
            ))
        }),
        Value::String(s) => parse_bytes(s).map_err(bad),
        _ => Err(bad(
            "must be a number of bytes or a size such as 64K, 1M, 2GiB".into(),
        )),
    }
}

fn build_registry(config: &Config, file: &str) -> Result<Registry, ConfigError> {
    let mut registry = Registry::new();
    for b in &config.backends {
        let driver: Arc<dyn VolumeDriver> = match &b.settings {
            DriverSettings::File(f) => Arc::new(open_file_backend(&b.name, f, file)?),
            DriverSettings::Tgt(t) => {
                Arc::new(TgtDriver::new(&b.name, t.clone()).map_err(|source| {
                    ConfigError::Driver {
                        file: file.into(),
                        backend: b.name.clone(),
                        source: Box::new(source),
                    }
                })?)
            }
            DriverSettings::Rbd(r) => Arc::new(
                RbdDriver::new(&b.name, r.cluster.clone(), r.ceph_pools.clone()).map_err(
                    |source| ConfigError::Driver {
                        file: file.into(),
                        backend: b.name.clone(),
                        source: Box::new(source),
                    },
                )?,
            ),
        };
        // Every pool must answer for its identity now, not at the first backup.
        for pool in b.pool_names() {
            driver
                .pool_identity(pool)
                .map_err(|source| ConfigError::Pool {
                    file: file.into(),
                    backend: b.name.clone(),
                    pool: pool.into(),
                    source: Box::new(source),
                })?;
        }
        registry.insert(b.clone(), driver);
    }
    Ok(registry)
}

fn open_file_backend(name: &str, f: &FileSettings, file: &str) -> Result<FileDriver, ConfigError> {
    match FileDriver::new(name, f.pool_dirs.clone()) {
        Ok(d) => Ok(d),
        Err(source) => {
            // Say which pool, when the driver refuses one of them alone.
            for (pool, dir) in &f.pool_dirs {
                let one = BTreeMap::from([(pool.clone(), dir.clone())]);
                if let Err(source) = FileDriver::new(name, one) {
                    return Err(ConfigError::Pool {
                        file: file.into(),
                        backend: name.into(),
                        pool: pool.clone(),
                        source: Box::new(source),
                    });
                }
            }
            Err(ConfigError::Driver {
                file: file.into(),
                backend: name.into(),
                source: Box::new(source),
            })
        }
    }
}

/// Every target names a configured pool, and no target is the same storage
/// as a pool it backs up (a target pool itself, by name, is exempt here).
fn check_targets(config: &Config, registry: &Registry, file: &str) -> Result<(), ConfigError> {
    let check_exists = |t: &PoolRef, key: &str| -> Result<(), ConfigError> {
        let Some(b) = config.backend(&t.backend) else {
            return Err(ConfigError::UnknownTargetBackend {
                file: file.into(),
                key: key.into(),
                target: t.clone(),
                known: list(config.backends.iter().map(|b| b.name.as_str())),
            });
        };
        if !b.has_pool(&t.pool) {
            return Err(ConfigError::UnknownTargetPool {
                file: file.into(),
                key: key.into(),
                target: t.clone(),
                known: list(b.pool_names()),
            });
        }
        Ok(())
    };
    check_exists(&config.backup.default_target, "backup.default_target")?;
    for b in &config.backends {
        if let Some(t) = &b.backup_target {
            check_exists(t, &format!("backend `{}`: backup_target", b.name))?;
        }
    }

    let mut identities: BTreeMap<PoolRef, PoolIdentity> = BTreeMap::new();
    let mut identity = |p: &PoolRef| -> Result<PoolIdentity, ConfigError> {
        if let Some(id) = identities.get(p) {
            return Ok(id.clone());
        }
        let id = registry
            .pool_driver(p)?
            .pool_identity(&p.pool)
            .map_err(|source| ConfigError::Pool {
                file: file.into(),
                backend: p.backend.clone(),
                pool: p.pool.clone(),
                source: Box::new(source),
            })?;
        identities.insert(p.clone(), id.clone());
        Ok(id)
    };
    for b in &config.backends {
        let target = config.target_for(&b.name);
        let target_id = identity(&target)?;
        for pool in b.pool_names() {
            let source = PoolRef::new(&b.name, pool);
            if source == target {
                continue;
            }
            if identity(&source)? == target_id {
                let key = match b.backup_target {
                    Some(_) => "its backup_target",
                    None => "backup.default_target",
                };
                return Err(ConfigError::SamePool {
                    context: format!("{file}: backend `{}` ({key})", b.name),
                    source_pool: Box::new(source),
                    target: Box::new(target),
                    identity: target_id,
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::Command;

    use tempfile::TempDir;

    /// A temp dir holding pool directories `a`, `b`, `vault` and the config.
    fn setup() -> TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in ["a", "b", "vault"] {
            fs::create_dir(t.path().join(d)).unwrap();
        }
        t
    }

    fn good_yaml(dir: &Path) -> String {
        format!(
            "backends:
  - name: primary
    driver: file
    options:
      loop_devices: false
    pools:
      gold: {a}
      silver: {b}
    backup_target: backup:vault
  - name: backup
    driver: file
    pools:
      vault: {v}
backup:
  default_target: backup:vault
  catalog: state/catalog.db
  bwlimit: 200M
  copy:
    block_size: 2M
    queue_depth: 8
    sparse: always
    verify: false
",
            a = dir.join("a").display(),
            b = dir.join("b").display(),
            v = dir.join("vault").display(),
        )
    }

    fn minimal(pools_primary: &str, pools_backup: &str, target: &str) -> String {
        format!(
            "backends:
  - name: primary
    driver: file
    pools: {{{pools_primary}}}
  - name: backup
    driver: file
    pools: {{{pools_backup}}}
backup:
  default_target: {target}
"
        )
    }

    fn err(yaml: &str, dir: &Path) -> ConfigError {
        match Config::parse(yaml, dir) {
            Ok(l) => panic!("expected an error, loaded {:?}", l.config()),
            Err(e) => e,
        }
    }

    #[test]
    fn valid_config_loads() {
        let t = setup();
        let path = t.path().join("volback.yaml");
        fs::write(&path, good_yaml(t.path())).unwrap();
        let l = Config::load(&path).unwrap();
        let c = l.config();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(
            l.registry().backends().collect::<Vec<_>>(),
            ["backup", "primary"]
        );
        assert_eq!(l.registry().driver("primary").unwrap().kind(), "file");
        let p = l.registry().backend("primary").unwrap();
        assert!(!p.loop_devices());
        assert!(l.registry().backend("backup").unwrap().loop_devices());
        assert_eq!(p.pool_names().collect::<Vec<_>>(), ["gold", "silver"]);
        assert_eq!(c.backup.catalog, t.path().join("state/catalog.db"));
        assert_eq!(l.path(), Some(path.as_path()));
        let o = l.copy_options();
        assert_eq!(o.block_size, 2 << 20);
        assert_eq!(o.queue_depth, 8);
        assert_eq!(o.sparse, SparseMode::Always);
        assert_eq!(o.bwlimit, Some(200 << 20));
        assert!(!o.verify);
        assert!(!o.destination_is_zero);
        assert_eq!(
            l.target_for("primary").unwrap(),
            PoolRef::new("backup", "vault")
        );
        assert_eq!(
            l.target_for("backup").unwrap(),
            "backup:vault".parse().unwrap()
        );
        let e = l.target_for("nope").unwrap_err();
        assert!(matches!(e, ConfigError::UnknownBackend { .. }), "{e:?}");
        assert!(!l.loop_devices("primary").unwrap());
        assert!(l.loop_devices("backup").unwrap());
        assert!(l.loop_devices("nope").is_err());
        assert_eq!(
            l.pools(),
            [
                (
                    "primary".to_string(),
                    vec!["gold".to_string(), "silver".to_string()]
                ),
                ("backup".to_string(), vec!["vault".to_string()]),
            ]
        );
        assert_eq!(l.catalog_path(), t.path().join("state/catalog.db"));

        let Err(e) = l.registry().driver("nope") else {
            panic!("unknown backend accepted")
        };
        assert!(matches!(e, ConfigError::UnknownBackend { .. }), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("`nope`") && m.contains("`primary`") && m.contains("`backup`"),
            "{m}"
        );
    }

    #[test]
    fn defaults() {
        let t = setup();
        let yaml = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        let l = Config::parse(&yaml, t.path()).unwrap();
        let o = l.copy_options();
        assert_eq!(o.block_size, DEFAULT_BLOCK_SIZE);
        assert_eq!(o.queue_depth, DEFAULT_QUEUE_DEPTH);
        assert_eq!(o.sparse, SparseMode::Auto);
        assert_eq!(o.bwlimit, None);
        assert!(o.verify);
        assert_eq!(l.config().backup.catalog, PathBuf::from(DEFAULT_CATALOG));
        assert!(l.registry().backend("primary").unwrap().loop_devices());
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let t = setup();
        let sub = t.path().join("etc");
        fs::create_dir(&sub).unwrap();
        let path = sub.join("volback.yaml");
        fs::write(
            &path,
            minimal("gold: ../a", "vault: ../vault", "backup:vault") + "  catalog: db/catalog.db\n",
        )
        .unwrap();
        let l = Config::load(&path).unwrap();
        let DriverSettings::File(f) = &l.registry().backend("primary").unwrap().settings else {
            panic!("not a file backend")
        };
        assert_eq!(f.pool_dirs["gold"], sub.join("../a"));
        assert_eq!(l.config().backup.catalog, sub.join("db/catalog.db"));
        // Same pools through Config::parse and an explicit base dir.
        assert!(Config::parse(&fs::read_to_string(&path).unwrap(), &sub).is_ok());
        // From another base dir the relative paths do not exist.
        let e = Config::parse(&fs::read_to_string(&path).unwrap(), t.path()).unwrap_err();
        assert!(matches!(e, ConfigError::Pool { .. }), "{e}");
    }

    #[test]
    fn pool_ref_parses_and_displays() {
        let p: PoolRef = "backup:vault".parse().unwrap();
        assert_eq!(p, PoolRef::new("backup", "vault"));
        assert_eq!(p.to_string(), "backup:vault");
        for bad in ["", "backup", ":vault", "backup:", "a:b:c", "a b:c", "a:b/c"] {
            let e = bad.parse::<PoolRef>().unwrap_err();
            assert!(matches!(e, ConfigError::BadPoolRef { .. }), "{e:?}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, "\"backup:vault\"");
        assert_eq!(serde_json::from_str::<PoolRef>(&json).unwrap(), p);
    }

    #[test]
    fn yaml_syntax_error_has_line_and_column() {
        let t = setup();
        let e = err("backends: [\n  - name: x\n", t.path());
        let ConfigError::Syntax { line, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(*line >= 2, "{e}");
        assert!(e.to_string().contains(&format!(":{line}:")), "{e}");
        // Duplicate keys are errors, not a silent last-one-wins.
        let e = err(
            &minimal("gold: /a, gold: /b", "vault: /v", "backup:vault"),
            t.path(),
        );
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        assert!(e.to_string().contains("gold"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let t = setup();
        let base = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        for (yaml, key) in [
            (base.clone() + "extra: 1\n", "extra"),
            (
                base.replace("    pools:", "    poolz: {}\n    pools:"),
                "poolz",
            ),
            (base.clone() + "  bwlimt: 1M\n", "bwlimt"),
            (base.clone() + "  copy:\n    blocksize: 1M\n", "blocksize"),
        ] {
            let e = err(&yaml, t.path());
            let ConfigError::UnknownKey { key: k, line, .. } = &e else {
                panic!("{key}: {e:?}")
            };
            assert_eq!(k, key);
            assert!(*line > 0);
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn invalid_values() {
        let t = setup();
        let e = err("backends: 5\n", t.path());
        assert!(matches!(e, ConfigError::Invalid { line: 1, .. }), "{e:?}");
        let base = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        let e = err(
            &(base.clone() + "  copy:\n    sparse: sometimes\n"),
            t.path(),
        );
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains("sometimes"), "{e}");
        let e = err(
            &base.replace("backup:\n  default_target: backup:vault\n", ""),
            t.path(),
        );
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains("backup"), "{e}");
    }

    #[test]
    fn backend_errors() {
        let t = setup();
        let a = t.path().join("a").display().to_string();
        let v = t.path().join("vault").display().to_string();
        let file_be = |name: &str, pools: &str| {
            format!("  - name: {name}\n    driver: file\n    pools: {{{pools}}}\n")
        };
        let with = |backends: String| {
            format!("backends:\n{backends}backup:\n  default_target: backup:vault\n")
        };
        let backup = file_be("backup", &format!("vault: {v}"));

        let e = err("backends: []\nbackup:\n  default_target: a:b\n", t.path());
        assert!(matches!(e, ConfigError::NoBackends { .. }), "{e:?}");
        let e = err("", t.path());
        assert!(matches!(e, ConfigError::NoBackends { .. }), "{e:?}");

        let e = err(&with(backup.clone() + &backup), t.path());
        assert!(
            matches!(&e, ConfigError::DuplicateBackend { backend, .. } if backend == "backup"),
            "{e:?}"
        );
        assert!(e.to_string().contains("`backup`"), "{e}");

        let e = err(
            &with(file_be("bad.name", &format!("gold: {a}")) + &backup),
            t.path(),
        );
        assert!(matches!(e, ConfigError::BadBackendName { .. }), "{e:?}");
        assert!(e.to_string().contains("bad.name"), "{e}");

        let e = err(
            &with(file_be("primary", &format!("go:ld: {a}")) + &backup),
            t.path(),
        );
        assert!(matches!(e, ConfigError::BadPoolName { .. }), "{e:?}");
        assert!(
            e.to_string().contains("go:ld") && e.to_string().contains("primary"),
            "{e}"
        );

        let e = err(
            &with(
                format!("  - name: primary\n    driver: lvm\n    pools: {{gold: {a}}}\n") + &backup,
            ),
            t.path(),
        );
        assert!(matches!(e, ConfigError::UnknownDriver { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("lvm")
                && m.contains("primary")
                && m.contains("`file`")
                && m.contains("`tgt`"),
            "{m}"
        );

        let e = err(
            &with("  - name: primary\n    driver: file\n".to_string() + &backup),
            t.path(),
        );
        assert!(matches!(e, ConfigError::NoPools { .. }), "{e:?}");
        assert!(e.to_string().contains("primary"), "{e}");
        let e = err(&with(file_be("primary", "") + &backup), t.path());
        assert!(matches!(e, ConfigError::NoPools { .. }), "{e:?}");

        // Pool directory missing, or not a directory.
        let missing = t.path().join("missing");
        let e = err(
            &with(
                file_be(
                    "primary",
                    &format!("gold: {a}, lead: {}", missing.display()),
                ) + &backup,
            ),
            t.path(),
        );
        assert!(
            matches!(&e, ConfigError::Pool { backend, pool, .. } if backend == "primary" && pool == "lead"),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("`lead`") && e.to_string().contains("`primary`"),
            "{e}"
        );
        let plain = t.path().join("plain");
        fs::write(&plain, b"x").unwrap();
        let e = err(
            &with(file_be("primary", &format!("gold: {}", plain.display())) + &backup),
            t.path(),
        );
        assert!(
            matches!(&e, ConfigError::Pool { pool, .. } if pool == "gold"),
            "{e:?}"
        );
    }

    #[test]
    fn option_errors_name_keys_not_values() {
        let t = setup();
        let base = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        let with_opts = |opts: &str| {
            base.replacen("    pools:", &format!("    options: {opts}\n    pools:"), 1)
        };

        let e = err(&with_opts("{chap_secret: hunter2}"), t.path());
        assert!(matches!(e, ConfigError::UnknownOption { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("chap_secret") && m.contains("loop_devices") && m.contains("primary"),
            "{m}"
        );
        assert!(!m.contains("hunter2"), "{m}");

        let e = err(&with_opts("{loop_devices: hunter2}"), t.path());
        assert!(matches!(e, ConfigError::BadOption { .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("loop_devices") && !m.contains("hunter2"), "{m}");

        let e = err(&with_opts("hunter2"), t.path());
        assert!(matches!(e, ConfigError::BadOption { .. }), "{e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn target_errors() {
        let t = setup();
        let a = format!("gold: {}", t.path().join("a").display());
        let v = format!("vault: {}", t.path().join("vault").display());

        let e = err(&minimal(&a, &v, "backupvault"), t.path());
        assert!(matches!(e, ConfigError::BadTarget { .. }), "{e:?}");
        assert!(
            e.to_string().contains("backupvault") && e.to_string().contains("default_target"),
            "{e}"
        );

        let e = err(&minimal(&a, &v, "nowhere:vault"), t.path());
        assert!(
            matches!(e, ConfigError::UnknownTargetBackend { .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("`nowhere`") && e.to_string().contains("`primary`"),
            "{e}"
        );

        let e = err(&minimal(&a, &v, "backup:attic"), t.path());
        assert!(matches!(e, ConfigError::UnknownTargetPool { .. }), "{e:?}");
        assert!(
            e.to_string().contains("`attic`") && e.to_string().contains("`vault`"),
            "{e}"
        );

        let over = |target: &str| {
            minimal(&a, &v, "backup:vault").replacen(
                "    pools:",
                &format!("    backup_target: {target}\n    pools:"),
                1,
            )
        };
        let e = err(&over("x:y:z"), t.path());
        assert!(
            matches!(&e, ConfigError::BadTarget { key, .. } if key.contains("primary")),
            "{e:?}"
        );
        let e = err(&over("backup:attic"), t.path());
        assert!(
            matches!(&e, ConfigError::UnknownTargetPool { key, .. } if key.contains("primary")),
            "{e:?}"
        );
        let e = err(&over("elsewhere:vault"), t.path());
        assert!(
            matches!(e, ConfigError::UnknownTargetBackend { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn size_errors() {
        let t = setup();
        let base = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        let copy = |body: &str| format!("{base}  copy:\n{body}");

        // Integers are accepted as sizes.
        let l = Config::parse(
            &(copy("    block_size: 65536\n") + "  bwlimit: 1000000\n"),
            t.path(),
        )
        .unwrap();
        assert_eq!(l.copy_options().block_size, 65536);
        assert_eq!(l.copy_options().bwlimit, Some(1_000_000));

        let e = err(&copy("    block_size: lots\n"), t.path());
        assert!(
            matches!(&e, ConfigError::BadSize { key, .. } if key == "backup.copy.block_size"),
            "{e:?}"
        );
        assert!(e.to_string().contains("lots"), "{e}");
        let e = err(&(base.clone() + "  bwlimit: fast\n"), t.path());
        assert!(
            matches!(&e, ConfigError::BadSize { key, .. } if key == "backup.bwlimit"),
            "{e:?}"
        );
        let e = err(&(base.clone() + "  bwlimit: -5\n"), t.path());
        assert!(matches!(e, ConfigError::BadSize { .. }), "{e:?}");
        let e = err(&(base.clone() + "  bwlimit: 0\n"), t.path());
        assert!(matches!(e, ConfigError::BadSize { .. }), "{e:?}");

        let e = err(&copy("    block_size: 1000\n"), t.path());
        assert!(
            matches!(e, ConfigError::BadBlockSize { value: 1000, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("block_size"), "{e}");
        let e = err(&copy("    block_size: 0\n"), t.path());
        assert!(matches!(e, ConfigError::BadBlockSize { .. }), "{e:?}");

        let e = err(&copy("    queue_depth: 0\n"), t.path());
        assert!(
            matches!(e, ConfigError::BadQueueDepth { value: 0, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("queue_depth"), "{e}");
    }

    fn assert_same_pool(e: ConfigError, source: &str, target: &str) {
        let ConfigError::SamePool {
            source_pool,
            target: t,
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(source_pool.to_string(), source);
        assert_eq!(t.to_string(), target);
        let m = e.to_string();
        assert!(
            m.contains(source) && m.contains(target) && m.contains("same storage"),
            "{m}"
        );
    }

    #[test]
    fn same_directory_under_two_paths_is_refused() {
        let t = setup();
        let v = t.path().join("vault");
        for alias in [t.path().join("./vault"), t.path().join("a/../vault")] {
            let yaml = minimal(
                &format!(
                    "gold: {}, copy: {}",
                    t.path().join("a").display(),
                    alias.display()
                ),
                &format!("vault: {}", v.display()),
                "backup:vault",
            );
            assert_same_pool(err(&yaml, t.path()), "primary:copy", "backup:vault");
        }
        // A second pool of the target backend on the same directory.
        let yaml = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!(
                "vault: {}, vault2: {}/./vault",
                v.display(),
                t.path().display()
            ),
            "backup:vault",
        );
        assert_same_pool(err(&yaml, t.path()), "backup:vault2", "backup:vault");
        // Through a backend's own backup_target.
        let yaml = minimal(
            &format!("gold: {}", t.path().join("a").display()),
            &format!(
                "vault: {}, b: {}",
                v.display(),
                t.path().join("b").display()
            ),
            "backup:vault",
        )
        .replacen("    pools:", "    backup_target: backup:b\n    pools:", 1)
        .replace(
            &format!("gold: {}", t.path().join("a").display()),
            &format!("gold: {}", t.path().join("a/../b").display()),
        );
        assert_same_pool(err(&yaml, t.path()), "primary:gold", "backup:b");
    }

    #[test]
    fn symlink_to_target_is_refused() {
        let t = setup();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path().join("vault"), &link).unwrap();
        let yaml = minimal(
            &format!("gold: {}", link.display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        assert_same_pool(err(&yaml, t.path()), "primary:gold", "backup:vault");
        // Relative symlinked path too.
        let yaml = minimal("gold: link", "vault: vault", "backup:vault");
        assert_same_pool(err(&yaml, t.path()), "primary:gold", "backup:vault");
    }

    /// Unmounts on drop, whether the test passed or not.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn bind_mount_of_target_is_refused() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping bind_mount_of_target_is_refused: needs root");
            return;
        }
        let t = setup();
        let mnt = t.path().join("a");
        let st = Command::new("mount")
            .arg("--bind")
            .arg(t.path().join("vault"))
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount --bind failed");
        let _guard = Unmount(mnt.clone());
        let yaml = minimal(
            &format!("gold: {}", mnt.display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        assert_same_pool(err(&yaml, t.path()), "primary:gold", "backup:vault");
    }

    #[test]
    fn other_directory_on_same_filesystem_is_allowed() {
        let t = setup();
        // a, b and vault are siblings on one filesystem.
        let yaml = minimal(
            &format!(
                "gold: {}, silver: {}",
                t.path().join("a").display(),
                t.path().join("b").display()
            ),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        let l = Config::parse(&yaml, t.path()).unwrap();
        // A nested directory is a different pool too.
        fs::create_dir(t.path().join("vault/inner")).unwrap();
        let yaml = minimal(
            &format!("gold: {}", t.path().join("vault/inner").display()),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        Config::parse(&yaml, t.path()).unwrap();
        let gold = PoolRef::new("primary", "gold");
        let vault = PoolRef::new("backup", "vault");
        l.check_not_same_pool(&gold, &vault).unwrap();
    }

    #[test]
    fn per_request_check_refuses_same_name_and_same_identity() {
        let t = setup();
        // The target's own backend may back up to a pool beside it, and the
        // target pool itself is exempt at load time.
        let yaml = minimal(
            &format!(
                "gold: {}, silver: {}",
                t.path().join("a").display(),
                t.path().join("b").display()
            ),
            &format!("vault: {}", t.path().join("vault").display()),
            "backup:vault",
        );
        let l = Config::parse(&yaml, t.path()).unwrap();
        let vault = PoolRef::new("backup", "vault");
        let e = l.check_not_same_pool(&vault, &vault).unwrap_err();
        assert_same_pool(e, "backup:vault", "backup:vault");

        // Swap silver's directory for a symlink to vault after loading: the
        // per-request check asks the driver again.
        fs::remove_dir(t.path().join("b")).unwrap();
        std::os::unix::fs::symlink(t.path().join("vault"), t.path().join("b")).unwrap();
        let silver = PoolRef::new("primary", "silver");
        let e = l.check_not_same_pool(&silver, &vault).unwrap_err();
        assert_same_pool(e, "primary:silver", "backup:vault");

        let gold = PoolRef::new("primary", "gold");
        l.check_not_same_pool(&gold, &vault).unwrap();
        let e = l
            .check_not_same_pool(&PoolRef::new("primary", "tin"), &vault)
            .unwrap_err();
        assert!(matches!(e, ConfigError::UnknownPool { .. }), "{e:?}");
        assert!(
            e.to_string().contains("`tin`") && e.to_string().contains("`gold`"),
            "{e}"
        );
        let e = l
            .check_not_same_pool(&gold, &PoolRef::new("offsite", "x"))
            .unwrap_err();
        assert!(matches!(e, ConfigError::UnknownBackend { .. }), "{e:?}");
    }

    // rbd backends: parse errors need no cluster -------------------------

    fn raw_backend(yaml: &str) -> RawBackend {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn tgt_options_parse_and_errors_name_the_key() {
        let b = raw_backend(
            "name: array
driver: tgt
options:
  portal: 127.0.0.1:3261
  control_port: 3261
  chap: {user: volback, secret_file: secrets/chap}
  mutual_chap: {user: array, secret_file: /etc/volback/target}
  target_params: {MaxRecvDataSegmentLength: '262144'}
pools:
  gold: array/gold
",
        );
        let c = parse_backend(b, Path::new("/cfg"), "f.yaml").unwrap();
        assert_eq!(c.driver, DriverKind::Tgt);
        assert!(!c.loop_devices());
        let DriverSettings::Tgt(t) = &c.settings else {
            panic!("not a tgt backend: {c:?}")
        };
        assert_eq!(t.portal, "127.0.0.1:3261");
        assert_eq!(t.control_port, Some(3261));
        assert_eq!(t.pools["gold"], Path::new("/cfg/array/gold"));
        let chap = t.chap.as_ref().unwrap();
        assert_eq!(chap.secret_file, Path::new("/cfg/secrets/chap"));
        assert_eq!(
            t.mutual_chap.as_ref().unwrap().secret_file,
            Path::new("/etc/volback/target")
        );
        assert_eq!(t.target_params["MaxRecvDataSegmentLength"], "262144");

        for (options, key) in [
            ("{control_port: 1}", "portal"),
            ("{portal: p, control_port: secret-ish}", "control_port"),
            ("{portal: p, chap: {user: u, password: hunter2}}", "chap"),
            (
                "{portal: p, mutual_chap: {user: u, secret_file: f}}",
                "mutual_chap",
            ),
            ("{portal: p, nonsense: hunter2}", "nonsense"),
        ] {
            let yaml = format!("name: a\ndriver: tgt\noptions: {options}\npools: {{p: d}}\n");
            let e = parse_backend(raw_backend(&yaml), Path::new("/cfg"), "f.yaml").unwrap_err();
            let m = e.to_string();
            assert!(m.contains(&format!("`{key}`")), "{options}: {m}");
            assert!(!m.contains("hunter2") && !m.contains("secret-ish"), "{m}");
        }
    }

    #[test]
    fn rbd_options_parse() {
        let b = raw_backend(
            "name: ceph
driver: rbd
options:
  conf: etc/ceph.conf
  id: volback
  keyring: /etc/ceph/volback.keyring
  connect_timeout: 5
pools:
  gold: volumes
  vault: backups
",
        );
        let c = parse_backend(b, Path::new("/cfg"), "f.yaml").unwrap();
        assert_eq!(c.driver, DriverKind::Rbd);
        assert!(!c.loop_devices());
        let DriverSettings::Rbd(r) = &c.settings else {
            panic!("not an rbd backend: {c:?}")
        };
        assert_eq!(
            r.cluster.conf.as_deref(),
            Some(Path::new("/cfg/etc/ceph.conf"))
        );
        assert_eq!(r.cluster.id.as_deref(), Some("volback"));
        assert_eq!(
            r.cluster.keyring.as_deref(),
            Some(Path::new("/etc/ceph/volback.keyring"))
        );
        assert_eq!(r.cluster.connect_timeout, std::time::Duration::from_secs(5));
        assert_eq!(r.ceph_pools["gold"], "volumes");
        assert_eq!(r.ceph_pools["vault"], "backups");

        // Only conf is required; the default timeout stays.
        let b = raw_backend("name: c\ndriver: rbd\noptions: {conf: c.conf}\npools: {p: rbd}\n");
        let c = parse_backend(b, Path::new("/x"), "f.yaml").unwrap();
        let DriverSettings::Rbd(r) = &c.settings else {
            panic!("not an rbd backend")
        };
        assert_eq!(
            r.cluster,
            ClusterConfig {
                conf: Some("/x/c.conf".into()),
                ..ClusterConfig::default()
            }
        );
    }

    #[test]
    fn rbd_option_errors_name_keys_not_values() {
        let parse = |opts: &str| {
            let yaml = format!("name: ceph\ndriver: rbd\noptions: {opts}\npools: {{p: rbd}}\n");
            parse_backend(raw_backend(&yaml), Path::new("/cfg"), "f.yaml").unwrap_err()
        };
        let e = parse("{id: hunter2}");
        assert!(matches!(e, ConfigError::BadOption { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("`conf`") && m.contains("ceph") && !m.contains("hunter2"),
            "{m}"
        );

        let e = parse("{conf: c, key: hunter2}");
        assert!(matches!(e, ConfigError::UnknownOption { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("`key`")
                && m.contains("keyring")
                && m.contains("rbd")
                && !m.contains("hunter2"),
            "{m}"
        );

        for opts in [
            "{conf: c, connect_timeout: hunter2}",
            "{conf: c, connect_timeout: 0}",
            "{conf: c, connect_timeout: -3}",
            "{conf: c, connect_timeout: 99999}",
        ] {
            let e = parse(opts);
            assert!(matches!(e, ConfigError::BadOption { .. }), "{opts}: {e:?}");
            let m = e.to_string();
            assert!(
                m.contains("connect_timeout") && !m.contains("hunter2") && !m.contains("99999"),
                "{m}"
            );
        }
        for (opts, key) in [
            ("{conf: [hunter2]}", "conf"),
            ("{conf: ''}", "conf"),
            ("{conf: c, id: 12345}", "id"),
            ("{conf: c, keyring: {a: hunter2}}", "keyring"),
        ] {
            let e = parse(opts);
            assert!(matches!(e, ConfigError::BadOption { .. }), "{opts}: {e:?}");
            let m = e.to_string();
            assert!(
                m.contains(&format!("`{key}`")) && !m.contains("hunter2") && !m.contains("12345"),
                "{m}"
            );
        }

        let e = parse("hunter2");
        assert!(matches!(e, ConfigError::BadOption { .. }), "{e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn rbd_driver_is_known() {
        let t = setup();
        let yaml = "backends:
  - name: ceph
    driver: rbd
    pools: {p: rbd}
backup:
  default_target: ceph:p
";
        let e = err(yaml, t.path());
        assert!(matches!(e, ConfigError::BadOption { .. }), "{e:?}");
        assert!(e.to_string().contains("`conf`"), "{e}");
        let e = err(&yaml.replace("driver: rbd", "driver: nfs"), t.path());
        let m = e.to_string();
        assert!(m.contains("file") && m.contains("rbd"), "{m}");
    }
}
