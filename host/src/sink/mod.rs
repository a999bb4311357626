//! Where committed alerts go, behind [`AlertSink`]. The engine publishes
//! only alerts already committed to the store's outbox, so a crash between
//! commit and publish republishes the same alerts (same ids), never new ones.

pub mod dead_letters;
pub mod file;
pub mod kinesis;
pub mod writer;

use crate::alert::AlertRecord;

/// A failure to deliver alerts; they stay in the outbox either way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The destination failed or could not be reached; trying again may work.
    #[error("alert sink unavailable: {0}")]
    Unavailable(String),
    /// The destination can never take what it was given (or what it holds
    /// cannot be read): trying again fails the same way.
    #[error("alert sink: {0}")]
    Invalid(String),
}

impl SinkError {
    /// Whether publishing the same alerts again may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// A destination for alerts.
#[async_trait::async_trait]
pub trait AlertSink: Send + Sync {
    /// Deliver `alerts` (in commit order, each with its `seq`) durably. Must
    /// tolerate receiving again alerts it already delivered before a crash.
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError>;
}
