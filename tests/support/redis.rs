//! A private Redis server per test.

use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_for, ChildBacked, ChildServer, TestDir};

/// A private Redis (AOF on, so a restart keeps the data).
pub struct Redis {
    pub port: u16,
    server: ChildServer,
    _dir: TestDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = TestDir::new("redis");
        let port = free_port();
        let path = dir.path.clone();
        let mut server = ChildServer::new(move || {
            let mut c = Command::new("redis-server");
            c.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&path);
            c
        });
        server.spawn();
        let r = Redis {
            port,
            server,
            _dir: dir,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&self) {
        wait_for("redis to answer PING", Duration::from_secs(10), || {
            let out = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "PING"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "PONG").then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// redis-cli with arguments; returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }
}

child_backed!(Redis);
