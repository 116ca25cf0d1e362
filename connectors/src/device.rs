use std::sync::Arc;

use crate::{AlignedBuf, DeviceError};

/// How a write-zeroes request should leave the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Zero the range, keeping it allocated where the device can.
    KeepAllocated,
    /// Zero the range and give the space back (punch hole / unmap).
    Deallocate,
}

/// One I/O request. Buffers move into the request and come back in the
/// [`Completion`], so the device owns them for exactly as long as the
/// hardware (or the kernel, or the network) may touch them.
#[derive(Debug)]
pub enum IoOp {
    /// Read `len` bytes at `offset` into `buf[..len]`.
    Read {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
    /// Read `len` bytes at `offset` and drop them: for scans that only need
    /// to know the data can be read (a health check without a checksum).
    /// The device reads them as for `Read`, so errors and short reads show,
    /// into memory of its own that every such read shares, as `dd` and
    /// libiscsi's `iscsi-perf` do: no buffer per request, and the memory
    /// the data lands in stays in cache. Only for devices whose
    /// [`BlockDevice::discards_reads`] is true.
    ReadDiscard { offset: u64, len: usize },
    /// Write `buf[start..start + len]` at `offset`. The buffer is shared so
    /// one read buffer can feed several writes (data runs around zero runs).
    Write {
        offset: u64,
        buf: Arc<AlignedBuf>,
        start: usize,
        len: usize,
    },
    /// Make `[offset, offset + len)` read as zeroes.
    WriteZeroes {
        offset: u64,
        len: u64,
        mode: ZeroMode,
    },
    /// Make everything completed so far durable.
    Flush,
}

/// What a device gives back with a completion.
#[derive(Debug)]
pub enum Returned {
    None,
    Read(AlignedBuf),
    Write(Arc<AlignedBuf>),
}

/// The outcome of one request, identified by the caller's tag.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    /// Bytes transferred (reads: may be short only at the end of the device).
    pub result: Result<u64, DeviceError>,
    pub buf: Returned,
}

/// A contiguous range that either holds data or is a hole (reads as zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The end of an allocation-map query of `[offset, offset + len)` on a
/// device of `size` bytes, or the error for a query past its end.
pub(crate) fn map_query_end(
    device: &str,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<u64, DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(
            DeviceError::invalid(device, "allocation map query past the end of the device")
                .at(offset, len),
        ),
    }
}

/// Capability: the device can say which ranges hold data.
pub trait AllocationMap {
    /// Extents covering exactly `[offset, offset + len)`, in order. A range
    /// reported as a hole must read as zeroes; a range reported as data may
    /// still contain zeroes.
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError>;
}

/// An attached volume: a queue of positional requests.
///
/// `submit` queues a request (it may not be sent until the next `reap`);
/// `reap` sends what is queued and collects completions, waiting until at
/// least `min` have arrived. A device accepts at most `max_in_flight`
/// requests at a time; the caller keeps within it. Dropping a device waits
/// for every request still in flight, so buffers are never freed early.
pub trait BlockDevice: Send {
    /// Name used in logs and errors (never contains secrets).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Smallest addressable unit in bytes (512 or 4096 for real devices).
    fn logical_block_size(&self) -> u32;
    /// How many requests may be in flight at once.
    fn max_in_flight(&self) -> usize;
    /// How many requests are in flight now.
    fn in_flight(&self) -> usize;
    /// Queues one request.
    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), DeviceError>;
    /// Sends queued requests and appends completions to `out`, waiting for at
    /// least `min` of them (capped at the number in flight).
    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<(), DeviceError>;
    /// Whether `IoOp::WriteZeroes` is worth trying (it may still fail with
    /// `ErrorKind::Unsupported` for a mode, and the caller then writes zeroes).
    fn supports_write_zeroes(&self) -> bool {
        false
    }
    /// The largest read the device serves as one request, if it splits
    /// larger ones (an iSCSI LUN: its negotiated MaxBurstLength or the
    /// LUN's maximum transfer). The copy engine reads no more at a time.
    fn max_read_size(&self) -> Option<u64> {
        None
    }
    /// Whether `IoOp::ReadDiscard` is supported.
    fn discards_reads(&self) -> bool {
        false
    }
    /// The allocation-map capability, if this device has one.
    fn allocation_map(&mut self) -> Option<&mut dyn AllocationMap> {
        None
    }
}
