//! The `volback` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tracing_subscriber::EnvFilter;
use volback_connectors::local::DirectIo;
use volback_engine::catalog::BackupRecord;
use volback_engine::config::{Config, PoolRef};
use volback_engine::copy::{self, CopyOptions, SparseMode};
use volback_engine::devices;
use volback_engine::progress::{ProgressMode, Reporter};
use volback_engine::service::{BackupRequest, KeepPolicy, RestoreTarget, Service};
use volback_engine::units::{human, parse_bytes};

#[derive(Parser)]
#[command(
    name = "volback",
    version,
    about = "Generic volume-to-volume backup engine"
)]
struct Cli {
    /// Configuration file (also VOLBACK_CONFIG).
    #[arg(
        long,
        global = true,
        env = "VOLBACK_CONFIG",
        default_value = "/etc/volback/volback.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy a volume block by block (a faster, verifying `dd`).
    Copy(CopyArgs),
    /// Read a whole volume and print its checksum (a health check, and a
    /// read benchmark).
    Read(ReadArgs),
    /// Validate the configuration (including the same-pool rule).
    CheckConfig(JsonFlag),
    /// Create, list, delete, attach and detach volumes on any backend.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list, show, delete, export and import backups.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Restore a backup to a new volume or onto an existing one.
    Restore(RestoreArgs),
    /// Undo what interrupted (crashed, killed) operations left behind.
    Recover(JsonFlag),
    /// Set up two file pools on loop devices, back up a volume with a real
    /// ext4 filesystem, restore it and check it.
    Demo(DemoArgs),
}

