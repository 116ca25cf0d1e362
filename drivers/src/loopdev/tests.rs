//! Tests of loop device handling (as root).

use std::os::unix::fs::FileExt;

use super::test_support::Scratch;
use super::*;

const MIB: u64 = 1024 * 1024;

fn sparse_file(scratch: &Scratch, name: &str, size: u64) -> PathBuf {
    let p = scratch.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

#[test]
fn attach_write_find_detach() {
    let scratch = Scratch::new();
    let file = sparse_file(&scratch, "a.img", 4 * MIB);
    let dev = LoopDevice::attach(&file, false, true).unwrap();
    let path = dev.path().to_path_buf();
    assert!(
        path.to_str().unwrap().starts_with("/dev/loop"),
        "{}",
        path.display()
    );

    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    {
        let d = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        d.write_all_at(&data, MIB).unwrap();
        d.sync_all().unwrap();
    }
    let mut back = vec![0u8; data.len()];
    File::open(&file)
        .unwrap()
        .read_exact_at(&mut back, MIB)
        .unwrap();
    assert_eq!(
        back, data,
        "data written through the loop device reaches the file"
    );

    let st = status(&path).unwrap().expect("bound");
    assert!(!st.read_only);
    assert_eq!(find_attached(&file).unwrap(), vec![path.clone()]);
    // The kernel shows our name (what `losetup -a` falls back on).
    let sys = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/backing_file",
        path.file_name().unwrap().to_str().unwrap()
    ))
    .unwrap();
    assert_eq!(sys.trim_end(), file.to_str().unwrap());

    dev.detach().unwrap();
    assert!(find_attached(&file).unwrap().is_empty());
    // Detaching a detached device is fine.
    detach_path(&path).unwrap();
}

#[test]
fn read_only_attach() {
    let scratch = Scratch::new();
    let file = sparse_file(&scratch, "ro.img", MIB);
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(b"hello", 0)
        .unwrap();
    let dev = LoopDevice::attach(&file, true, false).unwrap();
    let st = status(dev.path()).unwrap().expect("bound");
    assert!(st.read_only);
    assert!(!st.direct_io);
    let mut buf = [0u8; 5];
    File::open(dev.path())
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"hello");
    // Depending on the kernel, opening for writing or the write fails.
    let written = OpenOptions::new()
        .write(true)
        .open(dev.path())
        .and_then(|d| d.write_all_at(&[0u8; 4096], 0).and_then(|()| d.sync_all()));
    let e = written.expect_err("wrote to a read-only loop device");
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::EACCES | libc::EROFS)
        ),
        "{e}"
    );
    drop(dev);
    assert!(find_attached(&file).unwrap().is_empty());
}

#[test]
fn drop_detaches_on_panic() {
    let scratch = Scratch::new();
    let file = sparse_file(&scratch, "p.img", MIB);
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let dev = LoopDevice::attach(&file, false, true).unwrap();
        *seen.lock().unwrap() = Some(dev.path().to_path_buf());
        assert_eq!(find_attached(&file).unwrap().len(), 1);
        panic!("failing operation");
    });
    assert!(r.is_err());
    assert!(seen.lock().unwrap().is_some());
    assert!(
        find_attached(&file).unwrap().is_empty(),
        "guard detached while unwinding"
    );
}

#[test]
fn into_path_keeps_attachment() {
    let scratch = Scratch::new();
    let file = sparse_file(&scratch, "k.img", MIB);
    let path = LoopDevice::attach(&file, false, true).unwrap().into_path();
    assert_eq!(find_attached(&file).unwrap(), vec![path.clone()]);
    detach_path(&path).unwrap();
    assert!(find_attached(&file).unwrap().is_empty());
}

#[test]
fn concurrent_attaches_get_distinct_devices() {
    let scratch = Scratch::new();
    let files: Vec<PathBuf> = (0..4)
        .map(|i| sparse_file(&scratch, &format!("c{i}.img"), MIB))
        .collect();
    let devs: Vec<LoopDevice> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| s.spawn(move || LoopDevice::attach(f, false, true)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let mut paths: Vec<&Path> = devs.iter().map(|d| d.path()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 4);
    for (f, d) in files.iter().zip(&devs) {
        assert_eq!(find_attached(f).unwrap(), vec![d.path().to_path_buf()]);
    }
    drop(devs);
    for f in &files {
        assert!(find_attached(f).unwrap().is_empty());
    }
}

#[test]
fn find_attached_missing_file_is_not_found() {
    let scratch = Scratch::new();
    let e = find_attached(&scratch.join("nope")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
}
