//! A private Redis server per test, plaintext or TLS only.

use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_for, Certs, ChildBacked, ChildServer, TestDir};

/// A private Redis (AOF on, so a restart keeps the data).
pub struct Redis {
    pub port: u16,
    /// redis-cli's connection arguments (`-p PORT`, and the TLS files for a TLS server).
    conn: Vec<String>,
    tls: bool,
    server: ChildServer,
    _dir: TestDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None, &[])
    }

    /// A node with `cluster-enabled yes` (no slots assigned): what a Redis Cluster node
    /// looks like to a client.
    pub fn start_cluster_node() -> Redis {
        Redis::start_with(
            None,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ],
        )
    }

    /// TLS only (`--port 0 --tls-port`), with the certificates of `certs`; clients must
    /// present a certificate signed by the test CA.
    pub fn start_tls(certs: &Certs) -> Redis {
        Redis::start_with(Some(certs), &[])
    }

    fn start_with(certs: Option<&Certs>, extra: &[&str]) -> Redis {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let dir = TestDir::new("redis");
        let port = free_port();
        let path = dir.path.clone();
        let mut listen: Vec<String> = vec!["--port".into(), port.to_string()];
        let mut conn: Vec<String> = vec!["-p".into(), port.to_string()];
        if let Some(c) = certs {
            let file = |p: std::path::PathBuf| p.display().to_string();
            listen = vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                file(c.server_cert()),
                "--tls-key-file".into(),
                file(c.server_key()),
                "--tls-ca-cert-file".into(),
                file(c.ca()),
                "--tls-auth-clients".into(),
                "yes".into(),
            ];
            conn.extend([
                "--tls".into(),
                "--cacert".into(),
                file(c.ca()),
                "--cert".into(),
                file(c.client_cert()),
                "--key".into(),
                file(c.client_key()),
            ]);
        }
        let mut server = ChildServer::new(move || {
            let mut c = Command::new("redis-server");
            c.args(&listen)
                .args(&extra)
                .args(["--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .arg("--dir")
                .arg(&path);
            c
        });
        server.spawn();
        let r = Redis {
            port,
            conn,
            tls: certs.is_some(),
            server,
            _dir: dir,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&self) {
        wait_for("redis to answer PING", Duration::from_secs(10), || {
            (self.cli(&["PING"]) == "PONG").then_some(())
        });
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://localhost:PORT` for a TLS server.
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// redis-cli with arguments; returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(&self.conn)
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }
}

child_backed!(Redis);
