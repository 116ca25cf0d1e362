use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::config::normalize_portal;
use super::tgtadm::{self, classify, display_command, TgtadmErrorKind};
use super::*;
use crate::file::FileDriver;
use crate::loopdev::test_support::Scratch;
use volback_tests::TgtDaemon;

// ---------------------------------------------------------------------------
// Pure logic

/// `tgtadm --mode target --op show` of tgt 1.0.85 on this machine, with a
/// session, CHAP accounts and a read-only LUN.
const SHOW: &str = "Target 1: iqn.2026-11.org.volback:p:vol1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 19
            Initiator: iqn.2010-11.libiscsi:iscsi-perf alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00010001
            SCSI SN: beaf11
            Size: 67 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: Yes
            SWP: No
            Thin-provisioning: Yes
            Backing store type: rdwr
            Backing store path: /var/tmp/a dir/volume-vol1.img
            Backing store flags: 
    Account information:
        alice
        tgtout (outgoing)
    ACL information:
        ALL
Target 2: iqn.2026-11.org.volback:p:snap:s1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
        127.0.0.1
        iqn.1994-05.com.example:host";

#[test]
fn parses_target_show() {
    let t = tgtadm::parse_targets(SHOW);
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].tid, 1);
    assert_eq!(t[0].name, "iqn.2026-11.org.volback:p:vol1");
    assert_eq!(t[0].nexuses.len(), 1);
    assert_eq!(t[0].nexuses[0].sid, 19);
    assert_eq!(t[0].nexuses[0].initiator, "iqn.2010-11.libiscsi:iscsi-perf");
    assert_eq!(t[0].nexuses[0].connections, vec![0]);
    let lun = t[0].lun(1).unwrap();
    assert!(lun.readonly && lun.thin);
    assert_eq!(
        lun.backing_path.as_deref(),
        Some("/var/tmp/a dir/volume-vol1.img")
    );
    assert_eq!(t[0].lun(0).unwrap().backing_path, None);
    assert_eq!(
        t[0].accounts,
        vec![
            tgtadm::AccountShow {
                user: "alice".into(),
                outgoing: false
            },
            tgtadm::AccountShow {
                user: "tgtout".into(),
                outgoing: true
            },
        ]
    );
    assert_eq!(t[0].acl, vec!["ALL"]);
    assert_eq!(t[1].tid, 2);
    assert!(t[1].nexuses.is_empty() && t[1].accounts.is_empty());
    assert!(t[1].lun(1).is_none());
    assert_eq!(t[1].acl, vec!["127.0.0.1", "iqn.1994-05.com.example:host"]);
    assert!(tgtadm::parse_targets("").is_empty());
}

#[test]
fn parses_accounts_and_portals() {
    assert_eq!(
        tgtadm::parse_accounts("Account list:\n    tgtout\n    alice\n"),
        vec!["tgtout", "alice"]
    );
    assert!(tgtadm::parse_accounts("Account list:\n").is_empty());
    assert_eq!(
        tgtadm::parse_portals("Portal: 127.0.0.1:3271,1\nPortal: [::]:3260,1\n"),
        vec!["127.0.0.1:3271", "[::]:3260"]
    );
}

#[test]
fn iqn_mapping_is_valid_and_one_to_one() {
    let p = DEFAULT_IQN_PREFIX;
    let vol = |pool: &str, id: &str| target_iqn(p, pool, &ExportTarget::Volume(id.into()));
    let snap = |pool: &str, id: &str| target_iqn(p, pool, &ExportTarget::Snapshot(id.into()));
    let uuid = "3f2a61c0-8d3e-4c1b-9a57-0e6f4b2d7c11";
    assert_eq!(
        vol("gold", uuid),
        format!("iqn.2026-11.org.volback:gold:{uuid}")
    );
    assert_eq!(
        snap("gold", uuid),
        format!("iqn.2026-11.org.volback:gold:snap:{uuid}")
    );
    assert_eq!(
        vol("my_pool", "Vol.1"),
        "iqn.2026-11.org.volback:my.5fpool:.56ol.2e1"
    );
    let names = [
        vol("p", "a.b"),
        vol("p", "A.b"),
        vol("p", "a_b"),
        vol("p", "snap"),
        snap("p", "snap"),
        vol("p", ".2e"),
        vol("p.x", "y"),
        vol("p", "x.y"),
        snap("p", "a"),
        vol("q", "a"),
    ];
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    let long = "A".repeat(crate::MAX_ID_LEN);
    for n in names.iter().chain([&vol("p", &long), &snap("p", &long)]) {
        assert!(n.len() <= 223, "{n}");
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".:-".contains(&b)),
            "{n}"
        );
    }
    assert!(vol("p", &long).contains(":p:h:"));
    assert!(snap("p", &long).contains(":p:snap:h:"));
    assert_ne!(
        vol("p", &long),
        vol("p", &"A".repeat(crate::MAX_ID_LEN - 1))
    );
}

