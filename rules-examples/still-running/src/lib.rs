//! Example rule: alert when a machine has been `running` for longer than
//! `running_for` (a parameter such as `"10m"` or `"2s"`; default 10 minutes)
//! with no new state change — the prototype's "the machine is still
//! running…", which no event announces. One bucket per machine.
//!
//! When a machine enters `running`, the rule asks for a timer at that time
//! plus `running_for`; the host calls `on_timer` then even if no event
//! arrives, and the condition holds. The alert `still-running-{episode}`
//! then follows the [alert lifecycle](tocsin_rule::lifecycle): it fires once
//! the condition has held for `for` (default 0: at once), resolves when the
//! state changes (after `keep_firing_for`, default 0, if the machine is not
//! running long again by then), and with a `repeat_interval` is published
//! again while it lasts. Event time is the event's `time` field (RFC 3339)
//! when present, else its arrival. A machine not heard of for
//! `forget_after` (default 7 days) is forgotten: the manifest's state
//! time-to-live, so buckets of machines long gone do not pile up.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_rule::lifecycle::{Lifecycle, Phase, Timing, Transition};
use tocsin_rule::{Alert, Context, Error, Event, Events, Manifest, OldState, Rule, Severity};

pub struct StillRunning;

/// `{"running_for": "2s", "forget_after": "1d", "for": "1m",
/// "keep_firing_for": "5m", "repeat_interval": "4h"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// How long a machine may run with no state change before it alerts.
    #[serde(with = "tocsin_rule::duration")]
    pub running_for: Duration,
    /// How long after its last event (or timer) a machine is forgotten.
    #[serde(with = "tocsin_rule::duration")]
    pub forget_after: Duration,
    /// How long the condition holds before the alert fires.
    #[serde(rename = "for", with = "tocsin_rule::duration")]
    pub pending_for: Duration,
    /// How long a firing alert stays firing after the machine changes state.
    #[serde(with = "tocsin_rule::duration")]
    pub keep_firing_for: Duration,
    /// Publish a firing alert again this often (default: once).
    #[serde(with = "tocsin_rule::duration::option")]
    pub repeat_interval: Option<Duration>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            running_for: Duration::from_secs(10 * 60),
            forget_after: Duration::from_secs(7 * 24 * 3600),
            pending_for: Duration::ZERO,
            keep_firing_for: Duration::ZERO,
            repeat_interval: None,
        }
    }
}

impl Params {
    fn running_for_ms(&self) -> i64 {
        tocsin_rule::windows::millis(self.running_for)
    }

    fn timing(&self) -> Timing {
        Timing {
            pending_for: self.pending_for,
            keep_firing_for: self.keep_firing_for,
            repeat_interval: self.repeat_interval,
        }
    }
}

/// The lifecycle's key for the one condition.
const RUNNING_LONG: &str = "running-long";

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The machine's latest state, and the event time it entered it.
    pub state: Option<String>,
    pub since: Option<i64>,
    /// Episodes so far; the latest is `still-running-{episode}`.
    pub episode: u64,
    /// Where the alert is: pending, firing or neither.
    pub alert: Lifecycle,
}

/// What version 1.0 stored (state schema 1).
#[derive(Deserialize)]
struct StateV1 {
    state: Option<String>,
    since: Option<i64>,
    episode: u64,
    firing: bool,
}

impl State {
    fn key(&self) -> String {
        format!("still-running-{}", self.episode)
    }

    fn running(&self) -> Option<i64> {
        match (self.state.as_deref(), self.since) {
            (Some("running"), Some(since)) => Some(since),
            _ => None,
        }
    }

    /// When the condition starts to hold, if it has yet to be seen holding.
    fn due(&self, params: &Params) -> Option<i64> {
        let since = self.running()?;
        match self.alert.phase(RUNNING_LONG) {
            Some(Phase::Pending { .. } | Phase::Firing { cleared: None, .. }) => None,
            _ => Some(since.saturating_add(params.running_for_ms())),
        }
    }

