//! Alerts to a Kinesis stream: PutRecords in batches of at most 500 records
//! (and 5 MB), retrying only the entries that failed, with backoff. Each
//! record is one alert as JSON, id included; its partition key is
//! tenant/rule/bucket, so one bucket's alerts go to one shard.
//!
//! One bucket's alerts stay in order: a request carries at most one record
//! per partition key, and a key's next record waits until the one before it
//! is written. (Several records of one key in a request could be written
//! around a failed one, and retrying it would put it after them.) A bucket
//! rarely raises more than one alert per batch, so requests stay full.

use std::collections::{HashMap, VecDeque};
use std::future::Future;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use sha2::{Digest, Sha256};

use super::dead_letters::{DeadLetter, DeadLetterSink};
use super::{AlertSink, SinkError};
use crate::alert::AlertRecord;

/// PutRecords' limits.
const MAX_ENTRIES: usize = 500;
const MAX_REQUEST_BYTES: usize = 5 << 20;
/// Attempts per batch before the sink reports failure (the alerts stay in
/// the outbox and are published again later).
const MAX_ATTEMPTS: u32 = 10;
/// Kinesis takes partition keys of up to 256 characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// The partition key of a bucket's alerts: tenant/rule/bucket, or its
/// SHA-256 when that is longer than Kinesis allows (the same bucket always
/// maps to the same key either way).
pub fn partition_key(alert: &AlertRecord) -> String {
    let key = format!("{}/{}/{}", alert.tenant, alert.rule, alert.bucket);
    if key.chars().count() <= MAX_PARTITION_KEY_CHARS {
        return key;
    }
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

/// One record to put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// The PutRecords call: per entry, `None` if it was written or the error
/// code it failed with.
pub trait RecordWriter: Send + Sync + 'static {
    fn put(
        &self,
        stream: &str,
        entries: &[Entry],
    ) -> impl Future<Output = Result<Vec<Option<String>>, String>> + Send;
}

/// The real PutRecords.
#[derive(Clone)]
pub struct SdkWriter(pub aws_sdk_kinesis::Client);

impl RecordWriter for SdkWriter {
    async fn put(&self, stream: &str, entries: &[Entry]) -> Result<Vec<Option<String>>, String> {
        let records = entries
            .iter()
            .map(|e| {
                PutRecordsRequestEntry::builder()
                    .partition_key(&e.partition_key)
                    .data(Blob::new(e.data.clone()))
                    .build()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .0
            .put_records()
            .stream_name(stream)
            .set_records(Some(records))
            .send()
            .await
            .map_err(crate::aws::error_text)?;
        Ok(output
            .records()
            .iter()
            .map(|r| r.error_code().map(str::to_owned))
            .collect())
    }
}

/// Alerts to a Kinesis stream.
pub struct KinesisSink<W: RecordWriter = SdkWriter> {
    writer: W,
    stream: String,
}

impl<W: RecordWriter> KinesisSink<W> {
    pub fn new(writer: W, stream: &str) -> Self {
        KinesisSink {
            writer,
            stream: stream.to_owned(),
        }
    }

    /// Put every alert, each bucket's in order (see the module docs).
    pub async fn put(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        let entries: Vec<Entry> = alerts
            .iter()
            .map(|alert| Entry {
                partition_key: partition_key(alert),
                data: serde_json::to_vec(alert).expect("alerts serialize"),
            })
            .collect();
        self.put_in_key_order(entries).await
    }

    /// Put records keeping each partition key's in order: one record per
    /// key per request, a key's next only after the one before it is in.
    pub async fn put_in_key_order(&self, entries: Vec<Entry>) -> Result<(), SinkError> {
        // Keys in order of their first record; each key's records in order.
        let mut order: Vec<String> = Vec::new();
        let mut queues: HashMap<String, VecDeque<Entry>> = HashMap::new();
        for entry in entries {
            let queue = queues
                .entry(entry.partition_key.clone())
                .or_insert_with(|| {
                    order.push(entry.partition_key.clone());
                    VecDeque::new()
                });
            queue.push_back(entry);
        }
        let mut attempt = 0;
        while !order.is_empty() {
            // The head of each key's queue, as many as one request takes.
            let mut request: Vec<Entry> = Vec::new();
            let mut bytes = 0;
            for key in &order {
                let head = &queues[key][0];
                let size = head.data.len() + head.partition_key.len();
                if request.len() == MAX_ENTRIES
                    || (!request.is_empty() && bytes + size > MAX_REQUEST_BYTES)
                {
                    break;
                }
                bytes += size;
                request.push(head.clone());
            }
            let failed = match self.writer.put(&self.stream, &request).await {
                Ok(results) => {
                    let mut first_error = None;
                    for (entry, error) in request.iter().zip(results) {
                        match error {
                            None => {
                                queues
                                    .get_mut(&entry.partition_key)
                                    .expect("queued")
                                    .pop_front();
                            }
                            Some(error) => {
                                first_error.get_or_insert(error);
                            }
                        }
                    }
                    order.retain(|key| !queues[key].is_empty());
                    first_error
                }
                Err(error) => Some(error),
            };
            let Some(failed) = failed else {
                attempt = 0;
                continue;
            };
            attempt += 1;
            if attempt >= MAX_ATTEMPTS {
                let pending: usize = queues.values().map(VecDeque::len).sum();
                return Err(SinkError::Unavailable(format!(
                    "PutRecords to `{}`: {pending} record(s) still not written after {attempt} attempts: {failed}",
                    self.stream
                )));
            }
            tracing::debug!(stream = %self.stream, attempt, "retrying failed PutRecords entries: {failed}");
            crate::backoff::sleep(attempt).await;
        }
        Ok(())
    }

    /// Put records in requests within PutRecords' limits, retrying failed
    /// entries only: fastest, but a retried record may land after later
    /// records of its key. For loading events where order is not promised.
    pub async fn put_entries(&self, entries: Vec<Entry>) -> Result<(), SinkError> {
        let mut start = 0;
        while start < entries.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < entries.len() && end - start < MAX_ENTRIES {
                let size = entries[end].data.len() + entries[end].partition_key.len();
                if end > start && bytes + size > MAX_REQUEST_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            self.put_all(entries[start..end].to_vec()).await?;
            start = end;
        }
        Ok(())
    }

    async fn put_all(&self, mut pending: Vec<Entry>) -> Result<(), SinkError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failed = match self.writer.put(&self.stream, &pending).await {
                Ok(results) => {
                    let failed: Vec<(Entry, String)> = pending
                        .into_iter()
                        .zip(results)
                        .filter_map(|(entry, error)| error.map(|e| (entry, e)))
                        .collect();
                    if failed.is_empty() {
                        return Ok(());
                    }
                    let first = failed[0].1.clone();
                    pending = failed.into_iter().map(|(entry, _)| entry).collect();
                    first
                }
                Err(error) => error,
            };
            if attempt >= MAX_ATTEMPTS {
                return Err(SinkError::Unavailable(format!(
                    "PutRecords to `{}`: {} record(s) still failing after {attempt} attempts: {failed}",
                    self.stream,
                    pending.len()
                )));
            }
            tracing::debug!(stream = %self.stream, records = pending.len(), attempt, "retrying failed PutRecords entries: {failed}");
            crate::backoff::sleep(attempt).await;
        }
    }
}

