//! Sink C — the external HTTP API (SPEC §7).
//!
//! `batch` mode POSTs JSON arrays of at most `max_batch_events` events, `per_event` mode one
//! object per request; up to `concurrency` requests are in flight. Each request carries an
//! `Idempotency-Key` (`events-{first}-{last}-{count}` or `event-{id}`), and the bearer token
//! when one is configured. Connect errors, timeouts, 408, 425, 429 and 5xx are retried with
//! exponential backoff and jitter, honouring `Retry-After`, up to `max_retries`; other 4xx
//! are not retried. Then `best_effort` dead-letters the request (durably, in sled) and
//! moves on; `fail_fast` keeps retrying with capped backoff, holding the checkpoint.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use futures_util::stream::{self, StreamExt};

use super::{Backoff, BoxFuture, Sink};
use crate::config::{redact_url, HttpConfig, HttpMode, OnFailure};
use crate::dlq::{DeadLetter, Dlq};
use crate::enrich::{rfc3339_us, EnrichedEvent};
use crate::metrics::Metrics;

/// Longest wait a `Retry-After` may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One request's body and key.
#[derive(Debug, Clone)]
pub struct Request {
    pub key: String,
    /// Shared, so a retry does not copy it.
    pub body: bytes::Bytes,
    pub events: usize,
    pub first_event_id: i64,
    pub last_event_id: i64,
}

/// The requests for a batch, per the mode.
pub fn requests(
    events: &[&EnrichedEvent],
    mode: HttpMode,
    max_batch_events: usize,
) -> Vec<Request> {
    match mode {
        HttpMode::Batch => events
            .chunks(max_batch_events.max(1))
            .map(|chunk| {
                let mut body = Vec::with_capacity(chunk.len() * 280 + 2);
                body.push(b'[');
                for (i, e) in chunk.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    e.write_json(&mut body);
                }
                body.push(b']');
                let body = bytes::Bytes::from(body);
                let (first, last) = (chunk[0].event_id, chunk[chunk.len() - 1].event_id);
                Request {
                    key: format!("events-{first}-{last}-{}", chunk.len()),
                    body,
                    events: chunk.len(),
                    first_event_id: first,
                    last_event_id: last,
                }
            })
            .collect(),
        HttpMode::PerEvent => events
            .iter()
            .map(|e| {
                let mut body = Vec::with_capacity(280);
                e.write_json(&mut body);
                let body = bytes::Bytes::from(body);
                Request {
                    key: format!("event-{}", e.event_id),
                    body,
                    events: 1,
                    first_event_id: e.event_id,
                    last_event_id: e.event_id,
                }
            })
            .collect(),
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Failed {
        status: Option<u16>,
        error: String,
        attempts: u32,
    },
}

/// What one attempt's answer means.
enum Answer {
    Ok,
    Retry {
        status: Option<u16>,
        error: String,
        after: Option<Duration>,
    },
    Reject {
        status: u16,
        error: String,
    },
}

pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..600).contains(&status)
}

/// `Retry-After` in seconds (an HTTP date is not honoured: the backoff applies).
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    let secs: u64 = v.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Sends requests with the retry policy of `[http]`. Shared by the sink and `dlq replay`.
#[derive(Clone)]
pub struct HttpSender {
    client: reqwest::Client,
    cfg: HttpConfig,
    url: String,
    metrics: Option<Arc<Metrics>>,
}

impl HttpSender {
    pub fn new(cfg: &HttpConfig) -> anyhow::Result<HttpSender> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(5000)))
            .pool_max_idle_per_host(cfg.concurrency)
            .build()
            .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(HttpSender {
            client,
            cfg: cfg.clone(),
            url: redact_url(&cfg.url),
            metrics: None,
        })
    }

    async fn attempt(&self, req: &Request) -> Answer {
        let mut builder = self
            .client
            .post(&self.cfg.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &req.key)
            .body(req.body.clone());
        if !self.cfg.auth_token.is_empty() {
            builder = builder.bearer_auth(self.cfg.auth_token.expose());
        }
        match builder.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if resp.status().is_success() {
                    return Answer::Ok;
                }
                let after = retry_after(&resp);
                let text = resp.text().await.unwrap_or_default();
                let error = format!(
                    "HTTP {status}: {}",
                    text.chars().take(200).collect::<String>().trim()
                );
                if is_retryable_status(status) {
                    Answer::Retry {
                        status: Some(status),
                        error,
                        after,
                    }
                } else {
                    Answer::Reject { status, error }
                }
            }
            Err(e) => Answer::Retry {
                status: None,
                error: if e.is_timeout() {
                    format!("timed out after {} ms", self.cfg.timeout_ms)
                } else if e.is_connect() {
                    format!("cannot connect to {}", self.url)
                } else {
                    crate::pg::error_text(&e)
                },
                after: None,
            },
        }
    }

    /// Send with retries. `hold` (fail_fast): after the retries, keep retrying with capped
    /// backoff until the API accepts; the result is then always `Delivered`.
    pub async fn send(&self, req: &Request, hold: bool) -> Outcome {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (status, error, after) = match self.attempt(req).await {
                Answer::Ok => return Outcome::Delivered,
                Answer::Retry {
                    status,
                    error,
                    after,
                } if attempts <= self.cfg.max_retries || hold => (status, error, after),
                Answer::Reject { status, error } if hold => (Some(status), error, None),
                Answer::Retry { status, error, .. } => {
                    return Outcome::Failed {
                        status,
                        error,
                        attempts,
                    }
                }
                Answer::Reject { status, error } => {
                    return Outcome::Failed {
                        status: Some(status),
                        error,
                        attempts,
                    }
                }
            };
            if let Some(m) = &self.metrics {
                Metrics::add(&m.sink_retries, 1);
            }
            let delay = after.unwrap_or_else(|| backoff.next_delay());
            if attempts > self.cfg.max_retries {
                tracing::warn!(
                    "http {} {}: {error} (status {}); fail_fast holds the checkpoint, retrying in {delay:?}",
                    self.url,
                    req.key,
                    status.map_or("-".into(), |s| s.to_string())
                );
            } else {
                tracing::debug!(
                    "http {} {}: {error}; retry {attempts} in {delay:?}",
                    self.url,
                    req.key
                );
            }
            tokio::time::sleep(delay).await;
        }
    }
}

