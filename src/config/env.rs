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
        let Some((section, key)) = path.split_once("__") else {
            return Err(UsageError::new(format!(
                "environment variable {name} does not name a key; use {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}POSTGRES__URL"
            )));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let Some(default) = schema
            .get(&section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(&key))
        else {
            return Err(UsageError::new(format!(
                "environment variable {name} names no configuration key ({section}.{key}); see docs/configuration.md for the keys"
            )));
        };
        let value = typed_value(name, raw, default)?;
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(UsageError::new(format!(
                "configuration key {section} must be a section ([{section}]), not a value"
            )));
        };
        section_table.insert(key, value);
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
        _ => toml::Value::String(raw.to_string()),
    })
}
