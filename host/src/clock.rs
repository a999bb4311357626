//! The host's one notion of "now", so tests (and `rule test --now`) can fix it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::watch;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;

    /// Told each time the clock is moved by hand; `None` for a clock that
    /// moves by itself (wait on real time for it).
    fn moves(&self) -> Option<watch::Receiver<i64>> {
        None
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        since_epoch.as_millis() as i64
    }
}

/// A clock that moves only when told to: tests move it instead of
/// sleeping, and whatever waits on the host's clock (its timers) sees it
/// move at once.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Manual>);

#[derive(Debug)]
struct Manual {
    now: AtomicI64,
    moved: watch::Sender<i64>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(0)
    }
}

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        ManualClock(Arc::new(Manual {
            now: AtomicI64::new(now_ms),
            moved: watch::Sender::new(now_ms),
        }))
    }

    pub fn set(&self, now_ms: i64) {
        self.0.now.store(now_ms, Ordering::SeqCst);
        self.0.moved.send_replace(now_ms);
    }

    pub fn advance(&self, by_ms: i64) {
        let now = self.0.now.fetch_add(by_ms, Ordering::SeqCst) + by_ms;
        self.0.moved.send_replace(now);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.now.load(Ordering::SeqCst)
    }

    fn moves(&self) -> Option<watch::Receiver<i64>> {
        Some(self.0.moved.subscribe())
    }
}
