//! The iSCSI initiator against a real target: Debian's tgtd, started per
//! test by fixtures/tgt.sh (which installs tgt and libiscsi-bin when they
//! are missing: these tests never skip), and cross-checked with libiscsi's
//! command-line tools.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use volback_connectors::iscsi::{
    discover, iscsi_cause, Chap, IscsiDevice, IscsiError, IscsiOptions, IscsiSpec,
};
use volback_connectors::{
    AlignedBuf, BlockDevice, Completion, ErrorKind, IoOp, Returned, ZeroMode,
};
use volback_tests::TgtDaemon;

const MIB: u64 = 1 << 20;

/// One tgtd ([`TgtDaemon`]: installed and started by fixtures/tgt.sh,
/// stopped by PID on drop) with the targets a test made; on drop the
/// targets are deleted first, and their backing files go with `dir`.
struct Tgt {
    daemon: TgtDaemon,
    port: u16,
    control: u32,
    dir: tempfile::TempDir,
    tids: Vec<u32>,
}

impl Tgt {
    fn start() -> Tgt {
        let daemon = TgtDaemon::start();
        Tgt {
            port: daemon.port,
            control: daemon.control_port,
            daemon,
            dir: tempfile::tempdir().unwrap(),
            tids: Vec::new(),
        }
    }

    fn try_adm(&self, args: &[&str]) -> Result<String, String> {
        self.daemon.try_tgtadm(args)
    }

    fn adm(&self, args: &[&str]) -> String {
        self.try_adm(args)
            .unwrap_or_else(|e| panic!("tgtadm {args:?}: {e}"))
    }

    fn iqn(tid: u32) -> String {
        format!("iqn.2026-01.io.volback.test:t{tid}")
    }

    /// A target with LUN 1 on a backing file of `size` bytes (sparse).
    fn add_target(&mut self, tid: u32, size: u64, thin: bool) -> PathBuf {
        let file = self.dir.path().join(format!("lun{tid}.img"));
        File::create(&file).unwrap().set_len(size).unwrap();
        self.daemon
            .add_lun_target(tid, &Self::iqn(tid), &file, thin);
        self.tids.push(tid);
        file
    }

    fn set(&self, tid: u32, name: &str, value: &str) {
        self.adm(&[
            "--mode",
            "target",
            "--op",
            "update",
            "--tid",
            &tid.to_string(),
            "--name",
            name,
            "--value",
            value,
        ]);
    }

    fn url(&self, tid: u32) -> String {
        format!("iscsi://127.0.0.1:{}/{}/1", self.port, Self::iqn(tid))
    }

    fn spec(&self, tid: u32) -> IscsiSpec {
        self.url(tid).parse().unwrap()
    }

    /// (sid, cid) of every connection of a target.
    fn connections(&self, tid: u32) -> Vec<(String, String)> {
        self.daemon.connections(tid)
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        for tid in self.tids.clone() {
            let tid = tid.to_string();
            let _ = self.try_adm(&[
                "--mode", "target", "--op", "delete", "--force", "--tid", &tid,
            ]);
        }
    }
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    // xorshift64*: deterministic, fast, good enough for test data.
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}

fn aligned(data: &[u8]) -> Arc<AlignedBuf> {
    let mut b = AlignedBuf::new(data.len());
    b.as_mut_slice()[..data.len()].copy_from_slice(data);
    Arc::new(b)
}

fn reap_all(dev: &mut IscsiDevice) -> Vec<Completion> {
    let mut out = Vec::new();
    while dev.in_flight() > 0 {
        let n = dev.in_flight();
        dev.reap(n, &mut out).unwrap();
    }
    out
}

/// Submits a write of every chunk, tagged by its index.
fn submit_writes(dev: &mut IscsiDevice, chunks: &[(u64, Vec<u8>)]) {
    for (i, (off, data)) in chunks.iter().enumerate() {
        dev.submit(
            i as u64,
            IoOp::Write {
                offset: *off,
                buf: aligned(data),
                start: 0,
                len: data.len(),
            },
        )
        .unwrap();
    }
}

/// Submits a read of every range into a new buffer, tagged by its index.
fn submit_reads(dev: &mut IscsiDevice, ranges: &[(u64, usize)]) {
    for (i, (off, len)) in ranges.iter().enumerate() {
        dev.submit(
            i as u64,
            IoOp::Read {
                offset: *off,
                len: *len,
                buf: AlignedBuf::new(*len),
            },
        )
        .unwrap();
    }
}

