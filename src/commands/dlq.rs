//! `engagement-cdc dlq list | replay | purge`: look at, re-send or drop the HTTP sink's
//! dead letters ([`crate::state::dlq`]). Replay sends each letter's events through the HTTP
//! sink again; what the API accepts is removed.

use std::sync::Arc;

use crate::config::{Config, OnFailure};
use crate::enrich::{parse_events, EnrichedEvent};
use crate::error::UsageError;
use crate::ops::metrics::Metrics;
use crate::sinks::{self, SinkKind};
use crate::state::dlq::Dlq;
use crate::state::StateStore;

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
            if config.http().is_none() {
                return Err(UsageError::new(
                    "dlq replay needs the [http] section (url, token, timeouts) to send to; add it to the configuration",
                )
                .into());
            }
            // Through the HTTP sink, as the stream sends; a letter that fails again is
            // dead-lettered anew (with this attempt's error) instead of holding the command,
            // whatever `on_failure` says.
            let mut replay_config = config.clone();
            if let Some(http) = replay_config.http.as_mut() {
                http.on_failure = OnFailure::BestEffort;
            }
            let metrics = Arc::new(Metrics::default());
            let mut sinks = sinks::build(
                &replay_config.sinks(),
                &[SinkKind::Http],
                Some(&store),
                &metrics,
            )
            .await?;
            let sink = &mut sinks[0];
            let (mut delivered, mut failed, mut events) = (0usize, 0usize, 0usize);
            for letter in dlq.list()? {
                let batch = parse_events(&letter.payload).map_err(|e| {
                    anyhow::anyhow!(
                        "dead letter {} cannot be read ({e}); `dlq list --json` shows it, `dlq purge` drops it",
                        letter.id
                    )
                })?;
                let refs: Vec<&EnrichedEvent> = batch.iter().collect();
                let outcome = sink
                    .deliver(&refs)
                    .await
                    .map_err(|e| anyhow::anyhow!("http sink failed: {e}"))?;
                // Delivered, or kept again as a new letter: the old one goes either way.
                dlq.remove(letter.id).await?;
                if outcome.dead_lettered == 0 {
                    delivered += 1;
                    events += letter.events;
                } else {
                    failed += 1;
                }
            }
            Ok(format!(
                "replayed {delivered} dead letters ({events} events); {failed} still failing and kept\n"
            ))
        }
    }
}
