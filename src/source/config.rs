//! `[postgres]`: the source database, its slot and publication, and its tables
//! (docs/configuration.md).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::checks::{empty_is_none, redact_url, QualifiedTable, Secret};
use crate::source::connect::SslMode;

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
        }
    }
}
