//! Which rules each tenant runs. The pipeline asks a [`Catalogue`]; today
//! rules come from the config file and `--rule` flags ([`StaticCatalogue`]),
//! later from a registry that activates new versions while running.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::runtime::{Compiled, LoadedRule, RuleError, Runtime};

/// The rules of every tenant.
pub trait Catalogue: Send + Sync {
    /// The active rules of `tenant`; `None` for a tenant with no rules.
    fn rules(&self, tenant: &str) -> Option<Arc<[Arc<LoadedRule>]>>;
}

/// One rule component assigned to one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub tenant: String,
    pub path: PathBuf,
}

impl std::str::FromStr for Assignment {
    type Err = String;

    /// `TENANT=PATH.wasm`, as `--rule` takes it.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((tenant, path)) if !tenant.is_empty() && !path.is_empty() => Ok(Assignment {
                tenant: tenant.to_owned(),
                path: path.into(),
            }),
            _ => Err(format!("`{s}` is not TENANT=PATH.wasm")),
        }
    }
}

/// Why the catalogue could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("cannot read rule component {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("tenant `{tenant}` has two rules named `{rule}`")]
    Duplicate { tenant: String, rule: String },
}

/// A fixed set of rules, loaded once.
#[derive(Default)]
pub struct StaticCatalogue {
    by_tenant: HashMap<String, Arc<[Arc<LoadedRule>]>>,
}

impl StaticCatalogue {
    /// Load every assignment. Each component file is read and compiled once,
    /// however many tenants use it; each tenant gets its own instance.
    pub fn load(runtime: &Runtime, assignments: &[Assignment]) -> Result<Self, CatalogueError> {
        let mut compiled: HashMap<&PathBuf, Compiled> = HashMap::new();
        let mut rules: HashMap<String, Vec<Arc<LoadedRule>>> = HashMap::new();
        for assignment in assignments {
            if !compiled.contains_key(&assignment.path) {
                let wasm =
                    std::fs::read(&assignment.path).map_err(|source| CatalogueError::Read {
                        path: assignment.path.clone(),
                        source,
                    })?;
                let origin = assignment.path.display().to_string();
                compiled.insert(&assignment.path, runtime.compile(&origin, &wasm)?);
            }
            let rule = runtime.instantiate(&assignment.tenant, &compiled[&assignment.path])?;
            let tenant_rules = rules.entry(assignment.tenant.clone()).or_default();
            if tenant_rules
                .iter()
                .any(|r| r.manifest().name == rule.manifest().name)
            {
                return Err(CatalogueError::Duplicate {
                    tenant: assignment.tenant.clone(),
                    rule: rule.manifest().name.clone(),
                });
            }
            tenant_rules.push(Arc::new(rule));
        }
        Ok(StaticCatalogue {
            by_tenant: rules.into_iter().map(|(t, r)| (t, r.into())).collect(),
        })
    }

    pub fn tenants(&self) -> usize {
        self.by_tenant.len()
    }

    pub fn rule_count(&self) -> usize {
        self.by_tenant.values().map(|r| r.len()).sum()
    }
}

impl Catalogue for StaticCatalogue {
    fn rules(&self, tenant: &str) -> Option<Arc<[Arc<LoadedRule>]>> {
        self.by_tenant.get(tenant).cloned()
    }
}
