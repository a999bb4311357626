//! The embedded store: one redb file in the data directory. Every commit is
//! one durable write transaction, so state, alerts and receipts are applied
//! together or not at all, and survive a crash or a restart.
//!
//! Bucket states go through a log first and into their table many commits'
//! worth at a time (see [`state_log`](super::state_log)). The per-tenant
//! alert index is derived data: a file and a thread of its own write it
//! behind the alert log (see [`alert_index`](super::alert_index)). After a
//! crash, opening the store replays the state log and rebuilds what the
//! index file lacks from the alert log.
//!
//! Progress is recorded in the same transaction as the batch: request
//! receipts, and for a leased partition (a Kinesis shard read by this
//! host) its checkpoint ([`leases`]) and, per bucket written, the last
//! sequence number applied from it, so a batch read again after a crash is
//! applied once even if parts of it committed apart. The outbox is every
//! logged alert not yet published: lanes publish in any order, and the
//! durable `published` cursor only moves past alerts all published.

mod leases;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::State;
use super::alert_index::AlertIndex;
use super::cache::BucketCache;
use super::state_log::{self, Logged, STATE_LOG};
use super::{
    AlertLog, BucketId, Commit, Outbox, OutboxMark, Position, Prior, RECEIPT_RETENTION_MS, Result,
    StateStore, StoreError,
};
use crate::alert::AlertRecord;
use crate::event::SeqNo;
use crate::runtime::{StateChange, TimerChange};

/// (tenant, rule, bucket) → encoded state.
const STATES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("states");
/// (tenant, rule, bucket) → due time of the pending timer.
const TIMERS: TableDefinition<(&str, &str, &str), i64> = TableDefinition::new("timers");
/// (due, tenant, rule, bucket): the pending timers by due time.
const TIMERS_DUE: TableDefinition<(i64, &str, &str, &str), ()> = TableDefinition::new("timers_due");
/// (tenant, rule, bucket) → when the bucket expires, untouched, by its
/// rule's state time-to-live.
const EXPIRY: TableDefinition<(&str, &str, &str), i64> = TableDefinition::new("expiry");
/// (expires at, tenant, rule, bucket): the buckets by expiry.
const EXPIRES: TableDefinition<(i64, &str, &str, &str), ()> = TableDefinition::new("expires");
/// seq → alert record as JSON: the alert log, appended in commit order.
/// Entries after the `published` cursor are the outbox.
const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");
/// Where earlier versions kept the per-tenant index; dropped at open.
const LEGACY_INDEX: TableDefinition<(&str, u64), ()> = TableDefinition::new("tenant_alerts");
/// idempotency key → the answer given.
const RECEIPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("receipts");
/// (stored at, idempotency key): which receipts are due to expire.
const RECEIPT_TIMES: TableDefinition<(i64, &str), ()> = TableDefinition::new("receipt_times");
/// (tenant, rule, bucket, partition) → the partition's last sequence number
/// the bucket applied (written by batches of leased partitions only).
const APPLIED: TableDefinition<(&str, &str, &str, &str), &str> = TableDefinition::new("applied");
/// Counters: `next_seq`; `published` (every alert up to it reached the
/// sink).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Index entries that make the index writer go.
const INDEX_BATCH: usize = 16 * 1024;
/// State changes the log holds before a commit writes them into `states`:
/// bounds their memory and the replay at open.
const STATE_BATCH: usize = 64 * 1024;
/// Expired receipts one commit removes, so pruning never makes one slow.
const RECEIPTS_PRUNED_PER_COMMIT: usize = 1024;
/// The one timer partition: this process fires every timer.
pub const TIMER_PARTITION: &str = "timers";
/// Bucket states kept in memory: about 200 MB of small states.
pub const DEFAULT_MAX_CACHED: usize = 1_000_000;

