//! From pgoutput tuples to typed rows: the relation cache (columns found by name, replaced
//! on every Relation message) and the parsing of text values.

use std::collections::HashMap;
use std::sync::Arc;

use crate::checks::QualifiedTable;
use crate::enrich::{days_from_civil, ContentRow, RawEvent};
use crate::source::pgoutput::{Relation, Tuple, Value};
use crate::source::schema::{locate, CONTENT_COLUMNS, EVENT_COLUMNS};

/// What a relation id stands for.
#[derive(Debug, Clone)]
pub enum RelKind {
    /// Positions of [`EVENT_COLUMNS`] in the relation's tuples.
    Events([usize; 7]),
    /// Positions of [`CONTENT_COLUMNS`].
    Content([usize; 3]),
    /// A table we do not read (changes to it are counted and ignored).
    Other(String),
}

/// The relation cache of one replication session.
#[derive(Debug)]
pub struct Relations {
    events: QualifiedTable,
    content: QualifiedTable,
    by_id: HashMap<u32, RelKind>,
}

impl Relations {
    pub fn new(events: QualifiedTable, content: QualifiedTable) -> Self {
        Relations {
            events,
            content,
            by_id: HashMap::new(),
        }
    }

    /// Record a Relation message. A source table without a required column (dropped or
    /// retyped) is an error naming it: the engine halts with the checkpoint held.
    pub fn update(&mut self, rel: &Relation) -> Result<&RelKind, String> {
        let columns: Vec<(String, u32)> = rel
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        let full = format!("{}.{}", rel.namespace, rel.name);
        let kind = if rel.namespace == self.events.schema && rel.name == self.events.name {
            RelKind::Events(locate(&full, &EVENT_COLUMNS, &columns)?)
        } else if rel.namespace == self.content.schema && rel.name == self.content.name {
            RelKind::Content(locate(&full, &CONTENT_COLUMNS, &columns)?)
        } else {
            RelKind::Other(full)
        };
        self.by_id.insert(rel.id, kind);
        Ok(&self.by_id[&rel.id])
    }

    pub fn get(&self, id: u32) -> Option<&RelKind> {
        self.by_id.get(&id)
    }
}

/// Why an event row could not be read; the row is counted and skipped.
pub type Invalid = String;

pub fn decode_event(t: &Tuple<'_>, pos: &[usize; 7]) -> Result<RawEvent, Invalid> {
    Ok(RawEvent {
        id: required_i64(t, pos[0], "id")?,
        content_id: required_i64(t, pos[1], "content_id")?,
        user_id: required_i64(t, pos[2], "user_id")?,
        event_type: required_text(t, pos[3], "event_type")?,
        event_ts_us: match t.get(pos[4]) {
            Value::Text(b) => parse_timestamptz(b).ok_or_else(|| {
                format!(
                    "event_ts {:?} is not a finite timestamp the sinks can store",
                    String::from_utf8_lossy(b)
                )
            })?,
            _ => return Err("event_ts is NULL".into()),
        },
        duration_ms: optional_i32(t, pos[5], "duration_ms")?,
        device: optional_text(t, pos[6]),
    })
}

/// A content row from a new tuple; an unchanged-TOAST `content_type` keeps `previous`'s.
pub fn decode_content(
    t: &Tuple<'_>,
    pos: &[usize; 3],
    previous: Option<&ContentRow>,
) -> Result<ContentRow, Invalid> {
    let content_id = required_i64(t, pos[0], "content_id")?;
    let content_type = match t.get(pos[1]) {
        Value::Text(b) => Some(Arc::<str>::from(String::from_utf8_lossy(b).as_ref())),
        Value::Unchanged => previous.and_then(|p| p.content_type.clone()),
        _ => None,
    };
    let length_seconds = match t.get(pos[2]) {
        Value::Unchanged => previous.and_then(|p| p.length_seconds),
        _ => optional_i32(t, pos[2], "length_seconds")?,
    };
    Ok(ContentRow {
        content_id,
        content_type,
        length_seconds,
    })
}

