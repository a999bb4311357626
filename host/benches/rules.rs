//! Each seed rule as a Wasm component (fuel and epoch on) against the same
//! rule type compiled natively, on the same typed batches, with state encoded
//! and decoded between batches in both; and each seed rule written as
//! json-rule parameters, the same two ways. Criterion reports events/s for
//! each; their ratio is the sandbox's cost.
//!
//! Routing (filter, bucket key, typed batch) is done once up front: it is the
//! host's native work in both cases and is measured by the service benchmark.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tocsin::engine::route::{self as batch, Bucket};
use tocsin::event::Incoming;
use tocsin::runtime::{self, LoadedRule, Metering, Runtime, RuntimeConfig, StateChange};
use tocsin_rule::Rule;
use tocsin_rule::testing::abi;
use tocsin_test_support::{SEED_RULES, seed_component};

const NOW: i64 = 1_795_564_800_000;

/// `n` events of the seed's shape for one tenant: machines cycling through
/// stopped → starting → running → stopped, one in ten a test event.
fn events(n: usize) -> Vec<Incoming> {
    const STATES: [&str; 3] = ["starting", "running", "stopped"];
    (0..n)
        .map(|i| {
            let line = if i % 10 == 9 {
                r#"{"eventType":"test-event","clientId":"client-01"}"#.to_owned()
            } else {
                let machine = (i * 7) % 5 + 1;
                let state = STATES[(i / 5) % 3];
                format!(
                    r#"{{"eventType":"machineStatusChange","clientId":"client-01","machineId":"machine-{machine:02}","state":"{state}"}}"#
                )
            };
            Incoming::parse(&line, "clientId", NOW).unwrap()
        })
        .collect()
}

fn to_native(batch: &runtime::EventBatch) -> abi::EventBatch {
    abi::EventBatch {
        times: batch.times.clone(),
        kinds: batch.kinds.clone(),
        values: batch.values.clone(),
        raw: batch.raw.clone(),
        text: batch.text.clone(),
    }
}

fn apply(states: &mut HashMap<String, Vec<u8>>, bucket: &str, change: StateChange) {
    match change {
        StateChange::Unchanged => {}
        StateChange::Set(bytes) => {
            states.insert(bucket.to_owned(), bytes);
        }
        StateChange::Delete => {
            states.remove(bucket);
        }
    }
}

fn wasm_batch(
    rule: &LoadedRule,
    buckets: &[Bucket],
    states: &mut HashMap<String, Vec<u8>>,
) -> usize {
    let mut alerts = 0;
    for bucket in buckets {
        let state = states.get(&bucket.key).map(Vec::as_slice);
        let out = rule
            .evaluate(&bucket.key, state, &bucket.batch, NOW, "")
            .unwrap();
        alerts += out.alerts.len();
        apply(states, &bucket.key, out.state);
    }
    alerts
}

fn native_batch<R: Rule>(
    prepared: &tocsin_rule::__private::Prepared<R>,
    buckets: &[(String, abi::EventBatch)],
    states: &mut HashMap<String, Vec<u8>>,
) -> usize {
    let mut alerts = 0;
    for (key, batch) in buckets {
        let state = states.get(key).map(Vec::as_slice);
        let outcome =
            tocsin_rule::__private::evaluate::<R>(prepared, key, state, batch, NOW).unwrap();
        alerts += outcome.alerts.status.len();
        match outcome.state {
            abi::StateChange::Unchanged => {}
            abi::StateChange::Set(bytes) => {
                states.insert(key.clone(), bytes);
            }
            abi::StateChange::Delete => {
                states.remove(key);
            }
        }
    }
    alerts
}

fn bench_rule<R: Rule>(c: &mut Criterion, runtime: &Runtime, name: &str) {
    let wasm = std::fs::read(seed_component(name)).unwrap();
    let rule = runtime.load("client-01", name, &wasm).unwrap();
    let (prepared, _) = tocsin_rule::__private::prepared::<R>(Default::default());
    bench_loaded(c, name, &rule, &prepared);
}

/// The seed rule `name` written as json-rule parameters, in the sandbox
/// and natively: rules as data against the same rule in Rust.
fn bench_json_rule(c: &mut Criterion, runtime: &Runtime, name: &str) {
    let params = tocsin_test_support::json_seed_params(name);
    let wasm = std::fs::read(tocsin_test_support::components::JSON_RULE).unwrap();
    let settings = runtime::RuleSettings {
        name: None,
        params: Some(params.clone()),
    };
    let rule = runtime
        .load_with("client-01", "json-rule", &wasm, &settings)
        .unwrap();
    let (prepared, _) =
        tocsin_rule::__private::prepare::<json_rule::JsonRule>(&params.to_string()).unwrap();
    bench_loaded(c, &format!("json-rule/{name}"), &rule, &prepared);
}

