//! A real tgtd for tests: `fixtures/tgt.sh start` in a directory of its
//! own, `fixtures/tgt.sh stop` on drop (also while a failing test unwinds),
//! then a check that no tgtd with its control port is left. Each test gets
//! its own daemon (ports are picked under a lock by the script), so tests
//! can drop connections, delete targets and shrink queues freely.
//!
//! The connectors', the drivers' and the integration tests all use this
//! one guard (the first two as a dev-dependency).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixture script.
pub fn tgt_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tgt.sh")
}

/// PIDs of live tgtd processes started with `-C control_port`.
pub fn tgtd_pids(control_port: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| tgtd_alive(pid, control_port))
        .collect()
}

/// Whether process `pid` is a live tgtd with control port `control_port`
/// (a zombie has no command line, so it does not count).
pub fn tgtd_alive(pid: u32, control_port: u32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmd = String::from_utf8_lossy(&cmd);
    cmd.starts_with("tgtd\0") && cmd.contains(&format!("-C\0{control_port}\0"))
}

/// A running tgtd, stopped by PID on drop.
pub struct TgtDaemon {
    /// "127.0.0.1:PORT"
    pub portal: String,
    pub port: u16,
    /// tgtd's control port (`tgtadm -C`).
    pub control_port: u32,
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl TgtDaemon {
    /// Installs tgt and libiscsi-bin if missing and starts a daemon. Panics
    /// (never skips) when that fails.
    pub fn start() -> TgtDaemon {
        crate::require_root();
        let install = Command::new("bash")
            .arg(tgt_script())
            .arg("install")
            .status()
            .expect("running fixtures/tgt.sh install");
        assert!(install.success(), "fixtures/tgt.sh install failed");
        let parent = tempfile::Builder::new()
            .prefix("volback-tgt-test-")
            .tempdir_in("/var/tmp")
            .expect("a temporary directory in /var/tmp");
        let dir = parent.path().join("tgtd");
        let out = Command::new("bash")
            .arg(tgt_script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("running fixtures/tgt.sh start");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fixtures/tgt.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "TGT_PORTAL=127.0.0.1:PORT TGT_CONTROL=CTL"
        let (mut portal, mut control) = (None, None);
        for kv in stdout.split_whitespace() {
            match kv.split_once('=') {
                Some(("TGT_PORTAL", v)) => portal = Some(v.to_string()),
                Some(("TGT_CONTROL", v)) => control = v.parse().ok(),
                _ => panic!("unexpected output of tgt.sh start: {stdout:?}"),
            }
        }
        let portal = portal.expect("tgt.sh start printed no TGT_PORTAL");
        let port = portal
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("TGT_PORTAL is HOST:PORT");
        TgtDaemon {
            portal,
            port,
            control_port: control.expect("tgt.sh start printed no TGT_CONTROL"),
            dir,
            _parent: parent,
        }
    }

    /// The daemon's PID (from the fixture's pid file).
    pub fn pid(&self) -> u32 {
        let p = self.dir.join("pid");
        std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no PID in {}", p.display()))
    }

    /// The fixture's directory for this daemon (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `tgtadm -C CTL --lld iscsi ARGS`: its stdout, or its stderr as the error.
    pub fn try_tgtadm(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control_port.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .map_err(|e| format!("running tgtadm: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// As [`TgtDaemon::try_tgtadm`], panicking on failure.
    pub fn tgtadm(&self, args: &[&str]) -> String {
        self.try_tgtadm(args)
            .unwrap_or_else(|e| panic!("tgtadm {args:?}: {e}"))
    }

    /// `tgtadm --mode target --op show`.
    pub fn show(&self) -> String {
        self.tgtadm(&["--mode", "target", "--op", "show"])
    }

    /// The tids of the targets tgtd has now.
    pub fn target_ids(&self) -> Vec<u32> {
        self.show()
            .lines()
            .filter_map(|l| l.strip_prefix("Target "))
            .filter_map(|l| l.split(':').next()?.trim().parse().ok())
            .collect()
    }

    /// (session, connection) ids of every connection to target `tid`.
    pub fn connections(&self, tid: u32) -> Vec<(String, String)> {
        let (mut in_target, mut session, mut out) = (false, None, Vec::new());
        for line in self.show().lines() {
            let l = line.trim();
            if let Some(rest) = line.strip_prefix("Target ") {
                in_target = rest.starts_with(&format!("{tid}:"));
            } else if in_target {
                if let Some(s) = l.strip_prefix("I_T nexus: ") {
                    session = Some(s.to_string());
                } else if let (Some(c), Some(s)) = (l.strip_prefix("Connection: "), &session) {
                    out.push((s.clone(), c.to_string()));
                }
            }
        }
        out
    }

    /// Closes every connection to target `tid` from the target's side (the
    /// initiator sees its TCP connection drop).
    pub fn drop_connections(&self, tid: u32) -> usize {
        let conns = self.connections(tid);
        for (sid, cid) in &conns {
            let tid = tid.to_string();
            let args = [
                "--mode", "conn", "--op", "delete", "--tid", &tid, "--sid", sid, "--cid", cid,
            ];
            self.tgtadm(&args);
        }
        conns.len()
    }

    /// Makes a thin target with LUN 1 backed by `file`, open to every
    /// initiator; returns its IQN.
    pub fn add_target(&self, tid: u32, file: &Path) -> String {
        let iqn = format!("iqn.2026-11.org.volback.test:t{tid}");
        self.add_lun_target(tid, &iqn, file, true);
        iqn
    }

    /// Makes target `tid` named `iqn` with LUN 1 backed by `file` (thin:
    /// LBPME with UNMAP and WRITE SAME), open to every initiator.
    pub fn add_lun_target(&self, tid: u32, iqn: &str, file: &Path, thin: bool) {
        let t = tid.to_string();
        let path = file.to_string_lossy();
        let lun = ["--tid", t.as_str(), "--lun", "1"];
        self.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            &t,
            "--targetname",
            iqn,
        ]);
        let mut new = vec!["--mode", "logicalunit", "--op", "new"];
        new.extend(lun);
        new.extend(["--backing-store", &path]);
        self.tgtadm(&new);
        if thin {
            let mut update = vec!["--mode", "logicalunit", "--op", "update"];
            update.extend(lun);
            update.extend(["--params", "thin_provisioning=1"]);
            self.tgtadm(&update);
        }
        self.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            &t,
            "--initiator-address",
            "ALL",
        ]);
    }

    /// The `iscsi://` URL of LUN `lun` of target `iqn` on this daemon.
    pub fn url(&self, iqn: &str, lun: u32) -> String {
        format!("iscsi://{}/{iqn}/{lun}", self.portal)
    }
}

impl Drop for TgtDaemon {
    fn drop(&mut self) {
        // By PID: once ours is gone, a parallel test may start another
        // tgtd on the same (then free) ports.
        let pid = std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let out = Command::new("bash")
            .arg(tgt_script())
            .arg("stop")
            .arg(&self.dir)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: tgt.sh stop: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: running tgt.sh stop: {e}"),
        }
        if let Some(pid) = pid {
            if tgtd_alive(pid, self.control_port) && !std::thread::panicking() {
                panic!(
                    "tgtd {pid} (control port {}) still running",
                    self.control_port
                );
            }
        }
    }
}
