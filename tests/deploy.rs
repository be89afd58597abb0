//! The deployment files agree with the code: every `ENGAGEMENT_CDC__` variable of the
//! compose file names a real configuration key, and the SQL it mounts is the SQL the tests
//! apply (`migrations/postgres/`).

use std::path::Path;

use engagement_cdc::config::{Config, Source};

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
