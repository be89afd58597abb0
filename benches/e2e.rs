//! The end-to-end benchmark: `cargo bench --bench e2e [-- OPTIONS]`.
//!
//! On private servers (the tests' support: PostgreSQL, ClickHouse, Redis, mock API on free
//! loopback ports) it measures, for the release binary:
//!
//! 1. **Catch-up**: a backlog of `--events` rows (1000-row transactions) is inserted while
//!    three slots created at the same position wait. `pg_recvlogical` reads one to the end
//!    over TCP on loopback and one over the Unix socket (the raw rate of Postgres's
//!    walsender here, both ways; not the socket under `--tls`); the engine, with the sinks
//!    of `--sinks`, reads the third until its checkpoint passes the end. Peak RSS during
//!    catch-up.
//! 2. **Steady state**: `engagement-cdc load` at `--rate` events/s for `--seconds`; the
//!    engine's commit-to-sink latency (p50, p99) and resident memory.
//!
//! Options: `--events N` (default 500000), `--contents N` (default 1000: the events spread
//! evenly over that many content ids, each with a content row; 3 and 100000 are the other
//! spreads docs/benchmarks.md reports), `--sinks clickhouse,redis,http` (default all
//! three), `--rate N` (default 1000), `--seconds N` (default 30), `--tls` (every connection
//! over TLS with `verify-full`, Redis with a client certificate; pg_recvlogical over TLS too),
//! `--clusters` (a Redis Cluster of three masters with a replica each and a ClickHouse
//! cluster of two shards, the test support's, instead of single servers; the engine inserts
//! straight into the shards, `[clickhouse] shard_urls`, unless `--through-distributed`),
//! `--pg-socket` (the engine reaches Postgres through its Unix socket rather than TCP on
//! loopback), `--journal off` (`journal.max_bytes = 0`; on by default, as in the engine), `--binary off`
//! (`postgres.binary = false`: column values as text), `--first
//! engine|recvlogical` (which catch-up reads first; `recvlogical` by default —
//! `scripts/bench.sh` alternates). Catch-up ends when every sink has every event
//! (`events_delivered`), with or without the journal. CPU is reported per process, in
//! seconds and in µs per event.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

struct Options {
    /// Every connection over TLS, verified (`--tls`).
    tls: bool,
    events: u64,
    /// Content ids the events are spread over.
    contents: u64,
    sinks: Vec<String>,
    rate: u64,
    seconds: u64,
    journal: bool,
    /// Column values in binary form (`postgres.binary`, on by default as in the engine).
    binary: bool,
    /// Which catch-up reads first: `pg_recvlogical` (`recvlogical`) or the `engine`.
    engine_first: bool,
    /// A Redis Cluster and a ClickHouse cluster instead of single servers (`--clusters`).
    clusters: bool,
    /// On the ClickHouse cluster, insert through the Distributed table rather than straight
    /// to the shards (`--through-distributed`).
    through_distributed: bool,
    /// The engine and `pg_recvlogical` reach Postgres through its Unix socket instead of
    /// TCP on loopback (`--pg-socket`).
    pg_socket: bool,
}

fn options() -> Options {
    let mut o = Options {
        tls: false,
        events: 500_000,
        contents: 1000,
        sinks: vec!["clickhouse".into(), "redis".into(), "http".into()],
        rate: 1000,
        seconds: 30,
        journal: true,
        binary: true,
        engine_first: false,
        clusters: false,
        through_distributed: false,
        pg_socket: false,
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--tls" {
            o.tls = true;
            i += 1;
            continue;
        }
        if args[i] == "--clusters" {
            o.clusters = true;
            i += 1;
            continue;
        }
        if args[i] == "--pg-socket" {
            o.pg_socket = true;
            i += 1;
            continue;
        }
        if args[i] == "--through-distributed" {
            o.through_distributed = true;
            i += 1;
            continue;
        }
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--events" => o.events = v.parse().expect("--events N"),
            "--contents" => {
                o.contents = v.parse().expect("--contents N");
                assert!(o.contents >= 1, "--contents is at least 1");
            }
            "--sinks" => o.sinks = v.split(',').map(str::to_string).collect(),
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--seconds" => o.seconds = v.parse().expect("--seconds N"),
            "--binary" => {
                o.binary = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => panic!("--binary on|off"),
                }
            }
            "--journal" => {
                o.journal = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => panic!("--journal on|off"),
                }
            }
            "--first" => {
                o.engine_first = match v.as_str() {
                    "engine" => true,
                    "recvlogical" => false,
                    _ => panic!("--first engine|recvlogical"),
                }
            }
            other => panic!("unknown option {other}; see the header of benches/e2e.rs"),
        }
        i += 2;
    }
    assert!(
        !(o.tls && o.pg_socket),
        "--pg-socket and --tls together: Postgres offers no TLS on its Unix socket; choose one"
    );
    o
}

