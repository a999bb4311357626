//! The timers of the HTTP ingest's lane, fired on the host's clock: a timer
//! a rule asked for is fired within a second of due even when no event
//! arrives (at once when a test moves the clock by hand), through the lane
//! like a request, so it is ordered with the events of its bucket and
//! committed atomically with its outcome. Buckets untouched past their
//! rule's state time-to-live are removed the same way. Nothing is kept in
//! memory: the store's indexes by due time are read again before each
//! wait, so timers survive a restart and fire after it.

use std::sync::Weak;
use std::time::Duration;

use super::http::{HttpIngest, PARTITION};

/// The longest wait between looks at the store's next timer: a timer set
/// meanwhile by another writer is seen within it.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Fire `ingest`'s due timers until it is dropped.
pub(super) async fn drive(ingest: Weak<HttpIngest>) {
    let mut failures = 0;
    loop {
        let Some(host) = ingest.upgrade() else {
            return;
        };
        let engine = host.engine().clone();
        let mut moved = engine.clock().moves();
        let mut set = engine.timers_set();
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
                next.map_or(MAX_WAIT, |due| {
                    Duration::from_millis((due - now) as u64).min(MAX_WAIT)
                })
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "cannot read the next timer");
                crate::backoff::delay(failures)
            }
        };
        drop(host);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = async {
                match &mut moved {
                    Some(moved) => { let _ = moved.changed().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
            _ = set.changed() => {}
        }
    }
}
