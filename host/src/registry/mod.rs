//! The rule registry: components uploaded while the host runs, validated,
//! stored by content hash and versioned per tenant and rule name; tenant
//! tokens; per-tenant quotas. Every host follows the registry (asking what
//! changed every [`FOLLOW_EVERY`]) and serves each rule's active version
//! through the [`LiveCatalogue`]: a batch takes one tenant's rules once, so
//! it runs against exactly one version of each, and a swap between batches
//! neither drops nor repeats an event. State is filed by rule name, so a new
//! version reads the buckets the previous one left (see the SDK's state
//! encoding for how a rule decodes or resets them).

pub mod auth;
#[cfg(feature = "aws")]
pub mod dynamo;
pub mod embedded;
pub mod quota;
pub mod silences;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::catalogue::LiveCatalogue;
use crate::runtime::{
    Compiled, EventTime, LoadedRule, Manifest, RuleError, RuleSettings, Runtime, Scalar, Test,
};
use auth::{Caller, TokenRecord};
use quota::{EventRates, QuotaExceeded, Quotas};
use silences::{NewSilence, Silence, SilenceView, Silences};
use store::{Expect, RegistryStore, StoreError};

/// Versions a rule keeps; older ones (never the active one) are pruned.
pub const MAX_VERSIONS: usize = 32;
/// Largest parameters of one version, as JSON: 32 versions of them fit one
/// DynamoDB item with their manifests.
pub const MAX_PARAMS_BYTES: usize = 8 * 1024;
/// Longest an upload's compilation may take (the example rules compile in
/// well under a second here).
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a host asks the registry what changed (one strongly
/// consistent Query, four a second): a new version is live on every host
/// within this plus the time to fetch and compile it.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// Longest tenant id the API takes (it is part of every stored key).
pub const MAX_TENANT_BYTES: usize = 128;

/// One version of a registered rule, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionRecord {
    /// 1, 2, …: one per upload.
    pub version: u32,
    /// SHA-256 of the component, hex.
    pub content_hash: String,
    /// Bytes of the component.
    pub size: u64,
    /// The parameters it runs with (`null`: the rule's defaults).
    #[schema(value_type = Object)]
    pub params: Option<serde_json::Value>,
    /// The manifest the rule gave for these parameters.
    pub manifest: ManifestView,
    /// `operator`, or `token:<id>` of the tenant token that uploaded it.
    pub uploaded_by: String,
    /// RFC 3339.
    pub uploaded_at: String,
}

/// A manifest as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestView {
    pub name: String,
    pub version: String,
    /// Each condition: `{"field": …, "exists": true}`, `{"field": …,
    /// "equals": v}` or `{"field": …, "one_of": [v, …]}`.
    #[schema(value_type = Vec<Object>)]
    pub filter: Vec<serde_json::Value>,
    pub bucket_key: Vec<String>,
    pub fields: Vec<String>,
    pub raw_json: bool,
    /// `arrival`, or the event field holding the event time.
    pub event_time: String,
    pub state_ttl_ms: Option<u64>,
}

fn scalar_json(scalar: &Scalar) -> serde_json::Value {
    match scalar {
        Scalar::Null => serde_json::Value::Null,
        Scalar::Boolean(b) => (*b).into(),
        Scalar::Integer(i) => (*i).into(),
        Scalar::Float(f) => (*f).into(),
        Scalar::Text(t) => t.clone().into(),
    }
}

impl From<&Manifest> for ManifestView {
    fn from(m: &Manifest) -> Self {
        ManifestView {
            name: m.name.clone(),
            version: m.version.clone(),
            filter: m
                .filter
                .iter()
                .map(|c| match &c.test {
                    Test::Exists => serde_json::json!({"field": c.field, "exists": true}),
                    Test::Equals(v) => {
                        serde_json::json!({"field": c.field, "equals": scalar_json(v)})
                    }
                    Test::OneOf(vs) => serde_json::json!({
                        "field": c.field,
                        "one_of": vs.iter().map(scalar_json).collect::<Vec<_>>(),
                    }),
                })
                .collect(),
            bucket_key: m.bucket_key.clone(),
            fields: m.fields.clone(),
            raw_json: m.raw_json,
            event_time: match &m.event_time {
                EventTime::Arrival => "arrival".to_owned(),
                EventTime::Field(f) => f.clone(),
            },
            state_ttl_ms: m.state_ttl_ms,
        }
    }
}

