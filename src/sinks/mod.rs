//! The destinations. Each sink is one module; all implement [`Sink`].

pub mod clickhouse;
pub mod http;
pub mod redis;
pub mod stdout;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::enrich::EnrichedEvent;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A destination of enriched events.
///
/// The contract every implementation keeps:
/// - Events arrive in stream order, one group at a time (one or more batches, coalesced
///   when the sink fell behind).
/// - `deliver` returns `Ok` only when every effect of the events is durable in the
///   destination; the checkpoint moves past a batch only after every sink said `Ok`.
/// - Delivery is at least once: after a crash or reconnect the same events (same
///   `event_id`, same values) arrive again, so a sink must make a repeat harmless.
/// - Transient failures (the destination is down, slow, overloaded) are retried inside
///   `deliver` with [`Backoff`] until they succeed; that holds the pipeline and so bounds
///   memory. `Err` means a permanent failure (a schema mismatch, a rejected credential):
///   the engine stops with the checkpoint held.
pub trait Sink: Send {
    fn name(&self) -> &'static str;

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    /// How long to gather events before a write that is smaller than a full batch, counted
    /// from the previous write. A destination that pays per write (ClickHouse makes a part
    /// per INSERT) trades this much latency for fewer, larger writes; the default is none.
    fn linger(&self) -> Duration {
        Duration::ZERO
    }

    /// The most events one write may take when batches are waiting (the pipeline's budget
    /// bounds it too). Default: one full batch.
    fn write_limit(&self, max_batch_rows: usize) -> usize {
        max_batch_rows
    }

    /// Called about once a second while no batch arrives (periodic upkeep).
    fn idle(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Exponential backoff with jitter: the timing of retries. Whether to retry is decided
/// at the call site.
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

    /// The next delay: `initial × 2^attempt`, capped, then jittered into `[d/2, d]`.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(20));
        let capped = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = capped / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
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
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
