//! Registered rules and their versions: an upload is validated (compiled
//! and instantiated under the tenant's quotas, its manifest read), its
//! component stored by content hash, and a version added to the rule's
//! document ([`RuleDoc`], `rule/{tenant}/{name}`); a rule keeps its newest
//! [`MAX_VERSIONS`] and runs the one activated.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::update::Update;
use super::views::RuleView;
use super::{Clash, Missing, Registry, RegistryError, decode, encode, validate_tenant};
use crate::auth::Caller;
use crate::quota::QuotaExceeded;
use crate::runtime::{EventTime, Manifest, RuleSettings, Scalar, Test};
use crate::timestamp::now_rfc3339;

/// Versions a rule keeps; older ones (never the active one) are pruned.
pub const MAX_VERSIONS: usize = 32;
/// Largest parameters of one version, as JSON: 32 versions of them fit one
/// DynamoDB item with their manifests.
pub const MAX_PARAMS_BYTES: usize = 8 * 1024;

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
pub(super) struct RuleDoc {
    pub(super) tenant: String,
    pub(super) name: String,
    pub(super) active: Option<u32>,
    /// Oldest first.
    pub(super) versions: Vec<VersionRecord>,
    pub(super) created_at: String,
}

impl RuleDoc {
    pub(super) fn version(&self, version: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }

    pub(super) fn active_version(&self) -> Option<&VersionRecord> {
        self.active.and_then(|v| self.version(v))
    }
}

fn rule_key(tenant: &str, name: &str) -> String {
    format!("rule/{tenant}/{name}")
}

impl Registry {
    /// Validate a component with its parameters for `tenant` as rule
    /// `name`, store it, and add a version (active unless `activate` is
    /// false). Returns the version and whether it is new: uploading what
    /// the latest version already is (same bytes, same parameters) adds
    /// none.
    pub(crate) async fn upload(
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
            return Err(RegistryError::Conflict(Clash::NamedInConfig {
                tenant: tenant.to_owned(),
                rule: name.to_owned(),
            }));
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
        let (record, created) = self
            .update(&key, |stored| {
                let mut doc = match stored {
                    Some(stored) => decode::<RuleDoc>(&stored.value)?,
                    None => RuleDoc {
                        tenant: tenant.to_owned(),
                        name: name.to_owned(),
                        active: None,
                        versions: Vec::new(),
                        created_at: now_rfc3339(),
                    },
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
                    return Ok(Update::Keep((record, false)));
                }
                prune(&mut doc);
                Ok(Update::Put(encode(&doc), (record, created)))
            })
            .await?;
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
    pub(crate) async fn activate(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
    ) -> Result<RuleView, RegistryError> {
        self.update(&rule_key(tenant, name), |stored| {
            let Some(stored) = stored else {
                return Err(self.no_rule(tenant, name));
            };
            let mut doc: RuleDoc = decode(&stored.value)?;
            if doc.version(version).is_none() {
                return Err(RegistryError::NotFound(Missing::Version {
                    tenant: tenant.to_owned(),
                    rule: name.to_owned(),
                    version,
                    kept: doc.versions.iter().map(|v| v.version).collect(),
                }));
            }
            if doc.active == Some(version) {
                return Ok(Update::Keep(()));
            }
            doc.active = Some(version);
            Ok(Update::Put(encode(&doc), ()))
        })
        .await?;
        self.refresh().await?;
        self.rule(tenant, name)
    }

    /// Remove a registered rule and its versions; it stops running on every
    /// host. Its buckets' state stays in the state store (a rule
    /// registered again under the name reads it).
    pub(crate) async fn delete(&self, tenant: &str, name: &str) -> Result<(), RegistryError> {
        self.update(&rule_key(tenant, name), |stored| match stored {
            Some(_) => Ok(Update::Delete(())),
            None => Err(self.no_rule(tenant, name)),
        })
        .await?;
        self.refresh().await?;
        Ok(())
    }

    /// The error for a rule `tenant` has not registered: one from the
    /// host's config cannot be changed here; any other is not found.
    pub(super) fn no_rule(&self, tenant: &str, name: &str) -> RegistryError {
        let (tenant, rule) = (tenant.to_owned(), name.to_owned());
        if self
            .catalogue
            .fixed(&tenant)
            .iter()
            .any(|r| r.name() == rule)
        {
            return RegistryError::Conflict(Clash::FromConfig { tenant, rule });
        }
        RegistryError::NotFound(Missing::Rule { tenant, rule })
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
