//! The engine's promises under failure: a failed commit fails what was
//! computed on top of it and nothing is applied twice; retries in flight
//! wait for their answer; a panicking commit answers its requests and the
//! lane goes on.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use tocsin_test_support::components;
use tokio::sync::Semaphore;

use super::*;
use crate::catalogue::{Assignment, StaticCatalogue};
use crate::clock::ManualClock;
use crate::event::Incoming;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::sink::SinkError;
use crate::source::http::{HttpIngest, Refusal};
use crate::store::embedded::EmbeddedStore;
use crate::store::{
    BucketId, Commit, Outbox, OutboxMark, Prior, Progress, Result as StoreResult, StoreError,
};

/// The embedded store, whose commits fail while `failing` is set, panic
/// while `panicking` is, and wait for a permit while `gated` is.
struct Flaky {
    inner: EmbeddedStore,
    failing: AtomicBool,
    panicking: AtomicBool,
    gated: AtomicBool,
    gate: Semaphore,
    /// Commits waiting at the gate.
    waiting: AtomicU64,
}

#[async_trait::async_trait]
impl StateStore for Flaky {
    fn max_state_bytes(&self) -> usize {
        self.inner.max_state_bytes()
    }
    async fn load(&self, ids: &[BucketId], partition: &str) -> StoreResult<Vec<Prior>> {
        self.inner.load(ids, partition).await
    }
    fn forget(&self, ids: &[BucketId]) {
        self.inner.forget(ids)
    }
    fn timer_partitions(&self) -> Vec<String> {
        self.inner.timer_partitions()
    }
    fn partitions_finished(&self, partitions: &[String]) {
        self.inner.partitions_finished(partitions)
    }
    async fn receipt(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.receipt(key).await
    }
    async fn commit(&self, commit: Commit) -> StoreResult<Outbox> {
        if self.gated.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.expect("gate open").forget();
        }
        if self.panicking.swap(false, Ordering::SeqCst) {
            panic!("the store panicked on purpose");
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("disk full on purpose".to_owned()));
        }
        self.inner.commit(commit).await
    }
    async fn unpublished(&self, partition: &str) -> StoreResult<Outbox> {
        self.inner.unpublished(partition).await
    }
    async fn published(&self, mark: OutboxMark) -> StoreResult<()> {
        self.inner.published(mark).await
    }
    async fn due_timers(
        &self,
        partition: &str,
        until: i64,
        limit: usize,
    ) -> StoreResult<Vec<(BucketId, i64)>> {
        self.inner.due_timers(partition, until, limit).await
    }
    async fn next_timer(&self, partition: &str) -> StoreResult<Option<i64>> {
        self.inner.next_timer(partition).await
    }
    async fn pending_timers(&self, ids: &[BucketId]) -> StoreResult<Vec<Option<i64>>> {
        self.inner.pending_timers(ids).await
    }
    async fn expired(
        &self,
        partition: &str,
        until: i64,
        limit: usize,
    ) -> StoreResult<Vec<(BucketId, i64)>> {
        self.inner.expired(partition, until, limit).await
    }
    async fn next_expiry(&self, partition: &str) -> StoreResult<Option<i64>> {
        self.inner.next_expiry(partition).await
    }
}

#[derive(Default)]
struct Collected(Mutex<Vec<AlertRecord>>);

#[async_trait::async_trait]
impl AlertSink for Collected {
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        self.0.lock().unwrap().extend_from_slice(alerts);
        Ok(())
    }
}

struct Fixture {
    engine: Arc<Engine>,
    store: Arc<Flaky>,
    sink: Arc<Collected>,
    _dir: tempfile::TempDir,
}

/// client-01 running `test-event`, whose alert keys count the tenant's
/// test events: applying one twice, or losing one, shows in the keys.
pub(crate) fn test_event_catalogue() -> StaticCatalogue {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let assignment = Assignment::new("client-01", components::TEST_EVENT);
    StaticCatalogue::load(&runtime, &[assignment]).unwrap()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let catalogue = test_event_catalogue();
    let store = Arc::new(Flaky {
        inner: EmbeddedStore::open(&dir.path().join("state.redb")).unwrap(),
        failing: AtomicBool::new(false),
        panicking: AtomicBool::new(false),
        gated: AtomicBool::new(false),
        gate: Semaphore::new(0),
        waiting: AtomicU64::new(0),
    });
    let sink = Arc::new(Collected::default());
    let engine = Arc::new(Engine::new(
        Arc::new(catalogue),
        store.clone(),
        sink.clone(),
        Arc::new(ManualClock::new(1_000)),
    ));
    Fixture {
        engine,
        store,
        sink,
        _dir: dir,
    }
}

const TEST_EVENT: &str = r#"{"eventType":"test-event","clientId":"client-01"}"#;

fn batch(position: &str) -> Batch {
    let mut event = Incoming::parse(TEST_EVENT, "clientId", 1).unwrap();
    event.position = position.to_owned();
    Batch::new(vec![event], Progress::none())
}

