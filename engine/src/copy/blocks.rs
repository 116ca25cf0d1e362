//! Per-block analysis of a read buffer: which grid blocks are all zeroes, and
//! (when verifying) each block's hash, in one pass.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::plan::GRID;

/// What a run of blocks inside a read buffer needs on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Data,
    /// Reads as zero.
    Zero,
    /// Same as what the destination already holds (incremental copies).
    Unchanged,
}

/// A run of consecutive grid blocks of one kind inside a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub len: usize,
    pub kind: RunKind,
}

pub use volback_connectors::is_zero;

/// Splits `data` into runs of zero and non-zero grid blocks (the last block
/// may be short) and, if `hashes` is given, appends one hash per block.
pub fn analyze(data: &[u8], detect_zero: bool, mut hashes: Option<&mut Vec<u64>>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, block) in data.chunks(GRID as usize).enumerate() {
        let zero = detect_zero && is_zero(block);
        if let Some(h) = hashes.as_deref_mut() {
            h.push(if zero {
                zero_hash(block.len())
            } else {
                xxh3_64(block)
            });
        }
        let kind = if zero { RunKind::Zero } else { RunKind::Data };
        push_run(&mut runs, i * GRID as usize, block.len(), kind);
    }
    runs
}

fn push_run(runs: &mut Vec<Run>, start: usize, len: usize, kind: RunKind) {
    match runs.last_mut() {
        Some(last) if last.kind == kind && last.start + last.len == start => last.len += len,
        _ => runs.push(Run { start, len, kind }),
    }
}

/// Marks the byte ranges `unchanged` (sorted, inside the buffer) as
/// [`RunKind::Unchanged`], splitting the runs around them.
pub fn mark_unchanged(runs: &[Run], unchanged: &[(usize, usize)]) -> Vec<Run> {
    let mut out = Vec::new();
    let mut u = unchanged.iter().peekable();
    for r in runs {
        let mut pos = r.start;
        let end = r.start + r.len;
        while pos < end {
            while u.peek().is_some_and(|&&(a, l)| a + l <= pos) {
                u.next();
            }
            match u.peek() {
                Some(&&(a, l)) if a <= pos => {
                    let stop = (a + l).min(end);
                    push_run(&mut out, pos, stop - pos, RunKind::Unchanged);
                    pos = stop;
                }
                Some(&&(a, _)) => {
                    let stop = a.min(end);
                    push_run(&mut out, pos, stop - pos, r.kind);
                    pos = stop;
                }
                None => {
                    push_run(&mut out, pos, end - pos, r.kind);
                    pos = end;
                }
            }
        }
    }
    out
}

/// Hash of a block of `len` zero bytes (`len` <= GRID).
pub fn zero_hash(len: usize) -> u64 {
    static FULL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static ZEROES: [u8; GRID as usize] = [0; GRID as usize];
    if len == GRID as usize {
        *FULL.get_or_init(|| xxh3_64(&ZEROES))
    } else {
        xxh3_64(&ZEROES[..len])
    }
}

/// The checksum of a whole device: XXH3-128 over the sequence of per-block
/// XXH3-64 hashes, fed in offset order. Blocks may be hashed out of order
/// (reads complete out of order); they are held here only until the gap
/// before them fills, so memory is bounded by the requests in flight.
pub struct OrderedDigest {
    next: u64,
    size: u64,
    waiting: std::collections::BTreeMap<u64, Pending>,
    hasher: Xxh3,
}

enum Pending {
    Hashes(Vec<u64>),
    Zeroes(u64),
}

impl OrderedDigest {
    pub fn new(size: u64) -> Self {
        Self {
            next: 0,
            size,
            waiting: Default::default(),
            hasher: Xxh3::new(),
        }
    }

    /// Block hashes for the range starting at `offset` (on the grid).
    pub fn add_hashes(&mut self, offset: u64, hashes: Vec<u64>) {
        self.waiting.insert(offset, Pending::Hashes(hashes));
        self.drain();
    }

