//! Shared helpers for volback's integration tests.
//!
//! The tests drive the built `volback` binary on real files and loop devices,
//! so they run as root. Everything that needs cleaning up is a guard:
//! [`Scratch`] removes its directory and [`LoopDevice`] detaches its device on
//! drop, also while a failing test unwinds. [`with_scratch`] runs a test body
//! and then checks that no loop device still refers to its scratch directory.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Where scratch directories go: a disk filesystem (ext4 here), so O_DIRECT,
/// SEEK_DATA/SEEK_HOLE and loop devices with direct I/O all work. /tmp may be
/// a tmpfs elsewhere.
pub const SCRATCH_ROOT: &str = "/var/tmp";

/// Chunk size for generating and comparing data.
const CHUNK: usize = MIB as usize;

// ---------------------------------------------------------------------------
// The binary under test
// ---------------------------------------------------------------------------

/// The built `volback` binary.
///
/// Integration tests of this package cannot use `CARGO_BIN_EXE_volback` for
/// another package's binary, so it is found next to the test executable:
/// `target/<profile>/deps/<test>-<hash>` -> `target/<profile>/volback`.
/// `VOLBACK_BIN` overrides the lookup.
pub fn volback_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VOLBACK_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "VOLBACK_BIN={} is not a file", bin.display());
        return bin;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent directory")
        .to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let bin = dir.join("volback");
    assert!(
        bin.is_file(),
        "volback binary not found at {}: build it first: cargo build -p volback-engine \
         (with the same profile as the tests, e.g. --release for cargo test --release)",
        bin.display()
    );
    bin
}

/// Panics unless running as root (loop devices need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests attach loop devices and must run as root (euid is {euid})"
    );
}

// ---------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------

/// A temporary directory under [`SCRATCH_ROOT`] named `volback-test-*`,
/// removed (with its contents) on drop.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new scratch directory under [`SCRATCH_ROOT`], or under the
    /// directory in `VOLBACK_TEST_SCRATCH` (to run on another file system,
    /// e.g. XFS for reflink snapshots and change tracking).
    pub fn new() -> Scratch {
        let root = std::env::var_os("VOLBACK_TEST_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SCRATCH_ROOT));
        let dir = tempfile::Builder::new()
            .prefix("volback-test-")
            .tempdir_in(&root)
            .unwrap_or_else(|e| panic!("creating a scratch directory in {}: {e}", root.display()));
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the scratch directory (not created).
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// Tests of one test binary run in parallel threads. Timing tests take this
/// lock exclusively so that they don't measure the other tests' I/O; every
/// other test holds it shared.
static QUIET: RwLock<()> = RwLock::new(());

/// Runs a test body with a fresh scratch directory, then, once the body has
/// returned and so dropped its guards, asserts that no loop device is left
/// referring to a file in that directory. A panicking body still detaches
/// its devices (the guards drop while unwinding); the check is then skipped.
pub fn with_scratch<F: FnOnce(&Scratch)>(body: F) {
    let _shared = QUIET.read().unwrap_or_else(PoisonError::into_inner);
    scratch_body(body);
}

/// [`with_scratch`] for timing tests: waits until no other test of this
/// binary runs, flushes their dirty data, and keeps them out meanwhile.
pub fn with_quiet_scratch<F: FnOnce(&Scratch)>(body: F) {
    let _exclusive = QUIET.write().unwrap_or_else(PoisonError::into_inner);
    sync_filesystems();
    scratch_body(body);
}

/// Flushes every filesystem's dirty data (`sync`), so that a timed run
/// doesn't pay for earlier writeback.
pub fn sync_filesystems() {
    // SAFETY: sync has no preconditions and cannot fail.
    unsafe { libc::sync() };
}

fn scratch_body<F: FnOnce(&Scratch)>(body: F) {
    require_root();
    let scratch = Scratch::new();
    body(&scratch);
    assert_no_loop_devices(scratch.path());
}

// ---------------------------------------------------------------------------
// Loop devices
// ---------------------------------------------------------------------------

/// An attached loop device, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    dev: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    /// Attaches `path` to a free loop device (`losetup --find --show`), with
    /// direct I/O on the backing file if `direct_io`. Retries a few times:
    /// parallel tests race for free devices.
    pub fn attach(path: impl AsRef<Path>, direct_io: bool) -> LoopDevice {
        let path = path.as_ref();
        let mut last = String::new();
        for attempt in 0..5u64 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(50 * attempt));
            }
            let mut cmd = Command::new("losetup");
            cmd.arg("--find").arg("--show");
            if direct_io {
                cmd.arg("--direct-io=on");
            }
            cmd.arg(path);
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("running losetup (is util-linux installed?): {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let dev = stdout.trim();
            if out.status.success() && dev.starts_with("/dev/") {
                return LoopDevice {
                    dev: PathBuf::from(dev),
                    backing: path.to_path_buf(),
                };
            }
            last = format!(
                "{}\nstdout: {}\nstderr: {}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!(
            "losetup --find --show{} {} failed: {last}",
            if direct_io { " --direct-io=on" } else { "" },
            path.display()
        );
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// The backing file.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        file_size(&self.dev)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let mut last = String::new();
        for attempt in 0..10u64 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20 * attempt));
            }
            match Command::new("losetup").arg("-d").arg(&self.dev).output() {
                Ok(out) if out.status.success() => return,
                Ok(out) => {
                    last = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
                    // Busy (udev probing it, say): worth retrying. Anything
                    // else (already gone) won't get better.
                    if !last.to_ascii_lowercase().contains("busy") {
                        break;
                    }
                }
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            }
        }
        eprintln!(
            "warning: could not detach loop device {} (backing {}): {}",
            self.dev.display(),
            self.backing.display(),
            last.trim()
        );
    }
}

