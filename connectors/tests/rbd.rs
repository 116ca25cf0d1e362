//! RBD connector against a real cluster.
//!
//! These tests need a cluster: `VOLBACK_TEST_CEPH_A` must name its ceph.conf
//! (`fixtures/ceph.sh start DIR` prints it). They fail, not skip, when it is
//! unset, so a CI without Ceph cannot pass them silently. The pool is `rbd`
//! unless `VOLBACK_TEST_CEPH_POOL` says otherwise.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use volback_connectors::rbd::{
    ClusterConfig, IoCtx, Rados, RbdDevice, RbdSpec, RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_FAST_DIFF, RBD_FEATURE_LAYERING, RBD_FEATURE_OBJECT_MAP,
};
use volback_connectors::{
    AlignedBuf, BlockDevice, Completion, ErrorKind, Extent, IoOp, Returned, ZeroMode,
};

const MIB: u64 = 1 << 20;

fn cluster() -> ClusterConfig {
    let conf = std::env::var_os("VOLBACK_TEST_CEPH_A").unwrap_or_else(|| {
        panic!(
            "VOLBACK_TEST_CEPH_A is not set: export it to a test cluster's ceph.conf \
             (`fixtures/ceph.sh start DIR` starts one and prints CEPH_CONF=...)"
        )
    });
    ClusterConfig {
        conf: Some(PathBuf::from(conf)),
        ..ClusterConfig::default()
    }
}

fn pool() -> String {
    std::env::var("VOLBACK_TEST_CEPH_POOL").unwrap_or_else(|_| "rbd".into())
}

/// A test image, removed (snapshots first) when dropped, panics included.
struct TestImage {
    ioctx: Arc<IoCtx>,
    name: String,
}

impl TestImage {
    fn create(size: u64, features: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let rados = Rados::connect(&cluster()).expect("connect to the test cluster");
        let ioctx = Arc::new(rados.ioctx(&pool(), None).expect("open pool"));
        let name = format!(
            "volback-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ioctx
            .create_image(&name, size, features)
            .expect("create image");
        TestImage { ioctx, name }
    }

    fn spec(&self, snap: Option<&str>) -> RbdSpec {
        RbdSpec {
            pool: pool(),
            namespace: None,
            image: self.name.clone(),
            snap: snap.map(str::to_string),
            cluster: cluster(),
        }
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        if let Ok(img) = self.ioctx.open_image(&self.name, None, false) {
            for s in img.snap_list().unwrap_or_default() {
                let _ = img.snap_unprotect(&s.name);
                if let Err(e) = img.snap_remove(&s.name) {
                    eprintln!("cleanup: removing snapshot {}: {e}", s.name);
                }
            }
        }
        if let Err(e) = self.ioctx.remove_image(&self.name) {
            eprintln!("cleanup: removing image {}: {e}", self.name);
        }
    }
}

fn pattern(offset: u64, seed: u8) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 11) as u8 ^ seed
}

fn filled(offset: u64, len: usize, seed: u8) -> Arc<AlignedBuf> {
    let mut b = AlignedBuf::new(len);
    for (i, x) in b.as_mut_slice()[..len].iter_mut().enumerate() {
        *x = pattern(offset + i as u64, seed);
    }
    Arc::new(b)
}

/// Submits every op keeping the queue full; returns completions in tag order.
fn run(dev: &mut dyn BlockDevice, ops: Vec<IoOp>) -> Vec<Completion> {
    let n = ops.len();
    let mut ops = ops.into_iter().enumerate();
    let mut out = Vec::new();
    let mut peak = 0;
    loop {
        while dev.in_flight() < dev.max_in_flight() {
            let Some((tag, op)) = ops.next() else { break };
            dev.submit(tag as u64, op).expect("submit");
            peak = peak.max(dev.in_flight());
        }
        if dev.in_flight() == 0 {
            break;
        }
        dev.reap(1, &mut out).expect("reap");
    }
    assert_eq!(out.len(), n);
    assert!(n < dev.max_in_flight() || peak == dev.max_in_flight());
    out.sort_by_key(|c| c.tag);
    out
}

fn write_ops(ranges: &[(u64, usize)], seed: u8) -> Vec<IoOp> {
    ranges
        .iter()
        .map(|&(offset, len)| IoOp::Write {
            offset,
            buf: filled(offset, len, seed),
            start: 0,
            len,
        })
        .collect()
}

