//! Counters of the running engine: one struct of atomics, shared by the source, the
//! pipeline and the sinks, rendered as Prometheus text on `/metrics` and as JSON on
//! `/status`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Every counter the engine keeps. Gauges are the ones whose doc says so.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Gauge: commit time (µs since 1970) of the last checkpointed transaction.
            pub last_commit_us: AtomicI64,
        }

        impl Metrics {
            /// (name, help, value) of every counter.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), concat!($($doc),*), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Events (inserts into the events table) read from the stream.
    events_streamed,
    /// Event rows skipped because a required value was NULL or unreadable.
    events_invalid,
    /// Events with a negative duration (derived fields NULL).
    events_negative_duration,
    /// Events whose content_id had no content row.
    events_unknown_content,
    /// Changes to the content dimension applied.
    content_changes,
    /// UPDATE, DELETE and TRUNCATE of the events table, ignored.
    event_changes_ignored,
    /// Changes to tables the engine does not read, ignored.
    other_changes_ignored,
    /// Transactions committed and read.
    transactions,
    /// Transactions skipped on replay (at or below the checkpoint).
    transactions_replayed_skipped,
    /// Batches handed to the sinks.
    batches,
    /// Events the sinks made durable (counted once per batch, when every sink acked it).
    events_delivered,
    /// Gauge: the checkpoint LSN.
    checkpoint_lsn,
    /// Gauge: the server's WAL end as last reported.
    server_wal_end,
    /// Replication sessions started (1 + reconnects).
    replication_sessions,
    /// Retries of sink writes after transient failures.
    sink_retries,
    /// Events dead-lettered by the HTTP sink.
    http_dead_lettered,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition, every name prefixed `engagement_cdc_`.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in self.snapshot() {
            let kind = if help.starts_with("Gauge") {
                "gauge"
            } else {
                "counter"
            };
            out.push_str(&format!(
                "# HELP engagement_cdc_{name} {help}\n# TYPE engagement_cdc_{name} {kind}\nengagement_cdc_{name} {value}\n"
            ));
        }
        out
    }
}
