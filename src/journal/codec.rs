//! The journal's record format: `[length u32][crc32 u32][payload]`, little-endian, the CRC
//! over the payload. The payload is the batch's sequence number, its commit end LSN and
//! commit time (0 / `i64::MIN` when absent), the number of events (its two high bits say
//! the format), then each event's fields in a fixed order.
//!
//! Records are written in the compact form: integers as LEB128 varints, signed ones
//! zigzagged; the event id, commit LSN and commit time as differences from the previous
//! event's (consecutive ids and events of one transaction then take a byte each), the
//! event time as its difference from the commit time; optional values and strings as
//! varint `0` for none, else the value (or length) plus one; the derived fields left out
//! (they follow from the others). About 35 bytes an event where the fixed-width form took
//! about 120: a third of the bytes to copy, write and keep (docs/benchmarks.md, "A compact
//! journal"). Records of both earlier forms (fixed-width fields, with and without
//! `tx_index`) are still read; an engine older than the compact form cannot read its
//! records.

use std::sync::Arc;

use crate::enrich::EnrichedEvent;
use crate::types::Lsn;

/// The flag on the event count of records whose events carry `tx_index`.
const WITH_TX_INDEX: u64 = 1 << 63;

/// The flag (with [`WITH_TX_INDEX`]) on the event count of records in the compact form.
const COMPACT: u64 = 1 << 62;

/// Bytes before each payload.
pub const HEADER: usize = 8;

/// One batch as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub commit_end: Option<Lsn>,
    pub last_commit_us: Option<i64>,
    pub events: Vec<EnrichedEvent>,
}

impl Record {
    /// The commit LSNs of its streamed events (backfilled ones carry 0).
    pub fn lsn_range(&self) -> Option<(Lsn, Lsn)> {
        lsn_range(&self.events)
    }
}

/// The lowest and highest commit LSN of streamed events (backfilled ones carry 0).
pub fn lsn_range(events: &[EnrichedEvent]) -> Option<(Lsn, Lsn)> {
    events
        .iter()
        .map(|e| e.source_lsn)
        .filter(|l| l.0 > 0)
        .fold(None, |acc, l| {
            Some(acc.map_or((l, l), |(lo, hi): (Lsn, Lsn)| (lo.min(l), hi.max(l))))
        })
}

/// Append one framed record to `out`.
pub fn encode(
    out: &mut Vec<u8>,
    seq: u64,
    commit_end: Option<Lsn>,
    last_commit_us: Option<i64>,
    events: &[EnrichedEvent],
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    put_u64(out, seq);
    put_u64(out, commit_end.map_or(0, |l| l.0));
    put_i64(out, last_commit_us.unwrap_or(i64::MIN));
    put_u64(out, events.len() as u64 | WITH_TX_INDEX | COMPACT);
    let (mut id, mut lsn, mut commit) = (0i64, 0u64, 0i64);
    for e in events {
        put_signed(out, e.event_id.wrapping_sub(id));
        id = e.event_id;
        put_signed(out, e.content_id);
        put_signed(out, e.user_id);
        put_len_str(out, Some(&e.event_type));
        put_signed(out, e.commit_us.wrapping_sub(commit));
        commit = e.commit_us;
        put_signed(out, e.event_ts_us.wrapping_sub(e.commit_us));
        put_opt_signed(out, e.duration_ms.map(i64::from));
        put_len_str(out, e.device.as_deref());
        put_len_str(out, e.content_type.as_deref());
        put_opt_signed(out, e.length_seconds.map(i64::from));
        put_signed(out, e.source_lsn.0.wrapping_sub(lsn) as i64);
        lsn = e.source_lsn.0;
        put_varint(out, u64::from(e.tx_index));
    }
    frame(out, start);
}

/// Fill in the header of the record that starts at `start`: its payload's length and CRC.
fn frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The payload length and CRC of a header.
pub fn header(bytes: &[u8; HEADER]) -> (usize, u32) {
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..].try_into().expect("4 bytes"));
    (len, crc)
}

