//! The alerts of one call as the rule returned them, checked once against
//! the call's bounds and read in place.

use super::bindings::{self, AlertStatus, Severity};
use super::error::{Cause, Output};
use super::limits::Limits;

/// The alerts of one call, in the order the rule emitted them.
#[derive(Debug, Clone, Default)]
pub struct Alerts {
    alerts: Vec<bindings::Alert>,
}

/// One alert of a call, borrowed from its [`Alerts`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alert<'a> {
    /// Unique within the bucket.
    pub key: &'a str,
    pub status: AlertStatus,
    pub severity: Severity,
    pub title: &'a str,
    /// JSON text (the rule's claim: the host parses it when publishing).
    pub detail: &'a str,
}

impl Alerts {
    /// Check a call's alerts against the bounds of one call.
    pub(crate) fn check(alerts: Vec<bindings::Alert>, limits: &Limits) -> Result<Self, Cause> {
        if alerts.len() > limits.max_alerts as usize {
            return Err(Cause::OutputTooLarge {
                what: Output::Alerts,
                limit: limits.max_alerts as usize,
            });
        }
        let bytes: usize = alerts
            .iter()
            .map(|a| a.key.len() + a.title.len() + a.detail.len())
            .sum();
        if bytes > limits.max_alert_bytes {
            return Err(Cause::OutputTooLarge {
                what: Output::AlertBytes,
                limit: limits.max_alert_bytes,
            });
        }
        Ok(Alerts { alerts })
    }

    pub fn len(&self) -> usize {
        self.alerts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<Alert<'_>> {
        let alert = self.alerts.get(index)?;
        Some(Alert {
            key: &alert.key,
            status: alert.status,
            severity: alert.severity,
            title: &alert.title,
            detail: match alert.detail.as_str() {
                "" => "{}",
                detail => detail,
            },
        })
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Alert<'_>> {
        (0..self.len()).map(|index| self.get(index).expect("index below len"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(key: &str, title: &str, detail: &str) -> bindings::Alert {
        bindings::Alert {
            key: key.to_owned(),
            status: AlertStatus::Firing,
            severity: Severity::Info,
            title: title.to_owned(),
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn reads_each_alert_and_an_empty_detail_as_an_empty_object() {
        let alerts = Alerts::check(vec![alert("k1", "title", "")], &Limits::default()).unwrap();
        assert_eq!(alerts.len(), 1);
        let alert = alerts.get(0).unwrap();
        assert_eq!(
            (alert.key, alert.title, alert.detail),
            ("k1", "title", "{}")
        );
        assert_eq!(alerts.iter().count(), 1);
        assert!(alerts.get(1).is_none());
    }

    #[test]
    fn bounds_count_and_bytes() {
        let limits = Limits {
            max_alerts: 0,
            ..Limits::default()
        };
        let err = Alerts::check(vec![alert("", "", "")], &limits).unwrap_err();
        assert_eq!(err.to_string(), "produced too much alerts (limit 0)");
        let limits = Limits {
            max_alert_bytes: 3,
            ..Limits::default()
        };
        let err = Alerts::check(vec![alert("ab", "cd", "")], &limits).unwrap_err();
        assert_eq!(err.to_string(), "produced too much alert bytes (limit 3)");
    }
}