/// A registered rule as stored: its versions and which one runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RuleDoc {
    tenant: String,
    name: String,
    active: Option<u32>,
    /// Oldest first.
    versions: Vec<VersionRecord>,
    created_at: String,
}

impl RuleDoc {
    fn version(&self, version: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }

    fn active_version(&self) -> Option<&VersionRecord> {
        self.active.and_then(|v| self.version(v))
    }
}

/// A rule of a tenant as `GET …/rules/{rule}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuleView {
    pub tenant: String,
    pub name: String,
    /// `registry` (uploaded; versioned) or `config` (from the host's config
    /// file or flags; changed only there).
    pub source: String,
    /// The version that runs (registry rules).
    pub active_version: Option<u32>,
    /// The active version's record (for a config rule: its component and
    /// parameters, as version 0).
    pub active: Option<VersionRecord>,
    /// Every kept version, oldest first.
    pub versions: Vec<VersionRecord>,
    /// Which version this host runs now, and why not the active one if it
    /// cannot (the component failed to load here).
    pub serving: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
    /// Quarantined on this host: its events are dead-lettered until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<crate::engine::contain::Quarantine>,
}

/// A tenant token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub tenant: String,
    pub created_at: String,
    pub created_by: String,
    pub revoked_at: Option<String>,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> Self {
        TokenView {
            id: t.id.clone(),
            tenant: t.tenant.clone(),
            created_at: t.created_at.clone(),
            created_by: t.created_by.clone(),
            revoked_at: t.revoked_at.clone(),
        }
    }
}

/// Why a registry request failed, by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(String),
    /// The upload is not a rule this host can run, or its parameters are
    /// refused.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// The request clashes with what exists.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn rule_key(tenant: &str, name: &str) -> String {
    format!("rule/{tenant}/{name}")
}

fn token_key(id: &str) -> String {
    format!("token/{id}")
}

fn quota_key(tenant: &str) -> String {
    format!("quota/{tenant}")
}

fn silence_key(tenant: &str, id: &str) -> String {
    format!("silence/{tenant}/{id}")
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The registry's documents as this host last read them.
#[derive(Default)]
struct View {
    revision: u64,
    rules: BTreeMap<(String, String), (RuleDoc, u64)>,
    tokens: HashMap<String, TokenRecord>,
    quotas: HashMap<String, (Quotas, u64)>,
    /// By tenant, then id.
    silences: HashMap<String, BTreeMap<String, Silence>>,
}

/// What this host runs of one registered rule.
struct Serving {
    version: u32,
    content_hash: String,
    params: Option<serde_json::Value>,
    quotas: Quotas,
    rule: Arc<LoadedRule>,
}

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
    engine: std::sync::OnceLock<std::sync::Weak<crate::engine::Engine>>,
    /// The tenants' silences, compiled for the engine.
    silences: Arc<Silences>,
}

