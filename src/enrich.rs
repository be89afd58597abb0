//! Enrichment: the `content` dimension as local state, the join, the derived fields with
//! exact integer arithmetic, and the enriched event's JSON (SPEC §4).
//!
//! The stream and the backfill both call [`enrich`], so they cannot round differently
//! (the seed's defect §11.6).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::Lsn;

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
#[derive(Debug, Default, Clone)]
pub struct Dimension {
    rows: HashMap<i64, ContentRow>,
}

impl Dimension {
    pub fn from_rows(rows: impl IntoIterator<Item = ContentRow>) -> Self {
        Dimension {
            rows: rows.into_iter().map(|r| (r.content_id, r)).collect(),
        }
    }

    pub fn get(&self, content_id: i64) -> Option<&ContentRow> {
        self.rows.get(&content_id)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn apply(&mut self, change: &DimChange) {
        match change {
            DimChange::Upsert(row) => {
                self.rows.insert(row.content_id, row.clone());
            }
            DimChange::Delete(id) => {
                self.rows.remove(id);
            }
            DimChange::Truncate => self.rows.clear(),
        }
    }
}

/// A row of `engagement_events`, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub id: i64,
    pub content_id: i64,
    pub user_id: i64,
    pub event_type: String,
    /// Microseconds since 1970-01-01 UTC.
    pub event_ts_us: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
}

/// An event joined with its content row and the derived fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichedEvent {
    pub event_id: i64,
    pub content_id: i64,
    pub user_id: i64,
    pub event_type: String,
    pub event_ts_us: i64,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
    pub content_type: Option<Arc<str>>,
    pub length_seconds: Option<i32>,
    /// `engagement_seconds` in milliseconds (the exact decimal is this / 1000).
    pub engagement_ms: Option<i64>,
    /// `engagement_pct` in hundredths (the exact decimal is this / 100).
    pub engagement_pct_hundredths: Option<i64>,
    /// Commit LSN of the transaction for streamed events, 0 for backfilled ones.
    pub source_lsn: Lsn,
    /// Commit time of the transaction (µs since 1970) for streamed events, 0 for backfilled
    /// ones: the start of the commit-to-sink latency.
    pub commit_us: i64,
}

/// What [`enrich`] noticed, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnrichNotes {
    /// No content row had the event's `content_id` (LEFT join: NULL columns).
    pub unknown_content: bool,
    /// Negative duration: both derived fields are NULL (SPEC §4).
    pub invalid_duration: bool,
}

/// Join and derive. The event itself is always returned.
pub fn enrich(
    event: RawEvent,
    content: Option<&ContentRow>,
    source_lsn: Lsn,
) -> (EnrichedEvent, EnrichNotes) {
    let content_type = content.and_then(|c| c.content_type.clone());
    let length_seconds = content.and_then(|c| c.length_seconds);
    let (engagement_ms, engagement_pct_hundredths) =
        derived_fields(event.duration_ms, length_seconds);
    let notes = EnrichNotes {
        unknown_content: content.is_none(),
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
        engagement_ms,
        engagement_pct_hundredths,
        source_lsn,
        commit_us: 0,
    };
    (enriched, notes)
}

/// `(engagement_seconds in ms, engagement_pct in hundredths)` per SPEC §4's null rules.
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

impl EnrichedEvent {
    pub fn engagement_seconds_f64(&self) -> Option<f64> {
        // Division of an exact integer by a power of ten is correctly rounded: the nearest
        // double to the exact decimal.
        self.engagement_ms.map(|ms| ms as f64 / 1000.0)
    }

    pub fn engagement_pct_f64(&self) -> Option<f64> {
        self.engagement_pct_hundredths.map(|h| h as f64 / 100.0)
    }

