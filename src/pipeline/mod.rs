//! Batching, fan-out and ack tracking → the checkpoint (docs/architecture.md, "Fan-out,
//! batching, back-pressure").
//!
//! ```text
//!  source ──register──────────────────────────────► tracker ──► sled (checkpoint + dimension)
//!     │                                                ▲            │
//!     ├──Arc<Batch>──► [bounded] ──► sink task A ──ack─┤            ▼
//!     └──Arc<Batch>──► [bounded] ──► sink task B ──ack─┘      progress watch ──► source
//!                                                              (update_applied_lsn)
//! ```
//!
//! Each sink has its own task and queue. The events in flight (handed to the sinks, not yet
//! durable in all of them) are bounded by a budget of [`IN_FLIGHT_BATCHES`] × `max_batch_rows`:
//! a sink may run that far ahead of the slowest, and when the budget is spent the source
//! waits, and with it the replication stream (back-pressure, never an unbounded queue).
//! Batches close small when the stream is quiet (latency); a sink that falls behind takes
//! every batch waiting in its queue, up to `max_batch_rows` events, as one write
//! (throughput). The tracker sees every
//! batch registered in order and every sink's acks (each sink acks in order); the longest
//! prefix that every sink acked is durable, and the checkpoint moves to the last commit in
//! it, written to sled with that prefix's dimension changes before Postgres hears of it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::enrich::{DimChange, EnrichedEvent};
use crate::ops::metrics::Histogram;
use crate::ops::metrics::Metrics;
use crate::sinks::Sink;
use crate::state::CheckpointStore;
use crate::types::Lsn;

pub mod config;
mod tracker;

/// The in-flight budget, in full batches' worth of events.
pub const IN_FLIGHT_BATCHES: usize = 8;

/// A batch of enriched events, as every sink receives it.
#[derive(Debug, Default)]
pub struct Batch {
    /// Position in the stream of batches (and markers), from 1.
    pub seq: u64,
    pub events: Vec<EnrichedEvent>,
    /// End LSN of the last transaction that committed in this batch: the checkpoint once
    /// this batch and all before it are durable. `None` when the batch holds only part of a
    /// transaction.
    pub commit_end: Option<Lsn>,
    /// Commit time (µs since 1970) of that transaction.
    pub last_commit_us: Option<i64>,
    /// Dimension changes of the transactions that committed in this batch, in order.
    pub dim_changes: Vec<DimChange>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.commit_end.is_none() && self.dim_changes.is_empty()
    }
}

/// What the tracker has made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Every batch and marker up to this sequence number is done.
    pub done_seq: u64,
    /// The checkpoint in sled.
    pub checkpoint: Lsn,
}

pub(super) struct Registration {
    seq: u64,
    /// Sent to no sink: done as soon as everything before it is.
    marker: bool,
    events: usize,
    /// Budget permits the batch holds until it is durable.
    permits: usize,
    commit_end: Option<Lsn>,
    last_commit_us: Option<i64>,
    dim_changes: Vec<DimChange>,
}

pub struct Pipeline {
    senders: Vec<mpsc::Sender<Arc<Batch>>>,
    register: mpsc::UnboundedSender<Registration>,
    progress: watch::Receiver<Progress>,
    failures: mpsc::UnboundedReceiver<anyhow::Error>,
    tasks: JoinSet<()>,
    last_seq: u64,
    metrics: Arc<Metrics>,
    /// Permits are events in flight; the tracker returns them when a batch is durable.
    budget: Arc<Semaphore>,
    budget_size: usize,
}

