//! Timers fired on the host's clock: a timer a rule asked for is fired
//! within a second of due even when no event arrives (at once when a test
//! moves the clock by hand), committed atomically with its outcome. Buckets
//! untouched past their rule's state time-to-live are removed the same way.
//! Nothing is kept in memory: the store's indexes by due time are read again
//! before each wait, so timers survive a restart and fire after it.
//!
//! Who fires them:
//! - With the HTTP ingest on a store only this host writes ([`drive`]), its
//!   one lane: through the lane like a request, so they are ordered with
//!   the events of their bucket.
//! - Otherwise ([`TimerPartitions`]: Kinesis on any store, HTTP hosts
//!   sharing DynamoDB), the holder of each of the store's timer partitions'
//!   leases, through a lane of the partition's own, fenced by that lease;
//!   the bucket's version orders a firing against events that another
//!   host's lane commits to the same bucket. A host that crashes with
//!   timers pending loses its leases when they expire, and the hosts that
//!   take them over fire what is due, late by at most the lease duration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::SourceError;
use super::http::{HttpIngest, PARTITION};
use super::leases::{Lease, Leased, Leases, coordinate};
use crate::engine::{Engine, EngineError, Lane};
use crate::store::{Fence, Progress, StoreError};

/// How often the partitions are listed again: they never change, so only
/// to create a lease that could not be created before.
const LIST_EVERY: Duration = Duration::from_secs(60);

/// The store's timer partitions, shared among the hosts under leases: a
/// worker fires each held partition's due timers.
pub struct TimerPartitions {
    /// The partitions held now.
    pub held: Arc<Mutex<Vec<String>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl TimerPartitions {
    /// Start sharing `partitions` (leases of the group `leases` names) as
    /// host `me`, until `stop` is set; `held` lists those it holds.
    pub fn start(
        engine: Arc<Engine>,
        leases: Leases,
        partitions: Vec<String>,
        me: &str,
        lease_duration: Duration,
        held: Arc<Mutex<Vec<String>>>,
        stop: watch::Receiver<bool>,
    ) -> TimerPartitions {
        let task = tokio::spawn(coordinate(
            Arc::new(Partitions {
                engine,
                held: held.clone(),
                partitions,
                me: me.to_owned(),
                leases: leases.clone(),
            }),
            leases,
            me.to_owned(),
            lease_duration,
            stop,
        ));
        TimerPartitions {
            held,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }
}

#[async_trait::async_trait]
impl super::Source for TimerPartitions {
    fn not_ready(&self) -> Option<String> {
        None
    }

    /// Every worker finished its firing and released its lease.
    async fn join(&self) {
        if let Some(task) = self.task.lock().await.take()
            && let Err(error) = task.await
        {
            tracing::error!(%error, "the timer partitions' coordinator failed");
        }
    }
}

struct Partitions {
    engine: Arc<Engine>,
    held: Arc<Mutex<Vec<String>>>,
    partitions: Vec<String>,
    me: String,
    leases: Leases,
}

#[async_trait::async_trait]
impl Leased for Partitions {
    async fn list(&self) -> Result<Vec<(String, Vec<String>)>, SourceError> {
        Ok(self
            .partitions
            .iter()
            .map(|p| (p.clone(), Vec::new()))
            .collect())
    }

    fn list_every(&self) -> Duration {
        LIST_EVERY
    }

    fn held(&self, names: Vec<String>) {
        *self.held.lock().expect("held lock") = names;
    }

    fn start(
        &self,
        lease: Lease,
        epoch: u64,
        stop: watch::Receiver<bool>,
        lost: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let fence = Fence {
            stream: self.leases.group().to_owned(),
            shard: lease.shard,
            owner: self.me.clone(),
            epoch,
        };
        tokio::spawn(fire_partition(
            self.engine.clone(),
            self.leases.clone(),
            fence,
            stop,
            lost,
        ))
    }
}

/// The longest wait between looks at the HTTP lane's next timer: a timer
/// set meanwhile by another writer is seen within it.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between looks at a timer partition's index: timers set
/// by other hosts are seen within it, so they fire within a second of due.
/// Each look is one DynamoDB query of one item.
const PARTITION_WAIT: Duration = Duration::from_millis(500);

/// Fire `ingest`'s due timers until it is dropped.
pub(super) async fn drive(ingest: Weak<HttpIngest>) {
    let mut failures = 0;
    loop {
        let Some(host) = ingest.upgrade() else {
            return;
        };
        let engine = host.engine().clone();
        let wake = Wake::new(&engine);
        let now = engine.clock().now_ms();
        let wait = match engine.next_due(PARTITION).await {
            Ok(Some(due)) if due <= now => match host.fire_timers(now).await {
                Ok(fired) => {
                    failures = 0;
                    if fired > 0 {
                        continue;
                    }
                    // Due, but its tenant's events are still being run
                    // apart: once its parts are in.
                    MAX_WAIT
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "cannot fire due timers; trying again");
                    crate::backoff::delay(failures)
                }
            },
            Ok(next) => {
                failures = 0;
                until(next, now, MAX_WAIT)
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "cannot read the next timer");
                crate::backoff::delay(failures)
            }
        };
        drop(host);
        wake.after(wait, None).await;
    }
}

