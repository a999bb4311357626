//! The DynamoDB state store: one item per bucket (tenant, rule, bucket key)
//! holding the state, a version, the last sequence number applied from each
//! shard, the pending timer and an expiry time.
//!
//! A batch from one shard commits in one `TransactWriteItems` (split only
//! past DynamoDB's 100-action limit): every changed bucket, conditional on
//! the version this host read; the alerts raised, as outbox items; and the
//! shard's checkpoint on its lease item, conditional on this host still
//! holding the lease at the same epoch. A paused host whose lease was taken
//! over therefore cannot overwrite newer state, and two hosts writing one
//! bucket (a producer that does not partition by tenant) resolve through the
//! version check. Because each bucket remembers what it applied per shard, a
//! batch replayed after a crash, even one split over several transactions,
//! is applied once. State does not depend on the shard, so it survives
//! splits and merges.
//!
//! A lease owner serves reads from its cache: steady state reads nothing.
//!
//! Pending timers are indexed by due time: beside its bucket item, a bucket
//! with a timer has an index item in one of [`TIMER_PARTITIONS`] timer
//! partitions (by a hash of the bucket), keyed by due time, written and
//! removed in the bucket's transaction, so the index never disagrees with
//! the buckets. Bucket state does not belong to a shard (any shard's events
//! may reach a bucket), so timers are not fired by shard owners: each timer
//! partition has a lease of its own, shared out among the hosts like the
//! shards' (`lease#{stream}#timers`), and its holder fires the partition's
//! due timers through a lane of its own, fenced by that lease. A firing and
//! an event batch touching the same bucket on different hosts resolve like
//! any two writers, through the bucket's version.
//!
//! The outbox is this store's too: a commit's alerts are written as outbox
//! items of its partition (a shard, a timer partition, or `http`); once
//! published they are deleted along with the partition's next commits (as
//! many as fit beside its writes; the rest wait for the commit after). A new
//! lease owner, or a host whose publish or commit failed, reads what is left
//! through [`StateStore::unpublished`]. HTTP hosts behind one balancer share
//! the `http` partition: a host starting, or catching up after a failure,
//! publishes what the others have not published yet too, so an alert may
//! reach the sink twice (with one `id`), never not at all.
//!
//! Request receipts (the HTTP source's idempotency keys) are items of their
//! own, written in the commit's last transaction and kept a day by the TTL:
//! a retry reaching any host of the deployment is answered from them.
//!
//! Leases ([`leases`]) are items of the same table; a commit made under one
//! checks it in every transaction and moves its checkpoint in the last.
//! [`commit`] is the write path, step by step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod commit;
pub mod leases;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, KeysAndAttributes, Put, TransactWriteItem,
};

use super::cache::BucketCache;
use super::{
    BucketId, Checkpoint, Commit, Outbox, OutboxMark, Prior, Result, SHARD_END, StateStore,
    StoreError,
};
use crate::alert::AlertRecord;
use crate::aws::{EXPIRES, PK, SK, Table, Usage, n, s};
use crate::event::SeqNo;

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(format!("DynamoDB: {}", crate::aws::error_text(e)))
}

fn build_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("DynamoDB request: {e}"))
}

fn unreadable(message: String) -> StoreError {
    StoreError::Invalid(message)
}

/// DynamoDB's item limit is 400 KB; the rest of a bucket item is small.
pub const MAX_STATE_BYTES: usize = 390 * 1024;
/// Actions per `TransactWriteItems`: DynamoDB's limit is 100.
const MAX_ACTIONS: usize = 100;
/// Bytes per transaction: DynamoDB's limit is 4 MB.
const MAX_TRANSACTION_BYTES: usize = 3 << 20;
/// Alerts JSON per outbox item.
const MAX_OUTBOX_ITEM_BYTES: usize = 300 * 1024;
/// Keys per `BatchGetItem`.
const MAX_BATCH_GET: usize = 100;
/// How long published outbox items linger if nobody deletes them.
const OUTBOX_TTL_SECS: i64 = 7 * 24 * 3600;
/// How long a deleted bucket's item (its applied positions) is kept.
const DELETED_TTL_SECS: i64 = 24 * 3600;
/// The sort key of a request's receipt item.
const RECEIPT_SK: &str = "receipt";

