//! Contract `tocsin:rule@0.2.0` end to end: a sandbox with no clock,
//! randomness or blocking of its own; rules with parameters, run under names
//! of their own; rules written as data (json-rule) agreeing with the Rust
//! seed rules; the native harness agreeing with the host.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tocsin::catalogue::StaticCatalogue;
use tocsin::clock::ManualClock;
use tocsin::config::{Config, RuleEntry};
use tocsin::engine::Scratch;
use tocsin::engine::route;
use tocsin::event::Incoming;
use tocsin::runtime::{Cause, Limits, LoadedRule, RuleError, RuleSettings, Runtime, RuntimeConfig};
use tocsin::sink::writer::WriterSink;
use tocsin::store::{AlertLog, embedded::EmbeddedStore};
use tocsin_rule::testing::Harness;
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

fn load_with(
    runtime: &Runtime,
    tenant: &str,
    path: &str,
    settings: &RuleSettings,
) -> Result<LoadedRule, RuleError> {
    let wasm = std::fs::read(path).expect("built component");
    runtime.load_with(tenant, path, &wasm, settings)
}

fn load(runtime: &Runtime, tenant: &str, path: &str) -> LoadedRule {
    load_with(runtime, tenant, path, &RuleSettings::default()).unwrap()
}

fn params(value: Value) -> RuleSettings {
    RuleSettings {
        name: None,
        params: Some(value),
    }
}

/// Events of `lines` with positions `line-1`, `line-2`… as a file source
/// gives them.
fn events(lines: &[String], arrival: i64) -> Vec<Incoming> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut event = Incoming::parse(line, "clientId", arrival).unwrap();
            event.position = format!("line-{}", i + 1);
            event
        })
        .collect()
}

fn hostile(attack: &str) -> String {
    json!({"clientId": "evil", "attack": attack}).to_string()
}

/// One `evaluate` call of `rule` over `lines` as one bucket, no state
/// stored (the sandbox alone, as the engine calls it): the alerts (key and
/// detail) or the failure.
fn run_once(rule: &LoadedRule, lines: &[String], now: i64) -> Result<Vec<(String, Value)>, Cause> {
    let events = events(lines, now);
    let refs: Vec<&Incoming> = events.iter().collect();
    let (buckets, _) = route::route(rule.manifest(), &refs);
    let bucket = buckets.into_iter().next().expect("one bucket");
    let last = &events[*bucket.members.last().unwrap()].position;
    let output = rule
        .evaluate(&bucket.key, None, &bucket.batch, now, last)
        .map_err(|e| e.cause)?;
    Ok(output
        .alerts
        .iter()
        .map(|a| (a.key.to_owned(), serde_json::from_str(a.detail).unwrap()))
        .collect())
}

const NOW: i64 = 1_795_564_800_000;

/// Quotes of AMZN for client-05 at these prices, a millisecond apart.
fn quotes(prices: &[f64]) -> Vec<String> {
    prices
        .iter()
        .enumerate()
        .map(|(i, price)| {
            json!({"eventType": "quote", "clientId": "client-05", "ticker": "AMZN",
                   "price": price, "time": NOW + i as i64})
            .to_string()
        })
        .collect()
}

#[test]
fn a_rule_that_sleeps_is_stopped_at_once_with_a_typed_error() {
    // A deadline far above the 5 s sleep: only refusing to block stops it.
    let runtime = runtime_with(Limits {
        deadline_ms: 60_000,
        ..Limits::default()
    });
    let rule = load(&runtime, "evil", components::HOSTILE);
    let cause = run_once(&rule, &[hostile("sleep")], NOW).unwrap_err();
    assert!(
        matches!(&cause, Cause::Blocked { what } if what == "a wait of 5s"),
        "{cause:?}"
    );
    assert!(cause.is_trap(), "the instance is replaced");
    assert_eq!(
        cause.to_string(),
        "tried to block (a wait of 5s): a rule may not sleep or wait; ask for a timer instead"
    );
    // The next call runs on a fresh instance.
    let alerts = run_once(&rule, &[hostile("none")], NOW).unwrap();
    assert_eq!(alerts[0].0, "ok-0");
}

