//! Backup and restore orchestration: the generic flow over any two volume
//! drivers, recorded in the catalog so that a crash at any point can be
//! undone by [`Service::recover`].

use std::collections::BTreeMap;
use std::sync::Arc;

use volback_drivers::{
    ConnectionInfo, DriverError, ExportOptions, ExportTarget, VolumeDriver, VolumeInfo,
};

use crate::catalog::{
    self, BackupRecord, BackupState, Catalog, CatalogError, Operation, ResourceKind, VolumeRecord,
};
use crate::config::{ConfigError, Loaded, PoolRef};
use crate::copy::{self, CopyError, CopyOptions, CopyReport, MapPlan, Progress};
use crate::devices;

/// A failed flow. The layers' errors are boxed: they carry context
/// (paths, names, offsets) and would otherwise make every Result large.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(Box<ConfigError>),
    #[error(transparent)]
    Catalog(Box<CatalogError>),
    #[error(transparent)]
    Driver(Box<DriverError>),
    #[error(transparent)]
    Copy(Box<CopyError>),
    #[error(transparent)]
    Device(Box<volback_connectors::DeviceError>),
    #[error("{0}")]
    Invalid(String),
    #[error("backup {id} is {state}, {wanted}")]
    WrongState {
        id: String,
        state: &'static str,
        wanted: &'static str,
    },
    #[error("backup record refused: {0}")]
    BadRecord(String),
}

macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for ServiceError {
            fn from(e: $ty) -> Self {
                ServiceError::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Config(ConfigError),
    Catalog(CatalogError),
    Driver(DriverError),
    Copy(CopyError),
    Device(volback_connectors::DeviceError),
);

pub type Result<T> = std::result::Result<T, ServiceError>;

mod backup;
mod fast;
mod prune;
mod records;
mod restore;

pub use backup::BackupRequest;
pub use prune::{KeepPolicy, Pruned};
pub use restore::{RestoreOutcome, RestoreTarget};

/// Where a volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLocation {
    pub backend: String,
    pub pool: String,
    pub id: String,
}

/// What recovery did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Recovered {
    pub operations: usize,
    pub resources_removed: usize,
    pub backups_marked_error: Vec<String>,
    pub backups_deleted: Vec<String>,
}

pub struct Service {
    pub config: Loaded,
    pub catalog: Catalog,
}

impl Service {
    pub fn new(config: Loaded) -> Result<Self> {
        let catalog = Catalog::open(config.catalog_path())?;
        Ok(Self { config, catalog })
    }

    fn driver(&self, backend: &str) -> Result<Arc<dyn VolumeDriver>> {
        Ok(self.config.registry.driver(backend)?.clone())
    }

    fn export_options(&self, backend: &str, read_only: bool) -> Result<ExportOptions> {
        Ok(ExportOptions {
            loop_device: self.config.loop_devices(backend)?,
            read_only,
        })
    }

    /// Resolves `BACKEND:POOL/ID`, or an id the catalog knows, or an id
    /// found by asking every configured pool.
    pub fn locate_volume(&self, spec: &str) -> Result<(VolumeLocation, VolumeInfo)> {
        if let Some((pool_ref, id)) = spec.split_once('/') {
            let pool: PoolRef = pool_ref.parse()?;
            let info = self.driver(&pool.backend)?.get_volume(&pool.pool, id)?;
            return Ok((
                VolumeLocation {
                    backend: pool.backend,
                    pool: pool.pool,
                    id: id.to_string(),
                },
                info,
            ));
        }
        if let Some(v) = self.catalog.get_volume(spec)? {
            let info = self.driver(&v.backend)?.get_volume(&v.pool, spec)?;
            return Ok((
                VolumeLocation {
                    backend: v.backend,
                    pool: v.pool,
                    id: spec.to_string(),
                },
                info,
            ));
        }
        for (backend, pools) in self.config.pools() {
            let driver = self.driver(&backend)?;
            for pool in pools {
                if let Ok(info) = driver.get_volume(&pool, spec) {
                    return Ok((
                        VolumeLocation {
                            backend: backend.clone(),
                            pool,
                            id: spec.to_string(),
                        },
                        info,
                    ));
                }
            }
        }
        Err(ServiceError::Invalid(format!(
            "no volume '{spec}' on any configured backend (use BACKEND:POOL/ID)"
        )))
    }

