//! Sink A — ClickHouse (SPEC §5): the version-aware schema (`setup` applies it) and the
//! RowBinary insert of each batch.

use anyhow::{anyhow, bail, Context};

use crate::config::{redact_url, ClickHouseConfig};

const MIGRATION: &str = include_str!("../../migrations/clickhouse/001_events_enriched.sql");
const MIGRATION_LEGACY: &str =
    include_str!("../../migrations/clickhouse/001_events_enriched_legacy.sql");

/// Which table layout the server has: `DateTime64` from 20.1 on, the legacy one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Modern,
    /// `event_ts DateTime('UTC')` plus `event_ts_us Int64`, `event_type String`.
    Legacy,
}

impl Layout {
    /// From `SELECT version()`, e.g. `18.16.1` or `24.3.2.23`.
    pub fn for_version(version: &str) -> anyhow::Result<Layout> {
        let mut parts = version.split('.');
        let major: u32 = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("cannot read ClickHouse version {version:?}"))?;
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Ok(if (major, minor) >= (20, 1) {
            Layout::Modern
        } else {
            Layout::Legacy
        })
    }

    /// The expected columns and their ClickHouse types, in table order.
    pub fn columns(self) -> Vec<(&'static str, &'static str)> {
        let mut cols = vec![
            ("event_id", "Int64"),
            ("content_id", "Int64"),
            ("user_id", "Int64"),
            (
                "event_type",
                match self {
                    Layout::Modern => "LowCardinality(String)",
                    Layout::Legacy => "String",
                },
            ),
            (
                "event_ts",
                match self {
                    Layout::Modern => "DateTime64(6, 'UTC')",
                    Layout::Legacy => "DateTime('UTC')",
                },
            ),
            ("duration_ms", "Nullable(Int32)"),
            ("device", "Nullable(String)"),
            ("content_type", "Nullable(String)"),
            ("length_seconds", "Nullable(Int32)"),
            ("engagement_seconds", "Nullable(Float64)"),
            ("engagement_pct", "Nullable(Float64)"),
            ("source_lsn", "UInt64"),
        ];
        if self == Layout::Legacy {
            cols.push(("event_ts_us", "Int64"));
        }
        cols
    }

    fn migration(self) -> &'static str {
        match self {
            Layout::Modern => MIGRATION,
            Layout::Legacy => MIGRATION_LEGACY,
        }
    }
}

/// A client for `[clickhouse]`; validation off, as 18.16 needs (SPEC §13).
pub fn client(cfg: &ClickHouseConfig) -> clickhouse::Client {
    let mut c = clickhouse::Client::default()
        .with_url(cfg.url.trim_end_matches('/'))
        .with_user(&cfg.user)
        .with_validation(false)
        .with_compression(clickhouse::Compression::None);
    if !cfg.password.is_empty() {
        c = c.with_password(cfg.password.expose());
    }
    c
}