/// Reads `[offset, offset + len)` in 1 MiB requests.
fn read_range(dev: &mut dyn BlockDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut ops = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let n = MIB.min(offset + len - pos) as usize;
        ops.push(IoOp::Read {
            offset: pos,
            len: n,
            buf: AlignedBuf::new(n),
        });
        pos += n as u64;
    }
    let mut data = Vec::with_capacity(len as usize);
    for c in run(dev, ops) {
        let n = c.result.expect("read") as usize;
        let Returned::Read(buf) = c.buf else {
            panic!("read returned no buffer")
        };
        data.extend_from_slice(&buf.as_slice()[..n]);
    }
    assert_eq!(data.len() as u64, len);
    data
}

fn check_ok(done: Vec<Completion>) {
    for c in done {
        c.result.expect("request");
    }
}

#[test]
fn many_requests_in_flight_round_trip() {
    let img = TestImage::create(64 * MIB, RBD_FEATURE_LAYERING);
    let mut dev = RbdDevice::open(&img.spec(None), true, 16).unwrap();
    assert_eq!(
        (dev.size(), dev.logical_block_size(), dev.max_in_flight()),
        (64 * MIB, 512, 16)
    );
    let ranges: Vec<(u64, usize)> = (0..64).map(|i| (i * MIB, MIB as usize)).collect();
    check_ok(run(&mut dev, write_ops(&ranges, 7)));
    check_ok(run(&mut dev, vec![IoOp::Flush]));
    drop(dev);

    let mut dev = RbdDevice::open(&img.spec(None), false, 16).unwrap();
    let data = read_range(&mut dev, 0, 64 * MIB);
    let bad = (0..data.len()).find(|&i| data[i] != pattern(i as u64, 7));
    assert_eq!(bad, None, "first differing byte");
    // Discarded reads (sizes growing while in flight) report what they
    // read; ordinary reads among them keep their own data.
    assert!(dev.discards_reads());
    let ops: Vec<IoOp> = (0..32u64)
        .map(|i| {
            let (offset, len) = (i * 2 * MIB, (1 + i as usize % 3) * 512 * 1024);
            if i % 4 == 3 {
                IoOp::Read {
                    offset,
                    len,
                    buf: AlignedBuf::new(len),
                }
            } else {
                IoOp::ReadDiscard { offset, len }
            }
        })
        .collect();
    for c in run(&mut dev, ops) {
        let (offset, len) = (c.tag * 2 * MIB, (1 + c.tag as usize % 3) * 512 * 1024);
        assert_eq!(c.result.expect("read"), len as u64);
        match c.buf {
            Returned::None => assert!(c.tag % 4 != 3),
            Returned::Read(b) => {
                let bad = (0..len).find(|&i| b.as_slice()[i] != pattern(offset + i as u64, 7));
                assert_eq!(bad, None, "read {} differs", c.tag);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Read-only: writes are refused before reaching librbd.
    let e = dev
        .submit(
            0,
            IoOp::Write {
                offset: 0,
                buf: filled(0, 512, 1),
                start: 0,
                len: 512,
            },
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e}");
    // Past the end too.
    let e = dev
        .submit(
            0,
            IoOp::Read {
                offset: 64 * MIB - 512,
                len: 1024,
                buf: AlignedBuf::new(1024),
            },
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e}");
}

/// Whatever the map says, it must tile the window, cover every written
/// range with data, and its holes must read as zero.
fn check_map(dev: &mut RbdDevice, offset: u64, len: u64, written: &[(u64, usize)]) -> Vec<Extent> {
    let map = dev.allocation_map().unwrap().extents(offset, len).unwrap();
    let mut pos = offset;
    for e in &map {
        assert_eq!(e.offset, pos, "extents tile the window: {map:?}");
        assert!(e.len > 0);
        pos = e.end();
    }
    assert_eq!(pos, offset + len, "{map:?}");
    for &(w, n) in written {
        let (s, t) = (w.max(offset), (w + n as u64).min(offset + len));
        for e in map.iter().filter(|e| !e.data) {
            assert!(
                t <= e.offset || s >= e.end(),
                "written [{s}, {t}) reported as hole {e:?}"
            );
        }
    }
    for e in map.iter().filter(|e| !e.data) {
        let data = read_range(dev, e.offset, e.len);
        assert!(data.iter().all(|&b| b == 0), "hole {e:?} holds data");
    }
    map
}

fn sparse_map(features: u64) {
    let img = TestImage::create(64 * MIB, features);
    let mut dev = RbdDevice::open(&img.spec(None), true, 16).unwrap();
    let written = [
        (0, 4096),
        (10 * MIB, 65536),
        (40 * MIB - 4096, 8192), // straddles two 4 MiB objects
    ];
    check_ok(run(&mut dev, write_ops(&written, 3)));
    check_ok(run(&mut dev, vec![IoOp::Flush]));
    let map = check_map(&mut dev, 0, 64 * MIB, &written);
    eprintln!("features {features:#x}: {map:?}");
    let data: u64 = map.iter().filter(|e| e.data).map(|e| e.len).sum();
    // At most the four 4 MiB objects written to.
    assert!(data <= 16 * MIB, "{map:?}");
    // A window inside one object, and one that starts in a hole.
    check_map(&mut dev, 10 * MIB + 4096, 8192, &written);
    check_map(&mut dev, 20 * MIB, 24 * MIB, &written);
}

#[test]
fn allocation_map_of_sparse_image() {
    sparse_map(RBD_FEATURE_LAYERING);
}

#[test]
fn allocation_map_with_fast_diff() {
    sparse_map(
        RBD_FEATURE_LAYERING
            | RBD_FEATURE_EXCLUSIVE_LOCK
            | RBD_FEATURE_OBJECT_MAP
            | RBD_FEATURE_FAST_DIFF,
    );
}

#[test]
fn write_zeroes_read_back_zero() {
    let img = TestImage::create(16 * MIB, RBD_FEATURE_LAYERING);
    let mut dev = RbdDevice::open(&img.spec(None), true, 16).unwrap();
    assert!(dev.supports_write_zeroes());
    let ranges: Vec<(u64, usize)> = (0..16).map(|i| (i * MIB, MIB as usize)).collect();
    check_ok(run(&mut dev, write_ops(&ranges, 9)));
    // Unaligned to objects and to the 64 KiB discard granularity; one range
    // covers a whole 4 MiB object.
    let zeroed = [
        (MIB + 512, 3 * MIB + 1024, ZeroMode::Deallocate),
        (8 * MIB - 512, 4 * MIB + 1024, ZeroMode::Deallocate),
        (13 * MIB + 4096 - 512, 100 * 512, ZeroMode::KeepAllocated),
    ];
    let ops = zeroed
        .iter()
        .map(|&(offset, len, mode)| IoOp::WriteZeroes { offset, len, mode })
        .collect();
    check_ok(run(&mut dev, ops));
    let data = read_range(&mut dev, 0, 16 * MIB);
    for (i, &b) in data.iter().enumerate() {
        let i = i as u64;
        let zero = zeroed.iter().any(|&(o, n, _)| i >= o && i < o + n);
        let want = if zero { 0 } else { pattern(i, 9) };
        assert_eq!(b, want, "byte {i}");
    }
    // The whole object [8, 12) MiB was deallocated.
    let map = dev
        .allocation_map()
        .unwrap()
        .extents(8 * MIB, 4 * MIB)
        .unwrap();
    eprintln!("after write-zeroes: {map:?}");
}

#[test]
fn snapshot_opens_read_only_with_its_data() {
    let img = TestImage::create(8 * MIB, RBD_FEATURE_LAYERING);
    let mut dev = RbdDevice::open(&img.spec(None), true, 16).unwrap();
    check_ok(run(&mut dev, write_ops(&[(0, 2 * MIB as usize)], 1)));
    check_ok(run(&mut dev, vec![IoOp::Flush]));
    dev.image().snap_create("s1").unwrap();
    check_ok(run(&mut dev, write_ops(&[(MIB, MIB as usize)], 2)));
    check_ok(run(&mut dev, vec![IoOp::Flush]));
    let snaps = dev.image().snap_list().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!((snaps[0].name.as_str(), snaps[0].size), ("s1", 8 * MIB));

    // Asked for writable, but a snapshot is read-only.
    let mut snap = RbdDevice::open(&img.spec(Some("s1")), true, 16).unwrap();
    assert_eq!(snap.name(), format!("rbd:{}/{}@s1", pool(), img.name));
    assert!(!snap.supports_write_zeroes());
    let data = read_range(&mut snap, 0, 2 * MIB);
    assert!(data
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(i as u64, 1)));
    let e = snap
        .submit(
            0,
            IoOp::WriteZeroes {
                offset: 0,
                len: 512,
                mode: ZeroMode::Deallocate,
            },
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert!(e.to_string().contains("read-only"), "{e}");
    // The head has the new data.
    let head = read_range(&mut dev, MIB, MIB);
    assert!(head
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(MIB + i as u64, 2)));

    // Volume metadata lives on the image.
    let image = dev.image();
    image.metadata_set("volback.volume", "v-1").unwrap();
    image.metadata_set("volback.empty", "").unwrap();
    assert_eq!(
        image.metadata_get("volback.volume").unwrap().as_deref(),
        Some("v-1")
    );
    assert_eq!(image.metadata_get("volback.none").unwrap(), None);
    assert_eq!(
        image.metadata_list().unwrap(),
        vec![
            ("volback.empty".to_string(), String::new()),
            ("volback.volume".to_string(), "v-1".to_string())
        ]
    );
}

#[test]
fn clone_reads_parent_and_maps_its_data() {
    let parent = TestImage::create(8 * MIB, RBD_FEATURE_LAYERING);
    let mut dev = RbdDevice::open(&parent.spec(None), true, 4).unwrap();
    check_ok(run(&mut dev, write_ops(&[(4 * MIB, 4096)], 5)));
    check_ok(run(&mut dev, vec![IoOp::Flush]));
    dev.image().snap_create("base").unwrap();
    dev.image().snap_protect("base").unwrap();
    let child = TestImage {
        ioctx: parent.ioctx.clone(),
        name: format!("{}-clone", parent.name),
    };
    parent
        .ioctx
        .clone_image(
            &parent.name,
            "base",
            &parent.ioctx,
            &child.name,
            RBD_FEATURE_LAYERING,
        )
        .unwrap();
    assert!(parent.ioctx.list_images().unwrap().contains(&child.name));
    let mut c = RbdDevice::open(&child.spec(None), false, 4).unwrap();
    let map = check_map(&mut c, 0, 8 * MIB, &[(4 * MIB, 4096)]);
    assert!(map.iter().any(|e| e.data), "{map:?}");
    let data = read_range(&mut c, 4 * MIB, 4096);
    assert!(data
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(4 * MIB + i as u64, 5)));
    drop(c);
    drop(child); // before the parent's guard unprotects its snapshot
}

#[test]
fn drop_waits_for_requests_in_flight() {
    let img = TestImage::create(16 * MIB, RBD_FEATURE_LAYERING);
    let mut dev = RbdDevice::open(&img.spec(None), true, 16).unwrap();
    for (i, op) in write_ops(
        &(0..16).map(|i| (i * MIB, MIB as usize)).collect::<Vec<_>>(),
        4,
    )
    .into_iter()
    .enumerate()
    {
        dev.submit(i as u64, op).unwrap();
    }
    drop(dev); // must neither crash nor free buffers librbd still reads
    let mut dev = RbdDevice::open(&img.spec(None), false, 16).unwrap();
    let data = read_range(&mut dev, 0, 16 * MIB);
    assert!(data
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(i as u64, 4)));
}

