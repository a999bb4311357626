//! Example rule: a cloned SIM shows up as calls of one IMSI through two
//! different switches at (nearly) the same time. One bucket per IMSI; the rule
//! fires `sim-clone` once when a call comes through a different switch than
//! an earlier call of the same IMSI no more than `window` apart in event time
//! (a parameter, default 5 s), and never again for that IMSI. The state keeps
//! the calls of the last `window` before the newest call seen
//! ([`Recent`](tocsin_rule::windows::Recent)), and whether the alert has
//! fired. A call more than `allowed_lateness` (default 5 s) behind the newest
//! is late: dropped and counted.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_rule::windows::{self, Recent};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, OldState, Rule, Severity, json};

pub struct SimFraud;

/// `{"window": "2s", "allowed_lateness": "10s"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Two calls through different switches at most this far apart are a
    /// clone.
    #[serde(with = "tocsin_rule::duration")]
    pub window: Duration,
    /// How far behind the newest call a call may come and still count.
    #[serde(with = "tocsin_rule::duration")]
    pub allowed_lateness: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            window: Duration::from_secs(5),
            allowed_lateness: windows::DEFAULT_ALLOWED_LATENESS,
        }
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Recent calls' switches, within the window of the newest call.
    pub calls: Recent<String>,
    /// Whether `sim-clone` has fired for this IMSI; it never fires again.
    pub fired: bool,
}

/// What version 1.1 stored (state schema 1).
#[derive(Deserialize)]
struct StateV1 {
    calls: Vec<CallV1>,
    fired: bool,
}

#[derive(Deserialize)]
struct CallV1 {
    switch: String,
    at: i64,
}

const ALERT_KEY: &str = "sim-clone";

impl Rule for SimFraud {
    type Params = Params;
    type State = State;

    fn manifest(_: &Params) -> Manifest {
        Manifest::new("sim-fraud", "1.2.0")
            .when_equals("eventType", "call")
            .bucket_by(["imsi"])
            .event_time("time")
            .fields(["switch"])
            .state_schema(2)
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let window = windows::millis(params.window);
        if state.fired {
            return Ok(());
        }
        for event in events.iter() {
            let switch = event.require_str("switch")?;
            let at = event.time();
            let clone = state
                .calls
                .items()
                .find(|(t, s)| s.as_str() != switch && (at - t).abs() <= window)
                .map(|(t, s)| (t, s.clone()));
            let taken = state.calls.add(
                params.window,
                params.allowed_lateness,
                at,
                switch.to_owned(),
            );
            if !taken {
                continue; // late: dropped and counted
            }
            if let Some((earlier_at, earlier)) = clone {
                let imsi = ctx.bucket();
                let alert = Alert::firing(
                    ALERT_KEY,
                    format!(
                        "SIM {imsi} cloned: calls via {earlier} and {switch} {} ms apart",
                        (at - earlier_at).abs()
                    ),
                )
                .severity(Severity::Critical)
                .detail(json!({
                    "imsi": imsi,
                    "first": { "switch": earlier, "at": earlier_at },
                    "second": { "switch": switch, "at": at },
                }));
                ctx.emit(alert);
                state.fired = true;
                state.calls.clear();
                return Ok(());
            }
        }
        Ok(())
    }

    fn upgrade_state(_: &Params, old: OldState<'_>) -> Result<State, String> {
        let old: StateV1 = old.decode()?;
        let calls = old.calls.into_iter().map(|c| (c.at, c.switch)).collect();
        Ok(State {
            calls: Recent::resume(calls, None),
            fired: old.fired,
        })
    }
}

