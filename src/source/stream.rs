//! One replication session: read events from the replication connection (`wire`), decode
//! pgoutput, keep transactions and the dimension in commit order, enrich, and cut batches
//! for the pipeline.
//!
//! About 400 lines, kept in one file on purpose: the session is one state machine (open
//! transaction, relations, the batch being cut, keepalives), and splitting it would spread
//! one loop's invariants over several files.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::enrich::{enrich, DimChange, Dimension, EnrichedEvent};
use crate::ops::metrics::Metrics;
use crate::pipeline::{Batch, Pipeline};
use crate::source::pgoutput::{Message, Value, INLINE_COLUMNS};
use crate::source::rows::{
    content_key, decode_content, decode_event, Fields, RelKind, RelationError, Relations, UnfitLog,
    Zone,
};
use crate::source::schema::EventLayout;
use crate::source::wire::{Event, Session, WireError};
use crate::types::Lsn;

/// Microseconds between 1970-01-01 and 2000-01-01 (Postgres's epoch).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A batch also closes at this many bytes of event text, so 1 MB strings cannot make a
/// 10,000-event batch take gigabytes.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// How long a stop waits for the transaction being read to commit when part of it already
/// went to the sinks (a transaction larger than a batch, or one a pause in the stream cut):
/// past its commit the checkpoint covers it, and the next start does not make Postgres
/// decode it again. (Without the commit nothing reaches a sink twice either: each skips
/// what its saved position covers.) `run` gives the sinks' drain what is left of its 30 s.
pub const FINISH_LIMIT: Duration = Duration::from_secs(5);

/// How long an open batch waits for more after its first event when nothing more is
/// waiting (at most `pipeline.max_batch_delay_ms`): every batch costs the journal, the
/// checkpoint and each sink a write, so thousands of single-row transactions a second go
/// out a few at a time for 2 ms more latency.
const GATHER: Duration = Duration::from_millis(2);

/// Past GATHER, a batch of a busy stream goes out once the stream has been quiet this long
/// (tokio's timer rounds it up to its next millisecond).
const QUIET: Duration = Duration::from_micros(200);

/// While a busy batch waits QUIET for more, or a busy stream is read, the runtime's thread,
/// when it has nothing else to run, sleeps this long before it waits on its sockets
/// ([`nap_before_park`]). The longer it reads nothing, the larger the walsender's TCP
/// segments and the less it spends per event: napping 1.5 ms, a catch-up ran at
/// 211,084–237,447 events/s (walsender 3.75–4.01 µs per event) in six runs, against
/// 186,787–210,916 (3.84–5.06) at 0.5 ms in four, and 205,481–237,449 at 2.5 ms
/// (docs/benchmarks.md, "How long to nap"). A sink's reply that comes meanwhile waits as
/// long.
const NAP: Duration = Duration::from_micros(1500);

/// The nap when the replication connection is a Unix socket. There the walsender's writes
/// do not coalesce into segments: each is a buffer queued for the reader, and about a
/// millisecond of them fills the socket's send buffer, so during a 1.5 ms nap the walsender
/// waits for room. Over the socket a catch-up ran at 133,375 and 142,549 events/s napping
/// NAP, 177,374 and 183,528 not napping, and 173,464–195,210 (four runs) napping 300 µs,
/// with the engine cheapest at 300 µs (docs/benchmarks.md, "The nap over a Unix socket").
const SOCKET_NAP: Duration = Duration::from_micros(300);

/// The nap of the current session's transport, in microseconds ([`nap_for_transport`]).
static NAP_US: AtomicU64 = AtomicU64::new(NAP.as_micros() as u64);

/// Set before a replication session connects: NAP over TCP, SOCKET_NAP over a Unix socket.
pub fn nap_for_transport(unix_socket: bool) {
    let nap = if unix_socket { SOCKET_NAP } else { NAP };
    NAP_US.store(nap.as_micros() as u64, Ordering::Relaxed);
}

/// How long [`nap_before_park`] sleeps for the current session's transport.
fn nap_length() -> Duration {
    Duration::from_micros(NAP_US.load(Ordering::Relaxed))
}

/// How many [`NapWanted`] live: a busy batch waiting for more messages, a session reading
/// a busy stream ([`Streaming`]).
static NAP_WANTED: AtomicUsize = AtomicUsize::new(0);

/// The runtime naps before it parks while one of these lives: counted out however it ends,
/// a dropped future included.
struct NapWanted;

impl NapWanted {
    fn set() -> NapWanted {
        NAP_WANTED.fetch_add(1, Ordering::Relaxed);
        NapWanted
    }
}

impl Drop for NapWanted {
    fn drop(&mut self) {
        NAP_WANTED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `run`'s runtime calls this when it is about to wait on its sockets and timers (tokio's
/// `on_thread_park`): nothing is left to run. In a catch-up the engine reads faster than
/// the walsender writes, and waiting on the socket it was woken every 14–27 events —
/// wake-ups that cost the walsender (Postgres's own CPU) more than they cost the engine
/// (docs/benchmarks.md, "Woken less often"). While a busy batch waits for more, the thread
/// sleeps NAP first (SOCKET_NAP over a Unix socket), so the walsender's writes queue in
/// the socket and are read together; when anything else is runnable (a sink's reply), the
/// runtime runs it and does not nap.
/// The same while a session reads a busy stream ([`Streaming`]), whatever it waits on: the
/// walsender, room in the pipeline, the gather's deadline.
pub fn nap_before_park() {
    if NAP_WANTED.load(Ordering::Relaxed) > 0 {
        std::thread::sleep(nap_length());
    }
}

/// A batch that gathered this many events within GATHER comes from a busy stream: it waits
/// QUIET for more when the stream pauses.
const BUSY_EVENTS: usize = 64;

/// Whether a session reads a busy stream: from a batch of BUSY_EVENTS or more going out
/// until a smaller one does, or the walsender says it has sent all the WAL there is. Held,
/// the runtime naps before it parks. Without it, a catch-up's engine waited (mostly woken
/// by the walsender's writes) 3.0–14.3 times per 1,000 events and spent 1.73–1.99 µs per
/// event in four runs; with it (and a 0.5 ms nap), 0.7–2.9 waits and 1.43–1.70 µs
/// (docs/benchmarks.md, "Napping through a catch-up"). A steady stream of small
/// transactions (17 events a batch at 5,000 a second) never holds it. While a sink is down
/// mid-stream it stays held: status requests and a shutdown wait up to a nap more.
#[derive(Default)]
struct Streaming(Option<NapWanted>);

impl Streaming {
    fn batch_out(&mut self, events: usize) {
        if events >= BUSY_EVENTS {
            self.0.get_or_insert_with(NapWanted::set);
        } else {
            self.0 = None;
        }
    }

    fn caught_up(&mut self) {
        self.0 = None;
    }
}

/// While messages are waiting, an open batch reads the clock for its delay once every this
/// many (a vDSO call per message was 0.7–1.6 % of a catch-up's samples): a batch closes at
/// most this many messages past `pipeline.max_batch_delay`, microseconds in a catch-up.
const CLOCK_EVERY: u32 = 16;

/// A Relation message named a column type created after the type catalog was read.
#[derive(Debug)]
struct NewType(u32);

impl std::fmt::Display for NewType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a source column has type oid {}, created after the engine read the type catalog; reading the catalog again",
            self.0
        )
    }
}

