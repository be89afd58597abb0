//! Sink A — ClickHouse (docs/sinks.md, "ClickHouse"): one RowBinary INSERT per write into
//! a ReplacingMergeTree keyed by (content_id, event_id) with version `source_lsn`, so a
//! replayed copy collapses with the original under `FINAL`.

mod client;
mod config;
mod schema;
mod shards;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use client::ClickHouse;
pub use config::ClickHouseConfig;
pub use schema::{migrate, Layout};
pub use shards::Shards;

use super::retry::RetryPolicy;
use super::{BoxFuture, Delivery, Sink, SinkError};
use crate::enrich::EnrichedEvent;
use crate::ops::metrics::Metrics;
use bytes::BytesMut;

/// ClickHouse makes a part per INSERT and merges them in the background: at most about
/// five small inserts a second keep that cheap. Full batches go at once.
const LINGER: Duration = Duration::from_millis(200);

/// While catching up, how long a write waits to fill to the write limit. Every INSERT is a
/// part to merge, and on a cluster's replicated tables a round of ZooKeeper operations
/// (about 30 ms of ZooKeeper's CPU an insert measured here): the 200 ms linger alone cut a
/// cluster's catch-up into inserts of 8,000 rows a shard.
const FILL_WAIT: Duration = Duration::from_secs(1);

/// How long one INSERT may take to send and to be answered.
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ClickHouseSink {
    ch: ClickHouse,
    client: clickhouse::Client,
    layout: Layout,
    /// `[clickhouse] shard_urls`: inserts go straight to each shard's `{table}_local`.
    shards: Option<Shards>,
    /// `{table}_local`, the table of each shard.
    local_table: String,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
}

impl ClickHouseSink {
    /// Connect, detect the layout from the server's version, check the table.
    pub async fn connect(cfg: &ClickHouseConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let ch = ClickHouse::new(cfg)?;
        let version = ch.server_version().await?;
        let layout = Layout::for_version(&version)?;
        schema::check_table(&ch, layout).await?;
        let shards = if cfg.shard_urls.is_empty() {
            None
        } else {
            Some(Shards::connect(&ch, false).await?)
        };
        Ok(ClickHouseSink {
            client: ch.in_database(),
            local_table: format!("{}_local", cfg.table),
            ch,
            layout,
            shards,
            metrics,
            retry: RetryPolicy::until_success(),
        })
    }

    /// One attempt of a write: one INSERT through `url`, or, straight to the shards, one
    /// INSERT into each shard still `pending` (those at once); the shards that took their
    /// rows are not written again when another is retried.
    async fn insert_once<'e>(
        &self,
        events: &[&'e EnrichedEvent],
        pending: &Mutex<Vec<(usize, Vec<&'e EnrichedEvent>)>>,
    ) -> Result<(), SinkError> {
        let Some(shards) = &self.shards else {
            let table = &self.ch.config().table;
            return write_rows(&self.client, table, self.layout, events)
                .await
                .map_err(|e| self.ch.classify(&e));
        };
        let todo = std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()));
        let results =
            futures_util::future::join_all(todo.into_iter().map(|(i, rows)| async move {
                let result = shards
                    .shard(i)
                    .insert(&self.local_table, self.layout, &rows)
                    .await;
                (i, rows, result)
            }))
            .await;
        let mut failed = Vec::new();
        let mut error: Option<SinkError> = None;
        for (i, rows, result) in results {
            if let Err(e) = result {
                // A permanent error wins: no retry can fix it.
                if !matches!(error, Some(SinkError::Permanent { .. })) {
                    error = Some(e);
                }
                failed.push((i, rows));
            }
        }
        *pending.lock().unwrap_or_else(|p| p.into_inner()) = failed;
        error.map_or(Ok(()), Err)
    }

    /// Insert `events` as one INSERT (one per shard with `shard_urls`), retrying transient
    /// failures until it succeeds.
    pub async fn insert(&self, events: &[&EnrichedEvent]) -> Result<(), SinkError> {
        if events.is_empty() {
            return Ok(());
        }
        let pending = Mutex::new(match &self.shards {
            Some(shards) => shards.split(events),
            None => Vec::new(),
        });
        let pending = &pending;
        let what = || format!("insert of {} rows", events.len());
        let outcome = self
            .retry
            .run("clickhouse", &what, Some(&self.metrics), || {
                self.insert_once(events, pending)
            })
            .await;
        match outcome {
            Ok(()) => Ok(()),
            Err(exhausted) => {
                // Name the column when the table no longer matches.
                if let Err(e) = schema::check_table(&self.ch, self.layout).await {
                    return Err(SinkError::permanent(format!("{e:#}")));
                }
                Err(SinkError::permanent(format!(
                    "ClickHouse refused the insert into {}: {}",
                    self.ch.config().table,
                    exhausted.error
                )))
            }
        }
    }
}

