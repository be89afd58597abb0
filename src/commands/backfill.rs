//! `engagement-cdc backfill` (docs/operations.md, "Backfill"): re-deliver the events of a time range from
//! Postgres, enriched with the current `content` rows by the same code as the stream.
//!
//! The range `[start, end)` on `event_ts` is read in keyset pages ordered by
//! `(event_ts, id)`, so memory stays bounded for any range and the index on `event_ts` is
//! used. ClickHouse rows carry `source_lsn = 0`, so a backfilled copy never replaces a
//! streamed one; Redis deduplicates by event id against the ids it applied within
//! `redis.dedup_horizon`, so a backfill over events streamed (or backfilled) within it
//! changes nothing.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use crate::config::Config;
use crate::enrich::{enrich, rfc3339_us, EnrichedEvent};
use crate::error::UsageError;
use crate::ops::metrics::Metrics;
use crate::sinks::{self, SinkKind};
use crate::source::pg;
use crate::source::rows::{decode_content, decode_event, TextRow, UnfitLog};
use crate::source::schema::{in_select_order, select_as_text, EVENT_ID, EVENT_TS};
use crate::types::Lsn;

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// µs since 1970, inclusive.
    pub start_us: i64,
    /// µs since 1970, exclusive.
    pub end_us: i64,
    pub sinks: Vec<SinkKind>,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillReport {
    pub scanned: u64,
    /// Events new to Redis (or written, when Redis is not among the sinks).
    pub inserted: u64,
    pub duplicates: u64,
    /// Rows skipped because a required value was NULL or unreadable.
    pub skipped: u64,
    /// Values delivered as NULL because they do not fit their sink column.
    pub invalid_values: u64,
}

impl std::fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Backfill done. scanned={} inserted={} duplicates={}",
            self.scanned, self.inserted, self.duplicates
        )?;
        // Shown only when something was not as the table's types promise.
        if self.skipped > 0 {
            write!(f, " skipped={}", self.skipped)?;
        }
        if self.invalid_values > 0 {
            write!(f, " invalid_values={}", self.invalid_values)?;
        }
        Ok(())
    }
}

/// An RFC 3339 time (`2026-01-08T09:00:00Z`, `…+03:00`, fractions allowed), a time without
/// an offset (UTC), or a date (midnight UTC) → µs since 1970. Dates and offsets are
/// checked by `jiff`: no 30 February, no `+99:99`.
pub fn parse_time(s: &str) -> Result<i64, UsageError> {
    let bad = || {
        UsageError::new(format!(
            "{s:?} is not a time; use RFC 3339 such as 2026-01-08T09:00:00Z or 2026-01-08T09:00:00+03:00 (without an offset it is UTC)"
        ))
    };
    let t = s.trim();
    if let Ok(ts) = t.parse::<jiff::Timestamp>() {
        return Ok(ts.as_microsecond());
    }
    // No offset: a civil time or a date, in UTC. A bracketed zone without an offset
    // (`…[Europe/Paris]`) is refused rather than guessed.
    let civil = t
        .parse::<jiff::civil::DateTime>()
        .or_else(|_| {
            t.parse::<jiff::civil::Date>()
                .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
        })
        .map_err(|_| bad())?;
    // Anything after the date that names an offset or zone had to parse as a timestamp.
    let after_date = t.char_indices().nth(10).map_or("", |(i, _)| &t[i..]);
    if after_date.contains(['+', '-', 'Z', 'z', '[']) {
        return Err(bad());
    }
    let ts = jiff::tz::TimeZone::UTC
        .to_timestamp(civil)
        .map_err(|_| bad())?;
    Ok(ts.as_microsecond())
}

