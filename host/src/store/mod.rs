//! Where bucket state lives, behind [`StateStore`]: one atomic commit per
//! processed batch holds the new states, timers, the alerts to publish (an
//! outbox) and the idempotency receipts of the requests it answers.
//!
//! The embedded store ([`embedded`]) is the default; other backends implement
//! the same trait. The pipeline never names a backend type.

mod alert_index;
pub mod dynamo;
pub mod embedded;
mod state_log;

use crate::alert::AlertRecord;

/// Identifies one bucket of one tenant's rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId {
    pub tenant: String,
    /// The rule's name (state survives a new version of the rule).
    pub rule: String,
    pub bucket: String,
}

/// Everything one processed batch changes, written atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// New state per bucket; `None` deletes it.
    pub states: Vec<(BucketId, Option<Vec<u8>>)>,
    /// Pending timer per bucket; `None` cancels it.
    pub timers: Vec<(BucketId, Option<i64>)>,
    /// Alerts in the order raised; the store assigns their `seq`.
    pub alerts: Vec<AlertRecord>,
    /// Answers to requests by idempotency key, replayed to retries.
    pub receipts: Vec<(String, Vec<u8>)>,
}

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

pub type Result<T> = std::result::Result<T, StoreError>;

/// Durable bucket state and the alert outbox.
pub trait StateStore: Send + Sync {
    /// The stored state of each bucket, in order.
    fn load(&self, ids: &[BucketId]) -> Result<Vec<Option<Vec<u8>>>>;

    /// The receipt stored under an idempotency key, if that request was
    /// already applied.
    fn receipt(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Apply `commit` atomically and durably; returns its alerts with their
    /// sequence numbers.
    fn commit(&self, commit: Commit) -> Result<Vec<AlertRecord>>;

    /// Committed alerts not yet marked published, oldest first.
    fn unpublished(&self) -> Result<Vec<AlertRecord>>;

    /// Everything up to `seq` has reached the alert sink.
    fn mark_published(&self, seq: u64) -> Result<()>;
}

/// Reading back committed alerts, for backends that keep them.
pub trait AlertLog: Send + Sync {
    /// Up to `limit` alerts of `tenant` with `seq > after`, oldest first.
    fn alerts(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<AlertRecord>>;

    /// Every stored bucket of `tenant` with its state.
    fn buckets(&self, tenant: &str) -> Result<Vec<(BucketId, Vec<u8>)>>;
}
