//! The second stage: one atomic commit of a computed batch (states,
//! timers, the alerts as an outbox, the source's progress), after its dead
//! letters are kept and the silenced alerts marked. Once it is durable, the
//! rules' tallies feed the quarantines, the rules' logs and the metrics.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::batch::Turn;
use super::{Committed, Computed, Engine, EngineError, Lane, add_elapsed};
use crate::metrics::RuleTally;
use crate::rule_log::LogEntry;
use crate::runtime::TimerChange;
use crate::sink::dead_letters::DeadLetter;
use crate::store::StoreError;

impl Engine {
    /// The second stage: commit a computed batch. Batches of a lane must be
    /// committed in the order they were computed. Once this returns `Ok`,
    /// the batch is durable: the source may acknowledge it, then
    /// [`publish`](Self::publish) it.
    pub(crate) async fn commit(
        &self,
        lane: &Lane,
        computed: Computed,
    ) -> Result<Committed, EngineError> {
        let _committing = lane.committing.lock().await;
        let Computed {
            mut commit,
            rejected,
            events,
            failures,
            batch,
            generation,
            mut tallies,
            dead_letters,
            unknown_tenant,
            started: batch_started,
            ticket,
            handed: _,
            apart: _,
            rest: _rest,
        } = computed;
        if lane.overlay().generation != generation {
            return Err(EngineError::Stale);
        }
        // The overlay holds states of this batch and of any computed on top
        // of it: if this one does not commit, none of them is durable.
        if let Err(error) = self.keep_dead_letters(&dead_letters).await {
            lane.overlay().drop_all();
            return Err(error);
        }
        // A shard's checkpoint moves past batches all of whose parts are in.
        let mut written = None;
        if let Some(checkpoint) = commit.progress.checkpoint_mut() {
            if let Some(ticket) = ticket {
                *checkpoint = lane
                    .parts
                    .lock()
                    .expect("parts lock")
                    .checkpoint_after(ticket);
            }
            written = checkpoint.clone();
        }
        let sets_timer = commit
            .writes
            .iter()
            .any(|w| matches!(w.timer, TimerChange::Set(_)));
        // Marked before they are durable: the alert log and the stream
        // hold the same record.
        let silenced = match &self.silences {
            Some(silences) => {
                silences.mark(commit.writes.iter_mut().flat_map(|w| w.alerts.iter_mut()))
            }
            None => Vec::new(),
        };
        let started = Instant::now();
        let outbox = match self.store.commit(commit).await {
            Ok(outbox) => outbox,
            Err(error) => {
                // Part of a commit may have been (a split one): catch up
                // first.
                lane.overlay().drop_all();
                lane.behind.store(true, Ordering::Relaxed);
                if !matches!(error, StoreError::Conflict(_) | StoreError::Fenced(_)) {
                    self.set_health(|h| h.commit_error = Some(error.to_string()));
                }
                return Err(error.into());
            }
        };
        self.set_health(|h| h.commit_error = None);
        add_elapsed(&self.stats.commit_ns, started);
        if sets_timer {
            self.timers_set.send_modify(|n| *n += 1);
        }
        lane.parts
            .lock()
            .expect("parts lock")
            .committed(ticket, written);
        let turn = Turn {
            _held: lane.publishing.clone().lock_owned().await,
            behind: lane.behind.clone(),
        };
        self.observe_rules(&mut tallies);
        self.metrics.silenced(&silenced);
        for tally in &tallies {
            self.stats
                .applied
                .fetch_add(tally.events, Ordering::Relaxed);
            self.stats.fuel.fetch_add(tally.fuel, Ordering::Relaxed);
        }
        self.metrics.committed(
            &tallies,
            &dead_letters,
            events as u64,
            unknown_tenant,
            batch_started.elapsed(),
            started.elapsed(),
        );
        lane.overlay().committed(batch);
        self.stats
            .events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.stats
            .alerts
            .fetch_add(outbox.alerts.len() as u64, Ordering::Relaxed);
        self.stats
            .rule_failures
            .fetch_add(failures, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);

        Ok(Committed {
            rejected,
            alerts: outbox.alerts.len(),
            outbox: Some(outbox),
            turn: Some(turn),
        })
    }

    /// Keep the batch's dead letters before it commits; without a dead
    /// letter sink, log them.
    async fn keep_dead_letters(&self, dead_letters: &[DeadLetter]) -> Result<(), EngineError> {
        if dead_letters.is_empty() {
            return Ok(());
        }
        match &self.dead_letters {
            Some(sink) => sink
                .send(dead_letters)
                .await
                .map_err(EngineError::DeadLetters),
            None => {
                for letter in dead_letters {
                    tracing::warn!(source = %letter.source, position = %letter.position, tenant = ?letter.tenant, rule = ?letter.rule, "not applied: {}", letter.reason);
                }
                Ok(())
            }
        }
    }

    /// What each rule did in a committed batch: quarantine the rules that
    /// keep failing, and keep their log lines.
    fn observe_rules(&self, tallies: &mut [RuleTally]) {
        let now = self.clock.now_ms();
        for tally in tallies {
            if !tally.quarantined
                && let Some(quarantine) = self.quarantines.observe(
                    &tally.tenant,
                    &tally.rule,
                    tally.applied_calls,
                    tally.failed_calls,
                    tally.last_failure.as_deref(),
                    now,
                )
            {
                tracing::warn!(tenant = %tally.tenant, rule = %tally.rule, until = %quarantine.until, "rule quarantined after {} failing batches in a row: {}", quarantine.failing_batches, quarantine.reason);
                tally.log.push(LogEntry::new(
                    now,
                    "error",
                    "host",
                    "",
                    &format!(
                        "quarantined until {} after {} failing batches in a row; its events are dead-lettered until then",
                        quarantine.until, quarantine.failing_batches
                    ),
                ));
            }
            self.logs
                .append(&tally.tenant, &tally.rule, std::mem::take(&mut tally.log));
        }
    }
}
