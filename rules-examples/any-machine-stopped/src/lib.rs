//! Seed rule for client-02: alert when a machine's state changes into
//! `stopped`; a repeated `stopped` does not fire again; leaving `stopped`
//! resolves the alert. One bucket per machine.

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, Severity};

pub struct AnyMachineStopped;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub stopped: bool,
}

const ALERT_KEY: &str = "stopped";

impl Rule for AnyMachineStopped {
    type Params = ();
    type State = State;

    fn manifest((): &()) -> Manifest {
        Manifest::new("any-machine-stopped", "1.0.0")
            .when_equals("eventType", "machineStatusChange")
            .bucket_by(["machineId"])
            .fields(["state"])
    }

    fn evaluate(
        (): &(),
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        for event in events.iter() {
            let machine_state = event.require_str("state")?;
            let stopped = machine_state == "stopped";
            if stopped && !state.stopped {
                let alert = Alert::firing(ALERT_KEY, format!("machine {} stopped", ctx.bucket()))
                    .severity(Severity::Critical)
                    .field("machineId", ctx.bucket())
                    .field("at", event.time());
                ctx.emit(alert);
            } else if !stopped && state.stopped {
                let alert = Alert::resolved(
                    ALERT_KEY,
                    format!("machine {} is {machine_state}", ctx.bucket()),
                )
                .field("machineId", ctx.bucket())
                .field("state", machine_state);
                ctx.emit(alert);
            }
            state.stopped = stopped;
        }
        Ok(())
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
}
