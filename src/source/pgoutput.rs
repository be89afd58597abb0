//! Decoder of pgoutput protocol version 1 messages (the payload of XLogData).
//!
//! Two layers, as in mini-redis's frame parsing: [`Message::parse`] checks lengths while it
//! reads and borrows every value from the input (no copy of column data), and the source
//! turns tuples into typed rows with the relation cache. [`Message::parse_insert`] reads an
//! Insert, the message of every event, onto the caller's stack instead of into a vector.
//! Begin, Commit and logical Messages are decoded too, though the replication reader
//! (`wire.rs`) already takes those apart itself.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

/// Kept out of the readers' inlined fast path.
#[cold]
#[inline(never)]
fn truncated(what: &str, n: usize, pos: usize, left: usize) -> DecodeError {
    DecodeError(format!(
        "truncated {what}: needs {n} bytes at offset {pos}, {left} left"
    ))
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

/// A column value of TupleData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// An unchanged TOASTed value: the message does not carry it.
    Unchanged,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple<'a>(pub Vec<Value<'a>>);

impl<'a> Tuple<'a> {
    pub fn get(&self, i: usize) -> Value<'a> {
        self.0.get(i).copied().unwrap_or(Value::Null)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: u64,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_us: i64,
    },
    Origin {
        lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple<'a>,
    },
    Update {
        relation: u32,
        /// The old key ('K') or the whole old row ('O', REPLICA IDENTITY FULL), when sent.
        old: Option<Tuple<'a>>,
        new: Tuple<'a>,
    },
    Delete {
        relation: u32,
        old: Tuple<'a>,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: &'a [u8],
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(truncated(what, n, self.pos, rest.len()));
        }
        self.pos += n;
        Ok(&rest[..n])
    }
    #[inline]
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    #[inline]
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    #[inline]
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    #[inline]
    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    #[inline]
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    #[inline]
    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return err(format!("{what}: string without terminator"));
        };
        let s = String::from_utf8_lossy(&rest[..nul]).into_owned();
        self.pos += nul + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let n = self.columns()?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(self.value()?);
        }
        Ok(Tuple(values))
    }
    /// A tuple's column count, refused when the message cannot hold that many: at least a
    /// byte a column (its kind), checked before anything is reserved for them.
    #[inline(always)]
    fn columns(&mut self) -> Result<usize, DecodeError> {
        let n = self.u16("tuple column count")? as usize;
        if n > self.buf.len() - self.pos {
            return err(format!(
                "tuple of {n} columns in {} bytes",
                self.buf.len() - self.pos
            ));
        }
        Ok(n)
    }
    #[inline(always)]
    fn value(&mut self) -> Result<Value<'a>, DecodeError> {
        Ok(match self.u8("tuple value kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            kind @ (b't' | b'b') => {
                let what = if kind == b't' {
                    "text value"
                } else {
                    "binary value"
                };
                let len = self.i32(what)?;
                if len < 0 {
                    return err("negative value length");
                }
                let bytes = self.take(len as usize, what)?;
                if kind == b't' {
                    Value::Text(bytes)
                } else {
                    Value::Binary(bytes)
                }
            }
            other => return err(format!("unknown tuple value kind {:?}", other as char)),
        })
    }
    fn done(&self, what: &str) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return err(format!(
                "{what}: {} unexpected trailing bytes",
                self.buf.len() - self.pos
            ));
        }
        Ok(())
    }
}

/// How many columns an Insert's tuple may have for [`Message::parse_insert`] to read it
/// into an array on the stack.
pub const INLINE_COLUMNS: usize = 16;

