//! `[redis]`: where the Redis sink writes (docs/configuration.md).

use serde::{Deserialize, Serialize};

use crate::config::redact_url;
use crate::error::UsageError;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// A sink is on when its section is present, unless it says `enabled = false`.
    pub enabled: bool,
    /// `redis://[USER:PASSWORD@]HOST:PORT[/DB]`; the password is never printed.
    pub url: String,
    /// Prepended to every key the engine writes.
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("enabled", &self.enabled)
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            enabled: true,
            url: "redis://127.0.0.1:56379".into(),
            key_prefix: String::new(),
        }
    }
}

impl RedisConfig {
    pub fn validate(&self) -> Result<(), UsageError> {
        if self.url.starts_with("rediss://") {
            return Err(UsageError::new(
                "redis.url uses rediss:// (TLS), which this build does not support yet; use redis:// on a private network",
            ));
        }
        if !self.url.starts_with("redis://") {
            return Err(UsageError::new(format!(
                "redis.url {:?} is not a Redis URL; expected redis://HOST:PORT[/DB]",
                redact_url(&self.url)
            )));
        }
        Ok(())
    }
}
