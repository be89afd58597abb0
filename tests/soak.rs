//! The chaos soak (docs/guarantees.md, "Chaos soak"): steady load of mixed transaction
//! sizes — most small, some of 100,000 rows — while a fault hits the stack every few
//! seconds: kill -9 of the engine, a crash restart of Postgres, Redis stopped (SIGSTOP),
//! ClickHouse stopped, the API failing, slow and down. At the end every event must be in
//! ClickHouse `FINAL` once, Redis's counters must equal Postgres's per content, the API must
//! hold every id (after a DLQ replay), and the engine's memory must have stayed bounded.
//!
//! `SOAK_MINUTES` sets the length (2 in the test suite); `scripts/soak.sh --minutes N` runs
//! it and keeps the report (`SOAK_REPORT=FILE`).

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(300);

/// The tests here measure under load: one at a time, whatever `--test-threads` says.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A small deterministic generator (xorshift), seeded from the clock and printed, so a run
/// can be repeated with `SOAK_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo * 1000, hi * 1000))
    }
}

const FAULTS: [&str; 7] = [
    "kill -9 of the engine",
    "Postgres crash restart",
    "Redis stopped (SIGSTOP)",
    "ClickHouse stopped",
    "API failing 50 %",
    "API slow (50 % of requests 1.5 s)",
    "API down",
];

/// Whether `done` holds within `limit`, polled every 200 ms.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

fn peak_rss_mb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

