//! The read side: walks the plan, keeps reads in flight, classifies blocks.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use volback_connectors::{AlignedBuf, BlockDevice, IoOp, Returned, HUGE_PAGE};

use std::sync::Arc;

use super::blockmap::{block_hash, zero_block_hash, BlockMap};
use super::blocks::{analyze, mark_unchanged, OrderedDigest};
use super::plan::{Planner, Step, GRID};
use super::throttle::Throttle;
use super::{CopyError, CopyOptions, Counters, MapPlan, SparseMode, Work, MIN_SKIPPED_HOLE};

pub(crate) struct ScanConfig {
    /// Bytes to scan from offset 0 (the source's size, also when reading
    /// back a larger destination).
    pub size: u64,
    pub block_size: u64,
    pub pool_size: usize,
    pub use_map: bool,
    pub detect_zero: bool,
    /// Compute the whole-device checksum (needs every byte planned).
    pub hash: bool,
    /// Build a block map (and maybe skip unchanged blocks).
    pub block_map: Option<MapPlan>,
    pub bwlimit: Option<u64>,
    /// Count bytes as verified rather than read (the read-back pass).
    pub counts_as_verify: bool,
    /// Nothing looks at the data: read with `IoOp::ReadDiscard`, into the
    /// device's own shared memory, and hand nothing to the sink.
    pub discard: bool,
}

impl ScanConfig {
    pub fn for_copy(opts: &CopyOptions, size: u64) -> Self {
        let sparse = opts.sparse != SparseMode::Never;
        let restricted = opts.block_map.as_ref().is_some_and(|m| m.only.is_some());
        Self {
            size,
            block_size: opts.block_size,
            pool_size: opts.queue_depth,
            use_map: sparse,
            detect_zero: sparse,
            hash: (opts.verify || opts.checksum) && !restricted,
            block_map: opts.block_map.clone(),
            bwlimit: opts.bwlimit,
            counts_as_verify: false,
            discard: false,
        }
    }
}

/// What a scan found.
pub(crate) struct Scanned {
    pub digest: Option<u128>,
    pub block_map: Option<BlockMap>,
}

/// Builds the new block map as blocks are read, and says which blocks are
/// unchanged from the parent's map.
struct MapBuilder {
    map: BlockMap,
    parent: Option<Arc<BlockMap>>,
    pages_per_block: usize,
    zero_block: u64,
}

impl MapBuilder {
    fn new(plan: &MapPlan, size: u64) -> Self {
        // Restricted plans leave blocks outside the changes as the parent has them.
        let map = match (&plan.only, &plan.parent) {
            (Some(_), Some(parent)) => (**parent).clone(),
            _ => BlockMap::new(plan.block, size),
        };
        Self {
            map,
            parent: plan.parent.clone().filter(|_| plan.compare_parent),
            pages_per_block: (plan.block / GRID) as usize,
            zero_block: zero_block_hash(plan.block),
        }
    }

    fn unchanged(&self, index: usize, hash: u64) -> bool {
        self.parent
            .as_ref()
            .is_some_and(|p| p.hashes.get(index) == Some(&hash))
    }

    /// Records the blocks of a read at `offset` (on the map grid) from its
    /// page hashes; returns the byte ranges (within the read) unchanged.
    fn add_read(&mut self, offset: u64, pages: &[u64]) -> Vec<(usize, usize)> {
        let bs = self.map.block_size;
        let mut unchanged = Vec::new();
        for (i, block) in pages.chunks(self.pages_per_block).enumerate() {
            let index = (offset / bs) as usize + i;
            let h = block_hash(block);
            self.map.hashes[index] = h;
            if self.unchanged(index, h) {
                let start = i * bs as usize;
                unchanged.push((start, self.map.block_len(index) as usize));
            }
        }
        unchanged
    }

