//! The replication source: the connection (`pgwire-replication`), our pgoutput decoder, and
//! the loop that turns committed transactions into enriched batches.

pub mod config;
pub mod pg;
pub mod pgoutput;
pub mod rows;
pub mod schema;
pub mod stream;

use std::time::Duration;

use anyhow::anyhow;
use pgwire_replication::{ReplicationConfig, TlsConfig};

use crate::config::{redact_url, PostgresConfig};

/// Session settings for the walsender, so text values are rendered the way the decoder
/// parses them (ISO dates, UTC offsets) whatever the server's defaults are.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,YMD -c TimeZone=UTC";

/// The replication connection's settings from `[postgres]`.
pub fn replication_config(pg: &PostgresConfig) -> anyhow::Result<ReplicationConfig> {
    let config: tokio_postgres::Config = pg
        .url
        .parse()
        .map_err(|e| anyhow!("postgres.url {:?} is invalid: {e}", redact_url(&pg.url)))?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
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
    .with_tls(TlsConfig::disabled())
    .with_options(SESSION_OPTIONS)
    .with_application_name("engagement-cdc")
    .with_status_interval(Duration::from_millis(pg.status_interval_ms))
    .with_wakeup_interval(Duration::from_millis(pg.status_interval_ms))
    .with_buffer_size(4096);
    Ok(rc)
}
