//! `[pipeline]`: how events are cut into batches (docs/configuration.md).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub max_batch_rows: usize,
    pub max_batch_delay_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_batch_rows: 10_000,
            max_batch_delay_ms: 20,
        }
    }
}
