//! Read access to one bucket's events, typed, without parsing JSON.
//!
//! The host hands the declared fields over as a column table (see
//! `event-batch` in `wit/rule.wit`); this module turns entries back into
//! [`Field`]s.

use crate::Error;
use crate::abi;

/// `value-kind` discriminants, in the order `wit/rule.wit` declares them.
pub(crate) mod kind {
    pub const ABSENT: u8 = 0;
    pub const NULL: u8 = 1;
    pub const BOOLEAN: u8 = 2;
    pub const INTEGER: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const TEXT: u8 = 5;
    pub const JSON: u8 = 6;
}

/// Append `s` to `text`, returning its span (`offset << 32 | length`).
pub(crate) fn push_span(text: &mut String, s: &str) -> u64 {
    let span = ((text.len() as u64) << 32) | s.len() as u64;
    // SAFETY: a whole `str` appended to a `String` keeps it UTF-8.
    crate::json::append(unsafe { text.as_mut_vec() }, s.as_bytes());
    span
}

/// A span's byte range of the batch text.
pub(crate) fn span(bits: u64) -> (usize, usize) {
    let start = (bits >> 32) as usize;
    (start, start + (bits & 0xffff_ffff) as usize)
}

/// One bucket's events from one batch, in arrival order.
#[derive(Clone, Copy)]
pub struct Events<'a> {
    batch: &'a abi::EventBatch,
    fields: &'a [String],
    /// The batch text.
    text: &'a str,
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
    /// Wrap a batch from the host, checking once what reads rely on: the
    /// table has one entry per event and field, kinds are known and every
    /// span lies on character boundaries within the text.
    #[doc(hidden)]
    pub fn new(batch: &'a abi::EventBatch, fields: &'a [String]) -> Result<Self, String> {
        let text = batch.text.as_str();
        let entries = batch.times.len() * fields.len();
        if batch.kinds.len() != entries || batch.values.len() != entries {
            return Err(format!(
                "event batch has {} kinds and {} values for {} events of {} fields",
                batch.kinds.len(),
                batch.values.len(),
                batch.times.len(),
                fields.len()
            ));
        }
        if !batch.raw.is_empty() && batch.raw.len() != batch.times.len() {
            return Err("event batch has raw JSON for some events only".to_owned());
        }
        let in_text = |bits: u64| {
            let (start, end) = span(bits);
            if start <= end && text.is_char_boundary(start) && text.is_char_boundary(end) {
                Ok(())
            } else {
                Err(format!("event batch span {start}..{end} is out of bounds"))
            }
        };
        for (&kind, &bits) in batch.kinds.iter().zip(&batch.values) {
            match kind {
                kind::TEXT | kind::JSON => in_text(bits)?,
                kind::ABSENT..kind::TEXT => {}
                unknown => return Err(format!("event batch has unknown value kind {unknown}")),
            }
        }
        for &bits in &batch.raw {
            in_text(bits)?;
        }
        Ok(Events {
            batch,
            fields,
            text,
        })
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.batch.times.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.batch.times.is_empty()
    }

    #[inline]
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Event<'a>> + 'a {
        let events = *self;
        (0..self.len()).map(move |index| Event { index, events })
    }

    /// The event at `index`, if there is one.
    #[inline]
    pub fn get(&self, index: usize) -> Option<Event<'a>> {
        (index < self.len()).then_some(Event {
            index,
            events: *self,
        })
    }

    #[inline]
    fn text(self, bits: u64) -> &'a str {
        let (start, end) = span(bits);
        debug_assert!(self.text.is_char_boundary(start) && self.text.is_char_boundary(end));
        // SAFETY: `new` checked every span of the batch: in bounds, ordered,
        // on character boundaries.
        unsafe { self.text.get_unchecked(start..end) }
    }

    #[inline]
    fn column(&self, name: &str) -> usize {
        match self
            .fields
            .iter()
            .position(|f| crate::mem::equal(f.as_bytes(), name.as_bytes()))
        {
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
    #[inline]
    pub fn index(&self) -> usize {
        self.index
    }

    /// Event time in milliseconds since the Unix epoch: the manifest's
    /// `event_time` field, or the time the host accepted the event.
    #[inline]
    pub fn time(&self) -> i64 {
        self.events.batch.times[self.index]
    }

    /// The value of a field declared in the manifest's `fields`.
    ///
    /// # Panics
    /// If `name` is not declared: that is a bug in the rule, not in the event.
    #[inline]
    pub fn get(&self, name: &str) -> Field<'a> {
        let events = self.events;
        let entry = self.index * events.fields.len() + events.column(name);
        let (bits, kind) = (events.batch.values[entry], events.batch.kinds[entry]);
        match kind {
            kind::ABSENT => Field::Absent,
            kind::NULL => Field::Null,
            kind::BOOLEAN => Field::Bool(bits != 0),
            kind::INTEGER => Field::Int(bits as i64),
            kind::FLOAT => Field::Float(f64::from_bits(bits)),
            kind::TEXT => Field::Str(events.text(bits)),
            kind::JSON => Field::Json(events.text(bits)),
            // `new` rejects unknown kinds.
            _ => unreachable!("value kinds are checked when the batch arrives"),
        }
    }

    /// The field as a string, if it is one.
    #[inline]
    pub fn str(&self, name: &str) -> Option<&'a str> {
        match self.get(name) {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The field as a number (integers convert), if it is one.
    #[inline]
    pub fn f64(&self, name: &str) -> Option<f64> {
        match self.get(name) {
            Field::Float(f) => Some(f),
            Field::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    /// The field as an integer, if it is one.
    #[inline]
    pub fn i64(&self, name: &str) -> Option<i64> {
        match self.get(name) {
            Field::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The field as a boolean, if it is one.
    #[inline]
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Field::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The field as a string, or a bad-event error naming it.
    #[inline]
    pub fn require_str(&self, name: &str) -> Result<&'a str, Error> {
        self.str(name)
            .ok_or_else(|| Error::bad_event(self, format!("`{name}` must be a string")))
    }

    /// The field as a number, or a bad-event error naming it.
    #[inline]
    pub fn require_f64(&self, name: &str) -> Result<f64, Error> {
        self.f64(name)
            .ok_or_else(|| Error::bad_event(self, format!("`{name}` must be a number")))
    }

    /// The event's JSON text, if the manifest asked for `raw_json`.
    #[inline]
    pub fn raw_json(&self) -> Option<&'a str> {
        let raw = self.events.batch.raw.get(self.index)?;
        Some(self.events.text(*raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_spans_off_character_boundaries_and_unknown_kinds() {
        let fields = ["name".to_owned()];
        let batch = abi::EventBatch {
            times: vec![0],
            kinds: vec![kind::TEXT],
            values: vec![1],
            raw: vec![],
            text: "é".to_owned(),
        };
        let err = Events::new(&batch, &fields).err().unwrap();
        assert_eq!(err, "event batch span 0..1 is out of bounds");

        let batch = abi::EventBatch {
            kinds: vec![7],
            values: vec![0],
            ..batch
        };
        let err = Events::new(&batch, &fields).err().unwrap();
        assert_eq!(err, "event batch has unknown value kind 7");
    }
}