/// What this host knows of one bucket item.
#[derive(Debug, Clone, Default)]
pub struct Cached {
    pub state: Option<Arc<[u8]>>,
    /// 0: no item.
    pub version: u64,
    /// Last sequence number applied, per shard.
    pub applied: HashMap<String, SeqNo>,
    pub timer: Option<i64>,
    /// When DynamoDB may delete the item (its TTL), epoch seconds: past it
    /// the bucket reads as having no state, since TTL deletion lags.
    pub expires_at: Option<i64>,
}

fn checkpoint_text(checkpoint: &Checkpoint) -> &str {
    match checkpoint {
        Checkpoint::At(seq) => seq.as_str(),
        Checkpoint::End => SHARD_END,
    }
}

/// The key of one outbox item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxKey {
    pub pk: String,
    pub sk: String,
}

/// The partition key of a bucket item: its identity as a JSON array, so no
/// tenant, rule or bucket text can collide with another.
pub fn bucket_pk(id: &BucketId) -> String {
    let parts = serde_json::to_string(&[&id.tenant, &id.rule, &id.bucket]).expect("strings");
    if parts.len() <= MAX_PLAIN_KEY_BYTES {
        return format!("bucket#{parts}");
    }
    // DynamoDB partition keys take at most 2 KiB: a long identity is
    // hashed (the item keeps tenant, rule and bucket as attributes).
    use sha2::Digest;
    format!(
        "bucket#sha256:{}",
        hex::encode(sha2::Sha256::digest(parts.as_bytes()))
    )
}

/// Longest bucket identity written into a partition key as it is.
const MAX_PLAIN_KEY_BYTES: usize = 1024;

const BUCKET_SK: &str = "state";

/// Timer partitions of a stream: how many hosts can share the firing of its
/// timers. Fixed, because a bucket's partition must not move: looking at
/// one costs one small query per half second (see `source::timers`).
pub const TIMER_PARTITIONS: u32 = 8;

/// The timer partitions' names, which their leases and lanes go by.
pub fn timer_partitions() -> impl Iterator<Item = String> {
    (0..TIMER_PARTITIONS).map(|p| format!("timers-{p}"))
}

/// The timer partition holding `id`'s timer.
pub fn timer_partition(id: &BucketId) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bucket_pk(id).as_bytes());
    let p = u32::from_le_bytes(hash[..4].try_into().expect("four bytes")) % TIMER_PARTITIONS;
    format!("timers-{p}")
}

/// The lease "stream" of `stream`'s timer partitions.
pub fn timer_leases(stream: &str) -> String {
    format!("{stream}#timers")
}

fn timers_pk(stream: &str, partition: &str) -> String {
    format!("timers#{stream}#{partition}")
}

/// An index item's sort key: due time first, so a query reads the due ones
/// in order; then the bucket, hashed (sort keys take at most 1 KiB).
fn timer_sk(due: i64, id: &BucketId) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bucket_pk(id).as_bytes());
    format!("{:020}#{}", due.max(0), hex::encode(&hash[..16]))
}

/// Sort keys of timers due at or before `until` are below this.
fn due_bound(until: i64) -> String {
    format!("{:020}", until.max(-1).saturating_add(1))
}

pub fn outbox_pk(stream: &str, shard: &str) -> String {
    format!("outbox#{stream}#{shard}")
}

