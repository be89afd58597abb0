//! Where and how to reach Postgres, worked out once from `[postgres]`: the URL without its
//! TLS parameters, the password (from the URL, `password` or `password_file`), the
//! `sslmode` and certificate files (in the URL as libpq spells them, or as keys). Both the
//! query connection (tokio-postgres) and the replication connection (pgwire-replication)
//! are made from it, with the same rustls settings.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checks::{redact_url, secret_or_file};
use crate::error::UsageError;
use crate::source::config::PostgresConfig;
use crate::tls::{TlsFiles, Verify};

/// libpq's `sslmode`, as far as it concerns a client that never sends a certificate it was
/// not given: `allow` is not offered (it prefers plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, else plaintext; no verification (libpq's default).
    Prefer,
    /// TLS or no connection; no verification unless a root certificate is given.
    Require,
    /// TLS with the chain checked against the roots, any host name.
    VerifyCa,
    /// TLS with the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Everything needed to open either connection.
#[derive(Clone)]
pub struct PgConnection {
    /// The URL's settings with the password filled in and no TLS parameters.
    pub config: tokio_postgres::Config,
    pub sslmode: SslMode,
    pub tls: TlsFiles,
    /// `host:port (user "u", database "d")`, for messages.
    pub target: String,
}

impl std::fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnection")
            .field("target", &self.target)
            .field("sslmode", &self.sslmode)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The TLS parameters of a libpq URL (or key=value string), taken out of it.
#[derive(Default)]
struct UrlTls {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

/// Split the TLS parameters off the URL; the rest is for tokio-postgres.
fn take_tls_params(url: &str) -> (String, UrlTls) {
    let mut tls = UrlTls::default();
    let mut take = |k: &str, v: &str| -> bool {
        let slot = match k {
            "sslmode" => &mut tls.sslmode,
            "sslrootcert" => &mut tls.sslrootcert,
            "sslcert" => &mut tls.sslcert,
            "sslkey" => &mut tls.sslkey,
            _ => return false,
        };
        *slot = Some(v.to_string());
        true
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), tls);
        };
        let mut kept = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if !take(&k, &v) {
                kept.append_pair(&k, &v);
            }
        }
        let kept = kept.finish();
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{kept}")
        };
        (rest, tls)
    } else {
        // key=value form: plain tokens only (values with spaces are not TLS parameters).
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|tok| match tok.split_once('=') {
                Some((k, v)) => !take(k, v),
                None => true,
            })
            .collect();
        (kept.join(" "), tls)
    }
}

