//! One source partition's [`Lane`]: its batches in order, the [`Overlay`]
//! of states its batches computed but did not yet commit, its tenants run
//! apart, and its turns to commit and to publish.
//!
//! A lane may run the rules of its next batch while the previous one
//! commits: the next batch reads the states the previous one left from the
//! overlay. If a commit fails, the overlay is dropped (its generation
//! raised), and every batch computed on top of it fails too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::apart;
use crate::runtime::StateChange;
use crate::store::{BucketId, BucketMap, BucketWrite, Checkpoint, Prior, State};

/// One source partition's batches, in order.
pub struct Lane {
    pub(super) partition: String,
    overlay: Mutex<Overlay>,
    /// Tenants run apart, and batches waiting for their parts.
    pub(super) parts: Mutex<apart::Parts>,
    /// Chains of tenants run apart in the lane.
    pub(super) chains: watch::Sender<usize>,
    /// Commits of the lane go one at a time, in order.
    pub(super) committing: tokio::sync::Mutex<()>,
    /// Held by a committed batch until it is published: the lane publishes
    /// in commit order (the embedded outbox retires by a cursor).
    pub(super) publishing: Arc<tokio::sync::Mutex<()>>,
    /// A publish failed: the outbox holds alerts older than the next batch's.
    pub(super) behind: Arc<AtomicBool>,
    /// The highest `seq` the last flush published. A batch committed while
    /// the flush read the outbox was published by it: its own publish skips
    /// those alerts rather than send them twice.
    pub(super) flushed: AtomicU64,
}

/// States computed by batches of the lane not yet committed.
#[derive(Default)]
pub(super) struct Overlay {
    /// Per bucket: the batch that wrote it last, and what it wrote.
    states: BucketMap<(u64, Option<State>)>,
    /// Raised when a commit fails and the overlay is dropped: batches
    /// computed on an older generation rest on states never made durable.
    pub(super) generation: u64,
    next_batch: u64,
}

impl Overlay {
    /// Read the buckets `ids` (whose stored states are `priors`) as the
    /// lane's uncommitted batches left them.
    pub(super) fn apply(&self, ids: &[BucketId], priors: &mut [Prior]) {
        if self.states.is_empty() {
            return;
        }
        for (id, prior) in ids.iter().zip(priors) {
            if let Some((_, state)) = self.states.get(id) {
                prior.state = state.clone();
            }
        }
    }

    /// What batch `batch` wrote, for the lane's next batches to read until
    /// it commits.
    pub(super) fn record(&mut self, batch: u64, writes: &[BucketWrite]) {
        for write in writes {
            let state = match &write.state {
                StateChange::Unchanged => continue,
                StateChange::Set(bytes) => Some(Arc::from(bytes.as_slice())),
                StateChange::Delete => None,
            };
            self.states.insert(write.id.clone(), (batch, state));
        }
    }

    /// Batch `batch` committed: what it wrote (and nothing later wrote
    /// over) is read from the store now.
    pub(super) fn committed(&mut self, batch: u64) {
        self.states
            .retain(|_, (written_by, _)| *written_by != batch);
    }

    /// Forget every state not committed: the batches computed on them fail
    /// as stale.
    pub(super) fn drop_all(&mut self) {
        self.generation += 1;
        self.states.clear();
    }
}

impl Lane {
    /// The lane of `partition` (a shard id; `http` for the HTTP ingest).
    pub fn new(partition: &str) -> Self {
        Lane {
            partition: partition.to_owned(),
            overlay: Mutex::default(),
            parts: Mutex::default(),
            chains: watch::Sender::new(0),
            committing: tokio::sync::Mutex::new(()),
            publishing: Arc::default(),
            behind: Arc::new(AtomicBool::new(true)),
            flushed: AtomicU64::new(0),
        }
    }

    /// Forget what batches computed but did not commit, and catch up on
    /// the outbox before the next publish: after a failure whose effect on
    /// the store is unknown (a panic mid-commit).
    pub(crate) fn reset(&self) {
        self.overlay().drop_all();
        self.behind.store(true, Ordering::Relaxed);
    }

    /// The source reads again from the last checkpoint the lane committed
    /// (returned; `None` if it committed none): batches it had waiting for
    /// parts run apart are forgotten.
    #[cfg_attr(
        not(feature = "aws"),
        allow(dead_code, reason = "used by the Kinesis source")
    )]
    pub(crate) fn reopened(&self) -> Option<Checkpoint> {
        self.parts.lock().expect("parts lock").reopened()
    }

    /// A part run apart failed: the source must read again from the last
    /// checkpoint committed ([`reopened`](Self::reopened)).
    #[cfg_attr(
        not(feature = "aws"),
        allow(dead_code, reason = "used by the Kinesis source")
    )]
    pub(crate) fn part_failed(&self) -> bool {
        self.parts.lock().expect("parts lock").failed()
    }

    /// A number for the next batch computed, and the overlay's generation.
    pub(super) fn next_batch(&self) -> (u64, u64) {
        let mut overlay = self.overlay();
        overlay.next_batch += 1;
        (overlay.next_batch, overlay.generation)
    }

    pub(super) fn overlay(&self) -> MutexGuard<'_, Overlay> {
        self.overlay.lock().expect("overlay lock")
    }
}
