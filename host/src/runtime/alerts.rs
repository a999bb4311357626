//! The alerts of one call as the rule returned them: columns over one text
//! (see `alert-batch` in `wit/rule.wit`), checked once against the call's
//! bounds and read in place, without a copy per alert.

use super::bindings::{AlertBatch, AlertStatus, Severity};
use super::error::{Cause, Output};
use super::limits::Limits;

/// The alerts of one call, in the order the rule emitted them.
#[derive(Debug, Clone)]
pub struct Alerts {
    batch: AlertBatch,
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
    /// Check a batch against the bounds of one call and its own shape.
    pub(crate) fn check(batch: AlertBatch, limits: &Limits) -> Result<Self, Cause> {
        let count = batch.status.len();
        if count > limits.max_alerts as usize {
            return Err(Cause::OutputTooLarge {
                what: Output::Alerts,
                limit: limits.max_alerts as usize,
            });
        }
        if batch.text.len() > limits.max_alert_bytes {
            return Err(Cause::OutputTooLarge {
                what: Output::AlertBytes,
                limit: limits.max_alert_bytes,
            });
        }
        if batch.severity.len() != count || batch.spans.len() != 3 * count {
            return Err(Cause::BadOutput(format!(
                "alert batch has {count} statuses, {} severities and {} spans (3 per alert)",
                batch.severity.len(),
                batch.spans.len()
            )));
        }
        for &bits in &batch.spans {
            let (start, end) = span(bits);
            if !(start <= end
                && batch.text.is_char_boundary(start)
                && batch.text.is_char_boundary(end))
            {
                return Err(Cause::BadOutput(format!(
                    "alert batch span {start}..{end} is not within its {}-byte text",
                    batch.text.len()
                )));
            }
        }
        Ok(Alerts { batch })
    }

    pub fn len(&self) -> usize {
        self.batch.status.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.status.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<Alert<'_>> {
        let batch = &self.batch;
        let text = |n: usize| {
            let (start, end) = span(batch.spans[3 * index + n]);
            &batch.text[start..end]
        };
        Some(Alert {
            status: *batch.status.get(index)?,
            severity: batch.severity[index],
            key: text(0),
            title: text(1),
            // An empty detail is `{}`, as the contract says.
            detail: match text(2) {
                "" => "{}",
                detail => detail,
            },
        })
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Alert<'_>> {
        (0..self.len()).map(|index| self.get(index).expect("index below len"))
    }
}

/// A span's byte range: `offset << 32 | length`.
fn span(bits: u64) -> (usize, usize) {
    let start = (bits >> 32) as usize;
    (start, start + (bits & 0xffff_ffff) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(spans: Vec<u64>, text: &str) -> AlertBatch {
        AlertBatch {
            status: vec![AlertStatus::Firing],
            severity: vec![Severity::Info],
            spans,
            text: text.to_owned(),
        }
    }

    #[test]
    fn reads_each_alert_from_its_spans() {
        let alerts = Alerts::check(
            batch(vec![2, (2 << 32) | 5, (7 << 32) | 2], "k1title{}"),
            &Limits::default(),
        )
        .unwrap();
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
    fn an_empty_detail_reads_as_an_empty_object() {
        let alerts =
            Alerts::check(batch(vec![2, 2 << 32, 2 << 32], "k1"), &Limits::default()).unwrap();
        assert_eq!(alerts.get(0).unwrap().detail, "{}");
    }

    #[test]
    fn refuses_spans_outside_the_text_or_inside_a_character() {
        let err =
            Alerts::check(batch(vec![2, 2, (1 << 32) | 9], "k1"), &Limits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "returned malformed output: alert batch span 1..10 is not within its 2-byte text"
        );
        let err = Alerts::check(batch(vec![1, 0, 0], "é"), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("span 0..1"), "{err}");
        let err = Alerts::check(batch(vec![0, 0], ""), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("3 per alert"), "{err}");
    }

    #[test]
    fn bounds_count_and_bytes() {
        let limits = Limits {
            max_alerts: 0,
            ..Limits::default()
        };
        let err = Alerts::check(batch(vec![0, 0, 0], ""), &limits).unwrap_err();
        assert_eq!(err.to_string(), "produced too much alerts (limit 0)");
        let limits = Limits {
            max_alert_bytes: 3,
            ..Limits::default()
        };
        let err = Alerts::check(batch(vec![0, 0, 0], "abcd"), &limits).unwrap_err();
        assert_eq!(err.to_string(), "produced too much alert bytes (limit 3)");
    }
}
