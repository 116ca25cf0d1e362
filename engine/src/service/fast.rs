//! Backups through a driver's vendor fast path (see
//! `volback_drivers::fast_path`): the source driver moves the data, the
//! engine watches it go by to build the backup's block map, then reads back
//! what was written and checks it against that map, as after a generic copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use volback_drivers::{ConnectionInfo, TransferObserver, TransferRequest, VolumeDriver};

use super::{Result, Service};
use crate::catalog::Operation;
use crate::copy::{self, BlockMap, CopyError, CopyReport, Counters, Phase, Progress};
use crate::devices;

/// What the fast path is asked to do, from the engine's side.
pub(super) struct FastJob<'a> {
    pub pool: &'a str,
    pub snapshot: &'a str,
    /// The parent's source snapshot and block map, for an incremental.
    pub since: Option<(&'a str, Arc<BlockMap>)>,
    pub destination: &'a ConnectionInfo,
    pub destination_is_zero: bool,
    pub map_block: u64,
    pub size: u64,
}

/// Builds the block map from the blocks the fast path reports.
struct MapObserver<'a> {
    map: BlockMap,
    counters: &'a Counters,
    pages: Vec<u64>,
}

impl MapObserver<'_> {
    fn blocks(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let b = self.map.block_size;
        (offset / b) as usize..(offset + len).div_ceil(b) as usize
    }
}

impl TransferObserver for MapObserver<'_> {
    fn data(&mut self, offset: u64, data: &[u8]) {
        let block = self.map.block_size as usize;
        for (i, piece) in self
            .blocks(offset, data.len() as u64)
            .zip(data.chunks(block))
        {
            self.pages.clear();
            copy::analyze(piece, false, Some(&mut self.pages));
            self.map.hashes[i] = copy::block_hash(&self.pages);
        }
        let n = data.len() as u64;
        self.counters.read.fetch_add(n, Ordering::Relaxed);
        self.counters.written.fetch_add(n, Ordering::Relaxed);
    }

    fn zeroes(&mut self, offset: u64, len: u64) {
        for i in self.blocks(offset, len) {
            self.map.hashes[i] = copy::zero_block_hash(self.map.block_len(i));
        }
        self.counters.read.fetch_add(len, Ordering::Relaxed);
        self.counters.zeroed.fetch_add(len, Ordering::Relaxed);
    }
}

impl Service {
    /// Runs the source driver's fast path, if it has one and takes this
    /// job; `None` means nothing was done and the generic copy should run.
    /// Returns the report (with the block map) and the method's name.
    pub(super) fn fast_transfer(
        &self,
        op: &Operation,
        driver: &Arc<dyn VolumeDriver>,
        job: &FastJob<'_>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Option<(CopyReport, String)>> {
        let Some(fast) = driver.fast_path() else {
            return Ok(None);
        };
        let opts = self.config.copy_options();
        let start = Instant::now();
        let counters = Counters::default();
        let map = match &job.since {
            Some((_, parent)) => (**parent).clone(),
            None => {
                let mut m = BlockMap::new(job.map_block, job.size);
                for i in 0..m.hashes.len() {
                    m.hashes[i] = copy::zero_block_hash(m.block_len(i));
                }
                m
            }
        };
        let request = TransferRequest {
            pool: job.pool,
            snapshot: job.snapshot,
            since: job.since.as_ref().map(|(s, _)| *s),
            destination: job.destination,
            destination_is_zero: job.destination_is_zero,
            granularity: job.map_block,
            queue_depth: opts.queue_depth,
            chunk_size: opts.block_size,
        };
        let mut observer = MapObserver {
            map,
            counters: &counters,
            pages: Vec::new(),
        };
        let workers = copy::Workers::watched_here();
        let outcome = std::thread::scope(|s| {
            let worker = workers.spawn(s, || fast.transfer(&request, &mut observer));
            let mut recorder = self.progress_recorder(op);
            let mut report = |p: &Progress| {
                progress(p);
                recorder(p);
            };
            copy::watch(&counters, Phase::Copy, job.size, start, &mut report, || {
                workers.all_done()
            });
            worker.join().expect("fast path thread panicked")
        });
        let Some(report) = outcome? else {
            return Ok(None);
        };
        let map = observer.map;
        tracing::info!(
            method = %report.method,
            bytes_read = report.bytes_read,
            bytes_written = report.bytes_written,
            bytes_zeroed = report.bytes_zeroed,
            ranges = report.touched.len(),
            elapsed_s = start.elapsed().as_secs_f64(),
            "fast path transfer finished"
        );
        if opts.verify {
            // Read back what the fast path wrote; the rest is the parent's
            // data (checked when it was made) or, on a new volume, zeroes.
            let mut dev = devices::attach(job.destination, false, opts.queue_depth)?;
            let got = copy::block_map_within(
                &mut *dev,
                &opts,
                Arc::new(map.clone()),
                report.touched.clone(),
                &counters,
                start,
                progress,
            )?;
            if let Some(offset) = map.first_difference(&got) {
                return Err(CopyError::MapMismatch {
                    device: dev.name().to_string(),
                    offset,
                    block_size: map.block_size,
                }
                .into());
            }
        }
        let copied = CopyReport {
            size: job.size,
            bytes_read: report.bytes_read,
            bytes_written: report.bytes_written,
            bytes_zeroed: report.bytes_zeroed,
            bytes_skipped: job.size.saturating_sub(report.bytes_read),
            elapsed: start.elapsed(),
            destination_was_zero: job.destination_is_zero,
            digest: None,
            block_map: Some(map),
        };
        Ok(Some((copied, report.method)))
    }
}
