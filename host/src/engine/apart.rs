//! Fair sharing: a tenant whose rules take more than their share of a
//! batch's time is run apart, so the rest of the batch commits (its
//! requests are answered, its shard moves on) without waiting for it.
//!
//! Within a batch, tenants run in parallel. Once every other tenant is
//! done, the ones still running get as long again as the others took, and
//! at least the fair share (`fair_share_ms`, default
//! [`DEFAULT_FAIR_SHARE`](crate::quota::DEFAULT_FAIR_SHARE)); past that, the batch commits without them. A
//! tenant alone in its batch is run apart the same way: the lane's next
//! batches are the others it would hold. Each straggler's run goes on and commits as a *part* of its own,
//! on the tenant's *chain* in the lane: its parts, one after the other, in
//! order. While a chain holds parts, the tenant's events of later batches
//! join it instead of their batch; once it drains, the tenant is back in
//! the batches, and is run apart again only if it is still slow.
//!
//! Order is kept per bucket: a part commits after the rest of its batch,
//! and a chain's parts in turn. A shard's checkpoint moves only past
//! batches whose every part committed; a part's buckets remember the
//! sequence number they applied, so reading a shard again from an older
//! checkpoint applies nothing twice. An HTTP request is answered when the
//! part holding its events commits; a request with events of several
//! tenants keeps them together (they are never run apart).
//!
//! A chain [`MAX_BEHIND`] parts long takes no more: the tenant's further
//! events are dead-lettered (cause `behind`) until it catches up, and
//! `tocsin replay` runs them again. The stream keeps moving either way.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::{Batch, Engine, EngineError, Lane, MAX_CONFLICTS, Rejection, TenantOutcome};
use crate::event::Incoming;
use crate::store::{Checkpoint, Progress, StoreError};

/// Parts a tenant's chain may hold before the tenant's further events are
/// dead-lettered: at the default batch size, several seconds of its events.
pub const MAX_BEHIND: usize = 8;

/// What a part's commit records for the requests whose events are all in
/// it (indices of the batch, in order), given the part's rejections: the
/// HTTP ingest's receipts.
#[derive(Clone)]
pub struct PartReceipts(Arc<ReceiptsFn>);

type ReceiptsFn = dyn Fn(&[usize], &[Rejection]) -> Vec<(String, Vec<u8>)> + Send + Sync;

impl PartReceipts {
    pub fn new(
        receipts: impl Fn(&[usize], &[Rejection]) -> Vec<(String, Vec<u8>)> + Send + Sync + 'static,
    ) -> Self {
        PartReceipts(Arc::new(receipts))
    }
}

impl std::fmt::Debug for PartReceipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PartReceipts")
    }
}

/// One tenant's events of a batch, run apart from the rest of it.
#[derive(Debug)]
pub struct Apart {
    /// The events it holds, by their index in the batch.
    pub indices: Vec<usize>,
    result: oneshot::Receiver<Result<Vec<Rejection>, EngineError>>,
}

impl Apart {
    /// Once the part committed: its events not applied, by their index in
    /// the batch.
    pub async fn committed(self) -> Result<Vec<Rejection>, EngineError> {
        self.result.await.unwrap_or_else(|_| {
            Err(EngineError::Panicked(
                "the part run apart was dropped before it committed".to_owned(),
            ))
        })
    }
}

/// A lane's tenants run apart, and its batches that wait for parts.
#[derive(Default)]
pub(super) struct Parts {
    chains: HashMap<String, Chain>,
    /// Batches of a shard with parts not committed, oldest first.
    open: VecDeque<Open>,
    next_ticket: u64,
    /// A part failed: no checkpoint moves until the source reads again
    /// from the last one committed.
    failed: bool,
    /// The newest checkpoint the lane committed.
    durable: Option<Checkpoint>,
}

struct Chain {
    parts: mpsc::UnboundedSender<Part>,
    /// Parts sent and not finished.
    queued: usize,
}

struct Open {
    ticket: u64,
    /// Parts (the rest of the batch counts as one) not committed.
    remaining: usize,
    checkpoint: Option<Checkpoint>,
}

impl Parts {
    /// Parts waiting on `tenant`'s chain, if it is run apart.
    pub(super) fn behind(&self, tenant: &str) -> Option<usize> {
        self.chains.get(tenant).map(|c| c.queued)
    }

    /// Register a shard batch of `parts` parts (the rest of the batch
    /// included) moving the checkpoint to `checkpoint`; a batch run again
    /// (`ticket`) adds its new parts.
    pub(super) fn open(
        &mut self,
        ticket: Option<u64>,
        parts: usize,
        checkpoint: Option<Checkpoint>,
    ) -> u64 {
        if let Some(ticket) = ticket
            && let Some(open) = self.open.iter_mut().find(|o| o.ticket == ticket)
        {
            open.remaining += parts - 1;
            return ticket;
        }
        self.next_ticket += 1;
        self.open.push_back(Open {
            ticket: self.next_ticket,
            remaining: parts,
            checkpoint,
        });
        self.next_ticket
    }

