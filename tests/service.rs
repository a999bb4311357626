//! `tocsin serve` in-process on port 0, over HTTP as a client sees it:
//! idempotent retries, the answer's reasons for bad input, the live alert
//! stream, and the example config. The scenarios every deployment shares
//! (seed, restart, crash, bad input) are in `scenarios.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tocsin::clock::ManualClock;
use tocsin::config::{Config, RuleEntry};
use tocsin::serve::Server;
use tocsin_test_support::{self as support};

fn config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        max_body_bytes: 64 * 1024,
        max_instances: 32,
        rules: support::SEED_RULES
            .iter()
            .map(|(tenant, rule)| RuleEntry::new(*tenant, support::seed_component(rule)))
            .collect(),
        ..Config::default()
    }
}

async fn start(data_dir: &Path) -> (Server, String) {
    let server = Server::start(config(data_dir), Arc::new(ManualClock::new(1_000)))
        .await
        .expect("server starts");
    let base = format!("http://{}", server.addr());
    (server, base)
}

async fn post(base: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/events"))
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(base: &str, path: &str) -> Value {
    let response = reqwest::get(format!("{base}{path}")).await.unwrap();
    assert!(
        response.status().is_success(),
        "GET {path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// Every alert of a tenant, paging through `?after=`.
async fn alerts(base: &str, tenant: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = get(
            base,
            &format!("/v1/tenants/{tenant}/alerts?after={after}&limit=3"),
        )
        .await;
        let page = page.as_array().unwrap().clone();
        let Some(last) = page.last() else { break };
        after = last["seq"].as_u64().unwrap();
        all.extend(page);
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_request_is_applied_once_and_answered_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start(dir.path()).await;
    let body = "{\"eventType\":\"test-event\",\"clientId\":\"client-01\"}\nnot json\n";
    let first = post(&base, body, Some("retry-me")).await;
    assert_eq!(first.0, 200);
    let second = post(&base, body, Some("retry-me")).await;
    assert_eq!(second, first);
    assert_eq!(alerts(&base, "client-01").await.len(), 1, "applied once");
    server.stop().await.unwrap();

    // Also across a restart.
    let (server, base) = start(dir.path()).await;
    assert_eq!(post(&base, body, Some("retry-me")).await, first);
    assert_eq!(alerts(&base, "client-01").await.len(), 1);
    // Without a key, the same body is new input.
    assert_eq!(post(&base, body, None).await.0, 200);
    assert_eq!(alerts(&base, "client-01").await.len(), 2);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_lines_are_rejected_with_reasons_and_good_ones_processed() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start(dir.path()).await;
    let body = [
        r#"{"eventType":"test-event","clientId":"client-01"}"#,
        r#"{"eventType":"test-event","clientId":"client-01""#,
        r#"{"eventType":"test-event"}"#,
        r#"{"eventType":"test-event","clientId":"client-99"}"#,
        "",
        r#"["an","array"]"#,
        r#"{"eventType":"test-event","clientId":"client-01"}"#,
    ]
    .join("\n");
    let (status, answer) = post(&base, &body, None).await;
    assert_eq!(status, 200);
    assert_eq!(answer["accepted"], 2);
    let rejected = answer["rejected"].as_array().unwrap();
    let lines: Vec<u64> = rejected
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 3, 4, 6]);
    let reason = |i: usize| rejected[i]["error"].as_str().unwrap().to_owned();
    assert!(reason(0).starts_with("not valid JSON"), "{}", reason(0));
    assert_eq!(reason(1), "no tenant: field `clientId` is missing");
    assert_eq!(
        reason(2),
        "unknown tenant `client-99`: no rules are configured for it"
    );
    assert_eq!(reason(3), "not a JSON object");
    assert_eq!(
        alerts(&base, "client-01").await.len(),
        2,
        "the good events went through"
    );

    // A JSON array body: elements are the lines.
    let (status, answer) = post(
        &base,
        r#"[{"eventType":"test-event","clientId":"client-01"}, 7]"#,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"accepted": 1, "rejected": [{"line": 2, "error": "not a JSON object"}]})
    );

    let (status, answer) = post(&base, "[not json", None).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("body is not a JSON array"),
        "{answer}"
    );

    let huge = format!(
        "{}\n",
        r#"{"eventType":"test-event","clientId":"client-01"}"#
    )
    .repeat(2_000);
    let (status, _) = post(&base, &huge, None).await;
    assert_eq!(status, 413, "a body over max_body_bytes");
    assert_eq!(
        alerts(&base, "client-01").await.len(),
        3,
        "nothing of the oversized body applied"
    );

    let response = reqwest::Client::new()
        .post(format!("{base}/v1/events"))
        .header("idempotency-key", "x".repeat(300))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn events_a_rule_cannot_apply_are_answered_with_the_rule_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // client-03 reads event time from `time` (flapping); client-04's rule
    // fails its bucket on request (hostile, `"attack": "fail"`).
    for (tenant, path) in [
        ("client-03", support::components::FLAPPING),
        ("client-04", support::components::HOSTILE),
    ] {
        config.rules.push(RuleEntry::new(tenant, path));
    }
    let server = Server::start(config, Arc::new(ManualClock::new(1_000)))
        .await
        .unwrap();
    let base = format!("http://{}", server.addr());
    let body = [
        r#"{"eventType":"machineStatusChange","clientId":"client-03","machineId":"m1","state":"running","time":"2026-12-01T10:00:00Z"}"#,
        r#"{"eventType":"machineStatusChange","clientId":"client-03","machineId":"m1","state":"stopped","time":"yesterday"}"#,
        r#"{"clientId":"client-04","attack":"fail"}"#,
        r#"{"eventType":"test-event","clientId":"client-01"}"#,
    ]
    .join("\n");
    let (status, answer) = post(&base, &body, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({
            "accepted": 2,
            "rejected": [
                {"line": 2, "rule": "flapping",
                 "error": "event-time field `time` is not an RFC 3339 time"},
                {"line": 3, "rule": "hostile",
                 "error": "rule `hostile@0.1.0` of tenant `client-04`: failed: refusing on purpose"},
            ]
        }),
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_that_sleeps_is_refused_and_its_co_tenants_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config
        .rules
        .push(RuleEntry::new("client-04", support::components::HOSTILE));
    // With a deadline far above the rule's 5 s sleep, only the sandbox's
    // refusal to block can answer this request before the sleep is over.
    config.limits.deadline_ms = 60_000;
    let server = Server::start(config, Arc::new(ManualClock::new(1_000)))
        .await
        .unwrap();
    let base = format!("http://{}", server.addr());
    let body = [
        r#"{"clientId":"client-04","attack":"sleep"}"#,
        r#"{"eventType":"test-event","clientId":"client-01"}"#,
    ]
    .join("\n");
    let started = std::time::Instant::now();
    let (status, answer) = post(&base, &body, None).await;
    let answered = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({
            "accepted": 1,
            "rejected": [
                {"line": 1, "rule": "hostile",
                 "error": "rule `hostile@0.1.0` of tenant `client-04`: tried to block (a wait of 5s): a rule may not sleep or wait; ask for a timer instead"},
            ]
        }),
    );
    assert_eq!(alerts(&base, "client-01").await.len(), 1);
    eprintln!("a batch with a sleeping rule was answered in {answered:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_reused_for_another_body_is_refused_with_422() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start(dir.path()).await;
    let first = r#"{"eventType":"test-event","clientId":"client-01"}"#;
    let (status, _) = post(&base, first, Some("k-1")).await;
    assert_eq!(status, 200);
    let other = r#"{"eventType":"test-event","clientId":"client-02"}"#;
    let (status, answer) = post(&base, other, Some("k-1")).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key `k-1` was already used for a different request body"),
        "{answer}"
    );
    assert!(
        alerts(&base, "client-02").await.is_empty(),
        "nothing of it applied"
    );
    // The same body again is still answered from the receipt.
    let (status, answer) = post(&base, first, Some("k-1")).await;
    assert_eq!((status, answer["accepted"].clone()), (200, json!(1)));
    assert_eq!(alerts(&base, "client-01").await.len(), 1);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_stream_live_and_resume_after_a_cursor() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start(dir.path()).await;
    let test_event = r#"{"eventType":"test-event","clientId":"client-01"}"#;
    post(&base, test_event, None).await;

    let response = reqwest::get(format!("{base}/v1/tenants/client-01/alerts/stream?after=0"))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    post(&base, test_event, None).await;
    post(
        &base,
        r#"{"eventType":"test-event","clientId":"client-02"}"#,
        None,
    )
    .await;

    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while text.matches("event: alert").count() < 2 {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("two alerts in time");
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
    }
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(data.len(), 2, "{text}");
    assert_eq!(data[0]["key"], "test-event-1", "replayed from the log");
    assert_eq!(data[1]["key"], "test-event-2", "then live");
    assert!(data.iter().all(|a| a["tenant"] == "client-01"));
    assert!(
        text.contains("id: 1\n") && text.contains("id: 2\n"),
        "{text}"
    );
    drop(stream);
    server.stop().await.unwrap();
}

