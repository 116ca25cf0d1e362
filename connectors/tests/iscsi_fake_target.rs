//! The initiator against a minimal in-process iSCSI target (std TCP on
//! 127.0.0.1, one thread per connection): enough of RFC 7143 to log in
//! without authentication or digests and answer the commands
//! `IscsiDevice::open` probes with, plus READ(16). Unlike tgtd
//! (iscsi_tgt.rs) it can be made to break the protocol on purpose: here, to
//! send Data-In segments longer than the MaxRecvDataSegmentLength the
//! initiator declared, which the initiator must refuse rather than read.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use volback_connectors::iscsi::{iscsi_cause, IscsiDevice, IscsiError, IscsiOptions, IscsiSpec};
use volback_connectors::{AlignedBuf, BlockDevice, DeviceError, ErrorKind, IoOp, Returned};

const TARGET_IQN: &str = "iqn.2026-01.test.volback:fake";
/// The MaxRecvDataSegmentLength the tests make the initiator declare.
const DECLARED: usize = 4096;
const BLOCK_SIZE: usize = 512;
const BLOCKS: u64 = 64;
/// The fake target refuses connections beyond this many, so an initiator
/// that kept reconnecting could not keep a test going.
const MAX_CONNECTIONS: usize = 4;

const OP_NOP_OUT: u8 = 0x00;
const OP_SCSI_CMD: u8 = 0x01;
const OP_LOGIN_REQ: u8 = 0x03;
const OP_LOGOUT_REQ: u8 = 0x06;
const OP_NOP_IN: u8 = 0x20;
const OP_SCSI_RESP: u8 = 0x21;
const OP_LOGIN_RESP: u8 = 0x23;
const OP_DATA_IN: u8 = 0x25;
const OP_LOGOUT_RESP: u8 = 0x26;
const FINAL: u8 = 0x80;
const TRANSIT: u8 = 0x80;
const RESERVED_TAG: u32 = 0xffff_ffff;
/// Commands the target lets the initiator have outstanding (MaxCmdSN -
/// ExpCmdSN + 1).
const WINDOW: u32 = 32;

/// How the fake target answers a command that reads.
#[derive(Debug, Clone, Copy)]
enum DataIn {
    /// Properly: the data, in Data-In PDUs of at most this many bytes.
    Segments(usize),
    /// One Data-In PDU of this many bytes, whatever the command asked for:
    /// longer than the initiator declared it accepts.
    OverLong(usize),
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// One PDU: its 48-byte Basic Header Segment and data segment (no AHS is
/// kept and no digest is expected: the login negotiates none).
struct Pdu {
    bhs: [u8; 48],
    data: Vec<u8>,
}

impl Pdu {
    fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    fn itt(&self) -> u32 {
        be32(&self.bhs, 16)
    }

    /// CmdSN of an initiator PDU.
    fn cmdsn(&self) -> u32 {
        be32(&self.bhs, 24)
    }
}

fn read_pdu(s: &mut TcpStream) -> io::Result<Pdu> {
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs)?;
    let ahs = bhs[4] as usize * 4;
    let dlen = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut rest = vec![0u8; ahs + dlen.next_multiple_of(4)];
    s.read_exact(&mut rest)?;
    Ok(Pdu {
        bhs,
        data: rest[ahs..ahs + dlen].to_vec(),
    })
}

/// Writes a PDU whose header's DataSegmentLength is set from `data`, with
/// the padding to a 4-byte boundary.
fn write_pdu(s: &mut TcpStream, mut bhs: [u8; 48], data: &[u8]) -> io::Result<()> {
    let len = (data.len() as u32).to_be_bytes();
    bhs[5..8].copy_from_slice(&len[1..]);
    let mut buf = Vec::with_capacity(48 + data.len() + 3);
    buf.extend_from_slice(&bhs);
    buf.extend_from_slice(data);
    buf.resize(48 + data.len().next_multiple_of(4), 0);
    s.write_all(&buf)
}