    /// Where the checkpoint may move once a part of `ticket` commits: past
    /// every batch all of whose parts are then committed; `None` leaves it.
    pub(super) fn checkpoint_after(&self, ticket: u64) -> Option<Checkpoint> {
        if self.failed {
            return None;
        }
        let mut checkpoint = None;
        for open in &self.open {
            let remaining = open.remaining - usize::from(open.ticket == ticket);
            if remaining > 0 {
                break;
            }
            checkpoint = open.checkpoint.clone();
        }
        checkpoint
    }

    /// A part of `ticket` (or a batch without parts) committed, moving the
    /// checkpoint to `written`.
    pub(super) fn committed(&mut self, ticket: Option<u64>, written: Option<Checkpoint>) {
        if let Some(open) = self.open.iter_mut().find(|o| Some(o.ticket) == ticket) {
            open.remaining -= 1;
        }
        while self.open.front().is_some_and(|o| o.remaining == 0) {
            self.open.pop_front();
        }
        if written.is_some() {
            self.durable = written;
        }
    }

    /// The source reads again from the last checkpoint committed: batches
    /// it had open are forgotten (their parts still commit, moving no
    /// checkpoint).
    #[cfg_attr(
        not(feature = "aws"),
        allow(dead_code, reason = "used by the Kinesis source")
    )]
    pub(super) fn reopened(&mut self) -> Option<Checkpoint> {
        self.open.clear();
        self.failed = false;
        self.durable.clone()
    }

    #[cfg_attr(
        not(feature = "aws"),
        allow(dead_code, reason = "used by the Kinesis source")
    )]
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    /// `tenant` run apart with `queued` parts waiting (and no chain to run
    /// them).
    #[cfg(test)]
    pub(super) fn hold(&mut self, tenant: &str, queued: usize) {
        let (parts, _) = mpsc::unbounded_channel();
        self.chains
            .insert(tenant.to_owned(), Chain { parts, queued });
    }
}

/// What a part runs.
pub(super) enum Run {
    /// Started with its batch (a straggler): its outcome when done, run on
    /// the batch's `events` at the lane's `generation`.
    Started {
        outcome: oneshot::Receiver<Result<TenantOutcome, String>>,
        events: Arc<[Incoming]>,
        generation: u64,
    },
    /// To run when its turn comes.
    Queued,
}

/// One tenant's events of a batch, on its chain.
pub(super) struct Part {
    pub tenant: String,
    /// The tenant's events of the batch, as a batch of their own.
    pub batch: Batch,
    /// The index in the source batch of each of them.
    pub indices: Vec<usize>,
    pub run: Run,
    /// The shard batch it belongs to.
    pub ticket: Option<u64>,
    pub receipts: Option<PartReceipts>,
    /// Closed once the rest of its batch committed (or failed).
    pub rest: watch::Receiver<()>,
    pub done: oneshot::Sender<Result<Vec<Rejection>, EngineError>>,
}

impl Part {
    /// The handle the source waits on, and the part to send.
    pub(super) fn new(
        tenant: String,
        batch: Batch,
        indices: Vec<usize>,
        run: Run,
        receipts: Option<PartReceipts>,
        rest: watch::Receiver<()>,
    ) -> (Part, Apart) {
        let (done, result) = oneshot::channel();
        let apart = Apart {
            indices: indices.clone(),
            result,
        };
        let part = Part {
            tenant,
            batch,
            indices,
            run,
            ticket: None,
            receipts,
            rest,
            done,
        };
        (part, apart)
    }
}

impl Engine {
    /// Put `part` on its tenant's chain in `lane`, starting the chain if
    /// the tenant had none.
    pub(super) fn send_part(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        parts: &mut Parts,
        part: Part,
        handle: &tokio::runtime::Handle,
    ) {
        let chain = parts.chains.entry(part.tenant.clone()).or_insert_with(|| {
            let (send, receive) = mpsc::unbounded_channel();
            lane.chains.send_modify(|chains| *chains += 1);
            handle.spawn(chain(
                self.clone(),
                lane.clone(),
                part.tenant.clone(),
                receive,
            ));
            Chain {
                parts: send,
                queued: 0,
            }
        });
        chain.queued += 1;
        self.metrics.ran_apart(&part.tenant);
        // The chain ends only once `queued` is back to 0: it is receiving.
        let _ = chain.parts.send(part);
    }

