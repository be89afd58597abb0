//! TLS to every server, with certificates made at test time (tests/support/tls.rs): a
//! PostgreSQL that refuses plaintext (`hostssl` only), Redis on its TLS port only and asking
//! for a client certificate, ClickHouse over HTTPS and an HTTPS API. The seed event reaches
//! all three sinks with `sslmode=verify-full`; each way a handshake can fail gives its own
//! clear error; no secret appears in any output.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(120);

const PG_PASSWORD: &str = "pg-Secret-4711";
const API_TOKEN: &str = "api-Token-0815";
const REDIS_PASSWORD: &str = "redis-Pass-1234";

fn tls_postgres(certs: &Certs, cert: &str, key: &str) -> Postgres {
    let pg = Postgres::start_with(PgOptions {
        tls: Some((certs.path(cert), certs.path(key))),
        hostssl_only: true,
        ..PgOptions::default()
    });
    pg.create_database("engagement", true);
    pg
}

/// `[postgres]` for `localhost` with the given query parameters, as the role `cdc` whose
/// password is in a file.
fn pg_url(pg: &Postgres, host: &str, params: &str) -> String {
    format!("postgres://cdc@{host}:{}/engagement?{params}", pg.port)
}

#[test]
fn the_seed_event_reaches_every_sink_over_verified_tls_and_no_secret_is_printed() {
    let certs = Certs::new();
    let pg = tls_postgres(&certs, "server.pem", "server.key");
    pg.psql(
        "engagement",
        &format!("CREATE ROLE cdc SUPERUSER LOGIN PASSWORD '{PG_PASSWORD}'"),
    );
    let ch = ClickHouse::start_tls(&certs);
    let redis = Redis::start_tls(&certs);
    // An ACL user with a password, as managed Redis services hand out.
    redis.cli(&[
        "ACL",
        "SETUSER",
        "cdc",
        "on",
        &format!(">{REDIS_PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]);
    let api = MockApi::start_tls(&certs);
    let secrets = TestDir::new("secrets");
    let pw_file = secrets.path.join("pg-password");
    std::fs::write(&pw_file, format!("{PG_PASSWORD}\n")).unwrap();
    let ca = certs.ca();
    let cfg = TestConfig::new(
        &pg_url(
            &pg,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        ),
        &format!(
            "[clickhouse]\nurl = \"{}\"\nca_file = \"{ca}\"\n\n\
             [redis]\nurl = \"{}\"\nusername = \"cdc\"\nca_file = \"{ca}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n\
             [http]\nurl = \"{}\"\nca_file = \"{ca}\"\n",
            ch.https_url(),
            redis.url(),
            certs.client_cert().display(),
            certs.client_key().display(),
            api.url(),
            ca = ca.display(),
        ),
    );
    // The password from a file (a key of the file), the token from the environment.
    let text = std::fs::read_to_string(&cfg.path).unwrap();
    std::fs::write(
        &cfg.path,
        text.replace(
            "[postgres]\n",
            &format!("[postgres]\npassword_file = \"{}\"\n", pw_file.display()),
        ),
    )
    .unwrap();
    let env = [
        ("ENGAGEMENT_CDC__HTTP__AUTH_TOKEN", API_TOKEN),
        ("ENGAGEMENT_CDC__REDIS__PASSWORD", REDIS_PASSWORD),
    ];

    let setup = cli(Some(&cfg.path), &["setup"], &env);
    assert_eq!(setup.code, 0, "setup over TLS: {setup:?}");
    assert!(
        setup.stdout.contains("connected over TLSv1."),
        "{}",
        setup.stdout
    );
    let mut engine = Engine::spawn(&cfg.path, &["run"], &env);
    wait_for("the engine to stream", T, || {
        cfg.engine_status()
            .filter(|s| s["streaming"] == true)
            .map(|_| ())
    });
    let id = pg.psql(
        "engagement",
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
         VALUES (1, 999, 'play', 7000, 'web') RETURNING id",
    );
    wait_for("the ClickHouse row", T, || {
        (ch.query("SELECT count() FROM engagement.events_enriched") == "1").then_some(())
    });
    assert_eq!(
        ch.query("SELECT event_id, engagement_pct FROM engagement.events_enriched"),
        format!("{id}\t0.02")
    );
    wait_for("the Redis counter", T, || {
        (redis.cli(&["GET", "content:count:1"]) == "1").then_some(())
    });
    wait_for("the API to receive it", T, || {
        (api.stats()["unique_event_ids"] == 1).then_some(())
    });
    assert!(
        redis.cli(&["CLIENT", "LIST"]).contains(" user=cdc "),
        "the engine logs in to Redis as its ACL user"
    );
    // The replication connection is encrypted (plaintext would have been refused anyway,
    // as it was for `setup`'s query connection).
    assert_eq!(
        pg.psql(
            "engagement",
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.usename = 'cdc' AND a.backend_type = 'walsender'"
        ),
        "t"
    );

    // No secret in any output.
    let status = cli(Some(&cfg.path), &["status"], &env);
    assert_eq!(status.code, 0, "{status:?}");
    let status_json = cli(Some(&cfg.path), &["status", "--json"], &env);
    let outputs = [
        setup.stdout,
        setup.stderr,
        status.stdout,
        status.stderr,
        status_json.stdout,
        http_get(cfg.server_port, "/status").unwrap(),
        http_get(cfg.server_port, "/metrics").unwrap(),
        http_get(cfg.server_port, "/").unwrap(),
    ];
    assert_eq!(engine.terminate(), 0);
    for (i, out) in outputs.iter().chain([&engine.stderr()]).enumerate() {
        for secret in [PG_PASSWORD, API_TOKEN, REDIS_PASSWORD] {
            assert!(!out.contains(secret), "output {i} shows a secret: {out}");
        }
    }
}

#[test]
fn each_tls_failure_gives_its_own_error() {
    let certs = Certs::new();
    let pg = tls_postgres(&certs, "server.pem", "server.key");
    let ca = certs.ca().display().to_string();
    let wrong = certs.wrong_ca().display().to_string();
    // `status` connects to Postgres and nothing else. With no engine running it exits 1
    // either way; it reached Postgres when it could report the slot.
    let status = |url: &str, extra: &str| {
        let cfg = TestConfig::new(url, extra);
        cli(Some(&cfg.path), &["status"], &[])
    };
    let reached = |run: &Run| run.stdout.contains("slot:") && run.stderr.starts_with("unhealthy: ");
    let as_postgres = |host: &str, params: &str| {
        format!("postgres://postgres@{host}:{}/engagement?{params}", pg.port)
    };

    // The good case, for contrast.
    let ok = status(
        &as_postgres(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "",
    );
    assert!(reached(&ok), "{ok:?}");

    let run = status(
        &as_postgres(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={wrong}"),
        ),
        "",
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("unknown authority"), "{run:?}");

    let run = status(
        &as_postgres(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "",
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("hostname mismatch"), "{run:?}");
    // verify-ca checks the chain only, so the same address is accepted.
    let run = status(
        &as_postgres("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
        "",
    );
    assert!(reached(&run), "{run:?}");

    // Plaintext is refused by this server: sslmode=disable cannot get in.
    let run = status(&as_postgres("localhost", "sslmode=disable"), "");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("pg_hba.conf"), "{run:?}");

    // A key file that cannot be read is a configuration error (exit 2) naming the key.
    let run = status(
        &as_postgres(
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey=/nonexistent/client.key",
                certs.client_cert().display()
            ),
        ),
        "",
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.error_line()
            .contains("postgres.sslkey /nonexistent/client.key"),
        "{run:?}"
    );

    // An expired server certificate.
    let expired = tls_postgres(&certs, "expired.pem", "expired.key");
    let run = status(
        &format!(
            "postgres://postgres@localhost:{}/engagement?sslmode=verify-full&sslrootcert={ca}",
            expired.port
        ),
        "",
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("expired"), "{run:?}");

    // A server without TLS under sslmode=require.
    let plain = Postgres::start();
    let run = status(
        &format!(
            "postgres://postgres@localhost:{}/engagement?sslmode=require",
            plain.port
        ),
        "",
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("does not offer TLS"), "{run:?}");
    // ...while the default, prefer, falls back to plaintext there, as libpq does.
    let run = status(&plain.url("engagement"), "");
    assert!(reached(&run), "{run:?}");

    // The sinks: a wrong CA for ClickHouse (setup) and Redis (run) stops them with the cause.
    let ch = ClickHouse::start_tls(&certs);
    let good_pg = as_postgres(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let cfg = TestConfig::new(
        &good_pg,
        &format!(
            "[clickhouse]\nurl = \"{}\"\nca_file = \"{wrong}\"\n",
            ch.https_url()
        ),
    );
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("unknown authority"), "{run:?}");

    let redis = Redis::start_tls(&certs);
    let cfg = TestConfig::new(
        &good_pg,
        &format!(
            "[redis]\nurl = \"{}\"\nca_file = \"{wrong}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            redis.url(),
            certs.client_cert().display(),
            certs.client_key().display()
        ),
    );
    // setup checks Redis too, and says why it cannot use it.
    let run = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("unknown authority"), "{run:?}");
    // ...and so does run, set up without it.
    let without_redis = [("ENGAGEMENT_CDC__REDIS__ENABLED", "false")];
    assert_eq!(cli(Some(&cfg.path), &["setup"], &without_redis).code, 0);
    let run = cli(Some(&cfg.path), &["run"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("unknown authority"), "{run:?}");
}

#[test]
fn the_status_server_wants_its_token_and_the_state_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    const TOKEN: &str = "status-Token-2718";
    let pg = Postgres::start();
    let cfg = TestConfig::new(&pg.url("engagement"), "");
    let env = [("ENGAGEMENT_CDC__SERVER__AUTH_TOKEN", TOKEN)];
    assert_eq!(cli(Some(&cfg.path), &["setup"], &env).code, 0);
    let mode = std::fs::metadata(cfg.state_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state directory mode {mode:o}");

    let mut engine = Engine::spawn(&cfg.path, &["run", "--stdout"], &env);
    let port = cfg.server_port;
    wait_for("the engine to stream", T, || {
        http_request(port, "GET", "/readyz", b"")
            .filter(|(code, _)| *code == 200)
            .map(|_| ())
    });
    // The probes are open; everything else wants the token.
    assert_eq!(http_request(port, "GET", "/healthz", b"").unwrap().0, 200);
    for path in ["/status", "/metrics", "/"] {
        assert_eq!(
            http_request(port, "GET", path, b"").unwrap().0,
            401,
            "{path}"
        );
        let wrong = http_request_as(port, "GET", path, b"", Some("status-Token-2719"));
        assert_eq!(wrong.unwrap().0, 401, "{path} with a wrong token");
        let (code, body) = http_request_as(port, "GET", path, b"", Some(TOKEN)).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
    // `status` sends the token it is configured with.
    let status = cli(Some(&cfg.path), &["status", "--json"], &env);
    assert_eq!(status.code, 0, "{status:?}");
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["engine_running"], true, "{v}");
    assert!(!status.stdout.contains(TOKEN));
    assert_eq!(engine.terminate(), 0);
    assert!(!engine.stderr().contains(TOKEN));
}

#[test]
fn postgres_client_certificates_serve_both_connections() {
    let certs = Certs::new();
    let pg = Postgres::start_with(PgOptions {
        tls: Some((certs.server_cert(), certs.server_key())),
        hostssl_only: true,
        client_ca: Some(certs.ca()),
        ..PgOptions::default()
    });
    pg.create_database("engagement", true);
    // The client certificate's common name is the role; no password exists for it.
    pg.psql(
        "engagement",
        "CREATE ROLE \"engagement-cdc\" SUPERUSER LOGIN",
    );
    let url = format!(
        "postgres://engagement-cdc@localhost:{}/engagement?sslmode=verify-full&sslrootcert={}",
        pg.port,
        certs.ca().display()
    );
    // Without a certificate the server turns the role away.
    let cfg = TestConfig::new(&url, "");
    let run = cli(Some(&cfg.path), &["status"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.error_line().contains("certificate"), "{run:?}");
    // With one, as keys of [postgres]: setup makes the query and the replication connection.
    let text = std::fs::read_to_string(&cfg.path).unwrap().replace(
        "[postgres]\n",
        &format!(
            "[postgres]\nsslcert = \"{}\"\nsslkey = \"{}\"\n",
            certs.client_cert().display(),
            certs.client_key().display()
        ),
    );
    std::fs::write(&cfg.path, text).unwrap();
    let setup = cli(Some(&cfg.path), &["setup"], &[]);
    assert_eq!(setup.code, 0, "{setup:?}");
    assert!(
        setup.stdout.contains("slot \"engagement_cdc\" created"),
        "{}",
        setup.stdout
    );
    let mut engine = Engine::spawn(&cfg.path, &["run", "--stdout"], &[]);
    let id = pg.psql(
        "engagement",
        "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device)
         VALUES (1, 7, 'play', 1000, 'web') RETURNING id",
    );
    let lines = engine.wait_lines(1, T);
    assert!(
        lines[0].contains(&format!("\"event_id\":{id}")),
        "{lines:?}"
    );
    assert_eq!(engine.terminate(), 0);
}
