//! `volback copy SRC DST` on real files and loop devices (run as root).
//!
//! Each test builds its own scratch directory and guards; `with_scratch`
//! checks afterwards that no loop device of the test is left attached.

use std::path::Path;

use serde_json::Value;
use volback_tests::*;

/// `volback copy [OPTIONS] SRC DST`.
fn copy_args(src: &Path, dst: &Path, opts: &[&str]) -> Vec<String> {
    let mut args = vec!["copy".to_owned()];
    args.extend(opts.iter().map(|s| (*s).to_owned()));
    args.push(arg(src));
    args.push(arg(dst));
    args
}

fn copy_ok(src: &Path, dst: &Path, opts: &[&str]) -> Run {
    volback_ok(copy_args(src, dst, opts))
}

/// Whether `text` states `bytes` as a size, either in bytes or in whole MiB
/// (`32 MiB`, `32MiB`, `32.00 MiB`, `32M`).
fn mentions_size(text: &str, bytes: u64) -> bool {
    if text.contains(&bytes.to_string()) {
        return true;
    }
    if bytes % MIB != 0 {
        return false;
    }
    let m = bytes / MIB;
    ["", ".0", ".00"]
        .iter()
        .any(|frac| text.contains(&format!("{m}{frac} M")) || text.contains(&format!("{m}{frac}M")))
}

