//! The embedded store's leases (see [`crate::store::lease`]). One process
//! holds the redb file at a time (redb locks it), so every lease is that
//! process's to give: owners, epochs and heartbeats live in memory, and a
//! restart finds every lease free, its previous holder gone with the
//! process that crashed. What must outlive the process is durable in the
//! `leases` table: each partition's parents, and its checkpoint, which a
//! commit moves in the same transaction as the batch it ends.

use std::collections::HashMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{EmbeddedStore, err};
use crate::store::lease::{Lease, LeaseTable};
use crate::store::{Fence, Result, StoreError};

/// (group, partition) → [`Durable`] as JSON.
pub(super) const LEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("leases");

/// What a lease keeps across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Durable {
    pub checkpoint: Option<String>,
    pub parents: Vec<String>,
}

/// Who holds a lease in this process.
#[derive(Debug, Default, Clone)]
pub(super) struct Held {
    pub owner: Option<String>,
    pub epoch: u64,
    pub counter: u64,
}

/// The leases held in this process, by (group, partition).
pub(super) type HeldLeases = HashMap<(String, String), Held>;

/// Whether `fence` still holds its lease.
pub(super) fn check(held: &HeldLeases, fence: &Fence) -> Result<()> {
    let lease = held.get(&(fence.stream.clone(), fence.shard.clone()));
    match lease {
        Some(Held {
            owner: Some(owner),
            epoch,
            ..
        }) if *owner == fence.owner && *epoch == fence.epoch => Ok(()),
        _ => Err(StoreError::Fenced(fence.shard.clone())),
    }
}

/// Move the checkpoint of `fence`'s lease in `tx`.
pub(super) fn set_checkpoint(
    tx: &redb::WriteTransaction,
    fence: &Fence,
    checkpoint: &str,
) -> Result<()> {
    let mut table = tx.open_table(LEASES).map_err(err)?;
    let key = (fence.stream.as_str(), fence.shard.as_str());
    let mut durable: Durable = match table.get(key).map_err(err)? {
        Some(bytes) => serde_json::from_slice(bytes.value()).map_err(unreadable)?,
        None => Durable::default(),
    };
    durable.checkpoint = Some(checkpoint.to_owned());
    let bytes = serde_json::to_vec(&durable).expect("leases serialize");
    table.insert(key, bytes.as_slice()).map_err(err)?;
    Ok(())
}

fn unreadable(e: serde_json::Error) -> StoreError {
    StoreError::Invalid(format!("a lease in the store is unreadable: {e}"))
}

impl EmbeddedStore {
    /// Change the in-memory lease of (`group`, `name`) if `condition` holds.
    fn change_lease(
        &self,
        group: &str,
        name: &str,
        condition: impl FnOnce(&Held) -> bool,
        change: impl FnOnce(&mut Held),
    ) -> bool {
        let mut held = self.inner.leases.lock().expect("leases lock");
        let lease = held.entry((group.to_owned(), name.to_owned())).or_default();
        if !condition(lease) {
            return false;
        }
        change(lease);
        true
    }
}

#[async_trait::async_trait]
impl LeaseTable for EmbeddedStore {
    async fn list(&self, group: &str) -> Result<Vec<Lease>> {
        let group = group.to_owned();
        let durable = self
            .blocking(move |store| {
                let tx = store.db.begin_read().map_err(err)?;
                let table = tx.open_table(LEASES).map_err(err)?;
                let mut found = Vec::new();
                for entry in table.range((group.as_str(), "")..).map_err(err)? {
                    let (key, value) = entry.map_err(err)?;
                    let (g, name) = key.value();
                    if g != group {
                        break;
                    }
                    let durable: Durable =
                        serde_json::from_slice(value.value()).map_err(unreadable)?;
                    found.push((g.to_owned(), name.to_owned(), durable));
                }
                Ok(found)
            })
            .await?;
        let held = self.inner.leases.lock().expect("leases lock");
        Ok(durable
            .into_iter()
            .map(|(group, name, durable)| {
                let lease = held
                    .get(&(group, name.clone()))
                    .cloned()
                    .unwrap_or_default();
                Lease {
                    shard: name,
                    owner: lease.owner,
                    epoch: lease.epoch,
                    counter: lease.counter,
                    checkpoint: durable.checkpoint,
                    parents: durable.parents,
                }
            })
            .collect())
    }

    async fn create(&self, group: &str, name: &str, parents: &[String]) -> Result<bool> {
        let (group, name) = (group.to_owned(), name.to_owned());
        let durable = Durable {
            checkpoint: None,
            parents: parents.to_vec(),
        };
        self.blocking(move |store| {
            let tx = store.db.begin_write().map_err(err)?;
            let created = {
                let mut table = tx.open_table(LEASES).map_err(err)?;
                let key = (group.as_str(), name.as_str());
                if table.get(key).map_err(err)?.is_some() {
                    false
                } else {
                    let bytes = serde_json::to_vec(&durable).expect("leases serialize");
                    table.insert(key, bytes.as_slice()).map_err(err)?;
                    true
                }
            };
            tx.commit().map_err(err)?;
            Ok(created)
        })
        .await
    }

    async fn take(&self, group: &str, lease: &Lease, me: &str) -> Result<Option<u64>> {
        let epoch = lease.epoch + 1;
        let taken = self.change_lease(
            group,
            &lease.shard,
            |held| held.epoch == lease.epoch && held.counter == lease.counter,
            |held| {
                held.owner = Some(me.to_owned());
                held.epoch = epoch;
                held.counter += 1;
            },
        );
        Ok(taken.then_some(epoch))
    }

    async fn renew(&self, group: &str, name: &str, me: &str, epoch: u64) -> Result<bool> {
        Ok(self.change_lease(
            group,
            name,
            |held| held.owner.as_deref() == Some(me) && held.epoch == epoch,
            |held| held.counter += 1,
        ))
    }

    async fn release(&self, group: &str, name: &str, me: &str, epoch: u64) -> Result<bool> {
        Ok(self.change_lease(
            group,
            name,
            |held| held.owner.as_deref() == Some(me) && held.epoch == epoch,
            |held| {
                held.owner = None;
                held.epoch += 1;
                held.counter += 1;
            },
        ))
    }
}
