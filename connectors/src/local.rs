//! The local connector: regular files and block devices (loop devices
//! included), driven through io_uring.
//!
//! Each device owns one ring. Requests live in a slab indexed by the ring's
//! `user_data`, together with their buffers, until the kernel posts their
//! completion; the ring's completion queue is twice the slab size, so it can
//! never overflow. Requests that are aligned go to an O_DIRECT descriptor;
//! the rest (the unaligned tail of a file, say) go to a buffered descriptor
//! of the same file. Both address the same inode, so one fsync flushes both.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};
use tracing::{debug, warn};

use crate::device::{AllocationMap, BlockDevice, Completion, Extent, IoOp, Returned, ZeroMode};
use crate::{DeviceError, DiscardTarget, ErrorKind, BUFFER_ALIGN};

/// Whether to open with O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// Use O_DIRECT when the device accepts it, buffered I/O otherwise.
    #[default]
    Auto,
    /// Require O_DIRECT; opening fails if the device refuses it.
    Require,
    /// Never use O_DIRECT.
    Off,
}

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub writable: bool,
    pub direct: DirectIo,
    /// Requests in flight at once (the slab size).
    pub queue_depth: usize,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            writable: false,
            direct: DirectIo::Auto,
            queue_depth: 16,
        }
    }
}

