//! The stdout sink: one JSON line per enriched event (SPEC §4's format), for piping and
//! for seeing the stream. `Ok` means the lines were written and flushed.

use std::io::Write;

use anyhow::Context;

use super::{BoxFuture, Sink};
use crate::enrich::EnrichedEvent;

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
    ) -> BoxFuture<'a, anyhow::Result<()>> {
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
            .context("the stdout writer stopped")?
            .context("cannot write to stdout (is the reader gone?)")?;
            self.buf = buf;
            Ok(())
        })
    }
}
