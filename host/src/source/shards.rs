//! The Kinesis source: any number of hosts share the events stream through
//! [`leases`](super::leases). A coordinator renews what this host holds,
//! notices lost leases, lists shards, and takes free, expired or (to
//! balance) stolen leases; a worker per held shard reads it from its
//! checkpoint ([`ShardReader`]) and hands each poll to the [`Engine`] as one
//! batch of the shard's lane, whose commit moves the checkpoint fenced by
//! the lease. Only then does the worker read on.
//!
//! Each shard's batches are processed in order, shards concurrently. An
//! error that cannot heal (the store refuses the write as invalid, an
//! unreadable outbox item) stops the shard's worker: retrying would fail the
//! same way. The host keeps the lease, so the stall stays visible in
//! `GET /v1/status` on this host instead of moving from host to host; a
//! restart starts the worker again.
//!
//! The timer partitions of the store are a second kind of lease, shared
//! the same way ([`super::timers`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::SourceError;
use super::kinesis::{self, ShardReader};
use super::leases::{Lease, Leased, Leases, coordinate};
use crate::engine::{Batch, Engine, EngineError, Lane};
use crate::event::SeqNo;
use crate::store::{Checkpoint, Fence, Progress, StateStore, StoreError};

/// How often the stream's shards are listed (also after a shard ends).
const LIST_SHARDS_EVERY: Duration = Duration::from_secs(10);

/// Settings of one host reading the stream.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    pub stream: String,
    /// This host's name in the lease table: unique per process.
    pub host: String,
    /// A lease whose heartbeat has not moved for this long is taken over.
    pub lease_duration: Duration,
    pub tenant_field: String,
    /// Larger records are dead-lettered.
    pub max_event_bytes: usize,
}

/// What the source knows of itself, for `GET /v1/status` and `/readyz`.
#[derive(Debug, Default)]
pub struct ShardsState {
    /// Shards whose lease this host holds.
    pub held: std::sync::Mutex<Vec<String>>,
    /// Timer partitions whose lease this host holds (it fires their timers).
    pub timers: Arc<std::sync::Mutex<Vec<String>>>,
    /// Shards whose worker stopped on an error that cannot heal.
    pub failed: std::sync::Mutex<HashMap<String, String>>,
    /// The lease table was read once: the host has joined.
    pub joined: AtomicBool,
    /// Records that were not events (bad JSON, no tenant, too large):
    /// dead-lettered.
    pub bad_records: AtomicU64,
    /// Polls processed (each one batch).
    pub batches: AtomicU64,
}

