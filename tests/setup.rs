//! `engagement-cdc setup` and the errors of a misconfigured environment, against real servers.

mod support;

use support::*;

fn ch_section(ch: &ClickHouse) -> String {
    format!("[clickhouse]\nurl = \"{}\"\n", ch.url())
}

#[test]
fn setup_twice_succeeds_and_changes_nothing() {
    let pg = Postgres::start();
    let ch = ClickHouse::start();
    let cfg = TestConfig::new(&pg.url("engagement"), &ch_section(&ch));

    let first = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(
        first
            .stdout
            .contains("publication \"engagement_cdc\" created"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("slot \"engagement_cdc\" created"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("copied at its snapshot (3 rows)"),
        "{}",
        first.stdout
    );
    let slot_before = pg.psql(
        "engagement",
        "SELECT slot_name, plugin, confirmed_flush_lsn FROM pg_replication_slots",
    );
    assert!(
        slot_before.starts_with("engagement_cdc|pgoutput|"),
        "{slot_before}"
    );
    assert_eq!(
        pg.psql(
            "engagement",
            "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'engagement_cdc'"
        ),
        "content,engagement_events"
    );
    // The layout follows the server: `DateTime64(6)` from ClickHouse 20.1 on, `DateTime`
    // plus `event_ts_us` on 18.16.
    let expected = if ch.chdb {
        "event_ts\tDateTime64(6, 'UTC')\nsource_lsn\tUInt64"
    } else {
        "event_ts\tDateTime('UTC')\nevent_ts_us\tInt64\nsource_lsn\tUInt64"
    };
    assert_eq!(
        ch.query("SELECT name, type FROM system.columns WHERE database = 'engagement' AND table = 'events_enriched' AND name IN ('event_ts', 'event_ts_us', 'source_lsn') ORDER BY name FORMAT TabSeparatedRaw"),
        expected
    );

    let second = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(second.code, 0, "{second:?}");
    assert!(
        second
            .stdout
            .contains("publication \"engagement_cdc\" exists"),
        "{}",
        second.stdout
    );
    assert!(
        second.stdout.contains("slot \"engagement_cdc\" exists"),
        "{}",
        second.stdout
    );
    assert!(!second.stdout.contains("created"), "{}", second.stdout);
    let slot_after = pg.psql(
        "engagement",
        "SELECT slot_name, plugin, confirmed_flush_lsn FROM pg_replication_slots",
    );
    assert_eq!(slot_before, slot_after);
    assert_eq!(
        pg.psql("engagement", "SELECT count(*) FROM pg_publication"),
        "1"
    );
}

#[test]
fn setup_uses_names_and_credentials_the_user_chose() {
    let pg = Postgres::start();
    pg.create_database("appdb", true);
    pg.psql(
        "postgres",
        "CREATE ROLE app LOGIN REPLICATION PASSWORD 's3cret'; GRANT ALL ON DATABASE appdb TO app",
    );
    pg.psql(
        "appdb",
        "ALTER TABLE content OWNER TO app; ALTER TABLE engagement_events OWNER TO app",
    );
    let url = format!("postgres://app:s3cret@127.0.0.1:{}/appdb", pg.port);
    let cfg = TestConfig::new(&url, "");
    // Names through the environment, as a user of the compose file would.
    let env = [
        ("ENGAGEMENT_CDC__POSTGRES__URL", url.as_str()),
        ("ENGAGEMENT_CDC__POSTGRES__SLOT", "my_slot"),
        ("ENGAGEMENT_CDC__POSTGRES__PUBLICATION", "my_pub"),
    ];
    let run = cli(Some(&cfg.path), &["setup"], &env);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        pg.psql(
            "appdb",
            "SELECT slot_name || ' ' || plugin FROM pg_replication_slots"
        ),
        "my_slot pgoutput"
    );
    assert_eq!(
        pg.psql("appdb", "SELECT pubname FROM pg_publication"),
        "my_pub"
    );
    assert!(!run.stdout.contains("s3cret") && !run.stderr.contains("s3cret"));
    let again = cli(Some(&cfg.path), &["setup"], &env);
    assert_eq!(again.code, 0, "{again:?}");
}

#[test]
fn wrong_password_is_one_clear_line() {
    let pg = Postgres::start();
    pg.psql(
        "postgres",
        "CREATE ROLE app LOGIN REPLICATION PASSWORD 'right'",
    );
    let url = format!("postgres://app:wrong@127.0.0.1:{}/engagement", pg.port);
    let cfg = TestConfig::new(&url, "");
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(line.contains("rejected the credentials"), "{line}");
    assert!(line.contains("[postgres] url"), "{line}");
    assert!(
        !run.stderr.contains("wrong"),
        "the password must not be printed: {}",
        run.stderr
    );
}

#[test]
fn postgres_unreachable_is_one_clear_line() {
    let cfg = TestConfig::new(
        &format!("postgres://postgres@127.0.0.1:{}/engagement", free_port()),
        "",
    );
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains("connection refused") && line.contains("is the server running"),
        "{line}"
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
}

#[test]
fn wal_level_replica_says_how_to_fix_it() {
    let pg = Postgres::start_with(PgOptions {
        wal_level: "replica",
        ..Default::default()
    });
    pg.create_database("engagement", true);
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(line.contains("wal_level is 'replica'"), "{line}");
    assert!(
        line.contains("ALTER SYSTEM SET wal_level = logical"),
        "{line}"
    );
    assert_eq!(
        pg.psql("engagement", "SELECT count(*) FROM pg_publication"),
        "0"
    );
}

#[test]
fn missing_table_and_missing_column_are_named() {
    let pg = Postgres::start();
    pg.create_database("empty", false);
    let cfg = TestConfig::new(&pg.url("empty"), "");
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.error_line()
            .contains("table public.engagement_events does not exist"),
        "{}",
        run.stderr
    );

    pg.psql(
        "engagement",
        "ALTER TABLE engagement_events DROP COLUMN device",
    );
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(line.contains("no column \"device\""), "{line}");

    pg.psql(
        "engagement",
        "ALTER TABLE engagement_events ADD COLUMN device TEXT",
    );
    // numeric without a fraction is accepted (docs/configuration.md, "Source columns");
    // with a fractional scale it is not.
    pg.psql(
        "engagement",
        "ALTER TABLE content ALTER COLUMN length_seconds TYPE numeric(10, 2)",
    );
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains("length_seconds") && line.contains("numeric(10, 2)"),
        "{line}"
    );
}