/// The partition key of the receipt stored under an idempotency key.
fn receipt_pk(key: &str) -> String {
    let key = serde_json::to_string(key).expect("a string");
    if key.len() <= MAX_PLAIN_KEY_BYTES {
        return format!("receipt#{key}");
    }
    use sha2::Digest;
    format!(
        "receipt#sha256:{}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

/// Bucket state in DynamoDB, with this host's cache in front.
pub struct DynamoStore {
    table: Table,
    /// The deployment's name in its keys: the events stream (whose shards'
    /// outboxes and leases this store keeps), or `http`.
    stream: String,
    /// This store's own, in its outbox items' keys.
    nonce: u32,
    cache: Mutex<BucketCache<Cached>>,
    /// Outbox items per shard written by this host: a counter for their keys.
    outbox_serial: std::sync::atomic::AtomicU64,
    /// Per shard: outbox items published and not yet deleted.
    retired: Mutex<HashMap<String, Vec<OutboxKey>>>,
    /// Shards read to their end: no batch of theirs runs again, so buckets
    /// need not remember what they applied from them.
    finished: Mutex<std::collections::HashSet<String>>,
    /// The host's clock: what has expired.
    clock: Arc<dyn crate::clock::Clock>,
    /// No host owns a partition of the events (HTTP hosts behind one
    /// balancer): every batch reads its buckets afresh.
    read_through: bool,
}

/// Buckets a host keeps in memory by default: about 200 MB of small states.
pub const DEFAULT_MAX_CACHED: usize = 1_000_000;

impl DynamoStore {
    /// The store of a host of the deployment `stream` names (the events
    /// stream, or `http` for HTTP hosts).
    pub fn new(table: Table, stream: &str) -> Self {
        Self::with_cache(table, stream, DEFAULT_MAX_CACHED)
    }

    /// A store whose cache holds at most `max_cached` buckets. Past that,
    /// buckets not being loaded are dropped; one dropped while a batch uses
    /// it only costs that batch a version conflict and a reread.
    pub fn with_cache(table: Table, stream: &str, max_cached: usize) -> Self {
        DynamoStore {
            table,
            stream: stream.to_owned(),
            nonce: rand::random(),
            cache: Mutex::new(BucketCache::new(max_cached)),
            outbox_serial: std::sync::atomic::AtomicU64::new(0),
            retired: Mutex::default(),
            finished: Mutex::default(),
            clock: Arc::new(crate::clock::SystemClock),
            read_through: false,
        }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn usage(&self) -> &Usage {
        &self.table.usage
    }

    /// Buckets in the cache.
    pub fn cached_len(&self) -> usize {
        self.cache.lock().expect("cache lock").len()
    }

    /// Read every batch's buckets from the table, not from this host's
    /// cache: for hosts that share the events themselves (HTTP hosts
    /// behind one balancer), where any of them may have written a bucket
    /// last. Costs one `BatchGetItem` per 100 buckets of a batch.
    pub fn read_through(mut self) -> Self {
        self.read_through = true;
        self
    }

    /// Read expiry against `clock` (the host's).
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// What a batch of `shard` runs `id` on: its cached state and the last
    /// sequence number of `shard` it applied (nothing if not cached). A
    /// state past its time-to-live is none, whether or not DynamoDB has
    /// deleted it yet; what the bucket applied still counts.
    fn prior(&self, id: &BucketId, shard: &str) -> Prior {
        let now_secs = self.clock.now_ms().div_euclid(1000);
        let cache = self.cache.lock().expect("cache lock");
        match cache.get(id) {
            Some(item) => Prior {
                state: item
                    .state
                    .clone()
                    .filter(|_| item.expires_at.is_none_or(|at| at > now_secs)),
                applied: item.applied.get(shard).cloned(),
            },
            None => Prior::state(None),
        }
    }

    /// The cached item of `id`, if known.
    pub fn cached(&self, id: &BucketId) -> Option<Cached> {
        self.cache.lock().expect("cache lock").get(id).cloned()
    }

    /// Read into the cache every bucket of `ids` it does not hold, in
    /// batches, with strongly consistent reads.
    pub async fn fetch(&self, ids: impl IntoIterator<Item = BucketId>) -> Result<()> {
        let missing: Vec<BucketId> = {
            let cache = self.cache.lock().expect("cache lock");
            let mut missing: Vec<BucketId> =
                ids.into_iter().filter(|id| !cache.contains(id)).collect();
            missing.sort();
            missing.dedup();
            missing
        };
        for chunk in missing.chunks(MAX_BATCH_GET) {
            let by_pk: HashMap<String, &BucketId> =
                chunk.iter().map(|id| (bucket_pk(id), id)).collect();
            let mut keys: Vec<HashMap<String, AttributeValue>> = by_pk
                .keys()
                .map(|pk| HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(BUCKET_SK))]))
                .collect();
            let mut found: HashMap<BucketId, Cached> = HashMap::new();
            let mut attempt = 0u32;
            while !keys.is_empty() {
                Usage::count(&self.table.usage.bucket_reads);
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut keys)))
                    .consistent_read(true)
                    .build()
                    .map_err(build_err)?;
                let output = self
                    .table
                    .client
                    .batch_get_item()
                    .request_items(&self.table.name, request)
                    .send()
                    .await
                    .map_err(store_err)?;
                for item in output
                    .responses()
                    .and_then(|r| r.get(&self.table.name))
                    .into_iter()
                    .flatten()
                {
                    let pk = item.get(PK).and_then(|v| v.as_s().ok());
                    if let Some(id) = pk.and_then(|pk| by_pk.get(pk)) {
                        found.insert((*id).clone(), decode(item)?);
                    }
                }
                if let Some(rest) = output
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table.name))
                {
                    keys = rest.keys().to_vec();
                    attempt += 1;
                    crate::backoff::sleep(attempt).await;
                }
            }
            let mut cache = self.cache.lock().expect("cache lock");
            let keep: std::collections::HashSet<&BucketId> = missing.iter().collect();
            cache.make_room(chunk.len(), |id| keep.contains(id));
            for id in chunk {
                let item = found.remove(id).unwrap_or_default();
                if !cache.contains(id) {
                    cache.insert(id.clone(), item);
                }
            }
        }
        Ok(())
    }

    /// Every stored bucket of `tenant`'s rule (reads the table: for tools
    /// and tests, not the data path).
    pub async fn scan_buckets(&self) -> Result<Vec<(BucketId, Cached)>> {
        let mut pages = self
            .table
            .client
            .scan()
            .table_name(&self.table.name)
            .filter_expression("begins_with(#pk, :prefix)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":prefix", s("bucket#"))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        let mut buckets = Vec::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(store_err)?;
            let field = |name: &str| {
                item.get(name)
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .ok_or_else(|| unreadable(format!("bucket item without `{name}`")))
            };
            let id = BucketId {
                tenant: field("tenant")?,
                rule: field("rule")?,
                bucket: field("bucket")?,
            };
            buckets.push((id, decode(&item)?));
        }
        buckets.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(buckets)
    }

    /// The index actions of a bucket whose timer goes from `old` to `new`.
    fn index_changes(
        &self,
        id: &BucketId,
        old: Option<i64>,
        new: Option<i64>,
    ) -> Result<Vec<TransactWriteItem>> {
        if old == new {
            return Ok(Vec::new());
        }
        let pk = timers_pk(&self.stream, &timer_partition(id));
        let mut actions = Vec::new();
        if let Some(at) = old {
            let delete = Delete::builder()
                .table_name(&self.table.name)
                .key(PK, s(&pk))
                .key(SK, s(timer_sk(at, id)))
                .build()
                .map_err(build_err)?;
            actions.push(TransactWriteItem::builder().delete(delete).build());
        }
        if let Some(at) = new {
            let put = Put::builder()
                .table_name(&self.table.name)
                .item(PK, s(&pk))
                .item(SK, s(timer_sk(at, id)))
                .item("tenant", s(&id.tenant))
                .item("rule", s(&id.rule))
                .item("bucket", s(&id.bucket))
                .item("due", n(at))
                .build()
                .map_err(build_err)?;
            actions.push(TransactWriteItem::builder().put(put).build());
        }
        Ok(actions)
    }

    /// What `partition`'s index holds due by `until`, earliest first.
    async fn indexed_timers(
        &self,
        partition: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(BucketId, i64)>> {
        Usage::count(&self.table.usage.timer_requests);
        let pk = timers_pk(&self.stream, partition);
        let mut pages = self
            .table
            .client
            .query()
            .table_name(&self.table.name)
            .key_condition_expression("#pk = :pk AND #sk < :bound")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", s(&pk))
            .expression_attribute_values(":bound", s(due_bound(until)))
            .consistent_read(true)
            .limit(i32::try_from(limit.min(1000)).unwrap_or(1000))
            .into_paginator()
            .items()
            .send();
        let mut due = Vec::new();
        while due.len() < limit
            && let Some(item) = pages.next().await
        {
            let item = item.map_err(store_err)?;
            let text = |name: &str| {
                item.get(name)
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .ok_or_else(|| unreadable(format!("timer index item of {pk} without `{name}`")))
            };
            let at = item
                .get("due")
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| unreadable(format!("timer index item of {pk} without `due`")))?;
            let id = BucketId {
                tenant: text("tenant")?,
                rule: text("rule")?,
                bucket: text("bucket")?,
            };
            due.push((id, at));
        }
        Ok(due)
    }

    /// Remove an index item whose bucket no longer has that timer (its item
    /// was deleted by DynamoDB's TTL, or it expired first), if the bucket
    /// is still as read.
    async fn drop_stale_timer(&self, id: &BucketId, at: i64, item: &Cached) -> Result<()> {
        tracing::debug!(tenant = %id.tenant, rule = %id.rule, bucket = %id.bucket, due = at, "timer index item without its timer: removed");
        let delete = Delete::builder()
            .table_name(&self.table.name)
            .key(PK, s(timers_pk(&self.stream, &timer_partition(id))))
            .key(SK, s(timer_sk(at, id)))
            .build()
            .map_err(build_err)?;
        let check = ConditionCheck::builder()
            .table_name(&self.table.name)
            .key(PK, s(bucket_pk(id)))
            .key(SK, s(BUCKET_SK));
        let check = if item.version == 0 {
            check
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", PK)
        } else {
            check
                .condition_expression("#version = :version")
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":version", n(item.version))
        };
        let check = check.build().map_err(build_err)?;
        Usage::count(&self.table.usage.timer_requests);
        let sent = self
            .table
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(check).build())
            .transact_items(TransactWriteItem::builder().delete(delete).build())
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            // Changed meanwhile: its writer keeps the index right.
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception()) =>
            {
                self.forget(std::slice::from_ref(id));
                Ok(())
            }
            Err(error) => Err(store_err(error)),
        }
    }

    /// The alerts of every outbox item of `shard`, oldest first, with their
    /// keys: a new lease owner publishes them before reading the shard.
    async fn outbox(
        &self,
        shard: &str,
        skip: &std::collections::HashSet<OutboxKey>,
    ) -> Result<(Vec<AlertRecord>, Vec<OutboxKey>)> {
        Usage::count(&self.table.usage.outbox_reads);
        let pk = outbox_pk(&self.stream, shard);
        let mut alerts = Vec::new();
        let mut keys = Vec::new();
        for item in self
            .table
            .query_partition(&pk)
            .await
            .map_err(StoreError::Unavailable)?
        {
            let sk = item
                .get(SK)
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default();
            let key = OutboxKey { pk: pk.clone(), sk };
            if skip.contains(&key) {
                continue;
            }
            let OutboxKey { sk, .. } = &key;
            let json = item
                .get("alerts")
                .and_then(|v| v.as_s().ok())
                .ok_or_else(|| unreadable(format!("outbox item {pk}/{sk} has no alerts")))?;
            let part: Vec<AlertRecord> = serde_json::from_str(json)
                .map_err(|e| unreadable(format!("outbox item {pk}/{sk} is unreadable: {e}")))?;
            alerts.extend(part);
            keys.push(key);
        }
        Ok((alerts, keys))
    }
}