    /// A range of `len` bytes known to be zero.
    pub fn add_zeroes(&mut self, offset: u64, len: u64) {
        self.waiting.insert(offset, Pending::Zeroes(len));
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(p) = self.waiting.remove(&self.next) {
            match p {
                Pending::Hashes(h) => {
                    for x in &h {
                        self.hasher.update(&x.to_le_bytes());
                    }
                    self.next = (self.next + h.len() as u64 * GRID).min(self.size);
                }
                Pending::Zeroes(len) => {
                    let end = self.next + len;
                    let full = zero_hash(GRID as usize).to_le_bytes();
                    let mut pos = self.next;
                    while pos < end {
                        let n = GRID.min(end - pos);
                        if n == GRID {
                            self.hasher.update(&full);
                        } else {
                            self.hasher.update(&zero_hash(n as usize).to_le_bytes());
                        }
                        pos += n;
                    }
                    self.next = end;
                }
            }
        }
    }

    /// The digest, once every byte of the device was accounted for.
    pub fn finish(&self) -> Option<u128> {
        (self.next == self.size && self.waiting.is_empty()).then(|| self.hasher.digest128())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 10000];
        assert!(is_zero(&b));
        b[9999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }

    #[test]
    fn runs_split_on_block_kind_and_keep_a_short_tail() {
        let mut b = vec![0u8; 4096 * 3 + 10];
        b[4096] = 7;
        b[4096 * 3 + 9] = 1;
        let runs = analyze(&b, true, None);
        let run = |start, len, kind| Run { start, len, kind };
        assert_eq!(
            runs,
            vec![
                run(0, 4096, RunKind::Zero),
                run(4096, 4096, RunKind::Data),
                run(8192, 4096, RunKind::Zero),
                run(12288, 10, RunKind::Data),
            ]
        );
        let dense = analyze(&b, false, None);
        assert_eq!(dense, vec![run(0, b.len(), RunKind::Data)]);
        let marked = mark_unchanged(&runs, &[(4096, 8192)]);
        assert_eq!(
            marked,
            vec![
                run(0, 4096, RunKind::Zero),
                run(4096, 8192, RunKind::Unchanged),
                run(12288, 10, RunKind::Data),
            ]
        );
    }

    proptest! {
        /// The digest does not depend on the order chunks arrive in, nor on
        /// whether zero ranges were read or known from the map.
        #[test]
        fn digest_is_order_and_chunking_independent(
            blocks in proptest::collection::vec(proptest::option::of(any::<u8>()), 1..40),
            tail in 1usize..=4096,
            seed in any::<u64>(),
        ) {
            let mut data = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                let n = if i + 1 == blocks.len() { tail } else { 4096 };
                data.extend(std::iter::repeat_n(b.unwrap_or(0), n));
            }
            let size = data.len() as u64;
            // Reference: one chunk, in order.
            let mut h = Vec::new();
            analyze(&data, true, Some(&mut h));
            let mut one = OrderedDigest::new(size);
            one.add_hashes(0, h);
            let reference = one.finish().unwrap();
            // Chunks of one block each, zero blocks given as zero ranges,
            // delivered in a shuffled order.
            let mut parts: Vec<(u64, Option<Vec<u64>>, u64)> = Vec::new();
            for (i, chunk) in data.chunks(4096).enumerate() {
                let off = i as u64 * 4096;
                if is_zero(chunk) {
                    parts.push((off, None, chunk.len() as u64));
                } else {
                    let mut h = Vec::new();
                    analyze(chunk, false, Some(&mut h));
                    parts.push((off, Some(h), 0));
                }
            }
            let mut s = seed | 1;
            for i in (1..parts.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                parts.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut d = OrderedDigest::new(size);
            for (off, h, zlen) in parts {
                match h { Some(h) => d.add_hashes(off, h), None => d.add_zeroes(off, zlen) }
            }
            prop_assert_eq!(d.finish(), Some(reference));
        }
    }
}
