//! Sink B — Redis (docs/sinks.md, "Redis"), exactly once in effect.
//!
//! Each batch is one Lua script (`apply_batch.lua`, run with EVALSHA and reloaded on
//! NOSCRIPT) that sets one dedup bit per event id and applies only the new events' effects,
//! aggregated per content and minute: one INCRBY per content, one ZINCRBY per bucket and
//! content, one SET of `content:last` per content, then rebuilds `top:content:10m`. The
//! bit and the effects change together, so a replay, a backfill overlap or `fred`
//! re-sending the script after a reconnect changes nothing.
//!
//! Keys (after `key_prefix`): `content:last:{id}`, `content:count:{id}`,
//! `top:content:bucket:{YYYYMMDDHHMM}`, `top:content:10m`, and the dedup bitmaps
//! `engagement_cdc:seen:{id / 2^20}` (128 KB per million ids, no expiry).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::anyhow;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::retry::RetryPolicy;
use super::{BoxFuture, Delivery, Sink, SinkError};
use crate::checks::redact_url;
use crate::enrich::{now_us, utc_parts, EnrichedEvent};
use crate::error::UsageError;
use crate::ops::metrics::Metrics;

mod config;
pub use config::RedisConfig;

const APPLY_BATCH: &str = include_str!("apply_batch.lua");

/// Events per script call: bounds how long one call holds Redis.
const EVENTS_PER_CALL: usize = 5000;

/// Buckets kept: the current minute and the 14 before it (EXPIRE 900).
const RETENTION_MINUTES: i64 = 15;

/// The idle rebuild of `top:content:10m` runs at least this often.
const IDLE_REBUILD: Duration = Duration::from_secs(5);

pub struct RedisSink {
    client: Client,
    script: Script,
    prefix: String,
    url: String,
    last_rebuild: Instant,
    /// When the dashboard's copy of `top:content:10m` was last read.
    last_top: Option<Instant>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
}

/// `YYYYMMDDHHMM` of the UTC minute containing `us` (µs since 1970).
pub fn minute_key(us: i64) -> String {
    let p = utc_parts(us);
    format!(
        "{:04}{:02}{:02}{:02}{:02}",
        p.year, p.month, p.day, p.hour, p.minute
    )
}

/// `event_ts` with exactly six fraction digits, so timestamps compare as strings.
fn sortable_ts(us: i64) -> String {
    let p = utc_parts(us);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        p.year, p.month, p.day, p.hour, p.minute, p.second, p.micros
    )
}

/// The script's ARGV for `events`, at wall-clock time `now_us`: the text arguments, and the
/// per-event binary string that goes last (16 bytes an event, read with `struct.unpack`).
pub fn script_args(prefix: &str, events: &[&EnrichedEvent], now_us: i64) -> (Vec<String>, Vec<u8>) {
    const MINUTE: i64 = 60_000_000;
    let now_minute = now_us.div_euclid(MINUTE);
    let mut contents: Vec<(i64, usize)> = Vec::new(); // (content_id, latest event index)
    let mut content_index: HashMap<i64, usize> = HashMap::new();
    let mut buckets: Vec<String> = Vec::new();
    let mut bucket_index: HashMap<i64, usize> = HashMap::new();
    let mut per_event: Vec<(i64, usize, usize)> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let c = *content_index.entry(e.content_id).or_insert_with(|| {
            contents.push((e.content_id, i));
            contents.len()
        });
        let latest = &mut contents[c - 1].1;
        let cur = events[*latest];
        if (e.event_ts_us, e.event_id) > (cur.event_ts_us, cur.event_id) {
            *latest = i;
        }
        let minute = e.event_ts_us.div_euclid(MINUTE);
        let b = if minute > now_minute - RETENTION_MINUTES {
            *bucket_index.entry(minute).or_insert_with(|| {
                buckets.push(minute_key(minute * MINUTE));
                buckets.len()
            })
        } else {
            0
        };
        per_event.push((e.event_id, c, b));
    }
    let mut args = Vec::with_capacity(15 + buckets.len() + contents.len() * 5);
    args.push(prefix.to_string());
    args.push(events.len().to_string());
    args.push(contents.len().to_string());
    args.push(buckets.len().to_string());
    args.extend(buckets);
    for back in 0..10 {
        args.push(minute_key((now_minute - back) * MINUTE));
    }
    for (content_id, latest) in &contents {
        let e = events[*latest];
        args.push(content_id.to_string());
        args.push((latest + 1).to_string());
        args.push(sortable_ts(e.event_ts_us));
        args.push(e.event_id.to_string());
        args.push(e.to_json());
    }
    let mut blob = Vec::with_capacity(per_event.len() * 16);
    for (id, c, b) in per_event {
        blob.extend_from_slice(&id.to_be_bytes());
        blob.extend_from_slice(&(c as i32).to_be_bytes());
        blob.extend_from_slice(&(b as i32).to_be_bytes());
    }
    (args, blob)
}

