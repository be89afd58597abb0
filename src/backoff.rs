//! Exponential backoff with jitter, for every loop that retries: the sinks' retry policy
//! (`sinks/retry.rs`), the replication reconnect loop (`commands/run.rs`), the servers'
//! accept loop (`ops/http.rs`). A leaf module, so all three can use it.

use std::time::Duration;

/// Exponential backoff with jitter: `initial × 2^attempt`, capped at `max`, then jittered
/// into `[d/2, d]` so that many clients do not retry in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(20));
        let capped = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = capped / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        for x in &d[5..] {
            assert!(
                *x >= Duration::from_secs(1) && *x <= Duration::from_secs(2),
                "{x:?}"
            );
        }
        assert_eq!(b.attempt, 8);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
