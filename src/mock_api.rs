//! `engagement-cdc mock-api`: the external system's stand-in for the demo and the tests —
//! a real HTTP server.
//!
//! `POST /events` takes a JSON array of events or one event object and answers
//! `200 {"status":"ok","received":N}`, or `500` on an injected failure (`--fail-rate`),
//! optionally after a delay (`--slow-rate`, `--slow-ms`). `GET /stats` answers the counts.
//! Every request is logged on stdout in one access-log line.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct MockOptions {
    pub listen: String,
    pub fail_rate: f64,
    pub slow_rate: f64,
    pub slow_ms: u64,
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
        "mock-api listening on http://{} (POST /events, GET /stats; fail-rate {}, slow-rate {} × {} ms)",
        listener.local_addr()?,
        opts.fail_rate,
        opts.slow_rate,
        opts.slow_ms
    );
    let state = Arc::new(Mutex::new(State::default()));
    let opts = Arc::new(opts);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("mock-api: accept failed: {e}");
                continue;
            }
        };
        let state = state.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let opts = opts.clone();
                async move { Ok::<_, Infallible>(handle(req, peer, &state, &opts).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &Mutex<State>,
    opts: &MockOptions,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    let (status, body, note) = match (&method, path.as_str()) {
        (&Method::GET, "/stats") => {
            let stats = state.lock().expect("stats lock").stats.clone();
            (
                StatusCode::OK,
                serde_json::to_string(&stats).expect("stats serialize"),
                String::new(),
            )
        }
        (&Method::POST, "/events") => {
            let key = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let bytes = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        format!("{{\"error\":\"cannot read body: {e}\"}}"),
                    );
                }
            };
            post_events(&bytes, state, opts, &key).await
        }
        _ => (
            StatusCode::NOT_FOUND,
            "{\"error\":\"not found; use POST /events or GET /stats\"}".to_string(),
            String::new(),
        ),
    };
    let line = format!(
        "{peer} - \"{method} {path} {version}\" {} {note}\n",
        status.as_u16()
    );
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    json(status, body)
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
