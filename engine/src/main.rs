//! The `volback` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use volback_connectors::local::DirectIo;
use volback_engine::copy::{self, CopyOptions, SparseMode};
use volback_engine::devices;
use volback_engine::progress::{ProgressMode, Reporter};
use volback_engine::units::parse_bytes;

#[derive(Parser)]
#[command(
    name = "volback",
    version,
    about = "Generic volume-to-volume backup engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy a volume block by block (a faster, verifying `dd`).
    Copy(CopyArgs),
}

#[derive(clap::Args)]
struct CopyArgs {
    /// Source: a file or block device.
    source: String,
    /// Destination: a file or block device; a path that does not exist is
    /// created as a sparse file of the source's size.
    destination: String,
    /// Bytes per request (multiple of 4 KiB, at most 64 MiB).
    #[arg(long, default_value = "1M", value_parser = parse_bytes)]
    block_size: u64,
    /// Buffers, and so requests in flight (reads plus writes).
    #[arg(long, default_value_t = copy::DEFAULT_QUEUE_DEPTH)]
    queue_depth: usize,
    /// What to do with ranges that read as zero.
    #[arg(long, value_enum, default_value_t = Sparse::Auto)]
    sparse: Sparse,
    /// Limit reads to this many bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_bytes)]
    bwlimit: Option<u64>,
    /// Checksum source and destination (XXH3-128) and fail on a mismatch.
    #[arg(long)]
    verify: bool,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// O_DIRECT: auto uses it where the device allows.
    #[arg(long, value_enum, default_value_t = Direct::Auto)]
    direct: Direct,
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}

fn run_copy(args: CopyArgs) -> Result<(), ()> {
    let mut reporter = Reporter::new(args.progress);
    let fail = |reporter: &mut Reporter, msg: String| {
        reporter.error(&msg);
        eprintln!("volback: error: {msg}");
    };
    let opts = CopyOptions {
        block_size: args.block_size,
        queue_depth: args.queue_depth,
        sparse: match args.sparse {
            Sparse::Auto => SparseMode::Auto,
            Sparse::Always => SparseMode::Always,
            Sparse::Never => SparseMode::Never,
        },
        bwlimit: args.bwlimit,
        verify: args.verify,
        destination_is_zero: false,
    };
    let direct = match args.direct {
        Direct::Auto => DirectIo::Auto,
        Direct::On => DirectIo::Require,
        Direct::Off => DirectIo::Off,
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
            reporter.summary(&copied.report, &args.source, &args.destination);
            Ok(())
        }
        Err(e) => {
            fail(&mut reporter, e.to_string());
            Err(())
        }
    }
}
