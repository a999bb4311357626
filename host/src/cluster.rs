//! The distributed engine: `tocsin serve --source kinesis:<stream> --state
//! dynamodb:<table>`. Any number of hosts share the events stream through
//! leases ([`leases`]); each host reads the shards it holds
//! ([`kinesis`](crate::source::kinesis)), runs the rules exactly as the
//! embedded service does ([`pipeline`]), commits each shard batch to
//! DynamoDB fenced by its lease ([`DynamoStore`]), and only then publishes
//! the batch's alerts and moves on.
//!
//! Each shard's batches are processed in order, shards concurrently, and
//! tenants in parallel within a batch. Two batches race for a bucket only
//! when a producer spreads one tenant over several shards; the versioned
//! writes settle that, on one host as across hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alert::AlertRecord;
use crate::aws::Table;
use crate::batch;
use crate::catalogue::Catalogue;
use crate::clock::Clock;
use crate::config::{Config, Source, StateBackend};
use crate::event::{Incoming, SeqNo};
use crate::pipeline;
use crate::runtime::StateChange;
use crate::serve;
use crate::sink::AlertSink;
use crate::source::kinesis::{self, ShardReader};
use crate::source::leases::{self, Lease, Leases};
use crate::store::BucketId;
use crate::store::dynamo::{
    BucketWrite, Checkpoint, CommitError, DynamoStore, Fence, MAX_STATE_BYTES, OutboxKey,
    ShardCommit,
};

/// How often leases are renewed and the lease table is read.
const TICK: Duration = Duration::from_millis(500);
/// How often the stream's shards are listed (also after a shard ends).
const LIST_SHARDS_EVERY: Duration = Duration::from_secs(10);
/// Version conflicts one batch may meet before it is retried from the
/// stream.
const MAX_CONFLICTS: u32 = 8;

/// Settings of one host of the distributed engine.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub stream: String,
    /// This host's name in the lease table: unique per process.
    pub host: String,
    /// A lease whose heartbeat has not moved for this long is taken over.
    pub lease_duration: Duration,
    pub tenant_field: String,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub events: AtomicU64,
    pub alerts: AtomicU64,
    pub batches: AtomicU64,
    pub conflicts: AtomicU64,
    pub rule_failures: AtomicU64,
    /// Records that were not events (bad JSON, no tenant): logged, skipped.
    pub bad_records: AtomicU64,
    /// Events of tenants without rules: skipped.
    pub unknown_tenant: AtomicU64,
    /// Time spent reading bucket state (cache misses), nanoseconds.
    pub load_ns: AtomicU64,
    /// Time spent running rules, nanoseconds.
    pub rules_ns: AtomicU64,
    /// Time spent in DynamoDB commits, nanoseconds.
    pub commit_ns: AtomicU64,
    /// Time spent publishing alerts, nanoseconds.
    pub publish_ns: AtomicU64,
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Runs batches of shards this host holds.
pub struct Engine {
    catalogue: Arc<dyn Catalogue>,
    store: Arc<DynamoStore>,
    sink: Arc<dyn AlertSink>,
    clock: Arc<dyn Clock>,
    settings: ClusterSettings,
    /// Per shard: outbox items published and not yet deleted, and alerts
    /// committed but not yet published.
    outbox: std::sync::Mutex<HashMap<String, ShardOutbox>>,
    pub stats: ClusterStats,
}

#[derive(Debug, Default)]
struct ShardOutbox {
    published: Vec<OutboxKey>,
    unpublished: Vec<(Vec<AlertRecord>, Vec<OutboxKey>)>,
}

impl Engine {
    pub fn new(
        catalogue: Arc<dyn Catalogue>,
        store: Arc<DynamoStore>,
        sink: Arc<dyn AlertSink>,
        clock: Arc<dyn Clock>,
        settings: ClusterSettings,
    ) -> Self {
        Engine {
            catalogue,
            store,
            sink,
            clock,
            settings,
            outbox: std::sync::Mutex::default(),
            stats: ClusterStats::default(),
        }
    }

