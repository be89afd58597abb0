//! Micro benchmarks of the per-event hot path: `cargo bench --bench hot_path`.
//!
//! Each measures one stage alone on the same 100,000 events, so a regression points at its
//! stage: pgoutput decoding into typed rows (the null destination: decode cost alone; text
//! values and binary ones), enrichment, the enriched event's JSON (docs/sinks.md),
//! ClickHouse's RowBinary rows, the Redis script arguments (over 50 and over 1,000 content
//! ids), the HTTP request bodies. `HOT_PATH_ONLY=TEXT` runs only the stages whose name
//! holds TEXT (to profile one).

use std::hint::black_box;
use std::time::Instant;

use engagement_cdc::config::{HttpMode, QualifiedTable};
use engagement_cdc::enrich::{enrich, ContentRow, Dimension, EnrichedEvent};
use engagement_cdc::sinks::clickhouse::Layout;
use engagement_cdc::sinks::http::requests;
use engagement_cdc::sinks::redis::{script_args, CallContext, TopMode};
use engagement_cdc::source::pgoutput::{
    Message, RelColumn, Relation, Tuple, Value, INLINE_COLUMNS,
};
use engagement_cdc::source::rows::{decode_event, RelKind, Relations, Zone};
use engagement_cdc::source::schema::{ContentColumns, EventColumns, TypeCatalog};
use engagement_cdc::types::Lsn;

/// The test encoder, which is not part of the library.
#[path = "../src/source/pgoutput/encode.rs"]
mod encode;

const N: usize = 100_000;

fn bench<T>(name: &str, per: usize, mut f: impl FnMut() -> T) {
    // HOT_PATH_ONLY=TEXT: only the stages whose name contains TEXT (to profile one).
    if std::env::var("HOT_PATH_ONLY").is_ok_and(|only| !name.contains(&only)) {
        return;
    }
    // One warm-up, then the best of five.
    black_box(f());
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{name:<40} {:>10.0} events/s  {:>7.0} ns/event",
        per as f64 / best,
        best * 1e9 / per as f64
    );
}

