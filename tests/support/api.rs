//! `engagement-cdc mock-api`, the simulated external API, as a child process.

use std::process::Command;
use std::time::Duration;

use std::path::PathBuf;

use super::{bin, free_port, http_get, https_get, wait_for, Certs, ChildBacked, ChildServer};

/// `engagement-cdc mock-api` as a child process.
pub struct MockApi {
    pub port: u16,
    /// The CA of an HTTPS mock, to reach it.
    ca: Option<PathBuf>,
    server: ChildServer,
}

impl MockApi {
    pub fn start(extra: &[&str]) -> MockApi {
        MockApi::start_with(extra, None)
    }

    /// HTTPS with the server certificate of `certs`.
    pub fn start_tls(certs: &Certs) -> MockApi {
        MockApi::start_with(&[], Some(certs))
    }

    fn start_with(extra: &[&str], certs: Option<&Certs>) -> MockApi {
        let port = free_port();
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(c) = certs {
            args.push("--tls-cert".into());
            args.push(c.server_cert().display().to_string());
            args.push("--tls-key".into());
            args.push(c.server_key().display().to_string());
        }
        let mut server = ChildServer::new(move || {
            let mut c = Command::new(bin());
            c.args(["mock-api", "--listen", &format!("127.0.0.1:{port}")])
                .args(&args);
            c
        });
        server.spawn();
        let m = MockApi {
            port,
            ca: certs.map(|c| c.ca()),
            server,
        };
        m.wait_ready();
        m
    }

    /// A port where no API answers (yet): `start_again` brings it up there.
    pub fn down(extra: &[&str]) -> MockApi {
        let mut m = MockApi::start(extra);
        m.stop();
        m
    }

    fn wait_ready(&self) {
        wait_for("mock-api to answer /stats", Duration::from_secs(10), || {
            self.get("/stats").map(|_| ())
        });
    }

    pub fn url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://localhost:{}/events", self.port),
            None => format!("http://127.0.0.1:{}/events", self.port),
        }
    }

    fn get(&self, path: &str) -> Option<String> {
        match &self.ca {
            Some(ca) => https_get(self.port, path, ca),
            None => http_get(self.port, path),
        }
    }

    /// With `--keep-events`: the JSON the API last received for this event, byte for byte.
    pub fn event_json(&self, id: &str) -> Option<String> {
        let body = self.get(&format!("/events/{id}"))?;
        (!body.starts_with("{\"error\"")).then_some(body)
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/stats").expect("mock-api answers")).unwrap()
    }
}

child_backed!(MockApi);
