//! Keeping one tenant's failing rule from costing anyone else: rules that
//! keep failing are quarantined with exponential backoff. (What rules log,
//! and why their calls failed, is kept in [`crate::rule_log`].)
//!
//! Quarantine: a batch in which a rule was called and applied nothing (every
//! call failed, even bisected down to single events) is a *failing batch*.
//! After [`QUARANTINE_AFTER`] failing batches in a row the rule is
//! quarantined for [`FIRST_BACKOFF`], doubling each time up to
//! [`MAX_BACKOFF`]: its events are dead-lettered without calling it. When the
//! time is up it runs again on probation: a batch that applies anything
//! clears it; one more failing batch quarantines it again, for twice as
//! long. An operator can resume it at once. Each host decides from the
//! batches it runs; a resume reaches every host through the registry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::timestamp;

/// Failing batches in a row that quarantine a rule: one is a bad event the
/// rule rejects whole, three in a row is a rule that fails on everything.
pub const QUARANTINE_AFTER: u32 = 3;
/// The first quarantine: long enough that a rule failing on everything
/// stops costing calls, short enough that a transient cause heals quickly.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// The longest quarantine: a rule keeps being tried once an hour.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A rule's quarantine as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quarantine {
    /// When it runs again on probation, epoch milliseconds.
    pub until_ms: i64,
    /// The same, RFC 3339.
    pub until: String,
    /// Quarantines in a row (each twice as long as the one before).
    pub times: u32,
    /// Failing batches in a row.
    pub failing_batches: u32,
    /// The failure of its last failing batch.
    pub reason: String,
}

#[derive(Debug, Default)]
struct Health {
    failing_batches: u32,
    times: u32,
    until_ms: Option<i64>,
    reason: String,
}

impl Health {
    fn view(&self) -> Option<Quarantine> {
        let until_ms = self.until_ms?;
        Some(Quarantine {
            until_ms,
            until: timestamp::rfc3339(until_ms),
            times: self.times,
            failing_batches: self.failing_batches,
            reason: self.reason.clone(),
        })
    }
}

/// The backoff of the `times`-th quarantine in a row.
pub fn backoff(times: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1u32 << times.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF)
}

/// Quarantines of this host's rules: tenant → rule → health. Only rules
/// that failed lately have an entry.
#[derive(Default)]
pub struct Quarantines {
    rules: Mutex<HashMap<String, HashMap<String, Health>>>,
}

impl Quarantines {
    /// The rule's quarantine if it is quarantined at `now`.
    pub fn active(&self, tenant: &str, rule: &str, now: i64) -> Option<Quarantine> {
        let rules = self.rules.lock().expect("quarantine lock");
        let health = rules.get(tenant)?.get(rule)?;
        health.until_ms.filter(|&until| until > now)?;
        health.view()
    }

    /// The rule's quarantine, current or over but not yet cleared by a
    /// batch on probation.
    pub fn get(&self, tenant: &str, rule: &str) -> Option<Quarantine> {
        let rules = self.rules.lock().expect("quarantine lock");
        rules.get(tenant)?.get(rule)?.view()
    }

    /// A batch ran the rule: `applied` calls succeeded and `failed` failed
    /// (the last with `reason`). Returns the quarantine it now starts.
    pub fn observe(
        &self,
        tenant: &str,
        rule: &str,
        applied: u32,
        failed: u32,
        reason: Option<&str>,
        now: i64,
    ) -> Option<Quarantine> {
        let mut rules = self.rules.lock().expect("quarantine lock");
        if applied > 0 || failed == 0 {
            // Healthy (or not called): clear what it had.
            if let Some(tenant_rules) = rules.get_mut(tenant)
                && tenant_rules.remove(rule).is_some()
                && tenant_rules.is_empty()
            {
                rules.remove(tenant);
            }
            return None;
        }
        let health = rules
            .entry(tenant.to_owned())
            .or_default()
            .entry(rule.to_owned())
            .or_default();
        health.failing_batches += 1;
        if let Some(reason) = reason {
            health.reason = reason.to_owned();
        }
        if health.failing_batches < QUARANTINE_AFTER {
            return None;
        }
        health.times += 1;
        health.until_ms = Some(now.saturating_add(backoff(health.times).as_millis() as i64));
        health.view()
    }

    /// Lift the rule's quarantine and forget its failures; whether it had
    /// any.
    pub fn resume(&self, tenant: &str, rule: &str) -> bool {
        let mut rules = self.rules.lock().expect("quarantine lock");
        let Some(tenant_rules) = rules.get_mut(tenant) else {
            return false;
        };
        let had = tenant_rules.remove(rule).is_some();
        if tenant_rules.is_empty() {
            rules.remove(tenant);
        }
        had
    }

    /// Every rule quarantined at `now`, for the metrics.
    pub fn quarantined(&self, now: i64) -> Vec<(String, String)> {
        let rules = self.rules.lock().expect("quarantine lock");
        rules
            .iter()
            .flat_map(|(tenant, rules)| {
                rules
                    .iter()
                    .filter(|(_, h)| h.until_ms.is_some_and(|u| u > now))
                    .map(|(rule, _)| (tenant.clone(), rule.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_failing_every_batch_is_quarantined_with_doubling_backoff_and_cleared_by_a_success() {
        let q = Quarantines::default();
        for now in [0, 1] {
            assert_eq!(q.observe("t", "r", 0, 2, Some("boom"), now), None);
        }
        let first = q.observe("t", "r", 0, 1, Some("boom"), 2).unwrap();
        assert_eq!(first.until_ms, 2 + 30_000);
        assert_eq!(first.times, 1);
        assert!(q.active("t", "r", 30_001).is_some());
        assert!(q.active("t", "r", 30_002).is_none(), "probation");
        // Failing on probation: twice as long.
        let second = q.observe("t", "r", 0, 1, Some("boom"), 40_000).unwrap();
        assert_eq!(second.until_ms, 40_000 + 60_000);
        assert_eq!(q.quarantined(50_000), [("t".to_owned(), "r".to_owned())]);
        // A batch that applies anything clears it.
        assert_eq!(q.observe("t", "r", 1, 1, None, 200_000), None);
        assert_eq!(q.get("t", "r"), None);
        assert_eq!(backoff(20), MAX_BACKOFF);
    }

    #[test]
    fn resume_lifts_a_quarantine_at_once() {
        let q = Quarantines::default();
        for now in 0..3 {
            q.observe("t", "r", 0, 1, Some("boom"), now);
        }
        assert!(q.active("t", "r", 10).is_some());
        assert!(q.resume("t", "r"));
        assert!(q.active("t", "r", 10).is_none());
        assert!(!q.resume("t", "r"));
    }
}
