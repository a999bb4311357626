//! Events that were accepted but not applied, kept with the reason: a rule
//! failed on them (found by bisecting its calls), the rule is quarantined,
//! or — from a stream, which cannot be answered — the record was not an
//! event at all. Behind [`DeadLetterSink`]: a file on one machine
//! ([`DeadLetterFile`], which `GET /v1/tenants/{tenant}/dead-letters`
//! reads), a Kinesis stream with many (`sink::kinesis::KinesisDeadLetters`, with
//! the `aws` feature).
//!
//! The engine sends a batch's dead letters before it commits the batch, so
//! none is lost to a crash; a batch run again after a failed commit sends
//! them again under the same ids. The file skips ids it already holds; a
//! stream's consumers deduplicate by id, as they do alerts.
//!
//! Each dead letter carries the event's text, so `tocsin replay` can run the
//! dead letters of a file again once the rule is fixed (each against the
//! rule that failed on it only).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SinkError;

/// One event not applied, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The same whenever the same event fails the same way again: see
    /// [`dead_letter_id`].
    pub id: String,
    /// Position in this host's dead-letter file, assigned when written
    /// there; the cursor of `GET …/dead-letters?after=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Processing time of the batch, epoch milliseconds.
    pub at: i64,
    /// The event's tenant; none when the record named none.
    pub tenant: Option<String>,
    /// The rule that did not apply it; none when no rule could (not an
    /// event, unknown tenant).
    pub rule: Option<String>,
    /// The source partition it came from: a shard id, `http` or `file`.
    pub source: String,
    /// Where it came from in that source (`shard:sequence`, `request:line`).
    pub position: String,
    /// A fixed name for the kind of failure (`out_of_fuel`, `quarantined`,
    /// `malformed`, …), as metrics label it.
    pub cause: String,
    pub reason: String,
    /// The event as received (invalid UTF-8 replaced by U+FFFD).
    pub event: String,
}

/// The id of a dead letter: a digest of where the event came from and the
/// rule (if any) that did not apply it.
pub fn dead_letter_id(source: &str, position: &str, rule: Option<&str>) -> String {
    let mut hash = Sha256::new();
    for part in [source, position, rule.unwrap_or("")] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..16])
}

/// A destination for dead letters.
#[async_trait::async_trait]
pub trait DeadLetterSink: Send + Sync {
    /// Keep `letters` durably. Must tolerate receiving again letters it
    /// already kept (same ids) before a crash or a failed commit.
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError>;

    /// Where they go, for messages (`file …`, `kinesis stream …`).
    fn describe(&self) -> String;

    /// Reading them back, for sinks that can.
    fn log(&self) -> Option<&dyn DeadLetterLog> {
        None
    }
}

