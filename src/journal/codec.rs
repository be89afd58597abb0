//! The journal's record format: `[length u32][crc32 u32][payload]`, little-endian, the CRC
//! over the payload. The payload is the batch's sequence number, its commit end LSN and
//! commit time (0 / `i64::MIN` when absent), the number of events, then each event's fields
//! in a fixed order (strings as length + UTF-8, optional values behind a presence byte).

use std::sync::Arc;

use crate::enrich::EnrichedEvent;
use crate::types::Lsn;

/// The flag on the event count of records whose events carry `tx_index`.
const WITH_TX_INDEX: u64 = 1 << 63;

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
    // The high bit marks this format (each event ends with its `tx_index`); records of
    // the first format (without it) are still read.
    put_u64(out, events.len() as u64 | WITH_TX_INDEX);
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
        // The derived fields, still written (the format is unchanged) though computed
        // again from the fields above when read.
        put_opt_i64(out, e.engagement_ms());
        put_opt_i64(out, e.engagement_pct_hundredths());
        put_u64(out, e.source_lsn.0);
        put_i64(out, e.commit_us);
        out.extend_from_slice(&e.tx_index.to_le_bytes());
    }
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
    let n = (n & !WITH_TX_INDEX) as usize;
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

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

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
            Some(&content),
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

    proptest! {
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
