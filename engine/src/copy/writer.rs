//! The write side: turns reads and holes into writes, write-zeroes, or
//! nothing, and returns buffers to the pool once their last write is done.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use volback_connectors::{AlignedBuf, BlockDevice, ErrorKind, IoOp, Returned, ZeroMode};

use super::{CopyError, Counters, RunKind, SparseMode, Work};

/// Zero runs inside a read shorter than this are written as data on a
/// destination that is not known zero: one write beats write + write-zeroes.
const MIN_ZEROING_OP: usize = 64 << 10;

pub(crate) struct WriteConfig {
    pub size: u64,
    pub block_size: u64,
    pub destination_is_zero: bool,
    pub sparse: SparseMode,
}

/// How the destination is made to read as zero, best first; a device that
/// refuses one method gets the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    WriteZeroes,
    Deallocate,
    WriteBuffers,
}

enum Op {
    Write {
        offset: u64,
        buf: Arc<AlignedBuf>,
        start: usize,
        len: usize,
        zeroes: bool,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

struct Writer<'a> {
    dev: Box<dyn BlockDevice>,
    cfg: WriteConfig,
    counters: &'a Counters,
    pool: Sender<AlignedBuf>,
    pending: VecDeque<Op>,
    zeroing: Zeroing,
    zero_buf: Option<Arc<AlignedBuf>>,
    /// In-flight requests by tag: what to count on success, and for
    /// write-zeroes, the range to redo another way if the device refuses.
    issued: HashMap<u64, Issued>,
    next_tag: u64,
}

#[derive(Clone, Copy)]
enum Issued {
    Data(u64),
    ZeroBuffer(u64),
    WriteZeroes { offset: u64, len: u64 },
}

pub(crate) fn run(
    dev: Box<dyn BlockDevice>,
    work: Receiver<Work>,
    pool: Sender<AlignedBuf>,
    cfg: WriteConfig,
    counters: &Counters,
) -> Result<Box<dyn BlockDevice>, CopyError> {
    let zeroing = if !dev.supports_write_zeroes() {
        Zeroing::WriteBuffers
    } else if cfg.sparse == SparseMode::Always {
        Zeroing::Deallocate
    } else {
        Zeroing::WriteZeroes
    };
    let mut w = Writer {
        dev,
        cfg,
        counters,
        pool,
        pending: VecDeque::new(),
        zeroing,
        zero_buf: None,
        issued: HashMap::new(),
        next_tag: 0,
    };
    w.run(work)?;
    w.flush()?;
    Ok(w.dev)
}

impl Writer<'_> {
    fn run(&mut self, work: Receiver<Work>) -> Result<(), CopyError> {
        let mut closed = false;
        let mut completions = Vec::new();
        loop {
            while self.dev.in_flight() < self.dev.max_in_flight() {
                let Some(op) = self.pending.pop_front() else {
                    break;
                };
                self.issue(op)?;
            }
            if self.pending.is_empty() && !closed {
                let next = if self.dev.in_flight() == 0 {
                    work.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    work.try_recv()
                };
                match next {
                    Ok(w) => {
                        self.plan(w);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => closed = true,
                    Err(TryRecvError::Empty) => {}
                }
            }
            if self.dev.in_flight() == 0 {
                if closed && self.pending.is_empty() {
                    return Ok(());
                }
                continue;
            }
            self.dev.reap(1, &mut completions)?;
            for c in completions.drain(..) {
                let issued = self
                    .issued
                    .remove(&c.tag)
                    .expect("completion for a request we issued");
                match (c.result, issued) {
                    (Ok(_), Issued::Data(n)) => {
                        self.counters.written.fetch_add(n, Ordering::Relaxed);
                    }
                    (Ok(_), Issued::ZeroBuffer(n))
                    | (Ok(_), Issued::WriteZeroes { len: n, .. }) => {
                        self.counters.zeroed.fetch_add(n, Ordering::Relaxed);
                    }
                    (Err(e), Issued::WriteZeroes { offset, len })
                        if e.kind == ErrorKind::Unsupported
                            || e.source.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        let next = match self.zeroing {
                            Zeroing::WriteZeroes => Zeroing::Deallocate,
                            _ => Zeroing::WriteBuffers,
                        };
                        tracing::debug!(device = self.dev.name(), error = %e, ?next, "zeroing method refused, falling back");
                        self.zeroing = self.zeroing.max_fallback(next);
                        self.pending.push_front(Op::Zero { offset, len });
                    }
                    (Err(e), _) => return Err(e.into()),
                }
                if let Returned::Write(arc) = c.buf {
                    // The last write of a read buffer gives it back.
                    if let Ok(buf) = Arc::try_unwrap(arc) {
                        let _ = self.pool.send(buf);
                    }
                }
            }
        }
    }