impl std::error::Error for NewType {}

/// START_REPLICATION was refused because another process streams the slot.
#[derive(Debug)]
pub struct SlotInUse(pub String);

impl std::fmt::Display for SlotInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the replication slot is in use: {}", self.0)
    }
}

impl std::error::Error for SlotInUse {}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was requested; everything read was handed to the pipeline.
    Shutdown,
    /// The connection was lost (server restart, network): reconnect from the checkpoint.
    Lost(anyhow::Error),
    /// Something that a reconnect cannot fix: stop with this error, checkpoint held.
    Fatal(anyhow::Error),
}

/// The source's state that outlives a session.
pub struct Source {
    pub relations: Relations,
    /// The zone of a `timestamp without time zone` event time.
    pub zone: Zone,
    /// Values delivered as NULL because they did not fit: logged at most every 10 s.
    pub unfit_log: UnfitLog,
    pub dimension: Dimension,
    pub metrics: Arc<Metrics>,
    pub max_batch_rows: usize,
    pub max_batch_delay: Duration,
    /// When the session saw the stop asked for (`run` bounds the drain after it by that).
    pub stop_seen: Option<Instant>,
    /// The transaction a lost connection cut after some of its events were handed to the
    /// pipeline (a large one, spread over several batches): its commit LSN and how many of
    /// its inserts went. The next session reads it again from its start and skips those,
    /// which the sinks already have (the pipeline was drained before the reconnect).
    pub cut: Option<(Lsn, u32)>,
}

struct Tx {
    commit_lsn: Lsn,
    /// µs since 1970.
    commit_us: i64,
    /// A transaction at or below the checkpoint, already durable: read for its Relation
    /// messages only.
    replayed: bool,
    dim_changes: Vec<DimChange>,
    /// Inserts into the events table seen so far (skipped rows included, so an event's
    /// index depends only on the WAL).
    inserts: u32,
    /// Inserts whose events the pipeline has (in this session or, for a transaction a lost
    /// connection cut, in the one before): read again, they are skipped.
    handed: u32,
    /// Where its events start in the batch being built.
    in_batch: usize,
}

impl Tx {
    /// Its events read so far are in a batch the pipeline took.
    fn handed_over(&mut self) {
        self.handed = self.handed.max(self.inserts);
        self.in_batch = 0;
    }

    /// Part of it is with the sinks, and the checkpoint (before it) does not cover that.
    fn part_gone(tx: &Option<Tx>) -> bool {
        tx.as_ref().is_some_and(|t| !t.replayed && t.handed > 0)
    }
}

