//! The catalog: an embedded SQLite database (WAL, synchronous=FULL) of the
//! volumes volback knows, the backups and their states, and every
//! unfinished operation with the resources it created.
//!
//! Crash safety rests on one rule: a resource (snapshot, destination
//! volume, export, loop device) is written here as `planned` *before* the
//! driver is asked to create it, and a backup becomes `available` only in
//! the same transaction that ends its operation. Recovery can therefore
//! always find what a killed process left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Sql {
        path: String,
        source: rusqlite::Error,
    },
    #[error("catalog {path}: cannot create its directory: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("no backup with id {0}")]
    NoSuchBackup(String),
    #[error("catalog {path}: corrupt row: {message}")]
    Corrupt { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, CatalogError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    Creating,
    Available,
    Restoring,
    Deleting,
    Error,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Creating => "creating",
            BackupState::Available => "available",
            BackupState::Restoring => "restoring",
            BackupState::Deleting => "deleting",
            BackupState::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => BackupState::Creating,
            "available" => BackupState::Available,
            "restoring" => BackupState::Restoring,
            "deleting" => BackupState::Deleting,
            "error" => BackupState::Error,
            _ => return None,
        })
    }
}

/// A backup and the metadata of the volume it was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub state: BackupState,
    pub volume_id: String,
    pub volume_name: String,
    pub volume_size: u64,
    pub volume_backend: String,
    pub volume_pool: String,
    pub volume_metadata: BTreeMap<String, String>,
    pub target_backend: String,
    pub target_pool: String,
    /// The volume on the target that holds the backup's data.
    pub target_volume_id: String,
    pub parent_id: Option<String>,
    /// Taken from a temporary snapshot of the source.
    pub from_snapshot: bool,
    /// The target snapshot that is this backup's restore point (None on a
    /// target without snapshots: the whole target volume is the backup).
    pub target_snapshot_id: Option<String>,
    /// The source snapshot kept for the next incremental's change tracking.
    pub source_snapshot_id: Option<String>,
    /// "full" or "incremental".
    pub mode: String,
    /// How changes were found: "full", "driver" or "hash-map".
    pub change_tracking: String,
    /// Why a full copy was made when an incremental was asked for.
    pub note: Option<String>,
    /// Block size of the checksum map.
    pub map_block_size: u64,
    /// Checksum of the block map, "map-xxh3-128:<block size>:<hex>".
    pub checksum: Option<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub created_at: u64,
    pub completed_at: Option<u64>,
    pub error: Option<String>,
}

/// What a finished backup leaves in the catalog.
pub struct CompletedBackup<'a> {
    pub id: &'a str,
    pub change_tracking: &'a str,
    pub checksum: &'a str,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub target_snapshot_id: Option<&'a str>,
    pub source_snapshot_id: Option<&'a str>,
    pub block_map: &'a [u8],
    pub parent_forgets_source_snapshot: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub backend: String,
    pub pool: String,
    pub name: String,
    pub size: u64,
    pub created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Snapshot,
    Volume,
    /// An export of a volume; `object_id` is the volume id.
    VolumeExport,
    /// An export of a snapshot; `object_id` is the snapshot id.
    SnapshotExport,
}

impl ResourceKind {
    fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Snapshot => "snapshot",
            ResourceKind::Volume => "volume",
            ResourceKind::VolumeExport => "volume-export",
            ResourceKind::SnapshotExport => "snapshot-export",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "snapshot" => ResourceKind::Snapshot,
            "volume" => ResourceKind::Volume,
            "volume-export" => ResourceKind::VolumeExport,
            "snapshot-export" => ResourceKind::SnapshotExport,
            _ => return None,
        })
    }
}

