//! The copy engine: source to destination through any two block devices.
//!
//! A reader thread walks the source's allocation map, keeps up to
//! `queue_depth` reads in flight, and classifies each block it reads as zero
//! or data (and hashes it when verifying). A writer thread turns that into
//! writes, write-zeroes or nothing, keeping its own requests in flight. Both
//! draw from one pool of `queue_depth` buffers of `block_size` bytes: that
//! product bounds the memory whatever the volume size.

mod blockmap;
mod blocks;
mod plan;
mod reader;
mod throttle;
mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use volback_connectors::{AlignedBuf, BlockDevice, DeviceError, IoOp, Returned};

pub use blockmap::{block_hash, zero_block_hash, BlockMap, DEFAULT_MAP_BLOCK};
pub use blocks::{analyze, is_zero, Run, RunKind};
pub use plan::{Planner, Step, GRID};

/// What to do with ranges that read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SparseMode {
    /// Skip holes and zero blocks; zero them on the destination only if it
    /// is not known to read as zero already.
    #[default]
    Auto,
    /// As auto, and deallocate (punch or unmap) zero ranges on a destination
    /// that is not known zero, so it ends up as thin as the source.
    Always,
    /// Read and write every byte (a fully allocated destination).
    Never,
}

#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub block_size: u64,
    pub queue_depth: usize,
    pub sparse: SparseMode,
    /// Bytes per second read from the source (and from the destination when
    /// verifying); None for no limit.
    pub bwlimit: Option<u64>,
    pub verify: bool,
    /// Compute the source's checksum while copying (implied by `verify`,
    /// which also reads the destination back).
    pub checksum: bool,
    /// The caller created the destination and knows it reads as zero.
    pub destination_is_zero: bool,
    /// Build a block map of the source (and copy incrementally against a
    /// parent's map or the ranges a driver says changed).
    pub block_map: Option<MapPlan>,
}

/// How to build a block map, and what the destination already holds.
#[derive(Debug, Clone)]
pub struct MapPlan {
    /// Bytes per map block (a multiple of 4 KiB dividing the block size).
    pub block: u64,
    /// The map of what the destination holds now (the parent backup).
    pub parent: Option<Arc<BlockMap>>,
    /// Skip blocks whose hash equals the parent's (hash-map incremental).
    pub compare_parent: bool,
    /// Only these (offset, length) ranges may differ from the parent: read
    /// and write just them (driver change tracking). Needs `parent`.
    pub only: Option<Vec<(u64, u64)>>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            sparse: SparseMode::Auto,
            bwlimit: None,
            verify: false,
            checksum: false,
            destination_is_zero: false,
            block_map: None,
        }
    }
}

/// Defaults chosen by measurement: 2 GiB dense and 10%-sparse loop-to-loop
/// copies, 4M x 32, 2M x 32, 1M x 32 and 1M x 16 interleaved with the peers
/// (`VOLBACK_VARIANTS="1M:32 2M:32 1M:16" bash bench/copy.sh`); 2 MiB x 32
/// had the best median in both cases, 3% ahead of 4 MiB x 32 (within the
/// disk's noise) for half the memory. The buffers cost 64 MiB;
/// `--block-size`/`--queue-depth` trade that down.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
pub const DEFAULT_QUEUE_DEPTH: usize = 32;

/// Holes shorter than this between data are read rather than skipped.
const MIN_SKIPPED_HOLE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("destination {destination} ({destination_size} bytes) is smaller than source {source_device} ({source_size} bytes)")]
    DestinationTooSmall {
        source_device: String,
        source_size: u64,
        destination: String,
        destination_size: u64,
    },
    #[error(
        "source {device} ended early: expected {expected} bytes at offset {offset}, got {got}"
    )]
    SourceShrank {
        device: String,
        offset: u64,
        expected: u64,
        got: u64,
    },
    #[error(
        "verification failed: {destination} differs from {source_device}: first difference at offset {offset} \
         (source checksum {source_digest:032x}, destination checksum {destination_digest:032x})"
    )]
    VerifyMismatch {
        source_device: String,
        destination: String,
        offset: u64,
        source_digest: u128,
        destination_digest: u128,
    },
    #[error(
        "verification failed: {device} does not match the block map: first difference in the \
         {block_size}-byte block at offset {offset}"
    )]
    MapMismatch {
        device: String,
        offset: u64,
        block_size: u64,
    },
    #[error("invalid copy option: {0}")]
    InvalidOption(String),
    #[error("copy aborted: the {0} stopped")]
    Aborted(&'static str),
}

