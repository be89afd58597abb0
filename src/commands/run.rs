//! `engagement-cdc run`: preflight checks, the sinks, the pipeline, and replication
//! sessions with reconnects, until a shutdown signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::journal;
use crate::ops::metrics::Metrics;
use crate::ops::server::{self, AbortOnDrop, EngineState};
use crate::pipeline::{JournalParts, Pipeline, Received};
use crate::sinks::{self, SinkKind};
use crate::source::pg;
use crate::source::rows::Relations;
use crate::source::session_config;
use crate::source::stream::{classify, SessionEnd, SlotInUse, Source};
use crate::source::wire::{Connection, Session};
use crate::state::dlq::Dlq;
use crate::state::{Identity, StateStore};
use crate::types::Lsn;

/// How long a graceful shutdown waits for the sinks to make in-flight batches durable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the slot may stay in use by another process before `run` gives up.
const SLOT_BUSY_LIMIT: Duration = Duration::from_secs(60);
/// The longest a shutdown may take: the drain, the final confirmation, and a margin.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(45);

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `run --stdout`: the stdout sink on, whatever the configuration says.
    pub stdout: bool,
}

pub async fn run(
    config: &Config,
    opts: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let pgc = &config.postgres;
    let mut kinds = SinkKind::enabled(&config.sinks());
    if opts.stdout && !kinds.contains(&SinkKind::Stdout) {
        kinds.push(SinkKind::Stdout);
    }
    if kinds.is_empty() {
        bail!(crate::error::UsageError::new(
            "no sink is enabled; add a [clickhouse], [redis], [http] or [stdout] section (or pass --stdout)"
        ));
    }
    // Before any thread starts: every thread the engine starts later inherits it.
    match lower_priority(config.pipeline.nice) {
        Ok(Some((from, to))) => tracing::info!(
            "scheduling priority lowered from nice {from} to {to} (pipeline.nice): processes of normal priority on this host, Postgres first, run before the engine"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            "cannot lower the scheduling priority to nice {} (pipeline.nice): {e}; the engine runs at its starting priority",
            config.pipeline.nice
        ),
    }
    let store = StateStore::open(&config.state.dir)?;
    let Some(identity) = store.identity()? else {
        bail!(
            "state directory {} has no record of a setup; run `engagement-cdc setup` first",
            config.state.dir.display()
        );
    };
    let expected = Identity {
        slot: pgc.slot.clone(),
        ..identity.clone()
    };
    if identity != expected {
        bail!(
            "state directory {} belongs to {identity}, but the configuration names slot {:?}; use the state directory of that slot, or run setup for it with another [state] dir",
            config.state.dir.display(),
            pgc.slot
        );
    }

    // Preflight on an ordinary connection: server, tables, slot.
    let client = pg::connect(pgc).await?;
    let facts = pg::server_facts(&client).await?;
    pg::check_server(&facts)?;
    let tables = pg::check_source_tables(&client, pgc).await?;
    if facts.database != identity.database {
        bail!(
            "state directory {} belongs to {identity}, not to database {:?}; use another [state] dir",
            config.state.dir.display(),
            facts.database
        );
    }
    let checkpoint = store.checkpoint()?;
    match pg::slot_info(&client, &pgc.slot).await? {
        None => bail!(
            "replication slot {:?} does not exist; changes since the checkpoint {checkpoint} may be missing: run `engagement-cdc setup` to create it, then `engagement-cdc backfill` from the last commit time that `engagement-cdc status` shows",
            pgc.slot
        ),
        Some(info) => {
            pg::check_slot(&pgc.slot, &info, &facts.database)?;
            if let Some(confirmed) = info.confirmed_flush_lsn.as_deref().and_then(|l| l.parse::<Lsn>().ok()) {
                if confirmed > checkpoint && checkpoint != Lsn(0) {
                    tracing::warn!(
                        "slot {:?} was confirmed up to {confirmed} by another consumer, beyond this engine's checkpoint {checkpoint}; changes in between cannot be read again: backfill that time if events are missing",
                        pgc.slot
                    );
                }
            }
        }
    }
    let binary = pgc.binary && pg::binary_values_possible(&client, &pgc.publication).await?;
    drop(client);

    let metrics = Arc::new(Metrics::default());
    let sinks = sinks::build(&config.sinks(), &kinds, Some(&store), &metrics).await?;
    metrics
        .checkpoint_lsn
        .store(checkpoint.0, Ordering::Relaxed);
    if let Some(t) = store.last_commit_us()? {
        metrics.last_commit_us.store(t, Ordering::Relaxed);
    }
    let state = Arc::new(EngineState {
        metrics: metrics.clone(),
        streaming: AtomicBool::new(false),
        slot: pgc.slot.clone(),
        dlq: Some(Dlq::open(&store)?),
        not_streaming_reason: std::sync::Mutex::new(Some("connecting to Postgres".into())),
        slot_health: Default::default(),
        history: Default::default(),
        last_counts: Default::default(),
    });
    let _slot_watch = AbortOnDrop(tokio::spawn(watch_slot(
        config.postgres.clone(),
        state.clone(),
    )));
    let _heartbeat = (pgc.heartbeat_interval_ms > 0).then(|| {
        AbortOnDrop(tokio::spawn(heartbeat(
            config.postgres.clone(),
            Duration::from_millis(pgc.heartbeat_interval_ms),
        )))
    });
    let _server = server::spawn(
        config.server.listen,
        state.clone(),
        config.server.auth_token()?,
    )
    .await?;

    let dimension = store.load_dimension()?;
    tracing::info!(
        "starting at checkpoint {checkpoint} with {} content rows, column values in {}; sinks: {}",
        dimension.len(),
        if binary { "binary" } else { "text" },
        sinks
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let journal = open_journal(config, &store, checkpoint, &sinks)?;
    let names: Vec<&str> = sinks.iter().map(|s| s.name()).collect();
    let received = Received {
        saved: store.received_by(&names)?,
        store: Arc::new(store.clone()),
    };
    let mut pipeline = Pipeline::start(
        sinks,
        Arc::new(store.clone()),
        metrics.clone(),
        checkpoint,
        config.pipeline.max_batch_rows,
        journal,
        Some(received),
    );
    let mut source = Source {
        relations: Relations::new(
            pgc.events_table.clone(),
            pgc.content_table.clone(),
            &pgc.event_columns,
            &pgc.content_columns,
            tables.catalog,
        ),
        zone: pgc.zone()?,
        unfit_log: Default::default(),
        dimension,
        metrics: metrics.clone(),
        max_batch_rows: config.pipeline.max_batch_rows,
        max_batch_delay: Duration::from_millis(config.pipeline.max_batch_delay_ms),
        cut: None,
        stop_seen: None,
    };

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut slot_busy_since: Option<Instant> = None;
    let result: anyhow::Result<()> = loop {
        let start = pipeline.progress().borrow().checkpoint;
        let rc = session_config(pgc, binary, start)?;
        let mut client = match open_session(rc, &identity).await {
            Ok(c) => c,
            Err(SessionEnd::Fatal(e)) => break Err(e),
            Err(SessionEnd::Lost(_)) if *shutdown.borrow() => break Ok(()),
            Err(SessionEnd::Lost(e)) => {
                state.set_streaming(false, Some(format!("{e:#}")));
                let delay = backoff.next_delay();
                // Another process streams the slot: a killed engine's walsender lets go
                // within seconds, another engine never does. Said once, then an exit.
                if let Some(busy) = e.downcast_ref::<SlotInUse>() {
                    let since = *slot_busy_since.get_or_insert_with(|| {
                        tracing::warn!(
                            "{busy}; waiting up to {} s for it to be released (a stopped engine's session ends within seconds)",
                            SLOT_BUSY_LIMIT.as_secs()
                        );
                        Instant::now()
                    });
                    if since.elapsed() >= SLOT_BUSY_LIMIT {
                        break Err(anyhow!(
                            "replication slot {:?} stayed in use by another process for {} s ({}): another engine streams it; stop that engine, or give this one its own [postgres] slot (and state directory) with `engagement-cdc setup`",
                            pgc.slot,
                            SLOT_BUSY_LIMIT.as_secs(),
                            busy.0
                        ));
                    }
                } else {
                    tracing::warn!("{:#}; retrying in {delay:?}", e);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.changed() => break Ok(()),
                }
            }
            Err(SessionEnd::Shutdown) => break Ok(()),
        };
        slot_busy_since = None;
        let session_started = Instant::now();
        metrics.counters.replication_sessions.inc();
        state.set_streaming(true, None);
        tracing::info!("streaming slot {:?} from {start}", pgc.slot);
        let end = source
            .session(&mut client, &mut pipeline, start, &mut shutdown)
            .await;
        state.set_streaming(false, Some(session_end_reason(&end)));
        match end {
            SessionEnd::Shutdown => {
                // The sinks get what is left of DRAIN_TIMEOUT after the source finished the
                // transaction it was reading (at most FINISH_LIMIT).
                let waited = source.stop_seen.map_or(Duration::ZERO, |t| t.elapsed());
                let drain_for = DRAIN_TIMEOUT.saturating_sub(waited);
                let done = tokio::time::timeout(drain_for, pipeline.drain()).await;
                match done {
                    Ok(Ok(p)) => {
                        confirm_and_stop(client, p.checkpoint, pgc.status_interval_ms).await;
                        tracing::info!("stopped at checkpoint {}", p.checkpoint);
                        break Ok(());
                    }
                    Ok(Err(e)) => break Err(e),
                    Err(_) => {
                        let cp = pipeline.progress().borrow().checkpoint;
                        confirm_and_stop(client, cp, pgc.status_interval_ms).await;
                        tracing::warn!(
                            "a sink did not finish within {drain_for:?}; stopping at checkpoint {cp}; the rest is read again at the next start"
                        );
                        break Ok(());
                    }
                }
            }
            SessionEnd::Fatal(e) => {
                drop(client);
                break Err(e);
            }
            SessionEnd::Lost(e) => {
                drop(client);
                tracing::warn!("{e:#}; draining in-flight batches, then reconnecting");
                // Resume exactly at the checkpoint: everything read is made durable first,
                // and the dimension is reloaded as of that checkpoint (a transaction cut by
                // the disconnect may have changed it in memory).
                tokio::select! {
                    drained = pipeline.drain() => { if let Err(e) = drained { break Err(e); } }
                    _ = shutdown.changed() => break Ok(()),
                }
                source.dimension = store.load_dimension()?;
                if let Some(oid) = source.relations.pending_type() {
                    match reload_catalog(pgc).await {
                        Ok(catalog) => source.relations.set_catalog(catalog),
                        Err(e) => tracing::warn!(
                            "cannot read the type catalog again for type oid {oid}: {e:#}; retrying"
                        ),
                    }
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => break Ok(()),
                }
            }
        }
        // A session that ended at once (an error the server repeats) keeps backing off.
        if pipeline.progress().borrow().checkpoint > start
            || session_started.elapsed() >= Duration::from_secs(30)
        {
            backoff.reset();
        }
    };
    pipeline.close(Duration::from_secs(5)).await;
    result
}

/// The journal and each sink's cursor in it; `None` when `journal.max_bytes = 0`, which
/// is refused while the journal still holds batches an enabled sink has not received.
fn open_journal(
    config: &Config,
    store: &StateStore,
    checkpoint: Lsn,
    sinks: &[Box<dyn crate::sinks::Sink>],
) -> anyhow::Result<Option<JournalParts>> {
    let dir = journal::dir(&config.state.dir);
    let saved = store.cursors()?;
    let names: Vec<&str> = sinks.iter().map(|s| s.name()).collect();
    if !config.journal.enabled() {
        let summary = journal::scan(&dir, 0)?;
        if summary.segments > 0 {
            let cursors = journal::start_cursors(&summary, &saved, &names);
            for (name, cursor) in names.iter().zip(cursors) {
                if cursor < summary.last_seq {
                    bail!(crate::error::UsageError::new(format!(
                        "journal.max_bytes = 0, but the journal in {} holds batches the {name} sink has not received ({} after its cursor {cursor}); run with the journal on until `engagement-cdc status` shows it caught up, then turn it off",
                        dir.display(),
                        summary.last_seq - cursor
                    )));
                }
            }
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove the journal {}", dir.display()))?;
            store.clear_cursors()?;
            tracing::info!(
                "journal off: removed {} (every sink had received it)",
                dir.display()
            );
        }
        return Ok(None);
    }
    let writer = journal::Writer::open(&dir, &config.journal, checkpoint)?;
    let summary = writer.summary();
    let last = summary.last_seq;
    let cursors = journal::start_cursors(&summary, &saved, &names);
    // A sink without a saved cursor is new and starts at the end. Save every such start now,
    // before anything is delivered: a crash before the tracker's first save must not make
    // a sink that received part of the journal look new (it would skip the rest).
    let missing: Vec<(&str, u64)> = names
        .iter()
        .zip(&cursors)
        .filter(|(n, _)| !saved.iter().any(|(s, _)| s == *n))
        .map(|(n, c)| (*n, *c))
        .collect();
    if !missing.is_empty() {
        store.set_cursors_durably(&missing)?;
    }
    tracing::info!(
        "journal: {} bytes in {} segments (batches {}..={last}, budget {} bytes, retain {})",
        summary.bytes,
        summary.segments,
        summary.first_seq.unwrap_or(last + 1),
        summary.max_bytes,
        config.journal.retain
    );
    Ok(Some(JournalParts {
        writer,
        dir,
        cursors,
        cursor_store: Arc::new(store.clone()),
    }))
}

/// The type catalog, read again on its own connection (every step of which is bounded).
async fn reload_catalog(
    pgc: &crate::config::PostgresConfig,
) -> anyhow::Result<crate::source::schema::TypeCatalog> {
    pg::type_catalog(&pg::connect(pgc).await?).await
}

/// Connect, check the server's identity, start streaming.
async fn open_session(
    rc: crate::source::wire::Config,
    identity: &Identity,
) -> Result<Session, SessionEnd> {
    // Each step has a limit: a server that accepts and then stops answering is a lost
    // session (retried with backoff), not a hang.
    let limit = pg::QUERY_TIMEOUT;
    crate::source::stream::nap_for_transport(rc.is_unix_socket());
    let mut conn = pg::within(
        limit,
        "the replication connection's startup",
        Connection::open(rc),
    )
    .await
    .map_err(SessionEnd::Lost)?
    .map_err(classify)?;
    let system = pg::within(limit, "IDENTIFY_SYSTEM", conn.identify_system())
        .await
        .map_err(SessionEnd::Lost)?
        .map_err(classify)?;
    if system.system_id != identity.system_id {
        return Err(SessionEnd::Fatal(anyhow!(
            "this Postgres has system identifier {}, but the state directory belongs to {identity}; point [postgres] url at that server, or use another [state] dir",
            system.system_id
        )));
    }
    pg::within(limit, "START_REPLICATION", conn.start())
        .await
        .map_err(SessionEnd::Lost)?
        .map_err(classify)
}

/// Report the final checkpoint to Postgres and end the session: the standby status update
/// carrying it is sent at once, and the stream ended (both bounded).
async fn confirm_and_stop(client: Session, checkpoint: Lsn, status_interval_ms: u64) {
    let limit = Duration::from_millis(status_interval_ms + 2000);
    if !client.confirm(checkpoint, limit).await {
        tracing::warn!("the final position {checkpoint} may not have reached Postgres; it is confirmed at the next start");
    }
    // A server that stopped answering never acknowledges the end of the stream.
    match tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("replication session ended: {e}"),
        Err(_) => {
            tracing::warn!("Postgres did not acknowledge the end of the replication stream within 5 s; closing it");
        }
    }
}

