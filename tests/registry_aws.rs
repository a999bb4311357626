//! The rule registry on the distributed engine, against the emulators:
//! two hosts following one registry in DynamoDB, and components stored in
//! chunks. A suite of its own, so that no other suite's hosts compete for
//! the CPU while it holds the hosts to the 2 s a new version may take to
//! run everywhere.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use tocsin_test_support as support;

use common::*;

/// What `GET …/rules/{rule}` on `base` says this host serves.
async fn serving(base: &str, tenant: &str, rule: &str) -> Option<u64> {
    let response = reqwest::get(format!("{base}/v1/tenants/{tenant}/rules/{rule}"))
        .await
        .ok()?;
    let view: Value = response.json().await.ok()?;
    view["serving"].as_u64()
}

/// A rule uploaded to one host runs on every host of the stream within
/// seconds (each follows the registry in DynamoDB, components in chunked
/// items; the time printed is mostly the second host compiling the
/// component, about 2 s for a 290 KB one in a debug build), and a second
/// version replaces it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_dynamodb_both_run_a_newly_uploaded_version_within_seconds() {
    let aws = aws().await;
    let names = setup(&aws, 2).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = spawn_host(&names, dir_a.path(), &[]);
    let b = spawn_host(&names, dir_b.path(), &[]);
    let http = reqwest::Client::new();
    let upload = |path: &'static str| {
        let (http, base) = (http.clone(), a.base.clone());
        async move {
            let response = http
                .put(format!("{base}/v1/tenants/client-01/rules/stopped"))
                .header("content-type", "application/wasm")
                .body(std::fs::read(path).unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 201);
            let record: Value = response.json().await.unwrap();
            record["version"].as_u64().unwrap()
        }
    };
    let everywhere = |version: u64| {
        let hosts = [a.base.clone(), b.base.clone()];
        async move {
            let answered = Instant::now();
            for base in &hosts {
                while serving(base, "client-01", "stopped").await != Some(version) {
                    assert!(
                        answered.elapsed() < Duration::from_secs(5),
                        "{base} does not serve version {version} within 5 s of the upload"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                eprintln!(
                    "{base} serves version {version} {:?} after the upload",
                    answered.elapsed()
                );
            }
        }
    };
    let v1 = upload(support::components::ANY_MACHINE_STOPPED).await;
    everywhere(v1).await;
    let v2 = upload(support::components::ALL_MACHINES_STOPPED).await;
    assert_eq!(v2, v1 + 1);
    everywhere(v2).await;

    // Events on the stream now meet version 2 on whichever host reads them:
    // all five machines stopped raises one alert for the tenant.
    let lines: Vec<String> = (1..=5)
        .map(|m| {
            serde_json::json!({
                "eventType": "machineStatusChange", "clientId": "client-01",
                "machineId": format!("machine-{m:02}"), "state": "stopped",
            })
            .to_string()
        })
        .collect();
    put(&aws, &names.events, &lines).await;
    let alerts = alerts_when(&aws, &names.alerts, 1, Duration::from_secs(30)).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].rule, "stopped");
    assert_eq!(alerts[0].key, "all-stopped");
    drop((a, b));
}

/// Components bigger than a DynamoDB item are stored in chunks and read
/// back whole; one whose chunks were altered is refused, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_over_one_item_is_stored_in_chunks_and_read_back_whole() {
    use sha2::Digest;
    use tocsin::registry::store::RegistryStore;
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let table = tocsin::aws::Table::new(aws.dynamodb.clone(), &names.table);
    let registry = tocsin::registry::dynamo::DynamoRegistry::new(table);
    let bytes: Vec<u8> = (0..1_000_000u64).map(|i| (i * 7919 % 251) as u8).collect();
    let hash = hex::encode(sha2::Sha256::digest(&bytes));
    registry.put_component(&hash, &bytes).await.unwrap();
    registry.put_component(&hash, &bytes).await.unwrap();
    assert_eq!(
        registry.component(&hash).await.unwrap(),
        Some(bytes.clone())
    );
    assert_eq!(registry.component("0000").await.unwrap(), None);

    let other = hex::encode(sha2::Sha256::digest(b"other"));
    registry.put_component(&other, &bytes).await.unwrap();
    let error = registry.component(&other).await.unwrap_err();
    assert!(
        error.to_string().contains("stored incomplete or altered"),
        "{error}"
    );
}
