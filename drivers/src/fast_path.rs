//! Vendor fast paths: a driver that moves a backup's data itself.
//!
//! The generic flow attaches the source snapshot and the destination
//! through connectors and runs the engine's copy engine. A driver that
//! knows a better way between two of its own kind of volumes (Ceph to Ceph
//! by RBD diffs, an array's own replication) offers a [`FastPath`]; the
//! engine asks it first and falls back to the generic copy when it
//! declines. Only the data transfer is handed over: snapshots, exports and
//! the catalog stay with the engine, so crash recovery is the same either
//! way.
//!
//! The engine watches every byte go by through a [`TransferObserver`]: it
//! builds the backup's block map from what the fast path moved, then reads
//! back what was written to verify it, exactly as after a generic copy.

use crate::{merge_ranges, ChangedRange, ConnectionInfo, Result};

/// What the engine asks a fast path to move.
#[derive(Debug, Clone)]
pub struct TransferRequest<'a> {
    /// The source pool (of the driver that offers the fast path).
    pub pool: &'a str,
    /// The source snapshot to read (the backup's point in time).
    pub snapshot: &'a str,
    /// For an incremental: the snapshot the previous backup was read from.
    /// The destination holds that snapshot's data; only what changed since
    /// must be moved. `None` for a full backup.
    pub since: Option<&'a str>,
    /// The destination volume, as exported by the target's driver.
    pub destination: &'a ConnectionInfo,
    /// The destination was just created and reads as zero.
    pub destination_is_zero: bool,
    /// Every range moved must start and end on a multiple of this (the end
    /// of the volume excepted), so the observer sees whole blocks.
    pub granularity: u64,
    /// How many requests to keep in flight on each side.
    pub queue_depth: usize,
    /// Bytes per request (a multiple of `granularity`).
    pub chunk_size: u64,
}

/// Sees what a fast path moves, in order per range, from any thread the
/// fast path uses (one call at a time).
pub trait TransferObserver: Send {
    /// `data` now sits at `offset` on the destination (and was read from
    /// the source snapshot there). `offset` and `data.len()` are multiples
    /// of the granularity, except at the end of the volume.
    fn data(&mut self, offset: u64, data: &[u8]);
    /// `[offset, offset + len)` reads as zero on the destination now.
    fn zeroes(&mut self, offset: u64, len: u64);
}

/// What a fast path did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// Names the method, for the catalog and the operator ("rbd-diff").
    pub method: String,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes made to read as zero without writing data.
    pub bytes_zeroed: u64,
    /// The ranges that may now differ on the destination (sorted, disjoint,
    /// on the granularity): what the engine reads back to verify.
    pub touched: Vec<(u64, u64)>,
}

/// Capability: a driver that can transfer a backup's data itself.
pub trait FastPath: Send + Sync {
    /// Moves the data, or returns `Ok(None)` without touching anything when
    /// this request is not one it handles (the engine then copies
    /// generically). An error after it started leaves the destination
    /// partly written; the engine treats that like a failed copy.
    fn transfer(
        &self,
        request: &TransferRequest<'_>,
        observer: &mut dyn TransferObserver,
    ) -> Result<Option<TransferReport>>;
}

/// Rounds `[offset, offset + len)` ranges out to `granularity` (clipped at
/// `size`), then sorts and merges them.
pub fn round_out(ranges: &[(u64, u64)], granularity: u64, size: u64) -> Vec<(u64, u64)> {
    let rounded = ranges
        .iter()
        .filter(|r| r.1 > 0 && r.0 < size)
        .map(|&(off, len)| {
            let start = off / granularity * granularity;
            let end = (off + len).div_ceil(granularity) * granularity;
            ChangedRange {
                offset: start,
                len: end.min(size) - start,
            }
        })
        .collect();
    merge_ranges(rounded)
        .into_iter()
        .map(|r| (r.offset, r.len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_out_aligns_clips_and_merges() {
        let g = 4096;
        assert_eq!(round_out(&[(100, 10)], g, 1 << 20), vec![(0, 4096)]);
        // Touching after rounding: one range.
        assert_eq!(
            round_out(&[(8192, 1), (0, 4097)], g, 1 << 20),
            vec![(0, 12288)]
        );
        // The last block is short: clipped at the size.
        assert_eq!(round_out(&[(10_000, 5)], g, 10_100), vec![(8192, 1908)]);
        // Empty and out-of-range pieces vanish.
        assert_eq!(round_out(&[(0, 0), (20_000, 5)], g, 10_100), vec![]);
        // Unsorted input, gaps kept.
        assert_eq!(
            round_out(&[(40960, 1), (0, 1)], g, 1 << 20),
            vec![(0, 4096), (40960, 4096)]
        );
    }
}
