//! The embedded store: one redb file in the data directory. Every commit is
//! one durable write transaction, so state, alerts and receipts are applied
//! together or not at all, and survive a crash or a restart.

use std::path::Path;

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
/// Counters: `next_seq`, and `published` (every alert up to it reached the sink).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The state store in `<data-dir>/state.redb`.
pub struct EmbeddedStore {
    db: Database,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self> {
        let db =
            Database::create(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        {
            tx.open_table(STATES).map_err(err)?;
            tx.open_table(TIMERS).map_err(err)?;
            tx.open_table(ALERTS).map_err(err)?;
            tx.open_table(TENANT_ALERTS).map_err(err)?;
            tx.open_table(RECEIPTS).map_err(err)?;
            tx.open_table(META).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(EmbeddedStore { db })
    }
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
        {
            let mut states = tx.open_table(STATES).map_err(err)?;
            for (id, state) in &commit.states {
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
            let mut index = tx.open_table(TENANT_ALERTS).map_err(err)?;
            let mut json = Vec::new();
            for alert in &mut alerts {
                alert.seq = Some(seq);
                json.clear();
                serde_json::to_writer(&mut json, alert).map_err(err)?;
                log.insert(seq, json.as_slice()).map_err(err)?;
                index
                    .insert((alert.tenant.as_str(), seq), ())
                    .map_err(err)?;
                seq += 1;
            }
            meta.insert("next_seq", seq).map_err(err)?;
            let mut receipts = tx.open_table(RECEIPTS).map_err(err)?;
            for (key, answer) in &commit.receipts {
                receipts
                    .insert(key.as_str(), answer.as_slice())
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
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
        let tx = self.db.begin_read().map_err(err)?;
        let index = tx.open_table(TENANT_ALERTS).map_err(err)?;
        let log = tx.open_table(ALERTS).map_err(err)?;
        let mut alerts = Vec::new();
        if after == u64::MAX {
            return Ok(alerts);
        }
        for entry in index
            .range((tenant, after + 1)..=(tenant, u64::MAX))
            .map_err(err)?
            .take(limit)
        {
            let (key, _) = entry.map_err(err)?;
            let seq = key.value().1;
            if let Some(json) = log.get(seq).map_err(err)? {
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