/// Resolves at the deadline of a stop that waits for a commit; never while none waits.
async fn finish_deadline(finishing: Option<tokio::time::Instant>) {
    match finishing {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// At a stop, only whole transactions go: the rows of the one being read leave the batch,
/// and the next start reads it again from its start (the checkpoint is before it).
fn keep_whole_transactions(b: &mut Builder, tx: &Option<Tx>) {
    if let Some(t) = tx.as_ref().filter(|t| !t.replayed) {
        b.batch.events.truncate(t.in_batch);
    }
}

/// The stop was asked for inside a transaction part of which went to the sinks: read on to
/// its commit, until the returned deadline.
fn finish_first(shutdown: &mut watch::Receiver<bool>, tx: &Option<Tx>) -> tokio::time::Instant {
    // Seen: `changed` no longer wakes the session for this stop.
    shutdown.borrow_and_update();
    if let Some(t) = tx {
        tracing::info!(
            "stop requested inside the transaction committed at {}, {} of whose rows went to the sinks: reading on to its commit (at most {} s) so that nothing of it is read again",
            t.commit_lsn,
            t.handed,
            FINISH_LIMIT.as_secs()
        );
    }
    tokio::time::Instant::now() + FINISH_LIMIT
}

struct Builder {
    batch: Batch,
    bytes: usize,
    started: Option<Instant>,
    max_rows: usize,
    /// Events of the last busy batch taken: room for as many is reserved at once when a
    /// busy batch finds no spare vector, rather than grown to it by doubling (each step a
    /// copy of every event so far: 2 % of the engine's samples in a catch-up).
    last_busy: usize,
    /// Events added since the count was last passed on to `events_streamed` (each batch
    /// taken, and when the builder goes): one atomic add a batch rather than one an event.
    streamed: u64,
    streamed_counter: Option<Counter>,
}

impl Drop for Builder {
    fn drop(&mut self) {
        self.pass_on_count();
    }
}

impl Builder {
    fn new(max_rows: usize) -> Self {
        Builder {
            batch: Batch::default(),
            bytes: 0,
            started: None,
            max_rows,
            last_busy: 0,
            streamed: 0,
            streamed_counter: None,
        }
    }

    /// The events added are counted in `counter`.
    fn counting(mut self, counter: Counter) -> Self {
        self.streamed_counter = Some(counter);
        self
    }

    fn pass_on_count(&mut self) {
        if let Some(counter) = &self.streamed_counter {
            counter.inc_by(std::mem::take(&mut self.streamed));
        }
    }

    /// Add an event read from the stream (counted in `events_streamed`).
    fn push(&mut self, event: EnrichedEvent) {
        self.streamed += 1;
        let events = &mut self.batch.events;
        if events.len() == events.capacity() && events.len() >= BUSY_EVENTS {
            // A busy stream: a finished batch's vector, if one is spare, else room for
            // twice as many up to a full batch (not past it, as doubling would).
            match crate::pipeline::take_spare(events.len()) {
                Some(mut spare) => {
                    spare.append(events);
                    *events = spare;
                }
                None => {
                    let len = events.len();
                    let room = (len * 2).max(self.last_busy).min(self.max_rows);
                    events.reserve_exact(room.max(len + 1) - len);
                }
            }
        }
        events.push(event);
    }

    fn take(&mut self) -> Batch {
        self.pass_on_count();
        self.bytes = 0;
        self.started = None;
        let mut batch = std::mem::take(&mut self.batch);
        let (len, capacity) = (batch.events.len(), batch.events.capacity());
        if len < BUSY_EVENTS {
            // A quiet stream's batch: the spares go back to the allocator.
            crate::pipeline::shed_spares();
            self.last_busy = 0;
        } else {
            self.last_busy = len;
        }
        // A batch is held until every sink has it: not with much more room than it uses
        // (a large block shrinks in place, without a copy).
        if len < capacity / 4 * 3 {
            batch.events.shrink_to_fit();
        }
        batch
    }
}

impl Source {
    /// Run one session until shutdown, a lost connection or a fatal error. `checkpoint` is
    /// where it started: transactions whose commit lies before it are skipped.
    pub async fn session(
        &mut self,
        client: &mut Session,
        pipeline: &mut Pipeline,
        checkpoint: Lsn,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let mut tx: Option<Tx> = None;
        let end = self
            .read(client, pipeline, checkpoint, shutdown, &mut tx)
            .await;
        // A transaction cut in the middle: what of it the pipeline took is not sent again
        // (the engine reconnects only after a lost connection).
        let cut = tx.filter(|t| !t.replayed && t.handed > 0);
        match (cut, &end) {
            (Some(t), SessionEnd::Lost(_)) => {
                tracing::info!(
                    "the connection was lost inside the transaction committed at {}, after {} of its rows were handed to the sinks; the next session skips those",
                    t.commit_lsn,
                    t.handed
                );
                self.cut = Some((t.commit_lsn, t.handed));
            }
            (Some(t), SessionEnd::Shutdown) => tracing::warn!(
                "stopped inside the transaction committed at {}, {} of whose rows went to the sinks: the next start reads it again from its start, and each sink skips the rows it received",
                t.commit_lsn,
                t.handed
            ),
            _ => {}
        }
        end
    }

    /// The session's loop; `tx` is the transaction being read when it returns.
    async fn read(
        &mut self,
        client: &mut Session,
        pipeline: &mut Pipeline,
        checkpoint: Lsn,
        shutdown: &mut watch::Receiver<bool>,
        tx: &mut Option<Tx>,
    ) -> SessionEnd {
        let mut progress = pipeline.progress();
        // Commit-to-read latency of each transaction: what Postgres and the transport add.
        let read_latency = self.metrics.commit_to_read.clone();
        // A transaction read more than 50 ms after its commit, logged at its first message.
        let mut late = None;
        let mut b = Builder::new(self.max_batch_rows)
            .counting(self.metrics.counters.events_streamed.clone());
        // A keepalive came after the last transaction while the batch still held it: the
        // source has caught up with the server once that batch is sent.
        let mut caught_up_after_batch = false;
        // Messages taken since the clock was last read for the batch's delay.
        let mut unclocked = CLOCK_EVERY;
        let mut streaming = Streaming::default();
        let mut gather_timer = crate::source::timer::Timer::new();
        // A stop waiting for the transaction being read to commit: until when.
        let mut finishing: Option<tokio::time::Instant> = None;
        loop {
            if progress.has_changed().unwrap_or(false) {
                let lsn = progress.borrow_and_update().checkpoint;
                client.update_applied_lsn(lsn);
            }
            if *shutdown.borrow() {
                self.stop_seen.get_or_insert_with(Instant::now);
                let part_gone = Tx::part_gone(tx);
                match finishing {
                    None if part_gone => finishing = Some(finish_first(shutdown, tx)),
                    Some(until) if part_gone && tokio::time::Instant::now() < until => {}
                    _ => {
                        keep_whole_transactions(&mut b, tx);
                        let batch = b.take();
                        if let Err(end) = send(pipeline, batch, shutdown, tx, &mut finishing).await
                        {
                            return end;
                        }
                        return SessionEnd::Shutdown;
                    }
                }
            }
            // With something in the batch, take what is already waiting, or arrives within
            // GATHER of the batch's first event; then the batch goes out (an isolated insert
            // is held back at most GATHER, and a stream of small transactions makes one
            // batch per GATHER instead of one each).
            let next = if !b.batch.is_empty() {
                // The clock is read for the delay after a wait, and otherwise once every
                // CLOCK_EVERY messages (a catch-up reads hundreds of thousands a second).
                let due = unclocked >= CLOCK_EVERY;
                unclocked = if due { 0 } else { unclocked + 1 };
                let full = b.batch.events.len() >= self.max_batch_rows
                    || b.bytes >= MAX_BATCH_BYTES
                    || (due
                        && b.started
                            .is_some_and(|t| t.elapsed() >= self.max_batch_delay));
                let ready = if full {
                    None
                } else {
                    // What is waiting is taken, even past the deadline. Before it, sleep to
                    // the deadline and take what came meanwhile at once (rather than being
                    // woken for each message of each small transaction); after it, the
                    // batch goes out when nothing is waiting, or, once it holds
                    // BUSY_EVENTS, when nothing comes for QUIET (a busy stream that is
                    // slower than this loop for an instant, as in a catch-up, keeps filling
                    // it).
                    let gather = self.max_batch_delay.min(GATHER);
                    let until = b.started.unwrap_or_else(Instant::now) + gather;
                    match client.buffered() {
                        Ok(true) => Some(Ok(())),
                        Err(e) => Some(Err(e)),
                        _ if Instant::now() < until => {
                            gather_timer.sleep_until(until).await;
                            unclocked = CLOCK_EVERY;
                            continue;
                        }
                        // A few events: a quiet stream. What reached the socket while the
                        // batch slept to its deadline goes with it; then out it goes.
                        _ if b.batch.events.len() < BUSY_EVENTS => match client.ready_now() {
                            Ok(false) => None,
                            Ok(true) => Some(Ok(())),
                            Err(e) => Some(Err(e)),
                        },
                        _ => {
                            unclocked = CLOCK_EVERY;
                            let _nap = NapWanted::set();
                            tokio::time::timeout(QUIET, client.wait()).await.ok()
                        }
                    }
                };
                match ready {
                    // A message is there: taken at once.
                    Some(Ok(())) => client.next().await,
                    Some(Err(e)) => Err(e),
                    None => {
                        streaming.batch_out(b.batch.events.len());
                        if let Err(end) =
                            send(pipeline, b.take(), shutdown, tx, &mut finishing).await
                        {
                            return end;
                        }
                        if std::mem::take(&mut caught_up_after_batch) {
                            streaming.caught_up();
                            pipeline.caught_up();
                        }
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    r = client.next() => r,
                    // The stop is handled at the top of the loop.
                    changed = shutdown.changed() => {
                        if changed.is_err() {
                            return SessionEnd::Shutdown;
                        }
                        continue;
                    }
                    _ = finish_deadline(finishing) => continue,
                    changed = progress.changed() => {
                        if changed.is_ok() {
                            let lsn = progress.borrow_and_update().checkpoint;
                            client.update_applied_lsn(lsn);
                        }
                        continue;
                    }
                    e = pipeline.failure() => return SessionEnd::Fatal(e),
                }
            };
            let event = match next {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return SessionEnd::Lost(anyhow::anyhow!("the replication stream ended"))
                }
                Err(e) => {
                    if let Err(end) = send(pipeline, b.take(), shutdown, tx, &mut finishing).await {
                        return end;
                    }
                    return classify(e);
                }
            };
            match event {
                Event::Begin {
                    final_lsn,
                    commit_time_micros,
                } => {
                    let commit_us = commit_time_micros + PG_EPOCH_OFFSET_US;
                    let now = crate::enrich::now_us();
                    let waited = now.saturating_sub(commit_us).max(0) as u64;
                    read_latency.record_us(waited, 1);
                    // Said with the send time of its first message (below): whether
                    // Postgres sent it late or the engine read it late.
                    late = (waited > 50_000).then_some((final_lsn, commit_us, waited));
                    let commit_lsn = final_lsn;
                    caught_up_after_batch = false;
                    let mut handed = 0;
                    if let Some((cut, n)) = self.cut {
                        if cut == commit_lsn {
                            handed = n;
                        }
                        if cut <= commit_lsn {
                            self.cut = None;
                        }
                    }
                    *tx = Some(Tx {
                        commit_lsn,
                        commit_us: commit_time_micros + PG_EPOCH_OFFSET_US,
                        replayed: commit_lsn < checkpoint,
                        dim_changes: Vec::new(),
                        inserts: 0,
                        handed,
                        in_batch: b.batch.events.len(),
                    });
                }
                Event::Commit {
                    end_lsn,
                    commit_time_micros,
                } => {
                    let Some(t) = tx.take() else {
                        return SessionEnd::Fatal(anyhow::anyhow!(
                            "replication protocol: Commit without Begin"
                        ));
                    };
                    if t.replayed {
                        self.metrics.counters.transactions_replayed_skipped.inc();
                        continue;
                    }
                    self.metrics.counters.transactions.inc();
                    b.batch.commit_end = Some(end_lsn);
                    b.batch.last_commit_us = Some(commit_time_micros + PG_EPOCH_OFFSET_US);
                    b.batch.dim_changes.extend(t.dim_changes);
                    b.started.get_or_insert_with(Instant::now);
                }
                Event::Change {
                    data,
                    server_time_micros,
                } => {
                    if let Some((lsn, commit_us, waited)) = late.take() {
                        let sent = server_time_micros + PG_EPOCH_OFFSET_US - commit_us;
                        tracing::debug!(
                            "transaction {lsn} read {} ms after its commit (Postgres sent it {} ms after its commit)",
                            waited / 1000,
                            sent.max(0) / 1000
                        );
                    }
                    if let Err(e) = self.apply(data, tx.as_mut(), &mut b) {
                        // A type newer than the catalog: read again from the checkpoint
                        // once the catalog is (see `Relations::pending_type`).
                        if let Some(t) = e.downcast_ref::<NewType>() {
                            return SessionEnd::Lost(anyhow::anyhow!("{t}"));
                        }
                        return SessionEnd::Fatal(e);
                    }
                }
                Event::KeepAlive { wal_end } => {
                    self.metrics
                        .server_wal_end
                        .store(wal_end.0, Ordering::Relaxed);
                    // The walsender sends one when it has sent all the WAL there is (and
                    // waits for more): what the source holds is all there is for now.
                    if tx.is_none() && !b.batch.is_empty() {
                        caught_up_after_batch = true;
                    }
                    // Nothing in flight: confirm the server's position, so an idle database
                    // (or one with writes to other tables only) does not retain WAL.
                    if tx.is_none() && b.batch.is_empty() {
                        streaming.caught_up();
                        pipeline.caught_up();
                        crate::pipeline::shed_spares();
                        if let Err(e) = confirm_when_idle(pipeline, wal_end) {
                            return SessionEnd::Fatal(e);
                        }
                    }
                }
                // A heartbeat (or any message outside a transaction): the same, at its
                // position.
                Event::Message {
                    transactional: false,
                    lsn,
                } => {
                    if tx.is_none() && b.batch.is_empty() {
                        if let Err(e) = confirm_when_idle(pipeline, lsn) {
                            return SessionEnd::Fatal(e);
                        }
                    }
                }
                Event::Message { .. } => {}
            }
        }
    }

    /// An insert into the events table: decoded, enriched and added to the open batch.
    fn event(
        &mut self,
        new: &(impl Fields + ?Sized),
        pos: &EventLayout,
        tx: &mut Tx,
        b: &mut Builder,
    ) {
        match decode_event(new, pos, &self.zone) {
            Ok(_) if tx.inserts < tx.handed => {
                // Read again after a lost connection; the sinks have it.
                tx.inserts += 1;
                self.metrics.counters.events_reread_skipped.inc();
            }
            Ok((raw, unfit)) => {
                let tx_index = tx.inserts;
                tx.inserts += 1;
                if let Some(why) = unfit {
                    self.metrics.counters.invalid_values.inc();
                    self.unfit_log.note(
                        &format!("event {}: {why}", raw.id),
                        format_args!("transaction committed at {}", tx.commit_lsn),
                    );
                }
                let content = self.dimension.get(raw.content_id);
                let (mut event, notes) = enrich(raw, content, tx.commit_lsn);
                event.commit_us = tx.commit_us;
                event.tx_index = tx_index;
                if notes.unknown_content {
                    self.metrics.counters.events_unknown_content.inc();
                }
                if notes.invalid_duration {
                    self.metrics.counters.events_negative_duration.inc();
                }
                b.bytes +=
                    128 + event.event_type.len() + event.device.as_ref().map_or(0, |d| d.len());
                b.push(event);
                b.started.get_or_insert_with(Instant::now);
            }
            Err(why) => {
                tx.inserts += 1;
                self.metrics.counters.events_invalid.inc();
                tracing::warn!(
                    "skipped an event row in the transaction committed at {}: {why}",
                    tx.commit_lsn
                );
            }
        }
    }

    /// One pgoutput change inside a transaction.
    fn apply(
        &mut self,
        data: &[u8],
        mut tx: Option<&mut Tx>,
        b: &mut Builder,
    ) -> anyhow::Result<()> {
        // The hot path, an insert into the events table: its tuple read onto the stack.
        // An insert into another table (rare: the content dimension) is read again below.
        let mut values = [Value::Null; INLINE_COLUMNS];
        if let Some((relation, n)) = Message::parse_insert(data, &mut values)? {
            let Some(tx) = tx.as_deref_mut() else {
                return Ok(());
            };
            if tx.replayed {
                return Ok(());
            }
            if let Some(RelKind::Events(pos)) = self.relations.get(relation) {
                let pos = *pos;
                self.event(&values[..n], &pos, tx, b);
                return Ok(());
            }
        }
        let msg = Message::parse(data)?;
        if let Message::Relation(rel) = &msg {
            return match self.relations.update(rel) {
                Ok(_) => Ok(()),
                Err(RelationError::UnknownType(oid)) => Err(anyhow::Error::new(NewType(oid))),
                Err(RelationError::Refused(e)) => Err(anyhow::anyhow!(
                    "{e}; the engine stopped with its checkpoint held. If the field is in another column, map it in the configuration and start again; otherwise restore the column and run `engagement-cdc setup --resync` (the slot cannot decode past this change), then the backfill it prints"
                )),
            };
        }
        let Some(tx) = tx else {
            // Changes only come inside transactions; Type/Origin/Message may not.
            return Ok(());
        };
        if tx.replayed {
            return Ok(());
        }
        let kind = |relations: &Relations, id: u32| -> anyhow::Result<RelKind> {
            relations.get(id).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "replication protocol: change for relation {id} before its Relation message"
                )
            })
        };
        match msg {
            Message::Insert { relation, new } => match kind(&self.relations, relation)? {
                RelKind::Events(pos) => {
                    self.event(&new, &pos, tx, b);
                }
                RelKind::Content(pos) => {
                    let id =
                        content_key(&new, &pos).map_err(|e| anyhow::anyhow!("content row: {e}"))?;
                    let row = decode_content(&new, &pos, self.dimension.get(id).as_ref())
                        .map_err(|e| anyhow::anyhow!("content row {id}: {e}"))?;
                    let row = self.fitted(row, tx.commit_lsn);
                    self.change(tx, DimChange::Upsert(row));
                }
                RelKind::Other(_) => {
                    self.metrics.counters.other_changes_ignored.inc();
                }
            },
            Message::Update {
                relation, old, new, ..
            } => match kind(&self.relations, relation)? {
                RelKind::Content(pos) => {
                    let id =
                        content_key(&new, &pos).map_err(|e| anyhow::anyhow!("content row: {e}"))?;
                    if let Some(old) = old {
                        if let Ok(old_id) = content_key(&old, &pos) {
                            if old_id != id {
                                let previous = self.dimension.get(old_id);
                                self.change(tx, DimChange::Delete(old_id));
                                let row = decode_content(&new, &pos, previous.as_ref())
                                    .map_err(|e| anyhow::anyhow!("content row {id}: {e}"))?;
                                let row = self.fitted(row, tx.commit_lsn);
                                self.change(tx, DimChange::Upsert(row));
                                return Ok(());
                            }
                        }
                    }
                    let row = decode_content(&new, &pos, self.dimension.get(id).as_ref())
                        .map_err(|e| anyhow::anyhow!("content row {id}: {e}"))?;
                    let row = self.fitted(row, tx.commit_lsn);
                    self.change(tx, DimChange::Upsert(row));
                }
                RelKind::Events(_) => {
                    self.metrics.counters.event_changes_ignored.inc();
                }
                RelKind::Other(_) => {
                    self.metrics.counters.other_changes_ignored.inc();
                }
            },
            Message::Delete { relation, old } => match kind(&self.relations, relation)? {
                RelKind::Content(pos) => {
                    let id = content_key(&old, &pos)
                        .map_err(|e| anyhow::anyhow!("content delete: {e}"))?;
                    self.change(tx, DimChange::Delete(id));
                }
                RelKind::Events(_) => {
                    self.metrics.counters.event_changes_ignored.inc();
                }
                RelKind::Other(_) => {
                    self.metrics.counters.other_changes_ignored.inc();
                }
            },
            Message::Truncate { relations, .. } => {
                for id in relations {
                    match self.relations.get(id).cloned() {
                        Some(RelKind::Content(_)) => self.change(tx, DimChange::Truncate),
                        Some(RelKind::Events(_)) => {
                            self.metrics.counters.event_changes_ignored.inc();
                        }
                        _ => {
                            self.metrics.counters.other_changes_ignored.inc();
                        }
                    }
                }
            }
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Relation(_)
            | Message::Type { .. }
            | Message::Origin { .. }
            | Message::LogicalMessage { .. } => {}
        }
        Ok(())
    }

    /// A decoded content row; a value that did not fit is counted and logged.
    fn fitted(
        &mut self,
        (row, unfit): (crate::enrich::ContentRow, Option<String>),
        lsn: Lsn,
    ) -> crate::enrich::ContentRow {
        if let Some(why) = unfit {
            self.metrics.counters.invalid_values.inc();
            self.unfit_log.note(
                &format!("content row {}: {why}", row.content_id),
                format_args!("transaction committed at {lsn}"),
            );
        }
        row
    }

    /// Apply a dimension change now (later events of this transaction see it) and keep it
    /// for the checkpoint of the transaction's commit.
    fn change(&mut self, tx: &mut Tx, change: DimChange) {
        self.dimension.apply(&change);
        self.metrics.counters.content_changes.inc();
        tx.dim_changes.push(change);
    }
}

