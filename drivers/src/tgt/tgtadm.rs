//! The one way this driver talks to tgtd: the `tgtadm` command, run with a
//! timeout, its stderr captured and classified, its argv shown in errors and
//! logs only with passwords masked.

use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::debug;

/// What went wrong with one tgtadm call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TgtadmErrorKind {
    /// "can't find the target", "... doesn't exist".
    NotFound,
    /// "this target already exists" (name or tid), "this account already exists".
    AlreadyExists,
    /// "this target is still active", "this logical unit is still active".
    Busy,
    /// "invalid request", "option ... is not allowed/supported".
    Invalid,
    /// tgtd does not answer on the control port (not running?).
    Unreachable,
    /// No answer within the timeout (the process was killed).
    Timeout,
    /// tgtadm could not be run at all.
    Spawn,
    Other,
}

#[derive(Debug)]
pub(crate) struct TgtadmError {
    pub kind: TgtadmErrorKind,
    /// The command as run, passwords masked.
    pub command: String,
    /// tgtadm's stderr (or what happened instead), trimmed.
    pub message: String,
    pub source: Option<io::Error>,
}

impl std::fmt::Display for TgtadmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.command, self.message)
    }
}

/// tgtadm bound to one tgtd (its control port).
#[derive(Debug, Clone)]
pub(crate) struct Tgtadm {
    pub program: String,
    pub control_port: Option<u32>,
    pub timeout: Duration,
}

/// Masks the value after `--password` (account commands carry the CHAP
/// secret on tgtadm's command line: this is what keeps it out of errors and
/// logs).
pub(crate) fn display_command(program: &str, args: &[&str]) -> String {
    let mut out = program.to_string();
    let mut mask = false;
    for a in args {
        out.push(' ');
        if mask {
            out.push_str("***");
        } else {
            out.push_str(a);
        }
        mask = *a == "--password";
    }
    out
}

/// Classifies a failed call by tgtadm's message (its exit status is 22 for
/// almost everything) and exit status 107 (no daemon).
pub(crate) fn classify(status: Option<i32>, stderr: &str) -> TgtadmErrorKind {
    let s = stderr.to_ascii_lowercase();
    if status == Some(107) || s.contains("tgt daemon") || s.contains("can't connect") {
        TgtadmErrorKind::Unreachable
    } else if s.contains("can't find") || s.contains("doesn't exist") || s.contains("not found") {
        TgtadmErrorKind::NotFound
    } else if s.contains("already exists") {
        TgtadmErrorKind::AlreadyExists
    } else if s.contains("still active") {
        TgtadmErrorKind::Busy
    } else if s.contains("invalid") || s.contains("not allowed") || s.contains("not supported") {
        TgtadmErrorKind::Invalid
    } else {
        TgtadmErrorKind::Other
    }
}

impl Tgtadm {
    /// Runs `tgtadm [-C PORT] --lld iscsi ARGS...`; its stdout on success.
    pub fn run(&self, args: &[&str]) -> Result<String, TgtadmError> {
        let ctl = self.control_port.map(|p| p.to_string());
        let mut full: Vec<&str> = Vec::with_capacity(args.len() + 4);
        if let Some(c) = &ctl {
            full.extend(["-C", c.as_str()]);
        }
        full.extend(["--lld", "iscsi"]);
        full.extend_from_slice(args);
        let command = display_command(&self.program, &full);
        let err = |kind, message: String, source| TgtadmError {
            kind,
            command: command.clone(),
            message,
            source,
        };
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                err(
                    TgtadmErrorKind::Spawn,
                    "cannot run tgtadm (is tgt installed?)".into(),
                    Some(e),
                )
            })?;
        // Readers on their own threads: a full pipe must not block tgtadm
        // while we wait for it.
        let reader = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
        let errs = reader(Box::new(child.stderr.take().expect("piped stderr")));
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < self.timeout => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(err(
                        TgtadmErrorKind::Timeout,
                        format!("no answer from tgtd within {:?}", self.timeout),
                        None,
                    ));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(err(
                        TgtadmErrorKind::Other,
                        "waiting for tgtadm".into(),
                        Some(e),
                    ));
                }
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = errs.join().unwrap_or_default();
        let stderr = stderr.trim();
        debug!(%command, status = ?status.code(), elapsed = ?started.elapsed(), "tgtadm");
        if status.success() {
            return Ok(stdout);
        }
        let message = match (stderr.is_empty(), status.code()) {
            (false, _) => stderr.to_string(),
            (true, Some(c)) => format!("exit status {c}"),
            (true, None) => "killed by a signal".to_string(),
        };
        Err(err(classify(status.code(), stderr), message, None))
    }
}

