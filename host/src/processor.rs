//! The service's core: takes submitted batches of events, runs every
//! tenant's rules over them (tenants in parallel), commits new states, alerts
//! and idempotency receipts in one atomic write, then publishes the alerts and
//! answers the submitters. Nothing here names a backend: the catalogue, the
//! state store and the alert sink are traits.
//!
//! One group of submissions is processed at a time: a single writer keeps
//! bucket state consistent without locks per bucket, and everything that
//! queued while a group was processed forms the next group, so one fsync
//! serves many requests under load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::alert::AlertRecord;
use crate::catalogue::Catalogue;
use crate::clock::Clock;
use crate::event::Incoming;
use crate::pipeline::{self, Prior, TenantRun};
use crate::runtime::{StateChange, TimerChange};
use crate::sink::AlertSink;
use crate::store::{BucketId, Commit, StateStore};

/// Alerts kept for live subscribers that fall behind; past this they catch
/// up from the alert log.
const LIVE_ALERTS: usize = 16 * 1024;

/// A line of a request that was not accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub line: usize,
    pub error: String,
}

/// The answer to one submission, as `POST /v1/events` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub accepted: usize,
    pub rejected: Vec<Rejected>,
}

/// Why a submission could not be applied; nothing of it was committed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ProcessError(pub String);

/// One request's events, waiting to be processed.
pub struct Submission {
    /// Accepted events, each with its tenant and position.
    pub events: Vec<Incoming>,
    /// Lines rejected at ingest: part of the answer.
    pub rejected: Vec<Rejected>,
    /// The request's idempotency key: its answer is stored with the commit.
    pub key: Option<String>,
    pub reply: oneshot::Sender<Result<Answer, ProcessError>>,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub alerts: AtomicU64,
    pub rule_failures: AtomicU64,
    pub commits: AtomicU64,
    /// Time spent running rules (routing, state lookups, Wasm), nanoseconds.
    pub rules_ns: AtomicU64,
    /// Time spent in durable commits, nanoseconds.
    pub commit_ns: AtomicU64,
    /// Time spent publishing to the alert sink, nanoseconds.
    pub publish_ns: AtomicU64,
}

pub struct Processor {
    catalogue: Arc<dyn Catalogue>,
    store: Arc<dyn StateStore>,
    sink: Arc<dyn AlertSink>,
    clock: Arc<dyn Clock>,
    /// Known state per bucket (`None`: known to have none). Filled on first
    /// use, updated only after a commit succeeds.
    cache: Mutex<HashMap<BucketId, Option<Arc<[u8]>>>>,
    live: broadcast::Sender<Arc<AlertRecord>>,
    stats: Stats,
    /// A publish failed: the outbox holds alerts older than the next batch's.
    outbox_behind: AtomicBool,
}

impl Processor {
    pub fn new(
        catalogue: Arc<dyn Catalogue>,
        store: Arc<dyn StateStore>,
        sink: Arc<dyn AlertSink>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Processor {
            catalogue,
            store,
            sink,
            clock,
            cache: Mutex::new(HashMap::new()),
            live: broadcast::channel(LIVE_ALERTS).0,
            stats: Stats::default(),
            outbox_behind: AtomicBool::new(false),
        }
    }