impl RedisSink {
    /// Connect and check that the server answers.
    pub async fn connect(cfg: &RedisConfig, metrics: Arc<Metrics>) -> anyhow::Result<RedisSink> {
        let url = redact_url(&cfg.url);
        let mut config =
            Config::from_url(&cfg.url).map_err(|e| anyhow!("redis.url {url:?} is invalid: {e}"))?;
        // Our rustls settings (roots, client certificate) instead of the crate's defaults.
        config.tls = cfg.tls()?.map(fred::types::config::TlsConfig::from);
        if let Some(password) = cfg.password()? {
            if config.password.is_some() {
                return Err(UsageError::new(
                    "redis.url has a password and redis.password (or password_file) is set too; keep one",
                )
                .into());
            }
            config.password = Some(password.expose().to_string());
        }
        if !cfg.username.is_empty() {
            config.username = Some(cfg.username.clone());
        }
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = Duration::from_secs(10);
                // A re-sent script is harmless (the dedup bits), but a few attempts are
                // enough: the retry policy takes over after that.
                c.max_command_attempts = 3;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(10);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()
            .map_err(|e| anyhow!("cannot configure the Redis client for {url}: {e}"))?;
        let init = client.init();
        match tokio::time::timeout(Duration::from_secs(10), init).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // fred keeps only the text of the rustls error.
                if let Some(why) = crate::tls::explain_text(e.details()) {
                    return Err(anyhow!("cannot connect to Redis at {url}: {why}"));
                }
                return Err(anyhow!(
                    "cannot connect to Redis at {url}: {e}; is it running? check [redis] url (ENGAGEMENT_CDC__REDIS__URL)"
                ));
            }
            Err(_) => {
                return Err(anyhow!(
                    "cannot connect to Redis at {url}: no answer within 10 s; check [redis] url and the server"
                ))
            }
        }
        // A Redis Cluster node answers a plain client too, but the batch script touches keys
        // in many hash slots: refuse it here rather than fail at the first batch.
        let cluster: String = client
            .info(Some(fred::types::InfoKind::Cluster))
            .await
            .map_err(|e| anyhow!("cannot read INFO cluster from Redis at {url}: {e}"))?;
        if cluster.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Err(anyhow!(
                "Redis at {url} is a Redis Cluster node; the Redis sink does not support Redis Cluster yet (its batch script spans hash slots); point [redis] url at a standalone Redis or a primary with replicas"
            ));
        }
        let script = Script::from_lua(APPLY_BATCH);
        script
            .load(&client)
            .await
            .map_err(|e| anyhow!("cannot load the batch script into Redis at {url}: {e}"))?;
        Ok(RedisSink {
            client,
            script,
            prefix: cfg.key_prefix.clone(),
            url,
            last_rebuild: Instant::now(),
            last_top: None,
            metrics,
            retry: RetryPolicy::until_success(),
        })
    }

    /// Apply events (any number); returns how many were new to Redis. Transient failures
    /// are retried until they succeed; a script error is permanent.
    pub async fn apply(&mut self, events: &[&EnrichedEvent]) -> Result<u64, SinkError> {
        let mut inserted = 0;
        if events.is_empty() {
            self.call(&[]).await?;
            return Ok(0);
        }
        for chunk in events.chunks(EVENTS_PER_CALL) {
            inserted += self.call(chunk).await?;
        }
        self.last_rebuild = Instant::now();
        self.refresh_top().await;
        Ok(inserted)
    }

    /// At most every 2 s, read `top:content:10m` for the dashboard. Display only: a failure
    /// is logged and the old copy kept.
    async fn refresh_top(&mut self) {
        if self
            .last_top
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_top = Some(Instant::now());
        let key = format!("{}top:content:10m", self.prefix);
        let read = self
            .client
            .zrevrange::<Vec<(String, f64)>, _>(&key, 0, 9, true);
        match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok(top)) => self.metrics.top_content.set(top),
            Ok(Err(e)) => tracing::debug!("cannot read {key} for the dashboard: {e}"),
            Err(_) => tracing::debug!("reading {key} for the dashboard timed out"),
        }
    }

    async fn call(&self, events: &[&EnrichedEvent]) -> Result<u64, SinkError> {
        let what = || format!("the batch script ({} events)", events.len());
        self.retry
            .run("redis", &what, Some(&self.metrics), || async {
                // Arguments are rebuilt per attempt: the window follows the clock.
                let (text, blob) = script_args(&self.prefix, events, now_us());
                let mut args: Vec<Value> = text.into_iter().map(Value::from).collect();
                args.push(Value::Bytes(blob.into()));
                let n: i64 = self
                    .script
                    .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
                    .await
                    .map_err(|e| classify(&e, &self.url))?;
                Ok(n as u64)
            })
            .await
            .map_err(|exhausted| exhausted.error)
    }
}

