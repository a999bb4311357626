//! Run a rule natively, in plain `#[test]`s, through the same glue the
//! component uses: state is encoded and decoded between calls, events arrive
//! as the typed table the host builds.
//!
//! ```
//! use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, json, testing::Harness};
//!
//! struct Echo;
//! impl Rule for Echo {
//!     type State = u32;
//!     fn manifest() -> Manifest {
//!         Manifest::new("echo", "0.1.0").fields(["msg"])
//!     }
//!     fn evaluate(seen: &mut u32, events: Events<'_>, ctx: &mut Context<'_>) -> Result<(), Error> {
//!         for event in events.iter() {
//!             *seen += 1;
//!             ctx.emit(Alert::firing(format!("msg-{seen}"), event.require_str("msg")?));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let mut harness = Harness::<Echo>::new();
//! let alerts = harness.evaluate("", &[json!({"msg": "hi"})]).unwrap();
//! assert_eq!(alerts[0].title(), "hi");
//! assert_eq!(harness.state(""), Some(1));
//! ```
#![cfg(not(target_arch = "wasm32"))]

use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde_json::Value as Json;

pub use crate::abi;
use crate::event::{kind, push_span};
use crate::{__private, Alert, Manifest, Rule, state};

/// A failed call, as the host would see it.
#[derive(Clone, Debug, PartialEq)]
pub struct CallError(pub abi::RuleError);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            abi::RuleError::BadEvent(e) => write!(f, "bad event #{}: {}", e.index, e.reason),
            abi::RuleError::BadState(e) => write!(f, "bad state: {e}"),
            abi::RuleError::Failed(e) => write!(f, "rule failed: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Keeps each bucket's encoded state and pending timer between calls.
pub struct Harness<R: Rule> {
    manifest: Manifest,
    prepared: __private::Prepared,
    states: BTreeMap<String, Vec<u8>>,
    timers: BTreeMap<String, i64>,
    now: i64,
    rule: PhantomData<R>,
}

impl<R: Rule> Default for Harness<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Rule> Harness<R> {
    pub fn new() -> Self {
        Harness {
            manifest: R::manifest(),
            prepared: __private::Prepared::new::<R>(),
            states: BTreeMap::new(),
            timers: BTreeMap::new(),
            now: 0,
            rule: PhantomData,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Set the processing time handed to later calls (epoch milliseconds).
    /// Events without an event-time field also get this time.
    pub fn set_now(&mut self, now: i64) {
        self.now = now;
    }

    /// One `evaluate` call for `bucket` with these events, in order.
    pub fn evaluate(
        &mut self,
        bucket: &str,
        events: &[Json],
    ) -> Result<Vec<Alert<'static>>, CallError> {
        let batch = batch_from_json(&self.manifest, events, self.now).map_err(CallError)?;
        let stored = self.states.get(bucket).map(Vec::as_slice);
        let outcome = __private::evaluate::<R>(&self.prepared, bucket, stored, &batch, self.now)
            .map_err(CallError)?;
        Ok(self.apply(bucket, outcome))
    }

    /// One `on-timer` call for `bucket` at `now`.
    pub fn on_timer(&mut self, bucket: &str, now: i64) -> Result<Vec<Alert<'static>>, CallError> {
        self.now = now;
        self.timers.remove(bucket);
        let stored = self.states.get(bucket).map(Vec::as_slice);
        let outcome =
            __private::on_timer::<R>(&self.prepared, bucket, stored, now).map_err(CallError)?;
        Ok(self.apply(bucket, outcome))
    }

    /// The bucket's stored state, decoded; `None` if nothing is stored.
    pub fn state(&self, bucket: &str) -> Option<R::State> {
        let bytes = self.states.get(bucket)?;
        Some(state::decode(Some(bytes)).expect("the harness stored what the rule encoded"))
    }

    /// The bucket's pending timer.
    pub fn timer(&self, bucket: &str) -> Option<i64> {
        self.timers.get(bucket).copied()
    }

    /// Keep the call's state and timer as the host would; its alerts.
    fn apply(&mut self, bucket: &str, outcome: abi::Outcome) -> Vec<Alert<'static>> {
        match outcome.state {
            abi::StateChange::Unchanged => {}
            abi::StateChange::Set(bytes) => {
                self.states.insert(bucket.to_owned(), bytes);
            }
            abi::StateChange::Delete => {
                self.states.remove(bucket);
            }
        }
        match outcome.timer {
            abi::TimerChange::Keep => {}
            abi::TimerChange::Set(at) => {
                self.timers.insert(bucket.to_owned(), at);
            }
            abi::TimerChange::Cancel => {
                self.timers.remove(bucket);
            }
        }
        (0..outcome.alerts.status.len())
            .map(|index| Alert::from_batch(&outcome.alerts, index))
            .collect()
    }
}

/// The typed batch the host would build for these events: declared fields
/// as values, strings in one text buffer. Event time is `arrival`, or the
/// manifest's event-time field (epoch milliseconds or RFC 3339): an event
/// without a readable one is a bad event, as in the host.
pub fn batch_from_json(
    manifest: &Manifest,
    events: &[Json],
    arrival: i64,
) -> Result<abi::EventBatch, abi::RuleError> {
    let mut batch = abi::EventBatch::default();
    let abi = manifest.as_abi();
    for (index, event) in events.iter().enumerate() {
        let time = match &abi.event_time {
            abi::EventTime::Arrival => arrival,
            abi::EventTime::Field(field) => event_time(event.get(field)).ok_or_else(|| {
                abi::RuleError::BadEvent(abi::BadEvent {
                    index: index as u32,
                    reason: format!(
                        "event-time field `{field}` must be an RFC 3339 string or epoch milliseconds"
                    ),
                })
            })?,
        };
        batch.times.push(time);
        if abi.raw_json {
            let raw = push_span(&mut batch.text, &event.to_string());
            batch.raw.push(raw);
        }
        for field in &abi.fields {
            let (kind, bits) = match event.get(field) {
                None => (kind::ABSENT, 0),
                Some(Json::Null) => (kind::NULL, 0),
                Some(Json::Bool(b)) => (kind::BOOLEAN, u64::from(*b)),
                Some(Json::Number(n)) => match n.as_i64() {
                    Some(i) => (kind::INTEGER, i as u64),
                    None => (kind::FLOAT, n.as_f64().unwrap_or(f64::NAN).to_bits()),
                },
                Some(Json::String(s)) => (kind::TEXT, push_span(&mut batch.text, s)),
                Some(other) => (kind::JSON, push_span(&mut batch.text, &other.to_string())),
            };
            batch.kinds.push(kind);
            batch.values.push(bits);
        }
    }
    Ok(batch)
}

fn event_time(value: Option<&Json>) -> Option<i64> {
    match value? {
        Json::Number(n) => n.as_i64(),
        Json::String(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
        }
        _ => None,
    }
}
