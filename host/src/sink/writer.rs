//! Alerts as NDJSON lines to any writer: standard output for `tocsin
//! replay`. Nothing is kept, so nothing is deduplicated: each publish is
//! written as it comes.

use std::io::Write;
use std::sync::Mutex;

use super::{AlertSink, SinkError};
use crate::alert::AlertRecord;

/// Alerts as NDJSON lines to a writer.
pub struct WriterSink<W>(pub Mutex<W>);

#[async_trait::async_trait]
impl<W: Write + Send> AlertSink for WriterSink<W> {
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        let mut out = self.0.lock().expect("writer lock");
        let fail = |e: std::io::Error| SinkError::Unavailable(e.to_string());
        for alert in alerts {
            serde_json::to_writer(&mut *out, alert)
                .map_err(std::io::Error::from)
                .map_err(fail)?;
            out.write_all(b"\n").map_err(fail)?;
        }
        out.flush().map_err(fail)
    }
}
