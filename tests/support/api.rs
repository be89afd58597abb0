//! `engagement-cdc mock-api`, the simulated external API, as a child process.

use std::process::Command;
use std::time::Duration;

use super::{bin, free_port, http_get, wait_for, ChildBacked, ChildServer};

/// `engagement-cdc mock-api` as a child process.
pub struct MockApi {
    pub port: u16,
    server: ChildServer,
}

impl MockApi {
    pub fn start(extra: &[&str]) -> MockApi {
        let port = free_port();
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut server = ChildServer::new(move || {
            let mut c = Command::new(bin());
            c.args(["mock-api", "--listen", &format!("127.0.0.1:{port}")])
                .args(&args);
            c
        });
        server.spawn();
        let m = MockApi { port, server };
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
            http_get(self.port, "/stats").map(|_| ())
        });
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events", self.port)
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(self.port, "/stats").expect("mock-api answers")).unwrap()
    }
}

child_backed!(MockApi);
