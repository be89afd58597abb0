//! Test support: each test starts its own PostgreSQL, Redis and ClickHouse on free loopback
//! ports under a private temporary directory (never the developer's stack), and can stop,
//! hang (SIGSTOP), resume and restart any of them mid-test. Servers are stopped when their
//! handle is dropped, also when a test panics.
//!
//! Also here: running the `engagement-cdc` binary (to completion, or in the background with
//! its stdout collected), and waiting for a state with a deadline instead of sleeping.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory for one server or test, removed on drop.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("ecdc-test-{}-{}-{label}", std::process::id(), n));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
        }
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port for a server: below Linux's ephemeral range (32768–60999), so no client socket of
/// this machine can be holding it when the server binds; never the same one twice in a
/// process; free when handed out.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test process starts at its own place in 20000..32000.
    let start = (std::process::id() % 1200) * 10;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + ((start + n) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Poll `check` until it returns `Some`, or panic after `timeout` naming what was awaited.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

/// An initdb'd data directory made once per test process and copied for each server.
fn pg_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        remove_stale_templates();
        let dir = std::env::temp_dir().join(format!("ecdc-test-{}-pgtemplate", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            run_checked(
                Command::new("chown").args(["postgres:", dir.to_str().unwrap()]),
                "chown",
            );
        }
        let data = dir.join("data");
        run_checked(
            as_postgres(&format!("{PG_BIN}/initdb")).args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]),
            "initdb",
        );
        // Trust for the superuser; passwords (SCRAM) for every other role, so wrong
        // credentials can be tested.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        data
    })
}

/// Templates left by test processes that are gone.
fn remove_stale_templates() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ecdc-test-")
            .and_then(|r| r.strip_suffix("-pgtemplate"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[derive(Clone, Debug)]
pub struct PgOptions {
    pub wal_level: &'static str,
    pub extra_conf: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_level: "logical",
            extra_conf: String::new(),
        }
    }
}

/// A private PostgreSQL 15 server.
pub struct Postgres {
    pub port: u16,
    pub data: PathBuf,
    dir: TestDir,
}

impl Postgres {
    /// Started with `wal_level = logical` and the database `engagement` holding the tables
    /// of `migrations/postgres/`.
    pub fn start() -> Postgres {
        let pg = Postgres::start_with(PgOptions::default());
        pg.create_database("engagement", true);
        pg
    }

