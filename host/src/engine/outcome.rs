//! Folding what the tenants' rules gave into one batch to commit: their
//! writes, the events not applied (kept as dead letters with their cause),
//! the rules' tallies; the new states go in the lane's overlay for its
//! next batch.

use std::sync::Arc;
use std::time::Instant;

use super::tenants::TenantOutcome;
use super::{Batch, Computed, Engine, EngineError, Lane, Rejection};
use crate::event::Incoming;
use crate::sink::dead_letters::{DeadLetter, dead_letter_id};
use crate::store::{Commit, Progress};

/// What [`Engine::finish`] gathers.
pub(super) struct Finish {
    pub(super) outcomes: Vec<TenantOutcome>,
    pub(super) rejected: Vec<Rejection>,
    pub(super) progress: Progress,
    pub(super) bad: Vec<DeadLetter>,
    pub(super) unanswered: bool,
    /// Events of the batch (or part) committed with it.
    pub(super) count: usize,
    pub(super) now: i64,
    pub(super) batch_no: u64,
    pub(super) generation: u64,
    pub(super) unknown_tenant: u64,
    pub(super) started: Instant,
}

impl Engine {
    /// A straggler's outcome, once it came, as a part of its own.
    pub(super) fn finish_part(
        &self,
        lane: &Lane,
        events: &Arc<[Incoming]>,
        part: &Batch,
        outcome: TenantOutcome,
        generation: u64,
    ) -> Result<Computed, EngineError> {
        let (batch_no, _) = lane.next_batch();
        self.finish(
            lane,
            events,
            Finish {
                outcomes: vec![outcome],
                rejected: Vec::new(),
                progress: part.progress.clone(),
                bad: Vec::new(),
                unanswered: part.unanswered,
                count: part.events.len(),
                now: self.clock.now_ms(),
                batch_no,
                generation,
                unknown_tenant: 0,
                started: Instant::now(),
            },
        )
    }

    /// Gather the tenants' outcomes into a batch to commit, keep what was
    /// not applied as dead letters, and put the new states in the lane's
    /// overlay for its next batch.
    pub(super) fn finish(
        &self,
        lane: &Lane,
        events: &[Incoming],
        finish: Finish,
    ) -> Result<Computed, EngineError> {
        let Finish {
            outcomes,
            mut rejected,
            progress,
            bad,
            unanswered,
            count,
            now,
            batch_no,
            generation,
            unknown_tenant,
            started,
        } = finish;
        let mut writes = Vec::new();
        let mut failures = 0;
        let mut tallies = Vec::new();
        for outcome in outcomes {
            writes.extend(outcome.writes);
            rejected.extend(outcome.rejected);
            failures += outcome.failures;
            tallies.extend(outcome.tallies);
        }
        rejected.sort_by_key(|r| r.index);

        // What was accepted but not applied is kept with the reason.
        let mut dead_letters = bad;
        for rejection in &rejected {
            if rejection.is_bad_event() && !unanswered {
                continue;
            }
            let event = &events[rejection.index];
            dead_letters.push(DeadLetter {
                id: dead_letter_id(&lane.partition, &event.position, rejection.rule.as_deref()),
                seq: None,
                at: now,
                tenant: Some(event.tenant.clone()),
                rule: rejection.rule.clone(),
                source: lane.partition.clone(),
                position: event.position.clone(),
                cause: rejection.cause.name().to_owned(),
                reason: rejection.reason.clone(),
                event: event.raw.to_string(),
            });
        }

        // The lane's next batch runs on these states before they commit.
        let mut overlay = lane.overlay();
        if overlay.generation != generation {
            return Err(EngineError::Stale);
        }
        overlay.record(batch_no, &writes);
        drop(overlay);
        Ok(Computed {
            commit: Commit {
                writes,
                progress,
                partition: lane.partition.clone(),
                now_ms: now,
            },
            rejected,
            events: count,
            failures,
            batch: batch_no,
            generation,
            tallies,
            dead_letters,
            unknown_tenant,
            started,
            ticket: None,
            handed: Vec::new(),
            apart: Vec::new(),
            rest: None,
        })
    }
}
