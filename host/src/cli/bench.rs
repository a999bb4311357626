//! `tocsin bench`: the embedded service end to end under load. Many tenants
//! each run the three seed rules; clients post batches over HTTP; the report
//! gives events/s, acknowledgement latency (the answer comes once the batch
//! is committed; its alerts are published right after) and where the engine
//! spent its time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::seed;
use tocsin::clock::SystemClock;
use tocsin::config::{Config, RuleEntry};
use tocsin::serve::Server;

#[derive(Debug, Clone)]
pub struct Options {
    pub tenants: usize,
    pub events: usize,
    pub batch_size: usize,
    /// Requests in flight at once.
    pub connections: usize,
    /// Rules per tenant: the seed's three components, under names of
    /// their own when more (each rule its own instance and buckets).
    pub rules_per_tenant: usize,
    /// Instance slots of the sandbox's pool [default: one per rule, up to
    /// the service's default]: fewer than the rules running makes them
    /// take turns.
    pub max_instances: Option<u32>,
    /// The service's `fair_share_ms` [default: its default]: 0 keeps every
    /// batch whole, to measure what fair sharing costs.
    pub fair_share_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub events: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub alerts: u64,
    pub commits: u64,
    pub rules: Duration,
    pub commit: Duration,
    pub publish: Duration,
    /// CPU time of the whole process (service and load generator) while
    /// events were sent, where the platform tells it.
    pub cpu: Option<Duration>,
    pub memory: Memory,
}

/// Resident memory of the process (service and load generator), MiB, and
/// live rule instances, at three moments.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub rules: usize,
    /// Every rule loaded (each instantiated once to read its manifest).
    pub loaded_mib: f64,
    /// Right after the load, and the peak during it.
    pub loaded_instances: usize,
    pub after_load_mib: f64,
    pub peak_mib: f64,
    pub after_load_instances: usize,
    /// Once every instance has gone idle and been dropped.
    pub idle_mib: f64,
    pub idle_instances: usize,
    /// The same, once the allocator has returned freed pages (jemalloc
    /// gives back dirty pages after about ten seconds).
    pub settled_mib: f64,
}

/// `VmRSS` and `VmHWM` of this process, MiB (Linux).
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Report {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
        sorted.get(index).copied().unwrap_or_default()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(
            f,
            "events: {} in {:.2} s = {:.0} events/s",
            self.events,
            self.elapsed.as_secs_f64(),
            self.events_per_second()
        )?;
        writeln!(
            f,
            "ack latency per request: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.percentile(0.50)),
            ms(self.percentile(0.99)),
            ms(self.percentile(1.0))
        )?;
        writeln!(
            f,
            "alerts: {}, commits: {} ({:.0} events per commit)",
            self.alerts,
            self.commits,
            self.events as f64 / self.commits.max(1) as f64
        )?;
        if let Some(cpu) = self.cpu {
            writeln!(
                f,
                "cpu: {:.2} s (service and load generator) = {:.2} cores busy, {:.1} µs per event",
                cpu.as_secs_f64(),
                cpu.as_secs_f64() / self.elapsed.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / self.events.max(1) as f64
            )?;
        }
        writeln!(
            f,
            "stages (a group's rules overlap the previous group's commit): rules {:.0} ms, commit {:.0} ms, publish {:.0} ms",
            ms(self.rules),
            ms(self.commit),
            ms(self.publish)
        )?;
        let m = &self.memory;
        write!(
            f,
            "memory with {} rules (RSS of the whole process): loaded {:.0} MiB ({} live instances); after the load {:.0} MiB ({} live), peak {:.0} MiB; all idle {:.0} MiB ({} live), {:.0} MiB 12 s later",
            m.rules,
            m.loaded_mib,
            m.loaded_instances,
            m.after_load_mib,
            m.after_load_instances,
            m.peak_mib,
            m.idle_mib,
            m.idle_instances,
            m.settled_mib
        )
    }
}

/// Seed-like events for `tenants` tenants of five machines each: a random
/// tenant's random machine moves one state on; one event in ten is a test
/// event.
fn bodies(options: &Options) -> Vec<String> {
    const STATES: [&str; 3] = ["stopped", "starting", "running"];
    let mut rng = StdRng::seed_from_u64(7);
    let mut machines = vec![[0usize; 5]; options.tenants];
    let events: Vec<String> = (0..options.events)
        .map(|_| {
            let tenant = rng.random_range(0..options.tenants);
            let client = format!("tenant-{tenant:04}");
            if rng.random_ratio(1, 10) {
                return json!({"eventType": "test-event", "clientId": client}).to_string();
            }
            let machine = rng.random_range(0..5);
            machines[tenant][machine] = (machines[tenant][machine] + 1) % 3;
            json!({
                "eventType": "machineStatusChange",
                "clientId": client,
                "machineId": format!("machine-{:02}", machine + 1),
                "state": STATES[machines[tenant][machine]],
            })
            .to_string()
        })
        .collect();
    events
        .chunks(options.batch_size.max(1))
        .map(|chunk| chunk.join("\n"))
        .collect()
}

