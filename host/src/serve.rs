//! Wiring: the backends a config names, the one [`Engine`] over them, the
//! source that feeds it and the HTTP API, for every deployment the config
//! accepts. `tocsin serve` and `tocsin replay` start here.

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::catalogue::{LiveCatalogue, StaticCatalogue};
use crate::clock::Clock;
#[cfg(feature = "aws")]
use crate::config::{AlertsBackend, DeadLettersBackend};
use crate::config::{Config, Source, StateBackend};
use crate::engine::{Engine, Lane};
use crate::registry::store::RegistryStore;
use crate::registry::{FOLLOW_EVERY, Registry};
use crate::runtime::{Metering, Runtime, RuntimeConfig};
use crate::sink::AlertSink;
use crate::sink::dead_letters::DeadLetterSink;
use crate::source::file::FileSource;
use crate::source::http::{HttpIngest, HttpSource};
use crate::source::leases::Leases;
#[cfg(feature = "aws")]
use crate::source::shards::{ShardSettings, Shards, ShardsState};
use crate::source::timers::TimerPartitions;
use crate::store::embedded::EmbeddedStore;
use crate::store::{AlertLog, LeaseTable, StateStore};

/// Create the data directory, start the sandbox and compile every
/// configured rule (once per component file, cached on disk). The runtime
/// lives as long as the host: it advances call deadlines and drops idle
/// instances, and the registry loads new versions with it.
pub async fn load_catalogue(config: &Config) -> anyhow::Result<(Arc<Runtime>, Arc<LiveCatalogue>)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        limits: config.limits.clone(),
        max_instances: config.max_instances,
        cache_dir: Some(config.data_dir.join("components")),
        metering: Metering::Enforced,
        idle_instance: Duration::from_secs(config.idle_instance_secs),
        ..RuntimeConfig::default()
    })?);
    let assignments = config.rules.clone();
    let loading = runtime.clone();
    let catalogue =
        tokio::task::spawn_blocking(move || StaticCatalogue::load(&loading, &assignments))
            .await??;
    tracing::info!(
        tenants = catalogue.tenants(),
        rules = catalogue.rule_count(),
        "configured rules loaded"
    );
    Ok((runtime, Arc::new(LiveCatalogue::new(catalogue))))
}

