//! The sandbox that runs tenants' rules: one wasmtime `Engine` with fuel,
//! epoch interruption and the pooling allocator; components compiled once and
//! cached on disk; a healthy instance per loaded rule reused across calls and
//! discarded after any trap.
//!
//! This module knows nothing of tenants' events or where state is stored:
//! it turns (bucket, state, typed events) into (state change, alerts) under
//! [`Limits`], or into a [`RuleError`].

mod alerts;
mod bindings;
mod cache;
mod error;
mod limits;
mod sandbox;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, types::ComponentItem};
use wasmtime::{
    Config, Engine, Inlining, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
};

pub use alerts::{Alert, Alerts};
pub use bindings::{
    AlertBatch, AlertStatus, Condition, EventBatch, EventTime, Manifest, Outcome, Scalar, Severity,
    StateChange, Test, TimerChange, ValueKind,
};
pub use error::{Cause, Output, RuleError};
pub use limits::*;
pub use sandbox::{LogLevel, LogLine};

use bindings::{Rule, RulePre};
use sandbox::Sandbox;

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Core instances in one rule component: the Rust module plus wit-component's
/// shim and fixup modules, with slack.
const CORE_INSTANCES_PER_RULE: u32 = 6;
/// Tables in one rule component: the module's table and the shim's.
const TABLES_PER_RULE: u32 = 3;

/// Interfaces a rule may import. WASI is linked deny-by-default (see
/// `sandbox`): Rust's standard library imports these even when unused.
const ALLOWED_IMPORTS: &[&str] = &[
    "tocsin:rule/host@",
    "tocsin:rule/types@",
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
];

/// Sandbox-wide settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub limits: Limits,
    /// Rule instances that can be alive at once (the pooling allocator
    /// reserves their slots up front).
    pub max_instances: u32,
    /// Where compiled components are kept between runs; `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Whether rules are stopped by fuel and by the epoch deadline. Always
    /// [`Metering::Enforced`] in the service; [`Metering::Off`] exists only
    /// so that the benchmark can show what metering costs.
    pub metering: Metering,
    /// Write `/tmp/perf-PID.map` so that `perf` names compiled rule code
    /// (default: on when `TOCSIN_PERF_MAP` is set).
    pub perf_map: bool,
}

/// How the sandbox bounds a call's running time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Metering {
    /// Fuel bounds the work of a call, the epoch deadline its wall-clock time.
    #[default]
    Enforced,
    /// Neither: a rule that loops never returns. For measurements only.
    Off,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            limits: Limits::default(),
            max_instances: 1_000,
            cache_dir: cache::default_dir(),
            metering: Metering::Enforced,
            perf_map: std::env::var_os("TOCSIN_PERF_MAP").is_some(),
        }
    }
}

/// The engine and linker all rules share.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Sandbox>,
    limits: Limits,
    cache: cache::ComponentCache,
    _ticker: EpochTicker,
}

/// A component compiled and checked, ready to instantiate for tenants.
#[derive(Clone)]
pub struct Compiled {
    origin: String,
    content_hash: String,
    pre: RulePre<Sandbox>,
}

