//! Alerts appended to `alerts.ndjson`, one JSON record per line, in commit
//! order. The file's last line tells where a restart resumes, so an alert is
//! written once even when the outbox republishes it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
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

/// The `seq` of the last complete line. A torn last line (a crash mid-write)
/// is cut off, so appending resumes on a line boundary.
fn last_seq(file: &mut File) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&*file);
    let mut line = String::new();
    let (mut complete, mut last) = (0u64, 0u64);
    let mut offset = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        offset += n as u64;
        complete = offset;
        if let Ok(record) = serde_json::from_str::<AlertRecord>(&line) {
            last = record.seq.unwrap_or(last);
        }
    }
    file.set_len(complete)?;
    Ok(last)
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
