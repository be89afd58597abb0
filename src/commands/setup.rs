//! `engagement-cdc setup` (docs/operations.md, "Setup"): check Postgres, create the publication and the slot
//! when missing, copy the `content` dimension, apply the ClickHouse migration, record the
//! identity. Running it again changes nothing.

use anyhow::{anyhow, bail, Context};
use pgwire_replication::ReplicationClient;

use crate::config::Config;
use crate::enrich::ContentRow;
use crate::sinks::clickhouse;
use crate::source::pg;
use crate::source::replication_config;
use crate::state::{Identity, StateLocked, StateStore};
use crate::types::Lsn;

/// What `setup` did, for its report and for tests.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub lines: Vec<String>,
    pub created_publication: bool,
    pub created_slot: bool,
    pub copied_content_rows: Option<usize>,
}

impl SetupReport {
    fn say(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }
}

/// `setup`'s options.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetupOptions {
    /// `--resync`: drop the slot and create it again at the server's current position
    /// (the way out when the slot cannot decode past a change: a dropped publication or a
    /// dropped required column), then say which `backfill` closes the gap.
    pub resync: bool,
}

pub async fn setup(config: &Config, opts: SetupOptions) -> anyhow::Result<SetupReport> {
    let mut report = SetupReport::default();
    let pgc = &config.postgres;
    let client = pg::connect(pgc).await?;
    let facts = pg::server_facts(&client).await?;
    pg::check_server(&facts)?;
    // What the server says of this very connection, so the operator sees TLS is in use.
    let tls: Option<String> = pg::timed(client.query_one(
        "SELECT CASE WHEN ssl THEN version END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    ))
    .await
    .context("cannot read pg_stat_ssl")?
    .get(0);
    report.say(format!(
        "postgres: {} {} (wal_level = logical, role {:?} may replicate; {})",
        pg::describe(pgc),
        facts.version,
        facts.user,
        match tls {
            Some(version) => format!("connected over {version}"),
            None => "connected in plaintext".to_string(),
        }
    ));
    let tables = pg::check_source_tables(&client, pgc).await?;
    let events = &pgc.events_table;
    let content = &pgc.content_table;
    use crate::source::schema::EVENT_TS;
    let event_ts = &tables.events.type_names[EVENT_TS];
    let ts_note = match tables.events.at[EVENT_TS].base {
        crate::source::schema::Base::Timestamp => format!(
            "; {}.{} is {event_ts}, read in {}",
            events,
            pgc.event_columns.event_ts,
            pgc.zone()?.name()
        ),
        _ => String::new(),
    };
    report.say(format!(
        "source tables: {events} and {content} have the required columns{ts_note}"
    ));

    // The publication must exist before the slot: pgoutput looks publications up as of each
    // change's position, so changes older than the publication could not be decoded.
    match pg::publication_tables(&client, &pgc.publication).await? {
        None => {
            pg::timed(client
                .batch_execute(&format!(
                    // Via the partition root: a partitioned events table is published under
                    // its own name, not its partitions'.
                    "CREATE PUBLICATION \"{}\" FOR TABLE {}, {} WITH (publish_via_partition_root = true)",
                    pgc.publication,
                    events.quoted(),
                    content.quoted()
                )))
                .await
                .map_err(|e| {
                    anyhow!(
                        "cannot create publication {:?}: {}; create it as the table owner: CREATE PUBLICATION {} FOR TABLE {events}, {content} WITH (publish_via_partition_root = true);",
                        pgc.publication,
                        db_message(&e),
                        pgc.publication
                    )
                })?;
            report.created_publication = true;
            report.say(format!(
                "publication {:?} created for {events}, {content}",
                pgc.publication
            ));
        }
        Some(tables) => {
            let missing: Vec<String> = [&events, &content]
                .iter()
                .map(|t| t.to_string())
                .filter(|t| !tables.contains(t))
                .collect();
            if !missing.is_empty() {
                bail!(
                    "publication {:?} exists but does not include {}; run ALTER PUBLICATION {} ADD TABLE {};",
                    pgc.publication,
                    missing.join(", "),
                    pgc.publication,
                    missing.join(", ")
                );
            }
            report.say(format!("publication {:?} exists", pgc.publication));
        }
    }

    // A running engine holds the store: the servers can still be checked and migrated, the
    // state is left to the engine.
    let store = match StateStore::open(&config.state.dir) {
        Ok(store) => Some(store),
        Err(e) if e.downcast_ref::<StateLocked>().is_some() => None,
        Err(e) => return Err(e),
    };
    let mut slot = pg::slot_info(&client, &pgc.slot).await?;
    // The last commit the engine delivered: where a resync's backfill starts.
    let mut resync_from: Option<Option<i64>> = None;
    if opts.resync {
        let Some(store) = &store else {
            bail!(
                "an engine holds the state directory {}; stop it, then run `setup --resync` again",
                config.state.dir.display()
            );
        };
        resync_from = Some(store.last_commit_us()?);
        if let Some(info) = &slot {
            if info.active {
                bail!(
                    "slot {:?} is in use by a running process; stop the engine that streams it, then run `setup --resync` again",
                    pgc.slot
                );
            }
            pg::timed(client.query_one("SELECT pg_drop_replication_slot($1)::text", &[&pgc.slot]))
                .await
                .with_context(|| format!("cannot drop slot {:?} for --resync", pgc.slot))?;
            report.say(format!(
                "resync: slot {:?} dropped (it was at confirmed_flush_lsn {})",
                pgc.slot,
                info.confirmed_flush_lsn.as_deref().unwrap_or("-")
            ));
            slot = None;
        }
    } else if report.created_publication {
        if let Some(info) = &slot {
            report.say(format!(
                "WARNING: slot {:?} (at {}) is older than the publication just created; pgoutput reads the publication as of each change, so changes between the slot's position and now cannot be decoded: if the engine stopped with \"publication does not exist\", run `engagement-cdc setup --resync`",
                pgc.slot,
                info.confirmed_flush_lsn.as_deref().unwrap_or("-")
            ));
        }
    }

    // One replication session: IDENTIFY_SYSTEM, and CREATE_REPLICATION_SLOT with an exported
    // snapshot when the slot is missing. The snapshot lives while this session is idle.
    let mut repl = pg::within(
        pg::QUERY_TIMEOUT,
        "the replication connection's startup",
        ReplicationClient::connect_gated(replication_config(pgc)?),
    )
    .await?
    .map_err(|e| anyhow!("cannot open a replication connection: {e}"))?;
    let system = pg::within(pg::QUERY_TIMEOUT, "IDENTIFY_SYSTEM", repl.identify_system())
        .await?
        .map_err(|e| explain_replication_error(&e, pgc))?;
    let identity = Identity {
        system_id: system.system_id.clone(),
        database: facts.database.clone(),
        slot: pgc.slot.clone(),
    };
    if let Some(recorded) = store.as_ref().map(|s| s.identity()).transpose()?.flatten() {
        if recorded != identity {
            bail!(
                "state directory {} belongs to {recorded}, not to {identity}; use another [state] dir for this server, or move the old one aside",
                config.state.dir.display()
            );
        }
    }

    match slot {
        Some(info) => {
            pg::check_slot(&pgc.slot, &info, &facts.database)?;
            drop(repl);
            report.say(format!(
                "slot {:?} exists (confirmed_flush_lsn {})",
                pgc.slot,
                info.confirmed_flush_lsn.as_deref().unwrap_or("-")
            ));
            let needs_copy = match &store {
                Some(store) => !store.has_dimension()?,
                None => false,
            };
            if let (true, Some(store)) = (needs_copy, &store) {
                // A slot we did not create: no snapshot to copy at, so copy what is there now.
                let rows = copy_content(&client, pgc, &tables, None).await?;
                let checkpoint = info
                    .confirmed_flush_lsn
                    .as_deref()
                    .and_then(|l| l.parse::<Lsn>().ok())
                    .unwrap_or_default();
                store.replace_dimension(&rows, checkpoint)?;
                report.copied_content_rows = Some(rows.len());
                report.say(format!(
                    "WARNING: slot {:?} was not created by this setup, so {content} ({} rows) was copied as it is now, not at the slot's position; events streamed from before now may be joined with newer content values",
                    pgc.slot,
                    rows.len()
                ));
            }
        }
        None => {
            let Some(store) = &store else {
                bail!(
                    "slot {:?} is missing while an engine holds the state directory {}; stop the engine, then run setup again",
                    pgc.slot,
                    config.state.dir.display()
                );
            };
            if resync_from.is_some() {
                // Said below, with the backfill that closes the gap.
            } else if store.has_dimension()? && store.identity()?.is_some() {
                report.say(format!(
                    "WARNING: slot {:?} was missing and is created anew: changes committed since the last checkpoint ({}) may be missing; run `engagement-cdc backfill` over that time",
                    pgc.slot,
                    store.checkpoint()?
                ));
            }
            // The slot waits for transactions open at this moment to end: a longer limit.
            let rows = tokio::time::timeout(
                pg::LONG_QUERY_TIMEOUT,
                repl.simple_query(&format!(
                    "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput EXPORT_SNAPSHOT",
                    pgc.slot
                )),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "replication slot {:?} was not created within {} s: CREATE_REPLICATION_SLOT waits for the transactions open when it started to end; end long transactions (pg_stat_activity) and run setup again",
                    pgc.slot,
                    pg::LONG_QUERY_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| {
                    anyhow!(
                        "cannot create replication slot {:?}: {e}; check max_replication_slots and that the role may replicate",
                        pgc.slot
                    )
                })?;
            let row = rows
                .first()
                .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no row"))?;
            let text = |i: usize| {
                row.get(i)
                    .and_then(|v| v.as_ref())
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            };
            let consistent_point: Lsn = text(1)
                .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no consistent point"))?
                .parse()
                .map_err(|e: String| anyhow!(e))?;
            let snapshot =
                text(2).ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT exported no snapshot"))?;
            let rows = copy_content(&client, pgc, &tables, Some(&snapshot)).await?;
            drop(repl);
            store.replace_dimension(&rows, consistent_point)?;
            report.created_slot = true;
            report.copied_content_rows = Some(rows.len());
            report.say(format!(
                "slot {:?} created at {consistent_point}; {content} copied at its snapshot ({} rows)",
                pgc.slot,
                rows.len()
            ));
            if let Some(from) = resync_from {
                // Round up: a backfill past the slot's position only meets streamed events,
                // which every sink recognises.
                let end = crate::enrich::now_us().div_euclid(1_000_000) * 1_000_000 + 1_000_000;
                let end = crate::enrich::rfc3339_us(end);
                report.say(match from {
                    // backfill selects on the event time, which a transaction open across
                    // the last commit may have set earlier: start an hour before it
                    // (re-delivery is idempotent, so the margin costs only time).
                    Some(us) => format!(
                        "resync: events committed after the last one delivered ({}) and before {consistent_point} were not streamed; deliver them with (an hour's margin for transactions open at the time): engagement-cdc backfill --start {} --end {end} --sinks {}",
                        crate::enrich::rfc3339_us(us),
                        crate::enrich::rfc3339_us(us - 3_600_000_000),
                        crate::sinks::SinkKind::enabled(&config.sinks())
                            .iter()
                            .filter(|k| **k != crate::sinks::SinkKind::Stdout)
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    None => format!(
                        "resync: this state directory never delivered an event; to deliver events committed before {consistent_point}, run engagement-cdc backfill --start <time> --end {end}"
                    ),
                });
            }
        }
    }

    if let Some(ch) = config.clickhouse() {
        let server = clickhouse::ClickHouse::new(ch)?;
        let (layout, version) = clickhouse::migrate(&server).await?;
        if !ch.shard_urls.is_empty() {
            // Every replica must answer now and serve the shard it is listed under.
            clickhouse::Shards::connect(&server, true).await?;
            report.say(format!(
                "clickhouse: inserts go straight to {}_local on {} shards of cluster {} ({} replicas, each serving the shard it is listed under)",
                ch.table,
                ch.shard_urls.len(),
                ch.cluster,
                ch.shard_urls.iter().map(Vec::len).sum::<usize>()
            ));
        }
        report.say(format!(
            "clickhouse: {}.{} ready on ClickHouse {version} ({} layout)",
            ch.database,
            ch.table,
            match layout {
                clickhouse::Layout::Modern => "DateTime64",
                clickhouse::Layout::Legacy => "legacy DateTime + event_ts_us",
            }
        ));
    }

    // Every enabled sink is checked: an unreachable one is an error now, not at `run`.
    if let Some(r) = config.redis() {
        let metrics = std::sync::Arc::new(crate::ops::metrics::Metrics::default());
        crate::sinks::redis::RedisSink::connect(r, metrics).await?;
        report.say(format!(
            "redis: {} answers and accepts the batch script",
            crate::checks::redact_url(&r.url)
        ));
    }
    if let Some(h) = config.http() {
        let status = crate::sinks::http::check_reachable(h).await?;
        report.say(format!(
            "http: {} answers (HTTP {status} to HEAD)",
            crate::checks::redact_url(&h.url)
        ));
    }

    match &store {
        Some(store) => {
            if store.identity()?.is_none() {
                store.set_identity(&identity)?;
            }
            report.say(format!(
                "state: {} records {identity}, checkpoint {}",
                config.state.dir.display(),
                store.checkpoint()?
            ));
        }
        None => report.say(format!(
            "state: {} is held by the running engine; left as it is",
            config.state.dir.display()
        )),
    }
    Ok(report)
}

/// `content` rows, at `snapshot` when given (the slot's exported snapshot), converted as
/// the stream converts them.
async fn copy_content(
    client: &tokio_postgres::Client,
    pgc: &crate::config::PostgresConfig,
    tables: &pg::SourceTables,
    snapshot: Option<&str>,
) -> anyhow::Result<Vec<ContentRow>> {
    use crate::source::rows::{decode_content, TextRow, UnfitLog};
    use crate::source::schema::{in_select_order, select_as_text};
    let content = &pgc.content_table;
    pg::timed(client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")).await?;
    if let Some(s) = snapshot {
        pg::timed(client.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{s}'")))
            .await
            .with_context(|| format!("cannot use the slot's snapshot {s}"))?;
    }
    let rows = pg::timed(client.query(
        &format!(
            "SELECT {} FROM {}",
            select_as_text("", &pgc.content_columns.required()),
            content.quoted()
        ),
        &[],
    ))
    .await
    .with_context(|| format!("cannot copy {content}"))?;
    pg::timed(client.batch_execute("COMMIT")).await?;
    let at = in_select_order(&tables.content.at);
    let mut log = UnfitLog::default();
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let (row, unfit) = decode_content(&TextRow::from_row(r), &at, None)
            .map_err(|e| anyhow!("cannot copy {content}: a row's {e}"))?;
        if let Some(why) = unfit {
            log.note(
                &format!("content row {}: {why}", row.content_id),
                "copy of the content table",
            );
        }
        out.push(row);
    }
    Ok(out)
}

fn db_message(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tokio_postgres::Error>() {
        Some(pe) => pe
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| crate::error::chain_text(pe)),
        None => format!("{e:#}"),
    }
}

/// A replication-connection error as one actionable line.
pub fn explain_replication_error(
    e: &pgwire_replication::PgWireError,
    pgc: &crate::config::PostgresConfig,
) -> anyhow::Error {
    use pgwire_replication::PgWireError as E;
    let target = pg::describe(pgc);
    match e {
        E::Auth(m) => anyhow!(
            "Postgres at {target} rejected the replication login: {m}; fix the user or password in [postgres] url"
        ),
        E::Io(io) => anyhow!(
            "cannot open a replication connection to Postgres at {target}: {io}; is the server running? check [postgres] url"
        ),
        E::Server(m) if m.contains("pg_hba") => anyhow!(
            "Postgres at {target} does not allow replication connections for this user: {m}; add a `host replication` line to pg_hba.conf"
        ),
        E::Tls(m) => anyhow!(
            "cannot open a replication connection to Postgres at {target}: {}; check sslmode, sslrootcert, sslcert and sslkey in [postgres]",
            crate::tls::explain_text(m).unwrap_or_else(|| m.clone())
        ),
        other => anyhow!("replication connection to Postgres at {target} failed: {other}"),
    }
}