/// Fire the due timers of the timer partition `fence` leases, until the
/// host stops or the lease is lost; then release it.
async fn fire_partition(
    engine: Arc<Engine>,
    leases: Leases,
    fence: Fence,
    mut stop: watch::Receiver<bool>,
    lost: Arc<AtomicBool>,
) {
    let partition = fence.shard.clone();
    let lane = Arc::new(Lane::new(&partition));
    let stopping = |stop: &watch::Receiver<bool>| *stop.borrow() || lost.load(Ordering::Relaxed);
    let mut failures = 0;
    // What the partition's previous holder fired but may not have published.
    while let Err(error) = engine.flush(&lane).await {
        tracing::warn!(%partition, %error, "cannot publish the timer partition's outbox");
        failures += 1;
        crate::backoff::sleep(failures).await;
        if stopping(&stop) {
            break;
        }
    }
    while !stopping(&stop) {
        let wake = Wake::new(&engine);
        let now = engine.clock().now_ms();
        let wait = match engine.next_due(&partition).await {
            Ok(Some(due)) if due <= now => {
                let progress = Progress::timers(fence.clone());
                match engine.fire_timers(&lane, now, progress).await {
                    Ok(fired) => {
                        failures = 0;
                        if fired > 0 {
                            continue;
                        }
                        PARTITION_WAIT
                    }
                    Err(EngineError::Store(StoreError::Fenced(_))) => {
                        tracing::warn!(%partition, "timer partition's lease lost: firing discarded");
                        lost.store(true, Ordering::Relaxed);
                        break;
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(%partition, %error, "cannot fire due timers; trying again");
                        crate::backoff::delay(failures)
                    }
                }
            }
            Ok(next) => {
                failures = 0;
                until(next, now, PARTITION_WAIT)
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%partition, %error, "cannot read the timer partition's next timer");
                crate::backoff::delay(failures)
            }
        };
        wake.after(wait, Some(&mut stop)).await;
    }
    engine.settle(&lane).await;
    if !lost.load(Ordering::Relaxed) {
        match leases.release(&partition, &fence.owner, fence.epoch).await {
            Ok(_) => tracing::info!(%partition, "timer partition's lease released"),
            Err(error) => {
                tracing::warn!(%partition, %error, "cannot release the timer partition's lease")
            }
        }
    }
}

/// How long to wait for `next` (due, epoch milliseconds) from `now`, at
/// most `longest`.
fn until(next: Option<i64>, now: i64, longest: Duration) -> Duration {
    next.map_or(longest, |due| {
        Duration::from_millis(due.saturating_sub(now).max(0) as u64).min(longest)
    })
}

/// What ends a wait early: the host's clock moved by hand (a test), or a
/// commit on this host set a timer.
struct Wake {
    moved: Option<watch::Receiver<i64>>,
    set: watch::Receiver<u64>,
}

impl Wake {
    /// Taken before reading the next timer, so nothing set after is missed.
    fn new(engine: &Engine) -> Self {
        Wake {
            moved: engine.clock().moves(),
            set: engine.timers_set(),
        }
    }

    /// Wait `wait`, or less if woken, or the host stops.
    async fn after(mut self, wait: Duration, stop: Option<&mut watch::Receiver<bool>>) {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = async {
                match &mut self.moved {
                    Some(moved) => { let _ = moved.changed().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
            _ = self.set.changed() => {}
            _ = async {
                match stop {
                    Some(stop) => { let _ = stop.wait_for(|stop| *stop).await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}
