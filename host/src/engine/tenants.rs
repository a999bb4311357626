//! Running a batch's tenants: each tenant's rules in turn over its events,
//! tenants in parallel on the engine's pool. With a fair share, tenants
//! still running once the others are done (and past their share) are left
//! running as [`Straggler`]s, to commit apart ([`super::apart`]). What a
//! tenant's rules gave is its [`TenantOutcome`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::oneshot;

use super::compute::TenantWork;
use super::{Engine, RejectCause, Rejection, run};
use crate::event::Incoming;
use crate::metrics::RuleTally;
use crate::rule_log::LogEntry;
use crate::runtime::StateChange;
use crate::store::{BucketId, BucketWrite};

/// What a tenant's rules gave over a batch.
pub(crate) struct TenantOutcome {
    pub(super) writes: Vec<BucketWrite>,
    pub(super) rejected: Vec<Rejection>,
    pub(super) failures: u64,
    pub(super) tallies: Vec<RuleTally>,
}

impl TenantOutcome {
    pub(super) fn empty() -> Self {
        TenantOutcome {
            writes: Vec::new(),
            rejected: Vec::new(),
            failures: 0,
            tallies: Vec::new(),
        }
    }
}

/// A tenant still running past its share: its events, and where its
/// outcome will come (`Err`: its run panicked).
pub(super) struct Straggler {
    pub(super) tenant: String,
    pub(super) indices: Vec<usize>,
    pub(super) outcome: oneshot::Receiver<Result<TenantOutcome, String>>,
}

/// Why a rule's new state of `bucket` cannot be kept: it is over the state
/// store's limit of `max_state` bytes.
pub(super) fn state_too_large(
    bucket: &str,
    state: &StateChange,
    max_state: usize,
) -> Option<String> {
    match state {
        StateChange::Set(bytes) if bytes.len() > max_state => Some(format!(
            "rule error: the state of bucket `{bucket}` is {} bytes, over the state store's limit of {max_state}",
            bytes.len()
        )),
        _ => None,
    }
}

pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

