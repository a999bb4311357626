//! Every way a rule can fail, as a value naming tenant, rule and cause.
//!
//! Causes split in three: the component could not be loaded; the sandbox
//! stopped the call (a trap: the instance is discarded); the rule returned an
//! error itself (the instance stays healthy).

use std::time::Duration;

/// A failure of one tenant's rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rule `{rule}` of tenant `{tenant}`: {cause}")]
pub struct RuleError {
    pub tenant: String,
    /// `name@version` once the manifest is known (the name the tenant runs
    /// it under), else where it came from.
    pub rule: String,
    pub cause: Cause,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Cause {
    // Loading.
    #[error("not a valid rule component: {0}")]
    InvalidComponent(String),
    #[error(
        "imports `{import}`, which rules may not use (allowed: tocsin:rule/host, and wasi:cli, wasi:io, wasi:clocks, wasi:random, wasi:filesystem with nothing to open)"
    )]
    ForbiddenImport { import: String },
    #[error(
        "is built for {found}; this host runs tocsin:rule@{} components",
        super::WORLD_VERSION
    )]
    WrongVersion { found: String },
    #[error("cannot run under that name: {0}")]
    BadName(String),
    #[error("rejected its parameters: {0}")]
    BadParams(String),
    #[error("invalid manifest: {0}")]
    BadManifest(String),

    // The sandbox stopped the call.
    #[error("ran out of fuel (limit {limit} per call)")]
    OutOfFuel { limit: u64 },
    #[error("exceeded its memory limit of {limit_bytes} bytes")]
    OutOfMemory { limit_bytes: usize },
    #[error("overflowed its stack (limit {limit_bytes} bytes)")]
    StackOverflow { limit_bytes: usize },
    #[error("exceeded the deadline of {limit:?} per call")]
    Deadline { limit: Duration },
    #[error("produced too much {what} (limit {limit})")]
    OutputTooLarge { what: Output, limit: usize },
    #[error("tried to block ({what}): a rule may not sleep or wait; ask for a timer instead")]
    Blocked { what: String },
    #[error("panicked: {message}")]
    Panic { message: String },
    #[error("trapped: {0}")]
    Trap(String),

    // The rule reported a failure.
    #[error("rejected event #{index} of the batch: {reason}")]
    BadEvent { index: u32, reason: String },
    #[error("cannot read its stored state: {0}")]
    BadState(String),
    #[error("failed: {0}")]
    Failed(String),
    /// The rule's output breaks the contract (only a component not built
    /// with the SDK can do this).
    #[error("returned malformed output: {0}")]
    BadOutput(String),

    // The host gave up on it.
    /// Not called: the rule already failed this many calls in the batch
    /// (bisecting the events it fails on has a bounded cost).
    #[error("not run: the rule failed {calls} calls in this batch already")]
    TooManyFailures { calls: u32 },
}

/// Which output bound a call exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Alerts,
    AlertBytes,
    StateBytes,
    LogBytes,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Output::Alerts => "alerts",
            Output::AlertBytes => "alert bytes",
            Output::StateBytes => "state bytes",
            Output::LogBytes => "log bytes",
        })
    }
}

impl Cause {
    /// A fixed name for the kind of failure, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::InvalidComponent(_) => "invalid_component",
            Cause::ForbiddenImport { .. } => "forbidden_import",
            Cause::WrongVersion { .. } => "wrong_version",
            Cause::BadName(_) => "bad_name",
            Cause::BadParams(_) => "bad_params",
            Cause::BadManifest(_) => "bad_manifest",
            Cause::OutOfFuel { .. } => "out_of_fuel",
            Cause::OutOfMemory { .. } => "out_of_memory",
            Cause::StackOverflow { .. } => "stack_overflow",
            Cause::Deadline { .. } => "deadline",
            Cause::OutputTooLarge { .. } => "output_too_large",
            Cause::Blocked { .. } => "blocked",
            Cause::Panic { .. } => "panic",
            Cause::Trap(_) => "trap",
            Cause::BadEvent { .. } => "bad_event",
            Cause::BadState(_) => "bad_state",
            Cause::Failed(_) => "failed",
            Cause::BadOutput(_) => "bad_output",
            Cause::TooManyFailures { .. } => "too_many_failures",
        }
    }

    /// Whether the sandbox stopped the call midway: the instance is then
    /// discarded and never entered again. (Oversized state and alerts are
    /// refused after the guest returned, so they are not traps.)
    pub fn is_trap(&self) -> bool {
        match self {
            Cause::OutputTooLarge { what, .. } => *what == Output::LogBytes,
            Cause::OutOfFuel { .. }
            | Cause::OutOfMemory { .. }
            | Cause::StackOverflow { .. }
            | Cause::Deadline { .. }
            | Cause::Blocked { .. }
            | Cause::Panic { .. }
            | Cause::Trap(_) => true,
            _ => false,
        }
    }
}

/// Raised inside a host import or limiter to trap the guest with a cause the
/// runtime can recognise afterwards.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Stop(pub Cause);
