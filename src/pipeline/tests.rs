//! Unit tests of the pipeline: fan-out, the in-flight budget, checkpoints in commit order.

use super::*;
use crate::enrich::{enrich, ContentRow, RawEvent};
use crate::sinks::{BoxFuture, Delivery, SinkError};
use crate::state::StateStore;
use tokio::sync::Semaphore as Gate;

/// A sink that writes only when its gate lets it: one permit per write.
struct GatedSink {
    gate: Arc<Gate>,
    seen: Arc<std::sync::Mutex<Vec<i64>>>,
}

impl Sink for GatedSink {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            self.gate.acquire().await.unwrap().forget();
            self.seen
                .lock()
                .unwrap()
                .extend(events.iter().map(|e| e.event_id));
            Ok(Delivery::default())
        })
    }
}

pub(crate) fn event(id: i64) -> EnrichedEvent {
    let raw = RawEvent {
        id,
        content_id: 1,
        user_id: 1,
        event_type: "play".into(),
        event_ts_us: 0,
        duration_ms: None,
        device: None,
    };
    enrich(raw, None, Lsn(id as u64)).0
}

fn batch(ids: &[i64], commit: Option<u64>, changes: Vec<DimChange>) -> Batch {
    Batch {
        seq: 0,
        events: ids.iter().map(|&i| event(i)).collect(),
        commit_end: commit.map(Lsn),
        last_commit_us: commit.map(|c| c as i64),
        dim_changes: changes,
        permits: 0,
        added: None,
    }
}

