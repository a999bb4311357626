//! Out to the sink: a committed batch's alerts are published after any the
//! lane's outbox still holds, in commit order, then retired from the
//! outbox and shown to live subscribers. A failure only delays them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Committed, Engine, EngineError, Lane, add_elapsed};
use crate::store::Outbox;

impl Engine {
    /// Publish a committed batch's alerts (after any the lane's outbox
    /// still holds). A failure only delays them: they stay in the outbox,
    /// and the lane's next batch publishes them first.
    pub(crate) async fn publish(&self, lane: &Lane, committed: &mut Committed) {
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
    pub(crate) async fn flush(&self, lane: &Lane) -> Result<(), EngineError> {
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