/// The state of one connection, and the header every target PDU starts
/// from.
struct Conn {
    s: TcpStream,
    /// The StatSN of the next response.
    statsn: u32,
    exp_cmdsn: u32,
}

impl Conn {
    /// A target PDU header: opcode, flags, the task tag of the request,
    /// and ExpCmdSN/MaxCmdSN. With `status`, the PDU carries a status and
    /// takes the next StatSN. Other fields are left zero (reserved in most
    /// target PDUs).
    fn header(&mut self, opcode: u8, flags: u8, req: &Pdu, status: bool) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = opcode;
        b[1] = flags;
        put32(&mut b, 16, req.itt());
        if status {
            put32(&mut b, 24, self.statsn);
            self.statsn = self.statsn.wrapping_add(1);
        }
        put32(&mut b, 28, self.exp_cmdsn);
        put32(&mut b, 32, self.exp_cmdsn.wrapping_add(WINDOW - 1));
        b
    }
}

fn parse_text(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(format!("{k}={v}\0").as_bytes());
    }
    out
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// Whether a value list (`CRC32C,None`) holds `v`.
fn offers(list: &str, v: &str) -> bool {
    list.split(',').any(|x| x == v)
}

/// Our answer to the keys of one Login Request in stage `csg`.
fn login_answer(csg: u8, keys: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    match csg {
        // Security stage: no authentication. A normal session's first
        // response must carry the portal group tag.
        0 => {
            for (k, v) in keys {
                if k == "AuthMethod" {
                    if !offers(v, "None") {
                        return Err(format!("AuthMethod={v} does not offer None"));
                    }
                    out.push(pair("AuthMethod", "None"));
                    out.push(pair("TargetPortalGroupTag", "1"));
                }
            }
        }
        // Operational stage: accept every value offered as it is, which
        // every key's result function allows (the minimum or maximum of
        // equal numbers, OR or AND of equal booleans), except the digests
        // (we do none) and MaxRecvDataSegmentLength, which is declarative:
        // the initiator's binds us, and we declare our own.
        1 => {
            for (k, v) in keys {
                match k.as_str() {
                    "MaxRecvDataSegmentLength" => {}
                    "HeaderDigest" | "DataDigest" if !offers(v, "None") => {
                        return Err(format!("{k}={v} does not offer None"))
                    }
                    "HeaderDigest" | "DataDigest" => out.push(pair(k, "None")),
                    _ => out.push((k.clone(), v.clone())),
                }
            }
            out.push(pair("MaxRecvDataSegmentLength", "65536"));
        }
        _ => return Err(format!("login request in stage {csg}")),
    }
    Ok(out)
}

/// Answers Login Requests until the initiator has moved to the full
/// feature phase: each response grants the transit the request asked for,
/// and the final one carries the new session's TSIH.
fn login(c: &mut Conn) -> Result<(), String> {
    loop {
        let req = read_pdu(&mut c.s).map_err(|e| format!("login: {e}"))?;
        if req.opcode() != OP_LOGIN_REQ {
            return Err(format!("opcode {:#04x} during login", req.opcode()));
        }
        let flags = req.bhs[1];
        let (transit, csg, nsg) = (flags & TRANSIT != 0, (flags >> 2) & 3, flags & 3);
        let answer = login_answer(csg, &parse_text(&req.data))?;
        // Login requests are immediate: ExpCmdSN stays at their CmdSN.
        c.exp_cmdsn = req.cmdsn();
        let done = transit && nsg == 3;
        let flags = if transit {
            TRANSIT | csg << 2 | nsg
        } else {
            csg << 2
        };
        let mut b = c.header(OP_LOGIN_RESP, flags, &req, true);
        // Bytes 2 and 3: VersionMax and VersionActive 0. Bytes 8..14: the
        // ISID; bytes 14..16: the TSIH, only in the final response of a new
        // session. Bytes 36..38: status 0/0, success.
        b[8..14].copy_from_slice(&req.bhs[8..14]);
        if done {
            b[14..16].copy_from_slice(&1u16.to_be_bytes());
        }
        write_pdu(&mut c.s, b, &encode_text(&answer)).map_err(|e| format!("login: {e}"))?;
        if done {
            return Ok(());
        }
    }
}

