//! Unit tests of loading: defaults, the shipped example file, environment overrides, and
//! the errors of bad files and values.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(text: &str, pairs: &[(&str, &str)]) -> Result<Config, UsageError> {
    Config::from_toml_with_env(text, &env(pairs), &Source::Defaults)
}

#[test]
fn empty_file_gives_defaults_without_sinks() {
    let c = parse("", &[]).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(
        c.postgres.url,
        "postgres://postgres@127.0.0.1:55432/engagement"
    );
    assert_eq!(c.pipeline.max_batch_rows, 10_000);
    assert!(c.clickhouse().is_none() && c.redis().is_none() && c.http().is_none());
}

#[test]
fn a_present_section_turns_its_sink_on_unless_disabled() {
    let c = parse("[redis]\n[clickhouse]\nenabled = false\n", &[]).unwrap();
    assert_eq!(c.redis().unwrap().url, "redis://127.0.0.1:56379");
    assert!(c.clickhouse().is_none());
    assert!(c.clickhouse.is_some());
}

#[test]
fn the_shipped_example_file_is_the_spec_defaults() {
    let text = include_str!("../../engagement-cdc.toml");
    let c = parse(text, &[]).unwrap();
    assert_eq!(c, Config::all_sections());
}

#[test]
fn env_overrides_are_typed_by_the_key() {
    let c = parse(
        "[pipeline]\nmax_batch_rows = 5\n",
        &[
            ("ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS", "77"),
            ("ENGAGEMENT_CDC__POSTGRES__URL", "postgres://u:pw@h:1/d"),
            ("ENGAGEMENT_CDC__HTTP__MODE", "per_event"),
            ("ENGAGEMENT_CDC__STDOUT__ENABLED", "true"),
            ("ENGAGEMENT_CDC__CLICKHOUSE__PASSWORD", "12345"),
            ("UNRELATED", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.pipeline.max_batch_rows, 77);
    assert_eq!(c.postgres.url, "postgres://u:pw@h:1/d");
    assert_eq!(c.http().unwrap().mode, HttpMode::PerEvent);
    assert!(c.stdout.enabled);
    assert_eq!(c.clickhouse().unwrap().password.expose(), "12345");
}

#[test]
fn unknown_keys_are_errors() {
    let e = parse("[postgres]\nslott = \"x\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("slott"), "{e}");
    let e = parse("[kafka]\n", &[]).unwrap_err();
    assert!(e.to_string().contains("kafka"), "{e}");
    let e = parse("", &[("ENGAGEMENT_CDC__REDIS__HOST", "x")]).unwrap_err();
    assert!(e.to_string().contains("ENGAGEMENT_CDC__REDIS__HOST"), "{e}");
    let e = parse("", &[("ENGAGEMENT_CDC__REDIS", "x")]).unwrap_err();
    assert!(e.to_string().contains("does not name a key"), "{e}");
}

#[test]
fn column_names_and_the_zone_are_keys_with_environment_variables() {
    let c = parse(
        "[postgres.event_columns]\nevent_ts = \"created_at\"\n[postgres]\ntimestamp_zone = \"Europe/Paris\"\n",
        &[("ENGAGEMENT_CDC__POSTGRES__CONTENT_COLUMNS__LENGTH_SECONDS", "secs")],
    )
    .unwrap();
    assert_eq!(c.postgres.event_columns.event_ts, "created_at");
    assert_eq!(c.postgres.event_columns.id, "id");
    assert_eq!(c.postgres.content_columns.length_seconds, "secs");
    assert_eq!(c.postgres.zone().unwrap().name(), "Europe/Paris");
    let e = parse("[postgres]\ntimestamp_zone = \"Mars/Olympus\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("postgres.timestamp_zone"), "{e}");
    let e = parse("[postgres.event_columns]\ndevice = \"user_id\"\n", &[]).unwrap_err();
    assert!(
        e.to_string().contains("both name column \"user_id\""),
        "{e}"
    );
    let e = parse("[postgres.event_columns]\nwhen = \"x\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("when"), "{e}");
    let e = parse(
        "",
        &[("ENGAGEMENT_CDC__POSTGRES__EVENT_COLUMNS__WHEN", "x")],
    )
    .unwrap_err();
    assert!(e.to_string().contains("postgres.event_columns.when"), "{e}");
    let e = parse("", &[("ENGAGEMENT_CDC__POSTGRES__EVENT_COLUMNS", "x")]).unwrap_err();
    assert!(e.to_string().contains("names no configuration key"), "{e}");
}

#[test]
fn bad_values_are_clear_errors() {
    let e = parse("", &[("ENGAGEMENT_CDC__PIPELINE__MAX_BATCH_ROWS", "many")]).unwrap_err();
    assert!(e.to_string().contains("is not an integer"), "{e}");
    let e = parse("[pipeline]\nmax_batch_rows = 0\n", &[]).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    for nice in ["-1", "20"] {
        let e = parse("", &[("ENGAGEMENT_CDC__PIPELINE__NICE", nice)]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("pipeline.nice") && text.contains("0 to 19"),
            "{text}"
        );
    }
    assert_eq!(parse("", &[]).unwrap().pipeline.nice, 0);
    assert_eq!(
        parse("[pipeline]\nnice = 10\n", &[]).unwrap().pipeline.nice,
        10
    );
    let e = parse("[http]\nmode = \"stream\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("stream"), "{e}");
    let e = parse("[postgres]\nslot = \"Bad-Name\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("postgres.slot"), "{e}");
    // TLS to Postgres is supported: every libpq mode but `allow` is accepted.
    for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
        let url = format!("[postgres]\nurl = \"postgres://u@h/d?sslmode={mode}\"\n");
        parse(&url, &[]).unwrap();
    }
    let e = parse(
        "[postgres]\nurl = \"postgres://u@h/d?sslmode=bogus\"\n",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("sslmode=\"bogus\""), "{e}");
    let e = parse("[postgres]\nsslmode = \"bogus\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("postgres.sslmode: "), "{e}");
    // https is supported; a CA file that is not there is a configuration error naming it.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let c = parse(
        &format!(
            "[http]\nurl = \"https://api.example.com/events\"\nca_file = \"{}\"\n",
            ca.display()
        ),
        &[],
    )
    .unwrap();
    assert!(c.http().unwrap().tls().unwrap().is_some());
    let e = parse(
        "[http]\nurl = \"https://api.example.com/events\"\nca_file = \"/nonexistent/ca.pem\"\n",
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("http.ca_file /nonexistent/ca.pem"),
        "{e}"
    );
    let e = parse(
        "[redis]\nurl = \"rediss://h:1\"\ncert_file = \"/x.pem\"\n",
        &[],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("needs both redis.cert_file and redis.key_file"),
        "{e}"
    );
    let e = parse("[server]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
    assert!(
        e.to_string()
            .contains("server.listen: \"nowhere\" is not an address"),
        "{e}"
    );
    let e = parse("[postgres]\nevents_table = \"app.Events\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("postgres.events_table: "), "{e}");
    assert!(
        e.to_string()
            .contains("\"Events\" is not a plain identifier"),
        "{e}"
    );
    let e = parse("[pipeline]\nmax_batch_rows = \"many\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("pipeline.max_batch_rows: "), "{e}");
    let c = parse(
        "[postgres]\nevents_table = \"app.events\"\ncontent_table = \"content\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.postgres.events_table.quoted(), "\"app\".\"events\"");
    assert_eq!(c.postgres.content_table, QualifiedTable::public("content"));
    let e = parse("[postgres\nurl=", &[]).unwrap_err();
    assert!(e.to_string().contains("not valid TOML"), "{e}");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn secrets_are_never_printed() {
    let c = parse(
        "[postgres]\nurl = \"postgres://app:hunter2@db:5432/x\"\n[clickhouse]\npassword = \"hunter2\"\n[http]\nauth_token = \"hunter2\"\n",
        &[],
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert_eq!(
        redact_url("postgres://app:hunter2@db:5432/x"),
        "postgres://app:***@db:5432/x"
    );
    assert_eq!(redact_url("redis://127.0.0.1:1"), "redis://127.0.0.1:1");
}

#[test]
fn qualified_tables() {
    let t = QualifiedTable::parse("k", "engagement_events").unwrap();
    assert_eq!(t.to_string(), "public.engagement_events");
    let t = QualifiedTable::parse("k", "app.events").unwrap();
    assert_eq!(t.quoted(), "\"app\".\"events\"");
    assert!(QualifiedTable::parse("k", "a.b.c").is_err());
}

mod docs_tests {
    use super::*;

    /// `docs/configuration.md` lists exactly the keys of [`Config`], each with its default
    /// and environment variable.
    #[test]
    fn the_configuration_reference_matches_the_code() {
        let doc = include_str!("../../docs/configuration.md");
        let schema = toml::Table::try_from(Config::all_sections()).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let key = cells[1].trim_matches('`');
            documented.insert(key.to_string());
            let parts: Vec<&str> = key.split('.').collect();
            assert!(parts.len() >= 2, "{key} is not section.key");
            let mut default: Option<&toml::Value> = None;
            let mut level = Some(&schema);
            for part in &parts {
                default = level.and_then(|t| t.get(*part));
                level = default.and_then(|v| v.as_table());
            }
            let default = default
                .unwrap_or_else(|| panic!("docs/configuration.md documents unknown key {key}"));
            let shown = match default {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let doc_default = cells[2].trim_matches('`');
            let doc_default = if doc_default == "\"\"" {
                ""
            } else {
                doc_default
            };
            assert_eq!(doc_default, shown, "default of {key}");
            assert_eq!(
                cells[3].trim_matches('`'),
                format!("{ENV_PREFIX}{}", parts.join("__").to_uppercase()),
                "environment variable of {key}"
            );
        }
        // Every leaf key, sub-tables such as postgres.event_columns included.
        fn leaves(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
            for (name, value) in table {
                let key = format!("{prefix}{name}");
                match value.as_table() {
                    Some(t) => leaves(&format!("{key}."), t, out),
                    None => out.push(key),
                }
            }
        }
        let mut keys = Vec::new();
        leaves("", &schema, &mut keys);
        for key in keys {
            assert!(
                documented.contains(&key),
                "{key} is missing from docs/configuration.md"
            );
        }
    }
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    /// Every key of the configuration, as `section.key` (sub-tables included).
    fn keys() -> Vec<String> {
        fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                match v.as_table() {
                    Some(sub) => walk(&format!("{prefix}{k}."), sub, out),
                    None => out.push(format!("{prefix}{k}")),
                }
            }
        }
        let mut out = Vec::new();
        walk(
            "",
            &toml::Table::try_from(Config::all_sections()).unwrap(),
            &mut out,
        );
        out
    }

    proptest! {
        /// Any value for any key, in the file or in the environment, is loaded or refused
        /// with an error, never a panic.
        #[test]
        fn any_value_of_any_key_is_loaded_or_refused(
            picks in prop::collection::vec((any::<prop::sample::Index>(), "\\PC{0,30}", any::<i64>(), any::<bool>()), 1..6),
        ) {
            let keys = keys();
            let mut file = String::new();
            let mut vars: Vec<(String, String)> = Vec::new();
            for (index, text, number, in_env) in picks {
                let key = index.get(&keys);
                let (table, name) = key.rsplit_once('.').unwrap();
                if in_env {
                    vars.push((
                        format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase()),
                        text.clone(),
                    ));
                } else {
                    let value = if number % 2 == 0 {
                        number.to_string()
                    } else {
                        toml::Value::String(text.clone()).to_string()
                    };
                    file.push_str(&format!("[{table}]\n{name} = {value}\n"));
                }
            }
            let _ = Config::from_toml_with_env(&file, &vars, &Source::Defaults);
        }

        /// Any text as the file.
        #[test]
        fn any_file_is_loaded_or_refused(text in "\\PC{0,200}") {
            let _ = Config::from_toml_with_env(&text, &[], &Source::Defaults);
        }
    }
}

#[test]
fn clickhouse_shard_urls_from_the_file_and_the_environment() {
    let c = parse(
        "[clickhouse]\ncluster = \"c\"\nshard_urls = [[\"http://a:8123\"], [\"http://b:8123\", \"https://c:8443\"]]\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        c.clickhouse().unwrap().shard_urls,
        vec![
            vec!["http://a:8123".to_string()],
            vec!["http://b:8123".to_string(), "https://c:8443".to_string()]
        ]
    );
    // A list from the environment is written as TOML.
    let c = parse(
        "[clickhouse]\ncluster = \"c\"\n",
        &[(
            "ENGAGEMENT_CDC__CLICKHOUSE__SHARD_URLS",
            "[[\"http://a:8123\"], [\"http://b:8123\"]]",
        )],
    )
    .unwrap();
    assert_eq!(c.clickhouse().unwrap().shard_urls.len(), 2);
    let e = parse(
        "[clickhouse]\ncluster = \"c\"\n",
        &[("ENGAGEMENT_CDC__CLICKHOUSE__SHARD_URLS", "http://a:8123")],
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("ENGAGEMENT_CDC__CLICKHOUSE__SHARD_URLS")
            && e.to_string().contains("TOML list"),
        "{e}"
    );
    for (text, expected) in [
        (
            "shard_urls = [[\"http://a:8123\"]]\n",
            "clickhouse.cluster is empty",
        ),
        (
            "cluster = \"c\"\nshard_urls = [[\"http://a:8123\"], []]\n",
            "no URL for shard 2",
        ),
        (
            "cluster = \"c\"\nshard_urls = [[\"a:8123\"]]\n",
            "clickhouse.shard_urls (shard 1) \"a:8123\" is not an HTTP URL",
        ),
    ] {
        let e = parse(&format!("[clickhouse]\n{text}"), &[]).unwrap_err();
        assert!(e.to_string().contains(expected), "{text}: {e}");
    }
}
