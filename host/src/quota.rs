//! What one tenant may use of a host: its quotas, set by the operator per
//! tenant over defaults from the config (exceeding one is answered with the
//! quota's name), its events-per-second budget, and its share of a batch's
//! time. Below the config, the registry and the engine, which all name
//! them.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::runtime::{
    DEFAULT_DEADLINE, DEFAULT_FUEL_PER_CALL, DEFAULT_MAX_ALERT_BYTES, DEFAULT_MAX_LOG_BYTES,
    DEFAULT_MEMORY_BYTES, Limits,
};

/// Rules one tenant may register: enough for a team's alerting, few enough
/// that 1,000 tenants fit one host's catalogue.
pub const DEFAULT_MAX_RULES: u32 = 50;
/// Bytes of one component: the example rules are 100–400 KB; a rule that
/// embeds a dependency tree can be a few MB.
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 8 << 20;
/// Events per second one tenant may post over HTTP: a hundred thousand
/// machines reporting every ten seconds, a tenth of one host's throughput.
pub const DEFAULT_EVENTS_PER_SECOND: u32 = 10_000;

/// How long a straggler may hold its batch at least, once the other
/// tenants are done: a tenth of a second holds no one's answer noticeably,
/// and keeps a batch whole (one commit) whenever its tenants are about as
/// fast as each other. Past it, the tenant is run apart
/// ([`crate::engine::apart`]).
pub const DEFAULT_FAIR_SHARE: Duration = Duration::from_millis(100);

/// One tenant's quotas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Rules the tenant may register (its rules from the host's config
    /// are not counted).
    pub rules: u32,
    /// Largest component the tenant may upload, in bytes.
    pub component_bytes: u64,
    /// Fuel one call into one of its rules may use.
    pub fuel_per_call: u64,
    /// Linear memory of one of its rule instances, in bytes (at most the
    /// host's `limits.memory_bytes`).
    pub memory_bytes: u64,
    /// Events per second the tenant may post over HTTP (a request over it
    /// is refused whole, with 429).
    pub events_per_second: u32,
    /// Wall-clock time one call may take, in milliseconds: the backstop
    /// for time outside fuel accounting.
    pub deadline_ms: u64,
    /// Bytes of alerts (keys, titles, details) one call may return.
    pub alert_bytes: u64,
    /// Log bytes (its `log` import, stdout and stderr) one call may write.
    pub log_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            rules: DEFAULT_MAX_RULES,
            component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            fuel_per_call: DEFAULT_FUEL_PER_CALL,
            memory_bytes: DEFAULT_MEMORY_BYTES as u64,
            events_per_second: DEFAULT_EVENTS_PER_SECOND,
            deadline_ms: DEFAULT_DEADLINE.as_millis() as u64,
            alert_bytes: DEFAULT_MAX_ALERT_BYTES as u64,
            log_bytes: DEFAULT_MAX_LOG_BYTES as u64,
        }
    }
}

impl Quotas {
    /// The call bounds of a rule of this tenant: the host's, with the
    /// tenant's fuel, memory (at most the host's: the pool's slots are that
    /// large), deadline, alert bytes and log bytes.
    pub fn limits(&self, host: &Limits) -> Limits {
        Limits {
            fuel_per_call: self.fuel_per_call,
            memory_bytes: (self.memory_bytes as usize).min(host.memory_bytes),
            deadline_ms: self.deadline_ms,
            max_alert_bytes: usize::try_from(self.alert_bytes).unwrap_or(usize::MAX),
            max_log_bytes: usize::try_from(self.log_bytes).unwrap_or(usize::MAX),
            ..host.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.component_bytes == 0
            || self.fuel_per_call == 0
            || self.memory_bytes == 0
            || self.events_per_second == 0
            || self.deadline_ms == 0
            || self.alert_bytes == 0
            || self.log_bytes == 0
        {
            return Err(
                "component_bytes, fuel_per_call, memory_bytes, events_per_second, deadline_ms, alert_bytes and log_bytes must be positive"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// A quota a request exceeded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant `{tenant}` is over its `{quota}` quota ({limit}): {detail}")]
pub struct QuotaExceeded {
    pub tenant: String,
    /// The quota's name, as in [`Quotas`].
    pub quota: &'static str,
    pub limit: u64,
    pub detail: String,
    /// Whether waiting helps (a rate), or the request must change.
    pub retry: bool,
}

/// Each tenant's events-per-second budget on this host.
#[derive(Default)]
pub struct EventRates {
    limiters: Mutex<HashMap<String, (u32, DefaultDirectRateLimiter)>>,
}

impl EventRates {
    /// Take `events` from `tenant`'s budget of `per_second`, or say why not.
    pub fn admit(&self, tenant: &str, events: usize, per_second: u32) -> Result<(), QuotaExceeded> {
        let Some(events) = NonZeroU32::new(events.min(u32::MAX as usize) as u32) else {
            return Ok(());
        };
        let exceeded = |detail: String| QuotaExceeded {
            tenant: tenant.to_owned(),
            quota: "events_per_second",
            limit: per_second as u64,
            detail,
            retry: true,
        };
        let rate = NonZeroU32::new(per_second).ok_or_else(|| exceeded("no events".into()))?;
        let mut limiters = self.limiters.lock().expect("rates lock");
        let (quota, limiter) = limiters
            .entry(tenant.to_owned())
            .or_insert_with(|| (per_second, RateLimiter::direct(Quota::per_second(rate))));
        if *quota != per_second {
            *quota = per_second;
            *limiter = RateLimiter::direct(Quota::per_second(rate));
        }
        match limiter.check_n(events) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(exceeded(format!(
                "{events} events would exceed it; retry in a second"
            ))),
            Err(_) => Err(exceeded(format!(
                "a request of {events} events is more than one second's worth; send smaller requests"
            ))),
        }
    }
}
