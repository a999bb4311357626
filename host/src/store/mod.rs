//! Where bucket state lives, behind [`StateStore`]: one atomic commit per
//! processed batch holds the new states, timers, the alerts to publish (an
//! outbox) and the source's progress (idempotency receipts of the requests
//! it answers, or a shard's checkpoint fenced by its lease).
//!
//! The embedded store ([`embedded`]) is the default; DynamoDB ([`dynamo`])
//! implements the same trait. The engine never names a backend type.

mod alert_index;
mod cache;
pub use cache::BucketMap;
pub mod dynamo;
pub mod embedded;
mod state_log;

use std::sync::Arc;

use crate::alert::AlertRecord;
use crate::event::SeqNo;
use crate::runtime::{StateChange, TimerChange};

/// Identifies one bucket of one tenant's rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId {
    pub tenant: String,
    /// The rule's name (state survives a new version of the rule).
    pub rule: String,
    pub bucket: String,
}

/// A bucket's encoded state, shared between the cache and the batches
/// that read it.
pub type State = Arc<[u8]>;

/// What a bucket held before a batch.
#[derive(Debug, Clone, Default)]
pub struct Prior {
    pub state: Option<State>,
    /// The last sequence number of the batch's partition (its shard) the
    /// bucket applied: events up to it are left out (a replay after a crash).
    pub applied: Option<SeqNo>,
}

impl Prior {
    pub fn state(state: Option<State>) -> Self {
        Prior {
            state,
            applied: None,
        }
    }
}

/// One bucket's change from one batch.
#[derive(Debug, Clone)]
pub struct BucketWrite {
    pub id: BucketId,
    pub state: StateChange,
    pub timer: TimerChange,
    /// Alerts in the order raised; the store assigns their `seq`.
    pub alerts: Vec<AlertRecord>,
    /// The rule's state time-to-live, for stores that expire state.
    pub ttl_ms: Option<u64>,
}

/// The holder of a shard's lease, as its commits must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub stream: String,
    pub shard: String,
    pub owner: String,
    pub epoch: u64,
}

/// Where a shard has been read to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    At(SeqNo),
    /// Read to its end (closed by a reshard): its children may start.
    End,
}

/// How far a commit moves its source, written with it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Answers to requests by idempotency key, replayed to retries.
    Receipts(Vec<(String, Vec<u8>)>),
    /// A shard read up to `last` under the lease `fence` proves. The
    /// checkpoint moves to `checkpoint`, or stays where it is with `None`
    /// (part of an earlier batch, run apart, has not committed yet).
    Shard {
        fence: Fence,
        last: SeqNo,
        checkpoint: Option<Checkpoint>,
    },
    /// Timers of a timer partition fired under the lease `fence` proves
    /// (its `shard` is the partition): several hosts share the firing of
    /// the DynamoDB store's timers as they share the stream's shards.
    Timers { fence: Fence },
    /// Nothing to record (a file replayed from its start).
    Nothing,
}

/// Everything one processed batch changes, written atomically.
#[derive(Debug, Clone)]
pub struct Commit {
    pub writes: Vec<BucketWrite>,
    pub progress: Progress,
    /// Processing time of the batch, epoch milliseconds.
    pub now_ms: i64,
}

/// Committed alerts on their way to the sink, and what tells the store
/// they arrived.
#[derive(Debug, Default)]
pub struct Outbox {
    /// In commit order, each with its `seq`.
    pub alerts: Vec<AlertRecord>,
    pub mark: OutboxMark,
}

/// What [`StateStore::published`] needs to retire an [`Outbox`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OutboxMark {
    #[default]
    Nothing,
    /// Every alert up to this `seq` (the embedded store's cursor).
    UpTo(u64),
    /// These outbox items of a shard (DynamoDB).
    Items {
        shard: String,
        keys: Vec<dynamo::OutboxKey>,
    },
}

/// A failure of the state store, by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed or could not be reached; trying again may work.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// Stored data is unreadable, or the write is one the store can never
    /// take: trying again fails the same way.
    #[error("state store: {0}")]
    Invalid(String),
    /// The shard's lease is no longer this host's: nothing of the batch (or
    /// of its remaining part) was written.
    #[error("lease of shard `{0}` lost: the write was fenced off")]
    Fenced(String),
    /// Another writer changed these buckets since they were read: read them
    /// again and run the batch again.
    #[error("{} bucket(s) changed by another writer", .0.len())]
    Conflict(Vec<BucketId>),
}

impl StoreError {
    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Conflict(_))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Durable bucket state and the alert outbox.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// Largest encoded state of one bucket this store can hold.
    fn max_state_bytes(&self) -> usize;

    /// What a batch of `partition` (a shard, or the one HTTP partition) runs
    /// each of `ids` on, in order.
    async fn load(&self, ids: &[BucketId], partition: &str) -> Result<Vec<Prior>>;

    /// Drop what the store caches of `ids`, to be read again.
    fn forget(&self, ids: &[BucketId]);

    /// The receipt stored under an idempotency key, if that request was
    /// already applied.
    async fn receipt(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Apply `commit` atomically and durably; returns its alerts with their
    /// sequence numbers, to publish.
    async fn commit(&self, commit: Commit) -> Result<Outbox>;

    /// Committed alerts of `partition` not yet published, oldest first.
    async fn unpublished(&self, partition: &str) -> Result<Outbox>;

    /// Everything `mark` names has reached the alert sink.
    async fn published(&self, mark: OutboxMark) -> Result<()>;

    /// Pending timers `partition` fires that are due at or before `until`
    /// (epoch milliseconds), earliest first, at most `limit`.
    async fn due_timers(
        &self,
        partition: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(BucketId, i64)>>;

    /// When the earliest pending timer `partition` fires is due.
    async fn next_timer(&self, partition: &str) -> Result<Option<i64>>;

    /// The pending timer of each of `ids` as the last [`load`](Self::load)
    /// read it: a timer fires only if it is still the bucket's, not one an
    /// event changed since the index was read.
    async fn pending_timers(&self, ids: &[BucketId]) -> Result<Vec<Option<i64>>>;

    /// Buckets `partition` removes that were untouched past their rule's
    /// state time-to-live by `until`, at most `limit`. A store that deletes
    /// them itself returns none (and reads them as having no state).
    async fn expired(
        &self,
        partition: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(BucketId, i64)>>;

    /// When the first bucket `partition` removes expires.
    async fn next_expiry(&self, partition: &str) -> Result<Option<i64>>;
}

/// Reading back committed alerts, for backends that keep them.
pub trait AlertLog: Send + Sync {
    /// Up to `limit` alerts of `tenant` with `seq > after`, oldest first.
    fn alerts(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<AlertRecord>>;

    /// Every stored bucket of `tenant` with its state.
    fn buckets(&self, tenant: &str) -> Result<Vec<(BucketId, Vec<u8>)>>;

    /// The `seq` of the newest committed alert (0: none yet).
    fn last_seq(&self) -> Result<u64>;
}
