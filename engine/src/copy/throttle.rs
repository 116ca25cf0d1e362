//! Bandwidth limit: a request of n bytes may start once the bytes started
//! so far, n included, fit the rate since the start. No burst credit is
//! kept, so a copy of N bytes takes at least N / rate.

use std::time::{Duration, Instant};

pub struct Throttle {
    rate: u64,
    start: Instant,
    granted: u64,
}

impl Throttle {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            rate: bytes_per_second.max(1),
            start: Instant::now(),
            granted: 0,
        }
    }

    /// How long until `n` more bytes may start (zero: now). Callers with
    /// requests in flight handle completions meanwhile instead of sleeping.
    pub fn delay(&self, n: u64) -> Duration {
        let due = Duration::from_secs_f64((self.granted + n) as f64 / self.rate as f64);
        due.saturating_sub(self.start.elapsed())
    }

    /// Counts `n` bytes as started.
    pub fn take(&mut self, n: u64) {
        self.granted += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate() {
        let mut t = Throttle::new(10 << 20);
        let start = Instant::now();
        for _ in 0..4 {
            std::thread::sleep(t.delay(1 << 20));
            t.take(1 << 20);
        }
        let e = start.elapsed().as_secs_f64();
        assert!((0.39..0.6).contains(&e), "4 MiB at 10 MiB/s took {e}s");
    }
}