/// Everything one commit writes, in the store's own terms.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// New state per bucket; `None` deletes it.
    pub states: Vec<(BucketId, Option<Vec<u8>>)>,
    /// Pending timer per bucket; `None` cancels it.
    pub timers: Vec<(BucketId, Option<i64>)>,
    /// When each bucket written expires; `None`: never.
    pub expiries: Vec<(BucketId, Option<i64>)>,
    /// Alerts in the order raised; the store assigns their `seq`.
    pub alerts: Vec<AlertRecord>,
    /// Answers to requests by idempotency key.
    pub receipts: Vec<(String, Vec<u8>)>,
    /// The leased partition read, if any: its fence is checked, its
    /// checkpoint moved, and each bucket of `applied` remembers its `last`.
    pub position: Option<Position>,
    /// Buckets that applied the position's `last`.
    pub applied: Vec<BucketId>,
    pub now_ms: i64,
}

/// The state store in `<data-dir>/state.redb`, its alert index beside it in
/// `state.index.redb`. Its blocking work runs on Tokio's blocking threads.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Embedded>,
    /// Committed states (`None`: known to have none), bounded.
    cache: Arc<Mutex<BucketCache<Option<State>>>>,
}

/// The store itself, synchronous.
pub(crate) struct Embedded {
    db: Database,
    /// State changes logged but not yet in `states`. Locked across each
    /// commit (before the index's waiting entries), so that reads see the
    /// log and the table as of one commit.
    logged: Mutex<Logged>,
    state_batch: usize,
    /// Alerts logged and not yet published; what the `published` cursor
    /// (written to `meta` with the next commit, and at close) follows.
    outbox: Mutex<Pending>,
    /// Leases held in this process ([`leases`]).
    leases: Mutex<leases::HeldLeases>,
    /// Some bucket remembers what it applied from a partition: loads read
    /// `applied`.
    applies: std::sync::atomic::AtomicBool,
    /// Some bucket has an expiry: writes of rules without a time-to-live
    /// then clear theirs (a new version may have dropped it).
    expiring: std::sync::atomic::AtomicBool,
    index: Arc<AlertIndex>,
    /// The thread writing the index, if this store has one.
    writer: Option<JoinHandle<()>>,
}

/// The outbox: alerts logged and not yet published.
#[derive(Debug, Default)]
struct Pending {
    seqs: BTreeSet<u64>,
    /// The `seq` the next alert logged gets.
    next: u64,
}

impl Pending {
    /// Every alert up to this one reached the sink.
    fn cursor(&self) -> u64 {
        self.seqs.first().map_or(self.next - 1, |first| first - 1)
    }
}

/// The one field of a logged alert that rebuilding the index needs.
#[derive(serde::Deserialize)]
struct TenantOf {
    tenant: String,
}

pub(super) fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("an alert in the log is unreadable: {e}"))
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(EmbeddedStore {
            inner: Arc::new(Embedded::open_with(path, INDEX_BATCH, true)?),
            cache: Arc::new(Mutex::new(BucketCache::new(DEFAULT_MAX_CACHED))),
        })
    }

    /// The store itself, shared: the rule registry keeps its tables in
    /// the same file.
    pub(crate) fn shared(&self) -> Arc<Embedded> {
        self.inner.clone()
    }

    /// The index file of the store at `path`.
    pub fn index_path(path: &Path) -> PathBuf {
        path.with_extension("index.redb")
    }

    /// Run `work` on the store on a blocking thread.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Embedded) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("the store's thread failed: {e}")))?
    }
}

