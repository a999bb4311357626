//! An engine on a store in a temporary directory, driven one batch at a
//! time with a clock the caller moves: what `tocsin rule test`'s fuzz
//! target and the behaviour tests run rules through, so every way a rule
//! runs is the engine the hosts run (routing, bisection, dead letters,
//! timers, the alert lifecycle, state across calls). Not for serving: a
//! scratch engine answers nobody, records no source progress and keeps its
//! state only until it is dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{Batch, Engine, EngineError, Lane, Rejection};
use crate::alert::AlertRecord;
use crate::catalogue::Catalogue;
use crate::clock::{Clock, ManualClock};
use crate::event::Incoming;
use crate::runtime::{StateChange, TimerChange};
use crate::sink::{AlertSink, SinkError};
use crate::store::embedded::EmbeddedStore;
use crate::store::{AlertLog, BucketId, BucketWrite, Commit, Progress, StateStore, StoreError};

/// The partition of a scratch engine's one lane.
const PARTITION: &str = "scratch";

/// What one batch (or one move of the clock) did.
#[derive(Debug, Clone, Default)]
pub struct Ran {
    /// The alerts published, in order.
    pub alerts: Vec<AlertRecord>,
    /// The events (by index in the batch) a rule did not apply, and why.
    pub rejected: Vec<Rejection>,
    /// Timers fired.
    pub timers: u64,
}

/// Why a scratch engine could not run.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("cannot make a scratch store: {0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Alerts kept in memory as they are published.
#[derive(Default)]
struct Published(Mutex<Vec<AlertRecord>>);

#[async_trait::async_trait]
impl AlertSink for Published {
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        self.0
            .lock()
            .expect("published lock")
            .extend_from_slice(alerts);
        Ok(())
    }
}

/// An engine over `catalogue`'s rules on a scratch store. Its methods block
/// on a runtime of its own: call them from a thread that is not driving an
/// async runtime.
pub struct Scratch {
    engine: Arc<Engine>,
    lane: Arc<Lane>,
    clock: Arc<ManualClock>,
    store: Arc<EmbeddedStore>,
    published: Arc<Published>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Scratch {
    /// A scratch engine whose clock starts at `now` (epoch milliseconds).
    /// Its batches are kept whole (no tenant is run apart), so alerts come
    /// in the batch's order.
    pub fn new(catalogue: Arc<dyn Catalogue>, now: i64) -> Result<Self, ScratchError> {
        let dir = tempfile::tempdir().map_err(|e| ScratchError::Setup(e.to_string()))?;
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb"))?);
        let clock = Arc::new(ManualClock::new(now));
        let published = Arc::new(Published::default());
        let engine = Arc::new(
            Engine::new(catalogue, store.clone(), published.clone(), clock.clone())
                .with_fair_share(None),
        );
        // The engine blocks on the store from its rule threads: a worker
        // of its own drives that while the caller waits.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| ScratchError::Setup(e.to_string()))?;
        Ok(Scratch {
            engine,
            lane: Arc::new(Lane::new(PARTITION)),
            clock,
            store,
            published,
            runtime,
            _dir: dir,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's clock, epoch milliseconds.
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// One batch of `events` at the clock's time, after the timers due by
    /// then.
    pub fn run(&self, events: Vec<Incoming>) -> Result<Ran, ScratchError> {
        self.runtime.block_on(async {
            let now = self.clock.now_ms();
            let timers = self
                .engine
                .run_clock_to(&self.lane, &self.clock, now)
                .await?;
            let committed = self
                .engine
                .process(&self.lane, &Batch::new(events, Progress::none()))
                .await?;
            Ok(Ran {
                alerts: self.take_published(),
                rejected: committed.rejected.clone(),
                timers,
            })
        })
    }

    /// Move the clock on to `to`, firing each timer due by then at its due
    /// time, in order.
    pub fn advance_to(&self, to: i64) -> Result<Ran, ScratchError> {
        self.runtime.block_on(async {
            let timers = self
                .engine
                .run_clock_to(&self.lane, &self.clock, to)
                .await?;
            self.engine.flush(&self.lane).await?;
            Ok(Ran {
                alerts: self.take_published(),
                rejected: Vec::new(),
                timers,
            })
        })
    }

    /// Store each state as its bucket's, as if an earlier batch had left
    /// them (one commit).
    pub fn put_states(
        &self,
        states: impl IntoIterator<Item = (BucketId, Vec<u8>)>,
    ) -> Result<(), ScratchError> {
        let writes = states
            .into_iter()
            .map(|(id, state)| BucketWrite {
                id,
                state: StateChange::Set(state),
                timer: TimerChange::Keep,
                alerts: Vec::new(),
                ttl_ms: None,
            })
            .collect();
        self.runtime.block_on(async {
            self.store
                .commit(Commit {
                    writes,
                    progress: Progress::none(),
                    partition: PARTITION.to_owned(),
                    now_ms: self.clock.now_ms(),
                })
                .await?;
            Ok(())
        })
    }

    /// Every bucket of `tenant` holding state, with it.
    pub fn states(&self, tenant: &str) -> Result<BTreeMap<BucketId, Vec<u8>>, ScratchError> {
        let log: &dyn AlertLog = self.store.as_ref();
        Ok(log.buckets(tenant)?.into_iter().collect())
    }

    fn take_published(&self) -> Vec<AlertRecord> {
        std::mem::take(&mut *self.published.0.lock().expect("published lock"))
    }
}
