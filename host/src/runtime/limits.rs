//! What one call into a rule may consume. Every bound has a reason.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Fuel for one call. About 4,800 fuel per seed-rule event and ~1.1·10¹⁰
/// fuel per second of guest time on a 2-core host (README, "Fuel against
/// time"): a batch of 1,000 events needs ~5·10⁶, so this leaves 20×
/// headroom and still stops a loop within ~10 ms.
pub const DEFAULT_FUEL_PER_CALL: u64 = 100_000_000;

/// Linear memory of one rule instance. Seed rules use ~1.2 MiB; 64 MiB fits
/// large per-bucket state while 1,000 instances stay within a host's memory.
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;

/// Wall-clock backstop for one call, for time spent outside fuel accounting
/// (host calls, memory growth). Fuel normally stops a guest long before.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(500);

/// Alerts one call may return: a batch of 1,000 events each raising one
/// alert fits. Checked when the call returns (a runaway loop runs out of
/// fuel or memory first); past it the call fails and its output is dropped.
pub const DEFAULT_MAX_ALERTS: u32 = 10_000;

/// Bytes of alerts (key, title, detail) one call may return.
pub const DEFAULT_MAX_ALERT_BYTES: usize = 4 << 20;

/// Encoded state of one bucket: below DynamoDB's 400 KB item limit, with room
/// for the item's other attributes.
pub const DEFAULT_MAX_STATE_BYTES: usize = 350 * 1024;

/// Log bytes (the `log` import plus stdout and stderr) one call may write.
pub const DEFAULT_MAX_LOG_BYTES: usize = 64 * 1024;

/// Wasm stack of one call: deep enough for serde on nested state, shallow
/// enough that runaway recursion is caught quickly.
pub const DEFAULT_MAX_WASM_STACK: usize = 512 * 1024;

/// The bounds of one call into a rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Fuel (roughly, Wasm instructions) one call may consume.
    pub fuel_per_call: u64,
    /// Largest linear memory of one rule instance, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock time one call may take, in milliseconds.
    pub deadline_ms: u64,
    /// Alerts one call may emit.
    pub max_alerts: u32,
    /// Total bytes of the alerts one call may emit.
    pub max_alert_bytes: usize,
    /// Largest encoded state of one bucket, in bytes.
    pub max_state_bytes: usize,
    /// Log bytes one call may write.
    pub max_log_bytes: usize,
    /// Wasm stack one call may use, in bytes.
    pub max_wasm_stack: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_call: DEFAULT_FUEL_PER_CALL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            deadline_ms: DEFAULT_DEADLINE.as_millis() as u64,
            max_alerts: DEFAULT_MAX_ALERTS,
            max_alert_bytes: DEFAULT_MAX_ALERT_BYTES,
            max_state_bytes: DEFAULT_MAX_STATE_BYTES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            max_wasm_stack: DEFAULT_MAX_WASM_STACK,
        }
    }
}

impl Limits {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}
