//! Alerts appended to `alerts.ndjson`, one JSON record per line, in commit
//! order, each write synced before it counts as published. The file's last
//! line tells where a restart resumes, so an alert is written once even when
//! the outbox republishes it.
//!
//! Past [`DEFAULT_MAX_FILE_BYTES`] the file is rotated: `alerts.ndjson`
//! becomes `alerts.ndjson.1` (the older ones move up, the oldest of
//! [`KEPT_FILES`] is deleted) and a new file starts. The alert log in the
//! state store, not this file, is what the API reads.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{AlertSink, SinkError};
use crate::alert::AlertRecord;

/// Size at which the file is rotated: large enough that rotation is rare,
/// small enough that a file is easy to move and read.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 << 20;
/// Rotated files kept beside the current one.
pub const KEPT_FILES: usize = 4;

pub struct FileSink {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    size: u64,
    max_bytes: u64,
    /// Highest `seq` already written.
    written: u64,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> SinkError + '_ {
    move |e| SinkError::Unavailable(format!("{}: {e}", path.display()))
}

impl FileSink {
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        Self::open_with(path, DEFAULT_MAX_FILE_BYTES)
    }

    /// A sink that rotates its file past `max_bytes`.
    pub fn open_with(path: &Path, max_bytes: u64) -> Result<Self, SinkError> {
        let fail = io_error(path);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(&fail)?;
        let mut written = last_seq(path, &mut file)?;
        if written.is_none() {
            // Just rotated: the newest rotated file ends where this resumes.
            let rotated = rotated_path(path, 1);
            if let Ok(mut previous) = OpenOptions::new().read(true).write(true).open(&rotated) {
                written = last_seq(&rotated, &mut previous)?;
            }
        }
        let size = file.metadata().map_err(&fail)?.len();
        Ok(FileSink {
            inner: Arc::new(Mutex::new(Inner {
                path: path.to_owned(),
                file,
                size,
                max_bytes: max_bytes.max(1),
                written: written.unwrap_or(0),
            })),
        })
    }
}

fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl Inner {
    /// Move the current file to `.1` (and older ones up) and start anew.
    fn rotate(&mut self) -> Result<(), SinkError> {
        let fail = io_error(&self.path);
        let oldest = rotated_path(&self.path, KEPT_FILES);
        if oldest.exists() {
            std::fs::remove_file(&oldest).map_err(&fail)?;
        }
        for n in (1..KEPT_FILES).rev() {
            let from = rotated_path(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated_path(&self.path, n + 1)).map_err(&fail)?;
            }
        }
        std::fs::rename(&self.path, rotated_path(&self.path, 1)).map_err(&fail)?;
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(&fail)?;
        // The rename is durable once the directory is.
        if let Some(dir) = self.path.parent()
            && let Ok(dir) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
        {
            dir.sync_all().map_err(&fail)?;
        }
        self.size = 0;
        Ok(())
    }

    fn write(&mut self, lines: Lines) -> Result<(), SinkError> {
        // Lines the file already holds (a republished outbox) are skipped.
        let Lines {
            mut buffer,
            mut starts,
        } = lines;
        let written_before = self.written;
        let skip = starts.partition_point(|&(seq, _)| seq.is_some_and(|s| s <= written_before));
        if skip == starts.len() {
            return Ok(());
        }
        if skip > 0 {
            buffer.drain(..starts[skip].1);
            starts.drain(..skip);
        }
        let written = starts
            .iter()
            .filter_map(|&(seq, _)| seq)
            .max()
            .unwrap_or(self.written);
        if self.size > 0 && self.size + buffer.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let fail = io_error(&self.path);
        self.file.write_all(&buffer).map_err(&fail)?;
        // The store's published cursor moves once this returns: the lines
        // must survive a crash first.
        self.file.sync_data().map_err(&fail)?;
        self.size += buffer.len() as u64;
        self.written = written;
        Ok(())
    }
}

/// The `seq` of the last complete line, read from the end of the file (a
/// long-running host's file is large); `None` for an empty file. A torn last
/// line (a crash mid-write) is cut off, so appending resumes on a line
/// boundary. A complete last line that is not an alert is an error: resuming
/// from 0 would write the whole history again.
fn last_seq(path: &Path, file: &mut File) -> Result<Option<u64>, SinkError> {
    let fail = io_error(path);
    let (offset, line) = last_line(file).map_err(&fail)?;
    let Some(line) = line else {
        return Ok(None);
    };
    match serde_json::from_slice::<AlertRecord>(&line) {
        Ok(AlertRecord { seq, .. }) => Ok(Some(seq.unwrap_or(0))),
        Err(e) => Err(SinkError::Invalid(format!(
            "{}: the last line (at byte {offset}) is not an alert ({e}); fix or move the file",
            path.display()
        ))),
    }
}