    pub fn store(&self) -> &DynamoStore {
        &self.store
    }

    /// A new lease owner first publishes what the shard's previous owner
    /// committed but may not have published (same ids: consumers dedupe).
    pub async fn take_over(&self, fence: &Fence) -> Result<(), String> {
        let (alerts, keys) = self.store.outbox(&fence.stream, &fence.shard).await?;
        let mut outbox = ShardOutbox::default();
        if !keys.is_empty() {
            tracing::info!(shard = %fence.shard, alerts = alerts.len(), "republishing the shard's outbox");
            outbox.unpublished.push((alerts, keys));
        }
        self.outbox
            .lock()
            .expect("outbox lock")
            .insert(fence.shard.clone(), outbox);
        self.flush(&fence.shard).await;
        Ok(())
    }

    /// Publish what is waiting for `shard`; `false` if some still waits.
    async fn flush(&self, shard: &str) -> bool {
        loop {
            let next = {
                let mut outbox = self.outbox.lock().expect("outbox lock");
                let entry = outbox.entry(shard.to_owned()).or_default();
                if entry.unpublished.is_empty() {
                    return true;
                }
                entry.unpublished.remove(0)
            };
            let sink = self.sink.clone();
            let (alerts, keys) = next;
            let started = Instant::now();
            let sent = {
                let alerts = alerts.clone();
                tokio::task::spawn_blocking(move || sink.publish(&alerts)).await
            };
            add_elapsed(&self.stats.publish_ns, started);
            let mut outbox = self.outbox.lock().expect("outbox lock");
            let entry = outbox.entry(shard.to_owned()).or_default();
            match sent {
                Ok(Ok(())) => entry.published.extend(keys),
                Ok(Err(error)) => {
                    tracing::error!(shard, %error, "cannot publish alerts; they stay in the outbox");
                    entry.unpublished.insert(0, (alerts, keys));
                    return false;
                }
                Err(error) => {
                    tracing::error!(shard, %error, "publishing alerts panicked");
                    entry.unpublished.insert(0, (alerts, keys));
                    return false;
                }
            }
        }
    }

