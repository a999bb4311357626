//! The registry in the embedded store's redb file: documents, the change
//! log and components in tables of their own, each write one transaction.

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::store::{Doc, Expect, RegistryStore, Result, StoreError};
use crate::store::embedded::{Embedded, EmbeddedStore};

/// key → (revision that wrote it, document).
const DOCS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("registry_docs");
/// revision → the key it wrote.
const CHANGES: TableDefinition<u64, &str> = TableDefinition::new("registry_changes");
/// content hash → component bytes.
const COMPONENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("registry_components");

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[derive(Clone)]
pub struct EmbeddedRegistry {
    store: Arc<Embedded>,
}

impl EmbeddedRegistry {
    /// The registry kept in `store`'s file.
    pub fn new(store: &EmbeddedStore) -> Self {
        EmbeddedRegistry {
            store: store.shared(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&redb::Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(store.database()))
            .await
            .map_err(|e| StoreError::Unavailable(format!("the registry's thread failed: {e}")))?
    }
}

fn last_revision(changes: &impl ReadableTable<u64, &'static str>) -> Result<u64> {
    Ok(changes
        .last()
        .map_err(err)?
        .map_or(0, |(rev, _)| rev.value()))
}

#[async_trait::async_trait]
impl RegistryStore for EmbeddedRegistry {
    async fn get(&self, key: &str) -> Result<Option<Doc>> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let docs = match tx.open_table(DOCS) {
                Ok(docs) => docs,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(err(e)),
            };
            Ok(docs.get(key.as_str()).map_err(err)?.map(|v| {
                let (revision, value) = v.value();
                Doc {
                    value: value.to_vec(),
                    revision,
                }
            }))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Doc)>> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let docs = match tx.open_table(DOCS) {
                Ok(docs) => docs,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(err(e)),
            };
            let mut found = Vec::new();
            for entry in docs.range(prefix.as_str()..).map_err(err)? {
                let (key, value) = entry.map_err(err)?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                let (revision, value) = value.value();
                found.push((
                    key.value().to_owned(),
                    Doc {
                        value: value.to_vec(),
                        revision,
                    },
                ));
            }
            Ok(found)
        })
        .await
    }

    async fn write(&self, key: &str, value: Option<&[u8]>, expect: Expect) -> Result<u64> {
        let (key, value) = (key.to_owned(), value.map(<[u8]>::to_vec));
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(err)?;
            let revision;
            {
                let mut docs = tx.open_table(DOCS).map_err(err)?;
                let mut changes = tx.open_table(CHANGES).map_err(err)?;
                let found = docs.get(key.as_str()).map_err(err)?.map(|v| v.value().0);
                match (expect, found) {
                    (Expect::Absent, None) => {}
                    (Expect::At(at), Some(found)) if at == found => {}
                    _ => return Err(StoreError::Conflict),
                }
                revision = last_revision(&changes)? + 1;
                match &value {
                    Some(value) => {
                        docs.insert(key.as_str(), (revision, value.as_slice()))
                            .map_err(err)?;
                    }
                    None => {
                        docs.remove(key.as_str()).map_err(err)?;
                    }
                }
                changes.insert(revision, key.as_str()).map_err(err)?;
            }
            tx.commit().map_err(err)?;
            Ok(revision)
        })
        .await
    }

    async fn revision(&self) -> Result<u64> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(err)?;
            match tx.open_table(CHANGES) {
                Ok(changes) => last_revision(&changes),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(err(e)),
            }
        })
        .await
    }

    async fn changes(&self, since: u64) -> Result<(u64, Vec<String>)> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let changes = match tx.open_table(CHANGES) {
                Ok(changes) => changes,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, Vec::new())),
                Err(e) => return Err(err(e)),
            };
            let mut keys = Vec::new();
            let mut revision = since;
            for entry in changes.range(since + 1..).map_err(err)? {
                let (rev, key) = entry.map_err(err)?;
                revision = rev.value();
                keys.push(key.value().to_owned());
            }
            Ok((revision.max(last_revision(&changes)?), keys))
        })
        .await
    }

    async fn put_component(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        let (hash, bytes) = (hash.to_owned(), bytes.to_vec());
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(err)?;
            {
                let mut components = tx.open_table(COMPONENTS).map_err(err)?;
                if components.get(hash.as_str()).map_err(err)?.is_none() {
                    components
                        .insert(hash.as_str(), bytes.as_slice())
                        .map_err(err)?;
                }
            }
            tx.commit().map_err(err)
        })
        .await
    }

    async fn component(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let hash = hash.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let components = match tx.open_table(COMPONENTS) {
                Ok(components) => components,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(err(e)),
            };
            Ok(components
                .get(hash.as_str())
                .map_err(err)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }
}
