//! `engagement-cdc run --stdout` against a real PostgreSQL: the JSON of each event, the joins
//! in commit order, kill -9 and restarts, idle confirmation, large transactions, schema
//! changes and ignored changes.
//!
//! Over 400 lines on purpose: one test binary for every scenario of the source side, so CI
//! links it once and the scenarios share their helpers (`Env`).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(60);

struct Env {
    pg: Postgres,
    cfg: TestConfig,
}

fn env_with(opts: Option<PgOptions>) -> Env {
    let pg = match opts {
        Some(o) => {
            let pg = Postgres::start_with(o);
            pg.create_database("engagement", true);
            pg
        }
        None => Postgres::start(),
    };
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 0, "setup: {run:?}");
    Env { pg, cfg }
}

fn env() -> Env {
    env_with(None)
}

impl Env {
    fn sql(&self, sql: &str) -> String {
        self.pg.psql("engagement", sql)
    }

    fn engine(&self, mode: Stdout) -> Engine {
        self.engine_with(&[], mode)
    }

    /// The engine with these environment variables, once it streams.
    fn engine_with(&self, env: &[(&str, &str)], mode: Stdout) -> Engine {
        let e = Engine::spawn_with(&self.cfg.path, &["run", "--stdout"], env, mode);
        wait_for("the engine to stream", T, || {
            self.cfg
                .engine_status()
                .filter(|s| s["streaming"] == true)
                .map(|_| ())
        });
        e
    }

    /// Insert events; returns their ids.
    fn insert(&self, values: &str) -> Vec<i64> {
        self.sql(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) VALUES {values} RETURNING id"
        ))
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
    }

    fn confirmed_flush_reaches(&self, lsn: &str) -> bool {
        self.sql(&format!(
            "SELECT confirmed_flush_lsn >= '{lsn}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'"
        )) == "t"
    }
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn by_id(events: &[Value], id: i64) -> &Value {
    events
        .iter()
        .find(|e| e["event_id"] == id)
        .unwrap_or_else(|| panic!("event {id} not printed"))
}

fn ids(lines: &[String]) -> BTreeSet<i64> {
    parse(lines)
        .iter()
        .map(|e| e["event_id"].as_i64().unwrap())
        .collect()
}

#[test]
fn the_seed_insert_prints_the_spec_json() {
    let env = env();
    let engine = env.engine(Stdout::Collect);
    let row = env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
         VALUES (1, 999, 'play', 7000, 'web')
         RETURNING id, to_char(event_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS'),
                   extract(microseconds FROM event_ts)::int8 % 1000000",
    );
    let parts: Vec<&str> = row.split('|').collect();
    let micros: i64 = parts[2].parse().unwrap();
    let ts = if micros == 0 {
        format!("{}Z", parts[1])
    } else {
        format!("{}.{micros:06}Z", parts[1])
    };
    let lines = engine.wait_lines(1, T);
    assert_eq!(
        lines[0],
        format!(
            r#"{{"event_id":{},"content_id":1,"user_id":999,"event_type":"play","event_ts":"{ts}","duration_ms":7000,"device":"web","content_type":"video","length_seconds":300,"engagement_seconds":7.0,"engagement_pct":0.02}}"#,
            parts[0]
        )
    );
    // Logs went to stderr, not into the JSON stream.
    assert!(engine.stderr().contains("streaming slot"));
    // `pipeline.nice` is 0 by default: the engine keeps the priority it was started with.
    let own = own_nice();
    let nices = thread_nices(engine.pid());
    assert!(
        !nices.is_empty() && nices.iter().all(|&n| n == own),
        "nice of each thread {nices:?}, the test's {own}"
    );
    // The engine's endpoints.
    let port = env.cfg.server_port;
    assert_eq!(http_get(port, "/healthz").as_deref(), Some("ok\n"));
    assert_eq!(http_get(port, "/readyz").as_deref(), Some("streaming\n"));
    wait_for("the metrics to count the event", T, || {
        http_get(port, "/metrics")
            .filter(|m| m.contains("engagement_cdc_events_delivered_total 1\n"))
            .map(|_| ())
    });
    let page = http_get(port, "/").unwrap();
    assert!(
        page.contains("<h1>engagement-cdc</h1>") && page.contains("commit to stdout"),
        "{page}"
    );
}

#[test]
fn derived_fields_and_their_null_rules() {
    let env = env();
    env.sql("ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey");
    env.sql("INSERT INTO content VALUES (10, 'clip', 3), (11, 'live', NULL), (12, 'short', 0)");
    let engine = env.engine(Stdout::Collect);
    let ids = env.insert(
        "(10, 1, 'play', 375, 'tv'), (1, 2, 'play', NULL, 'web'), (11, 3, 'play', 7000, NULL),
         (12, 4, 'play', 7000, 'ios'), (1, 5, 'seek', -5, 'web'), (999, 6, 'play', 5, 'web')",
    );
    let events = parse(&engine.wait_lines(6, T));
    let get = |i: usize, k: &str| by_id(&events, ids[i])[k].clone();
    // 375 ms of 3 s: 0.375 s and 0.13 (half away from zero).
    assert_eq!(get(0, "engagement_seconds").to_string(), "0.375");
    assert_eq!(get(0, "engagement_pct").to_string(), "0.13");
    // NULL duration: both NULL.
    assert!(get(1, "engagement_seconds").is_null() && get(1, "engagement_pct").is_null());
    assert_eq!(get(1, "length_seconds"), 300);
    // NULL length: both NULL.
    assert!(get(2, "engagement_seconds").is_null() && get(2, "engagement_pct").is_null());
    assert!(get(2, "length_seconds").is_null() && get(2, "device").is_null());
    // Length 0: seconds kept, percentage NULL.
    assert_eq!(get(3, "engagement_seconds").to_string(), "7.0");
    assert!(get(3, "engagement_pct").is_null());
    // Negative duration: both NULL, counted; the event is still delivered.
    assert_eq!(get(4, "duration_ms"), -5);
    assert!(get(4, "engagement_seconds").is_null() && get(4, "engagement_pct").is_null());
    // Unknown content: LEFT join.
    assert!(get(5, "content_type").is_null() && get(5, "engagement_pct").is_null());
    wait_for("the counters", T, || {
        (env.cfg.counter("events_negative_duration") == Some(1)
            && env.cfg.counter("events_unknown_content") == Some(1))
        .then_some(())
    });
}