    /// Process one poll of `fence`'s shard and commit it; returns the new
    /// checkpoint.
    pub async fn process(
        self: &Arc<Self>,
        fence: &Fence,
        records: &[aws_sdk_kinesis::types::Record],
        end: bool,
    ) -> Result<Option<Checkpoint>, CommitError> {
        let now = self.clock.now_ms();
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            let (good, bad) =
                kinesis::events(&fence.shard, record, &self.settings.tenant_field, now);
            for error in bad {
                self.stats.bad_records.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{error}; skipped");
            }
            for event in good {
                if self.catalogue.rules(&event.tenant).is_some() {
                    events.push(event);
                } else {
                    self.stats.unknown_tenant.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(tenant = %event.tenant, position = %event.position, "no rules for tenant; skipped");
                }
            }
        }
        let last = records.last().and_then(|r| SeqNo::new(r.sequence_number()));
        let checkpoint = match (end, &last) {
            (true, _) => Checkpoint::End,
            (false, Some(last)) => Checkpoint::At(last.clone()),
            (false, None) => return Ok(None),
        };
        // Publishing lags behind: keep the outbox from growing unbounded.
        if !self.flush(&fence.shard).await {
            return Err(CommitError::Store(
                "alerts of an earlier batch are not yet published".into(),
            ));
        }
        let events = Arc::new(events);
        let mut conflicts = 0;
        let committed = loop {
            let started = Instant::now();
            let touched = self.touched(&events);
            self.store.load(touched).await.map_err(CommitError::Store)?;
            add_elapsed(&self.stats.load_ns, started);
            let started = Instant::now();
            let engine = self.clone();
            let shard = fence.shard.clone();
            let batch = events.clone();
            let (writes, failures) =
                tokio::task::spawn_blocking(move || engine.run(&shard, &batch, now))
                    .await
                    .map_err(|e| CommitError::Store(format!("rules panicked: {e}")))?;
            add_elapsed(&self.stats.rules_ns, started);
            let published = std::mem::take(
                &mut self
                    .outbox
                    .lock()
                    .expect("outbox lock")
                    .entry(fence.shard.clone())
                    .or_default()
                    .published,
            );
            let commit = ShardCommit {
                writes,
                last: last
                    .clone()
                    .unwrap_or_else(|| SeqNo::new("0").expect("zero")),
                checkpoint: checkpoint.clone(),
                published: published.clone(),
                now_ms: now,
            };
            let started = Instant::now();
            let result = self.store.commit(fence, commit).await;
            add_elapsed(&self.stats.commit_ns, started);
            match result {
                Ok(committed) => {
                    self.stats
                        .rule_failures
                        .fetch_add(failures, Ordering::Relaxed);
                    break committed;
                }
                Err(CommitError::Conflict(ids)) if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(shard = %fence.shard, buckets = ids.len(), "buckets changed by another host; running the batch again");
                    self.store.forget(&ids);
                    self.restore_published(&fence.shard, published);
                }
                Err(e) => {
                    self.restore_published(&fence.shard, published);
                    return Err(e);
                }
            }
        };
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.stats
            .alerts
            .fetch_add(committed.alerts.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if !committed.outbox.is_empty() {
            self.outbox
                .lock()
                .expect("outbox lock")
                .entry(fence.shard.clone())
                .or_default()
                .unpublished
                .push((committed.alerts, committed.outbox));
            // Committed: a failure here only delays publishing.
            self.flush(&fence.shard).await;
        }
        Ok(Some(checkpoint))
    }

    fn restore_published(&self, shard: &str, keys: Vec<OutboxKey>) {
        self.outbox
            .lock()
            .expect("outbox lock")
            .entry(shard.to_owned())
            .or_default()
            .published
            .extend(keys);
    }

    /// Every bucket the batch's events touch, without running any rule.
    fn touched(&self, events: &[Incoming]) -> Vec<BucketId> {
        let mut ids = Vec::new();
        for (tenant, events) in pipeline::by_tenant(events) {
            let Some(rules) = self.catalogue.rules(tenant) else {
                continue;
            };
            for rule in rules.iter() {
                let manifest = rule.manifest();
                let mut seen = std::collections::HashSet::new();
                for event in &events {
                    if batch::matches(&manifest.filter, event) {
                        let bucket = batch::bucket_key(&manifest.bucket_key, event);
                        if seen.insert(bucket.clone()) {
                            ids.push(BucketId {
                                tenant: tenant.to_owned(),
                                rule: manifest.name.clone(),
                                bucket,
                            });
                        }
                    }
                }
            }
        }
        ids
    }

    /// Run every tenant's rules (tenants in parallel) from the cached state.
    fn run(&self, shard: &str, events: &[Incoming], now: i64) -> (Vec<BucketWrite>, u64) {
        let tenants = pipeline::by_tenant(events);
        let runs: Vec<pipeline::TenantRun> = tenants
            .par_iter()
            .map(|(tenant, events)| {
                pipeline::run_tenant(self.catalogue.as_ref(), tenant, events, now, |id| {
                    Ok::<_, std::convert::Infallible>(self.store.prior(id, shard))
                })
                .unwrap_or_else(|never| match never {})
            })
            .collect();
        let mut writes = Vec::new();
        let mut failures = 0;
        for run in runs {
            failures += run.failures;
            for (id, outcome) in run.buckets {
                if let StateChange::Set(bytes) = &outcome.state
                    && bytes.len() > MAX_STATE_BYTES
                {
                    failures += 1;
                    tracing::error!(
                        tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket,
                        "rule error: the state of bucket `{}` is {} bytes, over DynamoDB's 400 KB item limit; the bucket keeps its previous state",
                        id.bucket, bytes.len()
                    );
                    continue;
                }
                writes.push(BucketWrite {
                    id,
                    state: outcome.state,
                    timer: outcome.timer,
                    alerts: outcome.alerts,
                    ttl_ms: outcome.state_ttl_ms,
                });
            }
        }
        (writes, failures)
    }
}

