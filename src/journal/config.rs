//! `[journal]`: the local log between the stream and the sinks (docs/configuration.md,
//! docs/architecture.md "The journal").

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::UsageError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Disk budget in bytes; 0 turns the journal off (every sink holds the slot).
    pub max_bytes: u64,
    /// How long records every sink has received are kept for `replay` (`24h`, `90m`, …).
    pub retain: String,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            max_bytes: 1 << 30,
            retain: "24h".into(),
        }
    }
}

/// The smallest budget that holds a few full batches.
pub const MIN_BYTES: u64 = 16 << 20;

impl JournalConfig {
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    pub fn retain(&self) -> Result<Duration, UsageError> {
        humantime::parse_duration(self.retain.trim()).map_err(|e| {
            UsageError::new(format!(
                "journal.retain {:?} is not a duration ({e}); write it like \"24h\", \"90m\" or \"7days\"",
                self.retain
            ))
        })
    }

    pub fn validate(&self) -> Result<(), UsageError> {
        if self.max_bytes != 0 && self.max_bytes < MIN_BYTES {
            return Err(UsageError::new(format!(
                "journal.max_bytes = {} is below the smallest budget, {MIN_BYTES} bytes (16 MiB); raise it, or set 0 to turn the journal off",
                self.max_bytes
            )));
        }
        self.retain()?;
        Ok(())
    }
}
