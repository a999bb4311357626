//! Windows over event time, with a watermark and an allowed lateness.
//!
//! A bucket's *watermark* says "events up to here are complete": it is the
//! newest event time the bucket has seen minus the allowed lateness
//! ([`DEFAULT_ALLOWED_LATENESS`], 5 s, unless the rule takes it as a
//! parameter), and it also moves with the host's clock when the rule's timer
//! fires ([`Windows::close_by`]), so a bucket whose events stop still closes
//! its windows. A window closes — its result is handed to the rule, once —
//! when the watermark reaches its end.
//!
//! **Late events are dropped and counted.** An event whose window has
//! already closed (its end is at or before the watermark) changes nothing:
//! [`Windows::add`] returns `false` and [`Windows::late`] counts it, so a rule
//! can report how many it dropped. Events out of order by less than the
//! lateness are not late: they land in their window as if they had come in
//! order.
//!
//! Three shapes, as stream processors name them ([`Shape`]): tumbling
//! (fixed, aligned to the epoch), sliding (fixed, overlapping, one starting
//! every `slide`) and session (closed by a gap without events; sessions an
//! event bridges merge). [`Recent`] is the look-back window rules that ask
//! "how many in the last ten minutes?" want: the items within a duration of
//! the newest event, with the same lateness policy.
//!
//! Both are plain serde types: keep them in the rule's state.
//!
//! ```
//! use std::time::Duration;
//! use tocsin_rule::windows::{Count, Shape, Windows, DEFAULT_ALLOWED_LATENESS};
//!
//! let minute = Shape::tumbling(Duration::from_secs(60));
//! let mut windows = Windows::<Count>::default();
//! let mut closed = Vec::new();
//! for at in [1_000, 30_000, 59_000, 61_000, 66_000] {
//!     windows.add(minute, DEFAULT_ALLOWED_LATENESS, at, (), &mut |w| closed.push(w));
//! }
//! // 66 s minus 5 s of lateness passed the first minute's end.
//! assert_eq!(closed.len(), 1);
//! assert_eq!((closed[0].start, closed[0].end, closed[0].acc), (0, 60_000, Count(3)));
//! // The first minute is over: an event in it is late, dropped and counted.
//! assert!(!windows.add(minute, DEFAULT_ALLOWED_LATENESS, 2_000, (), &mut |_| ()));
//! assert_eq!(windows.late(), 1);
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The allowed lateness a rule uses unless it takes one as a parameter.
pub const DEFAULT_ALLOWED_LATENESS: Duration = Duration::from_secs(5);

/// A duration in epoch milliseconds, as event times are.
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What a window accumulates.
pub trait Accumulate: Default {
    /// What one event adds.
    type Item;
    /// Add an event's item, at event time `at`.
    fn add(&mut self, at: i64, item: Self::Item);
    /// Fold in `other`, a session window this one merges with.
    fn merge(&mut self, other: Self);
}

/// Counts events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count(pub u64);

impl Accumulate for Count {
    type Item = ();
    fn add(&mut self, _at: i64, (): ()) {
        self.0 += 1;
    }
    fn merge(&mut self, other: Self) {
        self.0 += other.0;
    }
}

/// Keeps the event times, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Times(pub Vec<i64>);

impl Accumulate for Times {
    type Item = ();
    fn add(&mut self, at: i64, (): ()) {
        let i = self.0.partition_point(|&t| t <= at);
        self.0.insert(i, at);
    }
    fn merge(&mut self, other: Self) {
        self.0.extend(other.0);
        self.0.sort_unstable();
    }
}

/// How windows are cut, in milliseconds of event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Fixed `size`, aligned to the epoch: `[k·size, (k+1)·size)`.
    Tumbling { size: i64 },
    /// `size` long, one starting every `slide` (aligned to the epoch): an
    /// event is in `size / slide` windows.
    Sliding { size: i64, slide: i64 },
    /// An event opens `[at, at + gap)`; windows that overlap merge, so a
    /// session ends `gap` after its last event.
    Session { gap: i64 },
}

impl Shape {
    /// Tumbling windows of `size` (at least a millisecond).
    pub fn tumbling(size: Duration) -> Shape {
        Shape::Tumbling {
            size: millis(size).max(1),
        }
    }

