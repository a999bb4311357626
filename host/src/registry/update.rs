//! The registry's one way to change a document: read it, decide, and write
//! it back only if nobody wrote it since ([`Expect`]); when another writer
//! got there first, read it again and decide again.

use super::store::{Doc, Expect, StoreError};
use super::{Registry, RegistryError};

/// What a change does with the document it read, and its answer.
pub(super) enum Update<T> {
    /// Write this document.
    Put(Vec<u8>, T),
    /// Remove the document.
    Delete(T),
    /// Leave it as it is.
    Keep(T),
}

impl Registry {
    /// Change the document under `key`: `change` gets it as stored now
    /// (`None`: there is none) and says what to write, or fails the
    /// request. Run again on what another writer wrote, until a write
    /// holds; its answer once it does.
    pub(super) async fn update<T>(
        &self,
        key: &str,
        mut change: impl FnMut(Option<&Doc>) -> Result<Update<T>, RegistryError>,
    ) -> Result<T, RegistryError> {
        loop {
            let doc = self.store.get(key).await?;
            let expect = match &doc {
                Some(doc) => Expect::At(doc.revision),
                None => Expect::Absent,
            };
            let (value, answer) = match change(doc.as_ref())? {
                Update::Put(value, answer) => (Some(value), answer),
                Update::Delete(answer) => (None, answer),
                Update::Keep(answer) => return Ok(answer),
            };
            match self.store.write(key, value.as_deref(), expect).await {
                Ok(_) => return Ok(answer),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
