//! Containment on one machine (`tocsin serve` in-process, embedded store):
//! a tenant whose rule attacks its sandbox in every way changes nothing of
//! what the other tenants get; the events a rule fails on are found by
//! bisecting and dead-lettered with the reason, the rest applied; a rule
//! that keeps failing is quarantined with backoff, shown in the API and
//! the metrics, and resumed by the operator; its log is readable; dead
//! letters run again through `tocsin replay`. The same over Kinesis and
//! DynamoDB is in `aws.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tocsin::clock::ManualClock;
use tocsin::config::{Config, RuleEntry};
use tocsin::serve::Server;
use tocsin_test_support::{self as support, components};

const ZOO: [(&str, Option<&str>); 17] = support::HOSTILE_ATTACKS;

fn config(data_dir: &Path, hostile: bool) -> Config {
    let mut rules: Vec<RuleEntry> = support::SEED_RULES
        .iter()
        .map(|(tenant, rule)| RuleEntry::new(*tenant, support::seed_component(rule)))
        .collect();
    if hostile {
        rules.push(RuleEntry::new("evil", components::HOSTILE));
        // A second rule of the same tenant: it applies every event.
        rules.push(RuleEntry::new("evil", components::TEST_EVENT));
    }
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        max_instances: 32,
        rules,
        ..Config::default()
    }
}

struct Host {
    server: Server,
    base: String,
    clock: Arc<ManualClock>,
    http: reqwest::Client,
}

