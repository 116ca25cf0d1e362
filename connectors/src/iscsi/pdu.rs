//! The 48-byte Basic Header Segment (RFC 7143 section 11.2) and the few
//! helpers every PDU needs: opcodes, field offsets, LUN encoding, padding
//! and serial-number arithmetic (RFC 1982, 32 bits).

/// Length of a Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved task tag: "no task" (target NOP-In pings, unsolicited PDUs).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT_REQ: u8 = 0x06;
/// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_TASK_MGMT_RESP: u8 = 0x22;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

/// Immediate-delivery bit in byte 0 of initiator PDUs.
pub const IMMEDIATE: u8 = 0x40;
/// Final bit in byte 1.
pub const FINAL: u8 = 0x80;

/// Byte offsets of the 32-bit fields shared by most PDUs.
pub const OFF_ITT: usize = 16;
pub const OFF_TTT: usize = 20;
/// CmdSN (initiator PDUs) or StatSN (target PDUs).
pub const OFF_SN: usize = 24;
/// ExpStatSN (initiator PDUs) or ExpCmdSN (target PDUs).
pub const OFF_EXP_SN: usize = 28;
pub const OFF_MAX_CMDSN: usize = 32;
/// DataSN / R2TSN / ExpDataSN.
pub const OFF_DATASN: usize = 36;
pub const OFF_BUFFER_OFFSET: usize = 40;
/// Residual count (SCSI Response, Data-In) or desired length (R2T).
pub const OFF_RESIDUAL: usize = 44;
/// Expected data transfer length of a SCSI Command.
pub const OFF_EDTL: usize = 20;

/// One Basic Header Segment, kept as its wire bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs(op={:#04x} flags={:#04x} itt={:#x} dsl={})",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

impl Bhs {
    /// A zeroed header with the opcode set (and the immediate bit if asked).
    pub fn new(opcode: u8, immediate: bool) -> Self {
        let mut b = Bhs::default();
        b.0[0] = opcode | if immediate { IMMEDIATE } else { 0 };
        b
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }

    pub fn byte(&self, i: usize) -> u8 {
        self.0[i]
    }

    /// Total AHS length in bytes.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }

    /// Data segment length in bytes (without padding or digest).
    pub fn data_len(&self) -> usize {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]]) as usize
    }

    pub fn set_data_len(&mut self, n: usize) {
        debug_assert!(n < 1 << 24);
        let b = (n as u32).to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..]);
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }

    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.0[off..off + 8].try_into().expect("8 bytes"))
    }

    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    pub fn itt(&self) -> u32 {
        self.u32_at(OFF_ITT)
    }

    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(OFF_ITT, v)
    }

    /// The 8-byte LUN field (bytes 8..16).
    pub fn lun_field(&self) -> u64 {
        self.u64_at(8)
    }

    pub fn set_lun_field(&mut self, v: u64) {
        self.set_u64(8, v)
    }
}

/// The 8-byte LUN field for a LUN number (SAM: peripheral addressing below
/// 256, flat addressing up to 16383).
pub fn encode_lun(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

/// Bytes of padding after a data segment of `n` bytes.
pub fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// `a < b` in 32-bit serial arithmetic.
pub fn sn_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a <= b` in 32-bit serial arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// CRC32C as iSCSI uses it for digests: over the bytes, stored little endian
/// on the wire (RFC 7143 section 13.1 and appendix B.4).
pub fn digest(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut b = Bhs::new(OP_SCSI_CMD, false);
        b.set_flags(FINAL | 0x40 | 1);
        b.set_data_len(0x012345);
        b.set_lun_field(encode_lun(3));
        b.set_itt(0xdead_beef);
        b.set_u32(OFF_EDTL, 65536);
        b.set_u32(OFF_SN, 7);
        b.set_u32(OFF_EXP_SN, 9);
        let bytes = b.0;
        assert_eq!(bytes[0], 0x01);
        assert_eq!(bytes[1], 0xc1);
        assert_eq!(&bytes[5..8], &[0x01, 0x23, 0x45]);
        assert_eq!(&bytes[8..10], &[0x00, 0x03]);
        assert_eq!(&bytes[16..20], &[0xde, 0xad, 0xbe, 0xef]);
        let c = Bhs(bytes);
        assert_eq!(c, b);
        assert_eq!(c.opcode(), OP_SCSI_CMD);
        assert_eq!(c.byte(0) & IMMEDIATE, 0);
        assert_eq!(c.data_len(), 0x012345);
        assert_eq!(c.itt(), 0xdead_beef);
        assert_eq!(c.u32_at(OFF_EDTL), 65536);
        assert_eq!(c.u32_at(OFF_SN), 7);
        assert_eq!(c.u32_at(OFF_EXP_SN), 9);
        let n = Bhs::new(OP_NOP_OUT, true);
        assert_eq!(n.0[0], 0x40);
        assert_eq!(n.opcode(), OP_NOP_OUT);
    }

    #[test]
    fn lun_encoding() {
        assert_eq!(encode_lun(0).to_be_bytes(), [0; 8]);
        assert_eq!(encode_lun(1).to_be_bytes(), [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            encode_lun(300).to_be_bytes(),
            [0x41, 0x2c, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fff0, 5));
        assert!(!sn_lt(5, 0xffff_fff0));
        assert!(sn_le(7, 7));
        assert_eq!(pad4(0), 0);
        assert_eq!(pad4(5), 3);
        assert_eq!(pad4(8), 0);
    }

    #[test]
    fn crc32c_check_value() {
        // The standard CRC-32C check value, and the iSCSI example of 32
        // zero bytes (RFC 3720 B.4: aa 36 91 8a on the wire).
        assert_eq!(digest(&[b"123456789"]), 0xe306_9283);
        assert_eq!(
            digest(&[&[0u8; 32]]).to_le_bytes(),
            [0xaa, 0x36, 0x91, 0x8a]
        );
        assert_eq!(digest(&[b"1234", b"56789"]), 0xe306_9283);
    }
}