/// What the engine's catch-up measured.
struct CatchUp<'a> {
    engine: Engine,
    engine_secs: f64,
    peak_catch_up_mb: f64,
    /// The engine's minor page faults (it starts for the catch-up).
    engine_faults: u64,
    /// Times the engine's runtime thread and the walsender gave up the CPU to wait
    /// (`voluntary_ctxt_switches`): how often each slept and was woken again.
    engine_waits: u64,
    walsender_waits: u64,
    /// Times each was made to give up the CPU (`nonvoluntary_ctxt_switches`), and moved
    /// to another CPU (`se.nr_migrations` of `/proc/<pid>/sched`).
    engine_preempted: u64,
    walsender_preempted: u64,
    engine_migrations: u64,
    walsender_migrations: u64,
    /// What the kernel's TCP stack did meanwhile, machine-wide (counters that moved).
    tcp: Vec<(String, u64)>,
    /// Batches the engine made of the backlog.
    batches: u64,
    /// CPU seconds of the engine and of the walsender.
    engine_cpu: f64,
    pg_cpu: f64,
    /// CPU seconds of each kind of server (all nodes of a cluster together).
    server_cpu: Vec<(&'a str, f64)>,
    /// Redis's `INFO commandstats`, summed up (one server only).
    redis_commands: String,
    /// On clusters, each node's CPU µs per event.
    node_cpu: Vec<String>,
}

/// A numeric field of `/proc/<pid>/status` (`VmHWM:`, `voluntary_ctxt_switches:`…); the
/// main thread's for the thread counts, which is the engine's runtime thread.
fn status_field(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A numeric field of `/proc/<pid>/sched` (`se.nr_migrations`…).
fn sched_field(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/sched"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.split_whitespace().next() == Some(field))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The kernel's TCP counters, machine-wide: `/proc/net/snmp`'s `Tcp:` and
/// `/proc/net/netstat`'s `TcpExt:` rows (header line, then values), as `TcpOutSegs`,
/// `TcpExtTCPRcvCoalesce`…
fn tcp_counters() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let mut names = names.split_whitespace();
            let mut values = values.split_whitespace();
            let prefix = names.next().unwrap_or("").trim_end_matches(':');
            values.next();
            if prefix != "Tcp" && prefix != "TcpExt" {
                continue;
            }
            for (name, value) in names.zip(values) {
                if let Ok(v) = value.parse::<u64>() {
                    out.push((format!("{prefix}{name}"), v));
                }
            }
        }
    }
    out
}

