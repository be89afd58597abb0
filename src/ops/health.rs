//! Each sink's health as the retry policy sees it: delivering, retrying (a transient error,
//! since when, the last one) or failed (a permanent error). `/status`, `status` and the
//! `engagement_cdc_sink_up{sink}` gauge read it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::metrics::SinkLabel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkState {
    Delivering,
    Retrying,
    Failed,
}

/// One sink's health, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinkHealth {
    pub state: SinkState,
    /// When the current failure began (RFC 3339); `None` while delivering.
    pub since: Option<String>,
    /// The last error (kept after recovery, for the record).
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    state: SinkState,
    failing_since_us: Option<i64>,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
pub struct HealthBoard {
    sinks: Mutex<BTreeMap<String, Entry>>,
    up: Family<SinkLabel, Gauge>,
}

impl HealthBoard {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sink_up",
            "1 while the sink is delivering, 0 while its writes fail",
            self.up.clone(),
        );
    }

    /// A write succeeded.
    pub fn ok(&self, sink: &str) {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        match sinks.get_mut(sink) {
            Some(e) if e.state == SinkState::Delivering => return,
            Some(e) => {
                e.state = SinkState::Delivering;
                e.failing_since_us = None;
            }
            None => {
                sinks.insert(
                    sink.to_string(),
                    Entry {
                        state: SinkState::Delivering,
                        failing_since_us: None,
                        last_error: None,
                    },
                );
            }
        }
        self.up
            .get_or_create(&SinkLabel { sink: sink.into() })
            .set(1);
    }

    /// A write failed; `permanent` when no retry follows.
    pub fn failing(&self, sink: &str, error: &str, permanent: bool) {
        let now = crate::enrich::now_us();
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        let e = sinks.entry(sink.to_string()).or_insert(Entry {
            state: SinkState::Delivering,
            failing_since_us: None,
            last_error: None,
        });
        e.state = if permanent {
            SinkState::Failed
        } else {
            SinkState::Retrying
        };
        e.failing_since_us.get_or_insert(now);
        e.last_error = Some(error.to_string());
        self.up
            .get_or_create(&SinkLabel { sink: sink.into() })
            .set(0);
    }

    pub fn snapshot(&self) -> BTreeMap<String, SinkHealth> {
        let sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        sinks
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    SinkHealth {
                        state: e.state,
                        since: e.failing_since_us.map(crate::enrich::rfc3339_us),
                        last_error: e.last_error.clone(),
                    },
                )
            })
            .collect()
    }
}

/// The slot as the engine last read it from `pg_replication_slots`, as gauges:
/// `engagement_cdc_slot_lag_bytes`, `engagement_cdc_slot_retained_wal_bytes` and
/// `engagement_cdc_slot_safe_wal_size_bytes` (-1: no limit), `engagement_cdc_slot_wal_ok`
/// (0 once `wal_status` is `unreserved` or `lost`).
#[derive(Debug, Default)]
pub struct SlotGauges {
    pub lag_bytes: Gauge,
    pub retained_wal_bytes: Gauge,
    pub safe_wal_size_bytes: Gauge,
    pub wal_ok: Gauge,
}

impl SlotGauges {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "slot_lag_bytes",
            "WAL between the server's position and the slot's confirmed one",
            self.lag_bytes.clone(),
        );
        registry.register(
            "slot_retained_wal_bytes",
            "WAL the server keeps for the slot (its position minus restart_lsn)",
            self.retained_wal_bytes.clone(),
        );
        registry.register(
            "slot_safe_wal_size_bytes",
            "WAL that may still be written before the slot is at risk (-1: no limit)",
            self.safe_wal_size_bytes.clone(),
        );
        registry.register(
            "slot_wal_ok",
            "1 while wal_status is reserved or extended, 0 when unreserved or lost",
            self.wal_ok.clone(),
        );
    }
}

/// The Redis sink's last read of `top:content:10m` (content id, score), for the dashboard.
#[derive(Debug, Default)]
pub struct TopContent(Mutex<Vec<(String, f64)>>);