/// Types the engine cannot read exactly are refused by `setup`, naming the column, the
/// field's configuration key and the type; the accepted ones pass.
#[test]
fn column_types_are_accepted_or_refused_by_name() {
    let pg = Postgres::start();
    let refused = [
        ("event_type", "json", "json"),
        ("event_type", "jsonb", "jsonb"),
        ("duration_ms", "double precision", "double precision"),
        ("duration_ms", "real", "real"),
        ("duration_ms", "numeric(8, 1)", "numeric(8, 1)"),
        ("user_id", "uuid", "uuid"),
        ("device", "integer", "integer"),
        ("event_ts", "date", "date"),
    ];
    for (i, (column, ty, shown)) in refused.iter().enumerate() {
        let db = format!("refused{i}");
        pg.create_database(&db, true);
        pg.psql(
            &db,
            &format!(
                "ALTER TABLE engagement_events ALTER COLUMN {column} DROP DEFAULT;
                 ALTER TABLE engagement_events ALTER COLUMN {column} DROP NOT NULL;
                 ALTER TABLE engagement_events ALTER COLUMN {column} TYPE {ty} USING NULL"
            ),
        );
        let cfg = TestConfig::new(&pg.url(&db), "");
        let run = cli(Some(&cfg.path), &["setup"], &[]);
        assert_eq!(run.code, 1, "{column} {ty}: {run:?}");
        let line = run.error_line();
        assert!(
            line.contains(&format!("engagement_events.{column}"))
                && line.contains(&format!("postgres.event_columns.{column}"))
                && line.contains(&format!("is {shown}")),
            "{column} {ty}: {line}"
        );
    }
    // Every accepted spelling at once, through an enum, citext, domains and numeric.
    pg.create_database("accepted", true);
    pg.psql(
        "accepted",
        "CREATE EXTENSION citext;
         CREATE TYPE action AS ENUM ('play', 'pause', 'seek');
         CREATE DOMAIN device_name AS varchar(32);
         CREATE DOMAIN whole AS numeric(12, 0);
         ALTER TABLE engagement_events ALTER COLUMN event_type TYPE action USING event_type::action;
         ALTER TABLE engagement_events ALTER COLUMN device TYPE device_name;
         ALTER TABLE engagement_events ALTER COLUMN user_id TYPE whole;
         ALTER TABLE engagement_events ALTER COLUMN duration_ms TYPE bigint;
         ALTER TABLE engagement_events ALTER COLUMN event_ts TYPE timestamp;
         ALTER TABLE content ALTER COLUMN content_type TYPE citext;
         ALTER TABLE content ALTER COLUMN length_seconds TYPE numeric;",
    );
    let cfg = TestConfig::new(&pg.url("accepted"), "");
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("is timestamp without time zone, read in UTC"),
        "{}",
        run.stdout
    );
}

#[test]
fn clickhouse_unreachable_is_one_clear_line() {
    let pg = Postgres::start();
    let cfg = TestConfig::new(
        &pg.url("engagement"),
        &format!("[clickhouse]\nurl = \"http://127.0.0.1:{}\"\n", free_port()),
    );
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains("cannot reach ClickHouse") && line.contains("[clickhouse] url"),
        "{line}"
    );
}