fn write_all(dev: &mut IscsiDevice, chunks: &[(u64, Vec<u8>)]) {
    submit_writes(dev, chunks);
    for c in reap_all(dev) {
        assert_eq!(c.result.unwrap(), chunks[c.tag as usize].1.len() as u64);
        assert!(matches!(c.buf, Returned::Write(_)));
    }
}

fn read_all(dev: &mut IscsiDevice, ranges: &[(u64, usize)]) -> Vec<Vec<u8>> {
    submit_reads(dev, ranges);
    let mut res = vec![Vec::new(); ranges.len()];
    for c in reap_all(dev) {
        let len = ranges[c.tag as usize].1;
        assert_eq!(c.result.unwrap(), len as u64);
        let Returned::Read(buf) = c.buf else {
            panic!("no buffer back")
        };
        res[c.tag as usize] = buf.as_slice()[..len].to_vec();
    }
    res
}

fn read_one(
    dev: &mut IscsiDevice,
    off: u64,
    len: usize,
) -> Result<Vec<u8>, volback_connectors::DeviceError> {
    dev.submit(
        0,
        IoOp::Read {
            offset: off,
            len,
            buf: AlignedBuf::new(len),
        },
    )?;
    let mut out = Vec::new();
    dev.reap(1, &mut out)?;
    let c = out.pop().unwrap();
    c.result?;
    let Returned::Read(b) = c.buf else { panic!() };
    Ok(b.as_slice()[..len].to_vec())
}

fn file_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut v, off)
        .unwrap();
    v
}

fn tool(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("libiscsi tool");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sizes that do not line up with bursts or segments, many in flight.
fn mixed_chunks(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let sizes = [
        4096usize,
        512,
        100 * 1024 + 512,
        MIB as usize + 512,
        3 * MIB as usize,
        8192 + 512,
        65536,
        262_144 + 4096,
    ];
    let mut off = 0u64;
    let mut v = Vec::new();
    for round in 0..4u64 {
        for (i, &s) in sizes.iter().enumerate() {
            v.push((off, random_bytes(seed + round * 100 + i as u64, s)));
            off += s as u64 + 512 * (i as u64 % 3);
        }
    }
    v
}

#[test]
fn iscsi_read_write_round_trip_and_libiscsi_cross_check() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 64 * MIB, false);
    let spec = tgt.spec(1);
    let mut dev = IscsiDevice::open(&spec, true, 64).unwrap();
    // tgtd answers the first command of a new session with UNIT ATTENTION
    // (power on or reset): open retried it without failing.
    assert!(dev.stats().retries >= 1, "{:?}", dev.stats());
    assert_eq!(dev.size(), 64 * MIB);
    assert_eq!(dev.logical_block_size(), 512);
    assert!(
        dev.allocation_map().is_none(),
        "thick LUN has no allocation map"
    );
    // tgt declares MaxRecvDataSegmentLength=8192 by default: every data
    // segment we send must respect it, although we accept 1 MiB.
    let n = dev.negotiated().clone();
    assert_eq!(n.target_max_recv_data_segment_length, 8192);
    assert_eq!(n.initiator_max_recv_data_segment_length, 1 << 20);
    assert_eq!(
        n.max_burst_length, 262_144,
        "tgt's smaller MaxBurstLength wins"
    );
    assert_eq!(dev.max_read_size(), Some(262_144), "reads split there");

    let chunks = mixed_chunks(1);
    write_all(&mut dev, &chunks);
    let s = dev.stats();
    assert!(s.max_data_out_segment <= 8192, "{s:?}");
    assert!(
        s.max_outstanding > 1,
        "commands were in flight together: {s:?}"
    );
    assert_eq!(s.window_violations, 0);
    dev.submit(99, IoOp::Flush).unwrap();
    assert_eq!(reap_all(&mut dev).pop().unwrap().result.unwrap(), 0);
    let ranges: Vec<(u64, usize)> = chunks.iter().map(|(o, d)| (*o, d.len())).collect();
    let back = read_all(&mut dev, &ranges);
    // Reads of mixed sizes in flight together traded buffers (each takes
    // the newest one that fits before its data arrives), and every one
    // still came back with its own data.
    assert!(dev.stats().warm_buffer_swaps > 0, "{:?}", dev.stats());
    for ((off, data), got) in chunks.iter().zip(&back) {
        assert!(got == data, "read back differs at {off}");
        assert!(
            &file_bytes(&file, *off, data.len()) == data,
            "backing file differs at {off}"
        );
    }
    // Discarded reads (several commands each where over MaxBurstLength)
    // in flight with ordinary ones: they report what they read, and the
    // ordinary ones still get their own data.
    assert!(dev.discards_reads());
    for (i, (off, data)) in chunks.iter().enumerate() {
        let (offset, len) = (*off, data.len());
        let op = if i % 2 == 0 {
            IoOp::ReadDiscard { offset, len }
        } else {
            IoOp::Read {
                offset,
                len,
                buf: AlignedBuf::new(len),
            }
        };
        dev.submit(i as u64, op).unwrap();
    }
    for c in reap_all(&mut dev) {
        let data = &chunks[c.tag as usize].1;
        assert_eq!(c.result.unwrap(), data.len() as u64);
        match c.buf {
            Returned::None => assert!(c.tag % 2 == 0),
            Returned::Read(b) => assert!(b.as_slice()[..data.len()] == data[..]),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Data written behind the target's back is what we read.
    let pattern = random_bytes(77, 3 * MIB as usize);
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(&pattern, 40 * MIB)
        .unwrap();
    assert!(read_one(&mut dev, 40 * MIB, pattern.len()).unwrap() == pattern);

    // What libiscsi sees matches what we report.
    let url = tgt.url(1);
    let cap = tool(&["iscsi-readcapacity16", &url]);
    assert!(cap.contains(&format!("Total size:{}", dev.size())), "{cap}");
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
    assert!(cap.contains("LBPME:0"), "{cap}");
    let inq = tool(&["iscsi-inq", &url]);
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    let ls = tool(&["iscsi-ls", &format!("iscsi://127.0.0.1:{}", tgt.port)]);
    assert!(ls.contains(&spec.target_iqn), "{ls}");
    let found = discover(
        &spec.portal(),
        &spec.initiator_iqn,
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name, spec.target_iqn);
    assert!(
        found[0].addresses[0].starts_with(&format!("127.0.0.1:{}", tgt.port)),
        "{found:?}"
    );

    // Requests the device must refuse.
    let bad = dev.submit(
        1,
        IoOp::Read {
            offset: 64 * MIB,
            len: 512,
            buf: AlignedBuf::new(512),
        },
    );
    assert_eq!(bad.unwrap_err().kind, ErrorKind::InvalidRequest);
    let bad = dev.submit(
        1,
        IoOp::Read {
            offset: 100,
            len: 512,
            buf: AlignedBuf::new(512),
        },
    );
    assert_eq!(bad.unwrap_err().kind, ErrorKind::InvalidRequest);
    drop(dev);
    // We logged out: the target shows no session.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        tgt.connections(1).is_empty(),
        "session still there after drop"
    );
}

