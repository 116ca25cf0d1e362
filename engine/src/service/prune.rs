//! `backup prune`: retention. Every backup is a complete restore point, so
//! backups can be deleted in any order and pruning is just a choice of
//! which to keep.

use std::collections::BTreeSet;

use super::{Result, Service};
use crate::catalog::{BackupRecord, BackupState};

/// Which backups of a volume to keep (restic's rules): the `last` newest,
/// the newest of each of the `daily` most recent days that have one, and
/// the newest of each of the `weekly` most recent weeks that have one (UTC;
/// weeks start on Monday).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeepPolicy {
    pub last: usize,
    pub daily: usize,
    pub weekly: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pruned {
    pub kept: Vec<String>,
    pub deleted: Vec<String>,
}

const DAY: u64 = 86_400;
/// 1970-01-01 was a Thursday: shift so that weeks start on Monday.
const MONDAY_SHIFT: u64 = 3 * DAY;

/// The ids to keep among `backups` (any order).
pub fn choose(backups: &[BackupRecord], policy: KeepPolicy) -> BTreeSet<String> {
    // `backups` come in catalog order (creation time, then insertion): a
    // stable sort of the reversed list keeps the later insertion first
    // among backups of the same second.
    let mut newest_first: Vec<&BackupRecord> = backups.iter().rev().collect();
    newest_first.sort_by_key(|b| std::cmp::Reverse(b.created_at));
    let mut keep = BTreeSet::new();
    for b in newest_first.iter().take(policy.last) {
        keep.insert(b.id.clone());
    }
    let mut keep_newest_per = |bucket: &dyn Fn(u64) -> u64, count: usize| {
        let mut seen = BTreeSet::new();
        for b in &newest_first {
            if seen.len() == count {
                break;
            }
            if seen.insert(bucket(b.created_at)) {
                keep.insert(b.id.clone());
            }
        }
    };
    keep_newest_per(&|t| t / DAY, policy.daily);
    keep_newest_per(&|t| (t + MONDAY_SHIFT) / (7 * DAY), policy.weekly);
    keep
}

impl Service {
    /// Deletes the available backups of a volume that the policy does not
    /// keep. Backups in other states are left alone.
    pub fn prune(&mut self, volume: &str, policy: KeepPolicy, dry_run: bool) -> Result<Pruned> {
        let (loc, _) = self.locate_volume(volume).or_else(|e| {
            // A volume that is gone can still have backups to prune.
            if self
                .catalog
                .list_backups()?
                .iter()
                .any(|b| b.volume_id == volume)
            {
                Ok((
                    super::VolumeLocation {
                        backend: String::new(),
                        pool: String::new(),
                        id: volume.to_string(),
                    },
                    volback_drivers::VolumeInfo {
                        id: volume.to_string(),
                        name: String::new(),
                        pool: String::new(),
                        size: 0,
                        metadata: Default::default(),
                    },
                ))
            } else {
                Err(e)
            }
        })?;
        let backups: Vec<BackupRecord> = self
            .catalog
            .list_backups()?
            .into_iter()
            .filter(|b| b.volume_id == loc.id && b.state == BackupState::Available)
            .collect();
        let keep = choose(&backups, policy);
        let mut out = Pruned::default();
        for b in &backups {
            if keep.contains(&b.id) {
                out.kept.push(b.id.clone());
            } else {
                if !dry_run {
                    self.delete_backup(&b.id)?;
                }
                out.deleted.push(b.id.clone());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: &str, t: u64) -> BackupRecord {
        let mut b: BackupRecord = serde_json::from_value(serde_json::json!({
            "id": id, "state": "available", "volume_id": "v", "volume_name": "n", "volume_size": 1,
            "volume_backend": "b", "volume_pool": "p", "volume_metadata": {}, "target_backend": "t",
            "target_pool": "q", "target_volume_id": "tv", "target_snapshot_id": null, "source_snapshot_id": null,
            "mode": "full", "change_tracking": "full", "note": null, "map_block_size": 4096, "parent_id": null,
            "from_snapshot": false, "checksum": null, "bytes_read": 0, "bytes_written": 0, "created_at": 0,
            "completed_at": null, "error": null
        }))
        .unwrap();
        b.created_at = t;
        b
    }

    #[test]
    fn keeps_last_daily_and_weekly() {
        // Monday 2026-11-02 00:00 UTC is 1_793_577_600.
        let monday = 1_793_577_600;
        let h = 3600;
        let backups = vec![
            at("mon-a", monday + 2 * h),
            at("mon-b", monday + 20 * h),
            at("tue", monday + DAY + h),
            at("wed", monday + 2 * DAY + h),
            at("next-mon", monday + 7 * DAY + h),
            at("next-tue-a", monday + 8 * DAY + h),
            at("next-tue-b", monday + 8 * DAY + 5 * h),
        ];
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let p = |last, daily, weekly| {
            choose(
                &backups,
                KeepPolicy {
                    last,
                    daily,
                    weekly,
                },
            )
        };
        assert_eq!(p(2, 0, 0), ids(&["next-tue-b", "next-tue-a"]));
        assert_eq!(p(0, 3, 0), ids(&["next-tue-b", "next-mon", "wed"]));
        assert_eq!(p(0, 0, 2), ids(&["next-tue-b", "wed"]));
        assert_eq!(p(1, 0, 2), ids(&["next-tue-b", "wed"]));
        assert_eq!(p(0, 0, 0), ids(&[]));
        assert_eq!(p(0, 10, 0).len(), 5, "one per day with a backup");
    }
}
