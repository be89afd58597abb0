//! `engagement-cdc mock-api`: the external system's stand-in for the demo and the tests —
//! a real HTTP server.
//!
//! `POST /events` takes a JSON array of events or one event object and answers
//! `200 {"status":"ok","received":N}`, or `--fail-status` (500) on an injected failure
//! (`--fail-rate`, with `Retry-After` when `--retry-after` is set), optionally after a delay
//! (`--slow-rate`, `--slow-ms`). Every event is checked against docs/sinks.md ("The
//! enriched event": field order, types, the `event_ts` form): one that differs gets `422`
//! naming the field and is counted in `invalid_events`. With `--require-token` a request
//! without that bearer token gets `401`. `GET /stats` answers the counts; with
//! `--keep-events`, `GET /events/{id}` answers the last JSON received for that event,
//! byte for byte. Every request is logged on stdout in one access-log line.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State as AxState;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use rustc_hash::FxHashSet;
use serde::Serialize;

use crate::ops::http::Peer;

#[derive(Debug, Clone)]
pub struct MockOptions {
    pub listen: String,
    pub fail_rate: f64,
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// The status of an injected failure.
    pub fail_status: u16,
    /// `Retry-After` (seconds) sent with an injected failure.
    pub retry_after: Option<u64>,
    /// Requests must carry `Authorization: Bearer` this.
    pub require_token: Option<String>,
    /// Keep each event's JSON for `GET /events/{id}`.
    pub keep_events: bool,
    /// Remember accepted event ids in this file across restarts (one per line, appended as
    /// they arrive): a mock stopped and started again still knows what it received.
    pub ids_file: Option<std::path::PathBuf>,
    /// HTTPS instead of HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug, Default, Serialize, Clone, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub events: u64,
    pub unique_event_ids: u64,
    pub duplicates: u64,
    pub failures_injected: u64,
    /// Events whose JSON differs from docs/sinks.md (answered 422).
    pub invalid_events: u64,
    /// Requests without the required bearer token (answered 401).
    pub unauthorized: u64,
}

/// The fields of an enriched event, in the order docs/sinks.md gives them.
const FIELDS: [&str; 11] = [
    "event_id",
    "content_id",
    "user_id",
    "event_type",
    "event_ts",
    "duration_ms",
    "device",
    "content_type",
    "length_seconds",
    "engagement_seconds",
    "engagement_pct",
];

/// What each field of an event may hold (docs/sinks.md): an integer within ± the bound,
/// a string, a number, an `event_ts`; optional ones may also be null.
#[derive(Clone, Copy)]
enum Kind {
    Int { max: i64, null: bool },
    Text { null: bool },
    Number,
    Timestamp,
}

/// An id: any 64-bit integer.
const ID: Kind = Kind::Int {
    max: i64::MAX,
    null: false,
};
/// A nullable `integer` column.
const INT4: Kind = Kind::Int {
    max: i32::MAX as i64,
    null: true,
};

/// What each of [`FIELDS`] may hold, in the same order.
const KINDS: [Kind; 11] = [
    ID,
    ID,
    ID,
    Kind::Text { null: false },
    Kind::Timestamp,
    INT4,
    Kind::Text { null: true },
    Kind::Text { null: true },
    INT4,
    Kind::Number,
    Kind::Number,
];

/// One field's value, checked as it is parsed (nothing is allocated for a good event):
/// its integer when it has one.
struct Field(usize);

