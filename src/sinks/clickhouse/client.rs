//! A connection to the `[clickhouse]` server and the classification of its errors: the
//! server's numeric error code decides what is permanent, once, here.

use std::time::Duration;

use anyhow::anyhow;

use super::config::ClickHouseConfig;
use crate::checks::redact_url;
use crate::error::UsageError;
use crate::sinks::SinkError;

/// How long a query of `setup` or the start-up check may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Server error codes no retry can fix: the table, a column or the database is missing or
/// of another type, or the credentials are refused.
const PERMANENT_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    81,  // UNKNOWN_DATABASE
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// The credential codes among them.
const CREDENTIAL_CODES: &[u32] = &[192, 193, 516];

#[derive(Clone)]
pub struct ClickHouse {
    client: clickhouse::Client,
    cfg: ClickHouseConfig,
    /// The URL without its password, for messages.
    url: String,
}

/// The connector under the ClickHouse client: keep-alive connections, and our rustls
/// settings for `https://` (the crate's own TLS features would bring their own roots).
fn https_connector(
    tls: Option<rustls::ClientConfig>,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    tcp.set_connect_timeout(Some(QUERY_TIMEOUT));
    tcp.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    match tls {
        Some(tls) => builder.with_tls_config(tls).https_or_http(),
        // Plain http: a TLS setup that is never used, so one connector type serves both.
        None => builder
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
            .https_or_http(),
    }
    .enable_http1()
    .wrap_connector(tcp)
}

