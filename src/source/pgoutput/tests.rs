//! Unit tests of the pgoutput decoder: round trips through [`super::encode`], captured
//! server bytes, malformed input.

use super::*;
use proptest::prelude::*;

/// What `pg_recvlogical -o proto_version=1 -o publication_names=engagement_cdc` wrote
/// from PostgreSQL 15 for: two inserts into `engagement_events` (one with NULLs and
/// microseconds) in one transaction; then an UPDATE of content 1, and an INSERT and a
/// DELETE of content 4 in another. Each message is followed by a newline.
const CAPTURE: &[u8] = include_bytes!("../../../tests/data/pgoutput_v1_capture.bin");

/// Split the capture: each message is the shortest newline-terminated prefix that parses.
fn captured_messages() -> Vec<Message<'static>> {
    let mut out = Vec::new();
    let mut rest = CAPTURE;
    while !rest.is_empty() {
        let end = (1..=rest.len())
            .filter(|&i| rest[i - 1] == b'\n')
            .find(|&i| Message::parse(&rest[..i - 1]).is_ok())
            .expect("a message in the capture");
        out.push(Message::parse(&rest[..end - 1]).unwrap());
        rest = &rest[end..];
    }
    out
}

#[test]
fn the_captured_stream_decodes() {
    let m = captured_messages();
    let tags: Vec<&str> = m
        .iter()
        .map(|m| match m {
            Message::Begin { .. } => "B",
            Message::Commit { .. } => "C",
            Message::Relation(_) => "R",
            Message::Insert { .. } => "I",
            Message::Update { .. } => "U",
            Message::Delete { .. } => "D",
            _ => "?",
        })
        .collect();
    assert_eq!(
        tags,
        ["B", "R", "I", "I", "C", "B", "R", "U", "I", "D", "C"]
    );
    let Message::Relation(r) = &m[1] else {
        panic!()
    };
    assert_eq!(
        (r.namespace.as_str(), r.name.as_str()),
        ("public", "engagement_events")
    );
    assert_eq!(r.replica_identity, b'd');
    let names: Vec<_> = r.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "id",
            "content_id",
            "user_id",
            "event_type",
            "event_ts",
            "duration_ms",
            "device",
            "raw_payload"
        ]
    );
    assert_eq!(r.columns[0].flags, 1);
    assert_eq!(r.columns[4].type_oid, 1184);
    assert_eq!(r.columns[7].type_oid, 3802);
    let Message::Insert { relation, new } = &m[3] else {
        panic!()
    };
    assert_eq!(*relation, r.id);
    assert_eq!(new.get(4), Value::Text(b"2026-01-08 14:21:52.163702+00"));
    assert_eq!(new.get(5), Value::Null);
    let Message::Delete { old, .. } = &m[9] else {
        panic!()
    };
    assert_eq!(old.get(0), Value::Text(b"4"));
    assert_eq!(old.get(1), Value::Null);
    let (
        Message::Begin { final_lsn, .. },
        Message::Commit {
            commit_lsn,
            end_lsn,
            ..
        },
    ) = (&m[0], &m[4])
    else {
        panic!()
    };
    assert_eq!(final_lsn, commit_lsn);
    assert!(end_lsn > commit_lsn);
}

#[test]
fn insert_with_nulls_and_text() {
    let mut buf = vec![b'I', 0, 0, 0x40, 0x05, b'N'];
    encode::tuple(
        &mut buf,
        &[
            Value::Text(b"16"),
            Value::Null,
            Value::Unchanged,
            Value::Text("تلفاز".as_bytes()),
        ],
    );
    let m = Message::parse(&buf).unwrap();
    let Message::Insert { relation, new } = m else {
        panic!()
    };
    assert_eq!(relation, 0x4005);
    assert_eq!(new.get(0), Value::Text(b"16"));
    assert_eq!(new.get(1), Value::Null);
    assert_eq!(new.get(2), Value::Unchanged);
    assert_eq!(new.get(3), Value::Text("تلفاز".as_bytes()));
    assert_eq!(new.get(9), Value::Null);
}

#[test]
fn truncated_and_garbage_input_are_errors_not_panics() {
    assert!(Message::parse(b"").is_err());
    assert!(Message::parse(b"I\x00\x00").is_err());
    assert!(Message::parse(b"Z")
        .unwrap_err()
        .0
        .contains("unknown message type"));
    let relation = encode::message(&captured_messages()[1]);
    for cut in 0..relation.len() {
        assert!(Message::parse(&relation[..cut]).is_err(), "cut at {cut}");
    }
    let mut extra = relation.clone();
    extra.push(0);
    assert!(Message::parse(&extra).unwrap_err().0.contains("trailing"));
    // Every cut of an insert is an error that says what was cut.
    let insert = encode::message(&Message::Insert {
        relation: 16385,
        new: Tuple(vec![
            Value::Text(b"42"),
            Value::Binary(b"\x00\x07"),
            Value::Null,
        ]),
    });
    for cut in 1..insert.len() {
        let e = Message::parse(&insert[..cut]).unwrap_err().0;
        assert!(
            e.contains("truncated") || e.contains("columns in"),
            "cut at {cut}: {e}"
        );
    }
    // A column count the message cannot hold is refused as such.
    let e = Message::parse(b"I\x00\x00\x40\x01N\xff\xffn")
        .unwrap_err()
        .0;
    assert_eq!(e, "tuple of 65535 columns in 1 bytes");
}