/// Resolve when SIGINT or SIGTERM arrives.
pub fn shutdown_signal() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight batches");
        let _ = tx.send(true);
        // Shutdown always completes: a second signal, or a shutdown still running after
        // SHUTDOWN_DEADLINE (a server that stopped answering), ends the process at once.
        // That is as safe as kill -9: what was not confirmed is read again at the next start.
        tokio::select! {
            _ = term.recv() => tracing::warn!("second signal: exiting now; the checkpoint is the last one confirmed"),
            _ = int.recv() => tracing::warn!("second signal: exiting now; the checkpoint is the last one confirmed"),
            _ = tokio::time::sleep(SHUTDOWN_DEADLINE) => tracing::warn!(
                "shutdown did not finish within {} s; exiting now; the checkpoint is the last one confirmed",
                SHUTDOWN_DEADLINE.as_secs()
            ),
        }
        std::process::exit(1);
    });
    Ok(rx)
}

/// Make the calling thread at least `nice` (0–19; 0 does nothing): never raises its
/// priority. On Linux the niceness is the thread's, and threads it starts inherit it, so
/// called before the engine starts any thread it covers them all. `Some((from, to))` when
/// it changed.
fn lower_priority(nice: i32) -> std::io::Result<Option<(i32, i32)>> {
    let current = current_nice();
    if nice <= 0 || current >= nice {
        return Ok(None);
    }
    // SAFETY: setpriority has no memory effects; who = 0 is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((current, nice)))
}