/// The byte at `offset` of the LUN.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Sense key, additional sense code and qualifier of a failed command.
type Failure = (u8, u8, u8);

const ILLEGAL_REQUEST: u8 = 0x05;

/// What a command returns (empty for one that transfers nothing).
fn execute(cdb: &[u8]) -> Result<Vec<u8>, Failure> {
    match cdb[0] {
        // TEST UNIT READY
        0x00 => Ok(Vec::new()),
        // Standard INQUIRY data: a direct-access block device.
        0x12 if cdb[1] & 1 == 0 => {
            let mut d = vec![0u8; 36];
            d[2] = 6; // SPC-4
            d[3] = 2; // response data format
            d[4] = 31; // additional length
            d[8..16].copy_from_slice(b"VOLBACK ");
            d[16..32].copy_from_slice(b"FAKE TARGET     ");
            d[32..36].copy_from_slice(b"0001");
            Ok(d)
        }
        // Supported VPD pages: only this one, so the probe asks for no
        // Block Limits or Logical Block Provisioning page.
        0x12 if cdb[2] == 0 => Ok(vec![0, 0, 0, 1, 0]),
        0x12 => Err((ILLEGAL_REQUEST, 0x24, 0)), // invalid field in CDB
        // READ CAPACITY(16): last LBA, block size, not thin.
        0x9e if cdb[1] & 0x1f == 0x10 => {
            let mut d = vec![0u8; 32];
            d[0..8].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
            d[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
            Ok(d)
        }
        // READ(16)
        0x88 => {
            let lba = u64::from_be_bytes(cdb[2..10].try_into().unwrap());
            let blocks = be32(cdb, 10) as u64;
            if lba + blocks > BLOCKS {
                return Err((ILLEGAL_REQUEST, 0x21, 0)); // LBA out of range
            }
            let start = lba * BLOCK_SIZE as u64;
            let end = start + blocks * BLOCK_SIZE as u64;
            Ok((start..end).map(pattern).collect())
        }
        _ => Err((ILLEGAL_REQUEST, 0x20, 0)), // invalid command operation code
    }
}

/// Answers one SCSI Command PDU.
fn scsi_command(c: &mut Conn, req: &Pdu, mode: DataIn) -> io::Result<()> {
    c.exp_cmdsn = req.cmdsn().wrapping_add(1);
    let reads = req.bhs[1] & 0x40 != 0;
    let edtl = be32(&req.bhs, 20) as usize;
    match execute(&req.bhs[32..48]) {
        Ok(mut data) if reads && !data.is_empty() => {
            let segment = match mode {
                DataIn::Segments(n) => {
                    // SPC: the data is cut (or here, zero padded) to the
                    // allocation length; sending exactly what was expected
                    // needs no residual count.
                    data.resize(edtl, 0);
                    n
                }
                DataIn::OverLong(n) => {
                    data = (0..n as u64).map(pattern).collect();
                    n
                }
            };
            let count = data.len().div_ceil(segment);
            for (i, chunk) in data.chunks(segment).enumerate() {
                let last = i + 1 == count;
                // F and S (status, GOOD, in byte 3) on the last PDU only.
                let flags = if last { FINAL | 0x01 } else { 0 };
                let mut b = c.header(OP_DATA_IN, flags, req, last);
                put32(&mut b, 20, RESERVED_TAG); // no Data ACK wanted
                put32(&mut b, 36, i as u32); // DataSN
                put32(&mut b, 40, (i * segment) as u32); // buffer offset
                write_pdu(&mut c.s, b, chunk)?;
            }
            Ok(())
        }
        Ok(_) => {
            // Response 0 (completed at target), status GOOD.
            let b = c.header(OP_SCSI_RESP, FINAL, req, true);
            write_pdu(&mut c.s, b, &[])
        }
        Err((key, asc, ascq)) => {
            // Status CHECK CONDITION, with SenseLength and fixed-format
            // sense data as the data segment.
            let mut b = c.header(OP_SCSI_RESP, FINAL, req, true);
            b[3] = 0x02;
            let mut sense = vec![0, 18, 0x70, 0, key, 0, 0, 0, 0, 10];
            sense.extend_from_slice(&[0, 0, 0, 0, asc, ascq, 0, 0, 0, 0]);
            write_pdu(&mut c.s, b, &sense)
        }
    }
}

/// Serves one connection: login, then the full feature phase until the
/// initiator logs out or goes away. An error is the initiator breaking
/// the protocol (as this target sees it).
fn serve(s: TcpStream, mode: DataIn) -> Result<(), String> {
    let mut c = Conn {
        s,
        statsn: 0x1000, // any starting StatSN
        exp_cmdsn: 0,
    };
    login(&mut c)?;
    loop {
        let req = match read_pdu(&mut c.s) {
            Ok(p) => p,
            // The initiator dropped the connection (after our over-long
            // segment, it resets it).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e.to_string()),
        };
        let sent = match req.opcode() {
            OP_SCSI_CMD => scsi_command(&mut c, &req, mode),
            // A ping with a task tag wants an answer (the echo of its data).
            OP_NOP_OUT if req.itt() != RESERVED_TAG => {
                let mut b = c.header(OP_NOP_IN, FINAL, &req, true);
                b[8..16].copy_from_slice(&req.bhs[8..16]); // LUN
                put32(&mut b, 20, RESERVED_TAG);
                write_pdu(&mut c.s, b, &req.data)
            }
            OP_NOP_OUT => Ok(()),
            OP_LOGOUT_REQ => {
                // Response 0: connection or session closed successfully.
                let b = c.header(OP_LOGOUT_RESP, FINAL, &req, true);
                write_pdu(&mut c.s, b, &[]).map_err(|e| e.to_string())?;
                return Ok(());
            }
            op => return Err(format!("unexpected opcode {op:#04x}")),
        };
        if let Err(e) = sent {
            // Our writes fail only once the initiator has gone.
            return match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Ok(()),
                _ => Err(e.to_string()),
            };
        }
    }
}