// Paused time: a timeout fires only once every task is idle, which makes "nothing
// happened" a deterministic observation.
#[tokio::test(start_paused = true)]
async fn the_checkpoint_follows_the_slowest_sink_and_carries_the_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.replace_dimension(&[], Lsn(10)).unwrap();
    let (fast, slow) = (Arc::new(Gate::new(1000)), Arc::new(Gate::new(0)));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(GatedSink {
            gate: fast,
            seen: seen.clone(),
        }),
        Box::new(GatedSink {
            gate: slow.clone(),
            seen: Arc::default(),
        }),
    ];
    let mut p = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(10),
        100,
        None,
        None,
    );
    let row = ContentRow {
        content_id: 9,
        content_type: Some("video".into()),
        length_seconds: Some(5),
    };
    // Part of a transaction, then its end with a content change, then another commit.
    p.send(batch(&[1, 2], None, vec![])).await.unwrap();
    p.send(batch(&[3], Some(20), vec![DimChange::Upsert(row)]))
        .await
        .unwrap();
    p.send(batch(&[4], Some(30), vec![])).await.unwrap();
    let mut progress = p.progress();
    // The fast sink has everything; the slow one nothing: no checkpoint yet.
    tokio::time::timeout(Duration::from_secs(5), async {
        while seen.lock().unwrap().len() < 4 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let moved = tokio::time::timeout(Duration::from_secs(1), progress.changed()).await;
    assert!(
        moved.is_err(),
        "progress moved before the slow sink wrote: {:?}",
        *progress.borrow()
    );
    assert_eq!(progress.borrow().checkpoint, Lsn(10));
    assert_eq!(store.checkpoint().unwrap(), Lsn(10));
    // One write of the slow sink (it may take all three batches at once, or only the first).
    slow.add_permits(1);
    let p1 = *progress.wait_for(|p| p.done_seq >= 1).await.unwrap();
    assert!(
        p1.checkpoint == Lsn(10) || p1.checkpoint >= Lsn(20),
        "{p1:?}"
    );
    slow.add_permits(10);
    let done = *progress.wait_for(|p| p.done_seq == 3).await.unwrap();
    assert_eq!(done.checkpoint, Lsn(30));
    assert_eq!(store.checkpoint().unwrap(), Lsn(30));
    assert!(store.load_dimension().unwrap().get(9).is_some());
    // A marker completes behind everything before it.
    p.mark(Lsn(40)).unwrap();
    let marked = *progress.wait_for(|p| p.done_seq == 4).await.unwrap();
    assert_eq!(marked.checkpoint, Lsn(40));
    assert!(!p.in_flight());
    p.close(Duration::from_secs(5)).await;
}

fn journal_parts(state: &std::path::Path, store: &StateStore, checkpoint: Lsn) -> JournalParts {
    let dir = crate::journal::dir(state);
    let cfg = crate::journal::JournalConfig::default();
    let writer = crate::journal::Writer::open(&dir, &cfg, checkpoint).unwrap();
    let saved = store.cursors().unwrap();
    let cursors = crate::journal::start_cursors(&writer.summary(), &saved, &["gated", "slow"]);
    JournalParts {
        writer,
        dir,
        cursors,
        cursor_store: Arc::new(store.clone()),
    }
}

/// A gated sink under another name, so the two have cursors of their own.
struct SlowSink(GatedSink);

impl Sink for SlowSink {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        self.0.deliver(events)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_journal_a_dead_sink_holds_neither_the_checkpoint_nor_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.replace_dimension(&[], Lsn(10)).unwrap();
    let fast_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let slow_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let dead = Arc::new(Gate::new(0));
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(GatedSink {
            gate: Arc::new(Gate::new(100_000)),
            seen: fast_seen.clone(),
        }),
        Box::new(SlowSink(GatedSink {
            gate: dead.clone(),
            seen: slow_seen.clone(),
        })),
    ];
    // Batches of 1000 rows: the budget is 8000 events in memory, 4000 once journaled.
    let mut p = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(10),
        1000,
        Some(journal_parts(dir.path(), &store, Lsn(10))),
        None,
    );
    // 30,000 events while the slow sink writes nothing: far past the memory budget.
    for b in 0..30i64 {
        let ids: Vec<i64> = (b * 1000 + 1..=b * 1000 + 1000).collect();
        p.send(batch(&ids, Some(100 + b as u64), vec![]))
            .await
            .unwrap();
    }
    let done = tokio::time::timeout(Duration::from_secs(30), p.drain())
        .await
        .expect("the checkpoint moves with the journal, not with the dead sink")
        .unwrap();
    assert_eq!(done.checkpoint, Lsn(129));
    assert_eq!(store.checkpoint().unwrap(), Lsn(129));
    tokio::time::timeout(Duration::from_secs(30), async {
        while fast_seen.lock().unwrap().len() < 30_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the live sink received everything");
    assert!(slow_seen.lock().unwrap().is_empty());
    p.close(Duration::from_secs(1)).await;
    let cursors = store.cursors().unwrap();
    assert!(cursors.contains(&("gated".into(), 30)), "{cursors:?}");
    assert!(cursors.contains(&("slow".into(), 0)), "{cursors:?}");

    // Restarted: the slow sink now writes and drains the journal in order from its cursor;
    // the fast one receives nothing again.
    dead.add_permits(1_000_000);
    let fast_again = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(GatedSink {
            gate: Arc::new(Gate::new(100_000)),
            seen: fast_again.clone(),
        }),
        Box::new(SlowSink(GatedSink {
            gate: dead.clone(),
            seen: slow_seen.clone(),
        })),
    ];
    let mut p = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(129),
        1000,
        Some(journal_parts(dir.path(), &store, Lsn(129))),
        None,
    );
    tokio::time::timeout(Duration::from_secs(30), async {
        while slow_seen.lock().unwrap().len() < 30_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the slow sink drained the journal");
    assert_eq!(
        *slow_seen.lock().unwrap(),
        (1..=30_000).collect::<Vec<i64>>()
    );
    // New batches go on after the journal's last one, to both.
    p.send(batch(&[30_001], Some(200), vec![])).await.unwrap();
    p.drain().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while slow_seen.lock().unwrap().len() < 30_001 || fast_again.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(*fast_again.lock().unwrap(), [30_001]);
    p.close(Duration::from_secs(1)).await;
    let cursors = store.cursors().unwrap();
    assert!(cursors.contains(&("slow".into(), 31)), "{cursors:?}");
}

/// A transaction cut across batches whose commit comes in a batch without events: the
/// commit is journaled too, so the events before it survive the journal's cut at the next
/// start (which keeps only what a journaled commit closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_without_events_is_journaled_and_keeps_its_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.replace_dimension(&[], Lsn(10)).unwrap();
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(GatedSink {
            gate: Arc::new(Gate::new(100)),
            seen: Arc::default(),
        }),
        // Away: it must find the events in the journal after the restart.
        Box::new(SlowSink(GatedSink {
            gate: Arc::new(Gate::new(0)),
            seen: Arc::default(),
        })),
    ];
    let mut p = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(10),
        100,
        Some(journal_parts(dir.path(), &store, Lsn(10))),
        None,
    );
    p.send(batch(&[1, 2], None, vec![])).await.unwrap();
    p.send(batch(&[], Some(20), vec![])).await.unwrap();
    assert_eq!(p.drain().await.unwrap().checkpoint, Lsn(20));
    p.close(Duration::from_secs(1)).await;
    // The next start opens the journal at the checkpoint.
    let parts = journal_parts(dir.path(), &store, Lsn(20));
    assert_eq!(parts.writer.last_seq(), 2);
    let records = crate::journal::Reader::new(&parts.dir)
        .read(0, u64::MAX, usize::MAX)
        .unwrap();
    let ids: Vec<i64> = records
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.event_id))
        .collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(records.last().unwrap().commit_end, Some(Lsn(20)));
}