fn bench_loaded<R: Rule>(
    c: &mut Criterion,
    name: &str,
    rule: &LoadedRule,
    prepared: &tocsin_rule::__private::Prepared<R>,
) {
    let mut group = c.benchmark_group(name);
    for size in [100usize, 1_000] {
        let events = events(size);
        let refs: Vec<&Incoming> = events.iter().collect();
        let (buckets, _) = batch::route(rule.manifest(), &refs);
        let native: Vec<(String, abi::EventBatch)> = buckets
            .iter()
            .map(|b| (b.key.clone(), to_native(&b.batch)))
            .collect();
        group.throughput(Throughput::Elements(size as u64));
        let mut states = HashMap::new();
        group.bench_function(BenchmarkId::new("wasm", size), |b| {
            b.iter(|| black_box(wasm_batch(rule, &buckets, &mut states)))
        });
        let mut states = HashMap::new();
        group.bench_function(BenchmarkId::new("native", size), |b| {
            b.iter(|| black_box(native_batch::<R>(prepared, &native, &mut states)))
        });
    }
    group.finish();
}

/// The fixed cost of one call: `any-machine-stopped` on one event of a
/// bucket whose state is stored, so the call decodes and encodes state and
/// crosses the boundary with every list, but does little else.
fn bench_call(c: &mut Criterion, runtime: &Runtime) {
    type R = any_machine_stopped::AnyMachineStopped;
    let name = "any-machine-stopped";
    let wasm = std::fs::read(seed_component(name)).unwrap();
    let rule = runtime.load("client-01", name, &wasm).unwrap();
    let (prepared, _) = tocsin_rule::__private::prepared::<R>(Default::default());
    let line = r#"{"eventType":"machineStatusChange","clientId":"client-01","machineId":"machine-01","state":"running"}"#;
    let event = Incoming::parse(line, "clientId", NOW).unwrap();
    let (buckets, _) = batch::route(rule.manifest(), &[&event]);
    let bucket = &buckets[0];
    let native = to_native(&bucket.batch);
    let state = match rule
        .evaluate(&bucket.key, None, &bucket.batch, NOW, "")
        .unwrap()
        .state
    {
        StateChange::Set(bytes) => Some(bytes),
        _ => None,
    };
    let mut group = c.benchmark_group("one-call");
    group.throughput(Throughput::Elements(1));
    group.bench_function("wasm", |b| {
        b.iter(|| {
            black_box(
                rule.evaluate(&bucket.key, state.as_deref(), &bucket.batch, NOW, "")
                    .unwrap(),
            )
        })
    });
    group.bench_function("native", |b| {
        b.iter(|| {
            black_box(
                tocsin_rule::__private::evaluate::<R>(
                    &prepared,
                    &bucket.key,
                    state.as_deref(),
                    &native,
                    NOW,
                )
                .unwrap(),
            )
        })
    });
    group.finish();
}

/// What metering costs: the same rule with fuel and epoch checks compiled
/// out (never done in the service), beside the metered run above.
fn bench_unmetered(c: &mut Criterion) {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        metering: Metering::Off,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut group = c.benchmark_group("unmetered");
    for (_, name) in SEED_RULES {
        let wasm = std::fs::read(seed_component(name)).unwrap();
        let rule = runtime.load("client-01", name, &wasm).unwrap();
        for size in [100usize, 1_000] {
            let events = events(size);
            let refs: Vec<&Incoming> = events.iter().collect();
            let (buckets, _) = batch::route(rule.manifest(), &refs);
            group.throughput(Throughput::Elements(size as u64));
            let mut states = HashMap::new();
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| black_box(wasm_batch(&rule, &buckets, &mut states)))
            });
        }
    }
    group.finish();
}

fn rules(c: &mut Criterion) {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        metering: Metering::Enforced,
        ..RuntimeConfig::default()
    })
    .unwrap();
    bench_call(c, &runtime);
    bench_rule::<test_event::TestEvent>(c, &runtime, "test-event");
    bench_rule::<all_machines_stopped::AllMachinesStopped>(c, &runtime, "all-machines-stopped");
    bench_rule::<any_machine_stopped::AnyMachineStopped>(c, &runtime, "any-machine-stopped");
    for (_, name) in SEED_RULES {
        bench_json_rule(c, &runtime, name);
    }
    bench_unmetered(c);
}

criterion_group!(benches, rules);
criterion_main!(benches);
