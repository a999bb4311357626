//! Which rules each tenant runs. The pipeline asks a [`Catalogue`]. Rules
//! come from the config file and `--rule` flags ([`StaticCatalogue`]) and,
//! in the service, from the rule registry, whose active versions the
//! [`LiveCatalogue`] swaps in while running.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::runtime::{Compiled, LoadedRule, RuleError, RuleSettings, Runtime};

/// The rules of every tenant.
pub trait Catalogue: Send + Sync {
    /// The active rules of `tenant`; `None` for a tenant with no rules.
    fn rules(&self, tenant: &str) -> Option<Arc<[Arc<LoadedRule>]>>;
}

/// One rule component assigned to one tenant: under a name, with
/// parameters. A tenant may run one component under several names. The
/// config file's `[[rules]]` tables and `--rule` both give these.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The tenant, as its events name it in the tenant field.
    pub tenant: String,
    /// The component file; in a config file, relative paths are relative to
    /// the file.
    pub path: PathBuf,
    /// The name the tenant runs the rule under (default: the manifest's):
    /// buckets and alerts are filed by it, so one component can run twice
    /// for a tenant under two names.
    #[serde(default)]
    pub name: Option<String>,
    /// The rule's parameters, handed to it as JSON (default: none, the
    /// rule's own defaults).
    #[serde(default)]
    pub params: Option<serde_json::Value>,
}

impl Assignment {
    /// `path` for `tenant`, under the rule's own name, with its defaults.
    pub fn new(tenant: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Assignment {
            tenant: tenant.into(),
            path: path.into(),
            name: None,
            params: None,
        }
    }

    pub fn settings(&self) -> RuleSettings {
        RuleSettings {
            name: self.name.clone(),
            params: self.params.clone(),
        }
    }
}

impl std::str::FromStr for Assignment {
    type Err = String;

    /// `TENANT[/NAME]=PATH.wasm[?PARAMS]`, as `--rule` takes it: PARAMS is a
    /// JSON value, or `@FILE` naming a JSON file.
    fn from_str(s: &str) -> Result<Self, String> {
        let form = "TENANT[/NAME]=PATH.wasm[?PARAMS]";
        let Some((who, what)) = s.split_once('=') else {
            return Err(format!("`{s}` is not {form}"));
        };
        let (tenant, name) = match who.split_once('/') {
            Some((tenant, name)) => (tenant, Some(name)),
            None => (who, None),
        };
        let (path, params) = match what.split_once('?') {
            Some((path, params)) => (path, Some(params)),
            None => (what, None),
        };
        if tenant.is_empty() || path.is_empty() || name == Some("") {
            return Err(format!("`{s}` is not {form}"));
        }
        let params = match params {
            None => None,
            Some(text) => Some(match text.strip_prefix('@') {
                Some(file) => read_params(std::path::Path::new(file))?,
                None => serde_json::from_str(text)
                    .map_err(|e| format!("the parameters in `{s}` are not JSON: {e}"))?,
            }),
        };
        Ok(Assignment {
            tenant: tenant.to_owned(),
            path: path.into(),
            name: name.map(str::to_owned),
            params,
        })
    }
}