#[test]
fn the_guest_clocks_read_the_calls_now() {
    let runtime = runtime();
    let rule = load(&runtime, "evil", components::HOSTILE);
    for now in [NOW, NOW + 61_000] {
        let alerts = run_once(&rule, &[hostile("clock")], now).unwrap();
        assert_eq!(
            alerts[0].1,
            json!({"wall_ms": now, "now": now, "elapsed_ns": 0}),
            "the wall clock reads `now` and the monotonic clock stands still within a call"
        );
    }
}

#[test]
fn random_bytes_follow_the_calls_identity_and_nothing_else() {
    let draw = |runtime: &Runtime, lines: &[String]| {
        let rule = load(runtime, "evil", components::HOSTILE);
        run_once(&rule, lines, NOW).unwrap()
    };
    let lines = vec![hostile("random"), hostile("random")];
    let first = draw(&runtime(), &lines);
    // Another runtime, another instance, another time of day: the same.
    let again = draw(&runtime(), &lines);
    assert_eq!(first, again);
    assert_ne!(
        first[0].1["bytes"], first[1].1["bytes"],
        "two draws in one call differ"
    );
    // The same draw at another position in the source is another call.
    let shifted = draw(&runtime(), &[hostile("none"), hostile("random")]);
    assert_ne!(shifted[1].1["bytes"], first[1].1["bytes"]);
    // std's HashMap seeds come from the instance (tenant, component,
    // parameters), so its iteration order is the same in every replay.
    assert_eq!(first[0].1["order"], again[0].1["order"]);
    assert_eq!(first[0].1["hash"], again[0].1["hash"]);
}