/// The Data-In segments tgtd sends follow the MaxRecvDataSegmentLength we
/// declare: volback's default (1 MiB, one segment per 1 MiB read when
/// MaxBurstLength allows), or a spec's `max_recv_data_segment_length`.
#[test]
fn iscsi_data_in_segments_follow_what_we_declare() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 16 * MIB, false);
    tgt.set(1, "MaxBurstLength", "1048576");
    let data = random_bytes(21, 4 * MIB as usize);
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();
    let ranges: Vec<(u64, usize)> = (0..4).map(|i| (i * MIB, MIB as usize)).collect();
    for (query, declared, expect_segment) in [
        ("", 1 << 20, MIB),
        ("?max_recv_data_segment_length=65536", 65536, 65536),
    ] {
        let spec: IscsiSpec = format!("{}{query}", tgt.url(1)).parse().unwrap();
        let mut dev = IscsiDevice::open(&spec, false, 4).unwrap();
        assert_eq!(
            dev.negotiated().initiator_max_recv_data_segment_length,
            declared
        );
        assert_eq!(dev.max_read_size(), Some(MIB), "{query}");
        let back = read_all(&mut dev, &ranges);
        for ((off, len), got) in ranges.iter().zip(&back) {
            let want = &data[*off as usize..*off as usize + len];
            assert!(got[..] == want[..], "{query}: data at {off}");
        }
        assert_eq!(dev.stats().max_data_in_segment, expect_segment, "{query}");
    }
}

