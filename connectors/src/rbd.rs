//! The RBD connector: Ceph RBD images through userspace librbd.
//!
//! librbd is loaded at run time (see [`ffi`]), so volback builds and runs
//! without Ceph; only opening an `rbd:` device needs it. Requests go out as
//! librbd aio calls. Each in-flight request sits in a slab slot together
//! with its buffer and its `rbd_completion_t`; librbd's completion callback
//! (on one of its own threads) only pushes the slot number onto a queue,
//! and `reap` does the rest on the caller's thread. A slot's buffer is
//! therefore neither freed nor moved until librbd has called back.

mod cluster;
mod ffi;
mod spec;

use std::ffi::c_void;
use std::io;
use std::ptr;
use std::sync::{Arc, Condvar, Mutex};

use tracing::{debug, warn};

pub use cluster::{ClusterConfig, Image, IoCtx, Rados, RbdError, SnapInfo};
pub use ffi::{
    RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_LAYERING, RBD_FEATURE_OBJECT_MAP,
};
pub use spec::{RbdSpec, SpecError};

use crate::device::{AllocationMap, BlockDevice, Completion, Extent, IoOp, Returned, ZeroMode};
use crate::{DeviceError, DiscardTarget, ErrorKind};

/// An RBD image (or snapshot) attached as a block device.
pub struct RbdDevice {
    name: String,
    image: Image,
    size: u64,
    writable: bool,
    /// Ask diffs for whole objects (see [`RbdDevice::extents`]).
    whole_object_map: bool,
    slab: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    done: Arc<DoneQueue>,
    /// One callback argument per slot, at a fixed heap address for librbd.
    args: Box<[SlotArg]>,
    /// Where `IoOp::ReadDiscard` data lands.
    discard: DiscardTarget,
}

// SAFETY: the raw completions in the slab are owned by the device and only
// touched from the thread that holds it; librbd handles are thread-safe.
unsafe impl Send for RbdDevice {}

struct InFlight {
    tag: u64,
    op: IoOp,
    comp: ffi::rbd_completion_t,
}

/// Slots whose requests librbd has finished, filled by its threads.
#[derive(Default)]
struct DoneQueue {
    slots: Mutex<Vec<usize>>,
    cond: Condvar,
}

struct SlotArg {
    done: Arc<DoneQueue>,
    slot: usize,
}

/// librbd's completion callback: runs on a librbd thread, must not block
/// for long or panic.
unsafe extern "C" fn on_complete(_c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: arg points into the device's `args`, which outlives every
    // request (Drop waits for all of them).
    let a = unsafe { &*(arg as *const SlotArg) };
    // Take our own reference first: once the slot is pushed, the device may
    // finish and free `args` before this function returns.
    let done = a.done.clone();
    done.slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(a.slot);
    done.cond.notify_one();
}

impl RbdDevice {
    /// Connects to the spec's cluster and opens the image. A snapshot is
    /// always opened read-only, whatever `writable` says.
    pub fn open(spec: &RbdSpec, writable: bool, queue_depth: usize) -> Result<Self, DeviceError> {
        let name = spec.image_spec();
        let err = |e: RbdError| rbd_error(ErrorKind::Open, &name, e);
        let rados = Rados::connect(&spec.cluster).map_err(err)?;
        let ioctx = Arc::new(
            rados
                .ioctx(&spec.pool, spec.namespace.as_deref())
                .map_err(err)?,
        );
        let image = ioctx
            .open_image(&spec.image, spec.snap.as_deref(), !writable)
            .map_err(err)?;
        Self::from_image(image, name, queue_depth)
    }

    /// Wraps an image that is already open (writable unless it was opened
    /// read-only or at a snapshot).
    pub fn from_image(image: Image, name: String, queue_depth: usize) -> Result<Self, DeviceError> {
        let err = |e: RbdError| rbd_error(ErrorKind::Open, &name, e);
        let size = image.size().map_err(err)?;
        let features = image.features().map_err(err)?;
        let depth = queue_depth.clamp(1, 4096);
        let done = Arc::new(DoneQueue::default());
        let args = (0..depth)
            .map(|slot| SlotArg {
                done: done.clone(),
                slot,
            })
            .collect();
        let writable = !image.is_read_only();
        debug!(device = %name, size, features, writable, depth, "opened rbd device");
        Ok(Self {
            image,
            size,
            writable,
            whole_object_map: features & ffi::RBD_FEATURE_FAST_DIFF != 0,
            slab: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            in_flight: 0,
            done,
            args,
            name,
            discard: DiscardTarget::default(),
        })
    }