/// Alerts as JSON arrays of at most [`MAX_OUTBOX_ITEM_BYTES`] each (a single
/// larger alert gets an item of its own).
fn outbox_parts(alerts: &[AlertRecord]) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    for alert in alerts {
        let json = serde_json::to_string(alert).expect("alerts serialize");
        if !part.is_empty() && part.len() + json.len() + 2 > MAX_OUTBOX_ITEM_BYTES {
            part.push(']');
            parts.push(std::mem::take(&mut part));
        }
        part.push(if part.is_empty() { '[' } else { ',' });
        part.push_str(&json);
    }
    if !part.is_empty() {
        part.push(']');
        parts.push(part);
    }
    parts
}

/// Read a cancelled transaction: `Some(Err)` for a fenced lease or a version
/// conflict, `Some(Ok)` for transient contention, `None` if not cancelled.
fn cancelled<R>(
    error: &SdkError<TransactWriteItemsError, R>,
    lease_index: Option<usize>,
    roles: &[Option<BucketId>],
    shard: &str,
) -> Option<Result<()>> {
    let Some(TransactWriteItemsError::TransactionCanceledException(cancel)) =
        error.as_service_error()
    else {
        return None;
    };
    let reasons = cancel.cancellation_reasons();
    if let Some(lease_index) = lease_index
        && reasons.get(lease_index).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
    {
        return Some(Err(StoreError::Fenced(shard.to_owned())));
    }
    let conflicts: Vec<BucketId> = reasons
        .iter()
        .zip(roles)
        .filter(|(reason, _)| reason.code() == Some("ConditionalCheckFailed"))
        .filter_map(|(_, role)| role.clone())
        .collect();
    if !conflicts.is_empty() {
        return Some(Err(StoreError::Conflict(conflicts)));
    }
    if reasons.is_empty() {
        // An emulator that gives no reasons: a failed condition we cannot
        // place. Let the caller reload everything and retry.
        return Some(Err(StoreError::Conflict(
            roles.iter().flatten().cloned().collect(),
        )));
    }
    Some(Ok(()))
}