#[test]
fn portals_are_normalized() {
    assert_eq!(
        normalize_portal("127.0.0.1:3261").as_deref(),
        Some("127.0.0.1:3261")
    );
    assert_eq!(
        normalize_portal(" 127.0.0.1 ").as_deref(),
        Some("127.0.0.1:3260")
    );
    assert_eq!(
        normalize_portal("[::1]:3262").as_deref(),
        Some("[::1]:3262")
    );
    assert_eq!(normalize_portal("::1").as_deref(), Some("[::1]:3260"));
    assert_eq!(
        normalize_portal("San.Example:3260").as_deref(),
        Some("san.example:3260")
    );
    for bad in ["", "host:0", "host:x", "a b:1", ":3260", "host:70000"] {
        assert_eq!(normalize_portal(bad), None, "{bad}");
    }
}

#[test]
fn passwords_never_shown() {
    let c = display_command(
        "tgtadm",
        &[
            "--mode",
            "account",
            "--op",
            "new",
            "--user",
            "u",
            "--password",
            "s3cret",
        ],
    );
    assert_eq!(c, "tgtadm --mode account --op new --user u --password ***");
    assert_eq!(
        classify(Some(22), "tgtadm: can't find the target"),
        TgtadmErrorKind::NotFound
    );
    assert_eq!(
        classify(Some(22), "tgtadm: this target already exists"),
        TgtadmErrorKind::AlreadyExists
    );
    assert_eq!(
        classify(Some(22), "tgtadm: this logical unit is still active"),
        TgtadmErrorKind::Busy
    );
    assert_eq!(
        classify(
            Some(107),
            "tgtadm: failed to send request hdr to tgt daemon"
        ),
        TgtadmErrorKind::Unreachable
    );
    assert_eq!(
        classify(Some(22), "tgtadm: invalid request"),
        TgtadmErrorKind::Invalid
    );
}

fn config(portal: &str, control_port: u32, pools: &[(&str, &Path)]) -> TgtConfig {
    TgtConfig {
        portal: portal.to_string(),
        control_port: Some(control_port),
        pools: pools
            .iter()
            .map(|(n, d)| (n.to_string(), d.to_path_buf()))
            .collect(),
        iqn_prefix: DEFAULT_IQN_PREFIX.to_string(),
        chap: None,
        mutual_chap: None,
        target_params: BTreeMap::new(),
    }
}

