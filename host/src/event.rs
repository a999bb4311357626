//! An event as the host holds it: parsed once from its JSON line, with its
//! tenant and arrival time.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The default field naming an event's tenant.
pub const DEFAULT_TENANT_FIELD: &str = "clientId";

/// One accepted event.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub tenant: String,
    /// The top-level fields, read with [`Incoming::field`].
    fields: Vec<(Text, Stored)>,
    /// The JSON text as received, for rules that ask for it.
    pub raw: Box<str>,
    /// When the host accepted it, in epoch milliseconds.
    pub arrival: i64,
    /// Where it came from in its source (`request:line`, `line-N`): alert
    /// ids derive from it, so the same input yields the same ids.
    pub position: String,
    /// Its sequence number within its source's shard, for sources that have
    /// them (Kinesis): buckets remember the last one they applied, so a
    /// replayed event is not applied twice.
    pub seq: Option<SeqNo>,
    /// Apply it to this rule of its tenant only (a dead letter run again).
    pub only_rule: Option<String>,
}

/// A sequence number of a stream shard: decimal digits, ordered numerically
/// (Kinesis's are up to 128 digits, too many for an integer type).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeqNo(std::sync::Arc<str>);

impl SeqNo {
    /// A sequence number from its decimal text; `None` if it is not one.
    pub fn new(digits: &str) -> Option<SeqNo> {
        let digits = digits.trim_start_matches('0');
        let digits = if digits.is_empty() { "0" } else { digits };
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| SeqNo(digits.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SeqNo {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.len(), self.0.as_bytes()).cmp(&(other.0.len(), other.0.as_bytes()))
    }
}

impl PartialOrd for SeqNo {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for SeqNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a line is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no tenant: field `{0}` is missing")]
    MissingTenant(String),
    #[error("field `{0}` must be a non-empty string naming the tenant")]
    BadTenant(String),
    #[error("{bytes} bytes, over the {limit}-byte limit of one event")]
    TooLarge { bytes: usize, limit: usize },
}

impl EventError {
    /// A fixed name for the kind, as dead letters and metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::Json(_) | EventError::NotAnObject => "malformed",
            EventError::MissingTenant(_) | EventError::BadTenant(_) => "no_tenant",
            EventError::TooLarge { .. } => "too_large",
        }
    }
}

/// Largest event: the Kinesis record limit, so an event any source takes
/// fits every other.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// The value of a top-level field. Strings, objects and arrays borrow the
/// event's text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(&'a str),
    /// An object or array, as its JSON text.
    Json(&'a str),
}

/// A JSON number as serde_json reads it: an integer when it is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    UInt(u64),
    Float(f64),
}

impl Number {
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Number::Int(i) => Some(i),
            Number::UInt(u) => i64::try_from(u).ok(),
            Number::Float(_) => None,
        }
    }

    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::UInt(u) => u as f64,
            Number::Float(f) => f,
        }
    }
}

impl fmt::Display for Number {
    /// As serde_json writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let number = match *self {
            Number::Int(i) => serde_json::Number::from(i),
            Number::UInt(u) => serde_json::Number::from(u),
            Number::Float(x) => match serde_json::Number::from_f64(x) {
                Some(n) => n,
                None => return f.write_str("null"),
            },
        };
        fmt::Display::fmt(&number, f)
    }
}

/// Text of the event: a byte range of its JSON, or, where the JSON escapes
/// characters, the unescaped copy.
#[derive(Debug, Clone)]
enum Text {
    Span(u32, u32),
    Owned(Box<str>),
}

impl Text {
    fn get<'a>(&'a self, raw: &'a str) -> &'a str {
        match self {
            Text::Span(start, end) => &raw[*start as usize..*end as usize],
            Text::Owned(text) => text,
        }
    }
}

/// A field's value as kept: [`Value`] with its text not yet resolved.
#[derive(Debug, Clone)]
enum Stored {
    Null,
    Bool(bool),
    Number(Number),
    Str(Text),
    Json(u32, u32),
}

impl Incoming {
    /// Parse one event. The tenant comes from `tenant_field`.
    pub fn parse(text: &str, tenant_field: &str, arrival: i64) -> Result<Self, EventError> {
        Self::parse_within(text, tenant_field, arrival, usize::MAX)
    }