/// What `tocsin rule inspect` shows.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub manifest: Manifest,
    pub imports: Vec<String>,
    pub content_hash: String,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let limits = config.limits;
        let n = config.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n * CORE_INSTANCES_PER_RULE)
            .max_core_instances_per_component(CORE_INSTANCES_PER_RULE)
            .total_memories(n)
            .max_memories_per_component(1)
            .total_tables(n * TABLES_PER_RULE)
            .max_tables_per_component(TABLES_PER_RULE)
            .max_memory_size(limits.memory_bytes);

        let mut wasm = Config::new();
        let metered = config.metering == Metering::Enforced;
        wasm.consume_fuel(metered)
            .epoch_interruption(metered)
            .max_wasm_stack(limits.max_wasm_stack)
            // Rules are compiled once and cached: spend compile time on
            // inlining small functions, which under fuel and epoch checks
            // saves more than a plain call.
            .compiler_inlining(Inlining::Yes)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if config.perf_map {
            wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&wasm).map_err(|e| anyhow::anyhow!("{e:#}"))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Rule::add_to_linker::<_, HasSelf<Sandbox>>(&mut linker, |sandbox| sandbox)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;

        let cache = cache::ComponentCache::new(&engine, config.cache_dir);
        let ticker = EpochTicker::start(&engine);
        Ok(Runtime {
            engine,
            linker,
            limits,
            cache,
            _ticker: ticker,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compile (or fetch from the cache), check imports, instantiate and read
    /// the manifest of a rule component for `tenant`.
    pub fn load(&self, tenant: &str, origin: &str, wasm: &[u8]) -> Result<LoadedRule, RuleError> {
        let compiled = self.compile(origin, wasm).map_err(|mut e| {
            e.tenant = tenant.to_owned();
            e
        })?;
        self.instantiate(tenant, &compiled)
    }

    /// Compile a component and check its imports and exports, once for any
    /// number of tenants.
    pub fn compile(&self, origin: &str, wasm: &[u8]) -> Result<Compiled, RuleError> {
        let fail = |cause| RuleError {
            tenant: "-".to_owned(),
            rule: origin.to_owned(),
            cause,
        };
        let (component, hash) = self.cache.compile(wasm).map_err(fail)?;
        if let Some(import) = import_names(&self.engine, &component)
            .into_iter()
            .find(|name| !ALLOWED_IMPORTS.iter().any(|ok| name.starts_with(ok)))
        {
            return Err(fail(Cause::ForbiddenImport { import }));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| fail(Cause::InvalidComponent(format!("{e:#}"))))?;
        let pre = RulePre::new(pre).map_err(|e| {
            fail(Cause::InvalidComponent(format!(
                "does not export the tocsin:rule world: {e:#}"
            )))
        })?;
        Ok(Compiled {
            origin: origin.to_owned(),
            content_hash: hash,
            pre,
        })
    }

    /// Instantiate a compiled component for `tenant` and read its manifest.
    pub fn instantiate(&self, tenant: &str, compiled: &Compiled) -> Result<LoadedRule, RuleError> {
        let mut rule = LoadedRule {
            tenant: tenant.to_owned(),
            name: compiled.origin.clone(),
            content_hash: compiled.content_hash.clone(),
            manifest: None,
            pre: compiled.pre.clone(),
            limits: self.limits.clone(),
            instance: Mutex::new(None),
        };
        let manifest = rule.call(|rule, store| rule.call_manifest(store))?;
        validate_manifest(&manifest).map_err(|e| rule.error(Cause::BadManifest(e)))?;
        rule.name = format!("{}@{}", manifest.name, manifest.version);
        rule.manifest = Some(manifest);
        Ok(rule)
    }

    /// The manifest and imports of a component, checked as `load` checks them.
    pub fn inspect(&self, origin: &str, wasm: &[u8]) -> Result<Inspection, RuleError> {
        let rule = self.load("-", origin, wasm)?;
        let component = self.cache.get(&rule.content_hash).expect("just compiled");
        Ok(Inspection {
            imports: import_names(&self.engine, &component),
            manifest: rule.manifest().clone(),
            content_hash: rule.content_hash,
        })
    }
}

fn import_names(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .filter(|(_, item)| !matches!(item.ty, ComponentItem::Type(_)))
        .map(|(name, _)| name.to_owned())
        .collect()
}

fn validate_manifest(manifest: &Manifest) -> Result<(), String> {
    let name = &manifest.name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "name `{name}` must be non-empty lowercase letters, digits and `-`"
        ));
    }
    let core = manifest
        .version
        .split(['-', '+'])
        .next()
        .unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || p.parse::<u64>().is_err())
    {
        return Err(format!(
            "version `{}` is not a semantic version like 1.2.0",
            manifest.version
        ));
    }
    let mut fields: Vec<&String> = manifest.fields.iter().collect();
    fields.sort();
    if let Some(pair) = fields.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("field `{}` is declared twice", pair[0]));
    }
    if manifest.filter.iter().any(|c| c.field.is_empty())
        || manifest.bucket_key.iter().any(String::is_empty)
    {
        return Err("a filter or bucket-key field name is empty".to_owned());
    }
    Ok(())
}

/// What one call produced.
#[derive(Debug, Clone)]
pub struct CallOutput {
    pub state: StateChange,
    pub timer: TimerChange,
    /// In the order the rule emitted them.
    pub alerts: Alerts,
    pub fuel: u64,
    pub log: Vec<LogLine>,
}

/// A rule component loaded for one tenant, with its healthy instance.
pub struct LoadedRule {
    tenant: String,
    name: String,
    content_hash: String,
    manifest: Option<Manifest>,
    pre: RulePre<Sandbox>,
    limits: Limits,
    instance: Mutex<Option<(Store<Sandbox>, Rule)>>,
}

impl std::fmt::Debug for LoadedRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedRule")
            .field("tenant", &self.tenant)
            .field("rule", &self.name)
            .field("content_hash", &self.content_hash)
            .finish_non_exhaustive()
    }
}

