//! Example rule: alert when a machine has been `running` for longer than
//! `running_for` (a parameter such as `"10m"` or `"2s"`; default 10 minutes)
//! with no new state change — the prototype's "the machine is still
//! running…", which no event announces. One bucket per machine.
//!
//! When a machine enters `running`, the rule asks for a timer at that time
//! plus `running_for`; the host calls `on_timer` then even if no event
//! arrives, and the rule fires `still-running-{episode}`. The next state
//! change cancels the timer, and resolves the alert if it fired. Event time
//! is the event's `time` field (RFC 3339) when present, else its arrival.
//! A machine not heard of for `forget_after` (default 7 days) is forgotten:
//! the manifest's state time-to-live, so buckets of machines long gone do
//! not pile up.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Event, Events, Manifest, Rule, Severity};

pub struct StillRunning;

/// `{"running_for": "2s", "forget_after": "1d"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// How long a machine may run with no state change before it alerts.
    #[serde(with = "tocsin_rule::duration")]
    pub running_for: Duration,
    /// How long after its last event (or timer) a machine is forgotten.
    #[serde(with = "tocsin_rule::duration")]
    pub forget_after: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            running_for: Duration::from_secs(10 * 60),
            forget_after: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Params {
    fn running_for_ms(&self) -> i64 {
        i64::try_from(self.running_for.as_millis()).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The machine's latest state, and the event time it entered it.
    pub state: Option<String>,
    pub since: Option<i64>,
    /// Episodes so far; the latest is `still-running-{episode}`.
    pub episode: u64,
    /// Whether the latest episode's alert is firing.
    pub firing: bool,
}

impl State {
    fn key(&self) -> String {
        format!("still-running-{}", self.episode)
    }
}

/// The event's time: its `time` field when it holds an RFC 3339 time, else
/// when it arrived.
fn event_time(event: &Event<'_>) -> i64 {
    event
        .str("time")
        .and_then(tocsin_rule::parse_time)
        .unwrap_or_else(|| event.time())
}

impl Rule for StillRunning {
    type Params = Params;
    type State = State;

    fn manifest(params: &Params) -> Manifest {
        Manifest::new("still-running", "1.0.0")
            .when_equals("eventType", "machineStatusChange")
            .bucket_by(["machineId"])
            .fields(["state", "time"])
            .state_ttl(params.forget_after)
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let machine = ctx.bucket().to_owned();
        for event in events.iter() {
            let next = event.require_str("state")?;
            if state.state.as_deref() == Some(next) {
                continue;
            }
            let at = event_time(&event);
            if state.firing {
                let ran = at - state.since.unwrap_or(at);
                ctx.emit(
                    Alert::resolved(state.key(), format!("{machine} is now {next}"))
                        .field("machineId", &machine)
                        .field("state", next)
                        .field("ran_ms", ran),
                );
                state.firing = false;
            }
            state.state = Some(next.to_owned());
            state.since = Some(at);
            if next == "running" {
                ctx.set_timer(at.saturating_add(params.running_for_ms()));
            } else {
                ctx.cancel_timer();
            }
        }
        Ok(())
    }

    fn on_timer(params: &Params, state: &mut State, ctx: &mut Context<'_>) -> Result<(), Error> {
        let (Some("running"), Some(since)) = (state.state.as_deref(), state.since) else {
            return Ok(());
        };
        if state.firing {
            return Ok(());
        }
        let due = since.saturating_add(params.running_for_ms());
        if ctx.now() < due {
            // Early (a clock step back): ask again for the time it is due.
            ctx.set_timer(due);
            return Ok(());
        }
        state.episode += 1;
        state.firing = true;
        let machine = ctx.bucket().to_owned();
        ctx.emit(
            Alert::firing(
                state.key(),
                format!(
                    "{machine} has been running for over {} with no state change",
                    tocsin_rule::format_duration(params.running_for)
                ),
            )
            .severity(Severity::Warning)
            .field("machineId", &machine)
            .field("since", since),
        );
        Ok(())
    }
}

tocsin_rule::export!(StillRunning);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::Harness;

    /// 2026-01-01T00:00:00Z in epoch milliseconds.
    const T0: i64 = 1_767_225_600_000;
    const MACHINE: &str = "machine-03";

    fn status(state: &str, seconds: i64) -> serde_json::Value {
        json!({
            "eventType": "machineStatusChange",
            "clientId": "client-01",
            "machineId": MACHINE,
            "state": state,
            "time": format!("2026-01-01T00:{:02}:{:02}Z", seconds / 60, seconds % 60),
        })
    }

    fn harness() -> Harness<StillRunning> {
        let mut rule = Harness::with_params_json(r#"{"running_for": "2s"}"#).unwrap();
        rule.set_now(T0 + 60_000);
        rule
    }

    #[test]
    fn a_machine_running_past_its_time_alerts_on_the_timer_and_resolves_on_a_change() {
        let mut rule = harness();
        assert!(
            rule.evaluate(MACHINE, &[status("running", 10)])
                .unwrap()
                .is_empty()
        );
        assert_eq!(rule.timer(MACHINE), Some(T0 + 12_000));
        let alerts = rule.on_timer(MACHINE, T0 + 12_000).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].key(), "still-running-1");
        assert!(alerts[0].is_firing());
        assert!(
            alerts[0].title().contains("running for over 2s"),
            "{}",
            alerts[0].title()
        );
        let alerts = rule.evaluate(MACHINE, &[status("stopped", 30)]).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].key(), "still-running-1");
        assert!(!alerts[0].is_firing(), "resolved");
        assert_eq!(rule.timer(MACHINE), None);
    }

    #[test]
    fn a_change_before_the_time_cancels_the_timer_and_nothing_fires() {
        let mut rule = harness();
        rule.evaluate(MACHINE, &[status("running", 10), status("stopped", 11)])
            .unwrap();
        assert_eq!(rule.timer(MACHINE), None);
        assert!(rule.on_timer(MACHINE, T0 + 12_000).unwrap().is_empty());
    }

    #[test]
    fn the_same_state_again_is_no_change_and_keeps_the_first_time() {
        let mut rule = harness();
        rule.evaluate(MACHINE, &[status("running", 10), status("running", 11)])
            .unwrap();
        assert_eq!(rule.timer(MACHINE), Some(T0 + 12_000));
    }

    #[test]
    fn an_early_timer_asks_again_for_its_time() {
        let mut rule = harness();
        rule.evaluate(MACHINE, &[status("running", 10)]).unwrap();
        assert!(rule.on_timer(MACHINE, T0 + 11_000).unwrap().is_empty());
        assert_eq!(rule.timer(MACHINE), Some(T0 + 12_000));
    }

    #[test]
    fn without_a_time_field_the_arrival_is_the_event_time() {
        let mut rule = harness();
        let mut event = status("running", 0);
        event.as_object_mut().unwrap().remove("time");
        rule.set_now(T0 + 5_000);
        rule.evaluate(MACHINE, &[event]).unwrap();
        assert_eq!(rule.timer(MACHINE), Some(T0 + 7_000));
    }

    #[test]
    fn the_running_time_is_a_parameter_with_a_ten_minute_default() {
        assert_eq!(Params::default().running_for, Duration::from_secs(600));
        let error = Harness::<StillRunning>::with_params_json(r#"{"running_for": "soon"}"#)
            .err()
            .unwrap();
        assert!(error.contains("running_for"), "{error}");
    }
}