/// A resource an operation creates, possibly only planned so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub id: i64,
    pub kind: ResourceKind,
    pub backend: String,
    pub pool: String,
    pub object_id: String,
    /// The operation keeps it when it succeeds (a backup's data volume).
    pub keep_on_success: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub backup_id: Option<String>,
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a reused pid is
    /// not mistaken for the process that began the operation.
    pub pid_start: u64,
    pub started_at: u64,
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS backups (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('creating','available','restoring','deleting','error')),
    volume_id TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    volume_size INTEGER NOT NULL,
    volume_backend TEXT NOT NULL,
    volume_pool TEXT NOT NULL,
    volume_metadata TEXT NOT NULL,
    target_backend TEXT NOT NULL,
    target_pool TEXT NOT NULL,
    target_volume_id TEXT NOT NULL,
    target_snapshot_id TEXT,
    source_snapshot_id TEXT,
    mode TEXT NOT NULL,
    change_tracking TEXT NOT NULL,
    note TEXT,
    map_block_size INTEGER NOT NULL,
    parent_id TEXT,
    from_snapshot INTEGER NOT NULL,
    checksum TEXT,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_written INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    backup_id TEXT,
    pid INTEGER NOT NULL,
    pid_start INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    bytes_done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    operation_id TEXT NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    pool TEXT NOT NULL,
    object_id TEXT NOT NULL,
    keep_on_success INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('planned','created','removed'))
);
CREATE TABLE IF NOT EXISTS block_maps (
    backup_id TEXT PRIMARY KEY,
    map BLOB NOT NULL
);
-- Destination volumes an interrupted incremental may have written into:
-- they no longer equal their last restore point, so the next backup of
-- their chain is a full one onto a new volume.
CREATE TABLE IF NOT EXISTS tainted_volumes (
    volume_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);
