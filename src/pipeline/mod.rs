//! Batching, fan-out, the journal and ack tracking → the checkpoint (docs/architecture.md,
//! "Fan-out, batching, back-pressure" and "The journal").
//!
//! ```text
//!  source ──register──────────────────────────────────────► tracker ──► sled (checkpoint,
//!     │                                                       ▲  │        dimension, cursors)
//!     ├──Arc<Batch>──► journal task (append, fsync) ─────ack──┤  ▼
//!     └──Arc<Batch>──► hub (memory) ──► sink task A ─────ack──┤  drops from the hub,
//!                          ▲   │ ─────► sink task B ─────ack──┘  progress watch ──► source
//!          segment files ──┘   (a sink behind the hub reads the journal's files)
//! ```
//!
//! Every batch goes to the journal (when on) and into the hub, the batches held in memory.
//! Each sink has its own task, which reads the batches after its cursor — from the hub while
//! it keeps up, from the journal's segment files once it fell behind what the hub holds —
//! and takes what is waiting, up to its write limit, as one write (throughput); batches close
//! small when the stream is quiet (latency). The hub is bounded by a budget of
//! [`IN_FLIGHT_BATCHES`] × `max_batch_rows` events (more when a sink's write may take more
//! than half of that: room for it and half the budget beside it): when it is spent the
//! source waits, and with it the replication stream (back-pressure, never an unbounded
//! queue). The tracker sees every batch registered in order and every ack (each sink and
//! the journal ack in order). With the journal the longest journaled prefix is durable and
//! each sink's cursor is stored; without it, the longest prefix every sink acked. The
//! checkpoint moves to the last commit in that prefix, written to sled with the prefix's
//! dimension changes before Postgres hears of it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::enrich::{DimChange, EnrichedEvent};
use crate::journal;
use crate::ops::metrics::Histogram;
use crate::ops::metrics::Metrics;
use crate::sinks::{Sink, SinkError};
use crate::state::{CheckpointStore, CursorStore};
use crate::types::{Lsn, Position};

pub mod config;
mod tracker;

/// The in-flight budget, in full batches' worth of events.
pub const IN_FLIGHT_BATCHES: usize = 8;

/// The journal writes and fsyncs at most this often; the batches that arrive in between
/// go in the same write. Many small transactions a second then cost a few fsyncs, not one
/// each; the checkpoint (written every 100 ms) waits for the journal anyway.
const JOURNAL_EVERY: Duration = Duration::from_millis(50);

/// Events in one journal write at most (about 2.5 MB encoded), beyond one batch.
const JOURNAL_WRITE_EVENTS: usize = 20_000;

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
    /// Budget permits it holds while in memory.
    pub permits: usize,
    /// When it was put in memory.
    pub added: Option<std::time::Instant>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.commit_end.is_none() && self.dim_changes.is_empty()
    }
}

/// The event vectors of finished batches, kept for the next ones. A catch-up's batch is
/// half a megabyte to a megabyte of events; a fresh vector of that size is fresh memory —
/// mapped, faulted in page by page, zeroed, copied each time it doubles and unmapped when
/// the batch goes — which was about 4 % of the engine's CPU while catching up
/// (docs/benchmarks.md). Sinks that write several batches at once free them in bursts, so
/// up to [`SPARE_EVENTS`] events' worth is kept (about 3.4 MB), and only while the stream
/// is busy: a quiet stream gives them all back to the allocator ([`shed_spares`]).
static SPARE: Mutex<Vec<Vec<EnrichedEvent>>> = Mutex::new(Vec::new());
const SPARE_EVENTS: usize = 20_000;
/// Vectors smaller than this (about 170 KB) come from the allocator's heap, which reuses
/// them cheaply.
const SPARE_MIN_EVENTS: usize = 1024;

fn spare_lock() -> std::sync::MutexGuard<'static, Vec<Vec<EnrichedEvent>>> {
    SPARE.lock().unwrap_or_else(|p| p.into_inner())
}