/// Hand a batch to the pipeline, waiting for room in the in-flight budget (`tx`, the
/// transaction being read, notes that its events so far went); an error is how the session
/// ends. A stop asked for while it waits ends the session at once (a batch not handed over
/// is read again at the next start), unless part of the transaction being read went
/// already: then it waits on until `finishing`, as the session reads on to the commit.
async fn send(
    pipeline: &mut Pipeline,
    batch: Batch,
    shutdown: &mut watch::Receiver<bool>,
    tx: &mut Option<Tx>,
    finishing: &mut Option<tokio::time::Instant>,
) -> Result<(), SessionEnd> {
    let sent = if finishing.is_none() && *shutdown.borrow() {
        // Stopping: hand it over only if there is room right away.
        match pipeline.send(batch).now_or_never() {
            Some(Err(e)) => return Err(SessionEnd::Fatal(e)),
            Some(Ok(())) => true,
            None => false,
        }
    } else {
        let sending = pipeline.send(batch);
        tokio::pin!(sending);
        loop {
            tokio::select! {
                sent = &mut sending => { sent.map_err(SessionEnd::Fatal)?; break true }
                _ = finish_deadline(*finishing) => {
                    return Err(SessionEnd::Shutdown)
                }
                changed = shutdown.changed() => {
                    if changed.is_ok() && finishing.is_none() && Tx::part_gone(tx) {
                        *finishing = Some(finish_first(shutdown, tx));
                    } else {
                        return Err(SessionEnd::Shutdown);
                    }
                }
            }
        }
    };
    if let Some(t) = tx.as_mut().filter(|_| sent) {
        t.handed_over();
    }
    Ok(())
}