/// `losetup -a` lines that mention a file under `dir`.
pub fn loop_devices_referencing(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap_or_else(|e| panic!("running losetup -a: {e}"));
    assert!(
        out.status.success(),
        "losetup -a failed: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let needle = dir.to_string_lossy().into_owned();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(needle.as_str()))
        .map(str::to_owned)
        .collect()
}

/// Asserts that no loop device refers to a file under `dir`. A device whose
/// detach was deferred (the kernel auto-clears it once the last opener, such
/// as udev's probe, closes it) gets a couple of seconds to go away.
pub fn assert_no_loop_devices(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = loop_devices_referencing(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "loop devices left behind for {}:\n{}",
                dir.display(),
                left.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Data generation
// ---------------------------------------------------------------------------

/// SplitMix64: a tiny seeded PRNG, plenty for test data.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next bytes of the stream. Consecutive calls give
    /// one continuous stream as long as every call but the last fills a
    /// multiple of 8 bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            let last = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&last[..rest.len()]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    SplitMix64::new(seed).fill(&mut buf);
    buf
}

/// Writes `len` pseudo-random bytes from `seed` at `offset` of `file`.
pub fn write_pattern(file: &File, offset: u64, len: u64, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all_at(&buf[..n], offset + done)
            .unwrap_or_else(|e| panic!("writing {n} bytes at {}: {e}", offset + done));
        done += n as u64;
    }
}

/// Writes `len` copies of `byte` at `offset` of `file`. With `byte == 0`
/// these are explicitly written (allocated) zeroes, not a hole.
pub fn write_bytes(file: &File, offset: u64, len: u64, byte: u8) {
    let buf = vec![byte; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.write_all_at(&buf[..n], offset + done)
            .unwrap_or_else(|e| panic!("writing {n} bytes at {}: {e}", offset + done));
        done += n as u64;
    }
}

/// What a [`Region`] is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Pseudo-random bytes from this seed (no zero blocks in practice).
    Random(u64),
    /// This byte everywhere; `Byte(0)` is explicitly written zeroes.
    Byte(u8),
}

/// A range of a test file written with known content. Ranges not covered by
/// any region are holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
    pub fill: Fill,
}

impl Region {
    pub fn random(offset: u64, len: u64, seed: u64) -> Region {
        Region {
            offset,
            len,
            fill: Fill::Random(seed),
        }
    }

    /// Explicitly written zeroes (allocated, unlike a hole).
    pub fn zeros(offset: u64, len: u64) -> Region {
        Region {
            offset,
            len,
            fill: Fill::Byte(0),
        }
    }

