//! What the end-to-end suites against the emulators share: clients, a
//! test's own streams and table, putting and reading records, the
//! reference run of a scenario, and `tocsin serve` processes.

// Each suite uses its own part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tocsin::alert::AlertRecord;
use tocsin::api::Status;
use tocsin::catalogue::{Assignment, StaticCatalogue};
use tocsin::config::{AlertsBackend, Config, DeadLettersBackend, RuleEntry, Source, StateBackend};
use tocsin::event::Incoming;
use tocsin::runtime::{Runtime, RuntimeConfig};
use tocsin::store::BucketId;
use tocsin::store::dynamo::DynamoStore;
use tocsin_test_support::{self as support, AlertShape};

/// Clients, as the emulators see them.
pub struct Aws {
    pub config: aws_config::SdkConfig,
    pub kinesis: aws_sdk_kinesis::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
}

pub async fn aws() -> Aws {
    for var in ["AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL_DYNAMODB"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} is not set: run the suite with ./scripts/test, which starts the Kinesis and DynamoDB emulators"
        );
    }
    let config = tocsin::aws::sdk_config().await;
    Aws {
        kinesis: aws_sdk_kinesis::Client::new(&config),
        dynamodb: aws_sdk_dynamodb::Client::new(&config),
        config,
    }
}

/// The names of one test's resources.
pub struct Names {
    pub events: String,
    pub alerts: String,
    pub dead_letters: String,
    pub table: String,
}

pub async fn setup(aws: &Aws, shards: i32) -> Names {
    let id = format!("{:08x}", rand::random::<u32>());
    let names = Names {
        events: format!("events-{id}"),
        alerts: format!("alerts-{id}"),
        dead_letters: format!("dead-letters-{id}"),
        table: format!("tocsin-{id}"),
    };
    tocsin::aws::init(
        &aws.config,
        Some(&names.events),
        Some(&names.table),
        &[&names.alerts, &names.dead_letters],
        shards,
    )
    .await
    .unwrap();
    names
}

pub fn config(names: &Names, data_dir: &Path, rules: &[(String, String)]) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        max_instances: 64,
        source: Source::Kinesis(names.events.clone()),
        state: StateBackend::Dynamodb(names.table.clone()),
        alerts: AlertsBackend::Kinesis(names.alerts.clone()),
        dead_letters: DeadLettersBackend::Kinesis(names.dead_letters.clone()),
        rules: rules
            .iter()
            .map(|(tenant, path)| RuleEntry::new(tenant.clone(), path))
            .collect(),
        ..Config::default()
    }
}

pub fn seed_rules() -> Vec<(String, String)> {
    support::SEED_RULES
        .iter()
        .map(|(tenant, rule)| (tenant.to_string(), support::seed_component(rule).to_owned()))
        .collect()
}

/// Every tenant runs both machine rules.
pub fn fleet_rules(tenants: &[String]) -> Vec<(String, String)> {
    tenants
        .iter()
        .flat_map(|t| {
            [
                (
                    t.clone(),
                    support::components::ALL_MACHINES_STOPPED.to_owned(),
                ),
                (
                    t.clone(),
                    support::components::ANY_MACHINE_STOPPED.to_owned(),
                ),
            ]
        })
        .collect()
}

/// Machine status changes of `tenants` (5 machines each), random but fixed
/// by `seed`.
pub fn fleet_events(tenants: &[String], n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let states = ["starting", "running", "stopped"];
    (0..n)
        .map(|_| {
            let tenant = &tenants[rng.random_range(0..tenants.len())];
            serde_json::json!({
                "eventType": "machineStatusChange",
                "clientId": tenant,
                "machineId": format!("machine-{:02}", rng.random_range(1..=5)),
                "state": states[rng.random_range(0..3)],
            })
            .to_string()
        })
        .collect()
}

/// Put events in order, partitioned by tenant.
pub async fn put(aws: &Aws, stream: &str, lines: &[String]) {
    for chunk in lines.chunks(100) {
        let entries: Vec<PutRecordsRequestEntry> = chunk
            .iter()
            .map(|line| {
                // Lines that are not events (bad input on purpose) go too.
                let tenant = serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| v["clientId"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "no-tenant".to_owned());
                PutRecordsRequestEntry::builder()
                    .partition_key(tenant)
                    .data(Blob::new(line.as_bytes()))
                    .build()
                    .unwrap()
            })
            .collect();
        let output = aws
            .kinesis
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
            .unwrap();
        assert_eq!(
            output.failed_record_count(),
            Some(0),
            "the emulator took every record"
        );
    }
}

/// Every record of every shard of `stream`, shard by shard in order.
pub async fn read_stream(aws: &Aws, stream: &str) -> Vec<Value> {
    let shards = tocsin::source::kinesis::list_shards(&aws.kinesis, stream)
        .await
        .unwrap();
    let mut records = Vec::new();
    for shard in shards {
        let mut iterator = aws
            .kinesis
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&shard.id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_owned);
        while let Some(it) = iterator {
            let output = aws
                .kinesis
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .unwrap();
            if output.records().is_empty() {
                break;
            }
            for record in output.records() {
                records.push(serde_json::from_slice(record.data().as_ref()).unwrap());
            }
            iterator = output.next_shard_iterator().map(str::to_owned);
        }
    }
    records
}

