//! Where to read and where to skip: turns a device's allocation map into a
//! sequence of read and hole steps on a fixed grid.
//!
//! Every step starts on the [`GRID`] and (but for the last one of the device)
//! ends on it, so per-block checksums and zero detection line up whatever
//! the chunking, and a short hole between data is read rather than splitting
//! a read in two.

use std::collections::VecDeque;

use volback_connectors::{AllocationMap, DeviceError, Extent};

/// Granularity of zero detection, of checksums, and of the map's rounding.
pub const GRID: u64 = 4096;

/// How much of the device one allocation-map query covers: bounds memory on
/// a device with many extents and keeps queries cheap on a dense one.
const MAP_WINDOW: u64 = 256 << 20;

/// The largest hole handed to the writer in one step (progress stays smooth
/// and a write-zeroes request stays reasonable).
const MAX_HOLE_STEP: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Read { offset: u64, len: u64 },
    Hole { offset: u64, len: u64 },
}

pub struct Planner {
    size: u64,
    block_size: u64,
    /// Holes shorter than this are read (cheaper than an extra request).
    min_hole: u64,
    use_map: bool,
    /// Start of the part of the device not yet mapped.
    mapped_to: u64,
    pending: VecDeque<Extent>,
}

impl Planner {
    pub fn new(size: u64, block_size: u64, min_hole: u64, use_map: bool) -> Self {
        assert!(
            block_size > 0 && block_size % GRID == 0,
            "block size must be a multiple of {GRID}"
        );
        Self {
            size,
            block_size,
            min_hole: min_hole.max(GRID),
            use_map,
            mapped_to: 0,
            pending: VecDeque::new(),
        }
    }

    /// The next step, or None at the end of the device.
    pub fn next(
        &mut self,
        map: Option<&mut dyn AllocationMap>,
    ) -> Result<Option<Step>, DeviceError> {
        if self.pending.is_empty() {
            if self.mapped_to >= self.size {
                return Ok(None);
            }
            let start = self.mapped_to;
            let len = MAP_WINDOW.min(self.size - start);
            let raw = match (self.use_map, map) {
                (true, Some(map)) => map.extents(start, len)?,
                _ => vec![Extent {
                    offset: start,
                    len,
                    data: true,
                }],
            };
            self.pending = normalize(&raw, start, start + len, self.min_hole).into();
            self.mapped_to = start + len;
        }
        let front = self.pending.front_mut().expect("window is never empty");
        let step = if front.data {
            let len = self.block_size.min(front.len);
            Step::Read {
                offset: front.offset,
                len,
            }
        } else {
            let len = MAX_HOLE_STEP.min(front.len);
            Step::Hole {
                offset: front.offset,
                len,
            }
        };
        let taken = match step {
            Step::Read { len, .. } | Step::Hole { len, .. } => len,
        };
        front.offset += taken;
        front.len -= taken;
        if front.len == 0 {
            self.pending.pop_front();
        }
        Ok(Some(step))
    }
}

