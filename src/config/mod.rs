//! Typed configuration: the TOML file, `ENGAGEMENT_CDC__SECTION__KEY` overrides, defaults
//! that match the local stack (`scripts/stack.sh`), and validation.
//!
//! Loading is three steps: read the file into a TOML table, lay the environment overrides
//! over it (each typed by the key's default, so `ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS=abc`
//! is an error that names the variable), then deserialize with unknown keys rejected and
//! run [`Config::validate`]. Every failure is a [`UsageError`] (exit code 2).

mod env;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checks::one_line;
pub use crate::checks::{
    check_http_url, check_identifier, check_range, empty_is_none, read_secret_file, redact_url,
    secret_or_file, QualifiedTable, Secret,
};
use crate::error::UsageError;
pub use crate::journal::JournalConfig;
pub use crate::ops::config::ServerConfig;
pub use crate::pipeline::config::PipelineConfig;
pub use crate::sinks::clickhouse::ClickHouseConfig;
pub use crate::sinks::http::{HttpConfig, HttpMode, OnFailure};
pub use crate::sinks::redis::RedisConfig;
pub use crate::sinks::stdout::StdoutConfig;
pub use crate::source::config::PostgresConfig;
pub use crate::state::config::StateConfig;
use env::apply_env_overrides;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "ENGAGEMENT_CDC__";

/// Used when `--config` is not given and this file exists in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "engagement-cdc.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub state: StateConfig,
    pub pipeline: PipelineConfig,
    pub journal: JournalConfig,
    /// `None` when the section is absent: the sink is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<ClickHouseConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
    pub stdout: StdoutConfig,
    pub server: ServerConfig,
}

impl Default for Config {
    /// No file: Postgres and the state directory of the local stack, no sinks.
    fn default() -> Self {
        Config {
            postgres: PostgresConfig::default(),
            state: StateConfig::default(),
            pipeline: PipelineConfig::default(),
            journal: JournalConfig::default(),
            clickhouse: None,
            redis: None,
            http: None,
            stdout: StdoutConfig::default(),
            server: ServerConfig::default(),
        }
    }
}

/// Where the configuration came from, for messages.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => f.write_str("built-in defaults"),
        }
    }
}

impl Config {
    /// Every section present with its defaults: the schema that types environment overrides
    /// and the reference that `docs/configuration.md` is checked against.
    pub fn all_sections() -> Config {
        Config {
            clickhouse: Some(ClickHouseConfig::default()),
            redis: Some(RedisConfig::default()),
            http: Some(HttpConfig::default()),
            ..Config::default()
        }
    }

    /// Load from `path` (or `./engagement-cdc.toml` when present), apply the process
    /// environment's overrides, validate.
    pub fn load(path: Option<&Path>) -> Result<(Config, Source), UsageError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    /// As [`Config::load`], with the environment given (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<(Config, Source), UsageError> {
        let (text, source) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    UsageError::new(format!(
                        "cannot read configuration file {}: {e}; check the path given to --config",
                        p.display()
                    ))
                })?;
                (text, Source::File(p.to_path_buf()))
            }
            None => {
                let p = Path::new(DEFAULT_CONFIG_FILE);
                match std::fs::read_to_string(p) {
                    Ok(text) => (text, Source::File(p.to_path_buf())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        (String::new(), Source::Defaults)
                    }
                    Err(e) => {
                        return Err(UsageError::new(format!(
                            "cannot read configuration file {}: {e}",
                            p.display()
                        )))
                    }
                }
            }
        };
        let config = Self::from_toml_with_env(&text, env, &source)?;
        Ok((config, source))
    }

    /// Parse TOML text, lay the overrides over it, deserialize and validate.
    pub fn from_toml_with_env(
        text: &str,
        env: &[(String, String)],
        source: &Source,
    ) -> Result<Config, UsageError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            UsageError::new(format!(
                "configuration file {source} is not valid TOML: {}; fix the syntax at that place",
                one_line(&e.to_string())
            ))
        })?;
        apply_env_overrides(&mut table, env)?;
        // The path names the key at fault: `postgres.events_table: "a.b.c" is not …`.
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let at = match e.path().to_string() {
                    p if p == "." => String::new(),
                    p => format!("{p}: "),
                };
                UsageError::new(format!(
                    "configuration ({source}) is invalid: {at}{}; see docs/configuration.md for the keys and their types",
                    one_line(&e.inner().to_string())
                ))
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that deserialization cannot express: URLs, ranges, names.
    pub fn validate(&self) -> Result<(), UsageError> {
        let pg = &self.postgres;
        // The TLS files are read here too, so a wrong path is a configuration error before
        // any connection is tried.
        crate::source::connect::PgConnection::from_config(pg)?.client_tls()?;
        check_identifier("postgres.slot", &pg.slot)?;
        check_identifier("postgres.publication", &pg.publication)?;
        pg.validate_columns()?;
        check_range(
            "postgres.status_interval_ms",
            pg.status_interval_ms,
            10,
            3_600_000,
        )?;
        if pg.heartbeat_interval_ms != 0 {
            check_range(
                "postgres.heartbeat_interval_ms",
                pg.heartbeat_interval_ms,
                100,
                86_400_000,
            )?;
        }
        if self.state.dir.as_os_str().is_empty() {
            return Err(UsageError::new(
                "state.dir is empty; set it to a directory for the engine's sled store",
            ));
        }
        check_range(
            "pipeline.max_batch_rows",
            self.pipeline.max_batch_rows as u64,
            1,
            1_000_000,
        )?;
        check_range(
            "pipeline.max_batch_delay_ms",
            self.pipeline.max_batch_delay_ms,
            0,
            60_000,
        )?;
        if !(0..=19).contains(&self.pipeline.nice) {
            return Err(UsageError::new(format!(
                "pipeline.nice = {} is out of range; use a value from 0 to 19 (0 keeps the priority the engine was started with; the engine never raises its own)",
                self.pipeline.nice
            )));
        }
        self.journal.validate()?;
        if let Some(ch) = &self.clickhouse {
            ch.validate()?;
        }
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        self.server.validate()?;
        Ok(())
    }

    pub fn clickhouse(&self) -> Option<&ClickHouseConfig> {
        self.clickhouse.as_ref().filter(|c| c.enabled)
    }
    pub fn redis(&self) -> Option<&RedisConfig> {
        self.redis.as_ref().filter(|c| c.enabled)
    }
    pub fn http(&self) -> Option<&HttpConfig> {
        self.http.as_ref().filter(|c| c.enabled)
    }

    /// What the sink factory needs: the enabled sinks' sections and the state directory.
    pub fn sinks(&self) -> crate::sinks::Sections<'_> {
        crate::sinks::Sections {
            clickhouse: self.clickhouse(),
            redis: self.redis(),
            http: self.http(),
            stdout: self.stdout.enabled,
            state_dir: &self.state.dir,
        }
    }
}

#[cfg(test)]
mod tests;
