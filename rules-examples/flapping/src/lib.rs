//! Example rule: alert when a machine flaps, i.e. changes state more than
//! `max_changes` times (a parameter, default 3) within `window` of event time
//! (default 10 minutes). One bucket per machine. A change is an event whose
//! state differs from the machine's previous one (the first event seen is not
//! a change). With the defaults, the 4th change within a 10-minute window
//! fires `flapping-{episode}`; while the episode lasts nothing fires again.
//! The episode ends, and its alert resolves, once there has been no change for
//! a window: noticed either by the next event (its time is more than a window
//! after the last change) or by a timer set for the last change plus a
//! window.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, Severity};

pub struct Flapping;

/// `{"max_changes": 5, "window": "1h"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// More than this many changes within the window is flapping.
    pub max_changes: usize,
    /// The window for counting changes, and the quiet time that ends an
    /// episode.
    #[serde(with = "tocsin_rule::duration")]
    pub window: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_changes: 3,
            window: Duration::from_secs(10 * 60),
        }
    }
}

impl Params {
    fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The machine's latest state.
    pub last_state: Option<String>,
    /// Event times of the changes within a window of the latest one.
    pub changes: Vec<i64>,
    /// Event time of the latest change.
    pub last_change: Option<i64>,
    /// Episodes so far; the active or latest one is `flapping-{episode}`.
    pub episode: u64,
    /// Whether an episode is active (its alert is firing).
    pub active: bool,
}

impl State {
    fn key(&self) -> String {
        format!("flapping-{}", self.episode)
    }

    /// Ends the active episode at `ended_at` (event or processing time):
    /// resolves its alert and forgets the changes that left the window.
    fn end_episode(&mut self, window: i64, ctx: &mut Context<'_>, ended_at: i64) {
        let machine = ctx.bucket();
        let alert = Alert::resolved(self.key(), format!("{machine} is no longer flapping"))
            .severity(Severity::Warning)
            .field("machineId", machine)
            .field("episode", self.episode)
            .field("last_change", self.last_change)
            .field("at", ended_at);
        ctx.emit(alert);
        self.active = false;
        self.changes
            .retain(|&t| t >= ended_at.saturating_sub(window));
    }
}

impl Rule for Flapping {
    type Params = Params;
    type State = State;

    fn manifest(_: &Params) -> Manifest {
        Manifest::new("flapping", "1.1.0")
            .when_equals("eventType", "machineStatusChange")
            .bucket_by(["machineId"])
            .event_time("time")
            .fields(["state"])
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let window = params.window_ms();
        let machine = ctx.bucket().to_owned();
        for event in events.iter() {
            let machine_state = event.require_str("state")?;
            let at = event.time();

            if state.active
                && let Some(last_change) = state.last_change
                && at - last_change > window
            {
                state.end_episode(window, ctx, at);
                ctx.cancel_timer();
            }

            let changed = match state.last_state.as_deref() {
                Some(previous) if previous == machine_state => continue,
                Some(_) => true,
                None => false, // the first event seen is not a change
            };
            state.last_state = Some(machine_state.to_owned());
            if !changed {
                continue;
            }

            let last_change = state.last_change.map_or(at, |t| t.max(at));
            state.last_change = Some(last_change);
            state.changes.push(at);
            state
                .changes
                .retain(|&t| t >= last_change.saturating_sub(window));

            if !state.active && state.changes.len() > params.max_changes {
                state.episode += 1;
                state.active = true;
                let alert = Alert::firing(
                    state.key(),
                    format!(
                        "{machine} is flapping: {} state changes within {}",
                        state.changes.len(),
                        tocsin_rule::format_duration(params.window),
                    ),
                )
                .severity(Severity::Warning)
                .field("machineId", &machine)
                .field("episode", state.episode)
                .field("changes", &state.changes)
                .field("state", machine_state);
                ctx.emit(alert);
            }
            if state.active {
                ctx.set_timer(last_change.saturating_add(window));
            }
        }
        Ok(())
    }

    fn on_timer(params: &Params, state: &mut State, ctx: &mut Context<'_>) -> Result<(), Error> {
        let Some(last_change) = state.last_change.filter(|_| state.active) else {
            return Ok(());
        };
        let window = params.window_ms();
        let due = last_change.saturating_add(window);
        let now = ctx.now();
        if now >= due {
            state.end_episode(window, ctx, now);
        } else {
            ctx.set_timer(due);
        }
        Ok(())
    }
}