impl Embedded {
    /// `background`: whether a thread writes the index (tests flush it
    /// themselves).
    fn open_with(path: &Path, index_batch: usize, background: bool) -> Result<Self> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        let last_seq;
        let published;
        let expiring;
        let applies;
        let mut unpublished = BTreeSet::new();
        {
            tx.open_table(STATES).map_err(err)?;
            let timers = tx.open_table(TIMERS).map_err(err)?;
            let mut due = tx.open_table(TIMERS_DUE).map_err(err)?;
            if due.is_empty().map_err(err)? && !timers.is_empty().map_err(err)? {
                // Kept by a version without the index: build it.
                for entry in timers.iter().map_err(err)? {
                    let (key, at) = entry.map_err(err)?;
                    let (tenant, rule, bucket) = key.value();
                    due.insert((at.value(), tenant, rule, bucket), ())
                        .map_err(err)?;
                }
            }
            drop((timers, due));
            expiring = !tx
                .open_table(EXPIRY)
                .map_err(err)?
                .is_empty()
                .map_err(err)?;
            tx.open_table(EXPIRES).map_err(err)?;
            tx.open_table(leases::LEASES).map_err(err)?;
            applies = !tx
                .open_table(APPLIED)
                .map_err(err)?
                .is_empty()
                .map_err(err)?;
            tx.open_table(RECEIPTS).map_err(err)?;
            tx.open_table(RECEIPT_TIMES).map_err(err)?;
            tx.open_table(STATE_LOG).map_err(err)?;
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.remove("indexed").map_err(err)?;
            last_seq = meta.get("next_seq").map_err(err)?.map_or(1, |v| v.value()) - 1;
            published = meta.get("published").map_err(err)?.map_or(0, |v| v.value());
            drop(meta);
            let log = tx.open_table(ALERTS).map_err(err)?;
            for entry in log.range(published + 1..).map_err(err)? {
                unpublished.insert(entry.map_err(err)?.0.value());
            }
        }
        tx.delete_table(LEGACY_INDEX).map_err(err)?;
        tx.commit().map_err(err)?;

        let index_path = EmbeddedStore::index_path(path);
        let mut index = AlertIndex::open(&index_path, index_batch)?;
        if index.indexed()? > last_seq {
            // Not this log's index (the store was replaced): start anew.
            drop(index);
            std::fs::remove_file(&index_path)
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", index_path.display())))?;
            index = AlertIndex::open(&index_path, index_batch)?;
        }
        index.waiting().add(unindexed(&db, index.indexed()?)?);
        let index = Arc::new(index);
        let writer = background
            .then(|| {
                let index = index.clone();
                std::thread::Builder::new()
                    .name("tocsin-index".to_owned())
                    .spawn(move || index.run_writer())
            })
            .transpose()
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the alert index writer: {e}"))
            })?;
        let logged = Mutex::new(Logged::replay(&db.begin_read().map_err(err)?)?);
        Ok(Embedded {
            db,
            logged,
            state_batch: STATE_BATCH,
            outbox: Mutex::new(Pending {
                seqs: unpublished,
                next: last_seq + 1,
            }),
            leases: Mutex::default(),
            applies: std::sync::atomic::AtomicBool::new(applies),
            expiring: std::sync::atomic::AtomicBool::new(expiring),
            index,
            writer,
        })
    }
}

impl Embedded {
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    /// Write the published cursor, if it moved, in `tx`.
    fn write_published(&self, tx: &redb::WriteTransaction) -> Result<()> {
        let mut meta = tx.open_table(META).map_err(err)?;
        let stored = meta.get("published").map_err(err)?.map_or(0, |v| v.value());
        let published = self.outbox.lock().expect("outbox lock").cursor();
        if published > stored {
            meta.insert("published", published).map_err(err)?;
        }
        Ok(())
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // Spare the next start republishing what already reached the sink.
        let closing = self.db.begin_write().map_err(err).and_then(|tx| {
            self.write_published(&tx)?;
            tx.commit().map_err(err)
        });
        if let Err(error) = closing {
            tracing::warn!(%error, "cannot record the published alerts at close");
        }
        if let Some(writer) = self.writer.take() {
            self.index.stop();
            let _ = writer.join();
        }
    }
}

/// The index entries of the alerts logged after `indexed`.
fn unindexed(db: &Database, indexed: u64) -> Result<Vec<(String, u64)>> {
    let tx = db.begin_read().map_err(err)?;
    let log = tx.open_table(ALERTS).map_err(err)?;
    let mut entries = Vec::new();
    for entry in log.range(indexed + 1..).map_err(err)? {
        let (seq, json) = entry.map_err(err)?;
        let TenantOf { tenant } = serde_json::from_slice(json.value()).map_err(corrupt)?;
        entries.push((tenant, seq.value()));
    }
    Ok(entries)
}

