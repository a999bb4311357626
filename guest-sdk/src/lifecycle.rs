//! An alert's lifecycle, as Prometheus and Alertmanager have it:
//! `pending → firing → resolved`.
//!
//! A rule says, per alert, whether its condition holds
//! ([`Lifecycle::observe`]); the lifecycle says what to publish. Only
//! transitions are published:
//!
//! - a condition that starts to hold makes its alert *pending*; once it has
//!   held for [`Timing::pending_for`] (`for`, default 0: at once) the alert
//!   *fires*. A condition that stops while pending publishes nothing.
//! - a firing alert whose condition stops stays firing for
//!   [`Timing::keep_firing_for`] (default 0), then *resolves*; if the
//!   condition holds again meanwhile it just goes on firing.
//! - with a [`Timing::repeat_interval`], a firing alert is published again
//!   (a [`Transition::Repeat`], under the same key, so the host gives it the
//!   same `fingerprint`) each time that long has passed since it was last.
//!
//! What time alone changes — `for` elapsing with no event, the end of
//! `keep_firing_for`, a repeat — happens in [`Lifecycle::tick`], called from
//! the rule's `on_timer`; [`Lifecycle::schedule`] sets the bucket's timer
//! for it. The lifecycle is a plain serde type: keep it in the rule's state.
//!
//! ```
//! use std::time::Duration;
//! use tocsin_rule::lifecycle::{Lifecycle, Timing, Transition};
//!
//! let timing = Timing {
//!     pending_for: Duration::from_secs(60),
//!     ..Timing::default()
//! };
//! let mut alerts = Lifecycle::default();
//! assert_eq!(alerts.observe(&timing, "hot", true, 0), None); // pending
//! assert_eq!(alerts.next_due(&timing), Some(60_000));
//! assert_eq!(alerts.tick(&timing, 60_000), [("hot".to_owned(), Transition::Firing)]);
//! assert_eq!(alerts.observe(&timing, "hot", false, 61_000), Some(Transition::Resolved));
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Context;
use crate::windows::millis;

/// The lifecycle's durations, usually rule parameters named `for`,
/// `keep_firing_for` and `repeat_interval`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// How long a condition must hold before its alert fires (`for`).
    pub pending_for: Duration,
    /// How long a firing alert stays firing after its condition stops.
    pub keep_firing_for: Duration,
    /// Publish a firing alert again this often; `None`: once.
    pub repeat_interval: Option<Duration>,
}

/// What to publish for an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It fires: publish it firing.
    Firing,
    /// It has been firing for a repeat interval: publish it firing again.
    Repeat,
    /// It resolves: publish it resolved.
    Resolved,
}

/// Where one alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Its condition holds, not yet for `for`.
    Pending { since: i64 },
    /// Published firing; `cleared` since when its condition has not held
    /// (within `keep_firing_for`), `notified` when it was last published
    /// (kept only with a repeat interval). No time is kept that no duration
    /// uses, so a rule without them keeps a state that does not depend on
    /// when its events arrived: a replay or a re-read stores the same bytes.
    Firing {
        notified: Option<i64>,
        cleared: Option<i64>,
    },
}

impl Phase {
    /// Fired at `at`.
    fn firing(timing: &Timing, at: i64) -> Phase {
        Phase::Firing {
            notified: timing.repeat_interval.map(|_| at),
            cleared: None,
        }
    }
}

/// The alerts of a bucket that are pending or firing, by key.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lifecycle {
    alerts: BTreeMap<String, Phase>,
    /// The timer [`schedule`](Self::schedule) last set.
    armed: Option<i64>,
}

impl Lifecycle {
    /// The alert `key`'s condition holds (or not) at `at` (event time in
    /// `evaluate`, `ctx.now()` in `on_timer`): what to publish, if anything.
    pub fn observe(
        &mut self,
        timing: &Timing,
        key: &str,
        holds: bool,
        at: i64,
    ) -> Option<Transition> {
        let phase = self.alerts.get_mut(key);
        match (phase, holds) {
            (None, false) => None,
            (None, true) => {
                let phase = Phase::Pending { since: at };
                self.alerts.insert(key.to_owned(), phase);
                self.promote(timing, key, at)
            }
            (Some(Phase::Pending { .. }), true) => self.promote(timing, key, at),
            (Some(Phase::Pending { .. }), false) => {
                self.alerts.remove(key);
                None
            }
            (Some(Phase::Firing { notified, cleared }), true) => {
                *cleared = None;
                match (timing.repeat_interval, *notified) {
                    (Some(every), Some(last)) if at.saturating_sub(last) >= millis(every) => {
                        *notified = Some(at);
                        Some(Transition::Repeat)
                    }
                    // A repeat interval given since it fired counts from now.
                    (Some(_), None) => {
                        *notified = Some(at);
                        None
                    }
                    _ => None,
                }
            }
            (Some(Phase::Firing { cleared, .. }), false) => {
                let cleared = *cleared.get_or_insert(at);
                if at.saturating_sub(cleared) >= millis(timing.keep_firing_for) {
                    self.alerts.remove(key);
                    Some(Transition::Resolved)
                } else {
                    None
                }
            }
        }
    }