    pub fn start_with(opts: PgOptions) -> Postgres {
        let dir = TestDir::new("pg");
        let data = dir.path.join("data");
        run_checked(
            Command::new("cp").args([
                "-a",
                pg_template().to_str().unwrap(),
                data.to_str().unwrap(),
            ]),
            "copy the template data directory",
        );
        let port = free_port();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = {}\nmax_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n\
             synchronous_commit = on\ntimezone = 'UTC'\nshared_buffers = 32MB\n{}",
            dir.path.display(),
            opts.wal_level,
            opts.extra_conf
        )
        .unwrap();
        if is_root() {
            run_checked(
                Command::new("chown").args(["-R", "postgres:", dir.path.to_str().unwrap()]),
                "chown",
            );
        }
        let pg = Postgres { port, data, dir };
        pg.start_server();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    fn start_server(&self) {
        let log = self.dir.path.join("postgres.log");
        let out = self.pg_ctl(&["-l", log.to_str().unwrap(), "-w", "-t", "30", "start"]);
        if !out.status.success() {
            panic!(
                "postgres did not start: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }

    /// Fast shutdown (disconnects clients, like a restart by an operator).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    /// Start again after [`Postgres::stop`], on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.start_server();
    }

    /// Start again after [`Postgres::stop`].
    pub fn start_again(&self) {
        self.start_server();
    }

    /// The postmaster and every backend it forked.
    pub fn processes(&self) -> Vec<i32> {
        let pid_text =
            std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
        let Some(master) = pid_text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![master];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Field 4 (after the parenthesised name) is the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGSTOP the whole server: connections stay open, nothing answers.
    pub fn hang(&self) {
        for pid in self.processes() {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
    }

    pub fn resume(&self) {
        for pid in self.processes() {
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn create_database(&self, name: &str, with_tables: bool) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        if with_tables {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let mut files: Vec<_> = std::fs::read_dir(root.join("migrations/postgres"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files {
                run_checked(
                    Command::new("psql")
                        .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                        .args([
                            "-U",
                            "postgres",
                            "-d",
                            name,
                            "-v",
                            "ON_ERROR_STOP=1",
                            "-q",
                            "-f",
                        ])
                        .arg(&f),
                    "apply a postgres migration",
                );
            }
        }
    }

    /// Run SQL with psql; returns unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run_checked(
            Command::new("psql")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args([
                    "-U",
                    "postgres",
                    "-d",
                    db,
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-Atq",
                    "-c",
                    sql,
                ]),
            &format!("psql {sql:?}"),
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.resume();
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}

/// A server run as our child process, so it can be killed, hung and restarted.
pub struct ChildServer {
    child: Option<Child>,
    make: Box<dyn Fn() -> Command + Send + Sync>,
}

impl ChildServer {
    fn spawn(&mut self) {
        let child = (self.make)()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("server running").id() as i32
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server run as our child process: stop (kill), hang (SIGSTOP), resume, start again.
pub trait ChildBacked {
    fn child(&self) -> &ChildServer;
    fn child_mut(&mut self) -> &mut ChildServer;
    /// Block until the server answers.
    fn ready(&self);

    fn hang(&self) {
        unsafe { libc::kill(self.child().pid(), libc::SIGSTOP) };
    }
    fn resume(&self) {
        unsafe { libc::kill(self.child().pid(), libc::SIGCONT) };
    }
    fn stop(&mut self) {
        self.child_mut().kill();
    }
    fn start_again(&mut self) {
        self.child_mut().spawn();
        self.ready();
    }
    fn pid(&self) -> i32 {
        self.child().pid()
    }
}

macro_rules! child_backed {
    ($t:ty) => {
        impl ChildBacked for $t {
            fn child(&self) -> &ChildServer {
                &self.server
            }
            fn child_mut(&mut self) -> &mut ChildServer {
                &mut self.server
            }
            fn ready(&self) {
                self.wait_ready();
            }
        }
    };
}
child_backed!(Redis);
child_backed!(ClickHouse);
child_backed!(MockApi);

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
        let mut server = ChildServer {
            child: None,
            make: Box::new(move || {
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
            }),
        };
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

/// A private ClickHouse (the Debian package's server, 18.16 here).
pub struct ClickHouse {
    pub http_port: u16,
    server: ChildServer,
    _dir: TestDir,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
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
        let config_path = dir.path.join("config.xml");
        let mut server = ChildServer {
            child: None,
            make: Box::new(move || {
                let mut c = Command::new("clickhouse-server");
                c.arg(format!("--config-file={}", config_path.display()));
                c
            }),
        };
        server.spawn();
        let ch = ClickHouse {
            http_port,
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

/// CPU seconds (user + system) a process has used so far; 0 when it is gone.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the name: state is field 3, utime 14 and stime 15 (1-based over the whole line).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A minimal HTTP/1.0 client, so tests need no HTTP crate.
pub fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n",
        body.len()
    )
    .ok()?;
    s.write_all(body).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_request(port, "GET", path, b"").map(|(_, b)| b)
}

pub fn http_post(port: u16, path: &str, body: &[u8]) -> Option<(u16, String)> {
    http_request(port, "POST", path, body)
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_engagement-cdc")
}

/// Result of running the binary to completion.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The `error: …` line, which must be the only line on stderr that says error.
    pub fn error_line(&self) -> &str {
        self.stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line in stderr: {}", self.stderr))
    }
}

/// Run `engagement-cdc ARGS` with the configuration file and extra environment.
pub fn cli(config: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args);
    // Quiet by default; a test may set its own filter.
    cmd.env("ENGAGEMENT_CDC_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run engagement-cdc");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "engagement-cdc panicked: {}",
        run.stderr
    );
    run
}

/// A configuration file for a test, written into its own directory.
pub struct TestConfig {
    pub dir: TestDir,
    pub path: PathBuf,
    /// Port of the engine's HTTP endpoints (`[server] listen`).
    pub server_port: u16,
}

impl TestConfig {
    /// `[postgres]` and `[state]` for `pg`, plus the given extra TOML (sink sections).
    pub fn new(pg_url: &str, extra: &str) -> TestConfig {
        let dir = TestDir::new("config");
        let path = dir.path.join("engagement-cdc.toml");
        let state = dir.path.join("state");
        let server_port = free_port();
        let listen = format!("127.0.0.1:{server_port}");
        std::fs::write(
            &path,
            format!(
                "[postgres]\nurl = \"{pg_url}\"\nstatus_interval_ms = 200\n\n[state]\ndir = \"{}\"\n\n[server]\nlisten = \"{listen}\"\n\n{extra}\n",
                state.display()
            ),
        )
        .unwrap();
        TestConfig {
            dir,
            path,
            server_port,
        }
    }

    /// The running engine's `/status` JSON, when it answers.
    pub fn engine_status(&self) -> Option<serde_json::Value> {
        let body = http_get(self.server_port, "/status")?;
        serde_json::from_str(&body).ok()
    }

    /// A counter of the running engine (see `src/metrics.rs`), when it answers.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.engine_status()?["counters"][name].as_u64()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path.join("state")
    }
}

/// What happens to the engine's stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// Collected line by line.
    Collect,
    /// Collected only after [`Engine::release_stdout`]: until then the pipe fills up and the
    /// stdout sink blocks, holding the checkpoint.
    Gated,
    /// Thrown away (large volumes).
    Discard,
}

/// The engine running in the background; its stdout lines are collected.
pub struct Engine {
    child: Option<Child>,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    stderr_path: PathBuf,
}

impl Engine {
    pub fn spawn(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Engine {
        Engine::spawn_with(config, args, env, Stdout::Collect)
    }

    pub fn spawn_with(config: &Path, args: &[&str], env: &[(&str, &str)], mode: Stdout) -> Engine {
        let stderr_path =
            config.with_extension(format!("stderr.{}", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--config").arg(config).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if std::env::var("ENGAGEMENT_CDC_LOG").is_err()
            && !env.iter().any(|(k, _)| *k == "ENGAGEMENT_CDC_LOG")
        {
            cmd.env("ENGAGEMENT_CDC_LOG", "info");
        }
        let mut child = cmd
            .stdout(if mode == Stdout::Discard {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stderr(stderr)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn engagement-cdc");
        let lines: Arc<(Mutex<Vec<String>>, Condvar)> = Default::default();
        let gate: Arc<(Mutex<bool>, Condvar)> =
            Arc::new((Mutex::new(mode != Stdout::Gated), Condvar::new()));
        let sink = lines.clone();
        let gate_reader = gate.clone();
        let stdout = child.stdout.take();
        if mode == Stdout::Gated {
            // The smallest pipe, so a few KB of output already block the writer.
            use std::os::fd::AsRawFd;
            if let Some(out) = &stdout {
                unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
            }
        }
        std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            {
                let (open, cv) = &*gate_reader;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            }
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*sink;
                m.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        Engine {
            child: Some(child),
            lines,
            gate,
            stderr_path,
        }
    }

    /// Start reading a [`Stdout::Gated`] engine's output.
    pub fn release_stdout(&self) {
        let (open, cv) = &*self.gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }

    /// Peak resident memory of the engine process (VmHWM), in kB.
    pub fn peak_rss_kb(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Wait until at least `n` stdout lines arrived.
    pub fn wait_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        let (m, cv) = &*self.lines;
        let deadline = Instant::now() + timeout;
        let mut guard = m.lock().unwrap();
        while guard.len() < n {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {n} lines of engine output (got {}); stderr:\n{}",
                    guard.len(),
                    self.stderr()
                );
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
        guard.clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit code.
    pub fn terminate(&mut self) -> i32 {
        let mut c = self.child.take().expect("engine running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        // The engine waits up to 30 s for a sink that does not answer.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "engine did not exit within 60 s of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let c = self.child.as_mut().expect("engine running");
        let status = wait_for("the engine to exit", timeout, || c.try_wait().unwrap());
        self.child = None;
        status.code().unwrap_or(-1)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `engagement-cdc mock-api` as a child process.
pub struct MockApi {
    pub port: u16,
    server: ChildServer,
}

impl MockApi {
    pub fn start(extra: &[&str]) -> MockApi {
        let port = free_port();
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut server = ChildServer {
            child: None,
            make: Box::new(move || {
                let mut c = Command::new(bin());
                c.args(["mock-api", "--listen", &format!("127.0.0.1:{port}")])
                    .args(&args);
                c
            }),
        };
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

/// Run `engagement-cdc ARGS` to completion; returns the run and its peak RSS in kB.
pub fn cli_with_peak_rss(config: &Path, args: &[&str], env: &[(&str, &str)]) -> (Run, u64) {
    use std::io::Read;
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(config).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("ENGAGEMENT_CDC_LOG", "warn");
    #[allow(clippy::zombie_processes)] // reaped with wait4 below, which reports the peak RSS
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn engagement-cdc");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut status: libc::c_int = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let run = Run {
        code,
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "engagement-cdc panicked: {}",
        run.stderr
    );
    (run, usage.ru_maxrss as u64)
}
