//! The one core every deployment runs. A source hands the engine a
//! [`Batch`] of events with its position; the engine routes it once (tenant,
//! filter, bucket key, event time), runs each tenant's rules over it
//! (tenants in parallel), writes one atomic commit (states, timers, the
//! alerts as an outbox, the source's progress), and only then returns, so
//! the source acknowledges or checkpoints after the commit; then it
//! publishes the alerts to the sink and retires them from the outbox.
//!
//! Batches of one source partition (the HTTP ingest, a Kinesis shard, a
//! file) go through one [`Lane`], in order. A lane may run the rules of its
//! next batch while the previous one commits ([`Engine::compute`] then
//! [`Engine::commit`]): the next batch reads the states the previous one
//! left from the lane's overlay. If a commit fails, the overlay is dropped
//! and every batch computed on top of it fails too: nothing is acknowledged
//! before its own commit, so their sources retry.
//!
//! Nothing here names a backend: the catalogue, the state store and the
//! alert sink are traits.

pub mod apart;
pub mod contain;
pub mod route;
pub mod run;
mod scratch;

pub use scratch::{Ran, Scratch, ScratchError};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::{OwnedMutexGuard, broadcast, oneshot, watch};

use crate::alert::AlertRecord;
use crate::catalogue::Catalogue;
use crate::clock::{Clock, ManualClock};
use crate::event::Incoming;
use crate::metrics::{Metrics, RuleTally};
use crate::registry::silences::Silences;
use crate::runtime::{LoadedRule, StateChange, TimerChange};
use crate::sink::dead_letters::{DeadLetter, DeadLetterSink, dead_letter_id};
use crate::sink::{AlertSink, SinkError};
use crate::store::{
    BucketId, BucketWrite, Checkpoint, Commit, Outbox, Prior, Progress, State, StateStore,
    StoreError,
};
use contain::{LogEntry, Quarantine, Quarantines, RuleLogs};

/// Alerts kept for live subscribers that fall behind; past this they catch
/// up from the alert log.
const LIVE_ALERTS: usize = 16 * 1024;
/// Version conflicts (another writer changed a bucket) one batch may meet
/// before [`Engine::process`] gives up and the source retries it later.
const MAX_CONFLICTS: u32 = 8;
/// Threads beyond the cores that run rules: stragglers still running on
/// them leave the cores to the batches that follow.
const APART_THREADS: usize = 2;
/// Timers one batch of timers fires.
pub const MAX_TIMERS_PER_BATCH: usize = 1024;
/// A timer `on-timer` sets at or before the time it fired is due this much
/// later: a rule cannot keep the host firing it.
pub const MIN_TIMER_STEP_MS: i64 = 1_000;

/// One batch from a source: its events in order, each with its position.
#[derive(Debug, Clone)]
pub struct Batch {
    pub events: Arc<[Incoming]>,
    /// What the commit records of the source's position.
    pub progress: Progress,
    /// Records of the batch that are not events (a stream's bad records):
    /// dead-lettered with it.
    pub bad: Vec<DeadLetter>,
    /// The source answers nobody (a stream): events at fault themselves
    /// (unknown tenant, unreadable event time) are dead-lettered, not only
    /// rejected. Events a rule failed on are dead-lettered from any source.
    pub unanswered: bool,
    /// Tenants whose events share a request with another tenant's: they
    /// are never run apart ([`apart`]), so a request commits whole.
    pub together: Vec<String>,
    /// What a part run apart records of the requests it answers.
    pub receipts: Option<apart::PartReceipts>,
    /// Timers due, each bucket's with its due time: a batch of timers has
    /// no events ([`Engine::fire_timers`]).
    pub timers: Vec<(BucketId, i64)>,
    /// Buckets untouched past their rule's state time-to-live, to remove
    /// (with a batch of timers).
    pub expired: Vec<BucketId>,
}

impl Batch {
    /// A batch of a source that answers its producers (HTTP, a file).
    pub fn new(events: impl Into<Arc<[Incoming]>>, progress: Progress) -> Self {
        Batch {
            events: events.into(),
            progress,
            bad: Vec::new(),
            unanswered: false,
            together: Vec::new(),
            receipts: None,
            timers: Vec::new(),
            expired: Vec::new(),
        }
    }

    /// The same batch from a source that answers nobody (a stream), with
    /// its records that were not events, to dead-letter with it.
    pub fn unanswered(mut self, bad: Vec<DeadLetter>) -> Self {
        self.unanswered = true;
        self.bad = bad;
        self
    }

    /// The events at `indices`, as a batch of their own with this one's
    /// progress.
    fn part(&self, indices: &[usize]) -> Batch {
        Batch {
            events: indices.iter().map(|&i| self.events[i].clone()).collect(),
            progress: self.progress.clone(),
            bad: Vec::new(),
            unanswered: self.unanswered,
            together: Vec::new(),
            receipts: None,
            timers: Vec::new(),
            expired: Vec::new(),
        }
    }
}

/// What a compute is: a batch's first try, its run again after a conflict
/// (its ticket, and the tenants already run apart), or a tenant's part.
#[derive(Debug, Default, Clone)]
struct Attempt {
    ticket: Option<u64>,
    handed: Vec<String>,
    part: bool,
}

/// One rule of a tenant, routed, with its buckets' ids and priors.
struct Routed {
    rule: Arc<LoadedRule>,
    buckets: Vec<route::Bucket>,
    ids: Vec<BucketId>,
    unroutable: Vec<route::Unroutable>,
    priors: Vec<Prior>,
}

/// A tenant's rules to run over its events (their indices in the batch).
struct TenantWork {
    tenant: String,
    indices: Vec<usize>,
    rules: Vec<Routed>,
}

/// What a tenant's rules gave over a batch.
pub(crate) struct TenantOutcome {
    writes: Vec<BucketWrite>,
    rejected: Vec<Rejection>,
    failures: u64,
    tallies: Vec<RuleTally>,
}

/// What [`Engine::finish`] gathers.
struct Finish {
    outcomes: Vec<TenantOutcome>,
    rejected: Vec<Rejection>,
    progress: Progress,
    bad: Vec<DeadLetter>,
    unanswered: bool,
    /// Events of the batch (or part) committed with it.
    count: usize,
    now: i64,
    batch_no: u64,
    generation: u64,
    unknown_tenant: u64,
    started: Instant,
}

/// An event (by its index in the batch) that was not applied, and why. With
/// `rule` set, only that rule did not apply it; the tenant's other rules did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub rule: Option<String>,
    /// A fixed name for the kind (`out_of_fuel`, `quarantined`,
    /// `unknown_tenant`, `event_time`, …).
    pub cause: &'static str,
    pub reason: String,
}

impl Rejection {
    /// The event is at fault, not a rule: no rule of its tenant could take
    /// it.
    pub fn is_bad_event(&self) -> bool {
        matches!(self.cause, "unknown_tenant" | "event_time" | "bucket_key")
    }
}

