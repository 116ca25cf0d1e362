//! The targets of exports: find, create, complete and delete them.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::config::{invalid, read_secret, ChapConfig};
use super::iqn::target_iqn;
use super::tgtadm::{self, TargetShow, TgtadmError, TgtadmErrorKind};
use super::{relabel, TgtDriver, DELETE_RETRY, LUN};
use crate::{ConnectionInfo, DriverError, DriverErrorKind, ExportTarget, Result};

/// Whether two paths name the same file (equal, or same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

impl TgtDriver {
    pub(super) fn pool_label(&self, pool: &str) -> String {
        format!("{} pool '{pool}'", self.label)
    }

    /// A tgtadm failure as a driver error: the command (passwords masked)
    /// and tgtd's message.
    pub(super) fn tgt_err(
        &self,
        pool: &str,
        object: &str,
        what: &str,
        e: TgtadmError,
    ) -> DriverError {
        let kind = match e.kind {
            TgtadmErrorKind::NotFound => DriverErrorKind::NotFound,
            TgtadmErrorKind::AlreadyExists => DriverErrorKind::AlreadyExists,
            TgtadmErrorKind::Busy => DriverErrorKind::Busy,
            TgtadmErrorKind::Invalid => DriverErrorKind::InvalidArgument,
            TgtadmErrorKind::Spawn => DriverErrorKind::Unsupported,
            TgtadmErrorKind::Unreachable | TgtadmErrorKind::Timeout | TgtadmErrorKind::Other => {
                DriverErrorKind::Io
            }
        };
        let hint = if e.kind == TgtadmErrorKind::Unreachable {
            format!(
                " (is tgtd running with control port {}?)",
                self.tgtadm.control_port.unwrap_or(0)
            )
        } else {
            String::new()
        };
        DriverError {
            kind,
            backend: self.pool_label(pool),
            object: object.to_string(),
            message: format!("{what}: {e}{hint}"),
            source: e.source,
        }
    }

    pub(super) fn show_targets(&self, pool: &str, object: &str) -> Result<Vec<TargetShow>> {
        let out = self
            .tgtadm
            .run(&["--mode", "target", "--op", "show"])
            .map_err(|e| self.tgt_err(pool, object, "listing targets", e))?;
        Ok(tgtadm::parse_targets(&out))
    }

    /// The image a target designates, and its name for errors; checks the id.
    pub(super) fn image(&self, pool: &str, target: &ExportTarget) -> Result<(String, PathBuf)> {
        let p = self.files.pool(pool).map_err(relabel)?;
        p.target_image(target).map_err(relabel)
    }

    /// The target of `iqn`, if it is ours: its LUN 1 is `img` (or it has no
    /// LUN 1 yet: a half-made export). A target of that name serving another
    /// file is an error.
    pub(super) fn find_target(
        &self,
        pool: &str,
        object: &str,
        iqn: &str,
        img: &Path,
    ) -> Result<Option<TargetShow>> {
        let Some(t) = self
            .show_targets(pool, object)?
            .into_iter()
            .find(|t| t.name == iqn)
        else {
            return Ok(None);
        };
        if let Some(path) = t.lun(LUN).and_then(|l| l.backing_path.as_deref()) {
            if !same_file(Path::new(path), img) {
                return Err(DriverError::new(
                    DriverErrorKind::AlreadyExists,
                    self.pool_label(pool),
                    object,
                    format!(
                        "target {iqn} (tid {}) exists but serves {path}, not {}: \
                         not ours, not touching it",
                        t.tid,
                        img.display()
                    ),
                ));
            }
        }
        Ok(Some(t))
    }

    /// Warns once when tgtd does not listen on the configured portal's port
    /// (a wrong control port, or a portal tgtd was not started with).
    pub(super) fn check_portal(&self, pool: &str) {
        let mut checked = self
            .portal_checked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *checked {
            return;
        }
        match self.tgtadm.run(&["--mode", "portal", "--op", "show"]) {
            Ok(out) => {
                let portals = tgtadm::parse_portals(&out);
                let port = self.portal.rsplit_once(':').map(|(_, p)| p);
                if !portals
                    .iter()
                    .any(|p| p.rsplit_once(':').map(|(_, q)| q) == port)
                {
                    warn!(
                        backend = %self.backend, pool, portal = %self.portal,
                        tgtd_portals = ?portals,
                        "tgtd does not listen on the configured portal's port"
                    );
                }
                *checked = true;
            }
            Err(e) => debug!(error = %e, "could not list tgtd's portals"),
        }
    }