/// Rounds data extents out to the grid, merges them, and turns holes shorter
/// than `min_hole` into data. The result covers `[start, end)` exactly, with
/// alternating kinds. `start` is on the grid; `end` is on it or is the end of
/// the device.
pub fn normalize(raw: &[Extent], start: u64, end: u64, min_hole: u64) -> Vec<Extent> {
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in raw.iter().filter(|e| e.data && e.len > 0) {
        let a = (e.offset / GRID * GRID).max(start);
        let b = e.end().div_ceil(GRID).saturating_mul(GRID).min(end);
        if a >= b {
            continue;
        }
        match data.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => data.push((a, b)),
        }
    }
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |offset: u64, end: u64, is_data: bool| {
        if end <= offset {
            return;
        }
        match out.last_mut() {
            Some(last) if last.data == is_data => last.len += end - offset,
            _ => out.push(Extent {
                offset,
                len: end - offset,
                data: is_data,
            }),
        }
    };
    let mut pos = start;
    for (a, b) in data {
        // A short hole between data (not at the edges of the window) is read.
        let hole_is_short = a - pos < min_hole && pos != start;
        push(pos, a, hole_is_short);
        push(a, b, true);
        pos = b;
    }
    push(pos, end, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(offset: u64, len: u64, data: bool) -> Extent {
        Extent { offset, len, data }
    }

    #[test]
    fn rounds_data_out_to_the_grid() {
        let raw = [
            ext(0, 5000, false),
            ext(5000, 100, true),
            ext(5100, 1 << 20, false),
        ];
        let n = normalize(&raw, 0, (1 << 20) + 5100, GRID);
        assert_eq!(
            n,
            vec![
                ext(0, 4096, false),
                ext(4096, 4096, true),
                ext(8192, (1 << 20) + 5100 - 8192, false)
            ]
        );
    }

    #[test]
    fn short_holes_between_data_are_read() {
        let raw = [
            ext(0, 4096, true),
            ext(4096, 8192, false),
            ext(12288, 4096, true),
            ext(16384, 1 << 20, false),
        ];
        let n = normalize(&raw, 0, 16384 + (1 << 20), 64 << 10);
        assert_eq!(n, vec![ext(0, 16384, true), ext(16384, 1 << 20, false)]);
    }

    struct FixedMap(Vec<Extent>);
    impl AllocationMap for FixedMap {
        fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
            let end = offset + len;
            Ok(self
                .0
                .iter()
                .filter(|e| e.end() > offset && e.offset < end)
                .map(|e| {
                    let a = e.offset.max(offset);
                    let b = e.end().min(end);
                    ext(a, b - a, e.data)
                })
                .collect())
        }
    }

    fn steps(size: u64, bs: u64, map: &mut FixedMap, use_map: bool) -> Vec<Step> {
        let mut p = Planner::new(size, bs, 64 << 10, use_map);
        let mut out = Vec::new();
        while let Some(s) = p.next(Some(map)).unwrap() {
            out.push(s);
        }
        out
    }

    proptest! {
        /// Steps tile the device exactly, in order, on the grid, never longer
        /// than a block, and every byte the map calls data is read.
        #[test]
        fn steps_tile_the_device(
            size in 1u64..(3 << 20),
            bs_blocks in 1u64..64,
            cuts in proptest::collection::vec((0u64..(3 << 20), any::<bool>()), 0..20),
        ) {
            let bs = bs_blocks * GRID;
            let mut points: Vec<u64> = cuts.iter().map(|c| c.0 % size).collect();
            points.push(0);
            points.sort();
            points.dedup();
            let mut extents = Vec::new();
            for (i, &p) in points.iter().enumerate() {
                let end = points.get(i + 1).copied().unwrap_or(size);
                let data = cuts.get(i).map(|c| c.1).unwrap_or(true);
                extents.push(ext(p, end - p, data));
            }
            let mut map = FixedMap(extents.clone());
            for use_map in [true, false] {
                let s = steps(size, bs, &mut map, use_map);
                let mut pos = 0;
                for step in &s {
                    let (off, len, is_read) = match *step {
                        Step::Read { offset, len } => (offset, len, true),
                        Step::Hole { offset, len } => (offset, len, false),
                    };
                    prop_assert_eq!(off, pos);
                    prop_assert_eq!(off % GRID, 0);
                    prop_assert!(len > 0);
                    if is_read { prop_assert!(len <= bs); }
                    if off + len != size { prop_assert_eq!((off + len) % GRID, 0); }
                    if !is_read {
                        prop_assert!(use_map);
                        for e in extents.iter().filter(|e| e.data) {
                            prop_assert!(e.end() <= off || e.offset >= off + len, "hole step {:?} covers data {:?}", step, e);
                        }
                    }
                    pos = off + len;
                }
                prop_assert_eq!(pos, size);
            }
        }
    }
}
