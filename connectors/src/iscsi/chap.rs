//! CHAP with MD5 (RFC 1994, as used by iSCSI: RFC 7143 section 12.1.3).
//!
//! The response to a challenge is `MD5(identifier || secret || challenge)`.
//! Binary values travel as hex (`0x...`) or base64 (`0b...`) strings.

use md5::{Digest, Md5};

/// CHAP_A value for MD5.
pub const ALGORITHM_MD5: &str = "5";

/// `MD5(id || secret || challenge)`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// `0x` followed by lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes a binary text value: `0x`/`0X` hex or `0b`/`0B` base64.
pub fn decode_binary(s: &str) -> Option<Vec<u8>> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        // An odd number of digits has an implied leading zero.
        let owned;
        let h = if h.len() % 2 == 1 {
            owned = format!("0{h}");
            owned.as_str()
        } else {
            h
        };
        return (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect();
    }
    if let Some(b) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        return decode_base64(b);
    }
    None
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_vectors() {
        // RFC 1321 test suite: MD5("abc").
        let mut h = Md5::new();
        h.update(b"abc");
        let d: [u8; 16] = h.finalize().into();
        assert_eq!(encode_hex(&d), "0x900150983cd24fb0d6963f7d28e17f72");
        // CHAP: id 0x2a, secret "secretsecret", challenge 00..0f, computed
        // independently with Python's hashlib.
        let challenge: Vec<u8> = (0..16).collect();
        let r = response(0x2a, b"secretsecret", &challenge);
        assert_eq!(encode_hex(&r), "0x54d49338a27b0c1dd5e935c21ab005a3");
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("12"), None);
    }
}
