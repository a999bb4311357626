//! Seed rule for client-02: alert when a machine's state changes into
//! `stopped`; a repeated `stopped` does not fire again; leaving `stopped`
//! resolves the alert. One bucket per machine.
//!
//! The alert follows the [alert lifecycle](tocsin_rule::lifecycle), with
//! the parameters `for` (how long a machine stays stopped before it fires),
//! `keep_firing_for` and `repeat_interval`; with none of them (the
//! prototype's rule) it fires on entering `stopped` and resolves on leaving.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_rule::lifecycle::{Lifecycle, Timing, Transition};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, OldState, Rule, Severity};

pub struct AnyMachineStopped;

/// `{"for": "1m", "keep_firing_for": "30s", "repeat_interval": "1h"}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// How long a machine stays stopped before the alert fires.
    #[serde(rename = "for", with = "tocsin_rule::duration")]
    pub pending_for: Duration,
    /// How long a firing alert stays firing after the machine leaves
    /// `stopped`.
    #[serde(with = "tocsin_rule::duration")]
    pub keep_firing_for: Duration,
    /// Publish a firing alert again this often (default: once).
    #[serde(with = "tocsin_rule::duration::option")]
    pub repeat_interval: Option<Duration>,
}

impl Params {
    fn timing(&self) -> Timing {
        Timing {
            pending_for: self.pending_for,
            keep_firing_for: self.keep_firing_for,
            repeat_interval: self.repeat_interval,
        }
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The machine's latest state, while its alert is pending or firing (a
    /// running machine with no alert keeps no state at all).
    pub last: Option<String>,
    /// Where the alert is: pending, firing or neither.
    pub alert: Lifecycle,
}

const ALERT_KEY: &str = "stopped";

/// What version 1.0 stored (state schema 1).
#[derive(Deserialize)]
struct StateV1 {
    stopped: bool,
}

/// Publish what the lifecycle says; `now`: the machine's state now.
fn publish(transition: Transition, now: &str, at: i64, ctx: &mut Context<'_>) {
    let machine = ctx.bucket().to_owned();
    let alert = match transition {
        Transition::Firing | Transition::Repeat => {
            Alert::firing(ALERT_KEY, format!("machine {machine} stopped"))
                .severity(Severity::Critical)
                .field("machineId", &machine)
                .field("at", at)
        }
        Transition::Resolved => Alert::resolved(ALERT_KEY, format!("machine {machine} is {now}"))
            .field("machineId", &machine)
            .field("state", now),
    };
    let alert = if transition == Transition::Repeat {
        alert.field("repeat", true)
    } else {
        alert
    };
    ctx.emit(alert);
}

impl Rule for AnyMachineStopped {
    type Params = Params;
    type State = State;

    fn manifest(_: &Params) -> Manifest {
        Manifest::new("any-machine-stopped", "1.1.0")
            .when_equals("eventType", "machineStatusChange")
            .bucket_by(["machineId"])
            .fields(["state"])
            .state_schema(2)
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let timing = params.timing();
        for event in events.iter() {
            let machine_state = event.require_str("state")?;
            let stopped = machine_state == "stopped";
            let at = event.time();
            let transition = state.alert.observe(&timing, ALERT_KEY, stopped, at);
            if state.alert.phase(ALERT_KEY).is_none() {
                state.last = None;
            } else if state.last.as_deref() != Some(machine_state) {
                state.last = Some(machine_state.to_owned());
            }
            if let Some(transition) = transition {
                publish(transition, machine_state, at, ctx);
            }
        }
        state.alert.schedule(&timing, None, ctx);
        Ok(())
    }

    fn on_timer(params: &Params, state: &mut State, ctx: &mut Context<'_>) -> Result<(), Error> {
        let timing = params.timing();
        let now = ctx.now();
        state.alert.fired();
        for (_, transition) in state.alert.tick(&timing, now) {
            publish(
                transition,
                state.last.as_deref().unwrap_or("unknown"),
                now,
                ctx,
            );
        }
        if state.alert.phase(ALERT_KEY).is_none() {
            state.last = None;
        }
        state.alert.schedule(&timing, None, ctx);
        Ok(())
    }