/// A running host of the distributed engine.
pub struct ClusterHost {
    addr: SocketAddr,
    engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// What `GET /v1/status` reports.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Status {
    pub host: String,
    pub stream: String,
    /// Shards whose lease this host holds.
    pub shards: Vec<String>,
    pub events: u64,
    pub alerts: u64,
    pub batches: u64,
    pub conflicts: u64,
    pub rule_failures: u64,
    pub bad_records: u64,
    /// DynamoDB requests serving events (reads, commits, outbox reads).
    pub dynamodb_data_requests: u64,
    /// DynamoDB requests of the lease protocol.
    pub dynamodb_lease_requests: u64,
}

struct Shared {
    engine: Arc<Engine>,
    held: std::sync::Mutex<Vec<String>>,
    ready: AtomicBool,
}

impl ClusterHost {
    /// Start coordinating leases and serving `/healthz`, `/readyz` and
    /// `/v1/status` on `listen`.
    pub async fn start(
        engine: Arc<Engine>,
        kinesis: aws_sdk_kinesis::Client,
        listen: SocketAddr,
    ) -> anyhow::Result<ClusterHost> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            held: std::sync::Mutex::default(),
            ready: AtomicBool::new(false),
        });
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(|State(shared): State<Arc<Shared>>| async move {
                    if shared.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "joining the lease table")
                    }
                }),
            )
            .route("/v1/status", get(status))
            .route(
                "/v1/events",
                axum::routing::post(|State(shared): State<Arc<Shared>>| async move {
                    (
                        StatusCode::CONFLICT,
                        Json(serde_json::json!({
                            "error": format!(
                                "this host reads its events from the Kinesis stream `{}`: put them there",
                                shared.engine.settings.stream
                            )
                        })),
                    )
                }),
            )
            .with_state(shared.clone());
        let coordinator = tokio::spawn(coordinate(shared, kinesis, stopped.clone()));
        let mut until_stopped = stopped;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = until_stopped.wait_for(|stop| *stop).await;
                })
                .await?;
            coordinator.await?;
            Ok(())
        });
        tracing::info!(%addr, host = %engine.settings.host, stream = %engine.settings.stream, "serving the Kinesis stream");
        Ok(ClusterHost {
            addr,
            engine,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Finish in-flight batches, release every lease, and return.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }

    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("stopping: finishing in-flight batches and releasing leases");
        self.stop().await
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    let engine = &shared.engine;
    let stats = &engine.stats;
    let usage = engine.store.usage();
    let mut shards = shared.held.lock().expect("held lock").clone();
    shards.sort();
    Json(Status {
        host: engine.settings.host.clone(),
        stream: engine.settings.stream.clone(),
        shards,
        events: stats.events.load(Ordering::Relaxed),
        alerts: stats.alerts.load(Ordering::Relaxed),
        batches: stats.batches.load(Ordering::Relaxed),
        conflicts: stats.conflicts.load(Ordering::Relaxed),
        rule_failures: stats.rule_failures.load(Ordering::Relaxed),
        bad_records: stats.bad_records.load(Ordering::Relaxed),
        dynamodb_data_requests: usage.data_requests(),
        dynamodb_lease_requests: usage.lease_requests.load(Ordering::Relaxed),
    })
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

/// The lease loop: renew what this host holds, notice lost leases, list
/// shards, take free, expired or (to balance) stolen leases, and start a
/// worker for each. On stop, workers finish their batch and release.
async fn coordinate(
    shared: Arc<Shared>,
    kinesis: aws_sdk_kinesis::Client,
    mut stop: watch::Receiver<bool>,
) {
    let engine = shared.engine.clone();
    let settings = engine.settings.clone();
    let leases = Leases::new(engine.store.table().clone(), &settings.stream);
    let me = settings.host.clone();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut listed: Option<Instant> = None;
    loop {
        // Workers that ended: a finished shard (list shards again for its
        // children) or a lost lease.
        let ended: Vec<String> = workers
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(shard, _)| shard.clone())
            .collect();
        if !ended.is_empty() {
            listed = None;
        }
        for shard in ended {
            workers.remove(&shard);
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
                shared.ready.store(true, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "cannot read the lease table"),
        }
        *shared.held.lock().expect("held lock") = workers.keys().cloned().collect();

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
    shared.held.lock().expect("held lock").clear();
}

/// Read one shard from its checkpoint, batch after batch, until the shard
/// ends, the lease is lost, or the host stops (then release the lease).
async fn work(
    engine: Arc<Engine>,
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
        owner: engine.settings.host.clone(),
        epoch,
    };
    let mut checkpoint = lease.checkpoint.clone();
    let mut attempt = 0;
    let stopping = || *stop.borrow() || lost.load(Ordering::Relaxed);
    while let Err(error) = engine.take_over(&fence).await {
        tracing::warn!(shard = %fence.shard, %error, "cannot read the shard's outbox");
        attempt += 1;
        crate::backoff::sleep(attempt).await;
        if stopping() {
            break;
        }
    }
    'reopen: while !stopping() {
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
            let poll = match reader.next().await {
                Ok(poll) => poll,
                Err(error) => {
                    tracing::warn!(shard = %fence.shard, %error, "cannot read shard");
                    attempt += 1;
                    crate::backoff::sleep(attempt).await;
                    continue 'reopen;
                }
            };
            if poll.records.is_empty() && !poll.end {
                continue;
            }
            match engine.process(&fence, &poll.records, poll.end).await {
                Ok(Some(Checkpoint::End)) => {
                    tracing::info!(shard = %fence.shard, "shard finished");
                    return;
                }
                Ok(Some(Checkpoint::At(seq))) => {
                    checkpoint = Some(seq.as_str().to_owned());
                    attempt = 0;
                }
                Ok(None) => {}
                Err(CommitError::Fenced(_)) => {
                    tracing::warn!(shard = %fence.shard, "lease lost: batch discarded");
                    lost.store(true, Ordering::Relaxed);
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
    if !lost.load(Ordering::Relaxed) {
        match leases.release(&fence.shard, &fence.owner, epoch).await {
            Ok(_) => tracing::info!(shard = %fence.shard, "lease released"),
            Err(error) => tracing::warn!(shard = %fence.shard, %error, "cannot release lease"),
        }
    }
}

/// Start a host of the distributed engine as `config` says (its source must
/// be Kinesis and its state DynamoDB).
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<ClusterHost> {
    config.validate().map_err(anyhow::Error::msg)?;
    let (Source::Kinesis(stream), StateBackend::Dynamodb(table)) = (&config.source, &config.state)
    else {
        anyhow::bail!(
            "the distributed engine needs source `kinesis:<stream>` and state `dynamodb:<table>`"
        );
    };
    let aws = crate::aws::sdk_config().await;
    let mut streams = vec![stream.as_str()];
    if let crate::config::AlertsBackend::Kinesis(alerts) = &config.alerts {
        streams.push(alerts);
    }
    crate::aws::check_exists(&aws, &streams, table).await?;
    let catalogue = serve::load_catalogue(&config).await?;
    let store = Arc::new(DynamoStore::new(Table::new(
        aws_sdk_dynamodb::Client::new(&aws),
        table,
    )));
    let sink = serve::open_sink(&config).await?;
    let host = format!(
        "{}:{}:{:08x}",
        hostname(),
        std::process::id(),
        rand::random::<u32>()
    );
    let settings = ClusterSettings {
        stream: stream.clone(),
        host,
        lease_duration: Duration::from_millis(config.lease_ms),
        tenant_field: config.tenant_field.clone(),
    };
    let engine = Arc::new(Engine::new(catalogue, store, sink, clock, settings));
    ClusterHost::start(engine, aws_sdk_kinesis::Client::new(&aws), config.listen).await
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}