    /// [`parse`](Self::parse), refusing an event of more than `max_bytes`.
    pub fn parse_within(
        text: &str,
        tenant_field: &str,
        arrival: i64,
        max_bytes: usize,
    ) -> Result<Self, EventError> {
        let text = text.trim();
        if text.len() > max_bytes {
            return Err(EventError::TooLarge {
                bytes: text.len(),
                limit: max_bytes,
            });
        }
        let raw: Box<str> = text.into();
        let fields = read_fields(&raw).map_err(|error| {
            // Tell a line that is not JSON from JSON that is not an object.
            match serde_json::from_str::<IgnoredAny>(&raw) {
                Err(invalid) => EventError::Json(invalid.to_string()),
                Ok(_) if error.is_data() => EventError::NotAnObject,
                Ok(_) => EventError::Json(error.to_string()),
            }
        })?;
        let mut event = Incoming {
            tenant: String::new(),
            fields,
            raw,
            arrival,
            position: String::new(),
            seq: None,
            only_rule: None,
        };
        event.tenant = match event.field(tenant_field) {
            None => return Err(EventError::MissingTenant(tenant_field.to_owned())),
            Some(Value::Str(t)) if !t.is_empty() => t.to_owned(),
            Some(_) => return Err(EventError::BadTenant(tenant_field.to_owned())),
        };
        Ok(event)
    }

    /// The value of the top-level field `name`; of its last occurrence if
    /// the event repeats it.
    pub fn field(&self, name: &str) -> Option<Value<'_>> {
        let raw = &*self.raw;
        let (_, stored) = self
            .fields
            .iter()
            .rev()
            .find(|(field, _)| field.get(raw) == name)?;
        Some(match stored {
            Stored::Null => Value::Null,
            Stored::Bool(b) => Value::Bool(*b),
            Stored::Number(n) => Value::Number(*n),
            Stored::Str(text) => Value::Str(text.get(raw)),
            Stored::Json(start, end) => Value::Json(&raw[*start as usize..*end as usize]),
        })
    }
}

/// The top-level fields of one JSON object, without building a tree: each
/// value is read as its raw text, then kept by kind.
fn read_fields(raw: &str) -> Result<Vec<(Text, Stored)>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    let fields = de::Deserializer::deserialize_map(&mut deserializer, FieldsVisitor { raw })?;
    deserializer.end()?;
    Ok(fields)
}

/// The span of `part`, a slice of `raw`, within it.
fn span(raw: &str, part: &str) -> (u32, u32) {
    let start = part.as_ptr() as usize - raw.as_ptr() as usize;
    // Events are far below 4 GiB: bodies are bounded by the ingest limit.
    (start as u32, (start + part.len()) as u32)
}

struct FieldsVisitor<'r> {
    raw: &'r str,
}

impl<'de> Visitor<'de> for FieldsVisitor<'de> {
    type Value = Vec<(Text, Stored)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(name) = map.next_key_seed(KeySeed { raw: self.raw })? {
            let value: &'de RawValue = map.next_value()?;
            fields.push((
                name,
                stored(self.raw, value.get()).map_err(de::Error::custom)?,
            ));
        }
        Ok(fields)
    }
}

/// A field name: borrowed when the JSON does not escape it.
struct KeySeed<'r> {
    raw: &'r str,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'de> {
    type Value = Text;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Text, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'de> {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Text, E> {
        let (start, end) = span(self.raw, name);
        Ok(Text::Span(start, end))
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Text, E> {
        Ok(Text::Owned(name.into()))
    }
}