impl TopContent {
    pub fn set(&self, top: Vec<(String, f64)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = top;
    }

    pub fn get(&self) -> Vec<(String, f64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_its_start_until_a_success() {
        let board = HealthBoard::default();
        board.ok("redis");
        assert_eq!(board.snapshot()["redis"].state, SinkState::Delivering);
        board.failing("redis", "down", false);
        let first = board.snapshot()["redis"].since.clone();
        assert!(first.is_some());
        board.failing("redis", "still down", false);
        let h = &board.snapshot()["redis"];
        assert_eq!((h.state, &h.since), (SinkState::Retrying, &first));
        assert_eq!(h.last_error.as_deref(), Some("still down"));
        board.ok("redis");
        let h = &board.snapshot()["redis"];
        assert_eq!((h.state, h.since.clone()), (SinkState::Delivering, None));
        board.failing("http", "refused", true);
        assert_eq!(board.snapshot()["http"].state, SinkState::Failed);
    }
}

/// The journal's extent and each sink's cursor, for `/metrics`, `/status` and the
/// dashboard.
#[derive(Debug, Default)]
pub struct JournalGauges {
    bytes: Gauge,
    max_bytes: Gauge,
    full: Gauge,
    last_seq: Gauge,
    behind: Family<SinkLabel, Gauge>,
    state: Mutex<JournalState>,
}

#[derive(Debug, Default)]
struct JournalState {
    on: bool,
    summary: crate::journal::Summary,
    full: bool,
    cursors: BTreeMap<String, CursorInfo>,
}

/// Where a sink is in the journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CursorInfo {
    /// The last batch it received.
    pub seq: u64,
    /// Commit LSN and time of the last event it received.
    pub lsn: Option<String>,
    pub commit_time: Option<String>,
}

impl JournalGauges {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "journal_bytes",
            "Bytes the journal holds on disk",
            self.bytes.clone(),
        );
        registry.register(
            "journal_max_bytes",
            "The journal's budget (journal.max_bytes; 0: off)",
            self.max_bytes.clone(),
        );
        registry.register(
            "journal_full",
            "1 while the journal's budget is spent by what a sink has not received: the slot is held for it",
            self.full.clone(),
        );
        registry.register(
            "journal_last_batch",
            "Sequence number of the last batch in the journal",
            self.last_seq.clone(),
        );
        registry.register(
            "journal_sink_behind_batches",
            "Batches in the journal a sink has not received yet",
            self.behind.clone(),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_summary(&self, summary: crate::journal::Summary, full: bool) {
        self.bytes.set(summary.bytes as i64);
        self.max_bytes.set(summary.max_bytes as i64);
        self.full.set(i64::from(full));
        self.last_seq.set(summary.last_seq as i64);
        let mut st = self.lock();
        st.on = true;
        for (name, c) in &st.cursors {
            self.behind
                .get_or_create(&SinkLabel { sink: name.clone() })
                .set(summary.last_seq.saturating_sub(c.seq) as i64);
        }
        st.summary = summary;
        st.full = full;
    }

    /// A sink received everything up to batch `seq`, whose last event committed at `lsn`.
    pub fn cursor(&self, sink: &str, seq: u64, lsn: crate::types::Lsn, commit_us: i64) {
        let mut st = self.lock();
        let last = st.summary.last_seq.max(seq);
        self.behind
            .get_or_create(&SinkLabel { sink: sink.into() })
            .set(last.saturating_sub(seq) as i64);
        st.cursors.insert(
            sink.to_string(),
            CursorInfo {
                seq,
                lsn: (lsn.0 > 0).then(|| lsn.to_string()),
                commit_time: (commit_us > 0).then(|| crate::enrich::rfc3339_us(commit_us)),
            },
        );
    }

    /// `/status`'s `journal`: `null` while the journal is off.
    pub fn snapshot(&self) -> serde_json::Value {
        let st = self.lock();
        if !st.on {
            return serde_json::Value::Null;
        }
        let cursors = serde_json::to_value(&st.cursors).unwrap_or_default();
        st.summary.to_json(st.full, cursors)
    }
}
