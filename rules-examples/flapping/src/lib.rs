//! Example rule: alert when a machine flaps, i.e. changes state more than
//! `max_changes` times (a parameter, default 3) within `window` of event time
//! (default 10 minutes). One bucket per machine. A change is an event whose
//! state differs from the machine's previous one (the first event seen is not
//! a change).
//!
//! Changes are kept in [session windows](tocsin_rule::windows) of event time
//! with a gap of `window`: a session is an *episode* of changes, each less
//! than a window after the one before. With the defaults, the 4th change
//! within ten minutes fires `flapping-{episode}`, once per episode. The
//! episode ends, and its alert resolves, when its session closes: once the
//! watermark (the newest event time less `allowed_lateness`, default 5 s)
//! passes a window after its last change — noticed by the next event, or by
//! a timer set for that time plus the lateness when no event comes. Events
//! whose episode has already closed are late: dropped and counted.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tocsin_rule::windows::{self, Accumulate, Shape, Window, Windows};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, OldState, Rule, Severity};

pub struct Flapping;

/// `{"max_changes": 5, "window": "1h", "allowed_lateness": "30s"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// More than this many changes within the window is flapping.
    pub max_changes: usize,
    /// The window for counting changes, and the quiet time that ends an
    /// episode.
    #[serde(with = "tocsin_rule::duration")]
    pub window: Duration,
    /// How far behind the newest event an event may come and still count.
    #[serde(with = "tocsin_rule::duration")]
    pub allowed_lateness: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_changes: 3,
            window: Duration::from_secs(10 * 60),
            allowed_lateness: windows::DEFAULT_ALLOWED_LATENESS,
        }
    }
}

impl Params {
    fn episodes(&self) -> Shape {
        Shape::session(self.window)
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The machine's latest state.
    pub last_state: Option<String>,
    /// Open episodes (normally one).
    pub episodes: Windows<Episode>,
    /// Episodes that fired so far; the latest is `flapping-{fired}`.
    pub fired: u64,
}

/// One episode of changes.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// Event times of its changes within a window of its latest one.
    pub changes: Vec<i64>,
    /// The numbers of its alerts that fired (one, or more if a late change
    /// merged two episodes that had both fired).
    pub alerts: Vec<u64>,
}

impl Accumulate for Episode {
    type Item = ();
    fn add(&mut self, at: i64, (): ()) {
        let i = self.changes.partition_point(|&t| t <= at);
        self.changes.insert(i, at);
    }
    fn merge(&mut self, other: Self) {
        self.changes.extend(other.changes);
        self.changes.sort_unstable();
        self.alerts.extend(other.alerts);
    }
}

/// What version 1.1 stored (state schema 1).
#[derive(Deserialize)]
struct StateV1 {
    last_state: Option<String>,
    changes: Vec<i64>,
    last_change: Option<i64>,
    episode: u64,
    active: bool,
}

fn key(number: u64) -> String {
    format!("flapping-{number}")
}

/// Resolves the alerts of an episode that closed.
fn resolve(ctx: &mut Context<'_>, episode: Window<Episode>, late: u64) {
    let machine = ctx.bucket().to_owned();
    for number in episode.acc.alerts {
        let alert = Alert::resolved(key(number), format!("{machine} is no longer flapping"))
            .severity(Severity::Warning)
            .field("machineId", &machine)
            .field("episode", number)
            .field("last_change", episode.acc.changes.last())
            .field("late_events", late);
        ctx.emit(alert);
    }
}

/// Set the timer for the next episode that fired to close, or none.
fn arm(params: &Params, state: &State, ctx: &mut Context<'_>) {
    let due = state
        .episodes
        .open()
        .iter()
        .filter(|w| !w.acc.alerts.is_empty())
        .map(|w| {
            w.end
                .saturating_add(windows::millis(params.allowed_lateness))
        })
        .min();
    match due {
        Some(due) => ctx.set_timer(due),
        None => ctx.cancel_timer(),
    }
}

impl Rule for Flapping {
    type Params = Params;
    type State = State;

