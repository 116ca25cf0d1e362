use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::BUFFER_ALIGN;

/// A page-aligned, zero-initialised heap buffer suitable for O_DIRECT.
///
/// It is handed to a device by value and comes back in the completion, so a
/// buffer can never be freed or reused while the kernel may still write it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// An anonymous mapping of its own (else from the global allocator).
    mapped: bool,
}

// SAFETY: the buffer is a plain owned allocation; no interior sharing.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

/// From this size up, buffers are anonymous mappings of their own.
///
/// The allocator's `alloc_zeroed` at page alignment clears every byte up
/// front (about half a millisecond per MiB, faulting each page in), and the
/// copy engine allocates its pool while its first requests are already in
/// flight, so that clearing held back the pipeline's fill. A fresh mapping
/// is zero without being touched: pages are faulted in as the first I/O
/// writes them.
const MAPPED_FROM: usize = 128 << 10;

impl AlignedBuf {
    /// Allocates `len` bytes (rounded up to the alignment), zeroed.
    pub fn new(len: usize) -> Self {
        let len = len.max(1).div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN;
        if len >= MAPPED_FROM {
            // SAFETY: an anonymous private mapping; no file, no fixed address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let ptr = NonNull::new(p.cast::<u8>()).expect("mmap never returns null");
                return Self {
                    ptr,
                    len,
                    mapped: true,
                };
            }
            // Out of mappings: let the allocator try (and report failure).
        }
        let layout = Layout::from_size_align(len, BUFFER_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self {
            ptr,
            len,
            mapped: false,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes and initialised (alloc_zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// True when every byte is zero. Checks 64 bytes at a time so the compiler
/// vectorises it, and stops at the first non-zero chunk (random data exits
/// after one chunk).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u8;
        for &b in c {
            acc |= b;
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Where reads whose data nobody wants land ([`crate::IoOp::ReadDiscard`]):
/// one buffer that all of them share, grown to the largest such read. A
/// buffer it outgrows is kept until no read can still be writing to it.
#[derive(Debug, Default)]
pub struct DiscardTarget {
    current: Option<AlignedBuf>,
    retired: Vec<AlignedBuf>,
}

impl DiscardTarget {
    /// Memory for a discarded read of `len` bytes. It stays valid until
    /// [`DiscardTarget::idle`] is called with no read in flight.
    pub fn ptr(&mut self, len: usize) -> *mut u8 {
        if self.current.as_ref().is_none_or(|b| b.len() < len) {
            let grown = AlignedBuf::new(len);
            if let Some(old) = self.current.replace(grown) {
                self.retired.push(old);
            }
        }
        self.current.as_mut().expect("just made").as_mut_ptr()
    }

    /// No discarded read is in flight: buffers outgrown may go.
    pub fn idle(&mut self) {
        self.retired.clear();
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in new() with exactly this length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            return;
        }
        let layout = Layout::from_size_align(self.len, BUFFER_ALIGN).expect("buffer layout");
        // SAFETY: allocated in new() with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 8195];
        assert!(is_zero(&v[1..]));
        v[8194] = 1;
        assert!(!is_zero(&v[3..]));
        v[8194] = 0;
        v[4000] = 9;
        assert!(!is_zero(&v));
    }

    #[test]
    fn aligned_and_rounded_and_zeroed() {
        // Both kinds: from the allocator, and a mapping of its own.
        for (asked, got) in [(5000, 8192), (MAPPED_FROM + 1, MAPPED_FROM + 4096)] {
            let mut b = AlignedBuf::new(asked);
            assert_eq!(b.len(), got);
            assert_eq!(b.mapped, asked >= MAPPED_FROM);
            assert_eq!(b.as_ptr() as usize % BUFFER_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
    }
}