/// A token of at least 16 hex digits (an xxh3 digest or longer).
fn find_hex_digest(text: &str) -> Option<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|t| t.strip_prefix("0x").unwrap_or(t))
        .find(|t| t.len() >= 16 && t.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The sparse layout of the Cinder zero-skip bug and friends: data islands
/// separated by holes and by explicitly written zero blocks, at offsets that
/// are and are not aligned to 4 KiB and 1 MiB, one 48 MiB hole, and data in
/// the unaligned last bytes. `size` is 80 MiB + 1000.
fn sparse_layout() -> (u64, Vec<Region>) {
    let size = 80 * MIB + 1000;
    let mut regions = vec![
        Region::random(0, 64 * KIB, 1),
        // 4 KiB of written zeroes between two data runs.
        Region::zeros(64 * KIB, 4 * KIB),
        Region::random(68 * KIB, 60 * KIB, 2),
        // 1 MiB + 4 KiB of written zeroes, then data at an offset that is
        // 4 KiB- but not 1 MiB-aligned.
        Region::zeros(128 * KIB, MIB + 4 * KIB),
        Region::random(MIB + 132 * KIB, 4 * KIB, 3),
        // Unaligned data in the middle of a hole.
        Region::random(3 * MIB + 12345, 100_000, 4),
        // data, zero block, data at a 4 MiB boundary.
        Region::random(8 * MIB, 4 * KIB, 5),
        Region::zeros(8 * MIB + 4 * KIB, 4 * KIB),
        Region::random(8 * MIB + 8 * KIB, 4 * KIB, 6),
        // Written zeroes straddling a 4 MiB boundary, then 512 bytes of data.
        Region::zeros(12 * MIB - 8 * KIB, 16 * KIB),
        Region::random(12 * MIB + 8 * KIB, 512, 7),
    ];
    // Alternating 4 KiB data and zero blocks.
    for i in 0..16u64 {
        let offset = 14 * MIB + i * 4 * KIB;
        if i % 2 == 0 {
            regions.push(Region::random(offset, 4 * KIB, 100 + i));
        } else {
            regions.push(Region::zeros(offset, 4 * KIB));
        }
    }
    // [16 MiB, 64 MiB) is one hole. Then 7 bytes straddling a 1 MiB
    // boundary, zeroes then data up to the unaligned end.
    regions.push(Region::random(65 * MIB - 3, 7, 8));
    regions.push(Region::zeros(size - 2 * MIB, MIB));
    regions.push(Region::random(size - 5000, 5000, 9));
    (size, regions)
}

// 1. dense ------------------------------------------------------------------

#[test]
fn dense_loop_device_to_loop_device() {
    with_scratch(|s| {
        let size = 64 * MIB;
        let src_file = s.join("src.img");
        let dst_file = s.join("dst.img");
        create_random_file(&src_file, size, 0xD1);
        create_sparse_file(&dst_file, size);
        let src = LoopDevice::attach(&src_file, true);
        let dst = LoopDevice::attach(&dst_file, false);
        assert_eq!(src.size(), size);
        assert_eq!(dst.size(), size);

        copy_ok(src.path(), dst.path(), &[]);

        assert_same(&src_file, dst.path(), size);
        assert_eq!(dst.size(), size);
    });
}

// 2. sparse -----------------------------------------------------------------

#[test]
fn sparse_file_to_new_file_keeps_data_in_place_and_holes_as_holes() {
    with_scratch(|s| {
        let (size, regions) = sparse_layout();
        let src = s.join("src.img");
        let dst = s.join("dst.img");
        create_file(&src, size, &regions);
        assert!(!dst.exists());

        copy_ok(&src, &dst, &[]);

        assert!(dst.is_file(), "volback did not create {}", dst.display());
        assert_eq!(file_size(&dst), size, "destination size");
        assert_same(&src, &dst, size);

        let (src_alloc, dst_alloc) = (allocated_bytes(&src), allocated_bytes(&dst));
        assert!(
            dst_alloc <= src_alloc + MIB && dst_alloc < size / 8,
            "destination is not sparse: {dst_alloc} bytes allocated of {size} \
             (source: {src_alloc}); data extents: {:?}",
            data_extents(&dst)
        );
        assert!(
            !has_data_in(&dst, 16 * MIB..64 * MIB),
            "the source's hole [16 MiB, 64 MiB) was written in the destination; \
             data extents: {:?}",
            data_extents(&dst)
        );
    });
}

// 3. unaligned sizes -------------------------------------------------------

const UNALIGNED_SIZES: [u64; 4] = [10 * MIB + 1000, 3, 4097, MIB - 1];

/// A source of `size` bytes: random, with a hole and a zero block when big
/// enough to hold them.
fn create_unaligned_source(path: &Path, size: u64, seed: u64) {
    if size > 8 * MIB {
        create_file(
            path,
            size,
            &[
                Region::random(0, 2 * MIB, seed),
                Region::zeros(2 * MIB, 4 * KIB),
                // [2 MiB + 4 KiB, 6 MiB) is a hole.
                Region::random(6 * MIB, size - 6 * MIB, seed + 1),
            ],
        );
    } else {
        create_random_file(path, size, seed);
    }
}

fn block_size_opts(block_size: Option<&'static str>) -> Vec<&'static str> {
    match block_size {
        Some(bs) => vec!["--block-size", bs],
        None => vec![],
    }
}

#[test]
fn unaligned_sizes_to_new_file() {
    with_scratch(|s| {
        for (i, &size) in UNALIGNED_SIZES.iter().enumerate() {
            let src = s.join(format!("src-{size}.img"));
            create_unaligned_source(&src, size, 30 + i as u64);
            for block_size in [None, Some("64K"), Some("4M")] {
                let dst = s.join(format!(
                    "dst-{size}-{}.img",
                    block_size.unwrap_or("default")
                ));
                let run = copy_ok(&src, &dst, &block_size_opts(block_size));
                assert_eq!(
                    file_size(&dst),
                    size,
                    "destination size\n{}",
                    run.describe()
                );
                assert_same(&src, &dst, size);
                std::fs::remove_file(&dst).unwrap();
            }
        }
    });
}

#[test]
fn unaligned_sizes_to_larger_existing_file() {
    with_scratch(|s| {
        for (i, &size) in UNALIGNED_SIZES.iter().enumerate() {
            let src = s.join(format!("src-{size}.img"));
            create_unaligned_source(&src, size, 40 + i as u64);
            let dst_size = size + MIB + 7;
            for block_size in [None, Some("64K"), Some("4M")] {
                let dst = s.join("dst.img");
                let orig = s.join("dst-orig.img");
                create_random_file(&dst, dst_size, 50 + i as u64);
                snapshot(&dst, &orig);

                let run = copy_ok(&src, &dst, &block_size_opts(block_size));

                assert_eq!(
                    file_size(&dst),
                    dst_size,
                    "existing destination was resized\n{}",
                    run.describe()
                );
                assert_same(&src, &dst, size);
                // What lies beyond the source's length stays as it was.
                assert_same_in(&orig, &dst, size..dst_size);
            }
        }
    });
}

// 4. stale destination -----------------------------------------------------

fn stale_destination(sparse: &str) {
    with_scratch(|s| {
        let size = 24 * MIB;
        let mut regions = vec![
            Region::random(0, MIB, 60),
            Region::zeros(MIB, 4 * KIB),
            Region::random(MIB + 4 * KIB, 60 * KIB, 61),
            // hole up to 4 MiB, then 2 MiB of written zeroes
            Region::zeros(4 * MIB, 2 * MIB),
            Region::random(6 * MIB + 512, 4 * KIB, 62),
            // hole up to 10 MiB
            Region::random(size - 3000, 3000, 63),
        ];
        for i in 0..32u64 {
            let offset = 10 * MIB + i * 4 * KIB;
            if i % 3 == 0 {
                regions.push(Region::random(offset, 4 * KIB, 200 + i));
            } else {
                regions.push(Region::zeros(offset, 4 * KIB));
            }
        }
        let src = s.join("src.img");
        let dst_file = s.join("dst.img");
        create_file(&src, size, &regions);
        create_filled_file(&dst_file, size, 0xAB);
        let dst = LoopDevice::attach(&dst_file, true);

        copy_ok(&src, dst.path(), &["--sparse", sparse]);

        assert_same(&src, dst.path(), size);
    });
}

#[test]
fn stale_destination_is_zeroed_sparse_auto() {
    stale_destination("auto");
}

#[test]
fn stale_destination_is_zeroed_sparse_always() {
    stale_destination("always");
}

#[test]
fn stale_destination_is_zeroed_sparse_never() {
    stale_destination("never");
}

// 5. smaller destination ---------------------------------------------------

#[test]
fn smaller_destination_is_refused_and_left_untouched() {
    with_scratch(|s| {
        let (src_size, dst_size) = (32 * MIB, 16 * MIB);
        let src = s.join("src.img");
        create_file(
            &src,
            src_size,
            &[
                Region::random(0, 2 * MIB, 70),
                Region::random(20 * MIB, 2 * MIB, 71),
            ],
        );
        let dst_file = s.join("dst.img");
        create_random_file(&dst_file, dst_size, 72);
        let orig = s.join("dst-orig.img");
        snapshot(&dst_file, &orig);
        let dst = LoopDevice::attach(&dst_file, true);

        let run = volback_err(copy_args(&src, dst.path(), &[]));

        let dst_name = arg(dst.path());
        assert!(
            run.stderr.contains(&dst_name),
            "stderr does not name the destination {dst_name}\n{}",
            run.describe()
        );
        assert!(
            run.stderr.to_lowercase().contains("smaller"),
            "stderr does not say the destination is smaller\n{}",
            run.describe()
        );
        assert!(
            mentions_size(&run.stderr, src_size) && mentions_size(&run.stderr, dst_size),
            "stderr does not state both sizes ({src_size} and {dst_size} bytes)\n{}",
            run.describe()
        );
        assert_same(&orig, dst.path(), dst_size);
    });
}

// 6. throttling ------------------------------------------------------------

#[test]
fn bwlimit_throttles_to_the_given_rate() {
    // Alone, so that the other tests' I/O doesn't count against the limit.
    with_quiet_scratch(|s| {
        let size = 48 * MIB;
        let src = s.join("src.img");
        let dst = s.join("dst.img");
        create_random_file(&src, size, 80);
        sync_filesystems();

        let run = copy_ok(&src, &dst, &["--bwlimit", "16M"]);

        // 48 MiB at 16 MiB/s is 3 s; allow 10% early and some process start.
        let secs = run.elapsed.as_secs_f64();
        assert!(
            (2.7..=3.45).contains(&secs),
            "copy of 48 MiB at --bwlimit 16M took {secs:.3} s, expected 3.0 s (2.7..=3.45)\n{}",
            run.describe()
        );
        assert_same(&src, &dst, size);
    });
}

// 7. verify ----------------------------------------------------------------

fn verify_source(path: &Path) -> u64 {
    let size = 16 * MIB + 512;
    create_file(
        path,
        size,
        &[
            Region::random(0, 5 * MIB, 90),
            Region::zeros(5 * MIB, 64 * KIB),
            Region::random(9 * MIB + 100, 3 * MIB, 91),
            Region::random(size - 4096, 4096, 92),
        ],
    );
    size
}

#[test]
fn verify_succeeds_on_a_good_copy() {
    with_scratch(|s| {
        let src = s.join("src.img");
        let size = verify_source(&src);

        let dst = s.join("dst-json.img");
        let run = copy_ok(&src, &dst, &["--verify", "--progress", "json"]);
        let summary = run.summary();
        assert_eq!(
            summary.get("verified"),
            Some(&Value::Bool(true)),
            "summary does not say verified: true\n{}",
            run.describe()
        );
        assert_same(&src, &dst, size);

        // Without JSON progress, the digest is printed for a person.
        let dst = s.join("dst-plain.img");
        let run = copy_ok(&src, &dst, &["--verify"]);
        let text = format!("{}\n{}", run.stdout, run.stderr);
        assert!(
            find_hex_digest(&text).is_some(),
            "no digest (16+ hex digits) printed by --verify\n{}",
            run.describe()
        );
        assert_same(&src, &dst, size);
    });
}

/// The test-only fault point that flips the byte written at an offset. The
/// contract is `VOLBACK_FAULT_CORRUPT_WRITE_AT=<offset>`; the engine's fail
/// point (`copy_corrupt_write`, fail crate, needs the `failpoints` feature)
/// is set too, so either spelling reaches it.
const FAULT_ENV: &str = "VOLBACK_FAULT_CORRUPT_WRITE_AT";

fn corrupt_write_at(cmd: &mut std::process::Command, at: u64) {
    cmd.env(FAULT_ENV, at.to_string());
    cmd.env("FAILPOINTS", format!("copy_corrupt_write=return({at})"));
}

#[test]
fn verify_catches_a_corrupted_write() {
    with_scratch(|s| {
        let src = s.join("src.img");
        let size = verify_source(&src);
        // Inside random data, not aligned to anything.
        let at = 2 * MIB + 12345;

        // Control: without --verify the fault point corrupts exactly one byte
        // and nothing notices.
        let dst = s.join("dst-noverify.img");
        let mut cmd = volback_command(copy_args(&src, &dst, &[]));
        corrupt_write_at(&mut cmd, at);
        let control = run(cmd).assert_success();
        assert_eq!(
            first_difference(&src, &dst, size),
            Some(at),
            "{FAULT_ENV}={at} did not corrupt the byte at {at}: is the fault point \
             compiled in (cargo build -p volback-engine --features failpoints)?\n{}",
            control.describe()
        );
        assert_same_in(&src, &dst, at + 1..size);

        // With --verify, to a new file and to a loop device.
        let dev_file = s.join("dev.img");
        create_sparse_file(&dev_file, size);
        let dev = LoopDevice::attach(&dev_file, true);
        for dst in [s.join("dst-verify.img"), dev.path().to_path_buf()] {
            let mut cmd = volback_command(copy_args(&src, &dst, &["--verify"]));
            corrupt_write_at(&mut cmd, at);
            let run = run(cmd).assert_failure();
            let expected = format!("first difference at offset {at}");
            assert!(
                run.stderr.contains(&expected),
                "stderr lacks {expected:?}\n{}",
                run.describe()
            );
            if dst.exists() {
                assert_eq!(first_difference(&src, &dst, size), Some(at));
            }
        }
    });
}

// 8. JSON progress ---------------------------------------------------------

#[test]
fn json_progress_lines_and_summary() {
    with_scratch(|s| {
        let size = 16 * MIB;
        let src = s.join("src.img");
        let dst = s.join("dst.img");
        create_random_file(&src, size, 110);

        // 16 MiB at 8 MiB/s: about 2 s, long enough for progress lines.
        let run = copy_ok(&src, &dst, &["--progress", "json", "--bwlimit", "8M"]);

        let lines = run.json_lines();
        for line in &lines {
            assert!(
                line.get("event").and_then(Value::as_str).is_some(),
                "JSON line without a string \"event\": {line}\n{}",
                run.describe()
            );
        }
        let progress = lines.iter().filter(|l| l["event"] == "progress").count();
        assert!(
            progress >= 1,
            "no \"event\":\"progress\" line in a ~2 s copy\n{}",
            run.describe()
        );
        let summary = run.summary();
        for field in [
            "bytes_read",
            "bytes_written",
            "bytes_skipped",
            "bytes_zeroed",
        ] {
            json_u64(&summary, field);
        }
        assert_eq!(json_u64(&summary, "bytes_read"), size, "{summary}");
        assert_eq!(json_u64(&summary, "bytes_written"), size, "{summary}");
        let elapsed = json_f64(&summary, "elapsed_s");
        assert!(
            elapsed >= 1.5 && elapsed <= run.elapsed.as_secs_f64() + 0.05,
            "elapsed_s {elapsed} for a copy that took {:.3} s\n{}",
            run.elapsed.as_secs_f64(),
            run.describe()
        );
        assert_same(&src, &dst, size);
    });
}

// 9. summary numbers -------------------------------------------------------

/// Random data islands (4 KiB-aligned, so the allocation map is exact) in a
/// 64 MiB file.
fn summary_layout() -> (u64, Vec<Region>) {
    let size = 64 * MIB;
    let regions = vec![
        Region::random(0, 256 * KIB, 120),
        Region::random(MIB + 4 * KIB, 8 * KIB, 121),
        Region::random(5 * MIB, 3 * MIB + 4 * KIB, 122),
        Region::random(20 * MIB, 64 * KIB, 123),
        Region::random(size - 4 * KIB, 4 * KIB, 124),
    ];
    (size, regions)
}

fn check_summary_numbers(src: &Path, dst: &Path, size: u64, regions: &[Region]) {
    let data = random_data_bytes(regions);
    let slack = 64 * KIB * regions.len() as u64;
    let run = copy_ok(src, dst, &["--progress", "json"]);
    let summary = run.summary();
    assert_eq!(
        json_u64(&summary, "bytes_written"),
        data,
        "bytes_written should be exactly the {data} data bytes\n{}",
        run.describe()
    );
    let read = json_u64(&summary, "bytes_read");
    assert!(
        (data..=data + slack).contains(&read),
        "bytes_read {read} should be the {data} data bytes (+ up to {slack}): holes are not read\n{}",
        run.describe()
    );
    assert_eq!(file_size(dst), size);
    assert_same(src, dst, size);
}

#[test]
fn summary_counts_only_data_from_a_sparse_file() {
    with_scratch(|s| {
        let (size, regions) = summary_layout();
        let src = s.join("src.img");
        create_file(&src, size, &regions);
        check_summary_numbers(&src, &s.join("dst.img"), size, &regions);
    });
}

#[test]
fn summary_counts_only_data_from_a_loop_device() {
    with_scratch(|s| {
        let (size, regions) = summary_layout();
        let src_file = s.join("src.img");
        create_file(&src_file, size, &regions);
        let src = LoopDevice::attach(&src_file, true);
        check_summary_numbers(src.path(), &s.join("dst.img"), size, &regions);
    });
}

// 10. errors name the device -----------------------------------------------

#[test]
fn missing_source_is_named() {
    with_scratch(|s| {
        let src = s.join("no-such-source.img");
        let dst = s.join("dst.img");
        let run = volback_err(copy_args(&src, &dst, &[]));
        assert!(
            run.stderr.contains(&arg(&src)),
            "stderr does not name the missing source\n{}",
            run.describe()
        );
    });
}

#[test]
fn unreachable_destination_is_named() {
    with_scratch(|s| {
        let src = s.join("src.img");
        create_random_file(&src, MIB, 130);
        let dst = s.join("no-such-dir").join("dst.img");
        let run = volback_err(copy_args(&src, &dst, &[]));
        assert!(
            run.stderr.contains(&arg(&dst)),
            "stderr does not name the destination\n{}",
            run.describe()
        );
    });
}

// 10. volback read ---------------------------------------------------------

/// `volback read` prints the checksum `copy --verify` computes for the same
/// data, reads only the data of a sparse source (everything with
/// `--sparse never`), and a changed byte changes the checksum.
#[test]
fn read_prints_the_copy_checksum_and_skips_holes() {
    with_scratch(|s| {
        let (size, regions) = sparse_layout();
        let src = s.join("src.img");
        create_file(&src, size, &regions);
        let copied = copy_ok(
            &src,
            &s.join("dst.img"),
            &["--verify", "--progress", "json"],
        );
        let expected = json_str(&copied.summary(), "checksum").to_owned();

        let read = |extra: &[&str]| {
            let mut args = vec![
                "read".to_string(),
                arg(&src),
                "--progress".into(),
                "json".into(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            volback_ok(args).summary()
        };
        let sparse = read(&[]);
        assert_eq!(json_str(&sparse, "checksum"), expected, "{sparse}");
        assert_eq!(json_u64(&sparse, "size"), size, "{sparse}");
        let data = random_data_bytes(&regions);
        let got = json_u64(&sparse, "bytes_read");
        assert!(
            got >= data && got < size / 2,
            "read {got} bytes of a file with {data} bytes of data: {sparse}"
        );
        let dense = read(&[
            "--sparse",
            "never",
            "--block-size",
            "64K",
            "--queue-depth",
            "3",
        ]);
        assert_eq!(json_str(&dense, "checksum"), expected, "{dense}");
        assert_eq!(json_u64(&dense, "bytes_read"), size, "{dense}");
        // A pure read: the same bytes read, no checksum.
        let pure = read(&["--sparse", "never", "--no-checksum"]);
        assert_eq!(json_u64(&pure, "bytes_read"), size, "{pure}");
        assert!(pure["checksum"].is_null(), "{pure}");

        write_bytes(
            &std::fs::OpenOptions::new().write(true).open(&src).unwrap(),
            5,
            1,
            0xee,
        );
        assert_ne!(json_str(&read(&[]), "checksum"), expected);
    });
}
