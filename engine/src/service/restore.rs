//! `restore` and `backup verify`: reading a backup's restore point.

use volback_drivers::ExportTarget;

use super::{Result, Service, ServiceError, VolumeLocation};
use crate::catalog::{BackupRecord, BackupState, ResourceKind};
use crate::config::PoolRef;
use crate::copy::{self, BlockMap, CopyReport, MapPlan, Progress};
use crate::devices;

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

/// What `backup verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    pub backup: String,
    pub checksum: String,
    pub bytes: u64,
}

impl Service {
    /// The backup's stored block map.
    fn stored_map(&self, b: &BackupRecord) -> Result<Option<BlockMap>> {
        Ok(self
            .catalog
            .block_map(&b.id)?
            .and_then(|bytes| BlockMap::from_bytes(&bytes)))
    }

    /// What to read a backup from: its restore-point snapshot, or its volume
    /// on a target without snapshots.
    pub(super) fn restore_point(b: &BackupRecord) -> ExportTarget {
        match &b.target_snapshot_id {
            Some(s) => ExportTarget::Snapshot(s.clone()),
            None => ExportTarget::Volume(b.target_volume_id.clone()),
        }
    }

    /// Restores a backup to a new volume or onto an existing one (always a
    /// full copy). The data read is checked against the backup's block map;
    /// with `verify` the restored volume is read back and checked too.
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
        let expected = self.stored_map(&b)?;
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
            let source_conn = self.export(
                &op,
                &src_driver,
                &b.target_backend,
                &b.target_pool,
                &Self::restore_point(&b),
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
            let plan = MapPlan {
                block: b.map_block_size,
                parent: None,
                compare_parent: false,
                only: None,
            };
            let report = self.copy(
                &op,
                &source_conn,
                &dest_conn,
                &self.copy_options(new, plan, verify),
                progress,
            )?;
            if let (Some(expected), Some(got)) = (&expected, &report.block_map) {
                if let Some(offset) = expected.first_difference(got) {
                    return Err(ServiceError::Invalid(format!(
                        "backup {} is damaged: its data differs from its checksum map in the block at offset {offset}",
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
            if let Err(ce) = self.undo(&op, false) {
                tracing::error!(error = %ce, "cleanup after a failed restore failed");
            }
            if let RestoreTarget::Existing { volume, .. } = target {
                tracing::error!(volume = %volume, "the existing volume may have been partially overwritten");
            }
        }
        self.catalog
            .set_backup_state(id, BackupState::Available, None)?;
        self.catalog.end_operation(&op.id)?;
        result
    }

    /// Re-reads a backup's restore point and checks it against its map.
    pub fn verify_backup(
        &mut self,
        id: &str,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Verified> {
        self.recover()?;
        let b = self.catalog.get_backup(id)?;
        if b.state != BackupState::Available {
            return Err(ServiceError::WrongState {
                id: id.into(),
                state: b.state.as_str(),
                wanted: "only an available backup can be verified",
            });
        }
        let Some(expected) = self.stored_map(&b)? else {
            return Err(ServiceError::Invalid(format!(
                "backup {id} has no checksum map to verify against"
            )));
        };
        let got = self.read_map(
            &b.target_backend,
            &b.target_pool,
            &Self::restore_point(&b),
            &b,
            progress,
        )?;
        if let Some(offset) = expected.first_difference(&got) {
            return Err(ServiceError::Invalid(format!(
                "backup {id} is damaged: its restore point differs from its checksum map in the {}-byte block at offset {offset}",
                expected.block_size
            )));
        }
        Ok(Verified {
            backup: b.id.clone(),
            checksum: got.checksum(),
            bytes: b.volume_size,
        })
    }

    /// Reads an exported volume or snapshot and returns its block map.
    pub(super) fn read_map(
        &self,
        backend: &str,
        pool: &str,
        what: &ExportTarget,
        b: &BackupRecord,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<BlockMap> {
        let op = self.catalog.begin_operation("read", Some(&b.id))?;
        let driver = self.driver(backend)?;
        let mut run = || -> Result<BlockMap> {
            let conn = self.export(&op, &driver, backend, pool, what, true)?;
            let opts = self.config.copy_options();
            let mut dev = devices::attach(&conn, false, opts.queue_depth)?;
            if dev.size() < b.volume_size {
                return Err(ServiceError::Invalid(format!(
                    "the data of backup {} ({} bytes) is smaller than the volume it holds ({} bytes)",
                    b.id,
                    dev.size(),
                    b.volume_size
                )));
            }
            let counters = copy::Counters::default();
            let map = copy::block_map(
                &mut *dev,
                &opts,
                b.map_block_size,
                b.volume_size,
                &counters,
                std::time::Instant::now(),
                progress,
            )?;
            Ok(map)
        };
        let result = run();
        self.undo(&op, false)?;
        self.catalog.end_operation(&op.id)?;
        result
    }
}