/// What [`Message::parse_insert`] makes of `bytes`, as [`Message::parse`] would say it:
/// `Ok(None)` where it leaves the message to `parse`.
fn parse_insert_as_message(bytes: &[u8]) -> Result<Option<Message<'_>>, DecodeError> {
    let mut values = [Value::Null; INLINE_COLUMNS];
    Ok(
        Message::parse_insert(bytes, &mut values)?.map(|(relation, n)| Message::Insert {
            relation,
            new: Tuple(values[..n].to_vec()),
        }),
    )
}

#[test]
fn an_insert_read_onto_the_stack_is_the_insert_parse_reads() {
    let insert = |n: usize| {
        encode::message(&Message::Insert {
            relation: 16385,
            new: Tuple((0..n).map(|_| Value::Text(b"7")).collect()),
        })
    };
    // Up to INLINE_COLUMNS columns: read, the same message.
    for n in [0, 1, 7, INLINE_COLUMNS] {
        let bytes = insert(n);
        assert_eq!(
            parse_insert_as_message(&bytes).unwrap(),
            Some(Message::parse(&bytes).unwrap()),
            "{n} columns"
        );
    }
    // More: left to `parse`, which reads them.
    let wide = insert(INLINE_COLUMNS + 1);
    assert_eq!(parse_insert_as_message(&wide).unwrap(), None);
    assert!(matches!(Message::parse(&wide), Ok(Message::Insert { .. })));
    // Other messages: left to `parse`.
    for m in captured_messages() {
        if !matches!(m, Message::Insert { .. }) {
            assert_eq!(parse_insert_as_message(&encode::message(&m)).unwrap(), None);
        }
    }
    // A cut or a trailing byte: the error `parse` gives.
    let bytes = insert(3);
    for cut in 1..bytes.len() {
        assert_eq!(
            parse_insert_as_message(&bytes[..cut]).unwrap_err(),
            Message::parse(&bytes[..cut]).unwrap_err(),
            "cut at {cut}"
        );
    }
    let mut extra = bytes.clone();
    extra.push(0);
    assert_eq!(
        parse_insert_as_message(&extra).unwrap_err(),
        Message::parse(&extra).unwrap_err()
    );
    assert_eq!(
        parse_insert_as_message(b"I\x00\x00\x40\x01N\xff\xffn").unwrap_err(),
        Message::parse(b"I\x00\x00\x40\x01N\xff\xffn").unwrap_err()
    );
}

fn arb_value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40)
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Message::parse(&bytes);
    }

    /// Whatever the bytes, reading an insert onto the stack agrees with `parse`: the same
    /// insert, the same error, or the message left to `parse`.
    #[test]
    fn parse_insert_agrees_with_parse(
        tail in proptest::collection::vec(any::<u8>(), 0..200),
        insert in any::<bool>(),
    ) {
        let mut bytes = tail;
        if insert && !bytes.is_empty() {
            bytes[0] = b'I';
        }
        match parse_insert_as_message(&bytes) {
            Ok(Some(m)) => prop_assert_eq!(Message::parse(&bytes).unwrap(), m),
            Ok(None) => {
                let narrow_insert = matches!(
                    Message::parse(&bytes),
                    Ok(Message::Insert { ref new, .. }) if new.0.len() <= INLINE_COLUMNS
                );
                prop_assert!(!narrow_insert, "an insert parse reads was left to it");
            }
            Err(e) => prop_assert_eq!(Message::parse(&bytes).unwrap_err(), e),
        }
    }

    #[test]
    fn insert_update_delete_round_trip(
        rel in any::<u32>(),
        vals in proptest::collection::vec((0u8..4, arb_value()), 0..12),
        with_old in any::<bool>(),
    ) {
        let values: Vec<Value<'_>> = vals.iter().map(|(k, v)| match k {
            0 => Value::Null,
            1 => Value::Unchanged,
            2 => Value::Text(v),
            _ => Value::Binary(v),
        }).collect();
        for m in [
            Message::Insert { relation: rel, new: Tuple(values.clone()) },
            Message::Update {
                relation: rel,
                old: with_old.then(|| Tuple(values.clone())),
                new: Tuple(values.clone()),
            },
            Message::Delete { relation: rel, old: Tuple(values.clone()) },
        ] {
            let bytes = encode::message(&m);
            if matches!(m, Message::Insert { .. }) {
                prop_assert_eq!(parse_insert_as_message(&bytes).unwrap(), Some(m.clone()));
            }
            prop_assert_eq!(Message::parse(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn boundaries_round_trip(a in any::<u64>(), b in any::<u64>(), t in any::<i64>(), x in any::<u32>(), rels in proptest::collection::vec(any::<u32>(), 0..5)) {
        for m in [
            Message::Begin { final_lsn: a, commit_time_us: t, xid: x },
            Message::Commit { flags: 0, commit_lsn: a, end_lsn: b, commit_time_us: t },
            Message::Truncate { options: 1, relations: rels.clone() },
            Message::Origin { lsn: a, name: "node".into() },
            Message::Type { oid: x, namespace: "public".into(), name: "mood".into() },
        ] {
            let bytes = encode::message(&m);
            prop_assert_eq!(Message::parse(&bytes).unwrap(), m);
        }
    }
}
