//! The dead-letter queue of the HTTP sink, in the sled state store, and the
//! `engagement-cdc dlq list | replay | purge` subcommand.
//!
//! A dead letter is one request the API did not accept in `best_effort` mode: its body (the
//! exact JSON that was sent), its idempotency key, the last status and error, how many
//! attempts were made, and when. Replay sends the same body with the same key and removes
//! what the API accepts.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::checkpoint::StateStore;
use crate::config::Config;
use crate::error::UsageError;
use crate::sinks::http::{HttpSender, Outcome, Request};

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

    pub async fn update(&self, letter: &DeadLetter) -> anyhow::Result<()> {
        self.tree
            .insert(letter.id.to_be_bytes(), serde_json::to_vec(letter)?)?;
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

#[derive(Debug, Clone, Copy)]
pub enum DlqCommand {
    List { json: bool },
    Replay,
    Purge,
}

/// Run a `dlq` subcommand; returns what to print.
pub async fn command(config: &Config, cmd: DlqCommand) -> anyhow::Result<String> {
    let store = StateStore::open(&config.state.dir)?;
    let dlq = Dlq::open(&store)?;
    match cmd {
        DlqCommand::List { json } => {
            let letters = dlq.list()?;
            if json {
                return Ok(serde_json::to_string_pretty(&letters)? + "\n");
            }
            let mut out = format!("{} dead letters\n", letters.len());
            for l in &letters {
                out.push_str(&format!(
                    "{}  {}  events {}-{} ({})  status {}  attempts {}  {}\n",
                    l.id,
                    l.time,
                    l.first_event_id,
                    l.last_event_id,
                    l.events,
                    l.status.map_or("-".into(), |s| s.to_string()),
                    l.attempts,
                    l.error
                ));
            }
            Ok(out)
        }
        DlqCommand::Purge => {
            let n = dlq.purge().await?;
            Ok(format!("purged {n} dead letters\n"))
        }
        DlqCommand::Replay => {
            let Some(http) = config.http() else {
                return Err(UsageError::new(
                    "dlq replay needs the [http] section (url, token, timeouts) to send to; add it to the configuration",
                )
                .into());
            };
            let sender = HttpSender::new(http)?;
            let (mut delivered, mut failed, mut events) = (0usize, 0usize, 0usize);
            for mut letter in dlq.list()? {
                let req = Request {
                    key: letter.idempotency_key.clone(),
                    body: letter.payload.clone().into_bytes().into(),
                    events: letter.events,
                    first_event_id: letter.first_event_id,
                    last_event_id: letter.last_event_id,
                };
                match sender.send(&req, false).await {
                    Outcome::Delivered => {
                        dlq.remove(letter.id).await?;
                        delivered += 1;
                        events += letter.events;
                    }
                    Outcome::Failed {
                        status,
                        error,
                        attempts,
                    } => {
                        letter.status = status;
                        letter.error = error;
                        letter.attempts += attempts;
                        dlq.update(&letter).await?;
                        failed += 1;
                    }
                }
            }
            Ok(format!(
                "replayed {delivered} dead letters ({events} events); {failed} still failing and kept\n"
            ))
        }
    }
}
