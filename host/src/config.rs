//! `tocsin serve` configuration: a TOML file, overridden by flags. Unknown
//! keys are rejected so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::catalogue::Assignment;
use crate::event::DEFAULT_TENANT_FIELD;
use crate::quota::Quotas;
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
/// Failover after a host dies takes about this plus one lease-table read
/// (500 ms); renewals run every 500 ms, so a live host is never mistaken
/// for a dead one over a few slow requests.
pub const DEFAULT_LEASE_MS: u64 = 3_000;

/// The service's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Directory holding `state.redb` (with its alert index,
    /// `state.index.redb`), `alerts.ndjson` and compiled components.
    pub data_dir: PathBuf,
    /// Top-level event field naming each event's tenant.
    pub tenant_field: String,
    /// Largest request body `POST /v1/events` accepts, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most events processed and committed as one batch.
    pub max_batch_events: usize,
    /// Rule instances the sandbox reserves room for (one per tenant and rule).
    pub max_instances: u32,
    /// Fair sharing: once the other tenants of a batch are done, a tenant
    /// still running after this many milliseconds (or after as long again
    /// as they took) is run apart and the batch commits without it; 0
    /// keeps every batch whole.
    pub fair_share_ms: u64,
    /// Bounds of every call into a rule.
    pub limits: Limits,
    /// Where events come from: `http` (`POST /v1/events`) or
    /// `kinesis:<stream>` (shared by every host through leases).
    pub source: Source,
    /// Where bucket state lives: `embedded` (redb in the data directory:
    /// one host) or `dynamodb:<table>` (hosts share it). Either holds the
    /// source's leases, checkpoints and receipts.
    pub state: StateBackend,
    /// Where alerts go: `file` (`alerts.ndjson` in the data directory) or
    /// `kinesis:<stream>`.
    pub alerts: AlertsBackend,
    /// Where events accepted but not applied go, with the reason:
    /// `file` (`dead-letters.ndjson` in the data directory, read by
    /// `GET /v1/tenants/{tenant}/dead-letters`) or `kinesis:<stream>`.
    pub dead_letters: DeadLettersBackend,
    /// Largest event, in bytes: larger ones are rejected over HTTP and
    /// dead-lettered from a stream. The default is the Kinesis record
    /// limit (1 MiB), so an event any source takes fits every other.
    pub max_event_bytes: usize,
    /// With the Kinesis source: a lease whose holder has not renewed it for
    /// this long is taken over by another host, in milliseconds.
    pub lease_ms: u64,
    /// Rules per tenant.
    pub rules: Vec<RuleEntry>,
    /// The operator's bearer token (also `TOCSIN_OPERATOR_TOKEN`, which
    /// wins): it may do everything, including issuing tenant tokens.
    /// Without one the host serves only on a loopback address.
    pub operator_token: Option<String>,
    /// Quotas of every tenant the operator set none for.
    pub quotas: Quotas,
    /// A rule instance unused for this many seconds gives its memory back.
    pub idle_instance_secs: u64,
}

impl Config {
    /// How long a tenant may hold its batch; `None` keeps batches whole.
    pub fn fair_share(&self) -> Option<Duration> {
        (self.fair_share_ms > 0).then(|| Duration::from_millis(self.fair_share_ms))
    }
}

/// Where events come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Source {
    Http,
    Kinesis(String),
}

/// Where bucket state lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum StateBackend {
    Embedded,
    Dynamodb(String),
}

/// Where alerts go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AlertsBackend {
    File,
    Kinesis(String),
}

/// Where dead letters go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum DeadLettersBackend {
    File,
    Kinesis(String),
}

/// `word` or `prefix:name`, with a message naming the accepted forms.
fn backend<'a>(
    what: &str,
    text: &'a str,
    plain: &str,
    prefixed: &str,
) -> Result<Option<&'a str>, String> {
    if text == plain {
        return Ok(None);
    }
    match text.split_once(':') {
        Some((prefix, name)) if prefix == prefixed && !name.is_empty() => Ok(Some(name)),
        _ => Err(format!(
            "unknown {what} `{text}`: expected `{plain}` or `{prefixed}:<name>`"
        )),
    }
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match backend("source", s, "http", "kinesis")? {
            None => Source::Http,
            Some(stream) => Source::Kinesis(stream.to_owned()),
        })
    }
}

impl std::str::FromStr for StateBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match backend("state", s, "embedded", "dynamodb")? {
            None => StateBackend::Embedded,
            Some(table) => StateBackend::Dynamodb(table.to_owned()),
        })
    }
}

impl std::str::FromStr for AlertsBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match backend("alerts", s, "file", "kinesis")? {
            None => AlertsBackend::File,
            Some(stream) => AlertsBackend::Kinesis(stream.to_owned()),
        })
    }
}

impl std::str::FromStr for DeadLettersBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match backend("dead letters", s, "file", "kinesis")? {
            None => DeadLettersBackend::File,
            Some(stream) => DeadLettersBackend::Kinesis(stream.to_owned()),
        })
    }
}

macro_rules! try_from_string {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
    )*};
}
try_from_string!(Source, StateBackend, AlertsBackend, DeadLettersBackend);

