//! Run a rule natively, in plain `#[test]`s, through the same glue the
//! component uses: parameters are read as the component reads them, state is
//! encoded and decoded between calls, and events arrive as the typed table
//! the host builds, read from their JSON text the way the host reads it
//! (event time, number kinds, raw and nested JSON text as received).
//!
//! ```
//! use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, json, testing::Harness};
//!
//! struct Echo;
//! impl Rule for Echo {
//!     type Params = ();
//!     type State = u32;
//!     fn manifest((): &()) -> Manifest {
//!         Manifest::new("echo", "0.1.0").fields(["msg"])
//!     }
//!     fn evaluate((): &(), seen: &mut u32, events: Events<'_>, ctx: &mut Context<'_>) -> Result<(), Error> {
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

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use serde_json::value::RawValue;

pub use crate::abi;
use crate::event::{kind, push_span};
use crate::{__private, Alert, Manifest, Rule};

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
    prepared: __private::Prepared<R>,
    states: BTreeMap<String, Vec<u8>>,
    timers: BTreeMap<String, i64>,
    now: i64,
}

impl<R: Rule> Default for Harness<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Rule> Harness<R> {
    /// The rule with its default parameters.
    pub fn new() -> Self {
        Self::with_params(R::Params::default())
    }

    /// The rule with these parameters.
    pub fn with_params(params: R::Params) -> Self {
        let (prepared, manifest) = __private::prepared::<R>(params);
        Self::from_prepared(prepared, manifest)
    }

    /// The rule with parameters given as JSON text, read exactly as the
    /// component reads them; the error names the offending field.
    pub fn with_params_json(params: &str) -> Result<Self, String> {
        let (prepared, manifest) = __private::prepare::<R>(params)?;
        Ok(Self::from_prepared(prepared, manifest))
    }

    fn from_prepared(prepared: __private::Prepared<R>, manifest: Manifest) -> Self {
        Harness {
            manifest,
            prepared,
            states: BTreeMap::new(),
            timers: BTreeMap::new(),
            now: 0,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn params(&self) -> &R::Params {
        self.prepared.params()
    }

    /// Set the processing time handed to later calls (epoch milliseconds).
    /// Events without an event-time field also get this time.
    pub fn set_now(&mut self, now: i64) {
        self.now = now;
    }

    /// One `evaluate` call for `bucket` with these events, in order, each
    /// sent as its JSON text.
    pub fn evaluate(
        &mut self,
        bucket: &str,
        events: &[Json],
    ) -> Result<Vec<Alert<'static>>, CallError> {
        let lines: Vec<String> = events.iter().map(Json::to_string).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        self.evaluate_lines(bucket, &lines)
    }

    /// One `evaluate` call for `bucket` with events given as JSON text, as
    /// they would arrive: raw JSON and nested values reach the rule as
    /// written.
    pub fn evaluate_lines(
        &mut self,
        bucket: &str,
        lines: &[&str],
    ) -> Result<Vec<Alert<'static>>, CallError> {
        let batch = batch_from_lines(&self.manifest, lines, self.now).map_err(CallError)?;
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
        Some(
            self.prepared
                .decode_state(Some(bytes))
                .expect("the harness stored what the rule encoded"),
        )
    }

    /// Store `state` for `bucket` as a version with state schema `schema`
    /// (`name@version` `written_by`) would have, to test
    /// [`Rule::upgrade_state`].
    pub fn store_older<S: serde::Serialize>(
        &mut self,
        bucket: &str,
        schema: u32,
        written_by: &str,
        state: &S,
    ) {
        let codec = crate::state::Codec {
            label: written_by.to_owned(),
            schema,
            reset_older: false,
        };
        let bytes = codec.encode(state).expect("the older state encodes");
        self.states.insert(bucket.to_owned(), bytes);
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

/// The typed batch the host would build for these events (JSON objects as
/// text), read as the host reads them: a repeated field's last value counts;
/// an integer within i64 is an integer and any other number a float; strings
/// unescaped; objects and arrays, and the raw event (trimmed), as written.
/// Event time is `arrival`, or the manifest's event-time field: an RFC 3339
/// string or epoch milliseconds (a fraction truncated). An event without a
/// readable one is a bad event here; the host rejects it before the rule
/// runs, with the same reason.
pub fn batch_from_lines(
    manifest: &Manifest,
    lines: &[&str],
    arrival: i64,
) -> Result<abi::EventBatch, abi::RuleError> {
    let mut batch = abi::EventBatch::default();
    let abi = manifest.as_abi();
    for (index, line) in lines.iter().enumerate() {
        let bad = |reason: String| {
            abi::RuleError::BadEvent(abi::BadEvent {
                index: index as u32,
                reason,
            })
        };
        let line = line.trim();
        let fields: HashMap<String, &RawValue> =
            serde_json::from_str(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let value = |name: &str| fields.get(name).map(|raw| read_value(raw.get()));
        let time = match &abi.event_time {
            abi::EventTime::Arrival => arrival,
            abi::EventTime::Field(field) => {
                let reason = |why: &str| bad(format!("event-time field `{field}` {why}"));
                match value(field) {
                    None => return Err(reason("is missing")),
                    Some(Json::Number(n)) => n
                        .as_i64()
                        .unwrap_or_else(|| n.as_f64().unwrap_or(f64::NAN) as i64),
                    Some(Json::String(s)) => {
                        crate::parse_time(&s).ok_or_else(|| reason("is not an RFC 3339 time"))?
                    }
                    Some(_) => {
                        return Err(reason("must be an RFC 3339 string or epoch milliseconds"));
                    }
                }
            }
        };
        batch.times.push(time);
        if abi.raw_json {
            let raw = push_span(&mut batch.text, line);
            batch.raw.push(raw);
        }
        for field in &abi.fields {
            let (kind, bits) = match fields.get(field.as_str()).map(|raw| raw.get()) {
                None => (kind::ABSENT, 0),
                Some(text) => match read_value(text) {
                    Json::Null => (kind::NULL, 0),
                    Json::Bool(b) => (kind::BOOLEAN, u64::from(b)),
                    Json::Number(n) => match n.as_i64() {
                        Some(i) => (kind::INTEGER, i as u64),
                        None => (kind::FLOAT, n.as_f64().unwrap_or(f64::NAN).to_bits()),
                    },
                    Json::String(s) => (kind::TEXT, push_span(&mut batch.text, &s)),
                    // Nested JSON as written, not re-serialized.
                    Json::Array(_) | Json::Object(_) => {
                        (kind::JSON, push_span(&mut batch.text, text))
                    }
                },
            };
            batch.kinds.push(kind);
            batch.values.push(bits);
        }
    }
    Ok(batch)
}

fn read_value(text: &str) -> Json {
    serde_json::from_str(text).expect("a value serde_json just read")
}
