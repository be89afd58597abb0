//! `ENGAGEMENT_CDC__SECTION__KEY` overrides laid over the configuration file.

use super::{Config, ENV_PREFIX};
use crate::error::UsageError;

/// Lay `ENGAGEMENT_CDC__SECTION__KEY=value` over the table, typing each value by the key's
/// default. An unknown section or key is an error naming the variable.
pub(super) fn apply_env_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), UsageError> {
    let schema = toml::Table::try_from(Config::all_sections())
        .expect("the default configuration serializes to TOML");
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path = &name[ENV_PREFIX.len()..];
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if parts.len() < 2 || parts.iter().any(String::is_empty) {
            return Err(UsageError::new(format!(
                "environment variable {name} does not name a key; use {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}POSTGRES__URL"
            )));
        }
        let dotted = parts.join(".");
        // The key's default types the value; sub-tables such as postgres.event_columns are
        // reached with one more `__`.
        let mut default: Option<&toml::Value> = None;
        let mut level = Some(&schema);
        for part in &parts {
            default = level.and_then(|t| t.get(part));
            level = default.and_then(|v| v.as_table());
        }
        let Some(default) = default.filter(|d| !d.is_table()) else {
            return Err(UsageError::new(format!(
                "environment variable {name} names no configuration key ({dotted}); see docs/configuration.md for the keys"
            )));
        };
        let value = typed_value(name, raw, default)?;
        let (key, tables) = parts.split_last().expect("two parts or more");
        let mut table: &mut toml::Table = table;
        let mut at = String::new();
        for part in tables {
            at = if at.is_empty() {
                part.clone()
            } else {
                format!("{at}.{part}")
            };
            let entry = table
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(inner) = entry.as_table_mut() else {
                return Err(UsageError::new(format!(
                    "configuration key {at} must be a section ([{at}]), not a value"
                )));
            };
            table = inner;
        }
        table.insert(key.clone(), value);
    }
    Ok(())
}

fn typed_value(name: &str, raw: &str, default: &toml::Value) -> Result<toml::Value, UsageError> {
    let bad = |what: &str| {
        UsageError::new(format!(
            "environment variable {name}={raw:?} is not {what}; set it to {what}"
        ))
    };
    Ok(match default {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse::<i64>().map_err(|_| bad("an integer"))?)
        }
        toml::Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
            "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err(bad("true or false")),
        },
        toml::Value::Float(_) => {
            toml::Value::Float(raw.trim().parse::<f64>().map_err(|_| bad("a number"))?)
        }
        // A list is written as TOML, e.g. `[["http://a:8123"], ["http://b:8123"]]`.
        toml::Value::Array(_) => {
            let parsed: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| bad("a TOML list such as [\"a\", \"b\"]"))?;
            match parsed.get("v") {
                Some(v @ toml::Value::Array(_)) => v.clone(),
                _ => return Err(bad("a TOML list such as [\"a\", \"b\"]")),
            }
        }
        _ => toml::Value::String(raw.to_string()),
    })
}
