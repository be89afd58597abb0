//! `engagement-cdc backfill` (SPEC §9): re-deliver the events of a time range from
//! Postgres, enriched with the current `content` rows by the same code as the stream.
//!
//! The range `[start, end)` on `event_ts` is read in keyset pages ordered by
//! `(event_ts, id)`, so memory stays bounded for any range and the index on `event_ts` is
//! used. ClickHouse rows carry `source_lsn = 0`, so a backfilled copy never replaces a
//! streamed one; Redis deduplicates by event id, so a backfill over streamed events, or the
//! same backfill twice, changes nothing.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::checkpoint::StateStore;
use crate::config::{Config, QualifiedTable};
use crate::dlq::Dlq;
use crate::enrich::{days_from_civil, enrich, rfc3339_us, ContentRow, EnrichedEvent, RawEvent};
use crate::error::UsageError;
use crate::metrics::Metrics;
use crate::pg;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::sinks::http::HttpSink;
use crate::sinks::redis::RedisSink;
use crate::types::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillSink {
    ClickHouse,
    Redis,
    Http,
}

impl BackfillSink {
    pub fn parse_list(s: &str) -> Result<Vec<BackfillSink>, UsageError> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let sink = match name {
                "clickhouse" => BackfillSink::ClickHouse,
                "redis" => BackfillSink::Redis,
                "http" => BackfillSink::Http,
                other => {
                    return Err(UsageError::new(format!(
                        "--sinks: unknown sink {other:?}; use a comma-separated list of clickhouse, redis, http"
                    )))
                }
            };
            if !out.contains(&sink) {
                out.push(sink);
            }
        }
        if out.is_empty() {
            return Err(UsageError::new(
                "--sinks is empty; name at least one of clickhouse, redis, http",
            ));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// µs since 1970, inclusive.
    pub start_us: i64,
    /// µs since 1970, exclusive.
    pub end_us: i64,
    pub sinks: Vec<BackfillSink>,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillReport {
    pub scanned: u64,
    /// Events new to Redis (or written, when Redis is not among the sinks).
    pub inserted: u64,
    pub duplicates: u64,
}

impl std::fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Backfill done. scanned={} inserted={} duplicates={}",
            self.scanned, self.inserted, self.duplicates
        )
    }
}

/// An RFC 3339 time (`2026-01-08T09:00:00Z`, `…+03:00`, fractions allowed), a time without
/// an offset (UTC), or a date (midnight UTC) → µs since 1970.
pub fn parse_time(s: &str) -> Result<i64, UsageError> {
    let bad = || {
        UsageError::new(format!(
            "{s:?} is not a time; use RFC 3339 such as 2026-01-08T09:00:00Z or 2026-01-08T09:00:00+03:00 (without an offset it is UTC)"
        ))
    };
    let t = s.trim();
    if t.len() == 10 {
        let text = format!("{t} 00:00:00+00");
        return crate::source::rows::parse_timestamptz(text.as_bytes()).ok_or_else(bad);
    }
    if t.len() < 19 {
        return Err(bad());
    }
    let (date, rest) = t.split_at(10);
    let sep = rest.as_bytes()[0];
    if sep != b'T' && sep != b't' && sep != b' ' {
        return Err(bad());
    }
    let rest = &rest[1..];
    let rest = if let Some(r) = rest.strip_suffix(['Z', 'z']) {
        format!("{r}+00")
    } else if rest[8..].contains(['+', '-']) {
        rest.to_string()
    } else {
        format!("{rest}+00")
    };
    let text = format!("{date} {rest}");
    // Validate the calendar date strictly (parse_timestamptz accepts day 31 of any month).
    let us = crate::source::rows::parse_timestamptz(text.as_bytes()).ok_or_else(bad)?;
    let y: i64 = date[0..4].parse().map_err(|_| bad())?;
    let m: u32 = date[5..7].parse().map_err(|_| bad())?;
    let d: u32 = date[8..10].parse().map_err(|_| bad())?;
    let round_trip = crate::enrich::civil_from_days(days_from_civil(y, m, d));
    if round_trip != (y, m, d) {
        return Err(bad());
    }
    Ok(us)
}

fn system_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

struct Progress {
    tty: bool,
    total: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn show(&mut self, scanned: u64, done: bool) {
        let now = Instant::now();
        if !done
            && now.duration_since(self.last)
                < Duration::from_millis(if self.tty { 200 } else { 5000 })
        {
            return;
        }
        self.last = now;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = scanned as f64 / secs;
        let eta = if rate > 0.0 && self.total > scanned {
            format!("{:.0}s", (self.total - scanned) as f64 / rate)
        } else {
            "0s".into()
        };
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30usize;
            let filled = if self.total == 0 {
                width
            } else {
                ((scanned as f64 / self.total as f64) * width as f64).round() as usize
            }
            .min(width);
            let _ = write!(
                err,
                "\r[{}{}] {scanned}/{} rows  {rate:.0} rows/s  ETA {eta}   ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.total
            );
            if done {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(
                err,
                "backfill: {scanned}/{} rows, {rate:.0} rows/s, ETA {eta}",
                self.total
            );
        }
    }
}

