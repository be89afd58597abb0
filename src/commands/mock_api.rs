//! `engagement-cdc mock-api`: the external system's stand-in for the demo and the tests —
//! a real HTTP server.
//!
//! `POST /events` takes a JSON array of events or one event object and answers
//! `200 {"status":"ok","received":N}`, or `500` on an injected failure (`--fail-rate`),
//! optionally after a delay (`--slow-rate`, `--slow-ms`). `GET /stats` answers the counts.
//! Every request is logged on stdout in one access-log line.

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
use serde::Serialize;

use crate::ops::http::Peer;

#[derive(Debug, Clone)]
pub struct MockOptions {
    pub listen: String,
    pub fail_rate: f64,
    pub slow_rate: f64,
    pub slow_ms: u64,
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
}

/// What the mock reads of an event: its id (the other fields are checked as JSON only).
#[derive(serde::Deserialize)]
struct EventId {
    event_id: Option<i64>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Body {
    Many(Vec<EventId>),
    One(EventId),
}

#[derive(Default)]
struct State {
    stats: Stats,
    seen: HashSet<i64>,
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
    let shared = Arc::new(Shared {
        opts,
        state: Mutex::new(State::default()),
    });
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/events", post(events))
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

async fn events(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let (status, body, note) = post_events(&body, &shared.state, &shared.opts, key).await;
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    resp.extensions_mut().insert(Note(note));
    resp
}

async fn post_events(
    bytes: &[u8],
    state: &Mutex<State>,
    opts: &MockOptions,
    key: &str,
) -> (StatusCode, String, String) {
    state.lock().expect("stats lock").stats.requests += 1;
    let events: Vec<EventId> = match serde_json::from_slice::<Body>(bytes) {
        Ok(Body::Many(v)) => v,
        Ok(Body::One(e)) => vec![e],
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("expected an event object or an array of events: {e}")}).to_string(),
                format!("key={key} invalid body"),
            )
        }
    };
    if opts.slow_rate > 0.0 && rand::random::<f64>() < opts.slow_rate {
        tokio::time::sleep(Duration::from_millis(opts.slow_ms)).await;
    }
    if opts.fail_rate > 0.0 && rand::random::<f64>() < opts.fail_rate {
        state.lock().expect("stats lock").stats.failures_injected += 1;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"error\":\"injected failure\"}".into(),
            format!("key={key} injected failure"),
        );
    }
    let mut st = state.lock().expect("stats lock");
    st.stats.events += events.len() as u64;
    for e in &events {
        if let Some(id) = e.event_id {
            if st.seen.insert(id) {
                st.stats.unique_event_ids += 1;
            } else {
                st.stats.duplicates += 1;
            }
        }
    }
    (
        StatusCode::OK,
        serde_json::json!({"status": "ok", "received": events.len()}).to_string(),
        format!("key={key} received={}", events.len()),
    )
}
