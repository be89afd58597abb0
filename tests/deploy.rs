//! The deployment files agree with the code: every `ENGAGEMENT_CDC__` variable of the
//! compose file names a real configuration key, and the SQL it mounts is the SQL the tests
//! apply (`migrations/postgres/`). And README's demo runs.

mod support;

use std::path::Path;

use engagement_cdc::config::{Config, Source};
use support::{free_port, TestDir};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> serde_yaml::Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    serde_yaml::from_str(&text).expect("docker-compose.yml is YAML")
}

fn env_of(service: &serde_yaml::Value) -> Vec<(String, String)> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                    };
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_engine_variable_is_a_configuration_key() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let mut seen = 0;
    for (name, service) in services {
        let env: Vec<(String, String)> = env_of(service)
            .into_iter()
            .filter(|(k, _)| k.starts_with("ENGAGEMENT_CDC__"))
            .collect();
        seen += env.len();
        // Parsing with unknown keys rejected, each value typed by its key.
        let config = Config::from_toml_with_env("", &env, &Source::Defaults)
            .unwrap_or_else(|e| panic!("service {:?}: {e}", name.as_str()));
        if name.as_str() == Some("engagement-cdc") {
            assert!(
                config.clickhouse().is_some()
                    && config.redis().is_some()
                    && config.http().is_some()
            );
            assert_eq!(
                config.postgres.url,
                "postgres://postgres:postgres@postgres:5432/engagement"
            );
        }
    }
    assert!(
        seen >= 10,
        "the engine is configured through ENGAGEMENT_CDC__ variables"
    );
}

#[test]
fn postgres_gets_the_schema_the_tests_use() {
    let c = compose();
    let pg = &c["services"]["postgres"];
    assert!(pg["image"].as_str().unwrap().starts_with("postgres:16"));
    let command: Vec<&str> = pg["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(command.contains(&"wal_level=logical"), "{command:?}");
    let volumes: Vec<&str> = pg["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mount = volumes
        .iter()
        .find(|v| v.ends_with("/docker-entrypoint-initdb.d:ro"))
        .expect("an init script mount");
    let source = mount.split(':').next().unwrap();
    // tests/support applies every file of this directory to each test database.
    assert_eq!(
        root().join(source).canonicalize().unwrap(),
        root().join("migrations/postgres").canonicalize().unwrap()
    );
    assert_eq!(
        env_of(pg)
            .iter()
            .find(|(k, _)| k == "POSTGRES_DB")
            .map(|(_, v)| v.as_str()),
        Some("engagement")
    );
}

#[test]
fn start_order_and_healthchecks() {
    let c = compose();
    let engine = &c["services"]["engagement-cdc"];
    for dep in ["postgres", "clickhouse", "redis", "mock-api"] {
        assert_eq!(
            engine["depends_on"][dep]["condition"], "service_healthy",
            "{dep}"
        );
        assert!(
            !c["services"][dep]["healthcheck"].is_null(),
            "{dep} has no healthcheck"
        );
    }
    let entry = serde_yaml::to_string(&engine["entrypoint"]).unwrap();
    assert!(
        entry.contains("engagement-cdc setup && exec engagement-cdc run"),
        "{entry}"
    );
    assert!(engine["volumes"][0]
        .as_str()
        .unwrap()
        .starts_with("cdc-state:"));
}

#[test]
fn the_image_runs_as_a_user_with_a_state_volume() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(text.matches("FROM ").count() >= 2, "multi-stage");
    assert!(text
        .lines()
        .any(|l| l.starts_with("USER ") && !l.contains("root")));
    assert!(text.contains("VOLUME /var/lib/engagement-cdc"));
    // The state directory the image sets is inside the volume.
    assert!(text.contains("ENGAGEMENT_CDC__STATE__DIR=/var/lib/engagement-cdc/"));
}

/// A copy of what README's demo uses (its scripts, the migrations, `engagement-cdc.toml`) in
/// a test directory of its own, so that the demo's stack and state stay out of the working
/// tree; stopped when dropped, whatever happened (the directory goes with it).
struct DemoCopy {
    dir: TestDir,
}

impl DemoCopy {
    fn new() -> DemoCopy {
        let dir = TestDir::new("demo");
        for item in ["scripts", "migrations", "engagement-cdc.toml"] {
            let status = std::process::Command::new("cp")
                .arg("-r")
                .arg(root().join(item))
                .arg(&dir.path)
                .status()
                .unwrap();
            assert!(status.success(), "cannot copy {item}");
        }
        DemoCopy { dir }
    }

    /// `bash scripts/NAME ARGS` in the copy, at most `limit` seconds; its output and whether
    /// it succeeded.
    fn run(
        &self,
        limit: u32,
        script: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> (bool, String) {
        let out = std::process::Command::new("timeout")
            .arg(limit.to_string())
            .arg("bash")
            .arg(self.dir.path.join("scripts").join(script))
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(&self.dir.path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The ends of the stack's, the mock API's and the engine's logs (for a failure).
    fn logs(&self) -> String {
        let stack = self.dir.path.join(".stack");
        [
            "pg/postgres.log",
            "pg/initdb.log",
            "redis/redis.log",
            "clickhouse/log/clickhouse-server.err.log",
            "mock-api.log",
            "engine.log",
        ]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(stack.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- .stack/{name}:\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl Drop for DemoCopy {
    fn drop(&mut self) {
        let _ = self.run(60, "demo.sh", &["stop"], &[]);
        let _ = self.run(60, "stack.sh", &["down"], &[]);
    }
}

/// README's first command, `scripts/demo.sh`, as a newcomer runs it: the stack comes up, the
/// mock API and the engine start, events are loaded, and every sink holds every one of them
/// (the demo itself waits for that and fails if it does not come). The binary is the one
/// under test (`ENGAGEMENT_CDC_BIN`: no release build); the ports are the test support's
/// (`STACK_*_PORT`, `DEMO_*_PORT`), below the range the kernel hands out to outgoing
/// connections, where the demo's defaults lie and one could be held when the test runs.
#[test]
fn the_readme_demo_runs_and_every_sink_holds_every_event() {
    let demo = DemoCopy::new();
    let ports: Vec<String> = (0..6).map(|_| free_port().to_string()).collect();
    let (ok, out) = demo.run(
        600,
        "demo.sh",
        &[],
        &[
            ("ENGAGEMENT_CDC_BIN", env!("CARGO_BIN_EXE_engagement-cdc")),
            ("DEMO_SECONDS", "3"),
            ("STACK_PG_PORT", &ports[0]),
            ("STACK_REDIS_PORT", &ports[1]),
            ("STACK_CH_HTTP_PORT", &ports[2]),
            ("STACK_CH_TCP_PORT", &ports[3]),
            ("DEMO_API_PORT", &ports[4]),
            ("DEMO_SERVER_PORT", &ports[5]),
        ],
    );
    assert!(ok, "scripts/demo.sh failed:\n{out}\n{}", demo.logs());
    // `== events: Postgres N, ClickHouse N, Redis N`, all equal and not zero.
    let line = out
        .lines()
        .find(|l| l.starts_with("== events: Postgres "))
        .unwrap_or_else(|| panic!("no events line in the demo's output:\n{out}"));
    let counts: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 3, "{line}");
    assert!(counts[0] >= 3000, "{line}");
    assert!(counts.iter().all(|&c| c == counts[0]), "{line}");
    assert!(
        out.contains("\"duplicates\":0"),
        "the API saw duplicates:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("health:") && l.trim_end().ends_with(" ok")),
        "status did not say health ok:\n{out}"
    );
}
