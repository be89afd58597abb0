//! Enrichment: the `content` dimension as local state, the join, the derived fields with
//! exact integer arithmetic, and the enriched event's JSON (docs/sinks.md, "The enriched
//! event"; docs/architecture.md, "Enrichment").
//!
//! The stream and the backfill both call [`enrich`], so they cannot round differently
//! (the seed's defect §11.6).

use std::sync::Arc;

use compact_str::CompactString;
use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::types::{Lsn, Position};

mod json;
mod time;

pub use json::{parse_events, write_decimal};
pub use time::{
    civil_from_days, days_from_civil, now_us, rfc3339_us, utc_parts, write_rfc3339_us, UtcParts,
};

/// One row of `content` as the engine keeps it. `content_type` is shared by every event
/// joined with this version of the row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentRow {
    pub content_id: i64,
    pub content_type: Option<Arc<str>>,
    pub length_seconds: Option<i32>,
}

/// A change to the dimension, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimChange {
    Upsert(ContentRow),
    Delete(i64),
    Truncate,
}

/// The `content` table as of the last applied change.
///
/// A row is held in 8 bytes, 16 with its key: its length and the index of its
/// `content_type` in one shared copy of each text the rows hold (a 40-byte row with a text
/// of its own before; a million rows took about 84 MB of buckets, now 34 MB). Each event is
/// joined with one lookup here, and every event of a type takes (and later drops) a
/// reference to the same shared text (docs/benchmarks.md, "A smaller content table").
#[derive(Debug, Default, Clone)]
pub struct Dimension {
    rows: FxHashMap<i64, Packed>,
    /// Each text the rows hold, at its index; `None` at a free index.
    types: Vec<Option<Arc<str>>>,
    /// How many rows hold each index's text.
    uses: Vec<u32>,
    free: Vec<u32>,
    index: FxHashMap<Arc<str>, u32>,
}

/// A row's `length_seconds` (bit 32: present; bits 0–31: the value) and `content_type`
/// (bits 33–63: its index in `types` plus one; 0: NULL).
#[derive(Debug, Clone, Copy)]
struct Packed(u64);

impl Packed {
    fn new(type_index: Option<u32>, length: Option<i32>) -> Packed {
        let t = type_index.map_or(0, |i| u64::from(i) + 1);
        let has = u64::from(length.is_some());
        Packed(t << 33 | has << 32 | u64::from(length.unwrap_or(0) as u32))
    }

    fn type_index(self) -> Option<usize> {
        let t = self.0 >> 33;
        (t > 0).then(|| (t - 1) as usize)
    }

    fn length(self) -> Option<i32> {
        (self.0 >> 32 & 1 == 1).then_some(self.0 as u32 as i32)
    }
}

impl Dimension {
    pub fn from_rows(rows: impl IntoIterator<Item = ContentRow>) -> Self {
        let mut d = Dimension::default();
        for row in rows {
            d.upsert(&row);
        }
        d
    }

    fn upsert(&mut self, row: &ContentRow) {
        let type_index = row.content_type.as_ref().map(|t| self.intern(t));
        let packed = Packed::new(type_index, row.length_seconds);
        if let Some(old) = self.rows.insert(row.content_id, packed) {
            self.release(old);
        }
    }