/// Decode a payload whose CRC matched. `None` when it is malformed (a bug or a damaged
/// file that happened to pass the CRC).
pub fn decode(payload: &[u8]) -> Option<Record> {
    let mut r = Cursor { b: payload, at: 0 };
    let seq = r.u64()?;
    let commit_end = match r.u64()? {
        0 => None,
        l => Some(Lsn(l)),
    };
    let last_commit_us = match r.i64()? {
        i64::MIN => None,
        t => Some(t),
    };
    let n = r.u64()?;
    let with_index = n & WITH_TX_INDEX != 0;
    let compact = n & COMPACT != 0;
    let n = (n & !(WITH_TX_INDEX | COMPACT)) as usize;
    if compact {
        if !with_index {
            return None;
        }
        return decode_compact(r, n).map(|events| Record {
            seq,
            commit_end,
            last_commit_us,
            events,
        });
    }
    let mut events = Vec::with_capacity(n.min(payload.len() / 64 + 1));
    for _ in 0..n {
        let mut e = EnrichedEvent {
            event_id: r.i64()?,
            content_id: r.i64()?,
            user_id: r.i64()?,
            event_type: r.str()?.into(),
            event_ts_us: r.i64()?,
            duration_ms: r.opt_i32()?,
            device: r.opt_str()?.map(Into::into),
            content_type: r.opt_str()?.map(Arc::from),
            length_seconds: r.opt_i32()?,
            ..EnrichedEvent::default()
        };
        // The derived fields: what the fields above give, so not kept.
        r.opt_i64()?;
        r.opt_i64()?;
        e.source_lsn = Lsn(r.u64()?);
        e.commit_us = r.i64()?;
        e.tx_index = if with_index { r.u32()? } else { 0 };
        events.push(e);
    }
    if !with_index {
        // The first format: number the events of each transaction within the record (a
        // transaction cut across records then repeats indices; only journals written
        // before this format can have that).
        let mut last = (Lsn(0), 0u32);
        for e in &mut events {
            if e.source_lsn.0 > 0 {
                last = if last.0 == e.source_lsn {
                    (last.0, last.1 + 1)
                } else {
                    (e.source_lsn, 0)
                };
                e.tx_index = last.1;
            }
        }
    }
    (r.at == payload.len()).then_some(Record {
        seq,
        commit_end,
        last_commit_us,
        events,
    })
}

/// The events of a compact record (see the module's documentation), `None` when the
/// payload is malformed or has bytes left over.
fn decode_compact(mut r: Cursor<'_>, n: usize) -> Option<Vec<EnrichedEvent>> {
    // At least 12 bytes an event: a count beyond that is damage, not a reason to allocate.
    let mut events = Vec::with_capacity(n.min((r.b.len() - r.at) / 12 + 1));
    let (mut id, mut lsn, mut commit) = (0i64, 0u64, 0i64);
    for _ in 0..n {
        id = id.wrapping_add(r.signed()?);
        let content_id = r.signed()?;
        let user_id = r.signed()?;
        let event_type = r.len_str()??.into();
        commit = commit.wrapping_add(r.signed()?);
        let event_ts_us = commit.wrapping_add(r.signed()?);
        let duration_ms = r.opt_signed_i32()?;
        let device = r.len_str()?.map(Into::into);
        let content_type = r.len_str()?.map(Arc::from);
        let length_seconds = r.opt_signed_i32()?;
        lsn = lsn.wrapping_add(r.signed()? as u64);
        let tx_index = u32::try_from(r.varint()?).ok()?;
        events.push(EnrichedEvent {
            event_id: id,
            content_id,
            user_id,
            event_type,
            event_ts_us,
            duration_ms,
            device,
            content_type,
            length_seconds,
            source_lsn: Lsn(lsn),
            commit_us: commit,
            tx_index,
        });
    }
    (r.at == r.b.len()).then_some(events)
}

/// `v` as an unsigned LEB128 varint, 7 bits a byte, the lowest first: the journal's integers
/// and the lengths of ClickHouse's RowBinary strings.
pub(crate) fn put_varint(out: &mut impl bytes::BufMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// A signed value as an unsigned one that is small when the value is near 0.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    (z >> 1) as i64 ^ -((z & 1) as i64)
}

fn put_signed(out: &mut Vec<u8>, v: i64) {
    put_varint(out, zigzag(v));
}

/// `0` for none, else the zigzagged value plus one (an `i32` widened: no overflow).
fn put_opt_signed(out: &mut Vec<u8>, v: Option<i64>) {
    put_varint(out, v.map_or(0, |v| zigzag(v) + 1));
}