/// The key of a content row in an old tuple (Delete, key-changing Update).
pub fn content_key(t: &Tuple<'_>, pos: &[usize; 3]) -> Result<i64, Invalid> {
    required_i64(t, pos[0], "content_id")
}

fn required_i64(t: &Tuple<'_>, i: usize, name: &str) -> Result<i64, Invalid> {
    match t.get(i) {
        Value::Text(b) => parse_int(b)
            .ok_or_else(|| format!("{name} {:?} is not an integer", String::from_utf8_lossy(b))),
        Value::Null => Err(format!("{name} is NULL")),
        _ => Err(format!("{name} is not in the message")),
    }
}

fn optional_i32(t: &Tuple<'_>, i: usize, name: &str) -> Result<Option<i32>, Invalid> {
    match t.get(i) {
        Value::Text(b) => parse_int(b)
            .and_then(|v| i32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| format!("{name} {:?} is not an integer", String::from_utf8_lossy(b))),
        _ => Ok(None),
    }
}

fn required_text(t: &Tuple<'_>, i: usize, name: &str) -> Result<String, Invalid> {
    optional_text(t, i).ok_or_else(|| format!("{name} is NULL"))
}

fn optional_text(t: &Tuple<'_>, i: usize) -> Option<String> {
    match t.get(i) {
        Value::Text(b) => Some(match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        }),
        _ => None,
    }
}

/// An integer in Postgres's text output.
pub fn parse_int(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_sub((c - b'0') as i64)?;
    }
    if neg {
        Some(v)
    } else {
        v.checked_neg()
    }
}

/// A `timestamptz` in ISO text output (`2026-01-08 14:21:52.163702+00`, any offset such as
/// `+05:30` or `-03:00:15`, optional ` BC`) → microseconds since 1970-01-01 UTC.
/// `infinity`, `-infinity` and years past 9999 are `None`: no sink can store them.
pub fn parse_timestamptz(b: &[u8]) -> Option<i64> {
    parse_iso_fast(b).or_else(|| parse_timestamptz_general(b))
}

fn parse_timestamptz_general(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (date, rest) = s.split_at(s.find([' ', 'T'])?);
    let rest = &rest[1..];
    let mut dp = date.splitn(3, '-');
    let year: i64 = dp.next()?.parse().ok()?;
    let month: u32 = dp.next()?.parse().ok()?;
    let day: u32 = dp.next()?.parse().ok()?;
    let year = if bc { 1 - year } else { year };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year > 9999 {
        return None;
    }
    let off_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(off_at);
    let (hms, frac) = match time.split_once('.') {
        Some((h, f)) => (h, f),
        None => (time, ""),
    };
    let mut tp = hms.splitn(3, ':');
    let hour: i64 = tp.next()?.parse().ok()?;
    let minute: i64 = tp.next()?.parse().ok()?;
    let second: i64 = tp.next()?.parse().ok()?;
    if hour > 24 || minute > 59 || second > 60 {
        return None;
    }
    let mut micros: i64 = 0;
    if !frac.is_empty() {
        if frac.len() > 6 || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        micros = frac.parse::<i64>().ok()? * 10i64.pow(6 - frac.len() as u32);
    }
    let offset_secs: i64 = if offset.is_empty() {
        0
    } else {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut op = offset[1..].splitn(3, ':');
        let h: i64 = op.next()?.parse().ok()?;
        let m: i64 = op.next().map(|m| m.parse().ok()).unwrap_or(Some(0))?;
        let sec: i64 = op.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
        sign * (h * 3600 + m * 60 + sec)
    };
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some((local - offset_secs) * 1_000_000 + micros)
}

