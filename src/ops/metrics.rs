//! What the running engine counts, shared by the source, the pipeline and the sinks, and
//! exposed by `prometheus-client` on `/metrics` (OpenMetrics text: counters end in
//! `_total`, times are in seconds, one `sink` label instead of per-sink names) and as JSON
//! on `/status`. docs/operations.md lists every metric.
//!
//! A little over 400 lines on purpose: the histogram, its exposition and its quantiles
//! (also over a window, for the dashboard) read as one piece; sink health and the slot's
//! gauges are in `health.rs`, the tests in `metrics/tests.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `sink` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Every plain counter of the engine; the name on `/metrics` is
        /// `engagement_cdc_<field>_total`.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: Counter,)*
        }

        impl Counters {
            fn register(&self, registry: &mut Registry) {
                $(registry.register(
                    stringify!($name),
                    concat!($($doc),*).trim().trim_end_matches('.'),
                    self.$name.clone(),
                );)*
            }

            /// (name, value) of every counter, for `/status`.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
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
    /// Values delivered as NULL because they do not fit their sink column: an integer past
    /// Int32 (duration_ms, length_seconds) or a numeric with a fraction.
    invalid_values,
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
    /// Events of a transaction that a lost connection cut, read again in the next session
    /// and skipped: the sinks already had them.
    events_reread_skipped,
    /// Events a sink had received before the engine stopped or crashed, delivered again by
    /// the stream after the start (the journal cut the transaction they belong to) and not
    /// sent to that sink again; counted once per sink.
    events_received_before_skipped,
    /// Batches handed to the sinks.
    batches,
    /// Events every sink made durable (counted once per batch, when every sink acked it; the
    /// batches of this run only: with the journal, what a sink drains after a restart is
    /// not counted).
    events_delivered,
    /// Replication sessions started (1 + reconnects).
    replication_sessions,
    /// Events dead-lettered by the HTTP sink.
    http_dead_lettered,
}

/// The engine's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub counters: Counters,
    /// The checkpoint LSN (also a gauge on `/metrics`).
    pub checkpoint_lsn: Arc<AtomicU64>,
    /// The server's WAL end as last reported.
    pub server_wal_end: Arc<AtomicU64>,
    /// Commit time (µs since 1970) of the last checkpointed transaction; 0 when unknown.
    pub last_commit_us: Arc<AtomicI64>,
    sink_retries: Family<SinkLabel, Counter>,
    /// Retries of every sink together, for `/status`.
    all_sink_retries: AtomicU64,
    /// Commit-to-durable latency per sink.
    commit_to_sink: LatencyFamily,
    /// Commit-to-read latency of the source.
    pub commit_to_read: Arc<Histogram>,
    /// Each sink's health.
    pub health: super::health::HealthBoard,
    /// `top:content:10m` as last read by the Redis sink.
    pub top_content: super::health::TopContent,
    /// The slot's lag and retained WAL.
    pub slot: super::health::SlotGauges,
    /// The journal and each sink's place in it.
    pub journal: super::health::JournalGauges,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("engagement_cdc");
        let counters = Counters::default();
        counters.register(&mut registry);
        let sink_retries = Family::<SinkLabel, Counter>::default();
        registry.register(
            "sink_retries",
            "Retries of sink writes after transient failures",
            sink_retries.clone(),
        );
        let commit_to_sink = LatencyFamily::default();
        registry.register(
            "commit_to_sink_seconds",
            "Commit-to-durable latency of streamed events, per sink",
            commit_to_sink.clone(),
        );
        let commit_to_read = Arc::new(Histogram::default());
        registry.register(
            "commit_to_read_seconds",
            "Commit-to-read latency of streamed events",
            SingleHistogram(commit_to_read.clone()),
        );
        let checkpoint_lsn = Arc::new(AtomicU64::new(0));
        registry.register(
            "checkpoint_lsn",
            "The checkpoint, as a byte position in the WAL",
            PositionGauge(checkpoint_lsn.clone()),
        );
        let server_wal_end = Arc::new(AtomicU64::new(0));
        registry.register(
            "server_wal_end",
            "The server's WAL end as last reported, as a byte position",
            PositionGauge(server_wal_end.clone()),
        );
        let health = super::health::HealthBoard::default();
        health.register(&mut registry);
        let slot = super::health::SlotGauges::default();
        // Healthy until a read says otherwise, so the first bad one is a change (and logged).
        slot.wal_ok.set(1);
        slot.register(&mut registry);
        let journal = super::health::JournalGauges::default();
        journal.register(&mut registry);
        let last_commit_us = Arc::new(AtomicI64::new(0));
        registry.register(
            "last_commit_timestamp_seconds",
            "Commit time of the last checkpointed transaction, in seconds since 1970 (0: none yet)",
            SecondsGauge(last_commit_us.clone()),
        );
        Metrics {
            counters,
            health,
            top_content: Default::default(),
            slot,
            journal,
            checkpoint_lsn,
            server_wal_end,
            last_commit_us,
            sink_retries,
            all_sink_retries: AtomicU64::new(0),
            commit_to_sink,
            commit_to_read,
            registry,
        }
    }
}