impl Host {
    async fn start(config: Config) -> Host {
        let clock = Arc::new(ManualClock::new(1_000));
        let server = Server::start(config, clock.clone())
            .await
            .expect("server starts");
        let base = format!("http://{}", server.addr());
        Host {
            server,
            base,
            clock,
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, lines: &[String], key: &str) -> Value {
        let response = self
            .http
            .post(format!("{}/v1/events", self.base))
            .header("idempotency-key", key)
            .body(lines.join("\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// A tenant's alerts without their place in this host's alert log.
    async fn alerts(&self, tenant: &str) -> Vec<Value> {
        let mut alerts = self
            .get(&format!("/v1/tenants/{tenant}/alerts"))
            .await
            .as_array()
            .unwrap()
            .clone();
        for alert in &mut alerts {
            alert.as_object_mut().unwrap().remove("seq");
        }
        alerts
    }

    async fn dead_letters(&self, tenant: &str) -> Vec<Value> {
        self.get(&format!("/v1/tenants/{tenant}/dead-letters"))
            .await
            .as_array()
            .unwrap()
            .clone()
    }
}

fn attack(name: &str) -> String {
    support::hostile_event(name)
}

/// The seed scenario in requests of ten events; with `hostile`, each
/// request ends with the zoo's next two attacks and a healthy event.
async fn run_seed(host: &Host, hostile: bool) -> Duration {
    let events = support::seed_events();
    let mut worst = Duration::ZERO;
    for (n, chunk) in events.chunks(10).enumerate() {
        let mut lines: Vec<String> = chunk.to_vec();
        if hostile {
            for k in 0..2 {
                lines.push(attack(ZOO[(2 * n + k) % ZOO.len()].0));
            }
            lines.push(attack("none"));
        }
        let started = Instant::now();
        let answer = host.post(&lines, &format!("seed-{n}")).await;
        worst = worst.max(started.elapsed());
        let rejected = answer["rejected"].as_array().unwrap();
        assert!(
            rejected
                .iter()
                .all(|r| r["line"].as_u64().unwrap() > chunk.len() as u64),
            "only the hostile tenant's lines are rejected: {answer}"
        );
    }
    worst
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_tenant_changes_nothing_of_what_the_others_get() {
    let calm_dir = tempfile::tempdir().unwrap();
    let calm = Host::start(config(calm_dir.path(), false)).await;
    let calm_worst = run_seed(&calm, false).await;

    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path(), true)).await;
    let worst = run_seed(&host, true).await;
    eprintln!("worst request: {worst:?} with the hostile tenant, {calm_worst:?} without");

    for tenant in support::CLIENTS {
        let expected = calm.alerts(tenant).await;
        assert!(!expected.is_empty());
        assert_eq!(host.alerts(tenant).await, expected, "{tenant}'s alerts");
        assert_eq!(
            host.get(&format!("/v1/tenants/{tenant}/buckets")).await,
            calm.get(&format!("/v1/tenants/{tenant}/buckets")).await,
            "{tenant}'s states"
        );
    }

    // Each attack that fails is dead-lettered alone, naming why; the rest
    // of its batch (the healthy event beside it) was applied.
    let letters = host.dead_letters("evil").await;
    let seed = support::seed_events();
    let requests = seed.len().div_ceil(10);
    let mut expected = Vec::new();
    for (n, chunk) in seed.chunks(10).enumerate() {
        for k in 0..2 {
            let (_, cause) = ZOO[(2 * n + k) % ZOO.len()];
            if let Some(cause) = cause {
                let line = chunk.len() + 1 + k;
                expected.push((format!("key:seed-{n}:{line}"), cause.to_owned()));
            }
        }
    }
    let got: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l["position"].as_str().unwrap().to_owned(),
                l["cause"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    for letter in &letters {
        assert_eq!(letter["tenant"], "evil");
        assert_eq!(letter["rule"], "hostile");
        assert_eq!(letter["source"], "http");
        assert!(
            letter["reason"]
                .as_str()
                .unwrap()
                .starts_with("rule `hostile@0.1.0` of tenant `evil`"),
            "{letter}"
        );
        let event: Value = serde_json::from_str(letter["event"].as_str().unwrap()).unwrap();
        assert_eq!(event["clientId"], "evil");
    }
    // The healthy events of every request raised their alert.
    let healthy = host
        .alerts("evil")
        .await
        .into_iter()
        .filter(|a| a["rule"] == "hostile" && a["title"] == "healthy")
        .count();
    assert!(healthy >= requests, "{healthy} healthy alerts");
    // The tenant's other rule applied every one of its events.
    let other = host
        .alerts("evil")
        .await
        .into_iter()
        .filter(|a| a["rule"] == "test-event")
        .count();
    assert_eq!(other, 3 * requests);

    // Nothing of this is in the other tenants' dead letters.
    for tenant in support::CLIENTS {
        assert!(host.dead_letters(tenant).await.is_empty());
    }
    // The file is the same records, one per line.
    let file = std::fs::read_to_string(dir.path().join("dead-letters.ndjson")).unwrap();
    assert_eq!(file.lines().count(), letters.len());
    host.server.stop().await.unwrap();
    calm.server.stop().await.unwrap();
}

/// A rule that fails every batch is quarantined after three, its events
/// dead-lettered without a call, visible in the rule, its log and the
/// metrics; the operator's resume runs it again at once; a quarantine that
/// runs out puts it on probation.
#[tokio::test(flavor = "multi_thread")]
async fn a_rule_that_keeps_failing_is_quarantined_with_backoff_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path(), true)).await;
    for n in 0..3 {
        let answer = host
            .post(&[attack("panic"), attack("fail")], &format!("p{n}"))
            .await;
        assert_eq!(answer["rejected"].as_array().unwrap().len(), 2, "{answer}");
    }
    let rule = host.get("/v1/tenants/evil/rules/hostile").await;
    let quarantine = &rule["quarantine"];
    assert_eq!(quarantine["times"], 1, "{rule}");
    assert_eq!(quarantine["failing_batches"], 3);
    assert_eq!(quarantine["until_ms"], 1_000 + 30_000);
    assert!(
        quarantine["reason"]
            .as_str()
            .unwrap()
            .contains("failed: refusing on purpose"),
        "{quarantine}"
    );

    // Quarantined: a healthy event is not run but dead-lettered.
    let answer = host.post(&[attack("none")], "q1").await;
    let reason = answer["rejected"][0]["error"].as_str().unwrap();
    assert!(
        reason.contains("is quarantined until") && reason.contains("an operator can resume it"),
        "{answer}"
    );
    let letters = host.dead_letters("evil").await;
    assert_eq!(letters.last().unwrap()["cause"], "quarantined");
    assert_eq!(letters.len(), 7);
    let (_, metrics) = host.call(reqwest::Method::GET, "/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("tocsin_rule_quarantined{tenant=\"evil\",rule=\"hostile\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tocsin_rule_dead_letters_total{tenant=\"evil\",rule=\"hostile\"} 7"),
        "{metrics}"
    );
    assert!(metrics.contains("tocsin_dead_letters_total{cause=\"quarantined\"} 1"));
    assert!(metrics.contains(
        "tocsin_rule_failures_total{tenant=\"evil\",rule=\"hostile\",cause=\"panic\"} 3"
    ));

    // Its log tells the tenant why, newest last.
    let logs = host.get("/v1/tenants/evil/rules/hostile/logs").await;
    let messages: Vec<&str> = logs
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("panicked") && m.contains("boom on purpose")),
        "{messages:?}"
    );
    assert!(
        messages
            .last()
            .unwrap()
            .starts_with("quarantined until 1970-01-01T00:00:31Z after 3 failing batches"),
        "{messages:?}"
    );

    // The operator resumes it: it runs at once.
    let (status, answer) = host
        .call(
            reqwest::Method::POST,
            "/v1/tenants/evil/rules/hostile/resume",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["was_quarantined"], true);
    let answer = host.post(&[attack("none")], "r1").await;
    assert_eq!(answer["rejected"], json!([]), "{answer}");
    assert!(
        host.get("/v1/tenants/evil/rules/hostile").await["quarantine"].is_null(),
        "a batch that applies clears it"
    );

    // Three more failing batches: quarantined again; once its time is up
    // it runs on probation, and one more failure doubles the backoff.
    for n in 0..3 {
        host.post(&[attack("panic")], &format!("again{n}")).await;
    }
    assert_eq!(
        host.get("/v1/tenants/evil/rules/hostile").await["quarantine"]["times"],
        1
    );
    host.clock.advance(31_000);
    host.post(&[attack("panic")], "probation").await;
    let quarantine = host.get("/v1/tenants/evil/rules/hostile").await["quarantine"].clone();
    assert_eq!(quarantine["times"], 2, "{quarantine}");
    assert_eq!(quarantine["until_ms"], 1_000 + 31_000 + 60_000);

    // A resume for a rule the tenant does not have is a 404.
    let (status, _) = host
        .call(reqwest::Method::POST, "/v1/tenants/evil/rules/nope/resume")
        .await;
    assert_eq!(status, 404);
    host.server.stop().await.unwrap();
}

