//! One commit of the DynamoDB store, in three steps: [`plan`] each bucket's
//! new item (with its timer index changes and its alerts), [`chunk`] them
//! into as few `TransactWriteItems` as DynamoDB's limits allow, and
//! [`DynamoStore::send`] each chunk with what rides along: the chunk's
//! alerts as outbox items, outbox items published since the partition's
//! last commit (deleted), the request receipts and the lease's check or
//! checkpoint (with the last chunk).
//!
//! A batch split over several transactions is still applied once when it
//! comes again: each bucket remembers the last sequence number it applied
//! per partition. HTTP batches have no sequence numbers: one that needed
//! more than one transaction and failed part-way is answered with an
//! error, and its retry applies the buckets the first attempt wrote again.
//! Batches that small transactions hold (up to about 90 buckets) are
//! atomic.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem, Update,
};

use super::{
    BUCKET_SK, Cached, DELETED_TTL_SECS, DynamoStore, MAX_ACTIONS, MAX_OUTBOX_ITEM_BYTES,
    MAX_TRANSACTION_BYTES, OUTBOX_TTL_SECS, OutboxKey, RECEIPT_SK, bucket_pk, build_err, cancelled,
    checkpoint_text, outbox_parts, receipt_pk, retryable, store_err,
};
use crate::alert::AlertRecord;
use crate::aws::{EXPIRES, PK, SK, Usage, n, s};
use crate::runtime::{StateChange, TimerChange};
use crate::store::{
    BucketId, BucketWrite, Commit, Fence, Outbox, OutboxMark, Position, Result, StoreError,
};

/// One bucket's item as a commit will write it.
pub(super) struct Planned {
    id: BucketId,
    new: Cached,
    put: Put,
    /// Its timer's index items to write and remove.
    index: Vec<TransactWriteItem>,
    alerts: Vec<AlertRecord>,
    /// Bytes it adds to the transaction, alerts included.
    size: usize,
}

/// Actions a transaction of buckets keeps free for the lease's.
const RESERVED_ACTIONS: usize = 4;

/// The outbox items of a partition written by one commit: what
/// [`DynamoStore::published`] deletes with the partition's next commit.
#[derive(Debug, Clone)]
pub(super) struct Written {
    pub partition: String,
    pub keys: Vec<OutboxKey>,
}

impl DynamoStore {
    /// Commit one batch (see the module docs).
    pub(super) async fn commit_batch(&self, commit: Commit) -> Result<Outbox> {
        let Commit {
            writes,
            progress,
            partition,
            now_ms,
        } = commit;
        let planned = self.plan(writes, progress.position.as_ref(), now_ms)?;
        let chunks = chunk(&planned, progress.receipts.len());
        let mut receipts = Vec::new();
        for (key, answer) in progress.receipts {
            let put = Put::builder()
                .table_name(&self.table.name)
                .item(PK, s(receipt_pk(&key)))
                .item(SK, s(RECEIPT_SK))
                .item("answer", AttributeValue::B(Blob::new(answer)))
                .item(
                    EXPIRES,
                    n((now_ms + crate::store::RECEIPT_RETENTION_MS) / 1000 + 1),
                )
                .build()
                .map_err(build_err)?;
            receipts.push(TransactWriteItem::builder().put(put).build());
        }
        let lease = match &progress.position {
            Some(position) => Some(self.lease_actions(position)?),
            None => None,
        };
        self.send(&partition, planned, chunks, receipts, lease, now_ms)
            .await
    }

