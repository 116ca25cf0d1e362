//! The session: one TCP connection in full feature phase, driven by one
//! task on a current-thread runtime, and re-established when it fails.
//!
//! Four futures share the session state (a `RefCell`, never borrowed across
//! an await) inside one `select!`: the *intake* takes requests from the
//! device, the *writer* sends commands while the command window is open
//! (CmdSN <= MaxCmdSN) plus Data-Out, NOP-Out and Logout, batching headers
//! and sending data straight from the caller's buffers; the *reader* parses
//! PDUs and reads Data-In payloads directly into the caller's buffers; the
//! *timer* releases delayed retries, fails the connection when a command or a
//! NOP-Out ping times out, and pings an idle connection. Whichever of them
//! fails ends the connection; the others are dropped with it, so nothing
//! touches a buffer any more. At error recovery level 0 the supervisor then
//! logs in again (same ISID, TSIH 0: the target drops the old session) and
//! reissues every command that had not completed, with a bounded number of
//! attempts and backoff.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::error::IscsiError;
use super::login::{self, LoginParams, LoginResult};
use super::pdu::*;
use super::runner::{AssertSend, Runner};
use super::scsi::{self, Cdb, Sense};
use super::spec::IscsiSpec;
use super::text::{Negotiated, Offer};
use super::IscsiOptions;
use crate::AlignedBuf;

/// Data a write-type command sends, shared with the caller without copying.
#[derive(Debug, Clone)]
pub enum DataRef {
    Aligned {
        buf: Arc<AlignedBuf>,
        start: usize,
        len: usize,
    },
    Vec(Arc<Vec<u8>>),
}

impl DataRef {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            DataRef::Aligned { buf, start, len } => &buf.as_slice()[*start..*start + *len],
            DataRef::Vec(v) => v,
        }
    }
}

/// A command's data buffer, owned by the session while it runs.
#[derive(Debug)]
pub enum Payload {
    None,
    /// Data-In goes to `buf[..len]`.
    In {
        buf: AlignedBuf,
        len: usize,
    },
    /// Data-In goes to the whole vector.
    InVec(Vec<u8>),
    /// Data-In goes to part of a buffer the device keeps alive until this
    /// command has completed (one piece of a split read).
    InRaw(RawBuf),
    Out(DataRef),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::In { len, .. } => *len,
            Payload::InVec(v) => v.len(),
            Payload::InRaw(r) => r.len,
            Payload::Out(d) => d.as_slice().len(),
        }
    }

    /// Where Data-In goes: a pointer into heap memory that stays put while
    /// the payload is moved around, and its length.
    fn in_target(&mut self) -> Option<(*mut u8, usize)> {
        match self {
            Payload::In { buf, len } => Some((buf.as_mut_ptr(), *len)),
            Payload::InVec(v) => Some((v.as_mut_ptr(), v.len())),
            Payload::InRaw(r) => Some((r.ptr, r.len)),
            _ => None,
        }
    }

    fn out(&self) -> Option<DataRef> {
        match self {
            Payload::Out(d) => Some(d.clone()),
            _ => None,
        }
    }
}

/// Part of a caller's read buffer.
#[derive(Debug)]
pub struct RawBuf {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the memory is a heap buffer the device owns and does not touch
// (nor free) until the command holding this has completed.
unsafe impl Send for RawBuf {}

/// One SCSI command for the session.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub cdb: Cdb,
    pub payload: Payload,
}

/// A finished command: bytes transferred, or why it failed.
#[derive(Debug)]
pub struct Response {
    pub id: u64,
    pub result: Result<u64, IscsiError>,
    pub payload: Payload,
}

pub enum Msg {
    Cmd(Request),
    Close,
}

/// Counters kept by the session, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub commands: AtomicU64,
    pub max_outstanding: AtomicU64,
    pub max_ahead: AtomicU64,
    pub max_window: AtomicU64,
    pub window_stalls: AtomicU64,
    pub window_violations: AtomicU64,
    pub reconnects: AtomicU64,
    pub retries: AtomicU64,
    pub nop_pings: AtomicU64,
    pub nop_replies: AtomicU64,
    pub max_data_out_segment: AtomicU64,
    pub max_data_in_segment: AtomicU64,
    pub target_max_recv_data_segment_length: AtomicU64,
    pub warm_buffer_swaps: AtomicU64,
}

fn bump_max(a: &AtomicU64, v: u64) {
    a.fetch_max(v, Ordering::Relaxed);
}

/// What the session needs to (re)connect.
pub struct Config {
    pub spec: IscsiSpec,
    pub options: IscsiOptions,
    pub isid: [u8; 6],
}

impl Config {
    fn offer(&self) -> Offer {
        let o = &self.options;
        Offer {
            header_digest: o.header_digest,
            data_digest: o.data_digest,
            max_recv_data_segment_length: o.max_recv_data_segment_length,
            max_burst_length: o.max_burst_length,
            first_burst_length: o.first_burst_length,
            discovery: false,
        }
    }
}

/// Resolves, connects with a large send buffer and TCP_NODELAY.
pub async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, IscsiError> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Best effort: the kernel caps it at its own limit. The receive
        // buffer is left to the kernel's autotuning: fixed at 4 MiB (8 MiB
        // of window), the target queued that much ahead of us, in more skb
        // memory than the caches hold; reading a LUN from tgtd then cost
        // tgtd about 10% more CPU per GiB and ran about 10% slower (10
        // alternating runs each).
        let _ = sock.set_send_buffer_size(4 << 20);
        match sock.connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(IscsiError::Transport)
        .unwrap_or_else(|| IscsiError::Protocol(format!("{host} has no address"))))
}

