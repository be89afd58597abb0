//! The replication source: the connection (`pgwire-replication`), our pgoutput decoder, and
//! the loop that turns committed transactions into enriched batches.

pub mod config;
pub mod connect;
pub mod pg;
pub mod pgoutput;
pub mod rows;
pub mod schema;
pub mod stream;

use std::time::Duration;

use pgwire_replication::ReplicationConfig;

use config::PostgresConfig;
use connect::PgConnection;

/// Session settings for the walsender, so text values are rendered the way the decoder
/// parses them (ISO dates, UTC offsets) whatever the server's defaults are.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,YMD -c TimeZone=UTC";

/// The replication connection's settings from `[postgres]`.
pub fn replication_config(pg: &PostgresConfig) -> anyhow::Result<ReplicationConfig> {
    let conn = PgConnection::from_config(pg)?;
    let config = &conn.config;
    let (host, port) = conn.host_port();
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