fn retryable<R>(error: &SdkError<TransactWriteItemsError, R>) -> bool {
    match error.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(_))
        | Some(TransactWriteItemsError::TransactionInProgressException(_))
        | Some(TransactWriteItemsError::ProvisionedThroughputExceededException(_))
        | Some(TransactWriteItemsError::RequestLimitExceeded(_))
        | Some(TransactWriteItemsError::ThrottlingException(_))
        | Some(TransactWriteItemsError::InternalServerError(_)) => true,
        Some(_) => false,
        None => true,
    }
}

fn decode(item: &HashMap<String, AttributeValue>) -> Result<Cached> {
    let number = |name: &str| -> Result<Option<i64>> {
        match item.get(name) {
            None => Ok(None),
            Some(AttributeValue::N(text)) => text
                .parse()
                .map(Some)
                .map_err(|_| unreadable(format!("bucket item attribute `{name}` is not a number"))),
            Some(_) => Err(unreadable(format!(
                "bucket item attribute `{name}` is not a number"
            ))),
        }
    };
    let mut applied = HashMap::new();
    if let Some(AttributeValue::M(map)) = item.get("applied") {
        for (shard, seq) in map {
            let seq = seq.as_s().ok().and_then(|s| SeqNo::new(s)).ok_or_else(|| {
                unreadable(format!(
                    "bucket item applied position of `{shard}` is not a sequence number"
                ))
            })?;
            applied.insert(shard.clone(), seq);
        }
    }
    Ok(Cached {
        state: match item.get("state") {
            Some(AttributeValue::B(blob)) => Some(Arc::from(blob.as_ref())),
            _ => None,
        },
        version: number("version")?.unwrap_or(0) as u64,
        applied,
        timer: number("timer")?,
        expires_at: number(EXPIRES)?,
    })
}

