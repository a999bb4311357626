//! What the distributed engine shares about AWS: clients from the standard
//! `aws-config` chain (credentials, region, and endpoints such as
//! `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB`), the one
//! DynamoDB table (bucket state, shard leases and the alert outbox, told
//! apart by key), request counters, and `tocsin aws init`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_kinesis::types::StreamStatus;

/// Partition key attribute of the table.
pub const PK: &str = "pk";
/// Sort key attribute of the table.
pub const SK: &str = "sk";
/// Epoch-seconds attribute DynamoDB's time-to-live deletes items by.
pub const EXPIRES: &str = "expires";

/// Load the shared AWS configuration the way every AWS tool does.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// A string attribute.
pub fn s(text: impl Into<String>) -> AttributeValue {
    AttributeValue::S(text.into())
}

/// A number attribute.
pub fn n(number: impl ToString) -> AttributeValue {
    AttributeValue::N(number.to_string())
}

/// An AWS SDK error with its whole chain of causes, on one line.
pub fn error_text(e: impl std::error::Error + Send + Sync + 'static) -> String {
    aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string()
}

/// DynamoDB requests made, by kind: the figures `GET /v1/status` reports.
#[derive(Debug, Default)]
pub struct Usage {
    /// Bucket reads (BatchGetItem), cache misses only.
    pub bucket_reads: AtomicU64,
    /// Commits (TransactWriteItems).
    pub commits: AtomicU64,
    /// Lease table requests (Query, PutItem, UpdateItem).
    pub lease_requests: AtomicU64,
    /// Outbox reads at takeover (Query).
    pub outbox_reads: AtomicU64,
    /// Looks at a timer partition's index (Query), and the reads and
    /// clean-ups of the buckets whose timers are due.
    pub timer_requests: AtomicU64,
}

impl Usage {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that serve events (not the lease protocol's heartbeats).
    pub fn data_requests(&self) -> u64 {
        self.bucket_reads.load(Ordering::Relaxed)
            + self.commits.load(Ordering::Relaxed)
            + self.outbox_reads.load(Ordering::Relaxed)
    }
}

/// The DynamoDB table of one deployment.
#[derive(Clone)]
pub struct Table {
    pub client: aws_sdk_dynamodb::Client,
    pub name: String,
    pub usage: Arc<Usage>,
}

impl Table {
    pub fn new(client: aws_sdk_dynamodb::Client, name: &str) -> Self {
        Table {
            client,
            name: name.to_owned(),
            usage: Arc::default(),
        }
    }

    /// Every item of partition `pk`, in sort-key order, strongly
    /// consistent, across pages.
    pub async fn query_partition(
        &self,
        pk: &str,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, String> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.name)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":pk", s(pk))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        let mut items = Vec::new();
        while let Some(item) = pages.next().await {
            items.push(item.map_err(error_text)?);
        }
        Ok(items)
    }
}

/// Create what is missing: the events stream (`shards` shards) and the
/// output streams, and the table with time-to-live on [`EXPIRES`]. What
/// exists is left as it is.
pub async fn init(
    config: &aws_config::SdkConfig,
    events: Option<&str>,
    table: Option<&str>,
    outputs: &[&str],
    shards: i32,
) -> anyhow::Result<Vec<String>> {
    let kinesis = aws_sdk_kinesis::Client::new(config);
    let dynamodb = aws_sdk_dynamodb::Client::new(config);
    let mut done = Vec::new();
    for stream in events.into_iter().chain(outputs.iter().copied()) {
        if create_stream(&kinesis, stream, shards).await? {
            done.push(format!(
                "created Kinesis stream `{stream}` with {shards} shards"
            ));
        } else {
            done.push(format!("Kinesis stream `{stream}` exists"));
        }
    }
    if let Some(table) = table {
        if create_table(&dynamodb, table).await? {
            done.push(format!("created DynamoDB table `{table}`"));
        } else {
            done.push(format!("DynamoDB table `{table}` exists"));
        }
    }
    Ok(done)
}