#[test]
fn state_of_another_database_is_refused() {
    // Test servers are copies of one initdb and share a system identifier, so the other
    // identity here is another database; the check compares system, database and slot.
    let pg = Postgres::start();
    pg.create_database("other", true);
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    assert_eq!(cli(Some(&cfg.path), &["setup"], &[]).code, 0);
    let url2 = pg.url("other");
    let run = cli(
        Some(&cfg.path),
        &["setup"],
        &[("ENGAGEMENT_CDC__POSTGRES__URL", url2.as_str())],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.error_line().contains("belongs to system"),
        "{}",
        run.stderr
    );
}

#[test]
fn malformed_configuration_exits_2() {
    let dir = TestDir::new("badconfig");
    let path = dir.path.join("bad.toml");
    std::fs::write(&path, "[postgres\nurl = 1").unwrap();
    let run = cli(Some(&path), &["setup"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line().contains("not valid TOML"),
        "{}",
        run.stderr
    );

    std::fs::write(&path, "[postgres]\nslott = \"x\"\n").unwrap();
    let run = cli(Some(&path), &["setup"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line().contains("unknown field `slott`"),
        "{}",
        run.stderr
    );

    std::fs::write(&path, "").unwrap();
    let run = cli(
        Some(&path),
        &["setup"],
        &[("ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS", "lots")],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line()
            .contains("ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS"),
        "{}",
        run.stderr
    );

    let run = cli(Some(&dir.path.join("missing.toml")), &["setup"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line().contains("cannot read configuration file"),
        "{}",
        run.stderr
    );

    let run = cli(None, &["no-such-command"], &[]);
    assert_eq!(run.code, 2, "{run:?}");
}

#[test]
fn setup_with_a_slot_the_user_already_has() {
    let pg = Postgres::start();
    pg.psql(
        "engagement",
        "CREATE PUBLICATION mine FOR TABLE engagement_events, content",
    );
    pg.psql(
        "engagement",
        "SELECT pg_create_logical_replication_slot('their_slot', 'pgoutput')",
    );
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    let env = [
        ("ENGAGEMENT_CDC__POSTGRES__SLOT", "their_slot"),
        ("ENGAGEMENT_CDC__POSTGRES__PUBLICATION", "mine"),
    ];
    let run = cli(Some(&cfg.path), &["setup"], &env);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("publication \"mine\" exists"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("WARNING: slot \"their_slot\" was not created by this setup"),
        "{}",
        run.stdout
    );
    assert_eq!(
        pg.psql("engagement", "SELECT count(*) FROM pg_replication_slots"),
        "1"
    );
    // A publication without the tables is named, with the fix.
    pg.psql("engagement", "CREATE PUBLICATION partial FOR TABLE content");
    let run = cli(
        Some(&cfg.path),
        &["setup"],
        &[
            ("ENGAGEMENT_CDC__POSTGRES__SLOT", "their_slot"),
            ("ENGAGEMENT_CDC__POSTGRES__PUBLICATION", "partial"),
        ],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.error_line()
            .contains("ALTER PUBLICATION partial ADD TABLE public.engagement_events"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unreadable_log_filter_exits_2_and_json_logs_are_json() {
    let run = cli(None, &["status"], &[("ENGAGEMENT_CDC_LOG", "notafilter[")]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line().contains("ENGAGEMENT_CDC_LOG")
            && run.error_line().contains("not a log filter"),
        "{}",
        run.stderr
    );
    // A debug line of `status` (where the configuration came from), as one JSON object.
    let run = cli(
        None,
        &["--log-format", "json", "status"],
        &[
            ("ENGAGEMENT_CDC_LOG", "debug"),
            (
                "ENGAGEMENT_CDC__POSTGRES__URL",
                "postgres://nobody@127.0.0.1:1/x",
            ),
        ],
    );
    let first = run.stderr.lines().next().unwrap_or("");
    let line: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stderr));
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert!(line["fields"]["message"].is_string(), "{line}");
}

#[test]
fn setup_checks_every_enabled_sink() {
    let pg = Postgres::start();
    let redis = Redis::start();
    let api = MockApi::start(&[]);
    let nobody = free_port();
    let setup = |extra: &str| {
        let cfg = TestConfig::new(&pg.url("engagement"), extra);
        cli(Some(&cfg.path), &["setup"], &[])
    };

    let run = setup(&format!("[redis]\nurl = \"redis://127.0.0.1:{nobody}\"\n"));
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains(&format!(
            "cannot connect to Redis at redis://127.0.0.1:{nobody}"
        )),
        "{line}"
    );

    let run = setup(&format!(
        "[http]\nurl = \"http://127.0.0.1:{nobody}/events\"\n"
    ));
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains(&format!(
            "cannot reach the API at http://127.0.0.1:{nobody}/events"
        )),
        "{line}"
    );

    let both = format!(
        "[redis]\nurl = \"{}\"\n\n[http]\nurl = \"{}\"\n",
        redis.url(),
        api.url()
    );
    let run = setup(&both);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "redis: {} answers and accepts the batch script",
            redis.url()
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("http: {} answers (HTTP 405 to HEAD)", api.url())),
        "{}",
        run.stdout
    );
    assert_eq!(api.stats()["requests"], 0, "nothing was posted");

    // A Redis Cluster node whose cluster does not serve (no slots assigned) is refused with
    // the reason, not failed on at the first batch; with redis.cluster = false any cluster
    // node is refused.
    let node = Redis::start_cluster_node();
    let run = setup(&format!("[redis]\nurl = \"{}\"\n", node.url()));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.error_line().contains("Redis Cluster") && run.error_line().contains("not serving"),
        "{run:?}"
    );
    let run = setup(&format!(
        "[redis]\nurl = \"{}\"\ncluster = false\n",
        node.url()
    ));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.error_line()
            .contains("is a Redis Cluster node and redis.cluster = false"),
        "{run:?}"
    );

    // Reachable but not authorised.
    redis.cli(&["CONFIG", "SET", "requirepass", "redis-Pw-9"]);
    let run = setup(&both);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("Redis"), "{run:?}");
}

