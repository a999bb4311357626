//! `tocsin serve` configuration: a TOML file, overridden by flags. Unknown
//! keys are rejected so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::catalogue::Assignment;
use crate::event::DEFAULT_TENANT_FIELD;
use crate::runtime::Limits;

/// Loopback only: exposing the API is a deliberate choice.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
pub const DEFAULT_DATA_DIR: &str = "./tocsin-data";
/// Largest `POST /v1/events` body: ~40,000 seed events.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
/// Most events processed and committed together: large enough to amortise
/// one fsync over many requests, small enough to keep latency in milliseconds.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 20_000;
/// Rule instances the sandbox can hold: 1,000 tenants with 3 rules each, with room.
pub const DEFAULT_MAX_INSTANCES: u32 = 4_000;

/// The service's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Directory holding `state.redb`, `alerts.ndjson` and compiled components.
    pub data_dir: PathBuf,
    /// Top-level event field naming each event's tenant.
    pub tenant_field: String,
    /// Largest request body `POST /v1/events` accepts, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most events processed and committed as one batch.
    pub max_batch_events: usize,
    /// Rule instances the sandbox reserves room for (one per tenant and rule).
    pub max_instances: u32,
    /// Bounds of every call into a rule.
    pub limits: Limits,
    /// Rules per tenant.
    pub rules: Vec<RuleEntry>,
}

/// One rule component run for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    /// The tenant, as its events name it in the tenant field.
    pub tenant: String,
    /// The component file; relative paths are relative to the config file.
    pub path: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: DEFAULT_DATA_DIR.into(),
            tenant_field: DEFAULT_TENANT_FIELD.to_owned(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            max_instances: DEFAULT_MAX_INSTANCES,
            limits: Limits::default(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Parse a config file; rule paths become relative to its directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for rule in &mut config.rules {
            if rule.path.is_relative() {
                rule.path = base.join(&rule.path);
            }
        }
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.tenant_field.is_empty() {
            return Err("tenant_field must not be empty".to_owned());
        }
        if self.max_batch_events == 0 || self.max_body_bytes == 0 || self.max_instances == 0 {
            return Err(
                "max_batch_events, max_body_bytes and max_instances must be positive".to_owned(),
            );
        }
        Ok(())
    }

    /// The rules as catalogue assignments.
    pub fn assignments(&self) -> Vec<Assignment> {
        self.rules
            .iter()
            .map(|r| Assignment {
                tenant: r.tenant.clone(),
                path: r.path.clone(),
            })
            .collect()
    }
}