#[test]
fn iscsi_crc32c_digests_and_large_segments() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 32 * MIB, false);
    tgt.set(1, "HeaderDigest", "CRC32C");
    tgt.set(1, "DataDigest", "CRC32C");
    tgt.set(1, "MaxRecvDataSegmentLength", "65536");
    tgt.set(1, "FirstBurstLength", "131072");
    tgt.set(1, "InitialR2T", "No");
    // Also split every read and write into commands of at most 192 KiB.
    let opts = IscsiOptions {
        max_transfer_bytes: 192 << 10,
        ..IscsiOptions::default()
    };
    let mut dev = IscsiDevice::open_with(&tgt.spec(1), true, 32, &opts).unwrap();
    let n = dev.negotiated().clone();
    assert!(n.header_digest && n.data_digest, "{n:?}");
    assert_eq!(n.target_max_recv_data_segment_length, 65536);
    assert!(!n.initial_r2t && n.immediate_data, "{n:?}");
    assert_eq!(n.first_burst_length, 131_072);
    let chunks = mixed_chunks(2);
    write_all(&mut dev, &chunks);
    assert_eq!(dev.stats().max_data_out_segment, 65536);
    // 3 MiB writes went out as 16 commands each.
    assert!(
        dev.stats().commands > 2 * chunks.len() as u64,
        "{:?}",
        dev.stats()
    );
    let ranges: Vec<(u64, usize)> = chunks.iter().map(|(o, d)| (*o, d.len())).collect();
    let back = read_all(&mut dev, &ranges);
    // Reads of mixed sizes in flight together traded buffers (each takes
    // the newest one that fits before its data arrives), and every one
    // still came back with its own data.
    assert!(dev.stats().warm_buffer_swaps > 0, "{:?}", dev.stats());
    for ((off, data), got) in chunks.iter().zip(&back) {
        assert!(got == data, "read back differs at {off}");
        assert!(&file_bytes(&file, *off, data.len()) == data);
    }
}

#[test]
fn iscsi_chap_one_way_and_mutual() {
    let mut tgt = Tgt::start();
    tgt.add_target(1, 8 * MIB, false);
    tgt.adm(&[
        "--mode",
        "account",
        "--op",
        "new",
        "--user",
        "alice",
        "--password",
        "alicesecret12",
    ]);
    tgt.adm(&[
        "--mode",
        "account",
        "--op",
        "new",
        "--user",
        "target1",
        "--password",
        "targetsecret34",
    ]);
    tgt.adm(&[
        "--mode", "account", "--op", "bind", "--tid", "1", "--user", "alice",
    ]);
    let base = format!("127.0.0.1:{}/{}/1", tgt.port, Tgt::iqn(1));

    // Without credentials the target refuses us.
    let e = IscsiDevice::open(&tgt.spec(1), false, 4)
        .err()
        .expect("login without CHAP");
    assert!(
        matches!(
            iscsi_cause(&e),
            Some(IscsiError::AuthenticationFailed) | Some(IscsiError::AuthorizationFailed)
        ),
        "{e}"
    );

    let spec: IscsiSpec = format!("iscsi://alice%alicesecret12@{base}")
        .parse()
        .unwrap();
    let mut dev = IscsiDevice::open(&spec, true, 4).unwrap();
    assert_eq!(read_one(&mut dev, 0, 4096).unwrap(), vec![0; 4096]);
    assert!(!dev.name().contains("alicesecret12"));
    drop(dev);
    // CHAP logins must not fail now and then (random challenges of any
    // value, identifiers, hex forms): log in and out many times.
    for _ in 0..25 {
        let dev = IscsiDevice::open(&spec, false, 1).unwrap();
        assert_eq!(dev.size(), 8 * MIB);
    }

    let spec: IscsiSpec = format!("iscsi://alice%wrongpassword@{base}")
        .parse()
        .unwrap();
    let e = IscsiDevice::open(&spec, true, 4)
        .err()
        .expect("wrong password");
    assert!(
        matches!(iscsi_cause(&e), Some(IscsiError::AuthenticationFailed)),
        "{e}"
    );
    assert_eq!(e.kind, ErrorKind::Open);
    let msg = format!("{e} {e:?}");
    assert!(!msg.contains("wrongpassword"), "{msg}");
    assert!(msg.contains("authentication failed"), "{msg}");

    // Mutual CHAP: the target proves it knows its own secret.
    tgt.adm(&[
        "--mode",
        "account",
        "--op",
        "bind",
        "--tid",
        "1",
        "--user",
        "target1",
        "--outgoing",
    ]);
    let spec = IscsiSpec::from_parts(
        &format!("127.0.0.1:{}", tgt.port),
        &Tgt::iqn(1),
        1,
        Some(Chap::new("alice", "alicesecret12")),
        Some(Chap::new("target1", "targetsecret34")),
    )
    .unwrap();
    let mut dev = IscsiDevice::open(&spec, true, 4).unwrap();
    assert_eq!(read_one(&mut dev, 4096, 512).unwrap(), vec![0; 512]);
    drop(dev);
    let spec: IscsiSpec = format!(
        "iscsi://alice%alicesecret12@{base}?target_user=target1&target_password=notthesecret"
    )
    .parse()
    .unwrap();
    let e = IscsiDevice::open(&spec, true, 4)
        .err()
        .expect("wrong target secret");
    assert!(
        matches!(
            iscsi_cause(&e),
            Some(IscsiError::TargetAuthenticationFailed)
        ),
        "{e}"
    );
    assert!(!format!("{e} {e:?}").contains("notthesecret"));
}

