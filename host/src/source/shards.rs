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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::kinesis::{self, ShardReader};
use super::leases::{self, Lease, Leases};
use crate::engine::{Batch, Engine, EngineError, Lane};
use crate::event::SeqNo;
use crate::store::dynamo::DynamoStore;
use crate::store::{Checkpoint, Fence, Progress, StoreError};

/// How often leases are renewed and the lease table is read.
const TICK: Duration = Duration::from_millis(500);
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
    task: JoinHandle<()>,
}

impl Shards {
    /// Start coordinating leases for `engine` until `stop` is set.
    pub fn start(
        engine: Arc<Engine>,
        store: Arc<DynamoStore>,
        kinesis: aws_sdk_kinesis::Client,
        leases: Leases,
        settings: ShardSettings,
        stop: watch::Receiver<bool>,
    ) -> Shards {
        let state = Arc::new(ShardsState::default());
        let task = tokio::spawn(coordinate(
            engine,
            store,
            state.clone(),
            settings.clone(),
            kinesis,
            leases,
            stop,
        ));
        Shards {
            state,
            settings,
            task,
        }
    }

    /// Wait until every worker finished its batch and released its lease.
    pub async fn join(self) -> Result<(), tokio::task::JoinError> {
        self.task.await
    }
}

/// One shard this host works on.
struct Worker {
    epoch: u64,
    /// Set when the lease was lost: stop without releasing.
    lost: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// How a lease looked when last read, and since when.
struct Seen {
    owner: Option<String>,
    counter: u64,
    since: Instant,
}

async fn coordinate(
    engine: Arc<Engine>,
    store: Arc<DynamoStore>,
    state: Arc<ShardsState>,
    settings: ShardSettings,
    kinesis: aws_sdk_kinesis::Client,
    leases: Leases,
    mut stop: watch::Receiver<bool>,
) {
    let me = settings.host.clone();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut listed: Option<Instant> = None;
    loop {
        // Workers that ended: a finished shard (list shards again for its
        // children), a lost lease, or an error that cannot heal (kept: its
        // lease stays this host's, see the module docs).
        let ended: Vec<String> = workers
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(shard, _)| shard.clone())
            .collect();
        if !ended.is_empty() {
            listed = None;
        }
        let failed: Vec<String> = state
            .failed
            .lock()
            .expect("failed lock")
            .keys()
            .cloned()
            .collect();
        for shard in ended {
            if !failed.contains(&shard) {
                workers.remove(&shard);
            }
        }

        // Renew.
        let renewals = workers.iter().map(|(shard, worker)| {
            let leases = leases.clone();
            let me = me.clone();
            let shard = shard.clone();
            let epoch = worker.epoch;
            async move { (shard.clone(), leases.renew(&shard, &me, epoch).await) }
        });
        for (shard, renewed) in futures::future::join_all(renewals).await {
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%shard, "lease lost to another host; stopping its worker");
                    if let Some(worker) = workers.remove(&shard) {
                        worker.lost.store(true, Ordering::Relaxed);
                    }
                    state.failed.lock().expect("failed lock").remove(&shard);
                }
                Err(error) => tracing::warn!(%shard, %error, "cannot renew lease"),
            }
        }

        if listed.is_none_or(|at| at.elapsed() >= LIST_SHARDS_EVERY) {
            match kinesis::list_shards(&kinesis, &settings.stream).await {
                Ok(shards) => {
                    listed = Some(Instant::now());
                    for shard in shards {
                        if !seen.contains_key(&shard.id)
                            && let Err(error) = leases.create(&shard.id, &shard.parents).await
                        {
                            tracing::warn!(shard = %shard.id, %error, "cannot create lease");
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot list shards"),
            }
        }

        match leases.list().await {
            Ok(all) => {
                store.shards_finished(
                    all.iter()
                        .filter(|lease| lease.finished())
                        .map(|lease| lease.shard.clone()),
                );
                for lease in &all {
                    let entry = seen.entry(lease.shard.clone()).or_insert(Seen {
                        owner: lease.owner.clone(),
                        counter: lease.counter,
                        since: Instant::now(),
                    });
                    if entry.owner != lease.owner || entry.counter != lease.counter {
                        *entry = Seen {
                            owner: lease.owner.clone(),
                            counter: lease.counter,
                            since: Instant::now(),
                        };
                    }
                    // Held by someone else now: ours is gone.
                    if let Some(worker) = workers.get(&lease.shard)
                        && (lease.owner.as_deref() != Some(&me) || lease.epoch != worker.epoch)
                    {
                        tracing::warn!(shard = %lease.shard, "lease taken by another host; stopping its worker");
                        worker.lost.store(true, Ordering::Relaxed);
                        workers.remove(&lease.shard);
                        state
                            .failed
                            .lock()
                            .expect("failed lock")
                            .remove(&lease.shard);
                    }
                }
                let expired = |lease: &Lease| {
                    lease.owner.as_deref() != Some(&me)
                        && seen
                            .get(&lease.shard)
                            .is_some_and(|s| s.since.elapsed() >= settings.lease_duration)
                };
                if !*stop.borrow() {
                    for lease in leases::plan(&all, &expired, &me).take {
                        match leases.take(&lease, &me).await {
                            Ok(Some(epoch)) => {
                                tracing::info!(shard = %lease.shard, epoch, previous = ?lease.owner, "took lease");
                                let lost = Arc::new(AtomicBool::new(false));
                                let task = tokio::spawn(work(
                                    engine.clone(),
                                    state.clone(),
                                    settings.clone(),
                                    kinesis.clone(),
                                    leases.clone(),
                                    lease.clone(),
                                    epoch,
                                    stop.clone(),
                                    lost.clone(),
                                ));
                                workers.insert(lease.shard.clone(), Worker { epoch, lost, task });
                            }
                            Ok(None) => {
                                tracing::debug!(shard = %lease.shard, "lease changed before it could be taken")
                            }
                            Err(error) => {
                                tracing::warn!(shard = %lease.shard, %error, "cannot take lease")
                            }
                        }
                    }
                }
                state.joined.store(true, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "cannot read the lease table"),
        }
        *state.held.lock().expect("held lock") = workers.keys().cloned().collect();

        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }
    // Stopping: each worker finishes its batch and releases its lease; keep
    // renewing until they are done.
    while !workers.is_empty() {
        workers.retain(|_, w| !w.task.is_finished());
        for (shard, worker) in &workers {
            let _ = leases.renew(shard, &me, worker.epoch).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state.held.lock().expect("held lock").clear();
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
        stream: leases.stream().to_owned(),
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
            let batch = Batch {
                events: Arc::from(events),
                progress: Progress::Shard {
                    fence: fence.clone(),
                    last: last.unwrap_or_else(|| SeqNo::new("0").expect("zero")),
                    checkpoint: Some(next.clone()),
                },
                bad: bad_records,
                unanswered: true,
                together: Vec::new(),
                receipts: None,
                timers: Vec::new(),
                expired: Vec::new(),
            };
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