/// The registry over `store`, serving its active versions; with `follow`,
/// it also follows what other hosts change until `stop`.
async fn open_registry(
    config: &Config,
    store: Arc<dyn RegistryStore>,
    runtime: Arc<Runtime>,
    catalogue: Arc<LiveCatalogue>,
    follow: bool,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Arc<Registry>> {
    let registry = Registry::open(
        store,
        runtime,
        catalogue.clone(),
        config.quotas.clone(),
        config.operator_token.clone(),
    )
    .await
    .context("cannot read the rule registry")?;
    tracing::info!(
        tenants = catalogue.tenants(),
        rules = catalogue.rule_count(),
        "serving rules"
    );
    if follow {
        tokio::spawn(registry.clone().follow(FOLLOW_EVERY, stop));
    }
    Ok(registry)
}

/// The configured alert sink.
pub async fn open_sink(config: &Config) -> anyhow::Result<Arc<dyn AlertSink>> {
    crate::sink::open_alerts(&config.alerts, &config.data_dir)
        .await
        .map_err(Into::into)
}

/// The configured dead-letter sink.
pub async fn open_dead_letters(config: &Config) -> anyhow::Result<Arc<dyn DeadLetterSink>> {
    crate::sink::open_dead_letters(&config.dead_letters, &config.data_dir)
        .await
        .map_err(Into::into)
}

/// The state store a config names, in each of its roles.
struct Store {
    state: Arc<dyn StateStore>,
    leases: Arc<dyn LeaseTable>,
    registry: Arc<dyn RegistryStore>,
    /// Other hosts may share it: the registry is followed, and timers are
    /// fired by whoever holds their partition's lease.
    shared: bool,
    /// With a store that keeps the alert log (the embedded one).
    log: Option<Arc<dyn AlertLog>>,
    #[cfg(feature = "aws")]
    usage: Option<Arc<crate::aws::Usage>>,
}

/// The name of the deployment a host is part of: its events stream, or
/// `http` for HTTP hosts. Leases and the shared outbox go by it.
fn deployment(config: &Config) -> &str {
    match &config.source {
        Source::Http => crate::source::http::PARTITION,
        Source::Kinesis(stream) => stream,
    }
}

/// Open the configured state store (checking first that the AWS resources
/// the config names exist).
async fn open_store(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Store> {
    #[cfg(feature = "aws")]
    check_aws(config).await?;
    match &config.state {
        StateBackend::Embedded => {
            let store = Arc::new(EmbeddedStore::open(&config.data_dir.join("state.redb"))?);
            Ok(Store {
                state: store.clone(),
                leases: store.clone(),
                registry: Arc::new(crate::registry::embedded::EmbeddedRegistry::new(&store)),
                shared: false,
                log: Some(store),
                #[cfg(feature = "aws")]
                usage: None,
            })
        }
        #[cfg(feature = "aws")]
        StateBackend::Dynamodb(table) => {
            let aws = crate::aws::sdk_config().await;
            let table = crate::aws::Table::new(aws_sdk_dynamodb::Client::new(&aws), table);
            let mut store =
                crate::store::dynamo::DynamoStore::new(table.clone(), deployment(config))
                    .with_clock(clock);
            if matches!(config.source, Source::Http) {
                store = store.read_through();
            }
            let store = Arc::new(store);
            Ok(Store {
                state: store.clone(),
                leases: store,
                registry: Arc::new(crate::registry::dynamo::DynamoRegistry::new(table.clone())),
                shared: true,
                log: None,
                usage: Some(table.usage.clone()),
            })
        }
        #[cfg(not(feature = "aws"))]
        StateBackend::Dynamodb(_) => {
            let _ = clock;
            // `validate` refuses it, saying why.
            anyhow::bail!("state `dynamodb:…` needs the `aws` feature")
        }
    }
}

/// Fail with a message naming what is missing if the events stream or the
/// table the config names does not exist (and then the output streams
/// too). A host on HTTP and its own disk starts without AWS: alerts for a
/// stream not there yet wait in the outbox, and readiness says why.
#[cfg(feature = "aws")]
async fn check_aws(config: &Config) -> anyhow::Result<()> {
    let mut streams = Vec::new();
    if let Source::Kinesis(stream) = &config.source {
        streams.push(stream.as_str());
    }
    let table = match &config.state {
        StateBackend::Dynamodb(table) => Some(table.as_str()),
        StateBackend::Embedded => None,
    };
    if streams.is_empty() && table.is_none() {
        return Ok(());
    }
    if let AlertsBackend::Kinesis(alerts) = &config.alerts {
        streams.push(alerts);
    }
    if let DeadLettersBackend::Kinesis(dead_letters) = &config.dead_letters {
        streams.push(dead_letters);
    }
    let aws = crate::aws::sdk_config().await;
    crate::aws::check_exists(&aws, &streams, table).await
}

/// A running host, whichever its backends.
pub struct Server {
    addr: SocketAddr,
    engine: Arc<Engine>,
    runtime: Arc<Runtime>,
    #[cfg(feature = "aws")]
    shards: Option<Arc<ShardsState>>,
    #[cfg(feature = "aws")]
    usage: Option<Arc<crate::aws::Usage>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Open the backends, load the rules, publish what a previous run left
    /// in the outbox, start the sources and listen. Any source runs on any
    /// store: the source records its progress in the store's terms, and
    /// timers are fired by the HTTP lane on a store only this host writes,
    /// else under the leases of the store's timer partitions.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Server> {
        config.validate().map_err(anyhow::Error::msg)?;
        config.check_exposure().map_err(anyhow::Error::msg)?;
        if config.operator_token.is_none() {
            tracing::warn!(listen = %config.listen, "no operator token: serving on loopback only, and any caller without a token acts as the operator");
        }
        let (stop, stopped) = watch::channel(false);
        let (runtime, catalogue) = load_catalogue(&config).await?;
        let sandbox = runtime.clone();
        let store = open_store(&config, clock.clone()).await?;
        let registry = open_registry(
            &config,
            store.registry.clone(),
            runtime,
            catalogue.clone(),
            store.shared,
            stopped.clone(),
        )
        .await?;
        let sink = open_sink(&config).await?;
        let engine = Arc::new(
            Engine::new(catalogue, store.state.clone(), sink, clock)
                .with_dead_letters(open_dead_letters(&config).await?)
                .with_fair_share(config.fair_share())
                .with_silences(registry.silences()),
        );
        registry.on_resume(engine.clone());

        let host = format!(
            "{}:{}:{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        );
        let lease_duration = Duration::from_millis(config.lease_ms);
        let mut sources: Vec<Arc<dyn crate::source::Source>> = Vec::new();
        let lane_fires_timers = matches!(config.source, Source::Http) && !store.shared;
        let timers_held = Arc::new(std::sync::Mutex::new(Vec::new()));
        if !lane_fires_timers {
            let group = format!("{}#timers", deployment(&config));
            sources.push(Arc::new(TimerPartitions::start(
                engine.clone(),
                Leases::new(store.leases.clone(), &group),
                store.state.timer_partitions(),
                &host,
                lease_duration,
                timers_held.clone(),
                stopped.clone(),
            )));
        }
        #[cfg(feature = "aws")]
        let mut shards = None;
        let ingest = match &config.source {
            Source::Http => {
                let (http, lane) = HttpIngest::start(
                    engine.clone(),
                    &config.tenant_field,
                    config.max_batch_events,
                    config.max_event_bytes,
                    lane_fires_timers,
                )
                .await?;
                sources.push(Arc::new(HttpSource::new(&http, lane)));
                Some(http)
            }
            #[cfg(feature = "aws")]
            Source::Kinesis(stream) => {
                let aws = crate::aws::sdk_config().await;
                let settings = ShardSettings {
                    stream: stream.clone(),
                    host: host.clone(),
                    lease_duration,
                    tenant_field: config.tenant_field.clone(),
                    max_event_bytes: config.max_event_bytes,
                };
                let state = Arc::new(ShardsState {
                    timers: timers_held,
                    ..ShardsState::default()
                });
                sources.push(Arc::new(Shards::start(
                    engine.clone(),
                    store.state.clone(),
                    aws_sdk_kinesis::Client::new(&aws),
                    Leases::new(store.leases.clone(), stream),
                    settings.clone(),
                    state.clone(),
                    stopped.clone(),
                )));
                shards = Some((state, settings));
                None
            }
            #[cfg(not(feature = "aws"))]
            Source::Kinesis(_) => anyhow::bail!("source `kinesis:…` needs the `aws` feature"),
        };
        let state = AppState {
            engine: engine.clone(),
            registry,
            ingest,
            #[cfg(feature = "aws")]
            shards: shards.clone(),
            sources: sources.clone(),
            log: store.log,
            #[cfg(feature = "aws")]
            usage: store.usage.clone(),
            shutdown: stopped.clone(),
        };

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let app = api::router(Arc::new(state), config.max_body_bytes);
        let mut until_stopped = stopped;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = until_stopped.wait_for(|stop| *stop).await;
                })
                .await?;
            // The router (and the ingest with it) is gone: the lane finishes
            // what is queued; lease workers finish their batch and release.
            for source in sources {
                source.join().await;
            }
            Ok(())
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), source = ?config.source, state = ?config.state, "serving");
        Ok(Server {
            addr,
            engine,
            runtime: sandbox,
            #[cfg(feature = "aws")]
            shards: shards.map(|(state, _)| state),
            #[cfg(feature = "aws")]
            usage: store.usage,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The sandbox the host's rules run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The Kinesis source's own state, with that source.
    #[cfg(feature = "aws")]
    pub fn shards(&self) -> Option<&ShardsState> {
        self.shards.as_deref()
    }

    /// DynamoDB requests made, with that store.
    #[cfg(feature = "aws")]
    pub fn usage(&self) -> Option<&crate::aws::Usage> {
        self.usage.as_deref()
    }

    /// Stop accepting, finish in-flight batches (releasing leases), and
    /// return.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }

    /// Run until `signal` completes, then stop gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("stopping: finishing in-flight batches");
        self.stop().await
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// What `tocsin replay` did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySummary {
    pub events: u64,
    /// Lines that were not events.
    pub bad_lines: u64,
    /// Events some rule did not apply (or none: unknown tenant).
    pub rejected: u64,
    /// Events applied, once per rule that applied them.
    pub applied: u64,
    /// Tenants the events named.
    pub tenants: u64,
    /// Buckets of those tenants holding state at the end.
    pub buckets_with_state: u64,
    pub alerts: u64,
    /// Timers fired.
    pub timers: u64,
    /// Fuel the rules burnt.
    pub fuel: u64,
    pub elapsed: Duration,
}

impl ReplaySummary {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The lane a replay's file goes through (one partition: the file).
const REPLAY_PARTITION: &str = "file";

/// Run every configured tenant's rules over NDJSON `input` through the
/// engine, with state in the config's data directory (the embedded store)
/// and alerts to `alerts` as NDJSON. Each problem (a bad line, an event a
/// rule did not apply) goes to `report` with its line number; none stops
/// the good lines.
///
/// Without `until`, the host's clock follows `clock`: before each batch the
/// timers due by then fire. With `until`, the clock follows the events
/// instead, as if they were happening now, and never passes `until`: it
/// starts at the first batch's earliest event time (or `clock`'s time, or
/// `until`, whichever is earliest) and before each batch moves on to that
/// batch's earliest event time, firing each timer due on the way at its due
/// time, in order; after the last batch it moves to `until` the same way.
/// So exactly the timers due at or before `until` fire, each at its due
/// time (a timer a batch sets for a time already passed fires at the
/// batch's), in the order a host running at the events' pace would fire
/// them. An event's time is what its rules' manifests say, else its
/// top-level `time` field (RFC 3339 or epoch milliseconds), else its
/// arrival.
pub async fn replay(
    config: &Config,
    input: impl BufRead + Send + 'static,
    name: &str,
    clock: Arc<dyn Clock>,
    until: Option<i64>,
    alerts: Arc<dyn AlertSink>,
    mut report: impl FnMut(usize, Option<&str>, &str),
) -> anyhow::Result<ReplaySummary> {
    let (runtime, catalogue) = load_catalogue(config).await?;
    let store = Arc::new(EmbeddedStore::open(&config.data_dir.join("state.redb"))?);
    // The rules uploaded to this data directory's registry run too.
    let (_stop, stopped) = watch::channel(false);
    let registry = open_registry(
        config,
        Arc::new(crate::registry::embedded::EmbeddedRegistry::new(&store)),
        runtime,
        catalogue.clone(),
        false,
        stopped,
    )
    .await?;
    anyhow::ensure!(
        catalogue.rule_count() > 0,
        "no rules: give --rule TENANT=PATH.wasm, a config file with [[rules]], or a --data-dir whose registry holds rules"
    );
    let cap = until.unwrap_or(i64::MAX);
    let host_clock = Arc::new(crate::clock::ManualClock::new(clock.now_ms().min(cap)));
    let mut started_clock = false;
    let rules: Arc<dyn crate::catalogue::Catalogue> = catalogue.clone();
    // A replay keeps its batches whole: its alerts come in the file's order.
    let engine = Arc::new(
        Engine::new(catalogue, store.clone(), alerts, host_clock.clone())
            .with_fair_share(None)
            .with_silences(registry.silences()),
    );
    let lane = Arc::new(Lane::new(REPLAY_PARTITION));
    let mut source = FileSource::new(input, name, &config.tenant_field, config.max_batch_events);
    let started = Instant::now();
    let (mut events, mut bad_lines, mut rejected, mut timers) = (0u64, 0u64, 0u64, 0u64);
    let mut tenants = std::collections::BTreeSet::new();
    loop {
        // With `until` the clock moves once the batch's times are known.
        let arrival = if until.is_some() {
            host_clock.now_ms()
        } else {
            let now = clock.now_ms().max(host_clock.now_ms());
            timers += engine.run_clock_to(&lane, &host_clock, now).await?;
            now
        };
        // Reading may block on standard input: off the async threads.
        let (next, back) = tokio::task::spawn_blocking(move || {
            let next = source.next_batch(arrival);
            (next, source)
        })
        .await?;
        source = back;
        let Some(file_batch) = next.context("cannot read the events")? else {
            break;
        };
        for bad in &file_batch.bad {
            bad_lines += 1;
            report(bad.line, None, &bad.error);
        }
        if file_batch.batch.events.is_empty() {
            continue;
        }
        let mut last_tenant: Option<&str> = None;
        for event in file_batch.batch.events.iter() {
            if last_tenant != Some(event.tenant.as_str()) {
                last_tenant = Some(&event.tenant);
                if !tenants.contains(&event.tenant) {
                    tenants.insert(event.tenant.clone());
                }
            }
        }
        if until.is_some()
            && let Some(earliest) = earliest_time(rules.as_ref(), &file_batch.batch.events)
        {
            if !started_clock && earliest < host_clock.now_ms() {
                host_clock.set(earliest);
            }
            let to = earliest.min(cap);
            timers += engine.run_clock_to(&lane, &host_clock, to).await?;
        }
        started_clock = true;
        let committed = engine.process(&lane, &file_batch.batch).await?;
        events += file_batch.batch.events.len() as u64;
        let mut last = None;
        for rejection in &committed.rejected {
            if last != Some(rejection.index) {
                rejected += 1;
                last = Some(rejection.index);
            }
            report(
                file_batch.lines[rejection.index],
                rejection.rule.as_deref(),
                &rejection.reason,
            );
        }
    }
    let end = until.unwrap_or(i64::MIN).max(host_clock.now_ms());
    timers += engine.run_clock_to(&lane, &host_clock, end).await?;
    engine.flush(&lane).await?;
    let mut buckets_with_state = 0;
    for tenant in &tenants {
        let log: &dyn AlertLog = store.as_ref();
        buckets_with_state += log.buckets(tenant)?.len() as u64;
    }
    let stats = engine.stats();
    let count =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    Ok(ReplaySummary {
        events,
        bad_lines,
        rejected,
        applied: count(&stats.applied),
        tenants: tenants.len() as u64,
        buckets_with_state,
        alerts: count(&stats.alerts),
        timers,
        fuel: count(&stats.fuel),
        elapsed: started.elapsed(),
    })
}

/// The earliest time of `events` as a replay's clock reads it: what each
/// event's rules' manifests say its time is, else its top-level `time`
/// field; `None` if no event has one.
fn earliest_time(
    catalogue: &dyn crate::catalogue::Catalogue,
    events: &[crate::event::Incoming],
) -> Option<i64> {
    use crate::engine::route;
    use crate::event::{Number, Value};
    use crate::runtime::EventTime;
    events
        .iter()
        .enumerate()
        .filter_map(|(index, event)| {
            // Its rules' declared times first.
            let declared = catalogue.rules(&event.tenant).and_then(|rules| {
                rules
                    .iter()
                    .filter(|rule| matches!(rule.manifest().event_time, EventTime::Field(_)))
                    .filter_map(|rule| route::event_time(rule.manifest(), index, event).ok())
                    .min()
            });
            declared.or_else(|| match event.field("time") {
                Some(Value::Str(text)) => route::parse_rfc3339(text),
                Some(Value::Number(Number::Int(ms))) => Some(ms),
                Some(Value::Number(Number::UInt(ms))) => i64::try_from(ms).ok(),
                _ => None,
            })
        })
        .min()
}