    fn manifest(_: &Params) -> Manifest {
        Manifest::new("flapping", "1.2.0")
            .when_equals("eventType", "machineStatusChange")
            .bucket_by(["machineId"])
            .event_time("time")
            .fields(["state"])
            .state_schema(2)
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let window = windows::millis(params.window);
        let lateness = params.allowed_lateness;
        let machine = ctx.bucket().to_owned();
        for event in events.iter() {
            let machine_state = event.require_str("state")?;
            let at = event.time();
            let late = state.episodes.late();
            let mut closed = Vec::new();
            let changed = match state.last_state.as_deref() {
                Some(previous) => previous != machine_state,
                None => false, // the first event seen is not a change
            };
            let taken = if changed {
                state
                    .episodes
                    .add(params.episodes(), lateness, at, (), &mut |w| closed.push(w))
            } else {
                state
                    .episodes
                    .advance(lateness, at, &mut |w| closed.push(w));
                true
            };
            for episode in closed {
                resolve(ctx, episode, late);
            }
            if !taken {
                continue; // late: its episode is over
            }
            state.last_state = Some(machine_state.to_owned());
            if !changed {
                continue;
            }

            let episode = state
                .episodes
                .containing_mut(at)
                .expect("a change taken is in an open episode");
            let newest = *episode.acc.changes.last().expect("it has this change");
            episode
                .acc
                .changes
                .retain(|&t| t >= newest.saturating_sub(window));
            if episode.acc.alerts.is_empty() && episode.acc.changes.len() > params.max_changes {
                state.fired += 1;
                episode.acc.alerts.push(state.fired);
                let alert = Alert::firing(
                    key(state.fired),
                    format!(
                        "{machine} is flapping: {} state changes within {}",
                        episode.acc.changes.len(),
                        tocsin_rule::format_duration(params.window),
                    ),
                )
                .severity(Severity::Warning)
                .field("machineId", &machine)
                .field("episode", state.fired)
                .field("changes", &episode.acc.changes)
                .field("state", machine_state);
                ctx.emit(alert);
            }
        }
        arm(params, state, ctx);
        Ok(())
    }

    fn on_timer(params: &Params, state: &mut State, ctx: &mut Context<'_>) -> Result<(), Error> {
        let late = state.episodes.late();
        let mut closed = Vec::new();
        state
            .episodes
            .close_by(params.allowed_lateness, ctx.now(), &mut |w| closed.push(w));
        for episode in closed {
            resolve(ctx, episode, late);
        }
        arm(params, state, ctx);
        Ok(())
    }

    fn upgrade_state(params: &Params, old: OldState<'_>) -> Result<State, String> {
        let old: StateV1 = old.decode()?;
        let open = match (old.changes.first(), old.last_change) {
            (Some(&first), Some(last)) => vec![Window {
                start: first,
                end: last.saturating_add(windows::millis(params.window)),
                acc: Episode {
                    changes: old.changes,
                    alerts: if old.active {
                        vec![old.episode]
                    } else {
                        vec![]
                    },
                },
            }],
            _ => vec![],
        };
        let watermark = old
            .last_change
            .map(|t| t.saturating_sub(windows::millis(params.allowed_lateness)));
        Ok(State {
            last_state: old.last_state,
            episodes: Windows::resume(open, watermark),
            fired: old.episode,
        })
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
    const SECOND: i64 = 1_000;
    /// The default allowed lateness.
    const LATENESS: i64 = 5 * SECOND;

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
        assert_eq!(manifest.version, "1.2.0");
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
        // The episode closes a window after its last change, plus the lateness.
        assert_eq!(rule.timer(MACHINE), Some(T0 + 15 * MINUTE + LATENESS));

        let more = rule
            .evaluate(MACHINE, &[status("running", 6), status("stopped", 7)])
            .unwrap();
        assert!(more.is_empty(), "one alert per episode: {more:?}");
        assert_eq!(rule.timer(MACHINE), Some(T0 + 17 * MINUTE + LATENESS));
        let state = rule.state(MACHINE).unwrap();
        assert_eq!(state.last_state.as_deref(), Some("stopped"));
        assert_eq!(state.fired, 1);
        let open = state.episodes.open();
        assert_eq!(open.len(), 1);
        assert_eq!(
            (open[0].start, open[0].end),
            (T0 + 2 * MINUTE, T0 + 17 * MINUTE)
        );
        assert_eq!(
            open[0].acc,
            Episode {
                changes: (2..=7).map(|m| T0 + m * MINUTE).collect(),
                alerts: vec![1],
            }
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
            state.episodes.open().len(),
            1,
            "one episode, never quiet for 10 min"
        );
        assert_eq!(
            state.episodes.open()[0].acc.changes,
            [T0 + 9 * MINUTE, T0 + 12 * MINUTE, T0 + 16 * MINUTE],
            "changes older than the window are pruned"
        );
        assert_eq!(state.fired, 0);
        assert_eq!(rule.timer(MACHINE), None, "no episode, no timer");
    }

    #[test]
    fn the_next_event_after_ten_quiet_minutes_resolves_and_a_new_episode_gets_a_new_key() {
        let mut rule = Harness::<Flapping>::new();
        assert_eq!(flap(&mut rule).len(), 1);

        // Last change at minute 4; minute 14 is exactly 10 minutes later: not yet over.
        let alerts = rule.evaluate(MACHINE, &[status("running", 14)]).unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        assert_eq!(
            rule.state(MACHINE).unwrap().episodes.open()[0].acc.alerts,
            [1]
        );

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
                episodes: Windows::resume(vec![], Some(T0 + 15 * MINUTE - LATENESS)),
                fired: 1,
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
        let open = state.episodes.open();
        assert_eq!(open.len(), 1, "a new episode");
        assert_eq!(
            open[0].acc,
            Episode {
                changes: vec![T0 + 20 * MINUTE],
                alerts: vec![]
            }
        );
    }

