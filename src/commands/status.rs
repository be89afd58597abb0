//! `engagement-cdc status [--json] [--max-lag-bytes N]`: the checkpoint, the slot's
//! confirmed position and lag, `wal_status`, each sink's health, the dead-letter queue's
//! depth and the last commit time; and whether all is well, for monitoring: exit 0 only
//! when the engine streams and every sink delivers, else 1 with the problems on one line
//! (docs/operations.md, "Monitoring").
//!
//! A running engine holds the state store's lock, so then the engine's `/status` endpoint
//! is asked instead of the store.

use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Secret};
use crate::enrich::rfc3339_us;
use crate::source::pg;
use crate::state::StateStore;

#[derive(Debug, Serialize)]
pub struct Status {
    pub engine_running: bool,
    pub checkpoint_lsn: Option<String>,
    pub last_commit_time: Option<String>,
    pub slot: String,
    pub slot_exists: bool,
    pub confirmed_flush_lsn: Option<String>,
    pub wal_status: Option<String>,
    pub slot_active: Option<bool>,
    /// Bytes of WAL between the server's current position and the slot's confirmed one.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL the server keeps for the slot: its current position − `restart_lsn`.
    pub retained_wal_bytes: Option<i64>,
    /// How much more WAL may be written before the slot is in danger of losing what it
    /// needs (`safe_wal_size`; none when `max_slot_wal_keep_size` is unlimited).
    pub safe_wal_size: Option<i64>,
    pub dlq_depth: Option<u64>,
    /// The running engine's replication session is open.
    pub streaming: Option<bool>,
    pub not_streaming_reason: Option<String>,
    /// Each sink's health as the running engine sees it (`delivering`, `retrying`, `failed`).
    pub sinks: serde_json::Map<String, serde_json::Value>,
    /// The journal's extent and each sink's cursor in it (docs/architecture.md, "The
    /// journal"); `null` while it is off.
    pub journal: serde_json::Value,
    /// Why this is not healthy; empty when it is.
    pub problems: Vec<String>,
    pub healthy: bool,
}

/// Slot lag above which `status` reports a problem unless told otherwise: 1 GiB.
pub const DEFAULT_MAX_LAG_BYTES: i64 = 1 << 30;

pub async fn status(config: &Config, max_lag_bytes: i64) -> anyhow::Result<Status> {
    let mut st = Status {
        engine_running: false,
        checkpoint_lsn: None,
        last_commit_time: None,
        slot: config.postgres.slot.clone(),
        slot_exists: false,
        confirmed_flush_lsn: None,
        wal_status: None,
        slot_active: None,
        lag_bytes: None,
        retained_wal_bytes: None,
        safe_wal_size: None,
        dlq_depth: None,
        streaming: None,
        not_streaming_reason: None,
        sinks: serde_json::Map::new(),
        journal: serde_json::Value::Null,
        problems: Vec::new(),
        healthy: false,
    };
    match engine_status(config.server.listen, config.server.auth_token()?).await {
        Some(v) => {
            st.engine_running = true;
            st.checkpoint_lsn = v["checkpoint_lsn"].as_str().map(str::to_string);
            st.last_commit_time = v["last_commit_time"].as_str().map(str::to_string);
            st.dlq_depth = v["dlq_depth"].as_u64();
            st.streaming = v["streaming"].as_bool();
            st.not_streaming_reason = v["not_streaming_reason"].as_str().map(str::to_string);
            st.sinks = v["sinks"].as_object().cloned().unwrap_or_default();
            st.journal = v["journal"].clone();
        }
        None => {
            if config.state.dir.exists() {
                let store = StateStore::open(&config.state.dir)?;
                st.checkpoint_lsn = Some(store.checkpoint()?.to_string());
                st.last_commit_time = store.last_commit_us()?.map(rfc3339_us);
                st.dlq_depth = Some(crate::state::dlq::Dlq::open(&store)?.len() as u64);
                st.journal = stopped_journal(config, &store)?;
            }
        }
    }
    let client = pg::connect(&config.postgres).await?;
    if let Some(slot) = pg::slot_info(&client, &config.postgres.slot).await? {
        st.slot_exists = true;
        st.confirmed_flush_lsn = slot.confirmed_flush_lsn;
        st.wal_status = slot.wal_status;
        st.slot_active = Some(slot.active);
        st.lag_bytes = slot.lag_bytes;
        st.retained_wal_bytes = slot.retained_wal_bytes;
        st.safe_wal_size = slot.safe_wal_size;
    }
    st.problems = problems(&st, max_lag_bytes);
    st.healthy = st.problems.is_empty();
    Ok(st)
}

/// The journal as its files and the stored cursors say, while the engine is stopped.
fn stopped_journal(config: &Config, store: &StateStore) -> anyhow::Result<serde_json::Value> {
    let dir = crate::journal::dir(&config.state.dir);
    let s = crate::journal::scan(&dir, config.journal.max_bytes)?;
    if s.segments == 0 && !config.journal.enabled() {
        return Ok(serde_json::Value::Null);
    }
    let cursors: serde_json::Map<String, serde_json::Value> = store
        .cursors()?
        .into_iter()
        .map(|(name, seq)| (name, serde_json::json!({ "seq": seq })))
        .collect();
    Ok(s.to_json(false, cursors.into()))
}