    /// Windows of `size`, one starting every `slide` (both at least a
    /// millisecond; a slide longer than the size leaves gaps).
    pub fn sliding(size: Duration, slide: Duration) -> Shape {
        Shape::Sliding {
            size: millis(size).max(1),
            slide: millis(slide).max(1),
        }
    }

    /// Sessions that end after `gap` (at least a millisecond) without events.
    pub fn session(gap: Duration) -> Shape {
        Shape::Session {
            gap: millis(gap).max(1),
        }
    }
}

/// One window: `[start, end)` of event time and what it accumulated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window<A> {
    pub start: i64,
    pub end: i64,
    pub acc: A,
}

/// A bucket's open windows, its watermark and the events it dropped as late.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Windows<A> {
    /// Open windows, by start.
    open: Vec<Window<A>>,
    watermark: Option<i64>,
    late: u64,
}

impl<A> Default for Windows<A> {
    fn default() -> Self {
        Windows {
            open: Vec::new(),
            watermark: None,
            late: 0,
        }
    }
}

impl<A: Accumulate> Windows<A> {
    /// Windows resumed from what an older state kept (for
    /// [`Rule::upgrade_state`](crate::Rule::upgrade_state)).
    pub fn resume(mut open: Vec<Window<A>>, watermark: Option<i64>) -> Self {
        open.sort_by_key(|w| w.start);
        Windows {
            open,
            watermark,
            late: 0,
        }
    }

    /// Event times up to here are complete (`None` before the first event).
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Events dropped as late, ever.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// The open windows, by start.
    pub fn open(&self) -> &[Window<A>] {
        &self.open
    }

    /// The open window holding event time `at`, the latest-starting one
    /// for sliding windows.
    pub fn containing_mut(&mut self, at: i64) -> Option<&mut Window<A>> {
        self.open
            .iter_mut()
            .rev()
            .find(|w| w.start <= at && at < w.end)
    }

    /// Add an event's `item` at event time `at`. `false` if it is late: its
    /// window had closed, so it is dropped and counted. Otherwise the
    /// watermark moves to `at - lateness` if that is later, and the windows
    /// it passes are handed to `closed`, earliest end first.
    pub fn add(
        &mut self,
        shape: Shape,
        lateness: Duration,
        at: i64,
        item: A::Item,
        closed: &mut impl FnMut(Window<A>),
    ) -> bool
    where
        A::Item: Clone,
    {
        let mark = self.watermark.unwrap_or(i64::MIN);
        match shape {
            Shape::Tumbling { size } => {
                let start = at.div_euclid(size) * size;
                if start.saturating_add(size) <= mark {
                    self.late += 1;
                    return false;
                }
                self.window(start, start.saturating_add(size)).add(at, item);
            }
            Shape::Sliding { size, slide } => {
                let latest = at.div_euclid(slide) * slide;
                if latest.saturating_add(size) <= mark {
                    self.late += 1;
                    return false;
                }
                // Every window holding `at` whose end the watermark has
                // not passed, latest first.
                let mut start = latest;
                while start > at.saturating_sub(size) && start.saturating_add(size) > mark {
                    self.window(start, start.saturating_add(size))
                        .add(at, item.clone());
                    start -= slide;
                }
            }
            Shape::Session { gap } => {
                let mut session = Window {
                    start: at,
                    end: at.saturating_add(gap),
                    acc: A::default(),
                };
                let overlaps = |w: &Window<A>, s: &Window<A>| w.start < s.end && s.start < w.end;
                if session.end <= mark && !self.open.iter().any(|w| overlaps(w, &session)) {
                    self.late += 1;
                    return false;
                }
                session.acc.add(at, item);
                // Merge until nothing overlaps: a merged session is longer
                // and may reach the next one.
                while let Some(i) = self.open.iter().position(|w| overlaps(w, &session)) {
                    let other = self.open.remove(i);
                    session.start = session.start.min(other.start);
                    session.end = session.end.max(other.end);
                    session.acc.merge(other.acc);
                }
                let i = self.open.partition_point(|w| w.start < session.start);
                self.open.insert(i, session);
            }
        }
        self.advance(lateness, at, closed);
        true
    }

    /// Move the watermark for an event that adds nothing to any window (it
    /// still says event time has reached `at`).
    pub fn advance(&mut self, lateness: Duration, at: i64, closed: &mut impl FnMut(Window<A>)) {
        self.close_until(at.saturating_sub(millis(lateness)), closed);
    }

