//! engagement-cdc: a PostgreSQL logical-replication sidecar that enriches every new
//! `engagement_events` row with its `content` row and delivers it to ClickHouse, Redis and an
//! external HTTP API, exactly once in effect, with its LSN checkpoint in a local sled store.
//!
//! # Layout
//!
//! - [`config`] — the typed configuration: file, `ENGAGEMENT_CDC__SECTION__KEY` overrides,
//!   defaults, validation.
//! - [`pg`] — ordinary Postgres connections and the checks `setup` and `run` make.
//! - [`source`] — the replication connection, the pgoutput decoder, transactions.
//! - [`enrich`] — the `content` dimension and the derived-field arithmetic.
//! - [`checkpoint`] — the sled store: checkpoint, dimension, identity, dead-letter queue.
//! - [`sinks`] — one module per destination.
//! - [`setup`] — the `setup` subcommand.
//! - [`error`] — errors a caller decides on (exit codes).
//!
//! # Guarantees
//!
//! The checkpoint is the commit end LSN of the last transaction whose every effect is
//! durable in every enabled sink; it is flushed to sled, together with the dimension as of
//! that LSN, before Postgres is told. It never moves backward.

pub mod backfill;
pub mod checkpoint;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod enrich;
pub mod error;
pub mod load;
pub mod metrics;
pub mod mock_api;
pub mod pg;
pub mod pipeline;
pub mod server;
pub mod setup;
pub mod sinks;
pub mod source;
pub mod status;
pub mod types;
