//! Read access to one bucket's events, typed, without parsing JSON.

use crate::Error;
use crate::abi::{self, Span, Value};

/// One bucket's events from one batch, in arrival order.
#[derive(Clone, Copy)]
pub struct Events<'a> {
    batch: &'a abi::EventBatch,
    fields: &'a [String],
}

/// The value of one declared field of one event.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Field<'a> {
    /// The event has no such field.
    Absent,
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    /// An object or array, as JSON text.
    Json(&'a str),
}

/// One event of the batch.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    index: usize,
    events: Events<'a>,
}

impl<'a> Events<'a> {
    #[doc(hidden)]
    pub fn new(batch: &'a abi::EventBatch, fields: &'a [String]) -> Self {
        Events { batch, fields }
    }

    pub fn len(&self) -> usize {
        self.batch.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.events.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Event<'a>> + 'a {
        let events = *self;
        (0..self.len()).map(move |index| Event { index, events })
    }

    /// The event at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Event<'a>> {
        (index < self.len()).then_some(Event {
            index,
            events: *self,
        })
    }

    fn text(self, span: Span) -> &'a str {
        let start = span.offset as usize;
        let bytes = &self.batch.text[start..start + span.len as usize];
        // The host only hands over text it took from valid UTF-8 JSON.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    fn column(&self, name: &str) -> usize {
        match self.fields.iter().position(|f| f == name) {
            Some(column) => column,
            None => panic!(
                "field `{name}` is read but not declared: add it to the manifest's `fields` ({:?})",
                self.fields
            ),
        }
    }
}

impl<'a> Event<'a> {
    /// Position of the event in this batch (what [`Error::bad_event`] reports).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Event time in milliseconds since the Unix epoch: the manifest's
    /// `event_time` field, or the time the host accepted the event.
    pub fn time(&self) -> i64 {
        self.events.batch.events[self.index].time
    }

    /// The value of a field declared in the manifest's `fields`.
    ///
    /// # Panics
    /// If `name` is not declared: that is a bug in the rule, not in the event.
    pub fn get(&self, name: &str) -> Field<'a> {
        let width = self.events.fields.len();
        let column = self.events.column(name);
        match self.events.batch.values[self.index * width + column] {
            Value::Absent => Field::Absent,
            Value::Null => Field::Null,
            Value::Boolean(b) => Field::Bool(b),
            Value::Integer(i) => Field::Int(i),
            Value::Float(f) => Field::Float(f),
            Value::Text(span) => Field::Str(self.events.text(span)),
            Value::Json(span) => Field::Json(self.events.text(span)),
        }
    }

    /// The field as a string, if it is one.
    pub fn str(&self, name: &str) -> Option<&'a str> {
        match self.get(name) {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The field as a number (integers convert), if it is one.
    pub fn f64(&self, name: &str) -> Option<f64> {
        match self.get(name) {
            Field::Float(f) => Some(f),
            Field::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    /// The field as an integer, if it is one.
    pub fn i64(&self, name: &str) -> Option<i64> {
        match self.get(name) {
            Field::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The field as a boolean, if it is one.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Field::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The field as a string, or a bad-event error naming it.
    pub fn require_str(&self, name: &str) -> Result<&'a str, Error> {
        self.str(name)
            .ok_or_else(|| Error::bad_event(self, format!("`{name}` must be a string")))
    }

    /// The field as a number, or a bad-event error naming it.
    pub fn require_f64(&self, name: &str) -> Result<f64, Error> {
        self.f64(name)
            .ok_or_else(|| Error::bad_event(self, format!("`{name}` must be a number")))
    }

    /// The event's JSON text, if the manifest asked for `raw_json`.
    pub fn raw_json(&self) -> Option<&'a str> {
        let raw = self.events.batch.events[self.index].raw;
        (raw.len > 0).then(|| self.events.text(raw))
    }
}