/// Why a batch was not committed; nothing of it was applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Alerts of an earlier batch could not be published: the lane waits
    /// for them before taking more (they are committed and stay in the
    /// outbox).
    #[error("alerts of an earlier batch are not yet published: {0}")]
    Publish(#[from] SinkError),
    /// An earlier batch of the lane could not be committed, and this one
    /// was computed on its states.
    #[error("an earlier batch could not be committed; nothing of this one was applied, retry it")]
    Stale,
    /// Running the rules panicked (a host bug, not a rule's failure).
    #[error("processing the batch failed: {0}")]
    Panicked(String),
    /// The batch's dead letters could not be kept, so it was not committed.
    #[error("cannot keep the batch's dead letters: {0}")]
    DeadLetters(SinkError),
}

impl EngineError {
    /// Whether the same batch may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.retryable(),
            EngineError::Publish(e) | EngineError::DeadLetters(e) => e.retryable(),
            EngineError::Stale | EngineError::Panicked(_) => true,
        }
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events committed (in batches that committed).
    pub events: AtomicU64,
    /// Events of tenants without rules.
    pub unknown_tenant: AtomicU64,
    pub alerts: AtomicU64,
    /// Events applied, counted once per rule that applied them.
    pub applied: AtomicU64,
    /// Fuel the rules burnt in committed batches.
    pub fuel: AtomicU64,
    /// Bucket calls that failed (the bucket kept its state).
    pub rule_failures: AtomicU64,
    pub commits: AtomicU64,
    /// Commits that met a bucket changed by another writer and ran again.
    pub conflicts: AtomicU64,
    /// Time spent reading bucket state, nanoseconds.
    pub load_ns: AtomicU64,
    /// Time spent routing and running rules (Wasm), nanoseconds; state
    /// reads are `load_ns`.
    pub rules_ns: AtomicU64,
    /// Time spent in durable commits, nanoseconds.
    pub commit_ns: AtomicU64,
    /// Time spent publishing to the alert sink, nanoseconds.
    pub publish_ns: AtomicU64,
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// One source partition's batches, in order.
pub struct Lane {
    partition: String,
    overlay: Mutex<Overlay>,
    /// Tenants run apart, and batches waiting for their parts.
    parts: Mutex<apart::Parts>,
    /// Chains of tenants run apart in the lane.
    chains: watch::Sender<usize>,
    /// Commits of the lane go one at a time, in order.
    committing: tokio::sync::Mutex<()>,
    /// Held by a committed batch until it is published: the lane publishes
    /// in commit order (the embedded outbox retires by a cursor).
    publishing: Arc<tokio::sync::Mutex<()>>,
    /// A publish failed: the outbox holds alerts older than the next batch's.
    behind: Arc<AtomicBool>,
    /// The highest `seq` the last flush published. A batch committed while
    /// the flush read the outbox was published by it: its own publish skips
    /// those alerts rather than send them twice.
    flushed: AtomicU64,
}

/// States computed by batches of the lane not yet committed.
#[derive(Default)]
struct Overlay {
    /// Per bucket: the batch that wrote it last, and what it wrote.
    states: crate::store::BucketMap<(u64, Option<State>)>,
    /// Raised when a commit fails and the overlay is dropped: batches
    /// computed on an older generation rest on states never made durable.
    generation: u64,
    next_batch: u64,
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
    pub fn reset(&self) {
        let mut overlay = self.overlay.lock().expect("overlay lock");
        overlay.generation += 1;
        overlay.states.clear();
        self.behind.store(true, Ordering::Relaxed);
    }

    /// The source reads again from the last checkpoint the lane committed
    /// (returned; `None` if it committed none): batches it had waiting for
    /// parts run apart are forgotten.
    pub fn reopened(&self) -> Option<Checkpoint> {
        self.parts.lock().expect("parts lock").reopened()
    }

    /// A part run apart failed: the source must read again from the last
    /// checkpoint committed ([`reopened`](Self::reopened)).
    pub fn part_failed(&self) -> bool {
        self.parts.lock().expect("parts lock").failed()
    }

    /// A number for the next batch computed, and the overlay's generation.
    fn next_batch(&self) -> (u64, u64) {
        let mut overlay = self.overlay.lock().expect("overlay lock");
        overlay.next_batch += 1;
        (overlay.next_batch, overlay.generation)
    }
}

/// A batch whose rules ran, waiting for its commit.
#[derive(Debug)]
pub struct Computed {
    commit: Commit,
    rejected: Vec<Rejection>,
    events: usize,
    failures: u64,
    batch: u64,
    generation: u64,
    /// Per rule, recorded in the metrics once the batch commits.
    tallies: Vec<RuleTally>,
    /// Kept before the commit.
    dead_letters: Vec<DeadLetter>,
    unknown_tenant: u64,
    started: Instant,
    /// The shard batch it belongs to, with its parts run apart.
    ticket: Option<u64>,
    /// Tenants of the batch run apart (left out of a run again).
    handed: Vec<String>,
    apart: Vec<apart::Apart>,
    /// Dropped once the batch is through its commit: its parts may commit.
    rest: Option<watch::Sender<()>>,
}

impl Computed {
    /// The parts of the batch run apart: each tenant's events left out of
    /// this batch, answered when its part commits.
    pub fn take_apart(&mut self) -> Vec<apart::Apart> {
        std::mem::take(&mut self.apart)
    }

    /// The events not applied, and why.
    pub fn rejected(&self) -> &[Rejection] {
        &self.rejected
    }

    /// Replace what the commit records of the source's position (the HTTP
    /// source stores its answers, which depend on the rejections).
    pub fn set_progress(&mut self, progress: Progress) {
        self.commit.progress = progress;
    }
}

/// What a committed batch gave.
#[derive(Debug, Default)]
pub struct Committed {
    pub rejected: Vec<Rejection>,
    pub alerts: usize,
    /// Its alerts, to publish once the source has acknowledged.
    outbox: Option<Outbox>,
    /// The lane's turn to publish, held until it has.
    turn: Option<Turn>,
}

#[derive(Debug)]
struct Turn {
    _held: OwnedMutexGuard<()>,
    behind: Arc<AtomicBool>,
}

impl Drop for Committed {
    fn drop(&mut self) {
        // Not published: the lane's next publish catches up on the outbox.
        if self.outbox.is_some()
            && let Some(turn) = &self.turn
        {
            turn.behind.store(true, Ordering::Relaxed);
        }
    }
}

/// What is failing now, for `/readyz`: the last commit or publish failed
/// and none has succeeded since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub commit_error: Option<String>,
    pub publish_error: Option<String>,
}

pub struct Engine {
    catalogue: Arc<dyn Catalogue>,
    store: Arc<dyn StateStore>,
    sink: Arc<dyn AlertSink>,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    clock: Arc<dyn Clock>,
    live: broadcast::Sender<Arc<AlertRecord>>,
    stats: Stats,
    metrics: Metrics,
    quarantines: Quarantines,
    logs: RuleLogs,
    health: Mutex<Health>,
    /// Runs the tenants' rules: a few threads more than cores, so that
    /// tenants run apart do not take every thread from the batches.
    pool: rayon::ThreadPool,
    /// How long a tenant may hold its batch ([`apart`]); `None`: never run
    /// apart (replays and tests, whose alerts keep the batch's order).
    fair_share: Option<Duration>,
    /// Counts commits that set a timer: whatever fires timers looks again.
    timers_set: watch::Sender<u64>,
    /// The tenants' silences, which mark the alerts they match as they
    /// commit.
    silences: Option<Arc<Silences>>,
}

