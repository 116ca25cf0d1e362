//! The rbd driver's fast path: Ceph to Ceph by RBD diffs, as Cinder's Ceph
//! backup driver does with `rbd export-diff | rbd import-diff`, but in
//! process and without a stream in between.
//!
//! It takes over when the destination is an RBD image (another pool, or
//! another cluster: it opens the destination from its connection info).
//! `rbd_diff_iterate2` on the source snapshot, byte-exact, says what to
//! move: against no snapshot for a full backup (the allocated extents),
//! against the previous backup's source snapshot for an incremental (what
//! changed, discards included). Those extents, rounded out to the engine's
//! map blocks, are read from the snapshot and written to the destination by
//! librbd aio, a reader and a writer thread keeping `queue_depth` requests
//! in flight each. A block that reads as zero is not written: on a new
//! image it is skipped, otherwise it is zeroed with `rbd_aio_write_zeroes`
//! (which deallocates whole objects).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use tracing::{debug, info};
use volback_connectors::rbd::{RbdDevice, RbdSpec};
use volback_connectors::{
    is_zero, AlignedBuf, BlockDevice, Completion, DeviceError, IoOp, Returned, ZeroMode,
};

use super::{volume_image, RbdDriver};
use crate::fast_path::{round_out, FastPath, TransferObserver, TransferReport, TransferRequest};
use crate::{DriverError, DriverErrorKind, Result};

/// What the catalog records as the change-tracking method.
pub const METHOD: &str = "rbd-diff";

impl FastPath for RbdDriver {
    fn transfer(
        &self,
        req: &TransferRequest<'_>,
        observer: &mut dyn TransferObserver,
    ) -> Result<Option<TransferReport>> {
        if req.destination.connector != "rbd" {
            return Ok(None);
        }
        let pool = self.pool(req.pool)?;
        pool.check_id("snapshot", req.snapshot)?;
        let (volume, snap) = pool.require_snapshot(req.snapshot)?;
        let since = match req.since {
            None => None,
            Some(s) => {
                pool.check_id("snapshot", s)?;
                match pool.find_snapshot(s)? {
                    Some((v, old)) if v == volume && old.size == snap.size => Some(old.name),
                    // Not a diff base for this snapshot: the generic path
                    // compares block hashes instead.
                    _ => return Ok(None),
                }
            }
        };
        let bad_request = |m: String| {
            DriverError::new(
                DriverErrorKind::InvalidArgument,
                &pool.label,
                "fast path",
                m,
            )
        };
        if req.granularity == 0
            || req.chunk_size == 0
            || req.chunk_size % req.granularity != 0
            || req.queue_depth == 0
        {
            return Err(bad_request(format!(
                "granularity {} must divide the chunk size {} (queue depth {})",
                req.granularity, req.chunk_size, req.queue_depth
            )));
        }
        let dest_spec = RbdSpec::from_properties(&req.destination.properties)
            .map_err(|e| bad_request(e.to_string()))?;
        if req.destination.read_only || dest_spec.snap.is_some() {
            return Err(bad_request(format!(
                "destination {} is read-only",
                dest_spec.image_spec()
            )));
        }

        let object = format!("snapshot {}", req.snapshot);
        let image = pool
            .ioctx
            .open_image(&volume_image(&volume), Some(&snap.name), true)
            .map_err(|e| pool.rbd_err(&object, "opening the snapshot", e))?;
        let mut extents = Vec::new();
        image
            .diff_iterate2(
                since.as_deref(),
                0,
                snap.size,
                true,
                false,
                &mut |off, len, _exists| extents.push((off, len)),
            )
            .map_err(|e| pool.rbd_err(&object, "diffing", e))?;
        let ranges = round_out(&extents, req.granularity, snap.size);
        let name = format!("{}:{}@{}", pool.ceph_pool, volume_image(&volume), snap.name);
        let device_err = |e: DeviceError| {
            let kind = match e.source.kind() {
                std::io::ErrorKind::NotFound => DriverErrorKind::NotFound,
                _ => DriverErrorKind::Io,
            };
            DriverError::new(kind, &pool.label, &object, format!("fast path copy: {e}"))
        };
        let source = RbdDevice::from_image(image, name, req.queue_depth).map_err(device_err)?;
        let destination = RbdDevice::open(&dest_spec, true, req.queue_depth).map_err(device_err)?;
        if destination.size() < snap.size {
            return Err(bad_request(format!(
                "destination {} ({} bytes) is smaller than the snapshot ({} bytes)",
                destination.name(),
                destination.size(),
                snap.size
            )));
        }
        info!(
            snapshot = req.snapshot,
            since = ?req.since,
            destination = destination.name(),
            extents = extents.len(),
            ranges = ranges.len(),
            bytes = ranges.iter().map(|r| r.1).sum::<u64>(),
            "rbd fast path: copying diff extents"
        );
        let moved = pump(source, destination, &ranges, req, observer).map_err(device_err)?;
        debug!(?moved, "rbd fast path done");
        Ok(Some(TransferReport {
            method: METHOD.to_string(),
            bytes_read: moved.read,
            bytes_written: moved.written,
            bytes_zeroed: moved.zeroed,
            touched: ranges,
        }))
    }
}

