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

    /// On a free port; on another one if the server exits before it answers (the port was
    /// taken between `free_port` and its bind).
    fn start_with(extra: &[&str], certs: Option<&Certs>) -> MockApi {
        for _ in 0..3 {
            let mut m = MockApi::spawn_on(free_port(), extra, certs);
            let answered = wait_for(
                "mock-api to answer /stats or exit",
                Duration::from_secs(30),
                || {
                    if m.get("/stats").is_some() {
                        Some(true)
                    } else {
                        m.server.exited().then_some(false)
                    }
                },
            );
            if answered {
                return m;
            }
        }
        panic!("mock-api exited before answering on three free ports in turn");
    }

    fn spawn_on(port: u16, extra: &[&str], certs: Option<&Certs>) -> MockApi {
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
        MockApi {
            port,
            ca: certs.map(|c| c.ca()),
            server,
        }
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
