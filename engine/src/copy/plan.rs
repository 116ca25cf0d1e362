//! Where to read and where to skip: turns a device's allocation map (and,
//! for incremental copies, the ranges known to have changed) into a
//! sequence of read, hole and skip steps on a fixed grid.
//!
//! Every step starts on the grid and (but for the last one of the device)
//! ends on it, so per-block checksums and zero detection line up whatever
//! the chunking, and a short hole between data is read rather than splitting
//! a read in two. The grid is 4 KiB, or the hash-map block size when a block
//! map is built, so that every map block is read by a single request.

use std::collections::VecDeque;

use volback_connectors::{AllocationMap, DeviceError, Extent};

/// Granularity of zero detection and of the per-block hashes.
pub const GRID: u64 = 4096;

/// How much of the device one allocation-map query covers: bounds memory on
/// a device with many extents and keeps queries cheap on a dense one.
const MAP_WINDOW: u64 = 256 << 20;

/// The largest hole handed to the writer in one step (progress stays smooth
/// and a write-zeroes request stays reasonable).
const MAX_HOLE_STEP: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read this range.
    Read { offset: u64, len: u64 },
    /// This range reads as zero on the source.
    Hole { offset: u64, len: u64 },
    /// This range is known unchanged: nothing to read or write.
    Skip { offset: u64, len: u64 },
}

pub struct Planner {
    size: u64,
    block_size: u64,
    grid: u64,
    /// Holes shorter than this are read (cheaper than an extra request).
    min_hole: u64,
    use_map: bool,
    /// Ranges still to cover, in order; everything between them is skipped.
    todo: VecDeque<(u64, u64)>,
    /// Everything before this was planned.
    pos: u64,
    pending: VecDeque<Extent>,
}

impl Planner {
    pub fn new(size: u64, block_size: u64, min_hole: u64, use_map: bool) -> Self {
        Self::with_grid(size, block_size, min_hole, use_map, GRID)
    }

    pub fn with_grid(size: u64, block_size: u64, min_hole: u64, use_map: bool, grid: u64) -> Self {
        assert!(
            grid > 0 && grid % GRID == 0,
            "grid must be a multiple of {GRID}"
        );
        assert!(
            block_size > 0 && block_size % grid == 0,
            "block size must be a multiple of the grid ({grid})"
        );
        let mut todo = VecDeque::new();
        if size > 0 {
            todo.push_back((0, size));
        }
        Self {
            size,
            block_size,
            grid,
            min_hole: min_hole.max(grid),
            use_map,
            todo,
            pos: 0,
            pending: VecDeque::new(),
        }
    }

    /// Limits the plan to `ranges` (offset, length), rounded out to the
    /// grid; the rest of the device becomes skip steps.
    pub fn restrict(&mut self, ranges: &[(u64, u64)]) {
        let mut sorted: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|r| r.1 > 0 && r.0 < self.size)
            .map(|&(o, l)| {
                (
                    o / self.grid * self.grid,
                    (o + l)
                        .div_ceil(self.grid)
                        .saturating_mul(self.grid)
                        .min(self.size),
                )
            })
            .collect();
        sorted.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in sorted {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.todo = merged.into();
    }

    /// The next step, or None at the end of the device.
    pub fn next(
        &mut self,
        map: Option<&mut dyn AllocationMap>,
    ) -> Result<Option<Step>, DeviceError> {
        if self.pending.is_empty() {
            let Some(&(start, end)) = self.todo.front() else {
                if self.pos < self.size {
                    let step = Step::Skip {
                        offset: self.pos,
                        len: self.size - self.pos,
                    };
                    self.pos = self.size;
                    return Ok(Some(step));
                }
                return Ok(None);
            };
            if self.pos < start {
                let step = Step::Skip {
                    offset: self.pos,
                    len: start - self.pos,
                };
                self.pos = start;
                return Ok(Some(step));
            }
            let len = MAP_WINDOW.min(end - self.pos);
            let window = self.pos;
            let raw = match (self.use_map, map) {
                (true, Some(map)) => map.extents(window, len)?,
                _ => vec![Extent {
                    offset: window,
                    len,
                    data: true,
                }],
            };
            self.pending = normalize(&raw, window, window + len, self.min_hole, self.grid).into();
            self.pos = window + len;
            if self.pos >= end {
                self.todo.pop_front();
            }
        }
        let front = self.pending.front_mut().expect("window is never empty");
        let step = if front.data {
            Step::Read {
                offset: front.offset,
                len: self.block_size.min(front.len),
            }
        } else {
            Step::Hole {
                offset: front.offset,
                len: MAX_HOLE_STEP.min(front.len),
            }
        };
        let (Step::Read { len, .. } | Step::Hole { len, .. } | Step::Skip { len, .. }) = step;
        front.offset += len;
        front.len -= len;
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
pub fn normalize(raw: &[Extent], start: u64, end: u64, min_hole: u64, grid: u64) -> Vec<Extent> {
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in raw.iter().filter(|e| e.data && e.len > 0) {
        let a = (e.offset / grid * grid).max(start);
        let b = e.end().div_ceil(grid).saturating_mul(grid).min(end);
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
        let n = normalize(&raw, 0, (1 << 20) + 5100, GRID, GRID);
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
        let n = normalize(&raw, 0, 16384 + (1 << 20), 64 << 10, GRID);
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
                        Step::Skip { .. } => panic!("skip step without a restriction: {step:?}"),
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

    proptest! {
        /// With a grid and a restriction, steps still tile the device on the
        /// grid, every restricted byte is read or a hole, and skipped ranges
        /// never touch a restricted byte.
        #[test]
        fn restricted_steps_cover_exactly_the_changes(
            size in 1u64..(4 << 20),
            grid_pages in prop::sample::select(vec![1u64, 4, 16, 64]),
            ranges in proptest::collection::vec((0u64..(4 << 20), 1u64..(300 << 10)), 0..8),
        ) {
            let grid = grid_pages * GRID;
            let bs = grid * 4;
            let mut p = Planner::with_grid(size, bs, 64 << 10, false, grid);
            p.restrict(&ranges);
            let mut pos = 0;
            let mut covered = Vec::new();
            while let Some(step) = p.next(None).unwrap() {
                let (Step::Read { offset, len } | Step::Hole { offset, len } | Step::Skip { offset, len }) = step;
                prop_assert_eq!(offset, pos);
                prop_assert_eq!(offset % grid, 0);
                if offset + len != size { prop_assert_eq!((offset + len) % grid, 0); }
                if let Step::Skip { .. } = step {
                    for &(o, l) in &ranges {
                        let (a, b) = (o.min(size), (o + l).min(size));
                        prop_assert!(b <= offset || a >= offset + len, "skip {:?} overlaps change ({}, {})", step, o, l);
                    }
                } else {
                    covered.push((offset, offset + len));
                }
                pos = offset + len;
            }
            prop_assert_eq!(pos, size);
            for &(o, l) in &ranges {
                let (a, b) = (o.min(size), (o + l).min(size));
                let mut x = a;
                while x < b {
                    prop_assert!(covered.iter().any(|&(c, d)| c <= x && x < d), "byte {} of a change not planned", x);
                    x += 997;
                }
            }
        }
    }
}