impl Engine {
    pub fn new(
        catalogue: Arc<dyn Catalogue>,
        store: Arc<dyn StateStore>,
        sink: Arc<dyn AlertSink>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Engine {
            catalogue,
            store,
            sink,
            dead_letters: None,
            clock,
            live: broadcast::channel(LIVE_ALERTS).0,
            stats: Stats::default(),
            metrics: Metrics::new(),
            quarantines: Quarantines::default(),
            logs: RuleLogs::default(),
            health: Mutex::default(),
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(
                    std::thread::available_parallelism().map_or(2, |n| n.get()) + APART_THREADS,
                )
                .thread_name(|n| format!("tocsin-rules-{n}"))
                .build()
                .expect("a thread pool for the rules"),
            fair_share: Some(apart::DEFAULT_FAIR_SHARE),
            timers_set: watch::Sender::new(0),
            silences: None,
        }
    }

    /// Mark the alerts `silences` match as they commit (`silenced_by`).
    pub fn with_silences(mut self, silences: Arc<Silences>) -> Self {
        self.silences = Some(silences);
        self
    }

    /// Told after each commit that set a timer.
    pub fn timers_set(&self) -> watch::Receiver<u64> {
        self.timers_set.subscribe()
    }

    /// Run a tenant apart once it holds its batch `share` past the others
    /// ([`apart`]); `None` keeps batches whole.
    pub fn with_fair_share(mut self, share: Option<Duration>) -> Self {
        self.fair_share = share;
        self
    }

