//! Following the registry: every host reads the whole registry once
//! ([`Registry::open`]), then asks what changed every [`FOLLOW_EVERY`] and
//! applies it to its [`View`] of the documents: rules and quotas are served
//! again ([`super::compile`]), tokens and silences take effect, a resume
//! lifts a quarantine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::versions::RuleDoc;
use super::{Registry, RegistryError, decode};
use crate::alert::silences::Silence;
use crate::auth::TokenRecord;
use crate::quota::Quotas;

/// How often a host asks the registry what changed (one strongly
/// consistent Query, four a second): a new version is live on every host
/// within this plus the time to fetch and compile it.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// The registry's documents as this host last read them.
#[derive(Default)]
pub(super) struct View {
    pub(super) revision: u64,
    pub(super) rules: BTreeMap<(String, String), (RuleDoc, u64)>,
    pub(super) tokens: HashMap<String, TokenRecord>,
    pub(super) quotas: HashMap<String, (Quotas, u64)>,
    /// By tenant, then id.
    pub(super) silences: HashMap<String, BTreeMap<String, Silence>>,
}

impl Registry {
    pub(super) async fn load_all(&self) -> Result<(), RegistryError> {
        let _one = self.refreshing.lock().await;
        // The revision first: what changes while listing is read again.
        let revision = self.store.revision().await?;
        let mut view = View {
            revision,
            ..View::default()
        };
        for (_, doc) in self.store.list("rule/").await? {
            let rule: RuleDoc = decode(&doc.value)?;
            view.rules.insert(
                (rule.tenant.clone(), rule.name.clone()),
                (rule, doc.revision),
            );
        }
        for (_, doc) in self.store.list("token/").await? {
            let token: TokenRecord = decode(&doc.value)?;
            view.tokens.insert(token.id.clone(), token);
        }
        for (key, doc) in self.store.list("quota/").await? {
            let tenant = key.trim_start_matches("quota/").to_owned();
            view.quotas
                .insert(tenant, (decode(&doc.value)?, doc.revision));
        }
        for (_, doc) in self.store.list("silence/").await? {
            let silence: Silence = decode(&doc.value)?;
            view.silences
                .entry(silence.tenant.clone())
                .or_default()
                .insert(silence.id.clone(), silence);
        }
        for (tenant, silences) in &view.silences {
            self.silences.set(tenant, silences.values());
        }
        let tenants: HashSet<String> = view.rules.keys().map(|(t, _)| t.clone()).collect();
        *self.view.write().expect("view lock") = view;
        for tenant in tenants {
            self.serve_tenant(&tenant).await;
        }
        Ok(())
    }

    /// Follow the registry until `stop`: what any host changes is served
    /// here within [`FOLLOW_EVERY`] plus its loading time.
    pub(crate) async fn follow(
        self: Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.refresh().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("reading the rule registry again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "cannot read the rule registry; serving the rules as they were");
                }
                Err(_) => {}
            }
        }
    }

    /// Apply what changed in the registry since this host last looked.
    pub(crate) async fn refresh(&self) -> Result<(), RegistryError> {
        let _one = self.refreshing.lock().await;
        let since = self.view.read().expect("view lock").revision;
        let (revision, keys) = self.store.changes(since).await?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut tenants = HashSet::new();
        let unique: HashSet<String> = keys.into_iter().collect();
        for key in unique {
            let doc = self.store.get(&key).await?;
            let mut view = self.view.write().expect("view lock");
            if let Some(rest) = key.strip_prefix("rule/") {
                let Some((tenant, name)) = rest.rsplit_once('/') else {
                    continue;
                };
                let id = (tenant.to_owned(), name.to_owned());
                match doc {
                    Some(doc) => {
                        view.rules.insert(id, (decode(&doc.value)?, doc.revision));
                    }
                    None => {
                        view.rules.remove(&id);
                    }
                }
                tenants.insert(tenant.to_owned());
            } else if let Some(id) = key.strip_prefix("token/") {
                match doc {
                    Some(doc) => {
                        view.tokens.insert(id.to_owned(), decode(&doc.value)?);
                    }
                    None => {
                        view.tokens.remove(id);
                    }
                }
            } else if let Some(rest) = key.strip_prefix("resume/") {
                drop(view);
                if doc.is_some()
                    && let Some((tenant, rule)) = rest.split_once('/')
                {
                    self.lift_quarantine(tenant, rule);
                }
            } else if let Some(rest) = key.strip_prefix("silence/") {
                let Some((tenant, id)) = rest.rsplit_once('/') else {
                    continue;
                };
                let silences = view.silences.entry(tenant.to_owned()).or_default();
                match doc {
                    Some(doc) => {
                        silences.insert(id.to_owned(), decode(&doc.value)?);
                    }
                    None => {
                        silences.remove(id);
                    }
                }
                self.silences.set(tenant, silences.values());
            } else if let Some(tenant) = key.strip_prefix("quota/") {
                match doc {
                    Some(doc) => {
                        view.quotas
                            .insert(tenant.to_owned(), (decode(&doc.value)?, doc.revision));
                    }
                    None => {
                        view.quotas.remove(tenant);
                    }
                }
                tenants.insert(tenant.to_owned());
            }
        }
        self.view.write().expect("view lock").revision = revision;
        for tenant in tenants {
            self.serve_tenant(&tenant).await;
        }
        Ok(())
    }
}
