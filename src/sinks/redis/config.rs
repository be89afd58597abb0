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

/// What a `redis+sentinel://` URL says.
#[derive(Debug, PartialEq)]
pub struct SentinelUrl {
    /// `(host, port)` of each sentinel.
    pub sentinels: Vec<(String, u16)>,
    /// The master's name in the sentinels' configuration.
    pub service: String,
    pub database: Option<u8>,
    pub username: Option<String>,
    pub password: Option<Secret>,
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
        if self.url.starts_with("rediss+sentinel://") {
            return Err(UsageError::new(format!(
                "redis.url {:?}: TLS through Redis Sentinel is not supported; use redis+sentinel:// on a trusted network, or name the master with rediss://HOST:PORT",
                redact_url(&self.url)
            )));
        }
        if self.is_sentinel() {
            self.sentinel()?;
            if self.cluster == ClusterMode::On {
                return Err(UsageError::new(
                    "redis.url names a Redis Sentinel service, which is one master, and redis.cluster = true; remove redis.cluster or name a cluster node with redis://HOST:PORT",
                ));
            }
        } else if !self.url.starts_with("redis://") && !self.url.starts_with("rediss://") {
            return Err(UsageError::new(format!(
                "redis.url {:?} is not a Redis URL; expected redis://HOST:PORT[/DB], rediss:// for TLS, or redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]",
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

    /// Whether `url` names a master through Redis Sentinel (`redis+sentinel://`).
    pub fn is_sentinel(&self) -> bool {
        self.url.starts_with("redis+sentinel://")
    }

    /// `redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/SERVICE[/DB]`: the
    /// sentinels (port 26379 when absent), the master's service name, and what the URL
    /// says of the master (database, user, password; the sentinels are asked with the same
    /// credentials).
    pub fn sentinel(&self) -> Result<SentinelUrl, UsageError> {
        let shown = redact_url(&self.url);
        let bad = |why: &str| {
            UsageError::new(format!(
                "redis.url {shown:?} {why}; expected redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/SERVICE[/DB]"
            ))
        };
        let rest = self
            .url
            .strip_prefix("redis+sentinel://")
            .ok_or_else(|| bad("is not a Sentinel URL"))?;
        if rest.contains(['?', '#']) {
            return Err(bad(
                "has a query or fragment, which a Sentinel URL does not take",
            ));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let decode = |t: &str| -> Result<String, UsageError> {
            percent_encoding::percent_decode_str(t)
                .decode_utf8()
                .map(|t| t.into_owned())
                .map_err(|_| bad("has a user or password that is not UTF-8 once decoded"))
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(decode(pass)?)),
                    None => (u, None),
                };
                ((!user.is_empty()).then(|| decode(user)).transpose()?, pass)
            }
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            // HOST, HOST:PORT, [IPV6] or [IPV6]:PORT.
            let (name, port) = match host.strip_prefix('[') {
                Some(v6) => {
                    let (name, after) = v6
                        .split_once(']')
                        .ok_or_else(|| bad(&format!("has a sentinel {host:?} without its ']'")))?;
                    (name, after.strip_prefix(':'))
                }
                None => match host.split_once(':') {
                    Some((name, port)) => (name, Some(port)),
                    None => (host, None),
                },
            };
            let port = match port {
                None => 26379,
                Some(p) => p.parse::<u16>().map_err(|_| {
                    bad(&format!(
                        "has a sentinel {host:?} whose port is not a number"
                    ))
                })?,
            };
            if name.is_empty() {
                return Err(bad("names a sentinel without a host"));
            }
            sentinels.push((name.to_string(), port));
        }
        let mut parts = path.split('/');
        let service = parts.next().unwrap_or("").to_string();
        if service.is_empty() {
            return Err(bad(
                "names no service (the master's name in the sentinels' configuration)",
            ));
        }
        let database = match parts.next() {
            None | Some("") => None,
            Some(db) => Some(
                db.parse::<u8>()
                    .map_err(|_| bad(&format!("has a database {db:?} that is not a number")))?,
            ),
        };
        if parts.next().is_some() {
            return Err(bad("has more than /SERVICE/DB in its path"));
        }
        Ok(SentinelUrl {
            sentinels,
            service,
            database,
            username,
            password: password.map(Secret),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn url(u: &str) -> RedisConfig {
        RedisConfig {
            url: u.into(),
            ..RedisConfig::default()
        }
    }

    #[test]
    fn sentinel_urls() {
        let s = url("redis+sentinel://app:p%40ss@10.0.0.1:26380,s2,[::1]:26381/mymaster/3")
            .sentinel()
            .unwrap();
        assert_eq!(
            s.sentinels,
            vec![
                ("10.0.0.1".to_string(), 26380),
                ("s2".to_string(), 26379),
                ("::1".to_string(), 26381)
            ]
        );
        assert_eq!(s.service, "mymaster");
        assert_eq!(s.database, Some(3));
        assert_eq!(s.username.as_deref(), Some("app"));
        assert_eq!(s.password.as_ref().map(|p| p.expose()), Some("p@ss"));
        let plain = url("redis+sentinel://127.0.0.1/svc").sentinel().unwrap();
        assert_eq!(plain.database, None);
        assert_eq!(plain.password, None);
        for (bad, says) in [
            ("redis+sentinel://127.0.0.1:26379", "names no service"),
            ("redis+sentinel://h:port/svc", "port is not a number"),
            ("redis+sentinel://h/svc/x", "database \"x\""),
            ("redis+sentinel://h/svc?db=1", "query"),
            ("redis+sentinel://a:secret@,h/svc", "without a host"),
        ] {
            let e = url(bad).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let tls = url("rediss+sentinel://h/svc").validate().unwrap_err();
        assert!(tls.to_string().contains("not supported"), "{tls}");
        let mut cluster = url("redis+sentinel://h/svc");
        cluster.cluster = ClusterMode::On;
        assert!(cluster.validate().is_err());
    }
}