/// The fake target: a listener on 127.0.0.1 and the thread accepting on it.
struct FakeTarget {
    port: u16,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<Vec<Result<(), String>>>>,
}

impl FakeTarget {
    fn start(mode: DataIn) -> FakeTarget {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Non-blocking, so that the acceptor notices `stop` (and its own
        // deadline) instead of waiting for a connection that never comes.
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (st, count) = (stop.clone(), connections.clone());
        let acceptor = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut handlers = Vec::new();
            while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((s, _)) => {
                        if count.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                            continue; // dropped: refused
                        }
                        s.set_nonblocking(false).unwrap();
                        // A handler outlives no initiator by more than this.
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        s.set_nodelay(true).unwrap();
                        handlers.push(std::thread::spawn(move || serve(s, mode)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            handlers
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("handler panicked".into())))
                .collect()
        });
        FakeTarget {
            port,
            stop,
            connections,
            acceptor: Some(acceptor),
        }
    }

    fn spec(&self) -> IscsiSpec {
        format!(
            "iscsi://127.0.0.1:{}/{TARGET_IQN}/0?max_recv_data_segment_length={DECLARED}",
            self.port
        )
        .parse()
        .unwrap()
    }

    /// Stops accepting, waits for every connection to end, and returns how
    /// many connections were made. Panics if the initiator broke the
    /// protocol on any of them.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let results = self.acceptor.take().unwrap().join().unwrap();
        for r in results {
            r.unwrap_or_else(|e| panic!("fake target: {e}"));
        }
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        // A test that failed before finish(): let the acceptor end.
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn options() -> IscsiOptions {
    IscsiOptions {
        reconnect_attempts: 1,
        reconnect_backoff: Duration::from_millis(10),
        login_timeout: Duration::from_secs(3),
        command_timeout: Duration::from_secs(3),
        header_digest: false,
        data_digest: false,
        ..Default::default()
    }
}

