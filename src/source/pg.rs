//! Ordinary (non-replication) Postgres connections and the checks `setup` and `run` make:
//! every failure is one line that says what failed, why, and what to do.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, Socket};

use crate::checks::{redact_url, QualifiedTable};
use crate::source::config::PostgresConfig;
use crate::source::connect::PgConnection;
use crate::source::schema::{
    locate, CatalogType, Located, RequiredColumn, TableColumn, TypeCatalog, CATALOG_QUERY,
    CONTENT_FIELDS, EVENT_FIELDS,
};

/// Where and as whom we connect, for messages (never the password), with the TLS mode.
pub fn describe(pg: &PostgresConfig) -> String {
    match PgConnection::from_config(pg) {
        Ok(c) => c.target,
        Err(_) => redact_url(&pg.url),
    }
}

/// How long one query may go unanswered: a server that stops answering (overloaded,
/// SIGSTOPped, a proxy that holds the connection) is an error that says so, not a hang.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for the queries that read a table (`backfill`'s count and pages).
pub const LONG_QUERY_TIMEOUT: Duration = Duration::from_secs(600);

/// A query with [`QUERY_TIMEOUT`].
pub async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> anyhow::Result<T> {
    timed_for(QUERY_TIMEOUT, f).await
}

/// A query with a time limit.
pub async fn timed_for<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> anyhow::Result<T> {
    Ok(within(limit, "a query", f).await??)
}

/// Any step against Postgres (a query, a replication command) with a time limit; the
/// error names the step. The step's own result is left to the caller to explain.
pub async fn within<F: std::future::Future>(
    limit: Duration,
    what: &str,
    f: F,
) -> anyhow::Result<F::Output> {
    tokio::time::timeout(limit, f).await.map_err(|_| {
        anyhow!(
            "Postgres did not answer {what} within {} s; is the server overloaded or stopped?",
            limit.as_secs()
        )
    })
}

/// Connect with `[postgres]`'s TLS settings, spawning the connection task. Errors say what
/// to check. The whole startup (TCP, TLS, authentication) has `connect_timeout` (10 s
/// unless the URL says otherwise).
pub async fn connect(pg: &PostgresConfig) -> anyhow::Result<Client> {
    let conn = PgConnection::from_config(pg)?;
    // Over a Unix socket nothing is negotiated (the mode is `disable` there), and
    // tokio-postgres would still ask the TLS connector for a name the socket does not have.
    if conn.is_socket() {
        start(&conn, NoTls).await
    } else {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(conn.client_tls()?);
        start(&conn, tls).await
    }
}

/// The startup with `tls`, within `connect_timeout`, and the connection task spawned.
async fn start<T>(conn: &PgConnection, tls: T) -> anyhow::Result<Client>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let limit = conn
        .config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let (client, connection) = tokio::time::timeout(limit, conn.config.connect(tls))
        .await
        .map_err(|_| {
            anyhow!(
                "Postgres at {} did not complete the connection startup (TLS, authentication) within {} s; is it overloaded, stopped, or not a Postgres server? check [postgres] url",
                conn.target,
                limit.as_secs()
            )
        })?
        .map_err(|e| explain_connect_error(&e, conn))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("postgres connection ended: {e}");
        }
    });
    Ok(client)
}

/// Turn a connection error into one actionable line.
pub fn explain_connect_error(e: &tokio_postgres::Error, conn: &PgConnection) -> anyhow::Error {
    let target = &conn.target;
    if let Some(why) = crate::tls::explain(e) {
        return anyhow!(
            "cannot connect to Postgres at {target} with sslmode={}: {why}",
            conn.sslmode_name()
        );
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD {
            return anyhow!(
                "Postgres at {target} rejected the credentials: {}; fix the user or password in [postgres] url (ENGAGEMENT_CDC__POSTGRES__URL)",
                db.message()
            );
        }
        if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            return anyhow!(
                "Postgres at {target} refused the connection: {}; check the user in [postgres] url and the server's pg_hba.conf",
                db.message()
            );
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return anyhow!(
                "Postgres at {target}: {}; create the database or fix the database name in [postgres] url",
                db.message()
            );
        }
        if *code == SqlState::TOO_MANY_CONNECTIONS {
            return anyhow!(
                "Postgres at {target} has no free connections: {}; raise max_connections or close idle sessions",
                db.message()
            );
        }
        return anyhow!(
            "Postgres at {target} refused the connection: {}",
            db.message()
        );
    }
    let text = crate::error::chain_text(e);
    if text.contains("server does not support TLS") {
        return anyhow!(
            "cannot connect to Postgres at {target}: the server does not offer TLS but sslmode={} requires it; enable ssl on the server or lower sslmode",
            conn.sslmode_name()
        );
    }
    if text.contains("password missing") {
        return anyhow!(
            "Postgres at {target} asks for a password and none is configured; put it in [postgres] url as postgres://USER:PASSWORD@HOST:PORT/DB"
        );
    }
    if conn.is_socket() && (text.contains("No such file or directory") || text.contains("refused"))
    {
        let (dir, port) = conn.host_port();
        return anyhow!(
            "cannot connect to Postgres through the Unix socket {dir}/.s.PGSQL.{port}: {}; is the server running, with {dir} in its unix_socket_directories and port {port}? check [postgres] url (ENGAGEMENT_CDC__POSTGRES__URL)",
            if text.contains("refused") {
                "nothing accepts connections on it"
            } else {
                "there is no such socket"
            }
        );
    }
    if text.contains("refused") {
        return anyhow!(
            "cannot connect to Postgres at {target}: connection refused; is the server running and listening there? check [postgres] url (ENGAGEMENT_CDC__POSTGRES__URL)"
        );
    }
    if text.contains("timed out") || text.contains("timeout") {
        return anyhow!(
            "cannot connect to Postgres at {target}: timed out; check the host, port and network"
        );
    }
    anyhow!("cannot connect to Postgres at {target}: {text}; check [postgres] url")
}