/// Which replication errors a reconnect may fix.
pub fn classify(e: WireError) -> SessionEnd {
    use WireError as E;
    let text = e.to_string();
    match &e {
        E::Io(_) => SessionEnd::Lost(anyhow::anyhow!("replication connection lost: {text}")),
        E::Server { message: m, .. }
            if m.contains("does not exist") && m.contains("replication slot") =>
        {
            SessionEnd::Fatal(anyhow::anyhow!(
                "the replication slot is missing ({m}); run `engagement-cdc setup` to create it, then `engagement-cdc backfill` over the time since the last commit that `engagement-cdc status` shows"
            ))
        }
        E::Server { message: m, .. } if m.contains("publication") && m.contains("does not exist") => {
            SessionEnd::Fatal(anyhow::anyhow!(
                "Postgres cannot decode the slot's next change: {m} (the publication was dropped while the engine ran, or created after the slot); the checkpoint is held; run `engagement-cdc setup --resync` (re-creates the publication and moves the slot to now), then the backfill it prints"
            ))
        }
        E::Server { message: m, .. } if m.contains("is active for PID") => {
            SessionEnd::Lost(anyhow::Error::new(SlotInUse(m.clone())))
        }
        E::Server { message: m, .. }
            if m.contains("can no longer get changes") || m.contains("invalidated") =>
        {
            SessionEnd::Fatal(anyhow::anyhow!(
                "the replication slot is invalidated ({m}); drop it, run `engagement-cdc setup`, then `engagement-cdc backfill` over the time since the last commit that `engagement-cdc status` shows"
            ))
        }
        E::Auth(m) => SessionEnd::Fatal(anyhow::anyhow!(
            "Postgres rejected the replication login: {m}; fix [postgres] url"
        )),
        E::Protocol(_) => SessionEnd::Fatal(anyhow::anyhow!("replication protocol error: {text}")),
        E::Server { .. } | E::Tls(_) => {
            SessionEnd::Lost(anyhow::anyhow!("replication stream failed: {text}"))
        }
    }
}