    /// Publish what the lifecycle says; `ran`: how long the machine ran,
    /// when a change resolves it.
    fn publish(
        &mut self,
        params: &Params,
        transition: Transition,
        ran: Option<i64>,
        ctx: &mut Context<'_>,
    ) {
        let machine = ctx.bucket().to_owned();
        let alert = match transition {
            Transition::Firing | Transition::Repeat => {
                if transition == Transition::Firing {
                    self.episode += 1;
                }
                Alert::firing(
                    self.key(),
                    format!(
                        "{machine} has been running for over {} with no state change",
                        tocsin_rule::format_duration(params.running_for)
                    ),
                )
                .severity(Severity::Warning)
                .field("since", self.since)
                .field("repeat", transition == Transition::Repeat)
            }
            Transition::Resolved => {
                let now = self.state.as_deref().unwrap_or("unknown");
                Alert::resolved(self.key(), format!("{machine} is now {now}"))
                    .field("state", now)
                    .field("ran_ms", ran)
            }
        };
        ctx.emit(alert.field("machineId", &machine));
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
        Manifest::new("still-running", "1.1.0")
            .when_equals("eventType", "machineStatusChange")
            .bucket_by(["machineId"])
            .fields(["state", "time"])
            .state_ttl(params.forget_after)
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
            let next = event.require_str("state")?;
            if state.state.as_deref() == Some(next) {
                continue;
            }
            let at = event_time(&event);
            let ran = state.running().map(|since| at.saturating_sub(since));
            state.state = Some(next.to_owned());
            state.since = Some(at);
            if let Some(transition) = state.alert.observe(&timing, RUNNING_LONG, false, at) {
                state.publish(params, transition, ran, ctx);
            }
        }
        let due = state.due(params);
        state.alert.schedule(&timing, due, ctx);
        Ok(())
    }

    fn on_timer(params: &Params, state: &mut State, ctx: &mut Context<'_>) -> Result<(), Error> {
        let timing = params.timing();
        let now = ctx.now();
        state.alert.fired();
        if let Some(due) = state.due(params)
            && now >= due
            && let Some(transition) = state.alert.observe(&timing, RUNNING_LONG, true, now)
        {
            state.publish(params, transition, None, ctx);
        }
        for (_, transition) in state.alert.tick(&timing, now) {
            state.publish(params, transition, None, ctx);
        }
        let due = state.due(params);
        state.alert.schedule(&timing, due, ctx);
        Ok(())
    }

    fn upgrade_state(params: &Params, old: OldState<'_>) -> Result<State, String> {
        let old: StateV1 = old.decode()?;
        let mut alert = Lifecycle::default();
        if old.firing {
            let since = old.since.unwrap_or(0);
            alert.resume_firing(RUNNING_LONG, since.saturating_add(params.running_for_ms()));
        }
        Ok(State {
            state: old.state,
            since: old.since,
            episode: old.episode,
            alert,
        })
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

    fn keys(alerts: &[Alert<'_>]) -> Vec<(String, bool)> {
        alerts
            .iter()
            .map(|a| (a.key().to_owned(), a.is_firing()))
            .collect()
    }

    #[test]
    fn for_keeps_the_alert_pending_until_the_machine_has_run_that_much_longer() {
        let mut rule =
            Harness::<StillRunning>::with_params_json(r#"{"running_for": "2s", "for": "3s"}"#)
                .unwrap();
        rule.evaluate(MACHINE, &[status("running", 10)]).unwrap();
        assert!(
            rule.on_timer(MACHINE, T0 + 12_000).unwrap().is_empty(),
            "pending"
        );
        assert_eq!(rule.timer(MACHINE), Some(T0 + 15_000));
        let alerts = rule.on_timer(MACHINE, T0 + 15_000).unwrap();
        assert_eq!(keys(&alerts), [("still-running-1".to_owned(), true)]);

        // A change while pending publishes nothing.
        let mut rule =
            Harness::<StillRunning>::with_params_json(r#"{"running_for": "2s", "for": "3s"}"#)
                .unwrap();
        rule.evaluate(MACHINE, &[status("running", 10)]).unwrap();
        rule.on_timer(MACHINE, T0 + 12_000).unwrap();
        let alerts = rule.evaluate(MACHINE, &[status("stopped", 14)]).unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        assert_eq!(rule.timer(MACHINE), None);
        assert_eq!(rule.state(MACHINE).unwrap().episode, 0);
    }

    #[test]
    fn keep_firing_for_rides_out_a_short_stop() {
        let mut rule = Harness::<StillRunning>::with_params_json(
            r#"{"running_for": "2s", "keep_firing_for": "30s"}"#,
        )
        .unwrap();
        rule.evaluate(MACHINE, &[status("running", 10)]).unwrap();
        assert_eq!(rule.on_timer(MACHINE, T0 + 12_000).unwrap().len(), 1);
        // Stopped for 5 s, then running long again: one alert throughout.
        let alerts = rule
            .evaluate(MACHINE, &[status("stopped", 20), status("running", 25)])
            .unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        assert_eq!(
            rule.timer(MACHINE),
            Some(T0 + 27_000),
            "running long again at 27 s"
        );
        assert!(
            rule.on_timer(MACHINE, T0 + 27_000).unwrap().is_empty(),
            "still the same alert"
        );
        assert_eq!(rule.timer(MACHINE), None, "firing, nothing due");

        // Stopped for good: resolved 30 s after the stop.
        assert!(
            rule.evaluate(MACHINE, &[status("stopped", 40)])
                .unwrap()
                .is_empty()
        );
        assert_eq!(rule.timer(MACHINE), Some(T0 + 70_000));
        let alerts = rule.on_timer(MACHINE, T0 + 70_000).unwrap();
        assert_eq!(keys(&alerts), [("still-running-1".to_owned(), false)]);
        assert_eq!(alerts[0].title(), "machine-03 is now stopped");
    }

    #[test]
    fn a_repeat_interval_publishes_the_alert_again_while_it_lasts() {
        let mut rule = Harness::<StillRunning>::with_params_json(
            r#"{"running_for": "2s", "repeat_interval": "1m"}"#,
        )
        .unwrap();
        rule.evaluate(MACHINE, &[status("running", 10)]).unwrap();
        rule.on_timer(MACHINE, T0 + 12_000).unwrap();
        assert_eq!(rule.timer(MACHINE), Some(T0 + 72_000));
        let alerts = rule.on_timer(MACHINE, T0 + 72_000).unwrap();
        assert_eq!(
            keys(&alerts),
            [("still-running-1".to_owned(), true)],
            "the same key"
        );
        let detail: serde_json::Value = serde_json::from_str(alerts[0].detail_json()).unwrap();
        assert_eq!(detail["repeat"], true);
        assert_eq!(rule.timer(MACHINE), Some(T0 + 132_000));

        let error = Harness::<StillRunning>::with_params_json(r#"{"repeat_interval": "often"}"#)
            .err()
            .unwrap();
        assert!(
            error.starts_with("`repeat_interval`: `often` is not a duration"),
            "{error}"
        );
    }

    #[test]
    fn a_firing_state_of_version_1_0_resolves_on_the_next_change() {
        #[derive(Serialize)]
        struct StateV1 {
            state: Option<String>,
            since: Option<i64>,
            episode: u64,
            firing: bool,
        }
        let mut rule = harness();
        rule.store_older(
            MACHINE,
            1,
            "still-running@1.0.0",
            &StateV1 {
                state: Some("running".to_owned()),
                since: Some(T0 + 10_000),
                episode: 4,
                firing: true,
            },
        );
        let alerts = rule.evaluate(MACHINE, &[status("stopped", 30)]).unwrap();
        assert_eq!(keys(&alerts), [("still-running-4".to_owned(), false)]);
        let detail: serde_json::Value = serde_json::from_str(alerts[0].detail_json()).unwrap();
        assert_eq!(detail["ran_ms"], 20_000);
    }
}
