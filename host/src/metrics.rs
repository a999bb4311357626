//! What a host measures, for `GET /metrics` (Prometheus / OpenMetrics text,
//! encoded by `prometheus-client`).
//!
//! Per tenant and rule: events applied, alerts raised, fuel used, the time
//! a rule took over one batch (histogram), events it failed on by cause,
//! events dead-lettered, and whether it is quarantined. Per tenant, the
//! parts of batches it was run apart in (fair sharing). Host-wide, dead
//! letters by cause.
//! Host-wide: batch latency (histogram), commit time (histogram), events,
//! events of unknown tenants, live rule instances, registered rules, and
//! with the Kinesis source each held shard's lag behind the stream's tip
//! (`MillisBehindLatest`) and the leases held.
//!
//! Label cardinality is bounded: `tenant` × `rule` pairs beyond
//! [`MAX_RULE_SERIES`] are counted together under `tenant="_other",
//! rule="_other"` (a tenant's own series count as one pair); `cause` takes one of the fixed names of
//! [`Cause::kind`](crate::runtime::Cause::kind); `shard` is one per shard
//! the host holds.
//!
//! Figures are recorded when a batch commits: a batch run again after a
//! conflict counts once.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Tenant and rule pairs with series of their own: 1,000 tenants × 10
/// rules. Each pair costs six series; past this a scrape would grow
/// without bound as tenants come and go.
pub const MAX_RULE_SERIES: usize = 10_000;
/// The label values the pairs past [`MAX_RULE_SERIES`] share.
pub const OTHER: &str = "_other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    tenant: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    tenant: String,
    rule: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    shard: String,
}

/// 100 µs … ~6.5 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
}

/// What one rule did in one committed batch.
#[derive(Debug, Clone, Default)]
pub struct RuleTally {
    pub tenant: String,
    pub rule: String,
    pub events: u64,
    pub alerts: u64,
    pub fuel: u64,
    pub elapsed: Duration,
    /// The cause of each event the rule failed on.
    pub failures: Vec<&'static str>,
    /// Calls that succeeded and that failed (bisecting makes several per
    /// bucket).
    pub applied_calls: u32,
    pub failed_calls: u32,
    /// The last failure's reason.
    pub last_failure: Option<String>,
    /// Quarantined: not called in this batch.
    pub quarantined: bool,
    /// Lines for the rule's log.
    pub log: Vec<crate::rule_log::LogEntry>,
}