/// Column values in binary form (the default) and in text (`postgres.binary = false`) give
/// the same events: numeric ids and durations, whole and not, past Int32, times before
/// 1970, BC and in year 9999, an infinite time that makes its row invalid.
#[test]
fn binary_and_text_values_give_the_same_events() {
    let env = env();
    env.sql(
        "ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey;
         ALTER TABLE engagement_events ALTER COLUMN user_id TYPE numeric(20, 0);
         ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE numeric;
         INSERT INTO content VALUES (7, 'clip', 3);",
    );
    let rows = "(7, 12345678901234, 'play', '2026-01-08 14:21:52.163702+00', 375, 'tv'),
        (7, -5, 'seek', '1969-12-31 23:59:59.999999+00', 1800.000, 'web'),
        (1, 0, 'pause', '9999-12-31 23:59:59.999999+00', 3000000000, NULL),
        (1, 1, 'play', 'infinity', 5, 'web'),
        (1, 2, 'play', '0044-03-15 12:00:00+00 BC', 5, 'web'),
        (1, 3, 'play', '2026-01-08 14:21:52+00', 7.5, 'ios'),
        (999, 4, 'play', '2026-01-08 14:21:53+00', NULL, 'tv')";
    let mut delivered = Vec::new();
    for (binary, mode) in [("true", "binary"), ("false", "text")] {
        let mut engine = env.engine_with(
            &[("ENGAGEMENT_CDC__POSTGRES__BINARY", binary)],
            Stdout::Collect,
        );
        env.sql(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) VALUES {rows}"
        ));
        let mut events = parse(&engine.wait_lines(6, T));
        for e in &mut events {
            e.as_object_mut().unwrap().remove("event_id");
        }
        // Counted the same way too: the infinite time, the duration past Int32 and the
        // one with a fraction.
        wait_for("the counters", T, || {
            (env.cfg.counter("events_invalid") == Some(1)
                && env.cfg.counter("invalid_values") == Some(2))
            .then_some(())
        });
        assert_eq!(engine.terminate(), 0);
        assert!(
            engine
                .stderr()
                .contains(&format!("column values in {mode}")),
            "{}",
            engine.stderr()
        );
        delivered.push(events);
    }
    assert_eq!(delivered[0], delivered[1]);
    let first = &delivered[0];
    assert_eq!(first[0]["user_id"], 12345678901234i64);
    assert_eq!(first[0]["event_ts"], "2026-01-08T14:21:52.163702Z");
    assert_eq!(first[0]["engagement_pct"].to_string(), "0.13");
    assert_eq!(first[1]["event_ts"], "1969-12-31T23:59:59.999999Z");
    assert_eq!(first[1]["duration_ms"], 1800);
    assert!(first[2]["duration_ms"].is_null());
    assert_eq!(first[2]["event_ts"], "9999-12-31T23:59:59.999999Z");
    assert!(first[4]["duration_ms"].is_null());
}

#[test]
fn each_event_joins_the_content_row_of_its_commit_also_on_replay() {
    let env = env();
    // The journal off: this is the replay from the slot (with the journal, the events are
    // kept enriched and a replay reads them as joined at their commit).
    let journal_off = [("ENGAGEMENT_CDC__JOURNAL__MAX_BYTES", "0")];
    let engine = |mode| {
        let e = Engine::spawn_with(&env.cfg.path, &["run", "--stdout"], &journal_off, mode);
        wait_for("the engine to stream", T, || {
            env.cfg
                .engine_status()
                .filter(|s| s["streaming"] == true)
                .map(|_| ())
        });
        e
    };
    // Run 1: the stdout pipe (4 KB) is not read, so a 20 KB event blocks the sink and the
    // checkpoint stays before everything below, while the source still reads it all.
    let mut first = engine(Stdout::Gated);
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
         VALUES (1, 1, 'filler', 1000, repeat('x', 20000))",
    );
    let ids: Vec<i64> = env
        .sql(
            "BEGIN;
             INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) VALUES (2, 100, 'play', 6000, 'web');
             UPDATE content SET length_seconds = 60, content_type = 'trailer' WHERE content_id = 2;
             INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) VALUES (2, 200, 'play', 6000, 'web');
             COMMIT;
             SELECT id FROM engagement_events WHERE user_id IN (100, 200) ORDER BY user_id",
        )
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let (a, b) = (ids[0], ids[1]);
    wait_for("run 1 to read the update and every event", T, || {
        (env.cfg.counter("events_streamed") == Some(3)
            && env.cfg.counter("content_changes") == Some(1))
        .then_some(())
    });
    assert_eq!(env.cfg.counter("events_delivered"), Some(0));
    first.kill9();

    // Run 2 replays from the checkpoint with the dimension stored beside it.
    let second = engine(Stdout::Collect);
    let lines = second.wait_lines(3, T);
    let events = parse(&lines);
    let (ea, eb) = (by_id(&events, a), by_id(&events, b));
    assert_eq!(
        (ea["content_type"].as_str(), ea["length_seconds"].as_i64()),
        (Some("video"), Some(120))
    );
    assert_eq!(ea["engagement_pct"].to_string(), "0.05");
    assert_eq!(
        (eb["content_type"].as_str(), eb["length_seconds"].as_i64()),
        (Some("trailer"), Some(60))
    );
    assert_eq!(eb["engagement_pct"].to_string(), "0.1");
}

