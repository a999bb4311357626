//! The rule registry: components uploaded while the host runs, validated,
//! stored by content hash and versioned per tenant and rule name; tenant
//! tokens; per-tenant quotas; silences; quarantine resumes. Every host
//! follows the registry (asking what changed every [`FOLLOW_EVERY`]) and
//! serves each rule's active version through the [`LiveCatalogue`]: a
//! batch takes one tenant's rules once, so it runs against exactly one
//! version of each, and a swap between batches neither drops nor repeats
//! an event. State is filed by rule name, so a new version reads the
//! buckets the previous one left (see the SDK's state encoding for how a
//! rule decodes or resets them).
//!
//! This file holds the [`Registry`] itself and how documents are encoded.
//! The rest, a file per job:
//!
//! - `follow`: reading the registry and following what changes (its view
//!   of the documents); `update`: the one way to change a document (read,
//!   decide, write if unchanged, again on a conflict).
//! - `compile`: serving the active versions (compiling, instantiating).
//! - `versions`: uploads, versions, activation, deletion of rules.
//! - `views`: rules as the API shows them.
//! - `tokens`, `quotas`, [`silences`]: each tenant's tokens, quotas and
//!   silences as documents.
//! - `quarantine`: an operator's resume, on every host.
//! - `error`: [`RegistryError`], by what the caller should do.
//! - [`store`]: where the documents are kept ([`embedded`], [`dynamo`]).

mod compile;
#[cfg(feature = "aws")]
pub mod dynamo;
pub(crate) mod embedded;
mod error;
mod follow;
mod quarantine;
mod quotas;
pub(crate) mod silences;
pub mod store;
mod tokens;
mod update;
mod versions;
mod views;

pub use error::{Clash, Missing, RegistryError};
pub(crate) use follow::FOLLOW_EVERY;
pub use tokens::TokenView;
pub use versions::{ManifestView, VersionRecord};
pub use views::RuleView;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use serde::Serialize;

use crate::alert::silences::Silences;
use crate::catalogue::LiveCatalogue;
use crate::engine::Engine;
use crate::quota::{EventRates, Quotas};
use crate::runtime::{Compiled, Runtime};
use compile::Serving;
use follow::View;
use store::{RegistryStore, StoreError};

/// Longest tenant id the API takes (it is part of every stored key).
pub(crate) const MAX_TENANT_BYTES: usize = 128;

/// The registry as one host uses it.
pub struct Registry {
    store: Arc<dyn RegistryStore>,
    runtime: Arc<Runtime>,
    catalogue: Arc<LiveCatalogue>,
    defaults: Quotas,
    operator_token: Option<String>,
    view: RwLock<View>,
    serving: Mutex<HashMap<(String, String), Serving>>,
    load_errors: Mutex<HashMap<(String, String), (u32, String)>>,
    compiled: Mutex<HashMap<String, Compiled>>,
    /// Serialises following the registry.
    refreshing: tokio::sync::Mutex<()>,
    rates: EventRates,
    /// The engine whose quarantines a resume lifts.
    engine: OnceLock<Weak<Engine>>,
    /// The tenants' silences, compiled for the engine.
    silences: Arc<Silences>,
}

impl Registry {
    /// Read the whole registry and serve every active version.
    pub(crate) async fn open(
        store: Arc<dyn RegistryStore>,
        runtime: Arc<Runtime>,
        catalogue: Arc<LiveCatalogue>,
        defaults: Quotas,
        operator_token: Option<String>,
    ) -> Result<Arc<Self>, RegistryError> {
        let registry = Arc::new(Registry {
            store,
            runtime,
            catalogue,
            defaults,
            operator_token,
            view: RwLock::default(),
            serving: Mutex::default(),
            load_errors: Mutex::default(),
            compiled: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
            rates: EventRates::default(),
            engine: OnceLock::new(),
            silences: Arc::default(),
        });
        registry.load_all().await?;
        Ok(registry)
    }

    /// The sandbox the registry loads rules into.
    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Rules this host serves, from the config and the registry.
    pub(crate) fn serving_count(&self) -> usize {
        self.catalogue.rule_count()
    }

    pub(crate) fn has_operator_token(&self) -> bool {
        self.operator_token.is_some()
    }
}

pub(crate) fn validate_tenant(tenant: &str) -> Result<(), RegistryError> {
    if tenant.is_empty() || tenant.len() > MAX_TENANT_BYTES || tenant.chars().any(char::is_control)
    {
        return Err(RegistryError::Invalid(format!(
            "tenant `{}` must be 1 to {MAX_TENANT_BYTES} bytes without control characters",
            tenant.escape_debug()
        )));
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry documents serialize")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Store(StoreError::Invalid(format!("unreadable document: {e}"))))
}
