//! One rule over one batch of its tenant's events: route into buckets, call
//! `evaluate` once per bucket with its stored state, and turn the outcome into
//! state changes and published alert records.
//!
//! Where state is kept and where alerts go is the caller's business; one
//! bucket's failure never discards another bucket's results.

use crate::alert::{AlertRecord, Origin};
use crate::batch::{self, BadEventTime};
use crate::event::Incoming;
use crate::runtime::{LoadedRule, LogLine, RuleError, StateChange, TimerChange};

/// What one bucket's call produced.
#[derive(Debug, Clone)]
pub struct BucketOutcome {
    pub state: StateChange,
    pub timer: TimerChange,
    pub alerts: Vec<AlertRecord>,
    pub fuel: u64,
    pub log: Vec<LogLine>,
}

/// One bucket's call: its outcome, or the rule's failure on it.
#[derive(Debug, Clone)]
pub struct BucketRun {
    pub key: String,
    /// Indices (into the routed events) of the events in this bucket.
    pub members: Vec<usize>,
    pub result: Result<BucketOutcome, RuleError>,
}

/// One rule over one batch.
#[derive(Debug, Clone, Default)]
pub struct RuleRun {
    /// Events that passed the rule's filter.
    pub matched: usize,
    pub buckets: Vec<BucketRun>,
    /// Events the rule wanted but whose event time could not be read; they
    /// were left out.
    pub bad_times: Vec<BadEventTime>,
}

impl RuleRun {
    pub fn fuel(&self) -> u64 {
        self.buckets
            .iter()
            .filter_map(|b| b.result.as_ref().ok())
            .map(|o| o.fuel)
            .sum()
    }
}

/// Run `rule` over `events` (all of the rule's tenant). `state` yields a
/// bucket's stored state, or the error that stops the run (no bucket may run
/// on state it could not read); `now` is the processing time. Alert ids
/// derive from the position of the last event of each call, so the same
/// input yields the same ids.
pub fn run_rule<S: AsRef<[u8]>, E>(
    rule: &LoadedRule,
    events: &[&Incoming],
    now: i64,
    mut state: impl FnMut(&str) -> Result<Option<S>, E>,
) -> Result<RuleRun, E> {
    let manifest = rule.manifest();
    let (buckets, bad_times) = batch::route(manifest, events);
    let mut run = RuleRun {
        matched: buckets.iter().map(|b| b.members.len()).sum(),
        buckets: Vec::with_capacity(buckets.len()),
        bad_times,
    };
    for bucket in buckets {
        let stored = state(&bucket.key)?;
        let last = *bucket.members.last().expect("a bucket has events");
        let result = rule
            .evaluate(
                &bucket.key,
                stored.as_ref().map(AsRef::as_ref),
                &bucket.batch,
                now,
            )
            .map(|output| {
                let origin = Origin {
                    tenant: rule.tenant(),
                    rule: &manifest.name,
                    bucket: &bucket.key,
                    position: &events[last].position,
                };
                let alerts = output
                    .alerts
                    .into_iter()
                    .enumerate()
                    .map(|(seq, alert)| {
                        AlertRecord::new(origin, &manifest.version, alert, seq, now)
                    })
                    .collect();
                BucketOutcome {
                    state: output.state,
                    timer: output.timer,
                    alerts,
                    fuel: output.fuel,
                    log: output.log,
                }
            });
        run.buckets.push(BucketRun {
            key: bucket.key,
            members: bucket.members,
            result,
        });
    }
    Ok(run)
}
