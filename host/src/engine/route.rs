//! From events to the calls a rule needs: the manifest's filter, the bucket
//! key, event time, and the typed [`EventBatch`] of each bucket. All native:
//! no Wasm runs for an event a rule does not want.

use std::collections::HashMap;

use super::RejectCause;
use crate::event::{Incoming, Value};
// How event times are read; `serve` names it here too.
use crate::runtime::{Condition, EventBatch, EventTime, Manifest, Scalar, Test, ValueKind};
pub(crate) use crate::timestamp::parse_rfc3339;

/// One bucket's share of a batch for one rule.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub key: String,
    pub batch: EventBatch,
    /// For each event of `batch`, its index in the routed slice.
    pub members: Vec<usize>,
}

impl Bucket {
    fn empty(key: String) -> Self {
        Bucket {
            key,
            batch: EventBatch {
                times: Vec::new(),
                kinds: Vec::new(),
                values: Vec::new(),
                raw: Vec::new(),
                text: String::new(),
            },
            members: Vec::new(),
        }
    }
}

/// Longest bucket key: the key is part of every stored item's key and of
/// every alert, and DynamoDB keys take at most 2 KiB. Events whose bucket
/// fields make a longer key are refused by the rule.
pub const MAX_BUCKET_KEY_BYTES: usize = 1024;

/// An event a rule wants but cannot take: its event time cannot be read,
/// or its bucket key is too long.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("event #{index}: {reason}")]
pub struct Unroutable {
    pub index: usize,
    /// [`RejectCause::EventTime`] or [`RejectCause::BucketKey`].
    pub cause: RejectCause,
    pub reason: String,
}

/// Whether the event passes every condition of the manifest's filter.
pub fn matches(filter: &[Condition], event: &Incoming) -> bool {
    filter.iter().all(|condition| {
        let value = event.field(&condition.field);
        match &condition.test {
            Test::Exists => value.is_some(),
            Test::Equals(literal) => value.is_some_and(|v| equals(v, literal)),
            Test::OneOf(literals) => value.is_some_and(|v| literals.iter().any(|l| equals(v, l))),
        }
    })
}

fn equals(value: Value<'_>, literal: &Scalar) -> bool {
    match (value, literal) {
        (Value::Null, Scalar::Null) => true,
        (Value::Bool(a), Scalar::Boolean(b)) => a == *b,
        (Value::Str(a), Scalar::Text(b)) => a == b,
        (Value::Number(a), Scalar::Integer(b)) => match a.as_i64() {
            Some(a) => a == *b,
            None => a.as_f64() == *b as f64,
        },
        (Value::Number(a), Scalar::Float(b)) => a.as_f64() == *b,
        _ => false,
    }
}

/// The bucket key: the `bucket-key` fields' values joined by `/`. Strings
/// appear as they are (with `%` and `/` percent-encoded, so distinct values
/// never share a key), other values as JSON, missing ones as nothing.
pub fn bucket_key(fields: &[String], event: &Incoming) -> String {
    let mut key = String::new();
    write_bucket_key(fields, event, &mut key);
    key
}

/// [`bucket_key`] into `key`, replacing what it held.
fn write_bucket_key(fields: &[String], event: &Incoming, key: &mut String) {
    key.clear();
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            key.push('/');
        }
        match event.field(field) {
            None | Some(Value::Null) => {}
            Some(Value::Str(s)) => {
                for c in s.chars() {
                    match c {
                        '%' => key.push_str("%25"),
                        '/' => key.push_str("%2F"),
                        c => key.push(c),
                    }
                }
            }
            Some(Value::Bool(b)) => key.push_str(if b { "true" } else { "false" }),
            Some(Value::Number(n)) => {
                use std::fmt::Write;
                let _ = write!(key, "{n}");
            }
            // Written the way serde_json writes it, so that the same value
            // keys the same bucket however the event spaced or ordered it.
            Some(Value::Json(json)) => match serde_json::from_str::<serde_json::Value>(json) {
                Ok(value) => key.push_str(&value.to_string()),
                Err(_) => key.push_str(json),
            },
        }
    }
}

/// The event's time per the manifest, in epoch milliseconds.
pub fn event_time(manifest: &Manifest, index: usize, event: &Incoming) -> Result<i64, Unroutable> {
    let field = match &manifest.event_time {
        EventTime::Arrival => return Ok(event.arrival),
        EventTime::Field(field) => field,
    };
    let bad = |reason: &str| Unroutable {
        index,
        cause: RejectCause::EventTime,
        reason: format!("event-time field `{field}` {reason}"),
    };
    match event.field(field) {
        None => Err(bad("is missing")),
        Some(Value::Number(n)) => Ok(n.as_i64().unwrap_or(n.as_f64() as i64)),
        Some(Value::Str(s)) => parse_rfc3339(s).ok_or_else(|| bad("is not an RFC 3339 time")),
        Some(_) => Err(bad("must be an RFC 3339 string or epoch milliseconds")),
    }
}