#[test]
fn config_is_checked() {
    let scratch = Scratch::new();
    let dir = scratch.mkdir("p");
    let json = format!(
        r#"{{"portal": "127.0.0.1:3261", "control_port": 7, "pools": {{"p": "{}"}},
            "chap": {{"user": "alice", "secret_file": "/nonexistent"}}}}"#,
        dir.display()
    );
    let c: TgtConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(c.iqn_prefix, DEFAULT_IQN_PREFIX);
    assert_eq!(c.control_port, Some(7));
    let e = TgtDriver::new("b", c).unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("/nonexistent"), "{e}");
    let unknown = r#"{"portal": "x:1", "pools": {}, "secret": "x"}"#;
    assert!(serde_json::from_str::<TgtConfig>(unknown)
        .unwrap_err()
        .to_string()
        .contains("unknown field"));

    let base = config("127.0.0.1:3261", 7, &[("p", &dir)]);
    let bad = |f: &dyn Fn(&mut TgtConfig)| {
        let mut c = base.clone();
        f(&mut c);
        TgtDriver::new("b", c).unwrap_err()
    };
    assert_eq!(
        bad(&|c| c.portal = "not a portal".into()).kind,
        DriverErrorKind::InvalidArgument
    );
    assert_eq!(
        bad(&|c| c.control_port = Some(40000)).kind,
        DriverErrorKind::InvalidArgument
    );
    assert_eq!(
        bad(&|c| c.iqn_prefix = "IQN.Upper".into()).kind,
        DriverErrorKind::InvalidArgument
    );
    let secret = scratch.join("secret");
    std::fs::write(&secret, "bad xyzzy secret\n").unwrap();
    let e = bad(&|c| {
        c.chap = Some(ChapConfig {
            user: "alice".into(),
            secret_file: secret.clone(),
        })
    });
    assert_eq!(e.kind, DriverErrorKind::InvalidArgument);
    assert!(!e.to_string().contains("xyzzy"), "secret leaked: {e}");
    std::fs::write(&secret, "goodsecret12\n").unwrap();
    assert!(bad(&|c| {
        c.mutual_chap = Some(ChapConfig {
            user: "tgt".into(),
            secret_file: secret.clone(),
        })
    })
    .to_string()
    .contains("mutual_chap needs chap"));
    assert_eq!(
        bad(&|c| {
            c.target_params
                .insert("MaxRecvDataSegmentLength".into(), "1; rm".into());
        })
        .kind,
        DriverErrorKind::InvalidArgument
    );
    assert_eq!(
        bad(&|c| {
            c.pools.insert("q".into(), scratch.join("does-not-exist"));
        })
        .kind,
        DriverErrorKind::NotFound
    );
    let mut good = base.clone();
    good.chap = Some(ChapConfig {
        user: "alice".into(),
        secret_file: secret.clone(),
    });
    let d = TgtDriver::new("b", good).unwrap();
    assert!(!format!("{d:?}").contains("goodsecret12"));
}

/// Same directory, any path: one identity, the file driver's; another
/// directory: another identity. No tgtd needed.
#[test]
fn pool_identity_is_the_directory() {
    let scratch = Scratch::new();
    let a = scratch.mkdir("a");
    let b = scratch.mkdir("b");
    let link = scratch.join("link-to-a");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let d = TgtDriver::new(
        "t",
        config("127.0.0.1:3261", 1, &[("a", &a), ("b", &b), ("l", &link)]),
    )
    .unwrap();
    let other_portal = TgtDriver::new("u", config("127.0.0.1:3299", 2, &[("x", &a)])).unwrap();
    let ia = d.pool_identity("a").unwrap();
    assert_eq!(ia, d.pool_identity("l").unwrap());
    assert_ne!(ia, d.pool_identity("b").unwrap());
    assert_eq!(ia, other_portal.pool_identity("x").unwrap());
    let files = FileDriver::new("f", BTreeMap::from([("a".to_string(), a.clone())])).unwrap();
    assert_eq!(ia, files.pool_identity("a").unwrap());
    let pools = d.pools().unwrap();
    assert_eq!(pools.len(), 3);
    assert!(pools
        .iter()
        .all(|p| p.capacity_bytes > 0 && p.free_bytes > 0));
    assert_eq!(d.kind(), "tgt");
    let e = d.pool_identity("nope").unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound);
    assert!(e.backend.starts_with("tgt backend 't'"), "{e}");
}

// ---------------------------------------------------------------------------
// Against a real tgtd

const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn url(info: &ConnectionInfo, creds: &str) -> String {
    format!(
        "iscsi://{creds}{}/{}/{}",
        info.properties["portal"], info.properties["iqn"], info.properties["lun"]
    )
}