#[test]
fn kill_9_mid_stream_loses_nothing() {
    let env = env();
    let mut engine = env.engine(Stdout::Collect);
    let mut inserted = BTreeSet::new();
    let mut printed = BTreeSet::new();
    for round in 0..3 {
        for _ in 0..20 {
            inserted.extend(env.insert(
                "(1, 1, 'play', 100, 'web'), (2, 2, 'pause', 200, 'tv'), (3, 3, 'seek', NULL, NULL)",
            ));
        }
        // Kill while the stream is still flowing, then insert while the engine is down.
        engine.wait_lines(1 + round, T);
        engine.kill9();
        printed.extend(ids(&engine.lines()));
        for _ in 0..10 {
            inserted.extend(env.insert("(1, 9, 'play', 1, 'web')"));
        }
        engine = env.engine(Stdout::Collect);
    }
    wait_for("every inserted event to be printed", T, || {
        let mut all = printed.clone();
        all.extend(ids(&engine.lines()));
        inserted.is_subset(&all).then_some(())
    });
    let mut all = printed;
    all.extend(ids(&engine.lines()));
    assert_eq!(all, inserted, "printed ids differ from inserted ids");
}

#[test]
fn postgres_restart_mid_stream_loses_nothing() {
    let env = env();
    let engine = env.engine(Stdout::Collect);
    let mut inserted: BTreeSet<i64> = env
        .insert("(1, 1, 'play', 100, 'web')")
        .into_iter()
        .collect();
    engine.wait_lines(1, T);
    env.pg.restart();
    for _ in 0..10 {
        inserted.extend(env.insert("(2, 2, 'play', 100, 'web'), (3, 3, 'play', 100, 'web')"));
    }
    wait_for("the engine to reconnect and print everything", T, || {
        inserted.is_subset(&ids(&engine.lines())).then_some(())
    });
    assert!(env.cfg.counter("replication_sessions").unwrap() >= 2);
}

#[test]
fn writes_to_other_tables_still_advance_the_slot() {
    // The server's keepalives carry its position; make them frequent for the test.
    let env = env_with(Some(PgOptions {
        extra_conf: "wal_sender_timeout = 2s\n".into(),
        ..Default::default()
    }));
    env.sql("CREATE TABLE unrelated (x int)");
    let _engine = env.engine(Stdout::Collect);
    env.sql("INSERT INTO unrelated SELECT generate_series(1, 1000)");
    let lsn = env.sql("SELECT pg_current_wal_lsn()");
    wait_for(
        "confirmed_flush_lsn to pass the unrelated writes",
        T,
        || env.confirmed_flush_reaches(&lsn).then_some(()),
    );
}

/// Heartbeat messages are written at the configured interval (a `test_decoding` probe slot
/// sees them), they deliver nothing, and an idle slot is confirmed past another database's
/// writes within seconds. (On Postgres 15 the server's keepalives move an idle slot too; the
/// heartbeat is the second way, for servers that send keepalives only every
/// `wal_sender_timeout / 2`.)
#[test]
fn heartbeats_are_written_and_an_idle_slot_advances() {
    let env = env();
    env.pg.create_database("busy", false);
    env.pg.psql("busy", "CREATE TABLE t (x int)");
    env.sql("SELECT 1 FROM pg_create_logical_replication_slot('probe', 'test_decoding')");
    let e = env.engine_with(
        &[("ENGAGEMENT_CDC__POSTGRES__HEARTBEAT_INTERVAL_MS", "500")],
        Stdout::Collect,
    );
    let heartbeats = || -> usize {
        env.sql(
            "SELECT count(*) FROM pg_logical_slot_peek_changes('probe', NULL, NULL)
             WHERE data LIKE 'message: transactional: 0 prefix: engagement-cdc%heartbeat'",
        )
        .parse()
        .unwrap()
    };
    wait_for("three heartbeat messages", Duration::from_secs(10), || {
        (heartbeats() >= 3).then_some(())
    });
    env.sql("SELECT 1 FROM pg_drop_replication_slot('probe')");
    for _ in 0..5 {
        env.pg
            .psql("busy", "INSERT INTO t SELECT generate_series(1, 20000)");
    }
    let lsn = env.pg.psql("busy", "SELECT pg_current_wal_lsn()");
    wait_for(
        "confirmed_flush_lsn to pass the other database's writes",
        Duration::from_secs(10),
        || env.confirmed_flush_reaches(&lsn).then_some(()),
    );
    assert!(
        e.lines().is_empty(),
        "a heartbeat delivered something: {:?}",
        e.lines()
    );
}

