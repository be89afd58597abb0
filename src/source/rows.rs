//! From pgoutput tuples (or rows read with SQL as text) to typed rows: the relation cache
//! (columns found by their configured names, replaced on every Relation message) and the
//! one conversion of text values that the stream, `backfill` and `setup` share
//! (docs/configuration.md, "Source columns").

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use rustc_hash::FxHashMap;

use crate::checks::QualifiedTable;
use crate::enrich::{days_from_civil, ContentRow, RawEvent};
use crate::source::pgoutput::{Relation, Tuple, Value};
use crate::source::schema::{
    locate, Base, ContentColumns, ContentLayout, EventColumns, EventLayout, Located,
    RequiredColumn, TableColumn, TypeCatalog, CONTENT_FIELDS, EVENT_FIELDS,
};

/// What a relation id stands for.
#[derive(Debug, Clone)]
pub enum RelKind {
    /// Where the event fields are in the relation's tuples.
    Events(EventLayout),
    /// Where the content fields are.
    Content(ContentLayout),
    /// A table we do not read (changes to it are counted and ignored).
    Other(String),
}

/// Why a Relation message was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelationError {
    /// A required column has a type created after the type catalog was read: read it again
    /// ([`Relations::set_catalog`]) and reconnect.
    UnknownType(u32),
    /// A required column is missing or has a type the engine cannot read.
    Refused(String),
}

/// The relation cache of one replication session.
#[derive(Debug)]
pub struct Relations {
    events: QualifiedTable,
    content: QualifiedTable,
    event_columns: [RequiredColumn; EVENT_FIELDS],
    content_columns: [RequiredColumn; CONTENT_FIELDS],
    catalog: TypeCatalog,
    /// Types looked for in a fresh catalog already: not asked for again.
    looked_up: HashSet<u32>,
    pending_type: Option<u32>,
    /// Looked up once per change: Fx hashing of the relation id.
    by_id: FxHashMap<u32, RelKind>,
}

impl Relations {
    pub fn new(
        events: QualifiedTable,
        content: QualifiedTable,
        event_columns: &EventColumns,
        content_columns: &ContentColumns,
        catalog: TypeCatalog,
    ) -> Self {
        Relations {
            events,
            content,
            event_columns: event_columns.required(),
            content_columns: content_columns.required(),
            catalog,
            looked_up: HashSet::new(),
            pending_type: None,
            by_id: FxHashMap::default(),
        }
    }

    /// A type the last Relation message needed and the catalog did not have.
    pub fn pending_type(&self) -> Option<u32> {
        self.pending_type
    }

    /// A catalog read after [`RelationError::UnknownType`]: a type still missing from it is
    /// then refused by name instead of asked for again.
    pub fn set_catalog(&mut self, catalog: TypeCatalog) {
        if let Some(oid) = self.pending_type.take() {
            self.looked_up.insert(oid);
        }
        self.catalog = catalog;
    }

    /// Record a Relation message. A source table without a required column (dropped or
    /// retyped) is an error naming it: the engine halts with the checkpoint held.
    pub fn update(&mut self, rel: &Relation) -> Result<&RelKind, RelationError> {
        let columns: Vec<TableColumn> = rel
            .columns
            .iter()
            .map(|c| TableColumn {
                name: c.name.clone(),
                type_oid: c.type_oid,
                typmod: c.type_modifier,
            })
            .collect();
        let full = format!("{}.{}", rel.namespace, rel.name);
        let (catalog, looked_up) = (&self.catalog, &self.looked_up);
        let kind = if rel.namespace == self.events.schema && rel.name == self.events.name {
            layout(&full, &self.event_columns, &columns, catalog, looked_up).map(RelKind::Events)
        } else if rel.namespace == self.content.schema && rel.name == self.content.name {
            layout(&full, &self.content_columns, &columns, catalog, looked_up).map(RelKind::Content)
        } else {
            Ok(RelKind::Other(full))
        };
        if let Err(RelationError::UnknownType(oid)) = &kind {
            self.pending_type = Some(*oid);
        }
        let kind = kind?;
        self.by_id.insert(rel.id, kind);
        Ok(&self.by_id[&rel.id])
    }

    pub fn get(&self, id: u32) -> Option<&RelKind> {
        self.by_id.get(&id)
    }
}

