//! One rule over one batch of its tenant's events: route into buckets, call
//! `evaluate` once per bucket with its stored state, and turn the outcome into
//! state changes and published alert records.
//!
//! Where state is kept and where alerts go is the caller's business; one
//! bucket's failure never discards another bucket's results.

use std::collections::HashMap;

use crate::alert::{AlertRecord, Origin};
use crate::batch::{self, BadEventTime};
use crate::catalogue::Catalogue;
use crate::event::{Incoming, SeqNo};
use crate::runtime::{LoadedRule, LogLine, RuleError, StateChange, TimerChange};
use crate::store::BucketId;

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

/// What a bucket held before a batch.
#[derive(Debug, Clone)]
pub struct Prior<S> {
    pub state: Option<S>,
    /// The last sequence number of this batch's shard the bucket applied:
    /// events up to it are left out (a replay after a crash).
    pub applied: Option<SeqNo>,
}

impl<S> Prior<S> {
    pub fn state(state: Option<S>) -> Self {
        Prior {
            state,
            applied: None,
        }
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
    run_rule_after(rule, events, now, |bucket| state(bucket).map(Prior::state))
}

/// [`run_rule`] for a source with sequence numbers: each bucket's events up
/// to the one it last applied are left out, and a bucket left with none is
/// not called.
pub fn run_rule_after<S: AsRef<[u8]>, E>(
    rule: &LoadedRule,
    events: &[&Incoming],
    now: i64,
    mut prior: impl FnMut(&str) -> Result<Prior<S>, E>,
) -> Result<RuleRun, E> {
    let manifest = rule.manifest();
    let (buckets, bad_times) = batch::route(manifest, events);
    let mut run = RuleRun {
        matched: buckets.iter().map(|b| b.members.len()).sum(),
        buckets: Vec::with_capacity(buckets.len()),
        bad_times,
    };
    for mut bucket in buckets {
        let Prior {
            state: stored,
            applied,
        } = prior(&bucket.key)?;
        if let Some(applied) = applied {
            let seen = |&i: &usize| events[i].seq.as_ref().is_some_and(|seq| *seq <= applied);
            if bucket.members.iter().any(seen) {
                bucket = batch::rebuild(manifest, events, &bucket, |i| !seen(&i));
                if bucket.members.is_empty() {
                    continue;
                }
            }
        }
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
            members: bucket.members,
            result,
        });
    }
    Ok(run)
}

/// What one tenant's rules produced for one batch.
#[derive(Debug, Default)]
pub struct TenantRun {
    /// Each bucket that ran, with its outcome.
    pub buckets: Vec<(BucketId, BucketOutcome)>,
    /// Buckets whose call failed: they keep their state.
    pub failures: u64,
}

/// Each tenant's events in arrival order; tenants in order of first event.
pub fn by_tenant<'a>(
    events: impl IntoIterator<Item = &'a Incoming>,
) -> Vec<(&'a str, Vec<&'a Incoming>)> {
    let mut tenants: Vec<(&str, Vec<&Incoming>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for event in events {
        let slot = *index.entry(event.tenant.as_str()).or_insert_with(|| {
            tenants.push((event.tenant.as_str(), Vec::new()));
            tenants.len() - 1
        });
        tenants[slot].1.push(event);
    }
    tenants
}

/// Every rule of `tenant` over its `events`, with each bucket's prior from
/// `prior`. A failing bucket is logged and counted; the others go on.
pub fn run_tenant<S: AsRef<[u8]>, E>(
    catalogue: &dyn Catalogue,
    tenant: &str,
    events: &[&Incoming],
    now: i64,
    prior: impl Fn(&BucketId) -> Result<Prior<S>, E>,
) -> Result<TenantRun, E> {
    let mut result = TenantRun::default();
    let Some(rules) = catalogue.rules(tenant) else {
        return Ok(result);
    };
    for rule in rules.iter() {
        let name = &rule.manifest().name;
        let id = |bucket: &str| BucketId {
            tenant: tenant.to_owned(),
            rule: name.clone(),
            bucket: bucket.to_owned(),
        };
        let run = run_rule_after(rule, events, now, |bucket| prior(&id(bucket)))?;
        for bad in &run.bad_times {
            tracing::warn!(tenant, rule = rule.name(), position = %events[bad.index].position, "{bad}; event left out");
        }
        for bucket in run.buckets {
            match bucket.result {
                Ok(outcome) => {
                    for line in &outcome.log {
                        tracing::info!(tenant, rule = rule.name(), bucket = %bucket.key, level = ?line.level, "{}", line.message.trim_end());
                    }
                    result.buckets.push((id(&bucket.key), outcome));
                }
                Err(error) => {
                    // The bucket keeps its state; other buckets go on.
                    result.failures += 1;
                    tracing::warn!(bucket = %bucket.key, events = bucket.members.len(), "{error}");
                }
            }
        }
    }
    Ok(result)
}
