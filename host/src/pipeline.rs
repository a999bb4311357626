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
/// bucket's stored state; `position` names the batch in its source and makes
/// alert ids deterministic; `now` is the processing time.
pub fn run_rule(
    rule: &LoadedRule,
    events: &[&Incoming],
    position: &str,
    now: i64,
    mut state: impl FnMut(&str) -> Option<Vec<u8>>,
) -> Result<RuleRun, BadEventTime> {
    let manifest = rule.manifest();
    let buckets = batch::route(manifest, events)?;
    let mut run = RuleRun {
        matched: buckets.iter().map(|b| b.members.len()).sum(),
        buckets: Vec::with_capacity(buckets.len()),
    };
    for bucket in buckets {
        let stored = state(&bucket.key);
        let result = rule
            .evaluate(&bucket.key, stored.as_deref(), &bucket.batch, now)
            .map(|output| {
                let origin = Origin {
                    tenant: rule.tenant(),
                    rule: &manifest.name,
                    bucket: &bucket.key,
                    position,
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
