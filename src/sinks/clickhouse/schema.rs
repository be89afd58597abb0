//! The ClickHouse table (docs/sinks.md, "ClickHouse"): its two layouts, the row type of
//! each — every column's name, Rust type, ClickHouse type and value defined once, in
//! `event_rows!` — the migration `setup` applies, and the check that the table has
//! every column the engine writes.

use anyhow::anyhow;

use super::client::ClickHouse;
use crate::enrich::EnrichedEvent;

const MIGRATION: &str = include_str!("../../../migrations/clickhouse/001_events_enriched.sql");
const MIGRATION_LEGACY: &str =
    include_str!("../../../migrations/clickhouse/001_events_enriched_legacy.sql");

/// Which table layout the server has: `DateTime64` from 20.1 on, the legacy one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Modern,
    /// `event_ts DateTime('UTC')` plus `event_ts_us Int64`, `event_type String`.
    Legacy,
}

/// Defines the row type of each layout from one list of the columns both share and the
/// columns particular to each: `name: RustType = "ClickHouse type" => |event| value`. The
/// row's field order is the INSERT's column list, so it need not follow the table's.
macro_rules! event_rows {
    (shared $shared:tt $($row:ident $own:tt)*) => {
        $(event_row!($row $shared $own);)*
    };
}

macro_rules! event_row {
    (
        $row:ident
        { $($col:ident: $ty:ty = $ch:literal => $conv:expr,)* }
        { $($vcol:ident: $vty:ty = $vch:literal => $vconv:expr,)* }
    ) => {
        #[derive(clickhouse::Row, serde::Serialize)]
        pub(super) struct $row<'a> {
            $($col: $ty,)*
            $($vcol: $vty,)*
        }

        impl<'a> $row<'a> {
            /// Every column of this layout and its ClickHouse type.
            pub(super) const COLUMNS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($col), $ch),)* $((stringify!($vcol), $vch),)*];

            pub(super) fn from_event(e: &'a EnrichedEvent) -> Self {
                $row {
                    $($col: { let f: fn(&'a EnrichedEvent) -> $ty = $conv; f(e) },)*
                    $($vcol: { let f: fn(&'a EnrichedEvent) -> $vty = $vconv; f(e) },)*
                }
            }
        }
    };
}

event_rows! {
    shared {
        event_id: i64 = "Int64" => |e| e.event_id,
        content_id: i64 = "Int64" => |e| e.content_id,
        user_id: i64 = "Int64" => |e| e.user_id,
        duration_ms: Option<i32> = "Nullable(Int32)" => |e| e.duration_ms,
        device: Option<&'a str> = "Nullable(String)" => |e| e.device.as_deref(),
        content_type: Option<&'a str> = "Nullable(String)" => |e| e.content_type.as_deref(),
        length_seconds: Option<i32> = "Nullable(Int32)" => |e| e.length_seconds,
        engagement_seconds: Option<f64> = "Nullable(Float64)" => |e| e.engagement_seconds_f64(),
        engagement_pct: Option<f64> = "Nullable(Float64)" => |e| e.engagement_pct_f64(),
        source_lsn: u64 = "UInt64" => |e| e.source_lsn.0,
    }
    ModernRow {
        event_type: &'a str = "LowCardinality(String)" => |e| &e.event_type,
        // DateTime64(6): microseconds since the epoch.
        event_ts: i64 = "DateTime64(6, 'UTC')" => |e| e.event_ts_us,
    }
    LegacyRow {
        event_type: &'a str = "String" => |e| &e.event_type,
        // DateTime: whole seconds (0 before 1970); `event_ts_us` is exact.
        event_ts: u32 = "DateTime('UTC')" => |e| e.event_ts_us.div_euclid(1_000_000).clamp(0, u32::MAX as i64) as u32,
        event_ts_us: i64 = "Int64" => |e| e.event_ts_us,
    }
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

    /// The columns the engine writes and their ClickHouse types.
    pub fn columns(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Layout::Modern => ModernRow::COLUMNS,
            Layout::Legacy => LegacyRow::COLUMNS,
        }
    }

    fn migration(self) -> &'static str {
        match self {
            Layout::Modern => MIGRATION,
            Layout::Legacy => MIGRATION_LEGACY,
        }
    }
}

/// The statements of a layout's migration, for one server or, with `cluster`, for a
/// cluster: the database `ON CLUSTER`, the replicated table `{table}_local` on every node
/// (ReplicatedReplacingMergeTree, still versioned by `source_lsn`), and `{table}` as the
/// Distributed table over it, sharded by `event_id` so every delivery of an event lands on
/// the same shard and `FINAL` stays exact (docs/sinks.md, "ClickHouse cluster").
fn statements(layout: Layout, cluster: &str) -> anyhow::Result<Vec<String>> {
    let single = split_statements(layout.migration());
    if cluster.is_empty() {
        return Ok(single);
    }
    let [database, table] = single.as_slice() else {
        anyhow::bail!(
            "the ClickHouse migration has {} statements, not 2",
            single.len()
        );
    };
    let rewrite = |text: &str, from: &str, to: &str| -> anyhow::Result<String> {
        if !text.contains(from) {
            anyhow::bail!("the ClickHouse migration has no {from:?} to make a cluster's");
        }
        Ok(text.replacen(from, to, 1))
    };
    let on = format!(" ON CLUSTER {cluster}");
    let local = rewrite(
        table,
        "CREATE TABLE IF NOT EXISTS {database}.{table} (",
        &format!("CREATE TABLE IF NOT EXISTS {{database}}.{{table}}_local{on} ("),
    )?;
    let local = rewrite(
        &local,
        "ENGINE = ReplacingMergeTree(source_lsn)",
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}_local', '{replica}', source_lsn)",
    )?;
    Ok(vec![
        format!("{database}{on}"),
        local,
        format!(
            "CREATE TABLE IF NOT EXISTS {{database}}.{{table}}{on} AS {{database}}.{{table}}_local \
             ENGINE = Distributed({cluster}, {{database}}, {{table}}_local, intHash64(event_id))"
        ),
    ])
}