/// Everything that keeps the status from being healthy, most fundamental first.
fn problems(st: &Status, max_lag_bytes: i64) -> Vec<String> {
    let mut out = Vec::new();
    if !st.slot_exists {
        out.push(format!(
            "slot {:?} does not exist; run `engagement-cdc setup`",
            st.slot
        ));
    } else if st.wal_status.as_deref() == Some("lost") {
        out.push(format!(
            "slot {:?} lost WAL it needed (wal_status lost); see docs/operations.md, \"Recovering from a lost slot\"",
            st.slot
        ));
    } else if st.wal_status.as_deref() == Some("unreserved") {
        out.push(format!(
            "slot {:?} retains more WAL than max_slot_wal_keep_size allows (wal_status unreserved): it will be invalidated at the next checkpoint unless the engine catches up",
            st.slot
        ));
    }
    if !st.engine_running {
        out.push("the engine is not running".into());
    } else if st.streaming == Some(false) {
        out.push(format!(
            "the engine is not streaming: {}",
            st.not_streaming_reason.as_deref().unwrap_or("starting")
        ));
    }
    for (name, h) in &st.sinks {
        let state = h["state"].as_str().unwrap_or("?");
        if state != "delivering" {
            out.push(format!(
                "sink {name} {state} since {}: {}",
                h["since"].as_str().unwrap_or("?"),
                h["last_error"].as_str().unwrap_or("?")
            ));
        }
    }
    if st.journal["full"] == true {
        let last = st.journal["last_batch"].as_u64().unwrap_or(0);
        let behind: Vec<String> = st.journal["cursors"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, c)| c["seq"].as_u64().unwrap_or(0) < last)
            .map(|(n, _)| n.clone())
            .collect();
        out.push(format!(
            "the journal is full (journal.max_bytes = {}) with batches {} has not received: the slot is held until it catches up",
            st.journal["max_bytes"],
            behind.join(", ")
        ));
    }
    if let Some(lag) = st.lag_bytes.filter(|&l| l > max_lag_bytes) {
        out.push(format!(
            "slot lag {lag} bytes is over {max_lag_bytes} (--max-lag-bytes)"
        ));
    }
    out
}

async fn engine_status(
    listen: std::net::SocketAddr,
    token: Option<Secret>,
) -> Option<serde_json::Value> {
    let fetch = async {
        let mut request = reqwest::Client::new().get(format!("http://{listen}/status"));
        if let Some(token) = token {
            request = request.bearer_auth(token.expose());
        }
        let body = request.send().await.ok()?.text().await.ok()?;
        serde_json::from_str(&body).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

impl Status {
    pub fn render_text(&self) -> String {
        let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        let mut out = String::new();
        out.push_str(&format!(
            "engine:              {}\n",
            if self.engine_running {
                "running"
            } else {
                "not running"
            }
        ));
        out.push_str(&format!(
            "checkpoint:          {}\n",
            dash(&self.checkpoint_lsn)
        ));
        out.push_str(&format!(
            "last commit:         {}\n",
            dash(&self.last_commit_time)
        ));
        if self.slot_exists {
            out.push_str(&format!(
                "slot:                {} ({})\n",
                self.slot,
                if self.slot_active == Some(true) {
                    "active"
                } else {
                    "inactive"
                }
            ));
            out.push_str(&format!(
                "confirmed_flush_lsn: {}\n",
                dash(&self.confirmed_flush_lsn)
            ));
            out.push_str(&format!(
                "lag:                 {} bytes\n",
                self.lag_bytes.map_or("-".into(), |b| b.to_string())
            ));
            out.push_str(&format!(
                "wal_status:          {}\n",
                dash(&self.wal_status)
            ));
            out.push_str(&format!(
                "retained WAL:        {} bytes{}\n",
                self.retained_wal_bytes
                    .map_or("-".into(), |b| b.to_string()),
                match self.safe_wal_size {
                    Some(safe) => format!(" ({safe} more before the slot is at risk)"),
                    None => String::new(),
                }
            ));
        } else {
            out.push_str(&format!(
                "slot:                {} MISSING (run `engagement-cdc setup`)\n",
                self.slot
            ));
        }
        if self.engine_running {
            out.push_str(&format!(
                "streaming:           {}\n",
                match (self.streaming, &self.not_streaming_reason) {
                    (Some(true), _) => "yes".to_string(),
                    (_, Some(reason)) => format!("no ({reason})"),
                    _ => "no".to_string(),
                }
            ));
        }
        for (name, h) in &self.sinks {
            let state = h["state"].as_str().unwrap_or("?");
            match h["since"].as_str() {
                Some(since) => out.push_str(&format!(
                    "sink {name:<14} {state} since {since}: {}\n",
                    h["last_error"].as_str().unwrap_or("?")
                )),
                None => out.push_str(&format!("sink {name:<14} {state}\n")),
            }
        }
        let j = &self.journal;
        if j.is_object() {
            let last = j["last_batch"].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "journal:             {} of {} bytes, batches {}..{last}, LSN {} to {}{}\n",
                j["bytes"],
                j["max_bytes"],
                j["first_batch"]
                    .as_u64()
                    .map_or("-".into(), |f| f.to_string()),
                j["first_lsn"].as_str().unwrap_or("-"),
                j["last_lsn"].as_str().unwrap_or("-"),
                if j["full"] == true {
                    " FULL: slot held"
                } else {
                    ""
                }
            ));
            for (name, c) in j["cursors"].as_object().into_iter().flatten() {
                let seq = c["seq"].as_u64().unwrap_or(0);
                out.push_str(&format!(
                    "cursor {name:<12} batch {seq} ({} behind){}\n",
                    last.saturating_sub(seq),
                    c["lsn"]
                        .as_str()
                        .map(|l| format!(", at LSN {l}"))
                        .unwrap_or_default()
                ));
            }
        } else {
            out.push_str("journal:             off\n");
        }
        out.push_str(&format!(
            "dlq depth:           {}\n",
            self.dlq_depth.map_or("-".into(), |d| d.to_string())
        ));
        out.push_str(&format!(
            "health:              {}\n",
            if self.healthy {
                "ok".to_string()
            } else {
                self.problems.join("; ")
            }
        ));
        out
    }
}
