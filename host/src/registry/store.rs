//! Where the registry keeps its documents: a small versioned key-value
//! store with one atomic primitive, [`RegistryStore::write`], which changes
//! one document if it is still at the revision the writer read, raises the
//! registry's revision and records which key changed at it, all at once.
//! Hosts follow the registry by asking what changed since the revision they
//! last saw. Component bytes are stored apart, by content hash.
//!
//! The embedded store keeps them in redb ([`super::embedded`]); with
//! DynamoDB state they are items of the deployment's table
//! ([`super::dynamo`]).

/// A stored document and the registry revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No document under the key.
    Absent,
    /// The document as last written at this revision.
    At(u64),
}

/// Why a registry operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the document (or the registry's revision)
    /// since it was read: read again and retry.
    #[error("changed by another writer")]
    Conflict,
    #[error("rule registry unavailable: {0}")]
    Unavailable(String),
    #[error("rule registry: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether the same operation may succeed later: another writer got
    /// there first, or the store was unavailable.
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Conflict | StoreError::Unavailable(_) => true,
            StoreError::Invalid(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Documents by key, changes by revision, components by hash.
#[async_trait::async_trait]
pub trait RegistryStore: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Doc>>;

    /// Every document whose key starts with `prefix`, by key.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Doc)>>;

    /// Put (`Some`) or delete (`None`) the document under `key` if it is as
    /// `expect`ed; returns the registry's new revision.
    async fn write(&self, key: &str, value: Option<&[u8]>, expect: Expect) -> Result<u64>;

    /// The registry's revision: how many writes it has taken.
    async fn revision(&self) -> Result<u64>;

    /// The registry's revision, and the keys written after `since`.
    async fn changes(&self, since: u64) -> Result<(u64, Vec<String>)>;

    /// Keep a component's bytes under its SHA-256 (hex); idempotent.
    async fn put_component(&self, hash: &str, bytes: &[u8]) -> Result<()>;

    async fn component(&self, hash: &str) -> Result<Option<Vec<u8>>>;
}
