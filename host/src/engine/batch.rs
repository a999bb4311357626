//! What goes through the engine: a source's [`Batch`], the [`Rejection`] of
//! each event not applied with its [`RejectCause`], a batch [`Computed`] and
//! waiting for its commit, and what a [`Committed`] one gave. The stages
//! that make them are files of their own (`compute`, `commit`, `publish`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedMutexGuard, watch};

use super::apart;
use crate::event::Incoming;
use crate::metrics::RuleTally;
use crate::runtime;
use crate::sink::dead_letters::DeadLetter;
use crate::store::{BucketId, Commit, Outbox, Progress};

/// One batch from a source: its events in order, each with its position.
#[derive(Debug, Clone)]
pub struct Batch {
    pub(crate) events: Arc<[Incoming]>,
    /// What the commit records of the source's position.
    pub(crate) progress: Progress,
    /// Records of the batch that are not events (a stream's bad records):
    /// dead-lettered with it.
    pub(crate) bad: Vec<DeadLetter>,
    /// The source answers nobody (a stream): events at fault themselves
    /// (unknown tenant, unreadable event time) are dead-lettered, not only
    /// rejected. Events a rule failed on are dead-lettered from any source.
    pub(crate) unanswered: bool,
    /// Tenants whose events share a request with another tenant's: they
    /// are never run apart ([`apart`]), so a request commits whole.
    pub(crate) together: Vec<String>,
    /// What a part run apart records of the requests it answers.
    pub(crate) receipts: Option<apart::PartReceipts>,
    /// Timers due, each bucket's with its due time: a batch of timers has
    /// no events ([`Engine::fire_timers`](super::Engine::fire_timers)).
    pub(crate) timers: Vec<(BucketId, i64)>,
    /// Buckets untouched past their rule's state time-to-live, to remove
    /// (with a batch of timers).
    pub(crate) expired: Vec<BucketId>,
}

impl Batch {
    /// Its events, in order.
    pub fn events(&self) -> &[Incoming] {
        &self.events
    }

    /// A batch of a source that answers its producers (HTTP, a file).
    pub fn new(events: impl Into<Arc<[Incoming]>>, progress: Progress) -> Self {
        Batch {
            events: events.into(),
            progress,
            bad: Vec::new(),
            unanswered: false,
            together: Vec::new(),
            receipts: None,
            timers: Vec::new(),
            expired: Vec::new(),
        }
    }

    /// The same batch from a source that answers nobody (a stream), with
    /// its records that were not events, to dead-letter with it.
    pub fn unanswered(mut self, bad: Vec<DeadLetter>) -> Self {
        self.unanswered = true;
        self.bad = bad;
        self
    }

    /// The events at `indices`, as a batch of their own with this one's
    /// progress.
    pub(super) fn part(&self, indices: &[usize]) -> Batch {
        Batch {
            events: indices.iter().map(|&i| self.events[i].clone()).collect(),
            progress: self.progress.clone(),
            bad: Vec::new(),
            unanswered: self.unanswered,
            together: Vec::new(),
            receipts: None,
            timers: Vec::new(),
            expired: Vec::new(),
        }
    }
}

/// Why an event was not applied. Its [`name`](Self::name) is what dead
/// letters record as their `cause` and metrics label it with. (Records of a
/// stream that are not events at all carry causes their source names:
/// `malformed`, `no_tenant`, `too_large`.)
#[derive(Debug, Clone, PartialEq)]
pub enum RejectCause {
    /// Its tenant is run apart ([`apart`]) and [`apart::MAX_BEHIND`] parts
    /// behind.
    Behind,
    /// No rules are configured for its tenant.
    UnknownTenant,
    /// The rule is quarantined: it was not called.
    Quarantined,
    /// Its event time cannot be read.
    EventTime,
    /// Its bucket fields make a key longer than
    /// [`MAX_BUCKET_KEY_BYTES`](super::route::MAX_BUCKET_KEY_BYTES).
    BucketKey,
    /// The rule's new state of its bucket is over the state store's limit.
    StateTooLarge,
    /// The rule failed on it: the sandbox stopped the call, or the rule
    /// returned an error.
    Rule(runtime::Cause),
}

