//! The end-to-end scenarios every deployment must pass, written once and run
//! through the one engine on both backend sets: embedded (HTTP ingest, redb,
//! alerts file) and distributed (Kinesis and DynamoDB on the emulators that
//! `./scripts/test` starts). Each host is a real `tocsin serve` process.
//!
//! - the seed scenario raises exactly the seed's alerts and leaves the
//!   reference states;
//! - a restart midway gives the same alerts and states as one run;
//! - `kill -9` mid-run, then resending what was not acknowledged (HTTP) or
//!   nothing (Kinesis keeps it), loses and duplicates nothing;
//! - bad input is refused with reasons, never blocking the good events.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tocsin::alert::AlertRecord;
use tocsin::store::BucketId;
use tocsin_test_support::{self as support, AlertShape};

mod common;
use common::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backends {
    /// HTTP ingest, the embedded store, alerts to `alerts.ndjson`.
    Embedded,
    /// A Kinesis stream in, DynamoDB state, a Kinesis stream out.
    Aws,
}

/// A deployment under test: its resources and its one host process.
struct Deployment {
    backends: Backends,
    rules: Vec<(String, String)>,
    data: tempfile::TempDir,
    /// With [`Backends::Aws`].
    aws: Option<(Aws, Names)>,
    host: Option<Child>,
    base: String,
    client: reqwest::Client,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Deployment {
    async fn start(backends: Backends, rules: Vec<(String, String)>) -> Deployment {
        let aws = match backends {
            Backends::Embedded => None,
            Backends::Aws => {
                let aws = aws().await;
                let names = setup(&aws, 2).await;
                Some((aws, names))
            }
        };
        let mut deployment = Deployment {
            backends,
            rules,
            data: tempfile::tempdir().unwrap(),
            aws,
            host: None,
            base: String::new(),
            client: reqwest::Client::new(),
        };
        deployment.spawn();
        deployment
    }

    fn spawn(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.data.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((_, names)) = &self.aws {
            command
                .arg("--source")
                .arg(format!("kinesis:{}", names.events))
                .arg("--state")
                .arg(format!("dynamodb:{}", names.table))
                .arg("--alerts")
                .arg(format!("kinesis:{}", names.alerts))
                .arg("--dead-letters")
                .arg(format!("kinesis:{}", names.dead_letters));
        }
        for (tenant, path) in &self.rules {
            command.arg("--rule").arg(format!("{tenant}={path}"));
        }
        let (child, base) = support::spawn_serve(&mut command);
        self.host = Some(child);
        self.base = base;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.host.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Hand `lines` to the source once: one keyed request over HTTP (`Err`
    /// if it was not acknowledged), records on the events stream.
    async fn send(&self, key: &str, lines: &[String]) -> Result<Value, String> {
        match &self.aws {
            Some((aws, names)) => {
                put(aws, &names.events, lines).await;
                Ok(Value::Null)
            }
            None => {
                let response = self
                    .client
                    .post(format!("{}/v1/events", self.base))
                    .header("idempotency-key", key)
                    .body(lines.join("\n"))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if response.status() != 200 {
                    return Err(format!("status {}", response.status()));
                }
                response.json().await.map_err(|e| e.to_string())
            }
        }
    }

    /// Every alert published so far, each id once, in publishing order.
    /// The alerts file must hold each exactly once; a Kinesis consumer
    /// dedupes a republished outbox by id.
    async fn alerts(&self) -> Vec<AlertRecord> {
        match &self.aws {
            Some((aws, names)) => alerts_when(aws, &names.alerts, 0, Duration::ZERO).await,
            None => {
                let path = self.data.path().join("alerts.ndjson");
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let mut seen = std::collections::HashSet::new();
                text.lines()
                    .map(|line| serde_json::from_str::<AlertRecord>(line).unwrap())
                    .inspect(|alert| {
                        assert!(
                            seen.insert(alert.id.clone()),
                            "{} twice in alerts.ndjson",
                            alert.id
                        )
                    })
                    .collect()
            }
        }
    }

    /// Every dead letter kept so far, each id once: the host's file, or the
    /// dead-letter stream.
    async fn dead_letters(&self) -> Vec<Value> {
        let letters: Vec<Value> = match &self.aws {
            Some((aws, names)) => read_stream(aws, &names.dead_letters).await,
            None => {
                let path = self.data.path().join("dead-letters.ndjson");
                let text = std::fs::read_to_string(path).unwrap_or_default();
                text.lines()
                    .map(|line| serde_json::from_str(line).unwrap())
                    .collect()
            }
        };
        let mut seen = std::collections::HashSet::new();
        letters
            .into_iter()
            .filter(|l| seen.insert(l["id"].as_str().unwrap().to_owned()))
            .collect()
    }

    /// The dead letters once there are `count` (or after 90 s).
    async fn dead_letters_when(&self, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let letters = self.dead_letters().await;
            if letters.len() >= count || Instant::now() > deadline {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The longest batch so far, from `GET /metrics`: the upper bound of
    /// the first `tocsin_batch_seconds` bucket that holds every batch.
    async fn worst_batch(&self) -> String {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("tocsin_batch_seconds_count "))
            .unwrap_or("0")
            .to_owned();
        text.lines()
            .filter_map(|l| l.strip_prefix("tocsin_batch_seconds_bucket{le=\""))
            .filter_map(|l| l.split_once("\"} "))
            .find(|(_, n)| *n == count)
            .map_or_else(
                || "?".to_owned(),
                |(le, _)| format!("≤ {le} s over {count} batches"),
            )
    }

    /// Every stored bucket's state.
    async fn states(&self) -> BTreeMap<BucketId, Vec<u8>> {
        match &self.aws {
            Some((aws, names)) => stored_states(aws, &names.table).await,
            None => {
                let mut states = BTreeMap::new();
                let mut tenants: Vec<&String> = self.rules.iter().map(|(t, _)| t).collect();
                tenants.sort();
                tenants.dedup();
                for tenant in tenants {
                    let url = format!("{}/v1/tenants/{tenant}/buckets", self.base);
                    let buckets: Vec<Value> = self
                        .client
                        .get(url)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    for bucket in buckets {
                        let id = BucketId {
                            tenant: tenant.clone(),
                            rule: bucket["rule"].as_str().unwrap().to_owned(),
                            bucket: bucket["bucket"].as_str().unwrap().to_owned(),
                        };
                        let state = hex_decode(bucket["state"].as_str().unwrap());
                        states.insert(id, state);
                    }
                }
                states
            }
        }
    }

    /// Wait until the alerts and states are what `want` says (the Kinesis
    /// host works behind the producer), then assert they are.
    async fn settles_at(&self, want: &(Vec<AlertShape>, BTreeMap<BucketId, Vec<u8>>), what: &str) {
        self.settles_at_except(want, None, what).await;
    }

    /// [`settles_at`](Self::settles_at), leaving out the alerts and states
    /// of tenant `except`.
    async fn settles_at_except(
        &self,
        want: &(Vec<AlertShape>, BTreeMap<BucketId, Vec<u8>>),
        except: Option<&str>,
        what: &str,
    ) {
        let want_alerts = by_bucket(want.0.clone());
        let deadline = Instant::now() + Duration::from_secs(90);
        let kept = |tenant: &str| Some(tenant) != except;
        loop {
            let alerts = by_bucket(
                self.alerts()
                    .await
                    .iter()
                    .filter(|a| kept(&a.tenant))
                    .map(shape),
            );
            let mut states = self.states().await;
            states.retain(|id, _| kept(&id.tenant));
            if (alerts == want_alerts && states == want.1) || Instant::now() > deadline {
                assert_eq!(alerts, want_alerts, "{:?}: {what}: alerts", self.backends);
                assert_eq!(states, want.1, "{:?}: {what}: states", self.backends);
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// The reference of `lines` through `rules`: alerts and final states.
fn want(
    rules: &[(String, String)],
    lines: &[String],
) -> (Vec<AlertShape>, BTreeMap<BucketId, Vec<u8>>) {
    reference(rules, lines)
}

async fn the_seed_scenario(backends: Backends) {
    let rules = seed_rules();
    let deployment = Deployment::start(backends, rules.clone()).await;
    let seed = support::seed_events();
    deployment.send("seed", &seed).await.unwrap();
    let mut alerts: Vec<AlertShape> = Vec::new();
    for (tenant, rule) in support::SEED_RULES {
        alerts.extend(support::seed_expected(rule, tenant));
    }
    let (reference_alerts, states) = want(&rules, &seed);
    assert_eq!(by_bucket(reference_alerts), by_bucket(alerts.clone()));
    deployment
        .settles_at(&(alerts, states), "exactly the seed's alerts")
        .await;
}

async fn a_restart_midway(backends: Backends) {
    let rules = seed_rules();
    let mut deployment = Deployment::start(backends, rules.clone()).await;
    let seed = support::seed_events();
    let (first, second) = seed.split_at(seed.len() / 2);
    deployment.send("first", first).await.unwrap();
    deployment
        .settles_at(&want(&rules, first), "the first half")
        .await;
    deployment.restart();
    deployment.send("second", second).await.unwrap();
    deployment
        .settles_at(&want(&rules, &seed), "as one uninterrupted run")
        .await;
}

async fn kill_9_mid_run(backends: Backends) {
    let rules = fleet_rules(&["client-01".to_owned(), "client-02".to_owned()]);
    let lines = fleet_events(&["client-01".to_owned(), "client-02".to_owned()], 400, 11);
    let mut deployment = Deployment::start(backends, rules.clone()).await;
    let batches: Vec<&[String]> = lines.chunks(20).collect();
    let mut i = 0;
    let mut kills = 0;
    while i < batches.len() {
        let key = format!("batch-{i}");
        if i % 7 == 3 && kills < 3 {
            // Kill while the batch is in flight (or just answered).
            let request = deployment.send(&key, batches[i]);
            let acknowledged = tokio::select! {
                result = request => result.is_ok(),
                _ = tokio::time::sleep(Duration::from_millis(2)) => false,
            };
            deployment.kill();
            kills += 1;
            deployment.spawn();
            // Over HTTP, resend what was not acknowledged: the key makes it
            // safe. Kinesis kept the records put before the kill.
            if acknowledged || backends == Backends::Aws {
                i += 1;
            }
            continue;
        }
        deployment.send(&key, batches[i]).await.unwrap();
        i += 1;
    }
    assert_eq!(kills, 3);
    deployment
        .settles_at(&want(&rules, &lines), "as one uninterrupted run")
        .await;
}

async fn bad_input_never_blocks_good_events(backends: Backends) {
    let rules = seed_rules();
    let deployment = Deployment::start(backends, rules.clone()).await;
    let good = support::seed_events();
    let mut lines = good.clone();
    for (at, bad) in [
        (2, "not json"),
        (5, r#"{"eventType":"test-event"}"#),
        (9, r#"{"eventType":"test-event","clientId":"client-99"}"#),
        (14, r#"["an","array"]"#),
    ] {
        lines.insert(at, bad.to_owned());
    }
    let answer = deployment.send("mixed", &lines).await.unwrap();
    if backends == Backends::Embedded {
        let lines: Vec<u64> = answer["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["line"].as_u64().unwrap())
            .collect();
        assert_eq!(lines, [3, 6, 10, 15], "{answer}");
    }
    deployment
        .settles_at(&want(&rules, &good), "the good events' alerts")
        .await;
    if let Some(status) = status(&deployment.base).await {
        assert_eq!(status.bad_records, 3, "not JSON, no tenant, not an object");
        assert_eq!(status.unknown_tenant, 1);
    }
    // Over HTTP the producer was told; from a stream nobody can be, so
    // each bad record is kept with the reason.
    let letters = match backends {
        Backends::Embedded => deployment.dead_letters().await,
        Backends::Aws => deployment.dead_letters_when(4).await,
    };
    let mut causes: Vec<(&str, &str)> = letters
        .iter()
        .map(|l| (l["cause"].as_str().unwrap(), l["event"].as_str().unwrap()))
        .collect();
    causes.sort();
    let expected: Vec<(&str, &str)> = match backends {
        Backends::Embedded => Vec::new(),
        Backends::Aws => vec![
            ("malformed", r#"["an","array"]"#),
            ("malformed", "not json"),
            ("no_tenant", r#"{"eventType":"test-event"}"#),
            (
                "unknown_tenant",
                r#"{"eventType":"test-event","clientId":"client-99"}"#,
            ),
        ],
    };
    assert_eq!(causes, expected, "{letters:?}");
    for letter in &letters {
        assert!(
            letter["reason"].as_str().unwrap().len() > 10,
            "a reason: {letter}"
        );
        assert_eq!(letter["rule"], Value::Null);
    }
}

/// A tenant whose rule attacks its sandbox in every way, its events mixed
/// into the same batches as the seed's: the other tenants' alerts and
/// states are exactly the seed's; each attack that fails is dead-lettered
/// alone with its cause (bisected out of its batch); the hostile tenant's
/// healthy events beside them are applied.
async fn a_hostile_tenant_changes_nothing_for_the_others(backends: Backends) {
    let healthy = seed_rules();
    let mut rules = healthy.clone();
    rules.push(("evil".to_owned(), support::components::HOSTILE.to_owned()));
    let deployment = Deployment::start(backends, rules).await;
    let good = support::seed_events();
    let mut lines = Vec::new();
    let mut failing = Vec::new();
    for (i, line) in good.iter().enumerate() {
        lines.push(line.clone());
        let (attack, cause) = support::HOSTILE_ATTACKS[i % support::HOSTILE_ATTACKS.len()];
        lines.push(support::hostile_event(attack));
        lines.push(support::hostile_event("none"));
        if let Some(cause) = cause {
            failing.push(cause);
        }
    }
    for (n, chunk) in lines.chunks(24).enumerate() {
        deployment.send(&format!("zoo-{n}"), chunk).await.unwrap();
    }
    deployment
        .settles_at_except(
            &want(&healthy, &good),
            Some("evil"),
            "the seed's alerts and states, as without the hostile tenant",
        )
        .await;
    let letters = deployment.dead_letters_when(failing.len()).await;
    let mut causes: Vec<&str> = letters
        .iter()
        .map(|l| l["cause"].as_str().unwrap())
        .collect();
    causes.sort();
    failing.sort();
    assert_eq!(causes, failing, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["tenant"], "evil", "{letter}");
        assert_eq!(letter["rule"], "hostile", "{letter}");
        let event: Value = serde_json::from_str(letter["event"].as_str().unwrap()).unwrap();
        assert_ne!(event["attack"], "none", "{letter}");
    }
    let nones = lines
        .iter()
        .filter(|l| l.contains(r#""attack":"none""#))
        .count();
    // Dead letters are kept before their batch commits, its alerts are
    // published after: wait for the last batch's.
    let deadline = Instant::now() + Duration::from_secs(90);
    let healthy_alerts = loop {
        let healthy = deployment
            .alerts()
            .await
            .into_iter()
            .filter(|a| a.tenant == "evil" && a.title == "healthy")
            .count();
        if healthy >= nones || Instant::now() > deadline {
            break healthy;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(healthy_alerts, nones, "every healthy event applied");
    eprintln!(
        "{backends:?}: worst batch {}",
        deployment.worst_batch().await
    );
}

macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backends::Embedded).await;
                }
            )*
        }
        mod aws {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backends::Aws).await;
                }
            )*
        }
    };
}

on_both_backends!(
    the_seed_scenario,
    a_restart_midway,
    kill_9_mid_run,
    bad_input_never_blocks_good_events,
    a_hostile_tenant_changes_nothing_for_the_others,
);
