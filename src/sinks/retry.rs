//! The one retry policy of every sink: *when* to try again (exponential backoff with
//! jitter, `Retry-After` honoured, an optional attempt limit), with the same metric and log
//! line for each retry. *Whether* to try again is the sink's answer: each sink classifies
//! its destination's errors into a [`SinkError`] (transient or permanent) once, in its own
//! module.

use std::future::Future;
use std::time::Duration;

use super::SinkError;
use crate::backoff::Backoff;
use crate::ops::metrics::Metrics;

/// How a sink retries transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_delay: Duration,
    /// Retries after the first attempt; `None`: until it succeeds (the pipeline is held,
    /// which bounds memory, and the checkpoint does not move).
    pub max_retries: Option<u32>,
    /// The longest wait a `Retry-After` may ask for.
    pub max_retry_after: Duration,
    /// Retries numbered below this log at debug level, later ones as warnings: an API that
    /// refuses one request in three is normal, a database that is down is not.
    pub quiet_retries: u32,
}

impl RetryPolicy {
    /// Retry until it succeeds, warning at every retry: a destination that must hold the
    /// checkpoint while it is away (ClickHouse, Redis).
    pub fn until_success() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_retries: None,
            max_retry_after: Duration::from_secs(60),
            quiet_retries: 0,
        }
    }

    /// At most `max_retries` retries, the quiet ones at debug level.
    pub fn limited(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_delay: Duration::from_secs(10),
            max_retries: Some(max_retries),
            quiet_retries: max_retries.saturating_add(1),
            ..RetryPolicy::until_success()
        }
    }

    /// Run `attempt` until it succeeds, fails permanently or the retries are spent. Every
    /// retry is counted in `engagement_cdc_sink_retries_total{sink}` and logged with the
    /// sink, what was being done, the attempt and the delay.
    pub async fn run<T, F, Fut>(
        &self,
        sink: &'static str,
        what: &(dyn Fn() -> String + Sync),
        metrics: Option<&Metrics>,
        mut attempt: F,
    ) -> Result<T, Exhausted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SinkError>>,
    {
        let mut backoff = Backoff::new(self.initial, self.max_delay);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match attempt().await {
                Ok(v) => {
                    if let Some(m) = metrics {
                        m.health.ok(sink);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let give_up = match &error {
                SinkError::Permanent { .. } => true,
                SinkError::Transient { .. } => self.max_retries.is_some_and(|max| attempts > max),
            };
            if let Some(m) = metrics {
                m.health
                    .failing(sink, &format!("{}: {error}", what()), give_up);
            }
            if give_up {
                return Err(Exhausted { error, attempts });
            }
            let retry_after = match &error {
                SinkError::Transient { retry_after, .. } => *retry_after,
                SinkError::Permanent { .. } => None,
            };
            if let Some(m) = metrics {
                m.sink_retry(sink);
            }
            let delay = retry_after
                .map(|d| d.min(self.max_retry_after))
                .unwrap_or_else(|| backoff.next_delay());
            if attempts < self.quiet_retries {
                tracing::debug!(
                    sink,
                    attempt = attempts,
                    ?delay,
                    "{}: {error}; retrying",
                    what()
                );
            } else {
                tracing::warn!(
                    sink,
                    attempt = attempts,
                    ?delay,
                    "{}: {error}; retrying",
                    what()
                );
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// The last error of an attempt that will not be retried, and how many attempts were made.
#[derive(Debug)]
pub struct Exhausted {
    pub error: SinkError,
    pub attempts: u32,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (after {} attempts)", self.error, self.attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient(after: Option<Duration>) -> SinkError {
        SinkError::Transient {
            message: "down".into(),
            status: Some(503),
            retry_after: after,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_up_to_the_limit_then_reports_attempts() {
        let calls = AtomicU32::new(0);
        let metrics = Metrics::default();
        let out: Result<(), Exhausted> = RetryPolicy::limited(3)
            .run("test", &|| "sending".into(), Some(&metrics), || {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(transient(None)) }
            })
            .await;
        let e = out.unwrap_err();
        assert_eq!(e.attempts, 4);
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert_eq!(metrics.sink_retries("test"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let out: Result<(), Exhausted> = RetryPolicy::until_success()
            .run("test", &|| "x".into(), None, || {
                calls.fetch_add(1, Ordering::Relaxed);
                async {
                    Err(SinkError::Permanent {
                        message: "bad".into(),
                        status: Some(400),
                    })
                }
            })
            .await;
        assert_eq!(out.unwrap_err().attempts, 1);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_sets_the_delay_within_its_cap() {
        let start = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let out = RetryPolicy::until_success()
            .run("test", &|| "x".into(), None, || {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    match n {
                        0 => Err(transient(Some(Duration::from_secs(7)))),
                        1 => Err(transient(Some(Duration::from_secs(3600)))),
                        _ => Ok(n),
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(out, 2);
        // 7 s asked, then 3600 s capped at 60 s.
        assert_eq!(start.elapsed(), Duration::from_secs(67));
    }
}