    fn upgrade_state(_: &Params, old: OldState<'_>) -> Result<State, String> {
        let old: StateV1 = old.decode()?;
        let mut state = State::default();
        if old.stopped {
            // When it fired was not kept: a repeat is due at once.
            state.alert.resume_firing(ALERT_KEY, 0);
            state.last = Some("stopped".to_owned());
        }
        Ok(state)
    }
}

tocsin_rule::export!(AnyMachineStopped);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::Harness;

    fn status(state: &str) -> serde_json::Value {
        json!({"eventType": "machineStatusChange", "machineId": "machine-03", "state": state})
    }

    #[test]
    fn fires_once_on_entering_stopped_and_resolves_on_leaving() {
        let mut rule = Harness::<AnyMachineStopped>::new();
        let alerts = rule
            .evaluate("machine-03", &[status("running"), status("stopped")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].is_firing());
        assert_eq!(alerts[0].title(), "machine machine-03 stopped");

        let repeated = rule.evaluate("machine-03", &[status("stopped")]).unwrap();
        assert!(
            repeated.is_empty(),
            "a repeated stopped must not fire again"
        );

        let resolved = rule.evaluate("machine-03", &[status("starting")]).unwrap();
        assert_eq!(resolved.len(), 1);
        assert!(!resolved[0].is_firing());
        assert_eq!(resolved[0].key(), "stopped");
        assert_eq!(
            rule.state("machine-03"),
            None,
            "a running machine needs no state"
        );
    }

    #[test]
    fn an_event_without_state_is_a_bad_event() {
        let mut rule = Harness::<AnyMachineStopped>::new();
        let err = rule
            .evaluate("m", &[status("running"), json!({"machineId": "m"})])
            .unwrap_err();
        assert_eq!(err.to_string(), "bad event #1: `state` must be a string");
    }

    #[test]
    fn for_fires_only_for_a_machine_still_stopped_after_it() {
        let mut rule = Harness::<AnyMachineStopped>::with_params_json(r#"{"for": "1m"}"#).unwrap();
        rule.set_now(1_000);
        let alerts = rule.evaluate("m", &[status("stopped")]).unwrap();
        assert!(alerts.is_empty(), "pending: {alerts:?}");
        assert_eq!(rule.timer("m"), Some(61_000));
        let alerts = rule.on_timer("m", 61_000).unwrap();
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].is_firing());
        assert_eq!(rule.timer("m"), None);

        // Started again within the minute: nothing published, nothing kept.
        rule.set_now(100_000);
        rule.evaluate("n", &[status("stopped")]).unwrap();
        rule.set_now(130_000);
        assert!(rule.evaluate("n", &[status("running")]).unwrap().is_empty());
        assert_eq!(rule.state("n"), None);
    }

    #[test]
    fn keep_firing_for_and_repeat_interval_are_parameters() {
        let mut rule = Harness::<AnyMachineStopped>::with_params_json(
            r#"{"keep_firing_for": "10s", "repeat_interval": "1m"}"#,
        )
        .unwrap();
        rule.set_now(0);
        assert_eq!(rule.evaluate("m", &[status("stopped")]).unwrap().len(), 1);
        assert_eq!(rule.timer("m"), Some(60_000));
        let repeat = rule.on_timer("m", 60_000).unwrap();
        assert_eq!((repeat.len(), repeat[0].key()), (1, "stopped"));
        rule.set_now(65_000);
        assert!(rule.evaluate("m", &[status("running")]).unwrap().is_empty());
        assert_eq!(rule.timer("m"), Some(75_000));
        let resolved = rule.on_timer("m", 75_000).unwrap();
        assert_eq!(resolved[0].title(), "machine m is running");
        assert!(!resolved[0].is_firing());
        assert_eq!(rule.state("m"), None);
    }

    #[test]
    fn a_stopped_state_of_version_1_0_resolves_on_leaving() {
        #[derive(serde::Serialize)]
        struct StateV1 {
            stopped: bool,
        }
        let mut rule = Harness::<AnyMachineStopped>::new();
        rule.store_older(
            "m",
            1,
            "any-machine-stopped@1.0.0",
            &StateV1 { stopped: true },
        );
        assert!(rule.evaluate("m", &[status("stopped")]).unwrap().is_empty());
        let resolved = rule.evaluate("m", &[status("running")]).unwrap();
        assert_eq!(resolved.len(), 1);
        assert!(!resolved[0].is_firing());
    }
}