tocsin_rule::export!(SimFraud);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::testing::{Harness, abi};

    const IMSI: &str = "234150999999999";

    fn call(switch: &str, time: &str) -> serde_json::Value {
        json!({"eventType": "call", "clientId": "client-04", "imsi": IMSI, "switch": switch, "time": time})
    }

    /// The calls the state keeps, as `(switch, at)`.
    fn calls(state: &State) -> Vec<(&str, i64)> {
        state
            .calls
            .items()
            .map(|(at, s)| (s.as_str(), at))
            .collect()
    }

    /// 2026-01-01T00:00:00Z in epoch milliseconds.
    const T0: i64 = 1_767_225_600_000;

    #[test]
    fn the_manifest_buckets_by_imsi_on_event_time() {
        let rule = Harness::<SimFraud>::new();
        let manifest = rule.manifest().as_abi();
        assert_eq!(manifest.name, "sim-fraud");
        assert_eq!(manifest.version, "1.2.0");
        assert_eq!(manifest.bucket_key, ["imsi"]);
        assert_eq!(manifest.fields, ["switch"]);
        assert_eq!(
            manifest.event_time,
            abi::EventTime::Field("time".to_owned())
        );
    }

    #[test]
    fn the_window_is_a_parameter() {
        let mut rule = Harness::<SimFraud>::with_params_json(r#"{"window": 2000}"#).unwrap();
        assert_eq!(rule.params().window, Duration::from_secs(2));
        let alerts = rule
            .evaluate(
                IMSI,
                &[
                    call("UK", "2026-01-01T00:00:00Z"),
                    call("FR", "2026-01-01T00:00:03Z"), // 3 s: not within 2 s
                    call("UK", "2026-01-01T00:00:04Z"), // 1 s after FR
                ],
            )
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].title(),
            "SIM 234150999999999 cloned: calls via FR and UK 1000 ms apart"
        );
    }

    #[test]
    fn two_switches_within_five_seconds_fire_once_and_never_again() {
        let mut rule = Harness::<SimFraud>::new();
        let alerts = rule
            .evaluate(IMSI, &[call("UK", "2026-01-01T00:00:00Z")])
            .unwrap();
        assert!(alerts.is_empty());
        let state = rule.state(IMSI).unwrap();
        assert_eq!(calls(&state), [("UK", T0)]);
        assert!(!state.fired);

        let alerts = rule
            .evaluate(IMSI, &[call("FR", "2026-01-01T00:00:05Z")])
            .unwrap();
        assert_eq!(alerts.len(), 1, "exactly 5 s apart counts");
        let alert = &alerts[0];
        assert_eq!(alert.key(), "sim-clone");
        assert!(alert.is_firing());
        assert_eq!(alert.severity_level(), Severity::Critical);
        assert_eq!(
            alert.title(),
            "SIM 234150999999999 cloned: calls via UK and FR 5000 ms apart"
        );
        let detail: serde_json::Value = serde_json::from_str(alert.detail_json()).unwrap();
        assert_eq!(
            detail,
            json!({
                "imsi": IMSI,
                "first": {"switch": "UK", "at": T0},
                "second": {"switch": "FR", "at": T0 + 5_000},
            })
        );
        let fired = rule.state(IMSI).unwrap();
        assert_eq!(calls(&fired), []);
        assert!(fired.fired);

        let again = rule
            .evaluate(
                IMSI,
                &[
                    call("UK", "2026-01-01T00:00:06Z"),
                    call("DE", "2026-01-01T00:00:07Z"),
                ],
            )
            .unwrap();
        assert!(again.is_empty(), "fires once per IMSI: {again:?}");
        assert_eq!(rule.state(IMSI), Some(fired), "nothing more is kept");
    }

    #[test]
    fn the_same_switch_or_calls_more_than_five_seconds_apart_do_not_fire() {
        let mut rule = Harness::<SimFraud>::new();
        let alerts = rule
            .evaluate(
                IMSI,
                &[
                    call("UK", "2026-01-01T00:00:00Z"),
                    call("UK", "2026-01-01T00:00:02Z"),
                    call("FR", "2026-01-01T00:00:07.001Z"), // 5.001 s after the last UK call
                    call("FR", "2026-01-01T00:00:09Z"),
                ],
            )
            .unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        assert_eq!(
            calls(&rule.state(IMSI).unwrap()),
            [("FR", T0 + 7_001), ("FR", T0 + 9_000)],
            "calls more than 5 s before the newest are pruned"
        );
    }

    #[test]
    fn a_late_call_fires_against_a_later_one_within_five_seconds() {
        let mut rule = Harness::<SimFraud>::new();
        rule.evaluate(IMSI, &[call("UK", "2026-01-01T00:00:10Z")])
            .unwrap();
        // Arrives later but happened 3 s earlier: |Δt| counts.
        let alerts = rule
            .evaluate(IMSI, &[call("ES", "2026-01-01T00:00:07Z")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].title(),
            "SIM 234150999999999 cloned: calls via UK and ES 3000 ms apart"
        );
        assert!(rule.state(IMSI).unwrap().fired);
    }

    #[test]
    fn a_late_call_more_than_five_seconds_before_a_later_one_does_not_fire() {
        let mut rule = Harness::<SimFraud>::new();
        rule.evaluate(IMSI, &[call("UK", "2026-01-01T00:00:20Z")])
            .unwrap();
        let alerts = rule
            .evaluate(IMSI, &[call("ES", "2026-01-01T00:00:14Z")])
            .unwrap();
        assert!(alerts.is_empty(), "6 s apart: {alerts:?}");
        let state = rule.state(IMSI).unwrap();
        assert_eq!(calls(&state), [("UK", T0 + 20_000)]);
        assert_eq!(
            state.calls.late(),
            1,
            "6 s behind the newest call: late, dropped and counted"
        );
    }

    #[test]
    fn imsis_are_independent() {
        let mut rule = Harness::<SimFraud>::new();
        rule.evaluate(IMSI, &[call("UK", "2026-01-01T00:00:00Z")])
            .unwrap();
        let other = "234150888888888";
        let alerts = rule
            .evaluate(
                other,
                &[json!({"eventType": "call", "imsi": other, "switch": "FR", "time": "2026-01-01T00:00:01Z"})],
            )
            .unwrap();
        assert!(alerts.is_empty());
        assert_eq!(calls(&rule.state(other).unwrap()), [("FR", T0 + 1_000)]);
    }

    #[test]
    fn a_call_without_switch_is_a_bad_event() {
        let mut rule = Harness::<SimFraud>::new();
        let err = rule
            .evaluate(
                IMSI,
                &[json!({"eventType": "call", "imsi": IMSI, "time": "2026-01-01T00:00:00Z"})],
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "bad event #0: `switch` must be a string");
    }

    #[test]
    fn the_allowed_lateness_is_a_parameter() {
        let mut rule =
            Harness::<SimFraud>::with_params_json(r#"{"allowed_lateness": "10s"}"#).unwrap();
        rule.evaluate(IMSI, &[call("UK", "2026-01-01T00:00:20Z")])
            .unwrap();
        // 6 s behind: within 10 s of lateness, but not within the 5 s window.
        let alerts = rule
            .evaluate(IMSI, &[call("ES", "2026-01-01T00:00:14Z")])
            .unwrap();
        assert!(alerts.is_empty());
        let state = rule.state(IMSI).unwrap();
        assert_eq!(state.calls.late(), 0);
        assert_eq!(calls(&state), [("UK", T0 + 20_000)], "outside the window");
    }

    #[test]
    fn a_state_of_version_1_1_is_upgraded() {
        #[derive(Serialize)]
        struct CallV1 {
            switch: &'static str,
            at: i64,
        }
        #[derive(Serialize)]
        struct StateV1 {
            calls: Vec<CallV1>,
            fired: bool,
        }
        let mut rule = Harness::<SimFraud>::new();
        rule.store_older(
            IMSI,
            1,
            "sim-fraud@1.1.0",
            &StateV1 {
                calls: vec![CallV1 {
                    switch: "UK",
                    at: T0,
                }],
                fired: false,
            },
        );
        let alerts = rule
            .evaluate(IMSI, &[call("FR", "2026-01-01T00:00:02Z")])
            .unwrap();
        assert_eq!(
            alerts[0].title(),
            "SIM 234150999999999 cloned: calls via UK and FR 2000 ms apart"
        );
    }
}