    /// Move the watermark with the host's clock `now` (from
    /// [`Rule::on_timer`](crate::Rule::on_timer)): windows whose end plus
    /// `lateness` has passed close, even if no event arrives.
    pub fn close_by(&mut self, lateness: Duration, now: i64, closed: &mut impl FnMut(Window<A>)) {
        self.close_until(now.saturating_sub(millis(lateness)), closed);
    }

    /// When the next window closes on the host's clock: the time to set a
    /// timer for, so that [`close_by`](Self::close_by) closes it.
    pub fn next_close(&self, lateness: Duration) -> Option<i64> {
        self.open
            .iter()
            .map(|w| w.end.saturating_add(millis(lateness)))
            .min()
    }

    fn window(&mut self, start: i64, end: i64) -> &mut A {
        let i = self.open.partition_point(|w| w.start < start);
        if self.open.get(i).is_none_or(|w| w.start != start) {
            self.open.insert(
                i,
                Window {
                    start,
                    end,
                    acc: A::default(),
                },
            );
        }
        &mut self.open[i].acc
    }

    fn close_until(&mut self, mark: i64, closed: &mut impl FnMut(Window<A>)) {
        if self.watermark.is_some_and(|m| m >= mark) {
            return;
        }
        self.watermark = Some(mark);
        if !self.open.iter().any(|w| w.end <= mark) {
            return;
        }
        let (mut done, open): (Vec<_>, Vec<_>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|w| w.end <= mark);
        self.open = open;
        done.sort_by_key(|w| (w.end, w.start));
        for window in done {
            closed(window);
        }
    }
}

/// The items of the last `size` of event time before the newest event seen:
/// a look-back window ("more than 3 in the last 10 minutes"). Events more
/// than the allowed lateness behind the newest are late: dropped and
/// counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recent<T> {
    /// `(event time, item)`, by time.
    items: Vec<(i64, T)>,
    newest: Option<i64>,
    late: u64,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            items: Vec::new(),
            newest: None,
            late: 0,
        }
    }
}

impl<T> Recent<T> {
    /// Items resumed from what an older state kept (for
    /// [`Rule::upgrade_state`](crate::Rule::upgrade_state)).
    pub fn resume(mut items: Vec<(i64, T)>, newest: Option<i64>) -> Self {
        items.sort_by_key(|(at, _)| *at);
        let newest = newest.max(items.last().map(|(at, _)| *at));
        Recent {
            items,
            newest,
            late: 0,
        }
    }

    /// Keep `item` at event time `at` (and forget what left the window). `false`
    /// if it is late: dropped and counted.
    pub fn add(&mut self, size: Duration, lateness: Duration, at: i64, item: T) -> bool {
        if !self.advance(size, lateness, at) {
            return false;
        }
        let i = self.items.partition_point(|(t, _)| *t <= at);
        if at >= self.since(size) {
            self.items.insert(i, (at, item));
        }
        true
    }

    /// Move the window for an event that adds no item (it still says event
    /// time has reached `at`). `false` if it is late.
    pub fn advance(&mut self, size: Duration, lateness: Duration, at: i64) -> bool {
        if let Some(newest) = self.newest
            && at < newest.saturating_sub(millis(lateness))
        {
            self.late += 1;
            return false;
        }
        if self.newest.is_none_or(|newest| at > newest) {
            self.newest = Some(at);
            let since = self.since(size);
            let gone = self.items.partition_point(|(t, _)| *t < since);
            self.items.drain(..gone);
        }
        true
    }

    /// The items within the window, oldest first.
    pub fn items(&self) -> impl ExactSizeIterator<Item = (i64, &T)> + '_ {
        self.items.iter().map(|(at, item)| (*at, item))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Forget the items (the newest time and the late count stay).
    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// The newest event time seen.
    pub fn newest(&self) -> Option<i64> {
        self.newest
    }

    /// Events dropped as late, ever.
    pub fn late(&self) -> u64 {
        self.late
    }

