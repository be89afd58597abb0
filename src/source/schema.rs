//! The columns the engine needs from the source tables, under the names the configuration
//! gives them (`[postgres.event_columns]`, `[postgres.content_columns]`), and which Postgres
//! types it accepts for each (docs/configuration.md, "Source columns"). `setup` checks the
//! catalog against this; the decoder checks every Relation message against it, so a column
//! dropped or retyped during streaming halts with an error that names it.
//!
//! Custom types are resolved through [`TypeCatalog`], read from `pg_type`: an enum reads as
//! text, a domain as its base type, a base type of Postgres's string category (`citext`)
//! as text. No custom type OID is written here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// What the engine reads a field as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// A required integer that fits i64 (the ids).
    Int64,
    /// An optional integer for an Int32 column (duration, length); a value past the range
    /// is delivered as NULL and counted.
    Int32,
    /// Text in any of its spellings.
    Text,
    /// A point in time: timestamptz, or timestamp read in `postgres.timestamp_zone`.
    Timestamp,
}

/// A column's type with domains unwrapped: what decoding needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// smallint, integer, bigint.
    Integer,
    /// numeric, with its declared scale (`None`: unconstrained).
    Numeric {
        scale: Option<i32>,
    },
    /// text, varchar, char, name, citext, enums.
    Text,
    TimestampTz,
    /// timestamp without time zone.
    Timestamp,
    Other,
}

pub const OID_NAME: u32 = 19;
pub const OID_INT8: u32 = 20;
pub const OID_INT2: u32 = 21;
pub const OID_INT4: u32 = 23;
pub const OID_TEXT: u32 = 25;
pub const OID_BPCHAR: u32 = 1042;
pub const OID_VARCHAR: u32 = 1043;
pub const OID_TIMESTAMP: u32 = 1114;
pub const OID_TIMESTAMPTZ: u32 = 1184;
pub const OID_NUMERIC: u32 = 1700;

/// The first OID Postgres gives to objects created after initdb.
const FIRST_NORMAL_OID: u32 = 16384;

/// The scale of a `numeric` type modifier (`numeric(p, s)`), `None` when unconstrained.
/// Postgres 15 keeps the scale in 11 signed bits, so `numeric(5, -2)` is scale -2.
pub fn numeric_scale(typmod: i32) -> Option<i32> {
    if typmod < 4 {
        return None;
    }
    Some((((typmod - 4) & 0x7ff) ^ 1024) - 1024)
}

/// One row of `pg_type` the engine cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogType {
    pub oid: u32,
    /// `pg_type.typtype`: `e` enum, `d` domain, `b` base, …
    pub typtype: char,
    /// For a domain: the type it is over, and that type's modifier.
    pub base_oid: u32,
    pub base_typmod: i32,
    /// `pg_type.typcategory`: `S` for string types such as citext.
    pub category: char,
    /// As `format_type` spells it, for messages.
    pub name: String,
}

/// Enums, domains and string-like base types of one database, by OID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeCatalog {
    types: HashMap<u32, CatalogType>,
}

/// The query [`TypeCatalog::from_rows`] expects, in this column order.
pub const CATALOG_QUERY: &str =
    "SELECT t.oid::oid, t.typtype::text, t.typbasetype::oid, t.typtypmod,
        t.typcategory::text, format_type(t.oid, NULL)
   FROM pg_type t
  WHERE t.typtype IN ('d', 'e') OR (t.typcategory = 'S' AND t.oid >= 16384)";

impl TypeCatalog {
    pub fn from_rows(rows: impl IntoIterator<Item = CatalogType>) -> Self {
        TypeCatalog {
            types: rows.into_iter().map(|t| (t.oid, t)).collect(),
        }
    }

    /// A custom OID this catalog does not know: the type was created after it was read.
    pub fn is_unknown(&self, oid: u32) -> bool {
        oid >= FIRST_NORMAL_OID && !self.types.contains_key(&oid)
    }