pub struct Metrics {
    registry: Registry,
    rule_events: Family<RuleLabels, Counter>,
    rule_alerts: Family<RuleLabels, Counter>,
    rule_alerts_silenced: Family<RuleLabels, Counter>,
    rule_fuel: Family<RuleLabels, Counter>,
    rule_seconds: Family<RuleLabels, Histogram, fn() -> Histogram>,
    rule_failures: Family<FailureLabels, Counter>,
    rule_dead_letters: Family<RuleLabels, Counter>,
    rule_quarantined: Family<RuleLabels, Gauge>,
    dead_letters: Family<CauseLabels, Counter>,
    tenant_apart: Family<TenantLabels, Counter>,
    batch_seconds: Histogram,
    commit_seconds: Histogram,
    events: Counter,
    unknown_tenant: Counter,
    live_instances: Gauge,
    registered_rules: Gauge,
    source_lag: Family<ShardLabels, Gauge>,
    leases: Gauge,
    series: Mutex<HashSet<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tocsin");
        let metrics = Metrics {
            rule_events: Family::default(),
            rule_alerts: Family::default(),
            rule_alerts_silenced: Family::default(),
            rule_fuel: Family::default(),
            rule_seconds: Family::new_with_constructor(seconds_histogram),
            rule_failures: Family::default(),
            rule_dead_letters: Family::default(),
            rule_quarantined: Family::default(),
            dead_letters: Family::default(),
            tenant_apart: Family::default(),
            batch_seconds: seconds_histogram(),
            commit_seconds: seconds_histogram(),
            events: Counter::default(),
            unknown_tenant: Counter::default(),
            live_instances: Gauge::default(),
            registered_rules: Gauge::default(),
            source_lag: Family::default(),
            leases: Gauge::default(),
            series: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rule_events",
            "Events a rule applied, per tenant and rule",
            metrics.rule_events.clone(),
        );
        registry.register(
            "rule_alerts",
            "Alerts a rule raised, per tenant and rule",
            metrics.rule_alerts.clone(),
        );
        registry.register(
            "rule_alerts_silenced",
            "Alerts a rule raised that a silence of its tenant matched (kept and published, marked silenced_by), per tenant and rule",
            metrics.rule_alerts_silenced.clone(),
        );
        registry.register(
            "rule_fuel",
            "Fuel a rule used, per tenant and rule",
            metrics.rule_fuel.clone(),
        );
        registry.register(
            "rule_batch_seconds",
            "Time a rule took over one batch (all its bucket calls), per tenant and rule",
            metrics.rule_seconds.clone(),
        );
        registry.register(
            "rule_failures",
            "Events a rule failed on (each dead-lettered), per tenant, rule and cause",
            metrics.rule_failures.clone(),
        );
        registry.register(
            "rule_dead_letters",
            "Events a rule did not apply, dead-lettered, per tenant and rule",
            metrics.rule_dead_letters.clone(),
        );
        registry.register(
            "rule_quarantined",
            "1 while a rule is quarantined on this host (its events are dead-lettered without calling it)",
            metrics.rule_quarantined.clone(),
        );
        registry.register(
            "dead_letters",
            "Dead letters kept, by cause (a rule's failure kind, quarantined, behind (a tenant too far behind while run apart), or for records from a stream: malformed, no_tenant, too_large, unknown_tenant, event_time, bucket_key)",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "tenant_parts_apart",
            "Parts of batches a tenant was run apart in: its rules took more than their share of a batch's time (or it was still catching up)",
            metrics.tenant_apart.clone(),
        );
        registry.register(
            "batch_seconds",
            "Time from the start of a batch's rules to its commit",
            metrics.batch_seconds.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time one durable commit took",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "events",
            "Events in committed batches",
            metrics.events.clone(),
        );
        registry.register(
            "unknown_tenant_events",
            "Events of tenants without rules (rejected)",
            metrics.unknown_tenant.clone(),
        );
        registry.register(
            "live_instances",
            "Rule instances alive (idle ones are dropped)",
            metrics.live_instances.clone(),
        );
        registry.register(
            "registered_rules",
            "Rules this host serves (from the config and the registry)",
            metrics.registered_rules.clone(),
        );
        registry.register(
            "source_lag_milliseconds",
            "How far behind the stream's tip each held shard was at its last read (Kinesis MillisBehindLatest)",
            metrics.source_lag.clone(),
        );
        registry.register(
            "leases",
            "Shard leases this host holds",
            metrics.leases.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    fn labels(&self, tenant: &str, rule: &str) -> RuleLabels {
        let mut series = self.series.lock().expect("series lock");
        let key = (tenant.to_owned(), rule.to_owned());
        if series.contains(&key) || series.len() < MAX_RULE_SERIES {
            series.insert(key);
            RuleLabels {
                tenant: tenant.to_owned(),
                rule: rule.to_owned(),
            }
        } else {
            RuleLabels {
                tenant: OTHER.to_owned(),
                rule: OTHER.to_owned(),
            }
        }
    }

    /// Alerts a silence matched, by `(tenant, rule)`.
    pub fn silenced(&self, alerts: &[(String, String)]) {
        for (tenant, rule) in alerts {
            self.rule_alerts_silenced
                .get_or_create(&self.labels(tenant, rule))
                .inc();
        }
    }

    /// A batch committed: its rules' figures, and how long it took.
    pub fn committed(
        &self,
        tallies: &[RuleTally],
        dead_letters: &[crate::sink::dead_letters::DeadLetter],
        events: u64,
        unknown_tenant: u64,
        batch: Duration,
        commit: Duration,
    ) {
        for tally in tallies {
            let labels = self.labels(&tally.tenant, &tally.rule);
            self.rule_events.get_or_create(&labels).inc_by(tally.events);
            self.rule_alerts.get_or_create(&labels).inc_by(tally.alerts);
            self.rule_fuel.get_or_create(&labels).inc_by(tally.fuel);
            self.rule_seconds
                .get_or_create(&labels)
                .observe(tally.elapsed.as_secs_f64());
            for cause in &tally.failures {
                self.rule_failures
                    .get_or_create(&FailureLabels {
                        tenant: labels.tenant.clone(),
                        rule: labels.rule.clone(),
                        cause: (*cause).to_owned(),
                    })
                    .inc();
            }
        }
        let mut per_rule: std::collections::HashMap<(&str, &str), u64> = Default::default();
        for letter in dead_letters {
            self.dead_letters
                .get_or_create(&CauseLabels {
                    cause: letter.cause.clone(),
                })
                .inc();
            if let (Some(tenant), Some(rule)) = (&letter.tenant, &letter.rule) {
                *per_rule.entry((tenant, rule)).or_default() += 1;
            }
        }
        for ((tenant, rule), count) in per_rule {
            let labels = self.labels(tenant, rule);
            self.rule_dead_letters.get_or_create(&labels).inc_by(count);
        }
        self.events.inc_by(events);
        self.unknown_tenant.inc_by(unknown_tenant);
        self.batch_seconds.observe(batch.as_secs_f64());
        self.commit_seconds.observe(commit.as_secs_f64());
    }

    /// A tenant's events of a batch were run apart from it.
    pub fn ran_apart(&self, tenant: &str) {
        let labels = self.labels(tenant, "");
        self.tenant_apart
            .get_or_create(&TenantLabels {
                tenant: labels.tenant,
            })
            .inc();
    }

    /// A shard read: how far behind the tip it is.
    pub fn source_lag(&self, shard: &str, millis: i64) {
        self.source_lag
            .get_or_create(&ShardLabels {
                shard: shard.to_owned(),
            })
            .set(millis);
    }

    /// A shard this host no longer holds has no lag of its own.
    pub fn shard_released(&self, shard: &str) {
        self.source_lag.remove(&ShardLabels {
            shard: shard.to_owned(),
        });
    }

    /// The text a scrape gets, with the gauges read now.
    pub fn encode(
        &self,
        live_instances: usize,
        registered_rules: usize,
        leases: Option<usize>,
        quarantined: &[(String, String)],
    ) -> String {
        self.rule_quarantined.clear();
        for (tenant, rule) in quarantined {
            self.rule_quarantined
                .get_or_create(&self.labels(tenant, rule))
                .set(1);
        }
        self.live_instances.set(live_instances as i64);
        self.registered_rules.set(registered_rules as i64);
        self.leases.set(leases.unwrap_or(0) as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_series_past_the_bound_share_one_label_pair() {
        let metrics = Metrics::new();
        let tallies: Vec<RuleTally> = (0..=MAX_RULE_SERIES)
            .map(|i| RuleTally {
                tenant: format!("t{i}"),
                rule: "r".to_owned(),
                events: 1,
                ..RuleTally::default()
            })
            .collect();
        metrics.committed(&tallies, &[], 0, 0, Duration::ZERO, Duration::ZERO);
        metrics.committed(
            &tallies[MAX_RULE_SERIES..],
            &[],
            0,
            0,
            Duration::ZERO,
            Duration::ZERO,
        );
        let text = metrics.encode(0, 0, None, &[]);
        assert!(text.contains("tocsin_rule_events_total{tenant=\"t0\",rule=\"r\"} 1\n"));
        assert!(
            text.contains("tocsin_rule_events_total{tenant=\"_other\",rule=\"_other\"} 2\n"),
            "the pair past the bound, twice"
        );
        assert!(!text.contains(&format!("tenant=\"t{MAX_RULE_SERIES}\"")));
    }
}
