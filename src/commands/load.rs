//! `engagement-cdc load`: insert realistic events into Postgres at a given rate.
//!
//! Content popularity is skewed (Zipf, s = 1.1), event types and devices follow fixed
//! weights, durations are plausible for the content's length (some NULL). Rows go in
//! multi-row INSERT transactions of `--batch` rows over `--connections` connections,
//! paced to `--rate` events per second (0: as fast as possible). The report counts the rows
//! Postgres said it inserted.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use rand::distributions::{Distribution, WeightedIndex};
use rand::Rng;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};

use crate::config::Config;
use crate::error::UsageError;
use crate::source::pg;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Events per second; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Duration,
    /// Content rows used (created when missing): ids 1..=contents.
    pub contents: u32,
    /// Rows per INSERT transaction.
    pub batch: usize,
    pub connections: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadReport {
    pub inserted: u64,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.inserted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Load done. inserted={} seconds={:.2} rate={:.0} events/s",
            self.inserted,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// `60s`, `2m`, `500ms`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UsageError> {
    let t = s.trim();
    let bad = || {
        UsageError::new(format!(
            "{s:?} is not a duration; use e.g. 60s, 2m, 500ms or 1h"
        ))
    };
    // A bare number is seconds; anything else is humantime's `1h 30m 500ms`.
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t).map_err(|_| bad())?,
    };
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

const EVENT_TYPES: [(&str, u32); 6] = [
    ("play", 40),
    ("pause", 20),
    ("seek", 12),
    ("complete", 10),
    ("like", 12),
    ("share", 6),
];
const DEVICES: [(&str, u32); 4] = [("web", 40), ("ios", 25), ("android", 25), ("tv", 10)];
const CONTENT_TYPES: [&str; 4] = ["video", "article", "podcast", "short"];

/// Length in seconds of generated content `id` (articles have none): deterministic.
fn content_row(id: u32) -> (&'static str, Option<i32>) {
    let kind = CONTENT_TYPES[(id as usize * 7) % CONTENT_TYPES.len()];
    let len = match kind {
        "article" => None,
        "short" => Some(15 + (id as i32 * 13) % 45),
        "podcast" => Some(900 + (id as i32 * 97) % 2700),
        _ => Some(60 + (id as i32 * 37) % 1140),
    };
    (kind, len)
}

struct Generator {
    zipf: WeightedIndex<f64>,
    types: WeightedIndex<u32>,
    devices: WeightedIndex<u32>,
    /// `length_seconds` of content `i + 1` as the table has it (rows that existed before
    /// keep their values), so durations are plausible for it.
    lengths: Vec<Option<i32>>,
}

impl Generator {
    fn new(contents: u32) -> Self {
        Generator {
            lengths: (1..=contents).map(|id| content_row(id).1).collect(),
            zipf: WeightedIndex::new((1..=contents).map(|k| 1.0 / (k as f64).powf(1.1)))
                .expect("contents > 0"),
            types: WeightedIndex::new(EVENT_TYPES.iter().map(|t| t.1)).expect("weights"),
            devices: WeightedIndex::new(DEVICES.iter().map(|d| d.1)).expect("weights"),
        }
    }

    /// One event's values.
    fn row(&self, rng: &mut impl Rng) -> Row {
        let index = self.zipf.sample(rng);
        let len = self.lengths[index];
        Row {
            content: (index + 1).to_string(),
            user: rng.gen_range(1..=1_000_000u32).to_string(),
            ty: EVENT_TYPES[self.types.sample(rng)].0,
            duration: (!rng.gen_bool(0.05)).then(|| {
                let max_ms = len.unwrap_or(300) as u64 * 1000;
                rng.gen_range(0..=max_ms).to_string()
            }),
            device: DEVICES[self.devices.sample(rng)].0,
        }
    }
}

/// One event's `(content_id, user_id, event_type, duration_ms, device)`, as text.
struct Row {
    content: String,
    user: String,
    ty: &'static str,
    /// `None`: NULL.
    duration: Option<String>,
    device: &'static str,
}

