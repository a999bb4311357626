//! What a rule can do besides changing its state: raise and resolve alerts,
//! ask for a timer, forget its bucket.

use std::borrow::Cow;

use crate::abi;

/// How urgent an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

/// An alert to raise or resolve. Its key identifies it within the bucket:
/// resolving uses the key it fired with.
///
/// Key and title may be borrowed (a constant, a field of an event) or owned
/// (`format!`): borrowing saves an allocation per alert.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert<'a> {
    key: Cow<'a, str>,
    firing: bool,
    severity: Severity,
    title: Cow<'a, str>,
    /// JSON text; empty stands for `{}`.
    detail: Vec<u8>,
}

impl<'a> Alert<'a> {
    /// A firing alert.
    pub fn firing(key: impl Into<Cow<'a, str>>, title: impl Into<Cow<'a, str>>) -> Self {
        Alert {
            key: key.into(),
            firing: true,
            severity: Severity::default(),
            title: title.into(),
            detail: Vec::new(),
        }
    }

    /// The resolution of the alert that fired with `key`.
    pub fn resolved(key: impl Into<Cow<'a, str>>, title: impl Into<Cow<'a, str>>) -> Self {
        Alert {
            firing: false,
            ..Alert::firing(key, title)
        }
    }

    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// Anything else worth telling: any serializable value (a
    /// `#[derive(Serialize)]` struct, a map, [`json!`](crate::json)), written
    /// as JSON. A value that cannot be serialized leaves `{}`.
    pub fn detail(mut self, detail: impl serde::Serialize) -> Self {
        self.detail.clear();
        if crate::json::write_value(&mut self.detail, &detail).is_err() {
            self.detail.clear();
        }
        self
    }

    /// Add one field to the detail object, written straight to JSON: the
    /// cheapest way to build a detail, with no intermediate map.
    ///
    /// ```
    /// # use tocsin_rule::Alert;
    /// let alert = Alert::firing("stopped", "machine-03 stopped")
    ///     .field("machineId", "machine-03")
    ///     .field("at", 1_767_225_600_000_i64);
    /// assert_eq!(alert.detail_json(), r#"{"machineId":"machine-03","at":1767225600000}"#);
    /// ```
    ///
    /// A detail that is not an object (set with [`detail`](Self::detail)) is
    /// replaced; a value that cannot be serialized is left out.
    pub fn field(mut self, name: &str, value: impl serde::Serialize) -> Self {
        let detail = &mut self.detail;
        if !matches!((detail.first(), detail.last()), (Some(b'{'), Some(b'}'))) {
            detail.clear();
            // Room for a few fields: growing from empty would copy thrice.
            detail.reserve(64);
            detail.extend_from_slice(b"{}");
        }
        // Reopen the object: drop its `}`, separate from earlier fields.
        let end = detail.len() - 1;
        detail.truncate(end);
        if end > 1 {
            detail.push(b',');
        }
        crate::json::write_str(detail, name);
        detail.push(b':');
        if crate::json::write_value(detail, &value).is_err() {
            detail.truncate(end);
        }
        detail.push(b'}');
        self
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn is_firing(&self) -> bool {
        self.firing
    }

    pub fn title(&self) -> &str {
        &self.title
    }

    pub fn severity_level(&self) -> Severity {
        self.severity
    }

    /// The detail as JSON text.
    pub fn detail_json(&self) -> &str {
        match self.detail.as_slice() {
            [] => "{}",
            // SAFETY: the detail holds only what `json` wrote, whole: UTF-8.
            bytes => unsafe { std::str::from_utf8_unchecked(bytes) },
        }
    }

    /// Append to the call's alert columns.
    fn append_to(self, batch: &mut abi::AlertBatch) {
        batch.status.push(if self.firing {
            abi::AlertStatus::Firing
        } else {
            abi::AlertStatus::Resolved
        });
        batch.severity.push(match self.severity {
            Severity::Info => abi::Severity::Info,
            Severity::Warning => abi::Severity::Warning,
            Severity::Critical => abi::Severity::Critical,
        });
        for part in [&self.key, &self.title, self.detail_json()] {
            batch
                .spans
                .push(crate::event::push_span(&mut batch.text, part));
        }
    }

    /// The `index`-th alert of a call's columns (the native harness's view).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn from_batch(batch: &abi::AlertBatch, index: usize) -> Alert<'static> {
        let text = |n: usize| {
            let (start, end) = crate::event::span(batch.spans[3 * index + n]);
            batch.text[start..end].to_owned()
        };
        Alert {
            key: Cow::Owned(text(0)),
            firing: batch.status[index] == abi::AlertStatus::Firing,
            severity: match batch.severity[index] {
                abi::Severity::Info => Severity::Info,
                abi::Severity::Warning => Severity::Warning,
                abi::Severity::Critical => Severity::Critical,
            },
            title: Cow::Owned(text(1)),
            detail: text(2).into_bytes(),
        }
    }
}