fn total_size(info: &ConnectionInfo, creds: &str) -> u64 {
    let out = run("iscsi-readcapacity16", &[&url(info, creds)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iscsi-readcapacity16: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Total size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Total size in {text}"))
}

/// libiscsi's SCSI.Write10.Simple test (writes 0xa6 blocks at the start and
/// end of the LUN); whether it passed.
fn write10(info: &ConnectionInfo) -> (bool, String) {
    let out = run(
        "iscsi-test-cu",
        &[
            "--dataloss",
            "--fail",
            "--silent",
            "--test=SCSI.Write10.Simple",
            &url(info, ""),
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn setup(name: &str) -> (TgtDaemon, Scratch, PathBuf, TgtDriver) {
    let tgtd = TgtDaemon::start();
    let scratch = Scratch::new();
    let dir = scratch.mkdir(name);
    let d = TgtDriver::new(
        "t",
        config(&tgtd.portal, tgtd.control_port, &[("gold", &dir)]),
    )
    .unwrap();
    (tgtd, scratch, dir, d)
}

#[test]
fn tgt_export_is_reachable_and_unexport_removes_it() {
    let (tgtd, _scratch, dir, d) = setup("pool");
    let md = Metadata::new();
    d.create_volume("gold", "vol-1", "one", 64 * MIB, &md)
        .unwrap();
    let target = ExportTarget::Volume("vol-1".into());
    let info = d.export("gold", &target, ExportOptions::default()).unwrap();
    assert_eq!(info.connector, "iscsi");
    assert!(!info.read_only);
    assert_eq!(
        info.properties,
        BTreeMap::from([
            ("portal".to_string(), tgtd.portal.clone()),
            (
                "iqn".to_string(),
                format!("{DEFAULT_IQN_PREFIX}:gold:vol-1")
            ),
            ("lun".to_string(), "1".to_string()),
        ])
    );
    // Idempotent: the same info, still one target.
    assert_eq!(
        d.export("gold", &target, ExportOptions::default()).unwrap(),
        info
    );
    let show = tgtadm::parse_targets(&tgtd.show());
    assert_eq!(show.len(), 1);
    let lun = show[0].lun(1).unwrap();
    assert!(lun.thin && !lun.readonly);
    assert_eq!(show[0].acl, vec!["ALL"]);
    assert!(!d.in_use("gold", "vol-1").unwrap());

    let inq = run("iscsi-inq", &[&url(&info, "")]);
    assert!(inq.status.success(), "{inq:?}");
    assert!(String::from_utf8_lossy(&inq.stdout).contains("DIRECT_ACCESS"));
    assert_eq!(total_size(&info, ""), 64 * MIB);
    let ls = run("iscsi-ls", &["-s", &format!("iscsi://{}", tgtd.portal)]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.contains(&format!("Target:{}", info.properties["iqn"])),
        "{ls}"
    );
    assert!(ls.contains("Lun:1") && ls.contains("Size:63M"), "{ls}");

    // Writes through iSCSI land in the image file.
    let (ok, text) = write10(&info);
    assert!(ok, "{text}");
    let img = std::fs::File::open(dir.join("volume-vol-1.img")).unwrap();
    let mut b = [0u8; 512];
    img.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0xa6));

    d.unexport("gold", &target).unwrap();
    assert!(tgtadm::parse_targets(&tgtd.show()).is_empty());
    assert!(!run("iscsi-inq", &[&url(&info, "")]).status.success());
    d.unexport("gold", &target).unwrap();

    // Delete unexports first; twice is fine; unexport of nothing is fine.
    d.export("gold", &target, ExportOptions::default()).unwrap();
    d.delete_volume("gold", "vol-1").unwrap();
    assert!(tgtadm::parse_targets(&tgtd.show()).is_empty());
    assert!(!dir.join("volume-vol-1.img").exists());
    d.delete_volume("gold", "vol-1").unwrap();
    d.unexport("gold", &target).unwrap();
    d.delete_snapshot("gold", "never").unwrap();
    let e = d
        .export("gold", &target, ExportOptions::default())
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound, "{e}");
    assert!(tgtadm::parse_targets(&tgtd.show()).is_empty());
}

#[test]
fn tgt_snapshot_is_point_in_time_and_read_only() {
    let (tgtd, _scratch, dir, d) = setup("pool");
    d.create_volume("gold", "v", "v", 16 * MIB, &Metadata::new())
        .unwrap();
    let vol_img = dir.join("volume-v.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&vol_img)
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    d.create_snapshot("gold", "v", "s1").unwrap();
    f.write_all_at(&[2u8; 4096], 0).unwrap();
    let snap_img = std::fs::File::open(dir.join("snapshot-s1.img")).unwrap();
    let mut b = [0u8; 4096];
    snap_img.read_exact_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 1),
        "the snapshot changed with its volume"
    );

    let snap = ExportTarget::Snapshot("s1".into());
    let info = d.export("gold", &snap, ExportOptions::default()).unwrap();
    assert!(info.read_only);
    assert_eq!(
        info.properties["iqn"],
        format!("{DEFAULT_IQN_PREFIX}:gold:snap:s1")
    );
    assert_eq!(total_size(&info, ""), 16 * MIB);
    let show = tgtadm::parse_targets(&tgtd.show());
    assert!(show[0].lun(1).unwrap().readonly);
    let (ok, text) = write10(&info);
    assert!(!ok, "a write to a snapshot's LUN succeeded: {text}");
    snap_img.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 1));

    // A read-only export of a volume.
    let vol = ExportTarget::Volume("v".into());
    let ro = ExportOptions {
        read_only: true,
        ..ExportOptions::default()
    };
    let vinfo = d.export("gold", &vol, ro).unwrap();
    assert!(vinfo.read_only);
    let show = tgtadm::parse_targets(&tgtd.show());
    let t = show
        .iter()
        .find(|t| t.name == vinfo.properties["iqn"])
        .unwrap();
    assert!(t.lun(1).unwrap().readonly);
    assert!(!write10(&vinfo).0);
    // A read-write export of it makes it writable.
    let rw = d.export("gold", &vol, ExportOptions::default()).unwrap();
    assert!(!rw.read_only);
    assert!(write10(&rw).0);

    d.delete_snapshot("gold", "s1").unwrap();
    d.delete_volume("gold", "v").unwrap();
    assert!(tgtadm::parse_targets(&tgtd.show()).is_empty());
}