    /// Decides what a piece of work costs the destination.
    fn plan(&mut self, work: Work) {
        match work {
            Work::Hole { offset, len } => self.zero(offset, len),
            Work::Data {
                offset,
                len,
                mut buf,
                runs,
            } => {
                corrupt_for_tests(offset, &mut buf.as_mut_slice()[..len]);
                let buf = Arc::new(buf);
                let never = self.cfg.sparse == SparseMode::Never;
                let dense = runs
                    .iter()
                    .all(|r| r.kind == RunKind::Data || (never && r.kind == RunKind::Zero));
                if dense {
                    self.write(offset, &buf, 0, len);
                } else {
                    // Data runs, and zero runs too short to be worth their own
                    // request, are merged into as few writes as possible;
                    // unchanged runs are left alone.
                    let mut segment: Option<(usize, usize)> = None;
                    for r in &runs {
                        let alone = match r.kind {
                            RunKind::Data => false,
                            RunKind::Zero => {
                                !never && (self.cfg.destination_is_zero || r.len >= MIN_ZEROING_OP)
                            }
                            RunKind::Unchanged => true,
                        };
                        if !alone {
                            segment = Some(match segment {
                                Some((s, l)) => (s, l + r.len),
                                None => (r.start, r.len),
                            });
                            continue;
                        }
                        if let Some((s, l)) = segment.take() {
                            self.write(offset, &buf, s, l);
                        }
                        if r.kind == RunKind::Unchanged {
                            self.counters
                                .skipped
                                .fetch_add(r.len as u64, Ordering::Relaxed);
                        } else {
                            self.zero(offset + r.start as u64, r.len as u64);
                        }
                    }
                    if let Some((s, l)) = segment {
                        self.write(offset, &buf, s, l);
                    }
                }
                if let Ok(buf) = Arc::try_unwrap(buf) {
                    let _ = self.pool.send(buf);
                }
            }
        }
    }

    fn write(&mut self, base: u64, buf: &Arc<AlignedBuf>, start: usize, len: usize) {
        self.pending.push_back(Op::Write {
            offset: base + start as u64,
            buf: buf.clone(),
            start,
            len,
            zeroes: false,
        });
    }

    fn zero(&mut self, offset: u64, len: u64) {
        if self.cfg.destination_is_zero {
            self.counters.skipped.fetch_add(len, Ordering::Relaxed);
        } else {
            self.pending.push_back(Op::Zero { offset, len });
        }
    }

    fn tag(&mut self, issued: Issued) -> u64 {
        self.next_tag += 1;
        self.issued.insert(self.next_tag, issued);
        self.next_tag
    }

    fn issue(&mut self, op: Op) -> Result<(), CopyError> {
        match op {
            Op::Write {
                offset,
                buf,
                start,
                len,
                zeroes,
            } => {
                let tag = self.tag(if zeroes {
                    Issued::ZeroBuffer(len as u64)
                } else {
                    Issued::Data(len as u64)
                });
                self.dev.submit(
                    tag,
                    IoOp::Write {
                        offset,
                        buf,
                        start,
                        len,
                    },
                )?;
            }
            Op::Zero { offset, len } => match self.zeroing {
                Zeroing::WriteZeroes | Zeroing::Deallocate => {
                    let mode = if self.zeroing == Zeroing::Deallocate {
                        ZeroMode::Deallocate
                    } else {
                        ZeroMode::KeepAllocated
                    };
                    let tag = self.tag(Issued::WriteZeroes { offset, len });
                    self.dev
                        .submit(tag, IoOp::WriteZeroes { offset, len, mode })?;
                }
                Zeroing::WriteBuffers => {
                    // Split into block-sized writes of one shared zero buffer,
                    // queued in order ahead of everything else.
                    let bs = self.cfg.block_size;
                    let zeroes = self
                        .zero_buf
                        .get_or_insert_with(|| Arc::new(AlignedBuf::new(bs as usize)))
                        .clone();
                    let mut pieces = Vec::new();
                    let mut pos = offset;
                    while pos < offset + len {
                        let n = bs.min(offset + len - pos) as usize;
                        pieces.push(Op::Write {
                            offset: pos,
                            buf: zeroes.clone(),
                            start: 0,
                            len: n,
                            zeroes: true,
                        });
                        pos += n as u64;
                    }
                    for p in pieces.into_iter().rev() {
                        self.pending.push_front(p);
                    }
                }
            },
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CopyError> {
        debug_assert!(self.cfg.size <= self.dev.size());
        let tag = self.tag(Issued::Data(0));
        self.dev.submit(tag, IoOp::Flush)?;
        let mut out = Vec::new();
        while !out
            .iter()
            .any(|c: &volback_connectors::Completion| c.tag == tag)
        {
            self.dev.reap(1, &mut out)?;
        }
        for c in out {
            c.result?;
        }
        Ok(())
    }
}

impl Zeroing {
    /// Never go back to a method already refused.
    fn max_fallback(self, next: Zeroing) -> Zeroing {
        let rank = |z: Zeroing| match z {
            Zeroing::WriteZeroes => 0,
            Zeroing::Deallocate => 1,
            Zeroing::WriteBuffers => 2,
        };
        if rank(next) > rank(self) {
            next
        } else {
            self
        }
    }
}

/// Test-only fault injection (fail point `copy_corrupt_write=return(OFFSET)`):
/// flips the byte at OFFSET in the data about to be written, so tests can
/// show that `--verify` catches a corrupted destination.
fn corrupt_for_tests(offset: u64, data: &mut [u8]) {
    if let Some(t) = corrupt_target() {
        if (offset..offset + data.len() as u64).contains(&t) {
            data[(t - offset) as usize] ^= 0xff;
        }
    }
}

fn corrupt_target() -> Option<u64> {
    fail::fail_point!("copy_corrupt_write", |arg| arg.and_then(|a| a.parse().ok()));
    None
}