/// A setting given both in the URL and as a key must agree.
fn one_of<T: PartialEq + std::fmt::Debug>(
    key: &str,
    from_key: Option<T>,
    from_url: Option<T>,
) -> Result<Option<T>, UsageError> {
    match (from_key, from_url) {
        (Some(a), Some(b)) if a != b => Err(UsageError::new(format!(
            "postgres.{key} is {a:?} but postgres.url says {key}={b:?}; set it in one place"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

impl PgConnection {
    pub fn from_config(pg: &PostgresConfig) -> Result<PgConnection, UsageError> {
        let (rest, url_tls) = take_tls_params(&pg.url);
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            UsageError::new(format!(
                "postgres.url {:?} is not a valid PostgreSQL URL ({e}); expected postgres://USER[:PASSWORD]@HOST:PORT/DATABASE[?sslmode=verify-full&sslrootcert=FILE]",
                redact_url(&pg.url)
            ))
        })?;
        let url_mode = match &url_tls.sslmode {
            None => None,
            Some(text) => Some(SslMode::parse(text).ok_or_else(|| {
                UsageError::new(format!(
                    "postgres.url has sslmode={text:?}; use disable, prefer, require, verify-ca or verify-full"
                ))
            })?),
        };
        let mut sslmode = one_of("sslmode", pg.sslmode, url_mode)?.unwrap_or(SslMode::Prefer);
        // A Unix socket (a host that is a directory: `?host=/var/run/postgresql`): Postgres
        // offers no TLS there, so, as libpq, nothing is negotiated; a mode that demands TLS
        // cannot be met and is refused rather than quietly dropped.
        let sockets = config
            .get_hosts()
            .iter()
            .filter(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)))
            .count();
        if sockets > 0 && sockets < config.get_hosts().len() {
            return Err(UsageError::new(format!(
                "postgres.url {:?} lists a Unix socket and TCP hosts together; the engine reads one server: give either the socket's directory or a host name",
                redact_url(&pg.url)
            )));
        }
        if is_socket(&config) {
            match sslmode {
                SslMode::Disable | SslMode::Prefer => sslmode = SslMode::Disable,
                demanding => {
                    return Err(UsageError::new(format!(
                        "postgres.url reaches Postgres through a Unix socket ({}), where the server offers no TLS, but sslmode={} demands it; use sslmode=disable or prefer with a socket, or a TCP host for TLS",
                        describe(&config),
                        demanding.name()
                    )));
                }
            }
        }
        let path = |key: &str, from_key: &Option<PathBuf>, from_url: &Option<String>| {
            one_of(key, from_key.clone(), from_url.as_ref().map(PathBuf::from))
        };
        // `sslrootcert=system` (libpq 16's spelling) is the system's roots, as no file is.
        let ca_file = path("sslrootcert", &pg.sslrootcert, &url_tls.sslrootcert)?
            .filter(|p| p.as_os_str() != "system");
        let tls = TlsFiles {
            ca_file,
            cert_file: path("sslcert", &pg.sslcert, &url_tls.sslcert)?,
            key_file: path("sslkey", &pg.sslkey, &url_tls.sslkey)?,
            keys: (
                "postgres.sslrootcert",
                "postgres.sslcert",
                "postgres.sslkey",
            ),
        };
        if let Some(password) = secret_or_file(
            "postgres.password",
            &pg.password,
            "postgres.password_file",
            pg.password_file.as_deref(),
        )? {
            if config.get_password().is_some() {
                return Err(UsageError::new(
                    "postgres.url has a password and postgres.password (or password_file) is set too; keep one",
                ));
            }
            config.password(password.expose());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("engagement-cdc");
        config.ssl_mode(match sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let target = describe(&config);
        Ok(PgConnection {
            config,
            sslmode,
            tls,
            target,
        })
    }

    /// How much is verified: libpq's rules (`require` with a root certificate is `verify-ca`).
    pub fn verify(&self) -> Verify {
        match self.sslmode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::ChainOnly,
            SslMode::Require if self.tls.ca_file.is_some() => Verify::ChainOnly,
            _ => Verify::Nothing,
        }
    }

    /// The rustls settings of the query connection.
    pub fn client_tls(&self) -> Result<rustls::ClientConfig, UsageError> {
        crate::tls::client_config("postgres", &self.tls, self.verify())
    }

    /// The first host and port.
    pub fn host_port(&self) -> (String, u16) {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        (
            host,
            self.config.get_ports().first().copied().unwrap_or(5432),
        )
    }

    /// pgwire-replication's TLS settings for the same mode and files. Without a root
    /// certificate, verification uses the system's bundle, as the query connection does.
    pub fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::config::SslMode as R;
        let mode = match (self.sslmode, self.verify()) {
            (SslMode::Disable, _) => R::Disable,
            (SslMode::Prefer, _) => R::Prefer,
            (_, Verify::Full) => R::VerifyFull,
            (_, Verify::ChainOnly) => R::VerifyCa,
            (_, Verify::Nothing) => R::Require,
        };
        let (host, _) = self.host_port();
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: self
                .tls
                .ca_file
                .clone()
                .or_else(|| openssl_probe::probe().cert_file),
            // Its own check refuses verify-full to an IP address unless the name is given;
            // rustls checks IP addresses in certificates, so give it.
            sni_hostname: Some(host),
            client_cert_pem_path: self.tls.cert_file.clone(),
            client_key_pem_path: self.tls.key_file.clone(),
        }
    }

    /// Whether Postgres is reached through a Unix socket (no TLS there).
    pub fn is_socket(&self) -> bool {
        is_socket(&self.config)
    }

    pub fn sslmode_name(&self) -> &'static str {
        self.sslmode.name()
    }
}

/// Whether the first host is a Unix socket's directory.
fn is_socket(c: &tokio_postgres::Config) -> bool {
    match c.get_hosts().first() {
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(_)) => true,
        _ => false,
    }
}

