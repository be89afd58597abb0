//! A private PostgreSQL 15 server per test, copied from one initdb'd template per process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use super::{free_port, is_root, run_checked, TestDir};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

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
        init_data_dir(&dir.join("data"))
    })
}

/// initdb into `data` (its parent owned by the server's user), with the tests' pg_hba.conf.
fn init_data_dir(data: &Path) -> PathBuf {
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
    data.to_path_buf()
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
    /// `ssl = on` with this certificate and key (PEM files, copied into the data directory).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// pg_hba.conf with `hostssl` lines only: plaintext TCP connections are refused.
    pub hostssl_only: bool,
    /// With `hostssl_only`: the role `engagement-cdc` logs in by client certificate (its
    /// common name), checked against this CA.
    pub client_ca: Option<PathBuf>,
    /// A data directory of its own initdb, not a copy of the template: another system
    /// identifier (test servers copied from the template share one).
    pub fresh_initdb: bool,
    /// pg_hba.conf lines matched before the usual ones (another login method for a role).
    pub hba_first: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_level: "logical",
            extra_conf: String::new(),
            tls: None,
            hostssl_only: false,
            client_ca: None,
            fresh_initdb: false,
            hba_first: String::new(),
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
        if opts.fresh_initdb {
            if is_root() {
                run_checked(
                    Command::new("chown").args(["postgres:", dir.path.to_str().unwrap()]),
                    "chown",
                );
            }
            init_data_dir(&data);
        } else {
            run_checked(
                Command::new("cp").args([
                    "-a",
                    pg_template().to_str().unwrap(),
                    data.to_str().unwrap(),
                ]),
                "copy the template data directory",
            );
        }
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
        if let Some((cert, key)) = &opts.tls {
            use std::os::unix::fs::PermissionsExt;
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).unwrap();
                std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(0o600))
                    .unwrap();
            }
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
            )
            .unwrap();
        }
        if let Some(ca) = &opts.client_ca {
            std::fs::copy(ca, data.join("client-ca.crt")).unwrap();
            writeln!(conf, "ssl_ca_file = 'client-ca.crt'").unwrap();
        }
        if opts.hostssl_only {
            let by_cert = if opts.client_ca.is_some() {
                "hostssl all engagement-cdc 127.0.0.1/32 cert\n\
                 hostssl replication engagement-cdc 127.0.0.1/32 cert\n"
            } else {
                ""
            };
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n".to_string()
                    + by_cert
                    + "hostssl all postgres 127.0.0.1/32 trust\n\
                 hostssl replication postgres 127.0.0.1/32 trust\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl replication all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap();
        }
        if !opts.hba_first.is_empty() {
            let hba = data.join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(&hba, format!("{}{rest}", opts.hba_first)).unwrap();
        }
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

    /// A crash: immediate shutdown (no checkpoint, clients cut off), then start again on
    /// the same port and data; the server recovers from WAL.
    pub fn crash_restart(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        self.start_server();
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

    /// The directory holding the server's Unix socket (`host=` of a socket URL).
    pub fn socket_dir(&self) -> &Path {
        &self.dir.path
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
                self.psql_file(name, &f);
            }
        }
    }

    /// A client program of this server's (`psql`, `pg_recvlogical`, …) connected to `db` as
    /// the superuser.
    pub fn client(&self, program: &str, db: &str) -> Command {
        let mut c = Command::new(program);
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db]);
        c
    }

    /// Run SQL with psql; returns unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run_checked(
            self.client("psql", db)
                .args(["-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql]),
            &format!("psql {sql:?}"),
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Run a file of SQL with psql, stopping at the first error.
    pub fn psql_file(&self, db: &str, file: &Path) {
        run_checked(
            self.client("psql", db)
                .args(["-v", "ON_ERROR_STOP=1", "-q", "-f"])
                .arg(file),
            &format!("psql -f {}", file.display()),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.resume();
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}
