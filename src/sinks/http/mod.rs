//! Sink C — the external HTTP API (docs/sinks.md, "HTTP API").
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

use super::retry::{Exhausted, RetryPolicy};
use super::{BoxFuture, Delivery, Sink, SinkError};
use crate::checks::{redact_url, Secret};
use crate::enrich::{now_us, rfc3339_us, EnrichedEvent};
use crate::ops::metrics::Metrics;
use crate::state::dlq::{DeadLetter, Dlq};

mod config;
pub use config::{HttpConfig, HttpMode, OnFailure};

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
    request_chunks(events, mode, max_batch_events)
        .map(|chunk| request(chunk, mode))
        .collect()
}

/// The events of each request, per the mode.
fn request_chunks<'a, 'e>(
    events: &'a [&'e EnrichedEvent],
    mode: HttpMode,
    max_batch_events: usize,
) -> std::slice::Chunks<'a, &'e EnrichedEvent> {
    match mode {
        HttpMode::Batch => events.chunks(max_batch_events.max(1)),
        HttpMode::PerEvent => events.chunks(1),
    }
}

/// One request: a JSON array of `chunk` (batch mode) or its one event's object.
fn request(chunk: &[&EnrichedEvent], mode: HttpMode) -> Request {
    let (first, last) = (chunk[0].event_id, chunk[chunk.len() - 1].event_id);
    match mode {
        HttpMode::Batch => {
            let mut body = Vec::with_capacity(chunk.len() * 280 + 2);
            body.push(b'[');
            for (i, e) in chunk.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                e.write_json(&mut body);
            }
            body.push(b']');
            Request {
                key: format!("events-{first}-{last}-{}", chunk.len()),
                body: bytes::Bytes::from(body),
                events: chunk.len(),
                first_event_id: first,
                last_event_id: last,
            }
        }
        HttpMode::PerEvent => {
            let mut body = Vec::with_capacity(280);
            chunk[0].write_json(&mut body);
            Request {
                key: format!("event-{first}"),
                body: bytes::Bytes::from(body),
                events: 1,
                first_event_id: first,
                last_event_id: first,
            }
        }
    }
}

/// Whether an HTTP status is worth another attempt.
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
    Some(Duration::from_secs(secs))
}

/// Sends requests to `[http] url` with the sink's retry policy.
struct HttpSender {
    client: reqwest::Client,
    cfg: HttpConfig,
    /// `[http] url`, parsed once rather than for every request.
    target: reqwest::Url,
    url: String,
    /// `auth_token` or the contents of `auth_token_file`.
    token: Option<Secret>,
    metrics: Arc<Metrics>,
    /// `max_retries` retries, then the request is dead-lettered; under `fail_fast`, no
    /// limit (the checkpoint is held).
    retry: RetryPolicy,
}

/// Whether the API answers at all: a `HEAD` of its URL, any HTTP status counting as an
/// answer (`setup`'s check; nothing is posted). Returns the status.
pub async fn check_reachable(cfg: &HttpConfig) -> anyhow::Result<u16> {
    let client = HttpSender::client(cfg)?;
    let mut request = client.head(&cfg.url);
    if let Some(token) = cfg.auth_token()? {
        request = request.bearer_auth(token.expose());
    }
    let url = redact_url(&cfg.url);
    match request.send().await {
        Ok(resp) => Ok(resp.status().as_u16()),
        Err(e) => {
            let why = crate::tls::explain(&e).unwrap_or_else(|| {
                if e.is_timeout() {
                    format!("no answer within {} ms", cfg.timeout_ms)
                } else {
                    crate::error::chain_text(&e)
                }
            });
            Err(anyhow!(
                "cannot reach the API at {url}: {why}; is it running? check [http] url (ENGAGEMENT_CDC__HTTP__URL)"
            ))
        }
    }
}