    pub fn catalogue(&self) -> &dyn Catalogue {
        self.catalogue.as_ref()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Alerts as they are published.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertRecord>> {
        self.live.subscribe()
    }

    /// Publish what a previous run committed but may not have published.
    pub fn recover(&self) -> Result<(), ProcessError> {
        let pending = self
            .store
            .unpublished()
            .map_err(|e| ProcessError(e.to_string()))?;
        self.publish(&pending)
    }

    fn publish(&self, alerts: &[AlertRecord]) -> Result<(), ProcessError> {
        let Some(last) = alerts.iter().filter_map(|a| a.seq).max() else {
            return Ok(());
        };
        self.sink
            .publish(alerts)
            .map_err(|e| ProcessError(e.to_string()))?;
        self.store
            .mark_published(last)
            .map_err(|e| ProcessError(e.to_string()))
    }

    /// The stored answer of an already applied request.
    pub fn receipt(&self, key: &str) -> Result<Option<Answer>, ProcessError> {
        let Some(bytes) = self
            .store
            .receipt(key)
            .map_err(|e| ProcessError(e.to_string()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ProcessError(format!("unreadable receipt for `{key}`: {e}")))
    }

    /// Process a group of submissions and answer each.
    pub fn process(&self, group: Vec<Submission>) {
        // A retried request may reach the queue while its first attempt is
        // committed; and two attempts may share a group.
        let mut fresh: Vec<Submission> = Vec::with_capacity(group.len());
        let mut waiting: HashMap<String, Vec<oneshot::Sender<Result<Answer, ProcessError>>>> =
            HashMap::new();
        for submission in group {
            if let Some(key) = &submission.key {
                match self.receipt(key) {
                    Ok(Some(answer)) => {
                        let _ = submission.reply.send(Ok(answer));
                        continue;
                    }
                    Err(e) => {
                        let _ = submission.reply.send(Err(e));
                        continue;
                    }
                    Ok(None) => {}
                }
                if fresh.iter().any(|s| s.key.as_ref() == Some(key)) {
                    waiting
                        .entry(key.clone())
                        .or_default()
                        .push(submission.reply);
                    continue;
                }
            }
            fresh.push(submission);
        }
        if fresh.is_empty() {
            return;
        }

        let result = self.apply(&fresh);
        for submission in fresh {
            let answer = result.clone().map(|()| answer_of(&submission));
            if let Some(key) = &submission.key {
                for reply in waiting.remove(key).unwrap_or_default() {
                    let _ = reply.send(answer.clone());
                }
            }
            let _ = submission.reply.send(answer);
        }
    }

    fn apply(&self, group: &[Submission]) -> Result<(), ProcessError> {
        let now = self.clock.now_ms();
        let tenants = pipeline::by_tenant(group.iter().flat_map(|s| &s.events));
        let started = Instant::now();
        let results: Vec<TenantRun> = tenants
            .par_iter()
            .map(|(tenant, events)| {
                pipeline::run_tenant(self.catalogue.as_ref(), tenant, events, now, |id| {
                    self.state(id).map(Prior::state)
                })
            })
            .collect::<Result<_, _>>()?;
        add_elapsed(&self.stats.rules_ns, started);

        let mut commit = Commit::default();
        let mut failures = 0;
        for result in results {
            failures += result.failures;
            for (id, outcome) in result.buckets {
                match outcome.state {
                    StateChange::Unchanged => {}
                    StateChange::Set(bytes) => commit.states.push((id.clone(), Some(bytes))),
                    StateChange::Delete => commit.states.push((id.clone(), None)),
                }
                match outcome.timer {
                    TimerChange::Keep => {}
                    TimerChange::Set(at) => commit.timers.push((id.clone(), Some(at))),
                    TimerChange::Cancel => commit.timers.push((id, None)),
                }
                commit.alerts.extend(outcome.alerts);
            }
        }
        for submission in group {
            if let Some(key) = &submission.key {
                let answer = serde_json::to_vec(&answer_of(submission)).expect("answers serialize");
                commit.receipts.push((key.clone(), answer));
            }
        }
        let changed: Vec<(BucketId, Option<Arc<[u8]>>)> = commit
            .states
            .iter()
            .map(|(id, state)| (id.clone(), state.as_deref().map(Arc::from)))
            .collect();

        let started = Instant::now();
        let alerts = self
            .store
            .commit(commit)
            .map_err(|e| ProcessError(e.to_string()))?;
        add_elapsed(&self.stats.commit_ns, started);
        self.cache.lock().expect("state cache lock").extend(changed);

        let events: usize = group.iter().map(|s| s.events.len()).sum();
        self.stats
            .events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.stats
            .alerts
            .fetch_add(alerts.len() as u64, Ordering::Relaxed);
        self.stats
            .rule_failures
            .fetch_add(failures, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);

        // Committed: from here on a failure only delays publishing, and the
        // outbox holds the alerts until it succeeds.
        let started = Instant::now();
        let published = if self.outbox_behind.load(Ordering::Relaxed) {
            self.recover()
        } else {
            self.publish(&alerts)
        };
        self.outbox_behind
            .store(published.is_err(), Ordering::Relaxed);
        if let Err(error) = published {
            tracing::error!(%error, "cannot publish alerts; they stay in the outbox");
        }
        add_elapsed(&self.stats.publish_ns, started);
        for alert in alerts {
            let _ = self.live.send(Arc::new(alert));
        }
        Ok(())
    }

    /// A bucket's state: from the cache, else from the store.
    fn state(&self, id: &BucketId) -> Result<Option<Arc<[u8]>>, ProcessError> {
        if let Some(known) = self.cache.lock().expect("state cache lock").get(id) {
            return Ok(known.clone());
        }
        let loaded = self
            .store
            .load(std::slice::from_ref(id))
            .map_err(|e| ProcessError(format!("cannot read the state of {id:?}: {e}")))?
            .pop()
            .flatten()
            .map(Arc::from);
        self.cache
            .lock()
            .expect("state cache lock")
            .insert(id.clone(), loaded.clone());
        Ok(loaded)
    }
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

fn answer_of(submission: &Submission) -> Answer {
    Answer {
        accepted: submission.events.len(),
        rejected: submission.rejected.clone(),
    }
}

/// Feed submissions to the processor, grouping what queued up, until the
/// channel closes; then return once the last group is answered.
pub async fn run(
    processor: Arc<Processor>,
    mut queue: mpsc::Receiver<Submission>,
    max_events: usize,
) {
    while let Some(first) = queue.recv().await {
        let mut events = first.events.len();
        let mut group = vec![first];
        while events < max_events {
            match queue.try_recv() {
                Ok(next) => {
                    events += next.events.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let processor = processor.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || processor.process(group)).await {
            tracing::error!(%error, "processing a batch failed; its requests get no answer");
        }
    }
}
