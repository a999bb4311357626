//! `tocsin serve` as a real process stopped by SIGTERM while clients send
//! batches: it answers what was in flight, exits 0, and nothing answered is
//! lost or applied twice. (`kill -9` mid-run is one of the scenarios both
//! deployments share, in `scenarios.rs`.)

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tocsin_test_support::{self as support};

struct Process {
    child: Child,
    base: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(data_dir: &Path) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (tenant, rule) in support::SEED_RULES {
        command
            .arg("--rule")
            .arg(format!("{tenant}={}", support::seed_component(rule)));
    }
    let (child, base) = support::spawn_serve(&mut command);
    Process { base, child }
}

async fn send(client: &reqwest::Client, base: &str, key: &str, body: &str) -> Result<(), String> {
    let response = client
        .post(format!("{base}/v1/events"))
        .header("idempotency-key", key)
        .body(body.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    assert_eq!(answer["rejected"], serde_json::json!([]), "{answer}");
    Ok(())
}

/// Everything a consumer can observe at the end: each tenant's alerts
/// (identity only: processing times differ between runs) and bucket states.
async fn observe(base: &str) -> (Vec<Value>, Vec<Value>) {
    let mut alerts = Vec::new();
    let mut buckets = Vec::new();
    for tenant in support::CLIENTS {
        let mut after = 0;
        loop {
            let page: Vec<Value> =
                reqwest::get(format!("{base}/v1/tenants/{tenant}/alerts?after={after}"))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
            let Some(last) = page.last() else { break };
            after = last["seq"].as_u64().unwrap();
            for alert in page {
                let keep = ["id", "tenant", "rule", "bucket", "key", "status", "title"];
                alerts.push(
                    keep.iter()
                        .map(|k| (k.to_string(), alert[*k].clone()))
                        .collect(),
                );
            }
        }
        let state: Vec<Value> = reqwest::get(format!("{base}/v1/tenants/{tenant}/buckets"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        buckets.extend(state);
    }
    (alerts, buckets)
}

/// The keys of client-01's alerts, in order.
async fn alert_keys(base: &str) -> Vec<String> {
    let (alerts, _) = observe(base).await;
    alerts
        .iter()
        .filter(|a| a["tenant"] == "client-01")
        .map(|a| a["key"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_batches_and_exits_zero() {
    // One test event per batch: test-event's alert keys count them, so
    // each applied once shows as keys 1..=n in whatever order they came.
    let batches: Vec<(String, String)> = (0..120)
        .map(|i| {
            let body = r#"{"eventType":"test-event","clientId":"client-01"}"#.to_owned();
            (format!("term-{i}"), body)
        })
        .collect();
    let client = reqwest::Client::new();

    // Six clients send; SIGTERM lands while requests are in flight. Each
    // must be answered (and durable) or not applied at all.
    let dir = tempfile::tempdir().unwrap();
    let mut server = spawn(dir.path());
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut senders = Vec::new();
    for lane in 0..6 {
        let (client, base, answered) = (client.clone(), server.base.clone(), answered.clone());
        let mine: Vec<(usize, String, String)> = batches
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 6 == lane)
            .map(|(i, (key, body))| (i, key.clone(), body.clone()))
            .collect();
        senders.push(tokio::spawn(async move {
            for (i, key, body) in mine {
                let ok = send(&client, &base, &key, &body).await.is_ok();
                let _ = answered.send((i, ok, Instant::now()));
                if !ok {
                    break;
                }
            }
        }));
    }
    drop(answered);
    // Once the host is busy answering, signal it.
    let (first, ok, _) = answers.recv().await.expect("a first answer");
    assert!(ok, "batch {first} was answered");
    let signalled = Instant::now();
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut applied = vec![first];
    let mut after_signal = 0;
    while let Some((i, ok, at)) = answers.recv().await {
        if ok {
            applied.push(i);
            after_signal += usize::from(at > signalled);
        }
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tocsin serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        after_signal > 0,
        "requests in flight at the signal were answered"
    );
    assert!(applied.len() < batches.len(), "the signal came mid-run");

    // Everything answered is durable.
    let server = spawn(dir.path());
    let keys = alert_keys(&server.base).await;
    assert!(
        keys.len() >= applied.len(),
        "{} answered, {} applied",
        applied.len(),
        keys.len()
    );
    // Resend what was not answered: each event applied exactly once.
    for (i, (key, body)) in batches.iter().enumerate() {
        if !applied.contains(&i) {
            send(&client, &server.base, key, body).await.unwrap();
        }
    }
    let keys = alert_keys(&server.base).await;
    let want: Vec<String> = (1..=batches.len())
        .map(|n| format!("test-event-{n}"))
        .collect();
    assert_eq!(keys, want, "nothing lost, nothing applied twice");
}
