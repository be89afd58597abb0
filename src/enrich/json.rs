//! The enriched event's JSON (docs/sinks.md, "The enriched event"): written by hand in
//! the documented field order (the hot path), and read back for `dlq replay`.

use super::time::{parse_rfc3339_utc, write_rfc3339_us};
use super::EnrichedEvent;
use crate::types::Lsn;

impl EnrichedEvent {
    /// The enriched event's JSON, fields in the documented order, appended to `out`.
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
        let (engagement_ms, engagement_pct_hundredths) =
            super::derived_fields(self.duration_ms, self.length_seconds);
        match engagement_ms {
            Some(ms) => write_decimal(out, ms, 3),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"engagement_pct\":");
        match engagement_pct_hundredths {
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
    let mut buf = itoa::Buffer::new();
    let s = buf.format(frac);
    for _ in s.len() as u32..digits {
        out.push(b'0');
    }
    out.extend_from_slice(s.as_bytes());
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // What JSON escapes: `"`, `\` and control characters. Texts without them (nearly all)
    // are copied as they are.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // serde_json's escaping is the reference; writing to a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing JSON to memory cannot fail");
}

/// The events of a request body as [`EnrichedEvent::write_json`] wrote it: a JSON array
/// (batch mode) or one object (per-event mode). Writing them again gives the same bytes;
/// `source_lsn` and the commit time, which the JSON does not carry, are 0.
pub fn parse_events(body: &str) -> Result<Vec<EnrichedEvent>, String> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    match value {
        serde_json::Value::Array(items) => items.iter().map(parse_event).collect(),
        object @ serde_json::Value::Object(_) => Ok(vec![parse_event(&object)?]),
        _ => Err("neither an event nor an array of events".into()),
    }
}

fn parse_event(v: &serde_json::Value) -> Result<EnrichedEvent, String> {
    let int = |k: &str| {
        v[k].as_i64()
            .ok_or_else(|| format!("{k} is not an integer"))
    };
    let opt_int = |k: &str| -> Result<Option<i64>, String> {
        match &v[k] {
            serde_json::Value::Null => Ok(None),
            n => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("{k} is not an integer")),
        }
    };
    let opt_i32 = |k: &str| -> Result<Option<i32>, String> {
        opt_int(k)?
            .map(|n| i32::try_from(n).map_err(|_| format!("{k} is out of range")))
            .transpose()
    };
    let opt_str = |k: &str| -> Result<Option<&str>, String> {
        match &v[k] {
            serde_json::Value::Null => Ok(None),
            s => s
                .as_str()
                .map(Some)
                .ok_or_else(|| format!("{k} is not a string")),
        }
    };
    // A decimal as written by write_decimal, in units of 10^-scale, read from its text so
    // that no float rounding enters.
    let opt_decimal = |k: &str, scale: u32| -> Result<Option<i64>, String> {
        match &v[k] {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => decimal_units(&n.to_string(), scale)
                .map(Some)
                .ok_or_else(|| format!("{k} is not a decimal with {scale} digits at most")),
            _ => Err(format!("{k} is not a number")),
        }
    };
    let ts = opt_str("event_ts")?.ok_or("event_ts is missing")?;
    let e = EnrichedEvent {
        event_id: int("event_id")?,
        content_id: int("content_id")?,
        user_id: int("user_id")?,
        event_type: opt_str("event_type")?
            .ok_or("event_type is missing")?
            .into(),
        event_ts_us: parse_rfc3339_utc(ts)
            .ok_or_else(|| format!("event_ts {ts:?} is not RFC 3339"))?,
        duration_ms: opt_i32("duration_ms")?,
        device: opt_str("device")?.map(Into::into),
        content_type: opt_str("content_type")?.map(Into::into),
        length_seconds: opt_i32("length_seconds")?,
        source_lsn: Lsn(0),
        commit_us: 0,
        tx_index: 0,
    };
    // The derived fields follow from duration_ms and length_seconds; an event whose
    // stated ones differ was not written by the engine (or was edited): refused, not
    // silently corrected.
    for (k, scale, stated, derived) in [
        (
            "engagement_seconds",
            3,
            opt_decimal("engagement_seconds", 3)?,
            e.engagement_ms(),
        ),
        (
            "engagement_pct",
            2,
            opt_decimal("engagement_pct", 2)?,
            e.engagement_pct_hundredths(),
        ),
    ] {
        if stated != derived {
            return Err(format!(
                "{k} is {}, but duration_ms and length_seconds give {}",
                units_text(stated, scale),
                units_text(derived, scale)
            ));
        }
    }
    Ok(e)
}

