//! From events to the calls a rule needs: the manifest's filter, the bucket
//! key, event time, and the typed [`EventBatch`] of each bucket. All native:
//! no Wasm runs for an event a rule does not want.

use std::collections::HashMap;

use serde_json::Value as Json;

use crate::event::Incoming;
use crate::runtime::{
    Condition, Event, EventBatch, EventTime, Manifest, Scalar, Span, Test, Value,
};

/// One bucket's share of a batch for one rule.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub key: String,
    pub batch: EventBatch,
    /// For each event of `batch`, its index in the routed slice.
    pub members: Vec<usize>,
}

/// An event the manifest's event-time field cannot be read from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event #{index}: event-time field `{field}` {reason}")]
pub struct BadEventTime {
    pub index: usize,
    pub field: String,
    pub reason: &'static str,
}

/// Whether the event passes every condition of the manifest's filter.
pub fn matches(filter: &[Condition], event: &Incoming) -> bool {
    filter.iter().all(|condition| {
        let value = event.fields.get(&condition.field);
        match &condition.test {
            Test::Exists => value.is_some(),
            Test::Equals(literal) => value.is_some_and(|v| equals(v, literal)),
            Test::OneOf(literals) => value.is_some_and(|v| literals.iter().any(|l| equals(v, l))),
        }
    })
}

fn equals(value: &Json, literal: &Scalar) -> bool {
    match (value, literal) {
        (Json::Null, Scalar::Null) => true,
        (Json::Bool(a), Scalar::Boolean(b)) => a == b,
        (Json::String(a), Scalar::Text(b)) => a == b,
        (Json::Number(a), Scalar::Integer(b)) => match a.as_i64() {
            Some(a) => a == *b,
            None => a.as_f64() == Some(*b as f64),
        },
        (Json::Number(a), Scalar::Float(b)) => a.as_f64() == Some(*b),
        _ => false,
    }
}

/// The bucket key: the `bucket-key` fields' values joined by `/`. Strings
/// appear as they are (with `%` and `/` percent-encoded, so distinct values
/// never share a key), other values as JSON, missing ones as nothing.
pub fn bucket_key(fields: &[String], event: &Incoming) -> String {
    let mut key = String::new();
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            key.push('/');
        }
        match event.fields.get(field) {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => {
                for c in s.chars() {
                    match c {
                        '%' => key.push_str("%25"),
                        '/' => key.push_str("%2F"),
                        c => key.push(c),
                    }
                }
            }
            Some(other) => key.push_str(&other.to_string()),
        }
    }
    key
}

/// The event's time per the manifest, in epoch milliseconds.
pub fn event_time(
    manifest: &Manifest,
    index: usize,
    event: &Incoming,
) -> Result<i64, BadEventTime> {
    let field = match &manifest.event_time {
        EventTime::Arrival => return Ok(event.arrival),
        EventTime::Field(field) => field,
    };
    let bad = |reason| BadEventTime {
        index,
        field: field.clone(),
        reason,
    };
    match event.fields.get(field) {
        None => Err(bad("is missing")),
        Some(Json::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(|| bad("is not a number of milliseconds")),
        Some(Json::String(s)) => parse_rfc3339(s).ok_or_else(|| bad("is not an RFC 3339 time")),
        Some(_) => Err(bad("must be an RFC 3339 string or epoch milliseconds")),
    }
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Filter `events` through the manifest and group them into buckets, each
/// in arrival order; buckets in order of their first event.
pub fn route(manifest: &Manifest, events: &[&Incoming]) -> Result<Vec<Bucket>, BadEventTime> {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (index, event) in events.iter().enumerate() {
        if !matches(&manifest.filter, event) {
            continue;
        }
        let time = event_time(manifest, index, event)?;
        let key = bucket_key(&manifest.bucket_key, event);
        let slot = match by_key.get(&key) {
            Some(&slot) => slot,
            None => {
                by_key.insert(key.clone(), buckets.len());
                buckets.push(Bucket {
                    key,
                    batch: EventBatch {
                        events: Vec::new(),
                        values: Vec::new(),
                        text: Vec::new(),
                    },
                    members: Vec::new(),
                });
                buckets.len() - 1
            }
        };
        let bucket = &mut buckets[slot];
        push_event(&mut bucket.batch, manifest, event, time);
        bucket.members.push(index);
    }
    Ok(buckets)
}

/// Append one event to a batch: its declared fields as typed values, strings
/// copied into the batch's text.
pub fn push_event(batch: &mut EventBatch, manifest: &Manifest, event: &Incoming, time: i64) {
    let raw = if manifest.raw_json {
        push_text(&mut batch.text, &event.raw)
    } else {
        Span { offset: 0, len: 0 }
    };
    batch.events.push(Event { time, raw });
    for field in &manifest.fields {
        let value = match event.fields.get(field) {
            None => Value::Absent,
            Some(Json::Null) => Value::Null,
            Some(Json::Bool(b)) => Value::Boolean(*b),
            Some(Json::Number(n)) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Some(Json::String(s)) => Value::Text(push_text(&mut batch.text, s)),
            Some(other) => Value::Json(push_text(&mut batch.text, &other.to_string())),
        };
        batch.values.push(value);
    }
}

fn push_text(text: &mut Vec<u8>, s: &str) -> Span {
    let span = Span {
        offset: text.len() as u32,
        len: s.len() as u32,
    };
    text.extend_from_slice(s.as_bytes());
    span
}