/// Connects and logs in, following up to three redirects.
async fn connect_login(cfg: &Config, itt: u32) -> Result<(TcpStream, LoginResult), IscsiError> {
    let spec = &cfg.spec;
    let (mut host, mut port) = (spec.host.clone(), spec.port);
    let mut redirects = 0;
    loop {
        let attempt = async {
            let mut s = connect_tcp(&host, port).await?;
            let params = LoginParams {
                initiator: &spec.initiator_iqn,
                target: Some(&spec.target_iqn),
                chap: spec.chap.as_ref(),
                mutual: spec.mutual.as_ref(),
                isid: cfg.isid,
                offer: cfg.offer(),
            };
            let r = login::login(&mut s, &params, itt, 1).await?;
            Ok::<_, IscsiError>((s, r))
        };
        let r = tokio::time::timeout(cfg.options.login_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(IscsiError::Timeout("login".into())));
        match r {
            Err(IscsiError::Redirected(addr)) if redirects < 3 => {
                redirects += 1;
                let a = addr.split(',').next().unwrap_or_default();
                let (h, p) = match a.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(':') => (h, p.parse().unwrap_or(3260)),
                    _ => (a, 3260),
                };
                host = h.trim_matches(['[', ']']).to_string();
                port = p;
                info!(target = %spec.target_iqn, %host, port, "login redirected");
            }
            r => return r,
        }
    }
}

/// A command's task tag: its slab slot in the low bits, a generation above
/// (so a late PDU for a reused slot is not mistaken for the new command),
/// and the top bit clear (set for NOP-Out pings and Logout).
const SLOT_BITS: u32 = 20;
const GEN_MASK: u16 = (1 << (31 - SLOT_BITS)) - 1;

struct Task {
    id: u64,
    cdb: Cdb,
    payload: Payload,
    itt: u32,
    cmdsn: Option<u32>,
    deadline: Option<Instant>,
    received: usize,
    next_datasn: u32,
    /// Reissues after a reconnect.
    tries: u32,
    /// Retries after UNIT ATTENTION, BUSY and the like.
    retries: u32,
    /// Arrival order, to reissue in order.
    seq: u64,
}

impl Task {
    /// No Data-In has arrived for it yet (so its buffer can still be traded).
    fn unstarted(&self) -> bool {
        self.received == 0 && self.next_datasn == 0
    }
}

enum Out {
    Cmd(usize),
    Data {
        slot: usize,
        itt: u32,
        ttt: u32,
        offset: usize,
        len: usize,
    },
    NopReply {
        ttt: u32,
        lun: u64,
        data: Vec<u8>,
    },
    Ping(u32),
    Logout(u32),
}

#[derive(Debug)]
enum Outcome {
    LoggedOut,
}

struct St {
    slots: Vec<Option<Task>>,
    gens: Vec<u16>,
    free: Vec<usize>,
    live: usize,
    seq: u64,
    waiting: VecDeque<usize>,
    out: VecDeque<Out>,
    delayed: Vec<(Instant, usize)>,
    cmdsn: u32,
    exp_cmdsn: u32,
    max_cmdsn: u32,
    exp_statsn: u32,
    stalled: bool,
    neg: Negotiated,
    lun: u64,
    misc_itt: u32,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    closing: bool,
    logout_sent: Option<Instant>,
    progress: bool,
    outstanding: u64,
    options: IscsiOptions,
    stats: Arc<Stats>,
    done: UnboundedSender<Response>,
}

impl St {
    fn next_misc_itt(&mut self) -> u32 {
        self.misc_itt = self.misc_itt.wrapping_add(1);
        if self.misc_itt >= RESERVED_TAG - 1 || self.misc_itt < 0x8000_0000 {
            self.misc_itt = 0x8000_0000;
        }
        self.misc_itt
    }

    fn new_itt(&mut self, slot: usize) -> u32 {
        self.gens[slot] = (self.gens[slot] + 1) & GEN_MASK;
        ((self.gens[slot] as u32) << SLOT_BITS) | slot as u32
    }

    fn lookup(&self, itt: u32) -> Option<usize> {
        if itt & 0x8000_0000 != 0 {
            return None;
        }
        let slot = (itt & ((1 << SLOT_BITS) - 1)) as usize;
        match self.slots.get(slot) {
            Some(Some(t)) if t.itt == itt => Some(slot),
            _ => None,
        }
    }