/// What `setup` and `run` need to know about the server.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub version_num: i32,
    pub version: String,
    pub wal_level: String,
    pub can_replicate: bool,
    pub user: String,
    pub database: String,
}

pub async fn server_facts(client: &Client) -> anyhow::Result<ServerFacts> {
    let row = timed(client.query_one(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                    current_setting('wal_level'), current_user::text, current_database()::text,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
        &[],
    ))
    .await
    .context("cannot read the server's settings")?;
    Ok(ServerFacts {
        version_num: row.get(0),
        version: row.get(1),
        wal_level: row.get(2),
        user: row.get(3),
        database: row.get(4),
        can_replicate: row.get::<_, Option<bool>>(5).unwrap_or(false),
    })
}

/// Version ≥ 14, `wal_level = logical`, a role that may replicate.
pub fn check_server(facts: &ServerFacts) -> anyhow::Result<()> {
    if facts.version_num < 140_000 {
        bail!(
            "PostgreSQL {} is too old: engagement-cdc needs 14 or newer; upgrade the server",
            facts.version
        );
    }
    if facts.wal_level != "logical" {
        bail!(
            "Postgres wal_level is '{}', but logical replication needs 'logical'; run ALTER SYSTEM SET wal_level = logical; then restart Postgres",
            facts.wal_level
        );
    }
    if !facts.can_replicate {
        bail!(
            "role {:?} may not replicate; run ALTER ROLE \"{}\" WITH REPLICATION; as a superuser (or connect as a role that has it)",
            facts.user,
            facts.user
        );
    }
    Ok(())
}

/// Whether the walsender can send every column of the publication's tables in binary
/// form: no column's type lacks a send function. When one does, says which and that the
/// engine reads text.
pub async fn binary_values_possible(client: &Client, publication: &str) -> anyhow::Result<bool> {
    let rows = timed(client.query(
        "SELECT format('%I.%I.%I (%s)', n.nspname, c.relname, a.attname,
                       format_type(a.atttypid, a.atttypmod))
           FROM pg_publication_tables pt
           JOIN pg_namespace n ON n.nspname = pt.schemaname
           JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           JOIN pg_type t ON t.oid = a.atttypid
          WHERE pt.pubname = $1 AND t.typsend = 0
          ORDER BY 1",
        &[&publication],
    ))
    .await
    .with_context(|| format!("cannot read the column types of publication {publication:?}"))?;
    let without: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if !without.is_empty() {
        tracing::warn!(
            "reading column values as text: {} of publication {publication:?} has a type without a binary form (postgres.binary = false says this is wanted and silences this line)",
            without.join(", ")
        );
    }
    Ok(without.is_empty())
}

/// Enums, domains and string-like types of the database (see [`TypeCatalog`]).
pub async fn type_catalog(client: &Client) -> anyhow::Result<TypeCatalog> {
    let rows = timed(client.query(CATALOG_QUERY, &[]))
        .await
        .context("cannot read the type catalog (pg_type)")?;
    let first = |s: String| s.chars().next().unwrap_or(' ');
    Ok(TypeCatalog::from_rows(rows.iter().map(|r| CatalogType {
        oid: r.get(0),
        typtype: first(r.get(1)),
        base_oid: r.get(2),
        base_typmod: r.get(3),
        category: first(r.get(4)),
        name: r.get(5),
    })))
}

