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
//!
//! This file holds the [`Engine`] itself: what it is built from, its
//! settings and what it reports. The rest, a file per job:
//!
//! - `batch`: what goes through ([`Batch`], [`Rejection`] and its
//!   [`RejectCause`], [`Computed`], [`Committed`]); `error`: [`EngineError`].
//! - `lane`: a partition's [`Lane`] and its overlay of uncommitted states.
//! - `compute`: the first stage, in steps (routing, reading states), and
//!   [`Engine::process`], both stages with retries.
//! - `tenants`: running the tenants' rules, in parallel, within their
//!   fair share; [`apart`]: tenants past it, committed on their own.
//! - `outcome`: folding the tenants' outcomes into one batch to commit.
//! - `timers`: firing due timers and expiring buckets.
//! - `commit`: the second stage, then quarantines, rule logs and metrics.
//! - `publish`: out to the sink, in commit order, from the outbox.
//! - [`route`] (events to buckets), [`run`] (one rule's buckets, with
//!   bisection), [`contain`] (quarantines and rule logs), [`Scratch`] (a
//!   throwaway engine for `rule test` and replays).

pub(crate) mod apart;
mod batch;
mod commit;
mod compute;
pub(crate) mod contain;
mod error;
mod lane;
mod outcome;
mod publish;
pub mod route;
pub mod run;
mod scratch;
mod tenants;
mod timers;

pub(crate) use batch::Computed;
pub use batch::{Batch, Committed, RejectCause, Rejection};
pub use error::EngineError;
pub use lane::Lane;
pub use scratch::{Ran, Scratch, ScratchError};
pub(crate) use tenants::TenantOutcome;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use crate::alert::AlertRecord;
use crate::alert::silences::Silences;
use crate::catalogue::Catalogue;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::rule_log::{LogEntry, RuleLogs};
use crate::sink::AlertSink;
use crate::sink::dead_letters::DeadLetterSink;
use crate::store::StateStore;
use contain::{Quarantine, Quarantines};

/// Alerts kept for live subscribers that fall behind; past this they catch
/// up from the alert log.
const LIVE_ALERTS: usize = 16 * 1024;
/// Version conflicts (another writer changed a bucket) one batch may meet
/// before [`Engine::process`] gives up and the source retries it later.
const MAX_CONFLICTS: u32 = 8;
/// Threads beyond the cores that run rules: stragglers still running on
/// them leave the cores to the batches that follow.
const APART_THREADS: usize = 2;

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

/// What is failing now, for `/readyz`: the last commit or publish failed
/// and none has succeeded since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Health {
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
            fair_share: Some(crate::quota::DEFAULT_FAIR_SHARE),
            timers_set: watch::Sender::new(0),
            silences: None,
        }
    }

    /// Mark the alerts `silences` match as they commit (`silenced_by`).
    pub(crate) fn with_silences(mut self, silences: Arc<Silences>) -> Self {
        self.silences = Some(silences);
        self
    }

    /// Told after each commit that set a timer.
    pub(crate) fn timers_set(&self) -> watch::Receiver<u64> {
        self.timers_set.subscribe()
    }

    /// Run a tenant apart once it holds its batch `share` past the others
    /// ([`apart`]); `None` keeps batches whole.
    pub(crate) fn with_fair_share(mut self, share: Option<Duration>) -> Self {
        self.fair_share = share;
        self
    }

    /// Keep dead letters in `sink`. Without one, the events not applied
    /// are only reported to the caller (the rejections of each batch), as
    /// `tocsin rule test` and `tocsin replay` do.
    pub(crate) fn with_dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.dead_letters = Some(sink);
        self
    }

    pub(crate) fn dead_letters(&self) -> Option<&dyn DeadLetterSink> {
        self.dead_letters.as_deref()
    }

    /// The rule's quarantine on this host, current or awaiting probation.
    pub(crate) fn quarantine(&self, tenant: &str, rule: &str) -> Option<Quarantine> {
        self.quarantines.get(tenant, rule)
    }

    /// Lift the rule's quarantine on this host; whether it had one.
    pub(crate) fn resume(&self, tenant: &str, rule: &str) -> bool {
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
    pub(crate) fn rule_logs(&self, tenant: &str, rule: &str) -> Vec<LogEntry> {
        self.logs.lines(tenant, rule)
    }

    /// Wait until every part the lane ran apart is through its commit.
    pub(crate) async fn settle(&self, lane: &Lane) {
        let _ = lane
            .chains
            .subscribe()
            .wait_for(|chains| *chains == 0)
            .await;
    }

    /// What `GET /metrics` reports, with the gauges read now.
    pub(crate) fn encode_metrics(
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
    /// past that they catch up from the alert log. Only tests keep fewer.
    #[cfg(test)]
    pub(crate) fn with_live_capacity(mut self, alerts: usize) -> Self {
        self.live = broadcast::channel(alerts.max(1)).0;
        self
    }

    pub(crate) fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    pub(crate) fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What `GET /metrics` reports.
    #[cfg_attr(
        not(feature = "aws"),
        allow(dead_code, reason = "used by the Kinesis source")
    )]
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn health(&self) -> Health {
        self.health.lock().expect("health lock").clone()
    }

    fn set_health(&self, change: impl FnOnce(&mut Health)) {
        change(&mut self.health.lock().expect("health lock"));
    }

    /// Alerts as they are published.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertRecord>> {
        self.live.subscribe()
    }
}

#[cfg(test)]
pub(crate) mod tests;