pub async fn backfill(config: &Config, opts: &BackfillOptions) -> anyhow::Result<BackfillReport> {
    if opts.end_us <= opts.start_us {
        return Err(UsageError::new(format!(
            "--end ({}) must be after --start ({}); the range is [start, end)",
            rfc3339_us(opts.end_us),
            rfc3339_us(opts.start_us)
        ))
        .into());
    }
    let metrics = Arc::new(Metrics::default());
    let mut clickhouse = None;
    let mut redis = None;
    let mut http = None;
    for sink in &opts.sinks {
        match sink {
            BackfillSink::ClickHouse => {
                let cfg = config.clickhouse().ok_or_else(|| {
                    UsageError::new("--sinks names clickhouse, but the configuration has no enabled [clickhouse] section")
                })?;
                clickhouse = Some(ClickHouseSink::connect(cfg, Some(metrics.clone())).await?);
            }
            BackfillSink::Redis => {
                let cfg = config.redis().ok_or_else(|| {
                    UsageError::new(
                        "--sinks names redis, but the configuration has no enabled [redis] section",
                    )
                })?;
                redis = Some(RedisSink::connect(cfg, Some(metrics.clone())).await?);
            }
            BackfillSink::Http => {
                let cfg = config.http().ok_or_else(|| {
                    UsageError::new(
                        "--sinks names http, but the configuration has no enabled [http] section",
                    )
                })?;
                let store = StateStore::open(&config.state.dir)?;
                http = Some(HttpSink::new(cfg, Dlq::open(&store)?, metrics.clone())?);
            }
        }
    }

    let pgc = &config.postgres;
    let client = pg::connect(&pgc.url).await?;
    let events = QualifiedTable::parse("postgres.events_table", &pgc.events_table)?;
    let content = QualifiedTable::parse("postgres.content_table", &pgc.content_table)?;
    pg::check_source_tables(&client, pgc).await?;
    let (start, end) = (system_time(opts.start_us), system_time(opts.end_us));
    let total: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE event_ts >= $1 AND event_ts < $2",
                events.quoted()
            ),
            &[&start, &end],
        )
        .await
        .context("cannot count the events of the range")?
        .get(0);
    let page = client
        .prepare(&format!(
            "SELECT e.id::int8, e.content_id::int8, e.user_id::int8, e.event_type::text, e.event_ts,
                    e.duration_ms::int4, e.device::text,
                    c.content_id::int8, c.content_type::text, c.length_seconds::int4
               FROM {} e LEFT JOIN {} c ON c.content_id = e.content_id
              WHERE e.event_ts >= $1 AND e.event_ts < $2 AND (e.event_ts, e.id) > ($3, $4)
              ORDER BY e.event_ts, e.id
              LIMIT $5",
            events.quoted(),
            content.quoted()
        ))
        .await
        .context("cannot prepare the backfill query")?;

    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        total: total as u64,
        started: Instant::now(),
        last: Instant::now() - Duration::from_secs(60),
    };
    let mut report = BackfillReport::default();
    let mut after: (SystemTime, i64) = (system_time(opts.start_us - 1), i64::MIN);
    let limit = opts.batch_size as i64;
    loop {
        let rows = client
            .query(&page, &[&start, &end, &after.0, &after.1, &limit])
            .await
            .context("cannot read a page of events")?;
        if rows.is_empty() {
            break;
        }
        let mut batch: Vec<EnrichedEvent> = Vec::with_capacity(rows.len());
        for r in &rows {
            let ts: SystemTime = r.get(4);
            let raw = RawEvent {
                id: r.get(0),
                content_id: r.get(1),
                user_id: r.get(2),
                event_type: r.get(3),
                event_ts_us: micros(ts),
                duration_ms: r.get(5),
                device: r.get(6),
            };
            after = (ts, raw.id);
            let row = r.get::<_, Option<i64>>(7).map(|content_id| ContentRow {
                content_id,
                content_type: r.get::<_, Option<String>>(8).map(Into::into),
                length_seconds: r.get(9),
            });
            batch.push(enrich(raw, row.as_ref(), Lsn(0)).0);
        }
        report.scanned += batch.len() as u64;
        let batch: Vec<&EnrichedEvent> = batch.iter().collect();
        let (ch, rd, ht) = (
            async {
                match &clickhouse {
                    Some(c) => c.insert(&batch).await,
                    None => Ok(()),
                }
            },
            async {
                match &mut redis {
                    Some(r) => r.apply(&batch).await.map(Some),
                    None => Ok(None),
                }
            },
            async {
                match &http {
                    Some(h) => h.send_events(&batch).await.map(|_| ()),
                    None => Ok(()),
                }
            },
        );
        let (ch, rd, ht) = tokio::join!(ch, rd, ht);
        ch?;
        ht?;
        match rd? {
            Some(new) => {
                report.inserted += new;
                report.duplicates += batch.len() as u64 - new;
            }
            None => report.inserted += batch.len() as u64,
        }
        progress.show(report.scanned, false);
    }
    progress.show(report.scanned, true);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_without_an_offset_are_utc() {
        let utc = parse_time("2026-01-08T09:00:00Z").unwrap();
        assert_eq!(parse_time("2026-01-08T09:00:00").unwrap(), utc);
        assert_eq!(parse_time("2026-01-08 09:00:00").unwrap(), utc);
        assert_eq!(parse_time("2026-01-08T12:00:00+03:00").unwrap(), utc);
        assert_eq!(parse_time("2026-01-08T04:30:00-04:30").unwrap(), utc);
        assert_eq!(parse_time("2026-01-08T09:00:00.5Z").unwrap(), utc + 500_000);
        assert_eq!(
            rfc3339_us(parse_time("2026-01-08").unwrap()),
            "2026-01-08T00:00:00Z"
        );
    }

    #[test]
    fn unreadable_times_are_usage_errors() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00",
            "2026-02-30T00:00:00",
            "2026-01-08T25:00:00",
            "2026-01-08X09:00:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sink_lists() {
        assert_eq!(
            BackfillSink::parse_list("clickhouse, redis,clickhouse").unwrap(),
            vec![BackfillSink::ClickHouse, BackfillSink::Redis]
        );
        assert!(BackfillSink::parse_list("kafka").is_err());
        assert!(BackfillSink::parse_list("").is_err());
    }
}
