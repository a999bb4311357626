//! Why a registry request failed, by what the caller should do, and
//! whether trying again may help. The messages are what the API answers.

use crate::quota::QuotaExceeded;

use super::silences::KEEP_ENDED;
use super::store::StoreError;

/// Why a registry request failed, by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(Missing),
    /// The upload is not a rule this host can run, or its parameters are
    /// refused.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// The request clashes with what exists.
    #[error("{0}")]
    Conflict(Clash),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Whether the same request may succeed later, unchanged: the store was
    /// unavailable, or a rate quota was exceeded.
    pub fn retryable(&self) -> bool {
        match self {
            RegistryError::NotFound(_) | RegistryError::Invalid(_) | RegistryError::Conflict(_) => {
                false
            }
            RegistryError::Quota(exceeded) => exceeded.retry,
            RegistryError::Store(error) => error.retryable(),
        }
    }
}

/// What a request named that the registry does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    #[error("tenant `{tenant}` has no rule `{rule}`")]
    Rule { tenant: String, rule: String },
    #[error(
        "rule `{rule}` of tenant `{tenant}` has no version {version} (it keeps {})",
        kept.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    )]
    Version {
        tenant: String,
        rule: String,
        version: u32,
        /// The versions it keeps, oldest first.
        kept: Vec<u32>,
    },
    #[error("component {hash} is not in the registry")]
    Component { hash: String },
    #[error("tenant `{tenant}` has no token `{id}`")]
    Token { tenant: String, id: String },
    #[error("tenant `{tenant}` has no silence `{id}`")]
    Silence { tenant: String, id: String },
}

/// How a request clashes with what exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Clash {
    /// An upload under the name of a rule from the host's config.
    #[error(
        "tenant `{tenant}` runs a rule named `{rule}` from the host's config; it can be changed only there"
    )]
    NamedInConfig { tenant: String, rule: String },
    /// A change to a rule from the host's config.
    #[error(
        "rule `{rule}` of tenant `{tenant}` comes from the host's config; it can be changed only there"
    )]
    FromConfig { tenant: String, rule: String },
    /// A silence past [`MAX_SILENCES`](super::silences::MAX_SILENCES).
    #[error(
        "tenant `{tenant}` has {kept} silences, the most kept; delete some (ended ones go {} days after they end)",
        KEEP_ENDED.as_secs() / 86_400
    )]
    TooManySilences { tenant: String, kept: usize },
}
