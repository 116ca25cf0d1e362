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
use crate::copy::{self, CopyError, CopyOptions, CopyReport, Progress};
use crate::{devices, record};

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

/// Where a volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLocation {
    pub backend: String,
    pub pool: String,
    pub id: String,
}

pub struct BackupRequest {
    /// `BACKEND:POOL/ID` or an id volback knows.
    pub volume: String,
    pub target: Option<PoolRef>,
    /// Back up from a temporary snapshot even if the volume is not in use.
    pub snapshot: bool,
}

pub enum RestoreTarget {
    /// A new volume on this pool (default: the source volume's pool).
    New {
        pool: Option<PoolRef>,
        name: Option<String>,
    },
    /// Overwrite an existing volume (`force` confirms it).
    Existing { volume: String, force: bool },
}

#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    pub volume: VolumeLocation,
    pub report: CopyReport,
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

    // --- backups -------------------------------------------------------

    /// Backs a volume up onto a new volume of the target pool.
    pub fn backup(
        &mut self,
        req: &BackupRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<BackupRecord> {
        self.recover()?;
        let (src, info) = self.locate_volume(&req.volume)?;
        let target = match &req.target {
            Some(t) => t.clone(),
            None => self.config.target_for(&src.backend)?,
        };
        let source_pool = PoolRef {
            backend: src.backend.clone(),
            pool: src.pool.clone(),
        };
        self.config.check_not_same_pool(&source_pool, &target)?;
        let src_driver = self.driver(&src.backend)?;
        let dst_driver = self.driver(&target.backend)?;
        let in_use = src_driver.in_use(&src.pool, &src.id)?;
        let use_snapshot = in_use || req.snapshot;

        let mut metadata = info.metadata.clone();
        metadata.insert("volback.source_volume".into(), src.id.clone());
        let record = BackupRecord {
            id: uuid::Uuid::new_v4().to_string(),
            state: BackupState::Creating,
            volume_id: src.id.clone(),
            volume_name: info.name.clone(),
            volume_size: info.size,
            volume_backend: src.backend.clone(),
            volume_pool: src.pool.clone(),
            volume_metadata: info.metadata.clone(),
            target_backend: target.backend.clone(),
            target_pool: target.pool.clone(),
            target_volume_id: uuid::Uuid::new_v4().to_string(),
            parent_id: None,
            from_snapshot: use_snapshot,
            checksum: None,
            bytes_read: 0,
            bytes_written: 0,
            created_at: catalog::now(),
            completed_at: None,
            error: None,
        };
        self.catalog.insert_backup(&record)?;
        let op = self.catalog.begin_operation("backup", Some(&record.id))?;
        tracing::info!(backup = %record.id, volume = %src.id, target = %target, use_snapshot, "backup starting");

        let mut run = || -> Result<CopyReport> {
            fail::fail_point!("backup_start", |_| crash("backup_start"));
            let source_target = if use_snapshot {
                let snap = uuid::Uuid::new_v4().to_string();
                let rid = self.catalog.plan_resource(
                    &op.id,
                    ResourceKind::Snapshot,
                    &src.backend,
                    &src.pool,
                    &snap,
                    false,
                )?;
                src_driver.create_snapshot(&src.pool, &src.id, &snap)?;
                self.catalog.set_resource_state(rid, "created")?;
                fail::fail_point!("backup_after_snapshot", |_| crash("backup_after_snapshot"));
                ExportTarget::Snapshot(snap)
            } else {
                ExportTarget::Volume(src.id.clone())
            };
            let rid = self.catalog.plan_resource(
                &op.id,
                ResourceKind::Volume,
                &target.backend,
                &target.pool,
                &record.target_volume_id,
                true,
            )?;
            dst_driver.create_volume(
                &target.pool,
                &record.target_volume_id,
                &format!("backup-{}", record.id),
                info.size,
                &metadata,
            )?;
            self.catalog.set_resource_state(rid, "created")?;
            let source_conn = self.export(
                &op,
                &src_driver,
                &src.backend,
                &src.pool,
                &source_target,
                true,
            )?;
            let dest_target = ExportTarget::Volume(record.target_volume_id.clone());
            let dest_conn = self.export(
                &op,
                &dst_driver,
                &target.backend,
                &target.pool,
                &dest_target,
                false,
            )?;
            fail::fail_point!("backup_before_copy", |_| crash("backup_before_copy"));
            let report = self.copy(&op, &source_conn, &dest_conn, true, false, progress)?;
            fail::fail_point!("backup_after_copy", |_| crash("backup_after_copy"));
            // Tear down everything temporary; the destination volume stays.
            self.undo(&op, true)?;
            Ok(report)
        };
        match run() {
            Ok(report) => {
                let checksum = report
                    .digest
                    .map(|d| format!("xxh3-128:{d:032x}"))
                    .unwrap_or_default();
                self.catalog.complete_backup(
                    &record.id,
                    &op.id,
                    &checksum,
                    report.bytes_read,
                    report.bytes_written,
                )?;
                tracing::info!(backup = %record.id, "backup available");
                Ok(self.catalog.get_backup(&record.id)?)
            }
            Err(e) => {
                tracing::warn!(backup = %record.id, error = %e, "backup failed; removing what it created");
                let cleanup = self.undo(&op, false);
                self.catalog.set_backup_state(
                    &record.id,
                    BackupState::Error,
                    Some(&e.to_string()),
                )?;
                self.catalog.end_operation(&op.id)?;
                cleanup?;
                Err(e)
            }
        }
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

    /// Attaches both ends and runs the copy engine, recording progress.
    fn copy(
        &self,
        op: &Operation,
        source: &ConnectionInfo,
        destination: &ConnectionInfo,
        destination_is_zero: bool,
        verify: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<CopyReport> {
        let opts = CopyOptions {
            checksum: true,
            verify: verify || self.config.copy_options().verify,
            destination_is_zero,
            ..self.config.copy_options()
        };
        let src = devices::attach(source, false, opts.queue_depth)?;
        let dst = devices::attach(destination, true, opts.queue_depth)?;
        let mut last_saved = std::time::Instant::now();
        let copied = copy::copy(src, dst, &opts, &mut |p| {
            progress(p);
            if p.total > 0 && p.done * 2 >= p.total {
                fail::fail_point!("copy_half_done", |_| crash("copy_half_done"));
            }
            if last_saved.elapsed() >= std::time::Duration::from_secs(1) {
                last_saved = std::time::Instant::now();
                if let Err(e) = self.catalog.set_operation_progress(&op.id, p.done) {
                    tracing::warn!(error = %e, "could not record progress");
                }
            }
        })?;
        Ok(copied.report)
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
            out.resources_removed += self.undo(&op, false)?;
            if let Some(b) = &op.backup_id {
                match (op.kind.as_str(), self.catalog.get_backup(b)) {
                    ("backup", Ok(rec)) if rec.state == BackupState::Creating => {
                        self.catalog.set_backup_state(
                            b,
                            BackupState::Error,
                            Some("interrupted (volback was killed); its partial volume was removed by recovery"),
                        )?;
                        out.backups_marked_error.push(b.clone());
                    }
                    ("restore", Ok(rec)) if rec.state == BackupState::Restoring => {
                        self.catalog
                            .set_backup_state(b, BackupState::Available, None)?;
                    }
                    ("delete", Ok(_)) => {
                        self.catalog.delete_backup(b)?;
                        out.backups_deleted.push(b.clone());
                    }
                    _ => {}
                }
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
    pub fn delete_backup(&mut self, id: &str) -> Result<()> {
        self.recover()?;
        let b = self.catalog.get_backup(id)?;
        let claimed = [BackupState::Available, BackupState::Error]
            .into_iter()
            .any(|from| {
                self.catalog
                    .transition_backup(id, from, BackupState::Deleting)
                    .unwrap_or(false)
            });
        if !claimed {
            return Err(ServiceError::WrongState {
                id: id.into(),
                state: b.state.as_str(),
                wanted: "only an available or error backup can be deleted",
            });
        }
        let op = self.catalog.begin_operation("delete", Some(id))?;
        // Recorded as created: if we die half way, recovery finishes the job.
        let rid = self.catalog.plan_resource(
            &op.id,
            ResourceKind::Volume,
            &b.target_backend,
            &b.target_pool,
            &b.target_volume_id,
            false,
        )?;
        self.catalog.set_resource_state(rid, "created")?;
        let driver = self.driver(&b.target_backend)?;
        driver.unexport(
            &b.target_pool,
            &ExportTarget::Volume(b.target_volume_id.clone()),
        )?;
        driver.delete_volume(&b.target_pool, &b.target_volume_id)?;
        self.catalog.set_resource_state(rid, "removed")?;
        self.catalog.delete_backup(id)?;
        self.catalog.end_operation(&op.id)?;
        Ok(())
    }

    /// Restores a backup to a new volume or onto an existing one.
    pub fn restore(
        &mut self,
        id: &str,
        target: &RestoreTarget,
        verify: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<RestoreOutcome> {
        self.recover()?;
        let b = self.catalog.get_backup(id)?;
        if !self
            .catalog
            .transition_backup(id, BackupState::Available, BackupState::Restoring)?
        {
            return Err(ServiceError::WrongState {
                id: id.into(),
                state: b.state.as_str(),
                wanted: "only an available backup can be restored",
            });
        }
        let op = self.catalog.begin_operation("restore", Some(id))?;
        let mut run = || -> Result<RestoreOutcome> {
            let (dest, new) = match target {
                RestoreTarget::New { pool, name } => {
                    let pool = pool.clone().unwrap_or(PoolRef {
                        backend: b.volume_backend.clone(),
                        pool: b.volume_pool.clone(),
                    });
                    let vid = uuid::Uuid::new_v4().to_string();
                    let rid = self.catalog.plan_resource(
                        &op.id,
                        ResourceKind::Volume,
                        &pool.backend,
                        &pool.pool,
                        &vid,
                        true,
                    )?;
                    let name = name
                        .clone()
                        .unwrap_or_else(|| format!("restore-of-{}", b.volume_name));
                    let info = self.driver(&pool.backend)?.create_volume(
                        &pool.pool,
                        &vid,
                        &name,
                        b.volume_size,
                        &b.volume_metadata,
                    )?;
                    self.catalog.set_resource_state(rid, "created")?;
                    self.record_volume(&pool.backend, &info)?;
                    (
                        VolumeLocation {
                            backend: pool.backend,
                            pool: pool.pool,
                            id: vid,
                        },
                        true,
                    )
                }
                RestoreTarget::Existing { volume, force } => {
                    let (loc, info) = self.locate_volume(volume)?;
                    if info.size < b.volume_size {
                        return Err(ServiceError::Invalid(format!(
                            "volume {} ({} bytes) is smaller than backup {} ({} bytes)",
                            loc.id, info.size, b.id, b.volume_size
                        )));
                    }
                    if !force {
                        return Err(ServiceError::Invalid(format!(
                            "restoring onto existing volume {} overwrites it: add --force to confirm",
                            loc.id
                        )));
                    }
                    if self.driver(&loc.backend)?.in_use(&loc.pool, &loc.id)? {
                        tracing::warn!(volume = %loc.id, "restoring onto a volume in use (--force)");
                    }
                    (loc, false)
                }
            };
            let src_driver = self.driver(&b.target_backend)?;
            let dst_driver = self.driver(&dest.backend)?;
            let source_target = ExportTarget::Volume(b.target_volume_id.clone());
            let source_conn = self.export(
                &op,
                &src_driver,
                &b.target_backend,
                &b.target_pool,
                &source_target,
                true,
            )?;
            let dest_target = ExportTarget::Volume(dest.id.clone());
            let dest_conn = self.export(
                &op,
                &dst_driver,
                &dest.backend,
                &dest.pool,
                &dest_target,
                false,
            )?;
            let report = self.copy(&op, &source_conn, &dest_conn, new, verify, progress)?;
            if let (Some(expected), Some(got)) = (&b.checksum, report.digest) {
                let got = format!("xxh3-128:{got:032x}");
                if !expected.is_empty() && *expected != got {
                    return Err(ServiceError::Invalid(format!(
                        "backup {} data does not match its recorded checksum ({expected}, read {got})",
                        b.id
                    )));
                }
            }
            self.undo(&op, true)?;
            Ok(RestoreOutcome {
                volume: dest,
                report,
            })
        };
        let result = run();
        if let Err(e) = &result {
            tracing::warn!(backup = %id, error = %e, "restore failed; removing what it created");
            let cleanup = self.undo(&op, false);
            if let Err(ce) = cleanup {
                tracing::error!(error = %ce, "cleanup after a failed restore failed");
            }
        }
        self.catalog
            .set_backup_state(id, BackupState::Available, None)?;
        self.catalog.end_operation(&op.id)?;
        if let Err(ServiceError::Copy(_)) | Err(ServiceError::Device(_)) = &result {
            if let RestoreTarget::Existing { volume, .. } = target {
                tracing::error!(volume = %volume, "the existing volume was partially overwritten");
            }
        }
        result
    }
}

impl Service {
    /// A self-contained record of an available backup (see [`crate::record`]).
    pub fn export_record(&self, id: &str) -> Result<String> {
        let b = self.catalog.get_backup(id)?;
        if b.state != BackupState::Available {
            return Err(ServiceError::WrongState {
                id: id.into(),
                state: b.state.as_str(),
                wanted: "only an available backup can be exported",
            });
        }
        let driver = self.driver(&b.target_backend)?;
        let identity = driver.pool_identity(&b.target_pool)?;
        Ok(record::encode(record::Payload {
            target_driver: driver.kind().to_string(),
            target_pool_identity: identity.0,
            backup: b,
        }))
    }

    /// Takes a record made by `export_record` (here or on another
    /// installation that shares the backup storage). Nothing is written to
    /// the catalog unless every check passes: the record is intact, the
    /// backup is new here, its volume exists where it says with the right
    /// size, and (with `check_data`) the data matches the record's checksum.
    pub fn import_record(&mut self, text: &str, check_data: bool) -> Result<BackupRecord> {
        self.recover()?;
        let payload = record::decode(text).map_err(ServiceError::BadRecord)?;
        let mut b = payload.backup;
        if self.catalog.get_backup(&b.id).is_ok() {
            return Err(ServiceError::BadRecord(format!(
                "backup {} is already in the catalog",
                b.id
            )));
        }
        let driver = self
            .driver(&b.target_backend)
            .map_err(|e| ServiceError::BadRecord(e.to_string()))?;
        if driver.kind() != payload.target_driver {
            return Err(ServiceError::BadRecord(format!(
                "backend {} is a {} backend here, the record says {}",
                b.target_backend,
                driver.kind(),
                payload.target_driver
            )));
        }
        let info = driver
            .get_volume(&b.target_pool, &b.target_volume_id)
            .map_err(|e| ServiceError::BadRecord(format!("its data volume is not here: {e}")))?;
        if info.size != b.volume_size {
            return Err(ServiceError::BadRecord(format!(
                "its data volume {} has {} bytes, the record says {}",
                b.target_volume_id, info.size, b.volume_size
            )));
        }
        if check_data {
            let expected = b.checksum.clone().unwrap_or_default();
            let got = self.checksum_volume(
                &b.target_backend,
                &b.target_pool,
                &b.target_volume_id,
                b.volume_size,
            )?;
            if got != expected {
                return Err(ServiceError::BadRecord(format!(
                    "its data volume does not match the record's checksum ({expected}, read {got})"
                )));
            }
        }
        b.state = BackupState::Available;
        b.error = None;
        self.catalog.insert_backup(&b)?;
        Ok(b)
    }

    /// Reads a volume through an export and returns its checksum.
    fn checksum_volume(
        &self,
        backend: &str,
        pool: &str,
        volume_id: &str,
        size: u64,
    ) -> Result<String> {
        let op = self.catalog.begin_operation("checksum", None)?;
        let driver = self.driver(backend)?;
        let run = || -> Result<String> {
            let conn = self.export(
                &op,
                &driver,
                backend,
                pool,
                &ExportTarget::Volume(volume_id.into()),
                true,
            )?;
            let opts = self.config.copy_options();
            let mut dev = devices::attach(&conn, false, opts.queue_depth)?;
            if dev.size() < size {
                return Err(ServiceError::Invalid(format!(
                    "volume {volume_id} is smaller than {size} bytes"
                )));
            }
            let counters = copy::Counters::default();
            let digest = copy::checksum(
                &mut *dev,
                &opts,
                size,
                &counters,
                std::time::Instant::now(),
                &mut |_| {},
            )?;
            Ok(format!("xxh3-128:{digest:032x}"))
        };
        let result = run();
        self.undo(&op, false)?;
        self.catalog.end_operation(&op.id)?;
        result
    }
}

/// Simulates a crash at a fail point: the process dies at once, with no
/// destructor, unwinding or cleanup, as under `kill -9`.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn crash(at: &str) -> ! {
    eprintln!("volback: fail point {at}: aborting");
    std::process::abort()
}