impl Row {
    /// The five values as statement parameters (`None`: NULL).
    fn params(&self) -> [Option<&str>; 5] {
        [
            Some(&self.content),
            Some(&self.user),
            Some(self.ty),
            self.duration.as_deref(),
            Some(self.device),
        ]
    }

    /// The five values as an SQL tuple, appended to `out`.
    fn write_tuple(&self, out: &mut String) {
        let Row {
            content,
            user,
            ty,
            duration,
            device,
        } = self;
        let duration = duration.as_deref().unwrap_or("NULL");
        let _ = write!(out, "({content},{user},'{ty}',{duration},'{device}')");
    }
}

/// Inserts of at most this many rows go as a prepared statement (one per row count and
/// connection); larger ones as one statement text each.
const PREPARED_ROWS: usize = 64;

/// A parameter sent as text, whatever its column's type (Postgres reads it with that
/// type's input function, as it reads a literal), so the load needs no Rust type per
/// column of the user's table.
#[derive(Debug)]
struct TextParam<'a>(&'a str);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

pub async fn load(config: &Config, opts: &LoadOptions) -> anyhow::Result<LoadReport> {
    if opts.contents == 0 || opts.batch == 0 || opts.connections == 0 {
        return Err(
            UsageError::new("--contents, --batch and --connections must be at least 1").into(),
        );
    }
    let pgc = &config.postgres;
    let events = &pgc.events_table;
    let content = &pgc.content_table;
    let setup = pg::connect(pgc).await?;
    pg::check_source_tables(&setup, pgc).await?;
    let (ec, cc) = (&pgc.event_columns, &pgc.content_columns);
    let q = crate::checks::quote_ident;
    let mut values = String::new();
    for id in 1..=opts.contents {
        let (kind, len) = content_row(id);
        if !values.is_empty() {
            values.push(',');
        }
        values.push_str(&format!(
            "({id},'{kind}',{})",
            len.map_or("NULL".to_string(), |l| l.to_string())
        ));
    }
    pg::timed(setup.batch_execute(&format!(
        "INSERT INTO {} ({}, {}, {}) VALUES {values} ON CONFLICT ({}) DO NOTHING",
        content.quoted(),
        q(&cc.content_id),
        q(&cc.content_type),
        q(&cc.length_seconds),
        q(&cc.content_id),
    )))
    .await
    .with_context(|| format!("cannot create the content rows 1..{}", opts.contents))?;

    let mut lengths: Vec<Option<i32>> = (1..=opts.contents).map(|id| content_row(id).1).collect();
    for row in pg::timed(setup.query(
        &format!(
            // The bound as a literal: a parameter would need the column's own type (an
            // `int8` does not bind to a `numeric` id).
            "SELECT {id}::int8, {len}::int4 FROM {} WHERE {id} BETWEEN 1 AND {}",
            content.quoted(),
            opts.contents,
            id = q(&cc.content_id),
            len = q(&cc.length_seconds),
        ),
        &[],
    ))
    .await
    .context("cannot read the content rows")?
    {
        let id: i64 = row.get(0);
        lengths[(id - 1) as usize] = row.get(1);
    }
    let started = Instant::now();
    let deadline = started + opts.duration;
    let per_conn_rate = opts.rate as f64 / opts.connections as f64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.connections {
        let client = pg::connect(pgc).await?;
        let mut gen = Generator::new(opts.contents);
        gen.lengths.clone_from(&lengths);
        let prefix = format!(
            "INSERT INTO {} ({}, {}, {}, {}, {}) VALUES ",
            events.quoted(),
            q(&ec.content_id),
            q(&ec.user_id),
            q(&ec.event_type),
            q(&ec.duration_ms),
            q(&ec.device),
        );
        let batch = opts.batch;
        tasks.spawn(async move {
            let mut inserted: u64 = 0;
            let mut sql = String::with_capacity(batch * 48 + prefix.len());
            let mut prepared: HashMap<usize, tokio_postgres::Statement> = HashMap::new();
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                if per_conn_rate > 0.0 {
                    // Pace: the next batch is due when the rate allows it.
                    let due = started + Duration::from_secs_f64(inserted as f64 / per_conn_rate);
                    if due >= deadline {
                        break;
                    }
                    if due > now {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                let n = if per_conn_rate > 0.0 {
                    let allowed = (per_conn_rate * started.elapsed().as_secs_f64()).ceil() as u64;
                    (allowed.saturating_sub(inserted) as usize).clamp(1, batch)
                } else {
                    batch
                };
                let done = if n <= PREPARED_ROWS {
                    // A prepared statement: Postgres parses and plans it once, and each
                    // insert is one round trip (docs/benchmarks.md, "What the steady tail
                    // shares its cores with, and a lighter load").
                    let statement = match prepared.get(&n) {
                        Some(s) => s,
                        None => {
                            sql.clear();
                            sql.push_str(&prefix);
                            for i in 0..n {
                                if i > 0 {
                                    sql.push(',');
                                }
                                let p = 5 * i;
                                let _ = write!(
                                    sql,
                                    "(${},${},${},${},${})",
                                    p + 1,
                                    p + 2,
                                    p + 3,
                                    p + 4,
                                    p + 5
                                );
                            }
                            let s = pg::timed(client.prepare(&sql))
                                .await
                                .context("cannot prepare the load's INSERT")?;
                            prepared.entry(n).or_insert(s)
                        }
                    };
                    let rows: Vec<Row> = {
                        let mut rng = rand::thread_rng();
                        (0..n).map(|_| gen.row(&mut rng)).collect()
                    };
                    let params: Vec<Option<TextParam>> = rows
                        .iter()
                        .flat_map(Row::params)
                        .map(|v| v.map(TextParam))
                        .collect();
                    pg::timed(client.execute_raw(statement, params.iter()))
                        .await
                        .context("an INSERT of the load failed")?
                } else {
                    sql.clear();
                    sql.push_str(&prefix);
                    {
                        let mut rng = rand::thread_rng();
                        for i in 0..n {
                            if i > 0 {
                                sql.push(',');
                            }
                            gen.row(&mut rng).write_tuple(&mut sql);
                        }
                    }
                    // One round trip (`execute` with a statement text is two: Parse and
                    // Describe, then Bind and Execute).
                    rows_inserted(
                        &pg::timed(client.simple_query(sql.as_str()))
                            .await
                            .context("an INSERT of the load failed")?,
                    )
                };
                inserted += done;
            }
            Ok::<u64, anyhow::Error>(inserted)
        });
    }
    let mut inserted = 0;
    while let Some(r) = tasks.join_next().await {
        inserted += r.context("a load task failed")??;
    }
    Ok(LoadReport {
        inserted,
        elapsed: started.elapsed(),
    })
}

/// The rows a simple query's INSERT inserted.
fn rows_inserted(messages: &[tokio_postgres::SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => *n,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        for bad in ["", "s", "10x", "-1s", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn popularity_is_skewed() {
        let g = Generator::new(100);
        let mut rng = rand::thread_rng();
        let mut counts = [0u32; 100];
        for _ in 0..20_000 {
            counts[g.zipf.sample(&mut rng)] += 1;
        }
        assert!(
            counts[0] > 5 * counts[49],
            "{} vs {}",
            counts[0],
            counts[49]
        );
    }

    #[test]
    fn tuples_are_sql_and_carry_the_parameters_values() {
        let g = Generator::new(3);
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let row = g.row(&mut rng);
            let mut s = String::new();
            row.write_tuple(&mut s);
            assert!(s.starts_with('(') && s.ends_with("')"), "{s}");
            let [c, u, t, d, dev] = row.params();
            let expected = format!(
                "({},{},'{}',{},'{}')",
                c.unwrap(),
                u.unwrap(),
                t.unwrap(),
                d.unwrap_or("NULL"),
                dev.unwrap()
            );
            assert_eq!(s, expected);
        }
    }
}
