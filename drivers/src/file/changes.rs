//! Change tracking for reflink pools: which ranges of a snapshot may differ
//! from an earlier snapshot of the same volume, read from the two image
//! files' extent maps (FIEMAP).
//!
//! Both snapshots are FICLONE clones of the volume's image taken at
//! different times. A block not rewritten between the two clones is one
//! physical block shared by both files (and the volume); a rewritten block
//! got a new physical extent by copy-on-write. So a logical range maps to
//! the same physical addresses in both files only if it was not rewritten,
//! and then its content is the same bytes on disk. The rule is sound
//! whatever the snapshots' history, as long as the physical addresses are
//! real ones in one address space and both maps are read while both files
//! hold their blocks (a block cannot be freed and reused while a file still
//! maps it). Everything that rule does not prove equal is reported changed:
//! a false "unchanged" would silently corrupt an incremental backup, a
//! false "changed" only costs a read.
//!
//! A logical range is reported unchanged only when, in both files, it is
//! - a hole (reads as zeroes in both), or
//! - mapped by extents with no flags but LAST, SHARED, MERGED and
//!   UNWRITTEN, both written or both unwritten, at the same physical
//!   address for each offset (`phys_a + (off - logical_a) == phys_b +
//!   (off - logical_b)`).
//!
//! Every other case is changed, including an extent whose location or
//! encoding the kernel flags as uncertain (UNKNOWN, DELALLOC, ENCODED,
//! DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL, or any flag this code
//! does not know), and a hole in one file against an unwritten extent in the
//! other (both read as zeroes, but nothing proves it cheaply).
//!
//! The answer is `None` (the caller compares data) unless both snapshots
//! were made by FICLONE from the same volume, have the same size, and live
//! on XFS or btrfs: file systems whose FIEMAP reports real, unique physical
//! addresses. Others that accept FICLONE may not (CIFS reports the logical
//! offset as the physical one), and would make every range look unchanged.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use super::copy::FICLONE;
use super::pool::Pool;
use super::sidecar::SnapshotRecord;
use crate::{ChangedRange, Result};

/// `FS_IOC_FIEMAP`: _IOWR('f', 11, struct fiemap).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FS_IOC_FSGETXATTR`: _IOR('X', 31, struct fsxattr).
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801C_581F;
/// `FS_XFLAG_REALTIME`: the file's data is on the XFS realtime device,
/// whose block addresses overlap the data device's.
const FS_XFLAG_REALTIME: u32 = 0x1;

/// Flush dirty data (and delayed allocations) before mapping.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const FIEMAP_EXTENT_MERGED: u32 = 0x1000;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// The flags an extent may carry and still be compared by physical
/// address. Any other flag makes it opaque (always changed).
const COMPARABLE_FLAGS: u32 =
    FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED;

/// Extents fetched per FIEMAP call.
const BATCH: usize = 512;

/// Changed ranges are rounded out to this.
pub(super) const GRANULE: u64 = 4096;