    /// Keep dead letters in `sink`. Without one, the events not applied
    /// are only reported to the caller (the rejections of each batch), as
    /// `tocsin rule test` and `tocsin replay` do.
    pub fn with_dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.dead_letters = Some(sink);
        self
    }

    pub fn dead_letters(&self) -> Option<&dyn DeadLetterSink> {
        self.dead_letters.as_deref()
    }

    /// The rule's quarantine on this host, current or awaiting probation.
    pub fn quarantine(&self, tenant: &str, rule: &str) -> Option<Quarantine> {
        self.quarantines.get(tenant, rule)
    }

    /// Lift the rule's quarantine on this host; whether it had one.
    pub fn resume(&self, tenant: &str, rule: &str) -> bool {
        let had = self.quarantines.resume(tenant, rule);
        if had {
            tracing::info!(tenant, rule, "quarantine lifted");
            self.logs.append(
                tenant,
                rule,
                vec![LogEntry::new(
                    self.clock.now_ms(),
                    "info",
                    "host",
                    "",
                    "quarantine lifted by an operator",
                )],
            );
        }
        had
    }

    /// The rule's recent log lines on this host, oldest first.
    pub fn rule_logs(&self, tenant: &str, rule: &str) -> Vec<LogEntry> {
        self.logs.lines(tenant, rule)
    }

    /// Wait until every part the lane ran apart is through its commit.
    pub async fn settle(&self, lane: &Lane) {
        let _ = lane
            .chains
            .subscribe()
            .wait_for(|chains| *chains == 0)
            .await;
    }

    /// What `GET /metrics` reports, with the gauges read now.
    pub fn encode_metrics(
        &self,
        live_instances: usize,
        registered_rules: usize,
        leases: Option<usize>,
    ) -> String {
        let quarantined = self.quarantines.quarantined(self.clock.now_ms());
        self.metrics
            .encode(live_instances, registered_rules, leases, &quarantined)
    }

    /// Keep `alerts` for live subscribers that fall behind (default 16k):
    /// past that they catch up from the alert log.
    pub fn with_live_capacity(mut self, alerts: usize) -> Self {
        self.live = broadcast::channel(alerts.max(1)).0;
        self
    }

    pub fn catalogue(&self) -> &dyn Catalogue {
        self.catalogue.as_ref()
    }

    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What `GET /metrics` reports.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn health(&self) -> Health {
        self.health.lock().expect("health lock").clone()
    }

    fn set_health(&self, change: impl FnOnce(&mut Health)) {
        change(&mut self.health.lock().expect("health lock"));
    }

    /// Alerts as they are published.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertRecord>> {
        self.live.subscribe()
    }

    /// A batch through both stages and out to the sink, running it again
    /// when another writer changed a bucket it read (the distributed
    /// store's version check). Its checkpoint is in the commit; tenants run
    /// apart commit on their own.
    pub async fn process(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: &Batch,
    ) -> Result<Committed, EngineError> {
        // Publishing lags behind: keep the outbox from growing unbounded.
        self.flush(lane).await?;
        let mut conflicts = 0;
        let mut attempt = Attempt::default();
        loop {
            let computed = self.compute_attempt(lane, batch.clone(), attempt).await?;
            attempt = Attempt {
                ticket: computed.ticket,
                handed: computed.handed.clone(),
                part: false,
            };
            match self.commit(lane, computed).await {
                Ok(mut committed) => {
                    self.publish(lane, &mut committed).await;
                    return Ok(committed);
                }
                Err(EngineError::Store(StoreError::Conflict(ids))) if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(partition = %lane.partition, buckets = ids.len(), "buckets changed by another writer; running the batch again");
                    self.store.forget(&ids);
                }
                result => return result,
            }
        }
    }

    /// The first stage: route the batch, read the states it needs, and run
    /// every tenant's rules; their new states wait in the lane's overlay
    /// for the lane's next batch. Tenants run apart ([`apart`]) are left
    /// out: [`Computed::take_apart`] has them.
    pub async fn compute(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
    ) -> Result<Computed, EngineError> {
        self.compute_attempt(lane, batch, Attempt::default()).await
    }

    /// One tenant's part of a batch, on its chain.
    pub(super) async fn compute_part(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
    ) -> Result<Computed, EngineError> {
        let attempt = Attempt {
            part: true,
            ..Attempt::default()
        };
        self.compute_attempt(lane, batch, attempt).await
    }

    async fn compute_attempt(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
        attempt: Attempt,
    ) -> Result<Computed, EngineError> {
        let engine = self.clone();
        let lane = lane.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // A panic here is a host bug: it fails this batch, not the lane.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.compute_blocking(&lane, batch, &handle, attempt)
            }))
            .unwrap_or_else(|panic| Err(EngineError::Panicked(panic_text(&panic))))
        })
        .await
        .map_err(|e| EngineError::Panicked(e.to_string()))?
    }

    fn compute_blocking(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
        handle: &tokio::runtime::Handle,
        attempt: Attempt,
    ) -> Result<Computed, EngineError> {
        let now = self.clock.now_ms();
        let (batch_no, generation) = lane.next_batch();
        if !batch.timers.is_empty() || !batch.expired.is_empty() {
            return self.fire_blocking(lane, batch, handle, now, batch_no, generation);
        }
        let events = batch.events.clone();
        let mut rejected = Vec::new();
        let started = Instant::now();

        let mut tenants = run::by_tenant(&events);
        // Tenants run apart: their events join their chain, not this batch.
        let mut queued: Vec<(String, Vec<usize>)> = Vec::new();
        if !attempt.part {
            let parts = lane.parts.lock().expect("parts lock");
            tenants.retain(|(tenant, indices)| {
                if attempt.handed.iter().any(|t| t == tenant) {
                    return false;
                }
                match parts.behind(tenant) {
                    None => true,
                    Some(behind) if behind >= apart::MAX_BEHIND => {
                        let reason = format!(
                            "tenant `{tenant}` is {behind} batches behind on `{}`: its rules take more than their share of the time, so its events are dead-lettered until it catches up; replay them then",
                            lane.partition
                        );
                        rejected.extend(indices.iter().map(|&index| Rejection {
                            index,
                            rule: None,
                            cause: "behind",
                            reason: reason.clone(),
                        }));
                        false
                    }
                    Some(_) => {
                        queued.push(((*tenant).to_owned(), indices.clone()));
                        false
                    }
                }
            });
        }

        let rule_sets: Vec<_> = tenants
            .iter()
            .map(|(tenant, _)| self.catalogue.rules(tenant))
            .collect();
        let mut unknown_tenant = 0;
        for ((tenant, indices), rules) in tenants.iter().zip(&rule_sets) {
            if rules.is_none() {
                unknown_tenant += indices.len() as u64;
                self.stats
                    .unknown_tenant
                    .fetch_add(indices.len() as u64, Ordering::Relaxed);
                for &index in indices {
                    rejected.push(Rejection {
                        index,
                        rule: None,
                        cause: "unknown_tenant",
                        reason: format!(
                            "unknown tenant `{tenant}`: no rules are configured for it"
                        ),
                    });
                }
            }
        }

        // Route once, tenants in parallel: each tenant's rules, each rule's
        // buckets and their ids.
        let mut works: Vec<TenantWork> = tenants
            .par_iter()
            .zip(rule_sets.par_iter())
            .filter_map(|((tenant, indices), rules)| {
                let rules = rules.as_ref()?;
                let tenant_events: Vec<&Incoming> = indices.iter().map(|&i| &events[i]).collect();
                let restricted = tenant_events.iter().any(|e| e.only_rule.is_some());
                let rules = rules
                    .iter()
                    .map(|rule| {
                        let name = rule.name();
                        let (mut buckets, mut unroutable) =
                            route::route(rule.manifest(), &tenant_events);
                        if restricted {
                            // Dead letters run again: each for its rule only.
                            let mine = |i: usize| {
                                tenant_events[i]
                                    .only_rule
                                    .as_deref()
                                    .is_none_or(|r| r == name)
                            };
                            buckets = buckets
                                .iter()
                                .map(|b| route::rebuild(rule.manifest(), &tenant_events, b, mine))
                                .filter(|b| !b.members.is_empty())
                                .collect();
                            unroutable.retain(|u| mine(u.index));
                        }
                        let ids = buckets
                            .iter()
                            .map(|b| BucketId {
                                tenant: (*tenant).to_owned(),
                                rule: name.to_owned(),
                                bucket: b.key.clone(),
                            })
                            .collect();
                        Routed {
                            rule: rule.clone(),
                            buckets,
                            ids,
                            unroutable,
                            priors: Vec::new(),
                        }
                    })
                    .collect();
                Some(TenantWork {
                    tenant: (*tenant).to_owned(),
                    indices: indices.clone(),
                    rules,
                })
            })
            .collect();

        // Read every bucket the batch touches, once, all in one call: what
        // the store holds, under what the lane's uncommitted batches wrote.
        let load_started = Instant::now();
        let ids: Vec<BucketId> = works
            .iter_mut()
            .flat_map(|w| &mut w.rules)
            .flat_map(|r| std::mem::take(&mut r.ids))
            .collect();
        let mut priors = handle.block_on(self.store.load(&ids, &lane.partition))?;
        {
            let overlay = lane.overlay.lock().expect("overlay lock");
            if !overlay.states.is_empty() {
                for (id, prior) in ids.iter().zip(priors.iter_mut()) {
                    if let Some((_, state)) = overlay.states.get(id) {
                        prior.state = state.clone();
                    }
                }
            }
        }
        let (mut ids, mut priors) = (ids.into_iter(), priors.drain(..));
        for r in works.iter_mut().flat_map(|w| &mut w.rules) {
            let n = r.buckets.len();
            r.ids = ids.by_ref().take(n).collect();
            r.priors = priors.by_ref().take(n).collect();
        }
        let load = load_started.elapsed();
        self.stats
            .load_ns
            .fetch_add(load.as_nanos() as u64, Ordering::Relaxed);

        // Run: tenants in parallel, each tenant's rules in turn; past its
        // share of the time, a tenant goes on apart.
        let share = match (attempt.part, self.fair_share) {
            (false, Some(share)) => Some(share),
            _ => None,
        };
        let together: std::collections::HashSet<&str> =
            batch.together.iter().map(String::as_str).collect();
        let splittable = |tenant: &str| !together.contains(tenant);
        let (outcomes, stragglers) = self.run_tenants(&events, works, now, share, &splittable);
        // Routing and running, not the state reads counted above.
        self.stats.rules_ns.fetch_add(
            started.elapsed().saturating_sub(load).as_nanos() as u64,
            Ordering::Relaxed,
        );

        let apart_events: usize = stragglers.iter().map(|s| s.1.len()).sum::<usize>()
            + queued.iter().map(|q| q.1.len()).sum::<usize>();
        let mut computed = self.finish(
            lane,
            &events,
            Finish {
                outcomes,
                rejected,
                progress: batch.progress.clone(),
                bad: batch.bad.clone(),
                unanswered: batch.unanswered,
                count: events.len() - apart_events,
                now,
                batch_no,
                generation,
                unknown_tenant,
                started,
            },
        )?;
        if attempt.part {
            return Ok(computed);
        }

        // Hand the tenants run apart to their chains.
        let (rest, rest_closed) = watch::channel(());
        let mut parts = Vec::new();
        for (tenant, indices, outcome) in stragglers {
            let sub = batch.part(&indices);
            let run = apart::Run::Started {
                outcome,
                events: events.clone(),
                generation,
            };
            parts.push((tenant, sub, indices, run));
        }
        for (tenant, indices) in queued {
            let sub = batch.part(&indices);
            parts.push((tenant, sub, indices, apart::Run::Queued));
        }
        let mut lane_parts = lane.parts.lock().expect("parts lock");
        // Parts of a partition read by sequence numbers hold back its
        // checkpoint until they are in.
        let reads = batch
            .progress
            .position
            .as_ref()
            .filter(|p| p.last.is_some());
        let ticket = match reads {
            Some(position) if self.fair_share.is_some() => {
                Some(lane_parts.open(attempt.ticket, 1 + parts.len(), position.checkpoint.clone()))
            }
            _ => None,
        };
        computed.ticket = ticket;
        computed.handed = attempt.handed;
        for (tenant, sub, indices, run) in parts {
            computed.handed.push(tenant.clone());
            let (mut part, apart) = apart::Part::new(
                tenant,
                sub,
                indices,
                run,
                batch.receipts.clone(),
                rest_closed.clone(),
            );
            part.ticket = ticket;
            self.send_part(lane, &mut lane_parts, part, handle);
            computed.apart.push(apart);
        }
        computed.rest = Some(rest);
        Ok(computed)
    }

    /// Run each tenant's rules, tenants in parallel. With a `share`,
    /// tenants still running once the others are done, past the share and
    /// past as long again as the others took, are left running: each with
    /// its events and where its outcome will come.
    #[allow(clippy::type_complexity)]
    fn run_tenants(
        self: &Arc<Self>,
        events: &Arc<[Incoming]>,
        works: Vec<TenantWork>,
        now: i64,
        share: Option<Duration>,
        splittable: &dyn Fn(&str) -> bool,
    ) -> (
        Vec<TenantOutcome>,
        Vec<(
            String,
            Vec<usize>,
            oneshot::Receiver<Result<TenantOutcome, String>>,
        )>,
    ) {
        let max_state = self.store.max_state_bytes();
        let Some(share) = share.filter(|_| !works.is_empty()) else {
            let outcomes = self.pool.install(|| {
                works
                    .into_par_iter()
                    .map(|work| self.run_tenant(events, work, now, max_state))
                    .collect()
            });
            return (outcomes, Vec::new());
        };
        let started = Instant::now();
        // Each tenant, and whether it may be run apart.
        let meta: Vec<(String, bool)> = works
            .iter()
            .map(|w| (w.tenant.clone(), splittable(&w.tenant)))
            .collect();
        let mut unsplittable = meta.iter().filter(|(_, may)| !may).count();
        let (send, receive) = std::sync::mpsc::channel();
        for (n, work) in works.into_iter().enumerate() {
            let (engine, events, send) = (self.clone(), events.clone(), send.clone());
            self.pool.spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.run_tenant(&events, work, now, max_state)
                }))
                .map_err(|panic| panic_text(&panic));
                let _ = send.send((n, outcome));
            });
        }
        drop(send);
        let mut outcomes: Vec<Option<Result<TenantOutcome, String>>> =
            (0..meta.len()).map(|_| None).collect();
        let mut pending = meta.len();
        let mut others_took = Duration::ZERO;
        while pending > 0 {
            // A tenant alone in its batch is run apart too: the lane's next
            // batches are the others it would hold.
            let may_split = unsplittable == 0;
            let received = if may_split {
                let deadline = share.max(others_took * 2);
                match deadline.checked_sub(started.elapsed()) {
                    Some(left) => receive.recv_timeout(left).ok(),
                    None => None,
                }
            } else {
                receive.recv().ok()
            };
            let Some((n, outcome)) = received else {
                if !may_split {
                    // Every run sends; a closed channel is a host bug.
                    break;
                }
                // Past their share: the stragglers go on apart.
                let mut stragglers = Vec::new();
                let mut forward = HashMap::new();
                for n in (0..meta.len()).filter(|&n| outcomes[n].is_none()) {
                    let tenant = meta[n].0.clone();
                    let indices: Vec<usize> = (0..events.len())
                        .filter(|&i| events[i].tenant == tenant)
                        .collect();
                    tracing::info!(tenant = %tenant, events = indices.len(), took_ms = started.elapsed().as_millis() as u64, others_ms = others_took.as_millis() as u64, "tenant over its share of the batch's time: run apart");
                    let (to, from) = oneshot::channel();
                    forward.insert(n, to);
                    stragglers.push((tenant, indices, from));
                }
                std::thread::spawn(move || {
                    for (n, outcome) in receive {
                        if let Some(to) = forward.remove(&n) {
                            let _ = to.send(outcome);
                        }
                    }
                });
                return (Self::unwrap_outcomes(outcomes), stragglers);
            };
            outcomes[n] = Some(outcome);
            pending -= 1;
            if !meta[n].1 {
                unsplittable -= 1;
            }
            others_took = started.elapsed();
        }
        (Self::unwrap_outcomes(outcomes), Vec::new())
    }

    fn unwrap_outcomes(outcomes: Vec<Option<Result<TenantOutcome, String>>>) -> Vec<TenantOutcome> {
        outcomes
            .into_iter()
            .flatten()
            .map(|outcome| {
                outcome.unwrap_or_else(|panic| std::panic::resume_unwind(Box::new(panic)))
            })
            .collect()
    }

    /// One tenant's rules over its events, in turn.
    fn run_tenant(
        &self,
        events: &[Incoming],
        work: TenantWork,
        now: i64,
        max_state: usize,
    ) -> TenantOutcome {
        let tenant_events: Vec<&Incoming> = work.indices.iter().map(|&i| &events[i]).collect();
        let indices = &work.indices;
        let mut writes = Vec::new();
        let mut rejected = Vec::new();
        let mut failures = 0;
        let mut tallies = Vec::new();
        for r in work.rules {
            let name = r.rule.name();
            let tenant = r.rule.tenant();
            let mut tally = RuleTally {
                tenant: tenant.to_owned(),
                rule: name.to_owned(),
                ..RuleTally::default()
            };
            let rule_started = Instant::now();
            for bad in &r.unroutable {
                rejected.push(Rejection {
                    index: indices[bad.index],
                    rule: Some(name.to_owned()),
                    cause: bad.cause,
                    reason: bad.reason.clone(),
                });
            }
            if let Some(quarantine) = self.quarantines.active(tenant, name, now) {
                // Not called: its events wait in the dead letters.
                let reason = format!(
                    "rule `{name}` of tenant `{tenant}` is quarantined until {} after {} failing batches in a row (last: {}); an operator can resume it",
                    quarantine.until, quarantine.failing_batches, quarantine.reason
                );
                for bucket in &r.buckets {
                    for &member in &bucket.members {
                        rejected.push(Rejection {
                            index: indices[member],
                            rule: Some(name.to_owned()),
                            cause: "quarantined",
                            reason: reason.clone(),
                        });
                    }
                }
                tally.quarantined = true;
                tallies.push(tally);
                continue;
            }
            let mut ids = r.ids;
            let run = run::run_contained(&r.rule, &tenant_events, r.buckets, now, r.priors);
            tally.elapsed = rule_started.elapsed();
            tally.failed_calls = run.failed_calls;
            for bucket in run.buckets {
                tally.applied_calls += bucket.calls - bucket.failed_calls;
                let mut failed: Vec<(usize, &'static str, String)> = bucket
                    .failed
                    .into_iter()
                    .map(|(member, error)| {
                        tally.failures.push(error.cause.kind());
                        (member, error.cause.kind(), error.to_string())
                    })
                    .collect();
                if let Some(outcome) = bucket.outcome {
                    tally.fuel += outcome.fuel;
                    for line in &outcome.log {
                        tracing::debug!(tenant, rule = %name, bucket = %bucket.key, level = ?line.level, "{}", line.message.trim_end());
                        tally.log.push(LogEntry::new(
                            now,
                            line.level.name(),
                            "rule",
                            &bucket.key,
                            &line.message,
                        ));
                    }
                    match &outcome.state {
                        StateChange::Set(bytes) if bytes.len() > max_state => {
                            tally.failures.push("state_too_large");
                            let reason = format!(
                                "rule error: the state of bucket `{}` is {} bytes, over the state store's limit of {max_state}; the bucket keeps its previous state",
                                bucket.key,
                                bytes.len()
                            );
                            failed.extend(
                                bucket
                                    .applied
                                    .iter()
                                    .map(|&m| (m, "state_too_large", reason.clone())),
                            );
                        }
                        _ => {
                            tally.events += bucket.applied.len() as u64;
                            tally.alerts += outcome.alerts.len() as u64;
                            writes.push(BucketWrite {
                                id: std::mem::replace(
                                    &mut ids[bucket.index],
                                    BucketId {
                                        tenant: String::new(),
                                        rule: String::new(),
                                        bucket: String::new(),
                                    },
                                ),
                                state: outcome.state,
                                timer: outcome.timer,
                                alerts: outcome.alerts,
                                ttl_ms: outcome.state_ttl_ms,
                            });
                        }
                    }
                }
                if failed.is_empty() {
                    continue;
                }
                // The bucket keeps its state; other buckets go on.
                failures += 1;
                failed.sort_by_key(|(member, _, _)| *member);
                let mut last_reason: Option<&str> = None;
                for (member, cause, reason) in &failed {
                    if last_reason != Some(reason.as_str()) {
                        tracing::warn!(tenant, rule = %name, bucket = %bucket.key, position = %tenant_events[*member].position, "{reason}");
                        tally
                            .log
                            .push(LogEntry::new(now, "error", "host", &bucket.key, reason));
                        last_reason = Some(reason.as_str());
                    }
                    rejected.push(Rejection {
                        index: indices[*member],
                        rule: Some(name.to_owned()),
                        cause,
                        reason: reason.clone(),
                    });
                }
                tally.last_failure = failed.last().map(|(_, _, reason)| reason.clone());
            }
            tallies.push(tally);
        }
        TenantOutcome {
            writes,
            rejected,
            failures,
            tallies,
        }
    }

    /// Fire the timers of `lane`'s partition due by `until`, and remove
    /// its buckets expired by then, a batch at a time, each committed like
    /// a batch of events with `progress` (a timer partition's lease, or
    /// nothing); how many timers fired. Tenants run apart keep theirs until
    /// their parts are in.
    pub async fn fire_timers(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        until: i64,
        progress: Progress,
    ) -> Result<usize, EngineError> {
        let mut fired = 0;
        loop {
            let partition = &lane.partition;
            let mut due = self
                .store
                .due_timers(partition, until, MAX_TIMERS_PER_BATCH)
                .await?;
            let mut expired = self
                .store
                .expired(partition, until, MAX_TIMERS_PER_BATCH)
                .await?;
            let full = due.len() == MAX_TIMERS_PER_BATCH || expired.len() == MAX_TIMERS_PER_BATCH;
            {
                let parts = lane.parts.lock().expect("parts lock");
                due.retain(|(id, _)| parts.behind(&id.tenant).is_none());
                expired.retain(|(id, _)| parts.behind(&id.tenant).is_none());
            }
            // In time order when the clock jumped past both: a timer due
            // before its bucket expired fires (touching it); one due after
            // went with its bucket.
            let expiry: HashMap<&BucketId, i64> =
                expired.iter().map(|(id, at)| (id, *at)).collect();
            due.retain(|(id, at)| expiry.get(id).is_none_or(|expires| at < expires));
            let firing: std::collections::HashSet<&BucketId> =
                due.iter().map(|(id, _)| id).collect();
            let expired: Vec<BucketId> = expired
                .iter()
                .filter(|(id, _)| !firing.contains(id))
                .map(|(id, _)| id.clone())
                .collect();
            if due.is_empty() && expired.is_empty() {
                return Ok(fired);
            }
            let n = due.len();
            let mut batch = Batch::new(Vec::new(), progress.clone());
            batch.timers = due;
            batch.expired = expired;
            self.process(lane, &batch).await?;
            fired += n;
            if !full {
                return Ok(fired);
            }
        }
    }

    /// Move `clock` (this engine's clock, in a replay or a test) on to `to`,
    /// firing each of `lane`'s timers due by then at its due time (or at
    /// the clock's time if that has passed it), in order, so a timer a
    /// firing sets again within the time fires again; how many fired.
    pub async fn run_clock_to(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        clock: &ManualClock,
        to: i64,
    ) -> Result<u64, EngineError> {
        let mut fired = 0;
        let mut previous = None;
        while let Some(due) = self.next_due(&lane.partition).await?
            && due <= to
        {
            // What is still due after a firing at its time cannot fire.
            if previous == Some(due) {
                break;
            }
            previous = Some(due);
            let at = due.max(clock.now_ms());
            clock.set(at);
            fired += self.fire_timers(lane, at, Progress::none()).await? as u64;
        }
        clock.set(to.max(clock.now_ms()));
        Ok(fired)
    }

    /// When `lane`'s partition next has a timer due or a bucket expiring.
    pub async fn next_due(&self, lane_partition: &str) -> Result<Option<i64>, EngineError> {
        let timer = self.store.next_timer(lane_partition).await?;
        let expiry = self.store.next_expiry(lane_partition).await?;
        Ok(timer.into_iter().chain(expiry).min())
    }

    /// A batch of due timers: each bucket's rule's `on-timer`, on its state.
    fn fire_blocking(
        &self,
        lane: &Lane,
        batch: Batch,
        handle: &tokio::runtime::Handle,
        now: i64,
        batch_no: u64,
        generation: u64,
    ) -> Result<Computed, EngineError> {
        let started = Instant::now();
        let ids: Vec<BucketId> = batch.timers.iter().map(|(id, _)| id.clone()).collect();
        let mut priors = handle.block_on(self.store.load(&ids, &lane.partition))?;
        let pending = handle.block_on(self.store.pending_timers(&ids))?;
        {
            let overlay = lane.overlay.lock().expect("overlay lock");
            for (id, prior) in ids.iter().zip(priors.iter_mut()) {
                if let Some((_, state)) = overlay.states.get(id) {
                    prior.state = state.clone();
                }
            }
        }
        let max_state = self.store.max_state_bytes();
        let mut outcome = TenantOutcome {
            writes: Vec::new(),
            rejected: Vec::new(),
            failures: 0,
            tallies: Vec::new(),
        };
        // Untouched past their time-to-live: state and timer go.
        for id in &batch.expired {
            outcome.writes.push(BucketWrite {
                id: id.clone(),
                state: StateChange::Delete,
                timer: TimerChange::Cancel,
                alerts: Vec::new(),
                ttl_ms: None,
            });
        }
        for (((id, due), prior), pending) in batch.timers.iter().zip(priors).zip(pending) {
            if pending != Some(*due) {
                // Changed since the index was read (by an event on another
                // host, whose commit moved the index too): not due.
                tracing::debug!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, due, ?pending, "timer changed before it fired");
                continue;
            }
            // Without an outcome the bucket keeps its state, and is touched
            // under its rule's time-to-live.
            let write = |timer, outcome: Option<run::BucketOutcome>, ttl_ms: Option<u64>| {
                let (state, alerts, ttl_ms) = match outcome {
                    Some(o) => (o.state, o.alerts, o.state_ttl_ms),
                    None => (StateChange::Unchanged, Vec::new(), ttl_ms),
                };
                BucketWrite {
                    id: id.clone(),
                    state,
                    timer,
                    alerts,
                    ttl_ms,
                }
            };
            let rule = self
                .catalogue
                .rules(&id.tenant)
                .and_then(|rules| rules.iter().find(|r| r.name() == id.rule).cloned());
            let Some(rule) = rule else {
                tracing::info!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, "the rule of a due timer is gone: the timer goes too");
                outcome.writes.push(write(TimerChange::Cancel, None, None));
                continue;
            };
            let ttl_ms = rule.manifest().state_ttl_ms;
            let mut tally = RuleTally {
                tenant: id.tenant.clone(),
                rule: id.rule.clone(),
                ..RuleTally::default()
            };
            if let Some(quarantine) = self.quarantines.active(&id.tenant, &id.rule, now) {
                // Fired once the quarantine is over.
                outcome
                    .writes
                    .push(write(TimerChange::Set(quarantine.until_ms), None, ttl_ms));
                tally.quarantined = true;
                outcome.tallies.push(tally);
                continue;
            }
            let call_started = Instant::now();
            let result = run::call_timer(&rule, &id.bucket, prior.state.as_deref(), now, *due)
                .map_err(|e| (e.cause.kind(), e.to_string()))
                .and_then(|o| match &o.state {
                    StateChange::Set(bytes) if bytes.len() > max_state => Err((
                        "state_too_large",
                        format!(
                            "rule error: the state of bucket `{}` is {} bytes, over the state store's limit of {max_state}",
                            id.bucket,
                            bytes.len()
                        ),
                    )),
                    _ => Ok(o),
                });
            tally.elapsed = call_started.elapsed();
            match result {
                Ok(mut fired) => {
                    tally.applied_calls = 1;
                    tally.fuel = fired.fuel;
                    tally.alerts = fired.alerts.len() as u64;
                    for line in &fired.log {
                        tally.log.push(LogEntry::new(
                            now,
                            line.level.name(),
                            "rule",
                            &id.bucket,
                            &line.message,
                        ));
                    }
                    // The timer that fired is spent unless the rule sets one.
                    let timer = match std::mem::replace(&mut fired.timer, TimerChange::Keep) {
                        TimerChange::Set(at) if at <= now => {
                            TimerChange::Set(now + MIN_TIMER_STEP_MS)
                        }
                        set @ TimerChange::Set(_) => set,
                        TimerChange::Keep | TimerChange::Cancel => TimerChange::Cancel,
                    };
                    outcome.writes.push(write(timer, Some(fired), ttl_ms));
                }
                Err((kind, error)) => {
                    // Dropped, with the reason in the rule's log: a timer
                    // that failed would fail again.
                    let reason = format!(
                        "{error}; the timer due at {} is dropped",
                        contain::rfc3339(*due)
                    );
                    tracing::warn!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, "{reason}");
                    tally.failed_calls = 1;
                    tally.failures.push(kind);
                    tally
                        .log
                        .push(LogEntry::new(now, "error", "host", &id.bucket, &reason));
                    tally.last_failure = Some(reason);
                    outcome.failures += 1;
                    outcome
                        .writes
                        .push(write(TimerChange::Cancel, None, ttl_ms));
                }
            }
            outcome.tallies.push(tally);
        }
        self.finish(
            lane,
            &[],
            Finish {
                outcomes: vec![outcome],
                rejected: Vec::new(),
                progress: batch.progress,
                bad: Vec::new(),
                unanswered: batch.unanswered,
                count: 0,
                now,
                batch_no,
                generation,
                unknown_tenant: 0,
                started,
            },
        )
    }

    /// A straggler's outcome, once it came, as a part of its own.
    pub(super) fn finish_part(
        &self,
        lane: &Lane,
        events: &Arc<[Incoming]>,
        part: &Batch,
        outcome: TenantOutcome,
        generation: u64,
    ) -> Result<Computed, EngineError> {
        let (batch_no, _) = lane.next_batch();
        self.finish(
            lane,
            events,
            Finish {
                outcomes: vec![outcome],
                rejected: Vec::new(),
                progress: part.progress.clone(),
                bad: Vec::new(),
                unanswered: part.unanswered,
                count: part.events.len(),
                now: self.clock.now_ms(),
                batch_no,
                generation,
                unknown_tenant: 0,
                started: Instant::now(),
            },
        )
    }

    /// Gather the tenants' outcomes into a batch to commit, keep what was
    /// not applied as dead letters, and put the new states in the lane's
    /// overlay for its next batch.
    fn finish(
        &self,
        lane: &Lane,
        events: &[Incoming],
        finish: Finish,
    ) -> Result<Computed, EngineError> {
        let Finish {
            outcomes,
            mut rejected,
            progress,
            bad,
            unanswered,
            count,
            now,
            batch_no,
            generation,
            unknown_tenant,
            started,
        } = finish;
        let mut writes = Vec::new();
        let mut failures = 0;
        let mut tallies = Vec::new();
        for outcome in outcomes {
            writes.extend(outcome.writes);
            rejected.extend(outcome.rejected);
            failures += outcome.failures;
            tallies.extend(outcome.tallies);
        }
        rejected.sort_by_key(|r| r.index);

        // What was accepted but not applied is kept with the reason.
        let mut dead_letters = bad;
        for rejection in &rejected {
            if rejection.is_bad_event() && !unanswered {
                continue;
            }
            let event = &events[rejection.index];
            dead_letters.push(DeadLetter {
                id: dead_letter_id(&lane.partition, &event.position, rejection.rule.as_deref()),
                seq: None,
                at: now,
                tenant: Some(event.tenant.clone()),
                rule: rejection.rule.clone(),
                source: lane.partition.clone(),
                position: event.position.clone(),
                cause: rejection.cause.to_owned(),
                reason: rejection.reason.clone(),
                event: event.raw.to_string(),
            });
        }

        // The lane's next batch runs on these states before they commit.
        let mut overlay = lane.overlay.lock().expect("overlay lock");
        if overlay.generation != generation {
            return Err(EngineError::Stale);
        }
        for write in &writes {
            let state = match &write.state {
                StateChange::Unchanged => continue,
                StateChange::Set(bytes) => Some(Arc::from(bytes.as_slice())),
                StateChange::Delete => None,
            };
            overlay.states.insert(write.id.clone(), (batch_no, state));
        }
        drop(overlay);
        Ok(Computed {
            commit: Commit {
                writes,
                progress,
                partition: lane.partition.clone(),
                now_ms: now,
            },
            rejected,
            events: count,
            failures,
            batch: batch_no,
            generation,
            tallies,
            dead_letters,
            unknown_tenant,
            started,
            ticket: None,
            handed: Vec::new(),
            apart: Vec::new(),
            rest: None,
        })
    }

    /// The second stage: commit a computed batch. Batches of a lane must be
    /// committed in the order they were computed. Once this returns `Ok`,
    /// the batch is durable: the source may acknowledge it, then
    /// [`publish`](Self::publish) it.
    pub async fn commit(&self, lane: &Lane, computed: Computed) -> Result<Committed, EngineError> {
        let _committing = lane.committing.lock().await;
        let Computed {
            mut commit,
            rejected,
            events,
            failures,
            batch,
            generation,
            mut tallies,
            dead_letters,
            unknown_tenant,
            started: batch_started,
            ticket,
            handed: _,
            apart: _,
            rest: _rest,
        } = computed;
        if lane.overlay.lock().expect("overlay lock").generation != generation {
            return Err(EngineError::Stale);
        }
        // The overlay holds states of this batch and of any computed on top
        // of it: if this one does not commit, none of them is durable.
        let drop_overlay = || {
            let mut overlay = lane.overlay.lock().expect("overlay lock");
            overlay.generation += 1;
            overlay.states.clear();
        };
        if !dead_letters.is_empty() {
            match &self.dead_letters {
                Some(sink) => {
                    if let Err(error) = sink.send(&dead_letters).await {
                        drop_overlay();
                        return Err(EngineError::DeadLetters(error));
                    }
                }
                None => {
                    for letter in &dead_letters {
                        tracing::warn!(source = %letter.source, position = %letter.position, tenant = ?letter.tenant, rule = ?letter.rule, "not applied: {}", letter.reason);
                    }
                }
            }
        }
        // A shard's checkpoint moves past batches all of whose parts are in.
        let mut written = None;
        if let Some(checkpoint) = commit.progress.checkpoint_mut() {
            if let Some(ticket) = ticket {
                *checkpoint = lane
                    .parts
                    .lock()
                    .expect("parts lock")
                    .checkpoint_after(ticket);
            }
            written = checkpoint.clone();
        }
        let sets_timer = commit
            .writes
            .iter()
            .any(|w| matches!(w.timer, TimerChange::Set(_)));
        // Marked before they are durable: the alert log and the stream
        // hold the same record.
        let silenced = match &self.silences {
            Some(silences) => {
                silences.mark(commit.writes.iter_mut().flat_map(|w| w.alerts.iter_mut()))
            }
            None => Vec::new(),
        };
        let started = Instant::now();
        let outbox = match self.store.commit(commit).await {
            Ok(outbox) => outbox,
            Err(error) => {
                // Part of a commit may have been (a split one): catch up
                // first.
                drop_overlay();
                lane.behind.store(true, Ordering::Relaxed);
                if !matches!(error, StoreError::Conflict(_) | StoreError::Fenced(_)) {
                    self.set_health(|h| h.commit_error = Some(error.to_string()));
                }
                return Err(error.into());
            }
        };
        self.set_health(|h| h.commit_error = None);
        add_elapsed(&self.stats.commit_ns, started);
        if sets_timer {
            self.timers_set.send_modify(|n| *n += 1);
        }
        lane.parts
            .lock()
            .expect("parts lock")
            .committed(ticket, written);
        let turn = Turn {
            _held: lane.publishing.clone().lock_owned().await,
            behind: lane.behind.clone(),
        };
        let now = self.clock.now_ms();
        for tally in &mut tallies {
            if !tally.quarantined
                && let Some(quarantine) = self.quarantines.observe(
                    &tally.tenant,
                    &tally.rule,
                    tally.applied_calls,
                    tally.failed_calls,
                    tally.last_failure.as_deref(),
                    now,
                )
            {
                tracing::warn!(tenant = %tally.tenant, rule = %tally.rule, until = %quarantine.until, "rule quarantined after {} failing batches in a row: {}", quarantine.failing_batches, quarantine.reason);
                tally.log.push(LogEntry::new(
                    now,
                    "error",
                    "host",
                    "",
                    &format!(
                        "quarantined until {} after {} failing batches in a row; its events are dead-lettered until then",
                        quarantine.until, quarantine.failing_batches
                    ),
                ));
            }
            self.logs
                .append(&tally.tenant, &tally.rule, std::mem::take(&mut tally.log));
        }
        self.metrics.silenced(&silenced);
        for tally in &tallies {
            self.stats
                .applied
                .fetch_add(tally.events, Ordering::Relaxed);
            self.stats.fuel.fetch_add(tally.fuel, Ordering::Relaxed);
        }
        self.metrics.committed(
            &tallies,
            &dead_letters,
            events as u64,
            unknown_tenant,
            batch_started.elapsed(),
            started.elapsed(),
        );
        lane.overlay
            .lock()
            .expect("overlay lock")
            .states
            .retain(|_, (written_by, _)| *written_by != batch);
        self.stats
            .events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.stats
            .alerts
            .fetch_add(outbox.alerts.len() as u64, Ordering::Relaxed);
        self.stats
            .rule_failures
            .fetch_add(failures, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);

        Ok(Committed {
            rejected,
            alerts: outbox.alerts.len(),
            outbox: Some(outbox),
            turn: Some(turn),
        })
    }

    /// Publish a committed batch's alerts (after any the lane's outbox
    /// still holds). A failure only delays them: they stay in the outbox,
    /// and the lane's next batch publishes them first.
    pub async fn publish(&self, lane: &Lane, committed: &mut Committed) {
        let Some(mut outbox) = committed.outbox.take() else {
            return;
        };
        let published = if lane.behind.load(Ordering::Relaxed) {
            self.flush_in_turn(lane).await
        } else {
            let flushed = lane.flushed.load(Ordering::Relaxed);
            outbox
                .alerts
                .retain(|a| a.seq.is_none_or(|seq| seq > flushed));
            let sent = self.send(outbox).await;
            if sent.is_err() {
                lane.behind.store(true, Ordering::Relaxed);
            }
            sent
        };
        match published {
            Ok(()) => self.set_health(|h| h.publish_error = None),
            Err(error) => {
                tracing::error!(partition = %lane.partition, %error, "cannot publish alerts; they stay in the outbox");
                self.set_health(|h| h.publish_error = Some(error.to_string()));
            }
        }
        // The lane's next committed batch may publish.
        committed.turn.take();
    }

    /// Publish what the lane's partition committed but may not have
    /// published (at start, or after a failure): a new lease owner's
    /// duty before it reads the shard. Same ids, so consumers dedupe.
    pub async fn flush(&self, lane: &Lane) -> Result<(), EngineError> {
        if !lane.behind.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _turn = lane.publishing.lock().await;
        self.flush_in_turn(lane).await
    }

    /// [`flush`](Self::flush) holding the lane's turn to publish.
    async fn flush_in_turn(&self, lane: &Lane) -> Result<(), EngineError> {
        if !lane.behind.load(Ordering::Relaxed) {
            return Ok(());
        }
        let outbox = self.store.unpublished(&lane.partition).await?;
        if !outbox.alerts.is_empty() {
            tracing::info!(partition = %lane.partition, alerts = outbox.alerts.len(), "publishing the outbox");
        }
        let newest = outbox.alerts.iter().filter_map(|a| a.seq).max();
        self.send(outbox).await?;
        if let Some(newest) = newest {
            lane.flushed.fetch_max(newest, Ordering::Relaxed);
        }
        lane.behind.store(false, Ordering::Relaxed);
        Ok(())
    }

    async fn send(&self, outbox: Outbox) -> Result<(), EngineError> {
        if outbox.alerts.is_empty() {
            self.store.published(outbox.mark).await?;
            return Ok(());
        }
        let started = Instant::now();
        let sent = self.sink.publish(&outbox.alerts).await;
        add_elapsed(&self.stats.publish_ns, started);
        sent?;
        self.store.published(outbox.mark).await?;
        for alert in outbox.alerts {
            let _ = self.live.send(Arc::new(alert));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}
