//! `tocsin rule test`: run a file of events through one rule component the
//! way the service does — manifest filter, tenant per event, buckets, batches,
//! state carried between batches — and report every alert.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::{Duration, Instant};

use tocsin::alert::AlertRecord;
use tocsin::clock::Clock;
use tocsin::engine::run;
use tocsin::event::Incoming;
use tocsin::runtime::{Cause, LoadedRule, RuleError, RuleSettings, Runtime, StateChange};

/// How `rule test` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub tenant_field: String,
    pub batch_size: usize,
    /// The rule's parameters (and name), as a tenant would run it.
    pub settings: RuleSettings,
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
    let mut states: HashMap<(String, String), Vec<u8>> = HashMap::new();
    let mut seen_buckets = std::collections::HashSet::new();

    for chunk in lines.chunks(options.batch_size.max(1)) {
        let first_line = chunk[0].number;
        let now = clock.now_ms();
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
                Ok::<_, Error>(states.get(&(tenant.to_owned(), bucket.to_owned())).cloned())
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
                match outcome.state {
                    StateChange::Unchanged => {}
                    StateChange::Set(bytes) => {
                        states.insert(key.clone(), bytes);
                    }
                    StateChange::Delete => {
                        states.remove(&key);
                    }
                }
                seen_buckets.insert(key);
                for alert in &outcome.alerts {
                    on_alert(alert);
                }
                summary.alerts += outcome.alerts.len();
            }
        }
    }
    summary.tenants = rules.len();
    summary.buckets = seen_buckets.len();
    summary.stored_buckets = states.len();
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
