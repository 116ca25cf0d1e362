//! SCSI commands (SBC-3/SPC-4) the initiator sends, the data they return,
//! and sense data decoding.

use std::fmt;

/// A CDB padded to 16 bytes, with its real length.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cdb {
    pub bytes: [u8; 16],
    pub len: u8,
}

impl fmt::Debug for Cdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cdb({:02x?})", &self.bytes[..self.len as usize])
    }
}

impl Cdb {
    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }
}

fn cdb16(op: u8, b1: u8, lba: u64, count: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = b1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&count.to_be_bytes());
    Cdb { bytes: c, len: 16 }
}

pub const TEST_UNIT_READY: u8 = 0x00;
pub const INQUIRY: u8 = 0x12;
pub const UNMAP: u8 = 0x42;
pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8a;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
const SA_READ_CAPACITY_16: u8 = 0x10;
const SA_GET_LBA_STATUS: u8 = 0x12;

pub fn read16(lba: u64, blocks: u32) -> Cdb {
    cdb16(READ_16, 0, lba, blocks)
}

pub fn write16(lba: u64, blocks: u32) -> Cdb {
    cdb16(WRITE_16, 0, lba, blocks)
}

/// SYNCHRONIZE CACHE(16) of the whole device.
pub fn synchronize_cache16() -> Cdb {
    cdb16(SYNCHRONIZE_CACHE_16, 0, 0, 0)
}

/// WRITE SAME(16) of one block of data-out over `blocks` blocks; `unmap`
/// lets the device deallocate them instead of writing.
pub fn write_same16(lba: u64, blocks: u32, unmap: bool) -> Cdb {
    cdb16(WRITE_SAME_16, if unmap { 0x08 } else { 0 }, lba, blocks)
}

/// READ CAPACITY(16), 32 bytes of answer.
pub fn read_capacity16() -> Cdb {
    let mut c = cdb16(SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 0, 32);
    c.bytes[2..10].fill(0);
    c
}

/// GET LBA STATUS(16) from `lba`, at most `alloc` bytes of answer.
pub fn get_lba_status16(lba: u64, alloc: u32) -> Cdb {
    cdb16(SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, lba, alloc)
}

pub fn test_unit_ready() -> Cdb {
    let mut bytes = [0; 16];
    bytes[0] = TEST_UNIT_READY;
    Cdb { bytes, len: 6 }
}

/// INQUIRY; with `page`, the given vital product data page.
pub fn inquiry(page: Option<u8>, alloc: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = INQUIRY;
    if let Some(p) = page {
        c[1] = 1;
        c[2] = p;
    }
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    Cdb { bytes: c, len: 6 }
}

/// UNMAP with a parameter list of `param_len` bytes.
pub fn unmap(param_len: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = UNMAP;
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    Cdb { bytes: c, len: 10 }
}

/// The UNMAP parameter list for one range per descriptor.
pub fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let desc_len = 16 * ranges.len();
    let mut p = vec![0u8; 8 + desc_len];
    p[0..2].copy_from_slice(&((6 + desc_len) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&(desc_len as u16).to_be_bytes());
    for (i, (lba, n)) in ranges.iter().enumerate() {
        let d = &mut p[8 + 16 * i..8 + 16 * (i + 1)];
        d[0..8].copy_from_slice(&lba.to_be_bytes());
        d[8..12].copy_from_slice(&n.to_be_bytes());
    }
    p
}

fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
}

fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

/// READ CAPACITY(16) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub last_lba: u64,
    pub block_size: u32,
    /// Logical block provisioning management enabled (thin provisioned).
    pub lbpme: bool,
    /// Unmapped blocks read as zeroes.
    pub lbprz: bool,
}

impl Capacity {
    pub fn parse(d: &[u8]) -> Option<Self> {
        if d.len() < 15 {
            return None;
        }
        Some(Capacity {
            last_lba: be64(d, 0),
            block_size: be32(d, 8),
            lbpme: d[14] & 0x80 != 0,
            lbprz: d[14] & 0x40 != 0,
        })
    }
}