#[test]
fn iscsi_connection_dropped_mid_transfer_is_invisible() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 96 * MIB, false);
    let mut dev = IscsiDevice::open(&tgt.spec(1), true, 64).unwrap();
    let chunks: Vec<(u64, Vec<u8>)> = (0..48u64)
        .map(|i| {
            (
                i * 2 * MIB,
                random_bytes(1000 + i, 2 * MIB as usize - 512 * (i as usize % 5)),
            )
        })
        .collect();
    submit_writes(&mut dev, &chunks);
    // Cut the connection while those writes are in flight.
    let conns = tgt.connections(1);
    assert_eq!(conns.len(), 1, "{conns:?}");
    let (sid, cid) = &conns[0];
    tgt.adm(&[
        "--mode", "conn", "--op", "delete", "--tid", "1", "--sid", sid, "--cid", cid,
    ]);
    for c in reap_all(&mut dev) {
        assert_eq!(c.result.unwrap(), chunks[c.tag as usize].1.len() as u64);
    }
    // And during reads.
    let ranges: Vec<(u64, usize)> = chunks.iter().map(|(o, d)| (*o, d.len())).collect();
    submit_reads(&mut dev, &ranges);
    // Once the first read is back, the others are in flight: the session
    // only reads from the socket while we wait in `reap` (or, after 10 ms
    // away, its keeper does), and 94 MiB is far more than socket buffers
    // hold, so the cut lands mid-transfer however fast the target is.
    let mut done = Vec::new();
    dev.reap(1, &mut done).unwrap();
    assert!(done.len() < ranges.len(), "all reads were done at once");
    for (sid, cid) in tgt.connections(1) {
        let _ = tgt.try_adm(&[
            "--mode", "conn", "--op", "delete", "--tid", "1", "--sid", &sid, "--cid", &cid,
        ]);
    }
    done.extend(reap_all(&mut dev));
    assert_eq!(done.len(), ranges.len());
    for c in done {
        let (off, data) = &chunks[c.tag as usize];
        assert_eq!(c.result.unwrap(), data.len() as u64);
        let Returned::Read(b) = c.buf else { panic!() };
        assert!(
            b.as_slice()[..data.len()] == data[..],
            "read back differs at {off}"
        );
        assert!(&file_bytes(&file, *off, data.len()) == data);
    }
    let s = dev.stats();
    assert!(s.reconnects >= 2, "{s:?}");
    assert_eq!(s.window_violations, 0);
}

#[test]
fn iscsi_deleted_target_and_lun_fail_as_vanished() {
    let mut tgt = Tgt::start();
    tgt.add_target(1, 8 * MIB, false);
    tgt.add_target(2, 8 * MIB, false);
    let opts = IscsiOptions {
        reconnect_backoff: Duration::from_millis(100),
        ..IscsiOptions::default()
    };
    // The LUN goes away, the target stays.
    let mut dev = IscsiDevice::open_with(&tgt.spec(1), true, 4, &opts).unwrap();
    read_one(&mut dev, 0, 4096).unwrap();
    tgt.adm(&[
        "--mode",
        "logicalunit",
        "--op",
        "delete",
        "--tid",
        "1",
        "--lun",
        "1",
    ]);
    let t0 = Instant::now();
    let e = read_one(&mut dev, 0, 4096).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Vanished, "{e}");
    assert!(e.to_string().contains("logical unit not supported"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    drop(dev);

    // The whole target goes away.
    let mut dev = IscsiDevice::open_with(&tgt.spec(2), true, 4, &opts).unwrap();
    read_one(&mut dev, 0, 4096).unwrap();
    tgt.adm(&[
        "--mode", "target", "--op", "delete", "--force", "--tid", "2",
    ]);
    tgt.tids.retain(|&t| t != 2);
    let t0 = Instant::now();
    let e = read_one(&mut dev, 0, 4096).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Vanished, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Later requests fail at once, too.
    let e = read_one(&mut dev, 0, 4096).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Vanished, "{e}");
    drop(dev);
    // Opening a target that does not exist says so.
    let e = IscsiDevice::open(&tgt.spec(7), false, 1).err().unwrap();
    assert!(
        matches!(iscsi_cause(&e), Some(IscsiError::TargetNotFound(_))),
        "{e}"
    );
    assert_eq!(e.kind, ErrorKind::Vanished);
}

