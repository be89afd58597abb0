//! The ClickHouse table (docs/sinks.md, "ClickHouse"): its two layouts, the row type of
//! each — every column's name, Rust type, ClickHouse type and value defined once, in
//! `event_rows!` — the migration `setup` applies, and the check that the table has
//! every column the engine writes.

use anyhow::anyhow;
use bytes::{BufMut, BytesMut};

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

/// Defines the row of each layout from one list of the columns both share and the columns
/// particular to each: `name: RustType = "ClickHouse type" => |event| value`. A row is
/// written in RowBinary in the order listed, which is the INSERT's column list, so it need
/// not follow the table's.
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
        pub(super) struct $row;

        impl $row {
            /// Every column of this layout and its ClickHouse type.
            pub(super) const COLUMNS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($col), $ch),)* $((stringify!($vcol), $vch),)*];

            /// `e`'s row in RowBinary, its columns in the order of `COLUMNS`.
            pub(super) fn write<'a>(e: &'a EnrichedEvent, out: &mut BytesMut) {
                $({ let f: fn(&'a EnrichedEvent) -> $ty = $conv; f(e).put(out); })*
                $({ let f: fn(&'a EnrichedEvent) -> $vty = $vconv; f(e).put(out); })*
            }
        }
    };
}

/// A value in ClickHouse's RowBinary format: numbers little-endian, a string as its LEB128
/// length then its bytes, a Nullable as a byte (1 for NULL) then the value when there is
/// one. `LowCardinality(String)`, `DateTime('UTC')` and `DateTime64(6, 'UTC')` take the
/// form of `String`, `UInt32` and `Int64`.
trait RowBinary {
    fn put(self, out: &mut BytesMut);
}

macro_rules! little_endian {
    ($($t:ty => $put:ident),*) => {
        $(impl RowBinary for $t {
            #[inline]
            fn put(self, out: &mut BytesMut) {
                out.$put(self);
            }
        })*
    };
}

little_endian!(i32 => put_i32_le, u32 => put_u32_le, i64 => put_i64_le, u64 => put_u64_le, f64 => put_f64_le);

impl RowBinary for &str {
    #[inline]
    fn put(self, out: &mut BytesMut) {
        crate::journal::codec::put_varint(out, self.len() as u64);
        out.extend_from_slice(self.as_bytes());
    }
}

impl<T: RowBinary> RowBinary for Option<T> {
    #[inline]
    fn put(self, out: &mut BytesMut) {
        match self {
            None => out.put_u8(1),
            Some(v) => {
                out.put_u8(0);
                v.put(out);
            }
        }
    }
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

    /// `e`'s row in this layout, in RowBinary (the columns of [`Layout::columns`], in order).
    pub fn write_row(self, e: &EnrichedEvent, out: &mut BytesMut) {
        match self {
            Layout::Modern => ModernRow::write(e, out),
            Layout::Legacy => LegacyRow::write(e, out),
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

    fn event() -> EnrichedEvent {
        EnrichedEvent {
            event_id: 1,
            content_id: 2,
            user_id: 3,
            event_type: "play".into(),
            event_ts_us: 1_767_882_112_163_702,
            duration_ms: Some(7000),
            device: None,
            content_type: Some("video".into()),
            length_seconds: Some(300),
            source_lsn: crate::types::Lsn(16),
            commit_us: 0,
            tx_index: 0,
        }
    }

    /// The bytes RowBinary gives `event()`'s shared columns, then `own`'s.
    fn expected(device: Option<&str>, own: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [1i64, 2, 3] {
            b.extend(v.to_le_bytes());
        }
        b.push(0);
        b.extend(7000i32.to_le_bytes());
        match device {
            None => b.push(1),
            Some(d) => {
                b.push(0);
                // LEB128 of the length (two bytes from 128 to 16,383).
                assert!((128..16_384).contains(&d.len()));
                b.extend([(d.len() as u8) | 0x80, (d.len() >> 7) as u8]);
                b.extend(d.as_bytes());
            }
        }
        b.extend([0, 5]);
        b.extend(b"video");
        b.push(0);
        b.extend(300i32.to_le_bytes());
        b.push(0);
        b.extend(7.0f64.to_le_bytes());
        b.push(0);
        b.extend(0.02f64.to_le_bytes());
        b.extend(16u64.to_le_bytes());
        for part in own {
            b.extend(*part);
        }
        b
    }

    #[test]
    fn rows_are_written_in_row_binary_column_by_column() {
        let ts = 1_767_882_112_163_702i64;
        let mut e = event();
        for device in [None, Some("d".repeat(300))] {
            e.device = device.clone().map(Into::into);
            let mut out = BytesMut::new();
            Layout::Modern.write_row(&e, &mut out);
            let want = expected(device.as_deref(), &[&[4], b"play", &ts.to_le_bytes()]);
            assert_eq!(&out[..], &want[..]);
            let mut out = BytesMut::new();
            Layout::Legacy.write_row(&e, &mut out);
            let seconds = (ts / 1_000_000) as u32;
            let want = expected(
                device.as_deref(),
                &[&[4], b"play", &seconds.to_le_bytes(), &ts.to_le_bytes()],
            );
            assert_eq!(&out[..], &want[..]);
        }
        // Every column of the layout is written: a NULL is one byte, so a row of NULLs and
        // zeros has a known length per column type.
        let mut out = BytesMut::new();
        Layout::Modern.write_row(&EnrichedEvent::default(), &mut out);
        // Int64 ×3, Nullable ×6 (NULL), UInt64, String "", Int64.
        assert_eq!(out.len(), 3 * 8 + 6 + 8 + 1 + 8);
    }

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