/// Events `ids` of the transaction committed at `lsn`, the first at place `first` in it.
fn tx_batch(lsn: u64, first: u32, ids: &[i64], commit: bool) -> Batch {
    let mut b = batch(ids, commit.then_some(lsn), vec![]);
    for (i, e) in b.events.iter_mut().enumerate() {
        e.source_lsn = Lsn(lsn);
        e.tx_index = first + i as u32;
    }
    b
}

fn received(store: &StateStore) -> Option<Received> {
    Some(Received {
        saved: store.received_by(&["gated", "slow"]).unwrap(),
        store: Arc::new(store.clone()),
    })
}

/// A stop inside a transaction, one sink away: at the next start the stream delivers again
/// what the checkpoint does not cover — with the journal, the transaction the journal cut
/// (its commit was not checkpointed); without it, everything the sink that was away held
/// back. A sink that had received part of it gets only the rest; the sink that was away
/// gets all of it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_stream_delivers_again_skips_what_each_sink_received() {
    read_again_after_a_stop(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_journal_what_is_delivered_again_skips_what_each_sink_received() {
    read_again_after_a_stop(false).await;
}

async fn read_again_after_a_stop(journal: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.replace_dimension(&[], Lsn(10)).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let away_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let away = Arc::new(Gate::new(0));
    let sinks = |seen: &Arc<std::sync::Mutex<Vec<i64>>>| -> Vec<Box<dyn Sink>> {
        vec![
            Box::new(GatedSink {
                gate: Arc::new(Gate::new(100)),
                seen: seen.clone(),
            }),
            Box::new(SlowSink(GatedSink {
                gate: away.clone(),
                seen: away_seen.clone(),
            })),
        ]
    };
    let mut p = Pipeline::start(
        sinks(&seen),
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(10),
        100,
        journal.then(|| journal_parts(dir.path(), &store, Lsn(10))),
        received(&store),
    );
    p.send(tx_batch(20, 0, &[1, 2], true)).await.unwrap();
    // The first three events of the transaction committed at 30, which is still being read.
    p.send(tx_batch(30, 0, &[3, 4, 5], false)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while seen.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the first sink received both batches");
    p.close(Duration::from_secs(1)).await;
    // With the journal the first transaction is durable; without it the sink away holds it.
    let checkpoint = if journal { Lsn(20) } else { Lsn(10) };
    assert_eq!(store.checkpoint().unwrap(), checkpoint);
    let at = |index| {
        Some(Position {
            lsn: Lsn(30),
            index,
        })
    };
    assert_eq!(
        store.received_by(&["gated", "slow"]).unwrap(),
        [at(2), None]
    );

    // The next start: the stream delivers again from the checkpoint; the transaction
    // committed at 30 from its start.
    away.add_permits(100);
    let again = Arc::new(std::sync::Mutex::new(Vec::new()));
    let metrics = Arc::new(Metrics::default());
    let mut p = Pipeline::start(
        sinks(&again),
        Arc::new(store.clone()),
        metrics.clone(),
        checkpoint,
        100,
        journal.then(|| journal_parts(dir.path(), &store, checkpoint)),
        received(&store),
    );
    if !journal {
        p.send(tx_batch(20, 0, &[1, 2], true)).await.unwrap();
    }
    p.send(tx_batch(30, 0, &[3, 4, 5], false)).await.unwrap();
    p.send(tx_batch(30, 3, &[6], true)).await.unwrap();
    assert_eq!(p.drain().await.unwrap().checkpoint, Lsn(30));
    tokio::time::timeout(Duration::from_secs(10), async {
        while again.lock().unwrap().is_empty() || away_seen.lock().unwrap().len() < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both sinks wrote");
    p.close(Duration::from_secs(1)).await;
    assert_eq!(*again.lock().unwrap(), [6]);
    assert_eq!(*away_seen.lock().unwrap(), [1, 2, 3, 4, 5, 6]);
    let skipped = if journal { 3 } else { 5 };
    assert_eq!(
        metrics.counters.events_received_before_skipped.get(),
        skipped
    );
    assert_eq!(
        store.received_by(&["gated", "slow"]).unwrap(),
        [at(3), at(3)]
    );
}

/// A sink that records the size of each write, and fills its writes (up to `limit` events,
/// waiting `fill` for more) while catching up; with a gate, each write waits for a permit.
struct FillingSink {
    writes: Arc<std::sync::Mutex<Vec<usize>>>,
    limit: usize,
    fill: Duration,
    gate: Option<Arc<Gate>>,
}

impl Sink for FillingSink {
    fn name(&self) -> &'static str {
        "filling"
    }
    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            self.writes.lock().unwrap().push(events.len());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            Ok(Delivery::default())
        })
    }
    fn fill_wait(&self) -> Duration {
        self.fill
    }
    fn write_limit(&self, _max_batch_rows: usize) -> usize {
        self.limit
    }
}