fn units_text(units: Option<i64>, scale: u32) -> String {
    match units {
        Some(u) => {
            let mut out = Vec::new();
            write_decimal(&mut out, u, scale);
            String::from_utf8(out).expect("digits")
        }
        None => "null".into(),
    }
}

/// `"7.0"` at scale 3 → 7000; `"0.02"` at scale 2 → 2; more fraction digits → `None`.
fn decimal_units(text: &str, scale: u32) -> Option<i64> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale as usize || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut units: i64 = whole.parse().ok()?;
    for i in 0..scale as usize {
        let d = frac.as_bytes().get(i).map_or(0, |b| (b - b'0') as i64);
        units = units.checked_mul(10)?.checked_add(d)?;
    }
    Some(if neg { -units } else { units })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn written_events_read_back_to_the_same_bytes(
            id in any::<i64>(), content in any::<i64>(), user in any::<i64>(),
            ts in -62_000_000_000_000_000i64..253_000_000_000_000_000,
            duration in proptest::option::of(any::<i32>()),
            length in proptest::option::of(any::<i32>()),
            device in proptest::option::of(".{0,12}"),
            kind in proptest::option::of("[a-z]{0,8}"),
            event_type in ".{0,12}",
        ) {
            let e = EnrichedEvent {
                event_id: id, content_id: content, user_id: user, event_type: event_type.into(),
                event_ts_us: ts, duration_ms: duration, device: device.map(Into::into),
                content_type: kind.map(Into::into), length_seconds: length,
                source_lsn: Lsn(0), commit_us: 0, tx_index: 0,
            };
            let one = e.to_json();
            let back = parse_events(&one).unwrap();
            prop_assert_eq!(&back, &vec![e.clone()]);
            let two = format!("[{one},{one}]");
            let back = parse_events(&two).unwrap();
            prop_assert_eq!(back.len(), 2);
            prop_assert_eq!(back[1].to_json(), one);
        }
    }

    proptest! {
        #[test]
        fn strings_are_written_as_serde_json_writes_them(s in "(.|[\\x00-\\x1f\"\\\\\u{7f}])*") {
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn unreadable_bodies_are_errors() {
        assert!(parse_events("nope").is_err());
        assert!(parse_events("3").is_err());
        assert!(parse_events(r#"[{"event_id":"x"}]"#).is_err());
        assert_eq!(decimal_units("0.375", 3), Some(375));
        assert_eq!(decimal_units("7.0", 3), Some(7000));
        assert_eq!(decimal_units("0.001", 2), None);
    }

    #[test]
    fn derived_fields_that_do_not_follow_are_refused() {
        let good = r#"{"event_id":16,"content_id":1,"user_id":999,"event_type":"play","event_ts":"2026-01-08T14:21:52.163702Z","duration_ms":7000,"device":"web","content_type":"video","length_seconds":300,"engagement_seconds":7.0,"engagement_pct":0.02}"#;
        let e = parse_events(good).unwrap();
        assert_eq!(e[0].to_json(), good);
        let edited = good.replace(r#""engagement_seconds":7.0"#, r#""engagement_seconds":8.0"#);
        let why = parse_events(&edited).unwrap_err();
        assert!(
            why.contains("engagement_seconds is 8.0, but duration_ms and length_seconds give 7.0"),
            "{why}"
        );
        let edited = good.replace(r#""engagement_pct":0.02"#, r#""engagement_pct":null"#);
        assert!(parse_events(&edited)
            .unwrap_err()
            .contains("engagement_pct is null"));
    }
}