/// Block Limits VPD page (0xB0); zero means "not reported".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transfer_length: u32,
    pub max_unmap_lba_count: u32,
    pub max_unmap_descriptors: u32,
    pub optimal_unmap_granularity: u32,
    pub max_write_same_length: u64,
}

impl BlockLimits {
    pub fn parse(d: &[u8]) -> Option<Self> {
        if d.len() < 16 || d[1] != 0xb0 {
            return None;
        }
        Some(BlockLimits {
            max_transfer_length: be32(d, 8),
            max_unmap_lba_count: be32(d, 20),
            max_unmap_descriptors: be32(d, 24),
            optimal_unmap_granularity: be32(d, 28),
            max_write_same_length: be64(d, 36),
        })
    }
}

/// Logical Block Provisioning VPD page (0xB2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// UNMAP supported.
    pub lbpu: bool,
    /// WRITE SAME(16) with the UNMAP bit supported.
    pub lbpws: bool,
    /// Unmapped blocks read as zeroes (the LBPRZ field is non-zero).
    pub lbprz: bool,
}

impl Provisioning {
    pub fn parse(d: &[u8]) -> Option<Self> {
        if d.len() < 6 || d[1] != 0xb2 {
            return None;
        }
        Some(Provisioning {
            lbpu: d[5] & 0x80 != 0,
            lbpws: d[5] & 0x40 != 0,
            lbprz: d[5] & 0x1c != 0,
        })
    }
}

/// The page codes listed in the Supported VPD Pages page (0x00).
pub fn supported_vpd_pages(d: &[u8]) -> Vec<u8> {
    if d.len() < 4 || d[1] != 0 {
        return Vec::new();
    }
    let n = u16::from_be_bytes([d[2], d[3]]) as usize;
    d[4..(4 + n).min(d.len())].to_vec()
}

/// One GET LBA STATUS descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaStatus {
    pub lba: u64,
    pub blocks: u32,
    /// Mapped (holds data); otherwise deallocated or anchored.
    pub mapped: bool,
}

/// The descriptors of GET LBA STATUS data.
pub fn parse_lba_status(d: &[u8]) -> Vec<LbaStatus> {
    if d.len() < 8 {
        return Vec::new();
    }
    let total = (be32(d, 0) as usize + 4).min(d.len());
    d[8..total]
        .chunks_exact(16)
        .map(|c| LbaStatus {
            lba: be64(c, 0),
            blocks: be32(c, 8),
            mapped: c[12] & 0x0f == 0,
        })
        .collect()
}

/// SCSI status codes.
pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_BUSY: u8 = 0x08;
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;

pub fn status_name(s: u8) -> &'static str {
    match s {
        STATUS_GOOD => "GOOD",
        STATUS_CHECK_CONDITION => "CHECK CONDITION",
        0x04 => "CONDITION MET",
        STATUS_BUSY => "BUSY",
        STATUS_RESERVATION_CONFLICT => "RESERVATION CONFLICT",
        STATUS_TASK_SET_FULL => "TASK SET FULL",
        0x30 => "ACA ACTIVE",
        0x40 => "TASK ABORTED",
        _ => "unknown status",
    }
}

/// Sense keys.
pub const KEY_NOT_READY: u8 = 0x2;
pub const KEY_MEDIUM_ERROR: u8 = 0x3;
pub const KEY_ILLEGAL_REQUEST: u8 = 0x5;
pub const KEY_UNIT_ATTENTION: u8 = 0x6;
pub const KEY_DATA_PROTECT: u8 = 0x7;

