//! Reading a Kinesis stream: its shards (with their parents, for resharding)
//! and one shard's records, polled no more often than every 200 ms and with
//! jittered backoff when throttled.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::{Record, ShardIteratorType};

use super::SourceError;
use crate::aws::error_text;
use crate::event::{Incoming, SeqNo};
use crate::sink::dead_letters::{DeadLetter, dead_letter_id};

/// Kinesis allows 5 GetRecords calls per second per shard; this leaves room
/// for a second reader during a handover.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Records per GetRecords.
const MAX_RECORDS: i32 = 10_000;

/// One shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    pub parents: Vec<String>,
}

/// A failed call to Kinesis: worth retrying (the source retries with
/// backoff; a stream that does not exist is refused at start).
fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
    SourceError::Unavailable(format!("Kinesis: {}", error_text(e)))
}

/// Every shard of `stream`, open and closed.
pub async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<Shard>, SourceError> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let request = match &token {
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let page = request.send().await.map_err(unavailable)?;
        for shard in page.shards() {
            shards.push(Shard {
                id: shard.shard_id().to_owned(),
                parents: shard
                    .parent_shard_id()
                    .into_iter()
                    .chain(shard.adjacent_parent_shard_id())
                    .map(str::to_owned)
                    .collect(),
            });
        }
        match page.next_token() {
            Some(next) => token = Some(next.to_owned()),
            None => return Ok(shards),
        }
    }
}

/// One poll's result.
#[derive(Debug)]
pub struct Poll {
    pub records: Vec<Record>,
    /// The shard is closed and these were its last records.
    pub end: bool,
    /// How far behind the stream's tip the read was (`MillisBehindLatest`).
    pub behind_ms: Option<i64>,
}

/// Reads one shard from a checkpoint on.
pub struct ShardReader {
    client: aws_sdk_kinesis::Client,
    stream: String,
    shard: String,
    iterator: Option<String>,
    /// The last sequence number returned: where to resume on an expired
    /// iterator.
    position: Option<String>,
    last_poll: Option<Instant>,
}

impl ShardReader {
    /// Start after `checkpoint`, or at the shard's oldest record.
    pub async fn open(
        client: aws_sdk_kinesis::Client,
        stream: &str,
        shard: &str,
        checkpoint: Option<&str>,
    ) -> Result<ShardReader, SourceError> {
        let mut reader = ShardReader {
            client,
            stream: stream.to_owned(),
            shard: shard.to_owned(),
            iterator: None,
            position: checkpoint.map(str::to_owned),
            last_poll: None,
        };
        reader.iterator = Some(reader.iterator_at().await?);
        Ok(reader)
    }

    async fn iterator_at(&self) -> Result<String, SourceError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard);
        let request = match &self.position {
            Some(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let output = request.send().await.map_err(unavailable)?;
        output.shard_iterator().map(str::to_owned).ok_or_else(|| {
            SourceError::Unavailable(format!("no iterator for shard {}", self.shard))
        })
    }

    /// The next records, waiting out the poll interval; throttling is
    /// retried with backoff, an expired iterator renewed.
    pub async fn next(&mut self) -> Result<Poll, SourceError> {
        let Some(iterator) = self.iterator.clone() else {
            return Ok(Poll {
                records: Vec::new(),
                end: true,
                behind_ms: None,
            });
        };
        let mut attempt = 0;
        let mut iterator = iterator;
        loop {
            if let Some(last) = self.last_poll {
                tokio::time::sleep_until((last + POLL_INTERVAL).into()).await;
            }
            self.last_poll = Some(Instant::now());
            let result = self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(MAX_RECORDS)
                .send()
                .await;
            match result {
                Ok(output) => {
                    let records = output.records().to_vec();
                    if let Some(last) = records.last() {
                        self.position = Some(last.sequence_number().to_owned());
                    }
                    self.iterator = output.next_shard_iterator().map(str::to_owned);
                    return Ok(Poll {
                        end: self.iterator.is_none(),
                        behind_ms: output.millis_behind_latest(),
                        records,
                    });
                }
                Err(e) => {
                    let code = e.as_service_error().and_then(|e| e.code()).unwrap_or("");
                    match code {
                        "ProvisionedThroughputExceededException" | "KMSThrottlingException"
                            if attempt < 10 =>
                        {
                            attempt += 1;
                            tracing::debug!(shard = %self.shard, attempt, "GetRecords throttled; backing off");
                            crate::backoff::sleep(attempt).await;
                        }
                        "ExpiredIteratorException" => {
                            iterator = self.iterator_at().await?;
                        }
                        _ => return Err(unavailable(e)),
                    }
                }
            }
        }
    }
}

/// A record's events: one JSON object, or several as NDJSON. Positions are
/// `{shard}:{sequence}` (`:{line}` for each line of a multi-line record).
/// Lines that are not events (or larger than `max_event_bytes`) are
/// returned beside, as dead letters naming why.
pub fn events(
    shard: &str,
    record: &Record,
    tenant_field: &str,
    arrival: i64,
    max_event_bytes: usize,
) -> (Vec<Incoming>, Vec<DeadLetter>) {
    let seq = SeqNo::new(record.sequence_number());
    let arrival = record
        .approximate_arrival_timestamp()
        .and_then(|t| t.to_millis().ok())
        .unwrap_or(arrival);
    let mut events = Vec::new();
    let mut bad = Vec::new();
    let letter = |position: String, cause: &str, reason: String, text: &str| DeadLetter {
        id: dead_letter_id(shard, &position, None),
        seq: None,
        at: arrival,
        tenant: None,
        rule: None,
        source: shard.to_owned(),
        position,
        cause: cause.to_owned(),
        reason,
        event: text.to_owned(),
    };
    let data = record.data().as_ref();
    let text = match std::str::from_utf8(data) {
        Ok(text) => text,
        Err(e) => {
            let position = format!("{shard}:{}", record.sequence_number());
            bad.push(letter(
                position.clone(),
                "malformed",
                format!("record {position}: not UTF-8: {e}"),
                &String::from_utf8_lossy(data),
            ));
            return (events, bad);
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for (n, line) in lines.iter().enumerate() {
        let position = if lines.len() == 1 {
            format!("{shard}:{}", record.sequence_number())
        } else {
            format!("{shard}:{}:{}", record.sequence_number(), n + 1)
        };
        match Incoming::parse_within(line, tenant_field, arrival, max_event_bytes) {
            Ok(mut event) => {
                event.position = position;
                event.seq = seq.clone();
                events.push(event);
            }
            Err(e) => {
                let reason = format!("record {position}: {e}");
                bad.push(letter(position, e.kind(), reason, line));
            }
        }
    }
    (events, bad)
}
