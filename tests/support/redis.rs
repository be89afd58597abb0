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
        // The bus port on a free port of its own: the default, PORT + 10000, may be one that
        // another test's server holds (or is handed next), and then the node never starts.
        let bus = free_port().to_string();
        Redis::start_with(
            None,
            &[
                "--cluster-port",
                &bus,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ],
        )
    }

    /// A replica of `master` (plaintext), serving once it answers PING.
    pub fn start_replica_of(master: &Redis) -> Redis {
        Redis::start_with(
            None,
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
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

    /// A `redis-cli PSUBSCRIBE` of `patterns`, its messages collected as they come;
    /// returns once Redis has confirmed every pattern.
    pub fn psubscribe(&self, patterns: &[&str]) -> Subscription {
        let mut child = Command::new("redis-cli")
            .args(&self.conn)
            .arg("--csv")
            .arg("PSUBSCRIBE")
            .args(patterns)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run redis-cli PSUBSCRIBE");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let sub = Subscription { child, lines };
        wait_for(
            "Redis to confirm the subscription",
            Duration::from_secs(10),
            || {
                let confirmed = sub
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| l.starts_with("\"psubscribe\""))
                    .count();
                (confirmed == patterns.len()).then_some(())
            },
        );
        sub
    }
}

child_backed!(Redis);

/// A running `redis-cli PSUBSCRIBE` (killed when dropped).
pub struct Subscription {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Subscription {
    /// `(channel, message)` of every message received so far, in order.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let fields: Vec<&str> = l.split(',').map(|f| f.trim_matches('"')).collect();
                match fields.as_slice() {
                    ["pmessage", _, channel, message] => {
                        Some((channel.to_string(), message.to_string()))
                    }
                    _ => None,
                }
            })
            .collect()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of three masters with one replica each, on loopback ports, made with
/// `redis-cli --cluster create`. A node that times out for 1 s is failed over.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                // The bus port on a free port of its own (not the default PORT + 10000).
                let bus = free_port().to_string();
                Redis::start_with(
                    None,
                    &[
                        "--cluster-port",
                        &bus,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_serving();
        cluster
    }

    /// Every running node says `cluster_state:ok` and sees 3 masters serving.
    pub fn wait_serving(&self) {
        wait_for(
            "the Redis Cluster to serve",
            Duration::from_secs(60),
            || {
                self.nodes
                    .iter()
                    .filter(|n| n.running())
                    .all(|n| {
                        n.cli(&["CLUSTER", "INFO"])
                            .lines()
                            .any(|l| l.trim() == "cluster_state:ok")
                    })
                    .then_some(())
            },
        );
    }

    /// `redis://` of the first running node.
    pub fn url(&self) -> String {
        self.running().url()
    }

    fn running(&self) -> &Redis {
        self.nodes
            .iter()
            .find(|n| n.running())
            .expect("a running node")
    }

    /// redis-cli against the cluster (`-c`: follows redirections) through a running node;
    /// without the `-> Redirected to slot …` lines redis-cli prints when it follows one.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        let out = self.running().cli(&all);
        out.lines()
            .filter(|l| !l.starts_with("-> Redirected"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The running node that is the master of `key`'s slot.
    pub fn master_of(&self, key: &str) -> usize {
        self.try_master_of(key)
            .unwrap_or_else(|nodes| panic!("no master for the slot of {key} in:\n{nodes}"))
    }

    /// The running node that is the master of `key`'s slot, or `CLUSTER NODES` when no
    /// master (not marked failing) serves it — during a failover, until a replica is promoted.
    pub fn try_master_of(&self, key: &str) -> Result<usize, String> {
        let slot: u16 = self
            .running()
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        let nodes = self.running().cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let owns = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    (a.parse().unwrap_or(u16::MAX)..=b.parse().unwrap_or(0)).contains(&slot)
                }
                None => r.parse::<u16>().ok() == Some(slot),
            });
            if owns {
                let port: u16 = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap();
                return Ok(self.nodes.iter().position(|n| n.port == port).unwrap());
            }
        }
        Err(nodes)
    }
}

/// A Redis Sentinel watching `master` as service `name`, alone (quorum 1): it fails the
/// master over to a replica 1 s after the master stops answering.
pub struct Sentinel {
    pub port: u16,
    pub name: String,
    server: ChildServer,
    _dir: TestDir,
}

impl Sentinel {
    pub fn start(master: &Redis, name: &str) -> Sentinel {
        let dir = TestDir::new("sentinel");
        let port = free_port();
        let conf = dir.path.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n",
                dir.path.display(),
                master.port
            ),
        )
        .expect("write sentinel.conf");
        let mut server = ChildServer::new(move || {
            let mut c = Command::new("redis-server");
            c.arg(&conf).arg("--sentinel");
            c
        });
        server.spawn();
        let s = Sentinel {
            port,
            name: name.to_string(),
            server,
            _dir: dir,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        wait_for(
            "the sentinel to know its master",
            Duration::from_secs(10),
            || self.master_port().map(|_| ()),
        );
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(["SENTINEL", "get-master-addr-by-name", &self.name])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the sentinel has found a replica of its master (from the master's INFO).
    pub fn knows_a_replica(&self) -> bool {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(["SENTINEL", "replicas", &self.name])
            .output()
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    }

    /// `redis+sentinel://127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/{}", self.port, self.name)
    }
}

child_backed!(Sentinel);
