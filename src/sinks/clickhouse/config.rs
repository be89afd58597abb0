//! `[clickhouse]`: where the ClickHouse sink writes (docs/configuration.md).

use serde::{Deserialize, Serialize};

use crate::config::{check_http_url, check_identifier, Secret};
use crate::error::UsageError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// A sink is on when its section is present, unless it says `enabled = false`.
    pub enabled: bool,
    /// The HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    pub table: String,
    pub user: String,
    pub password: Secret,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            enabled: true,
            url: "http://127.0.0.1:58123".into(),
            database: "engagement".into(),
            table: "events_enriched".into(),
            user: "default".into(),
            password: Secret::default(),
        }
    }
}

impl ClickHouseConfig {
    pub fn validate(&self) -> Result<(), UsageError> {
        check_http_url("clickhouse.url", &self.url)?;
        check_identifier("clickhouse.database", &self.database)?;
        check_identifier("clickhouse.table", &self.table)
    }
}
