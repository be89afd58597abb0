//! The destinations. Every way to a destination goes through [`Sink`]: the stream (via the
//! pipeline), `backfill` and `dlq replay`; [`build`] is the one factory that makes the
//! enabled sinks from the configuration. Each destination is one module with its
//! `[section]` configuration beside it; [`retry`] is the one retry policy they share.

pub mod clickhouse;
pub mod http;
pub mod redis;
pub mod retry;
pub mod stdout;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::enrich::EnrichedEvent;
use crate::error::UsageError;
use crate::ops::metrics::Metrics;
use crate::state::dlq::Dlq;
use crate::state::StateStore;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A destination of enriched events.
///
/// The contract every implementation keeps:
/// - Events arrive in stream order, one group at a time (one or more batches, coalesced
///   when the sink fell behind).
/// - `deliver` returns `Ok` only when every effect of the events is durable in the
///   destination (for the HTTP API: delivered or dead-lettered); the checkpoint moves past
///   a batch only after every sink said `Ok`.
/// - Delivery is at least once: after a crash or reconnect the same events (same
///   `event_id`, same values) arrive again, so a sink must make a repeat harmless.
/// - Transient failures (the destination is down, slow, overloaded) are retried inside
///   `deliver` by the sink's [`retry::RetryPolicy`]; that holds the pipeline and so bounds
///   memory. `Err` is a [`SinkError::Permanent`] (a schema mismatch, a rejected credential):
///   the engine stops with the checkpoint held.
pub trait Sink: Send {
    fn name(&self) -> &'static str;

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>>;

    /// How long to gather events before a write that is smaller than a full batch, counted
    /// from the previous write. A destination that pays per write (ClickHouse makes a part
    /// per INSERT) trades this much latency for fewer, larger writes; the default is none.
    fn linger(&self) -> Duration {
        Duration::ZERO
    }

    /// While catching up (the write's first event was committed more than a second ago),
    /// how long to wait for more batches before a write smaller than the write limit: a
    /// destination whose cost is per write and per key (Redis's script) writes fewer,
    /// larger calls there, where nobody waits to the millisecond. Default: none.
    fn fill_wait(&self) -> Duration {
        Duration::ZERO
    }

    /// The most events one write may take when batches are waiting (the pipeline's budget
    /// bounds it too). Default: one full batch.
    fn write_limit(&self, max_batch_rows: usize) -> usize {
        max_batch_rows
    }

    /// Called about once a second while no batch arrives (periodic upkeep).
    fn idle(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// What a delivery did, beyond "durable": for reports such as backfill's last line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Events that changed the destination (Redis counts them); `None` when the destination
    /// cannot tell a repeat from a new event.
    pub new_events: Option<u64>,
    /// Events the HTTP sink dead-lettered instead of delivering.
    pub dead_lettered: u64,
}

/// Why a write failed, as the sink classified its destination's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// Down, slow, overloaded, or asked us to come back later: worth another attempt.
    Transient {
        message: String,
        /// The HTTP status, when the destination answered with one.
        status: Option<u16>,
        /// How long the destination asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// No retry can fix it: a missing table, a wrong type, a rejected credential, a 4xx.
    Permanent {
        message: String,
        status: Option<u16>,
    },
}

impl SinkError {
    pub fn transient(message: impl Into<String>) -> SinkError {
        SinkError::Transient {
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> SinkError {
        SinkError::Permanent {
            message: message.into(),
            status: None,
        }
    }

    /// The same error, its message preceded by `context` (`"shard 2: …"`).
    pub fn in_context(mut self, context: &str) -> SinkError {
        match &mut self {
            SinkError::Transient { message, .. } | SinkError::Permanent { message, .. } => {
                *message = format!("{context}: {message}");
            }
        }
        self
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            SinkError::Transient { status, .. } | SinkError::Permanent { status, .. } => *status,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            SinkError::Transient { message, .. } | SinkError::Permanent { message, .. } => message,
        }
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for SinkError {}

/// The sinks a command can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    ClickHouse,
    Redis,
    Http,
    Stdout,
}

impl SinkKind {
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::ClickHouse => "clickhouse",
            SinkKind::Redis => "redis",
            SinkKind::Http => "http",
            SinkKind::Stdout => "stdout",
        }
    }