/// A value from its JSON text (`json`, a slice of `raw`).
fn stored(raw: &str, json: &str) -> Result<Stored, serde_json::Error> {
    Ok(match json.as_bytes()[0] {
        b'{' | b'[' => {
            let (start, end) = span(raw, json);
            Stored::Json(start, end)
        }
        b'"' if !json.contains('\\') => {
            let (start, end) = span(raw, &json[1..json.len() - 1]);
            Stored::Str(Text::Span(start, end))
        }
        b'"' => Stored::Str(Text::Owned(serde_json::from_str::<String>(json)?.into())),
        b't' => Stored::Bool(true),
        b'f' => Stored::Bool(false),
        b'n' => Stored::Null,
        _ => {
            let n: serde_json::Number = serde_json::from_str(json)?;
            Stored::Number(match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Number::Int(i),
                (None, Some(u)) => Number::UInt(u),
                (None, None) => Number::Float(n.as_f64().unwrap_or(f64::NAN)),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{EventError, Incoming, Number, SeqNo, Value};

    fn event(line: &str) -> Incoming {
        Incoming::parse(line, "clientId", 0).unwrap()
    }

    #[test]
    fn fields_are_read_by_kind_borrowing_the_text_where_it_is_not_escaped() {
        let e = event(
            r#" {"clientId":"c1","s":"plain","esc":"a\"b\u00e9","n":-3,"big":18446744073709551615,
                "f":1.5,"t":true,"no":false,"nil":null,"obj":{"k": [1, 2]},"list":[],"k\u0065y":"v"} "#,
        );
        assert_eq!(e.tenant, "c1");
        assert_eq!(e.field("s"), Some(Value::Str("plain")));
        assert_eq!(e.field("esc"), Some(Value::Str("a\"b\u{e9}")));
        assert_eq!(e.field("n"), Some(Value::Number(Number::Int(-3))));
        assert_eq!(e.field("big"), Some(Value::Number(Number::UInt(u64::MAX))));
        assert_eq!(e.field("f"), Some(Value::Number(Number::Float(1.5))));
        assert_eq!(e.field("t"), Some(Value::Bool(true)));
        assert_eq!(e.field("no"), Some(Value::Bool(false)));
        assert_eq!(e.field("nil"), Some(Value::Null));
        assert_eq!(e.field("obj"), Some(Value::Json(r#"{"k": [1, 2]}"#)));
        assert_eq!(e.field("list"), Some(Value::Json("[]")));
        assert_eq!(e.field("key"), Some(Value::Str("v")), "an escaped name");
        assert_eq!(e.field("missing"), None);
        assert_eq!(&*e.raw, e.raw.trim(), "the raw text is trimmed");
    }

    #[test]
    fn a_repeated_field_reads_as_its_last_value() {
        let e = event(r#"{"clientId":"c1","state":"running","state":"stopped"}"#);
        assert_eq!(e.field("state"), Some(Value::Str("stopped")));
    }

    #[test]
    fn lines_that_are_not_objects_or_not_json_or_lack_a_tenant_say_so() {
        let parse = |line| Incoming::parse(line, "clientId", 0).unwrap_err();
        assert_eq!(parse("[1, 2]"), EventError::NotAnObject);
        assert_eq!(parse("\"text\""), EventError::NotAnObject);
        assert!(matches!(parse("[1,"), EventError::Json(_)));
        assert!(matches!(parse(r#"{"clientId":"c1","#), EventError::Json(_)));
        assert!(matches!(
            parse(r#"{"clientId":"c1"} x"#),
            EventError::Json(_)
        ));
        assert_eq!(
            parse(r#"{"other":1}"#),
            EventError::MissingTenant("clientId".to_owned())
        );
        assert_eq!(
            parse(r#"{"clientId":7}"#),
            EventError::BadTenant("clientId".to_owned())
        );
        assert_eq!(
            parse(r#"{"clientId":""}"#),
            EventError::BadTenant("clientId".to_owned())
        );
    }

    #[test]
    fn numbers_print_as_serde_json_prints_them() {
        assert_eq!(Number::Int(-3).to_string(), "-3");
        assert_eq!(Number::UInt(u64::MAX).to_string(), "18446744073709551615");
        assert_eq!(Number::Float(1.0).to_string(), "1.0");
        assert_eq!(Number::Float(f64::NAN).to_string(), "null");
    }

    #[test]
    fn sequence_numbers_order_numerically() {
        let n = |s| SeqNo::new(s).unwrap();
        assert!(n("9") < n("10"));
        assert!(n("49590338271490256608559692538361571095921575989136588898") > n("4959"));
        assert_eq!(n("007"), n("7"));
        assert!(SeqNo::new("12a").is_none());
    }
}
