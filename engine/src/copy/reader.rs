//! The read side: walks the plan, keeps reads in flight, classifies blocks.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use volback_connectors::{AlignedBuf, BlockDevice, IoOp, Returned};

use super::blocks::{analyze, OrderedDigest};
use super::plan::{Planner, Step};
use super::throttle::Throttle;
use super::{CopyError, CopyOptions, Counters, SparseMode, Work, MIN_SKIPPED_HOLE};

pub(crate) struct ScanConfig {
    /// Bytes to scan from offset 0 (the source's size, also when reading
    /// back a larger destination).
    pub size: u64,
    pub block_size: u64,
    pub pool_size: usize,
    pub use_map: bool,
    pub detect_zero: bool,
    pub hash: bool,
    pub bwlimit: Option<u64>,
    /// Count bytes as verified rather than read (the read-back pass).
    pub counts_as_verify: bool,
}

impl ScanConfig {
    pub fn for_copy(opts: &CopyOptions, size: u64) -> Self {
        let sparse = opts.sparse != SparseMode::Never;
        Self {
            size,
            block_size: opts.block_size,
            pool_size: opts.queue_depth,
            use_map: sparse,
            detect_zero: sparse,
            hash: opts.verify || opts.checksum,
            bwlimit: opts.bwlimit,
            counts_as_verify: false,
        }
    }
}

/// The bounded set of buffers shared by reader and writer. Buffers are
/// allocated lazily up to `max` and come back through `returns`.
pub(crate) struct Pool {
    free: Vec<AlignedBuf>,
    allocated: usize,
    max: usize,
    block_size: usize,
    returns: Option<Receiver<AlignedBuf>>,
}

impl Pool {
    pub fn new(max: usize, block_size: u64, returns: Option<Receiver<AlignedBuf>>) -> Self {
        Self {
            free: Vec::new(),
            allocated: 0,
            max,
            block_size: block_size as usize,
            returns,
        }
    }

    fn try_take(&mut self) -> Option<AlignedBuf> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if let Some(b) = self.returns.as_ref().and_then(|r| r.try_recv().ok()) {
            return Some(b);
        }
        if self.allocated < self.max {
            self.allocated += 1;
            return Some(AlignedBuf::new(self.block_size));
        }
        None
    }

    fn take_blocking(&mut self) -> Result<AlignedBuf, CopyError> {
        if let Some(b) = self.try_take() {
            return Ok(b);
        }
        match &self.returns {
            Some(r) => r.recv().map_err(|_| CopyError::Aborted("writer")),
            None => unreachable!("a pool without returns always has its buffers back"),
        }
    }

    pub fn put(&mut self, b: AlignedBuf) {
        self.free.push(b);
    }
}

/// Reads `[0, cfg.size)` of `dev`, handing each read or hole to `sink` in
/// completion order. `sink` gives a buffer back when it is done with it at
/// once. Returns the device checksum when `cfg.hash`.
pub(crate) fn scan(
    dev: &mut dyn BlockDevice,
    cfg: &ScanConfig,
    pool: &mut Pool,
    counters: &Counters,
    sink: &mut dyn FnMut(Work) -> Result<Option<AlignedBuf>, CopyError>,
) -> Result<Option<u128>, CopyError> {
    let mut planner = Planner::new(cfg.size, cfg.block_size, MIN_SKIPPED_HOLE, cfg.use_map);
    let mut digest = cfg.hash.then(|| OrderedDigest::new(cfg.size));
    let mut throttle = cfg.bwlimit.map(Throttle::new);
    let progress = if cfg.counts_as_verify {
        &counters.verified
    } else {
        &counters.read
    };
    let mut lengths: HashMap<u64, u64> = HashMap::new();
    let mut waiting: Option<Step> = None;
    let mut planned_all = false;
    let mut completions = Vec::new();
    loop {
        while !planned_all && dev.in_flight() < dev.max_in_flight() {
            let step = match waiting.take() {
                Some(s) => s,
                None => match planner.next(dev.allocation_map())? {
                    Some(s) => s,
                    None => {
                        planned_all = true;
                        break;
                    }
                },
            };
            match step {
                Step::Hole { offset, len } => {
                    if let Some(d) = digest.as_mut() {
                        d.add_zeroes(offset, len);
                    }
                    if cfg.counts_as_verify {
                        progress.fetch_add(len, Ordering::Relaxed);
                    }
                    if let Some(b) = sink(Work::Hole { offset, len })? {
                        pool.put(b);
                    }
                }
                Step::Read { offset, len } => {
                    let Some(buf) = pool.try_take() else {
                        waiting = Some(step);
                        break;
                    };
                    if let Some(t) = throttle.as_mut() {
                        t.wait(len);
                    }
                    dev.submit(
                        offset,
                        IoOp::Read {
                            offset,
                            len: len as usize,
                            buf,
                        },
                    )?;
                    lengths.insert(offset, len);
                }
            }
        }
        if dev.in_flight() == 0 {
            if planned_all && waiting.is_none() {
                break;
            }
            // Every buffer is with the writer: wait for one to come back.
            let b = pool.take_blocking()?;
            pool.put(b);
            continue;
        }
        dev.reap(1, &mut completions)?;
        for c in completions.drain(..) {
            let offset = c.tag;
            let len = lengths
                .remove(&offset)
                .expect("completion for a read we issued");
            let Returned::Read(buf) = c.buf else {
                unreachable!("a read returns its buffer")
            };
            let n = c.result?;
            if n < len {
                return Err(CopyError::SourceShrank {
                    device: dev.name().to_string(),
                    offset,
                    expected: len,
                    got: n,
                });
            }
            progress.fetch_add(n, Ordering::Relaxed);
            let mut hashes = digest.is_some().then(Vec::new);
            let runs = analyze(
                &buf.as_slice()[..len as usize],
                cfg.detect_zero,
                hashes.as_mut(),
            );
            if let (Some(d), Some(h)) = (digest.as_mut(), hashes) {
                d.add_hashes(offset, h);
            }
            if let Some(b) = sink(Work::Data {
                offset,
                len: len as usize,
                buf,
                runs,
            })? {
                pool.put(b);
            }
        }
    }
    Ok(digest.map(|d| d.finish().expect("every byte of the device was hashed")))
}
