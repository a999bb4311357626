//! An event as the host holds it: parsed once from its JSON line, with its
//! tenant and arrival time.

use serde_json::{Map, Value as Json};

/// The default field naming an event's tenant.
pub const DEFAULT_TENANT_FIELD: &str = "clientId";

/// One accepted event.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub tenant: String,
    /// The top-level fields.
    pub fields: Map<String, Json>,
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
}

impl Incoming {
    /// Parse one event. The tenant comes from `tenant_field`.
    pub fn parse(text: &str, tenant_field: &str, arrival: i64) -> Result<Self, EventError> {
        let json: Json = serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;
        Self::from_json(json, text.trim(), tenant_field, arrival)
    }

    /// An event already parsed (an element of a JSON array, say).
    pub fn from_json(
        json: Json,
        raw: &str,
        tenant_field: &str,
        arrival: i64,
    ) -> Result<Self, EventError> {
        let Json::Object(fields) = json else {
            return Err(EventError::NotAnObject);
        };
        let tenant = match fields.get(tenant_field) {
            None => return Err(EventError::MissingTenant(tenant_field.to_owned())),
            Some(Json::String(t)) if !t.is_empty() => t.clone(),
            Some(_) => return Err(EventError::BadTenant(tenant_field.to_owned())),
        };
        Ok(Incoming {
            tenant,
            fields,
            raw: raw.into(),
            arrival,
            position: String::new(),
            seq: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::SeqNo;

    #[test]
    fn sequence_numbers_order_numerically() {
        let n = |s| SeqNo::new(s).unwrap();
        assert!(n("9") < n("10"));
        assert!(n("49590338271490256608559692538361571095921575989136588898") > n("4959"));
        assert_eq!(n("007"), n("7"));
        assert!(SeqNo::new("12a").is_none());
    }
}