    /// The JSON of SPEC §4, fields in its order, appended to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        out.extend_from_slice(b"{\"event_id\":");
        write_int(out, self.event_id);
        out.extend_from_slice(b",\"content_id\":");
        write_int(out, self.content_id);
        out.extend_from_slice(b",\"user_id\":");
        write_int(out, self.user_id);
        out.extend_from_slice(b",\"event_type\":");
        write_json_str(out, &self.event_type);
        out.extend_from_slice(b",\"event_ts\":\"");
        write_rfc3339_us(out, self.event_ts_us);
        out.extend_from_slice(b"\",\"duration_ms\":");
        match self.duration_ms {
            Some(d) => write_int(out, d as i64),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"device\":");
        match &self.device {
            Some(d) => write_json_str(out, d),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"content_type\":");
        match &self.content_type {
            Some(t) => write_json_str(out, t),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"length_seconds\":");
        match self.length_seconds {
            Some(l) => write_int(out, l as i64),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"engagement_seconds\":");
        match self.engagement_ms {
            Some(ms) => write_decimal(out, ms, 3),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"engagement_pct\":");
        match self.engagement_pct_hundredths {
            Some(h) => write_decimal(out, h, 2),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
        let _ = out.flush();
    }

    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(256);
        self.write_json(&mut out);
        String::from_utf8(out).expect("the JSON writer writes UTF-8")
    }
}

fn write_int(out: &mut Vec<u8>, v: i64) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(v).as_bytes());
}

/// `value / 10^scale` as a JSON number with trailing zeros trimmed but one fraction digit
/// kept: 7000/10^3 → `7.0`, 375 → `0.375`, 2/10^2 → `0.02`.
pub fn write_decimal(out: &mut Vec<u8>, value: i64, scale: u32) {
    let pow = 10i64.pow(scale);
    if value < 0 {
        out.push(b'-');
    }
    let abs = value.unsigned_abs();
    write_int(out, (abs / pow as u64) as i64);
    out.push(b'.');
    let mut frac = abs % pow as u64;
    let mut digits = scale;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    while frac.is_multiple_of(10) {
        frac /= 10;
        digits -= 1;
    }
    let s = frac.to_string();
    for _ in s.len() as u32..digits {
        out.push(b'0');
    }
    out.extend_from_slice(s.as_bytes());
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is the reference; writing to a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing JSON to memory cannot fail");
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Broken-down UTC time of microseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcParts {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micros: u32,
}

pub fn utc_parts(us: i64) -> UtcParts {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    UtcParts {
        year,
        month,
        day,
        hour: sod / 3600,
        minute: (sod / 60) % 60,
        second: sod % 60,
        micros,
    }
}

/// RFC 3339 UTC: `YYYY-MM-DDTHH:MM:SSZ`, with `.ffffff` when the microseconds are not zero.
pub fn write_rfc3339_us(out: &mut Vec<u8>, us: i64) {
    let p = utc_parts(us);
    let two = |out: &mut Vec<u8>, v: u32| {
        out.push(b'0' + (v / 10) as u8);
        out.push(b'0' + (v % 10) as u8);
    };
    let y = p.year.clamp(0, 9999) as u32;
    out.push(b'0' + (y / 1000) as u8);
    out.push(b'0' + ((y / 100) % 10) as u8);
    two(out, y % 100);
    out.push(b'-');
    two(out, p.month);
    out.push(b'-');
    two(out, p.day);
    out.push(b'T');
    two(out, p.hour);
    out.push(b':');
    two(out, p.minute);
    out.push(b':');
    two(out, p.second);
    if p.micros != 0 {
        out.push(b'.');
        let s = p.micros;
        for div in [100_000, 10_000, 1000, 100, 10, 1] {
            out.push(b'0' + ((s / div) % 10) as u8);
        }
    }
    out.push(b'Z');
}

pub fn rfc3339_us(us: i64) -> String {
    let mut out = Vec::with_capacity(27);
    write_rfc3339_us(&mut out, us);
    String::from_utf8(out).expect("ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let (e, notes) = enrich(seed_event(), Some(&video(Some(300))), Lsn(5));
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
        fn decimal_text_parses_to_the_same_double(ms in 0i64..=i32::MAX as i64) {
            let mut o = Vec::new();
            write_decimal(&mut o, ms, 3);
            let text = String::from_utf8(o).unwrap();
            let parsed: f64 = text.parse().unwrap();
            prop_assert_eq!(parsed, ms as f64 / 1000.0);
        }
    }
}