/// An empty event vector that holds more than `len` events, if one is spare.
pub fn take_spare(len: usize) -> Option<Vec<EnrichedEvent>> {
    let mut spare = spare_lock();
    let largest = (0..spare.len()).max_by_key(|&i| spare[i].capacity())?;
    (spare[largest].capacity() > len).then(|| spare.swap_remove(largest))
}

/// Give the spare vectors back to the allocator: the stream is quiet.
pub fn shed_spares() {
    let shed = std::mem::take(&mut *spare_lock());
    drop(shed);
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.events.capacity() < SPARE_MIN_EVENTS {
            return;
        }
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let mut spare = spare_lock();
        let held: usize = spare.iter().map(Vec::capacity).sum();
        if held + events.capacity() <= SPARE_EVENTS {
            spare.push(events);
        }
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
    commit_end: Option<Lsn>,
    last_commit_us: Option<i64>,
    dim_changes: Vec<DimChange>,
}

/// The journal's part in a pipeline (docs/architecture.md, "The journal").
pub struct JournalParts {
    pub writer: journal::Writer,
    pub dir: PathBuf,
    /// Each sink's cursor (the last batch it received), in the order of the sinks.
    pub cursors: Vec<u64>,
    /// Where the cursors are kept.
    pub cursor_store: Arc<dyn CursorStore>,
}

/// What each sink received of the stream, saved (with the cursors, when there is a
/// journal) so that what the stream delivers again after a restart is not sent to a sink
/// twice (docs/architecture.md, "Exactly once in effect").
pub struct Received {
    /// Each sink's last streamed event received, as saved before this start, in the order
    /// of the sinks.
    pub saved: Vec<Option<Position>>,
    pub store: Arc<dyn CursorStore>,
}

/// The batches held in memory, shared by the source (which adds) and the sinks (which read
/// at their own pace); the tracker drops what is no longer needed there.
pub(super) struct Hub {
    state: Mutex<HubState>,
    /// A batch was added, or the pipeline closed.
    changed: Notify,
    /// The source caught up ([`Pipeline::caught_up`]): wakes only the sinks filling a write.
    caught_up: Notify,
}

#[derive(Default)]
struct HubState {
    batches: VecDeque<Arc<Batch>>,
    /// The last sequence number dropped from memory: a sink behind it reads the journal.
    dropped_through: u64,
    /// Events held.
    events: usize,
    closed: bool,
    /// The source has read everything the server had sent when it last said so (a
    /// keepalive after its last transaction), and every batch of it is here: while catching
    /// up, a sink waiting to fill its write has nothing more to wait for. A new batch clears it.
    source_caught_up: bool,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop front batches while `drop` says so; returns the permits they held.
    pub(super) fn drop_front(&self, mut drop: impl FnMut(&Batch, usize) -> bool) -> usize {
        let mut st = self.lock();
        let mut permits = 0;
        while let Some(front) = st.batches.front() {
            if !drop(front, st.events) {
                break;
            }
            let front = st.batches.pop_front().expect("front");
            st.events -= front.events.len();
            st.dropped_through = front.seq;
            permits += front.permits;
        }
        permits
    }
}

