//! A private ClickHouse server per test (scripts/clickhouse/ holds its configuration), and
//! a private ClickHouse cluster: ZooKeeper and three servers, two shards, the second with
//! two replicas.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{free_port, http_get, http_post, wait_for, Certs, ChildBacked, ChildServer, TestDir};

/// A private ClickHouse: the Debian package's server (18.16 here), or with
/// `ECDC_TEST_CLICKHOUSE=chdb` a modern engine (chDB, ClickHouse 26.x) behind the HTTP
/// adapter `chdb_http.py` (docs/testing.md).
pub struct ClickHouse {
    pub http_port: u16,
    pub https_port: Option<u16>,
    /// Whether this is the modern engine of [`ClickHouse::start_chdb`].
    pub chdb: bool,
    server: ChildServer,
    _dir: TestDir,
}

impl ClickHouse {
    /// The server `ECDC_TEST_CLICKHOUSE` names: `server` (default) or `chdb`.
    pub fn start() -> ClickHouse {
        match std::env::var("ECDC_TEST_CLICKHOUSE").as_deref() {
            Ok("chdb") => ClickHouse::start_chdb(),
            Ok("server") | Err(_) => ClickHouse::start_with(None),
            Ok(other) => panic!("ECDC_TEST_CLICKHOUSE={other:?}: expected server or chdb"),
        }
    }

    /// The modern engine: chDB (PyPI `chdb-core`, installed by `scripts/stack.sh install`
    /// into `.venv/`) behind `tests/support/chdb_http.py`.
    pub fn start_chdb() -> ClickHouse {
        let dir = TestDir::new("chdb");
        let http_port = free_port();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = std::env::var_os("ECDC_TEST_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        assert!(
            python.exists(),
            "{} is missing: run scripts/stack.sh install (it installs chdb-core into .venv/), or set ECDC_TEST_PYTHON",
            python.display()
        );
        let script = root.join("tests/support/chdb_http.py");
        let data = dir.path.join("data");
        let mut server = ChildServer::new(move || {
            let mut c = Command::new(&python);
            c.arg(&script)
                .arg(format!("--port={http_port}"))
                .arg("--path")
                .arg(&data);
            c
        });
        server.spawn();
        let ch = ClickHouse {
            http_port,
            https_port: None,
            chdb: true,
            server,
            _dir: dir,
        };
        ch.wait_ready();
        ch
    }

    /// Also serving HTTPS (on [`ClickHouse::https_port`]) with the certificate of `certs`;
    /// the plain port stays for the test's own queries.
    pub fn start_tls(certs: &Certs) -> ClickHouse {
        ClickHouse::start_with(Some(certs))
    }

    fn start_with(certs: Option<&Certs>) -> ClickHouse {
        ClickHouse::start_ports(free_port(), free_port(), certs, &[])
    }