/// The alerts on the stream, each id once, once there are `count` of them.
pub async fn alerts_when(
    aws: &Aws,
    stream: &str,
    count: usize,
    within: Duration,
) -> Vec<AlertRecord> {
    let started = Instant::now();
    loop {
        let mut seen = HashSet::new();
        let alerts: Vec<AlertRecord> = read_stream(aws, stream)
            .await
            .into_iter()
            .map(|v| serde_json::from_str::<AlertRecord>(&v.to_string()).unwrap())
            .filter(|a| seen.insert(a.id.clone()))
            .collect();
        if alerts.len() >= count || started.elapsed() > within {
            return alerts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Alerts as per-bucket sequences of shapes: the order that must hold.
pub fn by_bucket(
    shapes: impl IntoIterator<Item = AlertShape>,
) -> BTreeMap<(String, String, String), Vec<AlertShape>> {
    let mut buckets: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for shape in shapes {
        buckets
            .entry((shape.0.clone(), shape.1.clone(), shape.2.clone()))
            .or_default()
            .push(shape);
    }
    buckets
}

pub fn shape(alert: &AlertRecord) -> AlertShape {
    let status = serde_json::to_value(alert.status).unwrap();
    (
        alert.tenant.clone(),
        alert.rule.clone(),
        alert.bucket.clone(),
        alert.key.clone(),
        status.as_str().unwrap().to_owned(),
    )
}

/// What one uninterrupted pass of `lines` through the rules gives: alerts
/// and final state per bucket.
pub fn reference(
    rules: &[(String, String)],
    lines: &[String],
) -> (Vec<AlertShape>, BTreeMap<BucketId, Vec<u8>>) {
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 64,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let assignments: Vec<Assignment> = rules
        .iter()
        .map(|(tenant, path)| Assignment::new(tenant.clone(), path))
        .collect();
    let catalogue = StaticCatalogue::load(&runtime, &assignments).unwrap();
    let events: Vec<Incoming> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut event = Incoming::parse(line, "clientId", 0).unwrap();
            event.position = format!("reference:{i}");
            event
        })
        .collect();
    let tenants: std::collections::BTreeSet<String> =
        events.iter().map(|e| e.tenant.clone()).collect();
    // The scratch engine blocks on its own runtime: off the test's.
    std::thread::spawn(move || {
        let scratch = tocsin::engine::Scratch::new(std::sync::Arc::new(catalogue), 0).unwrap();
        let ran = scratch.run(events).unwrap();
        assert!(ran.rejected.is_empty(), "{:?}", ran.rejected);
        let alerts = ran.alerts.iter().map(shape).collect();
        let mut states = BTreeMap::new();
        for tenant in &tenants {
            states.extend(scratch.states(tenant).unwrap());
        }
        (alerts, states)
    })
    .join()
    .unwrap()
}

pub async fn stored_states(aws: &Aws, table: &str) -> BTreeMap<BucketId, Vec<u8>> {
    let store = DynamoStore::new(tocsin::aws::Table::new(aws.dynamodb.clone(), table), "any");
    store
        .scan_buckets()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(id, item)| item.state.map(|s| (id, s.to_vec())))
        .collect()
}

pub async fn status(base: &str) -> Option<Status> {
    let response = reqwest::get(format!("{base}/v1/status")).await.ok()?;
    response.json().await.ok()
}

/// A `tocsin serve` process of the distributed engine.
pub struct Host {
    pub child: Child,
    pub base: String,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_host(names: &Names, data_dir: &Path, rules: &[(String, String)]) -> Host {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--source")
        .arg(format!("kinesis:{}", names.events))
        .arg("--state")
        .arg(format!("dynamodb:{}", names.table))
        .arg("--alerts")
        .arg(format!("kinesis:{}", names.alerts))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (tenant, path) in rules {
        command.arg("--rule").arg(format!("{tenant}={path}"));
    }
    let (child, base) = support::spawn_serve(&mut command);
    Host { base, child }
}

/// Shards held per host (by index), once every shard of `total` is held.
pub async fn held(hosts: &[&Host], total: usize) -> Option<Vec<Vec<String>>> {
    let mut held = Vec::new();
    for host in hosts {
        held.push(status(&host.base).await?.shards);
    }
    let all: HashSet<&String> = held.iter().flatten().collect();
    (all.len() == total && held.iter().map(Vec::len).sum::<usize>() == total).then_some(held)
}

pub async fn wait_held(
    hosts: &[&Host],
    total: usize,
    balanced: bool,
    within: Duration,
) -> (Vec<Vec<String>>, Duration) {
    let started = Instant::now();
    loop {
        if let Some(held) = held(hosts, total).await {
            let counts: Vec<usize> = held.iter().map(Vec::len).collect();
            let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
            if !balanced || spread <= 1 {
                return (held, started.elapsed());
            }
        }
        assert!(
            started.elapsed() < within,
            "shards not spread over the hosts within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
