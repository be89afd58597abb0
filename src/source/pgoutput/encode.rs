//! Encoders of pgoutput messages, the inverse of [`Message::parse`](super::Message::parse):
//! for the unit tests and for `benches/hot_path.rs`, which includes this file by path. Not
//! part of the library.

use super::{Message, RelColumn, Relation, Value};

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn tuple(out: &mut Vec<u8>, values: &[Value<'_>]) {
    out.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for v in values {
        match v {
            Value::Null => out.push(b'n'),
            Value::Unchanged => out.push(b'u'),
            Value::Text(t) => {
                out.push(b't');
                out.extend_from_slice(&(t.len() as i32).to_be_bytes());
                out.extend_from_slice(t);
            }
            Value::Binary(t) => {
                out.push(b'b');
                out.extend_from_slice(&(t.len() as i32).to_be_bytes());
                out.extend_from_slice(t);
            }
        }
    }
}

pub fn message(m: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Message::Begin {
            final_lsn,
            commit_time_us,
            xid,
        } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time_us.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time_us,
        } => {
            out.push(b'C');
            out.push(*flags);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time_us.to_be_bytes());
        }
        Message::Origin { lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&lsn.to_be_bytes());
            cstr(&mut out, name);
        }
        Message::Relation(r) => {
            out.push(b'R');
            out.extend_from_slice(&r.id.to_be_bytes());
            cstr(&mut out, &r.namespace);
            cstr(&mut out, &r.name);
            out.push(r.replica_identity);
            out.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
            for c in &r.columns {
                out.push(c.flags);
                cstr(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Message::Type {
            oid,
            namespace,
            name,
        } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            cstr(&mut out, namespace);
            cstr(&mut out, name);
        }
        Message::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, &new.0);
        }
        Message::Update { relation, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            if let Some(old) = old {
                out.push(b'K');
                tuple(&mut out, &old.0);
            }
            out.push(b'N');
            tuple(&mut out, &new.0);
        }
        Message::Delete { relation, old } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'K');
            tuple(&mut out, &old.0);
        }
        Message::Truncate { options, relations } => {
            out.push(b'T');
            out.extend_from_slice(&(relations.len() as u32).to_be_bytes());
            out.push(*options);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            out.push(b'M');
            out.push(u8::from(*transactional));
            out.extend_from_slice(&lsn.to_be_bytes());
            cstr(&mut out, prefix);
            out.extend_from_slice(&(content.len() as u32).to_be_bytes());
            out.extend_from_slice(content);
        }
    }
    out
}

/// The Relation of `public.engagement_events` (id 16385) as Postgres sends it for the
/// documented table: id, content_id, user_id, event_type, event_ts (timestamptz),
/// duration_ms, device, raw_payload (jsonb).
pub fn events_relation() -> Relation {
    Relation {
        id: 16385,
        namespace: "public".into(),
        name: "engagement_events".into(),
        replica_identity: b'd',
        columns: [
            ("id", 20),
            ("content_id", 20),
            ("user_id", 20),
            ("event_type", 25),
            ("event_ts", 1184),
            ("duration_ms", 23),
            ("device", 25),
            ("raw_payload", 3802),
        ]
        .iter()
        .map(|(n, t)| RelColumn {
            flags: 0,
            name: n.to_string(),
            type_oid: *t,
            type_modifier: -1,
        })
        .collect(),
    }
}