#[test]
fn the_example_config_parses_and_unknown_keys_are_refused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tocsin.example.toml");
    let config = Config::from_file(&path).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:7878");
    assert_eq!(config.rules.len(), 4);
    assert_eq!(config.limits, tocsin::runtime::Limits::default());
    assert_eq!(config.quotas, tocsin::quota::Quotas::default());
    assert_eq!(config.operator_token, None);
    let flapping = &config.rules[3];
    assert_eq!(flapping.name.as_deref(), Some("any-machine-flapping"));
    assert_eq!(
        flapping.params.as_ref().unwrap()["evaluate"]["having"],
        json!({"calc": "changes", "property": "state", "window": "10m", "threshold": 4}),
        "an inline table arrives as the JSON the rule reads"
    );
    assert!(
        config.rules[0].path.starts_with(path.parent().unwrap()),
        "relative to the file"
    );

    let error = Config::from_toml("listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap_err();
    assert!(error.contains("unknown field `listen_port`"), "{error}");
    let error = Config::from_toml("[limits]\nfuel = 3\n").unwrap_err();
    assert!(error.contains("unknown field `fuel`"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tocsin_simulate_drives_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start(dir.path()).await;
    let target = base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tocsin"))
            .args([
                "simulate", "--target", &target, "--events", "300", "--rate", "3000",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("events sent to"), "{stderr}");
    // Machines cycle through stopped, so client-02's rule fires and resolves.
    let client_02 = alerts(&base, "client-02").await;
    assert!(
        client_02.iter().any(|a| a["status"] == "firing"),
        "{client_02:?}"
    );
    assert!(
        client_02.iter().any(|a| a["status"] == "resolved"),
        "{client_02:?}"
    );
    server.stop().await.unwrap();
}

/// The call deadline holds in the service, not only in the sandbox's own
/// tests: a rule looping with fuel to spare (a tenant granted plenty) is
/// stopped by the wall clock. The service used to drop its runtime after
/// loading the rules, which stopped the clock that advances deadlines.
#[tokio::test(flavor = "multi_thread")]
async fn a_looping_rule_with_fuel_to_spare_is_stopped_by_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.fuel_per_call = u64::MAX / 4;
    config.limits.deadline_ms = 50;
    config
        .rules
        .push(RuleEntry::new("client-04", support::components::HOSTILE));
    let server = Server::start(config, Arc::new(ManualClock::new(1_000)))
        .await
        .unwrap();
    let base = format!("http://{}", server.addr());
    let (status, answer) = post(&base, r#"{"clientId":"client-04","attack":"loop"}"#, None).await;
    assert_eq!(status, 200);
    let error = answer["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("exceeded the deadline of 50ms per call"),
        "{answer}"
    );
    server.stop().await.unwrap();
}

/// `GET /metrics` in the Prometheus text format: per tenant and rule what
/// was applied and what failed and why; host-wide batches and commits.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_each_rules_events_alerts_and_failures_by_cause() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config
        .rules
        .push(RuleEntry::new("client-04", support::components::HOSTILE));
    let server = Server::start(config, Arc::new(ManualClock::new(1_000)))
        .await
        .unwrap();
    let base = format!("http://{}", server.addr());
    let body = [
        r#"{"eventType":"test-event","clientId":"client-01"}"#,
        r#"{"eventType":"test-event","clientId":"client-01"}"#,
        r#"{"clientId":"client-04","attack":"fail"}"#,
        r#"{"clientId":"client-04"}"#,
        r#"{"eventType":"test-event","clientId":"client-99"}"#,
    ]
    .join("\n");
    assert_eq!(post(&base, &body, None).await.0, 200);
    let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
    };
    let client_01 = r#"{tenant="client-01",rule="test-event"}"#;
    assert_eq!(value(&format!("tocsin_rule_events_total{client_01}")), 2.0);
    assert_eq!(value(&format!("tocsin_rule_alerts_total{client_01}")), 2.0);
    assert!(value(&format!("tocsin_rule_fuel_total{client_01}")) > 0.0);
    assert_eq!(
        value(&format!("tocsin_rule_batch_seconds_count{client_01}")),
        1.0
    );
    // client-04's rule failed on one event of its bucket: bisecting
    // dead-letters that one and applies the other.
    assert_eq!(
        value(r#"tocsin_rule_failures_total{tenant="client-04",rule="hostile",cause="failed"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tocsin_rule_events_total{tenant="client-04",rule="hostile"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tocsin_rule_dead_letters_total{tenant="client-04",rule="hostile"}"#),
        1.0
    );
    assert_eq!(value(r#"tocsin_dead_letters_total{cause="failed"}"#), 1.0);
    assert_eq!(value("tocsin_events_total"), 5.0);
    assert_eq!(value("tocsin_unknown_tenant_events_total"), 1.0);
    assert_eq!(value("tocsin_batch_seconds_count"), 1.0);
    assert_eq!(value("tocsin_commit_seconds_count"), 1.0);
    assert_eq!(value("tocsin_registered_rules"), 4.0);
    assert!(text.ends_with("# EOF\n"), "{text}");
    server.stop().await.unwrap();
}