#[test]
fn iscsi_small_command_window_is_respected() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 16 * MIB, false);
    tgt.set(1, "MaxQueueCmd", "2");
    let mut dev = IscsiDevice::open(&tgt.spec(1), true, 128).unwrap();
    let chunks: Vec<(u64, Vec<u8>)> = (0..128u64)
        .map(|i| (i * 64 * 1024, random_bytes(5000 + i, 64 * 1024)))
        .collect();
    write_all(&mut dev, &chunks);
    let ranges: Vec<(u64, usize)> = chunks.iter().map(|(o, d)| (*o, d.len())).collect();
    let back = read_all(&mut dev, &ranges);
    // Reads of mixed sizes in flight together traded buffers (each takes
    // the newest one that fits before its data arrives), and every one
    // still came back with its own data.
    assert!(dev.stats().warm_buffer_swaps > 0, "{:?}", dev.stats());
    for ((off, data), got) in chunks.iter().zip(&back) {
        assert!(got == data, "read back differs at {off}");
        assert!(&file_bytes(&file, *off, data.len()) == data);
    }
    let s = dev.stats();
    eprintln!("{s:?}");
    assert_eq!(s.window_violations, 0, "{s:?}");
    assert!(
        s.window_stalls > 0,
        "the window closed and commands waited: {s:?}"
    );
    assert!(s.max_window <= 3, "{s:?}");
    // Never more commands sent past ExpCmdSN than the window allowed.
    assert!(s.max_ahead <= s.max_window, "{s:?}");
    assert!(s.max_outstanding > 1, "{s:?}");
}

fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: plain lseek on a descriptor we own.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        out.push((d as u64, h as u64));
        pos = h;
    }
    out
}

