//! Turning a `POST /v1/events` body into events: NDJSON or a JSON array,
//! each event checked on its own so bad lines are rejected with their reason
//! while the good ones go through. Whether a tenant has rules is the
//! engine's to say, like everything about routing.

use super::http::Rejected;
use crate::event::Incoming;

/// The events and rejected lines of one body.
#[derive(Debug, Default)]
pub struct Parsed {
    pub events: Vec<Incoming>,
    /// The line of each event.
    pub lines: Vec<usize>,
    pub rejected: Vec<Rejected>,
}

/// Parse `body`. A body whose first non-blank byte is `[` is a JSON array
/// (line = element number); anything else is NDJSON (line = line number,
/// blank lines skipped). Each event's position is `{request}:{line}`.
pub fn parse(
    body: &str,
    tenant_field: &str,
    request: &str,
    arrival: i64,
    max_event_bytes: usize,
) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut accept = |line: usize, result: Result<Incoming, String>| match result {
        Ok(mut event) => {
            event.position = format!("{request}:{line}");
            parsed.events.push(event);
            parsed.lines.push(line);
        }
        Err(error) => parsed.rejected.push(Rejected {
            line,
            rule: None,
            error,
        }),
    };
    if body.trim_start().starts_with('[') {
        let items: Vec<Box<serde_json::value::RawValue>> =
            serde_json::from_str(body).map_err(|e| format!("body is not a JSON array: {e}"))?;
        for (i, item) in items.iter().enumerate() {
            let result = Incoming::parse_within(item.get(), tenant_field, arrival, max_event_bytes);
            accept(i + 1, result.map_err(|e| e.to_string()));
        }
    } else {
        for (i, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            accept(
                i + 1,
                Incoming::parse_within(line, tenant_field, arrival, max_event_bytes)
                    .map_err(|e| e.to_string()),
            );
        }
    }
    Ok(parsed)
}
