//! Alerts as the host publishes them: the rule's alert plus where it came
//! from, under an id that is the same whenever the same input is processed
//! again, so consumers can deduplicate.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::runtime::{self, AlertStatus};

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
    /// Deterministic: see [`alert_id`].
    pub id: String,
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
        AlertRecord {
            id: alert_id(origin, alert.key, status, seq),
            tenant: origin.tenant.to_owned(),
            rule: origin.rule.to_owned(),
            rule_version: rule_version.to_owned(),
            bucket: origin.bucket.to_owned(),
            key: alert.key.to_owned(),
            status,
            severity: match alert.severity {
                runtime::Severity::Info => Severity::Info,
                runtime::Severity::Warning => Severity::Warning,
                runtime::Severity::Critical => Severity::Critical,
            },
            title: alert.title.to_owned(),
            detail: Detail::new(alert.detail),
            at,
            seq: None,
        }
    }
}