impl Metrics {
    pub fn sink_retry(&self, sink: &str) {
        self.sink_retries
            .get_or_create(&SinkLabel { sink: sink.into() })
            .inc();
        self.all_sink_retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sink_retries(&self, sink: &str) -> u64 {
        self.sink_retries
            .get_or_create(&SinkLabel { sink: sink.into() })
            .get()
    }

    pub fn dead_lettered(&self, events: u64) {
        self.counters.http_dead_lettered.inc_by(events);
    }

    /// The commit-to-durable latency histogram of a sink (created on first use).
    pub fn latency(&self, sink: &'static str) -> Arc<Histogram> {
        self.commit_to_sink.get_or_create(sink)
    }

    /// Each sink's latency histogram as bucket counts, for windows between two readings.
    pub fn latency_counts(&self) -> Vec<(&'static str, Vec<u64>)> {
        let sinks = self.commit_to_sink.0.lock().expect("metrics lock");
        sinks.iter().map(|(n, h)| (*n, h.counts())).collect()
    }

    /// `{sink: {count, p50_ms, p99_ms, max_ms, mean_ms}}`.
    pub fn latency_summary(&self) -> serde_json::Value {
        let sinks = self.commit_to_sink.0.lock().expect("metrics lock");
        serde_json::Value::Object(
            sinks
                .iter()
                .map(|(n, h)| (n.to_string(), h.summary()))
                .collect(),
        )
    }

    /// `/metrics`: the OpenMetrics text of every metric, names prefixed `engagement_cdc_`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counters by name, for `/status`.
    pub fn counter_map(&self) -> BTreeMap<&'static str, u64> {
        let mut map: BTreeMap<&'static str, u64> = self.counters.snapshot().into_iter().collect();
        map.insert(
            "sink_retries",
            self.all_sink_retries.load(Ordering::Relaxed),
        );
        map.insert(
            "checkpoint_lsn",
            self.checkpoint_lsn.load(Ordering::Relaxed),
        );
        map.insert(
            "server_wal_end",
            self.server_wal_end.load(Ordering::Relaxed),
        );
        map
    }
}

/// Latencies in 1 ms buckets up to 10 s (and one overflow bucket): quantiles exact to the
/// millisecond for `/status`, a few relaxed atomic adds per sample, and a Prometheus
/// histogram with the usual cumulative buckets for `/metrics`. Each run of
/// [`COARSE_MS`] buckets also has a total, so `/status`'s quantiles read about 200
/// counters instead of all 10,001 (it is polled: a bench asks 50 times a second).
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    /// Samples per run of COARSE_MS buckets (the last one: the overflow bucket alone).
    coarse: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

const HISTOGRAM_MS: usize = 10_000;

/// Buckets per coarse total.
const COARSE_MS: usize = 100;

/// The upper bound (ms) of the 1 ms bucket holding quantile `q` of `counts`, or `None`
/// when they are all zero. Also used on the difference of two readings (a time window).
pub fn quantile_of(counts: &[u64], q: f64) -> Option<u64> {
    let [found] = quantiles_of(counts, [q]);
    found
}

/// [`quantile_of`] for several quantiles, in increasing order, in one pass.
pub fn quantiles_of<const N: usize>(counts: &[u64], qs: [f64; N]) -> [Option<u64>; N] {
    let total: u64 = counts.iter().sum();
    let mut found = [None; N];
    if total == 0 {
        return found;
    }
    let ranks = qs.map(|q| ((total as f64) * q).ceil().max(1.0) as u64);
    let (mut seen, mut next) = (0, 0);
    for (ms, n) in counts.iter().enumerate() {
        seen += n;
        while next < N && seen >= ranks[next] {
            found[next] = Some(ms as u64 + 1);
            next += 1;
        }
        if next == N {
            return found;
        }
    }
    for f in &mut found[next..] {
        *f = Some(counts.len() as u64);
    }
    found
}