/// Create the database and table when missing (the layout for this server's version; the
/// cluster's tables when `[clickhouse] cluster` is set), then check that the table has every
/// column the engine writes with the right type. Returns the layout and the server's version.
pub async fn migrate(ch: &ClickHouse) -> anyhow::Result<(Layout, String)> {
    let version = ch.server_version().await?;
    let layout = Layout::for_version(&version)?;
    let cfg = ch.config();
    for statement in statements(layout, &cfg.cluster)? {
        let statement = statement
            .replace("{database}", &cfg.database)
            .replace("{table}", &cfg.table);
        ch.execute(&statement).await.map_err(|e| {
            anyhow!(
                "cannot apply the ClickHouse migration to {}.{}: {e}",
                cfg.database,
                cfg.table
            )
        })?;
    }
    check_table(ch, layout).await?;
    Ok((layout, version))
}

/// The table has each column of `layout` with the same type; extra columns are allowed.
pub async fn check_table(ch: &ClickHouse, layout: Layout) -> anyhow::Result<()> {
    let cfg = ch.config();
    let rows = ch.columns().await?;
    if rows.is_empty() {
        anyhow::bail!(
            "ClickHouse table {}.{} does not exist; run `engagement-cdc setup`",
            cfg.database,
            cfg.table
        );
    }
    for &(name, ty) in layout.columns() {
        match rows.iter().find(|(n, _)| n == name) {
            None => anyhow::bail!(
                "ClickHouse table {}.{} has no column {name:?} ({ty}); add it, or drop the table and run `engagement-cdc setup`",
                cfg.database,
                cfg.table
            ),
            Some((_, actual)) if normalize_type(actual) != normalize_type(ty) => anyhow::bail!(
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
    fn migrations_create_every_column_of_their_layout() {
        for layout in [Layout::Modern, Layout::Legacy] {
            let stmts = split_statements(layout.migration());
            assert_eq!(stmts.len(), 2, "{stmts:?}");
            assert!(stmts[0].starts_with("CREATE DATABASE IF NOT EXISTS {database}"));
            assert!(stmts[1].contains("ReplacingMergeTree(source_lsn)"));
            for (name, ty) in layout.columns() {
                assert!(
                    stmts[1].contains(&format!("{name} {ty}")),
                    "{name} {ty} missing from the migration"
                );
            }
        }
        assert_eq!(Layout::Modern.columns().len(), 12);
        for layout in [Layout::Modern, Layout::Legacy] {
            let stmts = statements(layout, "c1").unwrap();
            assert_eq!(stmts.len(), 3, "{stmts:?}");
            assert!(
                stmts[0].ends_with("{database} ON CLUSTER c1"),
                "{}",
                stmts[0]
            );
            assert!(stmts[1].contains("{database}.{table}_local ON CLUSTER c1 ("));
            assert!(stmts[1].contains(
                "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}_local', '{replica}', source_lsn)"
            ));
            assert!(stmts[2]
                .contains("Distributed(c1, {database}, {table}_local, intHash64(event_id))"));
        }
        assert_eq!(Layout::Legacy.columns().len(), 13);
    }
}
