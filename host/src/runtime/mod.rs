//! The sandbox that runs tenants' rules: one wasmtime `Engine` with fuel,
//! epoch interruption and the pooling allocator; components compiled once and
//! cached on disk; an instance per loaded rule created when it is first
//! called, reused across calls, discarded after any trap and dropped when
//! idle (see `instances`).
//!
//! This module knows nothing of tenants' events or where state is stored:
//! it turns (bucket, state, typed events) into (state change, alerts) under
//! [`Limits`], or into a [`RuleError`].

mod alerts;
mod bindings;
mod cache;
mod error;
mod instances;
mod limits;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;
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
use instances::{Instances, Slot};
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
    /// A rule instance unused for this long is dropped (the rule starts a
    /// new one when next called).
    pub idle_instance: Duration,
}

/// How long an unused rule instance is kept: a rule that sees events every
/// few seconds keeps its instance; one quiet for a minute gives its memory
/// back, and starting it again costs well under a millisecond.
pub const DEFAULT_IDLE_INSTANCE: Duration = Duration::from_secs(60);

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
            idle_instance: DEFAULT_IDLE_INSTANCE,
        }
    }
}

/// The engine and linker all rules share.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Sandbox>,
    limits: Limits,
    cache: cache::ComponentCache,
    instances: Arc<Instances>,
    _ticker: EpochTicker,
    _sweeper: Sweeper,
}

/// The version of the `tocsin:rule` world this host runs.
pub const WORLD_VERSION: &str = "0.2.0";

/// A component compiled and checked, ready to instantiate for tenants.
#[derive(Clone)]
pub struct Compiled {
    origin: String,
    content_hash: String,
    pre: RulePre<Sandbox>,
}

impl Compiled {
    /// SHA-256 of the component bytes, hex.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }
}

/// What `tocsin rule inspect` shows.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub manifest: Manifest,
    pub imports: Vec<String>,
    pub content_hash: String,
}

