//! `[postgres]`: the source database, its slot and publication, and its tables
//! (docs/configuration.md).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::checks::{empty_is_none, redact_url, QualifiedTable, Secret};
use crate::error::UsageError;
use crate::source::connect::SslMode;
use crate::source::rows::Zone;
use crate::source::schema::{ContentColumns, EventColumns};

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style URL; the password in it is never printed (see [`redact_url`]).
    pub url: String,
    /// TLS (docs/operations.md, "TLS and secrets"); each may instead be a URL parameter
    /// spelled the same way, but not both with different values.
    #[serde(with = "empty_is_none")]
    pub sslmode: Option<SslMode>,
    #[serde(with = "empty_is_none")]
    pub sslrootcert: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub sslcert: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub sslkey: Option<PathBuf>,
    /// The password when the URL has none: here (or `ENGAGEMENT_CDC__POSTGRES__PASSWORD`),
    /// or in a file.
    pub password: Secret,
    #[serde(with = "empty_is_none")]
    pub password_file: Option<PathBuf>,
    pub slot: String,
    pub publication: String,
    pub events_table: QualifiedTable,
    pub content_table: QualifiedTable,
    pub status_interval_ms: u64,
    /// How often the engine writes a logical heartbeat message into the WAL, so an idle
    /// slot advances while other databases write (0: never).
    pub heartbeat_interval_ms: u64,
    /// The zone a `timestamp without time zone` event time is read in (IANA name).
    pub timestamp_zone: String,
    /// Ask the walsender for column values in binary form (cheaper to produce and to
    /// read than text); the engine reads text anyway when a published column's type has
    /// no binary form.
    pub binary: bool,
    /// The events table's column for each field (docs/configuration.md, "Source columns").
    pub event_columns: EventColumns,
    /// The content table's column for each field.
    pub content_columns: ContentColumns,
}

impl PostgresConfig {
    /// `timestamp_zone`, checked.
    pub fn zone(&self) -> Result<Zone, UsageError> {
        Zone::named(&self.timestamp_zone)
            .map_err(|e| UsageError::new(format!("postgres.timestamp_zone: {e}")))
    }

    /// Checks of the keys this section adds beyond connection settings.
    pub fn validate_columns(&self) -> Result<(), UsageError> {
        self.zone()?;
        let events = self.event_columns.required();
        let content = self.content_columns.required();
        for r in events.iter().chain(content.iter()) {
            if r.column.trim().is_empty() {
                return Err(UsageError::new(format!(
                    "{}.{} is empty; set it to the column that holds {} (default {:?})",
                    r.section, r.field, r.field, r.field
                )));
            }
        }
        for list in [&events[..], &content[..]] {
            for (i, a) in list.iter().enumerate() {
                if let Some(b) = list[..i].iter().find(|b| b.column == a.column) {
                    return Err(UsageError::new(format!(
                        "{}.{} and {}.{} both name column {:?}; each field needs its own column",
                        b.section, b.field, a.section, a.field, a.column
                    )));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("events_table", &self.events_table)
            .field("content_table", &self.content_table)
            .field("status_interval_ms", &self.status_interval_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("timestamp_zone", &self.timestamp_zone)
            .field("binary", &self.binary)
            .field("event_columns", &self.event_columns)
            .field("content_columns", &self.content_columns)
            .finish()
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://postgres@127.0.0.1:55432/engagement".into(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            password: Secret::default(),
            password_file: None,
            slot: "engagement_cdc".into(),
            publication: "engagement_cdc".into(),
            events_table: QualifiedTable::public("engagement_events"),
            content_table: QualifiedTable::public("content"),
            status_interval_ms: 1000,
            heartbeat_interval_ms: 10_000,
            timestamp_zone: "UTC".into(),
            binary: true,
            event_columns: EventColumns::default(),
            content_columns: ContentColumns::default(),
        }
    }
}