impl Pipeline {
    pub fn start(
        sinks: Vec<Box<dyn Sink>>,
        store: Arc<dyn CheckpointStore>,
        metrics: Arc<Metrics>,
        checkpoint: Lsn,
        max_batch_rows: usize,
    ) -> Pipeline {
        let budget_size = IN_FLIGHT_BATCHES * max_batch_rows.max(1000);
        let budget = Arc::new(Semaphore::new(budget_size));
        let (register, reg_rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<(usize, u64)>();
        let (fail_tx, failures) = mpsc::unbounded_channel();
        let (progress_tx, progress) = watch::channel(Progress {
            done_seq: 0,
            checkpoint,
        });
        let mut tasks = JoinSet::new();
        let mut senders = Vec::new();
        let n = sinks.len();
        for (index, mut sink) in sinks.into_iter().enumerate() {
            // The budget bounds what the queue can hold.
            let (tx, mut rx) = mpsc::channel::<Arc<Batch>>(budget_size);
            senders.push(tx);
            let ack = ack_tx.clone();
            let fail = fail_tx.clone();
            let latency = metrics.latency(sink.name());
            let write_limit = sink.write_limit(max_batch_rows).max(1);
            tasks.spawn(async move {
                let mut idle = tokio::time::interval(Duration::from_secs(1));
                idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last_write = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        batch = rx.recv() => {
                            let Some(first) = batch else { break };
                            // Take what else is waiting, up to the sink's write limit; a sink
                            // that lingers waits a little for more.
                            let mut n = first.events.len();
                            let mut group = vec![first];
                            let linger_until = last_write + sink.linger();
                            loop {
                                if n >= write_limit {
                                    break;
                                }
                                match rx.try_recv() {
                                    Ok(b) => {
                                        n += b.events.len();
                                        group.push(b);
                                        continue;
                                    }
                                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                                    Err(mpsc::error::TryRecvError::Empty) => {}
                                }
                                if tokio::time::Instant::now() >= linger_until {
                                    break;
                                }
                                match tokio::time::timeout_at(linger_until, rx.recv()).await {
                                    Ok(Some(b)) => {
                                        n += b.events.len();
                                        group.push(b);
                                    }
                                    _ => break,
                                }
                            }
                            last_write = tokio::time::Instant::now();
                            let events: Vec<&EnrichedEvent> =
                                group.iter().flat_map(|b| b.events.iter()).collect();
                            if let Err(e) = sink.deliver(&events).await {
                                let _ = fail.send(anyhow!("{} sink failed: {e}", sink.name()));
                                break;
                            }
                            record_latency(&latency, &events);
                            let last = group.last().expect("a batch").seq;
                            let _ = ack.send((index, last));
                            idle.reset();
                        }
                        _ = idle.tick() => {
                            if let Err(e) = sink.idle().await {
                                let _ = fail.send(anyhow!("{} sink failed: {e}", sink.name()));
                                break;
                            }
                        }
                    }
                }
            });
        }
        drop(ack_tx);
        let tracker_metrics = metrics.clone();
        let tracker_budget = budget.clone();
        tasks.spawn(async move {
            if let Err(e) = tracker::track(
                n,
                reg_rx,
                ack_rx,
                store,
                progress_tx,
                tracker_metrics,
                tracker_budget,
            )
            .await
            {
                let _ = fail_tx.send(e);
            }
        });
        Pipeline {
            senders,
            register,
            progress,
            failures,
            tasks,
            last_seq: 0,
            metrics,
            budget,
            budget_size,
        }
    }

    /// Hand a batch to every sink, waiting while a sink's queue is full. A batch without
    /// events becomes a marker (its commit and dimension changes still count).
    pub async fn send(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let marker = batch.events.is_empty();
        let want = if marker {
            0
        } else {
            batch.events.len().min(self.budget_size)
        };
        if want > 0 {
            // Wait for room in the in-flight budget (back-pressure).
            tokio::select! {
                permit = self.budget.acquire_many(want as u32) => {
                    permit.map_err(|_| anyhow!("the pipeline stopped"))?.forget();
                }
                e = self.failures.recv() => {
                    return Err(e.unwrap_or_else(|| anyhow!("the pipeline stopped")));
                }
            }
        }
        self.last_seq += 1;
        batch.seq = self.last_seq;
        self.register
            .send(Registration {
                seq: batch.seq,
                marker,
                events: batch.events.len(),
                permits: want,
                commit_end: batch.commit_end,
                last_commit_us: batch.last_commit_us,
                dim_changes: std::mem::take(&mut batch.dim_changes),
            })
            .map_err(|_| anyhow!("the checkpoint tracker stopped"))?;
        if marker {
            return Ok(());
        }
        self.metrics.counters.batches.inc();
        let batch = Arc::new(batch);
        for tx in &self.senders {
            tokio::select! {
                sent = tx.send(batch.clone()) => {
                    if sent.is_err() {
                        return Err(self.failure().await);
                    }
                }
                e = self.failures.recv() => {
                    return Err(e.unwrap_or_else(|| anyhow!("the pipeline stopped")));
                }
            }
        }
        Ok(())
    }

    /// Let the checkpoint move to `lsn` once everything sent so far is durable (an idle
    /// stream's keepalive position).
    pub fn mark(&mut self, lsn: Lsn) -> anyhow::Result<()> {
        self.last_seq += 1;
        self.register
            .send(Registration {
                seq: self.last_seq,
                marker: true,
                events: 0,
                permits: 0,
                commit_end: Some(lsn),
                last_commit_us: None,
                dim_changes: Vec::new(),
            })
            .map_err(|_| anyhow!("the checkpoint tracker stopped"))
    }

    /// Whether something sent is not yet durable.
    pub fn in_flight(&self) -> bool {
        self.progress.borrow().done_seq < self.last_seq
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Wait until everything sent so far is durable, or a sink fails.
    pub async fn drain(&mut self) -> anyhow::Result<Progress> {
        let target = self.last_seq;
        let mut progress = self.progress.clone();
        tokio::select! {
            p = progress.wait_for(|p| p.done_seq >= target) => {
                p.map(|p| *p).map_err(|_| anyhow!("the checkpoint tracker stopped"))
            }
            e = self.failures.recv() => Err(e.unwrap_or_else(|| anyhow!("the pipeline stopped"))),
        }
    }

    /// The first permanent failure of a sink or the tracker (waits until there is one).
    pub async fn failure(&mut self) -> anyhow::Error {
        self.failures
            .recv()
            .await
            .unwrap_or_else(|| anyhow!("the pipeline stopped"))
    }

    /// Stop the sink tasks after they delivered what they hold, then the tracker; what is
    /// still running after `grace` (a sink that does not answer) is aborted — it was not
    /// checkpointed, so it is read again at the next start.
    pub async fn close(mut self, grace: Duration) {
        self.senders.clear();
        drop(self.register);
        let joined = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// Commit-to-durable latency of each streamed event (backfilled ones have no commit time).
fn record_latency(h: &Histogram, events: &[&EnrichedEvent]) {
    let now = crate::enrich::now_us();
    // Events of one transaction share a commit time: record runs at once.
    let mut i = 0;
    while i < events.len() {
        let c = events[i].commit_us;
        let mut j = i + 1;
        while j < events.len() && events[j].commit_us == c {
            j += 1;
        }
        if c > 0 {
            h.record_us(now.saturating_sub(c).max(0) as u64, (j - i) as u64);
        }
        i = j;
    }
}

#[cfg(test)]
mod tests;