/// Where each required column of a table is and its type, as `format_type` spells it.
pub struct TableLayout<const N: usize> {
    pub at: [Located; N],
    pub type_names: [String; N],
}

/// The table exists and has every required column with an accepted type.
pub async fn check_table<const N: usize>(
    client: &Client,
    table: &QualifiedTable,
    required: &[RequiredColumn; N],
    catalog: &TypeCatalog,
) -> anyhow::Result<TableLayout<N>> {
    let rows = timed(client.query(
        "SELECT a.attname::text, a.atttypid::oid, a.atttypmod, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
        &[&table.schema, &table.name],
    ))
    .await
    .with_context(|| format!("cannot read the columns of {table}"))?;
    if rows.is_empty() {
        bail!(
            "table {table} does not exist in this database; create it (migrations/postgres/ has the schema) or fix the table name in [postgres]"
        );
    }
    let columns: Vec<TableColumn> = rows
        .iter()
        .map(|r| TableColumn {
            name: r.get(0),
            type_oid: r.get(1),
            typmod: r.get(2),
        })
        .collect();
    let at = locate(&table.to_string(), required, &columns, catalog).map_err(|e| {
        anyhow!("{e}; change the column, or map the field to another column in the configuration")
    })?;
    let type_names = at.map(|l| rows[l.pos].get::<_, String>(3));
    Ok(TableLayout { at, type_names })
}

/// The source tables as the engine reads them.
pub struct SourceTables {
    pub catalog: TypeCatalog,
    pub events: TableLayout<EVENT_FIELDS>,
    pub content: TableLayout<CONTENT_FIELDS>,
}

pub async fn check_source_tables(
    client: &Client,
    pg: &PostgresConfig,
) -> anyhow::Result<SourceTables> {
    let catalog = type_catalog(client).await?;
    let events = check_table(
        client,
        &pg.events_table,
        &pg.event_columns.required(),
        &catalog,
    )
    .await?;
    let content = check_table(
        client,
        &pg.content_table,
        &pg.content_columns.required(),
        &catalog,
    )
    .await?;
    Ok(SourceTables {
        catalog,
        events,
        content,
    })
}

/// A logical slot as `pg_replication_slots` shows it, with its lag and retained WAL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub wal_status: Option<String>,
    pub active: bool,
    /// WAL between the server's position and `confirmed_flush_lsn`.
    pub lag_bytes: Option<i64>,
    /// WAL the server keeps for the slot: its position − `restart_lsn`.
    pub retained_wal_bytes: Option<i64>,
    /// WAL that may still be written before the slot is at risk; `None`: no limit.
    pub safe_wal_size: Option<i64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> anyhow::Result<Option<SlotInfo>> {
    let row = timed(client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, confirmed_flush_lsn::text, wal_status, active,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,
                    safe_wal_size
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        ))
        .await
        .context("cannot read pg_replication_slots")?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        slot_type: r.get(1),
        database: r.get(2),
        confirmed_flush_lsn: r.get(3),
        wal_status: r.get(4),
        active: r.get(5),
        lag_bytes: r.get(6),
        retained_wal_bytes: r.get(7),
        safe_wal_size: r.get(8),
    }))
}

/// The slot can be streamed by us: logical, pgoutput, this database, not invalidated.
pub fn check_slot(slot: &str, info: &SlotInfo, database: &str) -> anyhow::Result<()> {
    if info.slot_type != "logical" || info.plugin.as_deref() != Some("pgoutput") {
        bail!(
            "replication slot {slot:?} is not a logical pgoutput slot (type {}, plugin {}); use another [postgres] slot name",
            info.slot_type,
            info.plugin.as_deref().unwrap_or("none")
        );
    }
    if info.database.as_deref() != Some(database) {
        bail!(
            "replication slot {slot:?} belongs to database {:?}, not {database:?}; use another slot name or connect to that database",
            info.database.as_deref().unwrap_or("?")
        );
    }
    if info.wal_status.as_deref() == Some("lost") {
        bail!(
            "replication slot {slot:?} is invalidated (wal_status = 'lost'): the WAL it needed was removed and changes since its last confirmed position may be missing; drop it (SELECT pg_drop_replication_slot('{slot}')), run `engagement-cdc setup`, then `engagement-cdc backfill` from the last commit time that `engagement-cdc status` shows"
        );
    }
    Ok(())
}

/// Tables of a publication, as `schema.table`.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let exists = timed(client.query_opt(
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        &[&publication],
    ))
    .await
    .context("cannot read pg_publication")?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows = timed(client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        ))
        .await
        .context("cannot read pg_publication_tables")?;
    Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
}