    /// Records the blocks of a hole; returns the sub-ranges that changed.
    fn add_hole(&mut self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let bs = self.map.block_size;
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let index = (pos / bs) as usize;
            let blen = self.map.block_len(index);
            let h = if blen == bs {
                self.zero_block
            } else {
                zero_block_hash(blen)
            };
            self.map.hashes[index] = h;
            if !self.unchanged(index, h) {
                match changed.last_mut() {
                    Some(last) if last.0 + last.1 == pos => last.1 += blen,
                    _ => changed.push((pos, blen)),
                }
            }
            pos += blen;
        }
        changed
    }
}

/// The bounded set of buffers shared by reader and writer. Buffers are
/// mapped when first needed, all `max` at once (nothing is touched: the
/// first I/O into each buffer faults its memory in), and come back through
/// `returns`. Buffers already used are taken before fresh ones.
///
/// Huge pages: a fresh buffer made of whole huge pages (the default 4 MiB
/// blocks) asks for them when it is first taken for a read of at least a
/// huge page. A dense copy then pins and walks 512 times fewer pages,
/// while a sparse source's short reads, which touch only the start of a
/// buffer, fault in small pages instead of clearing 2 MiB at each first
/// touch. Smaller buffers share huge pages, so their whole pool asks for
/// them up front.
pub(crate) struct Pool {
    /// Buffers back from I/O, their memory faulted in.
    free: Vec<AlignedBuf>,
    /// Mapped and never used.
    fresh: Vec<AlignedBuf>,
    mapped: bool,
    max: usize,
    block_size: usize,
    returns: Option<Receiver<AlignedBuf>>,
    /// Fresh buffers ask for huge pages one by one, by their first read.
    pages_per_buffer: bool,
    /// Buffers that asked for huge pages one by one.
    advised: usize,
}

impl Pool {
    pub fn new(max: usize, block_size: u64, returns: Option<Receiver<AlignedBuf>>) -> Self {
        let block_size = block_size as usize;
        Self {
            free: Vec::new(),
            fresh: Vec::new(),
            mapped: false,
            max,
            block_size,
            returns,
            pages_per_buffer: block_size % HUGE_PAGE == 0,
            advised: 0,
        }
    }