    fn since(&self, size: Duration) -> i64 {
        self.newest.unwrap_or(i64::MIN).saturating_sub(millis(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000;
    const LATENESS: Duration = DEFAULT_ALLOWED_LATENESS;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Adds events at these seconds; what closed, as `(start, end, count)` in seconds.
    fn run(windows: &mut Windows<Count>, shape: Shape, at: &[i64]) -> Vec<(i64, i64, u64)> {
        let mut closed = Vec::new();
        for &s in at {
            windows.add(shape, LATENESS, s * SECOND, (), &mut |w| {
                closed.push((w.start / SECOND, w.end / SECOND, w.acc.0))
            });
        }
        closed
    }

    #[test]
    fn tumbling_windows_close_when_the_watermark_passes_their_end() {
        let shape = Shape::tumbling(secs(10));
        let mut windows = Windows::default();
        assert_eq!(run(&mut windows, shape, &[1, 4, 9, 12, 14]), []);
        assert_eq!(windows.watermark(), Some(9 * SECOND));
        // 15 − 5 = 10: the first window's end.
        assert_eq!(run(&mut windows, shape, &[15]), [(0, 10, 3)]);
        assert_eq!(run(&mut windows, shape, &[47]), [(10, 20, 3)]);
        assert_eq!(
            windows
                .open()
                .iter()
                .map(|w| (w.start, w.acc))
                .collect::<Vec<_>>(),
            [(40 * SECOND, Count(1))]
        );
    }

    #[test]
    fn events_out_of_order_within_the_lateness_count_and_later_ones_are_dropped() {
        let shape = Shape::tumbling(secs(10));
        let mut windows = Windows::default();
        run(&mut windows, shape, &[3, 12, 8]);
        assert_eq!(windows.late(), 0, "8 s is 4 s behind 12 s: not late");
        assert_eq!(run(&mut windows, shape, &[16]), [(0, 10, 2)]);
        assert_eq!(run(&mut windows, shape, &[9]), []);
        assert_eq!(windows.late(), 1, "its window has closed");
        // Behind the watermark (11 s) but its window (10–20 s) is open.
        assert_eq!(run(&mut windows, shape, &[10]), []);
        assert_eq!(windows.late(), 1);
        assert_eq!(windows.open()[0].acc, Count(3));
    }

    #[test]
    fn an_event_that_adds_nothing_still_moves_the_watermark() {
        let shape = Shape::tumbling(secs(10));
        let mut windows = Windows::default();
        run(&mut windows, shape, &[1]);
        let mut closed = Vec::new();
        windows.advance(LATENESS, 30 * SECOND, &mut |w| closed.push(w.acc));
        assert_eq!(closed, [Count(1)]);
        assert_eq!(windows.watermark(), Some(25 * SECOND));
        // The watermark never moves back.
        windows.advance(LATENESS, 2 * SECOND, &mut |_| panic!("nothing to close"));
        assert_eq!(windows.watermark(), Some(25 * SECOND));
    }

    #[test]
    fn sliding_windows_hold_each_event_size_over_slide_times() {
        let shape = Shape::sliding(secs(10), secs(5));
        let mut windows = Windows::default();
        run(&mut windows, shape, &[7]);
        let spans: Vec<_> = windows
            .open()
            .iter()
            .map(|w| (w.start / SECOND, w.end / SECOND))
            .collect();
        assert_eq!(spans, [(0, 10), (5, 15)]);
        run(&mut windows, shape, &[12]);
        assert_eq!(
            run(&mut windows, shape, &[21]),
            [(0, 10, 1), (5, 15, 2)],
            "watermark 16 s"
        );
        // 13 s: its window 5–15 has closed, 10–20 has not — it goes there only.
        assert_eq!(run(&mut windows, shape, &[13]), []);
        assert_eq!(windows.late(), 0);
        let ten = windows.open().iter().find(|w| w.start == 10 * SECOND);
        assert_eq!(ten.unwrap().acc, Count(2));
        assert_eq!(run(&mut windows, shape, &[4]), []);
        assert_eq!(windows.late(), 1);
    }

    /// Adds an event at `s` seconds to sessions; whether it was taken and
    /// what closed, as `(start, end, events)` in seconds.
    fn session(windows: &mut Windows<Times>, s: i64) -> (bool, Vec<(i64, i64, usize)>) {
        let mut closed = Vec::new();
        let taken = windows.add(
            Shape::session(secs(10)),
            LATENESS,
            s * SECOND,
            (),
            &mut |w| closed.push((w.start / SECOND, w.end / SECOND, w.acc.0.len())),
        );
        (taken, closed)
    }

    fn spans(windows: &Windows<Times>) -> Vec<(i64, i64)> {
        windows
            .open()
            .iter()
            .map(|w| (w.start / SECOND, w.end / SECOND))
            .collect()
    }

    #[test]
    fn sessions_end_a_gap_after_their_last_event() {
        let mut windows = Windows::default();
        assert_eq!(session(&mut windows, 0), (true, vec![]));
        assert_eq!(session(&mut windows, 4), (true, vec![]));
        assert_eq!(spans(&windows), [(0, 14)]);
        assert_eq!(
            session(&mut windows, 30),
            (true, vec![(0, 14, 2)]),
            "watermark 25 s"
        );
        assert_eq!(session(&mut windows, 33), (true, vec![]));
        assert_eq!(session(&mut windows, 46), (true, vec![]));
        // 29 s is behind the watermark (41 s) but overlaps the open 30–43 s
        // session: it joins it.
        assert_eq!(session(&mut windows, 29), (true, vec![]));
        assert_eq!(spans(&windows), [(29, 43), (46, 56)]);
        // 15 s is in no open session, and its own would have ended by now.
        assert_eq!(session(&mut windows, 15), (false, vec![]));
        assert_eq!(windows.late(), 1);
    }

    #[test]
    fn an_event_bridging_two_sessions_merges_them() {
        let mut windows = Windows::default();
        for s in [0, 12, 8] {
            assert_eq!(session(&mut windows, s), (true, vec![]));
        }
        assert_eq!(spans(&windows), [(0, 22)]);
        assert_eq!(
            windows.open()[0].acc,
            Times(vec![0, 8 * SECOND, 12 * SECOND])
        );
    }

    #[test]
    fn the_hosts_clock_closes_windows_no_event_closes() {
        let shape = Shape::session(secs(60));
        let mut windows = Windows::<Count>::default();
        run(&mut windows, shape, &[100]);
        assert_eq!(windows.next_close(LATENESS), Some(165 * SECOND));
        let mut closed = Vec::new();
        windows.close_by(LATENESS, 164 * SECOND, &mut |w| closed.push(w.acc));
        assert_eq!(closed, [], "a millisecond early");
        windows.close_by(LATENESS, 165 * SECOND, &mut |w| closed.push(w.acc));
        assert_eq!(closed, [Count(1)]);
        assert_eq!(windows.next_close(LATENESS), None);
        // The clock moved the watermark (to 160 s): an event whose session
        // would have ended by then is late.
        assert_eq!(run(&mut windows, shape, &[90]), []);
        assert_eq!(windows.late(), 1);
        assert!(windows.open().is_empty());
    }

    #[test]
    fn windows_round_trip_through_the_state_codec() {
        let mut windows = Windows::<Times>::default();
        windows.add(Shape::session(secs(5)), LATENESS, 1, (), &mut |_| ());
        let bytes = postcard::to_allocvec(&windows).unwrap();
        assert_eq!(
            postcard::from_bytes::<Windows<Times>>(&bytes).unwrap(),
            windows
        );
    }

    #[test]
    fn recent_keeps_the_last_size_of_event_time() {
        let size = secs(10);
        let mut recent = Recent::default();
        for s in [1, 5, 9, 12] {
            assert!(recent.add(size, LATENESS, s * SECOND, s));
        }
        assert_eq!(
            recent.items().map(|(_, s)| *s).collect::<Vec<_>>(),
            [5, 9, 12]
        );
        // Out of order within the lateness: kept, in time order.
        assert!(recent.add(size, LATENESS, 8 * SECOND, 8));
        assert_eq!(
            recent.items().map(|(_, s)| *s).collect::<Vec<_>>(),
            [5, 8, 9, 12]
        );
        // An event with no item moves the window on.
        assert!(recent.advance(size, LATENESS, 18 * SECOND));
        assert_eq!(
            recent.items().map(|(_, s)| *s).collect::<Vec<_>>(),
            [8, 9, 12]
        );
        assert_eq!(recent.newest(), Some(18 * SECOND));
        // More than 5 s behind 18 s: late.
        assert!(!recent.add(size, LATENESS, 12 * SECOND, 12));
        assert_eq!(recent.late(), 1);
        assert_eq!(recent.len(), 3);
    }
}
