//! The sled state store: checkpoint, dimension, identity and dead-letter queue.
//!
//! Contract: the stored checkpoint never moves backward, and the dimension stored beside
//! it is always the `content` table as of that checkpoint — both are written in one atomic
//! sled batch and flushed before Postgres hears of the checkpoint.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::enrich::{ContentRow, DimChange, Dimension};
use crate::types::{Lsn, Position};

const KEY_CHECKPOINT: &[u8] = b"m:checkpoint";
const KEY_IDENTITY: &[u8] = b"m:identity";
const KEY_LAST_COMMIT: &[u8] = b"m:last_commit_us";
const CONTENT_PREFIX: &[u8] = b"c:";
const CURSOR_PREFIX: &[u8] = b"j:cursor:";
/// Each sink's last streamed event received ([`Position`]).
const RECEIVED_PREFIX: &[u8] = b"j:received:";

/// Which Postgres cluster, database and slot this state belongs to (docs/guarantees.md, "Safety").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub system_id: String,
    pub database: String,
    pub slot: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "system {} database {:?} slot {:?}",
            self.system_id, self.database, self.slot
        )
    }
}

/// Another process (a running engine) holds the state store.
#[derive(Debug, thiserror::Error)]
#[error("state directory {0} is in use by another engagement-cdc process (a running engine holds it); stop it first or use another [state] dir")]
pub struct StateLocked(pub String);

#[derive(Clone)]
pub struct StateStore {
    db: sled::Db,
}