/// `0` for none, else the length plus one, then the bytes.
fn put_len_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            put_varint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
        None => out.push(0),
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A record in the fixed-width form earlier versions wrote (`with_index`: the second
/// form, whose events end with `tx_index`), for the tests that read it.
#[cfg(test)]
fn encode_fixed(
    out: &mut Vec<u8>,
    seq: u64,
    commit_end: Option<Lsn>,
    last_commit_us: Option<i64>,
    events: &[EnrichedEvent],
    with_index: bool,
) {
    fn put_opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
        match v {
            Some(v) => {
                out.push(1);
                put_i64(out, v);
            }
            None => out.push(0),
        }
    }
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => {
                out.push(1);
                put_str(out, s);
            }
            None => out.push(0),
        }
    }
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    put_u64(out, seq);
    put_u64(out, commit_end.map_or(0, |l| l.0));
    put_i64(out, last_commit_us.unwrap_or(i64::MIN));
    let flag = if with_index { WITH_TX_INDEX } else { 0 };
    put_u64(out, events.len() as u64 | flag);
    for e in events {
        put_i64(out, e.event_id);
        put_i64(out, e.content_id);
        put_i64(out, e.user_id);
        put_str(out, &e.event_type);
        put_i64(out, e.event_ts_us);
        put_opt_i64(out, e.duration_ms.map(i64::from));
        put_opt_str(out, e.device.as_deref());
        put_opt_str(out, e.content_type.as_deref());
        put_opt_i64(out, e.length_seconds.map(i64::from));
        put_opt_i64(out, e.engagement_ms());
        put_opt_i64(out, e.engagement_pct_hundredths());
        put_u64(out, e.source_lsn.0);
        put_i64(out, e.commit_us);
        if with_index {
            out.extend_from_slice(&e.tx_index.to_le_bytes());
        }
    }
    frame(out, start);
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.b.get(self.at)?;
            self.at += 1;
            // The tenth byte may only hold the top bit.
            if shift == 63 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn signed(&mut self) -> Option<i64> {
        Some(unzigzag(self.varint()?))
    }

    fn opt_signed_i32(&mut self) -> Option<Option<i32>> {
        match self.varint()? {
            0 => Some(None),
            z => i32::try_from(unzigzag(z - 1)).ok().map(Some),
        }
    }

    fn len_str(&mut self) -> Option<Option<&'a str>> {
        match self.varint()? {
            0 => Some(None),
            n => {
                let n = usize::try_from(n - 1).ok()?;
                std::str::from_utf8(self.take(n)?).ok().map(Some)
            }
        }
    }

    fn flag(&mut self) -> Option<bool> {
        match self.take(1)?[0] {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn opt_i64(&mut self) -> Option<Option<i64>> {
        if self.flag()? {
            Some(Some(self.i64()?))
        } else {
            Some(None)
        }
    }

    fn opt_i32(&mut self) -> Option<Option<i32>> {
        match self.opt_i64()? {
            Some(v) => Some(Some(i32::try_from(v).ok()?)),
            None => Some(None),
        }
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        if self.flag()? {
            Some(Some(self.str()?))
        } else {
            Some(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{enrich, ContentRow, RawEvent};
    use proptest::prelude::*;

    fn event(id: i64, device: Option<String>, duration: Option<i32>) -> EnrichedEvent {
        let content = ContentRow {
            content_id: 3,
            content_type: Some("vidéo".into()),
            length_seconds: Some(300),
        };
        let (mut e, _) = enrich(
            RawEvent {
                id,
                content_id: 3,
                user_id: -7,
                event_type: "play \"x\"".into(),
                event_ts_us: -1,
                duration_ms: duration,
                device: device.map(Into::into),
            },
            Some(content.clone()),
            Lsn(0x1_0000_0010),
        );
        e.commit_us = 1_767_882_112_000_000;
        e
    }

    #[test]
    fn records_round_trip_and_damage_is_seen() {
        let events = vec![
            event(1, Some("tv 📺".into()), Some(7000)),
            event(i64::MAX, None, None),
        ];
        let mut out = Vec::new();
        encode(&mut out, 42, Some(Lsn(99)), None, &events);
        let (len, crc) = header(out[..HEADER].try_into().unwrap());
        assert_eq!(len, out.len() - HEADER);
        assert_eq!(crc, crc32fast::hash(&out[HEADER..]));
        let r = decode(&out[HEADER..]).unwrap();
        assert_eq!(r.seq, 42);
        assert_eq!(r.commit_end, Some(Lsn(99)));
        assert_eq!(r.last_commit_us, None);
        assert_eq!(r.events, events);
        assert_eq!(
            r.lsn_range(),
            Some((Lsn(0x1_0000_0010), Lsn(0x1_0000_0010)))
        );
        // A truncated payload never decodes.
        assert!(decode(&out[HEADER..out.len() - 1]).is_none());
    }

    #[test]
    fn records_of_the_fixed_width_forms_are_still_read() {
        let mut a = event(10, Some("web".into()), Some(1500));
        let mut b = event(11, None, None);
        a.tx_index = 0;
        b.tx_index = 1;
        let events = vec![a, b];
        for with_index in [true, false] {
            let mut out = Vec::new();
            encode_fixed(&mut out, 7, Some(Lsn(99)), Some(5), &events, with_index);
            let r = decode(&out[HEADER..]).unwrap();
            assert_eq!(
                (r.seq, r.commit_end, r.last_commit_us),
                (7, Some(Lsn(99)), Some(5))
            );
            // Without tx_index the events of one transaction are numbered from 0 in order.
            assert_eq!(r.events, events, "with_index {with_index}");
        }
    }

    #[test]
    fn a_stream_event_takes_about_a_third_of_the_fixed_width_bytes() {
        // Consecutive ids of one transaction, as a stream's batch holds them.
        let events: Vec<EnrichedEvent> = (0..1000)
            .map(|i| {
                let mut e = event(1_000_000 + i, Some("web".into()), Some(120_000));
                e.event_ts_us = e.commit_us - 3_000_000;
                e.tx_index = i as u32;
                e
            })
            .collect();
        let (mut compact, mut fixed) = (Vec::new(), Vec::new());
        encode(&mut compact, 1, Some(Lsn(99)), Some(5), &events);
        encode_fixed(&mut fixed, 1, Some(Lsn(99)), Some(5), &events, true);
        let per = |b: &Vec<u8>| (b.len() - HEADER - 32) / events.len();
        assert!(per(&compact) <= 40, "{} bytes an event", per(&compact));
        assert!(
            per(&fixed) >= 3 * per(&compact),
            "{} against {}",
            per(&fixed),
            per(&compact)
        );
        assert_eq!(decode(&compact[HEADER..]).unwrap().events, events);
    }

    fn any_event() -> impl Strategy<Value = EnrichedEvent> {
        (
            (
                any::<i64>(),
                any::<i64>(),
                any::<i64>(),
                ".{0,12}",
                any::<i64>(),
            ),
            (
                proptest::option::of(any::<i32>()),
                proptest::option::of(".{0,20}"),
                proptest::option::of(".{0,8}"),
                proptest::option::of(any::<i32>()),
            ),
            (any::<u64>(), any::<i64>(), any::<u32>()),
        )
            .prop_map(
                |((id, content, user, kind, ts), (dur, dev, ctype, len), (lsn, commit, ix))| {
                    EnrichedEvent {
                        event_id: id,
                        content_id: content,
                        user_id: user,
                        event_type: kind.as_str().into(),
                        event_ts_us: ts,
                        duration_ms: dur,
                        device: dev.map(|d| d.as_str().into()),
                        content_type: ctype.map(|c| Arc::from(c.as_str())),
                        length_seconds: len,
                        source_lsn: Lsn(lsn),
                        commit_us: commit,
                        tx_index: ix,
                    }
                },
            )
    }

    proptest! {
        /// Any events, extreme values and differences that wrap included, come back as
        /// they went in, and every shorter payload is refused.
        #[test]
        fn compact_records_round_trip(events in proptest::collection::vec(any_event(), 0..8)) {
            let mut out = Vec::new();
            encode(&mut out, 3, None, Some(-1), &events);
            let r = decode(&out[HEADER..]).unwrap();
            prop_assert_eq!(r.events, events);
            for cut in HEADER..out.len() {
                prop_assert!(decode(&out[HEADER..cut]).is_none());
            }
        }

        #[test]
        fn any_event_round_trips(id in any::<i64>(), d in proptest::option::of(any::<i32>()), dev in proptest::option::of(".{0,20}")) {
            let e = vec![event(id, dev, d)];
            let mut out = Vec::new();
            encode(&mut out, 1, None, Some(5), &e);
            prop_assert_eq!(decode(&out[HEADER..]).unwrap().events, e);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