    /// What a column of type `oid` with modifier `typmod` reads as, and the type's name.
    pub fn resolve(&self, oid: u32, typmod: i32) -> (Base, String) {
        let (mut oid, mut typmod) = (oid, typmod);
        let mut name: Option<String> = None;
        // Domains over domains: follow a bounded chain (a cycle cannot exist in Postgres).
        for _ in 0..32 {
            let base = match oid {
                OID_INT2 | OID_INT4 | OID_INT8 => Base::Integer,
                OID_NUMERIC => Base::Numeric {
                    scale: numeric_scale(typmod),
                },
                OID_TEXT | OID_VARCHAR | OID_BPCHAR | OID_NAME => Base::Text,
                OID_TIMESTAMPTZ => Base::TimestampTz,
                OID_TIMESTAMP => Base::Timestamp,
                _ => match self.types.get(&oid) {
                    Some(t) if t.typtype == 'd' => {
                        name.get_or_insert_with(|| t.name.clone());
                        if typmod < 0 {
                            typmod = t.base_typmod;
                        }
                        oid = t.base_oid;
                        continue;
                    }
                    Some(t) if t.typtype == 'e' || t.category == 'S' => Base::Text,
                    _ => Base::Other,
                },
            };
            let own = builtin_name(oid, typmod)
                .or_else(|| self.types.get(&oid).map(|t| t.name.clone()))
                .unwrap_or_else(|| format!("type oid {oid}"));
            let name = match name {
                Some(domain) => format!("{domain} (a domain over {own})"),
                None => own,
            };
            return (base, name);
        }
        (
            Base::Other,
            name.unwrap_or_else(|| format!("type oid {oid}")),
        )
    }
}

fn builtin_name(oid: u32, typmod: i32) -> Option<String> {
    Some(
        match oid {
            OID_INT2 => "smallint",
            OID_INT4 => "integer",
            OID_INT8 => "bigint",
            OID_TEXT => "text",
            OID_VARCHAR => "varchar",
            OID_BPCHAR => "char",
            OID_NAME => "name",
            OID_TIMESTAMPTZ => "timestamp with time zone",
            OID_TIMESTAMP => "timestamp without time zone",
            OID_NUMERIC => {
                return Some(match typmod {
                    t if t >= 4 => format!(
                        "numeric({}, {})",
                        ((t - 4) >> 16) & 0xffff,
                        numeric_scale(t).unwrap_or(0)
                    ),
                    _ => "numeric".into(),
                })
            }
            16 => "boolean",
            700 => "real",
            701 => "double precision",
            114 => "json",
            3802 => "jsonb",
            1082 => "date",
            2950 => "uuid",
            17 => "bytea",
            _ => return None,
        }
        .to_string(),
    )
}

impl ColType {
    pub fn accepts(self, base: Base) -> bool {
        match self {
            ColType::Int64 | ColType::Int32 => match base {
                Base::Integer => true,
                Base::Numeric { scale } => scale.is_none_or(|s| s <= 0),
                _ => false,
            },
            ColType::Text => base == Base::Text,
            ColType::Timestamp => matches!(base, Base::TimestampTz | Base::Timestamp),
        }
    }

    /// For messages: the types accepted.
    pub fn expected(self) -> &'static str {
        match self {
            ColType::Int64 | ColType::Int32 => {
                "an integer: smallint, integer, bigint or numeric without a fraction (numeric or numeric(p, 0)), or a domain over one"
            }
            ColType::Text => {
                "text: text, varchar, char, citext, an enum, or a domain over one"
            }
            ColType::Timestamp => {
                "a timestamp: timestamp with time zone, or timestamp without time zone (read in postgres.timestamp_zone)"
            }
        }
    }
}

/// `[postgres.event_columns]`: the events table's column for each field the engine needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventColumns {
    pub id: String,
    pub content_id: String,
    pub user_id: String,
    pub event_type: String,
    pub event_ts: String,
    pub duration_ms: String,
    pub device: String,
}

impl Default for EventColumns {
    fn default() -> Self {
        EventColumns {
            id: "id".into(),
            content_id: "content_id".into(),
            user_id: "user_id".into(),
            event_type: "event_type".into(),
            event_ts: "event_ts".into(),
            duration_ms: "duration_ms".into(),
            device: "device".into(),
        }
    }
}

/// `[postgres.content_columns]`: the content table's column for each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentColumns {
    pub content_id: String,
    pub content_type: String,
    pub length_seconds: String,
}

impl Default for ContentColumns {
    fn default() -> Self {
        ContentColumns {
            content_id: "content_id".into(),
            content_type: "content_type".into(),
            length_seconds: "length_seconds".into(),
        }
    }
}

/// A field the engine needs, the column that holds it, and how it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredColumn {
    /// The field, which is also its configuration key.
    pub field: &'static str,
    /// `postgres.event_columns` or `postgres.content_columns`.
    pub section: &'static str,
    pub column: String,
    pub ty: ColType,
}