/// A JSON file of rule parameters.
pub fn read_params(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read parameters {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("parameters {} are not JSON: {e}", path.display()))
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
    #[error("tenant `{tenant}` has two rules named `{rule}`: give one a `name` of its own")]
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
            let rule = runtime.instantiate(
                &assignment.tenant,
                &compiled[&assignment.path],
                &assignment.settings(),
            )?;
            let tenant_rules = rules.entry(assignment.tenant.clone()).or_default();
            if tenant_rules.iter().any(|r| r.name() == rule.name()) {
                return Err(CatalogueError::Duplicate {
                    tenant: assignment.tenant.clone(),
                    rule: rule.name().to_owned(),
                });
            }
            tenant_rules.push(Arc::new(rule));
        }
        Ok(StaticCatalogue {
            by_tenant: rules.into_iter().map(|(t, r)| (t, r.into())).collect(),
        })
    }

    /// Rules already loaded, each for its own tenant.
    pub fn from_rules(rules: impl IntoIterator<Item = LoadedRule>) -> Result<Self, CatalogueError> {
        let mut by_tenant: HashMap<String, Vec<Arc<LoadedRule>>> = HashMap::new();
        for rule in rules {
            let tenant_rules = by_tenant.entry(rule.tenant().to_owned()).or_default();
            if tenant_rules.iter().any(|r| r.name() == rule.name()) {
                return Err(CatalogueError::Duplicate {
                    tenant: rule.tenant().to_owned(),
                    rule: rule.name().to_owned(),
                });
            }
            tenant_rules.push(Arc::new(rule));
        }
        Ok(StaticCatalogue {
            by_tenant: by_tenant.into_iter().map(|(t, r)| (t, r.into())).collect(),
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

/// The config's rules and the registry's active versions. A caller gets a
/// tenant's rules as one snapshot: a batch runs on exactly one version of
/// each rule however the registry changes meanwhile.
pub struct LiveCatalogue {
    fixed: StaticCatalogue,
    merged: RwLock<HashMap<String, Arc<[Arc<LoadedRule>]>>>,
}

impl LiveCatalogue {
    pub fn new(fixed: StaticCatalogue) -> Self {
        let merged = fixed.by_tenant.clone();
        LiveCatalogue {
            fixed,
            merged: RwLock::new(merged),
        }
    }

    /// The rules `tenant` runs from the host's config.
    pub fn fixed(&self, tenant: &str) -> Arc<[Arc<LoadedRule>]> {
        self.fixed.rules(tenant).unwrap_or_else(|| Arc::new([]))
    }

    /// Replace `tenant`'s registered rules (the registry's active
    /// versions); batches that start from now on run them. A registered
    /// rule named like one of the config's (the config changed after it was
    /// registered) is not run: one name files one rule's buckets.
    pub fn set_registered(&self, tenant: &str, mut rules: Vec<Arc<LoadedRule>>) {
        rules.sort_by(|a, b| a.name().cmp(b.name()));
        let fixed = self.fixed(tenant);
        rules.retain(|rule| {
            let shadowed = fixed.iter().any(|f| f.name() == rule.name());
            if shadowed {
                tracing::error!(tenant, rule = rule.name(), "a rule of the config has this registered rule's name: running the config's; rename one of them");
            }
            !shadowed
        });
        let mut all: Vec<Arc<LoadedRule>> = fixed.to_vec();
        all.extend(rules);
        let mut merged = self.merged.write().expect("merged lock");
        if all.is_empty() {
            merged.remove(tenant);
        } else {
            merged.insert(tenant.to_owned(), all.into());
        }
    }

    pub fn tenants(&self) -> usize {
        self.merged.read().expect("merged lock").len()
    }

    pub fn rule_count(&self) -> usize {
        self.merged
            .read()
            .expect("merged lock")
            .values()
            .map(|r| r.len())
            .sum()
    }
}

impl Catalogue for LiveCatalogue {
    fn rules(&self, tenant: &str) -> Option<Arc<[Arc<LoadedRule>]>> {
        self.merged
            .read()
            .expect("merged lock")
            .get(tenant)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_flag_takes_a_name_and_parameters_inline_or_from_a_file() {
        let plain: Assignment = "client-01=rules/test_event.wasm".parse().unwrap();
        assert_eq!(plain, Assignment::new("client-01", "rules/test_event.wasm"));

        let named: Assignment = r#"client-05/big-moves=price_change.wasm?{"threshold_pct": 5}"#
            .parse()
            .unwrap();
        assert_eq!(named.tenant, "client-05");
        assert_eq!(named.name.as_deref(), Some("big-moves"));
        assert_eq!(named.path, PathBuf::from("price_change.wasm"));
        assert_eq!(named.params, Some(serde_json::json!({"threshold_pct": 5})));

        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), r#"{"window": "2s"}"#).unwrap();
        let from_file: Assignment = format!("c=sim_fraud.wasm?@{}", file.path().display())
            .parse()
            .unwrap();
        assert_eq!(from_file.name, None);
        assert_eq!(from_file.params, Some(serde_json::json!({"window": "2s"})));
    }

    #[test]
    fn a_malformed_rule_flag_says_what_is_wrong() {
        for bad in ["client-01", "=x.wasm", "c=", "c/=x.wasm"] {
            let error = bad.parse::<Assignment>().unwrap_err();
            assert_eq!(
                error,
                format!("`{bad}` is not TENANT[/NAME]=PATH.wasm[?PARAMS]")
            );
        }
        let error = "c=x.wasm?{nope".parse::<Assignment>().unwrap_err();
        assert!(
            error.starts_with("the parameters in `c=x.wasm?{nope` are not JSON"),
            "{error}"
        );
        let error = "c=x.wasm?@/no/such/params.json"
            .parse::<Assignment>()
            .unwrap_err();
        assert!(
            error.starts_with("cannot read parameters /no/such/params.json"),
            "{error}"
        );
    }
}