    /// Each bucket's new item, and the alerts it raised.
    fn plan(
        &self,
        writes: Vec<BucketWrite>,
        position: Option<&Position>,
        now_ms: i64,
    ) -> Result<Vec<Planned>> {
        let mut planned = Vec::with_capacity(writes.len());
        for write in writes {
            let old = self.cached(&write.id).unwrap_or_default();
            let mut new = old.clone();
            new.version = old.version + 1;
            if let Some(Position {
                fence,
                last: Some(last),
                ..
            }) = position
            {
                new.applied.insert(fence.shard.clone(), last.clone());
            }
            {
                let finished = self.finished.lock().expect("finished lock");
                new.applied.retain(|shard, _| !finished.contains(shard));
            }
            match write.state {
                StateChange::Unchanged => {}
                StateChange::Set(bytes) => new.state = Some(Arc::from(bytes)),
                StateChange::Delete => new.state = None,
            }
            match write.timer {
                TimerChange::Keep => {}
                TimerChange::Set(at) => new.timer = Some(at),
                TimerChange::Cancel => new.timer = None,
            }
            let mut item = HashMap::from([
                (PK.to_owned(), s(bucket_pk(&write.id))),
                (SK.to_owned(), s(BUCKET_SK)),
                ("tenant".to_owned(), s(&write.id.tenant)),
                ("rule".to_owned(), s(&write.id.rule)),
                ("bucket".to_owned(), s(&write.id.bucket)),
                ("version".to_owned(), n(new.version)),
                (
                    "applied".to_owned(),
                    AttributeValue::M(
                        new.applied
                            .iter()
                            .map(|(shard, seq)| (shard.clone(), s(seq.as_str())))
                            .collect(),
                    ),
                ),
            ]);
            let mut size = 200
                + write.id.tenant.len() * 2
                + write.id.rule.len() * 2
                + write.id.bucket.len() * 2;
            if let Some(state) = &new.state {
                item.insert(
                    "state".to_owned(),
                    AttributeValue::B(Blob::new(state.to_vec())),
                );
                size += state.len();
            }
            if let Some(timer) = new.timer {
                item.insert("timer".to_owned(), n(timer));
            }
            new.expires_at = match (&new.state, write.ttl_ms) {
                (None, _) => Some(now_ms / 1000 + DELETED_TTL_SECS),
                (Some(_), Some(ttl)) => Some((now_ms + ttl as i64) / 1000 + 1),
                (Some(_), None) => None,
            };
            if let Some(at) = new.expires_at {
                item.insert(EXPIRES.to_owned(), n(at));
            }
            let mut put = Put::builder()
                .table_name(&self.table.name)
                .set_item(Some(item));
            put = if old.version == 0 {
                put.condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK)
            } else {
                put.condition_expression("#version = :version")
                    .expression_attribute_names("#version", "version")
                    .expression_attribute_values(":version", n(old.version))
            };
            let put = put.build().map_err(build_err)?;
            let index = self.index_changes(&write.id, old.timer, new.timer)?;
            let alert_bytes: usize = write
                .alerts
                .iter()
                .map(|a| a.title.len() + a.key.len() + a.bucket.len() + a.detail.get().len() + 400)
                .sum();
            planned.push(Planned {
                id: write.id,
                new,
                put,
                index,
                alerts: write.alerts,
                size: size + alert_bytes,
            });
        }
        Ok(planned)
    }

    /// The lease's actions: checking the fence (every chunk but the last),
    /// and checking it while moving the checkpoint (the last, if it moves).
    fn lease_actions(&self, position: &Position) -> Result<LeaseActions> {
        let Fence {
            stream,
            shard,
            owner,
            epoch,
        } = &position.fence;
        let key = HashMap::from([
            (PK.to_owned(), s(super::leases::lease_pk(stream))),
            (SK.to_owned(), s(shard)),
        ]);
        let values = HashMap::from([
            (":owner".to_owned(), s(owner)),
            (":epoch".to_owned(), n(epoch)),
        ]);
        const FENCE: &str = "#owner = :owner AND #epoch = :epoch";
        let names = HashMap::from([
            ("#owner".to_owned(), "owner".to_owned()),
            ("#epoch".to_owned(), "epoch".to_owned()),
        ]);
        let check = ConditionCheck::builder()
            .table_name(&self.table.name)
            .set_key(Some(key.clone()))
            .condition_expression(FENCE)
            .set_expression_attribute_names(Some(names.clone()))
            .set_expression_attribute_values(Some(values.clone()))
            .build()
            .map_err(build_err)?;
        let check = TransactWriteItem::builder().condition_check(check).build();
        let last = match &position.checkpoint {
            Some(checkpoint) => {
                let update = Update::builder()
                    .table_name(&self.table.name)
                    .set_key(Some(key))
                    .update_expression("SET #checkpoint = :checkpoint")
                    .condition_expression(FENCE)
                    .set_expression_attribute_names(Some(names))
                    .expression_attribute_names("#checkpoint", "checkpoint")
                    .set_expression_attribute_values(Some(values))
                    .expression_attribute_values(":checkpoint", s(checkpoint_text(checkpoint)))
                    .build()
                    .map_err(build_err)?;
                TransactWriteItem::builder().update(update).build()
            }
            None => check.clone(),
        };
        Ok(LeaseActions {
            shard: shard.clone(),
            epoch: *epoch,
            check,
            last,
        })
    }

    /// Send the chunks in order; see the module docs.
    async fn send(
        &self,
        partition: &str,
        planned: Vec<Planned>,
        chunks: Vec<Vec<usize>>,
        mut receipts: Vec<TransactWriteItem>,
        lease: Option<LeaseActions>,
        now_ms: i64,
    ) -> Result<Outbox> {
        let mut committed = Outbox::default();
        let mut outbox_keys: Vec<OutboxKey> = Vec::new();
        // Taken out: a partition with nothing to delete has no entry.
        let mut deletes = self
            .retired
            .lock()
            .expect("retired lock")
            .remove(partition)
            .unwrap_or_default();
        let mut deleted: Vec<OutboxKey> = Vec::new();
        let last_chunk = chunks.len() - 1;
        // The last chunk holding buckets (plus one: `n_chunk + 1` compares).
        let last_bucket_chunk = chunks.iter().rposition(|c| !c.is_empty()).unwrap_or(0) + 1;
        let epoch = lease.as_ref().map_or(0, |l| l.epoch);
        let mut planned: Vec<Option<Planned>> = planned.into_iter().map(Some).collect();
        for (n_chunk, chunk) in chunks.into_iter().enumerate() {
            let mut items: Vec<TransactWriteItem> = Vec::new();
            // What each action is, to read cancellation reasons.
            let mut roles: Vec<Option<BucketId>> = Vec::new();
            let mut chunk_alerts: Vec<AlertRecord> = Vec::new();
            let mut updated: Vec<(BucketId, Cached)> = Vec::new();
            for i in chunk {
                let Planned {
                    id,
                    new,
                    put,
                    index,
                    alerts,
                    ..
                } = planned[i].take().expect("planned once");
                items.push(TransactWriteItem::builder().put(put).build());
                roles.push(Some(id.clone()));
                for action in index {
                    items.push(action);
                    roles.push(None);
                }
                chunk_alerts.extend(alerts);
                updated.push((id, new));
            }
            let mut outbox = Vec::new();
            for part in outbox_parts(&chunk_alerts) {
                let serial = self
                    .outbox_serial
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The writer's nonce: hosts sharing a partition (HTTP hosts
                // behind one balancer) never write the same key.
                let key = OutboxKey {
                    pk: super::outbox_pk(&self.stream, partition),
                    sk: format!("{epoch:012}#{now_ms:014}#{serial:012}#{:08x}", self.nonce),
                };
                let put = Put::builder()
                    .table_name(&self.table.name)
                    .item(PK, s(&key.pk))
                    .item(SK, s(&key.sk))
                    .item("alerts", s(part))
                    .item(EXPIRES, n(now_ms / 1000 + OUTBOX_TTL_SECS))
                    .build()
                    .map_err(build_err)?;
                items.push(TransactWriteItem::builder().put(put).build());
                roles.push(None);
                outbox.push(key);
            }
            if n_chunk + 1 >= last_bucket_chunk {
                while items.len() < MAX_ACTIONS - 1
                    && let Some(receipt) = receipts.pop()
                {
                    items.push(receipt);
                    roles.push(None);
                }
            }
            let first_delete = deleted.len();
            while items.len() < MAX_ACTIONS - 1
                && let Some(key) = deletes.pop()
            {
                let delete = Delete::builder()
                    .table_name(&self.table.name)
                    .key(PK, s(&key.pk))
                    .key(SK, s(&key.sk))
                    .build()
                    .map_err(build_err)?;
                items.push(TransactWriteItem::builder().delete(delete).build());
                roles.push(None);
                deleted.push(key);
            }
            let lease_index = lease.as_ref().map(|lease| {
                items.push(if n_chunk == last_chunk {
                    lease.last.clone()
                } else {
                    lease.check.clone()
                });
                items.len() - 1
            });

            let mut attempt = 0;
            loop {
                Usage::count(&self.table.usage.commits);
                let sent = self
                    .table
                    .client
                    .transact_write_items()
                    .set_transact_items(Some(items.clone()))
                    .send()
                    .await;
                let fenced = lease.as_ref().map(|l| l.shard.as_str()).unwrap_or("");
                let failure = match sent {
                    Ok(_) => break,
                    Err(error) => match cancelled(&error, lease_index, &roles, fenced) {
                        Some(Err(e)) => e,
                        // Contention on an item: try again shortly.
                        Some(Ok(())) | None if attempt < 5 && retryable(&error) => {
                            attempt += 1;
                            crate::backoff::sleep(attempt).await;
                            continue;
                        }
                        _ if retryable(&error) => store_err(error),
                        _ => StoreError::Invalid(format!(
                            "DynamoDB refused the commit: {}",
                            crate::aws::error_text(error)
                        )),
                    },
                };
                // Earlier chunks are durable: their outbox items stay in
                // the table for `unpublished`. The deletes not done wait
                // for the next commit.
                deletes.extend(deleted.drain(first_delete..));
                self.retire_later(partition, deletes);
                return Err(failure);
            }
            let mut cache = self.cache.lock().expect("cache lock");
            for (id, new) in updated {
                // Another lane's batch on this host may have written newer.
                match cache.get(&id) {
                    Some(known) if known.version > new.version => {}
                    _ => {
                        cache.insert(id, new);
                    }
                }
            }
            committed.alerts.extend(chunk_alerts);
            outbox_keys.extend(outbox);
        }
        // Deletes that did not fit wait for the next commit.
        self.retire_later(partition, deletes);
        if !outbox_keys.is_empty() {
            committed.mark = OutboxMark::new(Written {
                partition: partition.to_owned(),
                keys: outbox_keys,
            });
        }
        Ok(committed)
    }

    /// Published outbox items of `partition` to delete with its next commit.
    pub(super) fn retire_later(&self, partition: &str, keys: Vec<OutboxKey>) {
        if keys.is_empty() {
            return;
        }
        let mut retired = self.retired.lock().expect("retired lock");
        let waiting = retired.entry(partition.to_owned()).or_default();
        for key in keys {
            if !waiting.contains(&key) {
                waiting.push(key);
            }
        }
    }
}

