//! The service's core: takes submitted batches of events, runs every
//! tenant's rules over them (tenants in parallel), commits new states, alerts
//! and idempotency receipts in one atomic write, then publishes the alerts and
//! answers the submitters. Nothing here names a backend: the catalogue, the
//! state store and the alert sink are traits.
//!
//! Submissions are processed in groups, in two stages that overlap: while
//! one group is committed (and published, and answered) by the committer
//! thread, the rules of the next group already run on the states the first
//! one left. Everything that queued while a group was processed forms the
//! next group, so one fsync serves many requests under load. A single
//! committer keeps bucket state consistent without locks per bucket.
//!
//! Running ahead of the commit is safe because nothing is answered before
//! its own commit: if a commit fails, every group computed on top of it fails
//! too, the state cache is dropped, and their submitters retry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as sync_mpsc};
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
    pub reply: Reply,
}

type Reply = oneshot::Sender<Result<Answer, ProcessError>>;

/// A group whose rules ran, waiting for its commit.
pub struct Computed {
    submissions: Vec<Submission>,
    commit: Commit,
    events: usize,
    failures: u64,
    /// The cache generation the rules read: see [`StateCache`].
    generation: u64,
}

/// Known state per bucket (`None`: known to have none): what the store
/// holds plus what groups computed but not yet committed changed.
#[derive(Default)]
struct StateCache {
    states: HashMap<BucketId, Option<Arc<[u8]>>>,
    /// Raised when a commit fails and the cache is dropped: groups computed
    /// on an older generation rest on states that never became durable.
    generation: u64,
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
    cache: Mutex<StateCache>,
    /// Idempotency keys of submissions computed but not yet answered, with
    /// the replies of retries that arrived meanwhile.
    inflight: Mutex<HashMap<String, Vec<Reply>>>,
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
            cache: Mutex::new(StateCache::default()),
            inflight: Mutex::new(HashMap::new()),
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

    /// Process a group of submissions and answer each: both stages in turn.
    pub fn process(&self, group: Vec<Submission>) {
        if let Some(computed) = self.compute(group) {
            self.finish(computed);
        }
    }

    /// The first stage: answer retries of requests already applied, run the
    /// rules of the rest, and leave their new states in the cache for the
    /// next group. `None` when nothing is left to commit.
    pub fn compute(&self, group: Vec<Submission>) -> Option<Computed> {
        let mut fresh: Vec<Submission> = Vec::with_capacity(group.len());
        {
            // Under the lock, so a key is either in flight or has its
            // receipt stored (the committer drops it only after the commit).
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for submission in group {
                let Some(key) = &submission.key else {
                    fresh.push(submission);
                    continue;
                };
                if let Some(waiting) = inflight.get_mut(key) {
                    waiting.push(submission.reply);
                    continue;
                }
                match self.receipt(key) {
                    Ok(Some(answer)) => {
                        let _ = submission.reply.send(Ok(answer));
                    }
                    Err(e) => {
                        let _ = submission.reply.send(Err(e));
                    }
                    Ok(None) => {
                        inflight.insert(key.clone(), Vec::new());
                        fresh.push(submission);
                    }
                }
            }
        }
        if fresh.is_empty() {
            return None;
        }
        let generation = self.cache.lock().expect("state cache lock").generation;
        // A panic here would otherwise leave the keys in flight for good,
        // and every retry of them waiting.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_rules(&fresh, generation)
        }))
        .unwrap_or_else(|_| Err(ProcessError("processing the batch panicked".to_owned())));
        match run {
            Ok((commit, failures)) => Some(Computed {
                events: fresh.iter().map(|s| s.events.len()).sum(),
                submissions: fresh,
                commit,
                failures,
                generation,
            }),
            Err(error) => {
                self.answer(fresh, Err(error));
                None
            }
        }
    }

    fn run_rules(
        &self,
        group: &[Submission],
        generation: u64,
    ) -> Result<(Commit, u64), ProcessError> {
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

        // The next group runs on these states before they are committed.
        let mut cache = self.cache.lock().expect("state cache lock");
        if cache.generation != generation {
            return Err(stale_group());
        }
        cache.states.extend(
            commit
                .states
                .iter()
                .map(|(id, state)| (id.clone(), state.as_deref().map(Arc::from))),
        );
        Ok((commit, failures))
    }

    /// The second stage: commit a computed group, publish its alerts and
    /// answer its submitters. Groups must be finished in the order they were
    /// computed.
    pub fn finish(&self, computed: Computed) {
        let Computed {
            submissions,
            commit,
            events,
            failures,
            generation,
        } = computed;
        if self.cache.lock().expect("state cache lock").generation != generation {
            self.answer(submissions, Err(stale_group()));
            return;
        }
        let started = Instant::now();
        let alerts = match self.store.commit(commit) {
            Ok(alerts) => alerts,
            Err(error) => {
                // The cache holds states of this group and of any computed
                // on top of it: none of them is durable now.
                let mut cache = self.cache.lock().expect("state cache lock");
                cache.generation += 1;
                cache.states.clear();
                drop(cache);
                self.answer(submissions, Err(ProcessError(error.to_string())));
                return;
            }
        };
        add_elapsed(&self.stats.commit_ns, started);
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
        self.answer(submissions, Ok(()));
    }

    /// Answer each submission (and the retries waiting on its key) and let
    /// its key be processed again.
    fn answer(&self, submissions: Vec<Submission>, result: Result<(), ProcessError>) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        for submission in submissions {
            let answer = result.clone().map(|()| answer_of(&submission));
            if let Some(key) = &submission.key {
                for reply in inflight.remove(key).unwrap_or_default() {
                    let _ = reply.send(answer.clone());
                }
            }
            let _ = submission.reply.send(answer);
        }
    }

    /// A bucket's state: from the cache, else from the store.
    fn state(&self, id: &BucketId) -> Result<Option<Arc<[u8]>>, ProcessError> {
        if let Some(known) = self.cache.lock().expect("state cache lock").states.get(id) {
            return Ok(known.clone());
        }
        let loaded = self
            .store
            .load(std::slice::from_ref(id))
            .map_err(|e| ProcessError(format!("cannot read the state of {id:?}: {e}")))?
            .pop()
            .flatten()
            .map(Arc::from);
        // What the store holds is what the cache lacked, whatever the
        // generation: a state changed by a group in flight is in the cache.
        self.cache
            .lock()
            .expect("state cache lock")
            .states
            .insert(id.clone(), loaded.clone());
        Ok(loaded)
    }
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

