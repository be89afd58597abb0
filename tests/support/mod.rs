//! Test support: each test starts its own PostgreSQL, Redis and ClickHouse on free loopback
//! ports under a private temporary directory (never the developer's stack), and can stop,
//! hang (SIGSTOP), resume and restart any of them mid-test. Servers are stopped when their
//! handle is dropped, also when a test panics.
//!
//! One file per server: [`postgres`], [`redis`], [`clickhouse`], [`api`] (the mock API), and
//! [`engine`] (running the `engagement-cdc` binary to completion or in the background with
//! its stdout collected). Here: directories, ports, waiting for a state with a deadline
//! instead of sleeping, child processes that can be hung and restarted, and an HTTP client.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Numbers the test directories and engine log files of this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(crate) fn is_root() -> bool {
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
        // ECDC_TEST_KEEP=1 keeps every directory (state, journal, server data) to look at
        // after a failure.
        if std::env::var_os("ECDC_TEST_KEEP").is_some_and(|v| !v.is_empty()) {
            eprintln!("kept {}", self.path.display());
            return;
        }
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

pub(crate) fn run_checked(cmd: &mut Command, what: &str) -> Output {
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

/// A server run as our child process, so it can be killed, hung and restarted.
pub struct ChildServer {
    child: Option<Child>,
    make: Box<dyn Fn() -> Command + Send + Sync>,
}

impl ChildServer {
    pub(crate) fn new(make: impl Fn() -> Command + Send + Sync + 'static) -> ChildServer {
        ChildServer {
            child: None,
            make: Box::new(make),
        }
    }

    pub(crate) fn spawn(&mut self) {
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

    /// Whether the process was started and has exited (it could not bind, say).
    pub(crate) fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
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
    /// Started and not stopped since.
    fn running(&self) -> bool {
        self.child().child.is_some()
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

// After `child_backed!`, which the server files use.
pub mod api;
pub mod clickhouse;
pub mod engine;
pub mod postgres;
pub mod redis;
pub mod tls;

// Each test binary uses its own share of these.
#[allow(unused_imports)]
pub use api::MockApi;
#[allow(unused_imports)]
pub use clickhouse::{ClickHouse, ClickHouseCluster};
#[allow(unused_imports)]
pub use engine::{bin, cli, cli_with_peak_rss, error_line_of, Engine, Run, Stdout, TestConfig};
#[allow(unused_imports)]
pub use postgres::{PgOptions, Postgres, PG_BIN};
#[allow(unused_imports)]
pub use redis::{Redis, RedisCluster, Sentinel};
#[allow(unused_imports)]
pub use tls::Certs;

/// CPU seconds (user + system) a process has used so far; 0 when it is gone.
pub fn cpu_seconds(pid: i32) -> f64 {
    // utime and stime are fields 14 and 15.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (proc_stat(pid, 14).unwrap_or(0) + proc_stat(pid, 15).unwrap_or(0)) as f64 / hz
}

/// CPU seconds (user and system) of the children a process has waited for: for Postgres's
/// postmaster, the backends that have exited.
pub fn reaped_children_cpu_seconds(pid: i32) -> f64 {
    // cutime and cstime are fields 16 and 17.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (proc_stat(pid, 16).unwrap_or(0) + proc_stat(pid, 17).unwrap_or(0)) as f64 / hz
}

/// The parent's pid of a process.
pub fn parent_pid(pid: i32) -> Option<i32> {
    proc_stat_of(&pid.to_string(), 4)
}

/// How many processes (zombies included, until reaped) have `pid` as their parent.
pub fn children_of(pid: i32) -> usize {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&p| parent_pid(p) == Some(pid))
                .count()
        })
        .unwrap_or(0)
}

/// CPU seconds of this process's own children that it has waited for (`getrusage`).
pub fn waited_children_cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Minor page faults of a process so far: pages it touched for the first time, a cost of
/// fresh memory.
pub fn minor_faults(pid: i32) -> u64 {
    proc_stat(pid, 10).unwrap_or(0)
}

/// Numeric field `n` (1-based, as `man proc` counts) of `/proc/<pid>/stat`.
fn proc_stat(pid: i32, n: usize) -> Option<u64> {
    proc_stat_of(&pid.to_string(), n)
}

/// Numeric field `n` of `/proc/<which>/stat` (`which`: a pid, `PID/task/TID`,
/// `thread-self`); fields are counted after the parenthesised name, which may hold spaces.
/// `None` when the process or thread is gone.
fn proc_stat_of<T: std::str::FromStr>(which: &str, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{which}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n - 3)?.parse().ok()
}

/// The niceness of the calling thread.
pub fn own_nice() -> i64 {
    proc_stat_of("thread-self", 19).expect("/proc/thread-self/stat")
}

/// The niceness of each thread of a process (a thread that ends while they are read is
/// left out).
pub fn thread_nices(pid: i32) -> Vec<i64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| {
                    let tid = t.ok()?.file_name();
                    proc_stat_of(&format!("{pid}/task/{}", tid.to_string_lossy()), 19)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// HTTP to a loopback server: the status server, the mock API, ClickHouse. `None` when
/// nothing answers; any status is an answer.
pub fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    http_request_as(port, method, path, body, None)
}

/// [`http_request`] with `Authorization: Bearer TOKEN` when a token is given.
pub fn http_request_as(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> Option<(u16, String)> {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("build an HTTP client")
    });
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    let mut request = client
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().ok()?))
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_request(port, "GET", path, b"").map(|(_, b)| b)
}

pub fn http_post(port: u16, path: &str, body: &[u8]) -> Option<(u16, String)> {
    http_request(port, "POST", path, body)
}

/// GET over HTTPS from `localhost:PORT`, trusting only `ca`.
pub fn https_get(port: u16, path: &str, ca: &std::path::Path) -> Option<String> {
    let pem = std::fs::read(ca).ok()?;
    let client = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).ok()?)
        .timeout(Duration::from_secs(30))
        .build()
        .ok()?;
    let response = client
        .get(format!("https://localhost:{port}{path}"))
        .send()
        .ok()?;
    response.text().ok()
}
