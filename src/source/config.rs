//! `[postgres]`: the source database, its slot and publication, and its tables
//! (docs/configuration.md).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{redact_url, QualifiedTable};

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style URL; the password in it is never printed (see [`redact_url`]).
    pub url: String,
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
            slot: "engagement_cdc".into(),
            publication: "engagement_cdc".into(),
            events_table: QualifiedTable::public("engagement_events"),
            content_table: QualifiedTable::public("content"),
            status_interval_ms: 1000,
        }
    }
}