impl ClickHouse {
    /// A client for `[clickhouse]`; validation off, as 18.16 needs (docs/sinks.md).
    pub fn new(cfg: &ClickHouseConfig) -> Result<ClickHouse, UsageError> {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(2))
                .build(https_connector(cfg.tls()?));
        let mut client = clickhouse::Client::with_http_client(http)
            .with_url(cfg.url.trim_end_matches('/'))
            .with_user(&cfg.user)
            .with_validation(false)
            .with_compression(clickhouse::Compression::None);
        if let Some(password) = cfg.password()? {
            client = client.with_password(password.expose());
        }
        if !cfg.cluster.is_empty() {
            // An insert into the Distributed table returns once every shard has its rows,
            // not when they are queued on this node: only then may the checkpoint move.
            client = client.with_setting("insert_distributed_sync", "1");
        }
        Ok(ClickHouse {
            client,
            cfg: cfg.clone(),
            url: redact_url(&cfg.url),
        })
    }

    /// The same client (its connection pool, user and settings) for another server of the
    /// cluster: a replica of `[clickhouse] shard_urls`.
    pub fn at(&self, url: &str) -> ClickHouse {
        ClickHouse {
            client: self.client.clone().with_url(url.trim_end_matches('/')),
            cfg: self.cfg.clone(),
            url: redact_url(url),
        }
    }

    /// The server's URL without its password, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> &ClickHouseConfig {
        &self.cfg
    }

    /// The client bound to `[clickhouse] database` (the crate quotes a table name as one
    /// identifier, so the database is named apart).
    pub fn in_database(&self) -> clickhouse::Client {
        self.client.clone().with_database(&self.cfg.database)
    }

    /// `SELECT version()`, within 10 s.
    pub async fn server_version(&self) -> anyhow::Result<String> {
        let query = self.client.query("SELECT version()").fetch_one::<String>();
        self.bounded(query).await
    }

    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        self.bounded(self.client.query(sql).execute()).await
    }

    /// `(shard_num, shard_weight)` of every shard of `[clickhouse] cluster` in this server's
    /// `system.clusters`, in shard order.
    pub async fn shard_weights(&self) -> anyhow::Result<Vec<(u32, u32)>> {
        let query = self
            .client
            .query(
                "SELECT shard_num, any(shard_weight) FROM system.clusters WHERE cluster = ? \
                 GROUP BY shard_num ORDER BY shard_num",
            )
            .bind(&self.cfg.cluster)
            .fetch_all();
        self.bounded(query).await
    }

    /// The shard numbers of `[clickhouse] cluster` this server is a replica of, by its own
    /// `system.clusters` (`is_local`; 18.16 marks every replica row of its own shard).
    pub async fn own_shards(&self) -> anyhow::Result<Vec<u32>> {
        let query = self
            .client
            .query(
                "SELECT DISTINCT shard_num FROM system.clusters WHERE cluster = ? AND is_local = 1 \
                 ORDER BY shard_num",
            )
            .bind(&self.cfg.cluster)
            .fetch_all();
        self.bounded(query).await
    }

    /// `(name, type)` of every column of `[clickhouse] database.table`.
    pub async fn columns(&self) -> anyhow::Result<Vec<(String, String)>> {
        let query = self
            .client
            .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
            .bind(&self.cfg.database)
            .bind(&self.cfg.table)
            .fetch_all();
        self.bounded(query).await
    }

    async fn bounded<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(QUERY_TIMEOUT, query).await {
            Ok(answer) => answer.map_err(|e| anyhow!(self.classify(&e))),
            Err(_) => Err(anyhow!(
                "ClickHouse at {} did not answer within {QUERY_TIMEOUT:?}; check that it is running and not overloaded",
                self.url
            )),
        }
    }

    /// One line for a ClickHouse error, transient or permanent.
    pub fn classify(&self, err: &clickhouse::error::Error) -> SinkError {
        use clickhouse::error::Error as E;
        let url = &self.url;
        match err {
            E::Network(_) if crate::tls::explain(err).is_some() => {
                let why = crate::tls::explain(err).unwrap_or_default();
                SinkError::transient(format!("cannot reach ClickHouse at {url}: {why}"))
            }
            E::Network(_) => {
                let cause = crate::error::chain_text(err);
                SinkError::transient(format!(
                    "cannot reach ClickHouse at {url}: {cause}; is it running? check [clickhouse] url (ENGAGEMENT_CDC__CLICKHOUSE__URL)"
                ))
            }
            E::TimedOut => SinkError::transient(format!(
                "ClickHouse at {url} did not answer in time; check its load and the network"
            )),
            E::SchemaMismatch(m) => SinkError::permanent(format!(
                "ClickHouse at {url}: the table does not match the rows: {m}"
            )),
            E::BadResponse(text) => {
                let first = text.lines().next().unwrap_or("").trim();
                match server_code(text) {
                    Some(code) if CREDENTIAL_CODES.contains(&code) => SinkError::permanent(format!(
                        "ClickHouse at {url} rejected user {:?}: {first}; fix [clickhouse] user and password",
                        self.cfg.user
                    )),
                    Some(code) if PERMANENT_CODES.contains(&code) => {
                        SinkError::permanent(format!("ClickHouse at {url}: {first}"))
                    }
                    _ => SinkError::transient(format!("ClickHouse at {url}: {first}")),
                }
            }
            other => SinkError::transient(format!("ClickHouse at {url}: {other}")),
        }
    }
}

/// The server's error code in a response: `Code: 60, e.displayText() = …` (before 20.x) or
/// `Code: 60. DB::Exception: …`.
fn server_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_of_old_and_new_servers() {
        assert_eq!(
            server_code("Code: 60, e.displayText() = DB::Exception: Table x doesn't exist"),
            Some(60)
        );
        assert_eq!(
            server_code("Code: 516. DB::Exception: default: Authentication failed"),
            Some(516)
        );
        assert_eq!(server_code("no code here"), None);
    }

    #[test]
    fn codes_decide_what_is_permanent() {
        let ch = ClickHouse::new(&ClickHouseConfig::default()).unwrap();
        let bad = |t: &str| clickhouse::error::Error::BadResponse(t.into());
        assert!(matches!(
            ch.classify(&bad("Code: 16, e.displayText() = DB::Exception: no column")),
            SinkError::Permanent { .. }
        ));
        let refused = ch.classify(&bad("Code: 193. DB::Exception: Wrong password"));
        assert!(
            refused
                .message()
                .contains("fix [clickhouse] user and password"),
            "{refused}"
        );
        assert!(matches!(
            ch.classify(&bad("Code: 252. DB::Exception: Too many parts")),
            SinkError::Transient { .. }
        ));
        assert!(matches!(
            ch.classify(&clickhouse::error::Error::TimedOut),
            SinkError::Transient { .. }
        ));
    }
}