#[test]
fn one_transaction_of_a_million_rows_in_bounded_memory() {
    let env = env();
    let engine = env.engine(Stdout::Discard);
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
         SELECT 1 + g % 3, g, 'play', g % 60000, 'web' FROM generate_series(1, 1000000) g",
    );
    let lsn = env.sql("SELECT pg_current_wal_lsn()");
    wait_for(
        "a million events delivered",
        Duration::from_secs(600),
        || (env.cfg.counter("events_delivered").unwrap_or(0) >= 1_000_000).then_some(()),
    );
    wait_for("the checkpoint to pass the transaction", T, || {
        env.confirmed_flush_reaches(&lsn).then_some(())
    });
    let peak_mb = engine.peak_rss_kb() / 1024;
    assert!(
        peak_mb < 200,
        "peak RSS {peak_mb} MB for one 1M-row transaction"
    );
}

#[test]
fn alter_table_and_ignored_changes() {
    let env = env();
    let engine = env.engine(Stdout::Collect);
    let e1 = env.insert("(1, 1, 'play', 100, 'web')")[0];
    env.sql("ALTER TABLE engagement_events ADD COLUMN campaign TEXT");
    let e2 = env.sql(
        "INSERT INTO engagement_events (campaign, device, content_id, user_id, event_type) VALUES ('x', 'tv', 2, 2, 'play') RETURNING id",
    );
    env.sql("UPDATE engagement_events SET user_id = 7");
    env.sql(&format!("DELETE FROM engagement_events WHERE id = {e1}"));
    env.sql("TRUNCATE engagement_events");
    env.sql("CREATE TABLE other (x int)");
    env.sql("ALTER PUBLICATION engagement_cdc ADD TABLE other");
    env.sql("INSERT INTO other VALUES (1)");
    let e3 = env.insert("(3, 3, 'play', 100, 'web')")[0];
    let lines = engine.wait_lines(3, T);
    assert_eq!(
        ids(&lines),
        [e1, e2.parse().unwrap(), e3]
            .into_iter()
            .collect::<BTreeSet<_>>()
    );
    wait_for("the ignored changes to be counted", T, || {
        (env.cfg.counter("event_changes_ignored") == Some(4)
            && env.cfg.counter("other_changes_ignored") == Some(1))
        .then_some(())
    });
    assert_eq!(lines.len(), 3, "{lines:?}");
}

/// A column retyped while the engine streams, to a type created after the engine read the
/// type catalog (an enum): the engine reads the catalog again and goes on, every event once.
#[test]
fn a_column_retyped_to_a_new_enum_while_streaming() {
    let env = env();
    let engine = env.engine(Stdout::Collect);
    let e1 = env.insert("(1, 1, 'play', 100, 'web')")[0];
    engine.wait_lines(1, T);
    env.sql(
        "CREATE TYPE action AS ENUM ('play', 'pause', 'seek');
         ALTER TABLE engagement_events ALTER COLUMN event_type TYPE action USING event_type::action",
    );
    let e2 = env.insert("(2, 2, 'seek', 100, 'web')")[0];
    let lines = engine.wait_lines(2, T);
    assert_eq!(ids(&lines), [e1, e2].into_iter().collect::<BTreeSet<_>>());
    assert_eq!(by_id(&parse(&lines), e2)["event_type"], "seek");
    // A column retyped to something unreadable still halts, naming it.
    env.sql("ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE real");
    env.insert("(2, 3, 'play', 1.5, 'web')");
    let mut engine = engine;
    assert_eq!(engine.wait_exit(T), 1);
    let err = engine.stderr();
    assert!(
        err.contains("duration_ms") && err.contains("is real"),
        "{err}"
    );
    assert!(
        err.contains("created after the engine read the type catalog"),
        "the new enum was looked up: {err}"
    );
    assert_eq!(engine.lines().len(), 2);
}

/// A Postgres that stops answering (SIGSTOP: the kernel still accepts connections):
/// `status` and `setup` end with one clear line within their time limits, and the engine
/// still stops on SIGTERM.
#[test]
fn a_postgres_that_stops_answering_never_hangs_a_command() {
    let env = env();
    let mut engine = env.engine(Stdout::Collect);
    env.insert("(1, 1, 'play', 100, 'web')");
    engine.wait_lines(1, T);
    env.pg.hang();
    for command in ["status", "setup"] {
        let started = Instant::now();
        let run = cli(Some(&env.cfg.path), &[command], &[]);
        let took = started.elapsed();
        assert_eq!(run.code, 1, "{command}: {run:?}");
        assert!(
            run.error_line().contains(
                "did not complete the connection startup (TLS, authentication) within 10 s"
            ),
            "{command}: {}",
            run.stderr
        );
        assert!(took < Duration::from_secs(30), "{command} took {took:?}");
    }
    let started = Instant::now();
    let code = engine.terminate();
    assert_eq!(code, 0, "{}", engine.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the engine took {:?} to stop",
        started.elapsed()
    );
    env.pg.resume();
}