    /// A comma-separated list such as `clickhouse,redis` (`--sinks`), in order, without
    /// repeats.
    pub fn parse_list(s: &str) -> Result<Vec<SinkKind>, UsageError> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let kind = match name {
                "clickhouse" => SinkKind::ClickHouse,
                "redis" => SinkKind::Redis,
                "http" => SinkKind::Http,
                "stdout" => SinkKind::Stdout,
                other => {
                    return Err(UsageError::new(format!(
                        "--sinks: unknown sink {other:?}; use a comma-separated list of clickhouse, redis, http, stdout"
                    )))
                }
            };
            if !out.contains(&kind) {
                out.push(kind);
            }
        }
        if out.is_empty() {
            return Err(UsageError::new(
                "--sinks is empty; name at least one of clickhouse, redis, http, stdout",
            ));
        }
        Ok(out)
    }

    /// The sinks the configuration enables, in delivery order.
    pub fn enabled(config: &Sections<'_>) -> Vec<SinkKind> {
        let mut out = Vec::new();
        if config.clickhouse.is_some() {
            out.push(SinkKind::ClickHouse);
        }
        if config.redis.is_some() {
            out.push(SinkKind::Redis);
        }
        if config.http.is_some() {
            out.push(SinkKind::Http);
        }
        if config.stdout {
            out.push(SinkKind::Stdout);
        }
        out
    }
}

/// What the factory needs of the configuration: the enabled sinks' sections and where the
/// dead letters go (`Config::sinks` makes it).
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    pub clickhouse: Option<&'a clickhouse::ClickHouseConfig>,
    pub redis: Option<&'a redis::RedisConfig>,
    pub http: Option<&'a http::HttpConfig>,
    pub stdout: bool,
    pub state_dir: &'a std::path::Path,
}

/// Build and check the sinks named in `kinds` (each connects to its destination and checks
/// it). The HTTP sink's dead letters go to the state store: `store`, or the one in
/// `[state] dir` when none is open.
pub async fn build(
    config: &Sections<'_>,
    kinds: &[SinkKind],
    store: Option<&StateStore>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let missing = |kind: SinkKind| {
        UsageError::new(format!(
            "sink {} is named, but the configuration has no enabled [{}] section",
            kind.name(),
            kind.name()
        ))
    };
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    for &kind in kinds {
        match kind {
            SinkKind::ClickHouse => {
                let cfg = config.clickhouse.ok_or_else(|| missing(kind))?;
                sinks.push(Box::new(
                    clickhouse::ClickHouseSink::connect(cfg, metrics.clone()).await?,
                ));
            }
            SinkKind::Redis => {
                let cfg = config.redis.ok_or_else(|| missing(kind))?;
                sinks.push(Box::new(
                    redis::RedisSink::connect(cfg, metrics.clone()).await?,
                ));
            }
            SinkKind::Http => {
                let cfg = config.http.ok_or_else(|| missing(kind))?;
                let dlq = match store {
                    Some(s) => Dlq::open(s)?,
                    None => Dlq::open(&StateStore::open(config.state_dir)?)?,
                };
                sinks.push(Box::new(http::HttpSink::new(cfg, dlq, metrics.clone())?));
            }
            SinkKind::Stdout => sinks.push(Box::new(stdout::StdoutSink::default())),
        }
    }
    Ok(sinks)
}

/// Deliver one group of events to every sink at once; the first permanent failure wins.
/// Used where there is no pipeline (backfill, replay): the results come back in the order
/// of `sinks`.
pub async fn deliver_all(
    sinks: &mut [Box<dyn Sink>],
    events: &[&EnrichedEvent],
) -> anyhow::Result<Vec<Delivery>> {
    let writes = sinks.iter_mut().map(|s| async move {
        let name = s.name();
        s.deliver(events)
            .await
            .map_err(|e| anyhow::anyhow!("{name} sink failed: {e}"))
    });
    futures_util::future::join_all(writes)
        .await
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_lists() {
        assert_eq!(
            SinkKind::parse_list("clickhouse, redis,clickhouse").unwrap(),
            vec![SinkKind::ClickHouse, SinkKind::Redis]
        );
        assert!(SinkKind::parse_list("kafka").is_err());
        assert!(SinkKind::parse_list("").is_err());
        // `backfill --sinks stdout` previews what a backfill would deliver.
        assert_eq!(
            SinkKind::parse_list("stdout").unwrap(),
            vec![SinkKind::Stdout]
        );
        let e = SinkKind::parse_list("redis,kafka").unwrap_err().to_string();
        assert!(e.contains("\"kafka\"") && e.contains("stdout"), "{e}");
    }
}
