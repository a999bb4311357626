//! Silences, as Alertmanager has them: a tenant mutes the alerts that match
//! (by rule, bucket and alert key) from a start to an end, saying who and
//! why. A silenced alert is not lost: it is stored and published like any
//! other, marked `silenced_by` with the silence's id, so the alert log and
//! the stream keep the whole history and a notifier skips it.
//!
//! Silences are registry documents (`silence/{tenant}/{id}`), so every host
//! follows them as it follows rules; each host keeps the tenants' silences
//! compiled in a [`Silences`] the engine consults as it commits alerts.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

use super::RegistryError;
use crate::alert::AlertRecord;
use crate::engine::route::parse_rfc3339 as parse_time;

/// Silences a tenant may keep, ended ones included.
pub const MAX_SILENCES: usize = 1_000;
/// How long an ended silence stays listed before a new one prunes it.
pub const KEEP_ENDED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest matcher value, comment or author.
pub const MAX_TEXT_BYTES: usize = 1_024;

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

/// A silence as `POST /v1/tenants/{tenant}/silences` takes it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSilence {
    pub matchers: Matchers,
    /// RFC 3339; default: now.
    #[serde(default)]
    pub starts_at: Option<String>,
    /// RFC 3339, after `starts_at`.
    pub ends_at: String,
    /// Who silences (a person, a team).
    pub created_by: String,
    /// Why.
    pub comment: String,
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

/// A silence with where it stands now.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SilenceView {
    #[serde(flatten)]
    pub silence: Silence,
    /// `pending` (not started), `active` or `expired`, by this host's clock.
    pub state: String,
}

impl SilenceView {
    pub fn new(silence: Silence, now: i64) -> Self {
        let (starts, ends) = (millis(&silence.starts_at), millis(&silence.ends_at));
        let state = if now < starts {
            "pending"
        } else if now < ends {
            "active"
        } else {
            "expired"
        };
        SilenceView {
            silence,
            state: state.to_owned(),
        }
    }
}

/// Epoch milliseconds of a time already validated.
fn millis(rfc3339: &str) -> i64 {
    parse_time(rfc3339).unwrap_or(i64::MIN)
}

