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
        })
    }
}