/// Fail with a message naming what is missing if the events stream, the
/// alerts stream or the table does not exist: a host started before
/// `tocsin aws init` should say so, not wait forever.
pub async fn check_exists(
    config: &aws_config::SdkConfig,
    streams: &[&str],
    table: Option<&str>,
) -> anyhow::Result<()> {
    let kinesis = aws_sdk_kinesis::Client::new(config);
    for stream in streams {
        if !stream_exists(&kinesis, stream).await? {
            bail!(
                "Kinesis stream `{stream}` does not exist: create it with `tocsin aws init` and the same flags"
            );
        }
    }
    if let Some(table) = table
        && !table_exists(&aws_sdk_dynamodb::Client::new(config), table).await?
    {
        bail!(
            "DynamoDB table `{table}` does not exist: create it with `tocsin aws init` and the same flags"
        );
    }
    Ok(())
}

async fn stream_exists(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> anyhow::Result<bool> {
    let described = kinesis
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await;
    found(
        described,
        |e| e.is_resource_not_found_exception(),
        || format!("cannot describe Kinesis stream `{stream}`"),
    )
}

async fn table_exists(dynamodb: &aws_sdk_dynamodb::Client, table: &str) -> anyhow::Result<bool> {
    let described = dynamodb.describe_table().table_name(table).send().await;
    found(
        described,
        |e| e.is_resource_not_found_exception(),
        || format!("cannot describe DynamoDB table `{table}`"),
    )
}

/// Whether a describe call found its resource: a not-found answer is
/// `false`, any other failure an error in the words of `what`.
fn found<T, E, R>(
    described: Result<T, aws_sdk_kinesis::error::SdkError<E, R>>,
    not_found: impl FnOnce(&E) -> bool,
    what: impl FnOnce() -> String,
) -> anyhow::Result<bool>
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match described {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(not_found) => Ok(false),
        Err(e) => Err(anyhow::anyhow!(error_text(e))).with_context(what),
    }
}

async fn create_stream(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    shards: i32,
) -> anyhow::Result<bool> {
    let exists = stream_exists(kinesis, stream).await?;
    if !exists {
        match kinesis
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
        {
            Ok(_) => {}
            // Another `init` got there first.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e.into_service_error()))
                    .with_context(|| format!("cannot create Kinesis stream `{stream}`"));
            }
        }
    }
    wait_active(&format!("Kinesis stream `{stream}`"), || async {
        let summary = kinesis
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .with_context(|| format!("cannot describe Kinesis stream `{stream}`"))?;
        let status = summary
            .stream_description_summary()
            .map(|s| s.stream_status().clone());
        Ok(status == Some(StreamStatus::Active))
    })
    .await?;
    Ok(!exists)
}

/// Poll `active` every 100 ms until it says so, for at most 30 s.
async fn wait_active<F, Fut>(what: &str, mut active: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    for _ in 0..300 {
        if active().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not become active within 30 s")
}

async fn create_table(dynamodb: &aws_sdk_dynamodb::Client, table: &str) -> anyhow::Result<bool> {
    let exists = table_exists(dynamodb, table).await?;
    if !exists {
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
        };
        let attribute = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        let created = dynamodb
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?)
            .attribute_definitions(attribute(PK)?)
            .attribute_definitions(attribute(SK)?)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e.into_service_error()))
                    .with_context(|| format!("cannot create DynamoDB table `{table}`"));
            }
        }
    }
    wait_active(&format!("DynamoDB table `{table}`"), || async {
        let described = dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .with_context(|| format!("cannot describe DynamoDB table `{table}`"))?;
        Ok(described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active))
    })
    .await?;
    dynamodb
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(EXPIRES)
                .build()?,
        )
        .send()
        .await
        .map(|_| ())
        .or_else(|e| {
            // Already enabled is what we want.
            let text = format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e));
            if text.contains("already enabled") {
                Ok(())
            } else {
                Err(anyhow::anyhow!(text))
            }
        })
        .with_context(|| format!("cannot enable time-to-live on DynamoDB table `{table}`"))?;
    Ok(!exists)
}