    #[test]
    fn the_timer_resolves_a_quiet_episode() {
        let mut rule = Harness::<Flapping>::new();
        rule.set_now(T0 + 4 * MINUTE);
        flap(&mut rule);
        assert_eq!(rule.timer(MACHINE), Some(T0 + 14 * MINUTE + LATENESS));

        // Called early (say the host was asked before a later change): nothing, re-armed.
        let early = rule.on_timer(MACHINE, T0 + 13 * MINUTE).unwrap();
        assert!(early.is_empty());
        assert_eq!(rule.timer(MACHINE), Some(T0 + 14 * MINUTE + LATENESS));
        let early = rule.on_timer(MACHINE, T0 + 14 * MINUTE).unwrap();
        assert!(
            early.is_empty(),
            "within the lateness a change may still come"
        );

        let alerts = rule.on_timer(MACHINE, T0 + 14 * MINUTE + LATENESS).unwrap();
        assert_eq!(
            summary(&alerts),
            [("flapping-1", false, "machine-03 is no longer flapping")]
        );
        assert_eq!(rule.timer(MACHINE), None);
        assert!(rule.state(MACHINE).unwrap().episodes.open().is_empty());

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
                episodes: Windows::resume(vec![], Some(T0 + 5 * MINUTE - LATENESS)),
                fired: 0,
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

        let rule = Harness::<Flapping>::with_params_json(r#"{"allowed_lateness": "1m"}"#).unwrap();
        assert_eq!(rule.params().allowed_lateness, Duration::from_secs(60));

        let err = Harness::<Flapping>::with_params_json(r#"{"window": "soon"}"#)
            .err()
            .unwrap();
        assert!(
            err.starts_with("`window`: `soon` is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn a_change_whose_episode_has_closed_is_late_dropped_and_counted() {
        let mut rule = Harness::<Flapping>::new();
        flap(&mut rule);
        // Minute 20 closes the episode (1–14 min); a change at minute 3
        // arriving after it is late.
        let alerts = rule.evaluate(MACHINE, &[status("running", 20)]).unwrap();
        assert_eq!(summary(&alerts)[0].0, "flapping-1");
        let alerts = rule.evaluate(MACHINE, &[status("stopped", 3)]).unwrap();
        assert!(alerts.is_empty(), "{alerts:?}");
        let state = rule.state(MACHINE).unwrap();
        assert_eq!(state.episodes.late(), 1);
        assert_eq!(
            state.last_state.as_deref(),
            Some("running"),
            "a late event changes nothing"
        );
        assert!(state.episodes.open().is_empty());

        // Late by less than the allowed lateness: counted in its episode.
        let alerts = rule
            .evaluate(
                MACHINE,
                &[
                    status("stopped", 30),
                    json!({"machineId": MACHINE, "state": "running", "time": "2026-01-01T00:30:10Z"}),
                    json!({"machineId": MACHINE, "state": "stopped", "time": "2026-01-01T00:30:06Z"}),
                ],
            )
            .unwrap();
        assert!(alerts.is_empty());
        let state = rule.state(MACHINE).unwrap();
        assert_eq!(state.episodes.late(), 1);
        assert_eq!(state.episodes.open()[0].acc.changes.len(), 3);
    }

    #[test]
    fn a_state_of_version_1_1_is_upgraded_with_its_firing_episode() {
        #[derive(Serialize)]
        struct StateV1 {
            last_state: Option<String>,
            changes: Vec<i64>,
            last_change: Option<i64>,
            episode: u64,
            active: bool,
        }
        let mut rule = Harness::<Flapping>::new();
        rule.store_older(
            MACHINE,
            1,
            "flapping@1.1.0",
            &StateV1 {
                last_state: Some("running".to_owned()),
                changes: (1..=4).map(|m| T0 + m * MINUTE).collect(),
                last_change: Some(T0 + 4 * MINUTE),
                episode: 2,
                active: true,
            },
        );
        // The old timer was due at the last change plus the window: early now.
        assert!(rule.on_timer(MACHINE, T0 + 14 * MINUTE).unwrap().is_empty());
        assert_eq!(rule.timer(MACHINE), Some(T0 + 14 * MINUTE + LATENESS));
        let alerts = rule.on_timer(MACHINE, T0 + 14 * MINUTE + LATENESS).unwrap();
        assert_eq!(
            summary(&alerts),
            [("flapping-2", false, "machine-03 is no longer flapping")]
        );
        let alerts = rule
            .evaluate(
                MACHINE,
                &[
                    status("stopped", 30),
                    status("running", 31),
                    status("stopped", 32),
                    status("running", 33),
                ],
            )
            .unwrap();
        assert_eq!(summary(&alerts)[0].0, "flapping-3", "numbering goes on");
    }
}