    /// The open image, for snapshot and metadata calls on the same handle.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Hands one request to librbd; on error the slot is free again.
    fn issue(&mut self, slot: usize) -> Result<(), DeviceError> {
        let api = self.image.api();
        let h = self.image.handle();
        let mut comp = ptr::null_mut();
        let arg = &self.args[slot] as *const SlotArg as *mut c_void;
        // SAFETY: arg stays valid until the callback has run (see Drop).
        let r = unsafe { (api.rbd.rbd_aio_create_completion)(arg, on_complete, &mut comp) };
        let entry = self.slab[slot].as_mut().expect("slot in use");
        let (kind, off, len) = describe(&entry.op);
        if r < 0 {
            return Err(DeviceError::from_errno(kind, &self.name, -r).at(off, len));
        }
        entry.comp = comp;
        // SAFETY: buffers are owned by the slab entry and stay put until the
        // completion is reaped; lengths were checked against them in submit.
        // Discarded reads share `discard`, kept until none is in flight.
        let r = unsafe {
            match &mut entry.op {
                IoOp::Read { offset, len, buf } => {
                    (api.rbd.rbd_aio_read)(h, *offset, *len, buf.as_mut_ptr().cast(), comp)
                }
                IoOp::ReadDiscard { offset, len } => {
                    let ptr = self.discard.ptr(*len);
                    (api.rbd.rbd_aio_read)(h, *offset, *len, ptr.cast(), comp)
                }
                IoOp::Write {
                    offset,
                    buf,
                    start,
                    len,
                } => {
                    (api.rbd.rbd_aio_write)(h, *offset, *len, buf.as_ptr().add(*start).cast(), comp)
                }
                // Not rbd_aio_discard: it skips the parts of a range that are
                // not aligned to rbd_discard_granularity_bytes (64 KiB), so
                // they would keep their old data. write_zeroes zeroes exactly,
                // and without THICK_PROVISION deallocates whole objects.
                IoOp::WriteZeroes { offset, len, mode } => {
                    let flags = match mode {
                        ZeroMode::Deallocate => 0,
                        ZeroMode::KeepAllocated => ffi::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
                    };
                    (api.rbd.rbd_aio_write_zeroes)(h, *offset, *len as usize, comp, flags, 0)
                }
                IoOp::Flush => (api.rbd.rbd_aio_flush)(h, comp),
            }
        };
        if r < 0 {
            // SAFETY: librbd refused the request, so it will not call back.
            unsafe { (api.rbd.rbd_aio_release)(comp) };
            return Err(DeviceError::from_errno(kind, &self.name, -r).at(off, len));
        }
        Ok(())
    }

    /// Turns a slot librbd has finished into a completion and frees it.
    fn finish(&mut self, slot: usize) -> Completion {
        let entry = self.slab[slot].take().expect("completion for a free slot");
        self.free_slots.push(slot);
        self.in_flight -= 1;
        if self.in_flight == 0 {
            self.discard.idle();
        }
        let api = self.image.api();
        // SAFETY: the callback has run, so the value is final; we own the
        // completion and release it exactly once.
        let r = unsafe { (api.rbd.rbd_aio_get_return_value)(entry.comp) };
        unsafe { (api.rbd.rbd_aio_release)(entry.comp) };
        let (kind, off, len) = describe(&entry.op);
        let result = if r < 0 {
            let e = DeviceError::from_errno(kind, &self.name, -r as i32);
            Err(if kind == ErrorKind::Flush {
                e
            } else {
                e.at(off, len)
            })
        } else if kind == ErrorKind::Read {
            // Bytes read: all of them, since requests end within the image.
            Ok(r as u64)
        } else {
            // librbd reports 0 for writes, zeroing and flushes.
            Ok(len)
        };
        let buf = match entry.op {
            IoOp::Read { buf, .. } => Returned::Read(buf),
            IoOp::Write { buf, .. } => Returned::Write(buf),
            _ => Returned::None,
        };
        Completion {
            tag: entry.tag,
            result,
            buf,
        }
    }

    /// Waits until librbd has finished something (or `wait` is false), and
    /// takes what it has finished.
    fn take_done(&self, wait: bool) -> Vec<usize> {
        let mut q = self.done.slots.lock().unwrap_or_else(|e| e.into_inner());
        while wait && q.is_empty() {
            q = self.done.cond.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut *q)
    }
}

/// Kind, offset and length of a request, for its errors.
fn describe(op: &IoOp) -> (ErrorKind, u64, u64) {
    match op {
        IoOp::Read { offset, len, .. } | IoOp::ReadDiscard { offset, len } => {
            (ErrorKind::Read, *offset, *len as u64)
        }
        IoOp::Write { offset, len, .. } => (ErrorKind::Write, *offset, *len as u64),
        IoOp::WriteZeroes { offset, len, .. } => (ErrorKind::WriteZeroes, *offset, *len),
        IoOp::Flush => (ErrorKind::Flush, 0, 0),
    }
}