/// Where `required` are in a relation's columns — unless one of them has a type the catalog
/// does not know yet (and was not looked up again already).
fn layout<const N: usize>(
    table: &str,
    required: &[RequiredColumn; N],
    columns: &[TableColumn],
    catalog: &TypeCatalog,
    looked_up: &HashSet<u32>,
) -> Result<[Located; N], RelationError> {
    let new_type = columns
        .iter()
        .filter(|c| required.iter().any(|r| r.column == c.name))
        .map(|c| c.type_oid)
        .find(|&oid| catalog.is_unknown(oid) && !looked_up.contains(&oid));
    if let Some(oid) = new_type {
        return Err(RelationError::UnknownType(oid));
    }
    locate(table, required, columns, catalog).map_err(RelationError::Refused)
}

/// A row's values by position: a pgoutput tuple, or a row read with SQL as text.
pub trait Fields {
    fn value(&self, i: usize) -> Value<'_>;
}

impl Fields for Tuple<'_> {
    fn value(&self, i: usize) -> Value<'_> {
        self.get(i)
    }
}

/// A tuple's values read without a vector ([`Message::parse_insert`]).
///
/// [`Message::parse_insert`]: crate::source::pgoutput::Message::parse_insert
impl Fields for [Value<'_>] {
    fn value(&self, i: usize) -> Value<'_> {
        self.get(i).copied().unwrap_or(Value::Null)
    }
}

/// A row read with SQL, every column cast to text (`backfill`, `setup`'s copy of
/// `content`): the same text pgoutput sends, so the same conversion applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRow(pub Vec<Option<String>>);

impl TextRow {
    pub fn from_row(row: &tokio_postgres::Row) -> TextRow {
        TextRow((0..row.len()).map(|i| row.get(i)).collect())
    }
}

impl Fields for TextRow {
    fn value(&self, i: usize) -> Value<'_> {
        match self.0.get(i) {
            Some(Some(s)) => Value::Text(s.as_bytes()),
            _ => Value::Null,
        }
    }
}

/// The zone a `timestamp without time zone` is read in (`postgres.timestamp_zone`).
#[derive(Debug, Clone)]
pub struct Zone {
    name: String,
    tz: jiff::tz::TimeZone,
    utc: bool,
}

impl Zone {
    /// An IANA zone name such as `UTC` or `Europe/Paris`.
    pub fn named(name: &str) -> Result<Zone, String> {
        let tz = jiff::tz::TimeZone::get(name).map_err(|e| {
            format!("{name:?} is not a time zone this engine knows ({e}); use an IANA name such as UTC or Europe/Paris")
        })?;
        let utc = tz == jiff::tz::TimeZone::UTC || name.eq_ignore_ascii_case("utc");
        Ok(Zone {
            name: name.to_string(),
            tz,
            utc,
        })
    }

