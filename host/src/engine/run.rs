//! One rule over its routed buckets, for the engine: call `evaluate` once
//! per bucket with its stored state (bisecting a failed call down to the
//! events the rule fails on), and turn the outcomes into state changes and
//! alert records; `on-timer` likewise. Where state is kept and where alerts
//! go is the engine's business; one bucket's failure never discards another
//! bucket's results. Nothing else runs a rule: `rule test`, replays, the
//! fuzz targets and the tests go through the engine ([`super::Scratch`]).

use std::collections::HashMap;

use super::route::{self, Bucket};
use crate::alert::{AlertRecord, Origin};
use crate::event::Incoming;
use crate::event::SeqNo;
use crate::runtime::{Cause, LoadedRule, LogLine, RuleError, StateChange, TimerChange};
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

/// `bucket` without the events its prior already applied (a shard read
/// again after a crash); `None` if that leaves none.
fn unapplied(
    manifest: &crate::runtime::Manifest,
    events: &[&Incoming],
    bucket: Bucket,
    applied: Option<&SeqNo>,
) -> Option<Bucket> {
    let Some(applied) = applied else {
        return Some(bucket);
    };
    let seen = |&i: &usize| events[i].seq.as_ref().is_some_and(|seq| seq <= applied);
    if !bucket.members.iter().any(seen) {
        return Some(bucket);
    }
    let rebuilt = route::rebuild(manifest, events, &bucket, |i| !seen(&i));
    (!rebuilt.members.is_empty()).then_some(rebuilt)
}

/// One `evaluate` call over `bucket`, its alerts made records. Their ids
/// derive from the position of the call's last event.
fn call(
    rule: &LoadedRule,
    events: &[&Incoming],
    bucket: &Bucket,
    stored: Option<&[u8]>,
    now: i64,
) -> Result<BucketOutcome, RuleError> {
    let manifest = rule.manifest();
    let last = *bucket.members.last().expect("a bucket has events");
    let output = rule.evaluate(
        &bucket.key,
        stored,
        &bucket.batch,
        now,
        &events[last].position,
    )?;
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
        .map(|(seq, alert)| AlertRecord::new(origin, &manifest.version, alert, seq, now))
        .collect();
    Ok(BucketOutcome {
        state: output.state,
        timer: output.timer,
        alerts,
        fuel: output.fuel,
        log: output.log,
        state_ttl_ms: manifest.state_ttl_ms,
    })
}

/// One `on-timer` call for `bucket`, whose timer was due at `due`, at
/// `now`. Its alerts' ids derive from the bucket and `due`, so a timer
/// fired again after a crash raises the same ids.
pub(crate) fn call_timer(
    rule: &LoadedRule,
    bucket: &str,
    stored: Option<&[u8]>,
    now: i64,
    due: i64,
) -> Result<BucketOutcome, RuleError> {
    let manifest = rule.manifest();
    let output = rule.on_timer(bucket, stored, now)?;
    let position = format!("timer@{due}");
    let origin = Origin {
        tenant: rule.tenant(),
        rule: rule.name(),
        bucket,
        position: &position,
    };
    let alerts = output
        .alerts
        .iter()
        .enumerate()
        .map(|(seq, alert)| AlertRecord::new(origin, &manifest.version, alert, seq, now))
        .collect();
    Ok(BucketOutcome {
        state: output.state,
        timer: output.timer,
        alerts,
        fuel: output.fuel,
        log: output.log,
        state_ttl_ms: manifest.state_ttl_ms,
    })
}

/// Failed calls one rule may make over one batch while bisecting before
/// the rest of its buckets are failed without a call: a rule that fails on
/// everything then costs a bounded number of calls (each bounded by fuel
/// and the deadline) instead of two per event.
pub const MAX_FAILED_CALLS: u32 = 128;

/// A failing call over at most this many events is not halved but run
/// again one event at a time.
pub const RUN_SINGLY_AT: usize = 16;

/// One bucket's calls when failures are bisected.
#[derive(Debug, Clone)]
pub struct ContainedBucket {
    pub key: String,
    /// The bucket's place among the buckets the rule was run over.
    pub index: usize,
    /// What the calls that succeeded produced, in order, as one outcome;
    /// `None` if none did (the bucket keeps its state).
    pub outcome: Option<BucketOutcome>,
    /// Indices (into the routed events) of the events applied.
    pub applied: Vec<usize>,
    /// Events not applied, each with the failure that left it out.
    pub failed: Vec<(usize, RuleError)>,
    pub calls: u32,
    /// Of `calls`, those that failed.
    pub failed_calls: u32,
}

/// One rule over one batch, failures bisected.
#[derive(Debug, Clone, Default)]
pub struct ContainedRun {
    pub buckets: Vec<ContainedBucket>,
    pub failed_calls: u32,
}

