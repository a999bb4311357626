//! What a rule can do besides changing its state: raise and resolve alerts,
//! ask for a timer, forget its bucket.

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
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    key: String,
    firing: bool,
    severity: Severity,
    title: String,
    detail: String,
}

impl Alert {
    /// A firing alert.
    pub fn firing(key: impl Into<String>, title: impl Into<String>) -> Self {
        Alert {
            key: key.into(),
            firing: true,
            severity: Severity::default(),
            title: title.into(),
            detail: "{}".to_owned(),
        }
    }

    /// The resolution of the alert that fired with `key`.
    pub fn resolved(key: impl Into<String>, title: impl Into<String>) -> Self {
        Alert {
            firing: false,
            ..Alert::firing(key, title)
        }
    }

    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// Anything else worth telling, as a JSON value.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = serde_json::to_string(&detail).unwrap_or_else(|_| "{}".to_owned());
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
        &self.detail
    }

    #[cfg(target_arch = "wasm32")]
    fn into_abi(self) -> abi::Alert {
        abi::Alert {
            key: self.key,
            status: if self.firing {
                abi::AlertStatus::Firing
            } else {
                abi::AlertStatus::Resolved
            },
            severity: match self.severity {
                Severity::Info => abi::Severity::Info,
                Severity::Warning => abi::Severity::Warning,
                Severity::Critical => abi::Severity::Critical,
            },
            title: self.title,
            detail: self.detail,
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
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) alerts: Vec<Alert>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(bucket: &'a str, now: i64) -> Self {
        Context {
            bucket,
            now,
            timer: abi::TimerChange::Keep,
            delete: false,
            #[cfg(not(target_arch = "wasm32"))]
            alerts: Vec::new(),
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

    /// Raise or resolve an alert. The host bounds how many and how large.
    pub fn emit(&mut self, alert: Alert) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::tocsin::rule::host::emit_alert(&alert.into_abi());
        #[cfg(not(target_arch = "wasm32"))]
        self.alerts.push(alert);
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