    /// A server on these ports with extra files in its `config.d/`.
    fn start_ports(
        http_port: u16,
        tcp_port: u16,
        certs: Option<&Certs>,
        config_d: &[(&str, String)],
    ) -> ClickHouse {
        let dir = TestDir::new("clickhouse");
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
        std::fs::create_dir_all(dir.path.join("config.d")).unwrap();
        for (name, text) in config_d {
            std::fs::write(dir.path.join("config.d").join(name), text).unwrap();
        }
        let https_port = certs.map(|c| {
            let port = free_port();
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
            chdb: false,
            server,
            _dir: dir,
        };
        ch.wait_ready();
        ch
    }

    fn wait_ready(&self) {
        let timeout = Duration::from_secs(20);
        let deadline = std::time::Instant::now() + timeout;
        while http_get(self.http_port, "/ping")
            .filter(|b| b.trim() == "Ok.")
            .is_none()
        {
            if std::time::Instant::now() > deadline {
                // What the server said about it (the directory goes with the test).
                let log =
                    std::fs::read_to_string(self._dir.path.join("log/clickhouse-server.err.log"))
                        .unwrap_or_else(|e| format!("(no error log: {e})"));
                let lines: Vec<&str> = log.lines().collect();
                panic!(
                    "timed out after {timeout:?} waiting for clickhouse on port {} to answer /ping; the end of its error log:\n{}",
                    self.http_port,
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The event's time in microseconds since the epoch as an expression of either layout:
    /// a column of its own on 18.16, from `DateTime64(6)` on a modern server.
    pub fn event_ts_us(&self) -> &'static str {
        if self.chdb {
            "toUnixTimestamp64Micro(event_ts)"
        } else {
            "event_ts_us"
        }
    }

    /// `https://localhost:PORT` of a [`ClickHouse::start_tls`] server.
    pub fn https_url(&self) -> String {
        format!(
            "https://localhost:{}",
            self.https_port.expect("started with TLS")
        )
    }

    /// Start a replica again after `stop` (kill -9) as its operator would after a crash. A
    /// replica killed between writing a part and registering it in ZooKeeper finds that part
    /// unexpected when it starts; when such parts hold more than half its rows
    /// (`replicated_max_ratio_of_wrong_parts`: a replica that had little data) it refuses to
    /// start until told to restore with `flags/force_restore_data` in its data path, then
    /// detaches them and fetches what ZooKeeper lists from its twin (docs/sinks.md,
    /// "ClickHouse cluster"). ClickHouse removes the flag once it has read it.
    pub fn start_again_after_a_crash(&mut self) {
        let flags = self._dir.path.join("data/flags");
        std::fs::create_dir_all(&flags).unwrap();
        std::fs::write(flags.join("force_restore_data"), "").unwrap();
        self.start_again();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Run a query over HTTP; returns the TSV answer, or panics with the server's error.
    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("clickhouse query {sql:?} failed: {e}"))
    }

    /// [`ClickHouse::query`], with the server's error (or its silence) as an `Err`.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        match http_post(self.http_port, "/", sql.as_bytes()) {
            Some((200, body)) => Ok(body.trim_end().to_string()),
            Some((status, body)) => Err(format!("status {status}: {body}")),
            None => Err("no answer".into()),
        }
    }
}

child_backed!(ClickHouse);

/// ZooKeeper (Debian's `zookeeper` package) standalone, for the ClickHouse cluster.
pub struct ZooKeeper {
    pub port: u16,
    server: ChildServer,
    _dir: TestDir,
}

impl ZooKeeper {
    pub fn start() -> ZooKeeper {
        let dir = TestDir::new("zookeeper");
        let port = free_port();
        let data = dir.path.join("data");
        let mut server = ChildServer::new(move || {
            let mut c = Command::new("java");
            c.args([
                "-Xmx256m",
                "-cp",
                "/usr/share/java/*",
                "-Dzookeeper.admin.enableServer=false",
                "-Dzookeeper.4lw.commands.whitelist=ruok",
                "org.apache.zookeeper.server.ZooKeeperServerMain",
                &port.to_string(),
            ])
            .arg(&data);
            c
        });
        server.spawn();
        let zk = ZooKeeper {
            port,
            server,
            _dir: dir,
        };
        zk.wait_ready();
        zk
    }

    fn wait_ready(&self) {
        use std::io::{Read, Write};
        wait_for("zookeeper to answer ruok", Duration::from_secs(30), || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"ruok").ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            (answer == "imok").then_some(())
        });
    }
}

child_backed!(ZooKeeper);

/// Three ClickHouse servers in the cluster `CLUSTER`: shard 1 on `nodes[0]`, shard 2 on
/// `nodes[1]` and `nodes[2]` (replicas), coordinated by one ZooKeeper.
pub struct ClickHouseCluster {
    pub nodes: Vec<ClickHouse>,
    pub zookeeper: ZooKeeper,
}

impl ClickHouseCluster {
    pub const NAME: &'static str = "events_cluster";

    pub fn start() -> ClickHouseCluster {
        let zookeeper = ZooKeeper::start();
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let replica = |i: usize| {
            format!(
                "<replica><host>127.0.0.1</host><port>{}</port></replica>",
                ports[i].1
            )
        };
        let remote = format!(
            "<remote_servers><{name}>\
             <shard><internal_replication>true</internal_replication>{}</shard>\
             <shard><internal_replication>true</internal_replication>{}{}</shard>\
             </{name}></remote_servers>",
            replica(0),
            replica(1),
            replica(2),
            name = Self::NAME
        );
        let nodes = (0..3)
            .map(|i| {
                let (shard, name) = [("01", "r1"), ("02", "r1"), ("02", "r2")][i];
                let xml = format!(
                    "<?xml version=\"1.0\"?>\n<yandex>\
                     <interserver_http_port>{}</interserver_http_port>\
                     <interserver_http_host>127.0.0.1</interserver_http_host>\
                     {remote}\
                     <zookeeper><node><host>127.0.0.1</host><port>{}</port></node></zookeeper>\
                     <macros><shard>{shard}</shard><replica>{name}</replica></macros>\
                     <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>\
                     </yandex>\n",
                    ports[i].2, zookeeper.port
                );
                ClickHouse::start_ports(ports[i].0, ports[i].1, None, &[("cluster.xml", xml)])
            })
            .collect();
        ClickHouseCluster { nodes, zookeeper }
    }

    /// The node the engine is pointed at.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// A query on the first node (through the Distributed table, it sees every shard).
    pub fn query(&self, sql: &str) -> String {
        self.nodes[0].query(sql)
    }
}