";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| CatalogError::Dir {
                path: name.clone(),
                source,
            })?;
        }
        let sql = |source| CatalogError::Sql {
            path: name.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> CatalogError {
        CatalogError::Sql {
            path: self.path.display().to_string(),
            source,
        }
    }

    // --- volumes -------------------------------------------------------

    pub fn upsert_volume(&self, v: &VolumeRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO volumes (id, backend, pool, name, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET backend = ?2, pool = ?3, name = ?4, size = ?5",
                params![v.id, v.backend, v.pool, v.name, v.size as i64, v.created_at as i64],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn get_volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        self.conn
            .query_row(
                "SELECT id, backend, pool, name, size, created_at FROM volumes WHERE id = ?1",
                [id],
                volume_from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut st = self
            .conn
            .prepare("SELECT id, backend, pool, name, size, created_at FROM volumes ORDER BY created_at, id")
            .map_err(|e| self.sql(e))?;
        let rows = st.query_map([], volume_from_row).map_err(|e| self.sql(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql(e))
    }

    pub fn delete_volume(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM volumes WHERE id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    // --- backups -------------------------------------------------------

    pub fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        let meta = serde_json::to_string(&b.volume_metadata).expect("metadata serializes");
        self.conn
            .execute(
                "INSERT INTO backups (id, state, volume_id, volume_name, volume_size, volume_backend, volume_pool,
                    volume_metadata, target_backend, target_pool, target_volume_id, parent_id, from_snapshot,
                    checksum, bytes_read, bytes_written, created_at, completed_at, error,
                    target_snapshot_id, source_snapshot_id, mode, change_tracking, note, map_block_size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                    ?20, ?21, ?22, ?23, ?24, ?25)",
                params![
                    b.id,
                    b.state.as_str(),
                    b.volume_id,
                    b.volume_name,
                    b.volume_size as i64,
                    b.volume_backend,
                    b.volume_pool,
                    meta,
                    b.target_backend,
                    b.target_pool,
                    b.target_volume_id,
                    b.parent_id,
                    b.from_snapshot,
                    b.checksum,
                    b.bytes_read as i64,
                    b.bytes_written as i64,
                    b.created_at as i64,
                    b.completed_at.map(|t| t as i64),
                    b.error,
                    b.target_snapshot_id,
                    b.source_snapshot_id,
                    b.mode,
                    b.change_tracking,
                    b.note,
                    b.map_block_size as i64,
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn get_backup(&self, id: &str) -> Result<BackupRecord> {
        let row = self
            .conn
            .query_row(
                &format!("{BACKUP_SELECT} WHERE id = ?1"),
                [id],
                backup_from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        row.ok_or_else(|| CatalogError::NoSuchBackup(id.to_string()))?
            .map_err(|message| self.corrupt(message))
    }

    pub fn list_backups(&self) -> Result<Vec<BackupRecord>> {
        let mut st = self
            .conn
            .prepare(&format!("{BACKUP_SELECT} ORDER BY created_at, rowid"))
            .map_err(|e| self.sql(e))?;
        let rows = st.query_map([], backup_from_row).map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r.map_err(|e| self.sql(e))?.map_err(|m| self.corrupt(m))?);
        }
        Ok(out)
    }

    pub fn set_backup_state(
        &self,
        id: &str,
        state: BackupState,
        error: Option<&str>,
    ) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE backups SET state = ?2, error = ?3 WHERE id = ?1",
                params![id, state.as_str(), error],
            )
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(CatalogError::NoSuchBackup(id.to_string()));
        }
        Ok(())
    }

    /// Moves a backup from `from` to `to` only if it is in `from`; returns
    /// whether it did (so two processes cannot both claim a backup).
    pub fn transition_backup(&self, id: &str, from: BackupState, to: BackupState) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE backups SET state = ?3 WHERE id = ?1 AND state = ?2",
                params![id, from.as_str(), to.as_str()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(n == 1)
    }

    /// Marks a backup available with its results, its block map and its
    /// change tracking, in one transaction (a backup is never available
    /// without its map). The parent named in `parent_forgets_source_snapshot`
    /// stops pointing at its source snapshot, which the caller then deletes
    /// within the same still-open operation (so a crash cannot leak it).
    pub fn complete_backup(&mut self, done: &CompletedBackup<'_>) -> Result<()> {
        let path = self.path.display().to_string();
        let sql = |source| CatalogError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute(
            "UPDATE backups SET state = 'available', checksum = ?2, bytes_read = ?3, bytes_written = ?4,
                completed_at = ?5, error = NULL, target_snapshot_id = ?6, source_snapshot_id = ?7,
                change_tracking = ?8 WHERE id = ?1",
            params![
                done.id,
                done.checksum,
                done.bytes_read as i64,
                done.bytes_written as i64,
                now() as i64,
                done.target_snapshot_id,
                done.source_snapshot_id,
                done.change_tracking
            ],
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT OR REPLACE INTO block_maps (backup_id, map) VALUES (?1, ?2)",
            params![done.id, done.block_map],
        )
        .map_err(sql)?;
        if let Some(parent) = done.parent_forgets_source_snapshot {
            tx.execute(
                "UPDATE backups SET source_snapshot_id = NULL WHERE id = ?1",
                [parent],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    pub fn block_map(&self, backup_id: &str) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row(
                "SELECT map FROM block_maps WHERE backup_id = ?1",
                [backup_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    pub fn set_block_map(&self, backup_id: &str, map: &[u8]) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO block_maps (backup_id, map) VALUES (?1, ?2)",
                params![backup_id, map],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn taint_volume(&self, volume_id: &str, reason: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO tainted_volumes (volume_id, reason) VALUES (?1, ?2)",
                [volume_id, reason],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Why the volume cannot take an incremental, if it was tainted.
    pub fn volume_taint(&self, volume_id: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT reason FROM tainted_volumes WHERE volume_id = ?1",
                [volume_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    pub fn untaint_volume(&self, volume_id: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM tainted_volumes WHERE volume_id = ?1",
                [volume_id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn delete_backup(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM backups WHERE id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    // --- operations and their resources -------------------------------

    pub fn begin_operation(&self, kind: &str, backup_id: Option<&str>) -> Result<Operation> {
        let (pid, pid_start) = self_process();
        let op = Operation {
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.to_string(),
            backup_id: backup_id.map(str::to_string),
            pid,
            pid_start,
            started_at: now(),
        };
        self.conn
            .execute(
                "INSERT INTO operations (id, kind, backup_id, pid, pid_start, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![op.id, op.kind, op.backup_id, op.pid, op.pid_start as i64, op.started_at as i64],
            )
            .map_err(|e| self.sql(e))?;
        Ok(op)
    }

    pub fn end_operation(&self, operation_id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM operations WHERE id = ?1", [operation_id])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn set_operation_progress(&self, operation_id: &str, bytes_done: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE operations SET bytes_done = ?2 WHERE id = ?1",
                params![operation_id, bytes_done as i64],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Records a resource before it is created.
    pub fn plan_resource(
        &self,
        operation_id: &str,
        kind: ResourceKind,
        backend: &str,
        pool: &str,
        object_id: &str,
        keep_on_success: bool,
    ) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO resources (operation_id, kind, backend, pool, object_id, keep_on_success, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'planned')",
                params![operation_id, kind.as_str(), backend, pool, object_id, keep_on_success],
            )
            .map_err(|e| self.sql(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn set_resource_state(&self, resource_id: i64, state: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE resources SET state = ?2 WHERE id = ?1",
                params![resource_id, state],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Resources of an operation not yet removed, newest first (the order
    /// to undo them in).
    pub fn live_resources(&self, operation_id: &str) -> Result<Vec<Resource>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, kind, backend, pool, object_id, keep_on_success FROM resources
                 WHERE operation_id = ?1 AND state != 'removed' ORDER BY id DESC",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([operation_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for r in rows {
            let (id, kind, backend, pool, object_id, keep_on_success) =
                r.map_err(|e| self.sql(e))?;
            let kind = ResourceKind::parse(&kind)
                .ok_or_else(|| self.corrupt(format!("resource kind '{kind}'")))?;
            out.push(Resource {
                id,
                kind,
                backend,
                pool,
                object_id,
                keep_on_success,
            });
        }
        Ok(out)
    }

    pub fn operations(&self) -> Result<Vec<Operation>> {
        let mut st = self
            .conn
            .prepare("SELECT id, kind, backup_id, pid, pid_start, started_at FROM operations ORDER BY started_at")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(Operation {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    backup_id: r.get(2)?,
                    pid: r.get(3)?,
                    pid_start: r.get::<_, i64>(4)? as u64,
                    started_at: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql(e))
    }

    fn corrupt(&self, message: String) -> CatalogError {
        CatalogError::Corrupt {
            path: self.path.display().to_string(),
            message,
        }
    }
}

impl Operation {
    /// Whether the process that began it is gone (crashed or killed).
    pub fn is_orphaned(&self) -> bool {
        process_start(self.pid) != Some(self.pid_start)
    }
}

const BACKUP_SELECT: &str = "SELECT id, state, volume_id, volume_name, volume_size, volume_backend, volume_pool,
    volume_metadata, target_backend, target_pool, target_volume_id, parent_id, from_snapshot, checksum,
    bytes_read, bytes_written, created_at, completed_at, error, target_snapshot_id, source_snapshot_id, mode,
    change_tracking, note, map_block_size FROM backups";

type RowResult<T> = rusqlite::Result<std::result::Result<T, String>>;

fn backup_from_row(r: &rusqlite::Row<'_>) -> RowResult<BackupRecord> {
    let state: String = r.get(1)?;
    let meta: String = r.get(7)?;
    let Some(state) = BackupState::parse(&state) else {
        return Ok(Err(format!("backup state '{state}'")));
    };
    let volume_metadata = match serde_json::from_str(&meta) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("backup metadata: {e}"))),
    };
    Ok(Ok(BackupRecord {
        id: r.get(0)?,
        state,
        volume_id: r.get(2)?,
        volume_name: r.get(3)?,
        volume_size: r.get::<_, i64>(4)? as u64,
        volume_backend: r.get(5)?,
        volume_pool: r.get(6)?,
        volume_metadata,
        target_backend: r.get(8)?,
        target_pool: r.get(9)?,
        target_volume_id: r.get(10)?,
        parent_id: r.get(11)?,
        from_snapshot: r.get(12)?,
        checksum: r.get(13)?,
        bytes_read: r.get::<_, i64>(14)? as u64,
        bytes_written: r.get::<_, i64>(15)? as u64,
        created_at: r.get::<_, i64>(16)? as u64,
        completed_at: r.get::<_, Option<i64>>(17)?.map(|t| t as u64),
        error: r.get(18)?,
        target_snapshot_id: r.get(19)?,
        source_snapshot_id: r.get(20)?,
        mode: r.get(21)?,
        change_tracking: r.get(22)?,
        note: r.get(23)?,
        map_block_size: r.get::<_, i64>(24)? as u64,
    }))
}

fn volume_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: r.get(0)?,
        backend: r.get(1)?,
        pool: r.get(2)?,
        name: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        created_at: r.get::<_, i64>(5)? as u64,
    })
}

fn self_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start(pid).unwrap_or(0))
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> BackupRecord {
        BackupRecord {
            id: id.into(),
            state: BackupState::Creating,
            volume_id: "v1".into(),
            volume_name: "data".into(),
            volume_size: 1 << 20,
            volume_backend: "primary".into(),
            volume_pool: "gold".into(),
            volume_metadata: [("k".to_string(), "v".to_string())].into(),
            target_backend: "backup".into(),
            target_pool: "vault".into(),
            target_volume_id: "t1".into(),
            target_snapshot_id: None,
            source_snapshot_id: Some("s0".into()),
            mode: "full".into(),
            change_tracking: "full".into(),
            note: None,
            map_block_size: 65536,
            parent_id: None,
            from_snapshot: true,
            checksum: None,
            bytes_read: 0,
            bytes_written: 0,
            created_at: now(),
            completed_at: None,
            error: None,
        }
    }

    #[test]
    fn backup_lifecycle_and_resources_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat.db");
        let op_id;
        {
            let c = Catalog::open(&path).unwrap();
            c.insert_backup(&sample("b1")).unwrap();
            let op = c.begin_operation("backup", Some("b1")).unwrap();
            assert!(!op.is_orphaned(), "our own process is alive");
            let r = c
                .plan_resource(
                    &op.id,
                    ResourceKind::Snapshot,
                    "primary",
                    "gold",
                    "s1",
                    false,
                )
                .unwrap();
            c.set_resource_state(r, "created").unwrap();
            c.plan_resource(&op.id, ResourceKind::Volume, "backup", "vault", "t1", true)
                .unwrap();
            op_id = op.id.clone();
            assert!(c
                .transition_backup("b1", BackupState::Creating, BackupState::Creating)
                .unwrap());
            assert!(!c
                .transition_backup("b1", BackupState::Available, BackupState::Deleting)
                .unwrap());
            // Still unfinished when the handle goes away.
            drop(c);
            let mut c = Catalog::open(&path).unwrap();
            let live = c.live_resources(&op_id).unwrap();
            assert_eq!(
                live.iter()
                    .map(|r| r.object_id.as_str())
                    .collect::<Vec<_>>(),
                ["t1", "s1"]
            );
            c.complete_backup(&CompletedBackup {
                id: "b1",
                change_tracking: "full",
                checksum: "map-xxh3-128:65536:00",
                bytes_read: 10,
                bytes_written: 20,
                target_snapshot_id: Some("ts1"),
                source_snapshot_id: Some("s1"),
                block_map: &[1, 2, 3],
                parent_forgets_source_snapshot: None,
            })
            .unwrap();
            let b = c.get_backup("b1").unwrap();
            assert_eq!(b.state, BackupState::Available);
            assert_eq!((b.bytes_read, b.bytes_written), (10, 20));
            assert_eq!(b.target_snapshot_id.as_deref(), Some("ts1"));
            assert_eq!(b.source_snapshot_id.as_deref(), Some("s1"));
            assert_eq!(c.block_map("b1").unwrap(), Some(vec![1, 2, 3]));
            assert_eq!(b.volume_metadata.get("k").map(String::as_str), Some("v"));
            c.end_operation(&op_id).unwrap();
            assert!(c.operations().unwrap().is_empty());
            assert!(
                c.live_resources(&op_id).unwrap().is_empty(),
                "resources go with their operation"
            );
        }
        let c = Catalog::open(&path).unwrap();
        assert!(matches!(
            c.get_backup("nope"),
            Err(CatalogError::NoSuchBackup(_))
        ));
        assert_eq!(c.list_backups().unwrap().len(), 1);
    }

    #[test]
    fn a_dead_process_is_orphaned() {
        let op = Operation {
            id: "x".into(),
            kind: "backup".into(),
            backup_id: None,
            pid: std::process::id(),
            pid_start: 1,
            started_at: 0,
        };
        assert!(op.is_orphaned(), "same pid, other start time: not us");
    }
}
