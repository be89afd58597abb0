//! `[clickhouse]`: where the ClickHouse sink writes (docs/configuration.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::checks::{check_http_url, check_identifier, empty_is_none, secret_or_file, Secret};
use crate::error::UsageError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// A sink is on when its section is present, unless it says `enabled = false`.
    pub enabled: bool,
    /// The HTTP interface, e.g. `http://127.0.0.1:8123` or `https://host:8443`.
    pub url: String,
    pub database: String,
    pub table: String,
    /// A cluster of `remote_servers`: `setup` makes `table` the Distributed table over
    /// replicated `{table}_local` tables on every node. Empty: one server.
    pub cluster: String,
    /// With `cluster`: every shard's replicas' HTTP URLs, shards in `remote_servers` order.
    /// The sink then inserts each event straight into `{table}_local` on its shard, chosen
    /// as the Distributed table would; empty: inserts go through the Distributed table.
    pub shard_urls: Vec<Vec<String>>,
    pub user: String,
    pub password: Secret,
    #[serde(with = "empty_is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS for `https://` (docs/operations.md, "TLS and secrets").
    #[serde(with = "empty_is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            enabled: true,
            url: "http://127.0.0.1:58123".into(),
            database: "engagement".into(),
            table: "events_enriched".into(),
            cluster: String::new(),
            shard_urls: Vec::new(),
            user: "default".into(),
            password: Secret::default(),
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl ClickHouseConfig {
    pub fn validate(&self) -> Result<(), UsageError> {
        check_http_url("clickhouse.url", &self.url)?;
        check_identifier("clickhouse.database", &self.database)?;
        check_identifier("clickhouse.table", &self.table)?;
        if !self.cluster.is_empty() {
            check_identifier("clickhouse.cluster", &self.cluster)?;
        }
        if !self.shard_urls.is_empty() && self.cluster.is_empty() {
            return Err(UsageError::new(
                "clickhouse.shard_urls is set but clickhouse.cluster is empty; name the cluster the shards belong to, or remove shard_urls",
            ));
        }
        for (i, replicas) in self.shard_urls.iter().enumerate() {
            if replicas.is_empty() {
                return Err(UsageError::new(format!(
                    "clickhouse.shard_urls lists no URL for shard {}; give each shard the HTTP URL of at least one replica",
                    i + 1
                )));
            }
            for url in replicas {
                check_http_url(&format!("clickhouse.shard_urls (shard {})", i + 1), url)?;
            }
        }
        self.password()?;
        self.tls()?;
        Ok(())
    }

    /// `password` or the contents of `password_file`.
    pub fn password(&self) -> Result<Option<Secret>, UsageError> {
        secret_or_file(
            "clickhouse.password",
            &self.password,
            "clickhouse.password_file",
            self.password_file.as_deref(),
        )
    }

    /// The rustls settings when `url` or any of `shard_urls` is `https://`; `None` when
    /// every one is `http://`.
    pub fn tls(&self) -> Result<Option<rustls::ClientConfig>, UsageError> {
        let url = std::iter::once(&self.url)
            .chain(self.shard_urls.iter().flatten())
            .find(|u| u.starts_with("https://"))
            .unwrap_or(&self.url);
        crate::tls::for_scheme(
            "clickhouse",
            url,
            "https://",
            &self.ca_file,
            &self.cert_file,
            &self.key_file,
        )
    }
}