#[test]
fn iscsi_thin_lun_allocation_map_unmap_and_write_same() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 64 * MIB, true);
    let mut dev = IscsiDevice::open(&tgt.spec(1), true, 16).unwrap();
    let info = dev.lun_info();
    assert!(info.thin && info.unmapped_reads_zero, "{info:?}");
    let cap = tool(&["iscsi-readcapacity16", &tgt.url(1)]);
    assert!(cap.contains("LBPME:1 LBPRZ:1"), "{cap}");
    let chunks = vec![
        (MIB, random_bytes(1, MIB as usize)),
        (10 * MIB, random_bytes(2, 2 * MIB as usize)),
        (40 * MIB, random_bytes(3, 64 * 1024)),
    ];
    write_all(&mut dev, &chunks);
    let map = dev.allocation_map().unwrap().extents(0, 64 * MIB).unwrap();
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.offset, e.end()))
        .collect();
    assert_eq!(data, data_ranges(&file), "{map:?}");
    assert_eq!(map.first().unwrap().offset, 0);
    assert_eq!(map.last().unwrap().end(), 64 * MIB);
    assert!(
        map.iter()
            .any(|e| !e.data && e.offset <= 20 * MIB && e.end() >= 30 * MIB),
        "{map:?}"
    );
    // A sub-range query is clipped exactly.
    let sub = dev
        .allocation_map()
        .unwrap()
        .extents(MIB + 4096, MIB)
        .unwrap();
    assert_eq!(sub.first().unwrap().offset, MIB + 4096);
    assert_eq!(sub.iter().map(|e| e.len).sum::<u64>(), MIB);

    // Deallocate punches the blocks: holes in the file and in our map.
    // First with WRITE SAME(16) + UNMAP (the default), then with UNMAP.
    let mut unmapper = IscsiDevice::open_with(
        &tgt.spec(1),
        true,
        4,
        &IscsiOptions {
            prefer_unmap: true,
            ..IscsiOptions::default()
        },
    )
    .unwrap();
    for (d, off) in [(&mut dev, 10 * MIB), (&mut unmapper, 11 * MIB)] {
        let blocks_before = std::fs::metadata(&file).unwrap().blocks();
        d.submit(
            1,
            IoOp::WriteZeroes {
                offset: off,
                len: MIB,
                mode: ZeroMode::Deallocate,
            },
        )
        .unwrap();
        for c in reap_all(d) {
            assert_eq!(c.result.unwrap(), MIB);
        }
        assert!(std::fs::metadata(&file).unwrap().blocks() < blocks_before);
        let ranges = data_ranges(&file);
        assert!(
            !ranges.iter().any(|&(s, e)| s < off + MIB && e > off),
            "{ranges:?}"
        );
        let map = d.allocation_map().unwrap().extents(off, MIB).unwrap();
        assert_eq!(
            map,
            vec![volback_connectors::Extent {
                offset: off,
                len: MIB,
                data: false
            }]
        );
        assert!(read_one(d, off, MIB as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }
    drop(unmapper);
    // Other data is untouched.
    assert!(read_one(&mut dev, 40 * MIB, 64 * 1024).unwrap() == chunks[2].1);
    assert!(file_bytes(&file, MIB, MIB as usize) == chunks[0].1);

    // Keep-allocated zeroing (WRITE SAME without unmap) writes zeroes.
    dev.submit(
        2,
        IoOp::WriteZeroes {
            offset: MIB,
            len: MIB / 2,
            mode: ZeroMode::KeepAllocated,
        },
    )
    .unwrap();
    for c in reap_all(&mut dev) {
        assert_eq!(c.result.unwrap(), MIB / 2);
    }
    assert!(read_one(&mut dev, MIB, MIB as usize / 2)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert!(file_bytes(&file, MIB, MIB as usize / 2)
        .iter()
        .all(|&b| b == 0));
    assert!(
        read_one(&mut dev, MIB + MIB / 2, MIB as usize / 2).unwrap()
            == chunks[0].1[MIB as usize / 2..]
    );
    let map = dev.allocation_map().unwrap().extents(MIB, MIB).unwrap();
    assert!(map.iter().all(|e| e.data), "{map:?}");
}

#[test]
fn iscsi_idle_session_survives_nop_interval() {
    let mut tgt = Tgt::start();
    tgt.add_target(1, 8 * MIB, false);
    // The target pings us too.
    tgt.set(1, "nop_interval", "1");
    tgt.set(1, "nop_count", "3");
    let opts = IscsiOptions {
        nop_interval: Duration::from_millis(700),
        nop_timeout: Duration::from_secs(3),
        ..IscsiOptions::default()
    };
    let mut dev = IscsiDevice::open_with(&tgt.spec(1), true, 4, &opts).unwrap();
    let data = random_bytes(9, 8192);
    write_all(&mut dev, &[(0, data.clone())]);
    std::thread::sleep(Duration::from_secs(5));
    assert!(read_one(&mut dev, 0, 8192).unwrap() == data);
    let s = dev.stats();
    assert_eq!(s.reconnects, 0, "{s:?}");
    assert!(s.nop_replies >= 2, "answered the target's pings: {s:?}");
    assert_eq!(tgt.connections(1).len(), 1);
    // Our own pings, with the target's switched off.
    tgt.set(1, "nop_interval", "0");
    std::thread::sleep(Duration::from_secs(4));
    let s = dev.stats();
    assert!(s.nop_pings >= 2, "{s:?}");
    assert!(read_one(&mut dev, 0, 8192).unwrap() == data);
    assert_eq!(dev.stats().reconnects, 0);
}

#[test]
fn iscsi_tgt_guard_cleans_up_on_panic() {
    let (pid, dir, control) = {
        let r = std::panic::catch_unwind(|| {
            let mut tgt = Tgt::start();
            tgt.add_target(1, MIB, false);
            let info = (tgt.daemon.pid(), tgt.dir.path().to_path_buf(), tgt.control);
            std::panic::panic_any(info);
        });
        *r.unwrap_err().downcast::<(u32, PathBuf, u32)>().unwrap()
    };
    // A killed tgtd may linger as a zombie until init reaps it: what
    // counts is that ours is no longer a live tgtd.
    assert!(
        !volback_tests::tgt::tgtd_alive(pid, control),
        "tgtd {pid} still running"
    );
    assert!(!dir.exists());
    // Its control socket went with it, unless a parallel test has since
    // started a tgtd on the same (then free) control port.
    let socket_left = std::path::Path::new("/var/run/tgtd")
        .read_dir()
        .unwrap()
        .any(|e| {
            let n = e.unwrap().file_name();
            n.to_string_lossy().ends_with(&format!(".{control}"))
        });
    assert!(
        !socket_left || !volback_tests::tgt::tgtd_pids(control).is_empty(),
        "tgtd {pid}'s control socket was left behind"
    );
}

/// Sequential 1 MiB reads at queue depth 16 over a 1 GiB LUN, next to
/// libiscsi's iscsi-perf on the same LUN. Slow and noisy: run by hand with
/// `cargo test --release -p volback-connectors --test iscsi_tgt -- --ignored --nocapture`.
#[test]
#[ignore]
fn iscsi_throughput_sequential() {
    let mut tgt = Tgt::start();
    let file = tgt.add_target(1, 1024 * MIB, false);
    let seed = random_bytes(11, 4 * MIB as usize);
    let f = OpenOptions::new().write(true).open(&file).unwrap();
    for i in 0..256u64 {
        f.write_all_at(&seed, i * 4 * MIB).unwrap();
    }
    for mrdsl in ["8192", "262144"] {
        tgt.set(1, "MaxRecvDataSegmentLength", mrdsl);
        eprintln!("target MaxRecvDataSegmentLength {mrdsl}");
        let opts = IscsiOptions {
            data_digest: false,
            header_digest: false,
            ..IscsiOptions::default()
        };
        let mut dev = IscsiDevice::open_with(&tgt.spec(1), true, 16, &opts).unwrap();
        let chunk = MIB as usize;
        for (what, write) in [("read", false), ("write", true)] {
            let t0 = Instant::now();
            let mut next = 0u64;
            let mut done = 0u64;
            let mut out = Vec::new();
            let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(chunk)).collect();
            // Writes put back what is there, so every pass sees the seed.
            let wbufs: Vec<_> = (0..4)
                .map(|i| aligned(&seed[i * chunk..(i + 1) * chunk]))
                .collect();
            while done < 1024 {
                while next < 1024 && dev.in_flight() < 16 {
                    let op = if write {
                        IoOp::Write {
                            offset: next * MIB,
                            buf: wbufs[(next % 4) as usize].clone(),
                            start: 0,
                            len: chunk,
                        }
                    } else {
                        IoOp::Read {
                            offset: next * MIB,
                            len: chunk,
                            buf: bufs.pop().unwrap(),
                        }
                    };
                    dev.submit(next, op).unwrap();
                    next += 1;
                }
                dev.reap(1, &mut out).unwrap();
                for c in out.drain(..) {
                    assert_eq!(c.result.unwrap(), chunk as u64);
                    if let Returned::Read(b) = c.buf {
                        let off = (c.tag * MIB % (4 * MIB)) as usize;
                        assert!(b.as_slice() == &seed[off..off + chunk], "data at {}", c.tag);
                        bufs.push(b);
                    }
                    done += 1;
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "volback {what}: {:.0} MB/s",
                1024.0 * MIB as f64 / secs / 1e6
            );
        }
    }
    let out = Command::new("iscsi-perf")
        .args(["-b", "2048", "-m", "16", "-t", "5", &tgt.url(1)])
        .output()
        .unwrap();
    eprintln!("iscsi-perf: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn iscsi_stalled_target_times_out_and_recovers() {
    let mut tgt = Tgt::start();
    tgt.add_target(1, 8 * MIB, false);
    let opts = IscsiOptions {
        command_timeout: Duration::from_secs(2),
        login_timeout: Duration::from_secs(2),
        nop_interval: Duration::from_secs(1),
        nop_timeout: Duration::from_secs(2),
        reconnect_attempts: 10,
        reconnect_backoff: Duration::from_millis(200),
        ..IscsiOptions::default()
    };
    let mut dev = IscsiDevice::open_with(&tgt.spec(1), true, 8, &opts).unwrap();
    let data = random_bytes(21, MIB as usize);
    write_all(&mut dev, &[(MIB, data.clone())]);
    // Freeze the target: the command gets no answer and times out, logins
    // time out too, until the target runs again.
    let pid = tgt.daemon.pid() as i32;
    // SAFETY: signalling the test's own tgtd.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    dev.submit(
        0,
        IoOp::Read {
            offset: MIB,
            len: MIB as usize,
            buf: AlignedBuf::new(MIB as usize),
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut out = Vec::new();
    dev.reap(1, &mut out).unwrap();
    let c = out.pop().unwrap();
    assert_eq!(c.result.unwrap(), MIB);
    let Returned::Read(b) = c.buf else { panic!() };
    assert!(b.as_slice()[..MIB as usize] == data[..]);
    let s = dev.stats();
    assert!(s.reconnects >= 2, "{s:?}");
}