    /// What time alone changed by `now` (from `on_timer`): alerts pending
    /// for `for` fire, alerts cleared for `keep_firing_for` resolve, firing
    /// ones repeat. By key.
    pub fn tick(&mut self, timing: &Timing, now: i64) -> Vec<(String, Transition)> {
        let mut changed = Vec::new();
        self.alerts.retain(|key, phase| {
            match phase {
                Phase::Pending { since } => {
                    if now.saturating_sub(*since) >= millis(timing.pending_for) {
                        *phase = Phase::firing(timing, now);
                        changed.push((key.clone(), Transition::Firing));
                    }
                }
                Phase::Firing {
                    cleared: Some(cleared),
                    ..
                } => {
                    if now.saturating_sub(*cleared) >= millis(timing.keep_firing_for) {
                        changed.push((key.clone(), Transition::Resolved));
                        return false;
                    }
                }
                Phase::Firing {
                    notified,
                    cleared: None,
                } => {
                    if let (Some(every), Some(last)) = (timing.repeat_interval, *notified)
                        && now.saturating_sub(last) >= millis(every)
                    {
                        *notified = Some(now);
                        changed.push((key.clone(), Transition::Repeat));
                    }
                }
            }
            true
        });
        changed
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub fn next_due(&self, timing: &Timing) -> Option<i64> {
        self.alerts
            .values()
            .filter_map(|phase| match *phase {
                Phase::Pending { since } => Some(since.saturating_add(millis(timing.pending_for))),
                Phase::Firing {
                    cleared: Some(cleared),
                    ..
                } => Some(cleared.saturating_add(millis(timing.keep_firing_for))),
                Phase::Firing { notified, .. } => timing
                    .repeat_interval
                    .zip(notified)
                    .map(|(every, last)| last.saturating_add(millis(every))),
            })
            .min()
    }

    /// Set the bucket's timer for the earlier of [`next_due`](Self::next_due)
    /// and `also` (a time the rule itself wants `on_timer`), or cancel it if
    /// neither; a timer already set for that time is left alone.
    pub fn schedule(&mut self, timing: &Timing, also: Option<i64>, ctx: &mut Context<'_>) {
        let due = match (self.next_due(timing), also) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if due == self.armed {
            return;
        }
        match due {
            Some(at) => ctx.set_timer(at),
            None => ctx.cancel_timer(),
        }
        self.armed = due;
    }

    /// Note that `on_timer` was called: the timer that called it is spent.
    pub fn fired(&mut self) {
        self.armed = None;
    }

    /// Where the alert `key` is; `None`: neither pending nor firing.
    pub fn phase(&self, key: &str) -> Option<Phase> {
        self.alerts.get(key).copied()
    }

    /// Whether the alert `key` is firing.
    pub fn is_firing(&self, key: &str) -> bool {
        matches!(self.phase(key), Some(Phase::Firing { .. }))
    }

    /// Take up an alert an older state knew as firing since `since` (for
    /// [`Rule::upgrade_state`](crate::Rule::upgrade_state)).
    pub fn resume_firing(&mut self, key: &str, since: i64) {
        self.alerts.insert(
            key.to_owned(),
            Phase::Firing {
                notified: Some(since),
                cleared: None,
            },
        );
    }

    fn promote(&mut self, timing: &Timing, key: &str, at: i64) -> Option<Transition> {
        let Some(Phase::Pending { since }) = self.alerts.get(key).copied() else {
            return None;
        };
        if at.saturating_sub(since) < millis(timing.pending_for) {
            return None;
        }
        self.alerts
            .insert(key.to_owned(), Phase::firing(timing, at));
        Some(Transition::Firing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000;

    fn timing(pending: u64, keep: u64, repeat: Option<u64>) -> Timing {
        Timing {
            pending_for: Duration::from_secs(pending),
            keep_firing_for: Duration::from_secs(keep),
            repeat_interval: repeat.map(Duration::from_secs),
        }
    }

    #[test]
    fn without_durations_an_alert_fires_and_resolves_with_its_condition() {
        let t = Timing::default();
        let mut alerts = Lifecycle::default();
        assert_eq!(alerts.observe(&t, "k", false, 0), None);
        assert_eq!(alerts.observe(&t, "k", true, S), Some(Transition::Firing));
        assert_eq!(
            alerts.observe(&t, "k", true, 2 * S),
            None,
            "only transitions"
        );
        assert_eq!(
            alerts.observe(&t, "k", false, 3 * S),
            Some(Transition::Resolved)
        );
        assert_eq!(alerts.observe(&t, "k", false, 4 * S), None);
        assert_eq!(alerts, Lifecycle::default(), "nothing is kept");
        // Firing without durations keeps no time: arrival times do not
        // make two runs' states differ.
        let mut one = Lifecycle::default();
        let mut two = Lifecycle::default();
        one.observe(&t, "k", true, 5);
        two.observe(&t, "k", true, 7_000);
        assert_eq!(one, two);
        assert_eq!(alerts.next_due(&t), None);
    }

    #[test]
    fn for_keeps_an_alert_pending_and_a_condition_that_stops_meanwhile_publishes_nothing() {
        let t = timing(60, 0, None);
        let mut alerts = Lifecycle::default();
        assert_eq!(alerts.observe(&t, "k", true, 0), None);
        assert_eq!(alerts.phase("k"), Some(Phase::Pending { since: 0 }));
        assert_eq!(alerts.observe(&t, "k", true, 59 * S), None);
        assert_eq!(alerts.observe(&t, "k", false, 59 * S), None);
        assert_eq!(alerts.phase("k"), None);

        // Held for 60 s: an event at that time fires it…
        assert_eq!(alerts.observe(&t, "k", true, 100 * S), None);
        assert_eq!(
            alerts.observe(&t, "k", true, 160 * S),
            Some(Transition::Firing)
        );
        // …and with no event, the timer does.
        assert_eq!(alerts.observe(&t, "j", true, 200 * S), None);
        assert_eq!(alerts.next_due(&t), Some(260 * S));
        assert_eq!(alerts.tick(&t, 259 * S), []);
        assert_eq!(
            alerts.tick(&t, 260 * S),
            [("j".to_owned(), Transition::Firing)]
        );
        assert!(alerts.is_firing("j"));
    }

    #[test]
    fn keep_firing_for_rides_out_a_condition_that_flickers() {
        let t = timing(0, 30, None);
        let mut alerts = Lifecycle::default();
        assert_eq!(alerts.observe(&t, "k", true, 0), Some(Transition::Firing));
        assert_eq!(alerts.observe(&t, "k", false, 10 * S), None);
        assert_eq!(
            alerts.observe(&t, "k", true, 20 * S),
            None,
            "back: still firing"
        );
        assert_eq!(alerts.observe(&t, "k", false, 30 * S), None);
        assert_eq!(
            alerts.next_due(&t),
            Some(60 * S),
            "30 s after it cleared again"
        );
        assert_eq!(alerts.observe(&t, "k", false, 59 * S), None);
        assert_eq!(
            alerts.tick(&t, 60 * S),
            [("k".to_owned(), Transition::Resolved)]
        );
        assert_eq!(alerts.phase("k"), None);
    }

    #[test]
    fn a_repeat_interval_publishes_a_long_firing_alert_again() {
        let t = timing(0, 0, Some(3600));
        let mut alerts = Lifecycle::default();
        assert_eq!(alerts.observe(&t, "k", true, 0), Some(Transition::Firing));
        assert_eq!(alerts.next_due(&t), Some(3600 * S));
        assert_eq!(
            alerts.tick(&t, 3600 * S),
            [("k".to_owned(), Transition::Repeat)]
        );
        assert_eq!(alerts.observe(&t, "k", true, 5000 * S), None);
        assert_eq!(
            alerts.observe(&t, "k", true, 7200 * S),
            Some(Transition::Repeat)
        );
        assert_eq!(alerts.next_due(&t), Some(10_800 * S));
        assert_eq!(
            alerts.observe(&t, "k", false, 7300 * S),
            Some(Transition::Resolved)
        );
        assert_eq!(alerts.next_due(&t), None);
    }

    #[test]
    fn alerts_are_independent_and_round_trip_through_the_state_codec() {
        let t = timing(10, 0, None);
        let mut alerts = Lifecycle::default();
        alerts.observe(&t, "a", true, 0);
        alerts.observe(&t, "b", true, 5 * S);
        assert_eq!(
            alerts.tick(&t, 10 * S),
            [("a".to_owned(), Transition::Firing)]
        );
        assert_eq!(alerts.phase("b"), Some(Phase::Pending { since: 5 * S }));
        let bytes = postcard::to_allocvec(&alerts).unwrap();
        assert_eq!(postcard::from_bytes::<Lifecycle>(&bytes).unwrap(), alerts);
    }
}