/// Events `ids` committed `age` ago (at LSN `commit`).
fn aged(ids: &[i64], commit: u64, age: Duration) -> Batch {
    let mut b = batch(ids, Some(commit), vec![]);
    let at = crate::enrich::now_us() - age.as_micros() as i64;
    for e in &mut b.events {
        e.commit_us = at;
    }
    b.last_commit_us = Some(at);
    b
}

/// Two events committed `age` ago (at LSN `commit`).
fn aged_batch(first_id: i64, commit: u64, age: Duration) -> Batch {
    aged(&[first_id, first_id + 1], commit, age)
}

/// A pipeline (batches of 100 rows, checkpoint at LSN 10) with one [`FillingSink`] without a
/// gate; returns its state directory, store and the sink's write sizes beside it.
fn filling_pipeline(
    limit: usize,
    fill: Duration,
) -> (
    tempfile::TempDir,
    StateStore,
    Arc<std::sync::Mutex<Vec<usize>>>,
    Pipeline,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.replace_dimension(&[], Lsn(10)).unwrap();
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(FillingSink {
        writes: writes.clone(),
        limit,
        fill,
        gate: None,
    })];
    let p = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(10),
        100,
        None,
        None,
    );
    (dir, store, writes, p)
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_fills_its_writes_waits_for_more_only_while_catching_up() {
    let (_dir, store, writes, mut p) = filling_pipeline(7, Duration::from_millis(250));
    let mut progress = p.progress();
    let (old, fresh) = (Duration::from_secs(30), Duration::ZERO);
    let gap = Duration::from_millis(40);
    // A catch-up: batches 40 ms apart are gathered up to the write limit (7 events: the
    // batch that reaches it is taken whole), then the rest within the wait.
    for (i, commit) in [20, 30, 40, 50, 60].into_iter().enumerate() {
        p.send(aged_batch(1 + 2 * i as i64, commit, old))
            .await
            .unwrap();
        tokio::time::sleep(gap).await;
    }
    progress.wait_for(|p| p.done_seq == 5).await.unwrap();
    assert_eq!(*writes.lock().unwrap(), vec![8, 2]);
    // Fresh events: each batch is written as it comes, none held for the next.
    for (i, commit) in [70, 80, 90].into_iter().enumerate() {
        p.send(aged_batch(100 + 2 * i as i64, commit, fresh))
            .await
            .unwrap();
        tokio::time::sleep(gap).await;
    }
    progress.wait_for(|p| p.done_seq == 8).await.unwrap();
    assert_eq!(*writes.lock().unwrap(), vec![8, 2, 2, 2, 2]);
    assert_eq!(store.checkpoint().unwrap(), Lsn(90));
    p.close(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn the_budget_holds_the_largest_write_and_half_the_usual_budget_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.replace_dimension(&[], Lsn(10)).unwrap();
    let gate = Arc::new(Gate::new(0));
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Batches of 1000 events; the usual budget is 8 of them, this sink writes up to 12.
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(FillingSink {
        writes: writes.clone(),
        limit: 12_000,
        fill: Duration::from_secs(10),
        gate: Some(gate.clone()),
    })];
    let mut p = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        Arc::new(Metrics::default()),
        Lsn(10),
        1000,
        None,
        None,
    );
    let mut progress = p.progress();
    let thousand = |k: i64| {
        let ids: Vec<i64> = (k * 1000 + 1..=k * 1000 + 1000).collect();
        aged(&ids, 20 + k as u64, Duration::from_secs(30))
    };
    // A catch-up: the sink fills one write with 12 batches (past the usual budget of 8).
    for k in 0..12 {
        tokio::time::timeout(Duration::from_secs(5), p.send(thousand(k)))
            .await
            .expect("room in the budget for the write")
            .unwrap();
    }
    let first_write = || writes.lock().unwrap().first().copied();
    while first_write().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first_write(), Some(12_000));
    // While it is out, the source reads 4 batches more (half the usual budget), and then
    // waits: the budget is spent until the write is acknowledged.
    for k in 12..16 {
        tokio::time::timeout(Duration::from_secs(5), p.send(thousand(k)))
            .await
            .expect("room beside the write")
            .unwrap();
    }
    let blocked = tokio::time::timeout(Duration::from_secs(5), p.send(thousand(16))).await;
    assert!(blocked.is_err(), "the budget is 16,000 events, all held");
    // The write is acknowledged: everything else goes through.
    gate.add_permits(100);
    p.send(thousand(16)).await.unwrap();
    progress.wait_for(|p| p.done_seq == 17).await.unwrap();
    assert_eq!(writes.lock().unwrap().iter().sum::<usize>(), 17_000);
    assert_eq!(store.checkpoint().unwrap(), Lsn(36));
    p.close(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_catch_ups_last_write_goes_once_the_source_has_caught_up() {
    // A sink that would wait an hour to fill its write while catching up.
    let (_dir, store, writes, mut p) = filling_pipeline(1000, Duration::from_secs(3600));
    let mut progress = p.progress();
    let old = Duration::from_secs(30);
    // Twice: the second time shows that the first round's mark went with the next batch
    // (had it stayed, the write would have gone with that batch alone).
    for round in 0..2 {
        let start = tokio::time::Instant::now();
        p.send(aged_batch(1 + 4 * round, 20 + 20 * round as u64, old))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        p.send(aged_batch(3 + 4 * round, 30 + 20 * round as u64, old))
            .await
            .unwrap();
        // The end of the backlog: the source says it has read all there was.
        tokio::time::sleep(Duration::from_millis(40)).await;
        p.caught_up();
        let done = 2 * (round as u64 + 1);
        progress.wait_for(|p| p.done_seq == done).await.unwrap();
        assert_eq!(writes.lock().unwrap().last(), Some(&4), "round {round}");
        // Paused time moves only when every task waits: an hour's fill would show here
        // (what shows besides the 80 ms above is the tracker's own pace).
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
    }
    assert_eq!(*writes.lock().unwrap(), vec![4, 4]);
    assert_eq!(store.checkpoint().unwrap(), Lsn(50));
    p.close(Duration::from_secs(5)).await;
}

/// Each transaction's events recorded at once give the histogram a per-event record gives:
/// transactions of 1 to 3,000 events, cut at a write's start (a skip or a batch boundary),
/// two in a row with the same commit time, backfilled events with none.
#[test]
fn the_latency_of_a_write_is_each_event_s_own() {
    let now = 10_000_000_000i64;
    let mut all = Vec::new();
    let mut x = 11u64;
    let mut id = 0;
    let mut lsn = 0x1000u64;
    for t in 0..400u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = [1, 2, 3, 7, 64, 1000, 3000][(x % 7) as usize];
        // A write that begins inside a transaction: its first events are not there.
        let from = if t == 0 { 17 } else { 0 };
        lsn += 0x100;
        // Every fifth transaction commits at the same µs as the one before.
        let commit = if t % 5 == 4 {
            now - 1_000 * (t as i64 - 1)
        } else {
            now - 1_000 * t as i64
        };
        for index in from..size {
            id += 1;
            let mut e = event(id);
            e.source_lsn = Lsn(lsn);
            e.tx_index = index as u32;
            e.commit_us = commit;
            all.push(e);
        }
        if t % 50 == 0 {
            for _ in 0..3 {
                id += 1;
                let mut e = event(id);
                e.source_lsn = Lsn(0);
                e.tx_index = 0;
                e.commit_us = 0;
                all.push(e);
            }
        }
    }
    let events: Vec<&EnrichedEvent> = all.iter().collect();
    let (runs, each) = (Histogram::default(), Histogram::default());
    record_latency_at(&runs, &events, now);
    for e in &events {
        if e.commit_us > 0 {
            each.record_us((now - e.commit_us) as u64, 1);
        }
    }
    assert_eq!(runs.count(), each.count());
    assert_eq!(runs.counts(), each.counts());
    assert_eq!(runs.summary(), each.summary());
    assert!(runs.count() > 100_000, "{}", runs.count());
}
