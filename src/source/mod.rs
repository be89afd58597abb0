//! The replication source: the connection (`wire` for `run`'s stream, `pgwire-replication`
//! for `setup`'s session), our pgoutput decoder, and the loop that turns committed
//! transactions into enriched batches.

pub mod config;
pub mod connect;
pub mod pg;
pub mod pgoutput;
pub mod rows;
pub mod schema;
pub mod stream;
pub mod timer;
pub mod wire;

use std::time::Duration;

use pgwire_replication::ReplicationConfig;

use config::PostgresConfig;
use connect::{PgConnection, SslMode};

/// Session settings for the walsender, so text values are rendered the way the decoder
/// parses them (ISO dates, UTC offsets) whatever the server's defaults are.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,YMD -c TimeZone=UTC";

/// The settings of `setup`'s replication session (`pgwire-replication`) from `[postgres]`.
pub fn replication_config(pg: &PostgresConfig) -> anyhow::Result<ReplicationConfig> {
    let conn = PgConnection::from_config(pg)?;
    let (host, port) = conn.host_port();
    let (user, password, database) = login(&conn);
    let rc = ReplicationConfig::new(
        host,
        user,
        password,
        database,
        pg.slot.clone(),
        pg.publication.clone(),
    )
    .with_port(port)
    .with_tls(conn.replication_tls())
    .with_options(SESSION_OPTIONS)
    .with_application_name("engagement-cdc")
    .with_status_interval(Duration::from_millis(pg.status_interval_ms))
    .with_wakeup_interval(Duration::from_millis(pg.status_interval_ms))
    .with_buffer_size(4096);
    Ok(rc)
}

/// The user, password and database of the URL, with libpq's defaults (the OS user, no
/// password, a database named after the user).
fn login(conn: &PgConnection) -> (String, String, String) {
    let config = &conn.config;
    let user = config
        .get_user()
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "postgres".into());
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config
        .get_dbname()
        .map(str::to_string)
        .unwrap_or_else(|| user.clone());
    (user, password, database)
}

/// The settings of `run`'s replication sessions from `[postgres]`: the same server, login
/// and TLS as [`replication_config`]'s, for [`wire`].
pub fn session_config(
    pg: &PostgresConfig,
    binary: bool,
    start: crate::types::Lsn,
) -> anyhow::Result<wire::Config> {
    let conn = PgConnection::from_config(pg)?;
    let (user, password, database) = login(&conn);
    let (host, port) = conn.host_port();
    let target = if conn.is_socket() {
        wire::Target::Unix(std::path::Path::new(&host).join(format!(".s.PGSQL.{port}")))
    } else {
        wire::Target::Tcp {
            host: host.clone(),
            port,
        }
    };
    let tls = match conn.sslmode {
        _ if conn.is_socket() => wire::Tls::Off,
        SslMode::Disable => wire::Tls::Off,
        SslMode::Prefer => wire::Tls::Prefer(std::sync::Arc::new(conn.client_tls()?)),
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            wire::Tls::Require(std::sync::Arc::new(conn.client_tls()?))
        }
    };
    Ok(wire::Config {
        target,
        tls,
        server_name: host,
        user,
        password,
        database,
        options: SESSION_OPTIONS.to_string(),
        application_name: "engagement-cdc".to_string(),
        slot: pg.slot.clone(),
        publication: pg.publication.clone(),
        binary,
        start,
        status_interval: Duration::from_millis(pg.status_interval_ms),
    })
}
