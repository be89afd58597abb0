//! The engine's local state, in one sled database under `[state] dir`: the checkpoint with
//! the `content` dimension as of it, the identity of the source it belongs to, and the HTTP
//! sink's dead letters. The pipeline and the HTTP sink see it through the small traits
//! below; [`StateStore`] (sled) implements both.

pub mod config;
pub mod dlq;
mod store;

pub use store::{Identity, StateLocked, StateStore};

use crate::enrich::DimChange;
use crate::types::Lsn;

/// Where the checkpoint lives.
///
/// Contract: the stored checkpoint never moves backward, and the dimension stored beside
/// it is always the `content` table as of that checkpoint. `commit` is durable (flushed)
/// when it returns, and it may block: call it off the async workers.
pub trait CheckpointStore: Send + Sync + 'static {
    fn checkpoint(&self) -> anyhow::Result<Lsn>;

    /// Advance to `lsn` with the dimension changes of the transactions up to it, atomically.
    /// An `lsn` at or below the stored one is ignored when it carries no changes and
    /// refused when it does.
    fn commit(
        &self,
        lsn: Lsn,
        changes: &[DimChange],
        last_commit_us: Option<i64>,
    ) -> anyhow::Result<()>;
}

/// Where each sink's journal cursor lives (docs/architecture.md, "The journal").
///
/// Contract: a saved cursor may lag what the sink received (it then receives batches
/// again, which sinks make harmless) but never runs ahead of it; the same for the last
/// streamed event a sink received (`received`). `save_cursors` may block.
pub trait CursorStore: Send + Sync + 'static {
    fn save_cursors(
        &self,
        cursors: &[(&'static str, u64)],
        received: &[(&'static str, crate::types::Position)],
    ) -> anyhow::Result<()>;
}
