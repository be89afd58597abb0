//! The columns the engine needs from the source tables, and which Postgres types it accepts
//! for each. `setup` checks the catalog against this; the decoder checks every Relation
//! message against it, so a column dropped or retyped during streaming halts with an error
//! that names it.

/// What the engine parses a column's text value as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// Parsed as i64: bigint, integer or smallint.
    Int8,
    /// Parsed as i32: integer or smallint.
    Int4,
    /// text, varchar or char.
    Text,
    /// timestamptz only: a timestamp without time zone has no defined instant.
    TimestampTz,
}

pub const OID_INT2: u32 = 21;
pub const OID_INT4: u32 = 23;
pub const OID_INT8: u32 = 20;
pub const OID_TEXT: u32 = 25;
pub const OID_VARCHAR: u32 = 1043;
pub const OID_BPCHAR: u32 = 1042;
pub const OID_TIMESTAMPTZ: u32 = 1184;

impl ColType {
    pub fn accepts(self, type_oid: u32) -> bool {
        match self {
            ColType::Int8 => matches!(type_oid, OID_INT8 | OID_INT4 | OID_INT2),
            ColType::Int4 => matches!(type_oid, OID_INT4 | OID_INT2),
            ColType::Text => matches!(type_oid, OID_TEXT | OID_VARCHAR | OID_BPCHAR),
            ColType::TimestampTz => type_oid == OID_TIMESTAMPTZ,
        }
    }

    /// For messages: the types accepted.
    pub fn expected(self) -> &'static str {
        match self {
            ColType::Int8 => "bigint (or integer, smallint)",
            ColType::Int4 => "integer (or smallint)",
            ColType::Text => "text (or varchar, char)",
            ColType::TimestampTz => "timestamp with time zone",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RequiredColumn {
    pub name: &'static str,
    pub ty: ColType,
}

const fn col(name: &'static str, ty: ColType) -> RequiredColumn {
    RequiredColumn { name, ty }
}

/// `engagement_events`: the first column is the event id.
pub const EVENT_COLUMNS: [RequiredColumn; 7] = [
    col("id", ColType::Int8),
    col("content_id", ColType::Int8),
    col("user_id", ColType::Int8),
    col("event_type", ColType::Text),
    col("event_ts", ColType::TimestampTz),
    col("duration_ms", ColType::Int4),
    col("device", ColType::Text),
];

/// `content`: the first column is the key.
pub const CONTENT_COLUMNS: [RequiredColumn; 3] = [
    col("content_id", ColType::Int8),
    col("content_type", ColType::Text),
    col("length_seconds", ColType::Int4),
];

/// Positions of the required columns in a relation's column list, or the error naming the
/// first missing or retyped column. `columns` are (name, type oid) in table order.
pub fn locate<const N: usize>(
    table: &str,
    required: &[RequiredColumn; N],
    columns: &[(String, u32)],
) -> Result<[usize; N], String> {
    let mut positions = [0usize; N];
    for (i, req) in required.iter().enumerate() {
        let Some(pos) = columns.iter().position(|(n, _)| n == req.name) else {
            return Err(format!(
                "table {table} has no column {:?}; the engine needs it as {}",
                req.name,
                req.ty.expected()
            ));
        };
        let oid = columns[pos].1;
        if !req.ty.accepts(oid) {
            return Err(format!(
                "column {table}.{} has type oid {oid} ({}); the engine needs {}",
                req.name,
                type_name(oid),
                req.ty.expected()
            ));
        }
        positions[i] = pos;
    }
    Ok(positions)
}

pub fn type_name(oid: u32) -> &'static str {
    match oid {
        OID_INT2 => "smallint",
        OID_INT4 => "integer",
        OID_INT8 => "bigint",
        OID_TEXT => "text",
        OID_VARCHAR => "varchar",
        OID_BPCHAR => "char",
        OID_TIMESTAMPTZ => "timestamptz",
        1114 => "timestamp without time zone",
        700 => "real",
        701 => "double precision",
        1700 => "numeric",
        3802 => "jsonb",
        _ => "another type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(n, o)| (n.to_string(), *o)).collect()
    }

    #[test]
    fn columns_are_found_by_name_in_any_order() {
        let c = cols(&[
            ("length_seconds", OID_INT2),
            ("extra", 3802),
            ("content_type", OID_VARCHAR),
            ("content_id", OID_INT4),
        ]);
        assert_eq!(locate("content", &CONTENT_COLUMNS, &c).unwrap(), [3, 2, 0]);
    }

    #[test]
    fn missing_and_retyped_columns_are_named() {
        let c = cols(&[("content_id", OID_INT8), ("content_type", OID_TEXT)]);
        let e = locate("public.content", &CONTENT_COLUMNS, &c).unwrap_err();
        assert!(e.contains("\"length_seconds\""), "{e}");
        let c = cols(&[
            ("content_id", OID_INT8),
            ("content_type", OID_TEXT),
            ("length_seconds", 1700),
        ]);
        let e = locate("public.content", &CONTENT_COLUMNS, &c).unwrap_err();
        assert!(e.contains("length_seconds") && e.contains("numeric"), "{e}");
        assert!(!ColType::TimestampTz.accepts(1114));
    }
}
