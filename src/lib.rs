//! engagement-cdc: a PostgreSQL logical-replication sidecar that enriches every new
//! `engagement_events` row with its `content` row and delivers it to ClickHouse, Redis and an
//! external HTTP API, exactly once in effect, with its LSN checkpoint in a local sled store.
//!
//! # Layout
//!
//! Data flows one way, and the folders say so:
//!
//! ```text
//! source/ ──► enrich/ ──► pipeline/ ──► sinks/
//!                            │
//!                            ▼
//!                         state/  (checkpoint, dimension, identity, dead letters)
//! ```
//!
//! - `source/` — the replication connection, our pgoutput decoder, typed rows, the source
//!   tables' schema, ordinary Postgres connections and checks, and the session loop that
//!   cuts committed transactions into batches.
//! - `enrich/` — the `content` dimension, the join, the derived-field arithmetic, the
//!   enriched event's JSON and the UTC calendar.
//! - `pipeline/` — fan-out to the sinks, the in-flight budget, ack tracking → checkpoint.
//! - `journal/` — the durable local log between the stream and the sinks: segment files,
//!   their record format, budget and retention, and the readers of sinks and `replay`.
//! - `sinks/` — the `Sink` contract, the one retry policy, the factory that builds the
//!   enabled sinks, and one module per destination with its `[section]` configuration.
//! - `state/` — the sled store behind small traits: checkpoint and dimension, identity,
//!   dead letters.
//! - `commands/` — one file per subcommand (`run`, `setup`, `status`, `backfill`, `dlq`,
//!   `load`, `mock-api`).
//! - `ops/` — metrics and the engine's HTTP server (`/metrics`, `/status`, the dashboard).
//! - `config/` — loading the TOML file and `ENGAGEMENT_CDC__SECTION__KEY` overrides into
//!   the typed sections, which live beside their layers; `checks` — the typed values and
//!   checks they share (a leaf, so there is no cycle between `config/` and the layers).
//! - `tls` — one rustls stack for every connection: roots, client certificates, how much
//!   is verified, and what a failed handshake means.
//! - `backoff` — exponential backoff with jitter for every retry loop.
//! - [`error`] — errors a caller decides on (exit codes); `types` — `Lsn` and ids.
//!
//! The product contract these modules implement is in `docs/` (architecture, sinks,
//! configuration, guarantees); comments cite it by file and section.
//!
//! # Guarantees
//!
//! The checkpoint is the commit end LSN of the last transaction that is durable in the
//! journal (`journal/`; with the journal off, whose every effect is durable in every enabled
//! sink); it is flushed to sled, together with the dimension as of that LSN, before
//! Postgres is told. Each sink's cursor in the journal says what it has made durable. It never moves backward. Sinks receive events at least
//! once and make repeats harmless, so the effect is exactly once. `docs/guarantees.md` lists
//! the tests that prove each guarantee.

pub(crate) mod backoff;
pub mod checks;
pub mod commands;
pub mod config;
pub mod enrich;
pub mod error;
pub mod journal;
pub(crate) mod ops;
pub(crate) mod pipeline;
pub mod sinks;
pub mod source;
pub(crate) mod state;
pub mod tls;
pub mod types;