/// Byte counts of one transfer.
#[derive(Debug, Default)]
struct Moved {
    read: u64,
    written: u64,
    zeroed: u64,
}

/// A block read from the source, on its way to the destination.
struct Chunk {
    offset: u64,
    len: usize,
    buf: AlignedBuf,
}

/// Copies `ranges` from `source` to `destination`: the calling thread reads,
/// a second thread writes, and buffers circulate between them (at most
/// `queue_depth` of `chunk_size` bytes).
fn pump(
    mut source: RbdDevice,
    mut destination: RbdDevice,
    ranges: &[(u64, u64)],
    req: &TransferRequest<'_>,
    observer: &mut dyn TransferObserver,
) -> std::result::Result<Moved, DeviceError> {
    let (work_tx, work_rx) = mpsc::sync_channel::<Chunk>(req.queue_depth);
    let (pool_tx, pool_rx) = mpsc::channel::<AlignedBuf>();
    let read = AtomicU64::new(0);
    let zero_destination = req.destination_is_zero;
    std::thread::scope(|s| {
        let writer = s.spawn(move || {
            write_side(
                &mut destination,
                work_rx,
                pool_tx,
                zero_destination,
                observer,
            )
        });
        let read_result = read_side(&mut source, ranges, req, work_tx, pool_rx, &read);
        let write_result = writer.join().expect("fast path writer panicked");
        // The writer's error explains a reader that stopped because the
        // writer went away, so it comes first.
        let (written, zeroed) = write_result?;
        read_result?;
        Ok(Moved {
            read: read.load(Ordering::Relaxed),
            written,
            zeroed,
        })
    })
}

fn read_side(
    source: &mut RbdDevice,
    ranges: &[(u64, u64)],
    req: &TransferRequest<'_>,
    work: mpsc::SyncSender<Chunk>,
    returned: mpsc::Receiver<AlignedBuf>,
    read: &AtomicU64,
) -> std::result::Result<(), DeviceError> {
    let mut allocated = 0;
    let mut free: Vec<AlignedBuf> = Vec::new();
    let mut done = Vec::new();
    let chunks = ranges.iter().flat_map(|&(start, len)| {
        (start..start + len)
            .step_by(req.chunk_size as usize)
            .map(move |off| (off, req.chunk_size.min(start + len - off)))
    });
    for (offset, len) in chunks {
        let buf = loop {
            free.extend(returned.try_iter());
            if let Some(b) = free.pop() {
                break b;
            }
            if allocated < req.queue_depth {
                allocated += 1;
                break AlignedBuf::new(req.chunk_size as usize);
            }
            if source.in_flight() > 0 {
                source.reap(1, &mut done)?;
                forward(&mut done, &work, read, source.name())?;
            } else {
                // Every buffer is with the writer: wait for one back.
                match returned.recv() {
                    Ok(b) => free.push(b),
                    Err(_) => return Err(writer_gone(source.name())),
                }
            }
        };
        let len = len as usize;
        source.submit(offset, IoOp::Read { offset, len, buf })?;
    }
    while source.in_flight() > 0 {
        source.reap(1, &mut done)?;
        forward(&mut done, &work, read, source.name())?;
    }
    Ok(())
}