/// A regular file or a block device attached locally.
pub struct LocalDevice {
    name: String,
    /// O_DIRECT descriptor when `direct` is true, else the same file buffered.
    direct_fd: OwnedFd,
    buffered_fd: OwnedFd,
    direct: bool,
    /// Offsets and lengths that are multiples of this go to `direct_fd`. At
    /// least a page, so a buffered tail never shares a page with direct I/O.
    direct_align: u64,
    size: u64,
    logical_block_size: u32,
    block_device: bool,
    map: Option<FileMap>,
    ring: IoUring,
    slab: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Completions decided without the kernel (nothing yet, kept for symmetry
    /// with network connectors that fail requests at submit time).
    ready: Vec<Completion>,
    /// Where `IoOp::ReadDiscard` data lands.
    discard: DiscardTarget,
}

#[derive(Debug)]
struct InFlight {
    tag: u64,
    op: IoOp,
    /// Bytes already transferred (short reads and writes are resubmitted).
    done: u64,
}

const LOOP_MAJOR: u32 = 7;

impl LocalDevice {
    /// Opens a regular file or a block device.
    pub fn open(path: &Path, opts: &LocalOptions) -> Result<Self, DeviceError> {
        let name = path.display().to_string();
        let open_err = |e: io::Error| DeviceError::new(ErrorKind::Open, name.clone(), e);
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(DeviceError::invalid(
                &name,
                "not a regular file or a block device",
            ));
        }
        let mut flags = libc::O_CLOEXEC;
        flags |= if opts.writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        // A block device we write to is opened exclusively: the kernel then
        // refuses if it is mounted or claimed by someone else.
        let excl = if block_device && opts.writable {
            libc::O_EXCL
        } else {
            0
        };
        let buffered_fd = open_fd(path, flags | excl).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                DeviceError::new(
                    ErrorKind::Open,
                    name.clone(),
                    io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        "device is busy (mounted or in use)",
                    ),
                )
            } else {
                open_err(e)
            }
        })?;
        let (direct_fd, direct) = match opts.direct {
            DirectIo::Off => (dup_fd(&buffered_fd).map_err(open_err)?, false),
            DirectIo::Auto | DirectIo::Require => match open_fd(path, flags | libc::O_DIRECT) {
                Ok(fd) => (fd, true),
                Err(e)
                    if opts.direct == DirectIo::Auto && e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    warn!(device = %name, "O_DIRECT not supported, using buffered I/O");
                    (dup_fd(&buffered_fd).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            },
        };

        let (size, logical_block_size, dio_align) = if block_device {
            let size = ioctl_u64(&buffered_fd, BLKGETSIZE64).map_err(open_err)?;
            let lbs = ioctl_int(&buffered_fd, BLKSSZGET).map_err(open_err)? as u32;
            (size, lbs, u64::from(lbs))
        } else {
            let (off_align, _mem_align) = dio_alignment(&buffered_fd);
            let lbs = if off_align > 0 { off_align } else { 512 };
            (meta.len(), lbs, u64::from(lbs))
        };
        let direct_align = dio_align.max(BUFFER_ALIGN as u64);

        let map = if block_device {
            if major(meta.rdev()) == LOOP_MAJOR {
                loop_backing_map(&buffered_fd, &meta, &name)
            } else {
                None
            }
        } else {
            let fd = dup_fd(&buffered_fd).map_err(open_err)?;
            Some(FileMap {
                fd,
                shift: 0,
                name: name.clone(),
            })
        };

        let depth = opts.queue_depth.clamp(1, 4096);
        let entries = depth.next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(|e| DeviceError::new(ErrorKind::Open, name.clone(), e))?;
        debug!(device = %name, direct, size, logical_block_size, depth, "opened local device");
        Ok(Self {
            name,
            direct_fd,
            buffered_fd,
            direct,
            direct_align,
            size,
            logical_block_size,
            block_device,
            map,
            ring,
            slab: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            in_flight: 0,
            ready: Vec::new(),
            discard: DiscardTarget::default(),
        })
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether I/O really bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Turns the slab entry into a submission queue entry and queues it.
    fn push(&mut self, slot: usize) -> Result<(), DeviceError> {
        let entry = self.slab[slot].as_mut().expect("slot in use");
        let done = entry.done;
        // Reads and writes go to the O_DIRECT descriptor when aligned.
        let (direct, align) = (self.direct, self.direct_align);
        let (direct_fd, buffered_fd) = (self.direct_fd.as_raw_fd(), self.buffered_fd.as_raw_fd());
        let fd = |off: u64, n: u64, ptr: *const u8| {
            types::Fd(if is_aligned(direct, align, off, n, ptr) {
                direct_fd
            } else {
                buffered_fd
            })
        };
        let sqe = match &mut entry.op {
            IoOp::Read { offset, len, buf } => {
                let (off, n) = (*offset + done, *len as u64 - done);
                // SAFETY: done < len <= buf.len(); the buffer lives in the slab
                // until the completion arrives.
                let ptr = unsafe { buf.as_mut_ptr().add(done as usize) };
                opcode::Read::new(fd(off, n, ptr), ptr, n as u32)
                    .offset(off)
                    .build()
            }
            IoOp::ReadDiscard { offset, len } => {
                let (off, n) = (*offset + done, *len as u64 - done);
                // Every discarded read lands at the start of the shared
                // buffer, which outlives every read in flight.
                let ptr = self.discard.ptr(n as usize);
                opcode::Read::new(fd(off, n, ptr), ptr, n as u32)
                    .offset(off)
                    .build()
            }
            IoOp::Write {
                offset,
                buf,
                start,
                len,
            } => {
                let (off, n) = (*offset + done, *len as u64 - done);
                // SAFETY: start + len <= buf.len() (checked at submit).
                let ptr = unsafe { buf.as_ptr().add(*start + done as usize) };
                opcode::Write::new(fd(off, n, ptr), ptr, n as u32)
                    .offset(off)
                    .build()
            }
            IoOp::WriteZeroes { offset, len, mode } => {
                let flags = match mode {
                    ZeroMode::KeepAllocated => {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    }
                    ZeroMode::Deallocate => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                opcode::Fallocate::new(types::Fd(self.buffered_fd.as_raw_fd()), *len)
                    .offset(*offset)
                    .mode(flags)
                    .build()
            }
            IoOp::Flush => opcode::Fsync::new(types::Fd(self.direct_fd.as_raw_fd())).build(),
        };
        let sqe = sqe.user_data(slot as u64);
        // The submission queue has as many entries as the slab, but entries
        // pushed and not yet submitted could fill it: submit and retry.
        loop {
            // SAFETY: every pointer in the entry stays valid while the slab
            // holds the request (buffers are owned by it).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.enter(0)?;
        }
    }

    /// io_uring_enter: submits everything queued, waits for `want` completions.
    fn enter(&mut self, want: usize) -> Result<(), DeviceError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {
                    continue
                }
                // EBUSY: completions must be reaped first; the caller does.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(DeviceError::new(ErrorKind::Read, self.name.clone(), e)),
            }
        }
    }

    /// Processes one completion queue entry; returns a finished completion,
    /// or None when the request was resubmitted (short transfer, EAGAIN).
    fn complete(&mut self, slot: usize, res: i32) -> Result<Option<Completion>, DeviceError> {
        let entry = self.slab[slot]
            .as_mut()
            .expect("completion for a free slot");
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.push(slot)?;
            return Ok(None);
        }
        let (kind, offset, len) = match &entry.op {
            IoOp::Read { offset, len, .. } | IoOp::ReadDiscard { offset, len } => {
                (ErrorKind::Read, *offset, *len as u64)
            }
            IoOp::Write { offset, len, .. } => (ErrorKind::Write, *offset, *len as u64),
            IoOp::WriteZeroes { offset, len, .. } => (ErrorKind::WriteZeroes, *offset, *len),
            IoOp::Flush => (ErrorKind::Flush, 0, 0),
        };
        let result = if res < 0 {
            let e = DeviceError::from_errno(kind, &self.name, -res);
            Err(if kind == ErrorKind::Flush {
                e
            } else {
                e.at(offset + entry.done, len - entry.done)
            })
        } else {
            let n = res as u64;
            match &entry.op {
                IoOp::Read { .. } | IoOp::ReadDiscard { .. } if n == 0 => Ok(entry.done),
                IoOp::Write { .. } if n == 0 => Err(DeviceError::new(
                    kind,
                    self.name.clone(),
                    io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes"),
                )
                .at(offset + entry.done, len - entry.done)),
                IoOp::Read { .. } | IoOp::ReadDiscard { .. } | IoOp::Write { .. } => {
                    entry.done += n;
                    if entry.done < len {
                        self.push(slot)?;
                        return Ok(None);
                    }
                    Ok(len)
                }
                IoOp::WriteZeroes { len, .. } => Ok(*len),
                IoOp::Flush => Ok(0),
            }
        };
        let entry = self.slab[slot].take().expect("slot in use");
        self.free_slots.push(slot);
        self.in_flight -= 1;
        if self.in_flight == 0 {
            self.discard.idle();
        }
        let buf = match entry.op {
            IoOp::Read { buf, .. } => Returned::Read(buf),
            IoOp::Write { buf, .. } => Returned::Write(buf),
            _ => Returned::None,
        };
        Ok(Some(Completion {
            tag: entry.tag,
            result,
            buf,
        }))
    }

    fn drain_cq(&mut self, out: &mut Vec<Completion>) -> Result<usize, DeviceError> {
        let cqes: Vec<(usize, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        let mut got = 0;
        for (slot, res) in cqes {
            if let Some(c) = self.complete(slot, res)? {
                out.push(c);
                got += 1;
            }
        }
        Ok(got)
    }
}

