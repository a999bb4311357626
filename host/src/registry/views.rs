//! Rules as the API shows them: registered ones with their versions and
//! what this host serves of them, and those from the host's config (as
//! version 0), each with its quarantine on this host.

use serde::{Deserialize, Serialize};

use super::versions::{ManifestView, VersionRecord};
use super::{Registry, RegistryError};
use crate::engine::contain::Quarantine;
use crate::runtime::LoadedRule;

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
    pub quarantine: Option<Quarantine>,
}

impl Registry {
    /// Every rule of `tenant`: from the config, then registered, by name.
    pub(crate) fn rules(&self, tenant: &str) -> Vec<RuleView> {
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

    pub(crate) fn rule(&self, tenant: &str, name: &str) -> Result<RuleView, RegistryError> {
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