/// Everything a rule reports that is not state: the host-facing side of one
/// `evaluate` or `on-timer` call.
pub struct Context<'a> {
    bucket: &'a str,
    now: i64,
    timer: abi::TimerChange,
    delete: bool,
    pub(crate) alerts: abi::AlertBatch,
}

impl<'a> Context<'a> {
    pub(crate) fn new(bucket: &'a str, now: i64) -> Self {
        Context {
            bucket,
            now,
            timer: abi::TimerChange::Keep,
            delete: false,
            alerts: abi::AlertBatch {
                status: Vec::new(),
                severity: Vec::new(),
                spans: Vec::new(),
                text: String::new(),
            },
        }
    }

    /// The bucket key: the manifest's `bucket_by` values joined by `/`.
    pub fn bucket(&self) -> &'a str {
        self.bucket
    }

    /// The time the host processes this batch, in epoch milliseconds.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Raise or resolve an alert. The host receives the call's alerts, in
    /// order, when it returns, and bounds how many and how large.
    pub fn emit(&mut self, alert: Alert<'_>) {
        let alerts = &mut self.alerts;
        if alerts.status.capacity() == 0 {
            // Most calls emit few alerts: start with room for several
            // rather than growing each column from empty.
            alerts.status.reserve(8);
            alerts.severity.reserve(8);
            alerts.spans.reserve(24);
            alerts.text.reserve(1024);
        }
        alert.append_to(alerts);
    }

    /// Have `on_timer` called for this bucket at `at` (epoch milliseconds),
    /// replacing any pending timer.
    pub fn set_timer(&mut self, at: i64) {
        self.timer = abi::TimerChange::Set(at);
    }

    /// Drop this bucket's pending timer.
    pub fn cancel_timer(&mut self) {
        self.timer = abi::TimerChange::Cancel;
    }

    /// Forget this bucket's state once the call returns.
    pub fn delete_state(&mut self) {
        self.delete = true;
    }

    pub(crate) fn timer(&self) -> abi::TimerChange {
        self.timer
    }

    pub(crate) fn deletes(&self) -> bool {
        self.delete
    }
}

/// A failure the rule reports, as opposed to a panic (which is a trap).
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// An event the rule cannot process; the host may dead-letter it.
    BadEvent { index: usize, reason: String },
    /// Any other failure.
    Failed(String),
}

impl Error {
    pub fn bad_event(event: &crate::Event<'_>, reason: impl Into<String>) -> Self {
        Error::BadEvent {
            index: event.index(),
            reason: reason.into(),
        }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        Error::Failed(reason.into())
    }

    pub(crate) fn into_abi(self) -> abi::RuleError {
        match self {
            Error::BadEvent { index, reason } => abi::RuleError::BadEvent(abi::BadEvent {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                reason,
            }),
            Error::Failed(reason) => abi::RuleError::Failed(reason),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::BadEvent { index, reason } => write!(f, "bad event #{index}: {reason}"),
            Error::Failed(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_build_one_json_object_escaping_where_needed() {
        let alert = Alert::firing("k", "t")
            .field("plain", "a\"b")
            .field("quote\"d", 1)
            .field("list", [1, 2]);
        let detail: serde_json::Value = serde_json::from_str(alert.detail_json()).unwrap();
        assert_eq!(
            detail,
            serde_json::json!({"plain": "a\"b", "quote\"d": 1, "list": [1, 2]})
        );
        assert_eq!(Alert::firing("k", "t").detail_json(), "{}");
    }

    #[test]
    fn a_field_after_a_non_object_detail_starts_a_new_object() {
        let alert = Alert::firing("k", "t").detail([1, 2]).field("n", 3);
        assert_eq!(alert.detail_json(), r#"{"n":3}"#);
        let alert = Alert::firing("k", "t")
            .detail(serde_json::json!({"a": 1}))
            .field("b", 2);
        assert_eq!(alert.detail_json(), r#"{"a":1,"b":2}"#);
    }

    #[test]
    fn a_value_that_cannot_be_serialized_is_left_out() {
        let bad: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let alert = Alert::firing("k", "t").field("a", 1).field("bad", bad);
        assert_eq!(alert.detail_json(), r#"{"a":1}"#);
    }
}
