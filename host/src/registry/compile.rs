//! Serving registered rules: each tenant's active versions are loaded
//! (compiled once per content hash, within [`COMPILE_TIMEOUT`], and
//! instantiated under the tenant's quotas) and swapped into the catalogue
//! at once; a version this host cannot load leaves the previous one
//! running.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::versions::{RuleDoc, VersionRecord};
use super::{Missing, Registry, RegistryError};
use crate::quota::Quotas;
use crate::runtime::{Compiled, LoadedRule, RuleError, RuleSettings};

/// Longest an upload's compilation may take (the example rules compile in
/// well under a second here).
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(20);

/// What this host runs of one registered rule.
pub(super) struct Serving {
    pub(super) version: u32,
    content_hash: String,
    params: Option<serde_json::Value>,
    quotas: Quotas,
    rule: Arc<LoadedRule>,
}

impl Registry {
    /// Serve the active versions of `tenant`'s registered rules: load what
    /// changed, keep what did not, and swap the tenant's rules at once.
    pub(super) async fn serve_tenant(&self, tenant: &str) {
        let quotas = self.quotas(tenant);
        let docs: Vec<RuleDoc> = {
            let view = self.view.read().expect("view lock");
            view.rules
                .range((tenant.to_owned(), String::new())..)
                .take_while(|((t, _), _)| t == tenant)
                .map(|(_, (doc, _))| doc.clone())
                .collect()
        };
        let mut rules = Vec::new();
        for doc in docs {
            let Some(active) = doc.active_version() else {
                continue;
            };
            let id = (doc.tenant.clone(), doc.name.clone());
            let current = {
                let serving = self.serving.lock().expect("serving lock");
                serving.get(&id).and_then(|s| {
                    (s.version == active.version
                        && s.content_hash == active.content_hash
                        && s.params == active.params
                        && s.quotas == quotas)
                        .then(|| s.rule.clone())
                })
            };
            if let Some(rule) = current {
                rules.push(rule);
                continue;
            }
            let started = std::time::Instant::now();
            match self.load_version(&doc, active, &quotas).await {
                Ok(rule) => {
                    let rule = Arc::new(rule);
                    tracing::info!(tenant, rule = %doc.name, version = active.version, took = ?started.elapsed(), "loaded");
                    // Another version is another rule: it starts healthy.
                    self.lift_quarantine(tenant, &doc.name);
                    self.load_errors.lock().expect("errors lock").remove(&id);
                    self.serving.lock().expect("serving lock").insert(
                        id,
                        Serving {
                            version: active.version,
                            content_hash: active.content_hash.clone(),
                            params: active.params.clone(),
                            quotas: quotas.clone(),
                            rule: rule.clone(),
                        },
                    );
                    rules.push(rule);
                }
                Err(error) => {
                    // Keep serving what ran before: a host that cannot load
                    // a version (say, a component missing from its store)
                    // does not stop the rule.
                    tracing::error!(tenant, rule = %doc.name, version = active.version, %error, "cannot serve this version; keeping the previous one");
                    self.load_errors
                        .lock()
                        .expect("errors lock")
                        .insert(id.clone(), (active.version, error.to_string()));
                    if let Some(previous) = self.serving.lock().expect("serving lock").get(&id) {
                        rules.push(previous.rule.clone());
                    }
                }
            }
        }
        // Rules deleted or deactivated stop being served.
        let names: HashSet<&str> = rules.iter().map(|r| r.name()).collect();
        self.serving
            .lock()
            .expect("serving lock")
            .retain(|(t, n), _| t != tenant || names.contains(n.as_str()));
        self.catalogue.set_registered(tenant, rules);
    }

    async fn load_version(
        &self,
        doc: &RuleDoc,
        version: &VersionRecord,
        quotas: &Quotas,
    ) -> Result<LoadedRule, RegistryError> {
        let compiled = match self.cached(&version.content_hash) {
            Some(compiled) => compiled,
            None => {
                let wasm = self
                    .store
                    .component(&version.content_hash)
                    .await?
                    .ok_or_else(|| {
                        RegistryError::NotFound(Missing::Component {
                            hash: version.content_hash.clone(),
                        })
                    })?;
                self.compile(&doc.name, wasm).await?
            }
        };
        let settings = RuleSettings {
            name: Some(doc.name.clone()),
            params: version.params.clone(),
        };
        self.instantiate(&doc.tenant, compiled, settings, quotas)
            .await
    }

    pub(super) fn cached(&self, hash: &str) -> Option<Compiled> {
        self.compiled
            .lock()
            .expect("compiled lock")
            .get(hash)
            .cloned()
    }

    /// Compile on a blocking thread, within [`COMPILE_TIMEOUT`].
    pub(super) async fn compile(
        &self,
        origin: &str,
        wasm: Vec<u8>,
    ) -> Result<Compiled, RegistryError> {
        let runtime = self.runtime.clone();
        let origin = origin.to_owned();
        let work = tokio::task::spawn_blocking(move || runtime.compile(&origin, &wasm));
        let compiled = match tokio::time::timeout(COMPILE_TIMEOUT, work).await {
            Ok(Ok(Ok(compiled))) => compiled,
            Ok(Ok(Err(error))) => return Err(RegistryError::Invalid(upload_error(&error))),
            Ok(Err(join)) => {
                return Err(RegistryError::Invalid(format!("compiling failed: {join}")));
            }
            Err(_) => {
                return Err(RegistryError::Invalid(format!(
                    "the component took longer than {COMPILE_TIMEOUT:?} to compile"
                )));
            }
        };
        self.compiled
            .lock()
            .expect("compiled lock")
            .insert(compiled.content_hash().to_owned(), compiled.clone());
        Ok(compiled)
    }

    pub(super) async fn instantiate(
        &self,
        tenant: &str,
        compiled: Compiled,
        settings: RuleSettings,
        quotas: &Quotas,
    ) -> Result<LoadedRule, RegistryError> {
        let runtime = self.runtime.clone();
        let tenant = tenant.to_owned();
        let limits = quotas.limits(runtime.limits());
        tokio::task::spawn_blocking(move || {
            runtime.instantiate_within(&tenant, &compiled, &settings, limits)
        })
        .await
        .map_err(|e| RegistryError::Invalid(format!("loading failed: {e}")))?
        .map_err(|e| RegistryError::Invalid(upload_error(&e)))
    }
}

/// What an upload is told when its component is refused: the cause, not
/// the upload's internal label.
fn upload_error(error: &RuleError) -> String {
    error.cause.to_string()
}
