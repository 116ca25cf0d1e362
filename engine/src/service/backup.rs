//! `backup create`: the generic flow, full or incremental.
//!
//! A backup's data lives in a destination volume on the target; its restore
//! point is a snapshot of that volume taken right after the copy. A full
//! backup creates the volume; an incremental writes only what changed since
//! its parent into the parent's volume and snapshots it again, so every
//! backup is a complete restore point on its own. Changes come from the
//! source driver's change tracking between the parent's kept source
//! snapshot and a new one, or else from comparing block hashes with the
//! parent's block map.

use std::sync::Arc;

use volback_drivers::ExportTarget;

use super::fast::FastJob;
use super::{Result, Service, ServiceError};
use crate::catalog::{self, BackupRecord, BackupState, CompletedBackup, ResourceKind};
use crate::config::PoolRef;
use crate::copy::{BlockMap, MapPlan, Progress};

pub struct BackupRequest {
    /// `BACKEND:POOL/ID` or an id volback knows.
    pub volume: String,
    pub target: Option<PoolRef>,
    /// Back up from a temporary snapshot even if the volume is not in use.
    pub snapshot: bool,
    /// Copy only what changed since the newest available backup of the
    /// volume on the target.
    pub incremental: bool,
    /// Copy only what changed since this backup (implies incremental).
    pub parent: Option<String>,
    /// Use the generic copy even when the source driver has a fast path.
    pub generic: bool,
}

/// What a backup builds on.
enum Base {
    Full {
        reason: Option<String>,
    },
    Incremental {
        parent: Box<BackupRecord>,
        map: Arc<BlockMap>,
    },
}

impl Service {
    /// Picks the parent of an incremental, or says why the backup is full.
    fn choose_base(
        &self,
        req: &BackupRequest,
        volume_id: &str,
        size: u64,
        target: &PoolRef,
        map_block: u64,
    ) -> Result<Base> {
        if !req.incremental && req.parent.is_none() {
            return Ok(Base::Full { reason: None });
        }
        let parent = match &req.parent {
            Some(id) => {
                let p = self.catalog.get_backup(id)?;
                if p.volume_id != volume_id {
                    return Err(ServiceError::Invalid(format!(
                        "backup {id} is of volume {}, not of volume {volume_id}",
                        p.volume_id
                    )));
                }
                Some(p)
            }
            // The catalog lists in creation order (time, then insertion), so
            // the last match is the newest even within one second.
            None => self.catalog.list_backups()?.into_iter().rfind(|b| {
                b.volume_id == volume_id
                    && b.state == BackupState::Available
                    && b.target_backend == target.backend
                    && b.target_pool == target.pool
            }),
        };
        let full = |reason: String| {
            Ok(Base::Full {
                reason: Some(reason),
            })
        };
        let Some(parent) = parent else {
            return full(format!(
                "no available backup of volume {volume_id} on {target} to build on"
            ));
        };
        if parent.state != BackupState::Available {
            return full(format!("parent {} is {}", parent.id, parent.state.as_str()));
        }
        if parent.target_backend != target.backend || parent.target_pool != target.pool {
            return full(format!(
                "parent {} is on {}:{}, not on {target}",
                parent.id, parent.target_backend, parent.target_pool
            ));
        }
        if parent.volume_size != size {
            let how = if size > parent.volume_size {
                "grew"
            } else {
                "shrank"
            };
            return full(format!(
                "the volume {how} since parent {} ({} to {size} bytes)",
                parent.id, parent.volume_size
            ));
        }
        if parent.map_block_size != map_block {
            return full(format!(
                "the hash block size changed since parent {} ({} to {map_block} bytes)",
                parent.id, parent.map_block_size
            ));
        }
        if parent.target_snapshot_id.is_none() {
            return full(format!(
                "parent {} has no restore-point snapshot to build on",
                parent.id
            ));
        }
        if let Some(why) = self.catalog.volume_taint(&parent.target_volume_id)? {
            return full(format!(
                "the parent's destination volume no longer matches it ({why})"
            ));
        }
        let Some(map) = self
            .catalog
            .block_map(&parent.id)?
            .and_then(|b| BlockMap::from_bytes(&b))
        else {
            return full(format!("parent {} has no block map", parent.id));
        };
        Ok(Base::Incremental {
            parent: Box::new(parent),
            map: Arc::new(map),
        })
    }

