//! The ack tracker: sees every batch registered in order and every sink's acks (each sink
//! acks in order); the longest prefix that every sink acked is durable, and the checkpoint
//! moves to the last commit in it, stored with that prefix's dimension changes before
//! Postgres hears of it.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::anyhow;
use tokio::sync::{mpsc, watch, Semaphore};

use super::{Progress, Registration};
use crate::ops::metrics::Metrics;
use crate::state::CheckpointStore;

pub(super) async fn track(
    sinks: usize,
    mut reg_rx: mpsc::UnboundedReceiver<Registration>,
    mut ack_rx: mpsc::UnboundedReceiver<(usize, u64)>,
    store: Arc<dyn CheckpointStore>,
    progress_tx: watch::Sender<Progress>,
    metrics: Arc<Metrics>,
    budget: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let mut pending: VecDeque<Registration> = VecDeque::new();
    let mut acked = vec![0u64; sinks];
    let mut progress = *progress_tx.borrow();
    let mut registering = true;
    let mut acks_open = true;
    loop {
        tokio::select! {
            r = reg_rx.recv(), if registering => match r {
                Some(r) => pending.push_back(r),
                None => registering = false,
            },
            a = ack_rx.recv(), if acks_open => match a {
                Some((sink, seq)) => acked[sink] = acked[sink].max(seq),
                None => acks_open = false,
            },
            else => break,
        }
        // Take everything else already waiting, so one sled write covers it all.
        while let Ok(r) = reg_rx.try_recv() {
            pending.push_back(r);
        }
        while let Ok((sink, seq)) = ack_rx.try_recv() {
            acked[sink] = acked[sink].max(seq);
        }
        let all_acked = acked.iter().copied().min().unwrap_or(u64::MAX);
        let mut changes = Vec::new();
        let mut new_checkpoint = progress.checkpoint;
        let mut last_commit_us = None;
        let mut done = progress.done_seq;
        let mut events = 0u64;
        while let Some(front) = pending.front() {
            if !(front.marker || front.seq <= all_acked) {
                break;
            }
            let r = pending.pop_front().expect("front exists");
            done = r.seq;
            events += r.events as u64;
            budget.add_permits(r.permits);
            changes.extend(r.dim_changes);
            if let Some(lsn) = r.commit_end {
                new_checkpoint = new_checkpoint.max(lsn);
            }
            last_commit_us = r.last_commit_us.or(last_commit_us);
        }
        if done == progress.done_seq {
            if !registering && (pending.is_empty() || !acks_open) {
                break;
            }
            continue;
        }
        if new_checkpoint > progress.checkpoint {
            // The store writes and fsyncs on the calling thread: keep that off the async
            // workers.
            let writer = store.clone();
            tokio::task::spawn_blocking(move || {
                writer.commit(new_checkpoint, &changes, last_commit_us)
            })
            .await
            .map_err(|_| anyhow!("the checkpoint writer stopped"))??;
            metrics
                .checkpoint_lsn
                .store(new_checkpoint.0, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = last_commit_us {
                metrics
                    .last_commit_us
                    .store(t, std::sync::atomic::Ordering::Relaxed);
            }
        } else if !changes.is_empty() {
            return Err(anyhow!(
                "dimension changes without a newer commit (checkpoint {}); this is a bug",
                progress.checkpoint
            ));
        }
        metrics.counters.events_delivered.inc_by(events);
        progress = Progress {
            done_seq: done,
            checkpoint: new_checkpoint,
        };
        progress_tx.send_replace(progress);
        if !registering && pending.is_empty() {
            break;
        }
    }
    Ok(())
}