impl HttpSender {
    /// The client for `[http]`: timeouts, pool, and the section's TLS for `https://`.
    fn client(cfg: &HttpConfig) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(5000)))
            .pool_max_idle_per_host(cfg.concurrency);
        if let Some(tls) = cfg.tls()? {
            builder = builder.use_preconfigured_tls(tls);
        }
        builder
            .build()
            .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))
    }

    fn new(cfg: &HttpConfig, metrics: Arc<Metrics>) -> anyhow::Result<HttpSender> {
        let client = HttpSender::client(cfg)?;
        let mut retry = RetryPolicy::limited(cfg.max_retries);
        if cfg.on_failure == OnFailure::FailFast {
            retry.max_retries = None;
        }
        let target = reqwest::Url::parse(&cfg.url).map_err(|e| {
            anyhow!(
                "[http] url {} is not a URL ({e}); set it to the API's address, such as https://api.example.com/events",
                redact_url(&cfg.url)
            )
        })?;
        Ok(HttpSender {
            client,
            cfg: cfg.clone(),
            target,
            url: redact_url(&cfg.url),
            token: cfg.auth_token()?,
            metrics,
            retry,
        })
    }

    /// One attempt, its answer classified.
    async fn attempt(&self, req: &Request) -> Result<(), SinkError> {
        let mut builder = self
            .client
            .post(self.target.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &req.key)
            .body(req.body.clone());
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token.expose());
        }
        let resp = match builder.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let message = if e.is_timeout() {
                    format!("timed out after {} ms", self.cfg.timeout_ms)
                } else if let Some(why) = crate::tls::explain(&e) {
                    why
                } else if e.is_connect() {
                    "cannot connect".to_string()
                } else {
                    crate::error::chain_text(&e)
                };
                return Err(SinkError::transient(message));
            }
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(());
        }
        let after = retry_after(&resp);
        let text = resp.text().await.unwrap_or_default();
        let message = format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>().trim()
        );
        Err(if is_retryable_status(status) {
            SinkError::Transient {
                message,
                status: Some(status),
                retry_after: after,
            }
        } else {
            SinkError::Permanent {
                message,
                status: Some(status),
            }
        })
    }

    /// Send with the retry policy of `[http]`. Under `fail_fast`, refusals are retried
    /// too, with capped backoff, until the API accepts.
    async fn send(&self, req: &Request) -> Result<(), Exhausted> {
        let what = || format!("http {} request {}", self.url, req.key);
        let hold = self.retry.max_retries.is_none();
        self.retry
            .run("http", &what, Some(&self.metrics), || async {
                match self.attempt(req).await {
                    Err(SinkError::Permanent { message, status }) if hold => {
                        Err(SinkError::Transient {
                            message: format!("{message}; fail_fast holds the checkpoint"),
                            status,
                            retry_after: None,
                        })
                    }
                    other => other,
                }
            })
            .await
    }
}

pub struct HttpSink {
    sender: HttpSender,
    dlq: Dlq,
}

impl HttpSink {
    pub fn new(cfg: &HttpConfig, dlq: Dlq, metrics: Arc<Metrics>) -> anyhow::Result<HttpSink> {
        Ok(HttpSink {
            sender: HttpSender::new(cfg, metrics)?,
            dlq,
        })
    }

    /// Deliver events; returns how many were dead-lettered.
    async fn send_events(&self, events: &[&EnrichedEvent]) -> Result<u64, SinkError> {
        let cfg = &self.sender.cfg;
        // Each body is built when its request is due and kept only if it fails: memory holds
        // `concurrency` bodies, not the whole write's.
        let mode = cfg.mode;
        let chunks: Vec<&[&EnrichedEvent]> =
            request_chunks(events, mode, cfg.max_batch_events).collect();
        let chunks = &chunks;
        let outcomes: Vec<Option<(Request, Exhausted)>> = stream::iter(0..chunks.len())
            .map(|i| async move {
                let r = request(chunks[i], mode);
                let o = self.sender.send(&r).await;
                o.err().map(|failed| (r, failed))
            })
            .buffer_unordered(cfg.concurrency)
            .collect()
            .await;
        let mut dead = 0;
        for (req, failed) in outcomes.into_iter().flatten() {
            tracing::warn!(
                sink = "http",
                key = %req.key,
                "http {}: {} events dead-lettered after {} attempts: {}",
                self.sender.url,
                req.events,
                failed.attempts,
                failed.error
            );
            let letter = DeadLetter {
                id: 0,
                idempotency_key: req.key,
                events: req.events,
                first_event_id: req.first_event_id,
                last_event_id: req.last_event_id,
                payload: String::from_utf8_lossy(&req.body).into_owned(),
                status: failed.error.status(),
                error: failed.error.message().to_string(),
                attempts: failed.attempts,
                time: rfc3339_us(now_us()),
            };
            self.dlq
                .push(letter)
                .await
                .map_err(|e| SinkError::permanent(format!("cannot keep a dead letter: {e:#}")))?;
            self.sender.metrics.dead_lettered(req.events as u64);
            dead += req.events as u64;
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
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let dead_lettered = self.send_events(events).await?;
            Ok(Delivery {
                new_events: None,
                dead_lettered,
            })
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