/// How a tenant runs a component: under which name and with which
/// parameters. A tenant may run one component under several names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSettings {
    /// The rule's name for the tenant; default: the manifest's name.
    pub name: Option<String>,
    /// Handed to the rule's `manifest` as JSON; default: `null`.
    pub params: Option<serde_json::Value>,
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
        sandbox::add_wasi_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Rule::add_to_linker::<_, HasSelf<Sandbox>>(&mut linker, |sandbox| sandbox)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;

        let cache = cache::ComponentCache::new(&engine, config.cache_dir);
        let ticker = EpochTicker::start(&engine);
        let instances = Arc::new(Instances::new(n as usize, config.idle_instance));
        let sweeper = Sweeper::start(&instances, config.idle_instance);
        Ok(Runtime {
            engine,
            linker,
            limits,
            cache,
            instances,
            _ticker: ticker,
            _sweeper: sweeper,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Rule instances alive now (every loaded rule has at most one).
    pub fn live_instances(&self) -> usize {
        self.instances.live()
    }

    /// Drop now every instance unused for at least `idle` (and not in a
    /// call), rather than at the next sweep; how many.
    pub fn drop_idle_instances(&self, idle: Duration) -> usize {
        self.instances.sweep(idle)
    }

    /// Compile (or fetch from the cache), check imports, instantiate and read
    /// the manifest of a rule component for `tenant`, with default settings.
    pub fn load(&self, tenant: &str, origin: &str, wasm: &[u8]) -> Result<LoadedRule, RuleError> {
        self.load_with(tenant, origin, wasm, &RuleSettings::default())
    }

    /// [`load`](Self::load) under a name and with parameters.
    pub fn load_with(
        &self,
        tenant: &str,
        origin: &str,
        wasm: &[u8],
        settings: &RuleSettings,
    ) -> Result<LoadedRule, RuleError> {
        let compiled = self.compile(origin, wasm).map_err(|mut e| {
            e.tenant = tenant.to_owned();
            e
        })?;
        self.instantiate(tenant, &compiled, settings)
    }

    /// Compile a component and check its world version, imports and
    /// exports, once for any number of tenants.
    pub fn compile(&self, origin: &str, wasm: &[u8]) -> Result<Compiled, RuleError> {
        let fail = |cause| RuleError {
            tenant: "-".to_owned(),
            rule: origin.to_owned(),
            cause,
        };
        let (component, hash) = self.cache.compile(wasm).map_err(fail)?;
        check_world_version(&self.engine, &component).map_err(fail)?;
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
                "does not export the tocsin:rule@{WORLD_VERSION} world: {e:#}"
            )))
        })?;
        Ok(Compiled {
            origin: origin.to_owned(),
            content_hash: hash,
            pre,
        })
    }

    /// Instantiate a compiled component for `tenant` with `settings` and
    /// read its manifest.
    pub fn instantiate(
        &self,
        tenant: &str,
        compiled: &Compiled,
        settings: &RuleSettings,
    ) -> Result<LoadedRule, RuleError> {
        self.instantiate_within(tenant, compiled, settings, self.limits.clone())
    }

    /// [`instantiate`](Self::instantiate) under a tenant's own bounds per
    /// call (its quotas); memory above the runtime's is not available.
    pub fn instantiate_within(
        &self,
        tenant: &str,
        compiled: &Compiled,
        settings: &RuleSettings,
        mut limits: Limits,
    ) -> Result<LoadedRule, RuleError> {
        limits.memory_bytes = limits.memory_bytes.min(self.limits.memory_bytes);
        let params = match &settings.params {
            Some(params) => params.to_string(),
            None => "null".to_owned(),
        };
        let mut rule = LoadedRule {
            tenant: tenant.to_owned(),
            name: settings
                .name
                .clone()
                .unwrap_or_else(|| compiled.origin.clone()),
            label: compiled.origin.clone(),
            seed: instance_seed(tenant, &compiled.content_hash, &params),
            params: params.into(),
            content_hash: compiled.content_hash.clone(),
            manifest: None,
            pre: compiled.pre.clone(),
            limits,
            instances: self.instances.clone(),
            slot: self.instances.slot(),
        };
        if let Some(name) = &settings.name {
            validate_name(name).map_err(|e| rule.error(Cause::BadName(e)))?;
        }
        let (live, manifest) = rule.start()?;
        validate_manifest(&manifest).map_err(|e| rule.error(Cause::BadManifest(e)))?;
        if settings.name.is_none() {
            rule.name = manifest.name.clone();
        }
        rule.label = format!("{}@{}", rule.name, manifest.version);
        rule.manifest = Some(manifest);
        // Kept: a rule is usually called soon after it is loaded.
        *rule.slot.instance.lock().expect("fresh lock") = Some(live);
        Ok(rule)
    }

    /// The manifest and imports of a component, checked as `load` checks them.
    pub fn inspect(
        &self,
        origin: &str,
        wasm: &[u8],
        settings: &RuleSettings,
    ) -> Result<Inspection, RuleError> {
        let rule = self.load_with("-", origin, wasm, settings)?;
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

/// Refuse a component built for another version of the world: its
/// `tocsin:rule` imports (every rule imports the `types` its exports use)
/// name the version it was built for.
fn check_world_version(engine: &Engine, component: &Component) -> Result<(), Cause> {
    let ty = component.component_type();
    let names = ty
        .imports(engine)
        .map(|(name, _)| name)
        .chain(ty.exports(engine).map(|(name, _)| name));
    let mut found = None;
    for name in names {
        if let Some(rest) = name.strip_prefix("tocsin:rule/") {
            match rest.split_once('@') {
                Some((_, version)) if version == WORLD_VERSION => return Ok(()),
                Some((_, version)) => found = Some(format!("tocsin:rule@{version}")),
                None => found = Some("an unversioned tocsin:rule".to_owned()),
            }
        }
    }
    Err(match found {
        Some(found) => Cause::WrongVersion { found },
        None => Cause::InvalidComponent(format!(
            "does not use the tocsin:rule@{WORLD_VERSION} world: it imports no tocsin:rule interface"
        )),
    })
}

/// 16 bytes fixed per (tenant, component, parameters): the instance's
/// random seed, known before the rule's manifest names it.
fn instance_seed(tenant: &str, content_hash: &str, params: &str) -> [u8; 16] {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [tenant, content_hash, params] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    digest[..16].try_into().expect("16 of 32 bytes")
}

/// A call's identity, hashed: what its random bytes derive from besides the
/// instance. Stable for the same input within one Tocsin version.
fn call_identity(parts: &[&[u8]]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = foldhash::fast::FixedState::with_seed(0x70c5_1e5e).build_hasher();
    for part in parts {
        hasher.write_usize(part.len());
        hasher.write(part);
    }
    hasher.finish()
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "name `{name}` must be 1 to 64 lowercase letters, digits and `-`"
        ));
    }
    Ok(())
}

fn validate_manifest(manifest: &Manifest) -> Result<(), String> {
    validate_name(&manifest.name)?;
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

/// A rule component loaded for one tenant under one name, with its
/// parameters and its healthy instance.
pub struct LoadedRule {
    tenant: String,
    /// The name the tenant runs it under.
    name: String,
    /// `name@version`, for errors and logs.
    label: String,
    /// JSON text handed to `manifest` on every new instance.
    params: Box<str>,
    content_hash: String,
    manifest: Option<Manifest>,
    pre: RulePre<Sandbox>,
    limits: Limits,
    seed: [u8; 16],
    instances: Arc<Instances>,
    slot: Arc<Slot>,
}

impl std::fmt::Debug for LoadedRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedRule")
            .field("tenant", &self.tenant)
            .field("rule", &self.label)
            .field("content_hash", &self.content_hash)
            .finish_non_exhaustive()
    }
}