/// Output piped into a reader that is gone (`dlq list --json | head`): the command ends
/// quietly, as `cat` does, never with a panic.
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    use std::process::{Command, Stdio};
    let dir = TestDir::new("pipe");
    let mut child = Command::new(bin())
        .args(["dlq", "list", "--json"])
        .env("ENGAGEMENT_CDC__STATE__DIR", dir.path.join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The read end is closed before the command writes: its write meets EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

/// Two separately initialised clusters have different system identifiers: the state of
/// one is refused on the other by `setup` and by `run`, even with the same database and
/// slot names.
#[test]
fn the_state_of_another_cluster_is_refused() {
    let a = Postgres::start();
    let b = Postgres::start_with(PgOptions {
        fresh_initdb: true,
        ..Default::default()
    });
    b.create_database("engagement", true);
    let id = |pg: &Postgres| {
        pg.psql(
            "engagement",
            "SELECT system_identifier FROM pg_control_system()",
        )
    };
    assert_ne!(id(&a), id(&b), "the clusters share a system identifier");
    let on_a = TestConfig::new(&a.url("engagement"), "");
    assert_eq!(cli(Some(&on_a.path), &["setup"], &[]).code, 0);
    // The same state directory, pointed at B (where a slot of that name exists too).
    let on_b = TestConfig::new(&b.url("engagement"), "");
    assert_eq!(cli(Some(&on_b.path), &["setup"], &[]).code, 0);
    let swapped = ("ENGAGEMENT_CDC__POSTGRES__URL", b.url("engagement"));
    let env = [(swapped.0, swapped.1.as_str())];
    let setup = cli(Some(&on_a.path), &["setup"], &env);
    assert_eq!(setup.code, 1, "{setup:?}");
    assert!(
        setup.error_line().contains("belongs to"),
        "{}",
        setup.stderr
    );
    let run = cli(Some(&on_a.path), &["run", "--stdout"], &env);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run.error_line();
    assert!(
        line.contains("system identifier") && line.contains(&id(&b)),
        "{line}"
    );
}

/// The inputs a hostile user tried: each is one clear line and exit 2, never a panic or a
/// silent default.
#[test]
fn hostile_inputs_are_usage_errors() {
    let dir = TestDir::new("hostile");
    let state = dir.path.join("state");
    let state = state.to_str().unwrap();
    let env = [("ENGAGEMENT_CDC__STATE__DIR", state)];
    for (args, says) in [
        (
            vec![
                "backfill",
                "--start",
                "2026-01-0éT09:00:00Z",
                "--end",
                "2026-01-09",
            ],
            "is not a time",
        ),
        (
            vec!["backfill", "--start", "2026-02-30", "--end", "2026-03-09"],
            "is not a time",
        ),
        (
            vec![
                "backfill",
                "--start",
                "2026-01-08T09:00:00+99:99",
                "--end",
                "2026-03-09",
            ],
            "is not a time",
        ),
        (
            vec![
                "backfill",
                "--start",
                "2026-01-09",
                "--end",
                "2026-01-08",
                "--sinks",
                "stdout",
            ],
            "must be after",
        ),
    ] {
        let run = cli(None, &args, &env);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    let run = cli(
        None,
        &["dlq", "list"],
        &[("ENGAGEMENT_CDC_LOG", "notafilter["), env[0]],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("ENGAGEMENT_CDC_LOG") && run.stderr.contains("not a log filter"),
        "{}",
        run.stderr
    );
}
