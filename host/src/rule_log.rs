//! What each rule logged lately on this host: the lines it wrote (its `log`
//! import, stdout, stderr) and the host wrote about it (why a call failed,
//! a quarantine), kept bounded per rule and per host for its tenant to
//! read. Below the engine, which writes them, and the metrics, which count
//! the rules' tallies that carry them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Lines kept per rule: the newest are kept.
pub const LOG_LINES_PER_RULE: usize = 200;
/// Bytes kept per rule.
pub const LOG_BYTES_PER_RULE: usize = 32 * 1024;
/// Longest message kept as it is; a longer one is cut and ends in `…`.
pub const MAX_LOG_MESSAGE_BYTES: usize = 2 * 1024;
/// Bytes kept for all rules of the host: past it, the rule that logged
/// least recently loses its lines.
pub const LOG_BYTES_PER_HOST: usize = 64 << 20;

/// One line a rule wrote (its `log` import, stdout, stderr) or the host
/// wrote about it (why a call failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogEntry {
    /// Processing time of the batch, epoch milliseconds.
    pub at: i64,
    /// `trace` … `error`, or `stdout` for what the rule printed.
    pub level: String,
    /// `rule` (it wrote this) or `host` (the host wrote it about the rule).
    pub source: String,
    pub bucket: String,
    pub message: String,
}

impl LogEntry {
    pub fn new(at: i64, level: &str, source: &'static str, bucket: &str, message: &str) -> Self {
        let mut message = message.trim_end().to_owned();
        if message.len() > MAX_LOG_MESSAGE_BYTES {
            let mut cut = MAX_LOG_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        LogEntry {
            at,
            level: level.to_owned(),
            source: source.to_owned(),
            bucket: bucket.to_owned(),
            message,
        }
    }

    fn bytes(&self) -> usize {
        self.message.len() + self.bucket.len() + 32
    }
}

#[derive(Default)]
struct RuleLog {
    lines: VecDeque<LogEntry>,
    bytes: usize,
    /// When it last logged, for eviction.
    touched: u64,
}

/// Every rule's recent log lines on this host.
#[derive(Default)]
pub struct RuleLogs {
    inner: Mutex<LogsInner>,
}

#[derive(Default)]
struct LogsInner {
    rules: HashMap<(String, String), RuleLog>,
    bytes: usize,
    clock: u64,
}

impl RuleLogs {
    /// Keep `lines` of `tenant`'s `rule`, dropping its oldest past the
    /// bounds.
    pub fn append(&self, tenant: &str, rule: &str, lines: Vec<LogEntry>) {
        if lines.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().expect("rule log lock");
        inner.clock += 1;
        let clock = inner.clock;
        let key = (tenant.to_owned(), rule.to_owned());
        let log = inner.rules.entry(key).or_default();
        log.touched = clock;
        let before = log.bytes;
        for line in lines {
            log.bytes += line.bytes();
            log.lines.push_back(line);
        }
        while log.lines.len() > LOG_LINES_PER_RULE || log.bytes > LOG_BYTES_PER_RULE {
            let Some(old) = log.lines.pop_front() else {
                break;
            };
            log.bytes -= old.bytes();
        }
        let after = log.bytes;
        inner.bytes = inner.bytes + after - before;
        while inner.bytes > LOG_BYTES_PER_HOST {
            let Some(oldest) = inner
                .rules
                .iter()
                .min_by_key(|(_, log)| log.touched)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            let dropped = inner.rules.remove(&oldest).map_or(0, |log| log.bytes);
            inner.bytes -= dropped;
        }
    }

    /// The rule's kept lines, oldest first.
    pub fn lines(&self, tenant: &str, rule: &str) -> Vec<LogEntry> {
        let inner = self.inner.lock().expect("rule log lock");
        inner
            .rules
            .get(&(tenant.to_owned(), rule.to_owned()))
            .map(|log| log.lines.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_keep_the_newest_lines_within_their_bounds() {
        let logs = RuleLogs::default();
        let lines = (0..LOG_LINES_PER_RULE + 5)
            .map(|n| LogEntry::new(n as i64, "info", "rule", "b", &format!("line {n}")))
            .collect();
        logs.append("t", "r", lines);
        let kept = logs.lines("t", "r");
        assert_eq!(kept.len(), LOG_LINES_PER_RULE);
        assert_eq!(kept[0].message, "line 5");
        let long = LogEntry::new(0, "info", "rule", "b", &"é".repeat(MAX_LOG_MESSAGE_BYTES));
        assert!(long.message.len() <= MAX_LOG_MESSAGE_BYTES + '…'.len_utf8());
        assert!(long.message.ends_with('…'));
    }
}