/// One line for a ClickHouse error: unreachable, rejected credentials, or the server's text.
pub fn explain(err: &clickhouse::error::Error, cfg: &ClickHouseConfig) -> anyhow::Error {
    let url = redact_url(&cfg.url);
    let text = crate::pg::error_text(err);
    if matches!(err, clickhouse::error::Error::Network(_)) {
        if text.contains("refused") || text.contains("Connect") || text.contains("connect") {
            return anyhow!(
                "cannot reach ClickHouse at {url}: connection refused; is it running? check [clickhouse] url (ENGAGEMENT_CDC__CLICKHOUSE__URL)"
            );
        }
        return anyhow!("cannot reach ClickHouse at {url}: {text}; check [clickhouse] url");
    }
    if text.contains("Code: 516") || text.contains("Code: 192") || text.contains("Code: 193") {
        return anyhow!(
            "ClickHouse at {url} rejected user {:?}: {}; fix [clickhouse] user and password",
            cfg.user,
            first_line(&text)
        );
    }
    if matches!(err, clickhouse::error::Error::TimedOut) {
        return anyhow!(
            "ClickHouse at {url} did not answer in time; check its load and the network"
        );
    }
    anyhow!("ClickHouse at {url}: {}", first_line(&text))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

pub async fn server_version(
    client: &clickhouse::Client,
    cfg: &ClickHouseConfig,
) -> anyhow::Result<String> {
    let query = client.query("SELECT version()").fetch_one::<String>();
    match tokio::time::timeout(std::time::Duration::from_secs(10), query).await {
        Ok(answer) => answer.map_err(|e| explain(&e, cfg)),
        Err(_) => Err(anyhow!(
            "ClickHouse at {} did not answer within 10 s; check that it is running and not overloaded",
            redact_url(&cfg.url)
        )),
    }
}

/// Create the database and table when missing (the layout for this server's version), then
/// check that the table has every column the engine writes with the right type.
pub async fn migrate(cfg: &ClickHouseConfig) -> anyhow::Result<(Layout, String)> {
    let client = client(cfg);
    let version = server_version(&client, cfg).await?;
    let layout = Layout::for_version(&version)?;
    let sql = layout
        .migration()
        .replace("{database}", &cfg.database)
        .replace("{table}", &cfg.table);
    for statement in split_statements(&sql) {
        client
            .query(&statement)
            .execute()
            .await
            .map_err(|e| explain(&e, cfg))
            .with_context(|| {
                format!(
                    "cannot apply the ClickHouse migration to {}.{}",
                    cfg.database, cfg.table
                )
            })?;
    }
    check_table(&client, cfg, layout).await?;
    Ok((layout, version))
}

/// The table has each column of `layout` with the same type; extra columns are allowed.
pub async fn check_table(
    client: &clickhouse::Client,
    cfg: &ClickHouseConfig,
    layout: Layout,
) -> anyhow::Result<()> {
    let rows: Vec<(String, String)> = client
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(&cfg.database)
        .bind(&cfg.table)
        .fetch_all()
        .await
        .map_err(|e| explain(&e, cfg))?;
    if rows.is_empty() {
        bail!(
            "ClickHouse table {}.{} does not exist; run `engagement-cdc setup`",
            cfg.database,
            cfg.table
        );
    }
    for (name, ty) in layout.columns() {
        match rows.iter().find(|(n, _)| n == name) {
            None => bail!(
                "ClickHouse table {}.{} has no column {name:?} ({ty}); add it, or drop the table and run `engagement-cdc setup`",
                cfg.database,
                cfg.table
            ),
            Some((_, actual)) if normalize_type(actual) != normalize_type(ty) => bail!(
                "ClickHouse column {}.{}.{name} is {actual}, but the engine writes {ty}; alter it, or drop the table and run `engagement-cdc setup`",
                cfg.database,
                cfg.table
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

fn normalize_type(t: &str) -> String {
    t.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Statements of a migration file: comments dropped, split at `;`.
fn split_statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_version() {
        assert_eq!(Layout::for_version("18.16.1").unwrap(), Layout::Legacy);
        assert_eq!(Layout::for_version("19.17.4.11").unwrap(), Layout::Legacy);
        assert_eq!(Layout::for_version("20.1.2.4").unwrap(), Layout::Modern);
        assert_eq!(Layout::for_version("24.3.2.23").unwrap(), Layout::Modern);
        assert!(Layout::for_version("x").is_err());
    }

    #[test]
    fn migrations_split_into_two_statements_each() {
        for layout in [Layout::Modern, Layout::Legacy] {
            let stmts = split_statements(layout.migration());
            assert_eq!(stmts.len(), 2, "{stmts:?}");
            assert!(stmts[0].starts_with("CREATE DATABASE IF NOT EXISTS {database}"));
            assert!(stmts[1].contains("ReplacingMergeTree(source_lsn)"));
            for (name, _) in layout.columns() {
                assert!(stmts[1].contains(name), "{name} missing from the migration");
            }
        }
    }
}

/// A row of the modern layout, in RowBinary.
#[derive(clickhouse::Row, serde::Serialize)]
struct ModernRow<'a> {
    event_id: i64,
    content_id: i64,
    user_id: i64,
    event_type: &'a str,
    /// DateTime64(6): microseconds since the epoch.
    event_ts: i64,
    duration_ms: Option<i32>,
    device: Option<&'a str>,
    content_type: Option<&'a str>,
    length_seconds: Option<i32>,
    engagement_seconds: Option<f64>,
    engagement_pct: Option<f64>,
    source_lsn: u64,
}

/// A row of the legacy layout (ClickHouse before 20.1).
#[derive(clickhouse::Row, serde::Serialize)]
struct LegacyRow<'a> {
    event_id: i64,
    content_id: i64,
    user_id: i64,
    event_type: &'a str,
    /// DateTime: whole seconds since the epoch (0 for earlier times; `event_ts_us` is exact).
    event_ts: u32,
    duration_ms: Option<i32>,
    device: Option<&'a str>,
    content_type: Option<&'a str>,
    length_seconds: Option<i32>,
    engagement_seconds: Option<f64>,
    engagement_pct: Option<f64>,
    source_lsn: u64,
    event_ts_us: i64,
}

fn modern_row(e: &crate::enrich::EnrichedEvent) -> ModernRow<'_> {
    ModernRow {
        event_id: e.event_id,
        content_id: e.content_id,
        user_id: e.user_id,
        event_type: &e.event_type,
        event_ts: e.event_ts_us,
        duration_ms: e.duration_ms,
        device: e.device.as_deref(),
        content_type: e.content_type.as_deref(),
        length_seconds: e.length_seconds,
        engagement_seconds: e.engagement_seconds_f64(),
        engagement_pct: e.engagement_pct_f64(),
        source_lsn: e.source_lsn.0,
    }
}

fn legacy_row(e: &crate::enrich::EnrichedEvent) -> LegacyRow<'_> {
    LegacyRow {
        event_id: e.event_id,
        content_id: e.content_id,
        user_id: e.user_id,
        event_type: &e.event_type,
        event_ts: e
            .event_ts_us
            .div_euclid(1_000_000)
            .clamp(0, u32::MAX as i64) as u32,
        duration_ms: e.duration_ms,
        device: e.device.as_deref(),
        content_type: e.content_type.as_deref(),
        length_seconds: e.length_seconds,
        engagement_seconds: e.engagement_seconds_f64(),
        engagement_pct: e.engagement_pct_f64(),
        source_lsn: e.source_lsn.0,
        event_ts_us: e.event_ts_us,
    }
}

/// The ClickHouse sink: one RowBinary INSERT per batch into a ReplacingMergeTree keyed by
/// (content_id, event_id) with version `source_lsn`, so a replayed copy collapses with the
/// original (`FINAL`).
pub struct ClickHouseSink {
    client: clickhouse::Client,
    cfg: ClickHouseConfig,
    layout: Layout,
    table: String,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl ClickHouseSink {
    /// Connect, detect the layout from the server's version, check the table.
    pub async fn connect(
        cfg: &ClickHouseConfig,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> anyhow::Result<ClickHouseSink> {
        let client = client(cfg);
        let version = server_version(&client, cfg).await?;
        let layout = Layout::for_version(&version)?;
        check_table(&client, cfg, layout).await?;
        Ok(ClickHouseSink {
            // The crate quotes the table name as one identifier: name the database apart.
            client: client.with_database(&cfg.database),
            cfg: cfg.clone(),
            layout,
            table: cfg.table.clone(),
            metrics,
        })
    }

    // One branch per layout: the crate's row types borrow, which a generic helper cannot name.
    async fn insert_once(
        &self,
        events: &[&crate::enrich::EnrichedEvent],
    ) -> Result<(), clickhouse::error::Error> {
        let timeouts = Some(std::time::Duration::from_secs(30));
        match self.layout {
            Layout::Modern => {
                let mut insert = self
                    .client
                    .insert::<ModernRow<'_>>(&self.table)
                    .await?
                    .with_timeouts(timeouts, timeouts);
                for e in events {
                    insert.write(&modern_row(e)).await?;
                }
                insert.end().await
            }
            Layout::Legacy => {
                let mut insert = self
                    .client
                    .insert::<LegacyRow<'_>>(&self.table)
                    .await?
                    .with_timeouts(timeouts, timeouts);
                for e in events {
                    insert.write(&legacy_row(e)).await?;
                }
                insert.end().await
            }
        }
    }

    /// Insert `events` (one INSERT), retrying transient failures until it succeeds.
    pub async fn insert(&self, events: &[&crate::enrich::EnrichedEvent]) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut backoff = super::Backoff::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(5),
        );
        loop {
            match self.insert_once(events).await {
                Ok(()) => return Ok(()),
                Err(e) if is_permanent(&e) => {
                    // Name the column when the table no longer matches.
                    check_table(&self.client, &self.cfg, self.layout).await?;
                    return Err(explain(&e, &self.cfg)
                        .context(format!("ClickHouse refused the insert into {}", self.table)));
                }
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        crate::metrics::Metrics::add(&m.sink_retries, 1);
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        "{:#}; retrying the insert of {} rows in {delay:?} (attempt {})",
                        explain(&e, &self.cfg),
                        events.len(),
                        backoff.attempts()
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Errors a retry cannot fix: the table or a column is missing or of another type.
fn is_permanent(e: &clickhouse::error::Error) -> bool {
    let text = e.to_string();
    [
        "Code: 16,",
        "Code: 60,",
        "Code: 81,",
        "Code: 53,",
        "Code: 516,",
        "Code: 192,",
        "Code: 193,",
        "Code: 497,",
    ]
    .iter()
    .any(|c| text.contains(c))
        || matches!(e, clickhouse::error::Error::SchemaMismatch(_))
}

/// ClickHouse makes a part per INSERT and merges them in the background: at most about
/// five small inserts a second keep that cheap. Full batches go at once.
const CLICKHOUSE_LINGER: std::time::Duration = std::time::Duration::from_millis(200);

impl super::Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    fn linger(&self) -> std::time::Duration {
        CLICKHOUSE_LINGER
    }

    /// Fewer, larger parts while catching up: ClickHouse merges less.
    fn write_limit(&self, max_batch_rows: usize) -> usize {
        4 * max_batch_rows
    }

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a crate::enrich::EnrichedEvent],
    ) -> super::BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { self.insert(events).await })
    }
}
