//! `tocsin rule test`: run a file of events through one rule component the
//! way the service does — manifest filter, tenant per event, buckets, batches,
//! state and timers carried between batches — and report every alert.
//!
//! Timers fire as the host fires them: before each batch, those due by the
//! clock; with `until`, after the last batch the clock moves to it and the
//! timers due by then fire, each at its due time, in order.

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::time::{Duration, Instant};

use tocsin::alert::AlertRecord;
use tocsin::clock::Clock;
use tocsin::engine::MIN_TIMER_STEP_MS;
use tocsin::engine::run;
use tocsin::event::Incoming;
use tocsin::runtime::{
    Cause, LoadedRule, RuleError, RuleSettings, Runtime, StateChange, TimerChange,
};

/// How `rule test` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub tenant_field: String,
    pub batch_size: usize,
    /// The rule's parameters (and name), as a tenant would run it.
    pub settings: RuleSettings,
    /// After the last event, move the clock to this time (epoch
    /// milliseconds) so the timers due by then fire.
    pub until: Option<i64>,
}

/// What a run did, for the summary line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub events: usize,
    pub matched: usize,
    pub tenants: usize,
    /// Distinct (tenant, bucket) pairs evaluated.
    pub buckets: usize,
    /// Buckets holding state at the end.
    pub stored_buckets: usize,
    pub alerts: usize,
    /// `on-timer` calls.
    pub timers: usize,
    pub fuel: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read events: {0}")]
    Read(#[from] std::io::Error),
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("{0}")]
    Component(RuleError),
    #[error("line {line}: {error}")]
    Rule { line: usize, error: RuleError },
    #[error("bucket `{bucket}` (batch from line {line}): {error}")]
    Bucket {
        bucket: String,
        line: usize,
        error: RuleError,
    },
    #[error("bucket `{bucket}`, timer due at {due}: {error}")]
    Timer {
        bucket: String,
        due: i64,
        error: RuleError,
    },
}

/// Buckets' state and pending timers between calls, as the host keeps them.
#[derive(Default)]
struct Kept {
    states: HashMap<(String, String), Vec<u8>>,
    timers: HashMap<(String, String), i64>,
    /// (due, tenant, bucket) of each pending timer.
    due: BTreeSet<(i64, String, String)>,
}

impl Kept {
    fn apply(&mut self, key: (String, String), state: StateChange, timer: TimerChange) {
        match state {
            StateChange::Unchanged => {}
            StateChange::Set(bytes) => {
                self.states.insert(key.clone(), bytes);
            }
            StateChange::Delete => {
                self.states.remove(&key);
            }
        }
        let set = match timer {
            TimerChange::Keep => return,
            TimerChange::Set(at) => Some(at),
            TimerChange::Cancel => None,
        };
        if let Some(old) = self.timers.remove(&key) {
            self.due.remove(&(old, key.0.clone(), key.1.clone()));
        }
        if let Some(at) = set {
            self.due.insert((at, key.0.clone(), key.1.clone()));
            self.timers.insert(key, at);
        }
    }

    /// Fire every timer due by `until`, earliest first, each at its due
    /// time (a timer set at or before that time is due a step later, as on
    /// the host).
    fn fire(
        &mut self,
        until: i64,
        rules: &HashMap<String, LoadedRule>,
        summary: &mut Summary,
        on_alert: &mut impl FnMut(&AlertRecord),
    ) -> Result<(), Error> {
        while let Some((due, tenant, bucket)) = self.due.first().cloned() {
            if due > until {
                break;
            }
            self.due.pop_first();
            let key = (tenant.clone(), bucket.clone());
            self.timers.remove(&key);
            let Some(rule) = rules.get(&tenant) else {
                continue;
            };
            let stored = self.states.get(&key).map(Vec::as_slice);
            let outcome =
                run::call_timer(rule, &bucket, stored, due, due).map_err(|error| Error::Timer {
                    bucket: bucket.clone(),
                    due,
                    error,
                })?;
            summary.timers += 1;
            summary.fuel += outcome.fuel;
            for alert in &outcome.alerts {
                on_alert(alert);
            }
            summary.alerts += outcome.alerts.len();
            let timer = match outcome.timer {
                TimerChange::Set(at) if at <= due => TimerChange::Set(due + MIN_TIMER_STEP_MS),
                TimerChange::Set(at) => TimerChange::Set(at),
                TimerChange::Keep | TimerChange::Cancel => TimerChange::Cancel,
            };
            self.apply(key, outcome.state, timer);
        }
        Ok(())
    }
}