impl RejectCause {
    /// The fixed name of the kind, as dead letters and metrics give it.
    pub fn name(&self) -> &'static str {
        match self {
            RejectCause::Behind => "behind",
            RejectCause::UnknownTenant => "unknown_tenant",
            RejectCause::Quarantined => "quarantined",
            RejectCause::EventTime => "event_time",
            RejectCause::BucketKey => "bucket_key",
            RejectCause::StateTooLarge => "state_too_large",
            RejectCause::Rule(cause) => cause.kind(),
        }
    }

    /// The event is at fault, not a rule: no rule of its tenant could take
    /// it.
    pub fn is_bad_event(&self) -> bool {
        match self {
            RejectCause::UnknownTenant | RejectCause::EventTime | RejectCause::BucketKey => true,
            RejectCause::Behind
            | RejectCause::Quarantined
            | RejectCause::StateTooLarge
            | RejectCause::Rule(_) => false,
        }
    }
}

impl std::fmt::Display for RejectCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An event (by its index in the batch) that was not applied, and why. With
/// `rule` set, only that rule did not apply it; the tenant's other rules did.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub index: usize,
    pub rule: Option<String>,
    pub cause: RejectCause,
    pub reason: String,
}

impl Rejection {
    /// The event is at fault, not a rule: no rule of its tenant could take
    /// it.
    pub fn is_bad_event(&self) -> bool {
        self.cause.is_bad_event()
    }
}

/// A batch whose rules ran, waiting for its commit.
#[derive(Debug)]
pub(crate) struct Computed {
    pub(super) commit: Commit,
    pub(super) rejected: Vec<Rejection>,
    pub(super) events: usize,
    pub(super) failures: u64,
    pub(super) batch: u64,
    pub(super) generation: u64,
    /// Per rule, recorded in the metrics once the batch commits.
    pub(super) tallies: Vec<RuleTally>,
    /// Kept before the commit.
    pub(super) dead_letters: Vec<DeadLetter>,
    pub(super) unknown_tenant: u64,
    pub(super) started: Instant,
    /// The shard batch it belongs to, with its parts run apart.
    pub(super) ticket: Option<u64>,
    /// Tenants of the batch run apart (left out of a run again).
    pub(super) handed: Vec<String>,
    pub(super) apart: Vec<apart::Apart>,
    /// Dropped once the batch is through its commit: its parts may commit.
    pub(super) rest: Option<watch::Sender<()>>,
}

impl Computed {
    /// The parts of the batch run apart: each tenant's events left out of
    /// this batch, answered when its part commits.
    pub(crate) fn take_apart(&mut self) -> Vec<apart::Apart> {
        std::mem::take(&mut self.apart)
    }

    /// The events not applied, and why.
    pub(crate) fn rejected(&self) -> &[Rejection] {
        &self.rejected
    }

    /// Replace what the commit records of the source's position (the HTTP
    /// source stores its answers, which depend on the rejections).
    pub(crate) fn set_progress(&mut self, progress: Progress) {
        self.commit.progress = progress;
    }
}

/// What a committed batch gave.
#[derive(Debug, Default)]
pub struct Committed {
    pub rejected: Vec<Rejection>,
    pub alerts: usize,
    /// Its alerts, to publish once the source has acknowledged.
    pub(super) outbox: Option<Outbox>,
    /// The lane's turn to publish, held until it has.
    pub(super) turn: Option<Turn>,
}

/// A lane's turn to publish, and where to say it fell behind.
#[derive(Debug)]
pub(super) struct Turn {
    pub(super) _held: OwnedMutexGuard<()>,
    pub(super) behind: Arc<AtomicBool>,
}

impl Drop for Committed {
    fn drop(&mut self) {
        // Not published: the lane's next publish catches up on the outbox.
        if self.outbox.is_some()
            && let Some(turn) = &self.turn
        {
            turn.behind.store(true, Ordering::Relaxed);
        }
    }
}
