//! Alerts as the host publishes them: the rule's alert plus where it came
//! from, under an id that is the same whenever the same input is processed
//! again, so consumers can deduplicate; and a fingerprint that is the same
//! for every notification of one alert (its firing, its repeats, its
//! resolution), as Alertmanager's is.

pub mod silences;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::runtime::{self, AlertStatus};

/// Longest alert title kept; a longer one is cut (at a character boundary)
/// and ends in `…`.
pub const MAX_TITLE_BYTES: usize = 4 * 1024;
/// Longest alert key kept as it is; a longer one is replaced by
/// `sha256:<hex>` of it, which is as unique and always the same.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest detail kept; a larger one is replaced by
/// `{"truncated": true, "bytes": N}`. With the other bounds an alert record
/// stays under 200 KiB: it fits a DynamoDB outbox item (400 KB) and a
/// Kinesis record (1 MiB) whatever the rule returns.
pub const MAX_DETAIL_BYTES: usize = 192 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// One published alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// This notification's id, deterministic: see [`alert_id`].
    pub id: String,
    /// The alert's identity, shared by all its notifications: see
    /// [`fingerprint`].
    #[serde(default)]
    pub fingerprint: String,
    pub tenant: String,
    /// The rule's name (without version).
    pub rule: String,
    pub rule_version: String,
    pub bucket: String,
    /// The rule's key for this alert, unique within the bucket.
    pub key: String,
    pub status: Status,
    pub severity: Severity,
    pub title: String,
    /// The rule's JSON detail (a string if the rule's text was not JSON).
    pub detail: Detail,
    /// Processing time of the batch that raised it, epoch milliseconds.
    pub at: i64,
    /// Position in the host's alert log, assigned when committed; the cursor
    /// of `GET /v1/tenants/{tenant}/alerts?after=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The id of the tenant's silence that matched it: kept and published,
    /// not to be notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silenced_by: Option<String>,
}

/// An alert's detail: the JSON text the rule wrote, checked once and then
/// carried and written out as it is, never rebuilt as a tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Detail(Box<RawValue>);

impl Detail {
    /// `text` if it is JSON, else `text` as a JSON string.
    pub fn new(text: &str) -> Detail {
        match RawValue::from_string(text.to_owned()) {
            Ok(raw) => Detail(raw),
            Err(_) => Detail::from_value(&serde_json::Value::String(text.to_owned())),
        }
    }

    pub fn from_value(value: &serde_json::Value) -> Detail {
        Detail(serde_json::value::to_raw_value(value).expect("a JSON value serializes"))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.get()).expect("a detail holds JSON")
    }
}

/// Details are equal when their JSON values are (`{"a": 1}` is `{"a":1}`).
impl PartialEq for Detail {
    fn eq(&self, other: &Detail) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

/// Where an alert came from, for its id.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub tenant: &'a str,
    pub rule: &'a str,
    pub bucket: &'a str,
    /// The source position of the batch (a line number, a sequence number).
    pub position: &'a str,
}

/// SHA-256 (first 128 bits, hex) of the origin, the alert's key and status,
/// and its place among the alerts of that call.
pub fn alert_id(origin: Origin<'_>, key: &str, status: Status, seq: usize) -> String {
    let mut hash = Sha256::new();
    for part in [
        origin.tenant,
        origin.rule,
        origin.bucket,
        origin.position,
        key,
        match status {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        },
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.update(seq.to_le_bytes());
    hex::encode(&hash.finalize()[..16])
}

/// SHA-256 (first 64 bits, hex) of the tenant, rule, bucket and key: the
/// same for the firing, every repeat and the resolution of one alert.
pub fn fingerprint(tenant: &str, rule: &str, bucket: &str, key: &str) -> String {
    let mut hash = Sha256::new();
    for part in [tenant, rule, bucket, key] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..8])
}

impl AlertRecord {
    /// The record of the `seq`-th alert a call for `origin` emitted.
    pub fn new(
        origin: Origin<'_>,
        rule_version: &str,
        alert: runtime::Alert<'_>,
        seq: usize,
        at: i64,
    ) -> Self {
        let status = match alert.status {
            AlertStatus::Firing => Status::Firing,
            AlertStatus::Resolved => Status::Resolved,
        };
        let key = bounded_key(alert.key);
        AlertRecord {
            id: alert_id(origin, &key, status, seq),
            fingerprint: fingerprint(origin.tenant, origin.rule, origin.bucket, &key),
            tenant: origin.tenant.to_owned(),
            rule: origin.rule.to_owned(),
            rule_version: rule_version.to_owned(),
            bucket: origin.bucket.to_owned(),
            key,
            status,
            severity: match alert.severity {
                runtime::Severity::Info => Severity::Info,
                runtime::Severity::Warning => Severity::Warning,
                runtime::Severity::Critical => Severity::Critical,
            },
            title: bounded_title(alert.title),
            detail: if alert.detail.len() > MAX_DETAIL_BYTES {
                Detail::from_value(&serde_json::json!({
                    "truncated": true,
                    "bytes": alert.detail.len(),
                }))
            } else {
                Detail::new(alert.detail)
            },
            at,
            seq: None,
            silenced_by: None,
        }
    }
}

fn bounded_key(key: &str) -> String {
    if key.len() <= MAX_KEY_BYTES {
        return key.to_owned();
    }
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn bounded_title(title: &str) -> String {
    if title.len() <= MAX_TITLE_BYTES {
        return title.to_owned();
    }
    let mut end = MAX_TITLE_BYTES - '…'.len_utf8();
    while !title.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &title[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_alert_a_rule_returns_is_bounded_to_what_stores_and_streams_take() {
        let origin = Origin {
            tenant: "t",
            rule: "r",
            bucket: "b",
            position: "p:1",
        };
        let title = "é".repeat(MAX_TITLE_BYTES);
        let key = "k".repeat(10 * MAX_KEY_BYTES);
        let detail = format!("[{}]", "1,".repeat(MAX_DETAIL_BYTES) + "1");
        let alert = runtime::Alert {
            key: &key,
            status: AlertStatus::Firing,
            severity: runtime::Severity::Info,
            title: &title,
            detail: &detail,
        };
        let record = AlertRecord::new(origin, "1.0.0", alert, 0, 0);
        assert!(record.title.len() <= MAX_TITLE_BYTES && record.title.ends_with('…'));
        assert!(record.key.starts_with("sha256:") && record.key.len() <= MAX_KEY_BYTES);
        assert_eq!(record.detail.to_value()["truncated"], true);
        assert!(serde_json::to_vec(&record).unwrap().len() < 200 * 1024);
        let again = AlertRecord::new(origin, "1.0.0", alert, 0, 0);
        assert_eq!(record.id, again.id, "bounded the same way every time");
    }
}
