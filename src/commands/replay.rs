//! `engagement-cdc replay` (docs/operations.md, "Replay from the journal"): re-deliver
//! what the journal still holds, from an LSN or a commit time, to one sink. Idempotent like
//! every delivery (ClickHouse keeps one row per event, Redis counts an event once, the API
//! receives the same idempotency keys), and safe while the engine runs: the journal's
//! files are read without a lock.

use std::sync::Arc;

use anyhow::bail;

use crate::config::Config;
use crate::enrich::{rfc3339_us, EnrichedEvent};
use crate::error::UsageError;
use crate::journal;
use crate::ops::metrics::Metrics;
use crate::sinks::{self, SinkKind};
use crate::types::Lsn;

/// Where the replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Events whose transaction committed at or after this LSN.
    Lsn(Lsn),
    /// Events whose transaction committed at or after this time (µs since 1970).
    Time(i64),
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub sink: SinkKind,
    pub from: From,
}

/// Events per write to the sink.
const WRITE: usize = 5000;

pub async fn replay(config: &Config, opts: &ReplayOptions) -> anyhow::Result<String> {
    let dir = journal::dir(&config.state.dir);
    let summary = journal::scan(&dir, config.journal.max_bytes)?;
    let backfill_hint = "events the journal no longer holds are re-delivered from Postgres with `engagement-cdc backfill --start … --end … --sinks …`";
    let (Some(first_lsn), Some(last_lsn)) = (summary.first_lsn, summary.last_lsn) else {
        bail!(UsageError::new(format!(
            "the journal in {} holds no events (journal.max_bytes = {}{}); {backfill_hint}",
            dir.display(),
            config.journal.max_bytes,
            if config.journal.enabled() {
                ""
            } else {
                ": off"
            }
        )));
    };
    let first_time = summary.first_commit_us.map(rfc3339_us).unwrap_or_default();
    let last_time = summary.last_commit_us.map(rfc3339_us).unwrap_or_default();
    let range = format!(
        "the journal holds commits from LSN {first_lsn} ({first_time}) to LSN {last_lsn} ({last_time})"
    );
    match opts.from {
        From::Lsn(l) if l < first_lsn => bail!(UsageError::new(format!(
            "LSN {l} is before the journal's start: {range}; {backfill_hint}"
        ))),
        From::Lsn(l) if l > last_lsn => bail!(UsageError::new(format!(
            "LSN {l} is after the journal's end: {range}; nothing to replay"
        ))),
        From::Time(t) if summary.first_commit_us.is_some_and(|f| t < f) => {
            bail!(UsageError::new(format!(
                "{} is before the journal's start: {range}; {backfill_hint}",
                rfc3339_us(t)
            )))
        }
        From::Time(t) if summary.last_commit_us.is_some_and(|l| t > l) => {
            bail!(UsageError::new(format!(
                "{} is after the journal's end: {range}; nothing to replay",
                rfc3339_us(t)
            )))
        }
        _ => {}
    }
    let metrics = Arc::new(Metrics::default());
    // The HTTP sink's dead letters need the state store, which a running engine holds:
    // a replay to the API dead-letters nothing and fails on what it cannot deliver.
    let mut sinks = sinks::build(&config.sinks(), &[opts.sink], None, &metrics).await?;
    let sink = &mut sinks[0];
    let keep = |e: &EnrichedEvent| match opts.from {
        From::Lsn(l) => e.source_lsn >= l,
        From::Time(t) => e.commit_us >= t,
    };
    let mut reader = journal::Reader::new(&dir);
    let mut after = 0u64;
    let (mut replayed, mut new) = (0u64, Some(0u64));
    let (mut from_lsn, mut to_lsn) = (None::<Lsn>, None::<Lsn>);
    loop {
        let records = tokio::task::block_in_place(|| reader.read(after, u64::MAX, WRITE))?;
        let Some(last) = records.last() else { break };
        after = last.seq;
        let events: Vec<&EnrichedEvent> = records
            .iter()
            .flat_map(|r| r.events.iter())
            .filter(|e| keep(e))
            .collect();
        if events.is_empty() {
            continue;
        }
        from_lsn.get_or_insert(events[0].source_lsn);
        to_lsn = Some(events[events.len() - 1].source_lsn);
        let delivery = sink
            .deliver(&events)
            .await
            .map_err(|e| anyhow::anyhow!("{} sink: {e}", sink.name()))?;
        replayed += events.len() as u64;
        new = new.zip(delivery.new_events).map(|(a, b)| a + b);
    }
    let span = match (from_lsn, to_lsn) {
        (Some(a), Some(b)) => format!(" from LSN {a} to LSN {b}"),
        _ => String::new(),
    };
    let new = new.map(|n| format!(" new={n}")).unwrap_or_default();
    Ok(format!(
        "Replay done. sink={} events={replayed}{new}{span}",
        sink.name()
    ))
}
