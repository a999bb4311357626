//! Why a batch was not committed, and whether it may be later.

use crate::sink::SinkError;
use crate::store::StoreError;

/// Why a batch was not committed; nothing of it was applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Alerts of an earlier batch could not be published: the lane waits
    /// for them before taking more (they are committed and stay in the
    /// outbox).
    #[error("alerts of an earlier batch are not yet published: {0}")]
    Publish(#[from] SinkError),
    /// An earlier batch of the lane could not be committed, and this one
    /// was computed on its states.
    #[error("an earlier batch could not be committed; nothing of this one was applied, retry it")]
    Stale,
    /// Running the rules panicked (a host bug, not a rule's failure).
    #[error("processing the batch failed: {0}")]
    Panicked(String),
    /// The batch's dead letters could not be kept, so it was not committed.
    #[error("cannot keep the batch's dead letters: {0}")]
    DeadLetters(SinkError),
}

impl EngineError {
    /// Whether the same batch may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.retryable(),
            EngineError::Publish(e) | EngineError::DeadLetters(e) => e.retryable(),
            EngineError::Stale | EngineError::Panicked(_) => true,
        }
    }
}