impl BlockDevice for LocalDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn max_in_flight(&self) -> usize {
        self.slab.len()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), DeviceError> {
        let (offset, len) = match &op {
            IoOp::Read { offset, len, buf } => {
                if *len > buf.len() {
                    return Err(DeviceError::invalid(
                        &self.name,
                        "read longer than its buffer",
                    ));
                }
                (*offset, *len as u64)
            }
            IoOp::ReadDiscard { offset, len } => (*offset, *len as u64),
            IoOp::Write {
                offset,
                buf,
                start,
                len,
            } => {
                if start + len > buf.len() {
                    return Err(DeviceError::invalid(
                        &self.name,
                        "write past the end of its buffer",
                    ));
                }
                (*offset, *len as u64)
            }
            IoOp::WriteZeroes { offset, len, .. } => (*offset, *len),
            IoOp::Flush => (0, 0),
        };
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DeviceError::invalid(
                &self.name,
                format!("request past the end of the device (size {})", self.size),
            )
            .at(offset, len));
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err(DeviceError::invalid(&self.name, "queue full").at(offset, len));
        };
        self.slab[slot] = Some(InFlight { tag, op, done: 0 });
        self.in_flight += 1;
        if let Err(e) = self.push(slot) {
            self.slab[slot] = None;
            self.free_slots.push(slot);
            self.in_flight -= 1;
            return Err(e);
        }
        Ok(())
    }

    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        let mut got = self.ready.len();
        out.append(&mut self.ready);
        let min = min.min(got + self.in_flight);
        if !self.ring.submission().is_empty() {
            self.enter(0)?;
        }
        got += self.drain_cq(out)?;
        while got < min {
            self.enter(1)?;
            got += self.drain_cq(out)?;
        }
        Ok(())
    }

    fn supports_write_zeroes(&self) -> bool {
        true
    }

    fn discards_reads(&self) -> bool {
        true
    }

    fn allocation_map(&mut self) -> Option<&mut dyn AllocationMap> {
        self.map.as_mut().map(|m| m as &mut dyn AllocationMap)
    }
}

impl Drop for LocalDevice {
    fn drop(&mut self) {
        // The kernel may still be reading or writing buffers held in the
        // slab: wait for every completion before they are freed.
        while self.in_flight > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Cannot wait: leak the buffers rather than free memory the
                // kernel may still write.
                warn!(device = %self.name, error = %e, "leaking in-flight buffers");
                for entry in self.slab.drain(..) {
                    std::mem::forget(entry);
                }
                std::mem::forget(std::mem::take(&mut self.discard));
                return;
            }
            let slots: Vec<usize> = self
                .ring
                .completion()
                .map(|c| c.user_data() as usize)
                .collect();
            for slot in slots {
                if self.slab[slot].take().is_some() {
                    self.in_flight -= 1;
                }
            }
        }
    }
}

