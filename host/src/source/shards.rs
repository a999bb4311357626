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
//! The same coordinator keeps a second kind of lease: the timer partitions
//! of the DynamoDB store (see [`crate::store::dynamo`]). Buckets do not
//! belong to shards, so their timers are fired by whoever holds their
//! partition's lease ([`super::timers::fire_partition`]); a crashed host's
//! partitions are taken over like its shards, once their lease expires.

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
use crate::store::dynamo::{DynamoStore, timer_leases, timer_partitions};
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
    /// Timer partitions whose lease this host holds (it fires their timers).
    pub timers: std::sync::Mutex<Vec<String>>,
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
    timers: JoinHandle<()>,
}

impl Shards {
    /// Start coordinating the shards' leases and the timer partitions'
    /// for `engine` until `stop` is set.
    pub fn start(
        engine: Arc<Engine>,
        store: Arc<DynamoStore>,
        kinesis: aws_sdk_kinesis::Client,
        leases: Leases,
        settings: ShardSettings,
        stop: watch::Receiver<bool>,
    ) -> Shards {
        let state = Arc::new(ShardsState::default());
        let timer_leases = Leases::new(leases.table().clone(), &timer_leases(&settings.stream));
        let task = tokio::spawn(coordinate(
            Arc::new(StreamShards {
                engine: engine.clone(),
                store,
                state: state.clone(),
                settings: settings.clone(),
                kinesis,
                leases: leases.clone(),
            }),
            leases,
            settings.host.clone(),
            settings.lease_duration,
            stop.clone(),
        ));
        let timers = tokio::spawn(coordinate(
            Arc::new(TimerPartitions {
                engine,
                state: state.clone(),
                me: settings.host.clone(),
                leases: timer_leases.clone(),
            }),
            timer_leases,
            settings.host.clone(),
            settings.lease_duration,
            stop,
        ));
        Shards {
            state,
            settings,
            task,
            timers,
        }
    }

    /// Wait until every worker finished its batch and released its lease.
    pub async fn join(self) -> Result<(), tokio::task::JoinError> {
        self.task.await?;
        self.timers.await
    }
}

/// What a host does with the leases of one kind: the stream's shards, or
/// the timer partitions of its buckets.
#[async_trait::async_trait]
trait Leased: Send + Sync + 'static {
    /// What there is to lease now, each with the leases that must finish
    /// first; a lease is created for each one not seen yet.
    async fn list(&self) -> Result<Vec<(String, Vec<String>)>, String>;

    /// How often to list again (also after a worker ends).
    fn list_every(&self) -> Duration;

    /// Every lease, as just read.
    fn read(&self, _leases: &[Lease]) {}

    /// What this host holds now.
    fn held(&self, names: Vec<String>);

    /// Leases whose worker stopped on an error that cannot heal: kept, see
    /// the module docs.
    fn failed(&self) -> Vec<String> {
        Vec::new()
    }

    /// The lease of `name` is no longer this host's.
    fn lost(&self, _name: &str) {}

    /// Work under `lease`, taken at `epoch`, until the host stops or the
    /// lease is lost.
    fn start(
        &self,
        lease: Lease,
        epoch: u64,
        stop: watch::Receiver<bool>,
        lost: Arc<AtomicBool>,
    ) -> JoinHandle<()>;
}

/// The events stream's shards: a worker reads each.
struct StreamShards {
    engine: Arc<Engine>,
    store: Arc<DynamoStore>,
    state: Arc<ShardsState>,
    settings: ShardSettings,
    kinesis: aws_sdk_kinesis::Client,
    leases: Leases,
}

