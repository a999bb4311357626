//! `tocsin rule test`: one rule component over a file of events, run by the
//! engine every host runs — routing, batches, bisection, dead letters,
//! timers, the alert lifecycle, state carried between calls — with its
//! state in a temporary data directory that is gone afterwards. It is
//! `tocsin replay` with the component assigned to every tenant the file
//! names, so what it prints is what a host would publish.
//!
//! The input is read and checked whole before anything runs: a line that is
//! not an event fails the test with its number, and nothing is printed. An
//! event the rule does not apply (it failed on it, or rejected it) is
//! reported on standard error with its line and reason, the other events go
//! on, and the test fails at the end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tocsin::catalogue::Assignment;
use tocsin::clock::Clock;
use tocsin::config::Config;
use tocsin::event::Incoming;
use tocsin::sink::AlertSink;

/// How `rule test` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub tenant_field: String,
    pub batch_size: usize,
    /// The name to run the rule under (default: the manifest's).
    pub name: Option<String>,
    /// The rule's parameters (default: the rule's own).
    pub params: Option<serde_json::Value>,
    /// After the last event, move the clock to this time (epoch
    /// milliseconds) so the timers due at or before it fire; the clock
    /// never passes it.
    pub until: Option<i64>,
}

/// What a run did, for the summary line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub events: u64,
    /// Events the rule applied.
    pub applied: u64,
    pub tenants: u64,
    /// Buckets holding state at the end.
    pub stored_buckets: u64,
    pub alerts: u64,
    /// `on-timer` calls.
    pub timers: u64,
    pub fuel: u64,
    pub elapsed: Duration,
    /// `line N: …` for each event the rule did not apply, in order.
    pub not_applied: Vec<String>,
}

/// Run the events of `input` (NDJSON) through the component at `rule`,
/// publishing its alerts to `alerts` in order.
pub async fn run(
    rule: &Path,
    mut input: impl Read,
    options: &Options,
    clock: Arc<dyn Clock>,
    alerts: Arc<dyn AlertSink>,
) -> anyhow::Result<Summary> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .context("cannot read events")?;
    let tenants = tenants(&text, &options.tenant_field, clock.now_ms())?;
    let data = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let path: PathBuf = rule.to_owned();
    let assign = |tenant: &str| Assignment {
        tenant: tenant.to_owned(),
        path: path.clone(),
        name: options.name.clone(),
        params: options.params.clone(),
    };
    let mut config = Config {
        data_dir: data.path().to_owned(),
        tenant_field: options.tenant_field.clone(),
        max_batch_events: options.batch_size.max(1),
        ..Config::default()
    };
    config.rules = tenants.iter().map(|tenant| assign(tenant)).collect();
    if config.rules.is_empty() {
        // No events: the component is still loaded, so a bad one fails.
        config.rules.push(assign("rule-test"));
    }
    let mut not_applied = Vec::new();
    let replayed = tocsin::serve::replay(
        &config,
        std::io::Cursor::new(text),
        "events",
        clock,
        options.until,
        alerts,
        |line, rule, reason| {
            // A rule's failure names the rule already.
            not_applied.push(match rule {
                Some(rule) if !reason.starts_with("rule `") => {
                    format!("line {line}: rule `{rule}`: {reason}")
                }
                _ => format!("line {line}: {reason}"),
            })
        },
    )
    .await?;
    Ok(Summary {
        events: replayed.events,
        applied: replayed.applied,
        tenants: tenants.len() as u64,
        stored_buckets: replayed.buckets_with_state,
        alerts: replayed.alerts,
        timers: replayed.timers,
        fuel: replayed.fuel,
        elapsed: replayed.elapsed,
        not_applied,
    })
}

/// The tenants the events name, in order of first appearance; the first
/// line that is not an event fails with its number and reason.
fn tenants(text: &str, tenant_field: &str, now: i64) -> anyhow::Result<Vec<String>> {
    let mut tenants: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let event = Incoming::parse(line, tenant_field, now)
            .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        if seen.insert(event.tenant.clone()) {
            tenants.push(event.tenant);
        }
    }
    Ok(tenants)
}