    // --- volumes -------------------------------------------------------

    pub fn create_volume(&self, pool: &PoolRef, name: &str, size: u64) -> Result<VolumeInfo> {
        let id = uuid::Uuid::new_v4().to_string();
        let info = self.driver(&pool.backend)?.create_volume(
            &pool.pool,
            &id,
            name,
            size,
            &BTreeMap::new(),
        )?;
        self.record_volume(&pool.backend, &info)?;
        Ok(info)
    }

    fn record_volume(&self, backend: &str, info: &VolumeInfo) -> Result<()> {
        self.catalog.upsert_volume(&VolumeRecord {
            id: info.id.clone(),
            backend: backend.to_string(),
            pool: info.pool.clone(),
            name: info.name.clone(),
            size: info.size,
            created_at: catalog::now(),
        })?;
        Ok(())
    }

    /// Every volume of every configured pool (asking the drivers), with the
    /// backend it is on.
    pub fn list_volumes(&self, only: Option<&PoolRef>) -> Result<Vec<(String, VolumeInfo)>> {
        let mut out = Vec::new();
        for (backend, pools) in self.config.pools() {
            let driver = self.driver(&backend)?;
            for pool in pools {
                if only.is_some_and(|p| p.backend != backend || p.pool != pool) {
                    continue;
                }
                for v in driver.list_volumes(&pool)? {
                    out.push((backend.clone(), v));
                }
            }
        }
        Ok(out)
    }

    pub fn delete_volume(&self, spec: &str) -> Result<VolumeLocation> {
        let (loc, _) = self.locate_volume(spec)?;
        let in_backups = self
            .catalog
            .list_backups()?
            .into_iter()
            .any(|b| b.target_volume_id == loc.id);
        if in_backups {
            return Err(ServiceError::Invalid(format!(
                "volume {} holds a backup; delete the backup instead (volback backup delete)",
                loc.id
            )));
        }
        self.driver(&loc.backend)?
            .delete_volume(&loc.pool, &loc.id)?;
        self.catalog.delete_volume(&loc.id)?;
        Ok(loc)
    }

    pub fn attach_volume(&self, spec: &str) -> Result<(VolumeLocation, ConnectionInfo)> {
        let (loc, _) = self.locate_volume(spec)?;
        let driver = self.driver(&loc.backend)?;
        let opts = ExportOptions {
            loop_device: true,
            read_only: false,
        };
        let conn = driver.export(&loc.pool, &ExportTarget::Volume(loc.id.clone()), opts)?;
        Ok((loc, conn))
    }

    pub fn detach_volume(&self, spec: &str) -> Result<VolumeLocation> {
        let (loc, _) = self.locate_volume(spec)?;
        self.driver(&loc.backend)?
            .unexport(&loc.pool, &ExportTarget::Volume(loc.id.clone()))?;
        Ok(loc)
    }

    fn export(
        &self,
        op: &Operation,
        driver: &Arc<dyn VolumeDriver>,
        backend: &str,
        pool: &str,
        target: &ExportTarget,
        read_only: bool,
    ) -> Result<ConnectionInfo> {
        let (kind, id) = match target {
            ExportTarget::Volume(id) => (ResourceKind::VolumeExport, id),
            ExportTarget::Snapshot(id) => (ResourceKind::SnapshotExport, id),
        };
        let rid = self
            .catalog
            .plan_resource(&op.id, kind, backend, pool, id, false)?;
        let conn = driver.export(pool, target, self.export_options(backend, read_only)?)?;
        self.catalog.set_resource_state(rid, "created")?;
        Ok(conn)
    }

    /// The configured copy settings for one flow: whether the destination
    /// is new (reads as zero), how to build the block map, whether to read
    /// the destination back.
    fn copy_options(&self, destination_is_zero: bool, plan: MapPlan, verify: bool) -> CopyOptions {
        let configured = self.config.copy_options();
        CopyOptions {
            verify: verify || configured.verify,
            destination_is_zero,
            block_map: Some(plan),
            ..configured
        }
    }