/// Dead letters run again with `tocsin replay` once the rule is fixed:
/// each against the rule that failed on it only, at its first position.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_run_again_through_replay_against_their_rule_only() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path(), true)).await;
    host.post(&[attack("panic"), attack("none"), attack("loop")], "a")
        .await;
    let letters = host.dead_letters("evil").await;
    assert_eq!(letters.len(), 2);
    host.server.stop().await.unwrap();

    // The "fix": the tenant's `hostile` is now the test-event rule; its
    // other rule already applied these events and must not see them again.
    let replay = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tocsin"))
        .args(["replay", "--events"])
        .arg(dir.path().join("dead-letters.ndjson"))
        .arg("--data-dir")
        .arg(replay.path())
        .arg(format!("--rule=evil/hostile={}", components::TEST_EVENT))
        .arg(format!("--rule=evil/other={}", components::TEST_EVENT))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let alerts: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}\n{stderr}");
    assert!(alerts.iter().all(|a| a["rule"] == "hostile"));
    assert!(
        stderr.contains("events: 2, bad lines: 0, not applied: 0"),
        "{stderr}"
    );
}

/// Events over the size limit are refused with the reason and never reach
/// a rule.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_over_the_size_limit_is_rejected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(Config {
        max_event_bytes: 200,
        ..config(dir.path(), true)
    })
    .await;
    let big = json!({"clientId": "evil", "eventType": "test-event", "pad": "x".repeat(300)});
    let answer = host.post(&[attack("none"), big.to_string()], "big").await;
    assert_eq!(answer["accepted"], 1, "{answer}");
    let error = answer["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("bytes, over the 200-byte limit of one event"),
        "{error}"
    );
    host.server.stop().await.unwrap();
}

