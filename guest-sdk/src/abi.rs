//! The WIT types as the guest sees them.
//!
//! Inside a component these are the types `wit-bindgen` generates from
//! `wit/rule.wit`. Natively (unit tests, benchmarks) the same names are plain
//! Rust types with the same shape, so the rest of the SDK compiles unchanged on
//! both and a rule's logic runs natively exactly as it runs in the sandbox.

#[cfg(target_arch = "wasm32")]
pub use crate::bindings::tocsin::rule::types::*;

#[cfg(not(target_arch = "wasm32"))]
pub use native::*;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    #![allow(missing_docs)]

    pub type Timestamp = i64;

    #[derive(Clone, Debug, PartialEq)]
    pub enum Scalar {
        Null,
        Boolean(bool),
        Integer(i64),
        Float(f64),
        Text(String),
    }

    #[derive(Clone, Debug, PartialEq)]
    pub enum Test {
        Exists,
        Equals(Scalar),
        OneOf(Vec<Scalar>),
    }

    #[derive(Clone, Debug, PartialEq)]
    pub struct Condition {
        pub field: String,
        pub test: Test,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub enum EventTime {
        Arrival,
        Field(String),
    }

    #[derive(Clone, Debug, PartialEq)]
    pub struct Manifest {
        pub name: String,
        pub version: String,
        pub filter: Vec<Condition>,
        pub bucket_key: Vec<String>,
        pub fields: Vec<String>,
        pub raw_json: bool,
        pub event_time: EventTime,
        pub state_ttl_ms: Option<u64>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ValueKind {
        Absent,
        Null,
        Boolean,
        Integer,
        Float,
        Text,
        Json,
    }

    #[derive(Clone, Debug, PartialEq, Default)]
    pub struct EventBatch {
        pub times: Vec<Timestamp>,
        pub kinds: Vec<u8>,
        pub values: Vec<u64>,
        pub raw: Vec<u64>,
        pub text: String,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub enum StateChange {
        Unchanged,
        Set(Vec<u8>),
        Delete,
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum TimerChange {
        Keep,
        Set(Timestamp),
        Cancel,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub struct Outcome {
        pub state: StateChange,
        pub timer: TimerChange,
        pub alerts: AlertBatch,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum AlertStatus {
        Firing,
        Resolved,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Severity {
        Info,
        Warning,
        Critical,
    }

    #[derive(Clone, Debug, PartialEq, Default)]
    pub struct AlertBatch {
        pub status: Vec<AlertStatus>,
        pub severity: Vec<Severity>,
        pub spans: Vec<u64>,
        pub text: String,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub struct BadEvent {
        pub index: u32,
        pub reason: String,
    }

    #[derive(Clone, Debug, PartialEq)]
    pub enum RuleError {
        BadEvent(BadEvent),
        BadState(String),
        Failed(String),
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Level {
        Trace,
        Debug,
        Info,
        Warn,
        Error,
    }
}