impl Embedded {
    pub(super) fn load(&self, ids: &[BucketId]) -> Result<Vec<Option<Vec<u8>>>> {
        let logged = self.logged.lock().expect("state log lock");
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(STATES).map_err(err)?;
        ids.iter()
            .map(|id| {
                if let Some(latest) = logged.get(id) {
                    return Ok(latest.clone());
                }
                let key = (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                Ok(table.get(key).map_err(err)?.map(|v| v.value().to_vec()))
            })
            .collect()
    }

    /// The last sequence number of `partition` each of `ids` applied.
    pub(super) fn applied(&self, ids: &[BucketId], partition: &str) -> Result<Vec<Option<SeqNo>>> {
        if !self.applies.load(Ordering::Relaxed) {
            return Ok(vec![None; ids.len()]);
        }
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(APPLIED).map_err(err)?;
        ids.iter()
            .map(|id| {
                let key = (
                    id.tenant.as_str(),
                    id.rule.as_str(),
                    id.bucket.as_str(),
                    partition,
                );
                Ok(table
                    .get(key)
                    .map_err(err)?
                    .and_then(|seq| SeqNo::new(seq.value())))
            })
            .collect()
    }

    /// Pending timers due at or before `until`, earliest first.
    pub(super) fn due_timers(&self, until: i64, limit: usize) -> Result<Vec<(BucketId, i64)>> {
        let tx = self.db.begin_read().map_err(err)?;
        let by_due = tx.open_table(TIMERS_DUE).map_err(err)?;
        let mut due = Vec::new();
        let end = (until.saturating_add(1), "", "", "");
        for entry in by_due.range(..end).map_err(err)? {
            let (key, _) = entry.map_err(err)?;
            let (at, tenant, rule, bucket) = key.value();
            if due.len() == limit {
                break;
            }
            due.push((
                BucketId {
                    tenant: tenant.to_owned(),
                    rule: rule.to_owned(),
                    bucket: bucket.to_owned(),
                },
                at,
            ));
        }
        Ok(due)
    }

    /// Buckets expired by `until`, earliest first, each with when.
    pub(super) fn expired(&self, until: i64, limit: usize) -> Result<Vec<(BucketId, i64)>> {
        let tx = self.db.begin_read().map_err(err)?;
        let by_expiry = tx.open_table(EXPIRES).map_err(err)?;
        let end = (until.saturating_add(1), "", "", "");
        let mut expired = Vec::new();
        for entry in by_expiry.range(..end).map_err(err)?.take(limit) {
            let (key, _) = entry.map_err(err)?;
            let (at, tenant, rule, bucket) = key.value();
            expired.push((
                BucketId {
                    tenant: tenant.to_owned(),
                    rule: rule.to_owned(),
                    bucket: bucket.to_owned(),
                },
                at,
            ));
        }
        Ok(expired)
    }

    /// When the first bucket expires.
    pub(super) fn next_expiry(&self) -> Result<Option<i64>> {
        let tx = self.db.begin_read().map_err(err)?;
        let by_expiry = tx.open_table(EXPIRES).map_err(err)?;
        let first = by_expiry.first().map_err(err)?;
        Ok(first.map(|(key, _)| key.value().0))
    }

    /// Each bucket's pending timer.
    pub(super) fn timers_of(&self, ids: &[BucketId]) -> Result<Vec<Option<i64>>> {
        let tx = self.db.begin_read().map_err(err)?;
        let timers = tx.open_table(TIMERS).map_err(err)?;
        ids.iter()
            .map(|id| {
                let key = (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                Ok(timers.get(key).map_err(err)?.map(|v| v.value()))
            })
            .collect()
    }

    /// When the earliest pending timer is due.
    pub(super) fn next_timer(&self) -> Result<Option<i64>> {
        let tx = self.db.begin_read().map_err(err)?;
        let by_due = tx.open_table(TIMERS_DUE).map_err(err)?;
        let first = by_due.first().map_err(err)?;
        Ok(first.map(|(key, _)| key.value().0))
    }

    pub(super) fn receipt(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(RECEIPTS).map_err(err)?;
        Ok(table.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }

    pub(super) fn commit(&self, commit: Changes) -> Result<Vec<AlertRecord>> {
        // Held across the write: readers see these alerts in the log and in
        // the index's waiting entries at once.
        let mut logged = self.logged.lock().expect("state log lock");
        // Held across the write: a lease released meanwhile fences it.
        let held = self.leases.lock().expect("leases lock");
        if let Some(position) = &commit.position {
            leases::check(&held, &position.fence)?;
        }
        let mut waiting = self.index.waiting();
        let tx = self.db.begin_write().map_err(err)?;
        let mut alerts = commit.alerts;
        let flush_states = logged.due(commit.states.len(), self.state_batch);
        {
            let mut log = tx.open_table(STATE_LOG).map_err(err)?;
            if flush_states {
                // In key order, consecutive writes land on the same pages.
                let mut states = tx.open_table(STATES).map_err(err)?;
                for (id, state) in logged.merged(&commit.states) {
                    let key = (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                    match state {
                        Some(bytes) => states.insert(key, bytes).map_err(err)?,
                        None => states.remove(key).map_err(err)?,
                    };
                }
                log.retain(|_, _| false).map_err(err)?;
            } else if !commit.states.is_empty() {
                let entry = state_log::encode(&commit.states);
                log.insert(logged.next(), entry.as_slice()).map_err(err)?;
            }
            let mut timers = tx.open_table(TIMERS).map_err(err)?;
            let mut by_due = tx.open_table(TIMERS_DUE).map_err(err)?;
            for (id, due) in &commit.timers {
                let (tenant, rule, bucket) =
                    (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                let old = match due {
                    Some(due) => timers.insert((tenant, rule, bucket), due).map_err(err)?,
                    None => timers.remove((tenant, rule, bucket)).map_err(err)?,
                }
                .map(|v| v.value());
                if let Some(old) = old {
                    by_due.remove((old, tenant, rule, bucket)).map_err(err)?;
                }
                if let Some(due) = due {
                    by_due
                        .insert((*due, tenant, rule, bucket), ())
                        .map_err(err)?;
                }
            }
            drop((timers, by_due));
            let mut expiry = tx.open_table(EXPIRY).map_err(err)?;
            let mut by_expiry = tx.open_table(EXPIRES).map_err(err)?;
            for (id, at) in &commit.expiries {
                let (tenant, rule, bucket) =
                    (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                let old = match at {
                    Some(at) => expiry.insert((tenant, rule, bucket), at).map_err(err)?,
                    None => expiry.remove((tenant, rule, bucket)).map_err(err)?,
                }
                .map(|v| v.value());
                if let Some(old) = old {
                    by_expiry.remove((old, tenant, rule, bucket)).map_err(err)?;
                }
                if let Some(at) = at {
                    by_expiry
                        .insert((*at, tenant, rule, bucket), ())
                        .map_err(err)?;
                    self.expiring.store(true, Ordering::Relaxed);
                }
            }
            drop((expiry, by_expiry));
            let mut meta = tx.open_table(META).map_err(err)?;
            let mut seq = meta.get("next_seq").map_err(err)?.map_or(1, |v| v.value());
            let mut log = tx.open_table(ALERTS).map_err(err)?;
            let mut json = Vec::new();
            for alert in &mut alerts {
                alert.seq = Some(seq);
                json.clear();
                serde_json::to_writer(&mut json, alert).map_err(err)?;
                log.insert(seq, json.as_slice()).map_err(err)?;
                seq += 1;
            }
            meta.insert("next_seq", seq).map_err(err)?;
            drop(meta);
            if let Some(position) = &commit.position {
                if let Some(last) = &position.last {
                    let mut applied = tx.open_table(APPLIED).map_err(err)?;
                    let partition = position.fence.shard.as_str();
                    for id in &commit.applied {
                        let key = (
                            id.tenant.as_str(),
                            id.rule.as_str(),
                            id.bucket.as_str(),
                            partition,
                        );
                        applied.insert(key, last.as_str()).map_err(err)?;
                    }
                    self.applies.store(true, Ordering::Relaxed);
                }
                if let Some(checkpoint) = &position.checkpoint {
                    leases::set_checkpoint(&tx, &position.fence, checkpoint_text(checkpoint))?;
                }
            }
            self.write_published(&tx)?;
            let mut receipts = tx.open_table(RECEIPTS).map_err(err)?;
            let mut times = tx.open_table(RECEIPT_TIMES).map_err(err)?;
            for (key, answer) in &commit.receipts {
                receipts
                    .insert(key.as_str(), answer.as_slice())
                    .map_err(err)?;
                times
                    .insert((commit.now_ms, key.as_str()), ())
                    .map_err(err)?;
            }
            // Expired receipts, oldest first, a bounded number per commit.
            let expired: Vec<(i64, String)> = times
                .range(..(commit.now_ms - RECEIPT_RETENTION_MS, ""))
                .map_err(err)?
                .take(RECEIPTS_PRUNED_PER_COMMIT)
                .map(|entry| entry.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
                .collect::<std::result::Result<_, _>>()
                .map_err(err)?;
            for (at, key) in expired {
                times.remove((at, key.as_str())).map_err(err)?;
                receipts.remove(key.as_str()).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        drop(held);
        {
            let mut outbox = self.outbox.lock().expect("outbox lock");
            outbox.seqs.extend(alerts.iter().filter_map(|a| a.seq));
            outbox.next = outbox
                .next
                .max(alerts.last().and_then(|a| a.seq).map_or(0, |s| s + 1));
        }
        if flush_states {
            logged.flushed();
        } else if !commit.states.is_empty() {
            logged.logged(commit.states);
        }
        waiting.add(
            alerts
                .iter()
                .map(|a| (a.tenant.clone(), a.seq.expect("set above"))),
        );
        self.index.added(&waiting);
        Ok(alerts)
    }

    pub(super) fn unpublished(&self) -> Result<Vec<AlertRecord>> {
        let seqs: Vec<u64> = {
            let outbox = self.outbox.lock().expect("outbox lock");
            outbox.seqs.iter().copied().collect()
        };
        let tx = self.db.begin_read().map_err(err)?;
        let log = tx.open_table(ALERTS).map_err(err)?;
        let mut alerts = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(json) = log.get(seq).map_err(err)? {
                alerts.push(serde_json::from_slice(json.value()).map_err(corrupt)?);
            }
        }
        Ok(alerts)
    }

    pub(super) fn mark_published(&self, seqs: &[u64]) {
        // Not worth a transaction of its own: after a crash the outbox
        // merely republishes, and sinks skip what they already have.
        let mut outbox = self.outbox.lock().expect("outbox lock");
        for seq in seqs {
            outbox.seqs.remove(seq);
        }
    }
}

/// The text of a checkpoint, as leases keep it.
fn checkpoint_text(checkpoint: &super::Checkpoint) -> &str {
    match checkpoint {
        super::Checkpoint::At(seq) => seq.as_str(),
        super::Checkpoint::End => super::SHARD_END,
    }
}

impl AlertLog for EmbeddedStore {
    fn alerts(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<AlertRecord>> {
        self.inner.alerts(tenant, after, limit)
    }

    fn buckets(&self, tenant: &str) -> Result<Vec<(BucketId, Vec<u8>)>> {
        self.inner.buckets(tenant)
    }

    fn last_seq(&self) -> Result<u64> {
        self.inner.last_seq()
    }
}

impl AlertLog for Embedded {
    fn last_seq(&self) -> Result<u64> {
        // Under the state log's lock: no commit is half visible.
        let _logged = self.logged.lock().expect("state log lock");
        let tx = self.db.begin_read().map_err(err)?;
        let meta = tx.open_table(META).map_err(err)?;
        Ok(meta.get("next_seq").map_err(err)?.map_or(1, |v| v.value()) - 1)
    }

    fn alerts(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<AlertRecord>> {
        let mut alerts = Vec::new();
        if after == u64::MAX {
            return Ok(alerts);
        }
        // The log, the index file and the waiting entries as of one moment.
        let (index, waiting, tx) = self
            .index
            .snapshot(tenant, after, limit, || self.db.begin_read().map_err(err))?;
        let log = tx.open_table(ALERTS).map_err(err)?;
        // The first `limit` of each, merged: an entry being written can be
        // in both for a moment.
        let mut seqs = index.seqs(tenant, after, limit)?;
        seqs.extend(waiting);
        seqs.sort_unstable();
        seqs.dedup();
        seqs.truncate(limit);
        for seq in seqs {
            if let Some(json) = log.get(seq).map_err(err)? {
                alerts.push(serde_json::from_slice(json.value()).map_err(corrupt)?);
            }
        }
        Ok(alerts)
    }

    fn buckets(&self, tenant: &str) -> Result<Vec<(BucketId, Vec<u8>)>> {
        let (tx, logged) = {
            let logged = self.logged.lock().expect("state log lock");
            (self.db.begin_read().map_err(err)?, logged.of_tenant(tenant))
        };
        let states = tx.open_table(STATES).map_err(err)?;
        let mut buckets = BTreeMap::new();
        for entry in states.range((tenant, "", "")..).map_err(err)? {
            let (key, state) = entry.map_err(err)?;
            let (t, rule, bucket) = key.value();
            if t != tenant {
                break;
            }
            let id = BucketId {
                tenant: t.to_owned(),
                rule: rule.to_owned(),
                bucket: bucket.to_owned(),
            };
            buckets.insert(id, state.value().to_vec());
        }
        // The log is newer than the table.
        for (id, state) in logged {
            match state {
                Some(state) => buckets.insert(id, state),
                None => buckets.remove(&id),
            };
        }
        Ok(buckets.into_iter().collect())
    }
}

/// Alerts of the log, retired by the cursor up to the last of them.
/// The seqs of an outbox's alerts: this store's mark.
#[derive(Debug)]
struct Seqs(Vec<u64>);

fn outbox(alerts: Vec<AlertRecord>) -> Outbox {
    let seqs: Vec<u64> = alerts.iter().filter_map(|a| a.seq).collect();
    let mark = if seqs.is_empty() {
        OutboxMark::default()
    } else {
        OutboxMark::new(Seqs(seqs))
    };
    Outbox { alerts, mark }
}

#[async_trait::async_trait]
impl StateStore for EmbeddedStore {
    fn max_state_bytes(&self) -> usize {
        // redb holds values up to 3 GiB; the rules' own limit is what binds.
        usize::MAX
    }

    async fn load(&self, ids: &[BucketId], partition: &str) -> Result<Vec<Prior>> {
        let mut priors = vec![Prior::default(); ids.len()];
        if self.inner.applies.load(Ordering::Relaxed) {
            let wanted = ids.to_vec();
            let partition = partition.to_owned();
            let applied = self
                .blocking(move |store| store.applied(&wanted, &partition))
                .await?;
            for (prior, applied) in priors.iter_mut().zip(applied) {
                prior.applied = applied;
            }
        }
        let mut missing = Vec::new();
        {
            let cache = self.cache.lock().expect("state cache lock");
            for (i, id) in ids.iter().enumerate() {
                match cache.get(id) {
                    Some(state) => priors[i].state = state.clone(),
                    None => missing.push(i),
                }
            }
        }
        if missing.is_empty() {
            return Ok(priors);
        }
        let wanted: Vec<BucketId> = missing.iter().map(|&i| ids[i].clone()).collect();
        let loaded = self.blocking(move |store| store.load(&wanted)).await?;
        let mut cache = self.cache.lock().expect("state cache lock");
        for (i, state) in missing.into_iter().zip(loaded) {
            let state: Option<Arc<[u8]>> = state.map(Arc::from);
            cache.insert(ids[i].clone(), state.clone());
            priors[i].state = state;
        }
        Ok(priors)
    }

    fn forget(&self, ids: &[BucketId]) {
        let mut cache = self.cache.lock().expect("state cache lock");
        for id in ids {
            cache.remove(id);
        }
    }

    fn timer_partitions(&self) -> Vec<String> {
        // One process writes the file: one partition, all its timers.
        vec![TIMER_PARTITION.to_owned()]
    }

    fn partitions_finished(&self, _partitions: &[String]) {
        // Kept: a bucket's entries of finished partitions are a few bytes.
    }

    async fn receipt(&self, key: &str) -> Result<Option<Vec<u8>>> {
        // A read transaction: no write waits for it and it syncs nothing,
        // so it is not worth a trip to a blocking thread.
        self.inner.receipt(key)
    }

    async fn commit(&self, commit: Commit) -> Result<Outbox> {
        let mut changes = Changes {
            now_ms: commit.now_ms,
            receipts: commit.progress.receipts,
            ..Changes::default()
        };
        if let Some(position) = commit.progress.position {
            if position.last.is_some() {
                changes.applied = commit.writes.iter().map(|w| w.id.clone()).collect();
            }
            changes.position = Some(position);
        }
        let expiring = self.inner.expiring.load(Ordering::Relaxed);
        for write in commit.writes {
            // A write is a call: it touches the bucket.
            match (&write.state, write.ttl_ms) {
                (StateChange::Delete, _) => changes.expiries.push((write.id.clone(), None)),
                (_, Some(ttl)) => changes.expiries.push((
                    write.id.clone(),
                    Some(commit.now_ms.saturating_add(ttl as i64)),
                )),
                (_, None) if expiring => changes.expiries.push((write.id.clone(), None)),
                (_, None) => {}
            }
            match write.state {
                StateChange::Unchanged => {}
                StateChange::Set(bytes) => changes.states.push((write.id.clone(), Some(bytes))),
                StateChange::Delete => changes.states.push((write.id.clone(), None)),
            }
            match write.timer {
                TimerChange::Keep => {}
                TimerChange::Set(at) => changes.timers.push((write.id.clone(), Some(at))),
                TimerChange::Cancel => changes.timers.push((write.id.clone(), None)),
            }
            changes.alerts.extend(write.alerts);
        }
        let states: Vec<(BucketId, Option<Arc<[u8]>>)> = changes
            .states
            .iter()
            .map(|(id, state)| (id.clone(), state.as_deref().map(Arc::from)))
            .collect();
        let result = self.blocking(move |store| store.commit(changes)).await;
        let mut cache = self.cache.lock().expect("state cache lock");
        match &result {
            Ok(_) => {
                for (id, state) in states {
                    match state {
                        Some(state) => cache.insert(id, Some(state)),
                        // Deleted buckets leave the cache: a deleted bucket
                        // costs no memory, and a read of it finds nothing.
                        None => {
                            cache.remove(&id);
                        }
                    }
                }
            }
            // Whether the write happened is unknown: read these again.
            Err(_) => {
                for (id, _) in &states {
                    cache.remove(id);
                }
            }
        }
        Ok(outbox(result?))
    }

    async fn unpublished(&self, _partition: &str) -> Result<Outbox> {
        Ok(outbox(self.blocking(|store| store.unpublished()).await?))
    }

    async fn due_timers(
        &self,
        _partition: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(BucketId, i64)>> {
        self.blocking(move |store| store.due_timers(until, limit))
            .await
    }

    async fn next_timer(&self, _partition: &str) -> Result<Option<i64>> {
        self.blocking(|store| store.next_timer()).await
    }

    async fn pending_timers(&self, ids: &[BucketId]) -> Result<Vec<Option<i64>>> {
        let ids = ids.to_vec();
        self.blocking(move |store| store.timers_of(&ids)).await
    }

    async fn expired(
        &self,
        _partition: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(BucketId, i64)>> {
        self.blocking(move |store| store.expired(until, limit))
            .await
    }

    async fn next_expiry(&self, _partition: &str) -> Result<Option<i64>> {
        self.blocking(|store| store.next_expiry()).await
    }

    async fn published(&self, mark: OutboxMark) -> Result<()> {
        if let Some(Seqs(seqs)) = mark.get::<Seqs>() {
            self.inner.mark_published(seqs);
        }
        Ok(())
    }
}