/// A wrapper error as a device error, keeping its errno's meaning.
fn rbd_error(kind: ErrorKind, device: &str, e: RbdError) -> DeviceError {
    let io_kind = e.errno().map_or(io::ErrorKind::Other, |n| {
        io::Error::from_raw_os_error(n).kind()
    });
    let kind = match e {
        RbdError::Invalid { .. } => ErrorKind::InvalidRequest,
        _ => kind,
    };
    DeviceError::new(kind, device, io::Error::new(io_kind, e))
}

impl BlockDevice for RbdDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        512
    }

    fn max_in_flight(&self) -> usize {
        self.slab.len()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), DeviceError> {
        let (_, offset, len) = describe(&op);
        let bad = |msg: String| Err(DeviceError::invalid(&self.name, msg).at(offset, len));
        match &op {
            IoOp::Read { len, buf, .. } if *len > buf.len() => {
                return bad("read longer than its buffer".into())
            }
            IoOp::Write {
                buf, start, len, ..
            } if start + len > buf.len() => return bad("write past the end of its buffer".into()),
            IoOp::Write { .. } | IoOp::WriteZeroes { .. } if !self.writable => {
                return bad(format!(
                    "{} is open read-only (a snapshot, or opened for reading)",
                    self.name
                ))
            }
            _ => {}
        }
        // librbd would clip a write at the end of the image and still
        // report success; refuse it instead.
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return bad(format!(
                "request past the end of the device (size {})",
                self.size
            ));
        }
        let Some(slot) = self.free_slots.pop() else {
            return bad("queue full".into());
        };
        self.slab[slot] = Some(InFlight {
            tag,
            op,
            comp: ptr::null_mut(),
        });
        if let Err(e) = self.issue(slot) {
            self.slab[slot] = None;
            self.free_slots.push(slot);
            return Err(e);
        }
        self.in_flight += 1;
        Ok(())
    }

    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        let min = min.min(self.in_flight);
        let mut got = 0;
        loop {
            for slot in self.take_done(got < min) {
                out.push(self.finish(slot));
                got += 1;
            }
            if got >= min {
                return Ok(());
            }
        }
    }

    fn supports_write_zeroes(&self) -> bool {
        self.writable
    }

    fn discards_reads(&self) -> bool {
        true
    }

    fn allocation_map(&mut self) -> Option<&mut dyn AllocationMap> {
        Some(self)
    }
}

impl AllocationMap for RbdDevice {
    /// From `rbd_diff_iterate2` since the image's creation, parents
    /// included (a clone reads its parent's data through). When the image
    /// has fast-diff, whole objects are asked for: librbd then answers from
    /// the object map in a few requests, where exact extents would cost a
    /// request per object; the copy still finds zeroes inside the data it
    /// reads. Without fast-diff librbd asks every object either way, so the
    /// exact extents come at no extra cost.
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let end = crate::device::map_query_end(&self.name, self.size, offset, len)?;
        let mut data: Vec<(u64, u64)> = Vec::new();
        self.image
            .diff_iterate2(
                None,
                offset,
                len,
                true,
                self.whole_object_map,
                &mut |off, n, exists| {
                    if exists {
                        data.push((off, off + n));
                    }
                },
            )
            .map_err(|e| rbd_error(ErrorKind::AllocationMap, &self.name, e).at(offset, len))?;
        data.sort_unstable();
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |start: u64, stop: u64, is_data: bool| {
            let (start, stop) = (start.max(offset), stop.min(end));
            if stop <= start {
                return;
            }
            match out.last_mut() {
                Some(last) if last.data == is_data && last.end() >= start => {
                    last.len = last.len.max(stop - last.offset)
                }
                _ => out.push(Extent {
                    offset: start,
                    len: stop - start,
                    data: is_data,
                }),
            }
        };
        let mut pos = offset;
        for (s, e) in data {
            push(pos, s, false);
            push(s, e, true);
            pos = pos.max(e);
        }
        push(pos, end, false);
        Ok(out)
    }
}

impl Drop for RbdDevice {
    fn drop(&mut self) {
        // librbd may still read or write the buffers of requests in flight,
        // and will call back into `args`: wait for every one of them.
        if self.in_flight > 0 {
            debug!(device = %self.name, in_flight = self.in_flight, "waiting for in-flight requests");
        }
        while self.in_flight > 0 {
            for slot in self.take_done(true) {
                if let Err(e) = self.finish(slot).result {
                    warn!(device = %self.name, error = %e, "request failed while closing");
                }
            }
        }
    }
}