/// The bucket bounds on `/metrics`, in milliseconds.
const EXPOSED_BOUNDS_MS: [usize; 14] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 10_001,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..=HISTOGRAM_MS).map(|_| AtomicU64::new(0)).collect(),
            coarse: (0..=HISTOGRAM_MS / COARSE_MS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// `n` samples of `us` microseconds.
    pub fn record_us(&self, us: u64, n: u64) {
        let ms = ((us / 1000) as usize).min(HISTOGRAM_MS);
        self.buckets[ms].fetch_add(n, Ordering::Relaxed);
        self.coarse[ms / COARSE_MS].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_us.fetch_add(us * n, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The samples' sum, in microseconds.
    #[cfg(test)]
    pub(crate) fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// The upper bound (ms) of the bucket holding quantile `q`, or `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let [found] = self.quantiles([q]);
        found
    }

    /// [`quantiles_of`] the buckets, without reading them all: the coarse totals say which
    /// run of buckets holds each quantile, and only that run is read. A sample recorded
    /// meanwhile can be in a total and not yet in its bucket: the run's upper bound is
    /// then the answer (at most COARSE_MS - 1 ms high, and only while samples arrive).
    pub fn quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<u64>; N] {
        let coarse: Vec<u64> = self
            .coarse
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = coarse.iter().sum();
        let mut found = [None; N];
        if total == 0 {
            return found;
        }
        let ranks = qs.map(|q| ((total as f64) * q).ceil().max(1.0) as u64);
        let mut seen = 0;
        let mut next = 0;
        for (run, n) in coarse.iter().enumerate() {
            if next == N {
                break;
            }
            if seen + n < ranks[next] {
                seen += n;
                continue;
            }
            // This run holds the next quantile (and maybe more): its buckets one by one.
            let start = run * COARSE_MS;
            let end = (start + COARSE_MS).min(HISTOGRAM_MS + 1);
            let mut within = seen;
            for ms in start..end {
                within += self.buckets[ms].load(Ordering::Relaxed);
                while next < N && within >= ranks[next] {
                    found[next] = Some(ms as u64 + 1);
                    next += 1;
                }
            }
            seen += n;
            while next < N && seen >= ranks[next] {
                found[next] = Some(end as u64);
                next += 1;
            }
        }
        for f in &mut found[next..] {
            *f = Some(HISTOGRAM_MS as u64 + 1);
        }
        found
    }

    /// Samples per 1 ms bucket (the last one: 10 s and more).
    pub fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    pub fn summary(&self) -> serde_json::Value {
        let count = self.count();
        // Both quantiles in one pass (`status` is polled).
        let [p50, p99] = self.quantiles([0.50, 0.99]);
        serde_json::json!({
            "count": count,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": (count > 0).then(|| self.max_us.load(Ordering::Relaxed) as f64 / 1000.0),
            "mean_ms": (count > 0).then(|| self.sum_us.load(Ordering::Relaxed) as f64 / count as f64 / 1000.0),
        })
    }

    /// `(upper bound in seconds, samples in this bucket)` pairs — the encoder sums them
    /// into the cumulative `_bucket` lines; the last bound is +Inf.
    fn exposed_buckets(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(EXPOSED_BOUNDS_MS.len());
        let (mut seen, mut next) = (0u64, 0usize);
        for bound in EXPOSED_BOUNDS_MS {
            // Bucket `ms` holds samples in [ms, ms + 1): all of them are ≤ bound when
            // ms + 1 ≤ bound.
            while next < bound.min(HISTOGRAM_MS + 1) {
                seen += self.buckets[next].load(Ordering::Relaxed);
                next += 1;
            }
            let le = if bound > HISTOGRAM_MS {
                f64::INFINITY
            } else {
                bound as f64 / 1000.0
            };
            out.push((le, seen));
        }
        // Per bucket, not cumulative.
        for i in (1..out.len()).rev() {
            out[i].1 -= out[i - 1].1;
        }
        out
    }

    fn encode(&self, encoder: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.exposed_buckets();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// One [`Histogram`] per sink, exposed with the `sink` label.
#[derive(Debug, Clone, Default)]
struct LatencyFamily(Arc<Mutex<Vec<SinkHistogram>>>);

type SinkHistogram = (&'static str, Arc<Histogram>);

impl LatencyFamily {
    fn get_or_create(&self, sink: &'static str) -> Arc<Histogram> {
        let mut sinks = self.0.lock().expect("metrics lock");
        if let Some((_, h)) = sinks.iter().find(|(n, _)| *n == sink) {
            return h.clone();
        }
        let h = Arc::new(Histogram::default());
        sinks.push((sink, h.clone()));
        h
    }
}

impl EncodeMetric for LatencyFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (sink, h) in self.0.lock().expect("metrics lock").iter() {
            let label = SinkLabel {
                sink: sink.to_string(),
            };
            h.encode(&mut encoder.encode_family(&label)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A WAL position read at scrape time.
#[derive(Debug)]
struct PositionGauge(Arc<AtomicU64>);

impl EncodeMetric for PositionGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&(self.0.load(Ordering::Relaxed) as i64))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Microseconds since 1970, shown in seconds, read at scrape time.
#[derive(Debug)]
struct SecondsGauge(Arc<AtomicI64>);

impl EncodeMetric for SecondsGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&(self.0.load(Ordering::Relaxed) as f64 / 1e6))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[derive(Debug)]
struct SingleHistogram(Arc<Histogram>);

impl EncodeMetric for SingleHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(&mut encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests;