impl<'de> serde::de::DeserializeSeed<'de> for Field {
    type Value = Option<i64>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<i64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl Field {
    fn int<E: serde::de::Error>(&self, v: i128) -> Result<Option<i64>, E> {
        match KINDS[self.0] {
            Kind::Int { max, .. } if v.unsigned_abs() <= max as u128 => Ok(Some(v as i64)),
            Kind::Int { max, .. } => Err(E::custom(format!(
                "{} is {v}, out of range (±{max})",
                FIELDS[self.0]
            ))),
            Kind::Number => Ok(None),
            _ => Err(E::invalid_type(
                serde::de::Unexpected::Other(&format!("integer `{v}`")),
                self,
            )),
        }
    }
}

impl<'de> serde::de::Visitor<'de> for Field {
    type Value = Option<i64>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let (what, null) = match KINDS[self.0] {
            Kind::Int { null, .. } => ("an integer", null),
            Kind::Text { null } => ("a string", null),
            Kind::Number => ("a number", true),
            Kind::Timestamp => ("an event_ts string", false),
        };
        let or_null = if null { " or null" } else { "" };
        write!(f, "{} to be {what}{or_null}", FIELDS[self.0])
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<i64>, E> {
        self.int(v.into())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<i64>, E> {
        self.int(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Option<i64>, E> {
        match KINDS[self.0] {
            Kind::Number => Ok(None),
            _ => Err(E::invalid_type(serde::de::Unexpected::Float(v), &self)),
        }
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<i64>, E> {
        match KINDS[self.0] {
            Kind::Text { .. } => Ok(None),
            Kind::Timestamp => check_event_ts(v).map(|()| None).map_err(E::custom),
            _ => Err(E::invalid_type(serde::de::Unexpected::Str(v), &self)),
        }
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<i64>, E> {
        match KINDS[self.0] {
            Kind::Int { null: true, .. } | Kind::Text { null: true } | Kind::Number => Ok(None),
            _ => Err(E::invalid_type(serde::de::Unexpected::Unit, &self)),
        }
    }
}

/// A key, compared with the one expected at its place.
struct Key(usize);

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<(), E> {
        if FIELDS.get(self.0) == Some(&k) {
            return Ok(());
        }
        Err(E::custom(format!(
            "field {k:?} where {} is expected: expected {FIELDS:?} in that order",
            FIELDS
                .get(self.0)
                .map_or("the end".to_string(), |f| format!("{f:?}"))
        )))
    }
}

/// An event object, its fields checked in order as they are parsed: its id.
struct Event;

impl<'de> serde::de::Visitor<'de> for Event {
    type Value = i64;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<i64, A::Error> {
        let mut id = 0;
        let mut i = 0;
        while m.next_key_seed(Key(i))?.is_some() {
            let v = m.next_value_seed(Field(i))?;
            if i == 0 {
                id = v.unwrap_or_default();
            }
            i += 1;
        }
        if i < FIELDS.len() {
            return Err(serde::de::Error::custom(format!(
                "no field {:?} (expected {FIELDS:?} in that order)",
                FIELDS[i]
            )));
        }
        Ok(id)
    }
}

/// Events in an array, each checked as it is parsed: their ids.
struct Events;

impl<'de> serde::de::Visitor<'de> for Events {
    type Value = Vec<i64>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of event objects")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Vec<i64>, A::Error> {
        let mut ids = Vec::with_capacity(s.size_hint().unwrap_or(0));
        while let Some(id) = s.next_element_seed(OneEvent)? {
            ids.push(id);
        }
        Ok(ids)
    }
}

/// One element of the array: an event object.
struct OneEvent;

impl<'de> serde::de::DeserializeSeed<'de> for OneEvent {
    type Value = i64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<i64, D::Error> {
        d.deserialize_map(Event)
    }
}

/// Why a body was refused.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Not JSON, or neither an event object nor an array (answered 400).
    Body(String),
    /// An event differs from docs/sinks.md (answered 422).
    Event(String),
}

/// The ids of a body's events — a JSON array of event objects, or one object — each event
/// checked against docs/sinks.md as it is parsed, in one pass over the body.
fn check_body(bytes: &[u8]) -> Result<Vec<i64>, Refusal> {
    use serde::Deserializer as _;
    let mut d = serde_json::Deserializer::from_slice(bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let ids = if first == Some(&b'[') {
        d.deserialize_seq(Events)
    } else {
        d.deserialize_map(Event).map(|id| vec![id])
    };
    ids.and_then(|ids| d.end().map(|()| ids)).map_err(|e| {
        // An event that differs is told only in a body that is JSON throughout (a broken
        // body is refused as such, wherever it breaks).
        match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Err(broken) => Refusal::Body(broken.to_string()),
            Ok(_) if e.classify() == serde_json::error::Category::Data => {
                Refusal::Event(e.to_string())
            }
            Ok(_) => Refusal::Body(e.to_string()),
        }
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ`, or with `.ffffff` (six digits, not all zero) before the `Z`.
fn check_event_ts(ts: &str) -> Result<(), String> {
    let bad = || format!("event_ts {ts:?} is not YYYY-MM-DDTHH:MM:SS[.ffffff]Z");
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let fraction_ok = match b.len() {
        20 => b[19] == b'Z',
        27 => b[19] == b'.' && digits(20..26) && &b[20..26] != b"000000" && b[26] == b'Z',
        _ => false,
    };
    if !(shape && fraction_ok) || ts.parse::<jiff::Timestamp>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// The events of a body: a JSON array of event objects, or one object; each as the bytes
/// received (for `--keep-events`).
fn split_body(bytes: &[u8]) -> Result<Vec<&serde_json::value::RawValue>, serde_json::Error> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        serde_json::from_slice(bytes)
    } else {
        serde_json::from_slice(bytes).map(|one| vec![one])
    }
}

/// `POST /control`: `{"fail_rate":0.5,"slow_rate":0.2,"slow_ms":1500}` (any subset).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, Serialize)]
struct Faults {
    fail_rate: f64,
    slow_rate: f64,
    slow_ms: u64,
}

#[derive(Default)]
struct State {
    stats: Stats,
    /// Failure and slowness, changed at run time by `POST /control`.
    faults: Faults,
    ids_file: Option<std::fs::File>,
    seen: FxHashSet<i64>,
    /// With `--keep-events`: each event's JSON as last received.
    kept: std::collections::HashMap<i64, String>,
}

/// Connections served at once.
const MAX_CONNECTIONS: usize = 1024;

/// Serve until the process is stopped.
pub async fn serve(opts: MockOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| {
            format!(
                "mock-api cannot listen on {}; is the port taken?",
                opts.listen
            )
        })?;
    eprintln!(
        "mock-api listening on {}://{} (POST /events, GET /stats; fail-rate {}, slow-rate {} × {} ms)",
        if opts.tls.is_some() { "https" } else { "http" },
        listener.local_addr()?,
        opts.fail_rate,
        opts.slow_rate,
        opts.slow_ms
    );
    let tls = opts.tls.clone();
    let mut state = State {
        faults: Faults {
            fail_rate: opts.fail_rate,
            slow_rate: opts.slow_rate,
            slow_ms: opts.slow_ms,
        },
        ..State::default()
    };
    if let Some(path) = &opts.ids_file {
        if let Ok(text) = std::fs::read_to_string(path) {
            for id in text.lines().filter_map(|l| l.trim().parse::<i64>().ok()) {
                if state.seen.insert(id) {
                    state.stats.unique_event_ids += 1;
                }
            }
        }
        state.ids_file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("mock-api cannot open --ids-file {}", path.display()))?,
        );
    }
    let shared = Arc::new(Shared {
        opts,
        state: Mutex::new(state),
    });
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/events", post(events))
        .route("/events/{id}", get(event_json))
        .route("/control", post(control))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": "not found; use POST /events or GET /stats"})),
            )
        })
        .layer(axum::middleware::from_fn(access_log))
        .with_state(shared);
    crate::ops::http::serve(listener, app, MAX_CONNECTIONS, tls).await;
    Ok(())
}

struct Shared {
    opts: MockOptions,
    state: Mutex<State>,
}

/// What the access-log line says after the status.
#[derive(Clone)]
struct Note(String);

/// One access-log line per request on stdout.
async fn access_log(
    Extension(Peer(peer)): Extension<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let line = format!(
        "{peer} - \"{} {} {:?}\"",
        req.method(),
        req.uri().path(),
        req.version()
    );
    let resp = next.run(req).await;
    let note = resp.extensions().get::<Note>().map_or("", |n| n.0.as_str());
    let line = format!("{line} {} {note}\n", resp.status().as_u16());
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    resp
}

async fn stats(AxState(shared): AxState<Arc<Shared>>) -> Json<Stats> {
    Json(shared.state.lock().expect("stats lock").stats.clone())
}

/// `POST /control`: change the injected failures and slowness while running.
async fn control(AxState(shared): AxState<Arc<Shared>>, body: Bytes) -> axum::response::Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Change {
        fail_rate: Option<f64>,
        slow_rate: Option<f64>,
        slow_ms: Option<u64>,
    }
    let change: Change = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": format!("expected {{\"fail_rate\":0..1,\"slow_rate\":0..1,\"slow_ms\":N}}: {e}")})),
            )
                .into_response()
        }
    };
    let in_range = |r: Option<f64>| r.is_none_or(|r| (0.0..=1.0).contains(&r));
    if !in_range(change.fail_rate) || !in_range(change.slow_rate) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "rates are between 0 and 1"})),
        )
            .into_response();
    }
    let mut st = shared.state.lock().expect("stats lock");
    let f = &mut st.faults;
    f.fail_rate = change.fail_rate.unwrap_or(f.fail_rate);
    f.slow_rate = change.slow_rate.unwrap_or(f.slow_rate);
    f.slow_ms = change.slow_ms.unwrap_or(f.slow_ms);
    Json(*f).into_response()
}

/// `GET /events/{id}` (with `--keep-events`): the event's JSON as last received.
async fn event_json(
    AxState(shared): AxState<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<i64>,
) -> axum::response::Response {
    let kept = shared
        .state
        .lock()
        .expect("stats lock")
        .kept
        .get(&id)
        .cloned();
    match kept {
        Some(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such event received (or --keep-events is off)"})),
        )
            .into_response(),
    }
}

async fn events(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    if let Some(token) = &shared.opts.require_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(format!("Bearer {token}").as_str()) {
            shared.state.lock().expect("stats lock").stats.unauthorized += 1;
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
            resp.extensions_mut()
                .insert(Note(format!("key={key} unauthorized")));
            return resp;
        }
    }
    let answer = post_events(&body, &shared.state, &shared.opts, key).await;
    let mut resp = (
        answer.status,
        [(header::CONTENT_TYPE, "application/json")],
        answer.body,
    )
        .into_response();
    if let Some(secs) = answer.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    resp.extensions_mut().insert(Note(answer.note));
    resp
}

/// What `POST /events` answers.
struct Answer {
    status: StatusCode,
    body: String,
    /// For the access log.
    note: String,
    /// `Retry-After` seconds (injected failures only).
    retry_after: Option<u64>,
}

impl Answer {
    fn new(status: StatusCode, body: serde_json::Value, note: String) -> Answer {
        Answer {
            status,
            body: body.to_string(),
            note,
            retry_after: None,
        }
    }
}

async fn post_events(bytes: &[u8], state: &Mutex<State>, opts: &MockOptions, key: &str) -> Answer {
    state.lock().expect("stats lock").stats.requests += 1;
    let ids = match check_body(bytes) {
        Ok(ids) => ids,
        Err(Refusal::Body(e)) => {
            return Answer::new(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("expected an event object or an array of events: {e}")}),
                format!("key={key} invalid body"),
            )
        }
        Err(Refusal::Event(why)) => {
            state.lock().expect("stats lock").stats.invalid_events += 1;
            return Answer::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": format!("an event differs from docs/sinks.md: {why}")}),
                format!("key={key} invalid event: {why}"),
            );
        }
    };
    // With --keep-events, each event's text as received (the body is valid JSON by now).
    let raws = if opts.keep_events {
        match split_body(bytes) {
            Ok(raws) if raws.len() == ids.len() => raws.into_iter().map(|r| r.get()).collect(),
            // Not reached: the body was just parsed as these events.
            _ => {
                return Answer::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"error": "the mock could not keep the body's events"}),
                    format!("key={key} keep-events error"),
                )
            }
        }
    } else {
        Vec::new()
    };
    let faults = state.lock().expect("stats lock").faults;
    if faults.slow_rate > 0.0 && rand::random::<f64>() < faults.slow_rate {
        tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
    }
    if faults.fail_rate > 0.0 && rand::random::<f64>() < faults.fail_rate {
        state.lock().expect("stats lock").stats.failures_injected += 1;
        return Answer {
            retry_after: opts.retry_after,
            ..Answer::new(
                StatusCode::from_u16(opts.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                serde_json::json!({"error": "injected failure"}),
                format!("key={key} injected failure"),
            )
        };
    }
    let mut st = state.lock().expect("stats lock");
    // The ids new to this mock go on file before anything is counted: a request that
    // cannot be recorded is answered 500 and changes nothing.
    if let Some(f) = st.ids_file.as_ref() {
        let mut fresh = HashSet::new();
        let mut lines = String::new();
        for id in &ids {
            if !st.seen.contains(id) && fresh.insert(*id) {
                lines.push_str(&format!("{id}\n"));
            }
        }
        if let Err(e) = (&*f).write_all(lines.as_bytes()) {
            return Answer::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": format!("cannot write --ids-file: {e}")}),
                format!("key={key} ids-file error"),
            );
        }
    }
    st.stats.events += ids.len() as u64;
    for &id in &ids {
        if st.seen.insert(id) {
            st.stats.unique_event_ids += 1;
        } else {
            st.stats.duplicates += 1;
        }
    }
    for (&id, raw) in ids.iter().zip(&raws) {
        st.kept.insert(id, raw.to_string());
    }
    Answer::new(
        StatusCode::OK,
        serde_json::json!({"status": "ok", "received": ids.len()}),
        format!("key={key} received={}", ids.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"event_id":16,"content_id":1,"user_id":999,"event_type":"play","event_ts":"2026-01-08T14:21:52.163702Z","duration_ms":7000,"device":"web","content_type":"video","length_seconds":300,"engagement_seconds":7.0,"engagement_pct":0.02}"#;

    /// One event's body: its id, or why it was refused.
    fn check_event(raw: &str) -> Result<i64, String> {
        match check_body(raw.as_bytes()) {
            Ok(ids) => {
                assert_eq!(ids.len(), 1, "{raw}");
                Ok(ids[0])
            }
            Err(Refusal::Body(e) | Refusal::Event(e)) => Err(e),
        }
    }

    #[test]
    fn events_are_checked_against_the_documented_form() {
        assert_eq!(check_event(GOOD), Ok(16));
        let nulls = r#"{"event_id":1,"content_id":1,"user_id":1,"event_type":"x","event_ts":"2026-01-08T14:21:52Z","duration_ms":null,"device":null,"content_type":null,"length_seconds":null,"engagement_seconds":null,"engagement_pct":null}"#;
        assert_eq!(check_event(nulls), Ok(1));
        for (bad, why) in [
            (
                GOOD.replace(
                    r#""content_id":1,"user_id":999"#,
                    r#""user_id":999,"content_id":1"#,
                ),
                "order",
            ),
            (
                GOOD.replace(r#""event_id":16"#, r#""event_id":"16""#),
                "event_id",
            ),
            (GOOD.replace(".163702Z", ".000000Z"), "event_ts"),
            (GOOD.replace(".163702Z", ".1637Z"), "event_ts"),
            (GOOD.replace("Z\"", "+00:00\""), "event_ts"),
            (
                GOOD.replace(r#""duration_ms":7000"#, r#""duration_ms":7000000000"#),
                "duration_ms",
            ),
            (GOOD.replace(r#","engagement_pct":0.02"#, ""), "order"),
            (GOOD.replace(r#""device":"web""#, r#""device":7"#), "device"),
            (
                GOOD.replace(r#""user_id":999"#, r#""user_id":null"#),
                "user_id",
            ),
            (
                GOOD.replace(r#""user_id":999"#, r#""user_id":9.5"#),
                "user_id",
            ),
            (
                GOOD.replace(r#""event_type":"play""#, r#""event_type":{}"#),
                "event_type",
            ),
            (
                GOOD.replace(r#""engagement_pct":0.02"#, r#""engagement_pct":"x""#),
                "engagement_pct",
            ),
            (GOOD.replace("}", r#","extra":1}"#), "extra"),
            (
                GOOD.replace(r#""event_id":16"#, r#""event_id":9223372036854775808"#),
                "event_id",
            ),
            (format!("{GOOD} 1"), "trailing"),
            ("[1]".to_string(), "event object"),
        ] {
            let e = check_event(&bad).unwrap_err();
            assert!(
                e.contains(why) || (why == "order" && e.contains("expected")),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            split_body(format!("[{GOOD},{GOOD}]").as_bytes())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            split_body(format!(" {GOOD}").as_bytes()).unwrap()[0].get(),
            GOOD
        );
        assert!(split_body(b"[1,").is_err());

        // A body is checked in one pass: its ids, in order; a broken body is told apart
        // from a body whose events differ from the documented form.
        let two = format!(
            "[{GOOD},{}]",
            GOOD.replace(r#""event_id":16"#, r#""event_id":17"#)
        );
        assert_eq!(check_body(two.as_bytes()), Ok(vec![16, 17]));
        assert_eq!(check_body(format!(" {GOOD}").as_bytes()), Ok(vec![16]));
        assert_eq!(check_body(b" [ ] "), Ok(vec![]));
        assert!(matches!(check_body(b"[1,"), Err(Refusal::Body(_))));
        assert!(matches!(check_body(b"not json"), Err(Refusal::Body(_))));
        assert!(matches!(
            check_body(format!("{GOOD} 1").as_bytes()),
            Err(Refusal::Body(_))
        ));
        assert!(matches!(check_body(b"[1]"), Err(Refusal::Event(_))));
        assert!(matches!(check_body(b"\"x\""), Err(Refusal::Event(_))));
        let second_bad = format!(
            "[{GOOD},{}]",
            GOOD.replace(r#""device":"web""#, r#""device":7"#)
        );
        match check_body(second_bad.as_bytes()) {
            Err(Refusal::Event(e)) => assert!(e.contains("device"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
