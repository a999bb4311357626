//! Any source on any store: the pairings the two original deployments did
//! not have. HTTP hosts behind one balancer sharing a DynamoDB table, and
//! one host reading a Kinesis stream with everything on its own disk,
//! killed -9 twice. Both against the emulators (`scripts/emulators`).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tocsin::clock::SystemClock;
use tocsin::config::{Config, DeadLettersBackend, Source, StateBackend};
use tocsin::serve::Server;
use tocsin::store::embedded::EmbeddedStore;
use tocsin::store::{AlertLog, BucketId};
use tocsin_test_support::{self as support, AlertShape};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_http_hosts_on_one_table_give_the_single_host_alerts_and_states() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let rules = seed_rules();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut hosts = Vec::new();
    for dir in &dirs {
        let config = Config {
            source: Source::Http,
            state: StateBackend::Dynamodb(names.table.clone()),
            dead_letters: DeadLettersBackend::File,
            ..config(&names, dir.path(), &rules)
        };
        hosts.push(Server::start(config, Arc::new(SystemClock)).await.unwrap());
    }
    let http = reqwest::Client::new();
    let post = |host: usize, body: String, key: Option<&str>| {
        let mut request = http
            .post(format!("http://{}/v1/events", hosts[host].addr()))
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send()
    };

    // Each event on its own, alternately to either host: every bucket's
    // events reach both, in order.
    let lines = support::seed_events();
    for (i, line) in lines.iter().enumerate() {
        let response = post(i % 2, line.clone(), None).await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let mut want: Vec<AlertShape> = Vec::new();
    for (tenant, rule) in support::SEED_RULES {
        want.extend(support::seed_expected(rule, tenant));
    }
    let alerts = alerts_when(&aws, &names.alerts, want.len(), Duration::from_secs(30)).await;
    assert_eq!(
        by_bucket(alerts.iter().map(shape)),
        by_bucket(want.clone()),
        "the alerts of one host"
    );
    let (_, want_state) = reference(&rules, &lines);
    assert_eq!(stored_states(&aws, &names.table).await, want_state);

    // A request retried on the other host is answered from its receipt,
    // and applied once.
    let test_event = r#"{"eventType":"test-event","clientId":"client-01","n":1}"#;
    let first = post(0, test_event.to_owned(), Some("retried-1"))
        .await
        .unwrap();
    assert_eq!(first.status(), 200, "{:?}", first.text().await);
    let first: serde_json::Value = first.json().await.unwrap();
    let retry = post(1, test_event.to_owned(), Some("retried-1"))
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.json::<serde_json::Value>().await.unwrap(), first);
    // Another key reused for another body is refused, naming it.
    let reused = post(1, lines[0].clone(), Some("retried-1")).await.unwrap();
    assert_eq!(reused.status(), 422);
    // A later event's alert arrives after any the retry could have raised.
    let marker = r#"{"eventType":"test-event","clientId":"client-01","n":2}"#;
    assert_eq!(
        post(1, marker.to_owned(), None).await.unwrap().status(),
        200
    );
    let alerts = alerts_when(&aws, &names.alerts, want.len() + 2, Duration::from_secs(30)).await;
    assert_eq!(
        alerts.len(),
        want.len() + 2,
        "the retried request raised its alert once"
    );
    for host in hosts {
        host.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_on_the_embedded_store_killed_twice_loses_and_repeats_nothing() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let mut tenants: Vec<String> = (1..=6).map(|i| format!("client-{i:02}")).collect();
    let mut lines = fleet_events(&tenants, 900, 11);
    // Last, a machine of a tenant of its own stops: its alert is the last
    // one, so once it arrives every event before it is committed.
    tenants.push("client-last".to_owned());
    for state in ["running", "stopped"] {
        lines.push(
            serde_json::json!({
                "eventType": "machineStatusChange",
                "clientId": "client-last",
                "machineId": "machine-01",
                "state": state,
            })
            .to_string(),
        );
    }
    let rules = fleet_rules(&tenants);
    let (want_alerts, want_state) = reference(&rules, &lines);
    assert_eq!(want_alerts.last().unwrap().0, "client-last");

    let data = tempfile::tempdir().unwrap();
    let spawn = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .arg("--source")
            .arg(format!("kinesis:{}", names.events))
            .args(["--state", "embedded"])
            .arg("--alerts")
            .arg(format!("kinesis:{}", names.alerts))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (tenant, path) in &rules {
            command.arg("--rule").arg(format!("{tenant}={path}"));
        }
        let (child, base) = support::spawn_serve(&mut command);
        Host { child, base }
    };
    let mut host = spawn();
    for (n, chunk) in lines.chunks(100).enumerate() {
        put(&aws, &names.events, chunk).await;
        if n == 2 || n == 6 {
            // Mid-stream, with batches in flight: the next start reads on
            // from the checkpoint its last commit wrote.
            wait_held(&[&host], 1, false, Duration::from_secs(30)).await;
            host.child.kill().unwrap();
            host.child.wait().unwrap();
            host = spawn();
        }
    }
    let alerts = alerts_when(
        &aws,
        &names.alerts,
        want_alerts.len(),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        by_bucket(alerts.iter().map(shape)),
        by_bucket(want_alerts),
        "the alerts of an uninterrupted run, each once, in order per bucket"
    );
    // A graceful stop, then the store as the host left it.
    let pid = host.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(host.child.wait().unwrap().success());
    let store = EmbeddedStore::open(&data.path().join("state.redb")).unwrap();
    let mut states = std::collections::BTreeMap::<BucketId, Vec<u8>>::new();
    for tenant in &tenants {
        states.extend(store.buckets(tenant).unwrap());
    }
    assert_eq!(
        states, want_state,
        "the final state of an uninterrupted run"
    );
}
