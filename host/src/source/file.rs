//! An NDJSON file (or standard input) as a source, for `tocsin replay`:
//! its lines in batches of a fixed size, in order, each event positioned
//! by its line. A line that is not an event is handed back with its number
//! and reason; the good lines around it go on. A line that is a dead letter
//! (as the dead-letter file and API hold them) is its event, for the rule
//! that did not apply it only.

use std::io::BufRead;

use crate::engine::Batch;
use crate::event::{EventError, Incoming};
use crate::sink::dead_letters::DeadLetter;
use crate::store::Progress;

/// A dead letter's event, to run again against the rule that did not
/// apply it (every rule of its tenant if it names none), at its first
/// position, so the alerts it raises now have the ids they would have had.
fn dead_letter(line: &str, tenant_field: &str, arrival: i64) -> Option<Incoming> {
    let letter: DeadLetter = serde_json::from_str(line).ok()?;
    let mut event = Incoming::parse(&letter.event, tenant_field, arrival).ok()?;
    event.position = letter.position;
    event.only_rule = letter.rule;
    Some(event)
}

/// A line that is not an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub error: String,
}

/// One batch of the file, with the line of each event.
#[derive(Debug)]
pub struct FileBatch {
    pub batch: Batch,
    pub lines: Vec<usize>,
    pub bad: Vec<BadLine>,
}

pub struct FileSource<R> {
    reader: R,
    /// Names the file in event positions: `{name}:{line}`.
    name: String,
    tenant_field: String,
    batch_size: usize,
    line: usize,
}

impl<R: BufRead> FileSource<R> {
    pub fn new(reader: R, name: &str, tenant_field: &str, batch_size: usize) -> Self {
        FileSource {
            reader,
            name: name.to_owned(),
            tenant_field: tenant_field.to_owned(),
            batch_size: batch_size.max(1),
            line: 0,
        }
    }

    /// The next batch of up to `batch_size` events; `None` at the end.
    /// `arrival` is the arrival time given to events read now.
    pub fn next_batch(&mut self, arrival: i64) -> std::io::Result<Option<FileBatch>> {
        let mut events: Vec<Incoming> = Vec::new();
        let mut lines = Vec::new();
        let mut bad = Vec::new();
        let mut text = String::new();
        while events.len() < self.batch_size {
            text.clear();
            if self.reader.read_line(&mut text)? == 0 {
                break;
            }
            self.line += 1;
            let line = text.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                continue;
            }
            let parsed = match Incoming::parse(line, &self.tenant_field, arrival) {
                Ok(mut event) => {
                    event.position = format!("{}:{}", self.name, self.line);
                    Ok(event)
                }
                Err(error @ EventError::MissingTenant(_)) => {
                    dead_letter(line, &self.tenant_field, arrival).ok_or(error)
                }
                Err(error) => Err(error),
            };
            match parsed {
                Ok(event) => {
                    events.push(event);
                    lines.push(self.line);
                }
                Err(error) => bad.push(BadLine {
                    line: self.line,
                    error: error.to_string(),
                }),
            }
        }
        if events.is_empty() && bad.is_empty() {
            return Ok(None);
        }
        Ok(Some(FileBatch {
            batch: Batch::new(events, Progress::none()),
            lines,
            bad,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_in_batches_and_bad_ones_are_named_by_number() {
        let text = "{\"clientId\":\"a\",\"n\":1}\n\nnot json\n{\"clientId\":\"a\",\"n\":2}\n{\"clientId\":\"a\",\"n\":3}\n";
        let mut source = FileSource::new(text.as_bytes(), "f", "clientId", 2);
        let first = source.next_batch(0).unwrap().unwrap();
        assert_eq!(first.lines, [1, 4]);
        assert_eq!(first.bad.len(), 1);
        assert_eq!(first.bad[0].line, 3);
        assert!(
            first.bad[0].error.starts_with("not valid JSON"),
            "{:?}",
            first.bad
        );
        assert_eq!(first.batch.events[1].position, "f:4");
        let second = source.next_batch(0).unwrap().unwrap();
        assert_eq!(second.lines, [5]);
        assert!(source.next_batch(0).unwrap().is_none());
    }
}