fn main() {
    let o = options();
    let certs = Certs::new();
    let pg = Postgres::start_with(PgOptions {
        extra_conf: "max_wal_size = 4GB\ncheckpoint_timeout = 30min\n".into(),
        // pg_recvlogical then reads over TLS too (libpq's default, prefer, takes it).
        tls: o.tls.then(|| (certs.server_cert(), certs.server_key())),
        hostssl_only: o.tls,
        ..Default::default()
    });
    pg.create_database("engagement", true);
    let sql = |q: &str| pg.psql("engagement", q);
    let (ch, redis, api) = if o.tls {
        (
            ClickHouse::start_tls(&certs),
            Redis::start_tls(&certs),
            MockApi::start_tls(&certs),
        )
    } else {
        (ClickHouse::start(), Redis::start(), MockApi::start(&[]))
    };
    let clusters =
        (o.clusters && !o.tls).then(|| (ClickHouseCluster::start(), RedisCluster::start()));
    let ca = certs.ca().display().to_string();
    let mut sections = String::new();
    for s in &o.sinks {
        match (s.as_str(), o.tls) {
            ("clickhouse", false) => match &clusters {
                Some((chc, _)) => {
                    sections += &format!(
                        "[clickhouse]\nurl = \"{}\"\ncluster = \"{}\"\n",
                        chc.url(),
                        ClickHouseCluster::NAME
                    );
                    if !o.through_distributed {
                        // Shard 1 on nodes[0], shard 2 on nodes[1] and nodes[2].
                        let url = |i: usize| format!("\"{}\"", chc.nodes[i].url());
                        sections += &format!(
                            "shard_urls = [[{}], [{}, {}]]\n",
                            url(0),
                            url(1),
                            url(2)
                        );
                    }
                }
                None => sections += &format!("[clickhouse]\nurl = \"{}\"\n", ch.url()),
            },
            ("clickhouse", true) => {
                sections += &format!(
                    "[clickhouse]\nurl = \"{}\"\nca_file = \"{ca}\"\n",
                    ch.https_url()
                )
            }
            ("redis", false) => {
                let url = clusters
                    .as_ref()
                    .map_or_else(|| redis.url(), |(_, rc)| rc.url());
                sections += &format!("[redis]\nurl = \"{url}\"\n")
            }
            ("redis", true) => {
                sections += &format!(
                    "[redis]\nurl = \"{}\"\nca_file = \"{ca}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                    redis.url(),
                    certs.client_cert().display(),
                    certs.client_key().display()
                )
            }
            ("http", false) => sections += &format!("[http]\nurl = \"{}\"\n", api.url()),
            ("http", true) => {
                sections += &format!("[http]\nurl = \"{}\"\nca_file = \"{ca}\"\n", api.url())
            }
            ("stdout", _) => sections += "[stdout]\nenabled = true\n",
            (other, _) => panic!("unknown sink {other}"),
        }
    }
    let pg_url = if o.tls {
        format!(
            "postgres://postgres@localhost:{}/engagement?sslmode=verify-full&sslrootcert={ca}",
            pg.port
        )
    } else if o.pg_socket {
        format!(
            "postgres://postgres@/engagement?host={}&port={}",
            pg.socket_dir().display(),
            pg.port
        )
    } else {
        pg.url("engagement")
    };
    if !o.journal {
        sections += "[journal]\nmax_bytes = 0\n";
    }
    let pg_keys = if o.binary { "" } else { "binary = false\n" };
    let cfg = TestConfig::with_postgres(&pg_url, pg_keys, &sections);
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "setup: {setup:?}");
    sql("SELECT pg_create_logical_replication_slot('bench_raw', 'pgoutput')");
    // pg_recvlogical is measured over both ways to the server: TCP on loopback, as the
    // engine connects by default, and the Unix socket, where its walsender does about half
    // the work per event (its own reads wake it per message over TCP). The ratio is taken
    // against the faster. Not under --tls: the socket carries no TLS.
    if !o.tls {
        sql("SELECT pg_create_logical_replication_slot('bench_raw_socket', 'pgoutput')");
    }

    // Content rows for every id the events use (the migration has 1–3).
    sql(&format!(
        "INSERT INTO content (content_id, content_type, length_seconds)
         SELECT g, (ARRAY['video','podcast','article'])[1 + g % 3], 60 + g % 3600
           FROM generate_series(1, {}) g ON CONFLICT (content_id) DO NOTHING",
        o.contents
    ));
    // The backlog: 1000-row transactions, content ids spread evenly (each transaction walks
    // on from where the last one stopped).
    let t = Instant::now();
    let mut script = String::new();
    for tx in 0..o.events / 1000 {
        script.push_str(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) \
             SELECT 1 + ({} + g) % {}, g, 'play', g % 300000, 'web' FROM generate_series(1, 1000) g;\n",
            tx * 1000,
            o.contents
        ));
    }
    let file = cfg.dir.path.join("backlog.sql");
    std::fs::write(&file, script).unwrap();
    pg.psql_file("engagement", &file);
    let n: u64 = sql("SELECT count(*) FROM engagement_events")
        .parse()
        .unwrap();
    let end = sql("SELECT pg_current_wal_lsn()");
    eprintln!(
        "backlog: {n} events in {:.1}s, WAL end {end}",
        t.elapsed().as_secs_f64()
    );

    // Raw: pg_recvlogical to the end of the backlog.
    let raw_one = |socket: bool| {
        let slot = if socket {
            "bench_raw_socket"
        } else {
            "bench_raw"
        };
        let t = Instant::now();
        let mut recvlogical = pg.client(&format!("{PG_BIN}/pg_recvlogical"), "engagement");
        if socket {
            // A later -h wins: the socket's directory instead of 127.0.0.1.
            recvlogical.arg("-h").arg(pg.socket_dir());
        }
        let mut out = recvlogical
            .args([
                "--slot",
                slot,
                "--start",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=engagement_cdc",
            ])
            .args(["--endpos", &end, "-f", "/dev/null"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The CPU of the walsender serving it, sampled every 10 ms while it reads (it cannot
        // be read once the walsender has gone): the last sample is within 10 ms of its end.
        let active =
            format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'");
        let (mut walsender, mut walsender_cpu) = (None::<i32>, 0.0);
        while out.try_wait().unwrap().is_none() {
            match walsender {
                None => walsender = sql(&active).parse().ok().filter(|p| *p > 0),
                Some(pid) => walsender_cpu = cpu_seconds(pid).max(walsender_cpu),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let raw_secs = t.elapsed().as_secs_f64();
        let out = out.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "pg_recvlogical: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw_rate = n as f64 / raw_secs;
        (raw_secs, raw_rate, walsender_cpu)
    };
    // Both ways, in the order opposite to the engine's: the one read nearer the engine's
    // catch-up alternates with --first as the engine's place does.
    let raw = || {
        if o.tls {
            return (raw_one(false), None);
        }
        if o.engine_first {
            let socket = raw_one(true);
            (raw_one(false), Some(socket))
        } else {
            let tcp = raw_one(false);
            (tcp, Some(raw_one(true)))
        }
    };

    // Engine: from start to checkpoint past the end.
    let cpu = |pids: &[i32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let catch_up = || {
        // On clusters, the CPU of every node of each (ZooKeeper's not counted).
        let servers: [(&str, Vec<i32>); 3] = match &clusters {
            Some((chc, rc)) => [
                ("clickhouse", chc.nodes.iter().map(|n| n.pid()).collect()),
                ("redis", rc.nodes.iter().map(|n| n.pid()).collect()),
                ("mock-api", vec![api.pid()]),
            ],
            None => [
                ("clickhouse", vec![ch.pid()]),
                ("redis", vec![redis.pid()]),
                ("mock-api", vec![api.pid()]),
            ],
        };
        let servers_before: Vec<f64> = servers.iter().map(|(_, p)| cpu(p)).collect();
        // On clusters, each node apart too, and ZooKeeper: where the clusters' CPU goes.
        let nodes: Vec<(String, i32)> = match &clusters {
            Some((chc, rc)) => chc
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("clickhouse node {i}"), n.pid()))
                .chain(
                    rc.nodes
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (format!("redis node {i}"), n.pid())),
                )
                .chain([("zookeeper".to_string(), chc.zookeeper.pid())])
                .collect(),
            None => Vec::new(),
        };
        let nodes_before: Vec<f64> = nodes.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        // Redis's own account of the catch-up's commands (those the script calls included);
        // on a Redis Cluster, its three masters' summed.
        match &clusters {
            None => {
                redis.cli(&["CONFIG", "RESETSTAT"]);
            }
            Some((_, rc)) => {
                for node in &rc.nodes {
                    node.cli(&["CONFIG", "RESETSTAT"]);
                }
            }
        }
        let tcp_before = tcp_counters();
        let t = Instant::now();
        let engine = Engine::spawn_with(
            &cfg.path,
            &["run"],
            &[("ENGAGEMENT_CDC_LOG", "warn")],
            Stdout::Discard,
        );
        // BENCH_PERF=FILE: record a CPU profile of the engine's catch-up with perf;
        // BENCH_PERF_ALL=FILE: of every process on the machine (which server spends what).
        let perf = match (std::env::var("BENCH_PERF"), std::env::var("BENCH_PERF_ALL")) {
            (Ok(file), _) => Some(perf_record(&file, Some(engine.pid()))),
            (_, Ok(file)) => Some(perf_record(&file, None)),
            _ => None,
        };
        // BENCH_TRACE=FILE: the engine's system calls during the catch-up (`perf trace`), each
        // with its arguments and result: how often it reads the replication socket, and how
        // much each read finds.
        let trace = std::env::var("BENCH_TRACE").ok().map(|file| {
            Command::new("perf")
                .args([
                    "trace",
                    "-e",
                    "recvfrom,sendto,read,write,epoll_wait,nanosleep,clock_nanosleep",
                    "-o",
                    &file,
                    "-p",
                ])
                .arg(engine.pid().to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf")
        });
        // The end, from the engine's status: asked every 100 ms while more than a twentieth
        // is left, then every 5 ms. Each answer costs the engine a connection and a JSON
        // document; asked every 20 ms throughout, that was 2 % of its catch-up CPU.
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let delivered = cfg.counter("events_delivered").unwrap_or(0);
            if delivered >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 1800 s waiting for the engine to catch up ({delivered} of {n} events delivered)"
            );
            let near = delivered >= n - n / 20;
            std::thread::sleep(Duration::from_millis(if near { 5 } else { 100 }));
        }
        let engine_secs = t.elapsed().as_secs_f64();
        if let Some(p) = perf {
            perf_stop(p);
        }
        if let Some(p) = trace {
            perf_stop(p);
        }
        let redis_commands = match &clusters {
            None => redis_command_stats(&redis.cli(&["INFO", "commandstats"]), n),
            Some((_, rc)) => {
                let masters: Vec<String> = rc.nodes[..3]
                    .iter()
                    .map(|node| node.cli(&["INFO", "commandstats"]))
                    .collect();
                redis_command_stats(&masters.join("\n"), n)
            }
        };
        let peak_catch_up_mb = status_field(engine.pid(), "VmHWM:") as f64 / 1024.0;
        let engine_cpu = cpu_seconds(engine.pid());
        let engine_faults = minor_faults(engine.pid());
        let batches = cfg.counter("batches").unwrap_or(0);
        // The walsender was started for this session: all its CPU time is the catch-up's.
        let walsender: i32 =
            sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'")
                .parse()
                .unwrap_or(0);
        let pg_cpu = cpu(&[walsender]);
        let engine_waits = status_field(engine.pid(), "voluntary_ctxt_switches:");
        let walsender_waits = status_field(walsender, "voluntary_ctxt_switches:");
        let engine_preempted = status_field(engine.pid(), "nonvoluntary_ctxt_switches:");
        let walsender_preempted = status_field(walsender, "nonvoluntary_ctxt_switches:");
        let engine_migrations = sched_field(engine.pid(), "se.nr_migrations");
        let walsender_migrations = sched_field(walsender, "se.nr_migrations");
        let tcp: Vec<(String, u64)> = tcp_counters()
            .into_iter()
            .filter_map(|(name, after)| {
                let before = tcp_before
                    .iter()
                    .find(|(b, _)| *b == name)
                    .map_or(0, |b| b.1);
                (after > before).then(|| (name, after - before))
            })
            .collect();
        let server_cpu: Vec<(&str, f64)> = servers
            .iter()
            .zip(&servers_before)
            .map(|((name, pids), before)| (*name, cpu(pids) - before))
            .collect();
        let node_cpu: Vec<String> = nodes
            .iter()
            .zip(&nodes_before)
            .map(|((name, pid), before)| {
                format!(
                    "{name} {:.2}",
                    (cpu_seconds(*pid) - before) * 1e6 / n as f64
                )
            })
            .collect();
        CatchUp {
            engine,
            engine_secs,
            peak_catch_up_mb,
            engine_cpu,
            engine_faults,
            engine_waits,
            walsender_waits,
            engine_preempted,
            walsender_preempted,
            engine_migrations,
            walsender_migrations,
            tcp,
            batches,
            pg_cpu,
            server_cpu,
            redis_commands,
            node_cpu,
        }
    };
    let (((raw_secs, raw_rate, raw_walsender_cpu), raw_socket), cu) = if o.engine_first {
        let e = catch_up();
        (raw(), e)
    } else {
        let r = raw();
        (r, catch_up())
    };
    let engine_rate = n as f64 / cu.engine_secs;
    // Steady state: ClickHouse done merging the backlog's parts, Postgres done vacuuming and
    // analyzing the backlog.
    sql("VACUUM ANALYZE engagement_events");
    wait_for(
        "ClickHouse to finish merging",
        Duration::from_secs(300),
        || {
            let node = clusters.as_ref().map_or(&ch, |(chc, _)| &chc.nodes[0]);
            (node.query("SELECT count() FROM system.merges") == "0").then_some(())
        },
    );
    wait_for("autovacuum to finish", Duration::from_secs(300), || {
        (sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
            == "0")
            .then_some(())
    });
    // A fresh process for the steady state, so its latencies are not the backlog's.
    let mut engine = cu.engine;
    assert_eq!(engine.terminate(), 0);
    let log = std::env::var("BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into());
    let engine = Engine::spawn_with(
        &cfg.path,
        &["run"],
        &[("ENGAGEMENT_CDC_LOG", log.as_str())],
        Stdout::Discard,
    );
    wait_for(
        "the engine to stream again",
        Duration::from_secs(60),
        || {
            cfg.engine_status()
                .filter(|s| s["streaming"] == true)
                .map(|_| ())
        },
    );
    // After a reconnect the walsender decodes again from the slot's restart_lsn (the
    // backlog) before it sends anything new: wait for a probe event to come through.
    sql("INSERT INTO engagement_events (content_id, user_id, event_type) VALUES (1, 0, 'probe')");
    wait_for("the probe event", Duration::from_secs(120), || {
        cfg.counter("events_delivered")
            .filter(|d| *d >= 1)
            .map(|_| ())
    });

    // Steady state at --rate, with the CPU each process spends on it.
    let walsender: i32 =
        sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'")
            .parse()
            .unwrap_or(0);
    let steady_pids: Vec<(&str, Vec<i32>)> = {
        let mut pids = vec![
            ("engine", vec![engine.pid()]),
            ("walsender", vec![walsender]),
        ];
        match &clusters {
            Some((chc, rc)) => {
                pids.push(("clickhouse", chc.nodes.iter().map(|n| n.pid()).collect()));
                pids.push(("redis", rc.nodes.iter().map(|n| n.pid()).collect()));
            }
            None => {
                pids.push(("clickhouse", vec![ch.pid()]));
                pids.push(("redis", vec![redis.pid()]));
            }
        }
        pids.push(("mock-api", vec![api.pid()]));
        pids
    };
    let steady_before: Vec<f64> = steady_pids.iter().map(|(_, p)| cpu(p)).collect();
    // The load's own CPU (a child this process waits for) and its Postgres backends' (the
    // postmaster's children, counted once they exit: after the load).
    let postmaster = parent_pid(walsender);
    let load_before = waited_children_cpu_seconds();
    let backends_before = postmaster.map(reaped_children_cpu_seconds);
    let children_before = postmaster.map_or(0, children_of);
    if clusters.is_none() {
        redis.cli(&["CONFIG", "RESETSTAT"]);
    }
    let api_requests = || api.stats()["requests"].as_u64().unwrap_or(0);
    let api_requests_before = api_requests();
    // BENCH_PERF_STEADY=FILE: a CPU profile of the engine during the steady load.
    let steady_perf = std::env::var("BENCH_PERF_STEADY")
        .ok()
        .map(|file| perf_record(&file, Some(engine.pid())));
    let load = cli(
        Some(&cfg.path),
        &[
            "load",
            "--rate",
            &o.rate.to_string(),
            "--duration",
            &format!("{}s", o.seconds),
            "--batch",
            "1",
            "--connections",
            "4",
        ],
        &[],
    );
    assert_eq!(load.code, 0, "load: {load:?}");
    let load_cpu = waited_children_cpu_seconds() - load_before;
    let total: u64 = sql("SELECT count(*) FROM engagement_events")
        .parse()
        .unwrap();
    wait_for(
        "the engine to deliver the load",
        Duration::from_secs(120),
        || {
            cfg.counter("events_delivered")
                .filter(|d| *d >= total - n)
                .map(|_| ())
        },
    );
    if let Some(p) = steady_perf {
        perf_stop(p);
    }
    // The load's backends count once the postmaster has reaped them.
    wait_for(
        "the load's backends to exit",
        Duration::from_secs(60),
        || (postmaster.map_or(0, children_of) <= children_before).then_some(()),
    );
    let backends_cpu = postmaster
        .zip(backends_before)
        .map(|(pm, before)| reaped_children_cpu_seconds(pm) - before);
    let steady_rss_mb = status_field(engine.pid(), "VmRSS:") as f64 / 1024.0;
    let steady_events = (total - n) as f64;
    let steady_api_requests = api_requests() - api_requests_before;
    let steady_redis = match &clusters {
        None => redis_command_stats(&redis.cli(&["INFO", "commandstats"]), total - n),
        Some(_) => String::new(),
    };
    let steady_cpu: Vec<String> = steady_pids
        .iter()
        .zip(&steady_before)
        .map(|((name, pids), before)| {
            format!("{name} {:.2}", (cpu(pids) - before) * 1e6 / steady_events)
        })
        .collect();
    let status = cfg.engine_status().unwrap();
    let lat = &status["commit_to_sink"];
    // (The probe's own latency is one sample among the load's.)

    println!("## engagement-cdc end-to-end benchmark");
    println!();
    println!(
        "sinks: {}{}; backlog {n} events in 1000-row transactions over {} content ids; {}; journal {}; column values in {}",
        o.sinks.join(", "),
        match (clusters.is_some(), o.through_distributed) {
            (false, _) => String::new(),
            (true, through) => format!(
                " (a 3-master Redis Cluster with a replica each; a ClickHouse cluster of 2 shards, one with 2 replicas, inserts {})",
                if through { "through the Distributed table" } else { "straight to the shards" }
            ),
        },
        o.contents,
        if o.tls {
            "every connection over TLS (verify-full)"
        } else {
            "plaintext connections"
        },
        if o.journal { "on" } else { "off" },
        if o.binary { "binary" } else { "text" }
    );
    println!(
        "read first: {}",
        if o.engine_first {
            "the engine, then pg_recvlogical"
        } else {
            "pg_recvlogical, then the engine"
        }
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| pg_recvlogical alone | {raw_rate:.0} events/s ({raw_secs:.2} s) |");
    println!(
        "| CPU µs per event of pg_recvlogical's walsender (text values) | {:.2} ({raw_walsender_cpu:.2} s) |",
        raw_walsender_cpu * 1e6 / n as f64
    );
    if let Some((secs, rate, walsender_cpu)) = raw_socket {
        println!(
            "| pg_recvlogical alone over the Unix socket | {rate:.0} events/s ({secs:.2} s) |"
        );
        println!(
            "| CPU µs per event of that walsender (text values) | {:.2} ({walsender_cpu:.2} s) |",
            walsender_cpu * 1e6 / n as f64
        );
    }
    println!(
        "| engine catch-up, all listed sinks | {engine_rate:.0} events/s ({:.2} s) |",
        cu.engine_secs
    );
    println!(
        "| engine / pg_recvlogical | {:.0} % |",
        100.0 * engine_rate / raw_rate
    );
    if let Some((_, rate, _)) = raw_socket {
        println!(
            "| engine / pg_recvlogical over the Unix socket | {:.0} % |",
            100.0 * engine_rate / rate
        );
        println!(
            "| engine / the faster pg_recvlogical | {:.0} % |",
            100.0 * engine_rate / rate.max(raw_rate)
        );
    }
    println!(
        "| peak RSS during catch-up | {:.1} MB |",
        cu.peak_catch_up_mb
    );
    println!(
        "| batches during catch-up | {} ({:.0} events a batch) |",
        cu.batches,
        n as f64 / cu.batches.max(1) as f64
    );
    println!(
        "| engine's minor page faults during catch-up | {} ({:.3} per event) |",
        cu.engine_faults,
        cu.engine_faults as f64 / n as f64
    );
    let per_k = |v: u64| v as f64 * 1000.0 / n as f64;
    println!(
        "| waits during catch-up (voluntary context switches; per 1000 events) | engine {} ({:.1}), walsender {} ({:.1}) |",
        cu.engine_waits,
        per_k(cu.engine_waits),
        cu.walsender_waits,
        per_k(cu.walsender_waits)
    );
    println!(
        "| preempted and moved to another CPU during catch-up (per 1000 events) | engine {:.1} and {:.1}, walsender {:.1} and {:.1} |",
        per_k(cu.engine_preempted),
        per_k(cu.engine_migrations),
        per_k(cu.walsender_preempted),
        per_k(cu.walsender_migrations)
    );
    // The loopback TCP counters that tell how the walsender's writes travelled: segments,
    // what the receiving side coalesced or had to collapse, delayed ACKs.
    let tcp: Vec<String> = [
        "TcpOutSegs",
        "TcpActiveOpens",
        "TcpExtTCPRcvCoalesce",
        "TcpExtTCPBacklogCoalesce",
        "TcpExtTCPRcvCollapsed",
        "TcpExtPruneCalled",
        "TcpExtDelayedACKs",
        "TcpExtTCPHPHits",
        "TcpExtTCPPureAcks",
        "TcpExtTCPHPAcks",
        "TcpExtTCPAutoCorking",
        "TcpExtTCPBacklogDrop",
        "TcpExtTCPRcvQDrop",
    ]
    .iter()
    .filter_map(|name| {
        let (_, v) = cu.tcp.iter().find(|(n, _)| n == name)?;
        Some(format!(
            "{} {:.1}",
            name.trim_start_matches("TcpExt"),
            per_k(*v)
        ))
    })
    .collect();
    println!(
        "| TCP during catch-up, whole machine (per 1000 events) | {} |",
        if tcp.is_empty() {
            "none counted".to_string()
        } else {
            tcp.join(", ")
        }
    );
    let mut cpu_line = format!("engine {:.2}, walsender {:.2}", cu.engine_cpu, cu.pg_cpu);
    for (name, c) in &cu.server_cpu {
        cpu_line += &format!(", {name} {c:.2}");
    }
    println!(
        "| CPU seconds during catch-up | {cpu_line} (of {:.2} s × 2 cores) |",
        cu.engine_secs
    );
    let per_event = |c: f64| c * 1e6 / n as f64;
    let mut per_event_line = format!(
        "engine {:.2}, walsender {:.2}",
        per_event(cu.engine_cpu),
        per_event(cu.pg_cpu)
    );
    for (name, c) in &cu.server_cpu {
        per_event_line += &format!(", {name} {:.2}", per_event(*c));
    }
    println!("| CPU µs per event during catch-up | {per_event_line} |");
    if !cu.node_cpu.is_empty() {
        println!(
            "| CPU µs per event during catch-up, each node (Redis nodes 0-2 started as masters) | {} |",
            cu.node_cpu.join(", ")
        );
    }
    if !cu.redis_commands.is_empty() {
        println!(
            "| Redis commands during catch-up (INFO commandstats{}; µs per event) | {} |",
            if clusters.is_some() {
                ", the three masters summed"
            } else {
                ""
            },
            cu.redis_commands
        );
    }
    println!(
        "| RSS at steady state ({} events/s for {} s) | {steady_rss_mb:.1} MB |",
        o.rate, o.seconds
    );
    println!(
        "| commit-to-read p50 / p99 at {} events/s | {} / {} ms |",
        o.rate, status["commit_to_read"]["p50_ms"], status["commit_to_read"]["p99_ms"]
    );
    for s in &o.sinks {
        println!(
            "| commit-to-{s} p50 / p99 at {} events/s | {} / {} ms |",
            o.rate, lat[s]["p50_ms"], lat[s]["p99_ms"]
        );
    }
    println!(
        "| CPU µs per event at steady state ({} events/s) | {} |",
        o.rate,
        steady_cpu.join(", ")
    );
    println!(
        "| CPU µs per event of the load itself: `engagement-cdc load`, its Postgres backends | {:.2}, {} |",
        load_cpu * 1e6 / steady_events,
        backends_cpu.map_or("unknown".into(), |c| format!("{:.2}", c * 1e6 / steady_events))
    );
    if !steady_redis.is_empty() {
        println!(
            "| Redis commands at steady state (INFO commandstats; µs per event) | {steady_redis} |"
        );
    }
    if o.sinks.iter().any(|s| s == "http") {
        println!(
            "| API requests at steady state | {steady_api_requests} ({:.1} events per request) |",
            steady_events / steady_api_requests.max(1) as f64
        );
    }
    println!("| load achieved | {} |", load.stdout.trim());
    if std::env::var("BENCH_ENGINE_LOG").is_ok() {
        eprintln!("{}", engine.stderr());
    }
    drop(engine);
}

/// The commands of `INFO commandstats` answers (one or several servers', summed) with the
/// most time first: name, calls, and microseconds per event of `n` (the script's own
/// commands appear beside `evalsha`, whose time includes theirs).
fn redis_command_stats(info: &str, n: u64) -> String {
    let mut rows: Vec<(String, u64, f64)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                rest.split(',')
                    .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            Some((name.to_string(), field("calls")? as u64, field("usec")?))
        })
        .fold(
            Vec::new(),
            |mut rows: Vec<(String, u64, f64)>, (name, calls, usec)| {
                // Several servers' answers: summed by command.
                match rows.iter_mut().find(|r| r.0 == name) {
                    Some(r) => {
                        r.1 += calls;
                        r.2 += usec;
                    }
                    None => rows.push((name, calls, usec)),
                }
                rows
            },
        );
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    rows.iter()
        .take(8)
        .map(|(name, calls, usec)| format!("{name} {calls} calls {:.3}", usec / n as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `perf record` of one process (`pid`, with DWARF call graphs) or of the whole machine.
fn perf_record(file: &str, pid: Option<i32>) -> std::process::Child {
    let mut cmd = Command::new("perf");
    // BENCH_PERF_EVENT: what to sample instead of CPU time (e.g. `page-faults`).
    match std::env::var("BENCH_PERF_EVENT") {
        Ok(event) => cmd.args(["record", "-e", &event, "-g", "-o", file]),
        Err(_) => cmd.args(["record", "-F", "2000", "-g", "-o", file]),
    };
    match pid {
        Some(pid) => {
            cmd.args(["--call-graph", "dwarf,16384", "-p"])
                .arg(pid.to_string());
        }
        None => {
            cmd.arg("-a");
        }
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf")
}

/// Stop a `perf record` so that it writes its file.
fn perf_stop(mut p: std::process::Child) {
    unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
    let _ = p.wait();
}