/// One target of `tgtadm --mode target --op show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TargetShow {
    pub tid: u32,
    pub name: String,
    pub nexuses: Vec<Nexus>,
    pub luns: Vec<LunShow>,
    pub accounts: Vec<AccountShow>,
    pub acl: Vec<String>,
}

/// An I_T nexus (a session) and its connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Nexus {
    pub sid: u64,
    pub initiator: String,
    pub connections: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LunShow {
    pub lun: u32,
    pub readonly: bool,
    pub thin: bool,
    /// None for "None" (LUN 0, the controller).
    pub backing_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccountShow {
    pub user: String,
    pub outgoing: bool,
}

impl TargetShow {
    pub fn lun(&self, lun: u32) -> Option<&LunShow> {
        self.luns.iter().find(|l| l.lun == lun)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    System,
    Nexus,
    Lun,
    Account,
    Acl,
}

/// Parses `tgtadm --mode target --op show`. Lines it does not know are
/// skipped, so an extra field in another tgt version does no harm.
pub(crate) fn parse_targets(text: &str) -> Vec<TargetShow> {
    let mut targets: Vec<TargetShow> = Vec::new();
    let mut section = Section::None;
    for raw in text.lines() {
        if let Some(rest) = raw.strip_prefix("Target ") {
            // "Target 1: iqn...."
            if let Some((tid, name)) = rest.split_once(": ") {
                if let Ok(tid) = tid.parse() {
                    targets.push(TargetShow {
                        tid,
                        name: name.trim().to_string(),
                        ..TargetShow::default()
                    });
                    section = Section::None;
                    continue;
                }
            }
        }
        let Some(t) = targets.last_mut() else {
            continue;
        };
        let indent = raw.len() - raw.trim_start().len();
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if indent == 4 {
            section = match line {
                "System information:" => Section::System,
                "I_T nexus information:" => Section::Nexus,
                "LUN information:" => Section::Lun,
                "Account information:" => Section::Account,
                "ACL information:" => Section::Acl,
                _ => Section::None,
            };
            continue;
        }
        let field = |key: &str| line.strip_prefix(key).map(str::trim);
        match section {
            Section::Nexus => {
                if let Some(v) = field("I_T nexus:") {
                    t.nexuses.push(Nexus {
                        sid: v.parse().unwrap_or(0),
                        ..Nexus::default()
                    });
                } else if let Some(n) = t.nexuses.last_mut() {
                    if let Some(v) = field("Initiator:") {
                        n.initiator = v.split(" alias:").next().unwrap_or(v).trim().to_string();
                    } else if let Some(v) = field("Connection:") {
                        if let Ok(c) = v.parse() {
                            n.connections.push(c);
                        }
                    }
                }
            }
            Section::Lun => {
                if let Some(v) = field("LUN:") {
                    t.luns.push(LunShow {
                        lun: v.parse().unwrap_or(u32::MAX),
                        ..LunShow::default()
                    });
                } else if let Some(l) = t.luns.last_mut() {
                    if let Some(v) = field("Readonly:") {
                        l.readonly = v == "Yes";
                    } else if let Some(v) = field("Thin-provisioning:") {
                        l.thin = v == "Yes";
                    } else if let Some(v) = raw.trim_start().strip_prefix("Backing store path: ") {
                        l.backing_path = (v != "None").then(|| v.to_string());
                    }
                }
            }
            Section::Account => {
                let (user, outgoing) = match line.strip_suffix(" (outgoing)") {
                    Some(u) => (u, true),
                    None => (line, false),
                };
                t.accounts.push(AccountShow {
                    user: user.to_string(),
                    outgoing,
                });
            }
            Section::Acl => t.acl.push(line.to_string()),
            Section::System | Section::None => {}
        }
    }
    targets
}

/// Parses `tgtadm --mode account --op show`: the account names.
pub(crate) fn parse_accounts(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| l.trim() != "Account list:")
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses `tgtadm --mode portal --op show`: "host:port" of each portal
/// ("Portal: 127.0.0.1:3260,1", the ",1" being the portal group).
pub(crate) fn parse_portals(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Portal:"))
        .map(|p| {
            let p = p.trim();
            p.rsplit_once(',').map_or(p, |(a, _)| a).to_string()
        })
        .collect()
}