impl NewSilence {
    /// The silence to store, or what is wrong with the request.
    pub fn into_silence(
        self,
        tenant: &str,
        id: String,
        recorded_by: String,
        now: &str,
    ) -> Result<Silence, RegistryError> {
        let invalid = |message: String| Err(RegistryError::Invalid(message));
        let m = &self.matchers;
        if m.rule.is_none() && m.bucket.is_none() && m.key.is_none() {
            return invalid(
                "`matchers` needs at least one of `rule`, `bucket` and `key` (`{\"rule\": \"*\"}` silences every alert of the tenant)".to_owned(),
            );
        }
        for (name, value) in [
            ("matchers.rule", &m.rule),
            ("matchers.bucket", &m.bucket),
            ("matchers.key", &m.key),
        ] {
            if let Some(value) = value {
                if value.is_empty() {
                    return invalid(format!("`{name}` is empty: leave it out to match anything"));
                }
                if value.len() > MAX_TEXT_BYTES {
                    return invalid(format!("`{name}` is over {MAX_TEXT_BYTES} bytes"));
                }
            }
        }
        for (name, value) in [("created_by", &self.created_by), ("comment", &self.comment)] {
            if value.trim().is_empty() {
                return invalid(format!("`{name}` is required: say who silences and why"));
            }
            if value.len() > MAX_TEXT_BYTES {
                return invalid(format!("`{name}` is over {MAX_TEXT_BYTES} bytes"));
            }
        }
        let starts_at = self.starts_at.unwrap_or_else(|| now.to_owned());
        let Some(starts) = parse_time(&starts_at) else {
            return invalid(format!(
                "`starts_at`: `{starts_at}` is not an RFC 3339 time such as 2026-01-01T00:00:00Z"
            ));
        };
        let Some(ends) = parse_time(&self.ends_at) else {
            return invalid(format!(
                "`ends_at`: `{}` is not an RFC 3339 time such as 2026-01-01T00:00:00Z",
                self.ends_at
            ));
        };
        if ends <= starts {
            return invalid(format!(
                "`ends_at` ({}) must be after `starts_at` ({starts_at})",
                self.ends_at
            ));
        }
        Ok(Silence {
            id,
            tenant: tenant.to_owned(),
            matchers: self.matchers,
            starts_at,
            ends_at: self.ends_at,
            created_by: self.created_by,
            comment: self.comment,
            created_at: now.to_owned(),
            recorded_by,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Origin, Status};

    fn alert(rule: &str, bucket: &str, key: &str, at: i64) -> AlertRecord {
        let origin = Origin {
            tenant: "t",
            rule,
            bucket,
            position: "p",
        };
        let alert = crate::runtime::Alert {
            key,
            status: crate::runtime::AlertStatus::Firing,
            severity: crate::runtime::Severity::Info,
            title: "x",
            detail: "{}",
        };
        let record = AlertRecord::new(origin, "1.0.0", alert, 0, at);
        assert_eq!(record.status, Status::Firing);
        record
    }

    fn new(matchers: Matchers, starts: &str, ends: &str) -> NewSilence {
        NewSilence {
            matchers,
            starts_at: Some(starts.to_owned()),
            ends_at: ends.to_owned(),
            created_by: "ops".to_owned(),
            comment: "maintenance".to_owned(),
        }
    }

    const NOW: &str = "2026-01-01T00:00:00Z";
    /// 2026-01-01T00:00:00Z in epoch milliseconds.
    const T0: i64 = 1_767_225_600_000;

    #[test]
    fn a_silence_marks_the_alerts_it_matches_while_it_lasts() {
        let matchers = Matchers {
            rule: Some("flapping".to_owned()),
            bucket: Some("machine-0*".to_owned()),
            key: None,
        };
        let silence = new(matchers, NOW, "2026-01-01T01:00:00Z")
            .into_silence("t", "s1".to_owned(), "operator".to_owned(), NOW)
            .unwrap();
        let silences = Silences::default();
        silences.set("t", [&silence]);
        let mut alerts = [
            alert("flapping", "machine-03", "flapping-1", T0 + 1),
            alert("flapping", "pump-1", "flapping-1", T0 + 1),
            alert("other", "machine-03", "k", T0 + 1),
            alert("flapping", "machine-04", "flapping-1", T0 + 3_600_000),
            alert("flapping", "machine-05", "flapping-1", T0 - 1),
        ];
        let marked = silences.mark(alerts.iter_mut());
        assert_eq!(marked, [("t".to_owned(), "flapping".to_owned())]);
        let by: Vec<_> = alerts.iter().map(|a| a.silenced_by.as_deref()).collect();
        assert_eq!(by, [Some("s1"), None, None, None, None]);

        // Another tenant's alerts are not its business.
        let mut theirs = [alert("flapping", "machine-03", "flapping-1", T0 + 1)];
        theirs[0].tenant = "u".to_owned();
        assert!(silences.mark(theirs.iter_mut()).is_empty());

        silences.set("t", []);
        let mut again = [alert("flapping", "machine-03", "flapping-1", T0 + 1)];
        assert!(silences.mark(again.iter_mut()).is_empty());
    }

    #[test]
    fn a_bad_silence_is_refused_with_what_is_wrong() {
        let rule = Matchers {
            rule: Some("r".to_owned()),
            ..Matchers::default()
        };
        let error = |n: NewSilence| {
            n.into_silence("t", "id".to_owned(), "operator".to_owned(), NOW)
                .unwrap_err()
                .to_string()
        };
        assert!(
            error(new(Matchers::default(), NOW, "2026-01-02T00:00:00Z")).contains("at least one")
        );
        assert!(
            error(new(rule.clone(), NOW, "tomorrow"))
                .starts_with("`ends_at`: `tomorrow` is not an RFC 3339 time")
        );
        assert!(error(new(rule.clone(), NOW, NOW)).contains("must be after `starts_at`"));
        let mut anonymous = new(rule, NOW, "2026-01-02T00:00:00Z");
        anonymous.created_by = " ".to_owned();
        assert!(error(anonymous).starts_with("`created_by` is required"));
    }

    #[test]
    fn a_silence_is_pending_active_then_expired() {
        let silence = new(
            Matchers {
                key: Some("k".to_owned()),
                ..Matchers::default()
            },
            NOW,
            "2026-01-01T00:00:10Z",
        )
        .into_silence("t", "id".to_owned(), "operator".to_owned(), NOW)
        .unwrap();
        let state = |now| SilenceView::new(silence.clone(), now).state;
        assert_eq!(state(T0 - 1), "pending");
        assert_eq!(state(T0), "active");
        assert_eq!(state(T0 + 10_000), "expired");
    }
}