tocsin_rule::export!(Flapping);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::{Harness, abi};

    const MACHINE: &str = "machine-03";
    /// 2026-01-01T00:00:00Z in epoch milliseconds.
    const T0: i64 = 1_767_225_600_000;
    const MINUTE: i64 = 60_000;

    /// A status event `minutes` after `T0` (as an RFC 3339 time).
    fn status(state: &str, minutes: i64) -> serde_json::Value {
        json!({
            "eventType": "machineStatusChange",
            "clientId": "client-02",
            "machineId": MACHINE,
            "state": state,
            "time": format!("2026-01-01T{:02}:{:02}:00Z", minutes / 60, minutes % 60),
        })
    }

    fn summary<'a>(alerts: &'a [Alert<'_>]) -> Vec<(&'a str, bool, &'a str)> {
        alerts
            .iter()
            .map(|a| (a.key(), a.is_firing(), a.title()))
            .collect()
    }

    /// Running at 0, then stopped/running changes at minutes 1, 2, 3, 4.
    fn flap(rule: &mut Harness<Flapping>) -> Vec<Alert<'static>> {
        rule.evaluate(
            MACHINE,
            &[
                status("running", 0),
                status("stopped", 1),
                status("running", 2),
                status("stopped", 3),
                status("running", 4),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_manifest_buckets_by_machine_on_event_time() {
        let rule = Harness::<Flapping>::new();
        let manifest = rule.manifest().as_abi();
        assert_eq!(manifest.name, "flapping");
        assert_eq!(manifest.version, "1.1.0");
        assert_eq!(manifest.bucket_key, ["machineId"]);
        assert_eq!(manifest.fields, ["state"]);
        assert_eq!(
            manifest.event_time,
            abi::EventTime::Field("time".to_owned())
        );
    }

    #[test]
    fn the_fourth_change_within_ten_minutes_fires_once() {
        let mut rule = Harness::<Flapping>::new();
        let alerts = rule
            .evaluate(
                MACHINE,
                &[
                    status("running", 0),
                    status("running", 1), // same state: not a change
                    status("stopped", 2),
                    status("running", 3),
                    status("stopped", 4),
                ],
            )
            .unwrap();
        assert!(alerts.is_empty(), "three changes are not flapping");

        let alerts = rule.evaluate(MACHINE, &[status("starting", 5)]).unwrap();
        assert_eq!(
            summary(&alerts),
            [(
                "flapping-1",
                true,
                "machine-03 is flapping: 4 state changes within 10m"
            )]
        );
        assert_eq!(alerts[0].severity_level(), Severity::Warning);
        let detail: serde_json::Value = serde_json::from_str(alerts[0].detail_json()).unwrap();
        assert_eq!(detail["episode"], json!(1));
        assert_eq!(
            detail["changes"],
            json!([
                T0 + 2 * MINUTE,
                T0 + 3 * MINUTE,
                T0 + 4 * MINUTE,
                T0 + 5 * MINUTE
            ])
        );
        assert_eq!(rule.timer(MACHINE), Some(T0 + 15 * MINUTE));

        let more = rule
            .evaluate(MACHINE, &[status("running", 6), status("stopped", 7)])
            .unwrap();
        assert!(more.is_empty(), "one alert per episode: {more:?}");
        assert_eq!(rule.timer(MACHINE), Some(T0 + 17 * MINUTE));
        assert_eq!(
            rule.state(MACHINE),
            Some(State {
                last_state: Some("stopped".to_owned()),
                changes: (2..=7).map(|m| T0 + m * MINUTE).collect(),
                last_change: Some(T0 + 7 * MINUTE),
                episode: 1,
                active: true,
            })
        );
    }

    #[test]
    fn changes_spread_over_more_than_ten_minutes_do_not_fire() {
        let mut rule = Harness::<Flapping>::new();
        let alerts = rule
            .evaluate(
                MACHINE,
                &[
                    status("running", 0),
                    status("stopped", 1),
                    status("running", 5),
                    status("stopped", 9),
                    status("running", 12), // 11 min after the first change
                    status("stopped", 16), // 11 min after the second change
                ],
            )
            .unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        let state = rule.state(MACHINE).unwrap();
        assert_eq!(
            state.changes,
            [T0 + 9 * MINUTE, T0 + 12 * MINUTE, T0 + 16 * MINUTE],
            "changes older than the window are pruned"
        );
        assert!(!state.active);
        assert_eq!(rule.timer(MACHINE), None, "no episode, no timer");
    }

    #[test]
    fn the_next_event_after_ten_quiet_minutes_resolves_and_a_new_episode_gets_a_new_key() {
        let mut rule = Harness::<Flapping>::new();
        assert_eq!(flap(&mut rule).len(), 1);

        // Last change at minute 4; minute 14 is exactly 10 minutes later: not yet over.
        let alerts = rule.evaluate(MACHINE, &[status("running", 14)]).unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        assert!(rule.state(MACHINE).unwrap().active);

        let alerts = rule.evaluate(MACHINE, &[status("running", 15)]).unwrap();
        assert_eq!(
            summary(&alerts),
            [("flapping-1", false, "machine-03 is no longer flapping")]
        );
        assert_eq!(rule.timer(MACHINE), None, "the timer is cancelled");
        assert_eq!(
            rule.state(MACHINE),
            Some(State {
                last_state: Some("running".to_owned()),
                changes: vec![],
                last_change: Some(T0 + 4 * MINUTE),
                episode: 1,
                active: false,
            })
        );

        let alerts = rule
            .evaluate(
                MACHINE,
                &[
                    status("stopped", 16),
                    status("running", 17),
                    status("stopped", 18),
                    status("running", 19),
                ],
            )
            .unwrap();
        assert_eq!(
            summary(&alerts),
            [(
                "flapping-2",
                true,
                "machine-03 is flapping: 4 state changes within 10m"
            )]
        );
    }

    #[test]
    fn a_change_after_ten_quiet_minutes_resolves_and_counts_afresh() {
        let mut rule = Harness::<Flapping>::new();
        flap(&mut rule);
        let alerts = rule.evaluate(MACHINE, &[status("stopped", 20)]).unwrap();
        assert_eq!(
            summary(&alerts),
            [("flapping-1", false, "machine-03 is no longer flapping")]
        );
        let state = rule.state(MACHINE).unwrap();
        assert_eq!(state.changes, [T0 + 20 * MINUTE]);
        assert_eq!(state.last_change, Some(T0 + 20 * MINUTE));
        assert!(!state.active);
    }

    #[test]
    fn the_timer_resolves_a_quiet_episode() {
        let mut rule = Harness::<Flapping>::new();
        rule.set_now(T0 + 4 * MINUTE);
        flap(&mut rule);
        assert_eq!(rule.timer(MACHINE), Some(T0 + 14 * MINUTE));

        // Called early (say the host was asked before a later change): nothing, re-armed.
        let early = rule.on_timer(MACHINE, T0 + 13 * MINUTE).unwrap();
        assert!(early.is_empty());
        assert_eq!(rule.timer(MACHINE), Some(T0 + 14 * MINUTE));

        let alerts = rule.on_timer(MACHINE, T0 + 14 * MINUTE).unwrap();
        assert_eq!(
            summary(&alerts),
            [("flapping-1", false, "machine-03 is no longer flapping")]
        );
        assert_eq!(rule.timer(MACHINE), None);
        let state = rule.state(MACHINE).unwrap();
        assert!(!state.active);
        assert_eq!(state.changes, [T0 + 4 * MINUTE], "only the window is kept");

        // The episode is over: neither the timer nor the next event resolves again.
        assert!(rule.on_timer(MACHINE, T0 + 30 * MINUTE).unwrap().is_empty());
        let alerts = rule.evaluate(MACHINE, &[status("running", 30)]).unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
    }

    #[test]
    fn machines_are_independent() {
        let mut rule = Harness::<Flapping>::new();
        flap(&mut rule);
        let alerts = rule
            .evaluate(
                "machine-04",
                &[json!({"machineId": "machine-04", "state": "stopped", "time": "2026-01-01T00:05:00Z"})],
            )
            .unwrap();
        assert!(alerts.is_empty());
        assert_eq!(
            rule.state("machine-04"),
            Some(State {
                last_state: Some("stopped".to_owned()),
                ..State::default()
            })
        );
    }

    #[test]
    fn an_event_without_state_is_a_bad_event() {
        let mut rule = Harness::<Flapping>::new();
        let err = rule
            .evaluate(
                MACHINE,
                &[
                    status("running", 0),
                    json!({"machineId": MACHINE, "time": "2026-01-01T00:01:00Z"}),
                ],
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "bad event #1: `state` must be a string");
        assert_eq!(rule.state(MACHINE), None);
    }

    #[test]
    fn the_count_and_window_are_parameters() {
        let mut rule =
            Harness::<Flapping>::with_params_json(r#"{"max_changes": 1, "window": "90s"}"#)
                .unwrap();
        assert_eq!(rule.params().window, Duration::from_secs(90));
        let alerts = rule
            .evaluate(
                MACHINE,
                &[
                    status("running", 0),
                    status("stopped", 1),
                    status("running", 2),
                ],
            )
            .unwrap();
        assert_eq!(
            summary(&alerts),
            [(
                "flapping-1",
                true,
                "machine-03 is flapping: 2 state changes within 1m 30s"
            )]
        );
        // A change 3 minutes later: more than 90 s of quiet ended the episode.
        let alerts = rule.evaluate(MACHINE, &[status("stopped", 5)]).unwrap();
        assert_eq!(summary(&alerts)[0].0, "flapping-1");
        assert!(!alerts[0].is_firing());

        let err = Harness::<Flapping>::with_params_json(r#"{"window": "soon"}"#)
            .err()
            .unwrap();
        assert!(
            err.starts_with("`window`: `soon` is not a duration"),
            "{err}"
        );
    }
}