/// The `--start` and `--end` of the backfill that `setup --resync` prints.
fn resync_backfill_range(setup_stdout: &str) -> (String, String) {
    let line = setup_stdout
        .lines()
        .find(|l| l.contains("engagement-cdc backfill --start"))
        .unwrap_or_else(|| panic!("no backfill advice in:\n{setup_stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        let i = words.iter().position(|w| *w == flag).unwrap();
        words[i + 1].to_string()
    };
    (after("--start"), after("--end"))
}

impl Env {
    /// `backfill --sinks stdout` over a range: the ids it would deliver.
    fn backfill_ids(&self, start: &str, end: &str) -> BTreeSet<i64> {
        let run = cli(
            Some(&self.cfg.path),
            &[
                "backfill", "--start", start, "--end", end, "--sinks", "stdout",
            ],
            &[],
        );
        assert_eq!(run.code, 0, "{run:?}");
        let lines: Vec<String> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(str::to_string)
            .collect();
        ids(&lines)
    }
}

/// DROP PUBLICATION under a running engine: one clear error and exit 1 (no reconnect
/// loop); `setup` alone warns that the slot is stuck; `setup --resync` is the way out, and
/// the backfill it prints delivers the events in between.
#[test]
fn a_dropped_publication_stops_the_engine_and_resync_is_the_way_out() {
    let env = env();
    let mut engine = env.engine(Stdout::Collect);
    let e1 = env.insert("(1, 1, 'play', 100, 'web')")[0];
    engine.wait_lines(1, T);
    env.sql("DROP PUBLICATION engagement_cdc");
    let e2 = env.insert("(2, 2, 'play', 100, 'web')")[0];
    assert_eq!(engine.wait_exit(T), 1);
    let err = engine.stderr();
    let line = error_line_of(&err);
    assert!(
        line.contains("publication") && line.contains("setup --resync"),
        "{line}"
    );
    assert!(err.lines().count() < 20, "a reconnect loop:\n{err}");

    let setup = cli(Some(&env.cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    assert!(setup.stdout.contains("setup --resync"), "{}", setup.stdout);
    let resync = cli(Some(&env.cfg.path), &["setup", "--resync"], &[]);
    assert_eq!(resync.code, 0, "{resync:?}");
    assert!(
        resync
            .stdout
            .contains("resync: slot \"engagement_cdc\" dropped"),
        "{}",
        resync.stdout
    );
    let (start, end) = resync_backfill_range(&resync.stdout);

    let engine = env.engine(Stdout::Collect);
    let e3 = env.insert("(3, 3, 'play', 100, 'web')")[0];
    let lines = engine.wait_lines(1, T);
    assert_eq!(ids(&lines), [e3].into_iter().collect::<BTreeSet<_>>());
    let backfilled = env.backfill_ids(&start, &end);
    assert!(backfilled.contains(&e2), "{backfilled:?}");
    assert!(
        backfilled.contains(&e1),
        "the range starts at the last delivered commit"
    );
}

/// The way out of a dropped required column: restoring it is not enough (the slot's next
/// change still lacks it), `setup --resync` is.
#[test]
fn a_dropped_required_column_is_left_behind_with_resync() {
    let env = env();
    let mut engine = env.engine(Stdout::Collect);
    env.insert("(1, 1, 'play', 100, 'web')");
    engine.wait_lines(1, T);
    env.sql("ALTER TABLE engagement_events DROP COLUMN device");
    let e2 = env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type) VALUES (1, 2, 'play') RETURNING id",
    );
    assert_eq!(engine.wait_exit(T), 1);
    assert!(
        engine.stderr().contains("setup --resync"),
        "{}",
        engine.stderr()
    );
    env.sql("ALTER TABLE engagement_events ADD COLUMN device TEXT");
    let mut again = Engine::spawn_with(&env.cfg.path, &["run", "--stdout"], &[], Stdout::Collect);
    assert_eq!(
        again.wait_exit(T),
        1,
        "restoring the column alone cannot work"
    );
    let resync = cli(Some(&env.cfg.path), &["setup", "--resync"], &[]);
    assert_eq!(resync.code, 0, "{resync:?}");
    let (start, end) = resync_backfill_range(&resync.stdout);
    let engine = env.engine(Stdout::Collect);
    let e3 = env.insert("(2, 3, 'play', 100, 'web')")[0];
    assert_eq!(
        ids(&engine.wait_lines(1, T)),
        [e3].into_iter().collect::<BTreeSet<_>>()
    );
    assert!(env
        .backfill_ids(&start, &end)
        .contains(&e2.parse().unwrap()));
}

/// A second engine (its own state directory) on a slot another engine streams: one
/// warning, then one clear error and exit 1 — not an endless retry.
#[test]
fn a_slot_streamed_by_another_engine_is_a_clear_error() {
    let env = env();
    let _first = env.engine(Stdout::Collect);
    let other = TestConfig::new(&env.pg.url("engagement"), "");
    let setup = cli(Some(&other.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    let mut second = Engine::spawn_with(&other.path, &["run", "--stdout"], &[], Stdout::Collect);
    assert_eq!(second.wait_exit(Duration::from_secs(120)), 1);
    let err = second.stderr();
    let line = error_line_of(&err);
    assert!(line.contains("another engine streams it"), "{line}");
    assert_eq!(
        err.lines().filter(|l| l.contains("in use")).count(),
        2,
        "one warning and one error:\n{err}"
    );
}

#[test]
fn a_dropped_required_column_halts_with_the_checkpoint_held() {
    let env = env();
    let mut engine = env.engine(Stdout::Collect);
    env.insert("(1, 1, 'play', 100, 'web')");
    engine.wait_lines(1, T);
    env.sql("ALTER TABLE engagement_events DROP COLUMN device");
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type) VALUES (1, 2, 'play')",
    );
    let lsn = env.sql("SELECT pg_current_wal_lsn()");
    let code = engine.wait_exit(T);
    assert_eq!(code, 1);
    let err = engine.stderr();
    let line = error_line_of(&err);
    assert!(
        line.contains("no column \"device\"") && line.contains("checkpoint held"),
        "{line}"
    );
    assert!(!env.confirmed_flush_reaches(&lsn));
}

#[test]
fn sigterm_confirms_the_checkpoint_and_exits_0() {
    let env = env();
    // With `pipeline.nice`: every thread of the engine, those started while it runs
    // included, yields to processes of normal priority. Never raised: started nicer, it
    // keeps that.
    let mut engine = env.engine_with(&[("ENGAGEMENT_CDC__PIPELINE__NICE", "10")], Stdout::Collect);
    env.insert("(1, 1, 'play', 100, 'web'), (2, 2, 'play', 100, 'web')");
    engine.wait_lines(2, T);
    let own = own_nice();
    let nices = thread_nices(engine.pid());
    assert!(nices.len() > 1, "threads {nices:?}");
    assert!(
        nices.iter().all(|&n| n == own.max(10)),
        "nice of each thread {nices:?}"
    );
    if own < 10 {
        assert!(
            engine.stderr().contains("lowered from nice"),
            "{}",
            engine.stderr()
        );
    }
    let lsn = env.sql("SELECT pg_current_wal_lsn()");
    assert_eq!(engine.terminate(), 0, "{}", engine.stderr());
    assert!(
        env.confirmed_flush_reaches(&lsn) || {
            // The checkpoint is the last commit, which may end before the current WAL position.
            let status = cli(Some(&env.cfg.path), &["status", "--json"], &[]);
            let v: Value = serde_json::from_str(&status.stdout).unwrap();
            v["checkpoint_lsn"] == v["confirmed_flush_lsn"]
        }
    );
    let status = cli(Some(&env.cfg.path), &["status", "--json"], &[]);
    // For monitoring, a stopped engine is a problem: exit 1 and the reason on one line.
    assert_eq!(status.code, 1, "{status:?}");
    assert_eq!(
        status.stderr.trim_end(),
        "unhealthy: the engine is not running",
        "{status:?}"
    );
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["engine_running"], false);
    assert_eq!(v["healthy"], false);
    assert_eq!(v["checkpoint_lsn"], v["confirmed_flush_lsn"], "{v}");
    assert_eq!(v["wal_status"], "reserved");
    assert!(v["last_commit_time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn a_missing_slot_is_a_clear_error() {
    let env = env();
    env.sql("SELECT pg_drop_replication_slot('engagement_cdc')");
    let run = cli(Some(&env.cfg.path), &["run", "--stdout"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains("does not exist") && line.contains("setup") && line.contains("backfill"),
        "{line}"
    );
}

#[test]
fn run_without_setup_or_sinks_says_what_to_do() {
    let pg = Postgres::start();
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    let run = cli(Some(&cfg.path), &["run"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line().contains("no sink is enabled"),
        "{}",
        run.stderr
    );
    let run = cli(Some(&cfg.path), &["run", "--stdout"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.error_line()
            .contains("run `engagement-cdc setup` first"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_invalidated_slot_is_a_clear_error() {
    // A slot may retain at most 1 MB of WAL: while the engine is stopped, writes push it out.
    let env = env_with(Some(PgOptions {
        extra_conf: "max_slot_wal_keep_size = 1\n".into(),
        ..Default::default()
    }));
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, device)
         SELECT 1, g, 'play', repeat('x', 200) FROM generate_series(1, 200000) g",
    );
    env.sql("SELECT pg_switch_wal()");
    env.sql("CHECKPOINT");
    wait_for("the slot to be invalidated", T, || {
        let status = env
            .sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'");
        if status == "lost" {
            return Some(());
        }
        env.sql("SELECT pg_switch_wal()");
        env.sql("CHECKPOINT");
        None
    });
    let run = cli(Some(&env.cfg.path), &["run", "--stdout"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains("invalidated") && line.contains("setup") && line.contains("backfill"),
        "{line}"
    );
    let status = cli(Some(&env.cfg.path), &["status"], &[]);
    assert!(
        status.stdout.contains("wal_status:          lost"),
        "{}",
        status.stdout
    );
}

#[test]
fn a_partitioned_events_table_is_streamed_under_its_own_name() {
    let pg = Postgres::start();
    pg.psql(
        "engagement",
        "DROP TABLE engagement_events;
         CREATE TABLE engagement_events (
           id BIGSERIAL, content_id BIGINT NOT NULL, user_id BIGINT NOT NULL, event_type TEXT NOT NULL,
           event_ts TIMESTAMPTZ NOT NULL DEFAULT now(), duration_ms INT, device TEXT, raw_payload JSONB,
           PRIMARY KEY (id, event_ts)
         ) PARTITION BY RANGE (event_ts);
         CREATE TABLE engagement_events_2026 PARTITION OF engagement_events
           FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         CREATE TABLE engagement_events_rest PARTITION OF engagement_events DEFAULT",
    );
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    assert_eq!(cli(Some(&cfg.path), &["setup"], &[]).code, 0);
    let env = Env { pg, cfg };
    let engine = env.engine(Stdout::Collect);
    let inserted: BTreeSet<i64> = env
        .sql(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts) VALUES
             (1, 1, 'play', '2026-03-01 00:00:00+00'), (2, 2, 'play', '2031-03-01 00:00:00+00') RETURNING id",
        )
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ids(&engine.wait_lines(2, T)), inserted);
}

#[test]
fn setup_while_the_engine_runs_changes_nothing_and_succeeds() {
    let env = env();
    let engine = env.engine(Stdout::Collect);
    let run = cli(Some(&env.cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("held by the running engine"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("created"), "{}", run.stdout);
    assert_eq!(env.sql("SELECT count(*) FROM pg_replication_slots"), "1");
    // The engine is undisturbed.
    let id = env.insert("(1, 1, 'play', 100, 'web')")[0];
    assert_eq!(ids(&engine.wait_lines(1, T)), [id].into_iter().collect());
}

#[test]
fn an_idle_slot_advances_while_another_database_writes() {
    let env = env();
    let _engine = env.engine(Stdout::Collect);
    env.pg.create_database("busy", false);
    env.pg.psql("busy", "CREATE TABLE t (x text)");
    // About 25 MB of WAL that the slot's database never sees a change of.
    env.pg.psql(
        "busy",
        "INSERT INTO t SELECT repeat(md5(g::text), 32) FROM generate_series(1, 20000) g",
    );
    let after = env.sql("SELECT pg_current_wal_lsn()");
    env.pg.psql("busy", "CHECKPOINT");
    wait_for(
        "the idle slot to be confirmed past the other database's writes",
        T,
        || env.confirmed_flush_reaches(&after).then_some(()),
    );
    // The server lets go of that WAL: restart_lsn moves past it too.
    wait_for("restart_lsn to pass the other database's writes", T, || {
        env.pg.psql("busy", "CHECKPOINT");
        (env.sql(&format!(
            "SELECT restart_lsn >= '{after}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'engagement_cdc'"
        )) == "t")
            .then_some(())
    });
    let status = cli(Some(&env.cfg.path), &["status", "--json"], &[]);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    let retained = v["retained_wal_bytes"].as_i64().unwrap();
    assert!(retained < 16 << 20, "retained {retained} bytes: {v}");
    // The engine's own reading of the slot (every 10 s): the first one taken after the slot
    // let go of the WAL shows it, in /status and on /metrics.
    let read_at = |env: &Env| -> Option<Value> {
        Some(env.cfg.engine_status()?["slot_health"]["read_at"].clone())
    };
    let before = read_at(&env);
    let slot = wait_for("the engine's next reading of the slot", T, || {
        let s = env.cfg.engine_status()?;
        (Some(&s["slot_health"]["read_at"]) != before.as_ref()).then(|| s["slot_health"].clone())
    });
    let retained = slot["slot"]["retained_wal_bytes"].as_i64().unwrap();
    assert!(retained < 16 << 20, "{slot}");
    assert_eq!(slot["slot"]["wal_status"], "reserved", "{slot}");
    let metrics = http_get(env.cfg.server_port, "/metrics").unwrap();
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert!(gauge("engagement_cdc_slot_retained_wal_bytes") < (16 << 20) as f64);
    assert_eq!(gauge("engagement_cdc_slot_wal_ok"), 1.0);
}

/// `/readyz` answers 200 while a replication session streams and 503 while it does not;
/// `/healthz` answers 200 throughout.
#[test]
fn readyz_follows_the_replication_session() {
    let env = env();
    let _engine = env.engine(Stdout::Collect);
    let port = env.cfg.server_port;
    let status = |path: &str| http_request(port, "GET", path, b"").map(|(s, _)| s);
    assert_eq!(status("/readyz"), Some(200));
    env.pg.stop();
    wait_for("/readyz to answer 503", T, || {
        (status("/readyz") == Some(503)).then_some(())
    });
    assert_eq!(status("/healthz"), Some(200));
    env.pg.start_again();
    wait_for("/readyz to answer 200 again", T, || {
        (status("/readyz") == Some(200)).then_some(())
    });
}

/// `setup` and `run --stdout` with `url`, and one event inserted and printed.
fn set_up_and_stream_one_event(pg: &Postgres, url: &str) -> (TestConfig, Engine) {
    let cfg = TestConfig::new(url, "");
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    let engine = Engine::spawn_with(&cfg.path, &["run", "--stdout"], &[], Stdout::Collect);
    let id: i64 = pg
        .psql(
            "engagement",
            "INSERT INTO engagement_events (content_id, user_id, event_type) VALUES (1, 1, 'play') RETURNING id",
        )
        .parse()
        .unwrap();
    let lines = engine.wait_lines(1, T);
    assert_eq!(ids(&lines), [id].into_iter().collect::<BTreeSet<_>>());
    (cfg, engine)
}

/// The replication connection logs in by each password method Postgres offers over TCP:
/// `md5` (the password stored as MD5) and `password` (sent in plaintext), as well as
/// `scram-sha-256` (the other tests' roles). Each role's server lets it in by that method
/// only; `setup` and `run` work.
#[test]
fn md5_and_cleartext_password_logins_stream() {
    for (method, role, stored) in [
        ("md5", "md5_role", "md5"),
        ("password", "plain_role", "scram-sha-256"),
    ] {
        let pg = Postgres::start_with(PgOptions {
            hba_first: format!(
                "host all {role} 127.0.0.1/32 {method}\nhost replication {role} 127.0.0.1/32 {method}\n"
            ),
            ..Default::default()
        });
        pg.create_database("engagement", true);
        pg.psql(
            "engagement",
            &format!(
                "SET password_encryption = '{stored}'; CREATE ROLE {role} SUPERUSER LOGIN PASSWORD '{role}-pw'"
            ),
        );
        let prefix = if method == "md5" {
            "md5"
        } else {
            "SCRAM-SHA-256$"
        };
        assert!(
            pg.psql(
                "engagement",
                &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
            )
            .starts_with(prefix),
            "{role}'s password is not stored as {stored}"
        );
        let url = format!(
            "postgres://{role}:{role}-pw@127.0.0.1:{}/engagement",
            pg.port
        );
        let (_cfg, _engine) = set_up_and_stream_one_event(&pg, &url);
        let streaming = pg.psql(
            "engagement",
            &format!("SELECT count(*) FROM pg_stat_replication WHERE usename = '{role}'"),
        );
        assert_eq!(streaming, "1", "{role} does not stream");
    }
}

/// The least-privilege role of docs/operations.md: LOGIN REPLICATION, SELECT on the two
/// tables, owner of nothing; the publication made by the tables' owner. `setup` and `run`
/// work with it.
#[test]
fn a_least_privilege_role_sets_up_and_streams() {
    let pg = Postgres::start();
    pg.psql(
        "engagement",
        "CREATE ROLE cdc_reader LOGIN REPLICATION PASSWORD 'reader-pw';
         GRANT SELECT ON public.engagement_events, public.content TO cdc_reader;
         CREATE PUBLICATION engagement_cdc FOR TABLE public.engagement_events, public.content
           WITH (publish_via_partition_root = true);",
    );
    assert_eq!(
        pg.psql(
            "engagement",
            "SELECT rolsuper, (SELECT count(*) FROM pg_class WHERE relowner = 'cdc_reader'::regrole),
                    has_table_privilege('cdc_reader', 'public.engagement_events', 'INSERT')
               FROM pg_roles WHERE rolname = 'cdc_reader'"
        ),
        "f|0|f"
    );
    let url = format!(
        "postgres://cdc_reader:reader-pw@127.0.0.1:{}/engagement",
        pg.port
    );
    let (cfg, _engine) = set_up_and_stream_one_event(&pg, &url);
    let status = cli(Some(&cfg.path), &["status"], &[]);
    assert_eq!(status.code, 0, "{status:?}");
}

/// The slot dropped while the engine streams (its session ended first, as Postgres
/// requires): one clear error and exit 1, not a reconnect loop.
#[test]
fn a_slot_dropped_while_streaming_is_one_clear_error() {
    let env = env();
    let mut engine = env.engine(Stdout::Collect);
    env.insert("(1, 1, 'play', 100, 'web')");
    engine.wait_lines(1, T);
    wait_for("the slot to be dropped between two sessions", T, || {
        env.sql(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = 'engagement_cdc' AND active_pid IS NOT NULL",
        );
        let dropped = env
            .pg
            .client("psql", "engagement")
            .args([
                "-qAt",
                "-c",
                "SELECT pg_drop_replication_slot('engagement_cdc')",
            ])
            .output()
            .unwrap();
        dropped.status.success().then_some(())
    });
    assert_eq!(engine.wait_exit(T), 1);
    let err = engine.stderr();
    let line = error_line_of(&err);
    assert!(
        line.contains("slot") && line.contains("engagement-cdc setup"),
        "{line}"
    );
    assert!(err.lines().count() < 30, "a reconnect loop:\n{err}");
}

/// A sidecar beside Postgres can reach it through its Unix socket (`host=` a directory,
/// as libpq spells it): setup, streaming and `status` all go through the socket (the
/// server sees no client address), and a mode that demands TLS, which Postgres does not
/// offer there, is refused with a clear error before anything connects.
#[test]
fn through_the_unix_socket_it_sets_up_streams_and_refuses_demanded_tls() {
    let pg = Postgres::start();
    let url = format!(
        "postgres://postgres@/engagement?host={}&port={}",
        pg.socket_dir().display(),
        pg.port
    );
    let (cfg, engine) = set_up_and_stream_one_event(&pg, &url);
    // Both of the engine's connections, the replication one and the query one, came
    // through the socket: Postgres records no client address for either.
    assert_eq!(
        pg.psql(
            "engagement",
            "SELECT count(*) FILTER (WHERE backend_type = 'walsender'),
                    count(*) FILTER (WHERE backend_type = 'client backend') > 0,
                    count(client_addr)
               FROM pg_stat_activity WHERE application_name = 'engagement-cdc'"
        ),
        "1|t|0"
    );
    let status = cli(Some(&cfg.path), &["status"], &[]);
    assert_eq!(status.code, 0, "{status:?}");
    drop(engine);

    // A socket directory the server does not use: what to check, not just ENOENT.
    let elsewhere = TestConfig::new(
        &format!(
            "postgres://postgres@/engagement?host={}&port={}",
            cfg.path.parent().unwrap().display(),
            pg.port
        ),
        "",
    );
    let run = cli(Some(&elsewhere.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "through the Unix socket {}/.s.PGSQL.{}: there is no such socket; is the server running",
            cfg.path.parent().unwrap().display(),
            pg.port
        )),
        "{run:?}"
    );

    let demanding = TestConfig::new(&format!("{url}&sslmode=verify-full"), "");
    let run = cli(Some(&demanding.path), &["setup"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("Unix socket") && run.stderr.contains("sslmode=verify-full demands it"),
        "{run:?}"
    );
}