fn main() {
    let relation = encode::events_relation();
    let mut relations = Relations::new(
        QualifiedTable::parse("t", "public.engagement_events").unwrap(),
        QualifiedTable::parse("t", "public.content").unwrap(),
        &EventColumns::default(),
        &ContentColumns::default(),
        TypeCatalog::default(),
    );
    let zone = Zone::utc();
    let RelKind::Events(pos) = relations.update(&relation).unwrap().clone() else {
        unreachable!()
    };
    let messages: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let id = (1_000_000 + i).to_string();
            let content = (1 + i % 50).to_string();
            let user = (i * 7919 % 1_000_000).to_string();
            let dur = (i % 300_000).to_string();
            encode::message(&Message::Insert {
                relation: 16385,
                new: Tuple(vec![
                    Value::Text(id.as_bytes()),
                    Value::Text(content.as_bytes()),
                    Value::Text(user.as_bytes()),
                    Value::Text(b"play"),
                    Value::Text(b"2026-01-08 14:21:52.163702+00"),
                    Value::Text(dur.as_bytes()),
                    Value::Text(b"web"),
                    Value::Null,
                ]),
            })
        })
        .collect();
    // The same rows with binary values (`postgres.binary`, the default): big-endian
    // integers, the time in µs since 2000-01-01.
    let ts_2000_us: i64 = 821_197_312_163_702;
    let binary_messages: Vec<Vec<u8>> = (0..N as i64)
        .map(|i| {
            let (id, content, user) = (1_000_000 + i, 1 + i % 50, i * 7919 % 1_000_000);
            let (id, content, user, ts, dur) = (
                id.to_be_bytes(),
                content.to_be_bytes(),
                user.to_be_bytes(),
                ts_2000_us.to_be_bytes(),
                ((i % 300_000) as i32).to_be_bytes(),
            );
            encode::message(&Message::Insert {
                relation: 16385,
                new: Tuple(vec![
                    Value::Binary(&id),
                    Value::Binary(&content),
                    Value::Binary(&user),
                    Value::Binary(b"play"),
                    Value::Binary(&ts),
                    Value::Binary(&dur),
                    Value::Binary(b"web"),
                    Value::Null,
                ]),
            })
        })
        .collect();
    bench("pgoutput decode, binary values", N, || {
        let mut n = 0;
        for m in &binary_messages {
            if let Message::Insert { new, .. } = Message::parse(m).unwrap() {
                n += decode_event(&new, &pos, &zone).unwrap().0.id;
            }
        }
        n
    });
    let dimension = Dimension::from_rows((1..=50).map(|id| ContentRow {
        content_id: id,
        content_type: Some("video".into()),
        length_seconds: Some(300),
    }));

    bench("pgoutput decode to typed rows", N, || {
        let mut n = 0;
        for m in &messages {
            // As the engine reads an insert: its tuple onto the stack.
            let mut values = [Value::Null; INLINE_COLUMNS];
            if let Some((_, cols)) = Message::parse_insert(m, &mut values).unwrap() {
                n += decode_event(&values[..cols], &pos, &zone).unwrap().0.id;
            }
        }
        n
    });
    bench("pgoutput decode to typed rows, a vector a tuple", N, || {
        let mut n = 0;
        for m in &messages {
            if let Message::Insert { new, .. } = Message::parse(m).unwrap() {
                n += decode_event(&new, &pos, &zone).unwrap().0.id;
            }
        }
        n
    });
    let raws: Vec<_> = messages
        .iter()
        .map(|m| match Message::parse(m).unwrap() {
            Message::Insert { new, .. } => decode_event(&new, &pos, &zone).unwrap().0,
            _ => unreachable!(),
        })
        .collect();
    bench("enrich (join + derived fields)", N, || {
        raws.iter()
            .map(|r| {
                enrich(r.clone(), dimension.get(r.content_id), Lsn(1))
                    .0
                    .event_id
            })
            .sum::<i64>()
    });
    let events: Vec<EnrichedEvent> = raws
        .iter()
        .map(|r| enrich(r.clone(), dimension.get(r.content_id), Lsn(1)).0)
        .collect();
    let refs: Vec<&EnrichedEvent> = events.iter().collect();
    bench("enriched JSON (docs/sinks.md)", N, || {
        let mut out = Vec::with_capacity(300);
        let mut total = 0;
        for e in &events {
            out.clear();
            e.write_json(&mut out);
            total += out.len();
        }
        total
    });
    bench("clickhouse RowBinary rows", N, || {
        let mut out = bytes::BytesMut::with_capacity(256 * 1024);
        let mut total = 0;
        for e in &events {
            Layout::Modern.write_row(e, &mut out);
            if out.len() >= 254 * 1024 {
                total += out.split().freeze().len();
            }
        }
        total + out.len()
    });
    let hours = [("2026010814".to_string(), 0, 0)];
    let ctx = CallContext {
        namespace: "engagement_cdc",
        hours: &hours,
        log_ttl: 90_000,
        top: TopMode::Keep,
        slot: None,
        per_event: false,
    };
    bench("redis script arguments (20000-event calls)", N, || {
        refs.chunks(20_000)
            .map(|c| script_args("", &ctx, c, 1_767_882_112_000_000).len())
            .sum::<usize>()
    });
    // The e2e bench's spread: 1,000 content ids, so each call carries about 1,000 contents
    // (their counts, latest events and minute buckets) besides its events.
    let spread: Vec<EnrichedEvent> = events
        .iter()
        .enumerate()
        .map(|(i, e)| EnrichedEvent {
            content_id: 1 + (i % 1000) as i64,
            ..e.clone()
        })
        .collect();
    let spread: Vec<&EnrichedEvent> = spread.iter().collect();
    bench("redis script arguments, 1,000 contents", N, || {
        spread
            .chunks(20_000)
            .map(|c| script_args("", &ctx, c, 1_767_882_112_000_000).len())
            .sum::<usize>()
    });
    // One body at a time, as the sink builds them (it holds `http.concurrency` at once):
    // building all 200 and dropping them together measured the allocator's fresh pages more
    // than the JSON (docs/benchmarks.md, "Fresh memory, and the clock read less often").
    bench("http request bodies (500-event batches)", N, || {
        refs.chunks(500)
            .map(|c| requests(c, HttpMode::Batch, 500)[0].body.len())
            .sum::<usize>()
    });
}
