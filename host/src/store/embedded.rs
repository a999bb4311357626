//! The embedded store: one redb file in the data directory. Every commit is
//! one durable write transaction, so state, alerts and receipts are applied
//! together or not at all, and survive a crash or a restart.
//!
//! The per-tenant alert index is derived data and is written behind the
//! log: its entries for the latest alerts wait in memory and go into the
//! table with a later commit, many commits' worth at once. Its random keys
//! (one tenant after another) are what a commit pays most for per alert;
//! written together, each tenant's page is written once per flush instead
//! of once per commit. Listing reads the table and the waiting entries, so
//! nothing committed is missing from it; after a crash, opening the store
//! rebuilds the waiting entries from the log.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{AlertLog, BucketId, Commit, Result, StateStore, StoreError};
use crate::alert::AlertRecord;

/// (tenant, rule, bucket) → encoded state.
const STATES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("states");
/// (tenant, rule, bucket) → due time of the pending timer.
const TIMERS: TableDefinition<(&str, &str, &str), i64> = TableDefinition::new("timers");
/// seq → alert record as JSON: the alert log, appended in commit order.
/// Entries after the `published` cursor are the outbox.
const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");
/// (tenant, seq): each tenant's alerts, for listing.
const TENANT_ALERTS: TableDefinition<(&str, u64), ()> = TableDefinition::new("tenant_alerts");
/// idempotency key → the answer given.
const RECEIPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("receipts");
/// Counters: `next_seq`; `published` (every alert up to it reached the
/// sink); `indexed` (every alert up to it is in `tenant_alerts`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Index entries that wait in memory before a commit writes them all.
const INDEX_BATCH: usize = 4 * 1024;

/// The state store in `<data-dir>/state.redb`.
pub struct EmbeddedStore {
    db: Database,
    /// `(tenant, seq)` of committed alerts after `indexed`, in seq order.
    /// Locked across each commit, so a reader sees the table and these
    /// entries as of the same commit.
    unindexed: Mutex<BTreeSet<(String, u64)>>,
    /// How many entries wait before a commit writes them ([`INDEX_BATCH`]).
    index_batch: usize,
}