pub struct Pipeline {
    hub: Arc<Hub>,
    journal_tx: Option<mpsc::UnboundedSender<Arc<Batch>>>,
    register: mpsc::UnboundedSender<Registration>,
    progress: watch::Receiver<Progress>,
    failures: mpsc::UnboundedReceiver<anyhow::Error>,
    tasks: JoinSet<()>,
    last_seq: u64,
    metrics: Arc<Metrics>,
    /// Permits are events held in memory; the tracker returns them when a batch is dropped
    /// from memory (durable and received by every sink, or journaled).
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
        journal: Option<JournalParts>,
        received: Option<Received>,
    ) -> Pipeline {
        // Room for the largest write and half the usual budget beside it, so the source
        // goes on reading while that write is out.
        let largest_write = sinks
            .iter()
            .map(|s| s.write_limit(max_batch_rows))
            .max()
            .unwrap_or(0);
        let rows = max_batch_rows.max(1000);
        let budget_size =
            (IN_FLIGHT_BATCHES * rows).max(largest_write + IN_FLIGHT_BATCHES / 2 * rows);
        let budget = Arc::new(Semaphore::new(budget_size));
        let (register, reg_rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
        let (fail_tx, failures) = mpsc::unbounded_channel();
        let (progress_tx, progress) = watch::channel(Progress {
            done_seq: 0,
            checkpoint,
        });
        let n = sinks.len();
        let names: Vec<&'static str> = sinks.iter().map(|s| s.name()).collect();
        // Sequence numbers go on from the journal's last batch, so cursors stay valid.
        let first_seq = journal.as_ref().map_or(0, |j| j.writer.last_seq());
        let hub = Arc::new(Hub {
            state: Mutex::new(HubState {
                dropped_through: first_seq,
                ..HubState::default()
            }),
            changed: Notify::new(),
            caught_up: Notify::new(),
        });
        let (journaled_tx, journaled_rx) = watch::channel(first_seq);
        let mut tasks = JoinSet::new();
        let cursors: Vec<u64> = match &journal {
            Some(j) => j.cursors.clone(),
            None => vec![first_seq; n],
        };
        let (saved_received, received_store) = match received {
            Some(r) => (r.saved, Some(r.store)),
            None => (vec![None; n], None),
        };
        let journal_dir = journal.as_ref().map(|j| j.dir.clone());
        for (index, sink) in sinks.into_iter().enumerate() {
            let task = SinkTask {
                index,
                write_limit: sink.write_limit(max_batch_rows).max(1),
                sink,
                hub: hub.clone(),
                cursor: cursors[index],
                skip_through: saved_received[index],
                skipped: 0,
                reader: journal_dir.as_deref().map(journal::Reader::new),
                journaled: journaled_rx.clone(),
                ack: ack_tx.clone(),
                metrics: metrics.clone(),
            };
            let fail = fail_tx.clone();
            tasks.spawn(async move {
                let name = task.sink.name();
                if let Err(e) = task.run().await {
                    let _ = fail.send(anyhow!("{name} sink failed: {e}"));
                }
            });
        }
        let (delivered_tx, delivered_rx) =
            watch::channel(cursors.iter().copied().min().unwrap_or(first_seq));
        let (journal_tx, cursor_store) = match journal {
            Some(j) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let fail = fail_tx.clone();
                let ack = ack_tx.clone();
                let m = metrics.clone();
                tasks.spawn(async move {
                    if let Err(e) =
                        journal_task(j.writer, rx, ack, n, delivered_rx, journaled_tx, m).await
                    {
                        let _ = fail.send(e);
                    }
                });
                (Some(tx), Some(j.cursor_store))
            }
            None => (None, received_store),
        };
        drop(ack_tx);
        let t = tracker::Tracker {
            sinks: n,
            names,
            journaled: first_seq,
            store,
            cursor_store,
            journal: journal_tx.is_some(),
            progress_tx,
            metrics: metrics.clone(),
            budget: budget.clone(),
            budget_size,
            hub: hub.clone(),
            delivered_tx,
            acked: cursors,
            received: saved_received,
        };
        tasks.spawn(async move {
            if let Err(e) = t.track(reg_rx, ack_rx).await {
                let _ = fail_tx.send(e);
            }
        });
        Pipeline {
            hub,
            journal_tx,
            register,
            progress,
            failures,
            tasks,
            last_seq: first_seq,
            metrics,
            budget,
            budget_size,
        }
    }

    /// Hand a batch to every sink (and the journal), waiting while the in-flight budget is
    /// spent. A batch without events becomes a marker (its commit and dimension changes
    /// still count).
    pub async fn send(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let has_events = !batch.events.is_empty();
        // With the journal, a commit is journaled even without events: the batches before it
        // may hold part of its transaction, and only this record says it committed (the
        // journal is cut after the last commit at open). Without it, it is a marker.
        let journaled = self.journal_tx.is_some() && (has_events || batch.commit_end.is_some());
        let marker = !has_events && !journaled;
        let want = batch.events.len().min(self.budget_size);
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
        batch.permits = want;
        batch.added = Some(std::time::Instant::now());
        self.register
            .send(Registration {
                seq: batch.seq,
                marker,
                events: batch.events.len(),
                commit_end: batch.commit_end,
                last_commit_us: batch.last_commit_us,
                dim_changes: std::mem::take(&mut batch.dim_changes),
            })
            .map_err(|_| anyhow!("the checkpoint tracker stopped"))?;
        if marker {
            return Ok(());
        }
        let batch = Arc::new(batch);
        if journaled {
            let tx = self.journal_tx.as_ref().expect("the journal is on");
            if tx.send(batch.clone()).is_err() {
                return Err(self.failure().await);
            }
        }
        if has_events {
            self.metrics.counters.batches.inc();
            {
                let mut st = self.hub.lock();
                st.events += batch.events.len();
                st.batches.push_back(batch);
                st.source_caught_up = false;
            }
            self.hub.changed.notify_waiters();
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
                commit_end: Some(lsn),
                last_commit_us: None,
                dim_changes: Vec::new(),
            })
            .map_err(|_| anyhow!("the checkpoint tracker stopped"))
    }

    /// The source has read everything the server had (its keepalive came after the last
    /// transaction) and sent it all: sinks filling a catch-up's write stop waiting for more
    /// and write what they hold, until the next batch comes.
    pub fn caught_up(&self) {
        let mut st = self.hub.lock();
        if !st.source_caught_up {
            st.source_caught_up = true;
            drop(st);
            self.hub.caught_up.notify_waiters();
        }
    }

    /// Whether something sent is not yet durable.
    pub fn in_flight(&self) -> bool {
        self.progress.borrow().done_seq < self.last_seq
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Wait until everything sent so far is durable (journaled, or with the journal off
    /// received by every sink), or a sink fails.
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

    /// Stop the sink tasks after they delivered what memory holds, then the journal and the
    /// tracker; what is still running after `grace` (a sink that does not answer) is
    /// aborted — it was not checkpointed (or its cursor not moved), so it is read again at
    /// the next start.
    pub async fn close(mut self, grace: Duration) {
        self.journal_tx = None;
        self.hub.lock().closed = true;
        self.hub.changed.notify_waiters();
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

/// One sink's task: reads batches after its cursor, from memory or (when it fell behind
/// what memory holds) from the journal, and acks each write.
struct SinkTask {
    index: usize,
    sink: Box<dyn Sink>,
    hub: Arc<Hub>,
    cursor: u64,
    reader: Option<journal::Reader>,
    journaled: watch::Receiver<u64>,
    write_limit: usize,
    ack: mpsc::UnboundedSender<Ack>,
    metrics: Arc<Metrics>,
    /// The last streamed event this sink received before the start, as saved: what the
    /// stream delivers again up to there (a transaction the journal cut at the start;
    /// without the journal, everything past the slowest sink) is not sent to it twice.
    /// Cleared at the first streamed event past it.
    skip_through: Option<Position>,
    /// How many events `skip_through` left out.
    skipped: u64,
}

/// A write done: who (a sink's index, or the journal's), through which batch, and for a
/// sink, the last streamed event it received.
pub(super) struct Ack {
    pub who: usize,
    pub seq: u64,
    pub received: Option<Position>,
}

/// What a sink task found to do.
enum Next {
    Write(Vec<Arc<Batch>>),
    /// Behind memory: read the journal.
    Journal,
    Wait,
    Closed,
}

impl SinkTask {
    async fn run(mut self) -> Result<(), SinkError> {
        let latency = self.metrics.latency(self.sink.name());
        let mut idle = tokio::time::interval(Duration::from_secs(1));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_write = tokio::time::Instant::now();
        let hub = self.hub.clone();
        loop {
            let changed = hub.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let group = match self.take_after(self.cursor, self.write_limit) {
                Next::Write(mut group) => {
                    // A sink that lingers waits a little for more; one that fills its
                    // writes while catching up waits for the next batches then.
                    // While catching up, neither waits once the source has read all the
                    // server had: nothing more is coming (the end of a catch-up).
                    let mut linger_until = last_write + self.sink.linger();
                    let fill = self.sink.fill_wait();
                    let catch_up = catching_up(&group);
                    if !fill.is_zero() && catch_up {
                        linger_until = linger_until.max(tokio::time::Instant::now() + fill);
                    }
                    let mut n: usize = group.iter().map(|b| b.events.len()).sum();
                    while n < self.write_limit && tokio::time::Instant::now() < linger_until {
                        let more = hub.changed.notified();
                        tokio::pin!(more);
                        more.as_mut().enable();
                        // Registered only by a catch-up's fill (a steady linger never hears it).
                        let caught_up = hub.caught_up.notified();
                        tokio::pin!(caught_up);
                        if catch_up {
                            caught_up.as_mut().enable();
                        }
                        let after = group.last().map_or(self.cursor, |b| b.seq);
                        match self.take_after(after, self.write_limit - n) {
                            Next::Write(m) => {
                                n += m.iter().map(|b| b.events.len()).sum::<usize>();
                                group.extend(m);
                                continue;
                            }
                            Next::Wait => {}
                            _ => break,
                        }
                        if catch_up && hub.lock().source_caught_up {
                            break;
                        }
                        let woken = async {
                            tokio::select! {
                                _ = more => {}
                                _ = caught_up, if catch_up => {}
                            }
                        };
                        if tokio::time::timeout_at(linger_until, woken).await.is_err() {
                            break;
                        }
                    }
                    group
                }
                Next::Journal => self.read_journal().await?,
                Next::Closed => return Ok(()),
                Next::Wait => {
                    tokio::select! {
                        _ = changed => {}
                        _ = idle.tick() => self.sink.idle().await?,
                    }
                    continue;
                }
            };
            if group.is_empty() {
                // The journal has not caught up with what memory dropped: wait for it.
                let mut journaled = self.journaled.clone();
                let cursor = self.cursor;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    journaled.wait_for(|j| *j > cursor),
                )
                .await;
                continue;
            }
            let mut events: Vec<&EnrichedEvent> =
                group.iter().flat_map(|b| b.events.iter()).collect();
            let received = events.iter().rev().find_map(|e| e.position());
            if let Some(through) = self.skip_through {
                self.skip_received(&mut events, through);
            }
            // Commit records read from the journal carry no events: nothing to write.
            if !events.is_empty() {
                last_write = tokio::time::Instant::now();
                self.sink.deliver(&events).await?;
                record_latency(&latency, &events);
            }
            let last = group.last().expect("a batch");
            self.cursor = last.seq;
            if let (Some(e), Some(_)) = (events.last(), &self.reader) {
                self.metrics
                    .journal
                    .cursor(self.sink.name(), last.seq, e.source_lsn, e.commit_us);
            }
            let _ = self.ack.send(Ack {
                who: self.index,
                seq: last.seq,
                received,
            });
            idle.reset();
        }
    }

    /// Leave out of `events` the streamed ones at or before `through`, which this sink
    /// received before the start; past the first one after it, nothing more is left out.
    fn skip_received(&mut self, events: &mut Vec<&EnrichedEvent>, through: Position) {
        let before = events.len();
        events.retain(|e| e.position().is_none_or(|p| p > through));
        let skipped = (before - events.len()) as u64;
        self.skipped += skipped;
        self.metrics
            .counters
            .events_received_before_skipped
            .inc_by(skipped);
        if events.iter().any(|e| e.position().is_some()) {
            self.skip_through = None;
            if self.skipped > 0 {
                tracing::info!(
                    "{} sink: {} events it had received before the restart (up to {through}) were read again; not sent to it again",
                    self.sink.name(),
                    self.skipped
                );
            }
        }
    }

    /// Batches after `after` from memory, up to `max_events` (at least one).
    fn take_after(&self, after: u64, max_events: usize) -> Next {
        let st = self.hub.lock();
        if after < st.dropped_through {
            return Next::Journal;
        }
        let start = st.batches.partition_point(|b| b.seq <= after);
        let mut group = Vec::new();
        let mut n = 0;
        for b in st.batches.range(start..) {
            if n >= max_events && !group.is_empty() {
                break;
            }
            n += b.events.len();
            group.push(b.clone());
        }
        if !group.is_empty() {
            Next::Write(group)
        } else if st.closed {
            Next::Closed
        } else {
            Next::Wait
        }
    }

    /// Up to a write's worth of batches after the cursor from the journal.
    async fn read_journal(&mut self) -> Result<Vec<Arc<Batch>>, SinkError> {
        let Some(mut reader) = self.reader.take() else {
            return Err(SinkError::permanent(
                "a sink fell behind what memory holds with the journal off; this is a bug",
            ));
        };
        let (after, up_to, limit) = (self.cursor, *self.journaled.borrow(), self.write_limit);
        let (reader, read) = tokio::task::spawn_blocking(move || {
            let r = reader.read(after, up_to, limit);
            (reader, r)
        })
        .await
        .map_err(|e| SinkError::permanent(format!("the journal reader stopped: {e}")))?;
        self.reader = Some(reader);
        let records = read.map_err(|e| SinkError::permanent(format!("{e:#}")))?;
        Ok(records
            .into_iter()
            .map(|r| {
                Arc::new(Batch {
                    seq: r.seq,
                    events: r.events,
                    commit_end: r.commit_end,
                    last_commit_us: r.last_commit_us,
                    dim_changes: Vec::new(),
                    permits: 0,
                    added: None,
                })
            })
            .collect())
    }
}

/// Append every batch to the journal, fsync, and ack it (as sink `index`): the checkpoint
/// may then move past it. When the budget is spent by what a sink has not received, wait
/// (the slot is held) and say so.
async fn journal_task(
    mut writer: journal::Writer,
    mut rx: mpsc::UnboundedReceiver<Arc<Batch>>,
    ack: mpsc::UnboundedSender<Ack>,
    index: usize,
    mut delivered: watch::Receiver<u64>,
    journaled: watch::Sender<u64>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let gauges = &metrics.journal;
    gauges.set_summary(writer.summary(), false);
    let mut full_since: Option<std::time::Instant> = None;
    let mut last_write = tokio::time::Instant::now() - JOURNAL_EVERY;
    loop {
        let first = tokio::select! {
            b = rx.recv() => b,
            // Retention runs while the stream is idle too.
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                let d = *delivered.borrow();
                let _ = writer.room(d, 0, crate::enrich::now_us());
                gauges.set_summary(writer.summary(), full_since.is_some());
                continue;
            }
        };
        let Some(first) = first else {
            return Ok(());
        };
        let mut events = first.events.len();
        let mut group = vec![first];
        // At most one write (and fsync) per JOURNAL_EVERY: what arrives meanwhile joins it,
        // up to JOURNAL_WRITE_EVENTS (the write's buffer stays small while catching up).
        let due = last_write + JOURNAL_EVERY;
        while events < JOURNAL_WRITE_EVENTS && tokio::time::Instant::now() < due {
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => {
                        events += b.events.len();
                        group.push(b);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(due) => break,
            }
        }
        while events < JOURNAL_WRITE_EVENTS {
            let Ok(b) = rx.try_recv() else { break };
            events += b.events.len();
            group.push(b);
        }
        let need = writer.encode(
            group
                .iter()
                .map(|b| (b.seq, b.commit_end, b.last_commit_us, b.events.as_slice())),
        );
        loop {
            let d = *delivered.borrow_and_update();
            match writer.room(d, need, crate::enrich::now_us()) {
                Ok(()) => break,
                Err(full) => {
                    if full_since.is_none() {
                        full_since = Some(std::time::Instant::now());
                        tracing::warn!(
                            "journal: the budget (journal.max_bytes = {}) is spent by batches a sink has not received (from batch {}); holding the replication slot until it catches up — see `engagement-cdc status`",
                            writer.summary().max_bytes,
                            full.waiting_for
                        );
                        gauges.set_summary(writer.summary(), true);
                    }
                    if delivered.changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if let Some(since) = full_since.take() {
            tracing::info!(
                "journal: room again after {:.1} s; the slot advances with the journal",
                since.elapsed().as_secs_f64()
            );
        }
        last_write = tokio::time::Instant::now();
        let (w, written) = tokio::task::spawn_blocking(move || {
            let r = writer.write_encoded();
            (writer, r)
        })
        .await
        .map_err(|_| anyhow!("the journal writer stopped"))?;
        writer = w;
        written?;
        let last = group.last().expect("a batch").seq;
        gauges.set_summary(writer.summary(), false);
        journaled.send_replace(last);
        let _ = ack.send(Ack {
            who: index,
            seq: last,
            received: None,
        });
    }
}

/// A write whose first streamed event was committed longer ago than this belongs to a
/// catch-up: nobody waits for it to the millisecond, and a sink that pays per write
/// ([`Sink::fill_wait`]) gathers more before writing.
const CATCH_UP_AGE_US: i64 = 1_000_000;

/// Whether the first streamed event of `group` was committed more than [`CATCH_UP_AGE_US`]
/// ago.
fn catching_up(group: &[Arc<Batch>]) -> bool {
    let first = group
        .iter()
        .flat_map(|b| b.events.iter())
        .find(|e| e.commit_us > 0);
    first.is_some_and(|e| crate::enrich::now_us().saturating_sub(e.commit_us) > CATCH_UP_AGE_US)
}

/// Commit-to-durable latency of each streamed event (backfilled ones have no commit time).
fn record_latency(h: &Histogram, events: &[&EnrichedEvent]) {
    record_latency_at(h, events, crate::enrich::now_us());
}

/// [`record_latency`] as of `now`: each transaction's events at once, as they share a
/// commit time.
fn record_latency_at(h: &Histogram, events: &[&EnrichedEvent], now: i64) {
    let mut i = 0;
    while i < events.len() {
        let c = events[i].commit_us;
        let j = run_end(events, i);
        if c > 0 {
            h.record_us(now.saturating_sub(c).max(0) as u64, (j - i) as u64);
        }
        i = j;
    }
}

/// One past the last event of the run that starts at `i`: of its transaction, for a
/// streamed event; of its commit time, otherwise. A write's streamed events are in stream
/// order, each at its own position, so the events from `i` to `k` are all of `i`'s
/// transaction exactly when `k` holds the position `k - i` places after `i`'s: the end is
/// found in doubling steps and a halving search, reading a few dozen of a catch-up's
/// thousands of events instead of each (the walk over each, for every sink's every write,
/// was 2.4 % of the engine's samples: docs/benchmarks.md, "Our own replication reader").
fn run_end(events: &[&EnrichedEvent], i: usize) -> usize {
    let first = events[i];
    let n = events.len();
    if first.source_lsn.0 == 0 {
        let mut j = i + 1;
        while j < n && events[j].commit_us == first.commit_us {
            j += 1;
        }
        return j;
    }
    let of_run = |k: usize| {
        let e = events[k];
        e.source_lsn == first.source_lsn
            && e.commit_us == first.commit_us
            && u64::from(e.tx_index) == u64::from(first.tx_index) + (k - i) as u64
    };
    // `lo` is in the run; `hi` is not (or is the end).
    let (mut lo, mut step) = (i, 1);
    let mut hi = loop {
        let k = lo + step;
        if k >= n || !of_run(k) {
            break k.min(n);
        }
        lo = k;
        step *= 2;
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if of_run(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[cfg(test)]
pub(crate) mod tests;