    /// Backs a volume up: a full copy onto a new volume of the target pool,
    /// or an incremental one onto its parent's volume.
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
        let map_block = self.config.config.backup.map_block_size;
        let target_snapshots = dst_driver.supports_snapshots(&target.pool)?;
        let mut base = self.choose_base(req, &src.id, info.size, &target, map_block)?;
        if !target_snapshots {
            // Without snapshots there is no restore point to build on: every
            // backup is a full volume of its own.
            let reason = format!("target {target} has no snapshots: a full volume per backup");
            base = Base::Full {
                reason: Some(reason),
            };
        }
        // A source that can track changes is always read through a snapshot,
        // which is kept for the next incremental to diff against.
        let tracking = src_driver.supports_change_tracking(&src.pool)?;
        let in_use = src_driver.in_use(&src.pool, &src.id)?;
        let use_snapshot = in_use || req.snapshot || tracking;

        let (mode, note, target_volume_id, parent_id) = match &base {
            Base::Full { reason } => (
                "full",
                reason.clone(),
                uuid::Uuid::new_v4().to_string(),
                None,
            ),
            Base::Incremental { parent, .. } => (
                "incremental",
                None,
                parent.target_volume_id.clone(),
                Some(parent.id.clone()),
            ),
        };
        if let Some(n) = &note {
            tracing::info!(volume = %src.id, "full backup: {n}");
        }
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
            target_volume_id,
            target_snapshot_id: None,
            source_snapshot_id: None,
            mode: mode.into(),
            change_tracking: if mode == "full" {
                "full".into()
            } else {
                "pending".into()
            },
            note,
            map_block_size: map_block,
            parent_id,
            from_snapshot: use_snapshot,
            checksum: None,
            bytes_read: 0,
            bytes_written: 0,
            created_at: created_at(),
            completed_at: None,
            error: None,
        };
        self.catalog.insert_backup(&record)?;
        let op = self.catalog.begin_operation("backup", Some(&record.id))?;
        tracing::info!(backup = %record.id, volume = %src.id, target = %target, mode, use_snapshot, "backup starting");

        let mut run = || -> Result<(crate::copy::CopyReport, String, Option<String>, Option<String>)> {
            fail::fail_point!("backup_start", |_| super::crash("backup_start"));
            let source_snapshot = if use_snapshot {
                let snap = self.snapshot(&op, &src_driver, &src.backend, &src.pool, &src.id, tracking)?;
                fail::fail_point!("backup_after_snapshot", |_| super::crash("backup_after_snapshot"));
                Some(snap)
            } else {
                None
            };
            let new_volume = matches!(base, Base::Full { .. });
            if new_volume {
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
                    &format!("backup-of-{}", info.name),
                    info.size,
                    &metadata,
                )?;
                self.catalog.set_resource_state(rid, "created")?;
            }
            let source_target = match &source_snapshot {
                Some(s) => ExportTarget::Snapshot(s.clone()),
                None => ExportTarget::Volume(src.id.clone()),
            };
            let source_conn = self.export(&op, &src_driver, &src.backend, &src.pool, &source_target, true)?;
            let dest_target = ExportTarget::Volume(record.target_volume_id.clone());
            let dest_conn = self.export(&op, &dst_driver, &target.backend, &target.pool, &dest_target, false)?;
            fail::fail_point!("backup_before_copy", |_| super::crash("backup_before_copy"));
            // A driver's fast path goes first: it needs the source snapshot,
            // and for an incremental the snapshot its parent was read from.
            let fast_job = match (&source_snapshot, &base) {
                _ if req.generic => None,
                (Some(snap), Base::Full { .. }) => Some((snap, None)),
                (Some(snap), Base::Incremental { parent, map }) => {
                    parent.source_snapshot_id.as_deref().map(|old| (snap, Some((old, map.clone()))))
                }
                (None, _) => None,
            };
            let fast = match fast_job {
                Some((snapshot, since)) => {
                    let job = FastJob {
                        pool: &src.pool,
                        snapshot,
                        since,
                        destination: &dest_conn,
                        destination_is_zero: new_volume,
                        map_block,
                        size: info.size,
                    };
                    self.fast_transfer(&op, &src_driver, &job, progress)?
                }
                None => None,
            };
            let (report, tracked) = match fast {
                Some(done) => done,
                None => {
                    let (plan, tracked) =
                        self.generic_plan(&base, &src_driver, &src.pool, source_snapshot.as_deref(), map_block);
                    let opts = self.copy_options(new_volume, plan, false);
                    let report = self.copy(&op, &source_conn, &dest_conn, &opts, progress)?;
                    (report, tracked.to_string())
                }
            };
            fail::fail_point!("backup_after_copy", |_| super::crash("backup_after_copy"));
            // Exports (and a snapshot not kept for tracking) go; then the
            // restore point is taken of the settled volume.
            self.undo(&op, true)?;
            let target_snapshot = if target_snapshots {
                let volume = &record.target_volume_id;
                Some(self.snapshot(&op, &dst_driver, &target.backend, &target.pool, volume, true)?)
            } else {
                None
            };
            let kept_source_snapshot = source_snapshot.filter(|_| tracking);
            Ok((report, tracked, target_snapshot, kept_source_snapshot))
        };
        match run() {
            Ok((report, tracked, target_snapshot, kept_source_snapshot)) => {
                let map = report
                    .block_map
                    .as_ref()
                    .expect("backups always build a block map");
                let parent_snapshot = match &base {
                    Base::Incremental { parent, .. } if kept_source_snapshot.is_some() => parent
                        .source_snapshot_id
                        .clone()
                        .map(|s| (parent.id.clone(), s)),
                    _ => None,
                };
                self.catalog.complete_backup(&CompletedBackup {
                    id: &record.id,
                    change_tracking: &tracked,
                    checksum: &map.checksum(),
                    bytes_read: report.bytes_read,
                    bytes_written: report.bytes_written + report.bytes_zeroed,
                    target_snapshot_id: target_snapshot.as_deref(),
                    source_snapshot_id: kept_source_snapshot.as_deref(),
                    block_map: &map.to_bytes(),
                    parent_forgets_source_snapshot: parent_snapshot.as_ref().map(|p| p.0.as_str()),
                })?;
                // The parent's source snapshot is no use any more: this
                // backup's is the one the next incremental diffs against.
                if let Some((_, snap)) = parent_snapshot {
                    let rid = self.catalog.plan_resource(
                        &op.id,
                        ResourceKind::Snapshot,
                        &src.backend,
                        &src.pool,
                        &snap,
                        false,
                    )?;
                    self.catalog.set_resource_state(rid, "created")?;
                    self.undo(&op, true)?;
                }
                self.catalog.end_operation(&op.id)?;
                tracing::info!(backup = %record.id, mode, tracked, "backup available");
                Ok(self.catalog.get_backup(&record.id)?)
            }
            Err(e) => {
                tracing::warn!(backup = %record.id, error = %e, "backup failed; removing what it created");
                let cleanup = self.undo(&op, false);
                if mode == "incremental" {
                    self.catalog.taint_volume(
                        &record.target_volume_id,
                        &format!(
                            "incremental backup {} failed while writing into it",
                            record.id
                        ),
                    )?;
                }
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
}

impl Service {
    /// How the generic copy builds on `base`: the block map to build, and
    /// which change tracking found what to copy.
    fn generic_plan(
        &self,
        base: &Base,
        driver: &Arc<dyn volback_drivers::VolumeDriver>,
        pool: &str,
        source_snapshot: Option<&str>,
        block: u64,
    ) -> (MapPlan, &'static str) {
        let (parent, map) = match base {
            Base::Full { .. } => {
                let plan = MapPlan {
                    block,
                    parent: None,
                    compare_parent: false,
                    only: None,
                };
                return (plan, "full");
            }
            Base::Incremental { parent, map } => (parent, map),
        };
        let ranges = match (&parent.source_snapshot_id, source_snapshot) {
            (Some(old), Some(new)) => match driver.changed_ranges(pool, old, new) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "change tracking failed; comparing block hashes instead");
                    None
                }
            },
            _ => None,
        };
        let plan = MapPlan {
            block,
            parent: Some(map.clone()),
            compare_parent: ranges.is_none(),
            only: ranges
                .as_ref()
                .map(|r| r.iter().map(|c| (c.offset, c.len)).collect()),
        };
        (
            plan,
            if ranges.is_some() {
                "driver"
            } else {
                "hash-map"
            },
        )
    }

    /// Snapshots a volume, recorded in the operation before it is taken;
    /// `keep` keeps it when the operation succeeds.
    fn snapshot(
        &self,
        op: &crate::catalog::Operation,
        driver: &Arc<dyn volback_drivers::VolumeDriver>,
        backend: &str,
        pool: &str,
        volume: &str,
        keep: bool,
    ) -> Result<String> {
        let snap = uuid::Uuid::new_v4().to_string();
        let rid = self.catalog.plan_resource(
            &op.id,
            ResourceKind::Snapshot,
            backend,
            pool,
            &snap,
            keep,
        )?;
        driver.create_snapshot(pool, volume, &snap)?;
        self.catalog.set_resource_state(rid, "created")?;
        Ok(snap)
    }
}

/// When the backup is taken. Tests of retention set it through the fail
/// point `backup_created_at=return(UNIX_SECONDS)`.
fn created_at() -> u64 {
    fail::fail_point!("backup_created_at", |arg| arg
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(catalog::now));
    catalog::now()
}