/// Rows are sent in chunks of about this size while the INSERT is under way.
const CHUNK_BYTES: usize = 256 * 1024 - 2048;

/// One INSERT of `events` into `table` as the rows of `layout`, in RowBinary written here
/// (docs/benchmarks.md, "RowBinary written by the engine"), sent in chunks of about 256 KiB.
pub(super) async fn write_rows(
    client: &clickhouse::Client,
    table: &str,
    layout: Layout,
    events: &[&EnrichedEvent],
) -> Result<(), clickhouse::error::Error> {
    let timeouts = Some(INSERT_TIMEOUT);
    let mut insert = client
        .insert_formatted_with(insert_statement(table, layout))
        .with_timeouts(timeouts, timeouts);
    let mut buf = BytesMut::with_capacity(CHUNK_BYTES + 2048);
    for e in events {
        layout.write_row(e, &mut buf);
        if buf.len() >= CHUNK_BYTES {
            insert.send(buf.split().freeze()).await?;
        }
    }
    if !buf.is_empty() {
        insert.send(buf.split().freeze()).await?;
    }
    insert.end().await
}

/// `INSERT INTO `table`(`col`, …) FORMAT RowBinary`, names quoted as identifiers.
fn insert_statement(table: &str, layout: Layout) -> String {
    let mut sql = String::from("INSERT INTO ");
    quote_identifier(table, &mut sql);
    sql.push('(');
    for (i, (name, _)) in layout.columns().iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        quote_identifier(name, &mut sql);
    }
    sql.push_str(") FORMAT RowBinary");
    sql
}

/// A ClickHouse identifier in backquotes, its backslashes, quotes, backquotes, tabs and
/// newlines escaped with a backslash.
fn quote_identifier(name: &str, out: &mut String) {
    out.push('`');
    for c in name.chars() {
        if matches!(c, '\\' | '\'' | '`' | '\t' | '\n') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
}

impl Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    fn linger(&self) -> Duration {
        LINGER
    }

    fn fill_wait(&self) -> Duration {
        FILL_WAIT
    }

    /// Fewer, larger parts while catching up: ClickHouse merges less. One server: four
    /// batches. Straight to the shards: eight batches a shard, since a write is split among
    /// them and each shard's INSERT into a replicated table is a part to merge on every
    /// replica and a round of ZooKeeper operations; halving their number cut a clusters
    /// catch-up's ClickHouse and ZooKeeper CPU by a third (docs/benchmarks.md, "Larger
    /// inserts straight to the shards"). The pipeline's budget grows with the write, so the
    /// source goes on reading while it is out.
    fn write_limit(&self, max_batch_rows: usize) -> usize {
        self.shards
            .as_ref()
            .map_or(4 * max_batch_rows, |s| 8 * max_batch_rows * s.count())
    }

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            self.insert(events).await?;
            Ok(Delivery::default())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_names_every_column_of_the_layout_in_backquotes() {
        assert_eq!(
            insert_statement("events_enriched", Layout::Modern),
            "INSERT INTO `events_enriched`(`event_id`,`content_id`,`user_id`,`duration_ms`,\
             `device`,`content_type`,`length_seconds`,`engagement_seconds`,`engagement_pct`,\
             `source_lsn`,`event_type`,`event_ts`) FORMAT RowBinary"
        );
        assert!(insert_statement("t", Layout::Legacy)
            .ends_with(",`event_ts`,`event_ts_us`) FORMAT RowBinary"));
        let mut quoted = String::new();
        quote_identifier("a`b\\c'd", &mut quoted);
        assert_eq!(quoted, "`a\\`b\\\\c\\'d`");
    }
}
