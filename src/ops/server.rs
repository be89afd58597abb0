//! The engine's HTTP endpoints on `[server] listen`: `/healthz` (the process is up),
//! `/readyz` (a replication session is streaming), `/metrics` (Prometheus text),
//! `/status` (JSON, read by `engagement-cdc status` while the engine holds the state store)
//! and `/`, a dashboard page that shows `/status` and refreshes itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use tokio::task::JoinHandle;

use crate::checks::Secret;
use crate::ops::metrics::Metrics;
use crate::types::Lsn;

/// What the endpoints show.
pub struct EngineState {
    pub metrics: Arc<Metrics>,
    pub streaming: AtomicBool,
    pub slot: String,
    /// The dead-letter queue, for its depth.
    pub dlq: Option<crate::state::dlq::Dlq>,
    /// Why the engine is not streaming (the last session's end), while it is not.
    pub not_streaming_reason: std::sync::Mutex<Option<String>>,
    /// The slot as `pg_replication_slots` last showed it, with the time of that reading
    /// (`commands/run.rs` reads it every 10 s).
    pub slot_health: std::sync::Mutex<serde_json::Value>,
    /// The last 10 minutes of counters and latencies, a sample every 5 s, so the dashboard
    /// has its charts' history as soon as it opens (`/history`).
    pub history: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
    /// Each sink's latency bucket counts at the last sample, to take windows from.
    pub last_counts: std::sync::Mutex<Vec<(&'static str, Vec<u64>)>>,
}

/// Samples kept: 10 minutes at one every 5 s.
const HISTORY_SAMPLES: usize = 120;
const HISTORY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl EngineState {
    /// Take a sample for `/history`: the time and what the charts draw.
    pub fn sample(&self) {
        let m = &self.metrics;
        let streamed = m.counters.events_streamed.get();
        // Latency over the last interval only: the difference of two readings.
        let now = m.latency_counts();
        let mut last = self.last_counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut window = serde_json::Map::new();
        for (sink, counts) in &now {
            let before = last.iter().find(|(n, _)| n == sink).map(|(_, c)| c);
            let diff: Vec<u64> = counts
                .iter()
                .enumerate()
                .map(|(i, n)| n - before.and_then(|b| b.get(i)).copied().unwrap_or(0))
                .collect();
            window.insert(
                sink.to_string(),
                serde_json::json!({
                    "count": diff.iter().sum::<u64>(),
                    "p50_ms": crate::ops::metrics::quantile_of(&diff, 0.50),
                    "p99_ms": crate::ops::metrics::quantile_of(&diff, 0.99),
                }),
            );
        }
        *last = now;
        drop(last);
        let sample = serde_json::json!({
            "t": crate::enrich::now_us() / 1000,
            "counters": { "events_streamed": streamed },
            "commit_to_sink": m.latency_summary(),
            "latency_window": window,
        });
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() == HISTORY_SAMPLES {
            h.pop_front();
        }
        h.push_back(sample);
    }
}

async fn history(State(state): State<Arc<EngineState>>) -> Json<serde_json::Value> {
    let h = state.history.lock().unwrap_or_else(|p| p.into_inner());
    Json(serde_json::Value::Array(h.iter().cloned().collect()))
}

impl EngineState {
    pub fn set_streaming(&self, streaming: bool, reason: Option<String>) {
        self.streaming.store(streaming, Ordering::Relaxed);
        *self
            .not_streaming_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = if streaming { None } else { reason };
    }