    fn add(&mut self, req: Request) -> Result<(), Request> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < 1 << SLOT_BITS => {
                self.slots.push(None);
                self.gens.push(0);
                self.slots.len() - 1
            }
            None => return Err(req),
        };
        let itt = self.new_itt(slot);
        self.seq += 1;
        self.slots[slot] = Some(Task {
            id: req.id,
            cdb: req.cdb,
            payload: req.payload,
            itt,
            cmdsn: None,
            deadline: None,
            received: 0,
            next_datasn: 0,
            tries: 0,
            retries: 0,
            seq: self.seq,
        });
        self.live += 1;
        self.waiting.push_back(slot);
        self.stats.commands.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// ExpCmdSN/MaxCmdSN from any target PDU (RFC 7143 section 4.2.2.1).
    fn window(&mut self, exp: u32, max: u32) {
        if sn_lt(max, exp.wrapping_sub(1)) {
            return; // invalid: ignore
        }
        if sn_lt(self.exp_cmdsn, exp) {
            self.exp_cmdsn = exp;
        }
        if sn_lt(self.max_cmdsn, max) {
            self.max_cmdsn = max;
        }
        let w = self.max_cmdsn.wrapping_sub(self.exp_cmdsn).wrapping_add(1) as i32;
        if w > 0 {
            bump_max(&self.stats.max_window, w as u64);
        }
    }

    fn statsn(&mut self, sn: u32) {
        let next = sn.wrapping_add(1);
        if sn_lt(self.exp_statsn, next) {
            self.exp_statsn = next;
        }
    }

    /// Before a read's first Data-In lands: hands it the buffer of the most
    /// recently queued read that has not started, and gives that read its
    /// buffer instead. The newest buffer is the one the caller handed back
    /// last, most likely still in the CPU's cache, so the socket copy
    /// writes to warm memory rather than to queue-depth x block-size of
    /// cold buffers. Reads that have not started are interchangeable: each
    /// completion returns the buffer that holds its data.
    fn take_warm_buffer(&mut self, slot: usize) {
        let (seq, need, cap) = match &self.slots[slot] {
            Some(Task {
                payload: Payload::In { buf, len },
                seq,
                ..
            }) => (*seq, *len, buf.len()),
            _ => return,
        };
        let mut newest: Option<(u64, usize)> = None;
        for (i, t) in self.slots.iter().enumerate() {
            let Some(t) = t else { continue };
            if let Payload::In { buf, len } = &t.payload {
                if t.unstarted()
                    && t.seq > seq
                    && buf.len() >= need
                    && cap >= *len
                    && newest.is_none_or(|(s, _)| t.seq > s)
                {
                    newest = Some((t.seq, i));
                }
            }
        }
        let Some((_, other)) = newest else { return };
        let mut o = self.slots[other].take().expect("live task");
        if let (
            Some(Task {
                payload: Payload::In { buf: a, .. },
                ..
            }),
            Payload::In { buf: b, .. },
        ) = (self.slots[slot].as_mut(), &mut o.payload)
        {
            std::mem::swap(a, b);
            self.stats.warm_buffer_swaps.fetch_add(1, Ordering::Relaxed);
        }
        self.slots[other] = Some(o);
    }

    /// Puts a task back in the queue to be sent again from scratch.
    fn reset(&mut self, slot: usize) {
        let itt = self.new_itt(slot);
        let t = self.slots[slot].as_mut().expect("live task");
        if t.cmdsn.take().is_some() {
            self.outstanding -= 1;
        }
        t.itt = itt;
        t.deadline = None;
        t.received = 0;
        t.next_datasn = 0;
    }

    fn complete(&mut self, slot: usize, result: Result<u64, IscsiError>) {
        let t = self.slots[slot].take().expect("live task");
        self.free.push(slot);
        self.live -= 1;
        if t.cmdsn.is_some() {
            self.outstanding -= 1;
        }
        if let Err(e) = &result {
            debug!(itt = t.itt, cdb = ?t.cdb, error = %e, "command failed");
        } else {
            self.progress = true;
        }
        // The device may be gone already (dropped without waiting).
        let _ = self.done.send(Response {
            id: t.id,
            result,
            payload: t.payload,
        });
    }

    /// Fails every task, queued or not.
    fn fail_all(&mut self, mk: &dyn Fn() -> IscsiError) {
        self.waiting.clear();
        self.out.clear();
        self.delayed.clear();
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                self.complete(slot, Err(mk()));
            }
        }
    }

    /// After a failed connection: every task not completed goes back in the
    /// queue, in arrival order, unless it was reissued too often already.
    fn requeue_all(&mut self, err: &Arc<IscsiError>) {
        let max_tries = self.options.reconnect_attempts;
        let mut live: Vec<(u64, usize)> = Vec::new();
        for slot in 0..self.slots.len() {
            if let Some(t) = self.slots[slot].as_ref() {
                // Only a command that went out counts as tried.
                let sent = t.cmdsn.is_some();
                self.reset(slot);
                let t = self.slots[slot].as_mut().expect("live task");
                t.tries += u32::from(sent);
                if t.tries > max_tries {
                    let e = IscsiError::CommandKeptFailing {
                        tries: t.tries,
                        last: err.clone(),
                    };
                    self.complete(slot, Err(e));
                } else {
                    live.push((t.seq, slot));
                }
            }
        }
        live.sort_unstable();
        self.waiting = live.into_iter().map(|(_, slot)| slot).collect();
        self.out.clear();
        self.delayed.clear();
    }

    /// The final status of a command (SCSI Response, or Data-In with S).
    fn finish(
        &mut self,
        slot: usize,
        response: u8,
        status: u8,
        flags: u8,
        residual: u32,
        sense: &[u8],
    ) {
        let (opcode, expected) = {
            let t = self.slots[slot].as_ref().expect("live task");
            (t.cdb.opcode(), t.payload.len() as u64)
        };
        if response != 0 {
            return self.complete(slot, Err(IscsiError::TargetFailure { opcode, response }));
        }
        let sense = if sense.len() >= 2 {
            let n = u16::from_be_bytes([sense[0], sense[1]]) as usize;
            Sense::parse(&sense[2..(2 + n).min(sense.len())])
        } else {
            None
        };
        let retries = self.slots[slot].as_ref().map_or(0, |t| t.retries);
        let retry_after = match (status, sense) {
            (scsi::STATUS_CHECK_CONDITION, Some(s))
                if s.key == scsi::KEY_UNIT_ATTENTION && retries < 10 =>
            {
                Some(Duration::ZERO)
            }
            (scsi::STATUS_CHECK_CONDITION, Some(s))
                if s.key == scsi::KEY_NOT_READY
                    && s.asc == 0x04
                    && s.ascq == 0x01
                    && retries < 50 =>
            {
                Some(Duration::from_millis(200))
            }
            (scsi::STATUS_BUSY | scsi::STATUS_TASK_SET_FULL, _) if retries < 100 => {
                Some(Duration::from_millis(50))
            }
            _ => None,
        };
        if let Some(delay) = retry_after {
            debug!(opcode, status, ?sense, "retrying command");
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            self.reset(slot);
            self.slots[slot].as_mut().expect("live task").retries += 1;
            if delay.is_zero() {
                self.waiting.push_back(slot);
            } else {
                self.delayed.push((Instant::now() + delay, slot));
            }
            return;
        }
        if status != scsi::STATUS_GOOD {
            return self.complete(
                slot,
                Err(IscsiError::Scsi {
                    opcode,
                    status,
                    sense,
                }),
            );
        }
        let done = if flags & 0x02 != 0 {
            expected.saturating_sub(residual as u64)
        } else {
            expected
        };
        self.complete(slot, Ok(done))
    }
}

/// Writes every slice, however many calls it takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Small data segments are copied into the header batch; larger ones go to
/// the socket straight from the caller's buffer.
const COPY_LIMIT: usize = 8192;
const ZEROS: [u8; 4] = [0; 4];

struct Writer<'a> {
    wr: WriteHalf<'a>,
    batch: Vec<u8>,
    /// Headers and trailers of one Data-Out sequence, reused.
    seq_hdrs: Vec<u8>,
    seq_trailers: Vec<u8>,
    header_digest: bool,
    data_digest: bool,
}

