//! `engagement-cdc backfill` and `engagement-cdc load` against real servers.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(120);

struct Env {
    pg: Postgres,
    ch: ClickHouse,
    redis: Redis,
    cfg: TestConfig,
}

fn env() -> Env {
    let pg = Postgres::start();
    let ch = ClickHouse::start();
    let redis = Redis::start();
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!(
            "[clickhouse]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n",
            ch.url(),
            redis.url()
        ),
    );
    Env { pg, ch, redis, cfg }
}

impl Env {
    fn sql(&self, sql: &str) -> String {
        self.pg.psql("engagement", sql)
    }
    fn setup(&self) {
        let run = cli(Some(&self.cfg.path), &["setup"], &[]);
        assert_eq!(run.code, 0, "setup: {run:?}");
    }
    fn backfill(&self, args: &[&str]) -> Run {
        let mut all = vec!["backfill"];
        all.extend_from_slice(args);
        cli(Some(&self.cfg.path), &all, &[])
    }
    fn ch(&self, q: &str) -> String {
        self.ch.query(q)
    }
    fn count(&self, content: i64) -> String {
        self.redis
            .cli(&["GET", &format!("content:count:{content}")])
    }
}

/// `load`'s last line and the count it reports (`inserted=N`).
fn load_report(run: &Run) -> (&str, u64) {
    let line = last_line(run);
    let reported = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("inserted="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no inserted=N in {line:?}"));
    (line, reported)
}

fn last_line(run: &Run) -> &str {
    run.stdout.lines().last().unwrap_or("")
}

const DAY: [&str; 4] = [
    "--start",
    "2026-01-08T09:00:00",
    "--end",
    "2026-01-08T10:00:00",
];

#[test]
fn backfill_of_events_older_than_the_slot_then_again() {
    let env = env();
    // Events from before the slot existed: the stream never sees them.
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device, event_ts) VALUES
         (1, 10, 'play', 7000, 'web', '2026-01-08 09:05:00+00'),
         (3, 11, 'play', 500, NULL, '2026-01-08 09:10:00.25+00'),
         (2, 12, 'seek', -1, 'tv', '2026-01-08 09:59:59.999999+00'),
         (1, 13, 'play', 1, 'web', '2026-01-08 10:00:00+00'),
         (1, 14, 'play', 1, 'web', '2026-01-08 08:59:59+00')",
    );
    env.setup();
    let run = env.backfill(&DAY);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        last_line(&run),
        "Backfill done. scanned=3 inserted=3 duplicates=0"
    );
    assert_eq!(
        env.ch(&format!(
            "SELECT content_id, user_id, content_type, length_seconds, engagement_seconds, engagement_pct, source_lsn, {} % 1000000
             FROM engagement.events_enriched FINAL ORDER BY user_id",
            env.ch.event_ts_us()
        )),
        "1\t10\tvideo\t300\t7\t0.02\t0\t0\n3\t11\tarticle\t\\N\t\\N\t\\N\t0\t250000\n2\t12\tvideo\t120\t\\N\t\\N\t0\t999999"
    );
    assert_eq!(
        (env.count(1), env.count(2), env.count(3)),
        ("1".into(), "1".into(), "1".into())
    );
    let last: serde_json::Value =
        serde_json::from_str(&env.redis.cli(&["GET", "content:last:3"])).unwrap();
    assert_eq!(last["event_ts"], "2026-01-08T09:10:00.250000Z");
    // Events of January are far older than the bucket retention.
    assert!(env.redis.cli(&["KEYS", "top:content:bucket:*"]).is_empty());

    let again = env.backfill(&DAY);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        last_line(&again),
        "Backfill done. scanned=3 inserted=0 duplicates=3"
    );
    assert_eq!(
        env.ch("SELECT count() FROM engagement.events_enriched FINAL"),
        "3"
    );
    assert_eq!(
        (env.count(1), env.count(2), env.count(3)),
        ("1".into(), "1".into(), "1".into())
    );
}

#[test]
fn backfill_over_streamed_events_changes_nothing() {
    let env = env();
    env.setup();
    let mut engine = Engine::spawn(&env.cfg.path, &["run"], &[]);
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device, event_ts)
         SELECT 1 + g % 3, g, 'play', 1000, 'web', '2026-01-08 09:00:00+00'::timestamptz + g * interval '1 second'
         FROM generate_series(1, 500) g",
    );
    wait_for("the stream to deliver", T, || {
        (env.ch("SELECT count() FROM engagement.events_enriched") == "500").then_some(())
    });
    assert_eq!(engine.terminate(), 0);
    let counts = (env.count(1), env.count(2), env.count(3));
    let run = env.backfill(&[
        "--start",
        "2026-01-08T09:00:00Z",
        "--end",
        "2026-01-08T11:00:00Z",
        "--batch-size",
        "77",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        last_line(&run),
        "Backfill done. scanned=500 inserted=0 duplicates=500"
    );
    assert_eq!((env.count(1), env.count(2), env.count(3)), counts);
    assert_eq!(
        env.ch("SELECT count(), uniqExact(event_id), countIf(source_lsn = 0) FROM engagement.events_enriched FINAL"),
        "500\t500\t0",
        "the streamed rows are kept"
    );
}

