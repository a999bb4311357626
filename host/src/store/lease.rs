//! Leases: how the hosts of a deployment share its partitions (an events
//! stream's shards, a shared store's timer partitions). One lease per
//! partition, in groups (a stream's shards; `{stream}#timers`), each with
//! its owner, an epoch (raised whenever the lease changes hands: commits
//! made under it are fenced by it), a heartbeat counter (raised by every
//! renewal), the partition's checkpoint and its parents.
//!
//! A lease is expired when its counter has not moved for the lease duration
//! as seen by the observer's own clock, so hosts need not agree on time.
//! Every store keeps leases beside the state their commits fence (the
//! commit checks the lease and moves its checkpoint atomically with the
//! batch): DynamoDB for hosts that share a table, the embedded store for the
//! one process that holds its file.

use super::Result;

/// The checkpoint of a partition read to its end (closed by a reshard).
pub const SHARD_END: &str = "SHARD_END";

/// One partition's lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The partition (a shard id, a timer partition).
    pub shard: String,
    pub owner: Option<String>,
    pub epoch: u64,
    pub counter: u64,
    /// `None`: nothing read yet (start at the partition's beginning).
    pub checkpoint: Option<String>,
    pub parents: Vec<String>,
}

impl Lease {
    /// Read to its end: its children may start.
    pub fn finished(&self) -> bool {
        self.checkpoint.as_deref() == Some(SHARD_END)
    }
}

/// Where a deployment's leases live. Each call is one conditional change:
/// `false` / `None` when the condition failed (someone else moved first).
#[async_trait::async_trait]
pub trait LeaseTable: Send + Sync {
    /// Every lease of `group`, as of now.
    async fn list(&self, group: &str) -> Result<Vec<Lease>>;

    /// Create a free lease for a newly seen partition; `false` if it exists.
    async fn create(&self, group: &str, name: &str, parents: &[String]) -> Result<bool>;

    /// Take `lease` as read (free, expired, or stolen): only if nobody
    /// renewed or took it since. Returns the new epoch.
    async fn take(&self, group: &str, lease: &Lease, me: &str) -> Result<Option<u64>>;

    /// Prove `me` alive; `false` if the lease is no longer `me`'s at `epoch`.
    async fn renew(&self, group: &str, name: &str, me: &str, epoch: u64) -> Result<bool>;

    /// Give the lease up so another host takes it at once. Raises the
    /// epoch: nothing `me` still has in flight can commit afterwards.
    async fn release(&self, group: &str, name: &str, me: &str, epoch: u64) -> Result<bool>;
}
