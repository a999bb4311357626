//! One rule over its routed buckets: call `evaluate` once per bucket with
//! its stored state, and turn the outcome into state changes and alert
//! records. Where state is kept and where alerts go is the caller's
//! business; one bucket's failure never discards another bucket's results.

use std::collections::HashMap;

use super::route::{self, Bucket, Unroutable};
use crate::alert::{AlertRecord, Origin};
use crate::event::Incoming;
use crate::runtime::{LoadedRule, LogLine, RuleError, StateChange, TimerChange};
use crate::store::Prior;

/// What one bucket's call produced.
#[derive(Debug, Clone)]
pub struct BucketOutcome {
    pub state: StateChange,
    pub timer: TimerChange,
    pub alerts: Vec<AlertRecord>,
    pub fuel: u64,
    pub log: Vec<LogLine>,
    /// The rule's state time-to-live, for stores that expire state.
    pub state_ttl_ms: Option<u64>,
}

/// One bucket's call: its outcome, or the rule's failure on it.
#[derive(Debug, Clone)]
pub struct BucketRun {
    pub key: String,
    /// The bucket's place among the buckets the rule was run over.
    pub index: usize,
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
    pub unroutable: Vec<Unroutable>,
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

/// Route `events` (all of the rule's tenant) and run `rule` over them.
/// `state` yields a bucket's stored state, or the error that stops the run
/// (no bucket may run on state it could not read); `now` is the processing
/// time. Alert ids derive from the position of the last event of each call,
/// so the same input yields the same ids.
pub fn run_rule<S: AsRef<[u8]>, E>(
    rule: &LoadedRule,
    events: &[&Incoming],
    now: i64,
    mut state: impl FnMut(&str) -> Result<Option<S>, E>,
) -> Result<RuleRun, E> {
    let (buckets, unroutable) = route::route(rule.manifest(), events);
    let mut priors = Vec::with_capacity(buckets.len());
    for bucket in &buckets {
        let stored = state(&bucket.key)?.map(|s| std::sync::Arc::from(s.as_ref()));
        priors.push(Prior::state(stored));
    }
    Ok(run_buckets(rule, events, buckets, unroutable, now, priors))
}

/// [`run_rule`] for a source with sequence numbers: each bucket's events up
/// to the one its prior applied are left out, and a bucket left with none is
/// not called.
pub fn run_rule_after<E>(
    rule: &LoadedRule,
    events: &[&Incoming],
    now: i64,
    mut prior: impl FnMut(&str) -> Result<Prior, E>,
) -> Result<RuleRun, E> {
    let (buckets, unroutable) = route::route(rule.manifest(), events);
    let mut priors = Vec::with_capacity(buckets.len());
    for bucket in &buckets {
        priors.push(prior(&bucket.key)?);
    }
    Ok(run_buckets(rule, events, buckets, unroutable, now, priors))
}

/// Run `rule` over buckets already routed from `events`, each on its prior
/// (`priors` in the order of `buckets`).
pub fn run_buckets(
    rule: &LoadedRule,
    events: &[&Incoming],
    buckets: Vec<Bucket>,
    unroutable: Vec<Unroutable>,
    now: i64,
    priors: impl IntoIterator<Item = Prior>,
) -> RuleRun {
    let manifest = rule.manifest();
    let mut run = RuleRun {
        matched: buckets.iter().map(|b| b.members.len()).sum(),
        buckets: Vec::with_capacity(buckets.len()),
        unroutable,
    };
    let mut priors = priors.into_iter();
    for (index, mut bucket) in buckets.into_iter().enumerate() {
        let Prior {
            state: stored,
            applied,
        } = priors.next().unwrap_or_default();
        if let Some(applied) = applied {
            let seen = |&i: &usize| events[i].seq.as_ref().is_some_and(|seq| *seq <= applied);
            if bucket.members.iter().any(seen) {
                bucket = route::rebuild(manifest, events, &bucket, |i| !seen(&i));
                if bucket.members.is_empty() {
                    continue;
                }
            }
        }
        let last = *bucket.members.last().expect("a bucket has events");
        let result = rule
            .evaluate(
                &bucket.key,
                stored.as_deref(),
                &bucket.batch,
                now,
                &events[last].position,
            )
            .map(|output| {
                let origin = Origin {
                    tenant: rule.tenant(),
                    rule: rule.name(),
                    bucket: &bucket.key,
                    position: &events[last].position,
                };
                let alerts = output
                    .alerts
                    .iter()
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
                    state_ttl_ms: manifest.state_ttl_ms,
                }
            });
        run.buckets.push(BucketRun {
            key: bucket.key,
            index,
            members: bucket.members,
            result,
        });
    }
    run
}

/// Each tenant's events in arrival order, with their indices in `events`;
/// tenants in order of first event.
pub fn by_tenant(events: &[Incoming]) -> Vec<(&str, Vec<usize>)> {
    let mut tenants: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, event) in events.iter().enumerate() {
        let slot = *index.entry(event.tenant.as_str()).or_insert_with(|| {
            tenants.push((event.tenant.as_str(), Vec::new()));
            tenants.len() - 1
        });
        tenants[slot].1.push(i);
    }
    tenants
}
