//! `[server]`: where the engine's HTTP endpoints listen (docs/configuration.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::checks::{empty_is_none, secret_or_file, Secret};
use crate::error::UsageError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Loopback by default: the endpoints are for this host's monitoring.
    #[serde(deserialize_with = "socket_address")]
    pub listen: SocketAddr,
    /// When set, every endpoint but `/healthz` and `/readyz` wants `Authorization: Bearer …`.
    pub auth_token: Secret,
    #[serde(with = "empty_is_none")]
    pub auth_token_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 59187)),
            auth_token: Secret::default(),
            auth_token_file: None,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), UsageError> {
        self.auth_token().map(|_| ())
    }

    /// `auth_token` or the contents of `auth_token_file`.
    pub fn auth_token(&self) -> Result<Option<Secret>, UsageError> {
        secret_or_file(
            "server.auth_token",
            &self.auth_token,
            "server.auth_token_file",
            self.auth_token_file.as_deref(),
        )
    }
}

fn socket_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an address; expected IP:PORT such as 127.0.0.1:59187"
        ))
    })
}