/// Whether a transfer may go to the O_DIRECT descriptor.
fn is_aligned(direct: bool, align: u64, offset: u64, len: u64, ptr: *const u8) -> bool {
    direct && offset % align == 0 && len % align == 0 && (ptr as usize) % BUFFER_ALIGN == 0
}

/// SEEK_DATA / SEEK_HOLE on a file, shifted by where the device starts in it.
struct FileMap {
    fd: OwnedFd,
    shift: u64,
    name: String,
}

impl AllocationMap for FileMap {
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, end: u64, data: bool| {
            if end <= offset {
                return;
            }
            match out.last_mut() {
                Some(last) if last.data == data && last.end() == offset => last.len += end - offset,
                _ => out.push(Extent {
                    offset,
                    len: end - offset,
                    data,
                }),
            }
        };
        let mut pos = offset;
        while pos < end {
            let data = match seek(&self.fd, pos + self.shift, libc::SEEK_DATA) {
                Ok(d) => d.saturating_sub(self.shift).min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => {
                    return Err(
                        DeviceError::new(ErrorKind::AllocationMap, self.name.clone(), e)
                            .at(pos, end - pos),
                    )
                }
            };
            push(pos, data, false);
            if data >= end {
                break;
            }
            let hole = match seek(&self.fd, data + self.shift, libc::SEEK_HOLE) {
                Ok(h) => h.saturating_sub(self.shift).min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => {
                    return Err(
                        DeviceError::new(ErrorKind::AllocationMap, self.name.clone(), e)
                            .at(data, end - data),
                    )
                }
            };
            push(data, hole.max(data + 1).min(end), true);
            pos = hole.max(data + 1);
        }
        Ok(out)
    }
}

/// For a loop device, the allocation map of its backing file. The device's
/// own page cache is flushed first so writes not yet passed down to the file
/// are not mistaken for holes; the backing file is matched by device and
/// inode number so a renamed or replaced path is never trusted.
fn loop_backing_map(fd: &OwnedFd, meta: &std::fs::Metadata, name: &str) -> Option<FileMap> {
    let info = crate::loopinfo::loop_status(fd).ok()??;
    let rdev = meta.rdev();
    let sys = format!(
        "/sys/dev/block/{}:{}/loop/backing_file",
        major(rdev),
        minor(rdev)
    );
    let backing = PathBuf::from(std::fs::read_to_string(sys).ok()?.trim_end_matches('\n'));
    let file = File::open(&backing).ok()?;
    let bmeta = file.metadata().ok()?;
    if bmeta.dev() != info.lo_device || bmeta.ino() != info.lo_inode {
        warn!(device = %name, backing = %backing.display(), "loop backing file does not match; no allocation map");
        return None;
    }
    // SAFETY: plain fsync on a descriptor we own.
    if unsafe { libc::fsync(fd.as_raw_fd()) } != 0 {
        return None;
    }
    debug!(device = %name, backing = %backing.display(), offset = info.lo_offset, "allocation map from loop backing file");
    Some(FileMap {
        fd: OwnedFd::from(file),
        shift: info.lo_offset,
        name: name.to_string(),
    })
}

/// Creates (or truncates to) a sparse file of `size` bytes.
pub fn create_sparse_file(path: &Path, size: u64) -> Result<(), DeviceError> {
    let name = path.display().to_string();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| DeviceError::new(ErrorKind::Open, name.clone(), e))?;
    f.set_len(size)
        .map_err(|e| DeviceError::new(ErrorKind::Write, name, e))
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

fn major(dev: u64) -> u32 {
    libc::major(dev)
}

fn minor(dev: u64) -> u32 {
    libc::minor(dev)
}

fn open_fd(path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string; the returned descriptor is owned by us.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup_fd(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

fn ioctl_u64(fd: &OwnedFd, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes one u64.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn seek(fd: &OwnedFd, pos: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// O_DIRECT alignment of a file (offset, memory) from statx, 0 if unknown.
fn dio_alignment(fd: &OwnedFd) -> (u32, u32) {
    let raw: RawFd = fd.as_raw_fd();
    // SAFETY: statx fills the struct; AT_EMPTY_PATH with "" inspects raw.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            raw,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return (0, 0);
    }
    (stx.stx_dio_offset_align, stx.stx_dio_mem_align)
}
