//! Alerts appended to `alerts.ndjson`, one JSON record per line, in commit
//! order. The file's last line tells where a restart resumes, so an alert is
//! written once even when the outbox republishes it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{AlertSink, SinkError};
use crate::alert::AlertRecord;

pub struct FileSink {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// Highest `seq` already in the file.
    written: u64,
}

impl FileSink {
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let fail = |e: std::io::Error| SinkError(format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(fail)?;
        let written = last_seq(&mut file).map_err(fail)?;
        Ok(FileSink {
            path: path.to_owned(),
            inner: Mutex::new(Inner { file, written }),
        })
    }
}

/// The `seq` of the last complete line, read from the end of the file (a
/// long-running host's file is large). A torn last line (a crash mid-write)
/// is cut off, so appending resumes on a line boundary.
fn last_seq(file: &mut File) -> std::io::Result<u64> {
    const STEP: u64 = 64 * 1024;
    let mut start = file.metadata()?.len();
    let mut tail: Vec<u8> = Vec::new();
    loop {
        // Widen the window backwards until it holds the last complete line.
        let from = start.saturating_sub(STEP.max(tail.len() as u64));
        let mut chunk = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        start = from;
        let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
            if start == 0 {
                file.set_len(0)?;
                return Ok(0);
            }
            continue;
        };
        let line_start = tail[..end].iter().rposition(|&b| b == b'\n').map(|p| p + 1);
        if line_start.is_none() && start > 0 {
            continue;
        }
        file.set_len(start + end as u64 + 1)?;
        let line = &tail[line_start.unwrap_or(0)..end];
        return Ok(serde_json::from_slice::<AlertRecord>(line)
            .ok()
            .and_then(|record| record.seq)
            .unwrap_or(0));
    }
}

impl AlertSink for FileSink {
    fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        let mut inner = self.inner.lock().expect("file sink lock");
        let mut buffer = Vec::new();
        let mut written = inner.written;
        for alert in alerts {
            let seq = alert.seq.unwrap_or(0);
            if seq <= written {
                continue;
            }
            serde_json::to_writer(&mut buffer, alert).map_err(|e| SinkError(e.to_string()))?;
            buffer.push(b'\n');
            written = seq;
        }
        if buffer.is_empty() {
            return Ok(());
        }
        let fail = |e: std::io::Error| SinkError(format!("{}: {e}", self.path.display()));
        inner.file.write_all(&buffer).map_err(fail)?;
        inner.file.flush().map_err(fail)?;
        inner.written = written;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, title: &str) -> String {
        let json = serde_json::json!({
            "id": "x", "tenant": "t", "rule": "r", "rule_version": "1.0.0", "bucket": "",
            "key": "k", "status": "firing", "severity": "info", "title": title,
            "detail": null, "at": 0
        });
        let mut alert: AlertRecord = serde_json::from_str(&json.to_string()).unwrap();
        alert.seq = Some(seq);
        serde_json::to_string(&alert).unwrap() + "\n"
    }

    #[test]
    fn the_last_complete_line_is_found_from_the_end_and_a_torn_tail_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.ndjson");
        // Lines longer than the read window, and a torn last line.
        let long = "x".repeat(100_000);
        let text = record(1, "a") + &record(2, &long) + &record(3, &long) + "{\"id\":\"torn";
        std::fs::write(&path, &text).unwrap();
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.inner.lock().unwrap().written, 3);
        let kept = std::fs::read_to_string(&path).unwrap();
        assert!(kept.ends_with(&record(3, &long)), "torn line cut off");

        std::fs::write(&path, "").unwrap();
        assert_eq!(
            FileSink::open(&path).unwrap().inner.lock().unwrap().written,
            0
        );
        std::fs::write(&path, "{\"torn").unwrap();
        assert_eq!(
            FileSink::open(&path).unwrap().inner.lock().unwrap().written,
            0
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
