//! `engagement-cdc status [--json]`: the checkpoint, the slot's confirmed position and lag,
//! `wal_status`, the dead-letter queue's depth and the last commit time.
//!
//! A running engine holds the state store's lock, so then the engine's `/status` endpoint
//! is asked instead of the store.

use std::time::Duration;

use anyhow::Context;
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
    pub dlq_depth: Option<u64>,
}

pub async fn status(config: &Config) -> anyhow::Result<Status> {
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
        dlq_depth: None,
    };
    match engine_status(config.server.listen, config.server.auth_token()?).await {
        Some(v) => {
            st.engine_running = true;
            st.checkpoint_lsn = v["checkpoint_lsn"].as_str().map(str::to_string);
            st.last_commit_time = v["last_commit_time"].as_str().map(str::to_string);
            st.dlq_depth = v["dlq_depth"].as_u64();
        }
        None => {
            if config.state.dir.exists() {
                let store = StateStore::open(&config.state.dir)?;
                st.checkpoint_lsn = Some(store.checkpoint()?.to_string());
                st.last_commit_time = store.last_commit_us()?.map(rfc3339_us);
                st.dlq_depth = Some(crate::state::dlq::Dlq::open(&store)?.len() as u64);
            }
        }
    }
    let client = pg::connect(&config.postgres).await?;
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, wal_status, active,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.postgres.slot],
        )
        .await
        .context("cannot read pg_replication_slots")?;
    if let Some(r) = row {
        st.slot_exists = true;
        st.confirmed_flush_lsn = r.get(0);
        st.wal_status = r.get(1);
        st.slot_active = Some(r.get(2));
        st.lag_bytes = r.get(3);
    }
    Ok(st)
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
        } else {
            out.push_str(&format!(
                "slot:                {} MISSING (run `engagement-cdc setup`)\n",
                self.slot
            ));
        }
        out.push_str(&format!(
            "dlq depth:           {}\n",
            self.dlq_depth.map_or("-".into(), |d| d.to_string())
        ));
        out
    }
}