    pub fn utc() -> Zone {
        Zone {
            name: "UTC".into(),
            tz: jiff::tz::TimeZone::UTC,
            utc: true,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A wall-clock time (µs, as if it were UTC) in this zone → µs since 1970 UTC. A time
    /// skipped by a DST change reads with the offset before it, a repeated one as its
    /// first occurrence (RFC 5545's "compatible" choice).
    pub fn to_utc(&self, local_us: i64) -> Option<i64> {
        if self.utc {
            return Some(local_us);
        }
        let ts = jiff::Timestamp::from_microsecond(local_us).ok()?;
        let civil = jiff::tz::Offset::UTC.to_datetime(ts);
        let t = self.tz.to_ambiguous_timestamp(civil).compatible().ok()?;
        Some(t.as_microsecond())
    }
}

/// One log line per 10 s at most for values delivered as NULL, with how many were not
/// logged in between; every one is counted in `engagement_cdc_invalid_values_total`.
#[derive(Debug, Default)]
pub struct UnfitLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl UnfitLog {
    pub const EVERY: Duration = Duration::from_secs(10);

    pub fn note(&mut self, why: &str, at: impl std::fmt::Display) {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return;
        }
        let more = match self.suppressed {
            0 => String::new(),
            n => format!("; {n} more such values since the last line"),
        };
        tracing::warn!("{why} ({at}){more}; counted in engagement_cdc_invalid_values_total");
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Why an event row could not be read; the row is counted and skipped.
pub type Invalid = String;

/// A value that did not fit its sink column and was delivered as NULL: what and why, for
/// the (rate-limited) log line.
pub type Unfit = String;

pub fn decode_event(
    t: &(impl Fields + ?Sized),
    at: &EventLayout,
    zone: &Zone,
) -> Result<(RawEvent, Option<Unfit>), Invalid> {
    let mut unfit = None;
    let event = RawEvent {
        id: required_i64(t, at[0], "id")?,
        content_id: required_i64(t, at[1], "content_id")?,
        user_id: required_i64(t, at[2], "user_id")?,
        event_type: required_text(t, at[3].pos, "event_type")?,
        event_ts_us: match t.value(at[4].pos) {
            Value::Text(b) => parse_event_ts(b, at[4].base, zone).ok_or_else(|| {
                format!(
                    "event_ts {:?} is not a finite timestamp the sinks can store",
                    String::from_utf8_lossy(b)
                )
            })?,
            Value::Binary(b) => binary_timestamp(b, at[4].base, zone).ok_or_else(|| {
                format!(
                    "event_ts {} is not a finite timestamp the sinks can store",
                    binary_timestamp_text(b)
                )
            })?,
            _ => return Err("event_ts is NULL".into()),
        },
        duration_ms: optional_i32(t, at[5], "duration_ms", &mut unfit),
        device: optional_text(t, at[6].pos),
    };
    Ok((event, unfit))
}

fn parse_event_ts(b: &[u8], base: Base, zone: &Zone) -> Option<i64> {
    match base {
        Base::Timestamp => parse_timestamp(b, zone),
        _ => parse_timestamptz(b),
    }
}

/// A content row from a new tuple; an unchanged-TOAST `content_type` keeps `previous`'s.
pub fn decode_content(
    t: &(impl Fields + ?Sized),
    at: &ContentLayout,
    previous: Option<&ContentRow>,
) -> Result<(ContentRow, Option<Unfit>), Invalid> {
    let content_id = required_i64(t, at[0], "content_id")?;
    let content_type = match t.value(at[1].pos) {
        Value::Text(b) | Value::Binary(b) => {
            Some(Arc::<str>::from(String::from_utf8_lossy(b).as_ref()))
        }
        Value::Unchanged => previous.and_then(|p| p.content_type.clone()),
        _ => None,
    };
    let mut unfit = None;
    let length_seconds = match t.value(at[2].pos) {
        Value::Unchanged => previous.and_then(|p| p.length_seconds),
        _ => optional_i32(t, at[2], "length_seconds", &mut unfit),
    };
    Ok((
        ContentRow {
            content_id,
            content_type,
            length_seconds,
        },
        unfit,
    ))
}

/// The key of a content row in an old tuple (Delete, key-changing Update).
pub fn content_key(t: &(impl Fields + ?Sized), at: &ContentLayout) -> Result<i64, Invalid> {
    required_i64(t, at[0], "content_id")
}

fn required_i64(t: &(impl Fields + ?Sized), at: Located, name: &str) -> Result<i64, Invalid> {
    let value = t.value(at.pos);
    match integer_of(value, at.base) {
        Some(v) => v.map_err(|why| {
            format!(
                "{name} {:?} {}",
                integer_text(value, at.base),
                why.describe("Int64")
            )
        }),
        None if value == Value::Null => Err(format!("{name} is NULL")),
        None => Err(format!("{name} is not in the message")),
    }
}

/// An optional Int32 field: a value that does not fit is NULL, and `unfit` says why.
fn optional_i32(
    t: &(impl Fields + ?Sized),
    at: Located,
    name: &str,
    unfit: &mut Option<Unfit>,
) -> Option<i32> {
    let value = t.value(at.pos);
    let fitted = integer_of(value, at.base)?
        .and_then(|v| i32::try_from(v).map_err(|_| NotInteger::OutOfRange));
    match fitted {
        Ok(v) => Some(v),
        Err(why) => {
            unfit.get_or_insert_with(|| {
                format!(
                    "{name} {:?} {}; delivered as NULL",
                    integer_text(value, at.base),
                    why.describe("Int32")
                )
            });
            None
        }
    }
}

/// An integer field's value in either form; `None` when it has none (NULL, unchanged).
fn integer_of(value: Value<'_>, base: Base) -> Option<Result<i64, NotInteger>> {
    match value {
        Value::Text(b) => Some(parse_integer(b)),
        Value::Binary(b) => Some(binary_integer(b, base)),
        _ => None,
    }
}

/// An integer field's value as Postgres prints it, for messages.
fn integer_text(value: Value<'_>, base: Base) -> String {
    match value {
        Value::Text(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Binary(b) => binary_integer_text(b, base),
        _ => String::new(),
    }
}

fn required_text(
    t: &(impl Fields + ?Sized),
    i: usize,
    name: &str,
) -> Result<CompactString, Invalid> {
    optional_text(t, i).ok_or_else(|| format!("{name} is NULL"))
}

fn optional_text(t: &(impl Fields + ?Sized), i: usize) -> Option<CompactString> {
    match t.value(i) {
        // A text type's binary form is its text.
        Value::Text(b) | Value::Binary(b) => Some(match std::str::from_utf8(b) {
            Ok(s) => CompactString::from(s),
            Err(_) => CompactString::from(String::from_utf8_lossy(b)),
        }),
        _ => None,
    }
}

/// Why an integer field's text is not an integer of the sink column's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotInteger {
    /// Past the column's range.
    OutOfRange,
    /// A numeric with a non-zero fraction.
    Fraction,
    /// Not a number at all (`NaN`, `Infinity`, garbage).
    NotANumber,
}

impl NotInteger {
    fn describe(self, column: &str) -> String {
        match self {
            NotInteger::OutOfRange => format!("does not fit the sinks' {column}"),
            NotInteger::Fraction => "has a fraction; the sinks need a whole number".into(),
            NotInteger::NotANumber => "is not an integer".into(),
        }
    }
}

/// An integer in Postgres's text output of any integer type or of `numeric`: digits with an
/// optional sign, and for numeric an optional fraction that must be all zeros (`120.000`).
pub fn parse_integer(b: &[u8]) -> Result<i64, NotInteger> {
    // The common case in one pass: an optional sign and at most 18 digits (which cannot
    // overflow an i64); anything else goes the general way.
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    if !digits.is_empty() && digits.len() <= 18 {
        let mut v: i64 = 0;
        let mut all_digits = true;
        for &c in digits {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                all_digits = false;
                break;
            }
            v = v * 10 + d as i64;
        }
        if all_digits {
            return Ok(if neg { -v } else { v });
        }
    }
    parse_integer_general(b)
}

/// [`parse_integer`] for any input: numeric's fraction, 19 digits, errors.
fn parse_integer_general(b: &[u8]) -> Result<i64, NotInteger> {
    let (whole, frac) = match b.iter().position(|&c| c == b'.') {
        Some(dot) => (&b[..dot], &b[dot + 1..]),
        None => (b, &b[b.len()..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(NotInteger::NotANumber);
    }
    let digits = whole.strip_prefix(b"-").unwrap_or(whole);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(NotInteger::NotANumber);
    }
    if frac.iter().any(|&c| c != b'0') {
        return Err(NotInteger::Fraction);
    }
    parse_int(whole).ok_or(NotInteger::OutOfRange)
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

/// An integer field's value in binary form (pgoutput's `binary` option): a big-endian
/// smallint, integer or bigint, or a numeric, which must be whole as in text.
pub fn binary_integer(b: &[u8], base: Base) -> Result<i64, NotInteger> {
    match (base, b.len()) {
        (Base::Numeric { .. }, _) => binary_numeric(b),
        (_, 2) => Ok(i16::from_be_bytes([b[0], b[1]]) as i64),
        (_, 4) => Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64),
        (_, 8) => Ok(i64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ])),
        _ => Err(NotInteger::NotANumber),
    }
}

/// A numeric's binary form: digit count, weight (of the first digit, in powers of 10000),
/// sign, display scale, then base-10000 digits, all big-endian 16-bit words.
struct Numeric<'a> {
    weight: i64,
    sign: u16,
    dscale: u16,
    digits: &'a [u8],
}