const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` followed by room for [`BATCH`] extents.
#[repr(C)]
struct FiemapRequest {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::offset_of!(FiemapRequest, fm_extents) == 32);

/// `struct fsxattr` (linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    fsx_xflags: u32,
    fsx_extsize: u32,
    fsx_nextents: u32,
    fsx_projid: u32,
    fsx_cowextsize: u32,
    fsx_pad: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<FsXattr>() == 28);

/// One extent as FIEMAP reports it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// What a stretch of a file is, for the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hole,
    /// Mapped linearly; `physical` is the address of the segment's start.
    Data {
        physical: u64,
        unwritten: bool,
    },
    /// Mapped, but not comparable by address (see [`COMPARABLE_FLAGS`]).
    Opaque,
}

/// `[start, end)` of a file, all of one [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    start: u64,
    end: u64,
    kind: Kind,
}

/// The file systems whose extent maps this module trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrustedFs {
    Xfs,
    Btrfs,
}

/// The driver's `changed_ranges` for two snapshot records of one pool.
pub(super) fn changed_ranges(
    pool: &Pool<'_>,
    from: &SnapshotRecord,
    to: &SnapshotRecord,
) -> Result<Option<Vec<ChangedRange>>> {
    let object = format!("snapshots {} and {}", from.id, to.id);
    let untracked = |why: &str| {
        debug!(pool = %pool.name, from = %from.id, to = %to.id, why, "no change tracking between these snapshots");
        Ok(None)
    };
    if !from.reflinked || !to.reflinked {
        return untracked("not both made by reflink");
    }
    if from.volume_id != to.volume_id {
        return untracked("snapshots of different volumes");
    }
    if from.size != to.size {
        return untracked("different sizes");
    }
    let size = from.size;
    let open = |id: &str| {
        let path = pool.snapshot_img(id);
        let file = File::open(&path)
            .map_err(|e| pool.io_err(&object, format!("opening {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| pool.io_err(&object, format!("stat of {}", path.display()), e))?;
        Ok::<_, crate::DriverError>((file, meta))
    };
    let (fa, ma) = open(&from.id)?;
    let (fb, mb) = open(&to.id)?;
    if ma.len() != size || mb.len() != size {
        warn!(pool = %pool.name, from = %from.id, to = %to.id, size, from_len = ma.len(), to_len = mb.len(),
            "snapshot image length differs from its sidecar; no change tracking");
        return Ok(None);
    }
    if ma.dev() != mb.dev() {
        return untracked("image files on different file systems");
    }
    let fs = match trusted_fs(&fa) {
        Ok(Some(fs)) => fs,
        Ok(None) => return untracked("file system not trusted for extent maps"),
        Err(e) => return Err(pool.io_err(&object, "statfs of the snapshot image", e)),
    };
    if fs == TrustedFs::Xfs && (maybe_realtime(&fa) || maybe_realtime(&fb)) {
        return untracked("XFS realtime file (or its flags unreadable)");
    }
    let map = |file: &File, id: &str| -> Result<Option<Vec<Segment>>> {
        let extents = match fiemap(file, size) {
            Ok(e) => e,
            Err(e) if unsupported(&e) => {
                debug!(pool = %pool.name, snapshot = id, error = %e, "FIEMAP unsupported");
                return Ok(None);
            }
            Err(e) => {
                return Err(pool.io_err(
                    &object,
                    format!("reading the extent map of snapshot {id}"),
                    e,
                ))
            }
        };
        let segments = segments(&extents, size);
        if segments.is_none() {
            warn!(pool = %pool.name, snapshot = id, "FIEMAP returned overlapping or unsorted extents; no change tracking");
        }
        Ok(segments)
    };
    let Some(a) = map(&fa, &from.id)? else {
        return Ok(None);
    };
    let Some(b) = map(&fb, &to.id)? else {
        return Ok(None);
    };
    // The rule needs both maps read while both files hold their blocks. The
    // snapshots are never written, but a defragmenter could move extents:
    // if the first map is still the same after the second was read, every
    // block it names was held by it all along, so a block the second names
    // at the same address was the same block.
    let Some(a_again) = map(&fa, &from.id)? else {
        return Ok(None);
    };
    if a != a_again {
        warn!(pool = %pool.name, snapshot = %from.id, "extent map changed while reading it; no change tracking");
        return Ok(None);
    }
    let ranges = diff(&a, &b, size);
    debug!(pool = %pool.name, from = %from.id, to = %to.id, ranges = ranges.len(),
        bytes = ranges.iter().map(|r| r.len).sum::<u64>(), "changed ranges from extent maps");
    Ok(Some(ranges))
}

/// Whether `dir`'s file system has trusted extent maps and accepts FICLONE
/// there: clones a small hidden file (which listings skip) and removes both.
pub(super) fn probe_reflink(dir: &Path) -> io::Result<bool> {
    if trusted_fs(&File::open(dir)?)?.is_none() {
        return Ok(false);
    }
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let n = PROBES.fetch_add(1, Ordering::Relaxed);
    let base = format!(".volback-reflink-probe-{}-{n}", std::process::id());
    let (src_path, dst_path) = (
        dir.join(format!("{base}.src")),
        dir.join(format!("{base}.dst")),
    );
    let result = (|| {
        let create = |p: &Path| {
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
        };
        let src = create(&src_path)?;
        let dst = create(&dst_path)?;
        src.write_all_at(&[0x5a; GRANULE as usize], 0)?;
        // SAFETY: FICLONE takes the source descriptor as its argument.
        if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS) => {
                Ok(false)
            }
            _ => Err(e),
        }
    })();
    for p in [&src_path, &dst_path] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(file = %p.display(), error = %e, "could not remove a reflink probe file")
            }
        }
    }
    result
}

/// Errors meaning "no extent map here" rather than a failure.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS | libc::EBADR | libc::EINVAL)
    )
}

fn trusted_fs(f: &File) -> io::Result<Option<TrustedFs>> {
    // SAFETY: fstatfs fills the struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is a signed word on some targets: compare its low 32 bits.
    Ok(match st.f_type as u64 & 0xFFFF_FFFF {
        XFS_SUPER_MAGIC => Some(TrustedFs::Xfs),
        BTRFS_SUPER_MAGIC => Some(TrustedFs::Btrfs),
        _ => None,
    })
}

/// Whether an XFS file may be on the realtime device (true when its flags
/// cannot be read: conservative).
fn maybe_realtime(f: &File) -> bool {
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills the struct we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut x) } != 0 {
        return true;
    }
    x.fsx_xflags & FS_XFLAG_REALTIME != 0
}

/// The extents of the first `len` bytes of `file`, sorted by logical
/// offset, after flushing its dirty data (FIEMAP_FLAG_SYNC).
pub(super) fn fiemap(file: &File, len: u64) -> io::Result<Vec<Extent>> {
    let mut req = Box::new(FiemapRequest {
        fm_start: 0,
        fm_length: 0,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: 0,
        fm_reserved: 0,
        fm_extents: [FiemapExtent::default(); BATCH],
    });
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < len {
        req.fm_start = start;
        req.fm_length = len - start;
        req.fm_flags = FIEMAP_FLAG_SYNC;
        req.fm_mapped_extents = 0;
        req.fm_extent_count = BATCH as u32;
        req.fm_reserved = 0;
        // SAFETY: the request has room for fm_extent_count extents.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP as _,
                &mut *req as *mut FiemapRequest,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        let n = req.fm_mapped_extents as usize;
        if n == 0 {
            // Nothing mapped from `start` on: all holes.
            break;
        }
        if n > BATCH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("FIEMAP mapped {n} extents into room for {BATCH}"),
            ));
        }
        let mut last = false;
        let mut end = start;
        for fe in &req.fm_extents[..n] {
            let mut e = Extent {
                logical: fe.fe_logical,
                physical: fe.fe_physical,
                length: fe.fe_length,
                flags: fe.fe_flags,
            };
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            // An extent straddling the request's start may be reported
            // whole: keep only what was not seen in the previous batch.
            if e.logical < start {
                let cut = start - e.logical;
                if cut >= e.length {
                    continue;
                }
                e.logical = start;
                e.length -= cut;
                e.physical = match e.physical.checked_add(cut) {
                    Some(p) => p,
                    None => {
                        e.flags |= FIEMAP_EXTENT_UNKNOWN;
                        0
                    }
                };
            }
            let e_end = e.logical.checked_add(e.length).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "FIEMAP extent past 2^64")
            })?;
            end = end.max(e_end);
            out.push(e);
        }
        if last {
            break;
        }
        if end <= start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("FIEMAP made no progress at offset {start}"),
            ));
        }
        start = end;
    }
    Ok(out)
}

/// Cuts `[0, size)` into holes and extents; `None` if the extents overlap
/// or are out of order (the map cannot be trusted).
fn segments(extents: &[Extent], size: u64) -> Option<Vec<Segment>> {
    let mut out = Vec::with_capacity(extents.len() * 2 + 1);
    let mut pos = 0u64;
    for e in extents {
        if e.length == 0 {
            continue;
        }
        let end = e.logical.checked_add(e.length)?;
        if e.logical < pos {
            return None;
        }
        if e.logical >= size {
            // Sorted: the rest lies past the end too.
            break;
        }
        if e.logical > pos {
            out.push(Segment {
                start: pos,
                end: e.logical,
                kind: Kind::Hole,
            });
        }
        // An extent whose addresses would wrap is nonsense: not comparable.
        let kind = if e.flags & !COMPARABLE_FLAGS != 0 || e.physical.checked_add(e.length).is_none()
        {
            Kind::Opaque
        } else {
            Kind::Data {
                physical: e.physical,
                unwritten: e.flags & FIEMAP_EXTENT_UNWRITTEN != 0,
            }
        };
        out.push(Segment {
            start: e.logical,
            end: end.min(size),
            kind,
        });
        pos = end;
    }
    if pos < size {
        out.push(Segment {
            start: pos,
            end: size,
            kind: Kind::Hole,
        });
    }
    Some(out)
}

/// Whether the bytes at `pos` (inside both segments, and up to the end of
/// the shorter) are provably the same in both files.
fn same(a: &Segment, b: &Segment, pos: u64) -> bool {
    match (a.kind, b.kind) {
        (Kind::Hole, Kind::Hole) => true,
        (
            Kind::Data {
                physical: pa,
                unwritten: ua,
            },
            Kind::Data {
                physical: pb,
                unwritten: ub,
            },
        ) => {
            let at_a = pa.checked_add(pos - a.start);
            let at_b = pb.checked_add(pos - b.start);
            ua == ub && at_a.is_some() && at_a == at_b
        }
        _ => false,
    }
}

/// The ranges of `[0, size)` not proved equal, rounded out to [`GRANULE`],
/// clamped to `size`, merged when they touch. Both maps cover `[0, size)`.
fn diff(a: &[Segment], b: &[Segment], size: u64) -> Vec<ChangedRange> {
    let mut out: Vec<ChangedRange> = Vec::new();
    let (mut i, mut j, mut pos) = (0, 0, 0u64);
    while pos < size && i < a.len() && j < b.len() {
        let (sa, sb) = (&a[i], &b[j]);
        let hi = sa.end.min(sb.end);
        if !same(sa, sb, pos) {
            add_range(&mut out, pos, hi, size);
        }
        pos = hi;
        if sa.end == hi {
            i += 1;
        }
        if sb.end == hi {
            j += 1;
        }
    }
    if pos < size {
        // Cannot happen with maps from `segments`; conservative anyway.
        add_range(&mut out, pos, size, size);
    }
    out
}

/// Appends `[lo, hi)` rounded out to [`GRANULE`] and clamped to `size`,
/// merged into the last range if they touch. Ranges come in order.
fn add_range(out: &mut Vec<ChangedRange>, lo: u64, hi: u64, size: u64) {
    let lo = lo - lo % GRANULE;
    let hi = hi
        .div_ceil(GRANULE)
        .saturating_mul(GRANULE)
        .min(size)
        .max(lo);
    if hi == lo {
        return;
    }
    if let Some(last) = out.last_mut() {
        let last_end = last.offset + last.len;
        if lo <= last_end {
            last.len = hi.max(last_end) - last.offset;
            return;
        }
    }
    out.push(ChangedRange {
        offset: lo,
        len: hi - lo,
    });
}

#[cfg(test)]
mod tests;