    /// Run one part and commit it, again on what is durable if another
    /// writer or a failed commit changed what it ran on.
    async fn run_part(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        part: &mut Part,
        run: Run,
    ) -> Result<Vec<Rejection>, EngineError> {
        // Closed when the rest of the batch is through its commit.
        let _ = part.rest.changed().await;
        let mut run = Some(run);
        let mut again = 0;
        loop {
            let (mut computed, in_batch) = match run.take() {
                Some(Run::Started {
                    outcome,
                    events,
                    generation,
                }) => {
                    let outcome = outcome
                        .await
                        .map_err(|_| {
                            EngineError::Panicked("a tenant's run was dropped".to_owned())
                        })?
                        .map_err(EngineError::Panicked)?;
                    (
                        self.finish_part(lane, &events, &part.batch, outcome, generation)?,
                        true,
                    )
                }
                _ => (self.compute_part(lane, part.batch.clone()).await?, false),
            };
            // Rejections by their index in the source batch.
            let rejected: Vec<Rejection> = computed
                .rejected
                .iter()
                .map(|r| Rejection {
                    index: if in_batch {
                        r.index
                    } else {
                        part.indices[r.index]
                    },
                    ..r.clone()
                })
                .collect();
            if let Some(receipts) = &part.receipts {
                computed.set_progress(Progress::receipts((receipts.0)(&part.indices, &rejected)));
            }
            computed.ticket = part.ticket;
            match self.commit(lane, computed).await {
                Ok(mut committed) => {
                    self.publish(lane, &mut committed).await;
                    return Ok(rejected);
                }
                Err(EngineError::Store(StoreError::Conflict(ids))) if again < MAX_CONFLICTS => {
                    self.store.forget(&ids);
                }
                // Ran on states of a commit that failed: run again on what
                // is durable.
                Err(EngineError::Stale) if again < MAX_CONFLICTS => {}
                Err(error) => return Err(error),
            }
            again += 1;
        }
    }
}

/// A tenant's chain in a lane: its parts in order, until none is left.
async fn chain(
    engine: Arc<Engine>,
    lane: Arc<Lane>,
    tenant: String,
    mut parts: mpsc::UnboundedReceiver<Part>,
) {
    while let Some(mut part) = parts.recv().await {
        let run = std::mem::replace(&mut part.run, Run::Queued);
        let result = engine.run_part(&lane, &mut part, run).await;
        if let Err(error) = &result {
            tracing::warn!(partition = %lane.partition, tenant = %tenant, %error, "events run apart were not applied; the source reads them again");
            lane.parts.lock().expect("parts lock").failed = true;
        }
        let _ = part.done.send(result);
        let mut lane_parts = lane.parts.lock().expect("parts lock");
        let chain = lane_parts
            .chains
            .get_mut(&tenant)
            .expect("a running chain is in its lane");
        chain.queued -= 1;
        if chain.queued == 0 {
            lane_parts.chains.remove(&tenant);
            lane.chains.send_modify(|chains| *chains -= 1);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SeqNo;

    fn at(seq: &str) -> Option<Checkpoint> {
        Some(Checkpoint::At(SeqNo::new(seq).unwrap()))
    }

    #[test]
    fn the_checkpoint_moves_only_past_batches_whose_every_part_committed() {
        let mut parts = Parts::default();
        let first = parts.open(None, 2, at("1"));
        let second = parts.open(None, 1, at("2"));
        // The second batch commits while the first one's part runs apart.
        assert_eq!(parts.checkpoint_after(second), None);
        parts.committed(Some(second), None);
        assert_eq!(parts.checkpoint_after(first), None, "one part left");
        parts.committed(Some(first), None);
        assert_eq!(parts.checkpoint_after(first), at("2"));
        parts.committed(Some(first), at("2"));
        assert!(parts.open.is_empty());
        assert_eq!(parts.reopened(), at("2"));
    }

    #[test]
    fn a_failed_part_holds_the_checkpoint_until_the_source_reads_again() {
        let mut parts = Parts::default();
        let ticket = parts.open(None, 1, at("5"));
        parts.failed = true;
        assert_eq!(parts.checkpoint_after(ticket), None);
        assert_eq!(parts.reopened(), None);
        let ticket = parts.open(None, 1, at("5"));
        assert_eq!(parts.checkpoint_after(ticket), at("5"));
    }

    #[test]
    fn a_batch_run_again_adds_its_new_parts_to_its_ticket() {
        let mut parts = Parts::default();
        let ticket = parts.open(None, 2, at("1"));
        assert_eq!(parts.open(Some(ticket), 2, at("1")), ticket);
        parts.committed(Some(ticket), None);
        parts.committed(Some(ticket), None);
        assert_eq!(parts.checkpoint_after(ticket), at("1"));
    }
}