#[async_trait::async_trait]
impl StateStore for DynamoStore {
    fn max_state_bytes(&self) -> usize {
        MAX_STATE_BYTES
    }

    async fn load(&self, ids: &[BucketId], partition: &str) -> Result<Vec<Prior>> {
        if self.read_through {
            self.forget(ids);
        }
        self.fetch(ids.iter().cloned()).await?;
        Ok(ids.iter().map(|id| self.prior(id, partition)).collect())
    }

    fn forget(&self, ids: &[BucketId]) {
        let mut cache = self.cache.lock().expect("cache lock");
        for id in ids {
            cache.remove(id);
        }
    }

    fn timer_partitions(&self) -> Vec<String> {
        timer_partitions().collect()
    }

    fn partitions_finished(&self, partitions: &[String]) {
        self.finished
            .lock()
            .expect("finished lock")
            .extend(partitions.iter().cloned());
    }

    async fn receipt(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Usage::count(&self.table.usage.bucket_reads);
        let item = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .key(PK, s(receipt_pk(key)))
            .key(SK, s(RECEIPT_SK))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err)?;
        let Some(item) = item.item() else {
            return Ok(None);
        };
        // Past its time to live: DynamoDB's deletion lags.
        let now_secs = self.clock.now_ms().div_euclid(1000);
        if item
            .get(EXPIRES)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .is_some_and(|at| at <= now_secs)
        {
            return Ok(None);
        }
        match item.get("answer") {
            Some(AttributeValue::B(answer)) => Ok(Some(answer.as_ref().to_vec())),
            _ => Err(unreadable(format!("the receipt of `{key}` has no answer"))),
        }
    }

    async fn commit(&self, commit: Commit) -> Result<Outbox> {
        self.commit_batch(commit).await
    }

    async fn unpublished(&self, partition: &str) -> Result<Outbox> {
        let retired: std::collections::HashSet<OutboxKey> = self
            .retired
            .lock()
            .expect("retired lock")
            .get(partition)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        let (alerts, keys) = self.outbox(partition, &retired).await?;
        Ok(Outbox {
            alerts,
            mark: OutboxMark::new(commit::Written {
                partition: partition.to_owned(),
                keys,
            }),
        })
    }

    async fn published(&self, mark: OutboxMark) -> Result<()> {
        if let Some(written) = mark.get::<commit::Written>() {
            self.retire_later(&written.partition, written.keys.clone());
        }
        Ok(())
    }

    async fn due_timers(
        &self,
        partition: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(BucketId, i64)>> {
        let indexed = self.indexed_timers(partition, until, limit).await?;
        if indexed.is_empty() {
            return Ok(indexed);
        }
        // Read the buckets again: another host may have changed them.
        let ids: Vec<BucketId> = indexed.iter().map(|(id, _)| id.clone()).collect();
        self.forget(&ids);
        Usage::count(&self.table.usage.timer_requests);
        self.fetch(ids).await?;
        let mut due = Vec::with_capacity(indexed.len());
        for (id, at) in indexed {
            let item = self.cached(&id).unwrap_or_default();
            // Expired before it was due: the timer went with the state.
            let expired = item.state.is_some()
                && item
                    .expires_at
                    .is_some_and(|expires| expires <= at.div_euclid(1000));
            if item.timer == Some(at) && !expired {
                due.push((id, at));
            } else {
                self.drop_stale_timer(&id, at, &item).await?;
            }
        }
        Ok(due)
    }

    async fn next_timer(&self, partition: &str) -> Result<Option<i64>> {
        Ok(self
            .indexed_timers(partition, i64::MAX - 1, 1)
            .await?
            .first()
            .map(|(_, at)| *at))
    }

    async fn pending_timers(&self, ids: &[BucketId]) -> Result<Vec<Option<i64>>> {
        Ok(ids
            .iter()
            .map(|id| self.cached(id).and_then(|item| item.timer))
            .collect())
    }

    /// None: DynamoDB's TTL deletes expired bucket items (up to days late),
    /// and reads take a state past its time for none before that.
    async fn expired(
        &self,
        _partition: &str,
        _until: i64,
        _limit: usize,
    ) -> Result<Vec<(BucketId, i64)>> {
        Ok(Vec::new())
    }

    async fn next_expiry(&self, _partition: &str) -> Result<Option<i64>> {
        Ok(None)
    }
}
