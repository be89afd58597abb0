//! The destinations. Each sink is one file; all of them implement [`Sink`].

pub mod clickhouse;
