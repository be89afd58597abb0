//! The stdout sink: one JSON line per enriched event (docs/sinks.md, "The enriched event"), for piping and
//! for seeing the stream. `Ok` means the lines were written and flushed.

use std::io::Write;

use super::{BoxFuture, Delivery, Sink, SinkError};
use crate::enrich::EnrichedEvent;

use serde::{Deserialize, Serialize};

/// `[stdout]`: JSON Lines of enriched events on stdout (off by default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutConfig {
    pub enabled: bool,
}

#[derive(Default)]
pub struct StdoutSink {
    buf: Vec<u8>,
}

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn deliver<'a>(
        &'a mut self,
        events: &'a [&'a EnrichedEvent],
    ) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            self.buf.clear();
            for e in events {
                e.write_json(&mut self.buf);
                self.buf.push(b'\n');
            }
            let buf = std::mem::take(&mut self.buf);
            // Blocking I/O off the async threads: a slow reader must not stall them.
            let buf = tokio::task::spawn_blocking(move || {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf)?;
                out.flush()?;
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .map_err(|_| SinkError::permanent("the stdout writer stopped"))?
            .map_err(|e| {
                SinkError::permanent(format!("cannot write to stdout (is the reader gone?): {e}"))
            })?;
            self.buf = buf;
            Ok(Delivery::default())
        })
    }
}