    /// The index of `text`, one more row holding it.
    fn intern(&mut self, text: &Arc<str>) -> u32 {
        if let Some(&i) = self.index.get(&**text) {
            self.uses[i as usize] += 1;
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.types.push(None);
                self.uses.push(0);
                u32::try_from(self.types.len() - 1).expect("fewer than 2^31 content types")
            }
        };
        self.types[i as usize] = Some(text.clone());
        self.uses[i as usize] = 1;
        self.index.insert(text.clone(), i);
        i
    }

    /// One row fewer holds `old`'s text; a text no row holds is let go (events still in
    /// flight keep their own reference).
    fn release(&mut self, old: Packed) {
        let Some(i) = old.type_index() else { return };
        self.uses[i] -= 1;
        if self.uses[i] == 0 {
            if let Some(text) = self.types[i].take() {
                self.index.remove(&*text);
            }
            self.free.push(i as u32);
        }
    }

    pub fn get(&self, content_id: i64) -> Option<ContentRow> {
        let packed = *self.rows.get(&content_id)?;
        Some(ContentRow {
            content_id,
            content_type: packed.type_index().and_then(|i| self.types[i].clone()),
            length_seconds: packed.length(),
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn apply(&mut self, change: &DimChange) {
        match change {
            DimChange::Upsert(row) => self.upsert(row),
            DimChange::Delete(id) => {
                if let Some(old) = self.rows.remove(id) {
                    self.release(old);
                }
            }
            DimChange::Truncate => *self = Dimension::default(),
        }
    }
}

/// A row of `engagement_events`, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub id: i64,
    pub content_id: i64,
    pub user_id: i64,
    pub event_type: CompactString,
    /// Microseconds since 1970-01-01 UTC.
    pub event_ts_us: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<CompactString>,
}

/// An event joined with its content row and the derived fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnrichedEvent {
    pub event_id: i64,
    pub content_id: i64,
    pub user_id: i64,
    /// Short texts are held inline (no allocation per event up to 24 bytes).
    pub event_type: CompactString,
    pub event_ts_us: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<CompactString>,
    pub content_type: Option<Arc<str>>,
    pub length_seconds: Option<i32>,
    /// Commit LSN of the transaction for streamed events, 0 for backfilled ones.
    pub source_lsn: Lsn,
    /// Commit time of the transaction (µs since 1970) for streamed events, 0 for backfilled
    /// ones: the start of the commit-to-sink latency.
    pub commit_us: i64,
    /// Place of the event among the changes to the events table in its transaction, from
    /// 0 (0 for backfilled ones): with `source_lsn`, its position in the stream — the order
    /// the Redis sink's watermark follows (docs/sinks.md, "Redis").
    pub tx_index: u32,
}

/// What [`enrich`] noticed, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnrichNotes {
    /// No content row had the event's `content_id` (LEFT join: NULL columns).
    pub unknown_content: bool,
    /// Negative duration: both derived fields are NULL (docs/architecture.md, "Enrichment").
    pub invalid_duration: bool,
}

/// Join and derive. The event itself is always returned.
pub fn enrich(
    event: RawEvent,
    content: Option<ContentRow>,
    source_lsn: Lsn,
) -> (EnrichedEvent, EnrichNotes) {
    let unknown_content = content.is_none();
    let (content_type, length_seconds) =
        content.map_or((None, None), |c| (c.content_type, c.length_seconds));
    let notes = EnrichNotes {
        unknown_content,
        invalid_duration: matches!(event.duration_ms, Some(d) if d < 0),
    };
    let enriched = EnrichedEvent {
        event_id: event.id,
        content_id: event.content_id,
        user_id: event.user_id,
        event_type: event.event_type,
        event_ts_us: event.event_ts_us,
        duration_ms: event.duration_ms,
        device: event.device,
        content_type,
        length_seconds,
        source_lsn,
        commit_us: 0,
        tx_index: 0,
    };
    (enriched, notes)
}

/// `(engagement_seconds in ms, engagement_pct in hundredths)` per the null rules of docs/architecture.md, "Enrichment".
pub fn derived_fields(
    duration_ms: Option<i32>,
    length_seconds: Option<i32>,
) -> (Option<i64>, Option<i64>) {
    match (duration_ms, length_seconds) {
        (Some(d), Some(l)) if d >= 0 => {
            let pct = if l > 0 {
                Some(round_half_away_div(d as i64, 10 * l as i64))
            } else {
                None
            };
            (Some(d as i64), pct)
        }
        _ => (None, None),
    }
}