impl StateStore {
    /// Open (creating when missing, readable by its owner only) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<StateStore> {
        use std::os::unix::fs::DirBuilderExt;
        // The dead letters hold event bodies: only the engine's user may read them.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "cannot create the state directory {}; check [state] dir and its permissions",
                    dir.display()
                )
            })?;
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(8 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("lock") || text.contains("WouldBlock") || text.contains("temporarily unavailable") {
                    anyhow::Error::new(StateLocked(dir.display().to_string()))
                } else {
                    anyhow::anyhow!(
                        "cannot open the state store in {}: {text}; check the directory, or move it aside and run setup again",
                        dir.display()
                    )
                }
            })?;
        Ok(StateStore { db })
    }

    pub fn checkpoint(&self) -> anyhow::Result<Lsn> {
        Ok(self
            .db
            .get(KEY_CHECKPOINT)?
            .map(|v| Lsn(u64_from(&v)))
            .unwrap_or_default())
    }

    /// Commit time (µs since 1970) of the last checkpointed transaction, when known.
    pub fn last_commit_us(&self) -> anyhow::Result<Option<i64>> {
        Ok(self.db.get(KEY_LAST_COMMIT)?.map(|v| u64_from(&v) as i64))
    }

    pub fn identity(&self) -> anyhow::Result<Option<Identity>> {
        match self.db.get(KEY_IDENTITY)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).context(
                "the identity in the state store is unreadable; move the state directory aside and run setup again",
            )?)),
            None => Ok(None),
        }
    }

    pub fn set_identity(&self, identity: &Identity) -> anyhow::Result<()> {
        self.db
            .insert(KEY_IDENTITY, serde_json::to_vec(identity)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether a dimension copy was ever stored (an empty `content` table is a copy too).
    pub fn has_dimension(&self) -> anyhow::Result<bool> {
        Ok(self.db.get(b"m:dimension")?.is_some())
    }

    pub fn load_dimension(&self) -> anyhow::Result<Dimension> {
        let mut rows = Vec::new();
        for item in self.db.scan_prefix(CONTENT_PREFIX) {
            let (_, v) = item?;
            rows.push(
                serde_json::from_slice::<ContentRow>(&v)
                    .context("a content row in the state store is unreadable")?,
            );
        }
        Ok(Dimension::from_rows(rows))
    }

    /// Replace the whole dimension and set the checkpoint, atomically (`setup`'s copy).
    pub fn replace_dimension(&self, rows: &[ContentRow], checkpoint: Lsn) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.db.scan_prefix(CONTENT_PREFIX) {
            let (k, _) = item?;
            batch.remove(k);
        }
        for row in rows {
            batch.insert(content_key(row.content_id), serde_json::to_vec(row)?);
        }
        batch.insert(b"m:dimension", b"1".as_slice());
        batch.insert(KEY_CHECKPOINT, &checkpoint.0.to_be_bytes());
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Advance the checkpoint to `lsn` with the dimension changes of the transactions up to
    /// it, in one atomic batch, and flush. Never moves backward: an `lsn` at or below the
    /// stored one is refused when it carries changes, and ignored otherwise.
    pub fn commit(
        &self,
        lsn: Lsn,
        changes: &[DimChange],
        last_commit_us: Option<i64>,
    ) -> anyhow::Result<()> {
        let current = self.checkpoint()?;
        if lsn <= current {
            if changes.is_empty() {
                return Ok(());
            }
            bail!("refusing to move the checkpoint backward from {current} to {lsn}");
        }
        // Net effect first: a sled batch keeps one operation per key, and a truncate
        // must also drop rows upserted earlier in the same list.
        let mut truncated = false;
        let mut net: std::collections::BTreeMap<i64, Option<&ContentRow>> = Default::default();
        for change in changes {
            match change {
                DimChange::Upsert(row) => {
                    net.insert(row.content_id, Some(row));
                }
                DimChange::Delete(id) => {
                    net.insert(*id, None);
                }
                DimChange::Truncate => {
                    truncated = true;
                    net.clear();
                }
            }
        }
        let mut batch = sled::Batch::default();
        if truncated {
            for item in self.db.scan_prefix(CONTENT_PREFIX) {
                let (k, _) = item?;
                batch.remove(k);
            }
        }
        for (id, row) in net {
            match row {
                Some(row) => batch.insert(content_key(id), serde_json::to_vec(row)?),
                None => batch.remove(content_key(id)),
            }
        }
        batch.insert(KEY_CHECKPOINT, &lsn.0.to_be_bytes());
        if let Some(t) = last_commit_us {
            batch.insert(KEY_LAST_COMMIT, &(t as u64).to_be_bytes());
        }
        self.db
            .apply_batch(batch)
            .and_then(|()| self.db.flush().map(drop))
            .context("cannot write the checkpoint to the state store")?;
        Ok(())
    }

    /// The dead-letter queue's tree.
    pub(super) fn dlq_tree(&self) -> anyhow::Result<sled::Tree> {
        Ok(self.db.open_tree("dlq")?)
    }

    pub fn generate_id(&self) -> anyhow::Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Each sink's journal cursor (the last batch it received), by sink name.
    pub fn cursors(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(CURSOR_PREFIX) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[CURSOR_PREFIX.len()..]).into_owned();
            out.push((name, u64_from(&v)));
        }
        Ok(out)
    }

    pub fn cursor(&self, sink: &str) -> anyhow::Result<Option<u64>> {
        Ok(self.db.get(cursor_key(sink))?.map(|v| u64_from(&v)))
    }

    /// Set cursors (not flushed: sled flushes within half a second, and a cursor that lags
    /// only means batches received again).
    pub fn set_cursors(&self, cursors: &[(&str, u64)]) -> anyhow::Result<()> {
        self.set_cursors_and_received(cursors, &[])
    }

    /// Set cursors and each sink's last streamed event received, in one write (not
    /// flushed, as [`StateStore::set_cursors`]).
    pub fn set_cursors_and_received(
        &self,
        cursors: &[(&str, u64)],
        received: &[(&str, Position)],
    ) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for (name, seq) in cursors {
            batch.insert(cursor_key(name), &seq.to_be_bytes());
        }
        for (name, p) in received {
            let mut v = p.lsn.0.to_be_bytes().to_vec();
            v.extend_from_slice(&p.index.to_be_bytes());
            batch.insert(received_key(name), v);
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// The last streamed event each of `sinks` received, as last saved (`None`: nothing
    /// saved for it).
    pub fn received_by(&self, sinks: &[&str]) -> anyhow::Result<Vec<Option<Position>>> {
        let saved = self.received()?;
        Ok(sinks
            .iter()
            .map(|n| saved.iter().find(|(s, _)| s == n).map(|(_, p)| *p))
            .collect())
    }

    /// Each sink's last streamed event received, as last saved, by sink name.
    fn received(&self) -> anyhow::Result<Vec<(String, Position)>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(RECEIVED_PREFIX) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[RECEIVED_PREFIX.len()..]).into_owned();
            if v.len() != 12 {
                bail!(
                    "the state store's record of what the {name} sink received is damaged ({} bytes, expected 12)",
                    v.len()
                );
            }
            out.push((
                name,
                Position {
                    lsn: Lsn(u64_from(&v[..8])),
                    index: u32::from_be_bytes(v[8..12].try_into().expect("4 bytes")),
                },
            ));
        }
        Ok(out)
    }

    /// Set cursors and flush them: for a sink's first cursor, whose absence after a crash
    /// would make the sink look new (and start at the journal's end).
    pub fn set_cursors_durably(&self, cursors: &[(&str, u64)]) -> anyhow::Result<()> {
        self.set_cursors(cursors)?;
        self.db.flush()?;
        Ok(())
    }

    /// Forget every cursor (the journal is off and empty). What each sink received stays:
    /// it does not depend on the journal.
    pub fn clear_cursors(&self) -> anyhow::Result<()> {
        for kv in self.db.scan_prefix(CURSOR_PREFIX) {
            self.db.remove(kv?.0)?;
        }
        self.db.flush()?;
        Ok(())
    }
}