/// Filter `events` through the manifest and group them into buckets, each
/// in arrival order; buckets in order of their first event. Events whose
/// event time cannot be read are left out and returned beside.
pub fn route(manifest: &Manifest, events: &[&Incoming]) -> (Vec<Bucket>, Vec<Unroutable>) {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut unroutable = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut key = String::new();
    for (index, event) in events.iter().enumerate() {
        if !matches(&manifest.filter, event) {
            continue;
        }
        let time = match event_time(manifest, index, event) {
            Ok(time) => time,
            Err(bad) => {
                unroutable.push(bad);
                continue;
            }
        };
        // One scratch key for every event: only a new bucket allocates one.
        write_bucket_key(&manifest.bucket_key, event, &mut key);
        if key.len() > MAX_BUCKET_KEY_BYTES {
            unroutable.push(Unroutable {
                index,
                cause: RejectCause::BucketKey,
                reason: format!(
                    "its bucket key is {} bytes, over the {MAX_BUCKET_KEY_BYTES}-byte limit",
                    key.len()
                ),
            });
            continue;
        }
        let slot = match by_key.get(key.as_str()) {
            Some(&slot) => slot,
            None => {
                by_key.insert(key.clone(), buckets.len());
                buckets.push(Bucket::empty(key.clone()));
                buckets.len() - 1
            }
        };
        let bucket = &mut buckets[slot];
        push_event(&mut bucket.batch, manifest, event, time);
        bucket.members.push(index);
    }
    (buckets, unroutable)
}

/// `bucket` with only the members `keep` admits (in order).
pub fn rebuild(
    manifest: &Manifest,
    events: &[&Incoming],
    bucket: &Bucket,
    mut keep: impl FnMut(usize) -> bool,
) -> Bucket {
    let mut rebuilt = Bucket::empty(bucket.key.clone());
    for (n, &index) in bucket.members.iter().enumerate() {
        if keep(index) {
            push_event(
                &mut rebuilt.batch,
                manifest,
                events[index],
                bucket.batch.times[n],
            );
            rebuilt.members.push(index);
        }
    }
    rebuilt
}

/// Append one event to a batch: its declared fields as typed entries of the
/// column table, strings copied into the batch's text (see `event-batch` in
/// `wit/rule.wit`).
pub fn push_event(batch: &mut EventBatch, manifest: &Manifest, event: &Incoming, time: i64) {
    batch.times.push(time);
    if manifest.raw_json {
        let raw = push_text(&mut batch.text, &event.raw);
        batch.raw.push(raw);
    }
    for field in &manifest.fields {
        let (kind, bits) = match event.field(field) {
            None => (ValueKind::Absent, 0),
            Some(Value::Null) => (ValueKind::Null, 0),
            Some(Value::Bool(b)) => (ValueKind::Boolean, u64::from(b)),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => (ValueKind::Integer, i as u64),
                None => (ValueKind::Float, n.as_f64().to_bits()),
            },
            Some(Value::Str(s)) => (ValueKind::Text, push_text(&mut batch.text, s)),
            Some(Value::Json(json)) => (ValueKind::Json, push_text(&mut batch.text, json)),
        };
        batch.kinds.push(kind as u8);
        batch.values.push(bits);
    }
}

/// Append `s` to the text, returning its span (`offset << 32 | length`).
fn push_text(text: &mut String, s: &str) -> u64 {
    let span = ((text.len() as u64) << 32) | s.len() as u64;
    text.push_str(s);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(line: &str) -> Incoming {
        Incoming::parse(line, "clientId", 0).unwrap()
    }

    #[test]
    fn bucket_keys_write_each_value_one_way_however_the_event_spells_it() {
        let key = |line: &str, fields: &[&str]| {
            let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            bucket_key(&fields, &event(line))
        };
        assert_eq!(
            key(r#"{"clientId":"c","m":"a/b%c","n":7}"#, &["m", "n"]),
            "a%2Fb%25c/7"
        );
        assert_eq!(key(r#"{"clientId":"c","m":"\u0061"}"#, &["m"]), "a");
        assert_eq!(
            key(r#"{"clientId":"c","x":1.0,"b":true}"#, &["x", "b"]),
            "1.0/true"
        );
        assert_eq!(
            key(r#"{"clientId":"c","o":{"b": 2, "a": [1]}}"#, &["o"]),
            key(r#"{"clientId":"c","o":{"a":[1],"b":2}}"#, &["o"]),
        );
        assert_eq!(key(r#"{"clientId":"c","n":null}"#, &["n", "missing"]), "/");
    }

    #[test]
    fn filters_compare_numbers_across_integer_and_float() {
        let e = event(r#"{"clientId":"c","n":2,"f":2.0,"s":"x"}"#);
        let cond = |field: &str, test: Test| Condition {
            field: field.to_owned(),
            test,
        };
        assert!(matches(&[cond("n", Test::Equals(Scalar::Float(2.0)))], &e));
        assert!(matches(&[cond("f", Test::Equals(Scalar::Integer(2)))], &e));
        assert!(!matches(&[cond("s", Test::Equals(Scalar::Integer(2)))], &e));
        assert!(matches(&[cond("s", Test::Exists)], &e));
        assert!(!matches(&[cond("nope", Test::Exists)], &e));
    }

    #[test]
    fn an_event_whose_bucket_key_is_too_long_is_left_out_with_the_reason() {
        let manifest = Manifest {
            name: "r".into(),
            version: "1.0.0".into(),
            filter: Vec::new(),
            bucket_key: vec!["m".into()],
            fields: Vec::new(),
            raw_json: false,
            event_time: EventTime::Arrival,
            state_ttl_ms: None,
        };
        let long = "x".repeat(MAX_BUCKET_KEY_BYTES + 1);
        let events = [
            event(r#"{"clientId":"c","m":"short"}"#),
            event(&format!(r#"{{"clientId":"c","m":"{long}"}}"#)),
        ];
        let refs: Vec<&Incoming> = events.iter().collect();
        let (buckets, unroutable) = route(&manifest, &refs);
        assert_eq!(buckets.len(), 1);
        assert_eq!(buckets[0].key, "short");
        assert_eq!(
            unroutable,
            [Unroutable {
                index: 1,
                cause: RejectCause::BucketKey,
                reason: format!(
                    "its bucket key is {} bytes, over the {MAX_BUCKET_KEY_BYTES}-byte limit",
                    long.len()
                ),
            }]
        );
    }
}