    /// Attaches both ends and runs the copy engine, recording progress.
    fn copy(
        &self,
        op: &Operation,
        source: &ConnectionInfo,
        destination: &ConnectionInfo,
        opts: &CopyOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<CopyReport> {
        let src = devices::attach(source, false, opts.queue_depth)?;
        let dst = devices::attach(destination, true, opts.queue_depth)?;
        let mut recorder = self.progress_recorder(op);
        let copied = copy::copy(src, dst, opts, &mut |p| {
            progress(p);
            recorder(p);
        })?;
        Ok(copied.report)
    }

    /// Records a copy's progress in its operation, at most once a second
    /// (and is where the crash tests' `copy_half_done` fail point sits).
    fn progress_recorder<'a>(&'a self, op: &'a Operation) -> impl FnMut(&Progress) + 'a {
        let mut last_saved = std::time::Instant::now();
        move |p: &Progress| {
            if p.total > 0 && p.done * 2 >= p.total {
                fail::fail_point!("copy_half_done", |_| crash("copy_half_done"));
            }
            if last_saved.elapsed() >= std::time::Duration::from_secs(1) {
                last_saved = std::time::Instant::now();
                if let Err(e) = self.catalog.set_operation_progress(&op.id, p.done) {
                    tracing::warn!(error = %e, "could not record progress");
                }
            }
        }
    }

    /// Removes an operation's live resources, newest first. With `success`,
    /// resources marked keep-on-success stay (a backup's data volume).
    fn undo(&self, op: &Operation, success: bool) -> Result<usize> {
        let mut removed = 0;
        for r in self.catalog.live_resources(&op.id)? {
            if success && r.keep_on_success {
                continue;
            }
            let driver = self.driver(&r.backend)?;
            match r.kind {
                ResourceKind::VolumeExport => {
                    driver.unexport(&r.pool, &ExportTarget::Volume(r.object_id.clone()))?
                }
                ResourceKind::SnapshotExport => {
                    driver.unexport(&r.pool, &ExportTarget::Snapshot(r.object_id.clone()))?
                }
                ResourceKind::Snapshot => driver.delete_snapshot(&r.pool, &r.object_id)?,
                ResourceKind::Volume => driver.delete_volume(&r.pool, &r.object_id)?,
            }
            self.catalog.set_resource_state(r.id, "removed")?;
            tracing::debug!(kind = ?r.kind, object = %r.object_id, "removed");
            removed += 1;
        }
        Ok(removed)
    }

    /// Finds operations whose process died and undoes them: temporary
    /// resources removed, partial backups marked error with their partial
    /// volume deleted, interrupted restores' new volumes deleted,
    /// interrupted deletions finished.
    pub fn recover(&mut self) -> Result<Recovered> {
        let mut out = Recovered::default();
        for op in self.catalog.operations()? {
            if !op.is_orphaned() {
                continue;
            }
            tracing::warn!(operation = %op.id, kind = %op.kind, pid = op.pid, "recovering an interrupted operation");
            let record = op.backup_id.as_deref().map(|b| self.catalog.get_backup(b));
            match (op.kind.as_str(), record) {
                // Killed after the backup became available (while deleting its
                // parent's old source snapshot): keep what it made.
                ("backup", Some(Ok(rec))) if rec.state == BackupState::Available => {
                    out.resources_removed += self.undo(&op, true)?;
                }
                ("backup", Some(Ok(rec))) => {
                    out.resources_removed += self.undo(&op, false)?;
                    if rec.mode == "incremental" {
                        // It may have written part of its changes into the
                        // chain's volume: the next backup there must be full.
                        self.catalog.taint_volume(
                            &rec.target_volume_id,
                            &format!(
                                "incremental backup {} was interrupted while writing into it",
                                rec.id
                            ),
                        )?;
                    }
                    if rec.state == BackupState::Creating {
                        self.catalog.set_backup_state(
                            &rec.id,
                            BackupState::Error,
                            Some("interrupted (volback was killed); recovery removed what it had created"),
                        )?;
                        out.backups_marked_error.push(rec.id.clone());
                    }
                }
                ("restore", Some(Ok(rec))) => {
                    out.resources_removed += self.undo(&op, false)?;
                    if rec.state == BackupState::Restoring {
                        self.catalog
                            .set_backup_state(&rec.id, BackupState::Available, None)?;
                    }
                }
                ("delete", Some(Ok(rec))) => {
                    out.resources_removed += self.undo(&op, false)?;
                    self.catalog.untaint_volume(&rec.target_volume_id)?;
                    self.catalog.delete_backup(&rec.id)?;
                    out.backups_deleted.push(rec.id.clone());
                }
                _ => out.resources_removed += self.undo(&op, false)?,
            }
            self.catalog.end_operation(&op.id)?;
            out.operations += 1;
        }
        Ok(out)
    }

    pub fn list_backups(&self) -> Result<Vec<BackupRecord>> {
        Ok(self.catalog.list_backups()?)
    }

    pub fn show_backup(&self, id: &str) -> Result<BackupRecord> {
        Ok(self.catalog.get_backup(id)?)
    }

    /// Deletes a backup and the volume holding its data.
    /// Deletes a backup: its restore point, the source snapshot it kept
    /// for change tracking, and the destination volume if no other backup
    /// uses it. Other backups of the chain stay complete restore points.
    pub fn delete_backup(&mut self, id: &str) -> Result<()> {
        self.recover()?;
        let b = self.catalog.get_backup(id)?;
        let mut claimed = false;
        for from in [BackupState::Available, BackupState::Error] {
            claimed = claimed
                || self
                    .catalog
                    .transition_backup(id, from, BackupState::Deleting)?;
        }
        if !claimed {
            return Err(ServiceError::WrongState {
                id: id.into(),
                state: b.state.as_str(),
                wanted: "only an available or error backup can be deleted",
            });
        }
        let op = self.catalog.begin_operation("delete", Some(id))?;
        // Everything is recorded as existing first: if we die half way,
        // recovery finishes the job. Undo goes newest first, so snapshots
        // go before the volume they belong to.
        let volume_shared = self
            .catalog
            .list_backups()?
            .iter()
            .any(|o| o.id != b.id && o.target_volume_id == b.target_volume_id);
        let mut doomed = Vec::new();
        if !volume_shared {
            doomed.push((
                ResourceKind::Volume,
                &b.target_backend,
                &b.target_pool,
                b.target_volume_id.clone(),
            ));
        }
        if let Some(s) = &b.target_snapshot_id {
            doomed.push((
                ResourceKind::Snapshot,
                &b.target_backend,
                &b.target_pool,
                s.clone(),
            ));
        }
        if let Some(s) = &b.source_snapshot_id {
            doomed.push((
                ResourceKind::Snapshot,
                &b.volume_backend,
                &b.volume_pool,
                s.clone(),
            ));
        }
        for (kind, backend, pool, object) in doomed {
            let rid = self
                .catalog
                .plan_resource(&op.id, kind, backend, pool, &object, false)?;
            self.catalog.set_resource_state(rid, "created")?;
        }
        let driver = self.driver(&b.target_backend)?;
        driver.unexport(
            &b.target_pool,
            &ExportTarget::Volume(b.target_volume_id.clone()),
        )?;
        if let Some(s) = &b.target_snapshot_id {
            driver.unexport(&b.target_pool, &ExportTarget::Snapshot(s.clone()))?;
        }
        self.undo(&op, false)?;
        if !volume_shared {
            self.catalog.untaint_volume(&b.target_volume_id)?;
        }
        self.catalog.delete_backup(id)?;
        self.catalog.end_operation(&op.id)?;
        Ok(())
    }
}

/// Simulates a crash at a fail point: the process dies at once, with no
/// destructor, unwinding or cleanup, as under `kill -9`.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn crash(at: &str) -> ! {
    eprintln!("volback: fail point {at}: aborting");
    std::process::abort()
}