/// Reading back kept dead letters.
pub trait DeadLetterLog: Send + Sync {
    /// Up to `limit` dead letters of `tenant` with `seq > after`, oldest
    /// first.
    fn dead_letters(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, SinkError>;
}

/// Ids of the most recent dead letters the file remembers, to skip a batch's
/// letters sent again after its commit failed (which happens within
/// seconds, a few batches at most).
const REMEMBERED_IDS: usize = 100_000;

/// Dead letters appended to a file, one JSON record per line, each write
/// synced before the batch commits. An index in memory (tenant → line
/// offsets, rebuilt at open) serves the API.
pub struct DeadLetterFile {
    path: PathBuf,
    inner: Mutex<FileInner>,
}

struct FileInner {
    file: File,
    size: u64,
    last_seq: u64,
    /// Per tenant, each of its letters' `(seq, offset, length)`.
    by_tenant: HashMap<String, Vec<(u64, u64, u32)>>,
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl FileInner {
    fn remember(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED_IDS
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
        }
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> SinkError + '_ {
    move |e| SinkError::Unavailable(format!("{}: {e}", path.display()))
}

impl DeadLetterFile {
    /// Open (or create) the file and index what it holds. A torn last line
    /// (a crash mid-write) is cut off; any other line that is not a dead
    /// letter is an error naming it.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let fail = io_error(path);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(&fail)?;
        let mut inner = FileInner {
            file: file.try_clone().map_err(&fail)?,
            size: 0,
            last_seq: 0,
            by_tenant: HashMap::new(),
            ids: HashSet::new(),
            order: VecDeque::new(),
        };
        file.seek(SeekFrom::Start(0)).map_err(&fail)?;
        let mut reader = BufReader::new(&mut file);
        let mut offset = 0u64;
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).map_err(&fail)?;
            if read == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                break; // torn: cut off below
            }
            let letter: DeadLetter =
                serde_json::from_slice(&line[..line.len() - 1]).map_err(|e| {
                    SinkError::Invalid(format!(
                        "{}: the line at byte {offset} is not a dead letter ({e}); fix or move the file",
                        path.display()
                    ))
                })?;
            let seq = letter.seq.unwrap_or(inner.last_seq + 1);
            inner.last_seq = inner.last_seq.max(seq);
            if let Some(tenant) = letter.tenant {
                inner
                    .by_tenant
                    .entry(tenant)
                    .or_default()
                    .push((seq, offset, read as u32 - 1));
            }
            inner.remember(letter.id);
            offset += read as u64;
        }
        drop(reader);
        file.set_len(offset).map_err(&fail)?;
        inner.size = offset;
        Ok(DeadLetterFile {
            path: path.to_owned(),
            inner: Mutex::new(inner),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait::async_trait]
impl DeadLetterSink for DeadLetterFile {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        if letters.is_empty() {
            return Ok(());
        }
        let fail = io_error(&self.path);
        let mut inner = self.inner.lock().expect("dead letter file lock");
        let mut buffer = Vec::new();
        let mut added = Vec::new();
        let mut seq = inner.last_seq;
        let mut fresh = HashSet::new();
        for letter in letters {
            if inner.ids.contains(&letter.id) || !fresh.insert(letter.id.as_str()) {
                continue;
            }
            seq += 1;
            let start = buffer.len();
            let record = DeadLetter {
                seq: Some(seq),
                ..letter.clone()
            };
            serde_json::to_writer(&mut buffer, &record).expect("dead letters serialize");
            let length = (buffer.len() - start) as u32;
            buffer.push(b'\n');
            added.push((record, start as u64, length));
        }
        if buffer.is_empty() {
            return Ok(());
        }
        inner.file.write_all(&buffer).map_err(&fail)?;
        // The batch commits once this returns: the letters must survive a
        // crash first.
        inner.file.sync_data().map_err(&fail)?;
        let base = inner.size;
        inner.size += buffer.len() as u64;
        inner.last_seq = seq;
        for (record, start, length) in added {
            if let Some(tenant) = record.tenant {
                inner.by_tenant.entry(tenant).or_default().push((
                    record.seq.expect("assigned"),
                    base + start,
                    length,
                ));
            }
            inner.remember(record.id);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn log(&self) -> Option<&dyn DeadLetterLog> {
        Some(self)
    }
}

impl DeadLetterLog for DeadLetterFile {
    fn dead_letters(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, SinkError> {
        let fail = io_error(&self.path);
        let spans: Vec<(u64, u32)> = {
            let inner = self.inner.lock().expect("dead letter file lock");
            let Some(entries) = inner.by_tenant.get(tenant) else {
                return Ok(Vec::new());
            };
            let from = entries.partition_point(|&(seq, _, _)| seq <= after);
            entries[from..]
                .iter()
                .take(limit)
                .map(|&(_, offset, length)| (offset, length))
                .collect()
        };
        let file = File::open(&self.path).map_err(&fail)?;
        let mut letters = Vec::with_capacity(spans.len());
        for (offset, length) in spans {
            let mut line = vec![0; length as usize];
            file.read_exact_at(&mut line, offset).map_err(&fail)?;
            letters.push(serde_json::from_slice(&line).map_err(|e| {
                SinkError::Invalid(format!(
                    "{}: the line at byte {offset} is not a dead letter: {e}",
                    self.path.display()
                ))
            })?);
        }
        Ok(letters)
    }
}

/// Read a whole dead-letter record from `reader` (for tools reading a file
/// written by [`DeadLetterFile`]).
pub fn read_all(reader: impl Read) -> Result<Vec<DeadLetter>, String> {
    let mut letters = Vec::new();
    for (n, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        letters.push(serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(tenant: &str, position: &str) -> DeadLetter {
        DeadLetter {
            id: dead_letter_id("http", position, Some("r")),
            seq: None,
            at: 1,
            tenant: Some(tenant.to_owned()),
            rule: Some("r".to_owned()),
            source: "http".to_owned(),
            position: position.to_owned(),
            cause: "panic".to_owned(),
            reason: "boom".to_owned(),
            event: format!(r#"{{"clientId":"{tenant}"}}"#),
        }
    }

    #[tokio::test]
    async fn letters_sent_again_are_kept_once_and_survive_a_reopen_with_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead-letters.ndjson");
        let file = DeadLetterFile::open(&path).unwrap();
        let batch = [letter("a", "1:1"), letter("b", "1:2"), letter("a", "1:3")];
        file.send(&batch).await.unwrap();
        file.send(&batch).await.unwrap();
        let a = file.dead_letters("a", 0, 10).unwrap();
        assert_eq!(
            a.iter().map(|l| l.position.as_str()).collect::<Vec<_>>(),
            ["1:1", "1:3"]
        );
        assert_eq!(a[1].seq, Some(3));
        assert_eq!(file.dead_letters("a", 1, 10).unwrap().len(), 1);
        drop(file);

        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":\"torn")
            .unwrap();
        let file = DeadLetterFile::open(&path).unwrap();
        file.send(&[letter("a", "1:1"), letter("a", "2:1")])
            .await
            .unwrap();
        let a = file.dead_letters("a", 0, 10).unwrap();
        assert_eq!(
            a.iter()
                .map(|l| (l.seq, l.position.as_str()))
                .collect::<Vec<_>>(),
            [(Some(1), "1:1"), (Some(3), "1:3"), (Some(4), "2:1")]
        );
        assert_eq!(read_all(File::open(&path).unwrap()).unwrap().len(), 4);
    }

    #[test]
    fn a_line_that_is_not_a_dead_letter_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead-letters.ndjson");
        std::fs::write(&path, "{\"nope\":1}\n").unwrap();
        let error = DeadLetterFile::open(&path).err().unwrap().to_string();
        assert!(
            error.contains("the line at byte 0 is not a dead letter"),
            "{error}"
        );
    }
}