    pub fn status_json(&self) -> serde_json::Value {
        let m = &self.metrics;
        let last_commit = m.last_commit_us.load(Ordering::Relaxed);
        serde_json::json!({
            "slot": self.slot,
            "streaming": self.streaming.load(Ordering::Relaxed),
            "not_streaming_reason": self.not_streaming_reason.lock().map(|r| r.clone()).unwrap_or(None),
            "sinks": m.health.snapshot(),
            "slot_health": self.slot_health.lock().map(|v| v.clone()).unwrap_or_default(),
            "journal": m.journal.snapshot(),
            "top_content_10m": m.top_content.get(),
            "checkpoint_bytes": m.checkpoint_lsn.load(Ordering::Relaxed),
            "server_wal_end_bytes": m.server_wal_end.load(Ordering::Relaxed),
            "checkpoint_lsn": Lsn(m.checkpoint_lsn.load(Ordering::Relaxed)).to_string(),
            "last_commit_time": (last_commit != 0).then(|| crate::enrich::rfc3339_us(last_commit)),
            "dlq_depth": self.dlq.as_ref().map(|d| d.len()),
            "commit_to_sink": m.latency_summary(),
            "commit_to_read": m.commit_to_read.summary(),
            "counters": m.counter_map(),
        })
    }
}

/// Serve until the returned handle is dropped (aborted) or the process ends.
pub async fn spawn(
    listen: std::net::SocketAddr,
    state: Arc<EngineState>,
    token: Option<Secret>,
) -> anyhow::Result<AbortOnDrop> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen} for the engine's HTTP endpoints; is another engine running? change [server] listen")
    })?;
    let sampled = state.clone();
    // Everything but the probes may want the token.
    let mut guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/history", get(history))
        .route("/", get(page));
    if let Some(token) = token {
        guarded = guarded.route_layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
    }
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found; try /, /healthz, /readyz, /metrics or /status\n",
            )
        })
        .with_state(state);
    let sampler = async move {
        let mut every = tokio::time::interval(HISTORY_EVERY);
        loop {
            every.tick().await;
            sampled.sample();
        }
    };
    // One task: aborting it stops the server and the sampler.
    let serve = super::http::serve(listener, app, MAX_CONNECTIONS, None);
    let handle = tokio::spawn(async move {
        tokio::join!(serve, sampler);
    });
    Ok(AbortOnDrop(handle))
}

/// Connections served at once; monitoring needs a handful.
const MAX_CONNECTIONS: usize = 64;

/// A background task that ends when this is dropped: the server, the engine's slot watch.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `Authorization: Bearer <server.auth_token>`, or 401.
async fn require_token(
    State(token): State<Arc<Secret>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in time independent of where they differ.
    let expected = token.expose().as_bytes();
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "unauthorized: send Authorization: Bearer <server.auth_token>\n",
        )
            .into_response()
    }
}

async fn readyz(State(state): State<Arc<EngineState>>) -> (StatusCode, &'static str) {
    if state.streaming.load(Ordering::Relaxed) {
        (StatusCode::OK, "streaming\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not streaming\n")
    }
}

async fn metrics(State(state): State<Arc<EngineState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn status(State(state): State<Arc<EngineState>>) -> Json<serde_json::Value> {
    Json(state.status_json())
}

async fn page(State(state): State<Arc<EngineState>>) -> Html<String> {
    Html(dashboard(&state.status_json()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The dashboard: a live page (no external assets, no reloads) around the state at load.
fn dashboard(status: &serde_json::Value) -> String {
    let mut rows = String::new();
    let mut row = |k: &str, v: String| {
        rows.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(&v)
        ));
    };
    for key in ["slot", "streaming", "last_commit_time", "dlq_depth"] {
        row(key, status[key].to_string().trim_matches('"').to_string());
    }
    if let Some(lat) = status["commit_to_sink"].as_object() {
        for (sink, v) in lat {
            row(
                &format!("commit to {sink}"),
                format!(
                    "p50 {} ms, p99 {} ms, {} events",
                    v["p50_ms"], v["p99_ms"], v["count"]
                ),
            );
        }
    }
    if let Some(counters) = status["counters"].as_object() {
        for (k, v) in counters {
            row(k, v.to_string());
        }
    }
    // The live page draws its charts from `/status`, polled every 2 s; the table is the
    // state at load, for reading without JavaScript.
    include_str!("dashboard.html").replace("{{TABLE}}", &format!("<table>{rows}</table>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_shows_the_status() {
        let metrics = Arc::new(Metrics::default());
        metrics.latency("redis").record_us(1500, 3);
        let state = EngineState {
            metrics,
            streaming: AtomicBool::new(true),
            slot: "s<1>".into(),
            dlq: None,
            not_streaming_reason: std::sync::Mutex::new(None),
            slot_health: Default::default(),
            history: Default::default(),
            last_counts: Default::default(),
        };
        let page = dashboard(&state.status_json());
        assert!(page.contains("<th>slot</th><td>s&lt;1&gt;</td>"), "{page}");
        assert!(
            page.contains("commit to redis</th><td>p50 2 ms, p99 2 ms, 3 events"),
            "{page}"
        );
        assert!(
            page.contains("<th>events_streamed</th><td>0</td>"),
            "{page}"
        );
    }
}