fn keys(sink: &Collected) -> Vec<String> {
    let alerts = sink.0.lock().unwrap();
    alerts.iter().map(|a| a.key.clone()).collect()
}

/// The sink's keys once it holds `count` alerts: the HTTP lane answers
/// when a batch is committed and publishes just after.
async fn published(sink: &Collected, count: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while sink.0.lock().unwrap().len() < count && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    keys(sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_fails_the_batch_computed_on_top_of_it_and_retries_apply_once() {
    let f = fixture();
    let lane = Arc::new(Lane::new("test"));
    f.engine.flush(&lane).await.unwrap();
    let first = f.engine.compute(&lane, batch("a:1")).await.unwrap();
    // Computed on the state the first batch left, before its commit.
    let second = f.engine.compute(&lane, batch("b:1")).await.unwrap();

    f.store.failing.store(true, Ordering::SeqCst);
    let error = f.engine.commit(&lane, first).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "state store unavailable: disk full on purpose"
    );
    assert!(error.retryable());
    f.store.failing.store(false, Ordering::SeqCst);
    let error = f.engine.commit(&lane, second).await.unwrap_err();
    assert!(matches!(error, EngineError::Stale), "{error}");
    assert!(keys(&f.sink).is_empty(), "nothing was published");

    // The sources retry: each event counts once, from the durable state.
    for position in ["a:1", "b:1"] {
        f.engine.process(&lane, &batch(position)).await.unwrap();
    }
    assert_eq!(keys(&f.sink), ["test-event-1", "test-event-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_too_far_behind_while_run_apart_has_its_events_dead_lettered() {
    let f = fixture();
    let lane = Arc::new(Lane::new("test"));
    f.engine.flush(&lane).await.unwrap();
    lane.parts
        .lock()
        .unwrap()
        .hold("client-01", super::apart::MAX_BEHIND);
    let computed = f.engine.compute(&lane, batch("a:1")).await.unwrap();
    let rejected = computed.rejected().to_vec();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].cause.name(), "behind");
    assert!(
        rejected[0]
            .reason
            .starts_with("tenant `client-01` is 8 batches behind on `test`"),
        "{}",
        rejected[0].reason
    );
    let committed = f.engine.commit(&lane, computed).await.unwrap();
    assert_eq!(committed.alerts, 0, "not applied");
}

async fn ingest(f: &Fixture) -> Arc<HttpIngest> {
    HttpIngest::start(f.engine.clone(), "clientId", 1_000, 1 << 20, true)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_request_in_flight_waits_for_its_answer_and_applies_nothing() {
    let f = fixture();
    let ingest = ingest(&f).await;
    f.store.gated.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let ingest = ingest.clone();
        async move { ingest.submit(TEST_EVENT, Some("k".into())).await }
    });
    // The retry arrives while the first is held at its commit.
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while f.store.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first request reaches its commit");
    let retry = tokio::spawn({
        let ingest = ingest.clone();
        async move { ingest.submit(TEST_EVENT, Some("k".into())).await }
    });
    let reused = tokio::spawn({
        let ingest = ingest.clone();
        async move {
            let other = r#"{"eventType":"other","clientId":"client-01"}"#;
            ingest.submit(other, Some("k".into())).await
        }
    });
    f.store.gated.store(false, Ordering::SeqCst);
    f.store.gate.add_permits(10);
    let reused = reused.await.unwrap();
    assert!(
        matches!(reused, Err(Refusal::KeyReused(ref key)) if key == "k"),
        "{reused:?}"
    );
    assert_eq!(first.await.unwrap().unwrap().accepted, 1);
    assert_eq!(retry.await.unwrap().unwrap().accepted, 1);

    // And once committed, a retry is answered from the receipt.
    let late = ingest.submit(TEST_EVENT, Some("k".into())).await.unwrap();
    assert_eq!(late.accepted, 1);
    assert_eq!(published(&f.sink, 1).await, ["test-event-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_commit_answers_its_requests_and_the_lane_goes_on() {
    let f = fixture();
    let ingest = ingest(&f).await;
    f.store.panicking.store(true, Ordering::SeqCst);
    // Each answer in bounded time: none may wait forever.
    let submit = |key: Option<&str>| {
        let ingest = ingest.clone();
        let key = key.map(str::to_owned);
        async move {
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                ingest.submit(TEST_EVENT, key),
            )
            .await
            .expect("answered")
        }
    };
    let answer = submit(Some("p")).await;
    assert!(matches!(answer, Err(Refusal::NotApplied(_))), "{answer:?}");
    assert!(ingest.running(), "the lane still takes requests");
    // The key is free again: the retry is applied, once.
    let retry = submit(Some("p")).await.unwrap();
    assert_eq!(retry.accepted, 1);
    let other = submit(None).await.unwrap();
    assert_eq!(other.accepted, 1);
    assert_eq!(
        published(&f.sink, 2).await,
        ["test-event-1", "test-event-2"]
    );
}