/// Where and as whom we connect, for messages (never the password).
fn describe(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port} (user {:?}, database {:?})",
        c.get_user().unwrap_or("?"),
        c.get_dbname().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Secret;

    fn conn(
        url: &str,
        extra: impl FnOnce(&mut PostgresConfig),
    ) -> Result<PgConnection, UsageError> {
        let mut pg = PostgresConfig {
            url: url.into(),
            ..PostgresConfig::default()
        };
        extra(&mut pg);
        // As loading does: the TLS files are read too.
        let c = PgConnection::from_config(&pg)?;
        c.client_tls()?;
        Ok(c)
    }

    #[test]
    fn tls_parameters_come_out_of_the_url() {
        let (rest, tls) = take_tls_params(
            "postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(rest, "postgres://u:p@db:5432/x?connect_timeout=3");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, tls) = take_tls_params("host=db user=u sslmode=require");
        assert_eq!(rest, "host=db user=u");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));
    }

    #[test]
    fn modes_default_and_conflicts() {
        let c = conn("postgres://u@db/x", |_| {}).unwrap();
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.verify(), Verify::Nothing);
        let c = conn("postgres://u@db/x?sslmode=disable", |_| {}).unwrap();
        assert_eq!(c.sslmode, SslMode::Disable);
        let c = conn("postgres://u@db/x", |p| p.sslmode = Some(SslMode::VerifyCa)).unwrap();
        assert_eq!(c.verify(), Verify::ChainOnly);
        let e = conn("postgres://u@db/x?sslmode=verify-full", |p| {
            p.sslmode = Some(SslMode::Require)
        })
        .unwrap_err();
        assert!(e.to_string().contains("set it in one place"), "{e}");
        let e = conn("postgres://u@db/x?sslmode=allow", |_| {}).unwrap_err();
        assert!(e.to_string().contains("sslmode=\"allow\""), "{e}");
    }

    #[test]
    fn a_unix_socket_negotiates_no_tls_and_refuses_a_mode_that_demands_it() {
        for url in [
            "postgres://u@/x?host=/var/run/postgresql&port=5433",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql:5433/x?sslmode=prefer",
            "host=/var/run/postgresql port=5433 user=u dbname=x sslmode=disable",
        ] {
            let c = conn(url, |_| {}).unwrap();
            assert_eq!(c.sslmode, SslMode::Disable, "{url}");
            assert_eq!(
                c.host_port(),
                ("/var/run/postgresql".to_string(), 5433),
                "{url}"
            );
            assert_eq!(
                c.replication_tls().mode,
                pgwire_replication::config::SslMode::Disable
            );
        }
        for mode in ["require", "verify-ca", "verify-full"] {
            let e = conn(
                &format!("postgres://u@/x?host=/var/run/postgresql&sslmode={mode}"),
                |_| {},
            )
            .unwrap_err();
            let text = e.to_string();
            assert!(text.contains("Unix socket"), "{text}");
            assert!(
                text.contains(&format!("sslmode={mode} demands it")),
                "{text}"
            );
        }
        let e = conn(
            "host=/var/run/postgresql,db.example.com user=u dbname=x",
            |_| {},
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("lists a Unix socket and TCP hosts together"),
            "{e}"
        );
        // A TCP host keeps the default.
        assert_eq!(
            conn("postgres://u@db/x", |_| {}).unwrap().sslmode,
            SslMode::Prefer
        );
    }

    #[test]
    fn missing_files_are_configuration_errors_naming_the_key() {
        let e = conn(
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            |_| {},
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("postgres.sslrootcert /nonexistent/ca.pem"),
            "{e}"
        );
        let e = conn("postgres://u@db/x?sslmode=require", |p| {
            p.sslcert = Some("/nonexistent/c.pem".into())
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("needs both postgres.sslcert and postgres.sslkey"),
            "{e}"
        );
    }

    #[test]
    fn the_password_comes_from_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = conn("postgres://u@db/x", |p| {
            p.password_file = Some(file.clone())
        })
        .unwrap();
        assert_eq!(c.config.get_password(), Some(&b"s3cret"[..]));
        let c = conn("postgres://u@db/x", |p| {
            p.password = Secret("env-pw".into())
        })
        .unwrap();
        assert_eq!(c.config.get_password(), Some(&b"env-pw"[..]));
        let e = conn("postgres://u:pw@db/x", |p| p.password = Secret("x".into())).unwrap_err();
        assert!(e.to_string().contains("keep one"), "{e}");
        assert!(!format!("{c:?}").contains("env-pw"));
    }
}