/// Decoded sense data (fixed or descriptor format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub fn parse(d: &[u8]) -> Option<Sense> {
        let code = d.first()? & 0x7f;
        match code {
            0x70 | 0x71 if d.len() >= 14 => Some(Sense {
                key: d[2] & 0x0f,
                asc: d[12],
                ascq: d[13],
            }),
            0x70 | 0x71 if d.len() >= 3 => Some(Sense {
                key: d[2] & 0x0f,
                asc: 0,
                ascq: 0,
            }),
            0x72 | 0x73 if d.len() >= 4 => Some(Sense {
                key: d[1] & 0x0f,
                asc: d[2],
                ascq: d[3],
            }),
            _ => None,
        }
    }

    pub fn key_name(&self) -> &'static str {
        match self.key {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            KEY_NOT_READY => "NOT READY",
            KEY_MEDIUM_ERROR => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            KEY_ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            KEY_UNIT_ATTENTION => "UNIT ATTENTION",
            KEY_DATA_PROTECT => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            0xb => "ABORTED COMMAND",
            0xd => "VOLUME OVERFLOW",
            0xe => "MISCOMPARE",
            _ => "reserved sense key",
        }
    }

    /// Readable text for the additional sense code, for the common ones.
    pub fn asc_text(&self) -> &'static str {
        match (self.asc, self.ascq) {
            (0x00, 0x00) => "no additional sense information",
            (0x04, 0x00) => "logical unit not ready, cause not reportable",
            (0x04, 0x01) => "logical unit is in process of becoming ready",
            (0x04, 0x02) => "logical unit not ready, initializing command required",
            (0x04, 0x03) => "logical unit not ready, manual intervention required",
            (0x04, _) => "logical unit not ready",
            (0x0c, _) => "write error",
            (0x11, _) => "unrecovered read error",
            (0x1a, 0x00) => "parameter list length error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, _) => "invalid field in parameter list",
            (0x27, _) => "write protected",
            (0x28, 0x00) => "not ready to ready change, medium may have changed",
            (0x29, _) => "power on, reset, or bus device reset occurred",
            (0x2a, 0x01) => "mode parameters changed",
            (0x2a, 0x09) => "capacity data has changed",
            (0x2a, _) => "parameters changed",
            (0x3a, _) => "medium not present",
            (0x3f, 0x0e) => "reported LUNs data has changed",
            (0x3f, _) => "target operating conditions have changed",
            (0x44, _) => "internal target failure",
            (0x55, _) => "system resource failure",
            _ => "unknown additional sense code",
        }
    }

    /// The logical unit is gone (LUN deleted, medium removed).
    pub fn means_vanished(&self) -> bool {
        (self.key == KEY_ILLEGAL_REQUEST && self.asc == 0x25)
            || (self.key == KEY_NOT_READY && self.asc == 0x3a)
    }

    /// The command or field is not supported.
    pub fn means_unsupported(&self) -> bool {
        self.key == KEY_ILLEGAL_REQUEST && matches!(self.asc, 0x20 | 0x24 | 0x26)
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:#04x}/{:#04x}: {})",
            self.key_name(),
            self.asc,
            self.ascq,
            self.asc_text()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdb_encodings() {
        let c = read16(0x0102_0304_0506_0708, 0x10);
        assert_eq!(c.len, 16);
        assert_eq!(
            c.bytes,
            [0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0x10, 0, 0]
        );
        assert_eq!(
            write16(1, 2).bytes[..14],
            [0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
        );
        let ws = write_same16(8, 16, true);
        assert_eq!(
            (ws.bytes[0], ws.bytes[1], ws.bytes[9], ws.bytes[13]),
            (0x93, 0x08, 8, 16)
        );
        assert_eq!(write_same16(8, 16, false).bytes[1], 0);
        let rc = read_capacity16();
        assert_eq!(
            rc.bytes[..14],
            [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32]
        );
        let gls = get_lba_status16(0x20, 4096);
        assert_eq!(
            gls.bytes[..14],
            [0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0x10, 0]
        );
        let inq = inquiry(Some(0xb0), 64);
        assert_eq!(
            (inq.len, &inq.bytes[..6]),
            (6, &[0x12, 1, 0xb0, 0, 64, 0][..])
        );
        assert_eq!(inquiry(None, 96).bytes[..6], [0x12, 0, 0, 0, 96, 0]);
        assert_eq!(test_unit_ready().len, 6);
        assert_eq!(synchronize_cache16().bytes[0], 0x91);
        let u = unmap(24);
        assert_eq!(
            (u.len, u.bytes[0], u.bytes[7], u.bytes[8]),
            (10, 0x42, 0, 24)
        );
        let p = unmap_params(&[(0x10, 8)]);
        assert_eq!(p.len(), 24);
        assert_eq!(&p[..4], &[0, 22, 0, 16]);
        assert_eq!(p[15], 0x10);
        assert_eq!(&p[16..20], &[0, 0, 0, 8]);
    }

    #[test]
    fn parses_capacity_and_vpd() {
        let mut d = [0u8; 32];
        d[7] = 0xff; // last LBA 255
        d[10] = 0x02; // 512-byte blocks
        d[14] = 0xc0;
        let c = Capacity::parse(&d).unwrap();
        assert_eq!(
            (c.last_lba, c.block_size, c.lbpme, c.lbprz),
            (255, 512, true, true)
        );
        let mut b0 = [0u8; 64];
        b0[1] = 0xb0;
        b0[23] = 0x80; // max unmap LBA count 128
        b0[27] = 4;
        b0[43] = 0x40; // max write same 64
        let l = BlockLimits::parse(&b0).unwrap();
        assert_eq!(
            (
                l.max_unmap_lba_count,
                l.max_unmap_descriptors,
                l.max_write_same_length
            ),
            (128, 4, 64)
        );
        let mut b2 = [0u8; 8];
        b2[1] = 0xb2;
        b2[5] = 0x80 | 0x04;
        let p = Provisioning::parse(&b2).unwrap();
        assert!(p.lbpu && !p.lbpws && p.lbprz);
        assert!(Provisioning::parse(&b0).is_none());
        assert_eq!(
            supported_vpd_pages(&[0, 0, 0, 3, 0, 0xb0, 0xb2]),
            vec![0, 0xb0, 0xb2]
        );
    }

    #[test]
    fn parses_lba_status() {
        let mut d = vec![0u8; 8 + 32];
        d[3] = 36;
        d[8 + 7] = 0; // LBA 0, 8 blocks mapped
        d[8 + 11] = 8;
        d[24 + 7] = 8; // LBA 8, 100 blocks deallocated
        d[24 + 11] = 100;
        d[24 + 12] = 1;
        let s = parse_lba_status(&d);
        assert_eq!(
            s,
            vec![
                LbaStatus {
                    lba: 0,
                    blocks: 8,
                    mapped: true
                },
                LbaStatus {
                    lba: 8,
                    blocks: 100,
                    mapped: false
                }
            ]
        );
    }

    #[test]
    fn sense_decoding() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x05;
        fixed[7] = 10;
        fixed[12] = 0x25;
        let s = Sense::parse(&fixed).unwrap();
        assert_eq!((s.key, s.asc, s.ascq), (5, 0x25, 0));
        assert!(s.means_vanished());
        assert_eq!(
            s.to_string(),
            "ILLEGAL REQUEST (0x25/0x00: logical unit not supported)"
        );
        let desc = [0x72, 0x06, 0x29, 0x01, 0, 0, 0, 0];
        let s = Sense::parse(&desc).unwrap();
        assert_eq!(s.key, KEY_UNIT_ATTENTION);
        assert!(s.asc_text().contains("power on"));
        let t = |asc, ascq| Sense { key: 5, asc, ascq }.asc_text();
        assert_eq!(t(0x3f, 0x0e), "reported LUNs data has changed");
        assert_eq!(t(0x21, 0x00), "logical block address out of range");
        assert_eq!(t(0x20, 0x00), "invalid command operation code");
        assert_eq!(t(0x24, 0x00), "invalid field in CDB");
        assert!(Sense {
            key: 5,
            asc: 0x20,
            ascq: 0
        }
        .means_unsupported());
        assert!(Sense::parse(&[0x00, 1, 2]).is_none());
        assert!(Sense::parse(&[]).is_none());
    }
}