    pub fn byte(offset: u64, len: u64, byte: u8) -> Region {
        Region {
            offset,
            len,
            fill: Fill::Byte(byte),
        }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes, writes the
/// regions in order and syncs it, so that allocation maps and direct I/O see
/// the data.
pub fn create_file(path: impl AsRef<Path>, size: u64, regions: &[Region]) {
    let path = path.as_ref();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.set_len(size)
        .unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
    for region in regions {
        assert!(
            region.end() <= size,
            "region {region:?} goes past the end of {} ({size} bytes)",
            path.display()
        );
    }
    write_regions(&file, regions);
    file.sync_all()
        .unwrap_or_else(|e| panic!("syncing {}: {e}", path.display()));
}

/// Writes the regions, in order, into an open file or device (no sync).
pub fn write_regions(file: &File, regions: &[Region]) {
    for region in regions {
        match region.fill {
            Fill::Random(seed) => write_pattern(file, region.offset, region.len, seed),
            Fill::Byte(byte) => write_bytes(file, region.offset, region.len, byte),
        }
    }
}

/// A fully written file of pseudo-random bytes.
pub fn create_random_file(path: impl AsRef<Path>, size: u64, seed: u64) {
    create_file(path, size, &[Region::random(0, size, seed)]);
}

/// A fully written file with `byte` everywhere.
pub fn create_filled_file(path: impl AsRef<Path>, size: u64, byte: u8) {
    create_file(path, size, &[Region::byte(0, size, byte)]);
}

/// An empty sparse file of `size` bytes (all hole).
pub fn create_sparse_file(path: impl AsRef<Path>, size: u64) {
    create_file(path, size, &[]);
}

/// Bytes of [`Fill::Random`] data in `regions` (assumes they don't overlap).
pub fn random_data_bytes(regions: &[Region]) -> u64 {
    regions
        .iter()
        .filter(|r| matches!(r.fill, Fill::Random(_)))
        .map(|r| r.len)
        .sum()
}

/// Copies a file (or device) byte for byte into a new regular file, e.g. to
/// keep the original content of a destination.
pub fn snapshot(from: impl AsRef<Path>, to: impl AsRef<Path>) {
    let (from, to) = (from.as_ref(), to.as_ref());
    let mut src = File::open(from).unwrap_or_else(|e| panic!("opening {}: {e}", from.display()));
    let mut dst = File::create(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    std::io::copy(&mut src, &mut dst)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}

// ---------------------------------------------------------------------------
// Inspecting files and devices
// ---------------------------------------------------------------------------

fn open_read(path: &Path) -> File {
    File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// Size in bytes of a regular file or a block device.
pub fn file_size(path: impl AsRef<Path>) -> u64 {
    let path = path.as_ref();
    open_read(path)
        .seek(SeekFrom::End(0))
        .unwrap_or_else(|e| panic!("seeking to the end of {}: {e}", path.display()))
}

/// Bytes actually allocated to a file (`st_blocks * 512`).
pub fn allocated_bytes(path: impl AsRef<Path>) -> u64 {
    let path = path.as_ref();
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// The data extents of a regular file, by SEEK_DATA / SEEK_HOLE.
pub fn data_extents(path: impl AsRef<Path>) -> Vec<Range<u64>> {
    let path = path.as_ref();
    let file = open_read(path);
    let size = file.metadata().expect("fstat").len();
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> Option<u64> {
        // SAFETY: lseek on an fd we own; no memory is touched.
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return None;
            }
            panic!("lseek({}, {pos}, {whence}): {err}", path.display());
        }
        Some(r as u64)
    };
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(pos, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(size);
        extents.push(start..end);
        pos = end;
    }
    extents
}

/// Whether any data extent of `path` overlaps `range`.
pub fn has_data_in(path: impl AsRef<Path>, range: Range<u64>) -> bool {
    data_extents(path)
        .iter()
        .any(|e| e.start < range.end && range.start < e.end)
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The first offset in `range` where `a` and `b` differ, reading both with
/// std::fs in 1 MiB chunks. If one of them ends inside the range, the offset
/// where it ends counts as a difference.
pub fn first_difference_in(
    a: impl AsRef<Path>,
    b: impl AsRef<Path>,
    range: Range<u64>,
) -> Option<u64> {
    let (a, b) = (a.as_ref(), b.as_ref());
    let (mut fa, mut fb) = (open_read(a), open_read(b));
    fa.seek(SeekFrom::Start(range.start))
        .unwrap_or_else(|e| panic!("seeking {}: {e}", a.display()));
    fb.seek(SeekFrom::Start(range.start))
        .unwrap_or_else(|e| panic!("seeking {}: {e}", b.display()));
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut pos = range.start;
    while pos < range.end {
        let want = (range.end - pos).min(CHUNK as u64) as usize;
        let na = read_full(&mut fa, &mut ba[..want])
            .unwrap_or_else(|e| panic!("reading {} at {pos}: {e}", a.display()));
        let nb = read_full(&mut fb, &mut bb[..want])
            .unwrap_or_else(|e| panic!("reading {} at {pos}: {e}", b.display()));
        let n = na.min(nb);
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .expect("slices differ");
            return Some(pos + i as u64);
        }
        if n < want {
            return Some(pos + n as u64);
        }
        pos += want as u64;
    }
    None
}

/// The first offset below `len` where `a` and `b` differ.
pub fn first_difference(a: impl AsRef<Path>, b: impl AsRef<Path>, len: u64) -> Option<u64> {
    first_difference_in(a, b, 0..len)
}

/// Whether the first `len` bytes of `a` and `b` are equal.
pub fn files_equal(a: impl AsRef<Path>, b: impl AsRef<Path>, len: u64) -> bool {
    first_difference(a, b, len).is_none()
}

/// Up to `len` bytes of `path` at `offset` (fewer at end of file).
pub fn read_at(path: impl AsRef<Path>, offset: u64, len: usize) -> Vec<u8> {
    let path = path.as_ref();
    let mut file = open_read(path);
    file.seek(SeekFrom::Start(offset))
        .unwrap_or_else(|e| panic!("seeking {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    let n = read_full(&mut file, &mut buf)
        .unwrap_or_else(|e| panic!("reading {} at {offset}: {e}", path.display()));
    buf.truncate(n);
    buf
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for b in bytes {
        let _ = write!(s, "{b:02x} ");
    }
    s.trim_end().to_owned()
}

/// Asserts that `range` of `actual` equals the same range of `expected`,
/// showing the first difference and the bytes around it otherwise.
pub fn assert_same_in(expected: impl AsRef<Path>, actual: impl AsRef<Path>, range: Range<u64>) {
    let (expected, actual) = (expected.as_ref(), actual.as_ref());
    if let Some(at) = first_difference_in(expected, actual, range.clone()) {
        let from = at.saturating_sub(8).max(range.start);
        panic!(
            "{} differs from {} in bytes {range:?}: first difference at offset {at} \
             ({at:#x}, {} MiB + {})\n  expected from {from}: {}\n  actual   from {from}: {}",
            actual.display(),
            expected.display(),
            at / MIB,
            at % MIB,
            hex(&read_at(expected, from, 24)),
            hex(&read_at(actual, from, 24)),
        );
    }
}

/// Asserts that the first `len` bytes of `actual` equal those of `expected`.
pub fn assert_same(expected: impl AsRef<Path>, actual: impl AsRef<Path>, len: u64) {
    assert_same_in(expected, actual, 0..len);
}

// ---------------------------------------------------------------------------
// Running volback
// ---------------------------------------------------------------------------

/// A `volback` command with `args`, ready for extra environment.
pub fn volback_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(volback_bin());
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// Runs `volback` with `args` and returns its output.
pub fn run_volback<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(volback_command(args)).output
}

/// One finished run of a command.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub command: String,
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Run {
    pub fn status(&self) -> ExitStatus {
        self.output.status
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// The command, exit status and full output, for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {} (after {:.3} s)\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.command,
            self.output.status,
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Panics (showing everything) unless the command succeeded.
    pub fn assert_success(self) -> Run {
        assert!(self.success(), "expected success\n{}", self.describe());
        self
    }

    /// Panics unless the command failed cleanly: a non-zero exit code, not a
    /// signal, not a Rust panic.
    pub fn assert_failure(self) -> Run {
        assert!(!self.success(), "expected failure\n{}", self.describe());
        assert!(
            self.output.status.code().is_some(),
            "expected a clean failure, got killed by a signal\n{}",
            self.describe()
        );
        assert!(
            !self.stderr.contains("panicked at"),
            "expected a clean error, got a panic\n{}",
            self.describe()
        );
        self
    }

    /// Stdout parsed as JSON lines; see [`json_lines`].
    pub fn json_lines(&self) -> Vec<Value> {
        json_lines(&self.stdout).unwrap_or_else(|e| panic!("{e}\n{}", self.describe()))
    }

    /// The final `"event":"summary"` object of `--progress json` output.
    pub fn summary(&self) -> Value {
        let lines = self.json_lines();
        let Some(last) = lines.last() else {
            panic!("no JSON lines on stdout\n{}", self.describe());
        };
        assert_eq!(
            last.get("event").and_then(Value::as_str),
            Some("summary"),
            "last stdout line is not the summary\n{}",
            self.describe()
        );
        last.clone()
    }
}

/// Quotes an argument for display if it needs it.
fn shell_word(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` to completion, capturing its output and wall time.
pub fn run(mut cmd: Command) -> Run {
    let mut command = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let _ = write!(command, "{}={} ", shell_word(key), shell_word(value));
        }
    }
    command.push_str(&shell_word(cmd.get_program()));
    for arg in cmd.get_args() {
        command.push(' ');
        command.push_str(&shell_word(arg));
    }
    let start = Instant::now();
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {command}: {e}"));
    let elapsed = start.elapsed();
    Run {
        command,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        output,
        elapsed,
    }
}

/// Runs `volback` with `args` and asserts it succeeded.
pub fn volback_ok<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(volback_command(args)).assert_success()
}

/// Runs `volback` with `args` and asserts it failed cleanly.
pub fn volback_err<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(volback_command(args)).assert_failure()
}

/// Parses every non-empty line of `stdout` as a JSON object.
pub fn json_lines(stdout: &str) -> Result<Vec<Value>, String> {
    stdout
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => Ok(v),
            Ok(_) => Err(format!(
                "stdout line {} is JSON but not an object: {line}",
                i + 1
            )),
            Err(e) => Err(format!("stdout line {} is not JSON ({e}): {line}", i + 1)),
        })
        .collect()
}

/// `object[field]` as a u64; panics naming the field otherwise.
pub fn json_u64(object: &Value, field: &str) -> u64 {
    match object.get(field) {
        Some(v) => v
            .as_u64()
            .unwrap_or_else(|| panic!("field {field:?} is not an unsigned integer in {object}")),
        None => panic!("field {field:?} missing from {object}"),
    }
}

/// `object[field]` as an f64; panics naming the field otherwise.
pub fn json_f64(object: &Value, field: &str) -> f64 {
    match object.get(field) {
        Some(v) => v
            .as_f64()
            .unwrap_or_else(|| panic!("field {field:?} is not a number in {object}")),
        None => panic!("field {field:?} missing from {object}"),
    }
}

/// A path as an argument string (test paths are always UTF-8).
pub fn arg(path: impl AsRef<Path>) -> String {
    path.as_ref()
        .to_str()
        .expect("test paths are UTF-8")
        .to_owned()
}

// ---------------------------------------------------------------------------
// volback installations: configuration, pools, catalog
// ---------------------------------------------------------------------------

/// The configuration of an [`Installation`]: backend `primary` (file pools
/// `gold` and `silver`), backend `backup` (pool `vault`), default target
/// `backup:vault`, the given catalog, and `backup_extra` appended to the
/// `backup:` section (indented lines such as `"  bwlimit: 8M\n"`). Pool
/// paths are relative to the configuration file's directory.
pub fn installation_yaml(catalog: &str, backup_extra: &str) -> String {
    format!(
        "backends:
  - name: primary
    driver: file
    pools:
      gold: primary/gold
      silver: primary/silver
  - name: backup
    driver: file
    pools:
      vault: backup/vault
backup:
  default_target: backup:vault
  catalog: {catalog}
{backup_extra}"
    )
}

/// A volback installation in a directory: the pool directories
/// `primary/gold`, `primary/silver` and `backup/vault`, and a configuration
/// file naming them (see [`installation_yaml`]). Every command run through
/// it gets `--config`.
#[derive(Debug, Clone)]
pub struct Installation {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Installation {
    /// Pools in the scratch directory, configuration `volback.yaml`,
    /// catalog `catalog.db`.
    pub fn new(scratch: &Scratch) -> Installation {
        Installation::create(scratch.path(), "volback.yaml", "catalog.db", "")
    }

    /// Creates the pool directories under `dir` (if missing) and writes the
    /// configuration file `config_name` there.
    pub fn create(
        dir: &Path,
        config_name: &str,
        catalog: &str,
        backup_extra: &str,
    ) -> Installation {
        for pool in ["primary/gold", "primary/silver", "backup/vault"] {
            let p = dir.join(pool);
            std::fs::create_dir_all(&p)
                .unwrap_or_else(|e| panic!("creating pool directory {}: {e}", p.display()));
        }
        let config = dir.join(config_name);
        std::fs::write(&config, installation_yaml(catalog, backup_extra))
            .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        Installation {
            dir: dir.to_path_buf(),
            config,
        }
    }

    /// Another configuration file over the same pools (another catalog, a
    /// bandwidth limit, ...).
    pub fn sibling(&self, config_name: &str, catalog: &str, backup_extra: &str) -> Installation {
        Installation::create(&self.dir, config_name, catalog, backup_extra)
    }

    /// The directory of pool `backend:pool`.
    pub fn pool_dir(&self, pool: &str) -> PathBuf {
        let (backend, name) = pool
            .split_once(':')
            .unwrap_or_else(|| panic!("{pool:?} is not BACKEND:POOL"));
        self.dir.join(backend).join(name)
    }

    /// The image file of volume `id` on `backend:pool`.
    pub fn volume_img(&self, pool: &str, id: &str) -> PathBuf {
        self.pool_dir(pool).join(format!("volume-{id}.img"))
    }

    /// The sidecar of volume `id` on `backend:pool`.
    pub fn volume_json(&self, pool: &str, id: &str) -> PathBuf {
        self.pool_dir(pool).join(format!("volume-{id}.json"))
    }

    /// `volback --config CONFIG args...`, not run yet.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = volback_command(["--config".as_ref(), self.config.as_os_str()]);
        cmd.args(args);
        cmd
    }

    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.command(args))
    }

    /// Runs and asserts success.
    pub fn ok<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run(args).assert_success()
    }

    /// Runs and asserts a clean failure.
    pub fn err<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run(args).assert_failure()
    }

    /// Runs a command printing one JSON document and parses it.
    pub fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let r = self.ok(args);
        serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e})\n{}", r.describe()))
    }

    /// `volume create POOL --size SIZE --name NAME --json`; returns the id.
    pub fn create_volume(&self, pool: &str, name: &str, size: u64) -> String {
        let size = size.to_string();
        let v = self.json([
            "volume", "create", pool, "--size", &size, "--name", name, "--json",
        ]);
        json_str(&v["volume"], "id").to_owned()
    }

    /// `backup list --json`.
    pub fn backups(&self) -> Vec<Value> {
        match self.json(["backup", "list", "--json"]) {
            Value::Array(list) => list,
            other => panic!("backup list --json is not an array: {other}"),
        }
    }

    /// `backup show ID --json`.
    pub fn show_backup(&self, id: &str) -> Value {
        self.json(["backup", "show", id, "--json"])
    }

    /// `volume attach POOL/ID`, detached again when the guard drops.
    pub fn attach(&self, pool: &str, id: &str) -> AttachedVolume {
        let spec = format!("{pool}/{id}");
        let v = self.json(["volume", "attach", spec.as_str(), "--json"]);
        let dev = PathBuf::from(json_str(&v, "path"));
        AttachedVolume {
            installation: self.clone(),
            spec,
            image: self.volume_img(pool, id),
            dev,
        }
    }
}

/// `object[field]` as a string; panics naming the field otherwise.
pub fn json_str<'a>(object: &'a Value, field: &str) -> &'a str {
    match object.get(field) {
        Some(v) => v
            .as_str()
            .unwrap_or_else(|| panic!("field {field:?} is not a string in {object}")),
        None => panic!("field {field:?} missing from {object}"),
    }
}

/// The names of the files in a directory, sorted.
pub fn dir_entries(dir: impl AsRef<Path>) -> Vec<String> {
    let dir = dir.as_ref();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// The backing file of a loop device, from sysfs (None if it is unbound).
pub fn loop_backing_file(dev: impl AsRef<Path>) -> Option<PathBuf> {
    let name = dev.as_ref().file_name()?.to_str()?.to_owned();
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// Detaches (`losetup -d`) every loop device whose `losetup -a` line
/// mentions `dir`; returns how many it tried.
pub fn detach_loop_devices_under(dir: &Path) -> usize {
    let lines = loop_devices_referencing(dir);
    for line in &lines {
        if let Some((dev, _)) = line.split_once(':') {
            let _ = Command::new("losetup").arg("-d").arg(dev).output();
        }
    }
    lines.len()
}

/// A volume attached with `volume attach`: `volume detach` on drop, and any
/// loop device still on its image detached with losetup.
#[derive(Debug)]
pub struct AttachedVolume {
    installation: Installation,
    spec: String,
    image: PathBuf,
    dev: PathBuf,
}

impl AttachedVolume {
    /// The device `volume attach` printed.
    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// Whether the device is still attached to the volume's image.
    pub fn still_attached(&self) -> bool {
        loop_backing_file(&self.dev).is_some_and(|b| b == self.image)
    }
}

impl Drop for AttachedVolume {
    fn drop(&mut self) {
        let r = self
            .installation
            .run(["volume", "detach", self.spec.as_str()]);
        if !r.success() {
            eprintln!("warning: cleanup: {}", r.describe());
        }
        detach_loop_devices_under(&self.image);
    }
}

/// On drop while a test panics, detaches every loop device referring to a
/// file under the directory (what a crashed or failed volback left), so the
/// scratch directory can go. On a normal drop it does nothing: leaks are
/// then for [`with_scratch`] to find.
pub struct LoopSweeper {
    dir: PathBuf,
}

impl LoopSweeper {
    pub fn new(dir: impl AsRef<Path>) -> LoopSweeper {
        LoopSweeper {
            dir: dir.as_ref().to_path_buf(),
        }
    }
}

impl Drop for LoopSweeper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for _ in 0..5 {
                if detach_loop_devices_under(&self.dir) == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A bind mount (`mount --bind SOURCE TARGET`), unmounted on drop.
#[derive(Debug)]
pub struct BindMount {
    target: PathBuf,
}

impl BindMount {
    pub fn new(source: impl AsRef<Path>, target: impl AsRef<Path>) -> BindMount {
        let (source, target) = (source.as_ref(), target.as_ref());
        let r = run({
            let mut cmd = Command::new("mount");
            cmd.arg("--bind").arg(source).arg(target);
            cmd
        });
        assert!(r.success(), "bind mount failed\n{}", r.describe());
        BindMount {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        for attempt in 0..10u64 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(50 * attempt));
            }
            match Command::new("umount").arg(&self.target).output() {
                Ok(out) if out.status.success() => return,
                _ => {}
            }
        }
        // Last resort: detach it lazily so the scratch directory's removal
        // cannot recurse into the mounted directory.
        let _ = Command::new("umount").arg("-l").arg(&self.target).output();
        eprintln!("warning: {} was unmounted lazily", self.target.display());
    }
}

/// A spawned process, killed (SIGKILL) and reaped on drop if still running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_stream_is_continuous_across_fills() {
        let whole = random_bytes(100, 7);
        let mut rng = SplitMix64::new(7);
        let mut parts = vec![0u8; 100];
        rng.fill(&mut parts[..64]);
        rng.fill(&mut parts[64..]);
        assert_eq!(whole, parts);
        assert_ne!(random_bytes(100, 8), whole);
    }

    #[test]
    fn compare_finds_first_difference_and_short_files() {
        let scratch = Scratch::new();
        let (a, b) = (scratch.join("a"), scratch.join("b"));
        create_random_file(&a, 3 * MIB + 5, 1);
        create_random_file(&b, 3 * MIB + 5, 1);
        assert!(files_equal(&a, &b, 3 * MIB + 5));
        let f = OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&[read_at(&a, 2 * MIB + 3, 1)[0] ^ 1], 2 * MIB + 3)
            .unwrap();
        assert_eq!(first_difference(&a, &b, 3 * MIB + 5), Some(2 * MIB + 3));
        assert_eq!(first_difference(&a, &b, 2 * MIB + 3), None);
        f.set_len(MIB).unwrap();
        assert_eq!(first_difference(&a, &b, 3 * MIB), Some(MIB));
    }

    #[test]
    fn loop_device_guard_detaches_even_on_panic() {
        require_root();
        let scratch = Scratch::new();
        let img = scratch.join("img");
        create_random_file(&img, 4 * MIB, 3);
        {
            let dev = LoopDevice::attach(&img, true);
            assert_eq!(dev.size(), 4 * MIB);
            assert!(files_equal(&img, dev.path(), 4 * MIB));
            assert_eq!(loop_devices_referencing(scratch.path()).len(), 1);
        }
        assert_no_loop_devices(scratch.path());

        let result = std::panic::catch_unwind(|| {
            let _dev = LoopDevice::attach(&img, false);
            panic!("test body fails");
        });
        assert!(result.is_err());
        assert_no_loop_devices(scratch.path());
    }

    #[test]
    fn sparse_files_have_holes() {
        let scratch = Scratch::new();
        let path = scratch.join("sparse");
        create_file(
            &path,
            64 * MIB,
            &[
                Region::random(0, 64 * KIB, 1),
                Region::zeros(64 * KIB, 4 * KIB),
                Region::random(32 * MIB, 4 * KIB, 2),
            ],
        );
        assert_eq!(file_size(&path), 64 * MIB);
        assert!(allocated_bytes(&path) < MIB);
        let extents = data_extents(&path);
        assert_eq!(extents.first().map(|e| e.start), Some(0));
        assert!(has_data_in(&path, 32 * MIB..32 * MIB + 1));
        assert!(!has_data_in(&path, MIB..32 * MIB));
    }
}

// ---------------------------------------------------------------------------
// tgt: a tgtd per test, through fixtures/tgt.sh
// ---------------------------------------------------------------------------

pub mod tgt;
pub use tgt::TgtDaemon;

// ---------------------------------------------------------------------------
// Ceph: the test clusters that fixtures/test.sh starts with fixtures/ceph.sh
// ---------------------------------------------------------------------------

pub use ceph::*;

/// Helpers for tests against the two throwaway Ceph clusters of
/// `fixtures/test.sh`: cluster A (pools `rbd`, `volumes`, `backups`) and
/// cluster B (pools `rbd`, `backups`), both without cephx, each reached
/// through nothing but its `ceph.conf` ([`ceph_conf`]). Test images are
/// [`RbdImage`] guards, removed with their snapshots on drop, also while a
/// failing test unwinds. Everything goes through the `rbd` CLI.
///
/// Diff granularity on these (bluestore) OSDs: a write inside the part of an
/// object that existed at the snapshot shows up in `rbd diff` as exactly its
/// extent; a write to an object that did not exist at the snapshot shows up
/// as `[object start, end of the write)`, and one past the object's old end as
/// `[old end, end of the write)`. Tests asserting exact extents should first
/// fill the image (see [`RbdImage::fill`]) and snapshot after that.
pub mod ceph {
    use std::ffi::OsStr;
    use std::io::Write as _;
    use std::ops::Range;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use crate::{run, Run, MIB};

    /// The `ceph.conf` of test cluster `'A'` or `'B'`, from the environment
    /// variable `VOLBACK_TEST_CEPH_A` / `VOLBACK_TEST_CEPH_B` that
    /// `fixtures/test.sh` sets. Panics if it is unset or names no file: a
    /// Ceph test never skips silently.
    pub fn ceph_conf(cluster: char) -> PathBuf {
        let cluster = cluster.to_ascii_uppercase();
        assert!(
            matches!(cluster, 'A' | 'B'),
            "the test Ceph clusters are 'A' and 'B', not {cluster:?}"
        );
        let var = format!("VOLBACK_TEST_CEPH_{cluster}");
        let why = match std::env::var_os(&var) {
            Some(conf) if Path::new(&conf).is_file() => return PathBuf::from(conf),
            Some(conf) => format!("{var}={} is not a file", conf.to_string_lossy()),
            None => format!("{var} is not set"),
        };
        panic!(
            "Ceph cluster {cluster} not running: run the tests through fixtures/test.sh \
             (which starts it) ({why})"
        );
    }

    /// An `rbd --conf CONF` command. The client gives up connecting after
    /// 30 s and an operation after 120 s, so that a dead cluster fails the
    /// test instead of hanging it.
    pub fn rbd_command(conf: &Path) -> Command {
        let mut cmd = Command::new("rbd");
        cmd.arg("--conf")
            .arg(conf)
            .args(["--client-mount-timeout", "30"])
            .args(["--rados-osd-op-timeout", "120"])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `rbd --conf CONF ARGS...`.
    pub fn rbd_run<I, S>(conf: &Path, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = rbd_command(conf);
        cmd.args(args);
        run(cmd)
    }

    /// Runs `rbd --conf CONF ARGS...` and asserts it succeeded.
    pub fn rbd_ok<I, S>(conf: &Path, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        rbd_run(conf, args).assert_success()
    }

    /// `base-PID-N`: a name no other test (of this or another test process)
    /// uses, for images and snapshots.
    pub fn unique_name(base: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("{base}-{}-{n}", std::process::id())
    }

    /// Writes `data` at `offset` of image `pool/image` (which must be large
    /// enough): `rbd import-diff -` of a diff stream holding one write record
    /// and nothing else, so the image's size and snapshots stay as they are.
    pub fn rbd_write(conf: &Path, pool: &str, image: &str, offset: u64, data: &[u8]) {
        let mut stream = Vec::with_capacity(data.len() + 64);
        stream.extend_from_slice(b"rbd diff v1\n");
        stream.push(b'w');
        stream.extend_from_slice(&offset.to_le_bytes());
        stream.extend_from_slice(&(data.len() as u64).to_le_bytes());
        stream.extend_from_slice(data);
        stream.push(b'e');
        import_diff(conf, &format!("{pool}/{image}"), &stream);
    }

    /// Discards `len` bytes at `offset` of image `pool/image` (a zero record
    /// of a diff stream): they read as zeroes and whole objects are freed.
    pub fn rbd_discard(conf: &Path, pool: &str, image: &str, offset: u64, len: u64) {
        let mut stream = Vec::with_capacity(64);
        stream.extend_from_slice(b"rbd diff v1\n");
        stream.push(b'z');
        stream.extend_from_slice(&offset.to_le_bytes());
        stream.extend_from_slice(&len.to_le_bytes());
        stream.push(b'e');
        import_diff(conf, &format!("{pool}/{image}"), &stream);
    }

    fn import_diff(conf: &Path, spec: &str, stream: &[u8]) {
        let mut cmd = rbd_command(conf);
        cmd.args(["import-diff", "--no-progress", "-", spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running rbd (is ceph-common installed?): {e}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        // Fed from a thread: rbd may fill its stderr pipe before reading it all.
        let feed = std::thread::scope(|s| {
            let feeder = s.spawn(move || stdin.write_all(stream));
            let output = child.wait_with_output();
            (feeder.join().expect("feeder thread"), output)
        });
        let output = feed
            .1
            .unwrap_or_else(|e| panic!("waiting for rbd import-diff: {e}"));
        assert!(
            output.status.success() && feed.0.is_ok(),
            "rbd import-diff - {spec} failed: {} (writing its input: {:?})\n{}",
            output.status,
            feed.0,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The whole content of `spec` (`pool/image` or `pool/image@snap`):
    /// `rbd export SPEC -`.
    pub fn rbd_export(conf: &Path, spec: &str) -> Vec<u8> {
        let mut cmd = rbd_command(conf);
        cmd.args(["export", "--no-progress", spec, "-"]);
        let r = run(cmd);
        // Not r.describe(): stdout is the image.
        assert!(
            r.success(),
            "{} failed: {}\n{}",
            r.command,
            r.status(),
            r.stderr.trim_end()
        );
        r.output.stdout
    }

    /// Exports `spec` into the file `path` (which must not exist).
    pub fn rbd_export_to(conf: &Path, spec: &str, path: &Path) {
        rbd_ok(
            conf,
            [
                "export".as_ref(),
                "--no-progress".as_ref(),
                OsStr::new(spec),
                path.as_os_str(),
            ],
        );
    }

    /// One extent of `rbd diff`: `exists == false` means it reads as zeroes
    /// (discarded, or the object is gone).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct RbdExtent {
        pub range: Range<u64>,
        pub exists: bool,
    }

    /// `rbd diff [--from-snap FROM] SPEC`: the extents changed since
    /// `from_snap` (or allocated at all, without one). `SPEC` may name a
    /// snapshot (`pool/image@snap`) as the end point.
    pub fn rbd_diff(conf: &Path, spec: &str, from_snap: Option<&str>) -> Vec<RbdExtent> {
        let mut args = vec!["diff", "--format", "json"];
        if let Some(from) = from_snap {
            args.extend(["--from-snap", from]);
        }
        args.push(spec);
        let r = rbd_ok(conf, args);
        let v: Value = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("rbd diff output is not JSON ({e})\n{}", r.describe()));
        let Value::Array(list) = v else {
            panic!("rbd diff output is not a JSON array\n{}", r.describe());
        };
        list.iter()
            .map(|e| {
                let offset = crate::json_u64(e, "offset");
                let len = crate::json_u64(e, "length");
                let exists = match e.get("exists") {
                    Some(Value::String(s)) => s == "true",
                    Some(Value::Bool(b)) => *b,
                    _ => panic!("no \"exists\" in {e}"),
                };
                RbdExtent {
                    range: offset..offset + len,
                    exists,
                }
            })
            .collect()
    }

    /// The snapshots of `pool/image`, as `rbd snap ls --format json` lists
    /// them (objects with "name", "id", "size", "protected", ...).
    pub fn rbd_snaps(conf: &Path, spec: &str) -> Vec<Value> {
        let r = rbd_ok(conf, ["snap", "ls", "--format", "json", spec]);
        match serde_json::from_str(r.stdout.trim()) {
            Ok(Value::Array(list)) => list,
            _ => panic!("rbd snap ls output is not a JSON array\n{}", r.describe()),
        }
    }

    /// Whether image `pool/image` exists.
    pub fn rbd_exists(conf: &Path, pool: &str, image: &str) -> bool {
        let r = rbd_ok(conf, ["ls", "--format", "json", pool]);
        let names: Vec<String> = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("rbd ls output is not a JSON list ({e})\n{}", r.describe()));
        names.iter().any(|n| n == image)
    }

    /// An RBD image made for a test, removed on drop (snapshots unprotected
    /// and purged first), also while a failing test unwinds.
    #[derive(Debug)]
    pub struct RbdImage {
        conf: PathBuf,
        pool: String,
        name: String,
    }

    impl RbdImage {
        /// Creates an empty image of `size` bytes named `base-PID-N` (see
        /// [`unique_name`]) in `pool`: `rbd create --size SIZE`, with the
        /// default features (layering, exclusive-lock, object-map, fast-diff,
        /// deep-flatten).
        pub fn create(conf: &Path, pool: &str, base: &str, size: u64) -> RbdImage {
            let image = RbdImage::adopt(conf, pool, &unique_name(base));
            // --size takes MiB unless given a unit; B keeps any byte count.
            rbd_ok(
                conf,
                ["create", "--size", &format!("{size}B"), &image.spec()],
            );
            image
        }

        /// Imports the file `path` as a new image named `base-PID-N`: `rbd
        /// import` (which skips zero runs: they stay unallocated).
        pub fn import(conf: &Path, pool: &str, base: &str, path: &Path) -> RbdImage {
            let image = RbdImage::adopt(conf, pool, &unique_name(base));
            rbd_ok(
                conf,
                [
                    "import".as_ref(),
                    "--no-progress".as_ref(),
                    path.as_os_str(),
                    image.spec().as_ref(),
                ],
            );
            image
        }

        /// Takes charge of the image `pool/name` (created by volback, say),
        /// which need not exist yet: it is removed on drop if it exists then.
        pub fn adopt(conf: &Path, pool: &str, name: &str) -> RbdImage {
            RbdImage {
                conf: conf.to_path_buf(),
                pool: pool.to_owned(),
                name: name.to_owned(),
            }
        }

        pub fn conf(&self) -> &Path {
            &self.conf
        }

        pub fn pool(&self) -> &str {
            &self.pool
        }

        /// The image's full name (`base-PID-N`).
        pub fn name(&self) -> &str {
            &self.name
        }

        /// `pool/name`.
        pub fn spec(&self) -> String {
            format!("{}/{}", self.pool, self.name)
        }

        /// `pool/name@snap`.
        pub fn snap_spec(&self, snap: &str) -> String {
            format!("{}/{}@{snap}", self.pool, self.name)
        }

        /// The size in bytes (`rbd info`).
        pub fn size(&self) -> u64 {
            let r = rbd_ok(&self.conf, ["info", "--format", "json", &self.spec()]);
            let v: Value = serde_json::from_str(r.stdout.trim())
                .unwrap_or_else(|e| panic!("rbd info output is not JSON ({e})\n{}", r.describe()));
            crate::json_u64(&v, "size")
        }

        /// Writes `data` at `offset` (see [`rbd_write`]).
        pub fn write(&self, offset: u64, data: &[u8]) {
            rbd_write(&self.conf, &self.pool, &self.name, offset, data);
        }

        /// Discards `len` bytes at `offset` (see [`rbd_discard`]).
        pub fn discard(&self, offset: u64, len: u64) {
            rbd_discard(&self.conf, &self.pool, &self.name, offset, len);
        }

        /// Writes the whole image with pseudo-random data from `seed`
        /// ([`crate::random_bytes`] of the image's size, in 4 MiB writes),
        /// so that every object exists fully and later diffs are exact.
        pub fn fill(&self, seed: u64) -> Vec<u8> {
            let data = crate::random_bytes(self.size() as usize, seed);
            for (i, chunk) in data.chunks(4 * MIB as usize).enumerate() {
                self.write(i as u64 * 4 * MIB, chunk);
            }
            data
        }

        /// `rbd snap create pool/name@snap`.
        pub fn snap_create(&self, snap: &str) {
            rbd_ok(
                &self.conf,
                ["snap", "create", "--no-progress", &self.snap_spec(snap)],
            );
        }

        /// The image's content ([`rbd_export`]).
        pub fn export(&self) -> Vec<u8> {
            rbd_export(&self.conf, &self.spec())
        }

        /// The content of snapshot `snap`.
        pub fn export_snap(&self, snap: &str) -> Vec<u8> {
            rbd_export(&self.conf, &self.snap_spec(snap))
        }

        /// `rbd diff` of the image since `from_snap` (see [`rbd_diff`]).
        pub fn diff(&self, from_snap: Option<&str>) -> Vec<RbdExtent> {
            rbd_diff(&self.conf, &self.spec(), from_snap)
        }

        /// Removes the image now, snapshots first; Ok(false) if it did not
        /// exist. Retries for up to 45 s while the image still has watchers
        /// (a killed client's watch lasts ~30 s).
        pub fn remove(&self) -> Result<bool, String> {
            let spec = self.spec();
            let r = rbd_run(&self.conf, ["snap", "ls", "--format", "json", &spec]);
            if !r.success() {
                if r.stderr.contains("No such file") {
                    return Ok(false);
                }
                return Err(r.describe());
            }
            let snaps: Vec<Value> = serde_json::from_str(r.stdout.trim()).unwrap_or_default();
            for snap in &snaps {
                let protected = matches!(snap.get("protected"), Some(Value::String(s)) if s == "true")
                    || matches!(snap.get("protected"), Some(Value::Bool(true)));
                if let (true, Some(name)) = (protected, snap.get("name").and_then(Value::as_str)) {
                    let r = rbd_run(&self.conf, ["snap", "unprotect", &self.snap_spec(name)]);
                    if !r.success() {
                        return Err(r.describe());
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(45);
            loop {
                let mut r = rbd_run(&self.conf, ["snap", "purge", "--no-progress", &spec]);
                if r.success() {
                    r = rbd_run(&self.conf, ["rm", "--no-progress", &spec]);
                }
                if r.success() {
                    return Ok(true);
                }
                if !r.stderr.contains("watchers") || Instant::now() >= deadline {
                    return Err(r.describe());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    impl Drop for RbdImage {
        fn drop(&mut self) {
            if let Err(e) = self.remove() {
                eprintln!("warning: could not remove RBD image {}:\n{e}", self.spec());
            }
        }
    }
}