/// Opens the device on another thread, failing the test if that takes
/// longer than `limit` (the session must give up, not hang).
fn open_within(spec: &IscsiSpec, limit: Duration) -> Result<IscsiDevice, DeviceError> {
    let (tx, rx) = mpsc::channel();
    let spec = spec.clone();
    std::thread::spawn(move || {
        let _ = tx.send(IscsiDevice::open_with(&spec, false, 4, &options()));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("IscsiDevice::open did not return within {limit:?}"))
}

#[test]
fn over_long_data_in_segment_fails_open() {
    let target = FakeTarget::start(DataIn::OverLong(2 * DECLARED));
    let started = Instant::now();
    let Err(e) = open_within(&target.spec(), Duration::from_secs(30)) else {
        panic!("open succeeded although every Data-In segment was over-long");
    };
    let elapsed = started.elapsed();
    let want = format!(
        "a {}-byte data segment (opcode 0x25), over the MaxRecvDataSegmentLength of {DECLARED} \
         we declared",
        2 * DECLARED
    );
    let shown = e.to_string();
    assert!(shown.contains(&want), "{shown}");
    // The connection failed on the over-long segment; the session logged
    // in again and reissued the INQUIRY, which failed the same way, and
    // with its one reissue used up the command failed, carrying the last
    // connection error's text. The target answered every login, so this
    // is an open that failed, not a device that vanished.
    match iscsi_cause(&e) {
        Some(IscsiError::CommandKeptFailing { tries: 2, last }) => match &**last {
            IscsiError::Protocol(m) => assert!(want.contains(m.as_str()), "{m}"),
            other => panic!("the last failure is not typed as a protocol error: {other:?}"),
        },
        other => panic!("unexpected cause {other:?} of {shown}"),
    }
    assert_eq!(e.kind, ErrorKind::Open, "{shown}");
    assert_eq!(target.finish(), 2, "the first connection and one reconnect");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn data_in_segments_of_the_declared_size_are_read() {
    let target = FakeTarget::start(DataIn::Segments(DECLARED));
    let mut dev = open_within(&target.spec(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("open failed: {e}"));
    assert_eq!(
        dev.negotiated().initiator_max_recv_data_segment_length as usize,
        DECLARED
    );
    let info = dev.lun_info();
    assert_eq!((info.block_size, info.blocks), (BLOCK_SIZE as u32, BLOCKS));
    // 16 KiB: four Data-In PDUs of exactly the declared length.
    let (offset, len) = (4096u64, 4 * DECLARED);
    dev.submit(
        7,
        IoOp::Read {
            offset,
            len,
            buf: AlignedBuf::new(len),
        },
    )
    .unwrap();
    let mut out = Vec::new();
    dev.reap(1, &mut out).unwrap();
    let c = out.pop().unwrap();
    assert_eq!(c.tag, 7);
    assert_eq!(c.result.unwrap(), len as u64);
    let Returned::Read(buf) = c.buf else {
        panic!("a read returns its buffer")
    };
    let want: Vec<u8> = (offset..offset + len as u64).map(pattern).collect();
    assert!(buf.as_slice()[..len] == want[..], "read data differs");
    assert_eq!(dev.stats().max_data_in_segment as usize, DECLARED);
    assert_eq!(dev.stats().reconnects, 0);
    drop(dev); // logs out
    assert_eq!(target.finish(), 1);
}
