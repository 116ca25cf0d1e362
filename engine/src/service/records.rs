//! `backup export` and `backup import`.

use super::{Result, Service, ServiceError};
use crate::catalog::{BackupRecord, BackupState};
use crate::record;

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
    /// size, and (with `check_data`) its restore point matches the record's
    /// checksum, read block by block (that read also rebuilds its map).
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
        let map = if check_data {
            let what = Self::restore_point(&b);
            let map = self
                .read_map(&b.target_backend, &b.target_pool, &what, &b, &mut |_| {})
                .map_err(|e| {
                    ServiceError::BadRecord(format!("its restore point cannot be read: {e}"))
                })?;
            let expected = b.checksum.clone().unwrap_or_default();
            if map.checksum() != expected {
                return Err(ServiceError::BadRecord(format!(
                    "its data does not match the record's checksum ({expected}, read {})",
                    map.checksum()
                )));
            }
            Some(map)
        } else {
            None
        };
        b.state = BackupState::Available;
        b.error = None;
        // Change tracking state belongs to the installation that made it.
        b.source_snapshot_id = None;
        self.catalog.insert_backup(&b)?;
        if let Some(map) = map {
            self.catalog.set_block_map(&b.id, &map.to_bytes())?;
        }
        Ok(b)
    }
}