#[test]
fn chaos_soak() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(2.0);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let started = Instant::now();

    let pg = Postgres::start();
    let mut ch = ClickHouse::start();
    let redis = Redis::start();
    let ids = TestDir::new("soak");
    let ids_file = ids.path.join("api-ids");
    let mut api = MockApi::start(&["--ids-file", ids_file.to_str().unwrap()]);
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!(
            "[clickhouse]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n\n[http]\nurl = \"{}\"\ntimeout_ms = 1000\n",
            ch.url(),
            redis.url(),
            api.url()
        ),
    );
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    let spawn = || Engine::spawn(&cfg.path, &["run"], &[]);
    let mut engine = spawn();
    let mut peak_mb = 0u64;
    let mut restarts_after_exit = 0u32;

    // The load: transactions of 1–50 rows mostly, 500–2,000 rows often, 100,000 rows about
    // every 40 s. Failures while Postgres is down are expected; Postgres's table is the truth.
    let stop = Arc::new(AtomicBool::new(false));
    let committed_tx = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, committed_tx) = (stop.clone(), committed_tx.clone());
        let url = pg.url("engagement");
        let mut rng = Rng(seed.rotate_left(17) | 1);
        std::thread::spawn(move || {
            let mut last_big = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let rows = if last_big.elapsed() >= Duration::from_secs(40) {
                    last_big = Instant::now();
                    100_000
                } else if rng.between(0, 3) == 0 {
                    rng.between(500, 2000)
                } else {
                    rng.between(1, 50)
                };
                let ok = std::process::Command::new("psql")
                    .args([&url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c"])
                    .arg(format!(
                        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
                         SELECT 1 + (g * 7) % 3, g, (ARRAY['play','pause','seek'])[1 + g % 3], g % 9000, 'web'
                         FROM generate_series(1, {rows}) g"
                    ))
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if ok {
                    committed_tx.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let deadline = started + Duration::from_secs_f64(minutes * 60.0);
    let mut survived: BTreeMap<&str, u32> = BTreeMap::new();
    let api_port = api.port;
    let api_control = |body: &str| {
        http_post(api_port, "/control", body.as_bytes());
    };
    while Instant::now() < deadline {
        // The pause between faults, then one fault; a supervisor restarts an engine that
        // exited (it exits 1 when it starts while Postgres is down).
        std::thread::sleep(rng.secs(3, 8));
        if engine.exited().is_some() {
            restarts_after_exit += 1;
            engine = spawn();
        }
        peak_mb = peak_mb.max(peak_rss_mb(engine.pid()));
        let fault = FAULTS[rng.between(0, FAULTS.len() as u64 - 1) as usize];
        match fault {
            "kill -9 of the engine" => {
                engine.kill9();
                engine = spawn();
            }
            "Postgres crash restart" => pg.crash_restart(),
            "Redis stopped (SIGSTOP)" => {
                redis.hang();
                std::thread::sleep(rng.secs(2, 6));
                redis.resume();
            }
            "ClickHouse stopped" => {
                ch.stop();
                std::thread::sleep(rng.secs(3, 10));
                ch.start_again();
            }
            "API failing 50 %" => {
                api_control("{\"fail_rate\":0.5}");
                std::thread::sleep(rng.secs(4, 10));
                api_control("{\"fail_rate\":0}");
            }
            "API slow (50 % of requests 1.5 s)" => {
                api_control("{\"slow_rate\":0.5,\"slow_ms\":1500}");
                std::thread::sleep(rng.secs(4, 10));
                api_control("{\"slow_rate\":0}");
            }
            _ => {
                api.stop();
                std::thread::sleep(rng.secs(3, 8));
                api.start_again();
            }
        }
        *survived.entry(fault).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    if engine.exited().is_some() {
        restarts_after_exit += 1;
        engine = spawn();
    }

    // Everything committed reaches ClickHouse and Redis exactly once.
    let count = |sql: &str| -> u64 { pg.psql("engagement", sql).parse().unwrap() };
    let events = count("SELECT count(*) FROM engagement_events");
    let pg_counts: BTreeMap<i64, u64> = pg
        .psql(
            "engagement",
            "SELECT content_id, count(*) FROM engagement_events GROUP BY 1 ORDER BY 1",
        )
        .lines()
        .map(|l| {
            let (c, n) = l.split_once('|').unwrap();
            (c.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    let redis_counts = || -> BTreeMap<i64, u64> {
        pg_counts
            .keys()
            .map(|c| {
                (
                    *c,
                    redis
                        .cli(&["GET", &format!("content:count:{c}")])
                        .parse()
                        .unwrap_or(0),
                )
            })
            .collect()
    };
    let ch_final = || -> u64 {
        ch.query("SELECT count() FROM engagement.events_enriched FINAL")
            .parse()
            .unwrap_or(0)
    };
    let held = wait_until(T, || ch_final() == events && redis_counts() == pg_counts);
    assert!(
        held,
        "after {} s ClickHouse FINAL holds {} of {events} events and Redis {:?} (Postgres {pg_counts:?}); faults {survived:?} (SOAK_SEED={seed} repeats them)\n{}engine stderr:\n{}",
        T.as_secs(),
        ch_final(),
        redis_counts(),
        clickhouse_gaps(&pg, &ch, &cfg),
        engine.stderr()
    );
    let unique: u64 = ch
        .query("SELECT uniqExact(event_id) FROM engagement.events_enriched FINAL")
        .parse()
        .unwrap();
    let api_stats = || api.stats();
    // ClickHouse and Redis hold everything, so the engine has read every event; SIGTERM
    // drains what the API still has in flight (delivered or dead-lettered). A drain cut short
    // by its 30 s limit leaves the rest after the checkpoint: start again and repeat.
    peak_mb = peak_mb.max(peak_rss_mb(engine.pid()));
    let mut stops = 0;
    loop {
        stops += 1;
        assert_eq!(engine.terminate(), 0, "{}", engine.stderr());
        if !engine.stderr().contains("did not finish") || stops >= 5 {
            break;
        }
        engine = spawn();
        wait_for("the engine to stream again", T, || {
            cfg.engine_status()
                .filter(|s| s["streaming"] == true)
                .map(|_| ())
        });
    }
    let dead = cli(Some(&cfg.path), &["dlq", "list", "--json"], &[]);
    let dead: u64 = serde_json::from_str::<Vec<serde_json::Value>>(&dead.stdout)
        .unwrap()
        .iter()
        .map(|l| l["events"].as_u64().unwrap())
        .sum();
    let mut replays = 0;
    while api_stats()["unique_event_ids"].as_u64() != Some(events) && replays < 20 {
        let replay = cli(Some(&cfg.path), &["dlq", "replay"], &[]);
        assert_eq!(replay.code, 0, "{replay:?}");
        replays += 1;
    }
    let at_api = api_stats()["unique_event_ids"].as_u64().unwrap();
    let api_resent = api_stats()["duplicates"].as_u64().unwrap();
    let invalid = api_stats()["invalid_events"].as_u64().unwrap();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "chaos soak: {minutes} min of faults, seed {seed}, {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        report,
        "events committed: {events} in {} transactions (largest 100,000 rows)",
        committed_tx.load(Ordering::Relaxed)
    );
    for (fault, n) in &survived {
        let _ = writeln!(report, "  survived {n:>3} × {fault}");
    }
    let _ = writeln!(
        report,
        "engine restarted by the supervisor after exiting: {restarts_after_exit}"
    );
    let _ = writeln!(
        report,
        "ClickHouse FINAL: {} rows, {unique} distinct ids (lost {}, doubled {})",
        ch_final(),
        events - unique.min(events),
        ch_final() - unique
    );
    let _ = writeln!(
        report,
        "Redis content:count per content: {:?} (Postgres: {pg_counts:?})",
        redis_counts()
    );
    let _ = writeln!(report, "API: {at_api} distinct ids of {events} (dead-lettered {dead}, replays {replays}); ids received twice: {api_resent}; malformed events: {invalid}");
    let _ = writeln!(report, "engine peak RSS: {peak_mb} MB");
    eprint!("{report}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        std::fs::write(path, &report).unwrap();
    }
    assert_eq!(unique, events, "lost events in ClickHouse");
    assert_eq!(ch_final(), events, "doubled events in ClickHouse");
    assert_eq!(
        redis_counts(),
        pg_counts,
        "Redis counters differ from Postgres"
    );
    assert_eq!(at_api, events, "events missing at the API");
    assert_eq!(invalid, 0, "the API received malformed events");
    assert!(peak_mb < 300, "engine peak RSS {peak_mb} MB");
    assert!(!survived.is_empty());
}

/// Where ClickHouse differs from Postgres, for a failure message: its rows with and without
/// `FINAL`, the ranges of event ids it lacks, and what `status` says of the sinks' cursors
/// and the journal.
fn clickhouse_gaps(pg: &Postgres, ch: &ClickHouse, cfg: &TestConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ClickHouse without FINAL: count, distinct ids = {}",
        ch.query(
            "SELECT concat(toString(count()), ', ', toString(uniqExact(event_id))) FROM engagement.events_enriched"
        )
    );
    let ids = |text: String| -> Vec<i64> { text.lines().filter_map(|l| l.parse().ok()).collect() };
    let in_pg = ids(pg.psql("engagement", "SELECT id FROM engagement_events ORDER BY id"));
    let in_ch =
        ids(ch.query("SELECT DISTINCT event_id FROM engagement.events_enriched ORDER BY event_id"));
    let in_ch: std::collections::BTreeSet<i64> = in_ch.into_iter().collect();
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for id in in_pg.into_iter().filter(|id| !in_ch.contains(id)) {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == id => *hi = id,
            _ => ranges.push((id, id)),
        }
    }
    let _ = writeln!(out, "ids missing in ClickHouse: {} ranges", ranges.len());
    for (lo, hi) in ranges.iter().take(10) {
        let _ = writeln!(out, "  {lo}..={hi} ({} ids)", hi - lo + 1);
    }
    let status = cli(Some(&cfg.path), &["status"], &[]);
    let _ = writeln!(out, "status:\n{}{}", status.stdout, status.stderr);
    out
}

/// `commit_to_sink_seconds` of `sink` on `/metrics`: (events within 1 s, all events).
fn within_1s(metrics: &str, sink: &str) -> (u64, u64) {
    let bucket = |le_wanted: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("engagement_cdc_commit_to_sink_seconds_bucket{"))
            .filter(|l| l.contains(&format!("sink=\"{sink}\"")))
            .find(|l| {
                l.split("le=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .is_some_and(|le| {
                        le == le_wanted || le.parse::<f64>().ok() == le_wanted.parse().ok()
                    })
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    (bucket("1.0"), bucket("+Inf"))
}

/// ClickHouse stopped for `OUTAGE_SECONDS` (30 in the suite) while `engagement-cdc load`
/// inserts `OUTAGE_RATE` events/s (1,000) over 1,000 content ids, with the journal on
/// (`OUTAGE_JOURNAL=off`: `journal.max_bytes = 0`, figures only). Sampled every second: the
/// slot's retained WAL and lag, the journal's size, how far ClickHouse is behind. With the
/// journal: retained WAL under 32 MB throughout, the slot confirmed during the outage past
/// what was committed 5 s before its end, Redis and the API delivering 99 % of the outage's
/// events within 1 s of their commit; always: ClickHouse drains when it returns and every
/// sink holds every event exactly once. `scripts/outage.sh` runs it for the figures in
/// docs/guarantees.md and keeps the report (`OUTAGE_REPORT=FILE`).
#[test]
fn clickhouse_outage_under_steady_load() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let env_num = |k: &str, d: u64| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let outage = env_num("OUTAGE_SECONDS", 30);
    let rate = env_num("OUTAGE_RATE", 1000);
    let journal = std::env::var("OUTAGE_JOURNAL").map_or(true, |v| v != "off");
    let warmup = 10u64;
    let after = 10u64;

    let pg = Postgres::start();
    let mut ch = ClickHouse::start();
    let redis = Redis::start();
    let api = MockApi::start(&[]);
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!(
            "[clickhouse]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n\n[http]\nurl = \"{}\"\ntimeout_ms = 1000\n{}",
            ch.url(),
            redis.url(),
            api.url(),
            if journal { "" } else { "\n[journal]\nmax_bytes = 0\n" }
        ),
    );
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    let mut engine = Engine::spawn(&cfg.path, &["run"], &[]);
    wait_for("the engine to stream", T, || {
        cfg.engine_status()
            .filter(|s| s["streaming"] == true)
            .map(|_| ())
    });
    let load = {
        let path = cfg.path.clone();
        let (rate, duration) = (rate.to_string(), format!("{}s", warmup + outage + after));
        std::thread::spawn(move || {
            cli(
                Some(&path),
                &[
                    "load",
                    "--rate",
                    &rate,
                    "--duration",
                    &duration,
                    "--batch",
                    "10",
                    "--contents",
                    "1000",
                ],
                &[],
            )
        })
    };
    let sql = |q: &str| pg.psql("engagement", q);
    let slot = |col: &str| -> i64 {
        sql(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), {col})::bigint FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'"
        ))
        .parse()
        .unwrap_or(-1)
    };
    let ch_rows = |ch: &ClickHouse| -> u64 {
        ch.query("SELECT count() FROM engagement.events_enriched FINAL")
            .parse()
            .unwrap_or(0)
    };
    let mut report = String::new();
    let _ = writeln!(
        report,
        "ClickHouse stopped {outage} s under {rate} events/s (1,000 content ids, 10-row transactions), journal {}",
        if journal { "on (1 GiB)" } else { "off (journal.max_bytes = 0)" }
    );
    let _ = writeln!(
        report,
        "   t  phase     retained_wal_MB  slot_lag_MB  journal_MB  ch_behind_batches"
    );
    let started = Instant::now();
    let mut max_retained_in_outage = 0i64;
    let mut lsn_5s_before_end = String::new();
    let mut at_stop = (0, 0);
    let mut api_at_stop = (0, 0);
    let mut drain = None;
    let mut ch_at_stop = 0;
    for t in 0..warmup + outage + after {
        let phase = if t < warmup {
            "up"
        } else if t < warmup + outage {
            "CH down"
        } else {
            "draining"
        };
        if t == warmup {
            let m = http_get(cfg.server_port, "/metrics").unwrap_or_default();
            at_stop = within_1s(&m, "redis");
            api_at_stop = within_1s(&m, "http");
            ch_at_stop = ch_rows(&ch);
            ch.stop();
        }
        if t == warmup + outage - 5 {
            lsn_5s_before_end = sql("SELECT pg_current_wal_lsn()");
        }
        if t == warmup + outage {
            let m = http_get(cfg.server_port, "/metrics").unwrap_or_default();
            let at_return = within_1s(&m, "redis");
            let api_now = within_1s(&m, "http");
            let confirmed = sql(&format!(
                "SELECT confirmed_flush_lsn >= '{lsn_5s_before_end}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'"
            ));
            let redis_ok = (at_return.0 - at_stop.0, at_return.1 - at_stop.1);
            let api_ok = (api_now.0 - api_at_stop.0, api_now.1 - api_at_stop.1);
            let _ = writeln!(
                report,
                "end of outage: slot confirmed past the WAL position of 5 s before: {confirmed}; delivered within 1 s of commit during the outage: Redis {} of {}, API {} of {}",
                redis_ok.0, redis_ok.1, api_ok.0, api_ok.1
            );
            if journal {
                assert_eq!(
                    confirmed, "t",
                    "the slot was held while ClickHouse was away\n{report}"
                );
                assert!(
                    redis_ok.1 > 0 && redis_ok.0 * 100 >= redis_ok.1 * 99,
                    "{report}"
                );
                assert!(api_ok.1 > 0 && api_ok.0 * 100 >= api_ok.1 * 99, "{report}");
            }
            let backlog_end: u64 = sql("SELECT count(*) FROM engagement_events")
                .parse()
                .unwrap();
            ch.start_again();
            let back = Instant::now();
            // The drain: until ClickHouse holds what was committed when it returned.
            let drained = wait_until(T, || ch_rows(&ch) >= backlog_end);
            assert!(drained, "ClickHouse did not drain within {T:?}\n{report}");
            drain = Some((backlog_end, back.elapsed().as_secs_f64()));
        }
        let retained = slot("restart_lsn");
        if phase == "CH down" {
            max_retained_in_outage = max_retained_in_outage.max(retained);
        }
        let status = cfg.engine_status().unwrap_or_default();
        let j = &status["journal"];
        let behind = j["last_batch"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(j["cursors"]["clickhouse"]["seq"].as_u64().unwrap_or(0));
        let mb = |b: f64| b / 1048576.0;
        let _ = writeln!(
            report,
            "{t:>4}  {phase:<8}  {:>15.1}  {:>11.1}  {:>10.1}  {:>17}",
            mb(retained as f64),
            mb(slot("confirmed_flush_lsn") as f64),
            mb(j["bytes"].as_f64().unwrap_or(0.0)),
            if journal {
                behind.to_string()
            } else {
                "-".into()
            }
        );
        // The sampling period (what is sampled is read above, not waited for).
        std::thread::sleep(
            Duration::from_secs(1).saturating_sub(started.elapsed() - Duration::from_secs(t)),
        );
    }
    let loaded = load.join().unwrap();
    assert_eq!(loaded.code, 0, "{loaded:?}");
    let events: u64 = sql("SELECT count(*) FROM engagement_events")
        .parse()
        .unwrap();
    wait_for("ClickHouse to drain its backlog", T, || {
        (ch_rows(&ch) == events).then_some(())
    });
    let (drained_to, drained_in) = drain.expect("the outage ended");
    let _ = writeln!(
        report,
        "max retained WAL during the outage: {:.1} MB; ClickHouse held the {drained_to} events committed by its return {drained_in:.1} s after it returned (its backlog: {} events, {:.0} events/s drained while the load went on)",
        max_retained_in_outage as f64 / 1048576.0,
        drained_to - ch_at_stop,
        (drained_to - ch_at_stop) as f64 / drained_in.max(0.001)
    );
    // Exactly once everywhere.
    let unique: u64 = ch
        .query("SELECT uniqExact(event_id) FROM engagement.events_enriched FINAL")
        .parse()
        .unwrap();
    let pg_counts: BTreeMap<i64, u64> =
        sql("SELECT content_id, count(*) FROM engagement_events GROUP BY 1 ORDER BY 1")
            .lines()
            .map(|l| {
                let (c, n) = l.split_once('|').unwrap();
                (c.parse().unwrap(), n.parse().unwrap())
            })
            .collect();
    let redis_counts = || -> BTreeMap<i64, u64> {
        let keys: Vec<String> = pg_counts
            .keys()
            .map(|c| format!("content:count:{c}"))
            .collect();
        let mut args = vec!["MGET"];
        args.extend(keys.iter().map(String::as_str));
        pg_counts
            .keys()
            .copied()
            .zip(redis.cli(&args).lines().map(|v| v.parse().unwrap_or(0)))
            .collect()
    };
    wait_for("Redis and the API to hold every event", T, || {
        (redis_counts() == pg_counts && api.stats()["unique_event_ids"].as_u64() == Some(events))
            .then_some(())
    });
    let _ = writeln!(
        report,
        "exact after: ClickHouse FINAL {} rows, {unique} distinct of {events}; Redis content:count equal to Postgres for {} contents; API {} distinct, {} received twice",
        ch_rows(&ch),
        pg_counts.len(),
        api.stats()["unique_event_ids"],
        api.stats()["duplicates"]
    );
    eprint!("{report}");
    if let Ok(path) = std::env::var("OUTAGE_REPORT") {
        std::fs::write(path, &report).unwrap();
    }
    assert_eq!(unique, events);
    assert_eq!(ch_rows(&ch), events);
    assert_eq!(api.stats()["duplicates"], 0);
    if journal {
        assert!(
            max_retained_in_outage < 32 << 20,
            "retained WAL {max_retained_in_outage} bytes during the outage\n{report}"
        );
    }
    assert_eq!(engine.terminate(), 0);
}
