//! The per-connection command rate limit: a token bucket, and a gate that
//! turns its answers into what the connection does with a frame.

use std::time::Instant;

pub struct TokenBucket {
    capacity: f64,
    refill_per_second: f64,
    tokens: f64,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens that refills at `per_second`.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            capacity,
            refill_per_second: f64::from(per_second),
            tokens: capacity,
            last_refill: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill_per_second).min(self.capacity);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do with one incoming frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Serve,
    /// Answer with a `rate_limited` error and do not serve.
    Refuse,
    /// The client kept going past the limit: disconnect it.
    Disconnect,
}

/// Every frame a client sends, valid or not, passes this gate first, so that
/// garbage cannot be sent faster than commands.
pub struct CommandGate {
    bucket: TokenBucket,
    /// Frames refused in a row; reset by any frame that is served.
    strikes: u32,
    max_strikes: u32,
}

impl CommandGate {
    /// `burst` is also the number of refusals in a row that disconnects.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        CommandGate {
            bucket: TokenBucket::new(per_second, burst, now),
            strikes: 0,
            max_strikes: burst.max(1),
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.bucket.try_take(now) {
            self.strikes = 0;
            return Verdict::Serve;
        }
        self.strikes += 1;
        if self.strikes >= self.max_strikes {
            Verdict::Disconnect
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, start);
        assert!((0..3).all(|_| bucket.try_take(start)));
        assert!(!bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_millis(100)));
        assert!(!bucket.try_take(start + Duration::from_millis(100)));
        let much_later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.try_take(much_later)), "refills up to the burst");
        assert!(!bucket.try_take(much_later));
    }

    #[test]
    fn the_gate_refuses_then_disconnects() {
        let start = Instant::now();
        let mut gate = CommandGate::new(1, 3, start);
        let verdicts: Vec<Verdict> = (0..6).map(|_| gate.check(start)).collect();
        use Verdict::*;
        assert_eq!(verdicts, [Serve, Serve, Serve, Refuse, Refuse, Disconnect]);
        let mut gate = CommandGate::new(1, 2, start);
        assert_eq!(
            [gate.check(start), gate.check(start), gate.check(start)],
            [Serve, Serve, Refuse]
        );
        let later = start + Duration::from_secs(1);
        assert_eq!(gate.check(later), Serve, "a served frame resets the strikes");
        assert_eq!(gate.check(later), Refuse);
    }
}