#[test]
fn times_without_an_offset_are_utc_whatever_the_local_zone() {
    let env = env();
    env.setup();
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts) VALUES
         (1, 1, 'play', '2026-01-08 09:30:00+00'), (1, 2, 'play', '2026-01-08 12:30:00+03'),
         (1, 3, 'play', '2026-01-08 10:30:00+00'), (1, 4, 'play', '2026-01-08 06:30:00+00')",
    );
    let run = cli(
        Some(&env.cfg.path),
        &["backfill", DAY[0], DAY[1], DAY[2], DAY[3]],
        &[("TZ", "Asia/Riyadh")],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        last_line(&run),
        "Backfill done. scanned=2 inserted=2 duplicates=0"
    );
}

#[test]
fn bad_ranges_exit_2() {
    let env = env();
    env.setup();
    let run = env.backfill(&[
        "--start",
        "2026-01-08T10:00:00",
        "--end",
        "2026-01-08T10:00:00",
    ]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("must be after --start"),
        "{}",
        run.stderr
    );
    let run = env.backfill(&["--start", "tomorrow", "--end", "2026-01-08T10:00:00"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("is not a time"), "{}", run.stderr);
    let run = env.backfill(&[DAY[0], DAY[1], DAY[2], DAY[3], "--sinks", "http"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("no enabled [http] section"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_large_range_in_bounded_memory() {
    let env = env();
    env.setup();
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device, event_ts)
         SELECT 1 + g % 3, g, 'play', g % 10000, repeat('d', 100), '2026-01-08 09:00:00+00'::timestamptz + g * interval '10 ms'
         FROM generate_series(1, 200000) g",
    );
    let (run, peak_kb) = cli_with_peak_rss(
        &env.cfg.path,
        &["backfill", DAY[0], DAY[1], DAY[2], DAY[3]],
        &[],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        last_line(&run),
        "Backfill done. scanned=200000 inserted=200000 duplicates=0"
    );
    assert_eq!(
        env.ch("SELECT count() FROM engagement.events_enriched FINAL"),
        "200000"
    );
    let total: u64 = (1..=3).map(|c| env.count(c).parse::<u64>().unwrap()).sum();
    assert_eq!(total, 200_000);
    assert!(
        peak_kb < 120 * 1024,
        "backfill of 200,000 rows peaked at {} MB",
        peak_kb / 1024
    );
}

#[test]
fn load_inserts_what_it_reports() {
    let env = env();
    for args in [
        ["--rate", "400", "--duration", "2s"],
        ["--rate", "0", "--duration", "1s"],
    ] {
        let before: u64 = env
            .sql("SELECT count(*) FROM engagement_events")
            .parse()
            .unwrap();
        let mut all = vec!["load", "--contents", "20"];
        all.extend_from_slice(&args);
        let run = cli(Some(&env.cfg.path), &all, &[]);
        assert_eq!(run.code, 0, "{run:?}");
        let (line, reported) = load_report(&run);
        let after: u64 = env
            .sql("SELECT count(*) FROM engagement_events")
            .parse()
            .unwrap();
        assert_eq!(after - before, reported, "{line}");
        if args[1] == "400" {
            assert!(
                (700..=820).contains(&reported),
                "rate 400 for 2 s inserted {reported}"
            );
        }
    }
    assert_eq!(env.sql("SELECT count(*) FROM content"), "20");
    let types =
        env.sql("SELECT count(DISTINCT event_type), count(DISTINCT device) FROM engagement_events");
    assert_eq!(types, "6|4");
}

/// `load` sends small inserts as a prepared statement with text parameters and large ones as
/// statement text: both fit a user's own column types (an enum, a citext domain, integer
/// and numeric ids, a bigint duration), and it reports what Postgres inserted.
#[test]
fn load_fits_the_users_own_column_types() {
    let pg = Postgres::start();
    pg.create_database("shop", false);
    let sql = |q: &str| pg.psql("shop", q);
    sql("CREATE EXTENSION citext;
         CREATE TYPE action AS ENUM ('play', 'pause', 'seek', 'complete', 'like', 'share');
         CREATE DOMAIN gadget AS citext;
         CREATE TABLE catalog (item_id numeric(12, 0) PRIMARY KEY, kind varchar(20) NOT NULL, secs numeric);
         CREATE TABLE activity (
           event_no bigserial PRIMARY KEY, item integer NOT NULL, who bigint NOT NULL,
           what action NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
           duration_ms bigint, device gadget);");
    let cfg = TestConfig::with_postgres(
        &pg.url("shop"),
        "events_table = \"public.activity\"\ncontent_table = \"public.catalog\"\n\n\
         [postgres.event_columns]\nid = \"event_no\"\ncontent_id = \"item\"\nuser_id = \"who\"\nevent_type = \"what\"\nevent_ts = \"created_at\"\n\n\
         [postgres.content_columns]\ncontent_id = \"item_id\"\ncontent_type = \"kind\"\nlength_seconds = \"secs\"\n",
        "",
    );
    // One row an insert (prepared), ten (prepared, ten rows), a hundred (statement text).
    for batch in ["1", "10", "100"] {
        let before: u64 = sql("SELECT count(*) FROM activity").parse().unwrap();
        let run = cli(
            Some(&cfg.path),
            &[
                "load",
                "--contents",
                "5",
                "--rate",
                "0",
                "--duration",
                "1s",
                "--batch",
                batch,
            ],
            &[],
        );
        assert_eq!(run.code, 0, "--batch {batch}: {run:?}");
        let (line, reported) = load_report(&run);
        let after: u64 = sql("SELECT count(*) FROM activity").parse().unwrap();
        assert!(reported > 0, "--batch {batch}: {line}");
        assert_eq!(after - before, reported, "--batch {batch}: {line}");
    }
    // The values are the generator's: every type and device, durations NULL or in range.
    assert_eq!(
        sql("SELECT count(DISTINCT what), count(DISTINCT device), count(*) FILTER (WHERE item NOT BETWEEN 1 AND 5) FROM activity"),
        "6|4|0"
    );
    assert_eq!(
        sql("SELECT count(*) FROM activity a JOIN catalog c ON c.item_id = a.item WHERE a.duration_ms > coalesce(c.secs, 300) * 1000 OR a.duration_ms < 0"),
        "0"
    );
}

#[test]
fn a_terminal_gets_a_progress_bar() {
    let env = env();
    env.setup();
    env.sql(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts)
         SELECT 1, g, 'play', '2026-01-08 09:00:00+00'::timestamptz + g * interval '1 ms' FROM generate_series(1, 20000) g",
    );
    // `script` gives the backfill a pseudo-terminal.
    let cmd = format!(
        "{} --config {} backfill --start 2026-01-08T09:00:00 --end 2026-01-08T10:00:00 --batch-size 1000",
        bin(),
        env.cfg.path.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("ENGAGEMENT_CDC_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[##############################] 20000/20000 rows"),
        "{text}"
    );
    assert!(text.contains("rows/s") && text.contains("ETA"), "{text}");
    assert!(
        text.contains("Backfill done. scanned=20000 inserted=20000 duplicates=0"),
        "{text}"
    );
}

/// A backfill over events committed while the engine was stopped applies them to Redis
/// first; the stream, when it reaches them, must count none of them again (the batch meets
/// the backfilled ids and is checked event by event), and a second backfill changes nothing.
#[test]
fn backfill_before_the_stream_reaches_the_events_then_the_stream() {
    let env = env();
    env.setup();
    let insert = |from: u32, to: u32| {
        env.sql(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device, event_ts)
             SELECT 1 + g % 3, g, 'play', 1000, 'web', '2026-01-08 09:00:00+00'::timestamptz + g * interval '1 second'
             FROM generate_series({from}, {to}) g"
        ));
    };
    let mut engine = Engine::spawn(&env.cfg.path, &["run"], &[]);
    insert(1, 300);
    wait_for("the stream to deliver", T, || {
        (env.cfg.counter("events_delivered") == Some(300)).then_some(())
    });
    assert_eq!(engine.terminate(), 0);
    // Committed while the engine is stopped: the slot holds them for the stream.
    insert(301, 700);
    let range = [
        "--start",
        "2026-01-08T09:00:00Z",
        "--end",
        "2026-01-08T11:00:00Z",
        "--batch-size",
        "150",
    ];
    let run = env.backfill(&range);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        last_line(&run),
        "Backfill done. scanned=700 inserted=400 duplicates=300"
    );
    let want = ("233".to_string(), "234".to_string(), "233".to_string());
    assert_eq!((env.count(1), env.count(2), env.count(3)), want);
    let mut engine = Engine::spawn(&env.cfg.path, &["run"], &[]);
    wait_for("the stream to deliver the 400 backfilled events", T, || {
        (env.cfg.counter("events_delivered") == Some(400)).then_some(())
    });
    assert_eq!((env.count(1), env.count(2), env.count(3)), want);
    // More events after them are counted once each.
    insert(701, 760);
    wait_for("the stream to deliver 60 more", T, || {
        (env.cfg.counter("events_delivered") == Some(460)).then_some(())
    });
    assert_eq!(
        (env.count(1), env.count(2), env.count(3)),
        ("253".to_string(), "254".to_string(), "253".to_string())
    );
    assert_eq!(engine.terminate(), 0);
    let again = env.backfill(&range);
    assert_eq!(
        last_line(&again),
        "Backfill done. scanned=760 inserted=0 duplicates=760"
    );
    assert_eq!(
        env.ch("SELECT count(), countIf(source_lsn > 0) FROM engagement.events_enriched FINAL"),
        "760\t760"
    );
}
