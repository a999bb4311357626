//! Where bucket state lives, behind [`StateStore`]: one atomic commit per
//! processed batch holds the new states, timers, the alerts to publish (an
//! outbox) and the source's [`Progress`] (idempotency receipts of the
//! requests it answers, a partition's checkpoint fenced by its lease).
//! Beside it every store keeps the deployment's [`lease`]s, so any source
//! runs on any store.
//!
//! The embedded store ([`embedded`]) is the default; DynamoDB ([`dynamo`],
//! with the `aws` feature) implements the same traits. The engine never
//! names a backend type, and each store records progress and retires its
//! outbox its own way ([`OutboxMark`] is opaque).

mod alert_index;
mod cache;
pub use cache::BucketMap;
#[cfg(feature = "aws")]
pub mod dynamo;
pub mod embedded;
pub mod lease;
mod state_log;

pub use lease::{Lease, LeaseTable, SHARD_END};

/// How long a request's receipt answers its retries: a day covers any
/// client's retry policy, and receipts cost storage for as long as they
/// live.
pub const RECEIPT_RETENTION_MS: i64 = 24 * 3600 * 1000;

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

/// How far a commit moves its source, written with it: what the source
/// achieved, in no store's terms. Every store records every part of it in
/// the commit's own atomic write, its own way (see each store's docs).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Answers to requests by idempotency key, replayed to retries.
    pub receipts: Vec<(String, Vec<u8>)>,
    /// Where the batch was read from, under a lease; `None` for a source
    /// without partitions or leases (HTTP, a file replayed from its start).
    pub position: Option<Position>,
}

/// A leased partition's part in a commit.
#[derive(Debug, Clone)]
pub struct Position {
    /// The lease the commit is made under: nothing is written unless its
    /// holder still holds it at this epoch.
    pub fence: Fence,
    /// The partition's last sequence number the batch read: each bucket
    /// written remembers it, so a batch read again is applied once. `None`:
    /// nothing read (timers of a timer partition fired).
    pub last: Option<SeqNo>,
    /// Where the lease's checkpoint moves; `None`: it stays (part of an
    /// earlier batch, run apart, has not committed yet).
    pub checkpoint: Option<Checkpoint>,
}

impl Progress {
    /// Nothing to record (a file replayed from its start, a timer firing of
    /// a store only this host writes).
    pub fn none() -> Self {
        Progress::default()
    }

    /// Answers to requests, stored under their idempotency keys.
    pub fn receipts(receipts: Vec<(String, Vec<u8>)>) -> Self {
        Progress {
            receipts,
            position: None,
        }
    }

    /// A shard read up to `last` under the lease `fence` proves.
    pub fn shard(fence: Fence, last: SeqNo, checkpoint: Option<Checkpoint>) -> Self {
        Progress {
            receipts: Vec::new(),
            position: Some(Position {
                fence,
                last: Some(last),
                checkpoint,
            }),
        }
    }

    /// Timers of a timer partition fired under the lease `fence` proves
    /// (its `shard` is the partition): hosts sharing a store share the
    /// firing of its timers as they share the stream's shards.
    pub fn timers(fence: Fence) -> Self {
        Progress {
            receipts: Vec::new(),
            position: Some(Position {
                fence,
                last: None,
                checkpoint: None,
            }),
        }
    }

    /// The checkpoint of a partition this commit read from, to move.
    pub fn checkpoint_mut(&mut self) -> Option<&mut Option<Checkpoint>> {
        self.position
            .as_mut()
            .filter(|position| position.last.is_some())
            .map(|position| &mut position.checkpoint)
    }
}

/// Everything one processed batch changes, written atomically.
#[derive(Debug, Clone)]
pub struct Commit {
    pub writes: Vec<BucketWrite>,
    pub progress: Progress,
    /// The source partition whose batch this is (a shard, a timer
    /// partition, `http`, `file`): its outbox holds the alerts.
    pub partition: String,
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

/// What [`StateStore::published`] needs to retire an [`Outbox`]: each
/// store's own token (the embedded store's cursor, DynamoDB's outbox item
/// keys), opaque to everyone else. A mark goes back to the store that made
/// it.
#[derive(Clone, Default)]
pub struct OutboxMark(Option<Arc<dyn std::any::Any + Send + Sync>>);

impl OutboxMark {
    /// A store's token.
    pub fn new(token: impl std::any::Any + Send + Sync) -> Self {
        OutboxMark(Some(Arc::new(token)))
    }

    /// Nothing to retire.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The token, if this store made it.
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.as_ref().and_then(|token| token.downcast_ref())
    }
}

impl std::fmt::Debug for OutboxMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() {
            "OutboxMark(none)"
        } else {
            "OutboxMark(..)"
        })
    }
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

    /// The partitions its pending timers are indexed in: the hosts sharing
    /// the store fire them, each the partitions whose lease it holds.
    fn timer_partitions(&self) -> Vec<String>;

    /// These partitions were read to their end (their leases say so):
    /// buckets written from now on need not remember what they applied
    /// from them.
    fn partitions_finished(&self, partitions: &[String]);

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
