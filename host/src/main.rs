//! The `tocsin` command: argument parsing and printing over the library.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use std::sync::Arc;

use tocsin::clock::{Clock, ManualClock, SystemClock};
use tocsin::config::{AlertsBackend, Config, DeadLettersBackend, Source, StateBackend};
use tocsin::event::DEFAULT_TENANT_FIELD;
mod cli;

use cli::rule_test;
use cli::seed::{Simulator, post_batch};
use tocsin::runtime::{Runtime, RuntimeConfig};
use tocsin::serve::Server;

/// The host allocates per event and per alert on several threads at once,
/// and frees much of it on another (the committer): jemalloc's thread caches
/// and arenas serve that with less contention and fewer trips to the kernel
/// than the system allocator (about 15% more events/s end to end).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The sandbox's instance pool in `tocsin bench`: the service's default.
const DEFAULT_BENCH_INSTANCES: u32 = tocsin::config::DEFAULT_MAX_INSTANCES;

/// `tocsin --version`: the binary's version and the rule world it hosts.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (hosts tocsin:rule@{} components)",
        env!("CARGO_PKG_VERSION"),
        tocsin::runtime::WORLD_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "tocsin",
    version = VERSION.as_str(),
    about = "Multi-tenant streaming alert engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: HTTP ingest, rules, durable buckets, alerts.
    Serve(ServeArgs),
    /// The prototype's scenario live: build the seed rules, serve them, simulate machines, print alerts.
    Demo(DemoArgs),
    /// Drive a running host with the seed's machine simulator.
    Simulate(SimulateArgs),
    /// Run the configured rules over a file of events through the engine; print the alerts as JSON lines.
    Replay(ReplayArgs),
    /// Load-test the embedded service end to end and print figures.
    Bench(BenchArgs),
    /// Work with rule components: test, inspect and scaffold them; upload and manage them on a host.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Manage a host's tenants: tokens (operator).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Set up the AWS resources of the distributed engine.
    #[cfg(feature = "aws")]
    #[command(subcommand)]
    Aws(AwsCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file (see tocsin.example.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7878].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory [default: ./tocsin-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run a rule for a tenant: TENANT[/NAME]=PATH.wasm[?PARAMS], PARAMS a JSON value or @FILE (repeatable; adds to the config's rules).
    #[arg(long = "rule", value_name = "TENANT[/NAME]=PATH[?PARAMS]")]
    rules: Vec<tocsin::catalogue::Assignment>,
    #[command(flatten)]
    backends: BackendArgs,
}

#[derive(Args)]
struct ReplayArgs {
    /// Events, one JSON object per line; `-` reads standard input. Dead letters (as `dead-letters.ndjson` and the API hold them) run again, each against the rule that did not apply it.
    #[arg(long)]
    events: PathBuf,
    /// TOML config file (its rules, tenant field, limits and batch size).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run a rule for a tenant: TENANT[/NAME]=PATH.wasm[?PARAMS], PARAMS a JSON value or @FILE (repeatable; adds to the config's rules).
    #[arg(long = "rule", value_name = "TENANT[/NAME]=PATH[?PARAMS]")]
    rules: Vec<tocsin::catalogue::Assignment>,
    /// Keep state here (it accumulates over replays; a stopped host's data directory, whose registered rules run too) [default: a new temporary directory].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Events per batch [default: the config's max_batch_events].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: Option<u32>,
    /// Never let the host's clock pass TIME (RFC 3339 or epoch milliseconds); after the
    /// last event move it to TIME: exactly the timers due at or before TIME fire, each at
    /// its due time, in order.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
}

#[derive(Args)]
struct BackendArgs {
    /// Where events come from: `http` or `kinesis:<stream>` [default: http].
    #[arg(long)]
    source: Option<Source>,
    /// Where bucket state lives: `embedded` or `dynamodb:<table>` [default: embedded].
    #[arg(long)]
    state: Option<StateBackend>,
    /// Where alerts go: `file` or `kinesis:<stream>` [default: file].
    #[arg(long)]
    alerts: Option<AlertsBackend>,
    /// Where events not applied go, with the reason: `file` or `kinesis:<stream>` [default: file].
    #[arg(long)]
    dead_letters: Option<DeadLettersBackend>,
}

impl BackendArgs {
    fn apply(self, config: &mut Config) {
        if let Some(source) = self.source {
            config.source = source;
        }
        if let Some(state) = self.state {
            config.state = state;
        }
        if let Some(alerts) = self.alerts {
            config.alerts = alerts;
        }
        if let Some(dead_letters) = self.dead_letters {
            config.dead_letters = dead_letters;
        }
    }
}

#[cfg(feature = "aws")]
#[derive(Subcommand)]
enum AwsCommand {
    /// Create the streams and the DynamoDB table the backends name, if missing (idempotent).
    Init {
        #[command(flatten)]
        backends: BackendArgs,
        /// Shards of each stream created.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..))]
        shards: i32,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Events to send.
    #[arg(long, default_value_t = 300)]
    events: usize,
    /// Events per second.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Keep the service's data here instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the simulator's random choices.
    #[arg(long, default_value_t = 2018)]
    seed: u64,
}

#[derive(Args)]
struct SimulateArgs {
    /// Base URL of the host, e.g. http://127.0.0.1:7878.
    #[arg(long)]
    target: String,
    /// Events to send.
    #[arg(long, default_value_t = 300)]
    events: usize,
    /// Events per second.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Seed of the simulator's random choices.
    #[arg(long, default_value_t = 2018)]
    seed: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// Tenants, each running the three seed rules.
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    /// Events to send.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Rules per tenant (the three seed components, under names of their own past three).
    #[arg(long, default_value_t = 3)]
    rules_per_tenant: usize,
    /// Instance slots of the sandbox's pool [default: one per rule, up to 4000].
    #[arg(long)]
    max_instances: Option<u32>,
    /// The service's fair_share_ms [default: its default, 100]; 0 keeps every batch whole.
    #[arg(long)]
    fair_share_ms: Option<u64>,
    /// Measure one host of the distributed engine instead: load the events onto a new
    /// Kinesis stream, then time the host catching up (needs AWS or `scripts/emulators`).
    #[arg(long)]
    distributed: bool,
    /// With --distributed: shards of the stream.
    #[arg(long, default_value_t = 4)]
    shards: i32,
}

/// Which host to talk to, and as whom.
#[derive(Args)]
struct HostArgs {
    /// Base URL of the host.
    #[arg(long, env = "TOCSIN_URL", default_value = "http://127.0.0.1:7878")]
    url: String,
    /// Bearer token: the operator's, or a tenant's [default: none, for a loopback host without one].
    #[arg(long, env = "TOCSIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl HostArgs {
    fn client(&self) -> cli::client::Client {
        cli::client::Client::new(&self.url, self.token.clone())
    }
}

/// One rule of one tenant on a host.
#[derive(Args)]
struct RuleRef {
    #[arg(long)]
    tenant: String,
    /// The name the tenant runs it under.
    #[arg(long)]
    name: String,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Issue a token for a tenant; prints the token (shown only once).
    Token {
        tenant: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// List a tenant's tokens (never their secrets).
    Tokens {
        tenant: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Print a tenant's dead letters as NDJSON (`tocsin replay --events` runs them again).
    DeadLetters {
        tenant: String,
        /// Only those after this `seq`.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Revoke a tenant's token by its id.
    Revoke {
        tenant: String,
        id: String,
        #[command(flatten)]
        host: HostArgs,
    },
}

#[derive(Subcommand)]
enum RuleCommand {
    /// Run a file of events through a rule as the host would; print each alert as a JSON line.
    Test(TestArgs),
    /// Create a rule crate: builds with cargo or cargo-component, with a unit test and sample events.
    New {
        /// The rule's name: lowercase letters, digits and `-`.
        name: String,
        /// Directory to create, or an empty one to fill [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Depend on a local checkout of the tocsin-rule SDK at PATH [default: the SDK this binary carries, written into the crate's vendor/tocsin-rule].
        #[arg(long, value_name = "PATH", conflicts_with = "sdk_version")]
        sdk: Option<PathBuf>,
        /// Depend on this release of tocsin-rule from the crate registry.
        #[arg(long, value_name = "V")]
        sdk_version: Option<String>,
    },
    /// Upload a component to a running host as a new version of a tenant's rule (active at once unless --inactive).
    Upload {
        /// The rule component (.wasm).
        rule: PathBuf,
        #[arg(long)]
        tenant: String,
        /// The name the tenant runs it under.
        #[arg(long)]
        name: String,
        /// The rule's parameters: a JSON file.
        #[arg(long, value_name = "FILE")]
        params: Option<PathBuf>,
        /// Keep the running version; activate this one later.
        #[arg(long)]
        inactive: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// List a tenant's rules on a running host.
    List {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show one rule of a tenant with its versions, as JSON.
    Show {
        #[command(flatten)]
        rule: RuleRef,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Run another kept version of a tenant's rule (roll back or forward).
    Activate {
        #[command(flatten)]
        rule: RuleRef,
        #[arg(long)]
        version: u32,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Stop running a tenant's registered rule and forget its versions.
    Delete {
        #[command(flatten)]
        rule: RuleRef,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Print a rule's recent log lines on a host (what it wrote, and why its calls failed), oldest first.
    Logs {
        #[command(flatten)]
        rule: RuleRef,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Lift a quarantined rule's quarantine on every host (operator).
    Resume {
        #[command(flatten)]
        rule: RuleRef,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Print a rule's manifest and imports.
    Inspect {
        /// The rule component (.wasm).
        rule: PathBuf,
        /// The rule's parameters: a JSON file.
        #[arg(long, value_name = "FILE")]
        params: Option<PathBuf>,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

#[derive(Args)]
struct TestArgs {
    /// The rule component (.wasm).
    rule: PathBuf,
    /// Events, one JSON object per line; `-` reads standard input.
    #[arg(long)]
    events: PathBuf,
    /// The top-level field naming each event's tenant.
    #[arg(long, default_value = DEFAULT_TENANT_FIELD)]
    tenant_field: String,
    /// Events per batch (the host calls a rule once per bucket per batch).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Fix the processing clock (epoch milliseconds or RFC 3339) for reproducible output.
    #[arg(long, value_parser = parse_time)]
    now: Option<i64>,
    /// Never let the clock pass TIME (RFC 3339 or epoch milliseconds); after the last
    /// event move it to TIME: exactly the timers due at or before TIME fire, each at its
    /// due time, in order.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
    /// The rule's parameters: a JSON file [default: the rule's defaults].
    #[arg(long, value_name = "FILE")]
    params: Option<PathBuf>,
}

/// The settings a `--params FILE` flag gives.
fn settings(params: Option<&Path>) -> anyhow::Result<tocsin::runtime::RuleSettings> {
    Ok(tocsin::runtime::RuleSettings {
        name: None,
        params: params
            .map(tocsin::catalogue::read_params)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    })
}

#[derive(Args)]
struct RuntimeArgs {
    /// Where compiled components are cached [default: ~/.cache/tocsin/components].
    #[arg(long, env = "TOCSIN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl RuntimeArgs {
    fn runtime(&self) -> anyhow::Result<Runtime> {
        let mut config = RuntimeConfig::default();
        if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        Runtime::new(config)
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| format!("`{s}` is neither epoch milliseconds nor an RFC 3339 time"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs what it does; one-shot commands only what went wrong.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Rule(RuleCommand::Test(args)) => rule_test(args),
        Command::Rule(RuleCommand::Inspect {
            rule,
            params,
            runtime,
        }) => rule_inspect(&rule, params.as_deref(), &runtime),
        Command::Rule(RuleCommand::New {
            name,
            dir,
            sdk,
            sdk_version,
        }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let sdk = match (sdk, sdk_version) {
                (Some(path), _) => cli::scaffold::Sdk::Path(path),
                (None, Some(version)) => cli::scaffold::Sdk::Version(version),
                (None, None) => cli::scaffold::Sdk::Carried,
            };
            cli::scaffold::create(&name, &dir, &sdk)?;
            println!("created rule `{name}` in {}", dir.display());
            println!(
                "next: cd {} && cargo test && cargo build --release --target wasm32-wasip2",
                dir.display()
            );
            println!(
                "then: tocsin rule test target/wasm32-wasip2/release/{}.wasm --events events.ndjson",
                name.replace('-', "_")
            );
            Ok(())
        }
        Command::Rule(command) => async_main(manage_rules(command)),
        Command::Tenant(command) => async_main(manage_tenants(command)),
        Command::Serve(args) => async_main(serve(args)),
        #[cfg(feature = "aws")]
        Command::Aws(command) => async_main(aws(command)),
        Command::Demo(args) => async_main(cli::demo::run(cli::demo::Options {
            events: args.events,
            rate: args.rate,
            data_dir: args.data_dir,
            seed: args.seed,
        })),
        Command::Simulate(args) => async_main(simulate(args)),
        Command::Replay(args) => async_main(replay(args)),
        Command::Bench(args) => async_main(async move {
            let options = cli::bench::Options {
                tenants: args.tenants,
                events: args.events,
                batch_size: args.batch_size,
                connections: args.connections,
                rules_per_tenant: args.rules_per_tenant,
                max_instances: args.max_instances,
                fair_share_ms: args.fair_share_ms,
            };
            if args.distributed {
                #[cfg(feature = "aws")]
                println!(
                    "{}",
                    cli::bench::run_distributed(options, args.shards).await?
                );
                #[cfg(not(feature = "aws"))]
                bail!(
                    "--distributed needs AWS, and this tocsin was built without it (the `aws` feature)"
                );
            } else {
                println!("{}", cli::bench::run(options).await?);
            }
            Ok(())
        }),
    }
}

fn async_main<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    config.rules.extend(args.rules);
    args.backends.apply(&mut config);
    if let Some(token) = std::env::var("TOCSIN_OPERATOR_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        config.operator_token = Some(token);
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let server = Server::start(config, Arc::new(SystemClock)).await?;
    // Tests and scripts read the bound address from this line.
    println!("listening on {}", server.addr());
    server.run_until(shutdown_signal()).await
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.rules.extend(args.rules);
    if config.rules.is_empty() && args.data_dir.is_none() {
        bail!("no rules: give --rule TENANT=PATH.wasm or a config file with [[rules]]");
    }
    if let Some(size) = args.batch_size {
        config.max_batch_events = size as usize;
    }
    let _scratch;
    config.data_dir = match args.data_dir {
        Some(dir) => dir,
        None => {
            let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
            let path = dir.path().to_owned();
            _scratch = dir;
            path
        }
    };
    let (input, name): (Box<dyn BufRead + Send>, String) = if args.events.as_os_str() == "-" {
        (
            Box::new(BufReader::new(std::io::stdin())),
            "stdin".to_owned(),
        )
    } else {
        let file = std::fs::File::open(&args.events)
            .with_context(|| format!("cannot read events file {}", args.events.display()))?;
        let name = args
            .events
            .file_name()
            .map_or("events".into(), |n| n.to_string_lossy().into_owned());
        (Box::new(BufReader::new(file)), name)
    };
    let alerts = Arc::new(tocsin::sink::writer::WriterSink(std::sync::Mutex::new(
        std::io::BufWriter::new(std::io::stdout()),
    )));
    let file = args.events.display().to_string();
    let summary = tocsin::serve::replay(
        &config,
        input,
        &name,
        Arc::new(SystemClock),
        args.until,
        alerts,
        |line, rule, reason| match rule {
            Some(rule) => eprintln!("{file}:{line}: rule `{rule}`: {reason}"),
            None => eprintln!("{file}:{line}: {reason}"),
        },
    )
    .await?;
    eprintln!(
        "events: {}, bad lines: {}, not applied: {}, alerts: {}, timers fired: {}, {:.0} events/s",
        summary.events,
        summary.bad_lines,
        summary.rejected,
        summary.alerts,
        summary.timers,
        summary.events_per_second()
    );
    Ok(())
}

#[cfg(feature = "aws")]
async fn aws(command: AwsCommand) -> anyhow::Result<()> {
    let AwsCommand::Init { backends, shards } = command;
    let mut config = Config::default();
    backends.apply(&mut config);
    let events = match &config.source {
        Source::Kinesis(events) => Some(events.as_str()),
        Source::Http => None,
    };
    let table = match &config.state {
        StateBackend::Dynamodb(table) => Some(table.as_str()),
        StateBackend::Embedded => None,
    };
    if events.is_none() && table.is_none() {
        bail!(
            "`tocsin aws init` needs --source kinesis:<stream> or --state dynamodb:<table> (or both)"
        );
    }
    let mut outputs = Vec::new();
    if let AlertsBackend::Kinesis(stream) = &config.alerts {
        outputs.push(stream.as_str());
    }
    if let DeadLettersBackend::Kinesis(stream) = &config.dead_letters {
        outputs.push(stream.as_str());
    }
    let aws = tocsin::aws::sdk_config().await;
    for line in tocsin::aws::init(&aws, events, table, &outputs, shards).await? {
        println!("{line}");
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install the SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use rand::SeedableRng;
    let url = format!("{}/v1/events", args.target.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let mut simulator = Simulator::seed(rand::rngs::StdRng::seed_from_u64(args.seed));
    let run = format!("simulate-{:x}", rand::random::<u32>());
    let per_batch = ((args.rate / 10.0).ceil() as usize).max(1);
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs_f64(
        per_batch as f64 / args.rate,
    ));
    let (mut sent, mut batch) = (0, 0);
    while sent < args.events {
        ticker.tick().await;
        let lines = simulator.events(per_batch.min(args.events - sent));
        let answer = post_batch(&client, &url, &format!("{run}-{batch}"), &lines, 5).await?;
        sent += lines.len();
        batch += 1;
        if answer["rejected"].as_array().is_some_and(|r| !r.is_empty()) {
            eprintln!("batch {batch}: {}", answer["rejected"]);
        }
    }
    eprintln!("{sent} events sent to {url}");
    Ok(())
}

use cli::client::read_component;

async fn manage_rules(command: RuleCommand) -> anyhow::Result<()> {
    use cli::client::{describe_version, rule_path};
    use reqwest::Method;
    match command {
        RuleCommand::Upload {
            rule,
            tenant,
            name,
            params,
            inactive,
            host,
        } => {
            let wasm = read_component(&rule)?;
            let params = params
                .as_deref()
                .map(tocsin::catalogue::read_params)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let (status, record) = host
                .client()
                .call(Method::PUT, &rule_path(&tenant, Some(&name)), |r| {
                    let mut query = vec![("activate", (!inactive).to_string())];
                    if let Some(params) = &params {
                        query.push(("params", params.to_string()));
                    }
                    r.header("content-type", "application/wasm")
                        .query(&query)
                        .body(wasm)
                })
                .await?;
            let what = if status == reqwest::StatusCode::CREATED {
                "uploaded"
            } else {
                "unchanged"
            };
            println!("{what}: {}", describe_version(&tenant, &name, &record));
            if inactive {
                println!(
                    "not active: run `tocsin rule activate --tenant {tenant} --name {name} --version {}`",
                    record["version"]
                );
            }
        }
        RuleCommand::List { tenant, host } => {
            let (_, rules) = host
                .client()
                .call(Method::GET, &rule_path(&tenant, None), |r| r)
                .await?;
            println!(
                "{:<24} {:<9} {:<7} {:<28} SHA256",
                "NAME", "SOURCE", "ACTIVE", "RULE"
            );
            for rule in rules.as_array().into_iter().flatten() {
                let active = &rule["active"];
                println!(
                    "{:<24} {:<9} {:<7} {:<28} {}",
                    rule["name"].as_str().unwrap_or("?"),
                    rule["source"].as_str().unwrap_or("?"),
                    rule["active_version"]
                        .as_u64()
                        .map_or("-".to_owned(), |v| v.to_string()),
                    format!(
                        "{}@{}",
                        active["manifest"]["name"].as_str().unwrap_or("-"),
                        active["manifest"]["version"].as_str().unwrap_or("-")
                    ),
                    active["content_hash"]
                        .as_str()
                        .map_or("-", |h| &h[..h.len().min(16)]),
                );
            }
        }
        RuleCommand::Show {
            rule: RuleRef { tenant, name },
            host,
        } => {
            let (_, rule) = host
                .client()
                .call(Method::GET, &rule_path(&tenant, Some(&name)), |r| r)
                .await?;
            println!("{}", serde_json::to_string_pretty(&rule)?);
        }
        RuleCommand::Activate {
            rule: RuleRef { tenant, name },
            version,
            host,
        } => {
            let path = format!("{}/activate", rule_path(&tenant, Some(&name)));
            host.client()
                .call(Method::POST, &path, |r| {
                    r.json(&serde_json::json!({ "version": version }))
                })
                .await?;
            println!("{tenant}/{name}: version {version} is active");
        }
        RuleCommand::Delete {
            rule: RuleRef { tenant, name },
            host,
        } => {
            host.client()
                .call(Method::DELETE, &rule_path(&tenant, Some(&name)), |r| r)
                .await?;
            println!("{tenant}/{name}: deleted");
        }
        RuleCommand::Logs {
            rule: RuleRef { tenant, name },
            host,
        } => {
            let path = format!("{}/logs", rule_path(&tenant, Some(&name)));
            let (_, lines) = host.client().call(Method::GET, &path, |r| r).await?;
            for line in lines.as_array().into_iter().flatten() {
                let at = line["at"].as_i64().unwrap_or(0);
                let bucket = line["bucket"].as_str().unwrap_or("");
                println!(
                    "{} {:<6} {:<4} {}{}",
                    tocsin::timestamp::rfc3339(at),
                    line["level"].as_str().unwrap_or("?"),
                    line["source"].as_str().unwrap_or("?"),
                    if bucket.is_empty() {
                        String::new()
                    } else {
                        format!("[{bucket}] ")
                    },
                    line["message"].as_str().unwrap_or(""),
                );
            }
        }
        RuleCommand::Resume {
            rule: RuleRef { tenant, name },
            host,
        } => {
            let path = format!("{}/resume", rule_path(&tenant, Some(&name)));
            let (_, answer) = host.client().call(Method::POST, &path, |r| r).await?;
            if answer["was_quarantined"].as_bool() == Some(true) {
                println!("{tenant}/{name}: resumed");
            } else {
                println!("{tenant}/{name}: resumed (it was not quarantined on this host)");
            }
        }
        RuleCommand::Test(_) | RuleCommand::Inspect { .. } | RuleCommand::New { .. } => {
            unreachable!("run without a host")
        }
    }
    Ok(())
}

async fn manage_tenants(command: TenantCommand) -> anyhow::Result<()> {
    use cli::client::tenant_path;
    use reqwest::Method;
    match command {
        TenantCommand::Token { tenant, host } => {
            let (_, token) = host
                .client()
                .call(Method::POST, &tenant_path(&tenant, &["tokens"]), |r| r)
                .await?;
            eprintln!(
                "token `{}` for tenant `{tenant}`: keep it secret; it is not shown again",
                token["id"].as_str().unwrap_or("?")
            );
            println!("{}", token["token"].as_str().unwrap_or_default());
        }
        TenantCommand::DeadLetters {
            tenant,
            mut after,
            host,
        } => {
            let client = host.client();
            loop {
                let path = format!("{}?after={after}", tenant_path(&tenant, &["dead-letters"]));
                let (_, page) = client.call(Method::GET, &path, |r| r).await?;
                let letters = page.as_array().cloned().unwrap_or_default();
                let Some(last) = letters.last().and_then(|l| l["seq"].as_u64()) else {
                    break;
                };
                for letter in &letters {
                    println!("{letter}");
                }
                after = last;
            }
        }
        TenantCommand::Tokens { tenant, host } => {
            let (_, tokens) = host
                .client()
                .call(Method::GET, &tenant_path(&tenant, &["tokens"]), |r| r)
                .await?;
            for token in tokens.as_array().into_iter().flatten() {
                println!(
                    "{}  created {} by {}{}",
                    token["id"].as_str().unwrap_or("?"),
                    token["created_at"].as_str().unwrap_or("?"),
                    token["created_by"].as_str().unwrap_or("?"),
                    token["revoked_at"]
                        .as_str()
                        .map_or(String::new(), |at| format!(", revoked {at}")),
                );
            }
        }
        TenantCommand::Revoke { tenant, id, host } => {
            host.client()
                .call(
                    Method::DELETE,
                    &tenant_path(&tenant, &["tokens", &id]),
                    |r| r,
                )
                .await?;
            println!("token `{id}` of tenant `{tenant}` is revoked");
        }
    }
    Ok(())
}

fn rule_test(args: TestArgs) -> anyhow::Result<()> {
    // Fail on a missing component before reading a possibly long input.
    read_component(&args.rule)?;
    let input: Box<dyn Read + Send> = if args.events.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        let file = std::fs::File::open(&args.events)
            .with_context(|| format!("cannot read events file {}", args.events.display()))?;
        Box::new(file)
    };
    let clock: Arc<dyn Clock> = match args.now {
        Some(now) => Arc::new(ManualClock::new(now)),
        None => Arc::new(SystemClock),
    };
    let options = rule_test::Options {
        tenant_field: args.tenant_field,
        batch_size: args.batch_size as usize,
        name: None,
        params: args
            .params
            .as_deref()
            .map(tocsin::catalogue::read_params)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        until: args.until,
    };
    let alerts = Arc::new(tocsin::sink::writer::WriterSink(std::sync::Mutex::new(
        std::io::BufWriter::new(std::io::stdout()),
    )));
    let events = args.events.display().to_string();
    let summary = async_main(rule_test::run(&args.rule, input, &options, clock, alerts))
        .map_err(|e| anyhow::anyhow!("{events}: {e:#}"))?;
    for problem in &summary.not_applied {
        eprintln!("{events}: {problem}");
    }
    eprintln!(
        "events: {} ({} applied), tenants: {}, buckets with state: {}, alerts: {}, timers fired: {}, fuel: {}, time: {:.1} ms",
        summary.events,
        summary.applied,
        summary.tenants,
        summary.stored_buckets,
        summary.alerts,
        summary.timers,
        summary.fuel,
        summary.elapsed.as_secs_f64() * 1e3,
    );
    if !summary.not_applied.is_empty() {
        bail!(
            "{events}: the rule did not apply {} of {} events (listed above)",
            summary.not_applied.len(),
            summary.events
        );
    }
    Ok(())
}

fn rule_inspect(path: &Path, params: Option<&Path>, runtime: &RuntimeArgs) -> anyhow::Result<()> {
    let wasm = read_component(path)?;
    let inspection =
        runtime
            .runtime()?
            .inspect(&path.display().to_string(), &wasm, &settings(params)?)?;
    let m = &inspection.manifest;
    println!("rule:        {}@{}", m.name, m.version);
    println!("sha256:      {}", inspection.content_hash);
    println!(
        "filter:      {}",
        if m.filter.is_empty() {
            "(every event)".to_owned()
        } else {
            m.filter
                .iter()
                .map(describe_condition)
                .collect::<Vec<_>>()
                .join(" and ")
        }
    );
    println!(
        "bucket key:  {}",
        if m.bucket_key.is_empty() {
            "(one bucket per tenant)".to_owned()
        } else {
            m.bucket_key.join(", ")
        }
    );
    println!("fields:      {}", m.fields.join(", "));
    println!("raw json:    {}", if m.raw_json { "yes" } else { "no" });
    println!(
        "event time:  {}",
        match &m.event_time {
            tocsin::runtime::EventTime::Arrival => "arrival".to_owned(),
            tocsin::runtime::EventTime::Field(f) => format!("field `{f}`"),
        }
    );
    println!(
        "state ttl:   {}",
        m.state_ttl_ms
            .map_or("none".to_owned(), |ms| format!("{ms} ms"))
    );
    println!("imports:");
    for import in &inspection.imports {
        println!("  {import}");
    }
    Ok(())
}

fn describe_condition(c: &tocsin::runtime::Condition) -> String {
    use tocsin::runtime::{Scalar, Test};
    let scalar = |s: &Scalar| match s {
        Scalar::Null => "null".to_owned(),
        Scalar::Boolean(b) => b.to_string(),
        Scalar::Integer(i) => i.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Text(t) => format!("{t:?}"),
    };
    match &c.test {
        Test::Exists => format!("{} exists", c.field),
        Test::Equals(v) => format!("{} == {}", c.field, scalar(v)),
        Test::OneOf(vs) => format!(
            "{} in [{}]",
            c.field,
            vs.iter().map(scalar).collect::<Vec<_>>().join(", ")
        ),
    }
}
