//! Where committed alerts go, behind [`AlertSink`]. The pipeline publishes
//! only alerts already committed to the store's outbox, so a crash between
//! commit and publish republishes the same alerts (same ids), never new ones.

pub mod file;
pub mod kinesis;

use crate::alert::AlertRecord;

#[derive(Debug, thiserror::Error)]
#[error("alert sink: {0}")]
pub struct SinkError(pub String);

/// A destination for alerts.
pub trait AlertSink: Send + Sync {
    /// Deliver `alerts` (in commit order, each with its `seq`). Must tolerate
    /// receiving again alerts it already delivered before a crash.
    fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError>;
}