impl Engine {
    /// Run each tenant's rules, tenants in parallel. With a `share`,
    /// tenants still running once the others are done, past the share and
    /// past as long again as the others took, are left running: each with
    /// its events and where its outcome will come.
    pub(super) fn run_tenants(
        self: &Arc<Self>,
        events: &Arc<[Incoming]>,
        works: Vec<TenantWork>,
        now: i64,
        share: Option<Duration>,
        splittable: &dyn Fn(&str) -> bool,
    ) -> (Vec<TenantOutcome>, Vec<Straggler>) {
        let max_state = self.store.max_state_bytes();
        let Some(share) = share.filter(|_| !works.is_empty()) else {
            let outcomes = self.pool.install(|| {
                works
                    .into_par_iter()
                    .map(|work| self.run_tenant(events, work, now, max_state))
                    .collect()
            });
            return (outcomes, Vec::new());
        };
        let started = Instant::now();
        // Each tenant, and whether it may be run apart.
        let meta: Vec<(String, bool)> = works
            .iter()
            .map(|w| (w.tenant.clone(), splittable(&w.tenant)))
            .collect();
        let mut unsplittable = meta.iter().filter(|(_, may)| !may).count();
        let (send, receive) = std::sync::mpsc::channel();
        for (n, work) in works.into_iter().enumerate() {
            let (engine, events, send) = (self.clone(), events.clone(), send.clone());
            self.pool.spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.run_tenant(&events, work, now, max_state)
                }))
                .map_err(|panic| panic_text(&panic));
                let _ = send.send((n, outcome));
            });
        }
        drop(send);
        let mut outcomes: Vec<Option<Result<TenantOutcome, String>>> =
            (0..meta.len()).map(|_| None).collect();
        let mut pending = meta.len();
        let mut others_took = Duration::ZERO;
        while pending > 0 {
            // A tenant alone in its batch is run apart too: the lane's next
            // batches are the others it would hold.
            let may_split = unsplittable == 0;
            let received = if may_split {
                let deadline = share.max(others_took * 2);
                match deadline.checked_sub(started.elapsed()) {
                    Some(left) => receive.recv_timeout(left).ok(),
                    None => None,
                }
            } else {
                receive.recv().ok()
            };
            let Some((n, outcome)) = received else {
                if !may_split {
                    // Every run sends; a closed channel is a host bug.
                    break;
                }
                // Past their share: the stragglers go on apart.
                let mut stragglers = Vec::new();
                let mut forward = HashMap::new();
                for n in (0..meta.len()).filter(|&n| outcomes[n].is_none()) {
                    let tenant = meta[n].0.clone();
                    let indices: Vec<usize> = (0..events.len())
                        .filter(|&i| events[i].tenant == tenant)
                        .collect();
                    tracing::info!(tenant = %tenant, events = indices.len(), took_ms = started.elapsed().as_millis() as u64, others_ms = others_took.as_millis() as u64, "tenant over its share of the batch's time: run apart");
                    let (to, from) = oneshot::channel();
                    forward.insert(n, to);
                    stragglers.push(Straggler {
                        tenant,
                        indices,
                        outcome: from,
                    });
                }
                std::thread::spawn(move || {
                    for (n, outcome) in receive {
                        if let Some(to) = forward.remove(&n) {
                            let _ = to.send(outcome);
                        }
                    }
                });
                return (unwrap_outcomes(outcomes), stragglers);
            };
            outcomes[n] = Some(outcome);
            pending -= 1;
            if !meta[n].1 {
                unsplittable -= 1;
            }
            others_took = started.elapsed();
        }
        (unwrap_outcomes(outcomes), Vec::new())
    }

    /// One tenant's rules over its events, in turn.
    fn run_tenant(
        &self,
        events: &[Incoming],
        work: TenantWork,
        now: i64,
        max_state: usize,
    ) -> TenantOutcome {
        let tenant_events: Vec<&Incoming> = work.indices.iter().map(|&i| &events[i]).collect();
        let indices = &work.indices;
        let mut outcome = TenantOutcome::empty();
        for r in work.rules {
            let name = r.rule.name();
            let tenant = r.rule.tenant();
            let mut tally = RuleTally {
                tenant: tenant.to_owned(),
                rule: name.to_owned(),
                ..RuleTally::default()
            };
            let rule_started = Instant::now();
            for bad in &r.unroutable {
                outcome.rejected.push(Rejection {
                    index: indices[bad.index],
                    rule: Some(name.to_owned()),
                    cause: bad.cause.clone(),
                    reason: bad.reason.clone(),
                });
            }
            if let Some(quarantine) = self.quarantines.active(tenant, name, now) {
                // Not called: its events wait in the dead letters.
                let reason = format!(
                    "rule `{name}` of tenant `{tenant}` is quarantined until {} after {} failing batches in a row (last: {}); an operator can resume it",
                    quarantine.until, quarantine.failing_batches, quarantine.reason
                );
                for bucket in &r.buckets {
                    for &member in &bucket.members {
                        outcome.rejected.push(Rejection {
                            index: indices[member],
                            rule: Some(name.to_owned()),
                            cause: RejectCause::Quarantined,
                            reason: reason.clone(),
                        });
                    }
                }
                tally.quarantined = true;
                outcome.tallies.push(tally);
                continue;
            }
            let mut ids = r.ids;
            let run = run::run_contained(&r.rule, &tenant_events, r.buckets, now, r.priors);
            tally.elapsed = rule_started.elapsed();
            tally.failed_calls = run.failed_calls;
            for bucket in run.buckets {
                tally.applied_calls += bucket.calls - bucket.failed_calls;
                let mut failed: Vec<(usize, RejectCause, String)> = bucket
                    .failed
                    .into_iter()
                    .map(|(member, error)| {
                        let reason = error.to_string();
                        let cause = RejectCause::Rule(error.cause);
                        tally.failures.push(cause.name());
                        (member, cause, reason)
                    })
                    .collect();
                if let Some(called) = bucket.outcome {
                    tally.fuel += called.fuel;
                    for line in &called.log {
                        tracing::debug!(tenant, rule = %name, bucket = %bucket.key, level = ?line.level, "{}", line.message.trim_end());
                        tally.log.push(LogEntry::new(
                            now,
                            line.level.name(),
                            "rule",
                            &bucket.key,
                            &line.message,
                        ));
                    }
                    match state_too_large(&bucket.key, &called.state, max_state) {
                        Some(reason) => {
                            tally.failures.push(RejectCause::StateTooLarge.name());
                            let reason = format!("{reason}; the bucket keeps its previous state");
                            failed.extend(
                                bucket
                                    .applied
                                    .iter()
                                    .map(|&m| (m, RejectCause::StateTooLarge, reason.clone())),
                            );
                        }
                        None => {
                            tally.events += bucket.applied.len() as u64;
                            tally.alerts += called.alerts.len() as u64;
                            outcome.writes.push(BucketWrite {
                                id: std::mem::replace(
                                    &mut ids[bucket.index],
                                    BucketId {
                                        tenant: String::new(),
                                        rule: String::new(),
                                        bucket: String::new(),
                                    },
                                ),
                                state: called.state,
                                timer: called.timer,
                                alerts: called.alerts,
                                ttl_ms: called.state_ttl_ms,
                            });
                        }
                    }
                }
                if failed.is_empty() {
                    continue;
                }
                // The bucket keeps its state; other buckets go on.
                outcome.failures += 1;
                failed.sort_by_key(|(member, _, _)| *member);
                let mut last_reason: Option<&str> = None;
                for (member, cause, reason) in &failed {
                    if last_reason != Some(reason.as_str()) {
                        tracing::warn!(tenant, rule = %name, bucket = %bucket.key, position = %tenant_events[*member].position, "{reason}");
                        tally
                            .log
                            .push(LogEntry::new(now, "error", "host", &bucket.key, reason));
                        last_reason = Some(reason.as_str());
                    }
                    outcome.rejected.push(Rejection {
                        index: indices[*member],
                        rule: Some(name.to_owned()),
                        cause: cause.clone(),
                        reason: reason.clone(),
                    });
                }
                tally.last_failure = failed.last().map(|(_, _, reason)| reason.clone());
            }
            outcome.tallies.push(tally);
        }
        outcome
    }
}

fn unwrap_outcomes(outcomes: Vec<Option<Result<TenantOutcome, String>>>) -> Vec<TenantOutcome> {
    outcomes
        .into_iter()
        .flatten()
        .map(|outcome| outcome.unwrap_or_else(|panic| std::panic::resume_unwind(Box::new(panic))))
        .collect()
}
