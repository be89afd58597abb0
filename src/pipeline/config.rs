//! `[pipeline]`: how events are cut into batches, and how the engine shares its host's CPU
//! (docs/configuration.md).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub max_batch_rows: usize,
    pub max_batch_delay_ms: u64,
    /// The niceness `run` takes at start, 0–19 (0: left as started); it only ever lowers
    /// the engine's priority (docs/configuration.md, `pipeline.nice`).
    pub nice: i32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_batch_rows: 10_000,
            max_batch_delay_ms: 20,
            nice: 0,
        }
    }
}