/// The last complete line and where it starts, with a torn tail cut off.
fn last_line(file: &mut File) -> std::io::Result<(u64, Option<Vec<u8>>)> {
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
                return Ok((0, None));
            }
            continue;
        };
        let line_start = tail[..end].iter().rposition(|&b| b == b'\n').map(|p| p + 1);
        if line_start.is_none() && start > 0 {
            continue;
        }
        file.set_len(start + end as u64 + 1)?;
        let begins = line_start.unwrap_or(0);
        return Ok((start + begins as u64, Some(tail[begins..end].to_vec())));
    }
}

/// Alerts as NDJSON, with each line's `seq` and where it starts. Alerts
/// without a `seq` (from a store that keeps its outbox per shard, such as
/// DynamoDB) are written as they come: a republished outbox may repeat
/// them, and their ids tell the repeats apart.
struct Lines {
    buffer: Vec<u8>,
    starts: Vec<(Option<u64>, usize)>,
}

impl Lines {
    /// Serialized on the caller's thread; only the write and sync go to a
    /// blocking thread.
    fn of(alerts: &[AlertRecord]) -> Result<Lines, SinkError> {
        let mut lines = Lines {
            buffer: Vec::with_capacity(alerts.len() * 256),
            starts: Vec::with_capacity(alerts.len()),
        };
        for alert in alerts {
            let seq = alert.seq;
            // In commit order: a line out of order would be skipped.
            if let (Some(seq), Some(&(Some(last), _))) = (seq, lines.starts.last())
                && seq <= last
            {
                continue;
            }
            lines.starts.push((seq, lines.buffer.len()));
            serde_json::to_writer(&mut lines.buffer, alert)
                .map_err(|e| SinkError::Invalid(format!("an alert does not serialize: {e}")))?;
            lines.buffer.push(b'\n');
        }
        Ok(lines)
    }
}

#[async_trait::async_trait]
impl AlertSink for FileSink {
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        let lines = Lines::of(alerts)?;
        if lines.starts.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.lock().expect("file sink lock").write(lines))
            .await
            .map_err(|e| SinkError::Unavailable(format!("the file sink's thread failed: {e}")))?
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

    fn alert(seq: u64) -> AlertRecord {
        serde_json::from_str(record(seq, "t").trim_end()).unwrap()
    }

    #[test]
    fn an_unreadable_last_line_is_an_error_naming_the_file_not_a_restart_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.ndjson");
        std::fs::write(&path, record(1, "a") + "not an alert\n").unwrap();
        let error = FileSink::open(&path).err().expect("refused");
        assert!(!error.retryable());
        let text = error.to_string();
        assert!(text.contains("alerts.ndjson"), "{text}");
        assert!(text.contains("the last line (at byte"), "{text}");
    }

    #[tokio::test]
    async fn a_full_file_is_rotated_and_a_restart_resumes_after_the_rotated_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.ndjson");
        // Room for two lines of any seq used here, not three.
        let line = record(10, "t").len() as u64 + 2;
        let sink = FileSink::open_with(&path, line * 2).unwrap();
        for seq in 1..=(2 * KEPT_FILES as u64 + 4) {
            sink.publish(&[alert(seq)]).await.unwrap();
        }
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert!(lines(&path) <= 2);
        assert_eq!(lines(&rotated_path(&path, 1)), 2);
        assert!(rotated_path(&path, KEPT_FILES).exists());
        assert!(
            !rotated_path(&path, KEPT_FILES + 1).exists(),
            "the oldest is deleted"
        );
        drop(sink);

        // Rotated just before a restart: the current file is empty.
        let inner_written = |sink: &FileSink| sink.inner.lock().unwrap().written;
        let sink = FileSink::open_with(&path, line * 2).unwrap();
        let last = inner_written(&sink);
        sink.inner.lock().unwrap().rotate().unwrap();
        drop(sink);
        let sink = FileSink::open_with(&path, line * 2).unwrap();
        assert_eq!(inner_written(&sink), last, "resumes after the rotated file");
        sink.publish(&[alert(last)]).await.unwrap();
        assert_eq!(lines(&path), 0, "nothing written twice");
    }

    #[tokio::test]
    async fn alerts_without_a_seq_are_all_written_and_a_restart_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.ndjson");
        let unsequenced = |n: u64| {
            let mut alert = alert(n);
            alert.seq = None;
            alert.key = format!("k-{n}");
            alert
        };
        let sink = FileSink::open(&path).unwrap();
        sink.publish(&[unsequenced(1), unsequenced(2)])
            .await
            .unwrap();
        drop(sink);
        let sink = FileSink::open(&path).unwrap();
        sink.publish(&[unsequenced(3)]).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let keys: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<AlertRecord>(l).unwrap().key)
            .collect();
        assert_eq!(keys, ["k-1", "k-2", "k-3"]);
    }
}
