//! The ack tracker: sees every batch registered in order and every ack (each sink and the
//! journal ack in order). Without the journal, the longest prefix that every sink acked is
//! durable; with it, the longest prefix the journal holds. The checkpoint moves to the last
//! commit in that prefix, stored with the prefix's dimension changes before Postgres hears
//! of it. The tracker also drops from memory what no sink needs there any more (returning
//! the budget), and keeps each sink's cursor in the state store.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::anyhow;
use tokio::sync::{mpsc, watch, Semaphore};

use super::{Ack, Hub, Progress, Registration};
use crate::ops::metrics::Metrics;
use crate::state::{CheckpointStore, CursorStore};
use crate::types::Position;

/// How long a batch waits in memory for a sink before, with memory half full, that sink is
/// left to read it from the journal.
pub(super) const STALLED: std::time::Duration = std::time::Duration::from_secs(2);

/// The cursors and the checkpoint are written (and fsynced) at most this often while the
/// stream runs: thousands of small batches a second would otherwise cost thousands of
/// fsyncs. Later only means a little more to deliver again after a crash, which every sink
/// recognises; at shutdown they are written at once.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub(super) struct Tracker {
    pub sinks: usize,
    pub names: Vec<&'static str>,
    pub store: Arc<dyn CheckpointStore>,
    /// Where the cursors (with the journal) and what each sink received go.
    pub cursor_store: Option<Arc<dyn CursorStore>>,
    /// Whether there is a journal.
    pub journal: bool,
    pub progress_tx: watch::Sender<Progress>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<Semaphore>,
    pub budget_size: usize,
    pub hub: Arc<Hub>,
    /// The lowest cursor: what every sink received (the journal may delete up to it).
    pub delivered_tx: watch::Sender<u64>,
    /// Each sink's last acked batch (its cursor at the start).
    pub acked: Vec<u64>,
    /// Each sink's last streamed event received (as saved at the start, then as acked).
    pub received: Vec<Option<Position>>,
    /// The journal's last durable batch.
    pub journaled: u64,
}