impl Writer<'_> {
    async fn put(&mut self, bhs: &Bhs, data: &[u8]) -> std::io::Result<()> {
        self.batch.extend_from_slice(&bhs.0);
        if self.header_digest {
            self.batch
                .extend_from_slice(&digest(&[&bhs.0]).to_le_bytes());
        }
        if data.is_empty() {
            return Ok(());
        }
        let pad = pad4(data.len());
        let mut trailer = [0u8; 7];
        let mut tl = pad;
        if self.data_digest {
            let crc = digest(&[data, &ZEROS[..pad]]);
            trailer[pad..pad + 4].copy_from_slice(&crc.to_le_bytes());
            tl += 4;
        }
        if data.len() <= COPY_LIMIT {
            self.batch.extend_from_slice(data);
            self.batch.extend_from_slice(&trailer[..tl]);
            if self.batch.len() >= 256 << 10 {
                self.flush().await?;
            }
        } else {
            let mut v = [
                IoSlice::new(&self.batch),
                IoSlice::new(data),
                IoSlice::new(&trailer[..tl]),
            ];
            write_all_vectored(&mut self.wr, &mut v).await?;
            self.batch.clear();
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            self.wr.write_all(&self.batch).await?;
            self.batch.clear();
        }
        Ok(())
    }
}

async fn writer_loop(
    st: &RefCell<St>,
    mut w: Writer<'_>,
    notify: &Notify,
) -> Result<Outcome, IscsiError> {
    let mut items: Vec<Out> = Vec::new();
    loop {
        {
            let mut s = st.borrow_mut();
            let s = &mut *s;
            items.extend(s.out.drain(..));
            while let Some(&slot) = s.waiting.front() {
                if s.closing && s.logout_sent.is_some() {
                    break;
                }
                if !sn_le(s.cmdsn, s.max_cmdsn) {
                    if !s.stalled {
                        s.stalled = true;
                        s.stats.window_stalls.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            cmdsn = s.cmdsn,
                            max_cmdsn = s.max_cmdsn,
                            "command window closed"
                        );
                    }
                    break;
                }
                s.stalled = false;
                s.waiting.pop_front();
                let Some(t) = s.slots[slot].as_mut() else {
                    continue;
                };
                if sn_lt(s.max_cmdsn, s.cmdsn) {
                    s.stats.window_violations.fetch_add(1, Ordering::Relaxed);
                }
                t.cmdsn = Some(s.cmdsn);
                let ahead = s.cmdsn.wrapping_sub(s.exp_cmdsn).wrapping_add(1) as i32;
                bump_max(&s.stats.max_ahead, ahead.max(0) as u64);
                t.deadline = Some(Instant::now() + s.options.command_timeout);
                s.cmdsn = s.cmdsn.wrapping_add(1);
                s.outstanding += 1;
                bump_max(&s.stats.max_outstanding, s.outstanding);
                items.push(Out::Cmd(slot));
            }
        }
        if items.is_empty() {
            notify.notified().await;
            continue;
        }
        for item in items.drain(..) {
            send_item(st, &mut w, item).await?;
        }
        w.flush().await?;
    }
}

async fn send_item(st: &RefCell<St>, w: &mut Writer<'_>, item: Out) -> Result<(), IscsiError> {
    match item {
        Out::Cmd(slot) => {
            let (bhs, data, unsolicited, itt, mrdsl, stats) = {
                let s = st.borrow();
                let Some(t) = s.slots[slot].as_ref() else {
                    return Ok(());
                };
                let neg = &s.neg;
                let data = t.payload.out();
                let len = t.payload.len();
                let mrdsl = neg.target_max_recv_data_segment_length as usize;
                let first = neg.first_burst_length as usize;
                let imm = if data.is_some() && neg.immediate_data {
                    len.min(first).min(mrdsl)
                } else {
                    0
                };
                let unsolicited_end = if data.is_some() && !neg.initial_r2t {
                    len.min(first)
                } else {
                    imm
                };
                let mut b = Bhs::new(OP_SCSI_CMD, false);
                let mut flags = 0x01; // simple task attribute
                if unsolicited_end <= imm {
                    flags |= FINAL;
                }
                match &t.payload {
                    Payload::In { .. } | Payload::InVec(_) | Payload::InRaw(_) => flags |= 0x40,
                    Payload::Out(_) => flags |= 0x20,
                    Payload::None => {}
                }
                b.set_flags(flags);
                b.set_data_len(imm);
                b.set_lun_field(s.lun);
                b.set_itt(t.itt);
                b.set_u32(OFF_EDTL, len as u32);
                b.set_u32(OFF_SN, t.cmdsn.expect("assigned CmdSN"));
                b.set_u32(OFF_EXP_SN, s.exp_statsn);
                b.0[32..48].copy_from_slice(&t.cdb.bytes);
                debug!(itt = t.itt, cmdsn = ?t.cmdsn, cdb = ?t.cdb, imm, "SCSI command");
                (
                    b,
                    data,
                    (imm, unsolicited_end),
                    t.itt,
                    mrdsl,
                    s.stats.clone(),
                )
            };
            let (imm, end) = unsolicited;
            let slice = data.as_ref().map_or(&[][..], |d| d.as_slice());
            if imm > 0 {
                bump_max(&stats.max_data_out_segment, imm as u64);
            }
            w.put(&bhs, &slice[..imm]).await?;
            if end > imm {
                let lun = bhs.lun_field();
                send_data_out(
                    st,
                    w,
                    slice,
                    itt,
                    RESERVED_TAG,
                    lun,
                    imm,
                    end - imm,
                    mrdsl,
                    &stats,
                )
                .await?;
            }
        }
        Out::Data {
            slot,
            itt,
            ttt,
            offset,
            len,
        } => {
            let (data, lun, mrdsl, stats) = {
                let s = st.borrow();
                let Some(t) = s.slots[slot].as_ref().filter(|t| t.itt == itt) else {
                    return Ok(());
                };
                (
                    t.payload.out(),
                    s.lun,
                    s.neg.target_max_recv_data_segment_length as usize,
                    s.stats.clone(),
                )
            };
            let Some(data) = data else {
                return Err(IscsiError::Protocol(
                    "R2T for a command without data".into(),
                ));
            };
            send_data_out(
                st,
                w,
                data.as_slice(),
                itt,
                ttt,
                lun,
                offset,
                len,
                mrdsl,
                &stats,
            )
            .await?;
        }
        Out::NopReply { ttt, lun, data } => {
            let mut b = Bhs::new(OP_NOP_OUT, true);
            b.set_flags(FINAL);
            b.set_lun_field(lun);
            b.set_itt(RESERVED_TAG);
            b.set_u32(OFF_TTT, ttt);
            b.set_data_len(data.len());
            {
                let s = st.borrow();
                b.set_u32(OFF_SN, s.cmdsn);
                b.set_u32(OFF_EXP_SN, s.exp_statsn);
                s.stats.nop_replies.fetch_add(1, Ordering::Relaxed);
            }
            w.put(&b, &data).await?;
        }
        Out::Ping(itt) | Out::Logout(itt) => {
            let logout = matches!(item, Out::Logout(_));
            let mut b = Bhs::new(if logout { OP_LOGOUT_REQ } else { OP_NOP_OUT }, true);
            b.set_flags(FINAL); // logout reason 0: close the session
            b.set_itt(itt);
            if !logout {
                b.set_u32(OFF_TTT, RESERVED_TAG);
            }
            {
                let s = st.borrow();
                b.set_u32(OFF_SN, s.cmdsn);
                b.set_u32(OFF_EXP_SN, s.exp_statsn);
            }
            debug!(
                itt,
                logout,
                "sending {}",
                if logout { "logout" } else { "NOP-Out ping" }
            );
            w.put(&b, &[]).await?;
        }
    }
    Ok(())
}