fn received_key(sink: &str) -> Vec<u8> {
    let mut k = RECEIVED_PREFIX.to_vec();
    k.extend_from_slice(sink.as_bytes());
    k
}

fn cursor_key(sink: &str) -> Vec<u8> {
    let mut k = CURSOR_PREFIX.to_vec();
    k.extend_from_slice(sink.as_bytes());
    k
}

/// Order-preserving key for a signed id (sign bit flipped, big-endian).
fn content_key(id: i64) -> Vec<u8> {
    let mut k = CONTENT_PREFIX.to_vec();
    k.extend_from_slice(&((id as u64) ^ (1 << 63)).to_be_bytes());
    k
}

fn u64_from(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[..8]);
    u64::from_be_bytes(b)
}

impl super::CursorStore for StateStore {
    fn save_cursors(
        &self,
        cursors: &[(&'static str, u64)],
        received: &[(&'static str, Position)],
    ) -> anyhow::Result<()> {
        self.set_cursors_and_received(cursors, received)
    }
}

impl super::CheckpointStore for StateStore {
    fn checkpoint(&self) -> anyhow::Result<Lsn> {
        StateStore::checkpoint(self)
    }

    fn commit(
        &self,
        lsn: Lsn,
        changes: &[DimChange],
        last_commit_us: Option<i64>,
    ) -> anyhow::Result<()> {
        StateStore::commit(self, lsn, changes, last_commit_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Open the store again after `drop`: sled's flusher thread lets go of the directory's
    /// lock shortly after the last handle is dropped, not at once, so a reopen in the same
    /// process may find it still held. Any other error, or a lock held for 10 s, fails.
    fn reopen(dir: &Path) -> StateStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match StateStore::open(dir) {
                Ok(store) => return store,
                Err(e) if e.is::<StateLocked>() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopening the state store: {e:#}"),
            }
        }
    }

    fn row(id: i64, len: i32) -> ContentRow {
        ContentRow {
            content_id: id,
            content_type: Some("video".into()),
            length_seconds: Some(len),
        }
    }

    #[test]
    fn checkpoint_and_dimension_move_together_and_never_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint().unwrap(), Lsn(0));
        assert!(!store.has_dimension().unwrap());
        store
            .replace_dimension(&[row(1, 300), row(2, 120)], Lsn(100))
            .unwrap();
        store
            .commit(
                Lsn(200),
                &[DimChange::Upsert(row(1, 10)), DimChange::Delete(2)],
                Some(42),
            )
            .unwrap();
        assert!(store
            .commit(Lsn(150), &[DimChange::Truncate], None)
            .is_err());
        store.commit(Lsn(150), &[], None).unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.checkpoint().unwrap(), Lsn(200));
        assert_eq!(store.last_commit_us().unwrap(), Some(42));
        let dim = store.load_dimension().unwrap();
        assert_eq!(dim.len(), 1);
        assert_eq!(dim.get(1).unwrap().length_seconds, Some(10));
        store
            .commit(
                Lsn(300),
                &[DimChange::Truncate, DimChange::Upsert(row(-7, 1))],
                None,
            )
            .unwrap();
        let dim = store.load_dimension().unwrap();
        assert_eq!(dim.len(), 1);
        assert!(dim.get(-7).is_some());
    }

    #[test]
    fn identity_persists_and_truncate_drops_earlier_upserts() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let identity = Identity {
            system_id: "1".into(),
            database: "d".into(),
            slot: "s".into(),
        };
        store.set_identity(&identity).unwrap();
        store
            .commit(
                Lsn(5),
                &[DimChange::Upsert(row(9, 1)), DimChange::Truncate],
                None,
            )
            .unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.identity().unwrap(), Some(identity));
        assert!(store.load_dimension().unwrap().is_empty());
    }
}