#[test]
fn tgt_chap_and_mutual_chap() {
    let tgtd = TgtDaemon::start();
    let scratch = Scratch::new();
    let dir = scratch.mkdir("pool");
    let (user_secret, target_secret) = ("initiatorsecret1", "targetsecret22");
    let user_file = scratch.join("chap.secret");
    let target_file = scratch.join("mutual.secret");
    std::fs::write(&user_file, format!("{user_secret}\n")).unwrap();
    std::fs::write(&target_file, target_secret).unwrap();
    let mut cfg = config(&tgtd.portal, tgtd.control_port, &[("gold", &dir)]);
    cfg.chap = Some(ChapConfig {
        user: "volback-in".into(),
        secret_file: user_file.clone(),
    });
    cfg.mutual_chap = Some(ChapConfig {
        user: "volback-out".into(),
        secret_file: target_file.clone(),
    });
    cfg.target_params
        .insert("MaxRecvDataSegmentLength".into(), "262144".into());
    let d = TgtDriver::new("t", cfg).unwrap();
    d.create_volume("gold", "v", "v", 8 * MIB, &Metadata::new())
        .unwrap();
    let target = ExportTarget::Volume("v".into());
    let info = d.export("gold", &target, ExportOptions::default()).unwrap();
    let p = &info.properties;
    assert_eq!(p["chap_user"], "volback-in");
    assert_eq!(p["chap_secret_file"], user_file.to_string_lossy());
    assert_eq!(p["mutual_user"], "volback-out");
    assert_eq!(p["mutual_secret_file"], target_file.to_string_lossy());
    for v in p.values() {
        assert!(!v.contains(user_secret) && !v.contains(target_secret));
    }
    // Again: accounts exist and are bound already.
    assert_eq!(
        d.export("gold", &target, ExportOptions::default()).unwrap(),
        info
    );
    let show = tgtadm::parse_targets(&tgtd.show());
    assert_eq!(
        show[0].accounts,
        vec![
            tgtadm::AccountShow {
                user: "volback-in".into(),
                outgoing: false
            },
            tgtadm::AccountShow {
                user: "volback-out".into(),
                outgoing: true
            },
        ]
    );
    let params = tgtd.tgtadm(&[
        "--mode",
        "target",
        "--op",
        "show",
        "--tid",
        &show[0].tid.to_string(),
    ]);
    assert!(
        params.contains("MaxRecvDataSegmentLength=262144"),
        "{params}"
    );

    let inq = |u: String| run("iscsi-inq", &[&u]).status.success();
    let mutual = format!("?target_user=volback-out&target_password={target_secret}");
    assert!(inq(url(&info, &format!("volback-in%{user_secret}@"))));
    assert!(inq(
        url(&info, &format!("volback-in%{user_secret}@")) + &mutual
    ));
    assert!(!inq(url(&info, "")), "login without CHAP worked");
    assert!(
        !inq(url(&info, "volback-in%wrongsecret1@")),
        "wrong secret worked"
    );
    assert!(
        !inq(url(&info, &format!("volback-in%{user_secret}@"))
            + "?target_user=volback-out&target_password=wrongtarget1"),
        "the initiator accepted a target with the wrong mutual secret"
    );

    d.delete_volume("gold", "v").unwrap();
    assert!(tgtadm::parse_targets(&tgtd.show()).is_empty());
}