impl<'a> Message<'a> {
    /// An Insert read without allocating its tuple: its relation and how many of `values`
    /// hold its new tuple, the same values and the same errors as [`Message::parse`].
    /// `None` when the message is not an Insert or its tuple has more columns than
    /// `values` holds ([`Message::parse`] reads those). The hot path of a catch-up: a
    /// vector per event was an allocation and a free per event.
    pub fn parse_insert(
        buf: &'a [u8],
        values: &mut [Value<'a>],
    ) -> Result<Option<(u32, usize)>, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        if r.u8("message tag")? != b'I' {
            return Ok(None);
        }
        let relation = r.u32("Insert relation")?;
        match r.u8("Insert tuple marker")? {
            b'N' => {}
            other => return err(format!("Insert: expected 'N', got {:?}", other as char)),
        }
        let n = r.columns()?;
        let Some(slots) = values.get_mut(..n) else {
            return Ok(None);
        };
        for slot in slots {
            *slot = r.value()?;
        }
        r.done("message")?;
        Ok(Some((relation, n)))
    }

    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let tag = r.u8("message tag")?;
        let msg = match tag {
            b'B' => Message::Begin {
                final_lsn: r.u64("Begin final LSN")?,
                commit_time_us: r.i64("Begin commit time")?,
                xid: r.u32("Begin xid")?,
            },
            b'C' => Message::Commit {
                flags: r.u8("Commit flags")?,
                commit_lsn: r.u64("Commit LSN")?,
                end_lsn: r.u64("Commit end LSN")?,
                commit_time_us: r.i64("Commit time")?,
            },
            b'O' => Message::Origin {
                lsn: r.u64("Origin LSN")?,
                name: r.cstr("Origin name")?,
            },
            b'R' => {
                let id = r.u32("Relation id")?;
                let namespace = r.cstr("Relation namespace")?;
                let name = r.cstr("Relation name")?;
                let replica_identity = r.u8("Relation replica identity")?;
                let n = r.u16("Relation column count")? as usize;
                let mut columns = Vec::with_capacity(n);
                for _ in 0..n {
                    columns.push(RelColumn {
                        flags: r.u8("column flags")?,
                        name: r.cstr("column name")?,
                        type_oid: r.u32("column type")?,
                        type_modifier: r.i32("column type modifier")?,
                    });
                }
                Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }
            b'Y' => Message::Type {
                oid: r.u32("Type oid")?,
                namespace: r.cstr("Type namespace")?,
                name: r.cstr("Type name")?,
            },
            b'I' => {
                let relation = r.u32("Insert relation")?;
                match r.u8("Insert tuple marker")? {
                    b'N' => {}
                    other => return err(format!("Insert: expected 'N', got {:?}", other as char)),
                }
                Message::Insert {
                    relation,
                    new: r.tuple()?,
                }
            }
            b'U' => {
                let relation = r.u32("Update relation")?;
                let mut old = None;
                let mut marker = r.u8("Update tuple marker")?;
                if marker == b'K' || marker == b'O' {
                    old = Some(r.tuple()?);
                    marker = r.u8("Update new tuple marker")?;
                }
                if marker != b'N' {
                    return err(format!("Update: expected 'N', got {:?}", marker as char));
                }
                Message::Update {
                    relation,
                    old,
                    new: r.tuple()?,
                }
            }
            b'D' => {
                let relation = r.u32("Delete relation")?;
                match r.u8("Delete tuple marker")? {
                    b'K' | b'O' => {}
                    other => {
                        return err(format!("Delete: expected 'K' or 'O', got {:?}", other as char))
                    }
                }
                Message::Delete {
                    relation,
                    old: r.tuple()?,
                }
            }
            b'T' => {
                let n = r.u32("Truncate relation count")? as usize;
                let options = r.u8("Truncate options")?;
                if n > buf.len() / 4 {
                    return err("Truncate: relation count larger than the message");
                }
                let mut relations = Vec::with_capacity(n);
                for _ in 0..n {
                    relations.push(r.u32("Truncate relation")?);
                }
                Message::Truncate { options, relations }
            }
            b'M' => {
                let transactional = r.u8("Message flags")? == 1;
                let lsn = r.u64("Message LSN")?;
                let prefix = r.cstr("Message prefix")?;
                let len = r.u32("Message length")? as usize;
                let content = r.take(len, "Message content")?;
                Message::LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content,
                }
            }
            other => {
                return err(format!(
                    "unknown message type {:?} (0x{other:02x}); is the slot's plugin pgoutput with protocol version 1?",
                    other as char
                ))
            }
        };
        r.done("message")?;
        Ok(msg)
    }
}

#[cfg(test)]
pub(crate) mod encode;

#[cfg(test)]
mod tests;