/// `round(n / d)` half away from zero, for `n >= 0`, `d > 0`, in integers.
/// `duration_ms / (1000 × length_seconds)` in hundredths is `duration_ms / (10 × length_seconds)`.
pub fn round_half_away_div(n: i64, d: i64) -> i64 {
    debug_assert!(n >= 0 && d > 0);
    let (n, d) = (n as i128, d as i128);
    ((2 * n + d) / (2 * d)) as i64
}

/// The derived fields are computed when written, not held: an event in memory is 32 bytes
/// smaller (the in-flight budget holds tens of thousands of them while catching up).
impl EnrichedEvent {
    /// Its place in the stream; `None` for a backfilled event.
    pub fn position(&self) -> Option<Position> {
        (self.source_lsn.0 != 0).then_some(Position {
            lsn: self.source_lsn,
            index: self.tx_index,
        })
    }

    /// `engagement_seconds` in milliseconds (the exact decimal is this / 1000).
    pub fn engagement_ms(&self) -> Option<i64> {
        derived_fields(self.duration_ms, self.length_seconds).0
    }

    /// `engagement_pct` in hundredths (the exact decimal is this / 100).
    pub fn engagement_pct_hundredths(&self) -> Option<i64> {
        derived_fields(self.duration_ms, self.length_seconds).1
    }

    pub fn engagement_seconds_f64(&self) -> Option<f64> {
        // Division of an exact integer by a power of ten is correctly rounded: the nearest
        // double to the exact decimal.
        self.engagement_ms().map(|ms| ms as f64 / 1000.0)
    }