/// The running source.
pub struct Shards {
    pub state: Arc<ShardsState>,
    pub settings: ShardSettings,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Shards {
    /// Start coordinating the stream's shards' leases (`leases`, the group
    /// named after the stream) for `engine` until `stop` is set.
    pub fn start(
        engine: Arc<Engine>,
        store: Arc<dyn StateStore>,
        kinesis: aws_sdk_kinesis::Client,
        leases: Leases,
        settings: ShardSettings,
        state: Arc<ShardsState>,
        stop: watch::Receiver<bool>,
    ) -> Shards {
        let task = tokio::spawn(coordinate(
            Arc::new(StreamShards {
                engine,
                store,
                state: state.clone(),
                settings: settings.clone(),
                kinesis,
                leases: leases.clone(),
            }),
            leases,
            settings.host.clone(),
            settings.lease_duration,
            stop,
        ));
        Shards {
            state,
            settings,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }
}

#[async_trait::async_trait]
impl super::Source for Shards {
    fn not_ready(&self) -> Option<String> {
        (!self.state.joined.load(Ordering::Relaxed)).then(|| "joining the lease table".to_owned())
    }

    /// Every worker finished its batch and released its lease.
    async fn join(&self) {
        if let Some(task) = self.task.lock().await.take()
            && let Err(error) = task.await
        {
            tracing::error!(%error, "the shards' coordinator failed");
        }
    }
}

/// The events stream's shards: a worker reads each.
struct StreamShards {
    engine: Arc<Engine>,
    store: Arc<dyn StateStore>,
    state: Arc<ShardsState>,
    settings: ShardSettings,
    kinesis: aws_sdk_kinesis::Client,
    leases: Leases,
}

#[async_trait::async_trait]
impl Leased for StreamShards {
    async fn list(&self) -> Result<Vec<(String, Vec<String>)>, SourceError> {
        let shards = kinesis::list_shards(&self.kinesis, &self.settings.stream).await?;
        Ok(shards
            .into_iter()
            .map(|shard| (shard.id, shard.parents))
            .collect())
    }

    fn list_every(&self) -> Duration {
        LIST_SHARDS_EVERY
    }

    fn read(&self, leases: &[Lease]) {
        let finished: Vec<String> = leases
            .iter()
            .filter(|lease| lease.finished())
            .map(|lease| lease.shard.clone())
            .collect();
        self.store.partitions_finished(&finished);
        self.state.joined.store(true, Ordering::Relaxed);
    }

    fn held(&self, names: Vec<String>) {
        *self.state.held.lock().expect("held lock") = names;
    }

    fn failed(&self) -> Vec<String> {
        let failed = self.state.failed.lock().expect("failed lock");
        failed.keys().cloned().collect()
    }

    fn lost(&self, name: &str) {
        self.state.failed.lock().expect("failed lock").remove(name);
    }

    fn start(
        &self,
        lease: Lease,
        epoch: u64,
        stop: watch::Receiver<bool>,
        lost: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        tokio::spawn(work(
            self.engine.clone(),
            self.state.clone(),
            self.settings.clone(),
            self.kinesis.clone(),
            self.leases.clone(),
            lease,
            epoch,
            stop,
            lost,
        ))
    }
}

/// Read one shard from its checkpoint, batch after batch, until the shard
/// ends, the lease is lost, an error cannot heal, or the host stops (then
/// release the lease).
#[allow(clippy::too_many_arguments)] // the worker's whole context, once
async fn work(
    engine: Arc<Engine>,
    state: Arc<ShardsState>,
    settings: ShardSettings,
    kinesis: aws_sdk_kinesis::Client,
    leases: Leases,
    lease: Lease,
    epoch: u64,
    stop: watch::Receiver<bool>,
    lost: Arc<AtomicBool>,
) {
    let fence = Fence {
        stream: leases.group().to_owned(),
        shard: lease.shard.clone(),
        owner: settings.host.clone(),
        epoch,
    };
    let lane = Arc::new(Lane::new(&fence.shard));
    let mut checkpoint = lease.checkpoint.clone();
    let mut attempt = 0;
    let stopping = || *stop.borrow() || lost.load(Ordering::Relaxed);
    let fail = |error: &EngineError| {
        tracing::error!(shard = %fence.shard, %error, "an error that retrying cannot heal: this shard's worker stops (the lease stays with this host; restart it once the cause is fixed)");
        state
            .failed
            .lock()
            .expect("failed lock")
            .insert(fence.shard.clone(), error.to_string());
    };
    // A new lease owner first publishes what the shard's previous owner
    // committed but may not have published.
    while let Err(error) = engine.flush(&lane).await {
        if !error.retryable() {
            fail(&error);
            return;
        }
        tracing::warn!(shard = %fence.shard, %error, "cannot publish the shard's outbox");
        attempt += 1;
        crate::backoff::sleep(attempt).await;
        if stopping() {
            break;
        }
    }
    'reopen: while !stopping() {
        // Read again from the last checkpoint committed: a part run apart
        // may have failed after its batch moved on.
        match lane.reopened() {
            Some(Checkpoint::End) => break,
            Some(Checkpoint::At(seq)) => checkpoint = Some(seq.as_str().to_owned()),
            None => {}
        }
        let mut reader = match ShardReader::open(
            kinesis.clone(),
            &fence.stream,
            &fence.shard,
            checkpoint.as_deref(),
        )
        .await
        {
            Ok(reader) => reader,
            Err(error) => {
                tracing::warn!(shard = %fence.shard, %error, "cannot open shard");
                attempt += 1;
                crate::backoff::sleep(attempt).await;
                continue;
            }
        };
        while !stopping() {
            if lane.part_failed() {
                attempt += 1;
                crate::backoff::sleep(attempt).await;
                continue 'reopen;
            }
            let poll = match reader.next().await {
                Ok(poll) => poll,
                Err(error) => {
                    tracing::warn!(shard = %fence.shard, %error, "cannot read shard");
                    attempt += 1;
                    crate::backoff::sleep(attempt).await;
                    continue 'reopen;
                }
            };
            if let Some(behind) = poll.behind_ms {
                engine.metrics().source_lag(&fence.shard, behind);
            }
            if poll.records.is_empty() && !poll.end {
                continue;
            }
            let now = engine.clock().now_ms();
            let mut events = Vec::with_capacity(poll.records.len());
            let mut bad_records = Vec::new();
            for record in &poll.records {
                let (good, bad) = kinesis::events(
                    &fence.shard,
                    record,
                    &settings.tenant_field,
                    now,
                    settings.max_event_bytes,
                );
                for letter in &bad {
                    tracing::warn!("{}; dead-lettered", letter.reason);
                }
                state
                    .bad_records
                    .fetch_add(bad.len() as u64, Ordering::Relaxed);
                bad_records.extend(bad);
                events.extend(good);
            }
            let last = poll
                .records
                .last()
                .and_then(|r| SeqNo::new(r.sequence_number()));
            let next = match (poll.end, &last) {
                (true, _) => Checkpoint::End,
                (false, Some(last)) => Checkpoint::At(last.clone()),
                (false, None) => continue,
            };
            let progress = Progress::shard(
                fence.clone(),
                last.unwrap_or_else(|| SeqNo::new("0").expect("zero")),
                Some(next.clone()),
            );
            let batch = Batch::new(events, progress).unanswered(bad_records);
            match engine.process(&lane, &batch).await {
                Ok(committed) => {
                    state.batches.fetch_add(1, Ordering::Relaxed);
                    for rejection in &committed.rejected {
                        tracing::debug!(shard = %fence.shard, position = %batch.events[rejection.index].position, rule = ?rejection.rule, "event not applied, dead-lettered: {}", rejection.reason);
                    }
                    attempt = 0;
                    if let Checkpoint::End = next {
                        // Its children start once the end is committed, with
                        // the parts of its last batches run apart.
                        engine.settle(&lane).await;
                        if lane.part_failed() {
                            continue 'reopen;
                        }
                        tracing::info!(shard = %fence.shard, "shard finished");
                        return;
                    }
                }
                Err(EngineError::Store(StoreError::Fenced(_))) => {
                    tracing::warn!(shard = %fence.shard, "lease lost: batch discarded");
                    lost.store(true, Ordering::Relaxed);
                    return;
                }
                Err(error) if !error.retryable() => {
                    fail(&error);
                    return;
                }
                Err(error) => {
                    tracing::warn!(shard = %fence.shard, %error, "batch not committed; reading it again");
                    attempt += 1;
                    crate::backoff::sleep(attempt).await;
                    continue 'reopen;
                }
            }
        }
    }
    // Parts run apart commit under this lease: let them, then release it.
    engine.settle(&lane).await;
    engine.metrics().shard_released(&fence.shard);
    if !lost.load(Ordering::Relaxed) {
        match leases.release(&fence.shard, &fence.owner, epoch).await {
            Ok(_) => tracing::info!(shard = %fence.shard, "lease released"),
            Err(error) => tracing::warn!(shard = %fence.shard, %error, "cannot release lease"),
        }
    }
}
