//! Typed configuration: the TOML file, `ENGAGEMENT_CDC__SECTION__KEY` overrides, defaults
//! that match the local stack (`scripts/stack.sh`), and validation.
//!
//! Loading is three steps: read the file into a TOML table, lay the environment overrides
//! over it (each typed by the key's default, so `ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS=abc`
//! is an error that names the variable), then deserialize with unknown keys rejected and
//! run [`Config::validate`]. Every failure is a [`UsageError`] (exit code 2).

mod checks;
mod env;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::UsageError;
pub use crate::ops::config::ServerConfig;
pub use crate::pipeline::config::PipelineConfig;
pub use crate::sinks::clickhouse::ClickHouseConfig;
pub use crate::sinks::http::{HttpConfig, HttpMode, OnFailure};
pub use crate::sinks::redis::RedisConfig;
pub use crate::sinks::stdout::StdoutConfig;
pub use crate::source::config::PostgresConfig;
pub use crate::state::config::StateConfig;
use checks::one_line;
pub use checks::{
    check_http_url, check_identifier, check_range, redact_url, QualifiedTable, Secret,
};
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
        let config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            UsageError::new(format!(
                "configuration ({source}) is invalid: {}; see docs/configuration.md for the keys and their types",
                one_line(&e.to_string())
            ))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that deserialization cannot express: URLs, ranges, names.
    pub fn validate(&self) -> Result<(), UsageError> {
        let pg = &self.postgres;
        let pg_url = tokio_postgres::Config::from_str(&pg.url).map_err(|e| {
            UsageError::new(format!(
                "postgres.url {:?} is not a valid PostgreSQL URL ({e}); expected postgres://USER[:PASSWORD]@HOST:PORT/DATABASE",
                redact_url(&pg.url)
            ))
        })?;
        if pg_url.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(UsageError::new(
                "postgres.url asks for sslmode=require, but this build does not support TLS to Postgres yet; run the engine next to the database or on a private network, without sslmode=require",
            ));
        }
        check_identifier("postgres.slot", &pg.slot)?;
        check_identifier("postgres.publication", &pg.publication)?;
        QualifiedTable::parse("postgres.events_table", &pg.events_table)?;
        QualifiedTable::parse("postgres.content_table", &pg.content_table)?;
        check_range(
            "postgres.status_interval_ms",
            pg.status_interval_ms,
            10,
            3_600_000,
        )?;
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
        if let Some(ch) = &self.clickhouse {
            ch.validate()?;
        }
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        self.server.listen.parse::<SocketAddr>().map_err(|_| {
            UsageError::new(format!(
                "server.listen {:?} is not an address; expected IP:PORT such as 127.0.0.1:59187",
                self.server.listen
            ))
        })?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(text: &str, pairs: &[(&str, &str)]) -> Result<Config, UsageError> {
        Config::from_toml_with_env(text, &env(pairs), &Source::Defaults)
    }

    #[test]
    fn empty_file_gives_defaults_without_sinks() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            c.postgres.url,
            "postgres://postgres@127.0.0.1:55432/engagement"
        );
        assert_eq!(c.pipeline.max_batch_rows, 10_000);
        assert!(c.clickhouse().is_none() && c.redis().is_none() && c.http().is_none());
    }

    #[test]
    fn a_present_section_turns_its_sink_on_unless_disabled() {
        let c = parse("[redis]\n[clickhouse]\nenabled = false\n", &[]).unwrap();
        assert_eq!(c.redis().unwrap().url, "redis://127.0.0.1:56379");
        assert!(c.clickhouse().is_none());
        assert!(c.clickhouse.is_some());
    }

    #[test]
    fn the_shipped_example_file_is_the_spec_defaults() {
        let text = include_str!("../../engagement-cdc.toml");
        let c = parse(text, &[]).unwrap();
        assert_eq!(c, Config::all_sections());
    }

    #[test]
    fn env_overrides_are_typed_by_the_key() {
        let c = parse(
            "[pipeline]\nmax_batch_rows = 5\n",
            &[
                ("ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS", "77"),
                ("ENGAGEMENT_CDC__POSTGRES__URL", "postgres://u:pw@h:1/d"),
                ("ENGAGEMENT_CDC__HTTP__MODE", "per_event"),
                ("ENGAGEMENT_CDC__STDOUT__ENABLED", "true"),
                ("ENGAGEMENT_CDC__CLICKHOUSE__PASSWORD", "12345"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.pipeline.max_batch_rows, 77);
        assert_eq!(c.postgres.url, "postgres://u:pw@h:1/d");
        assert_eq!(c.http().unwrap().mode, HttpMode::PerEvent);
        assert!(c.stdout.enabled);
        assert_eq!(c.clickhouse().unwrap().password.expose(), "12345");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse("[postgres]\nslott = \"x\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("slott"), "{e}");
        let e = parse("[kafka]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("kafka"), "{e}");
        let e = parse("", &[("ENGAGEMENT_CDC__REDIS__HOST", "x")]).unwrap_err();
        assert!(e.to_string().contains("ENGAGEMENT_CDC__REDIS__HOST"), "{e}");
        let e = parse("", &[("ENGAGEMENT_CDC__REDIS", "x")]).unwrap_err();
        assert!(e.to_string().contains("does not name a key"), "{e}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = parse("", &[("ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS", "many")]).unwrap_err();
        assert!(e.to_string().contains("is not an integer"), "{e}");
        let e = parse("[pipeline]\nmax_batch_rows = 0\n", &[]).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = parse("[http]\nmode = \"stream\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("stream"), "{e}");
        let e = parse("[postgres]\nslot = \"Bad-Name\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("postgres.slot"), "{e}");
        let e = parse(
            "[postgres]\nurl = \"postgres://u@h/d?sslmode=require\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("TLS"), "{e}");
        let e = parse("[http]\nurl = \"https://api.example.com/events\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("does not support yet"), "{e}");
        let e = parse("[server]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = parse("[postgres\nurl=", &[]).unwrap_err();
        assert!(e.to_string().contains("not valid TOML"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn secrets_are_never_printed() {
        let c = parse(
            "[postgres]\nurl = \"postgres://app:hunter2@db:5432/x\"\n[clickhouse]\npassword = \"hunter2\"\n[http]\nauth_token = \"hunter2\"\n",
            &[],
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("redis://127.0.0.1:1"), "redis://127.0.0.1:1");
    }

    #[test]
    fn qualified_tables() {
        let t = QualifiedTable::parse("k", "engagement_events").unwrap();
        assert_eq!(t.to_string(), "public.engagement_events");
        let t = QualifiedTable::parse("k", "app.events").unwrap();
        assert_eq!(t.quoted(), "\"app\".\"events\"");
        assert!(QualifiedTable::parse("k", "a.b.c").is_err());
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    /// `docs/configuration.md` lists exactly the keys of [`Config`], each with its default
    /// and environment variable.
    #[test]
    fn the_configuration_reference_matches_the_code() {
        let doc = include_str!("../../docs/configuration.md");
        let schema = toml::Table::try_from(Config::all_sections()).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let key = cells[1].trim_matches('`');
            documented.insert(key.to_string());
            let (section, name) = key.split_once('.').expect("section.key");
            let default = schema
                .get(section)
                .and_then(|s| s.get(name))
                .unwrap_or_else(|| panic!("docs/configuration.md documents unknown key {key}"));
            let shown = match default {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let doc_default = cells[2].trim_matches('`');
            let doc_default = if doc_default == "\"\"" {
                ""
            } else {
                doc_default
            };
            assert_eq!(doc_default, shown, "default of {key}");
            assert_eq!(
                cells[3].trim_matches('`'),
                format!(
                    "{ENV_PREFIX}{}__{}",
                    section.to_uppercase(),
                    name.to_uppercase()
                ),
                "environment variable of {key}"
            );
        }
        for (section, table) in &schema {
            for name in table.as_table().unwrap().keys() {
                assert!(
                    documented.contains(&format!("{section}.{name}")),
                    "{section}.{name} is missing from docs/configuration.md"
                );
            }
        }
    }
}