/// One Data-Out sequence: `len` bytes from `offset`, in PDUs no larger than
/// the target's MaxRecvDataSegmentLength, DataSN from 0, F on the last.
#[allow(clippy::too_many_arguments)]
async fn send_data_out(
    st: &RefCell<St>,
    w: &mut Writer<'_>,
    data: &[u8],
    itt: u32,
    ttt: u32,
    lun: u64,
    offset: usize,
    len: usize,
    mrdsl: usize,
    stats: &Stats,
) -> Result<(), IscsiError> {
    let end = offset + len;
    if end > data.len() {
        return Err(IscsiError::Protocol(format!(
            "target asked for bytes {offset}..{end} of a {}-byte write",
            data.len()
        )));
    }
    // Build every header (and pad/digest trailer) of the sequence first,
    // then send headers and the caller's data in a few gathered writes: no
    // copy of the data, and no system call per PDU.
    let exp_statsn = st.borrow().exp_statsn;
    let hlen = BHS_LEN + if w.header_digest { 4 } else { 0 };
    let npdu = len.div_ceil(mrdsl.max(1));
    let mut hdrs = std::mem::take(&mut w.seq_hdrs);
    let mut trailers = std::mem::take(&mut w.seq_trailers);
    hdrs.clear();
    trailers.clear();
    let mut pos = offset;
    let mut datasn = 0u32;
    while pos < end {
        let n = (end - pos).min(mrdsl);
        let mut b = Bhs::new(OP_DATA_OUT, false);
        if pos + n == end {
            b.set_flags(FINAL);
        }
        b.set_data_len(n);
        b.set_lun_field(lun);
        b.set_itt(itt);
        b.set_u32(OFF_TTT, ttt);
        b.set_u32(OFF_EXP_SN, exp_statsn);
        b.set_u32(OFF_DATASN, datasn);
        b.set_u32(OFF_BUFFER_OFFSET, pos as u32);
        hdrs.extend_from_slice(&b.0);
        if w.header_digest {
            hdrs.extend_from_slice(&digest(&[&b.0]).to_le_bytes());
        }
        let pad = pad4(n);
        trailers.extend_from_slice(&ZEROS[..pad]);
        if w.data_digest {
            let crc = digest(&[&data[pos..pos + n], &ZEROS[..pad]]);
            trailers.extend_from_slice(&crc.to_le_bytes());
        }
        pos += n;
        datasn += 1;
    }
    bump_max(&stats.max_data_out_segment, len.min(mrdsl) as u64);
    let tlen = |n: usize| pad4(n) + if w.data_digest { 4 } else { 0 };
    const PER_WRITE: usize = 32;
    let mut iov: [IoSlice<'_>; 1 + 3 * PER_WRITE] = [IoSlice::new(&[]); 1 + 3 * PER_WRITE];
    let (mut i, mut pos, mut toff) = (0usize, offset, 0usize);
    let mut first = true;
    while i < npdu {
        let mut k = 0;
        if first && !w.batch.is_empty() {
            iov[k] = IoSlice::new(&w.batch);
            k += 1;
        }
        for _ in 0..PER_WRITE {
            if i == npdu {
                break;
            }
            let n = (end - pos).min(mrdsl);
            iov[k] = IoSlice::new(&hdrs[i * hlen..(i + 1) * hlen]);
            iov[k + 1] = IoSlice::new(&data[pos..pos + n]);
            k += 2;
            let t = tlen(n);
            if t > 0 {
                iov[k] = IoSlice::new(&trailers[toff..toff + t]);
                k += 1;
            }
            toff += t;
            pos += n;
            i += 1;
        }
        write_all_vectored(&mut w.wr, &mut iov[..k]).await?;
        first = false;
    }
    w.batch.clear();
    w.seq_hdrs = hdrs;
    w.seq_trailers = trailers;
    Ok(())
}

async fn reader_loop(
    st: &RefCell<St>,
    rd: &mut BufReader<ReadHalf<'_>>,
    notify: &Notify,
    (header_digest, data_digest): (bool, bool),
    max_segment: usize,
) -> Result<Outcome, IscsiError> {
    let mut scratch: Vec<u8> = Vec::with_capacity(1024);
    let mut dig = [0u8; 4];
    let mut pad = [0u8; 3];
    loop {
        let mut bhs = Bhs::default();
        rd.read_exact(&mut bhs.0).await?;
        let ahs = bhs.ahs_len();
        if ahs > 0 {
            scratch.resize(ahs, 0);
            rd.read_exact(&mut scratch).await?;
        }
        if header_digest {
            rd.read_exact(&mut dig).await?;
            let want = if ahs > 0 {
                digest(&[&bhs.0, &scratch[..ahs]])
            } else {
                digest(&[&bhs.0])
            };
            if u32::from_le_bytes(dig) != want {
                return Err(IscsiError::Digest("header"));
            }
        }
        let dlen = bhs.data_len();
        let op = bhs.opcode();
        let itt = bhs.itt();
        debug!(?bhs, "PDU in");
        // What we declared bounds what we read (and what `scratch` grows to).
        if dlen > max_segment {
            return Err(IscsiError::Protocol(format!(
                "a {dlen}-byte data segment (opcode {op:#04x}), over the \
                 MaxRecvDataSegmentLength of {max_segment} we declared"
            )));
        }
        // Every target PDU carries ExpCmdSN and MaxCmdSN.
        {
            let mut s = st.borrow_mut();
            s.last_rx = Instant::now();
            s.window(bhs.u32_at(OFF_EXP_SN), bhs.u32_at(OFF_MAX_CMDSN));
        }
        if op == OP_DATA_IN {
            let target = {
                let mut s = st.borrow_mut();
                match s.lookup(itt) {
                    Some(slot) => {
                        if s.slots[slot].as_ref().is_some_and(Task::unstarted) {
                            s.take_warm_buffer(slot);
                        }
                        let t = s.slots[slot].as_mut().expect("live task");
                        let datasn = bhs.u32_at(OFF_DATASN);
                        if datasn != t.next_datasn {
                            return Err(IscsiError::Protocol(format!(
                                "Data-In DataSN {datasn}, expected {}",
                                t.next_datasn
                            )));
                        }
                        t.next_datasn = datasn.wrapping_add(1);
                        t.payload.in_target().map(|p| (slot, p))
                    }
                    None => None,
                }
            };
            let off = bhs.u32_at(OFF_BUFFER_OFFSET) as usize;
            let slot = match target {
                Some((slot, (ptr, cap))) => {
                    if off.checked_add(dlen).is_none_or(|e| e > cap) {
                        return Err(IscsiError::Protocol(format!(
                            "Data-In for bytes {off}..{} of a {cap}-byte read",
                            off + dlen
                        )));
                    }
                    // SAFETY: the buffer belongs to the task in `slot`, which
                    // only this reader removes (the supervisor does so only
                    // after dropping this future). Its heap memory does not
                    // move with the task, and the range was checked.
                    let dst = unsafe { std::slice::from_raw_parts_mut(ptr.add(off), dlen) };
                    rd.read_exact(dst).await?;
                    let p = pad4(dlen);
                    rd.read_exact(&mut pad[..p]).await?;
                    if data_digest {
                        rd.read_exact(&mut dig).await?;
                        if u32::from_le_bytes(dig) != digest(&[dst, &pad[..p]]) {
                            return Err(IscsiError::Digest("data"));
                        }
                    }
                    let mut s = st.borrow_mut();
                    bump_max(&s.stats.max_data_in_segment, dlen as u64);
                    if let Some(t) = s.slots[slot].as_mut() {
                        t.received += dlen;
                    }
                    Some(slot)
                }
                None => {
                    debug!(itt, "Data-In for an unknown task: discarded");
                    read_segment(rd, &mut scratch, dlen, data_digest).await?;
                    None
                }
            };
            let flags = bhs.flags();
            if flags & 0x01 != 0 {
                {
                    let mut s = st.borrow_mut();
                    s.statsn(bhs.u32_at(OFF_SN));
                    if let Some(slot) = slot {
                        s.finish(slot, 0, bhs.byte(3), flags, bhs.u32_at(OFF_RESIDUAL), &[]);
                        notify.notify_one();
                    }
                }
                // A read is done: let the caller (waiting in `reap`) take it
                // and hand its buffer back before the next read's data comes
                // in, so that data lands in a buffer still in cache.
                tokio::task::yield_now().await;
            }
            continue;
        }
        read_segment(rd, &mut scratch, dlen, data_digest).await?;
        let data = &scratch[..dlen];
        let mut s = st.borrow_mut();
        match op {
            OP_SCSI_RESP => {
                s.statsn(bhs.u32_at(OFF_SN));
                match s.lookup(itt) {
                    Some(slot) => {
                        let residual = bhs.u32_at(OFF_RESIDUAL);
                        s.finish(slot, bhs.byte(2), bhs.byte(3), bhs.flags(), residual, data);
                        notify.notify_one();
                    }
                    None => debug!(itt, "SCSI Response for an unknown task"),
                }
            }
            OP_R2T => {
                let Some(slot) = s.lookup(itt) else {
                    debug!(itt, "R2T for an unknown task");
                    continue;
                };
                let ttt = bhs.u32_at(OFF_TTT);
                let offset = bhs.u32_at(OFF_BUFFER_OFFSET) as usize;
                let len = bhs.u32_at(OFF_RESIDUAL) as usize;
                debug!(itt, ttt, offset, len, "R2T");
                s.out.push_back(Out::Data {
                    slot,
                    itt,
                    ttt,
                    offset,
                    len,
                });
                notify.notify_one();
            }
            OP_NOP_IN => {
                if itt == RESERVED_TAG {
                    let ttt = bhs.u32_at(OFF_TTT);
                    if ttt != RESERVED_TAG {
                        debug!(ttt, "NOP-In ping from the target");
                        s.out.push_back(Out::NopReply {
                            ttt,
                            lun: bhs.lun_field(),
                            data: data.to_vec(),
                        });
                        notify.notify_one();
                    }
                } else {
                    s.statsn(bhs.u32_at(OFF_SN));
                    if s.ping.is_some_and(|(p, _)| p == itt) {
                        s.ping = None;
                    }
                }
            }
            OP_LOGOUT_RESP => {
                s.statsn(bhs.u32_at(OFF_SN));
                info!(response = bhs.byte(2), "logged out");
                return Ok(Outcome::LoggedOut);
            }
            OP_ASYNC => {
                s.statsn(bhs.u32_at(OFF_SN));
                let event = bhs.byte(36);
                info!(event, "async message from the target");
                match event {
                    0 => {} // a SCSI event; commands will see the unit attention
                    1 => return Err(IscsiError::Protocol("target requested logout".into())),
                    2 | 3 => {
                        return Err(IscsiError::Protocol(
                            "target is dropping the connection".into(),
                        ))
                    }
                    4 => {
                        return Err(IscsiError::Protocol(
                            "target requested renegotiation".into(),
                        ))
                    }
                    _ => {}
                }
            }
            OP_REJECT => {
                s.statsn(bhs.u32_at(OFF_SN));
                let reason = bhs.byte(2);
                let rej = data
                    .get(16..20)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                warn!(reason, "target rejected a PDU");
                match rej.and_then(|i| s.lookup(i)) {
                    Some(slot) => {
                        let opcode = s.slots[slot].as_ref().map_or(0, |t| t.cdb.opcode());
                        s.complete(
                            slot,
                            Err(IscsiError::Protocol(format!(
                                "command {opcode:#04x} rejected, reason {reason:#04x}"
                            ))),
                        );
                        notify.notify_one();
                    }
                    None => {
                        return Err(IscsiError::Protocol(format!(
                            "PDU rejected, reason {reason:#04x}"
                        )))
                    }
                }
            }
            OP_TEXT_RESP | OP_TASK_MGMT_RESP => {
                s.statsn(bhs.u32_at(OFF_SN));
            }
            other => {
                return Err(IscsiError::Protocol(format!(
                    "unexpected opcode {other:#04x}"
                )))
            }
        }
        // A window that opened lets queued commands go.
        if !s.waiting.is_empty() {
            notify.notify_one();
        }
    }
}

/// Reads a data segment (with padding and digest) into `scratch[..len]`.
async fn read_segment(
    rd: &mut BufReader<ReadHalf<'_>>,
    scratch: &mut Vec<u8>,
    len: usize,
    data_digest: bool,
) -> Result<(), IscsiError> {
    if len == 0 {
        return Ok(());
    }
    let total = len + pad4(len) + if data_digest { 4 } else { 0 };
    if scratch.len() < total {
        scratch.resize(total, 0);
    }
    rd.read_exact(&mut scratch[..total]).await?;
    if data_digest {
        let p = len + pad4(len);
        let got = u32::from_le_bytes(scratch[p..p + 4].try_into().expect("4 bytes"));
        if got != digest(&[&scratch[..p]]) {
            return Err(IscsiError::Digest("data"));
        }
    }
    Ok(())
}

async fn timer_loop(st: &RefCell<St>, notify: &Notify) -> Result<Outcome, IscsiError> {
    let mut iv = tokio::time::interval(Duration::from_millis(100));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let mut s = st.borrow_mut();
        let s = &mut *s;
        let now = Instant::now();
        if !s.delayed.is_empty() {
            let mut i = 0;
            while i < s.delayed.len() {
                if s.delayed[i].0 <= now {
                    let (_, slot) = s.delayed.swap_remove(i);
                    s.waiting.push_back(slot);
                    notify.notify_one();
                } else {
                    i += 1;
                }
            }
        }
        if let Some(at) = s.logout_sent {
            if now > at + Duration::from_secs(5) {
                warn!("no answer to logout; closing");
                return Ok(Outcome::LoggedOut);
            }
        }
        if s.outstanding > 0 {
            for t in s.slots.iter().flatten() {
                if t.deadline.is_some_and(|d| d <= now) {
                    return Err(IscsiError::Timeout(format!(
                        "command {:#04x} (task {:#x}) got no answer in {:?}",
                        t.cdb.opcode(),
                        t.itt,
                        s.options.command_timeout
                    )));
                }
            }
        }
        match s.ping {
            Some((_, sent)) if now.duration_since(sent) > s.options.nop_timeout => {
                return Err(IscsiError::Timeout("no answer to NOP-Out ping".into()));
            }
            None if now.duration_since(s.last_rx) >= s.options.nop_interval
                && s.logout_sent.is_none() =>
            {
                let itt = s.next_misc_itt();
                s.ping = Some((itt, now));
                s.out.push_back(Out::Ping(itt));
                s.stats.nop_pings.fetch_add(1, Ordering::Relaxed);
                notify.notify_one();
            }
            _ => {}
        }
    }
}

