//! A private ClickHouse server per test (scripts/clickhouse/ holds its configuration).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{free_port, http_get, http_post, wait_for, Certs, ChildBacked, ChildServer, TestDir};

/// A private ClickHouse (the Debian package's server, 18.16 here).
pub struct ClickHouse {
    pub http_port: u16,
    pub https_port: Option<u16>,
    server: ChildServer,
    _dir: TestDir,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        ClickHouse::start_with(None)
    }

    /// Also serving HTTPS (on [`ClickHouse::https_port`]) with the certificate of `certs`;
    /// the plain port stays for the test's own queries.
    pub fn start_tls(certs: &Certs) -> ClickHouse {
        ClickHouse::start_with(Some(certs))
    }

    fn start_with(certs: Option<&Certs>) -> ClickHouse {
        let dir = TestDir::new("clickhouse");
        let http_port = free_port();
        let tcp_port = free_port();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/clickhouse");
        let config = std::fs::read_to_string(root.join("config.xml"))
            .unwrap()
            .replace("@DIR@", dir.path.to_str().unwrap())
            .replace("@HTTP_PORT@", &http_port.to_string())
            .replace("@TCP_PORT@", &tcp_port.to_string());
        for sub in ["log", "data", "tmp"] {
            std::fs::create_dir_all(dir.path.join(sub)).unwrap();
        }
        std::fs::write(dir.path.join("config.xml"), config).unwrap();
        std::fs::copy(root.join("users.xml"), dir.path.join("users.xml")).unwrap();
        let https_port = certs.map(|c| {
            let port = free_port();
            std::fs::create_dir_all(dir.path.join("config.d")).unwrap();
            std::fs::write(
                dir.path.join("config.d/https.xml"),
                format!(
                    "<?xml version=\"1.0\"?>\n<yandex>\n  <https_port>{port}</https_port>\n  <openSSL>\n    <server>\n      <certificateFile>{}</certificateFile>\n      <privateKeyFile>{}</privateKeyFile>\n      <verificationMode>none</verificationMode>\n      <loadDefaultCAFile>false</loadDefaultCAFile>\n      <cacheSessions>true</cacheSessions>\n      <disableProtocols>sslv2,sslv3</disableProtocols>\n      <preferServerCiphers>true</preferServerCiphers>\n    </server>\n  </openSSL>\n</yandex>\n",
                    c.server_cert().display(),
                    c.server_key().display()
                ),
            )
            .unwrap();
            port
        });
        let config_path = dir.path.join("config.xml");
        let mut server = ChildServer::new(move || {
            let mut c = Command::new("clickhouse-server");
            c.arg(format!("--config-file={}", config_path.display()));
            c
        });
        server.spawn();
        let ch = ClickHouse {
            http_port,
            https_port,
            server,
            _dir: dir,
        };
        ch.wait_ready();
        ch
    }

    fn wait_ready(&self) {
        wait_for(
            "clickhouse to answer /ping",
            Duration::from_secs(20),
            || {
                http_get(self.http_port, "/ping")
                    .filter(|b| b.trim() == "Ok.")
                    .map(|_| ())
            },
        );
    }

    /// `https://localhost:PORT` of a [`ClickHouse::start_tls`] server.
    pub fn https_url(&self) -> String {
        format!(
            "https://localhost:{}",
            self.https_port.expect("started with TLS")
        )
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Run a query over HTTP; returns the TSV answer, or panics with the server's error.
    pub fn query(&self, sql: &str) -> String {
        let (status, body) =
            http_post(self.http_port, "/", sql.as_bytes()).expect("clickhouse reachable");
        assert_eq!(status, 200, "clickhouse query {sql:?} failed: {body}");
        body.trim_end().to_string()
    }
}

child_backed!(ClickHouse);
