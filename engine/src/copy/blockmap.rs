//! Block maps: one hash per fixed-size block of a volume. Every backup
//! records one. It is the backup's checksum map (what `backup verify` and
//! `restore --verify` check against) and, for the next incremental backup
//! without driver change tracking, the record of what the backup holds.
//!
//! A block's hash is XXH3-64 over the XXH3-64 hashes of its 4 KiB pages
//! (the hashes the reader computes anyway), so a map can be built from
//! reads of any size and a zero block's hash is known without reading it.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::blocks::zero_hash;
use super::plan::GRID;

/// Default block size of backup maps: 8 bytes of map per 256 KiB of volume
/// (32 KiB per GiB), small enough to keep in memory for large volumes and
/// fine enough that an incremental rewrites little around each change.
pub const DEFAULT_MAP_BLOCK: u64 = 256 << 10;

#[derive(Clone, PartialEq, Eq)]
pub struct BlockMap {
    pub block_size: u64,
    /// Bytes of volume the map covers (the last block may be short).
    pub size: u64,
    pub hashes: Vec<u64>,
}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("block_size", &self.block_size)
            .field("size", &self.size)
            .field("blocks", &self.hashes.len())
            .finish()
    }
}

impl BlockMap {
    pub fn new(block_size: u64, size: u64) -> Self {
        Self {
            block_size,
            size,
            hashes: vec![0; size.div_ceil(block_size) as usize],
        }
    }

    /// Length of block `i` (the last one may be short).
    pub fn block_len(&self, i: usize) -> u64 {
        self.block_size.min(self.size - i as u64 * self.block_size)
    }

    /// One checksum for the whole map: "map-xxh3-128:<block size>:<hex>".
    pub fn checksum(&self) -> String {
        let mut h = Xxh3::new();
        h.update(&self.block_size.to_le_bytes());
        h.update(&self.size.to_le_bytes());
        for x in &self.hashes {
            h.update(&x.to_le_bytes());
        }
        format!("map-xxh3-128:{}:{:032x}", self.block_size, h.digest128())
    }

    /// Offset of the first block whose hash differs (0 if the maps do not
    /// describe the same size and block size).
    pub fn first_difference(&self, other: &BlockMap) -> Option<u64> {
        if self.block_size != other.block_size || self.size != other.size {
            return Some(0);
        }
        self.hashes
            .iter()
            .zip(&other.hashes)
            .position(|(a, b)| a != b)
            .map(|i| i as u64 * self.block_size)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.hashes.len() * 8);
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        for x in &self.hashes {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < 16 || (b.len() - 16) % 8 != 0 {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let (block_size, size) = (word(0), word(8));
        if block_size == 0 || block_size % GRID != 0 {
            return None;
        }
        let hashes: Vec<u64> = (16..b.len()).step_by(8).map(word).collect();
        (hashes.len() as u64 == size.div_ceil(block_size)).then_some(Self {
            block_size,
            size,
            hashes,
        })
    }
}

/// Hash of a block from the hashes of its 4 KiB pages.
pub fn block_hash(page_hashes: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(page_hashes.len() * 8);
    for h in page_hashes {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Hash of a block of `len` zero bytes.
pub fn zero_block_hash(len: u64) -> u64 {
    let full = (len / GRID) as usize;
    let mut pages = vec![zero_hash(GRID as usize); full];
    if len % GRID != 0 {
        pages.push(zero_hash((len % GRID) as usize));
    }
    block_hash(&pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::blocks::analyze;

    #[test]
    fn zero_block_hash_matches_hashing_zeroes() {
        for len in [4096u64, 65536, 262144, 5000, 100] {
            let data = vec![0u8; len as usize];
            let mut pages = Vec::new();
            analyze(&data, false, Some(&mut pages));
            assert_eq!(block_hash(&pages), zero_block_hash(len), "len {len}");
        }
    }

    #[test]
    fn bytes_round_trip_and_differences() {
        let mut m = BlockMap::new(65536, 65536 * 3 + 10);
        m.hashes = vec![1, 2, 3, 4];
        let back = BlockMap::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.checksum(), back.checksum());
        let mut other = m.clone();
        other.hashes[2] = 9;
        assert_eq!(m.first_difference(&other), Some(131072));
        assert_ne!(m.checksum(), other.checksum());
        assert_eq!(m.first_difference(&m), None);
        assert!(BlockMap::from_bytes(&m.to_bytes()[..20]).is_none());
        assert_eq!(m.block_len(3), 10);
    }
}