/// A child killed on drop (a test failing half-way leaves no initiator).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tgt_in_use_while_a_session_is_open() {
    let (tgtd, _scratch, _dir, d) = setup("pool");
    d.create_volume("gold", "busy", "b", 8 * MIB, &Metadata::new())
        .unwrap();
    let target = ExportTarget::Volume("busy".into());
    let info = d.export("gold", &target, ExportOptions::default()).unwrap();
    assert!(!d.in_use("gold", "busy").unwrap());
    // iscsi-perf reads for as long as it runs: a session held open. -x 0:
    // it does not reconnect once unexport ends the session.
    let mut perf = Child(
        Command::new("iscsi-perf")
            .args(["-m", "1", "-b", "1", "-x", "0", &url(&info, "")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.in_use("gold", "busy").unwrap() {
        assert!(
            Instant::now() < deadline,
            "no session seen: {}",
            tgtd.show()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = d.delete_volume("gold", "busy").unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::Busy, "{e}");
    // Unexport ends the session, with reads in flight.
    d.unexport("gold", &target).unwrap();
    assert!(tgtadm::parse_targets(&tgtd.show()).is_empty());
    assert!(!d.in_use("gold", "busy").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while perf.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "iscsi-perf still running after unexport"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.delete_volume("gold", "busy").unwrap();
}

#[test]
fn tgt_foreign_target_and_dead_daemon() {
    let (tgtd, scratch, _dir, d) = setup("pool");
    d.create_volume("gold", "v", "v", 8 * MIB, &Metadata::new())
        .unwrap();
    // A target with our name serving another file is not ours.
    let other = scratch.join("other.img");
    std::fs::File::create(&other).unwrap().set_len(MIB).unwrap();
    let iqn = format!("{DEFAULT_IQN_PREFIX}:gold:v");
    tgtd.tgtadm(&[
        "--mode",
        "target",
        "--op",
        "new",
        "--tid",
        "9",
        "--targetname",
        &iqn,
    ]);
    tgtd.tgtadm(&[
        "--mode",
        "logicalunit",
        "--op",
        "new",
        "--tid",
        "9",
        "--lun",
        "1",
        "--backing-store",
        other.to_str().unwrap(),
    ]);
    let target = ExportTarget::Volume("v".into());
    let e = d
        .export("gold", &target, ExportOptions::default())
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::AlreadyExists, "{e}");
    let e = d.unexport("gold", &target).unwrap_err();
    assert!(e.to_string().contains("not ours"), "{e}");
    assert_eq!(tgtadm::parse_targets(&tgtd.show()).len(), 1);
    tgtd.tgtadm(&[
        "--mode", "target", "--op", "delete", "--force", "--tid", "9",
    ]);

    // A new target takes a tid above the highest in use.
    tgtd.tgtadm(&[
        "--mode",
        "target",
        "--op",
        "new",
        "--tid",
        "5",
        "--targetname",
        "iqn.2000-01.x:y",
    ]);
    d.export("gold", &target, ExportOptions::default()).unwrap();
    let show = tgtadm::parse_targets(&tgtd.show());
    assert_eq!(show.iter().find(|t| t.name == iqn).unwrap().tid, 6);
    d.unexport("gold", &target).unwrap();
    tgtd.tgtadm(&["--mode", "target", "--op", "delete", "--tid", "5"]);

    // Nobody on the control port: an I/O error naming the command.
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    let free = (32000..=32767)
        .rev()
        .find(|n| !unix.contains(&format!("/tgtd/socket.{n}\n")))
        .unwrap();
    let dead = TgtDriver::new(
        "t",
        config(&tgtd.portal, free, &[("gold", &scratch.join("pool"))]),
    )
    .unwrap();
    let e = dead
        .export("gold", &target, ExportOptions::default())
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::Io, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("tgtadm -C {free} ")) && msg.contains("tgtd running"),
        "{msg}"
    );
    d.delete_volume("gold", "v").unwrap();
}