    pub fn engagement_pct_f64(&self) -> Option<f64> {
        self.engagement_pct_hundredths().map(|h| h as f64 / 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_event_in_memory_stays_small() {
        // The in-flight budget holds up to 80,000 events while catching up (8 batches of
        // the default 10,000): each 8 bytes here is 0.6 MB of the engine's peak memory
        // (docs/benchmarks.md, "Memory").
        let size = std::mem::size_of::<EnrichedEvent>();
        assert!(size <= 136, "an EnrichedEvent takes {size} bytes");
    }

    #[test]
    fn the_derived_fields_follow_duration_and_length() {
        let raw = |duration_ms| RawEvent {
            id: 1,
            content_id: 1,
            user_id: 1,
            event_type: "play".into(),
            event_ts_us: 0,
            duration_ms,
            device: None,
        };
        let content = ContentRow {
            content_id: 1,
            content_type: Some("video".into()),
            length_seconds: Some(300),
        };
        let (e, _) = enrich(raw(Some(7000)), Some(content.clone()), Lsn(1));
        assert_eq!(
            (e.engagement_ms(), e.engagement_pct_hundredths()),
            (Some(7000), Some(2))
        );
        let (e, _) = enrich(raw(Some(-1)), Some(content.clone()), Lsn(1));
        assert_eq!(
            (e.engagement_ms(), e.engagement_pct_hundredths()),
            (None, None)
        );
        let (e, _) = enrich(raw(Some(7000)), None, Lsn(1));
        assert_eq!(
            (e.engagement_ms(), e.engagement_pct_hundredths()),
            (None, None)
        );
    }

    fn seed_event() -> RawEvent {
        RawEvent {
            id: 16,
            content_id: 1,
            user_id: 999,
            event_type: "play".into(),
            event_ts_us: 1_767_882_112_000_000, // 2026-01-08T14:21:52Z
            duration_ms: Some(7000),
            device: Some("web".into()),
        }
    }

    fn video(len: Option<i32>) -> ContentRow {
        ContentRow {
            content_id: 1,
            content_type: Some("video".into()),
            length_seconds: len,
        }
    }

    #[test]
    fn the_spec_example_json_exactly() {
        let (e, notes) = enrich(seed_event(), Some(video(Some(300))), Lsn(5));
        assert_eq!(
            e.to_json(),
            r#"{"event_id":16,"content_id":1,"user_id":999,"event_type":"play","event_ts":"2026-01-08T14:21:52Z","duration_ms":7000,"device":"web","content_type":"video","length_seconds":300,"engagement_seconds":7.0,"engagement_pct":0.02}"#
        );
        assert_eq!(notes, EnrichNotes::default());
        assert_eq!(e.engagement_seconds_f64(), Some(7.0));
        assert_eq!(e.engagement_pct_f64(), Some(0.02));
    }

    #[test]
    fn spec_rounding_examples() {
        assert_eq!(derived_fields(Some(7000), Some(300)), (Some(7000), Some(2)));
        assert_eq!(derived_fields(Some(375), Some(3)), (Some(375), Some(13)));
        assert_eq!(derived_fields(Some(5), Some(1)), (Some(5), Some(1)));
        assert_eq!(derived_fields(Some(4), Some(1)), (Some(4), Some(0)));
    }

    #[test]
    fn null_rules() {
        assert_eq!(derived_fields(None, Some(300)), (None, None));
        assert_eq!(derived_fields(Some(7000), None), (None, None));
        assert_eq!(derived_fields(Some(7000), Some(0)), (Some(7000), None));
        assert_eq!(derived_fields(Some(7000), Some(-5)), (Some(7000), None));
        assert_eq!(derived_fields(Some(-1), Some(300)), (None, None));
        let mut ev = seed_event();
        ev.duration_ms = Some(-1);
        let (e, notes) = enrich(ev, None, Lsn(0));
        assert!(notes.invalid_duration && notes.unknown_content);
        assert!(e.to_json().ends_with(
            r#""content_type":null,"length_seconds":null,"engagement_seconds":null,"engagement_pct":null}"#
        ));
    }

    #[test]
    fn decimals_print_like_the_seed() {
        let d = |v, s| {
            let mut o = Vec::new();
            write_decimal(&mut o, v, s);
            String::from_utf8(o).unwrap()
        };
        assert_eq!(d(7000, 3), "7.0");
        assert_eq!(d(375, 3), "0.375");
        assert_eq!(d(1500, 3), "1.5");
        assert_eq!(d(5, 3), "0.005");
        assert_eq!(d(2, 2), "0.02");
        assert_eq!(d(13, 2), "0.13");
        assert_eq!(d(100, 2), "1.0");
        assert_eq!(d(0, 2), "0.0");
        assert_eq!(d(2_147_483_647, 3), "2147483.647");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_us(1_767_882_112_000_000), "2026-01-08T14:21:52Z");
        assert_eq!(
            rfc3339_us(1_767_882_112_000_001),
            "2026-01-08T14:21:52.000001Z"
        );
        assert_eq!(
            rfc3339_us(1_767_882_112_163_702),
            "2026-01-08T14:21:52.163702Z"
        );
        assert_eq!(rfc3339_us(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339_us(951_782_400_000_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn strings_are_escaped() {
        let mut ev = seed_event();
        ev.event_type = "pl\"ay\n".into();
        ev.device = Some("تلفاز 📺".into());
        let (e, _) = enrich(ev, None, Lsn(0));
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["event_type"], "pl\"ay\n");
        assert_eq!(v["device"], "تلفاز 📺");
    }

    #[test]
    fn dimension_changes() {
        let mut d = Dimension::from_rows([video(Some(300))]);
        d.apply(&DimChange::Upsert(video(Some(10))));
        assert_eq!(d.get(1).unwrap().length_seconds, Some(10));
        d.apply(&DimChange::Delete(1));
        assert!(d.get(1).is_none());
        d.apply(&DimChange::Upsert(video(None)));
        d.apply(&DimChange::Truncate);
        assert!(d.is_empty());
    }

    #[test]
    fn rows_of_one_content_type_share_its_text_and_unused_texts_go() {
        let row = |id: i64, t: &str| ContentRow {
            content_id: id,
            content_type: Some(t.into()),
            length_seconds: Some(60),
        };
        let mut d = Dimension::from_rows([row(1, "video"), row(2, "video")]);
        d.apply(&DimChange::Upsert(row(3, "video")));
        let text = |d: &Dimension, id| d.get(id).unwrap().content_type.clone().unwrap();
        assert!(Arc::ptr_eq(&text(&d, 1), &text(&d, 2)));
        assert!(Arc::ptr_eq(&text(&d, 1), &text(&d, 3)));
        // One row changing its type many times: the texts it no longer has are let go, and
        // what the rows hold is kept.
        for i in 0..1000 {
            d.apply(&DimChange::Upsert(row(4, &format!("type {i}"))));
        }
        // Two texts held ("video" and the last type), their slots reused.
        assert_eq!(d.index.len(), 2);
        assert!(d.types.len() <= 3, "{} slots", d.types.len());
        assert_eq!(&*text(&d, 4), "type 999");
        assert_eq!(&*text(&d, 1), "video");
        d.apply(&DimChange::Upsert(row(5, "video")));
        assert!(Arc::ptr_eq(&text(&d, 1), &text(&d, 5)));
        // Deleted rows let their text go once no row holds it.
        d.apply(&DimChange::Delete(4));
        assert_eq!(d.index.len(), 1);
        for id in [1, 2, 3, 5] {
            d.apply(&DimChange::Delete(id));
        }
        assert!(d.index.is_empty() && d.is_empty());
    }

    #[test]
    fn a_row_reads_back_as_it_was_put() {
        let mut d = Dimension::default();
        let rows = [
            (1, None, None),
            (2, Some("video"), Some(0)),
            (-3, Some(""), Some(i32::MIN)),
            (i64::MAX, None, Some(i32::MAX)),
            (i64::MIN, Some("article"), Some(-1)),
        ];
        for (id, t, l) in rows {
            d.apply(&DimChange::Upsert(ContentRow {
                content_id: id,
                content_type: t.map(Into::into),
                length_seconds: l,
            }));
        }
        for (id, t, l) in rows {
            let row = d.get(id).unwrap();
            assert_eq!(row.content_id, id);
            assert_eq!(row.content_type.as_deref(), t);
            assert_eq!(row.length_seconds, l);
        }
        assert!(d.get(4).is_none());
        assert_eq!(d.len(), 5);
    }

    proptest! {
        #[test]
        fn civil_days_round_trip(days in -800_000i64..3_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn rounding_matches_exact_decimal(n in 0i64..=i32::MAX as i64, l in 1i64..=i32::MAX as i64) {
            // Compare with a wide-integer reference: hundredths = n*100 / (1000*l).
            let num = n as i128 * 100;
            let den = l as i128 * 1000;
            let q = num / den;
            let r = num % den;
            let want = if 2 * r >= den { q + 1 } else { q };
            prop_assert_eq!(round_half_away_div(n, 10 * l) as i128, want);
        }

        #[test]
        fn rfc3339_text_matches_the_broken_down_time(
            a in -62_135_596_800_000_000i64..253_402_300_799_999_999,
            step in prop_oneof![Just(0i64), 0i64..1_000_000, -86_400_000_000i64..86_400_000_000],
        ) {
            // The text of each part, as the writer had it before it cached the second;
            // `b` follows `a` as the next event of a batch would (same second, or not).
            let reference = |us: i64| {
                let p = utc_parts(us);
                let frac = if p.micros == 0 { String::new() } else { format!(".{:06}", p.micros) };
                format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}Z",
                    p.year, p.month, p.day, p.hour, p.minute, p.second)
            };
            let b = a.saturating_add(step).min(253_402_300_799_999_999);
            prop_assert_eq!(rfc3339_us(a), reference(a));
            prop_assert_eq!(rfc3339_us(b), reference(b));
            prop_assert_eq!(rfc3339_us(a), reference(a));
        }

        #[test]
        fn decimal_text_parses_to_the_same_double(ms in 0i64..=i32::MAX as i64) {
            let mut o = Vec::new();
            write_decimal(&mut o, ms, 3);
            let text = String::from_utf8(o).unwrap();
            let parsed: f64 = text.parse().unwrap();
            prop_assert_eq!(parsed, ms as f64 / 1000.0);
        }
    }
}
