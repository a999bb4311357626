//! The sandboxed runtime end to end: the seed rules as real components over
//! the seed scenario, and hostile components stopped with the right typed
//! error while healthy rules go on.

use std::collections::BTreeMap;

use tocsin::alert::AlertRecord;
use tocsin::catalogue::StaticCatalogue;
use tocsin::engine::{Scratch, route};
use tocsin::event::Incoming;
use tocsin::runtime::{Cause, Limits, LoadedRule, Output, RuleError, Runtime, RuntimeConfig};
use tocsin_test_support::{self as support, components};

fn runtime_with(limits: Limits) -> Runtime {
    Runtime::new(RuntimeConfig {
        limits,
        max_instances: 16,
        cache_dir: None,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn runtime() -> Runtime {
    runtime_with(Limits::default())
}

fn load(runtime: &Runtime, tenant: &str, path: &str) -> Result<LoadedRule, RuleError> {
    let wasm = std::fs::read(path).expect("built component");
    runtime.load(tenant, path, &wasm)
}

/// Run every seed event through `rule` (for both clients) in batches of
/// `batch_size` through the engine, state carried from batch to batch, and
/// return each tenant's alerts.
fn run_seed(
    runtime: &Runtime,
    rule: &str,
    batch_size: usize,
) -> BTreeMap<String, Vec<AlertRecord>> {
    let path = support::seed_component(rule);
    let events: Vec<Incoming> = support::seed_events()
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut event = Incoming::parse(line, "clientId", 1_000).unwrap();
            event.position = format!("seed:{}", i + 1);
            event
        })
        .collect();
    let rules = support::CLIENTS
        .iter()
        .map(|tenant| load(runtime, tenant, path).unwrap());
    let catalogue = StaticCatalogue::from_rules(rules).unwrap();
    let scratch = Scratch::new(std::sync::Arc::new(catalogue), 1_000).unwrap();
    let mut alerts: BTreeMap<String, Vec<AlertRecord>> = BTreeMap::new();
    for chunk in events.chunks(batch_size) {
        let ran = scratch.run(chunk.to_vec()).unwrap();
        assert!(ran.rejected.is_empty(), "{rule}: {:?}", ran.rejected);
        for alert in ran.alerts {
            alerts.entry(alert.tenant.clone()).or_default().push(alert);
        }
    }
    alerts
}

/// Alerts per bucket, in order: a batch keeps each bucket's order, not the
/// order across buckets.
fn by_bucket(shapes: Vec<support::AlertShape>) -> BTreeMap<String, Vec<support::AlertShape>> {
    let mut buckets: BTreeMap<String, Vec<support::AlertShape>> = BTreeMap::new();
    for shape in shapes {
        buckets.entry(shape.2.clone()).or_default().push(shape);
    }
    buckets
}

fn shapes(alerts: &[AlertRecord]) -> Vec<support::AlertShape> {
    alerts
        .iter()
        .map(|a| {
            let status = serde_json::to_value(a.status).unwrap();
            (
                a.tenant.clone(),
                a.rule.clone(),
                a.bucket.clone(),
                a.key.clone(),
                status.as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn seed_rules_raise_exactly_the_seed_alerts_at_any_batch_size() {
    let runtime = runtime();
    for batch_size in [1, 7, 100] {
        for rule in ["test-event", "all-machines-stopped", "any-machine-stopped"] {
            let alerts = run_seed(&runtime, rule, batch_size);
            for tenant in support::CLIENTS {
                assert_eq!(
                    by_bucket(shapes(alerts.get(tenant).map_or(&[][..], Vec::as_slice))),
                    by_bucket(support::seed_expected(rule, tenant)),
                    "{rule} for {tenant} at batch size {batch_size}"
                );
            }
        }
    }
}

#[test]
fn the_seed_assignment_alerts_each_client_as_the_prototype_did() {
    let runtime = runtime();
    for (tenant, rule) in support::SEED_RULES {
        let alerts = run_seed(&runtime, rule, 100);
        let mine = &alerts[tenant];
        assert_eq!(
            by_bucket(shapes(mine)),
            by_bucket(support::seed_expected(rule, tenant))
        );
        let firing = mine.first().expect("an alert");
        // any-machine-stopped took the alert lifecycle in 1.1.
        let version = match rule {
            "any-machine-stopped" => "1.1.0",
            _ => "1.0.0",
        };
        assert_eq!(firing.rule_version, version);
        assert_eq!(firing.at, 1_000, "alerts carry the processing time");
    }
}

#[test]
fn alert_ids_are_deterministic_and_unique() {
    let runtime = runtime();
    let first = run_seed(&runtime, "any-machine-stopped", 7);
    let again = run_seed(&runtime, "any-machine-stopped", 7);
    let ids = |alerts: &BTreeMap<String, Vec<AlertRecord>>| -> Vec<String> {
        alerts.values().flatten().map(|a| a.id.clone()).collect()
    };
    assert_eq!(ids(&first), ids(&again), "same input, same ids");
    let mut unique = ids(&first);
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids(&first).len(), "no two alerts share an id");
}

fn event(attack: &str) -> Incoming {
    let line = format!(r#"{{"clientId":"evil","attack":"{attack}"}}"#);
    let mut event = Incoming::parse(&line, "clientId", 0).unwrap();
    event.position = format!("test:{attack}");
    event
}

/// One `evaluate` call of `rule` over `events` as one bucket, on `stored`:
/// the sandbox alone, as the engine calls it.
fn call(
    rule: &LoadedRule,
    events: &[Incoming],
    stored: Option<&[u8]>,
) -> Result<tocsin::runtime::CallOutput, RuleError> {
    let refs: Vec<&Incoming> = events.iter().collect();
    let (buckets, unroutable) = route::route(rule.manifest(), &refs);
    assert!(unroutable.is_empty());
    let bucket = buckets.into_iter().next().expect("one bucket");
    let last = &events[*bucket.members.last().unwrap()].position;
    rule.evaluate(&bucket.key, stored, &bucket.batch, 0, last)
}

/// One call of `rule` over `attacks` in one bucket: the alerts' keys and
/// `instance_calls` details, or the failure.
fn attack(
    rule: &LoadedRule,
    attacks: &[&str],
) -> Result<Vec<(String, serde_json::Value)>, RuleError> {
    let events: Vec<Incoming> = attacks.iter().map(|a| event(a)).collect();
    let output = call(rule, &events, None)?;
    Ok(output
        .alerts
        .iter()
        .map(|a| {
            let detail: serde_json::Value = serde_json::from_str(a.detail).unwrap();
            (a.key.to_owned(), detail["instance_calls"].clone())
        })
        .collect())
}

/// How many alerts one call of `rule` over `events` raised.
fn alert_count(rule: &LoadedRule, events: &[Incoming]) -> usize {
    let output = call(rule, events, None).unwrap_or_else(|e| panic!("{e}"));
    output.alerts.iter().count()
}

fn cause(result: Result<Vec<(String, serde_json::Value)>, RuleError>) -> Cause {
    let error = result.expect_err("the attack must fail");
    assert_eq!(error.tenant, "evil");
    assert_eq!(error.rule, "hostile@0.1.0");
    error.cause
}

#[test]
fn hostile_rules_are_stopped_with_typed_errors_and_healthy_rules_go_on() {
    let limits = Limits::default();
    let runtime = runtime_with(limits.clone());
    let hostile = load(&runtime, "evil", components::HOSTILE).unwrap();
    let healthy = load(&runtime, "client-02", components::ANY_MACHINE_STOPPED).unwrap();

    // The instance is reused across healthy calls…
    assert_eq!(
        attack(&hostile, &["none"]).unwrap(),
        vec![("ok-0".into(), 1.into())]
    );
    assert_eq!(
        attack(&hostile, &["none"]).unwrap(),
        vec![("ok-0".into(), 2.into())]
    );

    let cases: Vec<(&str, Cause)> = vec![
        (
            "loop",
            Cause::OutOfFuel {
                limit: limits.fuel_per_call,
            },
        ),
        (
            "memory",
            Cause::OutOfMemory {
                limit_bytes: limits.memory_bytes,
            },
        ),
        (
            "recursion",
            Cause::StackOverflow {
                limit_bytes: limits.max_wasm_stack,
            },
        ),
        (
            "log",
            Cause::OutputTooLarge {
                what: Output::LogBytes,
                limit: limits.max_log_bytes,
            },
        ),
        (
            "print",
            Cause::OutputTooLarge {
                what: Output::LogBytes,
                limit: limits.max_log_bytes,
            },
        ),
    ];
    for (name, expected) in cases {
        assert_eq!(
            cause(attack(&hostile, &["none", name])),
            expected,
            "attack `{name}`"
        );
        // …and replaced after a trap: a fresh instance counts from 1 again.
        let after = attack(&hostile, &["none"]).unwrap_or_else(|e| panic!("after `{name}`: {e}"));
        assert_eq!(after, vec![("ok-0".into(), 1.into())], "after `{name}`");
    }

    // Too much output is refused after a clean return: no trap, the
    // instance stays (the next call is its fifth since the last trap).
    let too_much = [
        ("state", Output::StateBytes, limits.max_state_bytes),
        ("alerts", Output::Alerts, limits.max_alerts as usize),
        ("alert-bytes", Output::AlertBytes, limits.max_alert_bytes),
    ];
    for (name, what, limit) in too_much {
        assert_eq!(
            cause(attack(&hostile, &[name])),
            Cause::OutputTooLarge { what, limit },
            "attack `{name}`"
        );
    }
    assert_eq!(
        attack(&hostile, &["none"]).unwrap(),
        vec![("ok-0".into(), 5.into())]
    );

    match cause(attack(&hostile, &["panic"])) {
        Cause::Panic { message } => assert!(message.contains("boom on purpose"), "{message}"),
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_eq!(
        attack(&hostile, &["none"]).unwrap(),
        vec![("ok-0".into(), 1.into())]
    );
    assert_eq!(
        cause(attack(&hostile, &["fail"])),
        Cause::Failed("refusing on purpose".into())
    );
    // A rule's own error is not a trap: the instance stays.
    assert_eq!(
        attack(&hostile, &["none"]).unwrap(),
        vec![("ok-0".into(), 3.into())]
    );

    let line = r#"{"clientId":"client-02","eventType":"machineStatusChange","machineId":"m1","state":"stopped"}"#;
    let stopped = Incoming::parse(line, "clientId", 0).unwrap();
    assert_eq!(
        alert_count(&healthy, &[stopped]),
        1,
        "the healthy tenant's rule still alerts"
    );
}

#[test]
fn a_wall_clock_deadline_stops_what_fuel_does_not() {
    let limits = Limits {
        fuel_per_call: u64::MAX / 2,
        deadline_ms: 50,
        ..Limits::default()
    };
    let runtime = runtime_with(limits.clone());
    let hostile = load(&runtime, "evil", components::HOSTILE).unwrap();
    assert_eq!(
        cause(attack(&hostile, &["loop"])),
        Cause::Deadline {
            limit: limits.deadline()
        }
    );
    assert_eq!(
        attack(&hostile, &["none"]).unwrap(),
        vec![("ok-0".into(), 1.into())]
    );
}

#[test]
fn the_sandbox_shows_no_environment_arguments_or_files() {
    let runtime = runtime();
    let hostile = load(&runtime, "evil", components::HOSTILE).unwrap();
    let events = [event("peek")];
    let output = call(&hostile, &events, None).unwrap();
    let alert = output.alerts.iter().next().expect("an alert");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(alert.detail).unwrap(),
        serde_json::json!({"env": 0, "args": 0, "root_dir": false, "etc_passwd": false})
    );
}

#[test]
fn undecodable_state_is_a_bad_state_error() {
    let runtime = runtime();
    let rule = load(&runtime, "client-02", components::ANY_MACHINE_STOPPED).unwrap();
    let line = r#"{"clientId":"client-02","eventType":"machineStatusChange","machineId":"m1","state":"stopped"}"#;
    let stopped = Incoming::parse(line, "clientId", 0).unwrap();
    let error = call(&rule, &[stopped], Some(&[9, 9, 9])).unwrap_err();
    assert_eq!(
        error.cause,
        Cause::BadState("unknown state format 9".into())
    );
    assert_eq!(
        error.to_string(),
        "rule `any-machine-stopped@1.1.0` of tenant `client-02`: cannot read its stored state: unknown state format 9"
    );
}

#[test]
fn components_with_forbidden_imports_or_garbage_are_refused_at_load() {
    let runtime = runtime();
    let error = load(&runtime, "evil", components::FORBIDDEN_IMPORT).unwrap_err();
    assert_eq!(
        error.cause,
        Cause::ForbiddenImport {
            import: "evil:net/exfil".into()
        }
    );
    assert!(
        error
            .to_string()
            .contains("imports `evil:net/exfil`, which rules may not use")
    );

    let error = runtime
        .load("t", "junk.wasm", b"not wasm at all")
        .unwrap_err();
    assert_eq!(error.rule, "junk.wasm");
    assert!(matches!(error.cause, Cause::InvalidComponent(_)), "{error}");
}

#[test]
fn a_replayed_batch_skips_what_each_bucket_already_applied() {
    let runtime = runtime();
    let rule = load(&runtime, "client-01", components::TEST_EVENT).unwrap();
    let events: Vec<Incoming> = (1..=4)
        .map(|seq| {
            let mut event = Incoming::parse(
                r#"{"eventType":"test-event","clientId":"client-01"}"#,
                "clientId",
                0,
            )
            .unwrap();
            event.position = format!("shard-0:{seq}");
            event.seq = tocsin::event::SeqNo::new(&seq.to_string());
            event
        })
        .collect();
    let refs: Vec<&Incoming> = events.iter().collect();
    // The engine's own run over one rule, with the prior its store read.
    let keys = |applied: Option<&str>| -> Vec<String> {
        let (buckets, _) = route::route(rule.manifest(), &refs);
        let prior = tocsin::store::Prior {
            state: None,
            applied: applied.and_then(tocsin::event::SeqNo::new),
        };
        let run = tocsin::engine::run::run_contained(&rule, &refs, buckets, 0, [prior]);
        run.buckets
            .into_iter()
            .flat_map(|b| b.outcome.map(|o| o.alerts).unwrap_or_default())
            .map(|a| a.key)
            .collect()
    };
    assert_eq!(keys(None).len(), 4);
    // Events 1 and 2 were applied before a crash: only 3 and 4 run.
    assert_eq!(keys(Some("2")), ["test-event-1", "test-event-2"]);
    // Everything applied: the bucket is not called at all.
    assert!(keys(Some("4")).is_empty());
}

/// More rules than the pool has instance slots: each rule gets an instance
/// when called, the least recently used idle ones make room, and idle ones
/// are dropped; every rule keeps answering.
#[test]
fn rules_outnumbering_the_instance_pool_all_run_and_idle_instances_are_dropped() {
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 4,
        cache_dir: None,
        // The sweeper stays out of the way: the test drops them itself.
        idle_instance: std::time::Duration::from_secs(3600),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let wasm = std::fs::read(components::TEST_EVENT).unwrap();
    let rules: Vec<LoadedRule> = (0..12)
        .map(|t| {
            runtime
                .load(&format!("tenant-{t}"), "test-event", &wasm)
                .unwrap()
        })
        .collect();
    assert!(
        runtime.live_instances() <= 4,
        "{}",
        runtime.live_instances()
    );
    let event = Incoming::parse(
        r#"{"eventType":"test-event","clientId":"t"}"#,
        "clientId",
        0,
    )
    .unwrap();
    for round in 0..2 {
        for rule in &rules {
            let alerts = alert_count(rule, std::slice::from_ref(&event));
            assert_eq!(alerts, 1, "round {round}, {}", rule.tenant());
            assert!(runtime.live_instances() <= 4);
        }
    }
    assert_eq!(
        runtime.drop_idle_instances(std::time::Duration::from_secs(60)),
        0,
        "none idle that long"
    );
    assert!(runtime.drop_idle_instances(std::time::Duration::ZERO) > 0);
    assert_eq!(runtime.live_instances(), 0);
    assert!(rules.iter().all(|r| !r.is_live()));
    assert_eq!(
        alert_count(&rules[0], std::slice::from_ref(&event)),
        1,
        "started again"
    );
    assert_eq!(runtime.live_instances(), 1);
}

/// Threads starting instances at once never take more slots than the pool
/// has: each reserves its slot before it creates the instance. (Checking
/// for room first and counting after let two threads take the last slot,
/// and one call trapped with "maximum concurrent limit … reached".)
#[test]
fn rules_started_on_many_threads_at_once_share_a_full_pool() {
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: 4,
        cache_dir: None,
        idle_instance: std::time::Duration::from_secs(3600),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let wasm = std::fs::read(components::TEST_EVENT).unwrap();
    let compiled = runtime.compile("test-event", &wasm).unwrap();
    let rules: Vec<LoadedRule> = (0..16)
        .map(|t| {
            runtime
                .instantiate(&format!("tenant-{t}"), &compiled, &Default::default())
                .unwrap()
        })
        .collect();
    let event = Incoming::parse(
        r#"{"eventType":"test-event","clientId":"t"}"#,
        "clientId",
        0,
    )
    .unwrap();
    std::thread::scope(|scope| {
        // As many threads as slots: each holds at most one in a call.
        for worker in 0..4 {
            let (rules, event) = (&rules, &event);
            scope.spawn(move || {
                for round in 0..40 {
                    let rule = &rules[(worker * 7 + round * 3) % rules.len()];
                    if let Err(error) = call(rule, std::slice::from_ref(event), None) {
                        panic!("worker {worker}, round {round}: {error}");
                    }
                }
            });
        }
    });
}