/// Whether a Redis error is worth another attempt: transport failures, timeouts and a
/// server that is loading, busy or failing over are; a refused credential, a wrong key type
/// or a failing script (`ERR` replies) are not.
fn classify(e: &Error, url: &str) -> SinkError {
    let permanent_kind = matches!(
        e.kind(),
        ErrorKind::Auth
            | ErrorKind::Config
            | ErrorKind::InvalidCommand
            | ErrorKind::InvalidArgument
            | ErrorKind::Url
    );
    // A server's error reply starts with its code: ERR, WRONGTYPE, LOADING, BUSY, …
    let code = e.details().split_whitespace().next().unwrap_or("");
    if permanent_kind || code == "ERR" {
        SinkError::permanent(format!(
            "redis at {url} rejected the batch script: {e}; check that the keys the engine writes (see docs/sinks.md) are not used with other types"
        ))
    } else {
        SinkError::transient(format!("redis at {url}: {e}"))
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let new = self.apply(events).await?;
            Ok(Delivery {
                new_events: Some(new),
                dead_lettered: 0,
            })
        })
    }

    fn idle(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.last_rebuild.elapsed() >= IDLE_REBUILD {
                self.apply(&[]).await?;
                self.last_rebuild = Instant::now();
            }
            // The dashboard's copy catches up within seconds of the last batch.
            self.refresh_top().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{enrich, RawEvent};
    use crate::types::Lsn;

    fn ev(id: i64, content: i64, ts_us: i64) -> EnrichedEvent {
        enrich(
            RawEvent {
                id,
                content_id: content,
                user_id: 1,
                event_type: "play".into(),
                event_ts_us: ts_us,
                duration_ms: Some(1000),
                device: None,
            },
            None,
            Lsn(1),
        )
        .0
    }

    #[test]
    fn minute_keys_and_sortable_timestamps() {
        assert_eq!(minute_key(1_767_882_112_000_000), "202601081421");
        assert_eq!(
            sortable_ts(1_767_882_112_000_000),
            "2026-01-08T14:21:52.000000Z"
        );
        assert!(sortable_ts(1_767_882_112_500_000) > sortable_ts(1_767_882_112_000_000));
    }

    #[test]
    fn arguments_aggregate_per_content_and_minute() {
        let now = 1_767_882_112_000_000; // 14:21:52
        let min = 60_000_000;
        let events = [
            ev(1, 7, now - 10 * min),  // 14:11, in retention
            ev(2, 8, now),             // 14:21
            ev(3, 7, now - 1_000_000), // 14:21, later than event 1
            ev(4, 7, now - 20 * min),  // 14:01, too old for a bucket
        ];
        let refs: Vec<&EnrichedEvent> = events.iter().collect();
        let (a, blob) = script_args("p:", &refs, now);
        assert_eq!(&a[..4], ["p:", "4", "2", "2"]);
        assert_eq!(&a[4..6], ["202601081411", "202601081421"]);
        assert_eq!(a[6], "202601081421"); // window starts at the current minute
        assert_eq!(a[15], "202601081412"); // and ends 9 minutes before
                                           // Content 7: its latest event is event 3 (index 3).
        assert_eq!(&a[16..20], ["7", "3", "2026-01-08T14:21:51.000000Z", "3"]);
        assert!(a[20].starts_with("{\"event_id\":3,"));
        assert_eq!(&a[21..24], ["8", "2", "2026-01-08T14:21:52.000000Z"]);
        assert_eq!(a.len(), 26);
        let per_event: Vec<(i64, i32, i32)> = blob
            .chunks(16)
            .map(|c| {
                (
                    i64::from_be_bytes(c[..8].try_into().unwrap()),
                    i32::from_be_bytes(c[8..12].try_into().unwrap()),
                    i32::from_be_bytes(c[12..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(per_event, [(1, 1, 1), (2, 2, 2), (3, 1, 2), (4, 1, 0)]);
    }
}
