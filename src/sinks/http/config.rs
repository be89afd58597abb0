//! `[http]`: the external API the HTTP sink posts to (docs/configuration.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::checks::{check_http_url, check_range, empty_is_none, secret_or_file, Secret};
use crate::error::UsageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpMode {
    /// A JSON array of at most `max_batch_events` events per request.
    Batch,
    /// One JSON object per request.
    PerEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// After the retries, dead-letter the request and move on.
    BestEffort,
    /// Hold the checkpoint and retry until the API accepts.
    FailFast,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A sink is on when its section is present, unless it says `enabled = false`.
    pub enabled: bool,
    pub url: String,
    pub mode: HttpMode,
    pub max_batch_events: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub timeout_ms: u64,
    pub max_retries: u32,
    pub on_failure: OnFailure,
    /// Sent as `Authorization: Bearer …`; never printed.
    pub auth_token: Secret,
    #[serde(with = "empty_is_none")]
    pub auth_token_file: Option<PathBuf>,
    /// TLS for `https://` (docs/operations.md, "TLS and secrets").
    #[serde(with = "empty_is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            url: "http://127.0.0.1:58000/events".into(),
            mode: HttpMode::Batch,
            max_batch_events: 500,
            concurrency: 8,
            timeout_ms: 2000,
            max_retries: 5,
            on_failure: OnFailure::BestEffort,
            auth_token: Secret::default(),
            auth_token_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), UsageError> {
        check_http_url("http.url", &self.url)?;
        check_range(
            "http.max_batch_events",
            self.max_batch_events as u64,
            1,
            100_000,
        )?;
        check_range("http.concurrency", self.concurrency as u64, 1, 1024)?;
        check_range("http.timeout_ms", self.timeout_ms, 1, 600_000)?;
        check_range("http.max_retries", self.max_retries as u64, 0, 100)?;
        self.auth_token()?;
        self.tls()?;
        Ok(())
    }

    /// `auth_token` or the contents of `auth_token_file`.
    pub fn auth_token(&self) -> Result<Option<Secret>, UsageError> {
        secret_or_file(
            "http.auth_token",
            &self.auth_token,
            "http.auth_token_file",
            self.auth_token_file.as_deref(),
        )
    }

    /// The rustls settings for an `https://` URL; `None` for `http://`.
    pub fn tls(&self) -> Result<Option<rustls::ClientConfig>, UsageError> {
        crate::tls::for_scheme(
            "http",
            &self.url,
            "https://",
            &self.ca_file,
            &self.cert_file,
            &self.key_file,
        )
    }
}