#[test]
fn cluster_and_image_management() {
    let img = TestImage::create(4 * MIB, RBD_FEATURE_LAYERING);
    let rados = Rados::connect(&cluster()).unwrap();
    let fsid = rados.fsid().unwrap();
    assert_eq!(fsid.len(), 36, "{fsid}");
    assert!(rados.pool_id(&pool()).unwrap() >= 0);
    assert_eq!(
        rados.pool_id("volback-no-such-pool").unwrap_err().errno(),
        Some(libc::ENOENT)
    );
    let image = img.ioctx.open_image(&img.name, None, false).unwrap();
    assert_eq!(image.object_size().unwrap(), 4 * MIB);
    image.resize(12 * MIB).unwrap();
    assert_eq!(image.size().unwrap(), 12 * MIB);
    image.flush().unwrap();
    assert_eq!(
        image.features().unwrap() & RBD_FEATURE_LAYERING,
        RBD_FEATURE_LAYERING
    );
    image.snap_create("a").unwrap();
    image.snap_create("b").unwrap();
    image.snap_remove("a").unwrap();
    let names: Vec<String> = image
        .snap_list()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["b"]);
    assert!(img.ioctx.list_images().unwrap().contains(&img.name));
}

#[test]
fn missing_image_and_pool_errors_name_them() {
    let mut spec: RbdSpec = "rbd:rbd/volback-no-such-image".parse().unwrap();
    spec.pool = pool();
    spec.cluster = cluster();
    let Err(e) = RbdDevice::open(&spec, false, 4) else {
        panic!("opened a missing image")
    };
    assert_eq!(e.kind, ErrorKind::Open);
    let msg = e.to_string();
    assert!(msg.contains("image volback-no-such-image"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
    spec.pool = "volback-no-such-pool".into();
    let Err(e) = RbdDevice::open(&spec, false, 4) else {
        panic!("opened a missing pool")
    };
    assert!(e.to_string().contains("pool volback-no-such-pool"), "{e}");
}

#[test]
fn unreachable_cluster_fails_within_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    // Port 9 (discard) on loopback: nothing listens there.
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:9\nauth client required = none\n",
    )
    .unwrap();
    let spec: RbdSpec = format!("rbd:rbd/nothing:conf={}", conf.display())
        .parse()
        .unwrap();
    let mut spec = spec;
    spec.cluster.connect_timeout = Duration::from_secs(3);
    let t = Instant::now();
    let e = match RbdDevice::open(&spec, false, 4) {
        Ok(_) => panic!("connected to a cluster that does not exist"),
        Err(e) => e,
    };
    let took = t.elapsed();
    eprintln!("after {took:?}: {e}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(e.kind, ErrorKind::Open);
    let msg = e.to_string();
    assert!(msg.contains("connecting to the cluster"), "{msg}");
    assert!(msg.contains(&conf.display().to_string()), "{msg}");
    assert!(msg.contains("timed out"), "{msg}");
}

/// Throughput, not correctness: `cargo test --release -p volback-connectors
/// --test rbd -- --ignored --nocapture read_throughput`.
#[test]
#[ignore]
fn read_throughput() {
    const SIZE: u64 = 1 << 30;
    const REQ: u64 = 4 * MIB;
    let img = TestImage::create(SIZE, RBD_FEATURE_LAYERING);
    let mut dev = RbdDevice::open(&img.spec(None), true, 16).unwrap();
    let buf = filled(0, REQ as usize, 11);
    let ops = (0..SIZE / REQ)
        .map(|i| IoOp::Write {
            offset: i * REQ,
            buf: buf.clone(),
            start: 0,
            len: REQ as usize,
        })
        .collect();
    let t = Instant::now();
    check_ok(run(&mut dev, ops));
    check_ok(run(&mut dev, vec![IoOp::Flush]));
    let mbps = |t: Instant| SIZE as f64 / 1e6 / t.elapsed().as_secs_f64();
    eprintln!("write 1 GiB, qd 16 x 4 MiB: {:.0} MB/s", mbps(t));
    drop(dev);

    let mut dev = RbdDevice::open(&img.spec(None), false, 16).unwrap();
    for _ in 0..2 {
        let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(REQ as usize)).collect();
        let (mut next, mut out) = (0u64, Vec::new());
        let t = Instant::now();
        while next < SIZE || dev.in_flight() > 0 {
            while next < SIZE && dev.in_flight() < 16 {
                let op = IoOp::Read {
                    offset: next,
                    len: REQ as usize,
                    buf: bufs.pop().unwrap(),
                };
                dev.submit(next, op).unwrap();
                next += REQ;
            }
            dev.reap(1, &mut out).unwrap();
            for c in out.drain(..) {
                assert_eq!(c.result.unwrap(), REQ);
                let Returned::Read(b) = c.buf else { panic!() };
                bufs.push(b);
            }
        }
        eprintln!("read 1 GiB, qd 16 x 4 MiB: {:.0} MB/s", mbps(t));
    }
    let conf = cluster().conf.unwrap();
    let t = Instant::now();
    let ok = std::process::Command::new("rbd")
        .arg("--conf")
        .arg(&conf)
        .args(["export", &format!("{}/{}", pool(), img.name), "-"])
        .arg("--no-progress")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        eprintln!("rbd export to stdout > /dev/null: {:.0} MB/s", mbps(t));
    }
}