/// The walsender's usual form, `YYYY-MM-DD HH:MM:SS[.f{1,6}]±HH[:MM]`, without allocating;
/// `None` for anything else (the general parser then decides).
fn parse_iso_fast(b: &[u8]) -> Option<i64> {
    fn num(b: &[u8]) -> Option<i64> {
        let mut v = 0i64;
        for &c in b {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (c - b'0') as i64;
        }
        Some(v)
    }
    if b.len() < 22
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (
        num(&b[0..4])?,
        num(&b[5..7])? as u32,
        num(&b[8..10])? as u32,
    );
    let (hour, minute, second) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 24
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 6 {
            return None;
        }
        micros = num(&b[start..i])? * 10i64.pow(6 - digits as u32);
    }
    let sign = match b.get(i)? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let rest = &b[i + 1..];
    let offset_secs = match rest.len() {
        2 => num(rest)? * 3600,
        5 if rest[2] == b':' => num(&rest[0..2])? * 3600 + num(&rest[3..5])? * 60,
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some((local - sign * offset_secs) * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::rfc3339_us;
    use proptest::prelude::*;

    #[test]
    fn timestamps_in_every_offset() {
        let t = |s: &str| parse_timestamptz(s.as_bytes()).map(rfc3339_us);
        assert_eq!(t("2026-01-08 14:21:52+00").unwrap(), "2026-01-08T14:21:52Z");
        assert_eq!(
            t("2026-01-08 14:21:52.163702+00").unwrap(),
            "2026-01-08T14:21:52.163702Z"
        );
        assert_eq!(
            t("2026-01-08 14:21:52.5+00").unwrap(),
            "2026-01-08T14:21:52.500000Z"
        );
        assert_eq!(
            t("2026-01-08 17:51:52+03:30").unwrap(),
            "2026-01-08T14:21:52Z"
        );
        assert_eq!(t("2026-01-08 11:21:52-03").unwrap(), "2026-01-08T14:21:52Z");
        assert_eq!(t("1970-01-01 00:00:00+00").unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(
            t("1969-12-31 23:59:59.999999+00").unwrap(),
            "1969-12-31T23:59:59.999999Z"
        );
        assert_eq!(t("infinity"), None);
        assert_eq!(t("-infinity"), None);
        assert_eq!(t("10000-01-01 00:00:00+00"), None);
        assert_eq!(t("2026-13-01 00:00:00+00"), None);
        assert_eq!(t("garbage"), None);
    }

    #[test]
    fn integers() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-7"), Some(-7));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int(b"9223372036854775808"), None);
        assert_eq!(parse_int(b""), None);
        assert_eq!(parse_int(b"-"), None);
        assert_eq!(parse_int(b"1.5"), None);
    }

    proptest! {
        #[test]
        fn integers_round_trip(v in any::<i64>()) {
            prop_assert_eq!(parse_int(v.to_string().as_bytes()), Some(v));
        }

        #[test]
        fn the_fast_path_agrees_with_the_general_parser(
            us in -62_135_596_800_000_000i64..253_402_300_799_999_999,
            offset_min in -900i64..900,
        ) {
            // Render `us` in a zone `offset_min` minutes east, as Postgres would.
            let local = rfc3339_us(us + offset_min * 60_000_000).replace('T', " ").replace('Z', "");
            let (sign, abs) = if offset_min < 0 { ('-', -offset_min) } else { ('+', offset_min) };
            let text = if abs % 60 == 0 {
                format!("{local}{sign}{:02}", abs / 60)
            } else {
                format!("{local}{sign}{:02}:{:02}", abs / 60, abs % 60)
            };
            prop_assert_eq!(parse_iso_fast(text.as_bytes()), Some(us));
            prop_assert_eq!(parse_timestamptz_general(text.as_bytes()), Some(us));
        }

        #[test]
        fn timestamps_round_trip(us in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
            // Postgres's ISO output for UTC: date, time, up to 6 fraction digits, +00.
            let text = rfc3339_us(us).replace('T', " ").replace('Z', "+00");
            prop_assert_eq!(parse_timestamptz(text.as_bytes()), Some(us));
        }
    }
}
