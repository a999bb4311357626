//! The `tocsin` command: argument parsing and printing over the library.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tocsin::clock::{Clock, ManualClock, SystemClock};
use tocsin::event::DEFAULT_TENANT_FIELD;
use tocsin::rule_test;
use tocsin::runtime::{Runtime, RuntimeConfig};

#[derive(Parser)]
#[command(
    name = "tocsin",
    version,
    about = "Multi-tenant streaming alert engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with rule components.
    #[command(subcommand)]
    Rule(RuleCommand),
}

#[derive(Subcommand)]
enum RuleCommand {
    /// Run a file of events through a rule as the host would; print each alert as a JSON line.
    Test(TestArgs),
    /// Print a rule's manifest and imports.
    Inspect {
        /// The rule component (.wasm).
        rule: PathBuf,
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
    #[command(flatten)]
    runtime: RuntimeArgs,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
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
        Command::Rule(RuleCommand::Inspect { rule, runtime }) => rule_inspect(&rule, &runtime),
    }
}

fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read rule component {}", path.display()))
}

fn rule_test(args: TestArgs) -> anyhow::Result<()> {
    let wasm = read_component(&args.rule)?;
    let input: Box<dyn BufRead> = if args.events.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.events)
            .with_context(|| format!("cannot read events file {}", args.events.display()))?;
        Box::new(BufReader::new(file))
    };
    let clock: Box<dyn Clock> = match args.now {
        Some(now) => Box::new(ManualClock::new(now)),
        None => Box::new(SystemClock),
    };
    let runtime = args.runtime.runtime()?;
    let options = rule_test::Options {
        tenant_field: args.tenant_field,
        batch_size: args.batch_size as usize,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let summary = rule_test::run(
        &runtime,
        &args.rule.display().to_string(),
        &wasm,
        input,
        &options,
        clock.as_ref(),
        |alert| {
            if write_error.is_none()
                && let Err(e) = serde_json::to_writer(&mut out, alert)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"))
            {
                write_error = Some(e);
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.events.display()))?;
    if let Some(e) = write_error {
        bail!("cannot write alerts: {e}");
    }
    out.flush()?;
    eprintln!(
        "events: {} ({} matched), tenants: {}, buckets: {} ({} with state), alerts: {}, fuel: {}, time: {:.1} ms",
        summary.events,
        summary.matched,
        summary.tenants,
        summary.buckets,
        summary.stored_buckets,
        summary.alerts,
        summary.fuel,
        summary.elapsed.as_secs_f64() * 1e3,
    );
    Ok(())
}

fn rule_inspect(path: &Path, runtime: &RuntimeArgs) -> anyhow::Result<()> {
    let wasm = read_component(path)?;
    let inspection = runtime
        .runtime()?
        .inspect(&path.display().to_string(), &wasm)?;
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
