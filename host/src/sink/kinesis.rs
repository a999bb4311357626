//! Alerts to a Kinesis stream: PutRecords in batches of at most 500 records
//! (and 5 MB), retrying only the entries that failed, with backoff. Each
//! record is one alert as JSON, id included; its partition key is
//! tenant/rule/bucket, so one bucket's alerts stay in order.

use std::future::Future;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use super::{AlertSink, SinkError};
use crate::alert::AlertRecord;

/// PutRecords' limits.
const MAX_ENTRIES: usize = 500;
const MAX_REQUEST_BYTES: usize = 5 << 20;
/// Attempts per batch before the sink reports failure (the alerts stay in
/// the outbox and are published again later).
const MAX_ATTEMPTS: u32 = 10;

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

    /// Put every alert, retrying failed entries only.
    pub async fn put(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        let entries: Vec<Entry> = alerts
            .iter()
            .map(|alert| Entry {
                partition_key: format!("{}/{}/{}", alert.tenant, alert.rule, alert.bucket),
                data: serde_json::to_vec(alert).expect("alerts serialize"),
            })
            .collect();
        self.put_entries(entries).await
    }

    /// Put records in order, in requests within PutRecords' limits,
    /// retrying failed entries only.
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
                return Err(SinkError(format!(
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

impl<W: RecordWriter> AlertSink for KinesisSink<W> {
    /// Called from blocking threads (the processor's): runs the puts on the
    /// ambient Tokio runtime.
    fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| SinkError("the Kinesis sink needs a Tokio runtime".to_owned()))?;
        handle.block_on(self.put(alerts))
    }
}
