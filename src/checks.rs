//! Typed values and checks every configuration section uses: secrets that are never printed
//! (and secrets read from files), table names, identifiers, ranges, URLs, optional keys.
//!
//! A leaf: it depends on nothing but [`crate::error`]. The sections live beside the code
//! that uses them (`source/config.rs`, `sinks/*/config.rs`, …) and `config/` gathers them,
//! so neither depends on the other through here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::UsageError;

/// A string that is never printed: `Debug` and `Display` show `***` when it is set.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `schema.table` (or `table`, meaning `public.table`), each part a plain identifier. Read
/// from the configuration as that string, checked once there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QualifiedTable {
    pub schema: String,
    pub name: String,
}

impl QualifiedTable {
    pub fn parse(key: &str, value: &str) -> Result<QualifiedTable, UsageError> {
        let (schema, name) = match value.split_once('.') {
            Some((s, n)) => (s, n),
            None => ("public", value),
        };
        check_identifier(key, schema)?;
        check_identifier(key, name)?;
        Ok(QualifiedTable {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// `public.NAME`.
    pub fn public(name: &str) -> QualifiedTable {
        QualifiedTable {
            schema: "public".into(),
            name: name.into(),
        }
    }

    /// Quoted for SQL: `"public"."engagement_events"`.
    pub fn quoted(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.name)
    }
}

impl TryFrom<String> for QualifiedTable {
    type Error = UsageError;

    /// The key is named by the caller (the configuration loader adds its path).
    fn try_from(value: String) -> Result<Self, Self::Error> {
        QualifiedTable::parse("table name", &value)
    }
}

impl From<QualifiedTable> for String {
    fn from(t: QualifiedTable) -> String {
        t.to_string()
    }
}

impl fmt::Display for QualifiedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A column (or other) name quoted for SQL, embedded quotes doubled: `"created_at"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn check_identifier(key: &str, value: &str) -> Result<(), UsageError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !value.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(UsageError::new(format!(
            "{key} {value:?} is not a plain identifier; use 1-63 lower-case letters, digits and underscores, not starting with a digit"
        )))
    }
}

pub fn check_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), UsageError> {
    if value < min || value > max {
        Err(UsageError::new(format!(
            "{key} = {value} is out of range; use a value from {min} to {max}"
        )))
    } else {
        Ok(())
    }
}

/// `http://HOST[:PORT][/PATH]` or `https://…`.
pub fn check_http_url(key: &str, value: &str) -> Result<(), UsageError> {
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => Err(UsageError::new(format!(
            "{key} {:?} is not an HTTP URL; expected http(s)://HOST:PORT[/PATH]",
            redact_url(value)
        ))),
    }
}

/// A connection string with every password replaced by `***`, for messages: the user-info
/// password of a URL (`postgres://u:***@h/db`), a `password=` (or `pass=`) query parameter,
/// and the `password=` of a libpq key=value string (`host=h password=***`, quoted or not).
pub fn redact_url(url: &str) -> String {
    // A URL starts with its scheme; anything else (`host=h ://…`) is libpq's key=value form.
    let scheme_end = url.find("://").filter(|&e| {
        let scheme = &url[..e];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let Some(scheme_end) = scheme_end else {
        return redact_key_values(url);
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find(['/', '?']).unwrap_or(after.len());
    let authority = &after[..authority_end];
    let mut out = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &after[at..]
                ),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let query: Vec<String> = out[q + 1..]
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_password_key(k) => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{}?{}", &out[..q], query.join("&"));
    }
    out
}

/// Connection-string keys whose values are secrets; longer first, so a key-value scan
/// matches `sslpassword` before `pass`.
const PASSWORD_KEYS: [&str; 4] = ["sslpassword", "password", "passwd", "pass"];

fn is_password_key(k: &str) -> bool {
    PASSWORD_KEYS.contains(&k.trim().to_ascii_lowercase().as_str())
}

/// libpq's `key=value key='quoted \' value'` form: the value of every password key
/// (at the start or after whitespace, `=` with optional spaces) replaced, quoted or not.
/// It does not need the string to be well formed: a malformed one is what error messages
/// show.
fn redact_key_values(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut i = 0;
    while i < s.len() {
        let at_word = i == 0 || s[..i].ends_with(char::is_whitespace);
        let key = PASSWORD_KEYS.iter().find(|k| lower[i..].starts_with(**k));
        let (true, Some(key)) = (at_word, key) else {
            i += s[i..].chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let mut j = i + key.len();
        j += s[j..].len() - s[j..].trim_start().len();
        if !s[j..].starts_with('=') {
            i = j.max(i + 1);
            continue;
        }
        j += 1;
        j += s[j..].len() - s[j..].trim_start().len();
        let value = &s[j..];
        let len = if let Some(body) = value.strip_prefix('\'') {
            let mut chars = body.char_indices();
            let mut end = body.len();
            while let Some((k, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => {
                        end = k + 1;
                        break;
                    }
                    _ => {}
                }
            }
            1 + end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(&s[copied..j]);
        out.push_str("***");
        i = j + len;
        copied = i;
    }
    out.push_str(&s[copied..]);
    out
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Serde for an optional key whose "not set" is the empty string, so the key still shows in
/// the documented defaults (`sslmode = ""`, `ca_file = ""`): `""` ⇄ `None`.
pub mod empty_is_none {
    use serde::de::{DeserializeOwned, IntoDeserializer};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        let de: serde::de::value::StringDeserializer<D::Error> = text.into_deserializer();
        T::deserialize(de).map(Some)
    }
}

/// A secret from a file: its contents without the trailing newline.
pub fn read_secret_file(key: &str, path: &std::path::Path) -> Result<Secret, UsageError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        UsageError::new(format!(
            "{key} {}: cannot read it: {e}; give a file readable by the engine",
            path.display()
        ))
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(UsageError::new(format!(
            "{key} {} is empty; put the secret in it",
            path.display()
        )));
    }
    Ok(Secret(text.to_string()))
}

/// The secret of a key that may also come from a file: `password` or `password_file`, not
/// both. `None` when neither is set.
pub fn secret_or_file(
    key: &str,
    value: &Secret,
    file_key: &str,
    file: Option<&std::path::Path>,
) -> Result<Option<Secret>, UsageError> {
    match (value.is_empty(), file) {
        (true, None) => Ok(None),
        (false, None) => Ok(Some(value.clone())),
        (true, Some(path)) => read_secret_file(file_key, path).map(Some),
        (false, Some(_)) => Err(UsageError::new(format!(
            "both {key} and {file_key} are set; keep one"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_every_spelling_are_redacted() {
        for (given, shown) in [
            (
                "postgres://u:s3cret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            (
                "postgres://u@h/db?password=s3cret&sslmode=require",
                "postgres://u@h/db?password=***&sslmode=require",
            ),
            (
                "postgres://u:s3cret@h?PASSWORD=s3cret",
                "postgres://u:***@h?PASSWORD=***",
            ),
            (
                "host=h password=s3cret dbname=db",
                "host=h password=*** dbname=db",
            ),
            (
                "host=h password = 's3 cr\\'et' dbname=db",
                "host=h password = *** dbname=db",
            ),
            ("password=s3cret", "password=***"),
            ("host=h :// password=s3cret", "host=h :// password=***"),
            ("host=h user=u", "host=h user=u"),
        ] {
            let r = redact_url(given);
            assert_eq!(r, shown, "{given}");
            assert!(!r.contains("s3"), "{r}");
        }
    }

    proptest::proptest! {
        #[test]
        fn redaction_never_panics_and_hides_the_password(
            text in "\\PC{0,40}",
            password in "[a-z]{12}",
        ) {
            let _ = redact_url(&text);
            for form in [
                format!("host=h {text} password={password}"),
                format!("postgres://u:{password}@h/db?{text}"),
                format!("postgres://u@h/db?password={password}"),
            ] {
                let r = redact_url(&form);
                proptest::prop_assert!(!r.contains(&password), "{form} -> {r}");
            }
        }
    }
}