/// Field order of [`EventLayout`]: id first.
pub const EVENT_FIELDS: usize = 7;
/// Positions in [`EventColumns::required`] (and in an [`EventLayout`]) of the two fields
/// `backfill` pages by.
pub const EVENT_ID: usize = 0;
pub const EVENT_TS: usize = 4;
/// Field order of [`ContentLayout`]: the key first.
pub const CONTENT_FIELDS: usize = 3;

impl EventColumns {
    /// In the order of `RawEvent`'s fields: id, content_id, user_id, event_type, event_ts,
    /// duration_ms, device.
    pub fn required(&self) -> [RequiredColumn; EVENT_FIELDS] {
        let c = |field, column: &String, ty| RequiredColumn {
            field,
            section: "postgres.event_columns",
            column: column.clone(),
            ty,
        };
        [
            c("id", &self.id, ColType::Int64),
            c("content_id", &self.content_id, ColType::Int64),
            c("user_id", &self.user_id, ColType::Int64),
            c("event_type", &self.event_type, ColType::Text),
            c("event_ts", &self.event_ts, ColType::Timestamp),
            c("duration_ms", &self.duration_ms, ColType::Int32),
            c("device", &self.device, ColType::Text),
        ]
    }
}

impl ContentColumns {
    /// content_id, content_type, length_seconds.
    pub fn required(&self) -> [RequiredColumn; CONTENT_FIELDS] {
        let c = |field, column: &String, ty| RequiredColumn {
            field,
            section: "postgres.content_columns",
            column: column.clone(),
            ty,
        };
        [
            c("content_id", &self.content_id, ColType::Int64),
            c("content_type", &self.content_type, ColType::Text),
            c("length_seconds", &self.length_seconds, ColType::Int32),
        ]
    }
}

/// Where a field is in a relation's tuples, and its column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub pos: usize,
    pub base: Base,
}

pub type EventLayout = [Located; EVENT_FIELDS];
pub type ContentLayout = [Located; CONTENT_FIELDS];

/// The same fields read by a query that selects them in field order (`backfill`, `setup`'s
/// copy of `content`): positions 0, 1, 2, …, types unchanged.
pub fn in_select_order<const N: usize>(at: &[Located; N]) -> [Located; N] {
    let mut out = *at;
    for (i, l) in out.iter_mut().enumerate() {
        l.pos = i;
    }
    out
}

