//! Showing progress: a bar on a terminal, JSON lines for machines.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::copy::{CopyReport, Phase, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, nothing otherwise.
    Auto,
    Bar,
    /// One JSON object per line on stdout, then a summary line.
    Json,
    None,
}

pub struct Reporter {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    phase: Option<Phase>,
    last_json: Option<Instant>,
}

impl Reporter {
    pub fn new(mode: ProgressMode) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::None,
            m => m,
        };
        Self {
            mode,
            bar: None,
            phase: None,
            last_json: None,
        }
    }

    pub fn is_json(&self) -> bool {
        self.mode == ProgressMode::Json
    }

    pub fn update(&mut self, p: &Progress) {
        match self.mode {
            ProgressMode::Bar => self.update_bar(p),
            ProgressMode::Json => {
                let due = self
                    .last_json
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || p.done == p.total {
                    self.last_json = Some(Instant::now());
                    let secs = p.elapsed.as_secs_f64().max(1e-9);
                    let rate = p.done as f64 / secs;
                    let eta = if rate > 0.0 {
                        (p.total - p.done) as f64 / rate
                    } else {
                        f64::NAN
                    };
                    emit(json!({
                        "event": "progress",
                        "phase": phase_name(p.phase),
                        "done": p.done,
                        "total": p.total,
                        "bytes_read": p.read,
                        "bytes_written": p.written,
                        "bytes_zeroed": p.zeroed,
                        "bytes_skipped": p.skipped,
                        "elapsed_s": secs,
                        "rate_mb_s": rate / 1e6,
                        "eta_s": if eta.is_finite() { json!(eta) } else { json!(null) },
                    }));
                }
            }
            ProgressMode::Auto | ProgressMode::None => {}
        }
    }

    fn update_bar(&mut self, p: &Progress) {
        if self.phase != Some(p.phase) {
            if let Some(b) = self.bar.take() {
                b.finish();
            }
            let bar = ProgressBar::with_draw_target(Some(p.total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>7} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(phase_name(p.phase));
            self.bar = Some(bar);
            self.phase = Some(p.phase);
        }
        if let Some(b) = &self.bar {
            b.set_position(p.done);
        }
    }

    /// Clears the bar (before printing a summary or an error).
    pub fn close(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    /// The end of `volback read`.
    pub fn read_summary(&mut self, r: &crate::copy::ReadReport, source: &str) {
        self.close();
        let checksum = r.digest.map(|d| format!("xxh3-128:{d:032x}"));
        if self.is_json() {
            emit(json!({
                "event": "summary",
                "source": source,
                "size": r.size,
                "bytes_read": r.bytes_read,
                "elapsed_s": r.elapsed.as_secs_f64(),
                "mb_per_s": r.mb_per_s(),
                "checksum": checksum,
            }));
        } else {
            use crate::units::human;
            eprintln!(
                "read {} of {} ({source}) in {:.2} s ({:.1} MB/s)",
                human(r.bytes_read),
                human(r.size),
                r.elapsed.as_secs_f64(),
                r.mb_per_s()
            );
            if let Some(c) = checksum {
                println!("{c}  {source}");
            }
        }
    }

    pub fn summary(&mut self, r: &CopyReport, source: &str, destination: &str) {
        self.close();
        if self.is_json() {
            emit(json!({
                "event": "summary",
                "source": source,
                "destination": destination,
                "size": r.size,
                "bytes_read": r.bytes_read,
                "bytes_written": r.bytes_written,
                "bytes_zeroed": r.bytes_zeroed,
                "bytes_skipped": r.bytes_skipped,
                "elapsed_s": r.elapsed.as_secs_f64(),
                "mb_per_s": r.mb_per_s(),
                "destination_was_zero": r.destination_was_zero,
                "verified": r.digest.is_some(),
                "checksum": r.digest.map(|d| format!("xxh3-128:{d:032x}")),
            }));
        } else {
            use crate::units::human;
            eprintln!(
                "copied {} from {source} to {destination} in {:.2} s ({:.1} MB/s)",
                human(r.size),
                r.elapsed.as_secs_f64(),
                r.mb_per_s()
            );
            eprintln!(
                "  read {}, written {}, zeroed {}, skipped {}{}",
                human(r.bytes_read),
                human(r.bytes_written),
                human(r.bytes_zeroed),
                human(r.bytes_skipped),
                if r.destination_was_zero {
                    " (destination was already zero)"
                } else {
                    ""
                }
            );
            if let Some(d) = r.digest {
                eprintln!("  verified: source and destination checksums match (xxh3-128:{d:032x})");
            }
        }
    }

    pub fn error(&mut self, message: &str) {
        self.close();
        if self.is_json() {
            emit(json!({ "event": "error", "message": message }));
        }
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Copy => "copy",
        Phase::Verify => "verify",
    }
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}