impl LoadedRule {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// `name@version`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SHA-256 of the component bytes, hex.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    pub fn manifest(&self) -> &Manifest {
        self.manifest.as_ref().expect("set by Runtime::load")
    }

    /// One `evaluate` call: one bucket's events of one batch.
    pub fn evaluate(
        &self,
        bucket: &str,
        state: Option<&[u8]>,
        events: &EventBatch,
        now: i64,
    ) -> Result<CallOutput, RuleError> {
        self.call_outcome(|rule, store| rule.call_evaluate(store, bucket, state, events, now))
    }

    /// One `on-timer` call.
    pub fn on_timer(
        &self,
        bucket: &str,
        state: Option<&[u8]>,
        now: i64,
    ) -> Result<CallOutput, RuleError> {
        self.call_outcome(|rule, store| rule.call_on_timer(store, bucket, state, now))
    }

    fn call_outcome(
        &self,
        f: impl FnOnce(
            &Rule,
            &mut Store<Sandbox>,
        ) -> wasmtime::Result<Result<Outcome, bindings::RuleError>>,
    ) -> Result<CallOutput, RuleError> {
        let mut fuel = 0;
        let mut log = Vec::new();
        let result = self.call_with(|rule, store| {
            let result = f(rule, store)?;
            fuel = store
                .get_fuel()
                .map_or(0, |left| self.limits.fuel_per_call - left);
            log = store.data_mut().take_log();
            Ok(result)
        })?;
        let outcome = result.map_err(|e| self.error(rule_error_cause(e)))?;
        let alerts = Alerts::check(outcome.alerts, &self.limits).map_err(|e| self.error(e))?;
        if let StateChange::Set(bytes) = &outcome.state
            && bytes.len() > self.limits.max_state_bytes
        {
            return Err(self.error(Cause::OutputTooLarge {
                what: Output::StateBytes,
                limit: self.limits.max_state_bytes,
            }));
        }
        Ok(CallOutput {
            state: outcome.state,
            timer: outcome.timer,
            alerts,
            fuel,
            log,
        })
    }

    fn call<R>(
        &self,
        f: impl FnOnce(&Rule, &mut Store<Sandbox>) -> wasmtime::Result<R>,
    ) -> Result<R, RuleError> {
        self.call_with(f)
    }

    /// Run `f` on the healthy instance (instantiating one if needed) under
    /// fresh per-call limits; discard the instance if the call traps.
    fn call_with<R>(
        &self,
        f: impl FnOnce(&Rule, &mut Store<Sandbox>) -> wasmtime::Result<R>,
    ) -> Result<R, RuleError> {
        let mut slot = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.instantiate()?);
        }
        let (store, rule) = slot.as_mut().expect("instantiated above");
        store.data_mut().begin_call();
        let _ = store.set_fuel(self.limits.fuel_per_call);
        store.set_epoch_deadline(deadline_ticks(self.limits.deadline()));
        match f(rule, store) {
            Ok(value) => Ok(value),
            Err(error) => {
                let log = store.data_mut().take_log();
                // A trap leaves the instance in an unknown state.
                *slot = None;
                Err(self.error(trap_cause(&error, &log, &self.limits)))
            }
        }
    }

    fn instantiate(&self) -> Result<(Store<Sandbox>, Rule), RuleError> {
        let mut store = Store::new(self.pre.engine(), Sandbox::new(&self.limits));
        store.limiter(|sandbox| sandbox);
        let _ = store.set_fuel(self.limits.fuel_per_call);
        store.set_epoch_deadline(deadline_ticks(self.limits.deadline()));
        match self.pre.instantiate(&mut store) {
            Ok(rule) => Ok((store, rule)),
            Err(error) => {
                let log = store.data_mut().take_log();
                Err(self.error(trap_cause(&error, &log, &self.limits)))
            }
        }
    }

    fn error(&self, cause: Cause) -> RuleError {
        RuleError {
            tenant: self.tenant.clone(),
            rule: self.name.clone(),
            cause,
        }
    }
}

fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64 + 1
}

fn rule_error_cause(error: bindings::RuleError) -> Cause {
    match error {
        bindings::RuleError::BadEvent(e) => Cause::BadEvent {
            index: e.index,
            reason: e.reason,
        },
        bindings::RuleError::BadState(e) => Cause::BadState(e),
        bindings::RuleError::Failed(e) => Cause::Failed(e),
    }
}

fn trap_cause(error: &wasmtime::Error, log: &[LogLine], limits: &Limits) -> Cause {
    for cause in error.chain() {
        if let Some(error::Stop(cause)) = cause.downcast_ref::<error::Stop>() {
            return cause.clone();
        }
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Cause::OutOfFuel {
            limit: limits.fuel_per_call,
        },
        Some(Trap::StackOverflow) => Cause::StackOverflow {
            limit_bytes: limits.max_wasm_stack,
        },
        Some(Trap::Interrupt) => Cause::Deadline {
            limit: limits.deadline(),
        },
        Some(Trap::UnreachableCodeReached) => match panic_message(log) {
            Some(message) => Cause::Panic { message },
            None => Cause::Trap(Trap::UnreachableCodeReached.to_string()),
        },
        Some(trap) => Cause::Trap(trap.to_string()),
        None => Cause::Trap(format!("{error:#}")),
    }
}

/// The panic message the SDK's hook (or Rust's default hook on stderr) wrote.
fn panic_message(log: &[LogLine]) -> Option<String> {
    log.iter().rev().find_map(|line| {
        let text = line.message.trim();
        let at = text.find("panicked")?;
        Some(
            text[at..]
                .trim_start_matches("panicked")
                .trim_start_matches([':', ' '])
                .to_owned(),
        )
    })
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is gone.
struct EpochTicker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = engine.weak();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("tocsin-epoch".to_owned())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .expect("spawn the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
