//! Counters of the running engine: one struct of atomics, shared by the source, the
//! pipeline and the sinks, rendered as Prometheus text on `/metrics` and as JSON on
//! `/status`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Every counter the engine keeps. Gauges are the ones whose doc says so.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Gauge: commit time (µs since 1970) of the last checkpointed transaction.
            pub last_commit_us: AtomicI64,
            /// Commit-to-durable latency per sink.
            latencies: Mutex<Vec<(&'static str, Arc<Histogram>)>>,
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

/// Latencies in 1 ms buckets up to 10 s (and one overflow bucket): quantiles exact to the
/// millisecond, one relaxed atomic add per sample.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

const HISTOGRAM_MS: usize = 10_000;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..=HISTOGRAM_MS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record_us(&self, us: u64, n: u64) {
        let ms = ((us / 1000) as usize).min(HISTOGRAM_MS);
        self.buckets[ms].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_us.fetch_add(us * n, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The upper bound (ms) of the bucket holding quantile `q`, or `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(ms as u64 + 1);
            }
        }
        Some(HISTOGRAM_MS as u64 + 1)
    }

    pub fn summary(&self) -> serde_json::Value {
        let count = self.count();
        serde_json::json!({
            "count": count,
            "p50_ms": self.quantile_ms(0.50),
            "p99_ms": self.quantile_ms(0.99),
            "max_ms": (count > 0).then(|| self.max_us.load(Ordering::Relaxed) as f64 / 1000.0),
            "mean_ms": (count > 0).then(|| self.sum_us.load(Ordering::Relaxed) as f64 / count as f64 / 1000.0),
        })
    }
}

impl Metrics {
    /// The commit-to-durable latency histogram of a sink (created on first use).
    pub fn latency(&self, sink: &'static str) -> Arc<Histogram> {
        let mut l = self.latencies.lock().expect("metrics lock");
        if let Some((_, h)) = l.iter().find(|(n, _)| *n == sink) {
            return h.clone();
        }
        let h = Arc::new(Histogram::default());
        l.push((sink, h.clone()));
        h
    }

    /// `{sink: {count, p50_ms, p99_ms, max_ms, mean_ms}}`.
    pub fn latency_summary(&self) -> serde_json::Value {
        let l = self.latencies.lock().expect("metrics lock");
        serde_json::Value::Object(
            l.iter()
                .map(|(n, h)| (n.to_string(), h.summary()))
                .collect(),
        )
    }

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
        let l = self.latencies.lock().expect("metrics lock");
        if !l.is_empty() {
            out.push_str("# HELP engagement_cdc_commit_to_sink_ms Commit-to-durable latency per sink, quantiles in ms.\n# TYPE engagement_cdc_commit_to_sink_ms summary\n");
        }
        for (sink, h) in l.iter() {
            for q in [0.5, 0.99] {
                if let Some(v) = h.quantile_ms(q) {
                    out.push_str(&format!(
                        "engagement_cdc_commit_to_sink_ms{{sink=\"{sink}\",quantile=\"{q}\"}} {v}\n"
                    ));
                }
            }
            out.push_str(&format!(
                "engagement_cdc_commit_to_sink_ms_count{{sink=\"{sink}\"}} {}\n",
                h.count()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_to_the_millisecond() {
        let h = Histogram::default();
        assert_eq!(h.quantile_ms(0.99), None);
        for ms in 0..100u64 {
            h.record_us(ms * 1000 + 500, 1);
        }
        assert_eq!(h.quantile_ms(0.5), Some(50));
        assert_eq!(h.quantile_ms(0.99), Some(99));
        h.record_us(60_000_000, 1);
        assert_eq!(h.quantile_ms(1.0), Some(10_001));
        assert_eq!(h.count(), 101);
    }
}