const NUMERIC_NEG: u16 = 0x4000;

impl Numeric<'_> {
    fn parse(b: &[u8]) -> Option<Numeric<'_>> {
        let word = |i: usize| Some(u16::from_be_bytes([*b.get(2 * i)?, *b.get(2 * i + 1)?]));
        let ndigits = word(0)? as usize;
        if b.len() != 8 + 2 * ndigits {
            return None;
        }
        Some(Numeric {
            weight: word(1)? as i16 as i64,
            sign: word(2)?,
            dscale: word(3)?,
            digits: &b[8..],
        })
    }
    fn digit(&self, i: i64) -> i64 {
        let i = i as usize;
        match self.digits.get(2 * i..2 * i + 2) {
            Some(w) => u16::from_be_bytes([w[0], w[1]]) as i64,
            None => 0,
        }
    }
    fn ndigits(&self) -> i64 {
        (self.digits.len() / 2) as i64
    }
}

fn binary_numeric(b: &[u8]) -> Result<i64, NotInteger> {
    let n = Numeric::parse(b).ok_or(NotInteger::NotANumber)?;
    if n.sign != 0 && n.sign != NUMERIC_NEG {
        // NaN, Infinity, -Infinity.
        return Err(NotInteger::NotANumber);
    }
    if (0..n.ndigits()).any(|i| n.digit(i) > 9999) {
        return Err(NotInteger::NotANumber);
    }
    // Digits past the weight are the fraction.
    if (0..n.ndigits()).any(|i| i > n.weight && n.digit(i) != 0) {
        return Err(NotInteger::Fraction);
    }
    // Accumulated below zero, so that i64::MIN fits.
    let mut v: i64 = 0;
    for i in 0..=n.weight {
        v = v
            .checked_mul(10_000)
            .and_then(|v| v.checked_sub(n.digit(i)))
            .ok_or(NotInteger::OutOfRange)?;
    }
    if n.sign == NUMERIC_NEG {
        Ok(v)
    } else {
        v.checked_neg().ok_or(NotInteger::OutOfRange)
    }
}