/// The one field of a logged alert that rebuilding the index needs.
#[derive(serde::Deserialize)]
struct TenantOf {
    tenant: String,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, INDEX_BATCH)
    }

    fn open_with(path: &Path, index_batch: usize) -> Result<Self> {
        let db =
            Database::create(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        {
            tx.open_table(STATES).map_err(err)?;
            tx.open_table(TIMERS).map_err(err)?;
            tx.open_table(ALERTS).map_err(err)?;
            tx.open_table(TENANT_ALERTS).map_err(err)?;
            tx.open_table(RECEIPTS).map_err(err)?;
            let mut meta = tx.open_table(META).map_err(err)?;
            if meta.get("indexed").map_err(err)?.is_none() {
                // A store from before the index was written behind: all of
                // its log is indexed.
                let next = meta.get("next_seq").map_err(err)?.map_or(1, |v| v.value());
                meta.insert("indexed", next - 1).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        let unindexed = Mutex::new(unindexed(&db)?);
        Ok(EmbeddedStore {
            db,
            unindexed,
            index_batch,
        })
    }
}

/// The index entries of the alerts logged after `indexed`.
fn unindexed(db: &Database) -> Result<BTreeSet<(String, u64)>> {
    let tx = db.begin_read().map_err(err)?;
    let meta = tx.open_table(META).map_err(err)?;
    let indexed = meta.get("indexed").map_err(err)?.map_or(0, |v| v.value());
    let log = tx.open_table(ALERTS).map_err(err)?;
    let mut entries = BTreeSet::new();
    for entry in log.range(indexed + 1..).map_err(err)? {
        let (seq, json) = entry.map_err(err)?;
        let TenantOf { tenant } = serde_json::from_slice(json.value()).map_err(err)?;
        entries.insert((tenant, seq.value()));
    }
    Ok(entries)
}

impl StateStore for EmbeddedStore {
    fn load(&self, ids: &[BucketId]) -> Result<Vec<Option<Vec<u8>>>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(STATES).map_err(err)?;
        ids.iter()
            .map(|id| {
                let key = (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                Ok(table.get(key).map_err(err)?.map(|v| v.value().to_vec()))
            })
            .collect()
    }

    fn receipt(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(RECEIPTS).map_err(err)?;
        Ok(table.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }

    fn commit(&self, commit: Commit) -> Result<Vec<AlertRecord>> {
        let tx = self.db.begin_write().map_err(err)?;
        let mut alerts = commit.alerts;
        let last_seq;
        {
            let mut states = tx.open_table(STATES).map_err(err)?;
            // In key order, consecutive inserts land on the same leaf pages.
            let mut changed: Vec<_> = commit.states.iter().collect();
            changed.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
            for (id, state) in changed {
                let key = (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                match state {
                    Some(bytes) => states.insert(key, bytes.as_slice()).map_err(err)?,
                    None => states.remove(key).map_err(err)?,
                };
            }
            let mut timers = tx.open_table(TIMERS).map_err(err)?;
            for (id, due) in &commit.timers {
                let key = (id.tenant.as_str(), id.rule.as_str(), id.bucket.as_str());
                match due {
                    Some(due) => timers.insert(key, due).map_err(err)?,
                    None => timers.remove(key).map_err(err)?,
                };
            }
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
            last_seq = seq - 1;
            let mut receipts = tx.open_table(RECEIPTS).map_err(err)?;
            for (key, answer) in &commit.receipts {
                receipts
                    .insert(key.as_str(), answer.as_slice())
                    .map_err(err)?;
            }
        }
        let mut unindexed = self.unindexed.lock().expect("index lock");
        let flush = unindexed.len() + alerts.len() >= self.index_batch;
        if flush {
            let mut index = tx.open_table(TENANT_ALERTS).map_err(err)?;
            let pending = unindexed
                .iter()
                .map(|(tenant, seq)| (tenant.as_str(), *seq))
                .chain(
                    alerts
                        .iter()
                        .map(|a| (a.tenant.as_str(), a.seq.expect("set above"))),
                );
            for key in pending {
                index.insert(key, ()).map_err(err)?;
            }
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.insert("indexed", last_seq).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        if flush {
            unindexed.clear();
        } else {
            unindexed.extend(
                alerts
                    .iter()
                    .map(|a| (a.tenant.clone(), a.seq.expect("set above"))),
            );
        }
        Ok(alerts)
    }

    fn unpublished(&self) -> Result<Vec<AlertRecord>> {
        let tx = self.db.begin_read().map_err(err)?;
        let meta = tx.open_table(META).map_err(err)?;
        let published = meta.get("published").map_err(err)?.map_or(0, |v| v.value());
        let log = tx.open_table(ALERTS).map_err(err)?;
        let mut alerts = Vec::new();
        for entry in log.range(published + 1..).map_err(err)? {
            let (_, json) = entry.map_err(err)?;
            alerts.push(serde_json::from_slice(json.value()).map_err(err)?);
        }
        Ok(alerts)
    }

    fn mark_published(&self, up_to: u64) -> Result<()> {
        let mut tx = self.db.begin_write().map_err(err)?;
        // Not worth an fsync: after a crash the outbox merely republishes,
        // and sinks skip what they already have.
        tx.set_durability(Durability::None).map_err(err)?;
        {
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.insert("published", up_to).map_err(err)?;
        }
        tx.commit().map_err(err)
    }
}

impl AlertLog for EmbeddedStore {
    fn alerts(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<AlertRecord>> {
        let mut alerts = Vec::new();
        if after == u64::MAX {
            return Ok(alerts);
        }
        // The snapshot and the waiting entries as of the same commit: every
        // waiting seq is above every indexed one.
        let (tx, waiting) = {
            let unindexed = self.unindexed.lock().expect("index lock");
            let tx = self.db.begin_read().map_err(err)?;
            let waiting: Vec<u64> = unindexed
                .range((tenant.to_owned(), after + 1)..=(tenant.to_owned(), u64::MAX))
                .map(|(_, seq)| *seq)
                .take(limit)
                .collect();
            (tx, waiting)
        };
        let index = tx.open_table(TENANT_ALERTS).map_err(err)?;
        let log = tx.open_table(ALERTS).map_err(err)?;
        let indexed = index
            .range((tenant, after + 1)..=(tenant, u64::MAX))
            .map_err(err)?
            .map(|entry| entry.map(|(key, _)| key.value().1).map_err(err));
        let seqs = indexed.chain(waiting.into_iter().map(Ok)).take(limit);
        for seq in seqs {
            if let Some(json) = log.get(seq?).map_err(err)? {
                alerts.push(serde_json::from_slice(json.value()).map_err(err)?);
            }
        }
        Ok(alerts)
    }

    fn buckets(&self, tenant: &str) -> Result<Vec<(BucketId, Vec<u8>)>> {
        let tx = self.db.begin_read().map_err(err)?;
        let states = tx.open_table(STATES).map_err(err)?;
        let mut buckets = Vec::new();
        for entry in states.range((tenant, "", "")..).map_err(err)? {
            let (key, state) = entry.map_err(err)?;
            let (t, rule, bucket) = key.value();
            if t != tenant {
                break;
            }
            buckets.push((
                BucketId {
                    tenant: t.to_owned(),
                    rule: rule.to_owned(),
                    bucket: bucket.to_owned(),
                },
                state.value().to_vec(),
            ));
        }
        Ok(buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(tenant: &str, key: &str) -> AlertRecord {
        let json = serde_json::json!({
            "id": key, "tenant": tenant, "rule": "r", "rule_version": "1.0.0", "bucket": "",
            "key": key, "status": "firing", "severity": "info", "title": key,
            "detail": null, "at": 0
        });
        serde_json::from_str(&json.to_string()).unwrap()
    }

    fn commit(store: &EmbeddedStore, alerts: &[(&str, &str)]) {
        let commit = Commit {
            alerts: alerts.iter().map(|(t, k)| alert(t, k)).collect(),
            ..Commit::default()
        };
        store.commit(commit).unwrap();
    }

    fn keys(store: &EmbeddedStore, tenant: &str, after: u64, limit: usize) -> Vec<String> {
        let alerts = store.alerts(tenant, after, limit).unwrap();
        alerts.into_iter().map(|a| a.key).collect()
    }

    /// Pages of two through a tenant's alerts, by cursor.
    fn paged(store: &EmbeddedStore, tenant: &str) -> Vec<String> {
        let (mut all, mut after) = (Vec::new(), 0);
        loop {
            let page = store.alerts(tenant, after, 2).unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq.unwrap();
            all.extend(page.into_iter().map(|a| a.key));
        }
        all
    }

    #[test]
    fn listing_sees_every_committed_alert_whether_or_not_its_index_entry_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open_with(&path, 4).unwrap();
        commit(&store, &[("a", "a1"), ("b", "b1"), ("a", "a2")]);
        assert_eq!(keys(&store, "a", 0, 10), ["a1", "a2"], "before any flush");
        // The fourth entry flushes all four into the table.
        commit(&store, &[("a", "a3")]);
        assert!(store.unindexed.lock().unwrap().is_empty());
        commit(&store, &[("b", "b2"), ("a", "a4")]);
        assert_eq!(store.unindexed.lock().unwrap().len(), 2);
        assert_eq!(keys(&store, "a", 0, 10), ["a1", "a2", "a3", "a4"]);
        assert_eq!(
            paged(&store, "a"),
            ["a1", "a2", "a3", "a4"],
            "across the boundary"
        );
        assert_eq!(
            keys(&store, "a", 0, 3),
            ["a1", "a2", "a3"],
            "the limit holds"
        );
        assert_eq!(keys(&store, "b", 2, 10), ["b2"], "after a cursor");

        // A crash loses the waiting entries: opening rebuilds them from the log.
        drop(store);
        let store = EmbeddedStore::open_with(&path, 4).unwrap();
        assert_eq!(store.unindexed.lock().unwrap().len(), 2);
        assert_eq!(paged(&store, "a"), ["a1", "a2", "a3", "a4"]);
        assert_eq!(paged(&store, "b"), ["b1", "b2"]);
        commit(&store, &[("a", "a5"), ("b", "b3")]);
        assert!(store.unindexed.lock().unwrap().is_empty(), "flushed");
        assert_eq!(paged(&store, "a"), ["a1", "a2", "a3", "a4", "a5"]);
    }

    #[test]
    fn a_store_whose_index_was_written_with_every_commit_opens_fully_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            // What an earlier version left: entries indexed, no `indexed`.
            let store = EmbeddedStore::open_with(&path, 1).unwrap();
            commit(&store, &[("a", "a1"), ("a", "a2")]);
            let tx = store.db.begin_write().unwrap();
            tx.open_table(META).unwrap().remove("indexed").unwrap();
            tx.commit().unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(store.unindexed.lock().unwrap().is_empty());
        assert_eq!(keys(&store, "a", 0, 10), ["a1", "a2"]);
    }
}