/// `tocsin replay`'s engine over `lines` into a new data directory: the
/// alerts as written, and every tenant's stored states.
async fn replay(config: &Config, lines: &[String]) -> (String, BTreeMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config.clone();
    config.data_dir = dir.path().to_owned();
    config.max_batch_events = 3;
    let sink = Arc::new(WriterSink(std::sync::Mutex::new(Vec::new())));
    let input = std::io::Cursor::new(lines.join("\n").into_bytes());
    tocsin::serve::replay(
        &config,
        input,
        "events",
        Arc::new(ManualClock::new(NOW)),
        None,
        sink.clone(),
        |line, rule, reason| panic!("line {line} ({rule:?}): {reason}"),
    )
    .await
    .unwrap();
    let alerts = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    let mut states = BTreeMap::new();
    for rule in &config.rules {
        for (id, state) in store.buckets(&rule.tenant).unwrap() {
            states.insert(format!("{}/{}/{}", id.tenant, id.rule, id.bucket), state);
        }
    }
    (alerts, states)
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_same_events_twice_gives_byte_identical_alerts_and_states() {
    let config = Config {
        rules: vec![
            RuleEntry::new("evil", components::HOSTILE),
            RuleEntry::new("client-01", components::ALL_MACHINES_STOPPED),
            RuleEntry::new("client-01", components::TEST_EVENT),
            RuleEntry::new("client-02", components::ANY_MACHINE_STOPPED),
        ],
        ..Config::default()
    };
    let mut lines = support::seed_events();
    for (i, attack) in ["random", "clock", "none", "random", "random"]
        .iter()
        .enumerate()
    {
        lines.insert(i * 7, hostile(attack));
    }
    let (alerts, states) = replay(&config, &lines).await;
    let (again, states_again) = replay(&config, &lines).await;
    assert!(alerts.contains("random-0") && alerts.contains("all-stopped"));
    assert_eq!(alerts, again, "alerts differ between two replays");
    assert!(states.keys().any(|k| k.starts_with("evil/hostile/")));
    assert_eq!(states, states_again, "states differ between two replays");
}

#[test]
fn parameters_configure_a_rule_and_bad_ones_are_a_load_error_naming_the_field() {
    let runtime = runtime();
    let moves = quotes(&[100.0, 102.0, 108.0]);
    let default = load(&runtime, "client-05", components::PRICE_CHANGE);
    assert_eq!(run_once(&default, &moves, NOW).unwrap().len(), 2);
    let coarse = load_with(
        &runtime,
        "client-05",
        components::PRICE_CHANGE,
        &params(json!({"threshold_pct": 5})),
    )
    .unwrap();
    assert_eq!(coarse.params(), r#"{"threshold_pct":5}"#);
    let alerts = run_once(&coarse, &moves, NOW).unwrap();
    assert_eq!(alerts.len(), 1, "only the 5.9 % move: {alerts:?}");
    assert_eq!(alerts[0].1["price"], json!(108.0));

    let error = load_with(
        &runtime,
        "client-05",
        components::PRICE_CHANGE,
        &params(json!({"threshold_pct": "five"})),
    )
    .unwrap_err();
    assert!(matches!(error.cause, Cause::BadParams(_)), "{error}");
    assert!(
        error.to_string().starts_with(&format!(
            "rule `{}` of tenant `client-05`: rejected its parameters: `threshold_pct`: invalid type: string \"five\", expected f64",
            components::PRICE_CHANGE
        )),
        "{error}"
    );
    let error = load_with(
        &runtime,
        "client-05",
        components::PRICE_CHANGE,
        &params(json!({"treshold_pct": 5})),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("unknown field `treshold_pct`"),
        "{error}"
    );
}

#[test]
fn a_component_of_another_world_version_is_refused_naming_both() {
    let runtime = runtime();
    let wasm = std::fs::read(components::OLD_WORLD).unwrap();
    let error = runtime.load("t", "old.wasm", &wasm).unwrap_err();
    assert_eq!(
        error.cause,
        Cause::WrongVersion {
            found: "tocsin:rule@0.1.0".into(),
        }
    );
    assert_eq!(
        error.to_string(),
        "rule `old.wasm` of tenant `t`: is built for tocsin:rule@0.1.0; this host runs tocsin:rule@0.2.0 components"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_component_runs_under_two_names_for_one_tenant() {
    let named = |name: &str, threshold: f64| RuleEntry {
        name: Some(name.to_owned()),
        params: Some(json!({"threshold_pct": threshold})),
        ..RuleEntry::new("client-05", components::PRICE_CHANGE)
    };
    let mut config = Config {
        rules: vec![named("small-moves", 1.0), named("big-moves", 5.0)],
        ..Config::default()
    };
    let (alerts, states) = replay(&config, &quotes(&[100.0, 102.0, 108.0])).await;
    let mut by_rule: BTreeMap<String, usize> = BTreeMap::new();
    for line in alerts.lines() {
        let alert: Value = serde_json::from_str(line).unwrap();
        *by_rule
            .entry(alert["rule"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        by_rule,
        BTreeMap::from([("big-moves".to_owned(), 1), ("small-moves".to_owned(), 2)])
    );
    assert_eq!(
        states.keys().collect::<Vec<_>>(),
        ["client-05/big-moves/AMZN", "client-05/small-moves/AMZN"],
        "each name keeps its own buckets"
    );

    // Two rules of one name for one tenant are refused at load.
    let dir = tempfile::tempdir().unwrap();
    config.data_dir = dir.path().to_owned();
    config.rules = vec![named("moves", 1.0), named("moves", 5.0)];
    let error = tocsin::serve::load_catalogue(&config).await.err().unwrap();
    assert!(
        format!("{error:#}").contains(
            "tenant `client-05` has two rules named `moves`: give one a `name` of its own"
        ),
        "{error:#}"
    );
}

/// Run the seed events for `tenant` through `rule` on the engine (batches
/// of 4, state carried): each alert as (bucket, key, status).
fn seed_alerts(rule: LoadedRule, tenant: &str) -> Vec<(String, String, String)> {
    let all = events(&support::seed_events(), NOW);
    let mine: Vec<Incoming> = all.into_iter().filter(|e| e.tenant == tenant).collect();
    let catalogue = StaticCatalogue::from_rules([rule]).unwrap();
    let scratch = Scratch::new(Arc::new(catalogue), NOW).unwrap();
    let mut alerts = Vec::new();
    for chunk in mine.chunks(4) {
        let ran = scratch.run(chunk.to_vec()).unwrap();
        assert!(ran.rejected.is_empty(), "{:?}", ran.rejected);
        for alert in ran.alerts {
            let status = serde_json::to_value(alert.status).unwrap();
            alerts.push((alert.bucket, alert.key, status.as_str().unwrap().to_owned()));
        }
    }
    alerts
}

/// Alerts grouped by what they are about, in order: the Rust rules' bucket
/// (a machine), json-rule's partition (its alert key, before any `#N`).
fn per_subject(
    alerts: Vec<(String, String, String)>,
    subject: impl Fn(&str, &str) -> String,
) -> BTreeMap<String, Vec<String>> {
    let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (bucket, key, status) in alerts {
        grouped
            .entry(subject(&bucket, &key))
            .or_default()
            .push(status);
    }
    grouped
}

#[test]
fn the_seed_rules_written_as_json_rule_parameters_alert_as_the_rust_ones() {
    let runtime = runtime();
    for (tenant, rule) in support::SEED_RULES {
        let rust = load(&runtime, tenant, support::seed_component(rule));
        let data = load_with(
            &runtime,
            tenant,
            components::JSON_RULE,
            &params(support::json_seed_params(rule)),
        )
        .unwrap();
        assert_eq!(data.name(), rule);
        let rust_alerts = seed_alerts(rust, tenant);
        let data_alerts = seed_alerts(data, tenant);
        assert!(!rust_alerts.is_empty(), "{rule} raises alerts on the seed");
        let (rust, data) = match rule {
            // Bucket per machine / partition per machine.
            "any-machine-stopped" => (
                per_subject(rust_alerts, |bucket, _| bucket.to_owned()),
                per_subject(data_alerts, |_, key| key.to_owned()),
            ),
            // One bucket, one alert.
            "all-machines-stopped" => (
                per_subject(rust_alerts, |_, _| "all".to_owned()),
                per_subject(data_alerts, |_, key| key.to_owned()),
            ),
            // One firing alert per test event, keys unique.
            _ => {
                let unique = |alerts: &[(String, String, String)]| {
                    let keys: std::collections::BTreeSet<_> = alerts.iter().map(|a| &a.1).collect();
                    keys.len() == alerts.len()
                };
                assert!(unique(&rust_alerts) && unique(&data_alerts));
                (
                    per_subject(rust_alerts, |_, _| "events".to_owned()),
                    per_subject(data_alerts, |_, _| "events".to_owned()),
                )
            }
        };
        assert_eq!(rust, data, "{rule} for {tenant}");
    }
}

#[test]
fn the_native_harness_agrees_with_the_host_on_what_a_rule_is_handed() {
    let lines: Vec<String> = [
        // RFC 3339 with an offset and fractional seconds; spacing kept in raw.
        r#"{ "eventType": "echo", "clientId": "c", "t": "2026-12-01T10:00:00.250+02:00", "s": "plain", "i": -7, "f": 2.5 }"#,
        // A float epoch time is truncated; nested JSON arrives as written.
        r#"{"eventType":"echo","clientId":"c","t":1795564800123.9,"obj":{ "b" : [1, 2] },"arr":[ true ,null ]}"#,
        // Past i64: a float; escapes undone in strings; a repeated field's last value.
        r#"{"eventType":"echo","clientId":"c","t":0,"big":18446744073709551615,"esc":"tab\there \u00e9 \"q\"","b":false,"b":true,"n":null}"#,
        // Exponent notation of an integral value stays a float.
        r#"{"eventType":"echo","clientId":"c","t":-1000,"i":1e3,"f":-0.0}"#,
    ]
    .map(str::to_owned)
    .to_vec();
    let runtime = runtime();
    let rule = load(&runtime, "c", components::ECHO);
    let host: Vec<(String, Value)> = run_once(&rule, &lines, NOW).unwrap();

    let mut harness = Harness::<echo::Echo>::new();
    harness.set_now(NOW);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let native: Vec<(String, Value)> = harness
        .evaluate_lines("", &refs)
        .unwrap()
        .iter()
        .map(|a| {
            (
                a.key().to_owned(),
                serde_json::from_str(a.detail_json()).unwrap(),
            )
        })
        .collect();
    assert_eq!(host.len(), lines.len());
    for (h, n) in host.iter().zip(&native) {
        assert_eq!(h, n, "host and harness differ");
    }
    // What they agree on is what the contract says.
    assert_eq!(host[0].1["time"], json!(1_796_112_000_250_i64));
    assert_eq!(host[0].1["raw"], json!(lines[0].trim()));
    assert_eq!(host[1].1["time"], json!(1_795_564_800_123_i64));
    assert_eq!(
        host[1].1["fields"]["obj"],
        json!({"json": r#"{ "b" : [1, 2] }"#})
    );
    assert_eq!(
        host[2].1["fields"]["esc"],
        json!({"str": "tab\there é \"q\""})
    );
    assert_eq!(host[2].1["fields"]["b"], json!({"bool": true}));
    assert_eq!(
        host[2].1["fields"]["big"],
        json!({"float": 18_446_744_073_709_551_615_f64.to_bits().to_string()})
    );
    assert_eq!(
        host[3].1["fields"]["i"],
        json!({"float": 1000_f64.to_bits().to_string()})
    );

    // An unreadable event time: the host rejects the event before the rule
    // runs, the harness with the same reason.
    let bad = [r#"{"eventType":"echo","clientId":"c","t":"yesterday"}"#.to_owned()];
    let refused = events(&bad, NOW);
    let (_, unroutable) = route::route(rule.manifest(), &[&refused[0]]);
    let error = harness.evaluate_lines("", &[bad[0].as_str()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("bad event #0: {}", unroutable[0].reason)
    );
    assert_eq!(
        unroutable[0].reason,
        "event-time field `t` is not an RFC 3339 time"
    );
}

#[test]
fn json_rule_parameters_are_checked_at_load() {
    let runtime = runtime();
    let error = load_with(
        &runtime,
        "c",
        components::JSON_RULE,
        &params(
            json!({"evaluate": {"type": "all", "having": {"calc": "latest", "property": "state"}}}),
        ),
    )
    .unwrap_err();
    assert!(matches!(error.cause, Cause::BadParams(_)), "{error}");
    assert!(
        error.to_string().contains("missing field `equals`"),
        "{error}"
    );
}

#[test]
fn a_rule_written_from_the_wit_alone_runs_as_the_sdk_one() {
    let runtime = runtime();
    let sdk = load(&runtime, "client-02", components::ANY_MACHINE_STOPPED);
    let plain = load(&runtime, "client-02", components::PLAIN_WIT);
    assert_eq!(plain.label(), "plain-wit@1.0.0");
    let expected = seed_alerts(sdk, "client-02");
    assert!(!expected.is_empty());
    let again = load(&runtime, "client-02", components::PLAIN_WIT);
    assert_eq!(seed_alerts(again, "client-02"), expected);

    let stopped = [
        json!({"eventType": "machineStatusChange", "clientId": "client-02",
                          "machineId": "m1", "state": "stopped"})
        .to_string(),
    ];
    let alerts = run_once(&plain, &stopped, NOW).unwrap();
    assert_eq!(
        alerts,
        [("stopped".to_owned(), json!({}))],
        "an empty detail is {{}}"
    );
    let error = load_with(
        &runtime,
        "client-02",
        components::PLAIN_WIT,
        &params(json!({"x": 1})),
    )
    .unwrap_err();
    assert_eq!(
        error.cause,
        Cause::BadParams("this rule takes no parameters".into())
    );
}
