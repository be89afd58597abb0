//! engagement-cdc: a PostgreSQL logical-replication sidecar that enriches every new
//! `engagement_events` row with its `content` row and delivers it to ClickHouse, Redis and an
//! external HTTP API, exactly once in effect, with its LSN checkpoint in a local sled store.
//!
//! # Layout
//!
//! Data flows one way: slot → [`source`] → [`enrich`] → [`pipeline`] → [`sinks`], with the
//! checkpoint in [`checkpoint`].
//!
//! - [`config`] — the typed configuration: file, `ENGAGEMENT_CDC__SECTION__KEY` overrides,
//!   defaults, validation.
//! - [`pg`] — ordinary Postgres connections and the checks `setup` and `run` make.
//! - [`source`] — the replication connection, our pgoutput decoder ([`source::pgoutput`]),
//!   typed rows ([`source::rows`]) and the session loop that cuts batches
//!   ([`source::stream`]).
//! - [`enrich`] — the `content` dimension, the join, the derived-field arithmetic, the JSON.
//! - [`pipeline`] — fan-out to the sinks, the in-flight budget, ack tracking → checkpoint.
//! - [`checkpoint`] — the sled store: checkpoint, dimension, identity; [`dlq`] keeps the
//!   HTTP sink's dead letters there too.
//! - [`sinks`] — the [`sinks::Sink`] trait and one module per destination.
//! - [`engine`] — `run`: preflight, sinks, sessions, reconnects, shutdown.
//! - [`server`] — the engine's HTTP endpoints; [`metrics`] — what they show.
//! - [`setup`], [`status`], [`backfill`], [`load`], [`mock_api`] — the other subcommands.
//! - [`error`] — errors a caller decides on (exit codes); [`types`] — `Lsn` and ids.
//!
//! # Guarantees
//!
//! The checkpoint is the commit end LSN of the last transaction whose every effect is
//! durable in every enabled sink; it is flushed to sled, together with the dimension as of
//! that LSN, before Postgres is told. It never moves backward. Sinks receive events at least
//! once and make repeats harmless, so the effect is exactly once. `docs/guarantees.md` lists
//! the tests that prove each guarantee.

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