/// A service on port 0 in `data_dir` where `tenants` tenants each run
/// `per_tenant` rules, cycling through `rules` (under names of their own
/// past the first round).
fn tenants_config(
    tenants: usize,
    per_tenant: usize,
    max_instances: Option<u32>,
    rules: &BTreeMap<String, PathBuf>,
    data_dir: &Path,
) -> Config {
    let per_tenant = per_tenant.max(1);
    eprintln!("loading {tenants} tenants × {per_tenant} rules…");
    let paths: Vec<&PathBuf> = rules.values().collect();
    Config {
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        data_dir: data_dir.to_owned(),
        // Room for every rule up to the default pool: past it, idle
        // instances make room for the ones called.
        max_instances: max_instances
            .unwrap_or(((tenants * per_tenant + 16) as u32).min(crate::DEFAULT_BENCH_INSTANCES)),
        rules: (0..tenants)
            .flat_map(|t| {
                let paths = paths.clone();
                (0..per_tenant).map(move |r| {
                    let mut entry =
                        RuleEntry::new(format!("tenant-{t:04}"), paths[r % paths.len()].clone());
                    if r >= paths.len() {
                        entry.name = Some(format!("rule-{r}"));
                    }
                    entry
                })
            })
            .collect(),
        ..Config::default()
    }
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    let rules: BTreeMap<String, PathBuf> = tokio::task::spawn_blocking(seed::build_rules)
        .await??
        .into_iter()
        .collect();
    let data = tempfile::tempdir()?;
    let mut config = tenants_config(
        options.tenants,
        options.rules_per_tenant,
        options.max_instances,
        &rules,
        data.path(),
    );
    if let Some(share) = options.fair_share_ms {
        config.fair_share_ms = share;
    }
    let rule_count = config.rules.len();
    let server = Server::start(config, Arc::new(SystemClock)).await?;
    let mut memory = Memory {
        rules: rule_count,
        loaded_mib: rss().0,
        loaded_instances: server.runtime().live_instances(),
        ..Memory::default()
    };
    let url = format!("http://{}/v1/events", server.addr());
    let bodies = bodies(&options);
    eprintln!(
        "sending {} events in {} batches over {} connections…",
        options.events,
        bodies.len(),
        options.connections
    );

    let client = reqwest::Client::new();
    let queue = Arc::new(std::sync::Mutex::new(bodies.into_iter().enumerate()));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.connections.max(1) {
        let (client, url, queue) = (client.clone(), url.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").next();
                let Some((i, body)) = next else { break };
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("idempotency-key", format!("bench-{i}"))
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "batch {i}: {}",
                    response.status()
                );
                response.bytes().await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    (memory.after_load_mib, memory.peak_mib) = rss();
    memory.after_load_instances = server.runtime().live_instances();
    // What the sweeper does to instances unused for their idle time.
    server.runtime().drop_idle_instances(Duration::ZERO);
    memory.idle_mib = rss().0;
    memory.idle_instances = server.runtime().live_instances();
    tokio::time::sleep(Duration::from_secs(12)).await;
    memory.settled_mib = rss().0;
    let stats = server.engine().stats();
    let nanos = |counter: &std::sync::atomic::AtomicU64| {
        Duration::from_nanos(counter.load(Ordering::Relaxed))
    };
    let report = Report {
        events: options.events,
        elapsed,
        latencies,
        alerts: stats.alerts.load(Ordering::Relaxed),
        commits: stats.commits.load(Ordering::Relaxed),
        rules: nanos(&stats.rules_ns),
        commit: nanos(&stats.commit_ns),
        publish: nanos(&stats.publish_ns),
        cpu,
        memory,
    };
    server.stop().await?;
    Ok(report)
}

/// User plus system CPU time of this process so far (Linux: from
/// `/proc/self/stat`, in clock ticks of 10 ms).
fn process_cpu() -> Option<Duration> {
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// What `tocsin bench --distributed` measured: one host of the distributed
/// engine catching up on a stream loaded beforehand.
#[cfg(feature = "aws")]
#[derive(Debug, Clone)]
pub struct DistributedReport {
    pub events: u64,
    pub elapsed: Duration,
    pub alerts: u64,
    pub batches: u64,
    pub bucket_reads: u64,
    pub commits: u64,
    pub lease_requests: u64,
    pub load: Duration,
    pub rules: Duration,
    pub commit: Duration,
    pub publish: Duration,
}

#[cfg(feature = "aws")]
impl std::fmt::Display for DistributedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_k = |n: u64| n as f64 * 1000.0 / self.events.max(1) as f64;
        writeln!(
            f,
            "events: {} in {:.2} s = {:.0} events/s on one host",
            self.events,
            self.elapsed.as_secs_f64(),
            self.events as f64 / self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "alerts: {}, shard batches: {} ({:.0} events per batch)",
            self.alerts,
            self.batches,
            self.events as f64 / self.batches.max(1) as f64
        )?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(
            f,
            "host time: state reads {:.0} ms, rules {:.0} ms, DynamoDB commits {:.0} ms, alert publishing {:.0} ms",
            ms(self.load),
            ms(self.rules),
            ms(self.commit),
            ms(self.publish)
        )?;
        write!(
            f,
            "DynamoDB per 1,000 events: {:.2} requests ({:.2} commits, {:.2} bucket reads); lease protocol: {} requests in all",
            per_k(self.commits + self.bucket_reads),
            per_k(self.commits),
            per_k(self.bucket_reads),
            self.lease_requests
        )
    }
}