#[async_trait::async_trait]
impl<W: RecordWriter> AlertSink for KinesisSink<W> {
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        self.put(alerts).await
    }
}

/// Dead letters to a Kinesis stream, one JSON record each, partitioned by
/// tenant and rule.
pub struct KinesisDeadLetters<W: RecordWriter = SdkWriter> {
    sink: KinesisSink<W>,
    stream: String,
}

impl<W: RecordWriter> KinesisDeadLetters<W> {
    pub fn new(writer: W, stream: &str) -> Self {
        KinesisDeadLetters {
            sink: KinesisSink::new(writer, stream),
            stream: stream.to_owned(),
        }
    }
}

#[async_trait::async_trait]
impl<W: RecordWriter> DeadLetterSink for KinesisDeadLetters<W> {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        let entries = letters
            .iter()
            .map(|letter| {
                let key = format!(
                    "{}/{}",
                    letter.tenant.as_deref().unwrap_or("-"),
                    letter.rule.as_deref().unwrap_or("-")
                );
                let partition_key = if key.chars().count() <= MAX_PARTITION_KEY_CHARS {
                    key
                } else {
                    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
                };
                Entry {
                    partition_key,
                    data: serde_json::to_vec(letter).expect("dead letters serialize"),
                }
            })
            .collect();
        self.sink.put_entries(entries).await
    }

    fn describe(&self) -> String {
        format!("kinesis stream {}", self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// PutRecords that fails the first entry of each key once and records
    /// what it wrote, in order.
    #[derive(Default)]
    struct Recording {
        failed: Mutex<std::collections::HashSet<String>>,
        written: Mutex<Vec<Entry>>,
    }

    impl RecordWriter for std::sync::Arc<Recording> {
        async fn put(
            &self,
            _stream: &str,
            entries: &[Entry],
        ) -> Result<Vec<Option<String>>, String> {
            let mut failed = self.failed.lock().unwrap();
            let mut written = self.written.lock().unwrap();
            Ok(entries
                .iter()
                .map(|entry| {
                    if failed.insert(entry.partition_key.clone()) {
                        Some("ProvisionedThroughputExceededException".to_owned())
                    } else {
                        written.push(entry.clone());
                        None
                    }
                })
                .collect())
        }
    }

    fn entry(key: &str, n: u8) -> Entry {
        Entry {
            partition_key: key.to_owned(),
            data: vec![n],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_record_is_retried_before_any_later_record_of_its_key() {
        let writer = std::sync::Arc::new(Recording::default());
        let sink = KinesisSink::new(writer.clone(), "alerts");
        let entries = vec![
            entry("a", 1),
            entry("a", 2),
            entry("b", 1),
            entry("a", 3),
            entry("b", 2),
        ];
        sink.put_in_key_order(entries).await.unwrap();
        let written = writer.written.lock().unwrap();
        let of = |key: &str| -> Vec<u8> {
            written
                .iter()
                .filter(|e| e.partition_key == key)
                .map(|e| e.data[0])
                .collect()
        };
        assert_eq!(of("a"), [1, 2, 3]);
        assert_eq!(of("b"), [1, 2]);
    }

    #[test]
    fn partition_keys_stay_within_kinesis_limit_and_are_stable() {
        let json = serde_json::json!({
            "id": "x", "tenant": "t", "rule": "r", "rule_version": "1.0.0",
            "bucket": "b".repeat(1000), "key": "k", "status": "firing", "severity": "info",
            "title": "", "detail": null, "at": 0
        });
        let alert: AlertRecord = serde_json::from_value(json).unwrap();
        let key = partition_key(&alert);
        assert!(key.chars().count() <= MAX_PARTITION_KEY_CHARS, "{key}");
        assert_eq!(key, partition_key(&alert));
        let mut short = alert.clone();
        short.bucket = "m1".into();
        assert_eq!(partition_key(&short), "t/r/m1");
    }
}
