//! Which rule instances are alive. A rule's instance is created when the
//! rule is first called and kept while it is used; one idle for longer than
//! the runtime's idle time is dropped (its state lives in the store, its
//! compiled code stays shared), and when the pooling allocator's slots run
//! out, the least recently used idle instances make room. So registering
//! many rules costs memory only for those that run.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::bindings::Rule;
use super::sandbox::Sandbox;

/// Instances dropped at once when the pool is full: a tenth, so the scan
/// that finds them is paid once per many instantiations.
const EVICT_FRACTION: usize = 10;

/// The live instances of one runtime.
pub(crate) struct Instances {
    /// Instances that may be alive at once (the pool's slots).
    capacity: usize,
    /// Instances unused for this long are dropped by the sweeper.
    pub(crate) idle: Duration,
    live: Arc<AtomicUsize>,
    slots: Mutex<Vec<Weak<Slot>>>,
    started: Instant,
}

/// One rule's instance, if it has one.
pub(crate) struct Slot {
    pub(crate) instance: Mutex<Option<Live>>,
    /// Milliseconds since the runtime started, at the last call.
    last_used: AtomicU64,
}

/// A live instance; dropping it frees its pool slot.
pub(crate) struct Live {
    pub(crate) store: Store<Sandbox>,
    pub(crate) rule: Rule,
    _counted: Counted,
}

struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Counted(live.clone())
    }
}

/// A pool slot taken for an instance being created.
pub(crate) struct Reservation(Counted);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instances {
    pub(crate) fn new(capacity: usize, idle: Duration) -> Self {
        Instances {
            capacity: capacity.max(1),
            idle,
            live: Arc::default(),
            slots: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// A new, empty slot for a rule.
    pub(crate) fn slot(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            instance: Mutex::new(None),
            last_used: AtomicU64::new(self.now()),
        });
        let mut slots = self.slots.lock().expect("slots lock");
        if slots.len() >= slots.capacity() {
            slots.retain(|s| s.strong_count() > 0);
        }
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Reserve a pool slot for an instance about to be created, first
    /// dropping idle instances if the pool is full. Counted before the
    /// instance exists, so that threads creating instances at once never
    /// take more slots than there are; dropping the reservation (a failed
    /// instantiation, or the instance's end) gives the slot back.
    pub(crate) fn reserve(&self) -> Reservation {
        let reserved = Counted::new(&self.live);
        if self.live.load(Ordering::Relaxed) > self.capacity {
            self.make_room();
        }
        Reservation(reserved)
    }

    /// The live instance that took `reservation`'s slot.
    pub(crate) fn admit(
        &self,
        reservation: Reservation,
        store: Store<Sandbox>,
        rule: Rule,
    ) -> Live {
        Live {
            store,
            rule,
            _counted: reservation.0,
        }
    }

    /// When the pool is over full, drop the least recently used instances
    /// not in a call, down to nine tenths of it.
    fn make_room(&self) {
        let mut candidates: Vec<(u64, Arc<Slot>)> = self
            .slots()
            .into_iter()
            .map(|s| (s.last_used.load(Ordering::Relaxed), s))
            .collect();
        candidates.sort_unstable_by_key(|(used, _)| *used);
        let target = self.capacity - self.capacity.div_ceil(EVICT_FRACTION);
        for (_, slot) in candidates {
            if self.live.load(Ordering::Relaxed) <= target {
                break;
            }
            // A slot in a call is busy, not idle.
            if let Ok(mut instance) = slot.instance.try_lock() {
                instance.take();
            }
        }
    }

    /// Drop every instance unused for at least `idle` and not in a call;
    /// how many.
    pub fn sweep(&self, idle: Duration) -> usize {
        let now = self.now();
        let idle_ms = idle.as_millis() as u64;
        let mut dropped = 0;
        for slot in self.slots() {
            if now.saturating_sub(slot.last_used.load(Ordering::Relaxed)) < idle_ms {
                continue;
            }
            if let Ok(mut instance) = slot.instance.try_lock()
                && instance.take().is_some()
            {
                dropped += 1;
            }
        }
        dropped
    }

    /// Every rule's slot (forgetting those of rules dropped).
    fn slots(&self) -> Vec<Arc<Slot>> {
        let mut slots = self.slots.lock().expect("slots lock");
        slots.retain(|s| s.strong_count() > 0);
        slots.iter().filter_map(Weak::upgrade).collect()
    }

    /// Instances alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub(crate) fn touch(&self, slot: &Slot) {
        slot.last_used.store(self.now(), Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}