/// A binary integer or numeric as Postgres would print it, for messages.
pub fn binary_integer_text(b: &[u8], base: Base) -> String {
    if !matches!(base, Base::Numeric { .. }) {
        if let Ok(v) = binary_integer(b, base) {
            return v.to_string();
        }
    }
    let Some(n) = Numeric::parse(b) else {
        return format!("{} bytes that are not a number", b.len());
    };
    match n.sign {
        0xC000 => return "NaN".into(),
        0xD000 => return "Infinity".into(),
        0xF000 => return "-Infinity".into(),
        _ => {}
    }
    let mut out = String::new();
    if n.sign == NUMERIC_NEG {
        out.push('-');
    }
    if n.weight < 0 {
        out.push('0');
    }
    for i in 0..=n.weight {
        if i == 0 {
            out += &n.digit(i).to_string();
        } else {
            out += &format!("{:04}", n.digit(i));
        }
    }
    if n.dscale > 0 {
        let mut frac = String::new();
        let mut i = n.weight + 1;
        while frac.len() < n.dscale as usize {
            frac += &format!("{:04}", n.digit(i));
            i += 1;
        }
        frac.truncate(n.dscale as usize);
        out.push('.');
        out += &frac;
    }
    out
}

/// Postgres's epoch, 2000-01-01 00:00 UTC, in µs since 1970.
const PG_EPOCH_US: i64 = 946_684_800_000_000;
/// The last microsecond of year 9999 in µs since 1970: text of a later time has a
/// five-digit year, which the sinks cannot store.
const LAST_US_OF_9999: i64 = 253_402_300_799_999_999;

/// An event time in binary form: µs since 2000-01-01 (UTC for `timestamptz`, a wall-clock
/// time read in `zone` for `timestamp`) → µs since 1970 UTC; the same times as in text are
/// refused (infinities, years past 9999).
pub fn binary_timestamp(b: &[u8], base: Base, zone: &Zone) -> Option<i64> {
    let raw = i64::from_be_bytes(b.try_into().ok()?);
    if raw == i64::MAX || raw == i64::MIN {
        return None;
    }
    let wall = raw.checked_add(PG_EPOCH_US)?;
    if wall > LAST_US_OF_9999 {
        return None;
    }
    match base {
        Base::Timestamp => zone.to_utc(wall),
        _ => Some(wall),
    }
}

