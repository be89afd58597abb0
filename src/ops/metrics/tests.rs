//! Unit tests of the metrics: the exposition parses, names and labels are as documented.

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
    // Several quantiles in one pass are each the one computed alone.
    let counts = h.counts();
    let qs = [0.0, 0.01, 0.5, 0.99, 0.995, 1.0];
    assert_eq!(
        quantiles_of(&counts, qs),
        qs.map(|q| quantile_of(&counts, q))
    );
    assert_eq!(quantiles_of(&counts, [0.5, 1.0]), [Some(51), Some(10_001)]);
    assert_eq!(h.summary()["p99_ms"], 100);
    assert_eq!(quantiles_of(&Histogram::default().counts(), [0.5]), [None]);
    let buckets = h.exposed_buckets();
    assert_eq!(buckets[0], (0.001, 1));
    assert_eq!(buckets.iter().take(7).map(|b| b.1).sum::<u64>(), 100);
    assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 1));
}

#[test]
fn the_exposition_parses_and_names_the_sink() {
    let m = Metrics::default();
    m.counters.events_delivered.inc_by(3);
    m.latency("redis").record_us(1500, 3);
    m.sink_retry("clickhouse");
    m.checkpoint_lsn.store(0x16B3748, Ordering::Relaxed);
    let text = m.render();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).unwrap();
    let find = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
    };
    // OpenMetrics names a counter's family without `_total`; this parser reads the
    // older text format, so such samples may come back untyped: compare the values.
    let value = |name: &str| match find(name).value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} is {other:?}"),
    };
    assert_eq!(value("engagement_cdc_events_delivered_total"), 3.0);
    assert_eq!(value("engagement_cdc_checkpoint_lsn"), 0x16B3748 as f64);
    let retries = find("engagement_cdc_sink_retries_total");
    assert_eq!(retries.labels.get("sink"), Some("clickhouse"));
    let latency = find("engagement_cdc_commit_to_sink_seconds");
    assert_eq!(latency.labels.get("sink"), Some("redis"));
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let count = |le: f64| buckets.iter().find(|b| b.less_than == le).unwrap().count;
            assert_eq!(count(0.001), 0.0);
            assert_eq!(count(0.002), 3.0);
            assert_eq!(count(10.0), 3.0);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert!(
        text.contains("engagement_cdc_commit_to_sink_seconds_sum{sink=\"redis\"} 0.0045"),
        "{text}"
    );
    assert!(
        text.contains("engagement_cdc_commit_to_sink_seconds_count{sink=\"redis\"} 3"),
        "{text}"
    );
}

proptest::proptest! {
    /// The quantiles read through the coarse totals are the ones a scan of every bucket
    /// gives, wherever the samples fall (overflow bucket included).
    #[test]
    fn quantiles_through_the_coarse_totals_match_a_full_scan(
        samples in proptest::collection::vec((0u64..12_000_000, 1u64..50), 0..300),
        qs in proptest::collection::vec(0.0f64..=1.0, 1..6),
    ) {
        let h = Histogram::default();
        for (us, n) in &samples {
            h.record_us(*us, *n);
        }
        let counts = h.counts();
        let mut qs = qs;
        qs.sort_by(f64::total_cmp);
        let full: Vec<Option<u64>> = qs.iter().map(|q| quantile_of(&counts, *q)).collect();
        let coarse: Vec<Option<u64>> = qs.iter().map(|q| h.quantile_ms(*q)).collect();
        proptest::prop_assert_eq!(&coarse, &full);
        let [p50, p99] = h.quantiles([0.5, 0.99]);
        proptest::prop_assert_eq!([p50, p99], quantiles_of(&counts, [0.5, 0.99]));
    }
}
