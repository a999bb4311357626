//! Timers and expiry: firing the timers of a lane's partition due by a
//! time (each bucket's rule's `on-timer`, on its state) and removing its
//! buckets untouched past their time-to-live, a batch at a time, each
//! committed like a batch of events; and moving a manual clock on through
//! them (replays, tests).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::outcome::Finish;
use super::tenants::{TenantOutcome, state_too_large};
use super::{Batch, Computed, Engine, EngineError, Lane, RejectCause, run};
use crate::clock::{Clock, ManualClock};
use crate::metrics::RuleTally;
use crate::rule_log::LogEntry;
use crate::runtime::{StateChange, TimerChange};
use crate::store::{BucketId, BucketWrite, Progress};
use crate::timestamp;

/// Timers one batch of timers fires.
pub(crate) const MAX_TIMERS_PER_BATCH: usize = 1024;
/// A timer `on-timer` sets at or before the time it fired is due this much
/// later: a rule cannot keep the host firing it.
pub(crate) const MIN_TIMER_STEP_MS: i64 = 1_000;

impl Engine {
    /// Fire the timers of `lane`'s partition due by `until`, and remove
    /// its buckets expired by then, a batch at a time, each committed like
    /// a batch of events with `progress` (a timer partition's lease, or
    /// nothing); how many timers fired. Tenants run apart keep theirs until
    /// their parts are in.
    pub(crate) async fn fire_timers(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        until: i64,
        progress: Progress,
    ) -> Result<usize, EngineError> {
        let mut fired = 0;
        loop {
            let partition = &lane.partition;
            let mut due = self
                .store
                .due_timers(partition, until, MAX_TIMERS_PER_BATCH)
                .await?;
            let mut expired = self
                .store
                .expired(partition, until, MAX_TIMERS_PER_BATCH)
                .await?;
            let full = due.len() == MAX_TIMERS_PER_BATCH || expired.len() == MAX_TIMERS_PER_BATCH;
            {
                let parts = lane.parts.lock().expect("parts lock");
                due.retain(|(id, _)| parts.behind(&id.tenant).is_none());
                expired.retain(|(id, _)| parts.behind(&id.tenant).is_none());
            }
            // In time order when the clock jumped past both: a timer due
            // before its bucket expired fires (touching it); one due after
            // went with its bucket.
            let expiry: HashMap<&BucketId, i64> =
                expired.iter().map(|(id, at)| (id, *at)).collect();
            due.retain(|(id, at)| expiry.get(id).is_none_or(|expires| at < expires));
            let firing: HashSet<&BucketId> = due.iter().map(|(id, _)| id).collect();
            let expired: Vec<BucketId> = expired
                .iter()
                .filter(|(id, _)| !firing.contains(id))
                .map(|(id, _)| id.clone())
                .collect();
            if due.is_empty() && expired.is_empty() {
                return Ok(fired);
            }
            let n = due.len();
            let mut batch = Batch::new(Vec::new(), progress.clone());
            batch.timers = due;
            batch.expired = expired;
            self.process(lane, &batch).await?;
            fired += n;
            if !full {
                return Ok(fired);
            }
        }
    }

    /// Move `clock` (this engine's clock, in a replay or a test) on to `to`,
    /// firing each of `lane`'s timers due by then at its due time (or at
    /// the clock's time if that has passed it), in order, so a timer a
    /// firing sets again within the time fires again; how many fired.
    pub(crate) async fn run_clock_to(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        clock: &ManualClock,
        to: i64,
    ) -> Result<u64, EngineError> {
        let mut fired = 0;
        let mut previous = None;
        while let Some(due) = self.next_due(&lane.partition).await?
            && due <= to
        {
            // What is still due after a firing at its time cannot fire.
            if previous == Some(due) {
                break;
            }
            previous = Some(due);
            let at = due.max(clock.now_ms());
            clock.set(at);
            fired += self.fire_timers(lane, at, Progress::none()).await? as u64;
        }
        clock.set(to.max(clock.now_ms()));
        Ok(fired)
    }

    /// When `lane`'s partition next has a timer due or a bucket expiring.
    pub(crate) async fn next_due(&self, lane_partition: &str) -> Result<Option<i64>, EngineError> {
        let timer = self.store.next_timer(lane_partition).await?;
        let expiry = self.store.next_expiry(lane_partition).await?;
        Ok(timer.into_iter().chain(expiry).min())
    }