fn stale_group() -> ProcessError {
    ProcessError(
        "an earlier batch could not be committed; nothing of this one was applied, retry it"
            .to_owned(),
    )
}

fn answer_of(submission: &Submission) -> Answer {
    Answer {
        accepted: submission.events.len(),
        rejected: submission.rejected.clone(),
    }
}

/// Feed submissions to the processor, grouping what queued up, until the
/// channel closes; then return once the last group is answered. Rules run
/// here; commits on a thread of their own, one group behind.
pub async fn run(
    processor: Arc<Processor>,
    mut queue: mpsc::Receiver<Submission>,
    max_events: usize,
) {
    // A rendezvous: a computed group waits for the committer, and what
    // queues meanwhile forms a larger next group. At most two groups are in
    // flight, so a failed commit takes at most the one behind it down too.
    let (computed, to_commit) = sync_mpsc::sync_channel::<Computed>(0);
    let committer = {
        let processor = processor.clone();
        std::thread::Builder::new()
            .name("tocsin-commit".to_owned())
            .spawn(move || {
                for group in to_commit {
                    processor.finish(group);
                }
            })
            .expect("spawn the commit thread")
    };
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
        let computed = computed.clone();
        let stage = tokio::task::spawn_blocking(move || {
            if let Some(group) = processor.compute(group) {
                // Waits while the committer is a group behind.
                let _ = computed.send(group);
            }
        });
        if let Err(error) = stage.await {
            tracing::error!(%error, "processing a batch failed; its requests get no answer");
        }
    }
    drop(computed);
    if tokio::task::spawn_blocking(move || committer.join())
        .await
        .map_or(true, |joined| joined.is_err())
    {
        tracing::error!("the commit thread failed; the last batches got no answer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{Assignment, StaticCatalogue};
    use crate::clock::ManualClock;
    use crate::runtime::{Runtime, RuntimeConfig};
    use crate::sink::{AlertSink, SinkError};
    use crate::store::StoreError;
    use crate::store::embedded::EmbeddedStore;
    use tocsin_test_support::components;

    /// The embedded store, whose commits fail while `failing` is set.
    struct Flaky {
        inner: EmbeddedStore,
        failing: AtomicBool,
    }

    impl StateStore for Flaky {
        fn load(&self, ids: &[BucketId]) -> crate::store::Result<Vec<Option<Vec<u8>>>> {
            self.inner.load(ids)
        }
        fn receipt(&self, key: &str) -> crate::store::Result<Option<Vec<u8>>> {
            self.inner.receipt(key)
        }
        fn commit(&self, commit: Commit) -> crate::store::Result<Vec<AlertRecord>> {
            if self.failing.load(Ordering::Relaxed) {
                return Err(StoreError("disk full on purpose".to_owned()));
            }
            self.inner.commit(commit)
        }
        fn unpublished(&self) -> crate::store::Result<Vec<AlertRecord>> {
            self.inner.unpublished()
        }
        fn mark_published(&self, seq: u64) -> crate::store::Result<()> {
            self.inner.mark_published(seq)
        }
    }

    #[derive(Default)]
    struct Collected(Mutex<Vec<AlertRecord>>);

    impl AlertSink for Collected {
        fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
            self.0.lock().unwrap().extend_from_slice(alerts);
            Ok(())
        }
    }

    struct Fixture {
        processor: Processor,
        store: Arc<Flaky>,
        sink: Arc<Collected>,
        _dir: tempfile::TempDir,
    }

    /// client-01 runs `test-event`, whose alert keys count the tenant's
    /// test events: applying one twice, or losing one, shows in the keys.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: None,
            max_instances: 4,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let assignment = Assignment {
            tenant: "client-01".to_owned(),
            path: components::TEST_EVENT.into(),
        };
        let catalogue = StaticCatalogue::load(&runtime, &[assignment]).unwrap();
        let store = Arc::new(Flaky {
            inner: EmbeddedStore::open(&dir.path().join("state.redb")).unwrap(),
            failing: AtomicBool::new(false),
        });
        let sink = Arc::new(Collected::default());
        let processor = Processor::new(
            Arc::new(catalogue),
            store.clone(),
            sink.clone(),
            Arc::new(ManualClock::new(1_000)),
        );
        Fixture {
            processor,
            store,
            sink,
            _dir: dir,
        }
    }

    type Answered = oneshot::Receiver<Result<Answer, ProcessError>>;

    /// One request of one test event under idempotency key `key`.
    fn request(key: &str) -> (Submission, Answered) {
        let mut event = Incoming::parse(
            r#"{"eventType":"test-event","clientId":"client-01"}"#,
            "clientId",
            1,
        )
        .unwrap();
        event.position = format!("{key}:1");
        let (reply, answered) = oneshot::channel();
        let submission = Submission {
            events: vec![event],
            rejected: Vec::new(),
            key: Some(key.to_owned()),
            reply,
        };
        (submission, answered)
    }

    fn keys(sink: &Collected) -> Vec<String> {
        sink.0
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.key.clone())
            .collect()
    }

    fn accepted(answered: Answered) -> usize {
        answered.blocking_recv().unwrap().unwrap().accepted
    }

    #[test]
    fn a_failed_commit_fails_the_group_computed_on_top_of_it_and_retries_apply_once() {
        let f = fixture();
        let (first, first_answer) = request("a");
        let (second, second_answer) = request("b");
        let first = f.processor.compute(vec![first]).unwrap();
        // Computed on the state the first group left, before its commit.
        let second = f.processor.compute(vec![second]).unwrap();

        f.store.failing.store(true, Ordering::Relaxed);
        f.processor.finish(first);
        f.store.failing.store(false, Ordering::Relaxed);
        f.processor.finish(second);
        let error = first_answer.blocking_recv().unwrap().unwrap_err();
        assert_eq!(error.to_string(), "state store: disk full on purpose");
        let error = second_answer.blocking_recv().unwrap().unwrap_err();
        assert!(error.to_string().contains("retry it"), "{error}");
        assert!(keys(&f.sink).is_empty(), "nothing was published");

        // The clients retry: each event counts once, from the durable state.
        for key in ["a", "b"] {
            let (retry, answer) = request(key);
            f.processor.process(vec![retry]);
            assert_eq!(accepted(answer), 1);
        }
        assert_eq!(keys(&f.sink), ["test-event-1", "test-event-2"]);
    }

    #[test]
    fn a_retry_of_a_request_still_in_flight_waits_for_its_answer_and_applies_nothing() {
        let f = fixture();
        let (first, first_answer) = request("a");
        let computed = f.processor.compute(vec![first]).unwrap();
        let (retry, retry_answer) = request("a");
        assert!(
            f.processor.compute(vec![retry]).is_none(),
            "nothing new to commit"
        );
        f.processor.finish(computed);
        assert_eq!(accepted(first_answer), 1);
        assert_eq!(accepted(retry_answer), 1);

        // And once committed, a retry is answered from the receipt.
        let (late, late_answer) = request("a");
        f.processor.process(vec![late]);
        assert_eq!(accepted(late_answer), 1);
        assert_eq!(keys(&f.sink), ["test-event-1"]);
    }
}