/// A binary timestamp for messages.
fn binary_timestamp_text(b: &[u8]) -> String {
    match <[u8; 8]>::try_from(b).map(i64::from_be_bytes) {
        Ok(i64::MAX) => "infinity".into(),
        Ok(i64::MIN) => "-infinity".into(),
        Ok(raw) => format!("{raw} µs after 2000-01-01"),
        Err(_) => format!("{} bytes that are not a timestamp", b.len()),
    }
}

/// A `timestamptz` in ISO text output (`2026-01-08 14:21:52.163702+00`, any offset such as
/// `+05:30` or `-03:00:15`, optional ` BC`) → microseconds since 1970-01-01 UTC.
/// `infinity`, `-infinity`, years past 9999 and text without an offset are `None`.
pub fn parse_timestamptz(b: &[u8]) -> Option<i64> {
    let (local, offset_secs) = parse_iso(b)?;
    Some(local - offset_secs? * 1_000_000)
}

/// A `timestamp without time zone` in ISO text output (`2026-01-08 14:21:52.163702`),
/// read as a wall-clock time in `zone` → microseconds since 1970-01-01 UTC.
pub fn parse_timestamp(b: &[u8], zone: &Zone) -> Option<i64> {
    match parse_iso(b)? {
        (local, None) => zone.to_utc(local),
        (_, Some(_)) => None,
    }
}

/// The wall-clock time as µs (as if it were UTC) and the offset east in seconds, if any.
fn parse_iso(b: &[u8]) -> Option<(i64, Option<i64>)> {
    parse_iso_fast(b).or_else(|| parse_iso_general(b))
}

fn parse_iso_general(b: &[u8]) -> Option<(i64, Option<i64>)> {
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
    let offset_secs: Option<i64> = if offset.is_empty() {
        None
    } else {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut op = offset[1..].splitn(3, ':');
        let h: i64 = op.next()?.parse().ok()?;
        let m: i64 = op.next().map(|m| m.parse().ok()).unwrap_or(Some(0))?;
        let sec: i64 = op.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
        Some(sign * (h * 3600 + m * 60 + sec))
    };
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some((local * 1_000_000 + micros, offset_secs))
}