    /// A buffer for a read of `read_len` bytes, if one is free.
    fn try_take(&mut self, read_len: u64) -> Option<AlignedBuf> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if let Some(b) = self.returns.as_ref().and_then(|r| r.try_recv().ok()) {
            return Some(b);
        }
        if !self.mapped {
            self.mapped = true;
            self.fresh = AlignedBuf::new_batch(self.block_size, self.max, !self.pages_per_buffer);
        }
        let b = self.fresh.pop()?;
        if self.pages_per_buffer && read_len as usize >= HUGE_PAGE && b.advise_huge_pages() {
            self.advised += 1;
        }
        Some(b)
    }

    fn take_blocking(&mut self) -> Result<AlignedBuf, CopyError> {
        if let Some(b) = self.try_take(self.block_size as u64) {
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
/// once.
pub(crate) fn scan(
    dev: &mut dyn BlockDevice,
    cfg: &ScanConfig,
    pool: &mut Pool,
    counters: &Counters,
    sink: &mut dyn FnMut(Work) -> Result<Option<AlignedBuf>, CopyError>,
) -> Result<Scanned, CopyError> {
    let grid = cfg.block_map.as_ref().map_or(GRID, |m| m.block);
    let mut planner = Planner::with_grid(
        cfg.size,
        cfg.block_size,
        MIN_SKIPPED_HOLE,
        cfg.use_map,
        grid,
    );
    if let Some(only) = cfg.block_map.as_ref().and_then(|m| m.only.as_ref()) {
        planner.restrict(only);
    }
    let mut digest = cfg.hash.then(|| OrderedDigest::new(cfg.size));
    let mut builder = cfg.block_map.as_ref().map(|m| MapBuilder::new(m, cfg.size));
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
                Step::Skip { len, .. } => {
                    let done = if cfg.counts_as_verify {
                        &counters.verified
                    } else {
                        &counters.skipped
                    };
                    done.fetch_add(len, Ordering::Relaxed);
                }
                Step::Hole { offset, len } => {
                    if let Some(d) = digest.as_mut() {
                        d.add_zeroes(offset, len);
                    }
                    if cfg.counts_as_verify {
                        progress.fetch_add(len, Ordering::Relaxed);
                    }
                    let changed = match builder.as_mut() {
                        Some(b) => b.add_hole(offset, len),
                        None => vec![(offset, len)],
                    };
                    let unchanged = len - changed.iter().map(|c| c.1).sum::<u64>();
                    counters.skipped.fetch_add(unchanged, Ordering::Relaxed);
                    for (offset, len) in changed {
                        if let Some(b) = sink(Work::Hole { offset, len })? {
                            pool.put(b);
                        }
                    }
                }
                Step::Read { offset, len } => {
                    // Over the bandwidth limit: with reads in flight, go and
                    // handle their completions (the writer and progress keep
                    // moving); with none, there is nothing to do but wait.
                    if let Some(t) = throttle.as_ref() {
                        let delay = t.delay(len);
                        if !delay.is_zero() {
                            if dev.in_flight() > 0 {
                                waiting = Some(step);
                                break;
                            }
                            std::thread::sleep(delay);
                        }
                    }
                    let op = if cfg.discard {
                        IoOp::ReadDiscard {
                            offset,
                            len: len as usize,
                        }
                    } else {
                        let Some(buf) = pool.try_take(len) else {
                            waiting = Some(step);
                            break;
                        };
                        IoOp::Read {
                            offset,
                            len: len as usize,
                            buf,
                        }
                    };
                    if let Some(t) = throttle.as_mut() {
                        t.take(len);
                    }
                    dev.submit(offset, op)?;
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
            if cfg.counts_as_verify {
                counters.read_back.fetch_add(n, Ordering::Relaxed);
            }
            let buf = match c.buf {
                Returned::Read(buf) => buf,
                Returned::None if cfg.discard => continue,
                _ => unreachable!("a read returns its buffer"),
            };
            let mut pages = (digest.is_some() || builder.is_some()).then(Vec::new);
            let mut runs = analyze(
                &buf.as_slice()[..len as usize],
                cfg.detect_zero,
                pages.as_mut(),
            );
            if let (Some(b), Some(p)) = (builder.as_mut(), pages.as_ref()) {
                let unchanged = b.add_read(offset, p);
                if !unchanged.is_empty() {
                    runs = mark_unchanged(&runs, &unchanged);
                }
            }
            if let (Some(d), Some(p)) = (digest.as_mut(), pages) {
                d.add_hashes(offset, p);
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
    Ok(Scanned {
        digest: digest.map(|d| d.finish().expect("every byte of the device was hashed")),
        block_map: builder.map(|b| b.map),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_buffers_first_and_huge_pages_by_first_read() {
        const MIB: u64 = 1 << 20;
        let mut pool = Pool::new(3, 4 * MIB, None);
        let small = pool.try_take(64 << 10).expect("fresh");
        assert_eq!(small.len() as u64, 4 * MIB);
        assert_eq!(pool.advised, 0, "a short read keeps small pages");
        // A used buffer comes back before a fresh one is touched.
        let at = small.as_ptr();
        pool.put(small);
        let again = pool.try_take(4 * MIB).unwrap();
        assert_eq!(again.as_ptr(), at);
        assert_eq!(pool.advised, 0);
        // Fresh buffers taken for reads of a huge page or more ask for them.
        let big = [
            pool.try_take(4 * MIB).unwrap(),
            pool.try_take(2 * MIB).unwrap(),
        ];
        assert_eq!(pool.advised, 2);
        assert!(pool.try_take(4 * MIB).is_none(), "the pool is bounded");
        drop(big);
        // Buffers smaller than a huge page ask as one pool, up front.
        let mut pool = Pool::new(4, MIB, None);
        assert!(!pool.pages_per_buffer);
        assert!(pool.try_take(MIB).is_some());
        assert_eq!(pool.advised, 0);
    }
}