fn system_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// The progress bar on a terminal (rows, rate, ETA), plain lines every 5 s otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    /// When the last plain line was printed: the first comes at once.
    last: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("[{bar:30}] {pos}/{len} rows  {rate}  ETA {eta}")
                    .expect("a valid template")
                    .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0} rows/s", s.per_sec());
                    })
                    .progress_chars("##-"),
            );
            bar
        });
        Progress {
            bar,
            total,
            started: Instant::now(),
            last: None,
        }
    }

    fn show(&mut self, scanned: u64, done: bool) {
        if let Some(bar) = &self.bar {
            bar.set_position(scanned);
            if done {
                bar.finish();
            }
            return;
        }
        if !done
            && self
                .last
                .is_some_and(|l| l.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.last = Some(Instant::now());
        let rate = scanned as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 && self.total > scanned {
            (self.total - scanned) as f64 / rate
        } else {
            0.0
        };
        eprintln!(
            "backfill: {scanned}/{} rows, {rate:.0} rows/s, ETA {eta:.0}s",
            self.total
        );
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
    let mut sinks = sinks::build(&config.sinks(), &opts.sinks, None, &metrics).await?;
    let redis_at = opts.sinks.iter().position(|k| *k == SinkKind::Redis);

    let pgc = &config.postgres;
    let client = pg::connect(pgc).await?;
    let events = &pgc.events_table;
    let content = &pgc.content_table;
    let tables = pg::check_source_tables(&client, pgc).await?;
    let zone = pgc.zone()?;
    // The range's bounds are instants; a `timestamp without time zone` column is compared
    // with them in the configured zone, as the stream reads it.
    pg::timed(client.query_one(
        "SELECT set_config('TimeZone', $1, false), set_config('DateStyle', 'ISO, YMD', false)",
        &[&zone.name()],
    ))
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "Postgres does not accept time zone {:?} (postgres.timestamp_zone): {e:#}",
            zone.name()
        )
    })?;
    let q = crate::checks::quote_ident;
    let (ec, cc) = (&pgc.event_columns, &pgc.content_columns);
    let (ts, id) = (q(&ec.event_ts), q(&ec.id));
    let (start, end) = (system_time(opts.start_us), system_time(opts.end_us));
    let total: i64 = pg::timed_for(
        pg::LONG_QUERY_TIMEOUT,
        client.query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE {ts} >= $1::timestamptz AND {ts} < $2::timestamptz",
                events.quoted()
            ),
            &[&start, &end],
        ),
    )
    .await
    .context("cannot count the events of the range")?
    .get(0);
    // Every field as text, converted by the stream's own code (source::rows).
    let select = format!(
        "SELECT {}, {}
           FROM {} e LEFT JOIN {} c ON c.{} = e.{}
          WHERE e.{ts} >= $1::timestamptz AND e.{ts} < $2::timestamptz",
        select_as_text("e.", &ec.required()),
        select_as_text("c.", &cc.required()),
        events.quoted(),
        content.quoted(),
        q(&cc.content_id),
        q(&ec.content_id),
    );
    let first_page =
        pg::timed(client.prepare(&format!("{select} ORDER BY e.{ts}, e.{id} LIMIT $3")))
            .await
            .context("cannot prepare the backfill query")?;
    // The next page starts after the last row's (event_ts, id), given back as the text
    // Postgres wrote, cast to the columns' own types.
    let next_page = pg::timed(client.prepare(&format!(
        "{select} AND (e.{ts}, e.{id}) > ($4::text::{}, $5::text::{})
              ORDER BY e.{ts}, e.{id} LIMIT $3",
        tables.events.type_names[EVENT_TS], tables.events.type_names[EVENT_ID]
    )))
    .await
    .context("cannot prepare the backfill query")?;
    let event_at = in_select_order(&tables.events.at);
    let mut content_at = in_select_order(&tables.content.at);
    for l in &mut content_at {
        l.pos += event_at.len();
    }

    let mut progress = Progress::new(total as u64);
    let mut report = BackfillReport::default();
    let mut unfit_log = UnfitLog::default();
    let mut after: Option<(String, String)> = None;
    let limit = opts.batch_size as i64;
    loop {
        type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
        let (statement, params): (_, Vec<Param>) = match &after {
            None => (&first_page, vec![&start, &end, &limit]),
            Some((t, i)) => (&next_page, vec![&start, &end, &limit, t, i]),
        };
        let rows = pg::timed_for(pg::LONG_QUERY_TIMEOUT, client.query(statement, &params))
            .await
            .context("cannot read a page of events")?;
        if rows.is_empty() {
            break;
        }
        let mut batch: Vec<EnrichedEvent> = Vec::with_capacity(rows.len());
        for r in &rows {
            let row = TextRow::from_row(r);
            if let (Some(t), Some(i)) = (&row.0[EVENT_TS], &row.0[EVENT_ID]) {
                after = Some((t.clone(), i.clone()));
            }
            report.scanned += 1;
            let (raw, unfit) = match decode_event(&row, &event_at, &zone) {
                Ok(decoded) => decoded,
                Err(why) => {
                    report.skipped += 1;
                    tracing::warn!("skipped an event row: {why}");
                    continue;
                }
            };
            if let Some(why) = unfit {
                report.invalid_values += 1;
                unfit_log.note(&format!("event {}: {why}", raw.id), "backfill");
            }
            let content_row = match row.0[content_at[0].pos] {
                None => None,
                Some(_) => {
                    let (c, unfit) = decode_content(&row, &content_at, None)
                        .map_err(|e| anyhow::anyhow!("event {}: its content row's {e}", raw.id))?;
                    if let Some(why) = unfit {
                        report.invalid_values += 1;
                        unfit_log.note(&format!("content row {}: {why}", c.content_id), "backfill");
                    }
                    Some(c)
                }
            };
            batch.push(enrich(raw, content_row, Lsn(0)).0);
        }
        if batch.is_empty() {
            progress.show(report.scanned, false);
            continue;
        }
        let batch: Vec<&EnrichedEvent> = batch.iter().collect();
        let deliveries = sinks::deliver_all(&mut sinks, &batch).await?;
        match redis_at.and_then(|i| deliveries[i].new_events) {
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
            "2026-01-0éT09:00:00Z",
            "2026-02-30",
            "2026-01-08T09:00:00+99:99",
            "2026-01-08T09:00:00[Europe/Paris]",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }
}
