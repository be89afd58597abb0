//! The binary under test: run to completion ([`cli`], [`cli_with_peak_rss`]) or in the
//! background with its stdout collected ([`Engine`]); a configuration file per test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{free_port, http_get, wait_for, TestDir, COUNTER};

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
        error_line_of(&self.stderr)
    }
}

/// The `error: …` line of a command's or engine's stderr.
pub fn error_line_of(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in stderr: {stderr}"))
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
        TestConfig::with_postgres(pg_url, "", extra)
    }

    /// As [`TestConfig::new`], with more `[postgres]` keys.
    pub fn with_postgres(pg_url: &str, pg_keys: &str, extra: &str) -> TestConfig {
        let dir = TestDir::new("config");
        let path = dir.path.join("engagement-cdc.toml");
        let state = dir.path.join("state");
        let server_port = free_port();
        let listen = format!("127.0.0.1:{server_port}");
        std::fs::write(
            &path,
            format!(
                "[postgres]\nurl = \"{pg_url}\"\nstatus_interval_ms = 200\n{pg_keys}\n\n[state]\ndir = \"{}\"\n\n[server]\nlisten = \"{listen}\"\n\n{extra}\n",
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

    /// The exit code, once the process has exited by itself (a supervisor's check).
    pub fn exited(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        let status = c.try_wait().unwrap()?;
        self.child = None;
        Some(status.code().unwrap_or(-1))
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