#[derive(Args)]
struct JsonFlag {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create an empty volume.
    Create {
        /// BACKEND:POOL
        pool: PoolRef,
        #[arg(long, value_parser = parse_bytes)]
        size: u64,
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List volumes (of one pool, or all).
    List {
        pool: Option<PoolRef>,
        #[arg(long)]
        json: bool,
    },
    Delete {
        /// BACKEND:POOL/ID or ID
        volume: String,
    },
    /// Export a volume through a loop device and print its path.
    Attach {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    Detach {
        volume: String,
    },
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Back up a volume onto a new volume of the target pool.
    Create {
        /// BACKEND:POOL/ID or ID
        volume: String,
        /// Target BACKEND:POOL (default: the configured target).
        #[arg(long = "to")]
        to: Option<PoolRef>,
        /// Read from a temporary snapshot even if the volume is not in use.
        #[arg(long)]
        snapshot: bool,
        /// Copy only what changed since the newest available backup of the
        /// volume on the target (a full backup is made, and said, when none
        /// can be built on).
        #[arg(long)]
        incremental: bool,
        /// Copy only what changed since this backup.
        #[arg(long)]
        parent: Option<String>,
        /// Copy through connectors and the copy engine even when the source
        /// driver has a fast path (e.g. Ceph to Ceph by RBD diffs).
        #[arg(long)]
        generic: bool,
        #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
        progress: ProgressMode,
        #[arg(long)]
        json: bool,
    },
    List(JsonFlag),
    /// Re-read a backup's restore point and check it against its checksum map.
    Verify {
        id: String,
        #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
        progress: ProgressMode,
        #[arg(long)]
        json: bool,
    },
    /// Delete the backups of a volume that a retention policy does not keep.
    Prune {
        /// BACKEND:POOL/ID or ID of the volume
        volume: String,
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    Delete {
        id: String,
    },
    /// Print a self-contained record of the backup for `backup import`.
    Export {
        id: String,
    },
    /// Import a record printed by `backup export` ("-" reads standard input).
    Import {
        record: String,
        /// Do not read the backup's data to check it against the record.
        #[arg(long)]
        skip_data_check: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RestoreArgs {
    backup: String,
    /// Restore to a new volume on BACKEND:POOL (default: the source's pool).
    #[arg(long = "to", conflicts_with = "volume")]
    to: Option<PoolRef>,
    /// Name of the new volume.
    #[arg(long, conflicts_with = "volume")]
    name: Option<String>,
    /// Restore onto this existing volume (BACKEND:POOL/ID or ID); needs --force.
    #[arg(long)]
    volume: Option<String>,
    #[arg(long)]
    force: bool,
    /// Read the restored volume back and compare checksums.
    #[arg(long)]
    verify: bool,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Scratch directory (default: a new one under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the scratch directory afterwards.
    #[arg(long)]
    keep: bool,
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    size: u64,
}

#[derive(Args)]
struct CopyArgs {
    /// Source: a file, a block device, `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`
    /// or `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN[?QUERY]` (query keys:
    /// target_user and target_password for mutual CHAP, initiator_name,
    /// max_recv_data_segment_length).
    source: String,
    /// Destination, in the same forms; a path (or an RBD image) that does
    /// not exist is created, sparse, of the source's size.
    destination: String,
    #[command(flatten)]
    io: IoArgs,
    /// Checksum source and destination (XXH3-128) and fail on a mismatch.
    #[arg(long)]
    verify: bool,
}

#[derive(Args)]
struct ReadArgs {
    /// A file, a block device, an `rbd:` image or an `iscsi://` LUN.
    source: String,
    #[command(flatten)]
    io: IoArgs,
    /// Only read (a throughput or health check without the checksum).
    #[arg(long)]
    no_checksum: bool,
}

/// How `copy` and `read` drive the devices.
#[derive(Args)]
struct IoArgs {
    /// Bytes per request (multiple of 4 KiB, at most 64 MiB). Reads from a
    /// source that splits larger ones (an iSCSI LUN, at its MaxBurstLength)
    /// are no larger than it takes in one.
    #[arg(long, default_value = "2M", value_parser = parse_bytes)]
    block_size: u64,
    /// Buffers, and so requests in flight (reads plus writes for a copy).
    #[arg(long, default_value_t = copy::DEFAULT_QUEUE_DEPTH)]
    queue_depth: usize,
    /// Ranges that read as zero: auto skips holes and zero blocks (and
    /// zeroes them on a destination that is not known zero), always also
    /// deallocates them, never reads and writes every byte.
    #[arg(long, value_enum, default_value_t = Sparse::Auto)]
    sparse: Sparse,
    /// Limit reads to this many bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_bytes)]
    bwlimit: Option<u64>,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// O_DIRECT: auto uses it where the device allows.
    #[arg(long, value_enum, default_value_t = Direct::Auto)]
    direct: Direct,
}

impl IoArgs {
    fn copy_options(&self) -> CopyOptions {
        CopyOptions {
            block_size: self.block_size,
            queue_depth: self.queue_depth,
            sparse: sparse_mode(self.sparse),
            bwlimit: self.bwlimit,
            ..CopyOptions::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Sparse {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum Direct {
    Auto,
    On,
    Off,
}

/// A command's failure: already reported, or a message to print.
type CmdResult = Result<(), String>;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VOLBACK_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Copy(args) => run_copy(args),
        Command::Read(args) => run_read(args),
        Command::Demo(args) => volback_engine::demo::run(args.dir, args.keep, args.size).map_err(|e| e.to_string()),
        Command::CheckConfig(f) => check_config(&cli.config, f.json),
        Command::Volume(cmd) => service(&cli.config).and_then(|s| volume(s, cmd)),
        Command::Backup(cmd) => service(&cli.config).and_then(|s| backup(s, cmd)),
        Command::Restore(args) => service(&cli.config).and_then(|s| restore(s, args)),
        Command::Recover(f) => service(&cli.config).and_then(|mut s| {
            let r = s.recover().map_err(|e| e.to_string())?;
            if f.json {
                println!("{}", serde_json::to_string(&r).expect("serializes"));
            } else {
                println!(
                    "recovered {} interrupted operation(s): {} resource(s) removed, {} backup(s) marked error, {} deletion(s) finished",
                    r.operations,
                    r.resources_removed,
                    r.backups_marked_error.len(),
                    r.backups_deleted.len()
                );
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("volback: error: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}

fn service(config: &std::path::Path) -> Result<Service, String> {
    let loaded = Config::load(config).map_err(|e| e.to_string())?;
    Service::new(loaded).map_err(|e| e.to_string())
}

fn check_config(path: &std::path::Path, json: bool) -> CmdResult {
    let loaded = Config::load(path).map_err(|e| e.to_string())?;
    let mut pools = Vec::new();
    for (backend, names) in loaded.pools() {
        let driver = loaded
            .registry
            .driver(&backend)
            .map_err(|e| e.to_string())?;
        for p in driver.pools().map_err(|e| e.to_string())? {
            if names.contains(&p.name) {
                let target = loaded.target_for(&backend).map_err(|e| e.to_string())?;
                pools.push((backend.clone(), p, target));
            }
        }
    }
    if json {
        let v: Vec<_> = pools
            .iter()
            .map(|(b, p, t)| {
                json!({"backend": b, "pool": p.name, "identity": p.identity.0,
                   "capacity_bytes": p.capacity_bytes, "free_bytes": p.free_bytes, "backup_target": t.to_string()})
            })
            .collect();
        println!(
            "{}",
            json!({"valid": true, "catalog": loaded.catalog_path(), "pools": v})
        );
    } else {
        println!("configuration {} is valid", path.display());
        for (b, p, t) in &pools {
            let role = if t.backend == *b && t.pool == p.name {
                "is the backup target".to_string()
            } else {
                format!("-> backups to {t}")
            };
            println!(
                "  {b}:{} ({}, {} free of {}) {role}",
                p.name,
                p.identity,
                human(p.free_bytes),
                human(p.capacity_bytes)
            );
        }
    }
    Ok(())
}

fn volume(s: Service, cmd: VolumeCmd) -> CmdResult {
    let e = |e: volback_engine::service::ServiceError| e.to_string();
    match cmd {
        VolumeCmd::Create {
            pool,
            size,
            name,
            json,
        } => {
            let v = s.create_volume(&pool, &name, size).map_err(e)?;
            if json {
                println!("{}", json!({"backend": pool.backend, "volume": v}));
            } else {
                println!("{}:{}/{}", pool.backend, v.pool, v.id);
            }
        }
        VolumeCmd::List { pool, json } => {
            let vols = s.list_volumes(pool.as_ref()).map_err(e)?;
            if json {
                let v: Vec<_> = vols
                    .iter()
                    .map(|(b, v)| json!({"backend": b, "volume": v}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<38} {:<22} {:>12}  NAME", "ID", "BACKEND:POOL", "SIZE");
                for (b, v) in vols {
                    println!(
                        "{:<38} {:<22} {:>12}  {}",
                        v.id,
                        format!("{b}:{}", v.pool),
                        human(v.size),
                        v.name
                    );
                }
            }
        }
        VolumeCmd::Delete { volume } => {
            let loc = s.delete_volume(&volume).map_err(e)?;
            println!("deleted volume {}:{}/{}", loc.backend, loc.pool, loc.id);
        }
        VolumeCmd::Attach { volume, json } => {
            let (loc, conn) = s.attach_volume(&volume).map_err(e)?;
            let path = conn.properties.get("path").cloned().unwrap_or_default();
            if json {
                println!(
                    "{}",
                    json!({"volume": loc.id, "connector": conn.connector, "path": path})
                );
            } else {
                println!("{path}");
            }
        }
        VolumeCmd::Detach { volume } => {
            let loc = s.detach_volume(&volume).map_err(e)?;
            println!("detached volume {}", loc.id);
        }
    }
    Ok(())
}

fn print_backup(b: &BackupRecord, json: bool) {
    if json {
        println!("{}", serde_json::to_string(b).expect("serializes"));
    } else {
        println!("backup {}", b.id);
        println!("  state:   {}", b.state.as_str());
        println!(
            "  volume:  {}:{}/{} ({}, {})",
            b.volume_backend,
            b.volume_pool,
            b.volume_id,
            b.volume_name,
            human(b.volume_size)
        );
        println!(
            "  target:  {}:{}/{}",
            b.target_backend, b.target_pool, b.target_volume_id
        );
        println!("  from snapshot: {}", b.from_snapshot);
        match (&b.parent_id, b.mode.as_str()) {
            (Some(p), "incremental") => {
                println!(
                    "  mode:    incremental on {p} (changes found by {})",
                    tracking_name(&b.change_tracking)
                )
            }
            _ => println!("  mode:    full"),
        }
        if let Some(n) = &b.note {
            println!("  note:    full backup because {n}");
        }
        if let Some(s) = &b.target_snapshot_id {
            println!("  restore point: snapshot {s}");
        }
        if let Some(c) = &b.checksum {
            println!("  checksum: {c}");
        }
        println!(
            "  read {}, written {}",
            human(b.bytes_read),
            human(b.bytes_written)
        );
        if let Some(err) = &b.error {
            println!("  error:   {err}");
        }
        for (k, v) in &b.volume_metadata {
            println!("  metadata {k} = {v}");
        }
    }
}

fn tracking_name(t: &str) -> &str {
    match t {
        "driver" => "the source driver's change tracking",
        "hash-map" => "comparing block hashes with the parent's map",
        "rbd-diff" => "the rbd driver's fast path (RBD diffs, Ceph to Ceph)",
        other => other,
    }
}

fn backup(mut s: Service, cmd: BackupCmd) -> CmdResult {
    let e = |e: volback_engine::service::ServiceError| e.to_string();
    match cmd {
        BackupCmd::Create {
            volume,
            to,
            snapshot,
            incremental,
            parent,
            generic,
            progress,
            json,
        } => {
            let mut reporter = Reporter::new(if json && progress == ProgressMode::Auto {
                ProgressMode::None
            } else {
                progress
            });
            let req = BackupRequest {
                volume,
                target: to,
                snapshot,
                incremental,
                parent,
                generic,
            };
            let result = s.backup(&req, &mut |p| reporter.update(p));
            reporter.close();
            let b = result.map_err(e)?;
            print_backup(&b, json);
        }
        BackupCmd::List(f) => {
            let list = s.list_backups().map_err(e)?;
            if f.json {
                println!("{}", serde_json::to_string(&list).expect("serializes"));
            } else {
                println!(
                    "{:<38} {:<10} {:<22} {:>12}  VOLUME",
                    "ID", "STATE", "TARGET", "SIZE"
                );
                for b in list {
                    println!(
                        "{:<38} {:<10} {:<22} {:>12}  {} ({})",
                        b.id,
                        b.state.as_str(),
                        format!("{}:{}", b.target_backend, b.target_pool),
                        human(b.volume_size),
                        b.volume_name,
                        b.volume_id
                    );
                }
            }
        }
        BackupCmd::Show { id, json } => print_backup(&s.show_backup(&id).map_err(e)?, json),
        BackupCmd::Verify { id, progress, json } => {
            let mut reporter = Reporter::new(if json && progress == ProgressMode::Auto {
                ProgressMode::None
            } else {
                progress
            });
            let result = s.verify_backup(&id, &mut |p| reporter.update(p));
            reporter.close();
            let v = result.map_err(e)?;
            if json {
                println!("{}", serde_json::to_string(&v).expect("serializes"));
            } else {
                println!(
                    "backup {} verified: {} read, matches its checksum map ({})",
                    v.backup,
                    human(v.bytes),
                    v.checksum
                );
            }
        }
        BackupCmd::Prune {
            volume,
            keep_last,
            keep_daily,
            keep_weekly,
            dry_run,
            json,
        } => {
            if keep_last + keep_daily + keep_weekly == 0 {
                return Err(
                    "prune needs at least one of --keep-last, --keep-daily, --keep-weekly \
                            (refusing to delete every backup)"
                        .into(),
                );
            }
            let policy = KeepPolicy {
                last: keep_last,
                daily: keep_daily,
                weekly: keep_weekly,
            };
            let p = s.prune(&volume, policy, dry_run).map_err(e)?;
            if json {
                println!("{}", serde_json::to_string(&p).expect("serializes"));
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!(
                    "kept {} backup(s), {verb} {}",
                    p.kept.len(),
                    p.deleted.len()
                );
                for id in &p.deleted {
                    println!("  {verb} {id}");
                }
            }
        }
        BackupCmd::Delete { id } => {
            s.delete_backup(&id).map_err(e)?;
            println!("deleted backup {id}");
        }
        BackupCmd::Export { id } => println!("{}", s.export_record(&id).map_err(e)?),
        BackupCmd::Import {
            record,
            skip_data_check,
            json,
        } => {
            let text = if record == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|err| format!("reading standard input: {err}"))?
            } else {
                record
            };
            let b = s.import_record(&text, !skip_data_check).map_err(e)?;
            print_backup(&b, json);
        }
    }
    Ok(())
}

fn restore(mut s: Service, args: RestoreArgs) -> CmdResult {
    let target = match args.volume {
        Some(volume) => RestoreTarget::Existing {
            volume,
            force: args.force,
        },
        None => RestoreTarget::New {
            pool: args.to,
            name: args.name,
        },
    };
    let mode = if args.json && args.progress == ProgressMode::Auto {
        ProgressMode::None
    } else {
        args.progress
    };
    let mut reporter = Reporter::new(mode);
    let result = s.restore(&args.backup, &target, args.verify, &mut |p| {
        reporter.update(p)
    });
    reporter.close();
    let out = result.map_err(|e| e.to_string())?;
    let r = &out.report;
    if args.json {
        println!(
            "{}",
            json!({"backup": args.backup, "backend": out.volume.backend, "pool": out.volume.pool, "volume": out.volume.id,
                   "bytes_read": r.bytes_read, "bytes_written": r.bytes_written, "bytes_zeroed": r.bytes_zeroed,
                   "bytes_skipped": r.bytes_skipped, "elapsed_s": r.elapsed.as_secs_f64(),
                   "checksum": r.block_map.as_ref().map(|m| m.checksum())})
        );
    } else {
        println!(
            "restored backup {} to {}:{}/{}",
            args.backup, out.volume.backend, out.volume.pool, out.volume.id
        );
        println!(
            "  {} in {:.2} s: read {}, written {}, zeroed {}, skipped {}",
            human(r.size),
            r.elapsed.as_secs_f64(),
            human(r.bytes_read),
            human(r.bytes_written),
            human(r.bytes_zeroed),
            human(r.bytes_skipped)
        );
    }
    Ok(())
}

fn sparse_mode(s: Sparse) -> SparseMode {
    match s {
        Sparse::Auto => SparseMode::Auto,
        Sparse::Always => SparseMode::Always,
        Sparse::Never => SparseMode::Never,
    }
}

fn direct_io(d: Direct) -> DirectIo {
    match d {
        Direct::Auto => DirectIo::Auto,
        Direct::On => DirectIo::Require,
        Direct::Off => DirectIo::Off,
    }
}

fn run_read(args: ReadArgs) -> CmdResult {
    let mut reporter = Reporter::new(args.io.progress);
    let opts = args.io.copy_options();
    let fail = |reporter: &mut Reporter, msg: String| {
        reporter.error(&msg);
        msg
    };
    let mut source =
        devices::open_source(&args.source, opts.queue_depth, direct_io(args.io.direct))
            .map_err(|e| fail(&mut reporter, e.to_string()))?;
    let hash = !args.no_checksum;
    match copy::read_device(&mut *source.device, &opts, hash, &mut |p| {
        reporter.update(p)
    }) {
        Ok(report) => {
            reporter.read_summary(&report, &devices::shown(&args.source));
            Ok(())
        }
        Err(e) => Err(fail(&mut reporter, e.to_string())),
    }
}

fn run_copy(args: CopyArgs) -> CmdResult {
    let mut reporter = Reporter::new(args.io.progress);
    let opts = CopyOptions {
        verify: args.verify,
        checksum: args.verify,
        ..args.io.copy_options()
    };
    let direct = direct_io(args.io.direct);
    let fail = |reporter: &mut Reporter, msg: String| {
        reporter.error(&msg);
        msg
    };
    let source = devices::open_source(&args.source, opts.queue_depth, direct)
        .map_err(|e| fail(&mut reporter, e.to_string()))?;
    let size = source.device.size();
    let destination = devices::open_destination(&args.destination, size, opts.queue_depth, direct)
        .map_err(|e| fail(&mut reporter, e.to_string()))?;
    let opts = CopyOptions {
        destination_is_zero: destination.created,
        ..opts
    };
    match copy::copy(source.device, destination.device, &opts, &mut |p| {
        reporter.update(p)
    }) {
        Ok(copied) => {
            let (from, to) = (
                devices::shown(&args.source),
                devices::shown(&args.destination),
            );
            reporter.summary(&copied.report, &from, &to);
            Ok(())
        }
        Err(e) => Err(fail(&mut reporter, e.to_string())),
    }
}