/// One `[[rules]]` table: a rule component run for one tenant, the same
/// assignment `--rule` gives.
///
/// ```toml
/// [[rules]]
/// tenant = "client-05"
/// path = "price_change.wasm"
/// name = "big-moves"               # default: the rule's own name
/// params = { threshold_pct = 5 }   # default: the rule's defaults
/// ```
pub type RuleEntry = Assignment;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: DEFAULT_DATA_DIR.into(),
            tenant_field: DEFAULT_TENANT_FIELD.to_owned(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            max_instances: DEFAULT_MAX_INSTANCES,
            fair_share_ms: crate::quota::DEFAULT_FAIR_SHARE.as_millis() as u64,
            limits: Limits::default(),
            source: Source::Http,
            state: StateBackend::Embedded,
            alerts: AlertsBackend::File,
            dead_letters: DeadLettersBackend::File,
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            lease_ms: DEFAULT_LEASE_MS,
            rules: Vec::new(),
            operator_token: None,
            quotas: Quotas::default(),
            idle_instance_secs: crate::runtime::DEFAULT_IDLE_INSTANCE.as_secs(),
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
        if self.max_batch_events == 0
            || self.max_body_bytes == 0
            || self.max_instances == 0
            || self.max_event_bytes == 0
        {
            return Err(
                "max_batch_events, max_body_bytes, max_event_bytes and max_instances must be positive".to_owned(),
            );
        }
        if !cfg!(feature = "aws") {
            let aws = [
                matches!(self.source, Source::Kinesis(_)).then_some("source `kinesis:…`"),
                matches!(self.state, StateBackend::Dynamodb(_)).then_some("state `dynamodb:…`"),
                matches!(self.alerts, AlertsBackend::Kinesis(_)).then_some("alerts `kinesis:…`"),
                matches!(self.dead_letters, DeadLettersBackend::Kinesis(_))
                    .then_some("dead_letters `kinesis:…`"),
            ];
            if let Some(backend) = aws.into_iter().flatten().next() {
                return Err(format!(
                    "{backend} needs AWS, and this tocsin was built without it (the `aws` feature): build it with default features"
                ));
            }
        }
        if self.fair_share_ms > 60_000 {
            return Err(
                "fair_share_ms must be at most 60000: past a minute a slow tenant holds every other tenant's answers (0 turns fair sharing off)"
                    .to_owned(),
            );
        }
        if self.lease_ms < 1_000 {
            return Err("lease_ms must be at least 1000: renewals run every 500 ms".to_owned());
        }
        if let Some(token) = &self.operator_token
            && token.len() < crate::auth::MIN_OPERATOR_TOKEN
        {
            return Err(format!(
                "the operator token must be at least {} characters (for example `openssl rand -hex 32`)",
                crate::auth::MIN_OPERATOR_TOKEN
            ));
        }
        self.quotas.validate().map_err(|e| format!("quotas: {e}"))?;
        Ok(())
    }

    /// Refuse to serve beyond loopback without an operator token: the API
    /// would let anyone act as the operator.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.operator_token.is_none() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "refusing to listen on {} without an operator token: set TOCSIN_OPERATOR_TOKEN (or `operator_token` in the config), or listen on a loopback address such as 127.0.0.1",
                self.listen
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_entry_takes_a_name_and_an_inline_table_of_parameters() {
        let config = Config::from_toml(
            "[[rules]]\ntenant = \"c\"\npath = \"p.wasm\"\nname = \"big-moves\"\nparams = { threshold_pct = 5, tickers = [\"AMZN\"] }\n",
        )
        .unwrap();
        let rule = &config.rules[0];
        assert_eq!(rule.name.as_deref(), Some("big-moves"));
        assert_eq!(
            rule.params,
            Some(serde_json::json!({"threshold_pct": 5, "tickers": ["AMZN"]}))
        );
        assert_eq!(rule.settings().name.as_deref(), Some("big-moves"));

        let error =
            Config::from_toml("[[rules]]\ntenant = \"c\"\npath = \"p.wasm\"\nparameters = {}\n")
                .unwrap_err();
        assert!(error.contains("unknown field `parameters`"), "{error}");
    }

    #[test]
    fn backends_parse_and_bad_ones_are_named() {
        let config = Config::from_toml(
            "source = \"kinesis:events\"\nstate = \"dynamodb:tocsin\"\nalerts = \"kinesis:alerts\"",
        )
        .unwrap();
        assert_eq!(config.source, Source::Kinesis("events".into()));
        assert_eq!(config.state, StateBackend::Dynamodb("tocsin".into()));
        assert_eq!(config.alerts, AlertsBackend::Kinesis("alerts".into()));

        let error = Config::from_toml("source = \"kafka:events\"").unwrap_err();
        assert!(
            error.contains("unknown source `kafka:events`: expected `http` or `kinesis:<name>`"),
            "{error}"
        );
        let error = Config::from_toml("state = \"dynamodb:\"").unwrap_err();
        assert!(error.contains("unknown state `dynamodb:`"), "{error}");
    }

    #[test]
    #[cfg(feature = "aws")]
    fn any_source_runs_on_any_store() {
        let config = Config::from_toml("source = \"kinesis:events\"").unwrap();
        assert_eq!(
            (config.source, config.state),
            (Source::Kinesis("events".into()), StateBackend::Embedded)
        );
        let config = Config::from_toml("state = \"dynamodb:tocsin\"").unwrap();
        assert_eq!(
            (config.source, config.state),
            (Source::Http, StateBackend::Dynamodb("tocsin".into()))
        );
        Config::from_toml("alerts = \"kinesis:alerts\"").unwrap();
    }

    #[test]
    #[cfg(not(feature = "aws"))]
    fn a_build_without_aws_refuses_its_backends_by_name() {
        let error = Config::from_toml("state = \"dynamodb:tocsin\"").unwrap_err();
        assert!(
            error.contains("state `dynamodb:…` needs AWS, and this tocsin was built without it"),
            "{error}"
        );
    }
}