impl LoadedRule {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The name the tenant runs the rule under: what buckets and alerts are
    /// filed by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name@version`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The parameters as the rule received them (JSON text).
    pub fn params(&self) -> &str {
        &self.params
    }

    /// SHA-256 of the component bytes, hex.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    pub fn manifest(&self) -> &Manifest {
        self.manifest.as_ref().expect("set by Runtime::instantiate")
    }

    /// The bounds of each call.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the rule has a live instance now.
    pub fn is_live(&self) -> bool {
        self.slot
            .instance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// One `evaluate` call: one bucket's events of one batch. `position` is
    /// where the bucket's last event came from in its source: with the
    /// bucket it seeds the call's random bytes.
    pub fn evaluate(
        &self,
        bucket: &str,
        state: Option<&[u8]>,
        events: &EventBatch,
        now: i64,
        position: &str,
    ) -> Result<CallOutput, RuleError> {
        let call = call_identity(&[bucket.as_bytes(), position.as_bytes()]);
        self.call_outcome(now, call, |rule, store| {
            rule.call_evaluate(store, bucket, state, events, now)
        })
    }

    /// One `on-timer` call.
    pub fn on_timer(
        &self,
        bucket: &str,
        state: Option<&[u8]>,
        now: i64,
    ) -> Result<CallOutput, RuleError> {
        let call = call_identity(&[bucket.as_bytes(), b"on-timer", &now.to_le_bytes()]);
        self.call_outcome(now, call, |rule, store| {
            rule.call_on_timer(store, bucket, state, now)
        })
    }

    fn call_outcome(
        &self,
        now: i64,
        call: u64,
        f: impl FnOnce(
            &Rule,
            &mut Store<Sandbox>,
        ) -> wasmtime::Result<Result<Outcome, bindings::RuleError>>,
    ) -> Result<CallOutput, RuleError> {
        let mut fuel = 0;
        let mut log = Vec::new();
        let result = self.call_at(now, call, |rule, store| {
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

    /// Run `f` on the healthy instance (starting one if needed) under fresh
    /// per-call limits, with clocks at `now` and random seeded by `call`;
    /// discard the instance if the call traps.
    fn call_at<R>(
        &self,
        now: i64,
        call: u64,
        f: impl FnOnce(&Rule, &mut Store<Sandbox>) -> wasmtime::Result<R>,
    ) -> Result<R, RuleError> {
        self.instances.touch(&self.slot);
        let mut slot = self.slot.instance.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let (live, _) = self.start()?;
            *slot = Some(live);
        }
        let instances::Live { store, rule, .. } = slot.as_mut().expect("instantiated above");
        self.arm(store, now, call);
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

    /// Fresh limits, clocks and random for a call.
    fn arm(&self, store: &mut Store<Sandbox>, now: i64, call: u64) {
        store.data_mut().begin_call(now, call);
        let _ = store.set_fuel(self.limits.fuel_per_call);
        store.set_epoch_deadline(deadline_ticks(self.limits.deadline()));
    }

    /// A new instance, handed the parameters: every instance reads them
    /// once, before any other call.
    fn start(&self) -> Result<(instances::Live, Manifest), RuleError> {
        let reservation = self.instances.reserve();
        let mut store = Store::new(self.pre.engine(), Sandbox::new(&self.limits, self.seed));
        store.limiter(|sandbox| sandbox);
        self.arm(&mut store, 0, 0);
        let trapped = |store: &mut Store<Sandbox>, error: wasmtime::Error| {
            let log = store.data_mut().take_log();
            self.error(trap_cause(&error, &log, &self.limits))
        };
        let rule = match self.pre.instantiate(&mut store) {
            Ok(rule) => rule,
            Err(error) => return Err(trapped(&mut store, error)),
        };
        let manifest = match rule.call_manifest(&mut store, &self.params) {
            Ok(manifest) => manifest.map_err(|e| self.error(Cause::BadParams(e)))?,
            Err(error) => return Err(trapped(&mut store, error)),
        };
        Ok((self.instances.admit(reservation, store, rule), manifest))
    }

    fn error(&self, cause: Cause) -> RuleError {
        RuleError {
            tenant: self.tenant.clone(),
            rule: self.label.clone(),
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

/// Drops idle instances a few times per idle period until the runtime is
/// gone.
struct Sweeper {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Sweeper {
    fn start(instances: &Arc<Instances>, idle: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let instances = Arc::downgrade(instances);
        let flag = stop.clone();
        let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(15));
        std::thread::Builder::new()
            .name("tocsin-idle".to_owned())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(every);
                    match instances.upgrade() {
                        Some(instances) => {
                            instances.sweep(instances.idle);
                        }
                        None => break,
                    }
                }
            })
            .expect("spawn the idle-instance thread");
        Sweeper { stop }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
