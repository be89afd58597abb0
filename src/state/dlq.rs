//! The dead-letter queue: requests the HTTP API did not accept in `best_effort` mode, kept
//! durably in the state store until `engagement-cdc dlq replay` delivers them or `purge`
//! drops them (docs/sinks.md, "Dead letters").
//!
//! A dead letter holds the request's body (the exact JSON that was sent), its idempotency
//! key, the last status and error, how many attempts were made, and when.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::StateStore;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub idempotency_key: String,
    pub events: usize,
    pub first_event_id: i64,
    pub last_event_id: i64,
    /// The request body as sent: a JSON array (batch mode) or object (per-event mode).
    pub payload: String,
    pub status: Option<u16>,
    pub error: String,
    pub attempts: u32,
    /// RFC 3339 UTC.
    pub time: String,
}

#[derive(Clone)]
pub struct Dlq {
    store: StateStore,
    tree: sled::Tree,
}

impl Dlq {
    pub fn open(store: &StateStore) -> anyhow::Result<Dlq> {
        Ok(Dlq {
            store: store.clone(),
            tree: store.dlq_tree()?,
        })
    }

    /// Store a dead letter durably (flushed before returning).
    pub async fn push(&self, mut letter: DeadLetter) -> anyhow::Result<u64> {
        letter.id = self.store.generate_id()?;
        let tree = self.tree.clone();
        let bytes = serde_json::to_vec(&letter)?;
        tokio::task::spawn_blocking(move || {
            tree.insert(letter.id.to_be_bytes(), bytes)?;
            tree.flush()
        })
        .await
        .context("the dead-letter writer stopped")?
        .context("cannot write the dead-letter queue to disk")?;
        Ok(letter.id)
    }

    pub fn list(&self) -> anyhow::Result<Vec<DeadLetter>> {
        self.tree
            .iter()
            .values()
            .map(|v| {
                let v = v?;
                serde_json::from_slice(&v).context("a dead letter in the state store is unreadable")
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    pub async fn remove(&self, id: u64) -> anyhow::Result<()> {
        self.tree.remove(id.to_be_bytes())?;
        self.tree.flush_async().await?;
        Ok(())
    }

    pub async fn purge(&self) -> anyhow::Result<usize> {
        let n = self.tree.len();
        self.tree.clear()?;
        self.tree.flush_async().await?;
        Ok(n)
    }
}
