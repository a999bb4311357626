//! Which alerts a silence mutes: a tenant's [`Silence`] matches alerts by
//! rule, bucket and alert key (values or `*`/`?` patterns) from a start to
//! an end. [`Silences`] holds every tenant's, compiled, and marks the
//! alerts they match (`silenced_by`) as the engine commits them. Where
//! silences are kept and how they are created is the registry's
//! (`registry::silences`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

use super::AlertRecord;
use crate::timestamp::parse_rfc3339;

/// Which alerts a silence matches: each given field must match (a value,
/// or a pattern where `*` is any run of characters and `?` any one); a
/// field left out matches anything. At least one is needed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Matchers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The alert's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A silence as stored and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Silence {
    pub id: String,
    pub tenant: String,
    pub matchers: Matchers,
    /// RFC 3339.
    pub starts_at: String,
    /// RFC 3339.
    pub ends_at: String,
    pub created_by: String,
    pub comment: String,
    /// RFC 3339.
    pub created_at: String,
    /// `operator`, or `token:<id>` of the tenant token that created it.
    pub recorded_by: String,
}

/// Epoch milliseconds of a time already validated.
pub(crate) fn millis(rfc3339: &str) -> i64 {
    parse_rfc3339(rfc3339).unwrap_or(i64::MIN)
}

/// One silence, ready to match.
struct Compiled {
    id: String,
    rule: Option<WildMatch>,
    bucket: Option<WildMatch>,
    key: Option<WildMatch>,
    starts: i64,
    ends: i64,
}

impl Compiled {
    fn new(silence: &Silence) -> Self {
        let pattern = |p: &Option<String>| p.as_deref().map(WildMatch::new);
        Compiled {
            id: silence.id.clone(),
            rule: pattern(&silence.matchers.rule),
            bucket: pattern(&silence.matchers.bucket),
            key: pattern(&silence.matchers.key),
            starts: millis(&silence.starts_at),
            ends: millis(&silence.ends_at),
        }
    }

    fn matches(&self, alert: &AlertRecord) -> bool {
        let field = |pattern: &Option<WildMatch>, value: &str| {
            pattern.as_ref().is_none_or(|p| p.matches(value))
        };
        (self.starts..self.ends).contains(&alert.at)
            && field(&self.rule, &alert.rule)
            && field(&self.bucket, &alert.bucket)
            && field(&self.key, &alert.key)
    }
}

/// Every tenant's silences on this host, as the engine checks alerts
/// against them.
#[derive(Default)]
pub struct Silences {
    by_tenant: RwLock<HashMap<String, Vec<Compiled>>>,
    /// Whether any tenant has one: the common case costs one load.
    any: AtomicBool,
}

impl Silences {
    /// `tenant`'s silences are now these.
    pub fn set<'a>(&self, tenant: &str, silences: impl IntoIterator<Item = &'a Silence>) {
        let compiled: Vec<Compiled> = silences.into_iter().map(Compiled::new).collect();
        let mut by_tenant = self.by_tenant.write().expect("silences lock");
        if compiled.is_empty() {
            by_tenant.remove(tenant);
        } else {
            by_tenant.insert(tenant.to_owned(), compiled);
        }
        self.any.store(!by_tenant.is_empty(), Ordering::Release);
    }

    /// Mark the alerts a silence of their tenant matches at their time
    /// (`silenced_by`, the silence that ends last); how many, per rule.
    pub fn mark<'a>(
        &self,
        alerts: impl IntoIterator<Item = &'a mut AlertRecord>,
    ) -> Vec<(String, String)> {
        let mut silenced = Vec::new();
        if !self.any.load(Ordering::Acquire) {
            return silenced;
        }
        let by_tenant = self.by_tenant.read().expect("silences lock");
        for alert in alerts {
            let Some(silences) = by_tenant.get(&alert.tenant) else {
                continue;
            };
            let silence = silences
                .iter()
                .filter(|s| s.matches(alert))
                .max_by_key(|s| s.ends);
            if let Some(silence) = silence {
                alert.silenced_by = Some(silence.id.clone());
                silenced.push((alert.tenant.clone(), alert.rule.clone()));
            }
        }
        silenced
    }
}