/// Bisecting runs the halves in order, each on the state the one before
/// left: the events around a poison one apply as if it were not there.
#[tokio::test(flavor = "multi_thread")]
async fn the_events_around_a_poison_one_apply_in_order_on_the_state_they_leave() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path(), true)).await;
    let lines: Vec<String> = ["none", "none", "panic", "none", "bad-index", "none"]
        .iter()
        .map(|a| attack(a))
        .collect();
    let answer = host.post(&lines, "poison").await;
    let rejected: Vec<u64> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected, [3, 5], "{answer}");
    let keys: Vec<String> = host
        .alerts("evil")
        .await
        .iter()
        .filter(|a| a["rule"] == "hostile")
        .map(|a| a["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys, ["ok-0", "ok-1", "ok-2", "ok-3"]);
    host.server.stop().await.unwrap();
}

/// Many poison events in one batch: each is found and dead-lettered under
/// its own cause and every healthy one beside them applied; past the
/// bisecting budget the rest are dead-lettered as `too_many_failures`,
/// never under a failure they may not cause.
#[tokio::test(flavor = "multi_thread")]
async fn many_poison_events_in_one_batch_are_each_found_within_a_bounded_budget() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path(), true)).await;
    let mut lines = Vec::new();
    for _ in 0..40 {
        lines.push(attack("fail"));
        lines.push(attack("none"));
    }
    let answer = host.post(&lines, "dense").await;
    let rejected = answer["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 40, "{answer}");
    assert!(
        rejected.iter().all(|r| r["line"].as_u64().unwrap() % 2 == 1
            && r["error"]
                .as_str()
                .unwrap()
                .ends_with("failed: refusing on purpose")),
        "{answer}"
    );

    // Over the budget: the healthy event at the end is not blamed.
    let mut lines: Vec<String> = (0..300).map(|_| attack("fail")).collect();
    lines.push(attack("none"));
    host.post(&lines, "flood").await;
    let letters = host.dead_letters("evil").await;
    let last = letters.last().unwrap();
    assert_eq!(last["position"], "key:flood:301");
    assert_eq!(last["cause"], "too_many_failures", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .ends_with("not run: the rule failed 128 calls in this batch already"),
        "{last}"
    );
    host.server.stop().await.unwrap();
}

/// A metric's value in the host's `GET /metrics` text, 0 if absent.
async fn metric(host: &Host, series: &str) -> f64 {
    let text = host
        .http
        .get(format!("{}/metrics", host.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Fair sharing: a tenant whose rule takes seconds over a batch is run
/// apart once its share is up. Another tenant's request, posted while the
/// slow call runs, is answered before it; the slow tenant's event is
/// applied all the same, and the metrics count the part run apart.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_tenant_is_run_apart_and_holds_no_other_tenants_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), true);
    // Slow but legal: one call may spin for seconds.
    config.limits.fuel_per_call = 1 << 42;
    config.limits.deadline_ms = 600_000;
    let host = Arc::new(Host::start(config).await);
    let healthy =
        |n: usize| json!({"clientId": "client-01", "eventType": "test-event", "n": n}).to_string();
    let apart = "tocsin_tenant_parts_apart_total{tenant=\"evil\"}";
    let slow = tokio::spawn({
        let host = host.clone();
        let event = json!({"clientId": "evil", "eventType": "test-event", "attack": "slow", "spin": 3_000_000_000u64});
        async move { host.post(&[event.to_string()], "slow").await }
    });
    // Past its share, the slow call goes on apart (and is counted so).
    while metric(&host, apart).await < 1.0 {
        if slow.is_finished() {
            panic!(
                "the slow call ended without being run apart: {}",
                slow.await.unwrap()
            );
        }
        tokio::task::yield_now().await;
    }
    let answer = host.post(&[healthy(1)], "fast").await;
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert!(
        !slow.is_finished(),
        "the other tenant's request waited for the slow tenant"
    );
    assert!(
        !host.alerts("client-01").await.is_empty(),
        "the other tenant's alert is out"
    );

    let answer = slow.await.unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    let alerts = host.alerts("evil").await;
    assert!(alerts.iter().any(|a| a["title"] == "slow"), "{alerts:?}");
    assert_eq!(metric(&host, apart).await, 1.0);
    assert!(host.dead_letters("evil").await.is_empty());
    Arc::try_unwrap(host)
        .ok()
        .expect("the host is ours again")
        .server
        .stop()
        .await
        .unwrap();
}