impl Registry {
    /// Read the whole registry and serve every active version.
    pub async fn open(
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
            engine: std::sync::OnceLock::new(),
            silences: Arc::default(),
        });
        registry.load_all().await?;
        Ok(registry)
    }

    /// Lift quarantines in `engine` when a resume is written (here or on
    /// another host) and when a rule's served version changes.
    pub fn on_resume(&self, engine: Arc<crate::engine::Engine>) {
        let _ = self.engine.set(Arc::downgrade(&engine));
    }

    fn lift_quarantine(&self, tenant: &str, rule: &str) -> bool {
        self.engine
            .get()
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|engine| engine.resume(tenant, rule))
    }

    /// Lift `tenant`'s `rule` quarantine on every host: on this one at once,
    /// on the others when they next follow the registry. Whether this host
    /// had it quarantined.
    pub async fn resume(&self, tenant: &str, rule: &str, by: &str) -> Result<bool, RegistryError> {
        validate_tenant(tenant)?;
        let key = format!("resume/{tenant}/{rule}");
        let record = serde_json::json!({ "by": by, "at": now_rfc3339() });
        loop {
            let expect = match self.store.get(&key).await? {
                Some(doc) => Expect::At(doc.revision),
                None => Expect::Absent,
            };
            match self.store.write(&key, Some(&encode(&record)), expect).await {
                Ok(_) => break,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.lift_quarantine(tenant, rule))
    }

    /// The sandbox the registry loads rules into.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Rules this host serves, from the config and the registry.
    pub fn serving_count(&self) -> usize {
        self.catalogue.rule_count()
    }

    pub fn has_operator_token(&self) -> bool {
        self.operator_token.is_some()
    }

    async fn load_all(&self) -> Result<(), RegistryError> {
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
    pub async fn follow(
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
    pub async fn refresh(&self) -> Result<(), RegistryError> {
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

    /// Serve the active versions of `tenant`'s registered rules: load what
    /// changed, keep what did not, and swap the tenant's rules at once.
    async fn serve_tenant(&self, tenant: &str) {
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
                        RegistryError::NotFound(format!(
                            "component {} is not in the registry",
                            version.content_hash
                        ))
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

    fn cached(&self, hash: &str) -> Option<Compiled> {
        self.compiled
            .lock()
            .expect("compiled lock")
            .get(hash)
            .cloned()
    }

    /// Compile on a blocking thread, within [`COMPILE_TIMEOUT`].
    async fn compile(&self, origin: &str, wasm: Vec<u8>) -> Result<Compiled, RegistryError> {
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

    async fn instantiate(
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

    /// The quotas of a tenant the operator set none for.
    pub fn default_quotas(&self) -> &Quotas {
        &self.defaults
    }

    /// `tenant`'s quotas: the operator's for it, or the defaults.
    pub fn quotas(&self, tenant: &str) -> Quotas {
        self.view
            .read()
            .expect("view lock")
            .quotas
            .get(tenant)
            .map_or_else(|| self.defaults.clone(), |(q, _)| q.clone())
    }

    pub async fn set_quotas(&self, tenant: &str, quotas: Quotas) -> Result<Quotas, RegistryError> {
        quotas.validate().map_err(RegistryError::Invalid)?;
        let key = quota_key(tenant);
        loop {
            let expect = match self.store.get(&key).await? {
                Some(doc) => Expect::At(doc.revision),
                None => Expect::Absent,
            };
            match self.store.write(&key, Some(&encode(&quotas)), expect).await {
                Ok(_) => break,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.refresh().await?;
        Ok(quotas)
    }

    /// The tenants' silences, as the engine marks alerts with them.
    pub fn silences(&self) -> Arc<Silences> {
        self.silences.clone()
    }

    /// Keep a new silence for `tenant`; ended ones older than
    /// [`silences::KEEP_ENDED`] go.
    pub async fn create_silence(
        &self,
        tenant: &str,
        new: NewSilence,
        by: &Caller,
        now_ms: i64,
    ) -> Result<SilenceView, RegistryError> {
        validate_tenant(tenant)?;
        let id = auth::new_token().0;
        // The host's clock, which also decides whether alerts are silenced.
        let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(now_rfc3339);
        let silence = new.into_silence(tenant, id.clone(), by.name(), &now)?;
        let stale_before = now_ms.saturating_sub(silences::KEEP_ENDED.as_millis() as i64);
        let (stale, kept): (Vec<_>, Vec<_>) = self
            .silence_list(tenant)
            .into_iter()
            .partition(|s| SilenceView::new(s.clone(), stale_before).state == "expired");
        for old in stale {
            let key = silence_key(tenant, &old.id);
            if let Some(doc) = self.store.get(&key).await? {
                match self.store.write(&key, None, Expect::At(doc.revision)).await {
                    // Another host pruned or deleted it first.
                    Ok(_) | Err(StoreError::Conflict) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if kept.len() >= silences::MAX_SILENCES {
            return Err(RegistryError::Conflict(format!(
                "tenant `{tenant}` has {} silences, the most kept; delete some (ended ones go {} days after they end)",
                kept.len(),
                silences::KEEP_ENDED.as_secs() / 86_400
            )));
        }
        self.store
            .write(
                &silence_key(tenant, &id),
                Some(&encode(&silence)),
                Expect::Absent,
            )
            .await?;
        self.refresh().await?;
        Ok(SilenceView::new(silence, now_ms))
    }

    /// `tenant`'s silences, ended ones too, by start.
    pub fn silence_views(&self, tenant: &str, now_ms: i64) -> Vec<SilenceView> {
        self.silence_list(tenant)
            .into_iter()
            .map(|s| SilenceView::new(s, now_ms))
            .collect()
    }

    fn silence_list(&self, tenant: &str) -> Vec<Silence> {
        let view = self.view.read().expect("view lock");
        let mut list: Vec<Silence> = view
            .silences
            .get(tenant)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| (&a.starts_at, &a.id).cmp(&(&b.starts_at, &b.id)));
        list
    }

    /// Remove a silence of `tenant`: the alerts it matched are published
    /// unmarked from then on, on every host within [`FOLLOW_EVERY`].
    pub async fn delete_silence(
        &self,
        tenant: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<SilenceView, RegistryError> {
        let key = silence_key(tenant, id);
        loop {
            let Some(doc) = self.store.get(&key).await? else {
                return Err(RegistryError::NotFound(format!(
                    "tenant `{tenant}` has no silence `{id}`"
                )));
            };
            let silence: Silence = decode(&doc.value)?;
            match self.store.write(&key, None, Expect::At(doc.revision)).await {
                Ok(_) => {
                    self.refresh().await?;
                    return Ok(SilenceView::new(silence, now_ms));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Take `events` from `tenant`'s events-per-second quota.
    pub fn admit_events(&self, tenant: &str, events: usize) -> Result<(), QuotaExceeded> {
        let per_second = self.quotas(tenant).events_per_second;
        self.rates.admit(tenant, events, per_second)
    }

    /// Who a bearer token belongs to; `None`: nobody (unknown or revoked).
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        if let Some(operator) = &self.operator_token
            && auth::same_secret(token, operator)
        {
            return Some(Caller::Operator);
        }
        let id = auth::token_id(token)?;
        let view = self.view.read().expect("view lock");
        let record = view.tokens.get(id)?;
        (record.revoked_at.is_none() && auth::same_secret(&auth::digest(token), &record.sha256))
            .then(|| Caller::Tenant {
                tenant: record.tenant.clone(),
                token: record.id.clone(),
            })
    }

    /// A new token for `tenant`: its record, and the token, shown only now.
    pub async fn create_token(
        &self,
        tenant: &str,
        by: &Caller,
    ) -> Result<(TokenView, String), RegistryError> {
        let (id, token) = auth::new_token();
        let record = TokenRecord {
            id: id.clone(),
            tenant: tenant.to_owned(),
            sha256: auth::digest(&token),
            created_at: now_rfc3339(),
            created_by: by.name(),
            revoked_at: None,
        };
        self.store
            .write(&token_key(&id), Some(&encode(&record)), Expect::Absent)
            .await?;
        self.refresh().await?;
        Ok((TokenView::from(&record), token))
    }

    pub fn tokens(&self, tenant: &str) -> Vec<TokenView> {
        let view = self.view.read().expect("view lock");
        let mut tokens: Vec<TokenView> = view
            .tokens
            .values()
            .filter(|t| t.tenant == tenant)
            .map(TokenView::from)
            .collect();
        tokens.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        tokens
    }

    /// Revoke a token of `tenant`: it stops working on every host within
    /// [`FOLLOW_EVERY`], and stays listed as revoked.
    pub async fn revoke_token(&self, tenant: &str, id: &str) -> Result<TokenView, RegistryError> {
        let key = token_key(id);
        loop {
            let doc = self.store.get(&key).await?;
            let Some((mut record, revision)) = doc
                .map(|d| decode::<TokenRecord>(&d.value).map(|r| (r, d.revision)))
                .transpose()?
                .filter(|(r, _)| r.tenant == tenant)
            else {
                return Err(RegistryError::NotFound(format!(
                    "tenant `{tenant}` has no token `{id}`"
                )));
            };
            if record.revoked_at.is_some() {
                return Ok(TokenView::from(&record));
            }
            record.revoked_at = Some(now_rfc3339());
            match self
                .store
                .write(&key, Some(&encode(&record)), Expect::At(revision))
                .await
            {
                Ok(_) => {
                    self.refresh().await?;
                    return Ok(TokenView::from(&record));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Validate a component with its parameters for `tenant` as rule
    /// `name`, store it, and add a version (active unless `activate` is
    /// false). Returns the version and whether it is new: uploading what
    /// the latest version already is (same bytes, same parameters) adds
    /// none.
    pub async fn upload(
        &self,
        tenant: &str,
        name: &str,
        wasm: Vec<u8>,
        params: Option<serde_json::Value>,
        activate: bool,
        by: &Caller,
    ) -> Result<(VersionRecord, bool), RegistryError> {
        validate_tenant(tenant)?;
        let quotas = self.quotas(tenant);
        if wasm.len() as u64 > quotas.component_bytes {
            return Err(QuotaExceeded {
                tenant: tenant.to_owned(),
                quota: "component_bytes",
                limit: quotas.component_bytes,
                detail: format!("the component is {} bytes", wasm.len()),
                retry: false,
            }
            .into());
        }
        if let Some(params) = &params {
            let size = params.to_string().len();
            if size > MAX_PARAMS_BYTES {
                return Err(RegistryError::Invalid(format!(
                    "the parameters are {size} bytes of JSON; at most {MAX_PARAMS_BYTES} are kept per version"
                )));
            }
        }
        if self
            .catalogue
            .fixed(tenant)
            .iter()
            .any(|r| r.name() == name)
        {
            return Err(RegistryError::Conflict(format!(
                "tenant `{tenant}` runs a rule named `{name}` from the host's config; it can be changed only there"
            )));
        }
        let exists = self
            .view
            .read()
            .expect("view lock")
            .rules
            .contains_key(&(tenant.to_owned(), name.to_owned()));
        if !exists && self.registered_count(tenant) >= quotas.rules as usize {
            return Err(QuotaExceeded {
                tenant: tenant.to_owned(),
                quota: "rules",
                limit: quotas.rules as u64,
                detail: format!("it has {} registered rules", self.registered_count(tenant)),
                retry: false,
            }
            .into());
        }
        let hash = hex::encode(sha2::Sha256::digest(&wasm));
        let compiled = match self.cached(&hash) {
            Some(compiled) => compiled,
            None => self.compile(name, wasm.clone()).await?,
        };
        // The manifest under the tenant's limits, from these parameters.
        let settings = RuleSettings {
            name: Some(name.to_owned()),
            params: params.clone(),
        };
        let rule = self
            .instantiate(tenant, compiled, settings, &quotas)
            .await?;
        let manifest = ManifestView::from(rule.manifest());
        drop(rule);
        self.store.put_component(&hash, &wasm).await?;

        let key = rule_key(tenant, name);
        let (record, created) = loop {
            let (mut doc, expect) = match self.store.get(&key).await? {
                Some(doc) => (decode::<RuleDoc>(&doc.value)?, Expect::At(doc.revision)),
                None => (
                    RuleDoc {
                        tenant: tenant.to_owned(),
                        name: name.to_owned(),
                        active: None,
                        versions: Vec::new(),
                        created_at: now_rfc3339(),
                    },
                    Expect::Absent,
                ),
            };
            let same = doc
                .versions
                .last()
                .filter(|v| v.content_hash == hash && v.params == params)
                .cloned();
            let (record, created) = match same {
                Some(latest) => (latest, false),
                None => {
                    let record = VersionRecord {
                        version: doc.versions.last().map_or(1, |v| v.version + 1),
                        content_hash: hash.clone(),
                        size: wasm.len() as u64,
                        params: params.clone(),
                        manifest: manifest.clone(),
                        uploaded_by: by.name(),
                        uploaded_at: now_rfc3339(),
                    };
                    doc.versions.push(record.clone());
                    (record, true)
                }
            };
            let before = doc.active;
            if activate {
                doc.active = Some(record.version);
            }
            if !created && doc.active == before {
                break (record, false);
            }
            prune(&mut doc);
            match self.store.write(&key, Some(&encode(&doc)), expect).await {
                Ok(_) => break (record, created),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.refresh().await?;
        Ok((record, created))
    }

    fn registered_count(&self, tenant: &str) -> usize {
        self.view
            .read()
            .expect("view lock")
            .rules
            .keys()
            .filter(|(t, _)| t == tenant)
            .count()
    }

    /// Make `version` the one that runs (roll back or forward).
    pub async fn activate(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
    ) -> Result<RuleView, RegistryError> {
        let key = rule_key(tenant, name);
        loop {
            let Some(stored) = self.store.get(&key).await? else {
                return Err(self.no_rule(tenant, name));
            };
            let mut doc: RuleDoc = decode(&stored.value)?;
            if doc.version(version).is_none() {
                let kept: Vec<String> =
                    doc.versions.iter().map(|v| v.version.to_string()).collect();
                return Err(RegistryError::NotFound(format!(
                    "rule `{name}` of tenant `{tenant}` has no version {version} (it keeps {})",
                    kept.join(", ")
                )));
            }
            if doc.active == Some(version) {
                break;
            }
            doc.active = Some(version);
            match self
                .store
                .write(&key, Some(&encode(&doc)), Expect::At(stored.revision))
                .await
            {
                Ok(_) => break,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.refresh().await?;
        self.rule(tenant, name)
    }

    /// Remove a registered rule and its versions; it stops running on every
    /// host. Its buckets' state stays in the state store (a rule
    /// registered again under the name reads it).
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<(), RegistryError> {
        let key = rule_key(tenant, name);
        loop {
            let Some(stored) = self.store.get(&key).await? else {
                return Err(self.no_rule(tenant, name));
            };
            match self
                .store
                .write(&key, None, Expect::At(stored.revision))
                .await
            {
                Ok(_) => break,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.refresh().await?;
        Ok(())
    }

    fn no_rule(&self, tenant: &str, name: &str) -> RegistryError {
        if self
            .catalogue
            .fixed(tenant)
            .iter()
            .any(|r| r.name() == name)
        {
            return RegistryError::Conflict(format!(
                "rule `{name}` of tenant `{tenant}` comes from the host's config; it can be changed only there"
            ));
        }
        RegistryError::NotFound(format!("tenant `{tenant}` has no rule `{name}`"))
    }

    /// Every rule of `tenant`: from the config, then registered, by name.
    pub fn rules(&self, tenant: &str) -> Vec<RuleView> {
        let mut rules: Vec<RuleView> = self
            .catalogue
            .fixed(tenant)
            .iter()
            .map(|rule| self.config_view(rule))
            .collect();
        let names: Vec<String> = {
            let view = self.view.read().expect("view lock");
            view.rules
                .keys()
                .filter(|(t, _)| t == tenant)
                .map(|(_, n)| n.clone())
                .collect()
        };
        rules.extend(names.iter().filter_map(|n| self.rule(tenant, n).ok()));
        rules
    }

    pub fn rule(&self, tenant: &str, name: &str) -> Result<RuleView, RegistryError> {
        if let Some(rule) = self
            .catalogue
            .fixed(tenant)
            .iter()
            .find(|r| r.name() == name)
        {
            return Ok(self.config_view(rule));
        }
        let id = (tenant.to_owned(), name.to_owned());
        let doc = self
            .view
            .read()
            .expect("view lock")
            .rules
            .get(&id)
            .map(|(doc, _)| doc.clone())
            .ok_or_else(|| self.no_rule(tenant, name))?;
        let serving = self
            .serving
            .lock()
            .expect("serving lock")
            .get(&id)
            .map(|s| s.version);
        let load_error = self
            .load_errors
            .lock()
            .expect("errors lock")
            .get(&id)
            .map(|(version, error)| format!("version {version}: {error}"));
        Ok(RuleView {
            tenant: doc.tenant.clone(),
            name: doc.name.clone(),
            source: "registry".to_owned(),
            active_version: doc.active,
            active: doc.active_version().cloned(),
            versions: doc.versions.clone(),
            serving,
            load_error,
            quarantine: self.quarantine_of(&doc.tenant, &doc.name),
        })
    }

    fn config_view(&self, rule: &LoadedRule) -> RuleView {
        RuleView {
            quarantine: self.quarantine_of(rule.tenant(), rule.name()),
            ..fixed_view(rule)
        }
    }

    fn quarantine_of(
        &self,
        tenant: &str,
        rule: &str,
    ) -> Option<crate::engine::contain::Quarantine> {
        let engine = self.engine.get()?.upgrade()?;
        engine.quarantine(tenant, rule)
    }
}

fn fixed_view(rule: &LoadedRule) -> RuleView {
    let params: Option<serde_json::Value> = serde_json::from_str(rule.params())
        .ok()
        .filter(|p: &serde_json::Value| !p.is_null());
    let record = VersionRecord {
        version: 0,
        content_hash: rule.content_hash().to_owned(),
        size: 0,
        params,
        manifest: ManifestView::from(rule.manifest()),
        uploaded_by: "config".to_owned(),
        uploaded_at: String::new(),
    };
    RuleView {
        tenant: rule.tenant().to_owned(),
        name: rule.name().to_owned(),
        source: "config".to_owned(),
        active_version: None,
        active: Some(record),
        versions: Vec::new(),
        serving: None,
        load_error: None,
        quarantine: None,
    }
}

/// Keep the newest [`MAX_VERSIONS`], and the active one.
fn prune(doc: &mut RuleDoc) {
    while doc.versions.len() > MAX_VERSIONS {
        let Some(oldest) = doc
            .versions
            .iter()
            .position(|v| Some(v.version) != doc.active)
        else {
            break;
        };
        doc.versions.remove(oldest);
    }
}

/// What an upload is told when its component is refused: the cause, not
/// the upload's internal label.
fn upload_error(error: &RuleError) -> String {
    error.cause.to_string()
}

pub fn validate_tenant(tenant: &str) -> Result<(), RegistryError> {
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