struct Line {
    number: usize,
    event: Incoming,
}

/// Run the events of `input` (NDJSON) through the component `wasm`, calling
/// `on_alert` for each alert in order.
pub fn run(
    runtime: &Runtime,
    origin: &str,
    wasm: &[u8],
    input: impl BufRead,
    options: &Options,
    clock: &dyn Clock,
    mut on_alert: impl FnMut(&AlertRecord),
) -> Result<Summary, Error> {
    let started = Instant::now();
    // Fail on a bad component before reading a possibly long input.
    let mut rules: HashMap<String, LoadedRule> = HashMap::new();
    let compiled = runtime.compile(origin, wasm).map_err(Error::Component)?;
    drop(
        runtime
            .instantiate("-", &compiled, &options.settings)
            .map_err(Error::Component)?,
    );

    let lines = read_lines(input, &options.tenant_field, clock)?;
    let mut summary = Summary {
        events: lines.len(),
        ..Summary::default()
    };
    let mut kept = Kept::default();
    let mut seen_buckets = std::collections::HashSet::new();

    for chunk in lines.chunks(options.batch_size.max(1)) {
        let first_line = chunk[0].number;
        let now = clock.now_ms();
        kept.fire(now, &rules, &mut summary, &mut on_alert)?;
        // Tenants in order of first appearance within the batch.
        let mut tenants: Vec<(&str, Vec<&Line>)> = Vec::new();
        for line in chunk {
            match tenants.iter_mut().find(|(t, _)| *t == line.event.tenant) {
                Some((_, members)) => members.push(line),
                None => tenants.push((&line.event.tenant, vec![line])),
            }
        }
        for (tenant, members) in tenants {
            if !rules.contains_key(tenant) {
                let rule = runtime
                    .instantiate(tenant, &compiled, &options.settings)
                    .map_err(Error::Component)?;
                rules.insert(tenant.to_owned(), rule);
            }
            let rule = &rules[tenant];
            let events: Vec<&Incoming> = members.iter().map(|l| &l.event).collect();
            let run = run::run_rule(rule, &events, now, |bucket| {
                Ok::<_, Error>(
                    kept.states
                        .get(&(tenant.to_owned(), bucket.to_owned()))
                        .cloned(),
                )
            })?;
            if let Some(bad) = run.unroutable.first() {
                return Err(Error::BadLine {
                    line: members[bad.index].number,
                    reason: bad.reason.clone(),
                });
            }
            summary.matched += run.matched;
            for bucket in run.buckets {
                let outcome = bucket.result.map_err(|error| match &error.cause {
                    // The index is the rule's claim: one outside the batch
                    // names no line, so the whole batch is reported.
                    Cause::BadEvent { index, .. }
                        if bucket.members.get(*index as usize).is_some() =>
                    {
                        Error::Rule {
                            line: members[bucket.members[*index as usize]].number,
                            error,
                        }
                    }
                    _ => Error::Bucket {
                        bucket: bucket.key.clone(),
                        line: first_line,
                        error,
                    },
                })?;
                for line in &outcome.log {
                    tracing::info!(tenant, rule = rule.name(), bucket = %bucket.key, level = ?line.level, "{}", line.message.trim_end());
                }
                summary.fuel += outcome.fuel;
                let key = (tenant.to_owned(), bucket.key);
                kept.apply(key.clone(), outcome.state, outcome.timer);
                seen_buckets.insert(key);
                for alert in &outcome.alerts {
                    on_alert(alert);
                }
                summary.alerts += outcome.alerts.len();
            }
        }
    }
    let until = options.until.unwrap_or(i64::MIN).max(clock.now_ms());
    kept.fire(until, &rules, &mut summary, &mut on_alert)?;
    summary.tenants = rules.len();
    summary.buckets = seen_buckets.len();
    summary.stored_buckets = kept.states.len();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn read_lines(
    input: impl BufRead,
    tenant_field: &str,
    clock: &dyn Clock,
) -> Result<Vec<Line>, Error> {
    let mut lines = Vec::new();
    for (i, text) in input.lines().enumerate() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let number = i + 1;
        let mut event =
            Incoming::parse(&text, tenant_field, clock.now_ms()).map_err(|e| Error::BadLine {
                line: number,
                reason: e.to_string(),
            })?;
        event.position = format!("line-{number}");
        lines.push(Line { number, event });
    }
    Ok(lines)
}