/// Let the checkpoint move to `lsn` when the pipeline holds nothing unconfirmed: a position
/// between transactions (a keepalive's, a heartbeat message's) that nothing read waits on.
fn confirm_when_idle(pipeline: &mut Pipeline, lsn: Lsn) -> anyhow::Result<()> {
    if !pipeline.in_flight() && lsn > pipeline.progress().borrow().checkpoint {
        pipeline.mark(lsn)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tests::event;

    fn open_tx(in_batch: usize) -> Tx {
        Tx {
            commit_lsn: Lsn(0x2000),
            commit_us: 0,
            replayed: false,
            dim_changes: Vec::new(),
            inserts: 0,
            handed: 0,
            in_batch,
        }
    }

    #[test]
    fn events_are_counted_as_streamed_by_the_batch_and_none_is_lost_when_the_builder_goes() {
        let counter = Counter::default();
        let mut b = Builder::new(100).counting(counter.clone());
        for id in 1..=3 {
            b.push(event(id));
        }
        assert_eq!(counter.get(), 0, "passed on with the batch, not one by one");
        b.take();
        assert_eq!(counter.get(), 3);
        b.push(event(4));
        b.push(event(5));
        // A session that ends with a batch open (a lost connection) still counts it.
        drop(b);
        assert_eq!(counter.get(), 5);
    }

    #[test]
    fn a_stop_hands_over_whole_transactions_only() {
        let mut b = Builder::new(100);
        // One committed transaction of three events, then two of an open one.
        for id in 1..=3 {
            b.push(event(id));
        }
        b.batch.commit_end = Some(Lsn(0x1000));
        let mut tx = Some(open_tx(b.batch.events.len()));
        for id in 4..=5 {
            b.push(event(id));
            tx.as_mut().unwrap().inserts += 1;
        }
        keep_whole_transactions(&mut b, &tx);
        let ids: Vec<i64> = b.batch.events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(b.batch.commit_end, Some(Lsn(0x1000)));
        assert!(!Tx::part_gone(&tx), "nothing of the open one went");
        // A batch with part of it goes out; what is read of it after that stays behind too.
        b.push(event(4));
        b.push(event(5));
        b.take();
        tx.as_mut().unwrap().handed_over();
        assert!(Tx::part_gone(&tx), "two of its rows went");
        assert_eq!(tx.as_ref().unwrap().handed, 2);
        b.push(event(6));
        tx.as_mut().unwrap().inserts += 1;
        keep_whole_transactions(&mut b, &tx);
        assert!(b.batch.events.is_empty());
        // Between transactions the batch goes as it is.
        b.push(event(7));
        keep_whole_transactions(&mut b, &None);
        assert_eq!(b.batch.events.len(), 1);
    }

    #[test]
    fn the_nap_is_asked_for_only_while_a_busy_batch_waits_or_a_busy_stream_is_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(NAP_WANTED.load(Ordering::Relaxed) == 0);
            let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
            let wait = tokio::spawn(async move {
                let _nap = NapWanted::set();
                let _ = rx.await;
            });
            // The spawned wait runs to its await before this task runs again.
            tokio::task::yield_now().await;
            assert!(NAP_WANTED.load(Ordering::Relaxed) > 0);
            // While it waits, the park hook sleeps NAP.
            let t = Instant::now();
            nap_before_park();
            assert!(t.elapsed() >= NAP, "the hook napped {:?}", t.elapsed());
            // Over a Unix socket, the shorter nap (this test alone changes the transport).
            nap_for_transport(true);
            assert_eq!(nap_length(), SOCKET_NAP);
            let t = Instant::now();
            nap_before_park();
            assert!(
                t.elapsed() >= SOCKET_NAP,
                "the hook napped {:?}",
                t.elapsed()
            );
            nap_for_transport(false);
            assert_eq!(nap_length(), NAP);
            // Dropped mid-wait (a shutdown): the runtime no longer naps.
            wait.abort();
            assert!(wait.await.unwrap_err().is_cancelled());
            assert!(NAP_WANTED.load(Ordering::Relaxed) == 0);
        });

        // A busy stream (in this test, as the two share the count): from a busy batch
        // going out until a quiet one does, or the server's caught-up keepalive, or the
        // session's end.
        let wanted = || NAP_WANTED.load(Ordering::Relaxed);
        let mut s = Streaming::default();
        s.batch_out(BUSY_EVENTS - 1);
        assert_eq!(wanted(), 0, "a quiet batch does not make a busy stream");
        s.batch_out(BUSY_EVENTS);
        s.batch_out(10_000);
        assert_eq!(wanted(), 1, "busy batches in a row ask once");
        {
            let _also = NapWanted::set();
            s.batch_out(1);
            assert_eq!(wanted(), 1, "a waiting busy batch still asks");
        }
        assert_eq!(wanted(), 0);
        s.batch_out(BUSY_EVENTS);
        s.caught_up();
        assert_eq!(wanted(), 0, "caught up");
        s.batch_out(BUSY_EVENTS);
        drop(s);
        assert_eq!(wanted(), 0, "the session ended");
    }

    /// A sink that notes how many events each write carried.
    struct WriteSizes(Arc<std::sync::Mutex<Vec<usize>>>);

    impl crate::sinks::Sink for WriteSizes {
        fn name(&self) -> &'static str {
            "sizes"
        }
        fn deliver<'a>(
            &'a mut self,
            events: &'a [&'a EnrichedEvent],
        ) -> crate::sinks::BoxFuture<'a, Result<crate::sinks::Delivery, crate::sinks::SinkError>>
        {
            self.0.lock().unwrap().push(events.len());
            Box::pin(async { Ok(crate::sinks::Delivery::default()) })
        }
    }

    /// One replication message as the walsender frames it: CopyData of XLogData.
    fn xlog(m: &Message<'_>) -> Vec<u8> {
        let data = crate::source::pgoutput::encode::message(m);
        let mut out = vec![b'd'];
        out.extend_from_slice(&(4 + 25 + data.len() as u32).to_be_bytes());
        out.push(b'w');
        out.extend_from_slice(&[0; 24]);
        out.extend_from_slice(&data);
        out
    }

    /// One single-row transaction of the events table, committed now (µs since 1970).
    fn one_row_transaction(id: i64) -> (Vec<u8>, i64) {
        use crate::source::pgoutput::{Tuple, Value};
        let lsn = 0x1000 * id as u64;
        let now = crate::enrich::now_us() - PG_EPOCH_OFFSET_US;
        let text = id.to_string();
        let mut out = xlog(&Message::Begin {
            final_lsn: lsn,
            commit_time_us: now,
            xid: id as u32,
        });
        out.extend(xlog(&Message::Insert {
            relation: 16385,
            new: Tuple(vec![
                Value::Text(text.as_bytes()),
                Value::Text(b"1"),
                Value::Text(b"7"),
                Value::Text(b"play"),
                Value::Text(b"2026-12-06 07:00:00+00"),
                Value::Text(b"1000"),
                Value::Null,
                Value::Null,
            ]),
        }));
        out.extend(xlog(&Message::Commit {
            flags: 0,
            commit_lsn: lsn,
            end_lsn: lsn + 0x100,
            commit_time_us: now,
        }));
        (out, now + PG_EPOCH_OFFSET_US)
    }

    /// A small transaction that reaches the socket while a quiet batch sleeps to its
    /// deadline goes out with that batch, not in a batch of its own a gather later (which
    /// made every event of a steady stream wait up to two gathers: the one it arrived in,
    /// unread, and its own).
    #[tokio::test]
    async fn a_transaction_that_arrives_while_a_quiet_batch_gathers_goes_out_with_it() {
        use crate::config::QualifiedTable;
        use crate::source::schema::{ContentColumns, EventColumns, TypeCatalog};
        use std::io::Write;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut session = Session::over_tcp(tcp);
        let metrics = Arc::new(Metrics::default());
        let mut source = Source {
            relations: Relations::new(
                QualifiedTable::parse("t", "public.engagement_events").unwrap(),
                QualifiedTable::parse("t", "public.content").unwrap(),
                &EventColumns::default(),
                &ContentColumns::default(),
                TypeCatalog::default(),
            ),
            zone: Zone::utc(),
            unfit_log: Default::default(),
            dimension: Dimension::default(),
            metrics: metrics.clone(),
            max_batch_rows: 1000,
            max_batch_delay: Duration::from_millis(20),
            stop_seen: None,
            cut: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(dir.path()).unwrap();
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut pipeline = Pipeline::start(
            vec![Box::new(WriteSizes(sizes.clone()))],
            Arc::new(store),
            metrics.clone(),
            Lsn(0),
            1000,
            None,
            None,
        );
        let (stop, mut stopped) = watch::channel(false);
        let relation = crate::source::pgoutput::encode::events_relation();
        // The server, a task beside the source on this one thread: a transaction; once the
        // source has read it (its batch then sleeps to its deadline, as nothing else can run
        // meanwhile), the next at once; then what the sink got. When the first was read is
        // its commit time plus the commit-to-read sample the source took. A try whose second
        // transaction reached the socket GATHER / 2 or later after that (the thread held up
        // for that long by the machine) says nothing, and another is made.
        let server = tokio::spawn(async move {
            server
                .write_all(&xlog(&Message::Relation(relation)))
                .unwrap();
            let read = &metrics.commit_to_read;
            let mut tries = Vec::new();
            for pair in 0..50 {
                let before = sizes.lock().unwrap().len();
                let (count, sum) = (read.count(), read.sum_us());
                let (first, committed) = one_row_transaction(2 * pair + 1);
                server.write_all(&first).unwrap();
                let written = std::time::Instant::now();
                while read.count() == count {
                    assert!(written.elapsed() < Duration::from_secs(10), "not read");
                    tokio::task::yield_now().await;
                }
                let read_at = committed + (read.sum_us() - sum) as i64;
                server
                    .write_all(&one_row_transaction(2 * pair + 2).0)
                    .unwrap();
                let late = crate::enrich::now_us() - read_at;
                while sizes.lock().unwrap()[before..].iter().sum::<usize>() < 2 {
                    assert!(written.elapsed() < Duration::from_secs(10), "not written");
                    tokio::task::yield_now().await;
                }
                if late < GATHER.as_micros() as i64 / 2 {
                    tries.push(sizes.lock().unwrap()[before..].to_vec());
                    if tries.len() == 3 {
                        break;
                    }
                }
            }
            stop.send(true).unwrap();
            // The connection stays open until the session has stopped.
            (tries, server)
        });
        let mut tx = None;
        let end = source
            .read(&mut session, &mut pipeline, Lsn(0), &mut stopped, &mut tx)
            .await;
        assert!(matches!(end, SessionEnd::Shutdown), "{end:?}");
        let (tries, _server) = server.await.unwrap();
        assert!(
            !tries.is_empty(),
            "the machine was never quick enough to try"
        );
        for writes in tries {
            assert_eq!(writes, [2], "both transactions in one write");
        }
    }

    #[test]
    fn busy_batches_reuse_the_vectors_of_finished_ones_and_hold_no_more_room_than_they_need() {
        let max = 3000;
        let mut b = Builder::new(max);
        // Spares another batch left (no other test makes batches this large).
        while crate::pipeline::take_spare(0).is_some() {}
        for i in 0..max as i64 {
            b.push(event(i));
        }
        let full = b.take();
        // Grown to a full batch exactly, not doubled past it.
        assert_eq!((full.events.len(), full.events.capacity()), (max, max));
        // While that one is held (no spare), the next busy batch reserves as much room at
        // once as the last busy batch used.
        for i in 0..BUSY_EVENTS as i64 + 1 {
            b.push(event(i));
        }
        assert_eq!(b.batch.events.capacity(), max);
        drop(b.take());
        while crate::pipeline::take_spare(0).is_some() {}
        for i in 0..max as i64 {
            b.push(event(i));
        }
        let full = b.take();
        let at = full.events.as_ptr();
        drop(full);
        // The next busy batch takes that vector as soon as it outgrows its own.
        for i in 0..BUSY_EVENTS as i64 + 1 {
            b.push(event(i));
        }
        assert_eq!(b.batch.events.as_ptr(), at);
        assert_eq!(b.batch.events.len(), BUSY_EVENTS + 1);
        // A batch that closes using less than three quarters of its room gives the rest back.
        for i in 0..1500 {
            b.push(event(i));
        }
        let part = b.take();
        assert_eq!(part.events.capacity(), part.events.len());
        drop(part);
        // A quiet stream's batch gives the spares back to the allocator.
        b.push(event(1));
        drop(b.take());
        assert!(crate::pipeline::take_spare(0).is_none());
    }
}