/// Run `rule` over buckets already routed from `events`, each on its prior
/// (`priors` in the order of `buckets`); a failed call is bisected (as Lambda's
/// bisect-on-error does) to find the events the rule fails on: the bucket's
/// events are split in halves run in order, each on the state the one
/// before it left, down to single events; the events it fails on alone are
/// left out with the failure, everything else is applied. A rule that
/// names the event it rejects (`bad-event`) has just that one left out. A
/// bucket whose stored state the rule cannot read is not bisected (no event
/// would succeed). A failing call over [`RUN_SINGLY_AT`] events or fewer
/// is run again one event at a time. Past [`MAX_FAILED_CALLS`] failed calls
/// in the batch, a failing call's events are all left out with its failure,
/// and the events not yet run are left out without a call
/// ([`Cause::TooManyFailures`]).
pub fn run_contained(
    rule: &LoadedRule,
    events: &[&Incoming],
    buckets: Vec<Bucket>,
    now: i64,
    priors: impl IntoIterator<Item = Prior>,
) -> ContainedRun {
    let manifest = rule.manifest();
    let mut run = ContainedRun::default();
    let mut priors = priors.into_iter();
    for (index, bucket) in buckets.into_iter().enumerate() {
        let prior = priors.next().unwrap_or_default();
        let Some(bucket) = unapplied(manifest, events, bucket, prior.applied.as_ref()) else {
            continue;
        };
        let mut contained = ContainedBucket {
            key: bucket.key.clone(),
            index,
            outcome: None,
            applied: Vec::new(),
            failed: Vec::new(),
            calls: 0,
            failed_calls: 0,
        };
        let mut calls = Calls {
            rule,
            events,
            state: prior.state,
            out: &mut contained,
            failed_calls: &mut run.failed_calls,
        };
        calls.run(bucket, now);
        run.buckets.push(contained);
    }
    run
}

struct Calls<'a> {
    rule: &'a LoadedRule,
    events: &'a [&'a Incoming],
    /// The bucket's state as the calls so far left it.
    state: Option<crate::store::State>,
    out: &'a mut ContainedBucket,
    failed_calls: &'a mut u32,
}

impl Calls<'_> {
    fn run(&mut self, bucket: Bucket, now: i64) {
        if *self.failed_calls >= MAX_FAILED_CALLS {
            let error = self.give_up_error();
            self.fail(&bucket.members, error);
            return;
        }
        self.out.calls += 1;
        let error = match call(self.rule, self.events, &bucket, self.state.as_deref(), now) {
            Ok(outcome) => return self.apply(&bucket.members, outcome),
            Err(error) => error,
        };
        *self.failed_calls += 1;
        self.out.failed_calls += 1;
        let manifest = self.rule.manifest();
        let n = bucket.members.len();
        match &error.cause {
            Cause::BadState(_) => self.fail(&bucket.members, error),
            _ if n == 1 => self.fail(&bucket.members, error),
            // Which of them it fails on is not known: none is blamed.
            _ if *self.failed_calls >= MAX_FAILED_CALLS => {
                let error = self.give_up_error();
                self.fail(&bucket.members, error)
            }
            Cause::BadEvent { index, .. } if (*index as usize) < n => {
                let bad = bucket.members[*index as usize];
                self.fail(&[bad], error);
                let rest = route::rebuild(manifest, self.events, &bucket, |i| i != bad);
                self.run(rest, now);
            }
            _ if n <= RUN_SINGLY_AT => {
                // Few left: one call per event costs fewer failed calls
                // than halving when several of them are bad.
                for &member in &bucket.members {
                    let single = route::rebuild(manifest, self.events, &bucket, |i| i == member);
                    self.run(single, now);
                }
            }
            _ => {
                let half: Vec<usize> = bucket.members[..n / 2].to_vec();
                let first = route::rebuild(manifest, self.events, &bucket, |i| {
                    half.binary_search(&i).is_ok()
                });
                let second = route::rebuild(manifest, self.events, &bucket, |i| {
                    half.binary_search(&i).is_err()
                });
                self.run(first, now);
                self.run(second, now);
            }
        }
    }

    fn give_up_error(&self) -> RuleError {
        RuleError {
            tenant: self.rule.tenant().to_owned(),
            rule: self.rule.name().to_owned(),
            cause: Cause::TooManyFailures {
                calls: MAX_FAILED_CALLS,
            },
        }
    }

    fn fail(&mut self, members: &[usize], error: RuleError) {
        self.out
            .failed
            .extend(members.iter().map(|&m| (m, error.clone())));
    }

    fn apply(&mut self, members: &[usize], outcome: BucketOutcome) {
        self.out.applied.extend_from_slice(members);
        match &outcome.state {
            StateChange::Unchanged => {}
            StateChange::Set(bytes) => self.state = Some(bytes.as_slice().into()),
            StateChange::Delete => self.state = None,
        }
        let Some(total) = &mut self.out.outcome else {
            self.out.outcome = Some(outcome);
            return;
        };
        if !matches!(outcome.state, StateChange::Unchanged) {
            total.state = outcome.state;
        }
        if !matches!(outcome.timer, TimerChange::Keep) {
            total.timer = outcome.timer;
        }
        total.alerts.extend(outcome.alerts);
        total.fuel += outcome.fuel;
        total.log.extend(outcome.log);
    }
}

/// Each tenant's events in arrival order, with their indices in `events`;
/// tenants in order of first event.
pub(crate) fn by_tenant(events: &[Incoming]) -> Vec<(&str, Vec<usize>)> {
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