/// `expr(column)::text` for each field, comma-separated, in field order.
pub fn select_as_text<const N: usize>(alias: &str, required: &[RequiredColumn; N]) -> String {
    required
        .iter()
        .map(|r| format!("{alias}{}::text", crate::checks::quote_ident(&r.column)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One column of a table as the catalog or a Relation message gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumn {
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
}

/// Where each required column is, or the error naming the first missing or refused one.
pub fn locate<const N: usize>(
    table: &str,
    required: &[RequiredColumn; N],
    columns: &[TableColumn],
    catalog: &TypeCatalog,
) -> Result<[Located; N], String> {
    let mut out = [Located {
        pos: 0,
        base: Base::Other,
    }; N];
    for (i, req) in required.iter().enumerate() {
        let key = format!("{}.{}", req.section, req.field);
        let Some(pos) = columns.iter().position(|c| c.name == req.column) else {
            return Err(format!(
                "table {table} has no column {:?} (the {} field, {key}); the engine needs it as {}",
                req.column,
                req.field,
                req.ty.expected()
            ));
        };
        let (base, name) = catalog.resolve(columns[pos].type_oid, columns[pos].typmod);
        if !req.ty.accepts(base) {
            return Err(format!(
                "column {table}.{} (the {} field, {key}) is {name}; the engine needs {}",
                req.column,
                req.field,
                req.ty.expected()
            ));
        }
        out[i] = Located { pos, base };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(list: &[(&str, u32)]) -> Vec<TableColumn> {
        list.iter()
            .map(|(n, o)| TableColumn {
                name: n.to_string(),
                type_oid: *o,
                typmod: -1,
            })
            .collect()
    }

    fn content() -> [RequiredColumn; 3] {
        ContentColumns::default().required()
    }

    #[test]
    fn columns_are_found_by_name_in_any_order() {
        let c = cols(&[
            ("length_seconds", OID_INT2),
            ("extra", 3802),
            ("content_type", OID_VARCHAR),
            ("content_id", OID_NUMERIC),
        ]);
        let at = locate("content", &content(), &c, &TypeCatalog::default()).unwrap();
        assert_eq!(at.map(|l| l.pos), [3, 2, 0]);
        assert_eq!(at[0].base, Base::Numeric { scale: None });
    }

    #[test]
    fn mapped_names_are_used_and_named_in_errors() {
        let map = ContentColumns {
            content_id: "cid".into(),
            content_type: "kind".into(),
            length_seconds: "secs".into(),
        };
        let c = cols(&[("cid", OID_INT8), ("kind", OID_TEXT), ("secs", OID_INT8)]);
        let at = locate("c", &map.required(), &c, &TypeCatalog::default()).unwrap();
        assert_eq!(at.map(|l| l.pos), [0, 1, 2]);
        let e = locate("c", &content(), &c, &TypeCatalog::default()).unwrap_err();
        assert!(
            e.contains("\"content_id\"") && e.contains("postgres.content_columns.content_id"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_refused_columns_are_named() {
        let c = cols(&[("content_id", OID_INT8), ("content_type", OID_TEXT)]);
        let e = locate("public.content", &content(), &c, &TypeCatalog::default()).unwrap_err();
        assert!(e.contains("\"length_seconds\""), "{e}");
        for (oid, typmod, name) in [(701, -1, "double precision"), (114, -1, "json")] {
            let mut c = cols(&[
                ("content_id", OID_INT8),
                ("content_type", OID_TEXT),
                ("length_seconds", oid),
            ]);
            c[2].typmod = typmod;
            let e = locate("public.content", &content(), &c, &TypeCatalog::default()).unwrap_err();
            assert!(e.contains("length_seconds") && e.contains(name), "{e}");
        }
        // numeric(10, 2) = typmod (10 << 16 | 2) + 4: a fraction, refused.
        let mut c = cols(&[
            ("content_id", OID_INT8),
            ("content_type", OID_TEXT),
            ("length_seconds", OID_NUMERIC),
        ]);
        c[2].typmod = (10 << 16 | 2) + 4;
        let e = locate("public.content", &content(), &c, &TypeCatalog::default()).unwrap_err();
        assert!(e.contains("numeric(10, 2)"), "{e}");
        c[2].typmod = (12 << 16) + 4;
        assert!(locate("public.content", &content(), &c, &TypeCatalog::default()).is_ok());
    }

    #[test]
    fn enums_domains_and_string_types_resolve_through_the_catalog() {
        let catalog = TypeCatalog::from_rows([
            CatalogType {
                oid: 40001,
                typtype: 'e',
                base_oid: 0,
                base_typmod: -1,
                category: 'E',
                name: "event_kind".into(),
            },
            CatalogType {
                oid: 40002,
                typtype: 'b',
                base_oid: 0,
                base_typmod: -1,
                category: 'S',
                name: "citext".into(),
            },
            CatalogType {
                oid: 40003,
                typtype: 'd',
                base_oid: 40002,
                base_typmod: -1,
                category: 'S',
                name: "label".into(),
            },
            CatalogType {
                oid: 40004,
                typtype: 'd',
                base_oid: OID_NUMERIC,
                base_typmod: (12 << 16 | 3) + 4,
                category: 'N',
                name: "money3".into(),
            },
            CatalogType {
                oid: 40005,
                typtype: 'b',
                base_oid: 0,
                base_typmod: -1,
                category: 'U',
                name: "hstore".into(),
            },
        ]);
        assert_eq!(catalog.resolve(40001, -1).0, Base::Text);
        assert_eq!(catalog.resolve(40002, -1).0, Base::Text);
        let (base, name) = catalog.resolve(40003, -1);
        assert_eq!(base, Base::Text);
        assert_eq!(name, "label (a domain over citext)");
        assert_eq!(
            catalog.resolve(40004, -1).0,
            Base::Numeric { scale: Some(3) }
        );
        assert!(!ColType::Int32.accepts(catalog.resolve(40004, -1).0));
        assert_eq!(catalog.resolve(40005, -1).0, Base::Other);
        assert!(catalog.is_unknown(40100));
        assert!(!catalog.is_unknown(40001));
        assert!(!catalog.is_unknown(OID_INT8));
        assert!(ColType::Timestamp.accepts(Base::Timestamp));
        assert!(!ColType::Text.accepts(Base::Integer));
    }

    #[test]
    fn numeric_scales_including_negative_ones() {
        assert_eq!(numeric_scale(-1), None);
        assert_eq!(numeric_scale((10 << 16 | 2) + 4), Some(2));
        assert_eq!(numeric_scale((10 << 16) + 4), Some(0));
        // numeric(5, -2): the scale's 11 bits hold -2.
        assert_eq!(numeric_scale((5 << 16 | (-2i32 & 0x7ff)) + 4), Some(-2));
    }
}
