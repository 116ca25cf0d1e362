//! Sizes and rates as operators type them: `1M`, `512KiB`, `2G`, `100M`
//! (binary multiples: K = 1024).

use parse_size::Config;

pub fn parse_bytes(s: &str) -> Result<u64, String> {
    Config::new()
        .with_binary()
        .parse_size(s.trim().trim_end_matches("/s"))
        .map_err(|e| format!("'{s}' is not a size ({e}); examples: 4096, 64K, 1M, 2GiB"))
}

/// Human form with binary units, e.g. "1.50 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_sizes_and_rates() {
        assert_eq!(parse_bytes("1M").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("16M/s").unwrap(), 16 << 20);
        assert!(parse_bytes("lots")
            .unwrap_err()
            .contains("'lots' is not a size"));
        assert_eq!(human(1536 << 20), "1.50 GiB");
        assert_eq!(human(12), "12 B");
    }
}