/// The walsender's usual form, `YYYY-MM-DD HH:MM:SS[.f{1,6}][±HH[:MM]]`, without
/// allocating; `None` for anything else (the general parser then decides).
fn parse_iso_fast(b: &[u8]) -> Option<(i64, Option<i64>)> {
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
    if b.len() < 19
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
    if b.get(i) == Some(&b'.') {
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
    let days = days_from_civil(year, month, day);
    let local = (days * 86_400 + hour * 3600 + minute * 60 + second) * 1_000_000 + micros;
    let Some(&sign) = b.get(i) else {
        return Some((local, None));
    };
    let sign = match sign {
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
    Some((local, Some(sign * offset_secs)))
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

    #[test]
    fn values_that_do_not_fit_are_logged_at_most_every_10_s() {
        let mut log = UnfitLog::default();
        log.note("first", "here");
        let first = log.last;
        log.note("second", "here");
        log.note("third", "here");
        assert_eq!(log.suppressed, 2, "two lines held back within 10 s");
        assert_eq!(log.last, first);
        log.last = log.last.map(|t| t - UnfitLog::EVERY);
        log.note("fourth", "here");
        assert_eq!(
            log.suppressed, 0,
            "a line again after 10 s, saying how many were held"
        );
    }

    proptest! {
        /// The one-pass common case gives what the general parser gives, for every text
        /// near an integer's (digits, a sign, a dot, a stray character, up to 22 long).
        #[test]
        fn the_integer_fast_path_is_the_general_parser(text in "-?[0-9]{0,22}(\\.[0-9]{0,3})?[a0-9]?") {
            prop_assert_eq!(parse_integer(text.as_bytes()), parse_integer_general(text.as_bytes()));
        }
    }

    #[test]
    fn integers_of_every_type_and_numeric() {
        assert_eq!(parse_integer(b"120"), Ok(120));
        assert_eq!(parse_integer(b"-120"), Ok(-120));
        assert_eq!(parse_integer(b"120.000"), Ok(120));
        assert_eq!(parse_integer(b"120.5"), Err(NotInteger::Fraction));
        assert_eq!(parse_integer(b"-0.001"), Err(NotInteger::Fraction));
        assert_eq!(
            parse_integer(b"99999999999999999999"),
            Err(NotInteger::OutOfRange)
        );
        for nan in ["NaN", "Infinity", "-Infinity", "", "-", ".5", "1e5", "12a"] {
            assert_eq!(
                parse_integer(nan.as_bytes()),
                Err(NotInteger::NotANumber),
                "{nan}"
            );
        }
    }

    #[test]
    fn timestamps_without_zone_read_in_the_configured_zone() {
        let utc = Zone::utc();
        let paris = Zone::named("Europe/Paris").unwrap();
        let t = |s: &str, z: &Zone| parse_timestamp(s.as_bytes(), z).map(rfc3339_us);
        assert_eq!(
            t("2026-01-08 14:21:52.163702", &utc).unwrap(),
            "2026-01-08T14:21:52.163702Z"
        );
        // Winter: UTC+1; summer: UTC+2.
        assert_eq!(
            t("2026-01-08 14:21:52", &paris).unwrap(),
            "2026-01-08T13:21:52Z"
        );
        assert_eq!(
            t("2026-07-08 14:21:52", &paris).unwrap(),
            "2026-07-08T12:21:52Z"
        );
        // 02:30 on 29 March 2026 does not exist in Paris: read with the offset before.
        assert_eq!(
            t("2026-03-29 02:30:00", &paris).unwrap(),
            "2026-03-29T01:30:00Z"
        );
        // 02:30 on 25 October 2026 happens twice: the first one.
        assert_eq!(
            t("2026-10-25 02:30:00", &paris).unwrap(),
            "2026-10-25T00:30:00Z"
        );
        let bc = parse_timestamp(b"0044-03-15 12:00:00 BC", &utc);
        assert!(bc.is_some());
        assert_eq!(bc, parse_timestamptz(b"0044-03-15 12:00:00+00 BC"));
        // An offset is not a timestamp without time zone, and no offset is not a timestamptz.
        assert_eq!(t("2026-01-08 14:21:52+00", &utc), None);
        assert_eq!(parse_timestamptz(b"2026-01-08 14:21:52"), None);
        assert_eq!(t("infinity", &utc), None);
        assert!(Zone::named("Mars/Olympus").unwrap_err().contains("IANA"));
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
            prop_assert_eq!(parse_iso_fast(text.as_bytes()).map(|(l, o)| l - o.unwrap() * 1_000_000), Some(us));
            prop_assert_eq!(parse_iso_general(text.as_bytes()).map(|(l, o)| l - o.unwrap() * 1_000_000), Some(us));
        }

        #[test]
        fn timestamps_round_trip(us in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
            // Postgres's ISO output for UTC: date, time, up to 6 fraction digits, +00.
            let text = rfc3339_us(us).replace('T', " ").replace('Z', "+00");
            prop_assert_eq!(parse_timestamptz(text.as_bytes()), Some(us));
        }
    }

    /// A decimal's binary numeric as Postgres's `numeric_send` writes it: base-10000
    /// digits without leading or trailing zero digits, the weight of the first, the sign
    /// and the display scale (the fraction digits of the text).
    fn numeric_binary(text: &str) -> Vec<u8> {
        let (neg, t) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        let int = format!("{}{int}", "0".repeat((4 - int.len() % 4) % 4));
        let frac_padded = format!("{frac}{}", "0".repeat((4 - frac.len() % 4) % 4));
        let mut groups: Vec<u16> = int
            .as_bytes()
            .chunks(4)
            .chain(frac_padded.as_bytes().chunks(4))
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let mut weight = (int.len() / 4) as i16 - 1;
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        let sign: u16 = if neg && !groups.is_empty() { 0x4000 } else { 0 };
        let mut out = Vec::new();
        for w in [groups.len() as u16, weight as u16, sign, frac.len() as u16] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        for g in groups {
            out.extend_from_slice(&g.to_be_bytes());
        }
        out
    }

    #[test]
    fn binary_values_read_as_their_text() {
        let numeric = Base::Numeric { scale: None };
        for text in [
            "0",
            "1800.000",
            "-7",
            "12345678901234",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "0.5",
            "10000.0001",
            "0.000",
        ] {
            let b = numeric_binary(text);
            assert_eq!(
                binary_integer(&b, numeric),
                parse_integer(text.as_bytes()),
                "{text}"
            );
            assert_eq!(binary_integer_text(&b, numeric), text);
        }
        for (word, text) in [
            (0xC000u16, "NaN"),
            (0xD000, "Infinity"),
            (0xF000, "-Infinity"),
        ] {
            let b = [0, 0, 0, 0, (word >> 8) as u8, 0, 0, 0];
            assert_eq!(binary_integer(&b, numeric), Err(NotInteger::NotANumber));
            assert_eq!(binary_integer_text(&b, numeric), text);
        }
        assert_eq!(
            binary_integer(&[0, 1, 0], numeric),
            Err(NotInteger::NotANumber)
        );
        assert_eq!(
            binary_integer(&(-300i16).to_be_bytes(), Base::Integer),
            Ok(-300)
        );
        assert_eq!(
            binary_integer(&i32::MIN.to_be_bytes(), Base::Integer),
            Ok(i32::MIN as i64)
        );
        assert_eq!(
            binary_integer(&[1, 2, 3], Base::Integer),
            Err(NotInteger::NotANumber)
        );
        assert_eq!(
            binary_integer_text(&3_000_000_000i64.to_be_bytes(), Base::Integer),
            "3000000000"
        );
        // Timestamps: the infinities and years past 9999 are refused, as in text.
        let ts = |raw: i64| binary_timestamp(&raw.to_be_bytes(), Base::TimestampTz, &Zone::utc());
        assert_eq!(ts(i64::MAX), None);
        assert_eq!(ts(i64::MIN), None);
        assert_eq!(ts(0), Some(PG_EPOCH_US));
        assert_eq!(ts(LAST_US_OF_9999 - PG_EPOCH_US), Some(LAST_US_OF_9999));
        assert_eq!(ts(LAST_US_OF_9999 - PG_EPOCH_US + 1), None);
        assert_eq!(
            binary_timestamp(&[0; 4], Base::TimestampTz, &Zone::utc()),
            None
        );
        assert_eq!(binary_timestamp_text(&i64::MAX.to_be_bytes()), "infinity");
    }

    proptest! {
        #[test]
        fn binary_integers_are_their_text(v in any::<i64>(), small in any::<i16>(), mid in any::<i32>()) {
            prop_assert_eq!(binary_integer(&v.to_be_bytes(), Base::Integer), parse_integer(v.to_string().as_bytes()));
            prop_assert_eq!(binary_integer(&small.to_be_bytes(), Base::Integer), Ok(small as i64));
            prop_assert_eq!(binary_integer(&mid.to_be_bytes(), Base::Integer), Ok(mid as i64));
        }

        /// A numeric in binary form reads as its text does: whole values, fractions,
        /// values past an i64, with any display scale.
        #[test]
        fn binary_numerics_are_their_text(text in "-?[0-9]{1,22}(\\.[0-9]{1,9})?") {
            let int = text.trim_start_matches('-').split('.').next().unwrap();
            // Postgres prints no leading zeros.
            prop_assume!(int == "0" || !int.starts_with('0'));
            let b = numeric_binary(&text);
            let numeric = Base::Numeric { scale: None };
            prop_assert_eq!(binary_integer(&b, numeric), parse_integer(text.as_bytes()));
            let shown = binary_integer_text(&b, numeric);
            // Postgres prints a negative zero without its sign.
            prop_assert_eq!(shown.trim_start_matches('-'), text.trim_start_matches('-'));
        }

        #[test]
        fn binary_timestamps_are_their_text(us in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
            let raw = (us - PG_EPOCH_US).to_be_bytes();
            let text = rfc3339_us(us).replace('T', " ").replace('Z', "+00");
            prop_assert_eq!(binary_timestamp(&raw, Base::TimestampTz, &Zone::utc()), parse_timestamptz(text.as_bytes()));
            // A `timestamp` is a wall-clock time, read in the configured zone either way.
            let paris = Zone::named("Europe/Paris").unwrap();
            let wall = rfc3339_us(us).replace('T', " ").replace('Z', "");
            prop_assert_eq!(binary_timestamp(&raw, Base::Timestamp, &paris), parse_timestamp(wall.as_bytes(), &paris));
        }
    }
}