    /// A batch of due timers: each bucket's rule's `on-timer`, on its state.
    pub(super) fn fire_blocking(
        &self,
        lane: &Lane,
        batch: Batch,
        handle: &tokio::runtime::Handle,
        now: i64,
        batch_no: u64,
        generation: u64,
    ) -> Result<Computed, EngineError> {
        let started = Instant::now();
        let ids: Vec<BucketId> = batch.timers.iter().map(|(id, _)| id.clone()).collect();
        let mut priors = handle.block_on(self.store.load(&ids, &lane.partition))?;
        let pending = handle.block_on(self.store.pending_timers(&ids))?;
        lane.overlay().apply(&ids, &mut priors);
        let max_state = self.store.max_state_bytes();
        let mut outcome = TenantOutcome::empty();
        // Untouched past their time-to-live: state and timer go.
        for id in &batch.expired {
            outcome.writes.push(BucketWrite {
                id: id.clone(),
                state: StateChange::Delete,
                timer: TimerChange::Cancel,
                alerts: Vec::new(),
                ttl_ms: None,
            });
        }
        for (((id, due), prior), pending) in batch.timers.iter().zip(priors).zip(pending) {
            if pending != Some(*due) {
                // Changed since the index was read (by an event on another
                // host, whose commit moved the index too): not due.
                tracing::debug!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, due, ?pending, "timer changed before it fired");
                continue;
            }
            // Without an outcome the bucket keeps its state, and is touched
            // under its rule's time-to-live.
            let write = |timer, outcome: Option<run::BucketOutcome>, ttl_ms: Option<u64>| {
                let (state, alerts, ttl_ms) = match outcome {
                    Some(o) => (o.state, o.alerts, o.state_ttl_ms),
                    None => (StateChange::Unchanged, Vec::new(), ttl_ms),
                };
                BucketWrite {
                    id: id.clone(),
                    state,
                    timer,
                    alerts,
                    ttl_ms,
                }
            };
            let rule = self
                .catalogue
                .rules(&id.tenant)
                .and_then(|rules| rules.iter().find(|r| r.name() == id.rule).cloned());
            let Some(rule) = rule else {
                tracing::info!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, "the rule of a due timer is gone: the timer goes too");
                outcome.writes.push(write(TimerChange::Cancel, None, None));
                continue;
            };
            let ttl_ms = rule.manifest().state_ttl_ms;
            let mut tally = RuleTally {
                tenant: id.tenant.clone(),
                rule: id.rule.clone(),
                ..RuleTally::default()
            };
            if let Some(quarantine) = self.quarantines.active(&id.tenant, &id.rule, now) {
                // Fired once the quarantine is over.
                outcome
                    .writes
                    .push(write(TimerChange::Set(quarantine.until_ms), None, ttl_ms));
                tally.quarantined = true;
                outcome.tallies.push(tally);
                continue;
            }
            let call_started = Instant::now();
            let result = run::call_timer(&rule, &id.bucket, prior.state.as_deref(), now, *due)
                .map_err(|e| {
                    let reason = e.to_string();
                    (RejectCause::Rule(e.cause), reason)
                })
                .and_then(|o| match state_too_large(&id.bucket, &o.state, max_state) {
                    Some(reason) => Err((RejectCause::StateTooLarge, reason)),
                    None => Ok(o),
                });
            tally.elapsed = call_started.elapsed();
            match result {
                Ok(mut fired) => {
                    tally.applied_calls = 1;
                    tally.fuel = fired.fuel;
                    tally.alerts = fired.alerts.len() as u64;
                    for line in &fired.log {
                        tally.log.push(LogEntry::new(
                            now,
                            line.level.name(),
                            "rule",
                            &id.bucket,
                            &line.message,
                        ));
                    }
                    // The timer that fired is spent unless the rule sets one.
                    let timer = match std::mem::replace(&mut fired.timer, TimerChange::Keep) {
                        TimerChange::Set(at) if at <= now => {
                            TimerChange::Set(now + MIN_TIMER_STEP_MS)
                        }
                        set @ TimerChange::Set(_) => set,
                        TimerChange::Keep | TimerChange::Cancel => TimerChange::Cancel,
                    };
                    outcome.writes.push(write(timer, Some(fired), ttl_ms));
                }
                Err((cause, error)) => {
                    // Dropped, with the reason in the rule's log: a timer
                    // that failed would fail again.
                    let reason = format!(
                        "{error}; the timer due at {} is dropped",
                        timestamp::rfc3339(*due)
                    );
                    tracing::warn!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, "{reason}");
                    tally.failed_calls = 1;
                    tally.failures.push(cause.name());
                    tally
                        .log
                        .push(LogEntry::new(now, "error", "host", &id.bucket, &reason));
                    tally.last_failure = Some(reason);
                    outcome.failures += 1;
                    outcome
                        .writes
                        .push(write(TimerChange::Cancel, None, ttl_ms));
                }
            }
            outcome.tallies.push(tally);
        }
        self.finish(
            lane,
            &[],
            Finish {
                outcomes: vec![outcome],
                rejected: Vec::new(),
                progress: batch.progress,
                bad: Vec::new(),
                unanswered: batch.unanswered,
                count: 0,
                now,
                batch_no,
                generation,
                unknown_tenant: 0,
                started,
            },
        )
    }
}