pub struct HttpSink {
    sender: HttpSender,
    dlq: Dlq,
    metrics: Arc<Metrics>,
}

impl HttpSink {
    pub fn new(cfg: &HttpConfig, dlq: Dlq, metrics: Arc<Metrics>) -> anyhow::Result<HttpSink> {
        let mut sender = HttpSender::new(cfg)?;
        sender.metrics = Some(metrics.clone());
        Ok(HttpSink {
            sender,
            dlq,
            metrics,
        })
    }

    /// Deliver events; returns how many were dead-lettered.
    pub async fn send_events(&self, events: &[&EnrichedEvent]) -> anyhow::Result<usize> {
        let cfg = &self.sender.cfg;
        let hold = cfg.on_failure == OnFailure::FailFast;
        let reqs = requests(events, cfg.mode, cfg.max_batch_events);
        let outcomes: Vec<(Request, Outcome)> = stream::iter(reqs)
            .map(|r| async move {
                let o = self.sender.send(&r, hold).await;
                (r, o)
            })
            .buffer_unordered(cfg.concurrency)
            .collect()
            .await;
        let mut dead = 0;
        for (req, outcome) in outcomes {
            if let Outcome::Failed {
                status,
                error,
                attempts,
            } = outcome
            {
                tracing::warn!(
                    "http {}: {} events ({}) dead-lettered after {attempts} attempts: {error}",
                    self.sender.url,
                    req.events,
                    req.key
                );
                self.dlq
                    .push(DeadLetter {
                        id: 0,
                        idempotency_key: req.key,
                        events: req.events,
                        first_event_id: req.first_event_id,
                        last_event_id: req.last_event_id,
                        payload: String::from_utf8_lossy(&req.body).into_owned(),
                        status,
                        error,
                        attempts,
                        time: rfc3339_us(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_micros() as i64)
                                .unwrap_or(0),
                        ),
                    })
                    .await?;
                Metrics::add(&self.metrics.http_dead_lettered, req.events as u64);
                dead += req.events;
            }
        }
        Ok(dead)
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.send_events(events).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{enrich, RawEvent};
    use crate::types::Lsn;

    fn ev(id: i64) -> EnrichedEvent {
        enrich(
            RawEvent {
                id,
                content_id: 1,
                user_id: 1,
                event_type: "play".into(),
                event_ts_us: 0,
                duration_ms: None,
                device: None,
            },
            None,
            Lsn(0),
        )
        .0
    }

    #[test]
    fn batch_requests_are_arrays_with_range_keys() {
        let events: Vec<_> = (1..=5).map(ev).collect();
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let r = requests(&refs, HttpMode::Batch, 2);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].key, "events-1-2-2");
        assert_eq!(r[2].key, "events-5-5-1");
        let v: serde_json::Value = serde_json::from_slice(&r[1].body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[0]["event_id"], 3);
    }

    #[test]
    fn per_event_requests_are_objects_with_event_keys() {
        let events: Vec<_> = (7..=8).map(ev).collect();
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let r = requests(&refs, HttpMode::PerEvent, 500);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].key, "event-8");
        let v: serde_json::Value = serde_json::from_slice(&r[0].body).unwrap();
        assert_eq!(v["event_id"], 7);
    }

    #[test]
    fn which_statuses_are_retried() {
        for s in [408, 425, 429, 500, 502, 503, 599] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            assert!(!is_retryable_status(s), "{s}");
        }
    }
}