impl Tracker {
    pub(super) async fn track(
        mut self,
        mut reg_rx: mpsc::UnboundedReceiver<Registration>,
        mut ack_rx: mpsc::UnboundedReceiver<Ack>,
    ) -> anyhow::Result<()> {
        let journal = self.journal;
        let mut pending: VecDeque<Registration> = VecDeque::new();
        // Batches (number, events) not yet acked by every sink: `events_delivered` counts
        // what every sink has, with or without the journal.
        let mut unacked: VecDeque<(u64, u64)> = VecDeque::new();
        let mut progress = *self.progress_tx.borrow();
        // The cursors as saved (none without the journal).
        let mut saved: Vec<u64> = if journal {
            self.acked.clone()
        } else {
            Vec::new()
        };
        let mut saved_received = self.received.clone();
        let mut registering = true;
        let mut acks_open = true;
        let mut stall_check = tokio::time::interval(STALLED / 4);
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the cursors or the checkpoint were last written, and whether a write waits.
        let mut last_persist = tokio::time::Instant::now() - PERSIST_EVERY;
        let mut deferred = false;
        // When each sink last acked something new: a sink that acks nothing for STALLED is
        // stalled; one that acks, however slowly, is only slower than the stream.
        let mut progress_at = vec![std::time::Instant::now(); self.sinks];
        loop {
            tokio::select! {
                r = reg_rx.recv(), if registering => match r {
                    Some(r) => {
                        unacked.push_back((r.seq, r.events as u64));
                        pending.push_back(r);
                    }
                    None => registering = false,
                },
                a = ack_rx.recv(), if acks_open => match a {
                    Some(a) => self.ack(a, &mut progress_at),
                    None => acks_open = false,
                },
                // Batches age in memory while nothing else happens (a stalled sink, the
                // source waiting for room): look again.
                _ = stall_check.tick(), if journal && (registering || acks_open) => {}
                _ = tokio::time::sleep_until(last_persist + PERSIST_EVERY), if deferred => {}
                else => break,
            }
            // Take everything else already waiting, so one sled write covers it all.
            while let Ok(r) = reg_rx.try_recv() {
                unacked.push_back((r.seq, r.events as u64));
                pending.push_back(r);
            }
            while let Ok(a) = ack_rx.try_recv() {
                self.ack(a, &mut progress_at);
            }
            let all_acked = self.acked.iter().copied().min().unwrap_or(u64::MAX);
            let mut delivered = 0;
            while unacked.front().is_some_and(|(seq, _)| *seq <= all_acked) {
                delivered += unacked.pop_front().expect("front").1;
            }
            self.metrics.counters.events_delivered.inc_by(delivered);
            let durable = if journal { self.journaled } else { all_acked };

            // Memory: what every sink has is dropped. With the journal, a batch that is
            // journaled and has waited STALLED for a sink that acked nothing for STALLED is
            // dropped too once memory is half full: that sink reads it from the file later,
            // and the others go on. A sink that is merely slower (a catch-up) keeps reading
            // from memory under back-pressure, so memory holds the in-flight budget and no
            // second copy read back from the journal.
            let (journaled, half) = (self.journaled, self.budget_size / 2);
            let acked = &self.acked;
            let permits = self.hub.drop_front(|b, held| {
                b.seq <= all_acked
                    || (journal
                        && b.seq <= journaled
                        && held > half
                        && b.added.is_some_and(|t| t.elapsed() >= STALLED)
                        && acked
                            .iter()
                            .zip(&progress_at)
                            .any(|(a, t)| *a < b.seq && t.elapsed() >= STALLED))
            });
            self.budget.add_permits(permits);

            // Too soon after the last write, while the stream runs: write later.
            let closing = !registering || !acks_open;
            deferred = false;
            if !closing && last_persist.elapsed() < PERSIST_EVERY {
                let cursors_moved = self.cursor_store.is_some()
                    && (self.cursors_now().ne(saved.iter().copied())
                        || self.received != saved_received);
                let durable_front = pending
                    .front()
                    .is_some_and(|f| f.marker || f.seq <= durable);
                deferred = cursors_moved || durable_front;
                continue;
            }

            if let Some(cursors) = &self.cursor_store {
                let now: Vec<u64> = self.cursors_now().collect();
                if now != saved || self.received != saved_received {
                    let named: Vec<(&'static str, u64)> = self
                        .names
                        .iter()
                        .copied()
                        .zip(now.iter().copied())
                        .collect();
                    let received: Vec<(&'static str, Position)> = self
                        .names
                        .iter()
                        .copied()
                        .zip(self.received.iter().copied())
                        .filter_map(|(n, p)| Some((n, p?)))
                        .collect();
                    let writer = cursors.clone();
                    tokio::task::spawn_blocking(move || writer.save_cursors(&named, &received))
                        .await
                        .map_err(|_| anyhow!("the cursor writer stopped"))??;
                    last_persist = tokio::time::Instant::now();
                    if journal {
                        self.delivered_tx
                            .send_replace(now.iter().copied().min().unwrap_or(self.journaled));
                    }
                    saved = now;
                    saved_received = self.received.clone();
                }
            }

            let mut changes = Vec::new();
            let mut new_checkpoint = progress.checkpoint;
            let mut last_commit_us = None;
            let mut done = progress.done_seq;
            while let Some(front) = pending.front() {
                if !(front.marker || front.seq <= durable) {
                    break;
                }
                let r = pending.pop_front().expect("front exists");
                done = r.seq;
                changes.extend(r.dim_changes);
                if let Some(lsn) = r.commit_end {
                    new_checkpoint = new_checkpoint.max(lsn);
                }
                last_commit_us = r.last_commit_us.or(last_commit_us);
            }
            if done == progress.done_seq {
                if self.finished(registering, acks_open, &pending, journal) {
                    break;
                }
                continue;
            }
            if new_checkpoint > progress.checkpoint {
                // The store writes and fsyncs on the calling thread: keep that off the
                // async workers.
                let writer = self.store.clone();
                tokio::task::spawn_blocking(move || {
                    writer.commit(new_checkpoint, &changes, last_commit_us)
                })
                .await
                .map_err(|_| anyhow!("the checkpoint writer stopped"))??;
                last_persist = tokio::time::Instant::now();
                self.metrics
                    .checkpoint_lsn
                    .store(new_checkpoint.0, std::sync::atomic::Ordering::Relaxed);
                if let Some(t) = last_commit_us {
                    self.metrics
                        .last_commit_us
                        .store(t, std::sync::atomic::Ordering::Relaxed);
                }
            } else if !changes.is_empty() {
                return Err(anyhow!(
                    "dimension changes without a newer commit (checkpoint {}); this is a bug",
                    progress.checkpoint
                ));
            }
            progress = Progress {
                done_seq: done,
                checkpoint: new_checkpoint,
            };
            self.progress_tx.send_replace(progress);
            if self.finished(registering, acks_open, &pending, journal) {
                break;
            }
        }
        Ok(())
    }

    /// The cursors to save (none without the journal). A cursor never passes what the
    /// journal holds: after a crash the batches past it are numbered again.
    fn cursors_now(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked
            .iter()
            .filter(|_| self.journal)
            .map(|&a| a.min(self.journaled))
    }

    fn ack(&mut self, a: Ack, progress_at: &mut [std::time::Instant]) {
        let Ack { who, seq, received } = a;
        if who == self.sinks {
            self.journaled = self.journaled.max(seq);
        } else {
            if seq > self.acked[who] {
                progress_at[who] = std::time::Instant::now();
            }
            self.acked[who] = self.acked[who].max(seq);
            if received > self.received[who] {
                self.received[who] = received;
            }
        }
    }

    /// Without the journal the tracker is done when nothing more can become durable; with
    /// it, only when every sink task (and the journal) stopped, so the last cursors are
    /// kept.
    fn finished(
        &self,
        registering: bool,
        acks_open: bool,
        pending: &VecDeque<Registration>,
        journal: bool,
    ) -> bool {
        if registering {
            return false;
        }
        if journal {
            !acks_open
        } else {
            pending.is_empty() || !acks_open
        }
    }
}