/// Load `events` seed-like events of `tenants` tenants onto a fresh stream
/// of `shards` shards, then start one host of the distributed engine and
/// time it until it has processed them all. Needs AWS (or the emulators:
/// `scripts/emulators`).
#[cfg(feature = "aws")]
pub async fn run_distributed(options: Options, shards: i32) -> anyhow::Result<DistributedReport> {
    use tocsin::config::{AlertsBackend, Source, StateBackend};
    let rules: BTreeMap<String, PathBuf> = tokio::task::spawn_blocking(seed::build_rules)
        .await??
        .into_iter()
        .collect();
    let aws = tocsin::aws::sdk_config().await;
    let id = format!("{:08x}", rand::random::<u32>());
    let (events_stream, alerts_stream, table) = (
        format!("bench-events-{id}"),
        format!("bench-alerts-{id}"),
        format!("bench-{id}"),
    );
    tocsin::aws::init(
        &aws,
        Some(&events_stream),
        Some(&table),
        &[&alerts_stream],
        shards,
    )
    .await?;
    let kinesis = aws_sdk_kinesis::Client::new(&aws);
    let lines: Vec<String> = bodies(&Options {
        batch_size: 1,
        ..options.clone()
    });
    eprintln!(
        "loading {} events onto `{events_stream}` ({shards} shards)…",
        lines.len()
    );
    let sink = tocsin::sink::kinesis::KinesisSink::new(
        tocsin::sink::kinesis::SdkWriter(kinesis.clone()),
        &events_stream,
    );
    // The alert sink's batching and retries serve as a producer here; the
    // partition key is what matters: the tenant.
    for chunk in lines.chunks(500) {
        let records: Vec<tocsin::sink::kinesis::Entry> = chunk
            .iter()
            .map(|line| {
                let tenant = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["clientId"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                tocsin::sink::kinesis::Entry {
                    partition_key: tenant,
                    data: line.as_bytes().to_vec(),
                }
            })
            .collect();
        sink.put_entries(records).await?;
    }

    let data = tempfile::tempdir()?;
    let mut config = Config {
        source: Source::Kinesis(events_stream),
        state: StateBackend::Dynamodb(table),
        alerts: AlertsBackend::Kinesis(alerts_stream),
        ..tenants_config(
            options.tenants,
            options.rules_per_tenant,
            options.max_instances,
            &rules,
            data.path(),
        )
    };
    if let Some(share) = options.fair_share_ms {
        config.fair_share_ms = share;
    }
    let catalogue_ready = tocsin::serve::load_catalogue(&config).await?;
    drop(catalogue_ready); // compiled once, cached on disk for the host below
    let started = Instant::now();
    let host = Server::start(config, Arc::new(SystemClock)).await?;
    let engine = host.engine().clone();
    let stats = engine.stats();
    let shards = host.shards().expect("a Kinesis source");
    let total = lines.len() as u64;
    while stats.events.load(Ordering::Relaxed) + shards.bad_records.load(Ordering::Relaxed) < total
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the host did not catch up within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let usage = host.usage().expect("the DynamoDB store");
    let report = DistributedReport {
        events: stats.events.load(Ordering::Relaxed),
        elapsed,
        alerts: stats.alerts.load(Ordering::Relaxed),
        batches: shards.batches.load(Ordering::Relaxed),
        bucket_reads: usage.bucket_reads.load(Ordering::Relaxed),
        commits: usage.commits.load(Ordering::Relaxed),
        lease_requests: usage.lease_requests.load(Ordering::Relaxed),
        load: Duration::from_nanos(stats.load_ns.load(Ordering::Relaxed)),
        rules: Duration::from_nanos(stats.rules_ns.load(Ordering::Relaxed)),
        commit: Duration::from_nanos(stats.commit_ns.load(Ordering::Relaxed)),
        publish: Duration::from_nanos(stats.publish_ns.load(Ordering::Relaxed)),
    };
    host.stop().await?;
    Ok(report)
}