async fn intake_loop(
    st: &RefCell<St>,
    rx: &mut UnboundedReceiver<Msg>,
    notify: &Notify,
) -> Result<Outcome, IscsiError> {
    loop {
        let msg = rx.recv().await;
        match msg {
            Some(Msg::Cmd(req)) => {
                let mut s = st.borrow_mut();
                if let Err(req) = s.add(req) {
                    let _ = s.done.send(Response {
                        id: req.id,
                        result: Err(IscsiError::Protocol("too many commands".into())),
                        payload: req.payload,
                    });
                }
                notify.notify_one();
            }
            Some(Msg::Close) | None => {
                {
                    let mut s = st.borrow_mut();
                    s.closing = true;
                    if s.live > 0 {
                        // The device waits for its requests first; be safe anyway.
                        let mk = || IscsiError::Closed;
                        s.fail_all(&mk);
                    }
                    let itt = s.next_misc_itt();
                    s.out.push_back(Out::Logout(itt));
                    s.logout_sent = Some(Instant::now());
                    notify.notify_one();
                }
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Runs one logged-in connection until it fails or logs out.
async fn run_connection(
    st: &RefCell<St>,
    mut stream: TcpStream,
    rx: &mut UnboundedReceiver<Msg>,
) -> Result<Outcome, IscsiError> {
    let notify = Notify::new();
    let (hd, dd, max_segment) = {
        let s = st.borrow();
        let n = &s.neg;
        let max_segment = n.initiator_max_recv_data_segment_length as usize;
        (n.header_digest, n.data_digest, max_segment)
    };
    let (rd, wr) = stream.split();
    // Small: a header read takes the start of the data segment with it,
    // and that part is then copied out of this buffer (8 KiB of every
    // 256 KiB Data-In was 2 ms of memmove per GiB). Big enough to take
    // several 48-byte responses in one read.
    let mut rd = BufReader::with_capacity(1024, rd);
    let w = Writer {
        wr,
        batch: Vec::with_capacity(64 << 10),
        seq_hdrs: Vec::new(),
        seq_trailers: Vec::new(),
        header_digest: hd,
        data_digest: dd,
    };
    notify.notify_one();
    tokio::select! {
        biased;
        r = intake_loop(st, rx, &notify) => r,
        r = reader_loop(st, &mut rd, &notify, (hd, dd), max_segment) => r,
        r = writer_loop(st, w, &notify) => r,
        r = timer_loop(st, &notify) => r,
    }
}

/// Starts the session's task on `runner`: it logs in, reports the outcome
/// on `ready`, then serves requests from `rx` until a `Msg::Close`.
pub fn start(
    runner: &Runner,
    cfg: Config,
    rx: UnboundedReceiver<Msg>,
    done: UnboundedSender<Response>,
    stats: Arc<Stats>,
    ready: UnboundedSender<Result<Negotiated, IscsiError>>,
) -> tokio::task::JoinHandle<()> {
    // SAFETY: `run`'s future is not `Send` only because its four loops share
    // the session state through `&RefCell<St>` (with short `RefMut`s, never
    // held across an await). The `RefCell` is created inside the future and
    // never leaves it, so it is only touched inside polls of this one
    // future, and a future is polled by one thread at a time: moving it
    // between threads between polls cannot race. It holds no thread-locals
    // or lock guards across awaits; the compiler's list of its non-`Send`
    // parts names only the `RefCell`, its `RefMut` and its borrow flag.
    runner.spawn(unsafe { AssertSend::new(run(cfg, rx, done, stats, ready)) })
}

/// The session's task. Reports the first login's outcome on `ready`.
async fn run(
    cfg: Config,
    mut rx: UnboundedReceiver<Msg>,
    done: UnboundedSender<Response>,
    stats: Arc<Stats>,
    ready: UnboundedSender<Result<Negotiated, IscsiError>>,
) {
    let name = cfg.spec.name();
    let mut misc_itt = 0x8000_0000u32;
    let (mut stream, mut login) = match connect_login(&cfg, misc_itt).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(login.negotiated.clone()));
    let st = RefCell::new(St {
        slots: Vec::new(),
        gens: Vec::new(),
        free: Vec::new(),
        live: 0,
        seq: 0,
        waiting: VecDeque::new(),
        out: VecDeque::new(),
        delayed: Vec::new(),
        cmdsn: 0,
        exp_cmdsn: 0,
        max_cmdsn: 0,
        exp_statsn: 0,
        stalled: false,
        neg: login.negotiated.clone(),
        lun: encode_lun(cfg.spec.lun),
        misc_itt,
        last_rx: Instant::now(),
        ping: None,
        closing: false,
        logout_sent: None,
        progress: false,
        outstanding: 0,
        options: cfg.options.clone(),
        stats: stats.clone(),
        done,
    });
    let mut attempts = 0u32;
    loop {
        {
            let mut s = st.borrow_mut();
            let s = &mut *s;
            s.cmdsn = login.cmdsn;
            s.exp_cmdsn = login.exp_cmdsn;
            s.max_cmdsn = login.max_cmdsn;
            s.exp_statsn = login.exp_statsn;
            s.neg = login.negotiated.clone();
            s.last_rx = Instant::now();
            s.ping = None;
            s.progress = false;
            s.stalled = false;
            s.stats.target_max_recv_data_segment_length.store(
                s.neg.target_max_recv_data_segment_length as u64,
                Ordering::Relaxed,
            );
            s.window(login.exp_cmdsn, login.max_cmdsn);
        }
        let r = run_connection(&st, stream, &mut rx).await;
        let err = {
            let mut s = st.borrow_mut();
            misc_itt = s.misc_itt;
            if s.closing || matches!(r, Ok(Outcome::LoggedOut)) {
                if let Err(e) = r {
                    debug!(device = %name, error = %e, "connection ended while closing");
                }
                return;
            }
            let err = r.expect_err("only logout ends a connection cleanly");
            warn!(device = %name, error = %err, "iSCSI connection failed; reconnecting");
            if s.progress {
                attempts = 0;
            }
            let err = Arc::new(err);
            s.requeue_all(&err);
            err
        };
        // Reconnect, with backoff.
        let mut last = err;
        let reconnected = loop {
            attempts += 1;
            if attempts > cfg.options.reconnect_attempts {
                break None;
            }
            let backoff = cfg
                .options
                .reconnect_backoff
                .saturating_mul(1 << (attempts - 1).min(5))
                .min(Duration::from_secs(5));
            tokio::time::sleep(if attempts == 1 {
                Duration::ZERO
            } else {
                backoff
            })
            .await;
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            misc_itt = misc_itt.wrapping_add(64) | 0x8000_0000;
            match connect_login(&cfg, misc_itt).await {
                Ok(c) => {
                    info!(device = %name, attempt = attempts, tsih = c.1.tsih, "reconnected");
                    break Some(c);
                }
                Err(e) if e.is_permanent() => {
                    warn!(device = %name, error = %e, "re-login refused");
                    last = Arc::new(e);
                    break None;
                }
                Err(e) => {
                    warn!(device = %name, attempt = attempts, error = %e, "reconnect failed");
                    last = Arc::new(e);
                }
            }
        };
        match reconnected {
            Some((s2, l2)) => {
                stream = s2;
                login = l2;
                st.borrow_mut().misc_itt = misc_itt;
            }
            None => {
                let attempts_made = attempts.min(cfg.options.reconnect_attempts);
                let mk = move || -> IscsiError {
                    match &*last {
                        IscsiError::TargetNotFound(t) => IscsiError::TargetNotFound(t.clone()),
                        IscsiError::TargetRemoved(t) => IscsiError::TargetRemoved(t.clone()),
                        IscsiError::AuthenticationFailed => IscsiError::AuthenticationFailed,
                        IscsiError::AuthorizationFailed => IscsiError::AuthorizationFailed,
                        _ => IscsiError::Unreachable {
                            attempts: attempts_made,
                            last: last.clone(),
                        },
                    }
                };
                warn!(device = %name, error = %mk(), "giving up on the session");
                st.borrow_mut().fail_all(&mk);
                // Dead: fail whatever still comes until the device closes.
                while let Some(Msg::Cmd(req)) = rx.recv().await {
                    let _ = st.borrow().done.send(Response {
                        id: req.id,
                        result: Err(mk()),
                        payload: req.payload,
                    });
                }
                return;
            }
        }
    }
}