/// The calling thread's niceness. getpriority cannot fail for the caller itself (its -1
/// would be a niceness of -1, below any that [`lower_priority`] sets).
fn current_nice() -> i32 {
    // SAFETY: getpriority has no memory effects; who = 0 is the calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Why a session ended, for `/status` while the next one is not yet streaming.
fn session_end_reason(end: &SessionEnd) -> String {
    match end {
        SessionEnd::Shutdown => "shutting down".into(),
        SessionEnd::Lost(e) => format!("replication connection lost: {e:#}; reconnecting"),
        SessionEnd::Fatal(e) => format!("stopped: {e:#}"),
    }
}

/// Every `interval`, write a non-transactional logical message into the WAL of the
/// engine's database (`pg_logical_emit_message`): the stream receives it, and when nothing
/// is in flight the engine confirms its position, so an idle slot advances even while only
/// other databases write. A role without the right to emit messages is told once; the
/// keepalives still move the slot, more slowly.
async fn heartbeat(pg: crate::config::PostgresConfig, interval: Duration) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let result: anyhow::Result<()> = async {
            let client = pg::connect(&pg).await?;
            loop {
                pg::within(
                    pg::QUERY_TIMEOUT,
                    "the heartbeat message",
                    client.execute(
                        "SELECT pg_logical_emit_message(false, 'engagement-cdc', 'heartbeat')",
                        &[],
                    ),
                )
                .await??;
                backoff.reset();
                tokio::time::sleep(interval).await;
            }
        }
        .await;
        if let Err(e) = result {
            let text = format!("{e:#}");
            if text.contains("permission denied") {
                tracing::warn!(
                    "cannot write heartbeat messages: {text}; grant EXECUTE on pg_logical_emit_message(boolean, text, text) to the engine's role, or set postgres.heartbeat_interval_ms = 0"
                );
                return;
            }
            tracing::debug!("heartbeat: {text}; retrying");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Every 10 s, read the slot (lag, retained WAL, `wal_status`) for `/status`, `/metrics`
/// and the dashboard, on a connection of its own, reconnecting with backoff when it drops.
async fn watch_slot(pg: crate::config::PostgresConfig, state: Arc<EngineState>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        if let Err(e) = read_slot(&pg, &state, &mut backoff).await {
            tracing::debug!("cannot read the slot's health: {e:#}");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Read the slot every 10 s until the connection fails.
async fn read_slot(
    pg: &crate::config::PostgresConfig,
    state: &EngineState,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let client = pg::connect(pg).await?;
    loop {
        let slot = pg::slot_info(&client, &pg.slot).await?;
        backoff.reset();
        let gauges = &state.metrics.slot;
        let value = match &slot {
            Some(s) => {
                gauges.lag_bytes.set(s.lag_bytes.unwrap_or(0));
                gauges
                    .retained_wal_bytes
                    .set(s.retained_wal_bytes.unwrap_or(0));
                gauges
                    .safe_wal_size_bytes
                    .set(s.safe_wal_size.unwrap_or(-1));
                let at_risk = matches!(s.wal_status.as_deref(), Some("unreserved" | "lost"));
                // Logged once, when it turns.
                if gauges.wal_ok.set(i64::from(!at_risk)) == 1 && at_risk {
                    tracing::warn!(
                        slot = pg.slot,
                        "slot {:?} has wal_status {}: it retains {} bytes, more than max_slot_wal_keep_size allows; it will be invalidated unless the engine catches up (docs/operations.md, \"Slot lag and WAL retention\")",
                        pg.slot,
                        s.wal_status.as_deref().unwrap_or("?"),
                        s.retained_wal_bytes.unwrap_or(0)
                    );
                }
                serde_json::to_value(s)?
            }
            None => serde_json::Value::Null,
        };
        *state.slot_health.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::json!({
            "read_at": crate::enrich::rfc3339_us(crate::enrich::now_us()),
            "exists": slot.is_some(),
            "slot": value,
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{current_nice, lower_priority};

    #[test]
    fn the_priority_is_only_ever_lowered() {
        // On a thread of its own: the niceness is the thread's, the test runner's other
        // threads keep theirs.
        std::thread::spawn(|| {
            let start = current_nice();
            assert_eq!(lower_priority(0).unwrap(), None);
            if start >= 19 {
                assert_eq!(lower_priority(19).unwrap(), None);
                return;
            }
            assert_eq!(lower_priority(start + 1).unwrap(), Some((start, start + 1)));
            assert_eq!(current_nice(), start + 1);
            // Asked for less than it has: left as it is, not raised.
            assert_eq!(lower_priority(start.max(1)).unwrap(), None);
            assert_eq!(current_nice(), start + 1);
            // A thread started now inherits it.
            let inherited = std::thread::spawn(current_nice).join().unwrap();
            assert_eq!(inherited, start + 1);
        })
        .join()
        .unwrap();
    }
}
