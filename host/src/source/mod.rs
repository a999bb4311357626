//! Where events come from, each source handing the engine batches of one
//! partition in order ([`Batch::new`](crate::engine::Batch::new)), its
//! progress in store-neutral terms ([`Progress`](crate::store::Progress)):
//! HTTP ingest ([`http`], `POST /v1/events`), the shards of a Kinesis
//! stream shared by many hosts ([`shards`], reading through [`kinesis`]),
//! the timers of the store's timer partitions ([`timers`]), and an NDJSON
//! file replayed ([`file`]). The partitioned ones share their partitions
//! among hosts through the store's [`leases`]; none of them names a store.
//!
//! A running source is a [`Source`] to the host: it says whether it is
//! ready and what it holds, and it finishes its batches when the host
//! stops.

pub mod file;
pub mod http;
pub mod ingest;
#[cfg(feature = "aws")]
pub mod kinesis;
pub mod leases;
#[cfg(feature = "aws")]
pub mod shards;
pub mod timers;

use crate::store::StoreError;

/// A failure of a source, by whether trying again may help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The service the source reads failed or could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// What the source was asked to read cannot be read: trying again
    /// fails the same way.
    #[error("{0}")]
    Invalid(String),
    /// The store keeping its leases failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SourceError {
    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::Unavailable(_) => true,
            SourceError::Invalid(_) => false,
            SourceError::Store(error) => error.retryable(),
        }
    }
}

/// A running source, as the host sees it.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// Why it cannot take traffic yet, if it cannot (for `/readyz`).
    fn not_ready(&self) -> Option<String>;

    /// Wait until it finished (once the host stops): its batches committed,
    /// its leases released.
    async fn join(&self);
}