/// Live counters, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct Counters {
    pub read: AtomicU64,
    pub written: AtomicU64,
    pub zeroed: AtomicU64,
    pub skipped: AtomicU64,
    /// Bytes of the device covered by a read-back pass (read or known
    /// zero), what its progress shows.
    pub verified: AtomicU64,
    /// Bytes a read-back pass actually read.
    pub read_back: AtomicU64,
}

impl Counters {
    /// Bytes of the source that are fully handled on the destination.
    pub fn done(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
            + self.zeroed.load(Ordering::Relaxed)
            + self.skipped.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Copy,
    Verify,
}

/// A snapshot handed to the progress callback.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub phase: Phase,
    pub total: u64,
    pub done: u64,
    pub read: u64,
    pub written: u64,
    pub zeroed: u64,
    pub skipped: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct CopyReport {
    pub size: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub elapsed: Duration,
    /// The destination was known to read as zero, so zero ranges were skipped.
    pub destination_was_zero: bool,
    /// Checksum of the source (and, verified equal, of the destination).
    pub digest: Option<u128>,
    /// The source's block map, when one was asked for.
    pub block_map: Option<BlockMap>,
}

impl CopyReport {
    pub fn mb_per_s(&self) -> f64 {
        self.size as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Work the reader hands to the writer.
pub(crate) enum Work {
    /// Data read at `offset`; `runs` classify its grid blocks.
    Data {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
        runs: Vec<Run>,
    },
    /// A range the source's map says reads as zero.
    Hole { offset: u64, len: u64 },
}

/// A finished copy, with both devices handed back to the caller.
pub struct Copied {
    pub report: CopyReport,
    pub source: Box<dyn BlockDevice>,
    pub destination: Box<dyn BlockDevice>,
}

/// Copies `source` onto `destination` (the first `source.size()` bytes).
pub fn copy(
    source: Box<dyn BlockDevice>,
    mut destination: Box<dyn BlockDevice>,
    opts: &CopyOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Copied, CopyError> {
    validate(opts)?;
    let opts = &CopyOptions {
        block_size: fit_block_size(opts.block_size, opts.block_map.as_ref(), &*source),
        ..opts.clone()
    };
    let size = source.size();
    if destination.size() < size {
        return Err(CopyError::DestinationTooSmall {
            source_device: source.name().to_string(),
            source_size: size,
            destination: destination.name().to_string(),
            destination_size: destination.size(),
        });
    }
    let start = Instant::now();
    let destination_was_zero = opts.sparse != SparseMode::Never
        && (opts.destination_is_zero || reads_as_zero(&mut *destination, size)?);
    tracing::info!(
        source = source.name(),
        destination = destination.name(),
        size,
        destination_was_zero,
        block_size = opts.block_size,
        queue_depth = opts.queue_depth,
        "copy starting"
    );

    let counters = Arc::new(Counters::default());
    let (work_tx, work_rx) = mpsc::sync_channel::<Work>(opts.queue_depth * 2);
    let (pool_tx, pool_rx) = mpsc::channel::<AlignedBuf>();
    let reader_cfg = reader::ScanConfig::for_copy(opts, size);
    let writer_cfg = writer::WriteConfig {
        size,
        block_size: opts.block_size,
        destination_is_zero: destination_was_zero,
        sparse: opts.sparse,
    };
    let workers = Workers::watched_here();
    let (source, destination, scanned) = std::thread::scope(|s| {
        let wc = counters.clone();
        let writer = workers.spawn(s, move || {
            writer::run(destination, work_rx, pool_tx, writer_cfg, &wc)
        });
        let rc = counters.clone();
        let reader = workers.spawn(s, move || {
            let mut pool =
                reader::Pool::new(reader_cfg.pool_size, reader_cfg.block_size, Some(pool_rx));
            let mut source = source;
            let r = reader::scan(&mut *source, &reader_cfg, &mut pool, &rc, &mut |w| {
                work_tx.send(w).map_err(|_| CopyError::Aborted("writer"))?;
                Ok(None)
            });
            (source, r)
        });
        watch(&counters, Phase::Copy, size, start, progress, || {
            workers.all_done()
        });
        let (source, read_result) = reader.join().expect("reader thread panicked");
        let write_result = writer.join().expect("writer thread panicked");
        // The writer's error explains a reader that stopped because the writer
        // went away, so it comes first.
        let destination = write_result?;
        let scanned = read_result?;
        Ok::<_, CopyError>((source, destination, scanned))
    })?;

    let mut report = CopyReport {
        size,
        bytes_read: counters.read.load(Ordering::Relaxed),
        bytes_written: counters.written.load(Ordering::Relaxed),
        bytes_zeroed: counters.zeroed.load(Ordering::Relaxed),
        bytes_skipped: counters.skipped.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        destination_was_zero,
        digest: scanned.digest,
        block_map: scanned.block_map,
    };
    let (mut source, mut destination) = (source, destination);
    if opts.verify {
        if let Some(expected) = &report.block_map {
            // Compare maps. After an incremental copy only the blocks that
            // differ from the parent (and any the driver said changed) were
            // written: those are read back; the rest is the parent's data,
            // checked when the parent was made.
            let plan = opts.block_map.as_ref();
            let parent = plan.and_then(|m| m.parent.as_ref());
            let got = match parent {
                Some(parent) => {
                    let ranges =
                        written_blocks(parent, expected, plan.and_then(|m| m.only.as_deref()));
                    let base = Arc::new(expected.clone());
                    block_map_within(
                        &mut *destination,
                        opts,
                        base,
                        ranges,
                        &counters,
                        start,
                        progress,
                    )?
                }
                None => block_map(
                    &mut *destination,
                    opts,
                    expected.block_size,
                    size,
                    &counters,
                    start,
                    progress,
                )?,
            };
            if let Some(offset) = expected.first_difference(&got) {
                return Err(CopyError::MapMismatch {
                    device: destination.name().to_string(),
                    offset,
                    block_size: expected.block_size,
                });
            }
            report.elapsed = start.elapsed();
            return Ok(Copied {
                report,
                source,
                destination,
            });
        }
        let source_digest = report.digest.ok_or(CopyError::Aborted("checksum"))?;
        let dest_digest = checksum(&mut *destination, opts, size, &counters, start, progress)?;
        if dest_digest != source_digest {
            let offset = first_difference(&mut *source, &mut *destination, size, opts.block_size)?;
            return Err(CopyError::VerifyMismatch {
                source_device: source.name().to_string(),
                destination: destination.name().to_string(),
                offset: offset.unwrap_or(0),
                source_digest,
                destination_digest: dest_digest,
            });
        }
        report.elapsed = start.elapsed();
    }
    tracing::info!(
        bytes_read = report.bytes_read,
        bytes_written = report.bytes_written,
        bytes_zeroed = report.bytes_zeroed,
        bytes_skipped = report.bytes_skipped,
        elapsed_s = report.elapsed.as_secs_f64(),
        "copy finished"
    );
    Ok(Copied {
        report,
        source,
        destination,
    })
}

/// `block_size`, or less where `source` serves smaller reads as one
/// request ([`BlockDevice::max_read_size`]: an iSCSI LUN splits larger ones
/// at its MaxBurstLength). Still a multiple of the block map's block.
///
/// Why: a 2 MiB read from a LUN that takes 1 MiB per command is two
/// commands filling one buffer; copying a 1 GiB LUN to a loop device took
/// 0.79 s at 2 MiB x 32 and 0.64 s at 1 MiB x 32 (medians of 6
/// alternating runs; qemu-img convert: 0.78 s).
fn fit_block_size(block_size: u64, map: Option<&MapPlan>, source: &dyn BlockDevice) -> u64 {
    let unit = map.map_or(GRID, |m| m.block);
    match source.max_read_size() {
        Some(max) if max / unit * unit > 0 => block_size.min(max / unit * unit),
        _ => block_size,
    }
}

fn validate(opts: &CopyOptions) -> Result<(), CopyError> {
    if opts.block_size == 0 || opts.block_size % GRID != 0 || opts.block_size > (64 << 20) {
        return Err(CopyError::InvalidOption(format!(
            "block size {} must be a multiple of {GRID} bytes, at most 64 MiB",
            opts.block_size
        )));
    }
    if opts.queue_depth == 0 || opts.queue_depth > 1024 {
        return Err(CopyError::InvalidOption(format!(
            "queue depth {} must be 1 to 1024",
            opts.queue_depth
        )));
    }
    if let Some(m) = &opts.block_map {
        if m.block == 0 || m.block % GRID != 0 || opts.block_size % m.block != 0 {
            return Err(CopyError::InvalidOption(format!(
                "map block size {} must be a multiple of {GRID} that divides the block size {}",
                m.block, opts.block_size
            )));
        }
        let parent_fits = m.parent.as_ref().is_some_and(|p| p.block_size == m.block);
        if (m.only.is_some() || m.compare_parent) && !parent_fits {
            return Err(CopyError::InvalidOption(
                "an incremental copy needs a parent map of the same block size".into(),
            ));
        }
    }
    if opts.bwlimit == Some(0) {
        return Err(CopyError::InvalidOption(
            "bandwidth limit must be more than 0".into(),
        ));
    }
    Ok(())
}

/// Whether the first `size` bytes of the device are known to read as zero
/// (its allocation map shows no data there).
fn reads_as_zero(dev: &mut dyn BlockDevice, size: u64) -> Result<bool, DeviceError> {
    let Some(map) = dev.allocation_map() else {
        return Ok(false);
    };
    let mut pos = 0;
    while pos < size {
        let len = (1u64 << 30).min(size - pos);
        if map.extents(pos, len)?.iter().any(|e| e.data) {
            return Ok(false);
        }
        pos += len;
    }
    Ok(true)
}

/// The workers a [`watch`] waits for. Each holds a [`DoneToken`]; the last
/// one dropped wakes the watcher at once, so an operation does not end up
/// to one polling interval late.
pub(crate) struct Workers {
    left: Arc<AtomicU64>,
    watcher: std::thread::Thread,
}

/// Dropped when a worker ends, by returning, failing or panicking.
struct DoneToken {
    left: Arc<AtomicU64>,
    watcher: std::thread::Thread,
}

impl Workers {
    /// Workers watched by the calling thread.
    pub(crate) fn watched_here() -> Self {
        Self {
            left: Arc::new(AtomicU64::new(0)),
            watcher: std::thread::current(),
        }
    }

    /// Spawns `f` in `scope` as one of these workers.
    pub(crate) fn spawn<'scope, T: Send + 'scope>(
        &self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        f: impl FnOnce() -> T + Send + 'scope,
    ) -> std::thread::ScopedJoinHandle<'scope, T> {
        let done = self.token();
        scope.spawn(move || {
            let _done = done;
            f()
        })
    }

    fn token(&self) -> DoneToken {
        self.left.fetch_add(1, Ordering::AcqRel);
        DoneToken {
            left: self.left.clone(),
            watcher: self.watcher.clone(),
        }
    }

    pub(crate) fn all_done(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }
}

impl Drop for DoneToken {
    fn drop(&mut self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.watcher.unpark();
        }
    }
}

/// Calls `progress` every 200 ms until `finished`, and once at the end.
pub(crate) fn watch(
    counters: &Counters,
    phase: Phase,
    total: u64,
    start: Instant,
    progress: &mut dyn FnMut(&Progress),
    finished: impl Fn() -> bool,
) {
    let snapshot = || Progress {
        phase,
        total,
        done: match phase {
            Phase::Copy => counters.done(),
            Phase::Verify => counters.verified.load(Ordering::Relaxed),
        },
        read: counters.read.load(Ordering::Relaxed),
        written: counters.written.load(Ordering::Relaxed),
        zeroed: counters.zeroed.load(Ordering::Relaxed),
        skipped: counters.skipped.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    };
    let mut last = Instant::now();
    while !finished() {
        // Woken early by the last DoneToken (see Workers).
        std::thread::park_timeout(Duration::from_millis(20));
        if last.elapsed() >= Duration::from_millis(200) {
            progress(&snapshot());
            last = Instant::now();
        }
    }
    progress(&snapshot());
}

/// Reads the whole device and returns its checksum (see [`blocks::OrderedDigest`]).
pub fn checksum(
    dev: &mut dyn BlockDevice,
    opts: &CopyOptions,
    size: u64,
    counters: &Counters,
    start: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<u128, CopyError> {
    let mut cfg = reader::ScanConfig::for_copy(opts, size);
    cfg.hash = true;
    cfg.block_map = None;
    let scanned = read_back(dev, cfg, counters, start, progress)?;
    Ok(scanned.digest.expect("hashing scan yields a digest"))
}

/// What [`read_device`] found.
#[derive(Debug, Clone)]
pub struct ReadReport {
    pub size: u64,
    /// Bytes read (the rest were holes in the device's allocation map).
    pub bytes_read: u64,
    pub elapsed: Duration,
    /// The device's checksum (see [`blocks::OrderedDigest`]), if asked for.
    pub digest: Option<u128>,
}

impl ReadReport {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes_read as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Reads a whole device with `opts`' block size, queue depth and sparse
/// mode (holes skipped unless `SparseMode::Never`), for its checksum
/// (`hash`): a health check of a volume, and the read half of the copy
/// engine alone.
pub fn read_device(
    dev: &mut dyn BlockDevice,
    opts: &CopyOptions,
    hash: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ReadReport, CopyError> {
    validate(opts)?;
    let (size, start, counters) = (dev.size(), Instant::now(), Counters::default());
    let mut cfg = reader::ScanConfig::for_copy(opts, size);
    cfg.hash = hash;
    // Without a checksum nothing looks at the data: a pure read, into the
    // device's own memory where it can (no buffer per request).
    cfg.detect_zero = cfg.detect_zero && hash;
    cfg.block_map = None;
    cfg.discard = !hash && dev.discards_reads();
    let digest = read_back(dev, cfg, &counters, start, progress)?.digest;
    Ok(ReadReport {
        size,
        bytes_read: counters.read_back.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        digest,
    })
}

/// Reads the whole device and returns its block map.
pub fn block_map(
    dev: &mut dyn BlockDevice,
    opts: &CopyOptions,
    block: u64,
    size: u64,
    counters: &Counters,
    start: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BlockMap, CopyError> {
    let mut cfg = reader::ScanConfig::for_copy(opts, size);
    cfg.hash = false;
    cfg.block_map = Some(MapPlan {
        block,
        parent: None,
        compare_parent: false,
        only: None,
    });
    let scanned = read_back(dev, cfg, counters, start, progress)?;
    Ok(scanned.block_map.expect("a map scan yields a map"))
}

/// Reads back only `ranges` of the device and returns `base` with the
/// blocks in them replaced by what was read.
pub fn block_map_within(
    dev: &mut dyn BlockDevice,
    opts: &CopyOptions,
    base: Arc<BlockMap>,
    ranges: Vec<(u64, u64)>,
    counters: &Counters,
    start: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BlockMap, CopyError> {
    let mut cfg = reader::ScanConfig::for_copy(opts, base.size);
    cfg.hash = false;
    cfg.block_map = Some(MapPlan {
        block: base.block_size,
        parent: Some(base),
        compare_parent: false,
        only: Some(ranges),
    });
    let scanned = read_back(dev, cfg, counters, start, progress)?;
    Ok(scanned.block_map.expect("a map scan yields a map"))
}

/// The byte ranges an incremental copy wrote: blocks whose hash differs
/// from the parent's, and the ranges it was told to copy.
fn written_blocks(
    parent: &BlockMap,
    new: &BlockMap,
    only: Option<&[(u64, u64)]>,
) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = only.map(<[_]>::to_vec).unwrap_or_default();
    for (i, (a, b)) in parent.hashes.iter().zip(&new.hashes).enumerate() {
        if a != b {
            ranges.push((i as u64 * new.block_size, new.block_len(i)));
        }
    }
    ranges
}

/// Runs a read-only scan (progress counted as verification) in a thread
/// while the caller's thread reports progress.
fn read_back(
    dev: &mut dyn BlockDevice,
    mut cfg: reader::ScanConfig,
    counters: &Counters,
    start: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<reader::Scanned, CopyError> {
    cfg.counts_as_verify = true;
    cfg.block_size = fit_block_size(cfg.block_size, cfg.block_map.as_ref(), dev);
    let size = cfg.size;
    let mut pool = reader::Pool::new(cfg.pool_size, cfg.block_size, None);
    let workers = Workers::watched_here();
    std::thread::scope(|s| {
        let h = workers.spawn(s, || {
            // Nothing is written: every buffer goes straight back to the pool.
            reader::scan(dev, &cfg, &mut pool, counters, &mut |w| {
                Ok(match w {
                    Work::Data { buf, .. } => Some(buf),
                    Work::Hole { .. } => None,
                })
            })
        });
        watch(counters, Phase::Verify, size, start, progress, || {
            workers.all_done()
        });
        h.join().expect("read-back thread panicked")
    })
}

/// The first offset where the two devices differ over `[0, size)`, read
/// side by side (only run after a checksum mismatch).
fn first_difference(
    a: &mut dyn BlockDevice,
    b: &mut dyn BlockDevice,
    size: u64,
    block_size: u64,
) -> Result<Option<u64>, CopyError> {
    let mut bufs = (
        AlignedBuf::new(block_size as usize),
        AlignedBuf::new(block_size as usize),
    );
    let mut pos = 0;
    while pos < size {
        let len = block_size.min(size - pos) as usize;
        let (ba, bb) = (
            read_sync(a, pos, len, bufs.0)?,
            read_sync(b, pos, len, bufs.1)?,
        );
        if let Some(i) = ba.as_slice()[..len]
            .iter()
            .zip(&bb.as_slice()[..len])
            .position(|(x, y)| x != y)
        {
            return Ok(Some(pos + i as u64));
        }
        bufs = (ba, bb);
        pos += len as u64;
    }
    Ok(None)
}

fn read_sync(
    dev: &mut dyn BlockDevice,
    offset: u64,
    len: usize,
    buf: AlignedBuf,
) -> Result<AlignedBuf, CopyError> {
    dev.submit(0, IoOp::Read { offset, len, buf })?;
    let mut out = Vec::new();
    dev.reap(1, &mut out)?;
    let c = out.pop().ok_or(CopyError::Aborted("device"))?;
    let n = c.result?;
    let Returned::Read(buf) = c.buf else {
        unreachable!("a read returns its buffer")
    };
    if n < len as u64 {
        return Err(CopyError::SourceShrank {
            device: dev.name().to_string(),
            offset,
            expected: len as u64,
            got: n,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests;