#[async_trait::async_trait]
impl Leased for StreamShards {
    async fn list(&self) -> Result<Vec<(String, Vec<String>)>, String> {
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
        self.store.shards_finished(
            leases
                .iter()
                .filter(|lease| lease.finished())
                .map(|lease| lease.shard.clone()),
        );
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

/// The timer partitions ([`TIMER_PARTITIONS`](crate::store::dynamo::TIMER_PARTITIONS)):
/// a worker fires each one's due timers.
struct TimerPartitions {
    engine: Arc<Engine>,
    state: Arc<ShardsState>,
    me: String,
    leases: Leases,
}

#[async_trait::async_trait]
impl Leased for TimerPartitions {
    async fn list(&self) -> Result<Vec<(String, Vec<String>)>, String> {
        Ok(timer_partitions().map(|p| (p, Vec::new())).collect())
    }

    fn list_every(&self) -> Duration {
        // They never change; listed again only to create a lease that could
        // not be created before.
        LIST_SHARDS_EVERY * 6
    }

    fn held(&self, names: Vec<String>) {
        *self.state.timers.lock().expect("timers lock") = names;
    }

    fn start(
        &self,
        lease: Lease,
        epoch: u64,
        stop: watch::Receiver<bool>,
        lost: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let fence = Fence {
            stream: self.leases.stream().to_owned(),
            shard: lease.shard,
            owner: self.me.clone(),
            epoch,
        };
        tokio::spawn(super::timers::fire_partition(
            self.engine.clone(),
            self.leases.clone(),
            fence,
            stop,
            lost,
        ))
    }
}

/// One lease this host works under.
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

/// Keep `me`'s leases of one kind: renew what it holds, notice what it
/// lost, create leases for what is new, and take free, expired or (to
/// balance) stolen ones, starting a worker for each.
async fn coordinate(
    what: Arc<dyn Leased>,
    leases: Leases,
    me: String,
    lease_duration: Duration,
    mut stop: watch::Receiver<bool>,
) {
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
            .map(|(name, _)| name.clone())
            .collect();
        if !ended.is_empty() {
            listed = None;
        }
        let failed = what.failed();
        for name in ended {
            if !failed.contains(&name) {
                workers.remove(&name);
            }
        }

        // Renew.
        let renewals = workers.iter().map(|(name, worker)| {
            let leases = leases.clone();
            let me = me.clone();
            let name = name.clone();
            let epoch = worker.epoch;
            async move { (name.clone(), leases.renew(&name, &me, epoch).await) }
        });
        for (name, renewed) in futures::future::join_all(renewals).await {
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(lease = %name, "lease lost to another host; stopping its worker");
                    if let Some(worker) = workers.remove(&name) {
                        worker.lost.store(true, Ordering::Relaxed);
                    }
                    what.lost(&name);
                }
                Err(error) => tracing::warn!(lease = %name, %error, "cannot renew lease"),
            }
        }

        if listed.is_none_or(|at| at.elapsed() >= what.list_every()) {
            match what.list().await {
                Ok(names) => {
                    listed = Some(Instant::now());
                    for (name, parents) in names {
                        if !seen.contains_key(&name)
                            && let Err(error) = leases.create(&name, &parents).await
                        {
                            tracing::warn!(lease = %name, %error, "cannot create lease");
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot list what to lease"),
            }
        }

        match leases.list().await {
            Ok(all) => {
                what.read(&all);
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
                        tracing::warn!(lease = %lease.shard, "lease taken by another host; stopping its worker");
                        worker.lost.store(true, Ordering::Relaxed);
                        workers.remove(&lease.shard);
                        what.lost(&lease.shard);
                    }
                }
                let expired = |lease: &Lease| {
                    lease.owner.as_deref() != Some(&me)
                        && seen
                            .get(&lease.shard)
                            .is_some_and(|s| s.since.elapsed() >= lease_duration)
                };
                if !*stop.borrow() {
                    for lease in leases::plan(&all, &expired, &me).take {
                        match leases.take(&lease, &me).await {
                            Ok(Some(epoch)) => {
                                tracing::info!(lease = %lease.shard, epoch, previous = ?lease.owner, "took lease");
                                let lost = Arc::new(AtomicBool::new(false));
                                let task =
                                    what.start(lease.clone(), epoch, stop.clone(), lost.clone());
                                workers.insert(lease.shard.clone(), Worker { epoch, lost, task });
                            }
                            Ok(None) => {
                                tracing::debug!(lease = %lease.shard, "lease changed before it could be taken")
                            }
                            Err(error) => {
                                tracing::warn!(lease = %lease.shard, %error, "cannot take lease")
                            }
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the lease table"),
        }
        what.held(workers.keys().cloned().collect());

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
        for (name, worker) in &workers {
            let _ = leases.renew(name, &me, worker.epoch).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    what.held(Vec::new());
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
