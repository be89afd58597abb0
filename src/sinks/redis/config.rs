//! `[redis]`: where the Redis sink writes (docs/configuration.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::checks::{empty_is_none, redact_url, secret_or_file, Secret};
use crate::error::UsageError;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// A sink is on when its section is present, unless it says `enabled = false`.
    pub enabled: bool,
    /// `redis://` or `rediss://` (TLS) `[USER:PASSWORD@]HOST:PORT[/DB]`; the password is
    /// never printed.
    pub url: String,
    /// Prepended to every key the engine writes.
    pub key_prefix: String,
    /// ACL user and password when the URL has none.
    pub username: String,
    pub password: Secret,
    #[serde(with = "empty_is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS for `rediss://` (docs/operations.md, "TLS and secrets").
    #[serde(with = "empty_is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub key_file: Option<PathBuf>,
    /// How long the ids of applied events are kept for a backfill to recognise them
    /// (docs/sinks.md, "Redis"): a backfill over events applied longer ago applies them
    /// again. Replays of the stream are recognised whatever their age.
    pub dedup_horizon: String,
    /// `true`: a Redis Cluster (the URL names one of its nodes); `false`: one server;
    /// `"auto"` (the default): asked of the server (`INFO cluster`).
    pub cluster: ClusterMode,
}

/// `redis.cluster`: `true`, `false` or `"auto"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterMode {
    #[default]
    Auto,
    On,
    Off,
}

impl Serialize for ClusterMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ClusterMode::Auto => s.serialize_str("auto"),
            ClusterMode::On => s.serialize_bool(true),
            ClusterMode::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for ClusterMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(ClusterMode::On),
            Raw::Bool(false) => Ok(ClusterMode::Off),
            Raw::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                "auto" => Ok(ClusterMode::Auto),
                "true" => Ok(ClusterMode::On),
                "false" => Ok(ClusterMode::Off),
                _ => Err(serde::de::Error::custom(format!(
                    "redis.cluster {t:?} is not true, false or \"auto\""
                ))),
            },
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("enabled", &self.enabled)
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("dedup_horizon", &self.dedup_horizon)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            enabled: true,
            url: "redis://127.0.0.1:56379".into(),
            key_prefix: String::new(),
            username: String::new(),
            password: Secret::default(),
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            dedup_horizon: "24h".into(),
            cluster: ClusterMode::Auto,
        }
    }
}

impl RedisConfig {
    pub fn validate(&self) -> Result<(), UsageError> {
        if !self.url.starts_with("redis://") && !self.url.starts_with("rediss://") {
            return Err(UsageError::new(format!(
                "redis.url {:?} is not a Redis URL; expected redis://HOST:PORT[/DB], or rediss:// for TLS",
                redact_url(&self.url)
            )));
        }
        self.password()?;
        self.tls()?;
        self.dedup_horizon()?;
        Ok(())
    }

    /// `dedup_horizon` as a duration: at least an hour.
    pub fn dedup_horizon(&self) -> Result<std::time::Duration, UsageError> {
        let d = humantime::parse_duration(self.dedup_horizon.trim()).map_err(|e| {
            UsageError::new(format!(
                "redis.dedup_horizon {:?} is not a duration ({e}); write it like \"24h\" or \"7days\"",
                self.dedup_horizon
            ))
        })?;
        if d < std::time::Duration::from_secs(3600) {
            return Err(UsageError::new(format!(
                "redis.dedup_horizon {:?} is shorter than an hour; the id logs are kept per hour, so use at least \"1h\"",
                self.dedup_horizon
            )));
        }
        Ok(d)
    }

    /// `password` or the contents of `password_file`.
    pub fn password(&self) -> Result<Option<Secret>, UsageError> {
        secret_or_file(
            "redis.password",
            &self.password,
            "redis.password_file",
            self.password_file.as_deref(),
        )
    }

    /// The rustls settings for a `rediss://` URL; `None` for `redis://`.
    pub fn tls(&self) -> Result<Option<rustls::ClientConfig>, UsageError> {
        crate::tls::for_scheme(
            "redis",
            &self.url,
            "rediss://",
            &self.ca_file,
            &self.cert_file,
            &self.key_file,
        )
    }
}
