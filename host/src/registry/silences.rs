//! Silences, as Alertmanager has them: a tenant mutes the alerts that match
//! (by rule, bucket and alert key) from a start to an end, saying who and
//! why. A silenced alert is not lost: it is stored and published like any
//! other, marked `silenced_by` with the silence's id, so the alert log and
//! the stream keep the whole history and a notifier skips it.
//!
//! Silences are registry documents (`silence/{tenant}/{id}`), so every host
//! follows them as it follows rules; each host keeps the tenants' silences
//! compiled in a [`Silences`] the engine consults as it commits alerts
//! (which alerts a silence matches is [`crate::alert::silences`]'). This
//! file owns what a request may ask for and the documents' life: created,
//! listed, pruned once ended, deleted.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{Expect, StoreError};
use super::update::Update;
use super::{Clash, Missing, Registry, RegistryError, decode, encode, validate_tenant};
use crate::alert::silences::{Matchers, Silence, Silences, millis};
use crate::auth::{self, Caller};
use crate::timestamp::{format_rfc3339, now_rfc3339, parse_rfc3339 as parse_time};

/// Silences a tenant may keep, ended ones included.
pub const MAX_SILENCES: usize = 1_000;
/// How long an ended silence stays listed before a new one prunes it.
pub const KEEP_ENDED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest matcher value, comment or author.
pub const MAX_TEXT_BYTES: usize = 1_024;

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

fn silence_key(tenant: &str, id: &str) -> String {
    format!("silence/{tenant}/{id}")
}

impl Registry {
    /// The tenants' silences, as the engine marks alerts with them.
    pub(crate) fn silences(&self) -> Arc<Silences> {
        self.silences.clone()
    }

    /// Keep a new silence for `tenant`; ended ones older than
    /// [`KEEP_ENDED`] go.
    pub(crate) async fn create_silence(
        &self,
        tenant: &str,
        new: NewSilence,
        by: &Caller,
        now_ms: i64,
    ) -> Result<SilenceView, RegistryError> {
        validate_tenant(tenant)?;
        let id = auth::new_token().0;
        // The host's clock, which also decides whether alerts are silenced.
        let now = format_rfc3339(now_ms).unwrap_or_else(now_rfc3339);
        let silence = new.into_silence(tenant, id.clone(), by.name(), &now)?;
        let stale_before = now_ms.saturating_sub(KEEP_ENDED.as_millis() as i64);
        let (stale, kept): (Vec<_>, Vec<_>) = self
            .silence_list(tenant)
            .into_iter()
            .partition(|s| SilenceView::new(s.clone(), stale_before).state == "expired");
        for old in stale {
            let key = silence_key(tenant, &old.id);
            if let Some(doc) = self.store.get(&key).await? {
                match self.store.write(&key, None, Expect::At(doc.revision)).await {
                    // Another host pruned or deleted it first.
                    Ok(_) | Err(StoreError::Conflict) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if kept.len() >= MAX_SILENCES {
            return Err(RegistryError::Conflict(Clash::TooManySilences {
                tenant: tenant.to_owned(),
                kept: kept.len(),
            }));
        }
        self.store
            .write(
                &silence_key(tenant, &id),
                Some(&encode(&silence)),
                Expect::Absent,
            )
            .await?;
        self.refresh().await?;
        Ok(SilenceView::new(silence, now_ms))
    }

    /// `tenant`'s silences, ended ones too, by start.
    pub(crate) fn silence_views(&self, tenant: &str, now_ms: i64) -> Vec<SilenceView> {
        self.silence_list(tenant)
            .into_iter()
            .map(|s| SilenceView::new(s, now_ms))
            .collect()
    }

    fn silence_list(&self, tenant: &str) -> Vec<Silence> {
        let view = self.view.read().expect("view lock");
        let mut list: Vec<Silence> = view
            .silences
            .get(tenant)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| (&a.starts_at, &a.id).cmp(&(&b.starts_at, &b.id)));
        list
    }

    /// Remove a silence of `tenant`: the alerts it matched are published
    /// unmarked from then on, on every host within [`FOLLOW_EVERY`].
    pub(crate) async fn delete_silence(
        &self,
        tenant: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<SilenceView, RegistryError> {
        let silence = self
            .update(&silence_key(tenant, id), |stored| {
                let Some(doc) = stored else {
                    return Err(RegistryError::NotFound(Missing::Silence {
                        tenant: tenant.to_owned(),
                        id: id.to_owned(),
                    }));
                };
                Ok(Update::Delete(decode::<Silence>(&doc.value)?))
            })
            .await?;
        self.refresh().await?;
        Ok(SilenceView::new(silence, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{AlertRecord, Origin, Status};

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