/// The lease's two forms of action in a commit.
struct LeaseActions {
    shard: String,
    epoch: u64,
    /// Every chunk but the last: the fence holds.
    check: TransactWriteItem,
    /// The last: the fence holds, and the checkpoint moves if it does.
    last: TransactWriteItem,
}

/// The buckets of each transaction: as few as the limits allow, with room
/// for the outbox items each chunk writes, the lease's action and, in the
/// last, the receipts.
fn chunk(planned: &[Planned], receipts: usize) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = vec![Vec::new()];
    let mut actions = 0;
    let mut bytes = 0;
    for (
        i,
        Planned {
            alerts,
            size,
            index,
            ..
        },
    ) in planned.iter().enumerate()
    {
        let outbox_items = if alerts.is_empty() {
            0
        } else {
            1 + size / MAX_OUTBOX_ITEM_BYTES
        };
        let bucket_actions = 1 + index.len() + outbox_items;
        if !chunks.last().expect("a chunk").is_empty()
            && (actions + bucket_actions + 2 > MAX_ACTIONS - RESERVED_ACTIONS
                || bytes + size > MAX_TRANSACTION_BYTES)
        {
            chunks.push(Vec::new());
            actions = 0;
            bytes = 0;
        }
        chunks.last_mut().expect("a chunk").push(i);
        actions += bucket_actions;
        bytes += size;
    }
    // Receipts go in the last transactions (a receipt written means its
    // request applied): beside the last chunk's buckets while they fit,
    // then in chunks of their own.
    let room = (MAX_ACTIONS - 1).saturating_sub(actions + 2);
    let mut rest = receipts.saturating_sub(room);
    while rest > 0 {
        chunks.push(Vec::new());
        rest = rest.saturating_sub(MAX_ACTIONS - 1);
    }
    chunks
}
