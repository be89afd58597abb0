-- engagement.events_enriched for ClickHouse older than 20.1 (no DateTime64; Debian's 18.16):
-- event_ts at second precision plus event_ts_us, microseconds since the epoch, so nothing is lost.
-- `setup` replaces {database} and {table} with [clickhouse] database and table.
CREATE DATABASE IF NOT EXISTS {database};

CREATE TABLE IF NOT EXISTS {database}.{table} (
  event_id Int64, content_id Int64, user_id Int64,
  event_type String, event_ts DateTime('UTC'),
  duration_ms Nullable(Int32), device Nullable(String),
  content_type Nullable(String), length_seconds Nullable(Int32),
  engagement_seconds Nullable(Float64), engagement_pct Nullable(Float64),
  source_lsn UInt64, event_ts_us Int64
) ENGINE = ReplacingMergeTree(source_lsn)
ORDER BY (content_id, event_id);
