//! Target names: one IQN per volume or snapshot (see the module doc of
//! `tgt`).

use crate::ExportTarget;

/// Longest iSCSI name (RFC 7143: 223 bytes).
pub(super) const MAX_IQN_LEN: usize = 223;

/// Spells a pool name or id in IQN characters: `[a-z0-9-]` as is, any other
/// byte as `.` and two lowercase hex digits (one to one).
pub(crate) fn iqn_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!(".{b:02x}"));
        }
    }
    out
}

/// FNV-1a, 128 bits: for ids too long to spell out in a target name.
pub(crate) fn fnv1a128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    data.iter()
        .fold(OFFSET, |h, &b| (h ^ b as u128).wrapping_mul(PRIME))
}

/// The target name of a volume or snapshot (see the module doc).
pub(crate) fn target_iqn(prefix: &str, pool: &str, target: &ExportTarget) -> String {
    let (kind, id) = match target {
        ExportTarget::Volume(id) => ("", id),
        ExportTarget::Snapshot(id) => ("snap:", id),
    };
    let base = format!("{prefix}:{}:{kind}", iqn_component(pool));
    let spelled = format!("{base}{}", iqn_component(id));
    if spelled.len() <= MAX_IQN_LEN {
        spelled
    } else {
        format!("{base}h:{:032x}", fnv1a128(id.as_bytes()))
    }
}
