//! A token bucket, for per-connection command rates.

use std::time::Duration;

use tokio::time::Instant;

/// Allows `rate` commands per second on average and bursts of `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token at `now`; false when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` more tokens at `now` (at most a burst), running into debt when the
    /// bucket holds fewer: for a command that costs more than one, once [`Self::take`]
    /// let it through. It is never refused for its cost; the commands after it wait
    /// until the debt is paid.
    pub fn charge(&mut self, now: Instant, n: u32) {
        self.refill(now);
        self.tokens -= f64::from(n).min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        self.at = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
    }

    /// How long until a token is available.
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }

    /// Whether the bucket has refilled whole by `now`: it holds nothing a new one would
    /// not, and may be forgotten.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        assert!(!b.is_full(t0 + Duration::from_millis(399)));
        assert!(b.is_full(t0 + Duration::from_millis(400)));
    }

    /// A costly command is charged its cost, as debt beyond what the bucket holds (at
    /// most a burst): the commands after it wait until the debt is paid.
    #[test]
    fn a_costly_command_is_charged_as_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5);
        assert!(b.take(t0));
        b.charge(t0, 50);
        assert!(!b.take(t0), "in debt: 4 - 5 tokens");
        // Paying the debt takes 0.1 s, and a token 0.1 s more.
        assert!(!b.take(t0 + Duration::from_millis(190)));
        assert!(b.take(t0 + Duration::from_millis(210)));
    }
}
