//! Times as text: RFC 3339, read into and written from epoch milliseconds,
//! as event times, silences, quarantines and rule logs give them. Below
//! every module that reads or writes a time.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An RFC 3339 time as epoch milliseconds, as the host reads event times.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Epoch milliseconds as RFC 3339, if the time is one it can write.
pub fn format_rfc3339(ms: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// Epoch milliseconds as RFC 3339, or as the number if out of range.
pub fn rfc3339(ms: i64) -> String {
    format_rfc3339(ms).unwrap_or_else(|| ms.to_string())
}

/// The wall clock's time now, RFC 3339.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}