    /// Creates an empty target named `iqn` under a free tid; Ok(None) when
    /// a target of that name appeared meanwhile (another process).
    pub(super) fn create_target(&self, pool: &str, object: &str, iqn: &str) -> Result<Option<u32>> {
        for _ in 0..32 {
            let targets = self.show_targets(pool, object)?;
            if targets.iter().any(|t| t.name == iqn) {
                return Ok(None);
            }
            let tid = targets.iter().map(|t| t.tid).max().unwrap_or(0) + 1;
            let tid_s = tid.to_string();
            match self.tgtadm.run(&[
                "--mode",
                "target",
                "--op",
                "new",
                "--tid",
                &tid_s,
                "--targetname",
                iqn,
            ]) {
                Ok(_) => return Ok(Some(tid)),
                // The tid or the name was taken meanwhile: look again.
                Err(e) if e.kind == TgtadmErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(self.tgt_err(pool, object, &format!("creating target {iqn}"), e))
                }
            }
        }
        Err(DriverError::new(
            DriverErrorKind::Busy,
            self.pool_label(pool),
            object,
            format!("creating target {iqn}: every free tid was taken by someone else, 32 times"),
        ))
    }

    pub(super) fn run(&self, pool: &str, object: &str, what: &str, args: &[&str]) -> Result<()> {
        self.tgtadm
            .run(args)
            .map(drop)
            .map_err(|e| self.tgt_err(pool, object, what, e))
    }

    /// Creates the CHAP account unless tgtd has it. An existing account
    /// keeps the secret it was created with (tgtd cannot show it).
    pub(super) fn ensure_account(&self, pool: &str, object: &str, chap: &ChapConfig) -> Result<()> {
        let out = self
            .tgtadm
            .run(&["--mode", "account", "--op", "show"])
            .map_err(|e| self.tgt_err(pool, object, "listing CHAP accounts", e))?;
        if tgtadm::parse_accounts(&out).contains(&chap.user) {
            return Ok(());
        }
        let secret = read_secret(&self.pool_label(pool), chap)?;
        match self.tgtadm.run(&[
            "--mode",
            "account",
            "--op",
            "new",
            "--user",
            &chap.user,
            "--password",
            &secret,
        ]) {
            Ok(_) => {
                info!(backend = %self.backend, user = %chap.user, "created CHAP account in tgtd");
                Ok(())
            }
            Err(e) if e.kind == TgtadmErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(self.tgt_err(
                pool,
                object,
                &format!("creating CHAP account '{}'", chap.user),
                e,
            )),
        }
    }

    /// Binds every part of an export to target `t` that is not bound yet:
    /// LUN 1 and its flags, target parameters, CHAP accounts, and last the
    /// initiator ACL.
    pub(super) fn complete_target(
        &self,
        pool: &str,
        object: &str,
        t: &TargetShow,
        img: &Path,
        read_only: bool,
        is_snapshot: bool,
    ) -> Result<()> {
        let tid = t.tid.to_string();
        let tid = tid.as_str();
        let lun = LUN.to_string();
        let lun = lun.as_str();
        let img_s = img
            .to_str()
            .ok_or_else(|| invalid(&self.pool_label(pool), object, "image path is not UTF-8"))?;
        let (fresh, lun_ro, lun_thin) = match t.lun(LUN) {
            Some(l) => (false, l.readonly, l.thin),
            None => {
                self.run(
                    pool,
                    object,
                    &format!(
                        "adding LUN {LUN} ({img_s}) to target {} (tid {tid})",
                        t.name
                    ),
                    &[
                        "--mode",
                        "logicalunit",
                        "--op",
                        "new",
                        "--tid",
                        tid,
                        "--lun",
                        lun,
                        "--backing-store",
                        img_s,
                        "--bstype",
                        "rdwr",
                    ],
                )?;
                (true, false, false)
            }
        };
        let lun_update = |params: &str| {
            self.tgtadm.run(&[
                "--mode",
                "logicalunit",
                "--op",
                "update",
                "--tid",
                tid,
                "--lun",
                lun,
                "--params",
                params,
            ])
        };
        if !lun_thin {
            // Lets initiators UNMAP (seen here: the range then reads as zero,
            // but the image file kept its blocks). Not essential: a tgt
            // without it still serves the LUN.
            if let Err(e) = lun_update("thin_provisioning=1") {
                warn!(%object, tid, error = %e, "could not turn on thin provisioning");
            }
        }
        // A snapshot is always read-only. A volume: read-only when this export
        // made the LUN and asks for it; a read-write request makes an
        // existing read-only LUN writable (a read-write export of a volume
        // already exported read-only by someone: they still only read); a
        // read-only request leaves an existing writable LUN as it is (its
        // user may write) and the connection info says read-only.
        let want_ro = if is_snapshot || (fresh && read_only) {
            Some(true)
        } else if lun_ro && !read_only {
            Some(false)
        } else {
            None
        };
        if let Some(ro) = want_ro.filter(|&ro| ro != lun_ro) {
            lun_update(if ro { "readonly=1" } else { "readonly=0" })
                .map_err(|e| self.tgt_err(pool, object, "setting the LUN's readonly flag", e))?;
        }
        for (k, v) in &self.target_params {
            self.run(
                pool,
                object,
                &format!("setting target parameter {k}"),
                &[
                    "--mode", "target", "--op", "update", "--tid", tid, "--name", k, "--value", v,
                ],
            )?;
        }
        for (chap, outgoing) in [(&self.chap, false), (&self.mutual_chap, true)] {
            let Some(chap) = chap else { continue };
            if t.accounts
                .iter()
                .any(|a| a.user == chap.user && a.outgoing == outgoing)
            {
                continue;
            }
            self.ensure_account(pool, object, chap)?;
            let mut args = vec![
                "--mode", "account", "--op", "bind", "--tid", tid, "--user", &chap.user,
            ];
            if outgoing {
                args.push("--outgoing");
            }
            match self.tgtadm.run(&args) {
                Ok(_) => {}
                Err(e) if e.kind == TgtadmErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(self.tgt_err(
                        pool,
                        object,
                        &format!("binding CHAP account '{}'", chap.user),
                        e,
                    ))
                }
            }
        }
        // Last: from here initiators can log in.
        if !t.acl.iter().any(|a| a == "ALL") {
            self.run(
                pool,
                object,
                "allowing initiators",
                &[
                    "--mode",
                    "target",
                    "--op",
                    "bind",
                    "--tid",
                    tid,
                    "--initiator-address",
                    "ALL",
                ],
            )?;
        }
        Ok(())
    }

    pub(super) fn connection_info(&self, iqn: String, read_only: bool) -> ConnectionInfo {
        let mut p = BTreeMap::from([
            ("portal".to_string(), self.portal.clone()),
            ("iqn".to_string(), iqn),
            ("lun".to_string(), LUN.to_string()),
        ]);
        let abs = |path: &PathBuf| {
            std::path::absolute(path)
                .unwrap_or_else(|_| path.clone())
                .to_string_lossy()
                .into_owned()
        };
        if let Some(c) = &self.chap {
            p.insert("chap_user".into(), c.user.clone());
            p.insert("chap_secret_file".into(), abs(&c.secret_file));
        }
        if let Some(c) = &self.mutual_chap {
            p.insert("mutual_user".into(), c.user.clone());
            p.insert("mutual_secret_file".into(), abs(&c.secret_file));
        }
        ConnectionInfo {
            connector: "iscsi".to_string(),
            properties: p,
            read_only,
        }
    }

    /// Deletes target `t`: unbind its ACL (no new logins), end its sessions,
    /// delete it, retrying while commands are still in flight.
    pub(super) fn delete_target(&self, pool: &str, object: &str, t: &TargetShow) -> Result<()> {
        let tid = t.tid.to_string();
        for a in &t.acl {
            let how = if a.starts_with("iqn.") || a.starts_with("eui.") || a.starts_with("naa.") {
                "--initiator-name"
            } else {
                "--initiator-address"
            };
            let args = ["--mode", "target", "--op", "unbind", "--tid", &tid, how, a];
            if let Err(e) = self.tgtadm.run(&args) {
                debug!(%object, tid = t.tid, acl = %a, error = %e, "unbinding an ACL entry");
            }
        }
        for n in &t.nexuses {
            let sid = n.sid.to_string();
            for c in &n.connections {
                let cid = c.to_string();
                let args = [
                    "--mode", "conn", "--op", "delete", "--tid", &tid, "--sid", &sid, "--cid", &cid,
                ];
                match self.tgtadm.run(&args) {
                    Ok(_) => info!(%object, tid = t.tid, sid = n.sid, initiator = %n.initiator,
                        "ended an iSCSI session"),
                    Err(e) => debug!(%object, error = %e, "ending a connection"),
                }
            }
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.tgtadm.run(&[
                "--mode", "target", "--op", "delete", "--force", "--tid", &tid,
            ]) {
                Ok(_) => {
                    info!(%object, tid = t.tid, iqn = %t.name, "deleted iSCSI target");
                    return Ok(());
                }
                Err(e) if e.kind == TgtadmErrorKind::NotFound => return Ok(()),
                Err(e) if e.kind == TgtadmErrorKind::Busy && started.elapsed() < DELETE_RETRY => {
                    debug!(%object, tid = t.tid, error = %e, "target still active, retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(self.tgt_err(
                        pool,
                        object,
                        &format!("deleting target {} (tid {tid})", t.name),
                        e,
                    ))
                }
            }
        }
    }

    /// Unexports `target` unless a session is open on it (Busy then): what
    /// deleting a volume or snapshot does first.
    pub(super) fn unexport_idle(&self, pool: &str, target: &ExportTarget) -> Result<()> {
        let (object, img) = self.image(pool, target)?;
        let iqn = target_iqn(&self.iqn_prefix, pool, target);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = self.find_target(pool, &object, &iqn, &img)? else {
            return Ok(());
        };
        if let Some(n) = t.nexuses.first() {
            return Err(DriverError::new(
                DriverErrorKind::Busy,
                self.pool_label(pool),
                object,
                format!(
                    "exported as {iqn} with an open session from {}: unexport it first",
                    n.initiator
                ),
            ));
        }
        self.delete_target(pool, &object, &t)
    }
}