/// Hands finished reads to the writer.
fn forward(
    done: &mut Vec<Completion>,
    work: &mpsc::SyncSender<Chunk>,
    read: &AtomicU64,
    device: &str,
) -> std::result::Result<(), DeviceError> {
    for c in done.drain(..) {
        let n = c.result?;
        let Returned::Read(buf) = c.buf else {
            unreachable!("a read returns its buffer")
        };
        read.fetch_add(n, Ordering::Relaxed);
        let chunk = Chunk {
            offset: c.tag,
            len: n as usize,
            buf,
        };
        work.send(chunk).map_err(|_| writer_gone(device))?;
    }
    Ok(())
}

fn writer_gone(device: &str) -> DeviceError {
    DeviceError::new(
        volback_connectors::ErrorKind::Read,
        device,
        std::io::Error::other("the fast path's writer stopped"),
    )
}

/// Writes what the reader sends, returning each buffer once its write has
/// completed. Returns bytes written and bytes zeroed.
fn write_side(
    destination: &mut RbdDevice,
    work: mpsc::Receiver<Chunk>,
    returned: mpsc::Sender<AlignedBuf>,
    zero_destination: bool,
    observer: &mut dyn TransferObserver,
) -> std::result::Result<(u64, u64), DeviceError> {
    let (mut written, mut zeroed) = (0u64, 0u64);
    let mut done = Vec::new();
    let settle = |done: &mut Vec<Completion>| -> std::result::Result<(), DeviceError> {
        for c in done.drain(..) {
            c.result?;
            if let Returned::Write(buf) = c.buf {
                // The reader may be gone (it failed); the buffer just drops.
                let _ = returned.send(Arc::try_unwrap(buf).expect("a finished write's buffer"));
            }
        }
        Ok(())
    };
    loop {
        let chunk = match work.try_recv() {
            Ok(c) => c,
            Err(mpsc::TryRecvError::Empty) if destination.in_flight() > 0 => {
                // Reap while waiting: the reader may need these buffers.
                destination.reap(1, &mut done)?;
                settle(&mut done)?;
                continue;
            }
            Err(mpsc::TryRecvError::Empty) => match work.recv() {
                Ok(c) => c,
                Err(_) => break,
            },
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        while destination.in_flight() >= destination.max_in_flight() {
            destination.reap(1, &mut done)?;
            settle(&mut done)?;
        }
        let Chunk { offset, len, buf } = chunk;
        if is_zero(&buf.as_slice()[..len]) {
            observer.zeroes(offset, len as u64);
            if !zero_destination {
                let mode = ZeroMode::Deallocate;
                let op = IoOp::WriteZeroes {
                    offset,
                    len: len as u64,
                    mode,
                };
                destination.submit(offset, op)?;
                zeroed += len as u64;
            }
            let _ = returned.send(buf);
            continue;
        }
        let buf = Arc::new(buf);
        let op = IoOp::Write {
            offset,
            buf: buf.clone(),
            start: 0,
            len,
        };
        destination.submit(offset, op)?;
        // The observer (the engine hashing the block) works while librbd
        // writes: both only read the buffer. Our reference goes before the
        // next reap, so the completion gets the buffer back whole.
        observer.data(offset, &buf.as_slice()[..len]);
        drop(buf);
        written += len as u64;
    }
    while destination.in_flight() > 0 {
        destination.reap(1, &mut done)?;
        settle(&mut done)?;
    }
    destination.submit(u64::MAX, IoOp::Flush)?;
    destination.reap(1, &mut done)?;
    settle(&mut done)?;
    Ok((written, zeroed))
}
