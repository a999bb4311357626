//! The distributed engine against the Kinesis and DynamoDB emulators that
//! `./scripts/test` starts (kinesis-local, moto): the seed scenario from the
//! events stream to the alerts stream; three `tocsin serve` processes over a
//! 4-shard stream with one killed by SIGKILL; a shard split mid-run; a stale
//! host's write; a partially failed PutRecords; a throttled shard; state
//! over DynamoDB's item limit; a bounded cache; missing resources; HTTP
//! ingest publishing to a Kinesis alerts stream.
//!
//! Every test works in streams and a table of its own, so they run in
//! parallel against the same emulators.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tocsin::alert::AlertRecord;
use tocsin::clock::SystemClock;
use tocsin::config::{AlertsBackend, Config, Source, StateBackend};
use tocsin::event::SeqNo;
use tocsin::runtime::StateChange;
use tocsin::serve::Server;
use tocsin::sink::kinesis::{Entry, KinesisSink, RecordWriter, SdkWriter};
use tocsin::source::leases::Leases;
use tocsin::store::dynamo::DynamoStore;
use tocsin::store::{
    BucketId, BucketWrite, Checkpoint, Commit, Fence, Progress, StateStore, StoreError,
};
use tocsin_test_support::{self as support, AlertShape};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_host_holds_every_shard_reads_nothing_in_steady_state_and_releases_at_stop() {
    let aws = aws().await;
    let names = setup(&aws, 2).await;
    let data = tempfile::tempdir().unwrap();
    let host = Server::start(
        config(&names, data.path(), &seed_rules()),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let base = format!("http://{}", host.addr());

    // (The seed's alerts on both backends: `scenarios.rs`.)
    let seed = support::seed_events();
    put(&aws, &names.events, &seed).await;
    let started = Instant::now();
    let after_first = loop {
        let now = status(&base).await.unwrap();
        if now.events >= seed.len() as u64 {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "seed not processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after_first.events, seed.len() as u64);
    assert_eq!(after_first.shards.len(), 2, "a lone host holds every shard");

    // The simulator's seed events: every bucket is cached now, so steady
    // state reads nothing from DynamoDB, and commits are one per shard batch.
    let usage = host.usage().unwrap();
    let reads_before = usage.bucket_reads.load(Ordering::Relaxed);
    let requests_before = usage.data_requests();
    let more = fleet_events(&["client-01".into(), "client-02".into()], 1000, 3);
    put(&aws, &names.events, &more).await;
    let started = Instant::now();
    while status(&base).await.unwrap().events < (seed.len() + more.len()) as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "simulator events not processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        usage.bucket_reads.load(Ordering::Relaxed),
        reads_before,
        "no bucket reads in steady state"
    );
    let requests = usage.data_requests() - requests_before;
    eprintln!(
        "figures: {requests} DynamoDB requests for {} seed events in steady state ({:.1} per 1,000)",
        more.len(),
        requests as f64 * 1000.0 / more.len() as f64,
    );

    // The metrics name both shards' lag behind the tip and the two leases.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tocsin_leases 2\n"), "{metrics}");
    for shard in &after_first.shards {
        assert!(
            metrics.contains(&format!(
                "tocsin_source_lag_milliseconds{{shard=\"{shard}\"}} "
            )),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains(&format!(
            "tocsin_events_total {}\n",
            seed.len() + more.len()
        )),
        "{metrics}"
    );

    // A graceful stop releases every lease.
    host.stop().await.unwrap();
    let leases = lease_group(
        tocsin::aws::Table::new(aws.dynamodb.clone(), &names.table),
        &names.events,
    );
    let all = leases.list().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|l| l.owner.is_none()), "released: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_share_a_stream_and_a_killed_one_loses_nothing() {
    let aws = aws().await;
    let names = setup(&aws, 4).await;
    let tenants: Vec<String> = (1..=8).map(|i| format!("client-{i:02}")).collect();
    let rules = fleet_rules(&tenants);
    let lines = fleet_events(&tenants, 1200, 7);
    let (want_alerts, want_state) = reference(&rules, &lines);

    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut hosts: Vec<Host> = dirs
        .iter()
        .map(|d| spawn_host(&names, d.path(), &rules))
        .collect();
    let (spread, _) = wait_held(
        &hosts.iter().collect::<Vec<_>>(),
        4,
        true,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        spread.iter().all(|s| !s.is_empty()),
        "every host holds a lease: {spread:?}"
    );

    // Send in steps; kill the busiest host a third of the way through.
    let victim = (0..3).max_by_key(|&i| spread[i].len()).unwrap();
    for (n, chunk) in lines.chunks(100).enumerate() {
        put(&aws, &names.events, chunk).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if n == 4 {
            hosts[victim].child.kill().unwrap();
            hosts[victim].child.wait().unwrap();
            let killed = Instant::now();
            let survivors: Vec<&Host> =
                (0..3).filter(|&i| i != victim).map(|i| &hosts[i]).collect();
            wait_held(&survivors, 4, false, Duration::from_secs(30)).await;
            let failover = killed.elapsed();
            eprintln!(
                "figures: failover after kill -9: {:.1} s",
                failover.as_secs_f64()
            );
            // The README's bound: the lease duration plus three seconds.
            let bound = Duration::from_millis(tocsin::config::DEFAULT_LEASE_MS + 3_000);
            assert!(
                failover <= bound,
                "failover took {failover:?}, over {bound:?}"
            );
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
        "the alerts of an uninterrupted run, in order per bucket"
    );
    let started = Instant::now();
    while stored_states(&aws, &names.table).await != want_state {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "final state differs from an uninterrupted run"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A graceful stop hands its leases over at once.
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let (leaving, staying) = (survivors[0], survivors[1]);
    let stopped = Instant::now();
    let pid = hosts[leaving].child.id().to_string();
    let status_code = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status_code.success());
    wait_held(&[&hosts[staying]], 4, false, Duration::from_secs(30)).await;
    let handover = stopped.elapsed();
    eprintln!(
        "figures: failover after a graceful stop: {:.2} s",
        handover.as_secs_f64()
    );
    // The README's bound: released leases are taken within two seconds.
    assert!(
        handover <= Duration::from_secs(2),
        "handover took {handover:?}, over 2 s"
    );
    let exit = hosts[leaving].child.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");
    hosts.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_split_mid_run_loses_nothing_and_keeps_per_bucket_order() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let tenants: Vec<String> = (1..=4).map(|i| format!("client-{i:02}")).collect();
    let rules = fleet_rules(&tenants);
    let lines = fleet_events(&tenants, 600, 11);
    let (want_alerts, want_state) = reference(&rules, &lines);
    let data = tempfile::tempdir().unwrap();
    let host = Server::start(config(&names, data.path(), &rules), Arc::new(SystemClock))
        .await
        .unwrap();
    let base = format!("http://{}", host.addr());

    let (before, after) = lines.split_at(300);
    put(&aws, &names.events, before).await;
    let parent = tocsin::source::kinesis::list_shards(&aws.kinesis, &names.events)
        .await
        .unwrap()
        .remove(0);
    aws.kinesis
        .split_shard()
        .stream_name(&names.events)
        .shard_to_split(&parent.id)
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .unwrap();
    // Wait for the children.
    let started = Instant::now();
    while tocsin::source::kinesis::list_shards(&aws.kinesis, &names.events)
        .await
        .unwrap()
        .len()
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "split did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put(&aws, &names.events, after).await;

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
        "nothing lost, per-bucket order kept across the split"
    );
    assert_eq!(stored_states(&aws, &names.table).await, want_state);
    let shards = status(&base).await.unwrap().shards;
    assert_eq!(
        shards.len(),
        2,
        "the host moved on to both children: {shards:?}"
    );
    assert!(!shards.contains(&parent.id));
    host.stop().await.unwrap();
}

fn bucket(name: &str) -> BucketId {
    BucketId {
        tenant: "client-01".into(),
        rule: "any-machine-stopped".into(),
        bucket: name.into(),
    }
}

fn write(id: &BucketId, state: &[u8]) -> BucketWrite {
    BucketWrite {
        id: id.clone(),
        state: StateChange::Set(state.to_vec()),
        timer: tocsin::runtime::TimerChange::Keep,
        alerts: Vec::new(),
        ttl_ms: None,
    }
}

fn shard_commit(fence: &Fence, writes: Vec<BucketWrite>, seq: &str) -> Commit {
    Commit {
        writes,
        progress: Progress::shard(
            fence.clone(),
            SeqNo::new(seq).unwrap(),
            Some(Checkpoint::At(SeqNo::new(seq).unwrap())),
        ),
        partition: fence.shard.clone(),
        now_ms: 1_700_000_000_000,
    }
}

/// The leases of `group` in the deployment's table.
fn lease_group(table: tocsin::aws::Table, group: &str) -> Leases {
    Leases::new(Arc::new(DynamoStore::new(table, group)), group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_host_cannot_overwrite_newer_state() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let again = tocsin::aws::init(
        &aws.config,
        Some(&names.events),
        Some(&names.table),
        &[&names.alerts, &names.dead_letters],
        1,
    )
    .await
    .unwrap();
    assert!(
        again.iter().all(|line| line.ends_with("exists")),
        "init is idempotent: {again:?}"
    );
    let table = tocsin::aws::Table::new(aws.dynamodb.clone(), &names.table);
    let leases = lease_group(table.clone(), &names.events);
    assert!(leases.create("shard-x", &[]).await.unwrap());
    assert!(
        !leases.create("shard-x", &[]).await.unwrap(),
        "create is idempotent"
    );

    // Host A holds the lease and writes; it pauses; B takes the lease over
    // and writes newer state.
    let lease = leases.list().await.unwrap().remove(0);
    let epoch_a = leases
        .take(&lease, "host-a")
        .await
        .unwrap()
        .expect("free lease taken");
    let fence = |owner: &str, epoch| Fence {
        stream: names.events.clone(),
        shard: "shard-x".into(),
        owner: owner.into(),
        epoch,
    };
    let id = bucket("machine-01");
    let a = DynamoStore::new(table.clone(), &names.events);
    a.fetch([id.clone()]).await.unwrap();
    a.commit(shard_commit(
        &fence("host-a", epoch_a),
        vec![write(&id, b"a1")],
        "10",
    ))
    .await
    .unwrap();

    let lease = leases.list().await.unwrap().remove(0);
    let epoch_b = leases
        .take(&lease, "host-b")
        .await
        .unwrap()
        .expect("taken over");
    assert!(epoch_b > epoch_a);
    let b = DynamoStore::new(table.clone(), &names.events);
    b.fetch([id.clone()]).await.unwrap();
    assert_eq!(b.cached(&id).unwrap().state.as_deref(), Some(&b"a1"[..]));
    b.commit(shard_commit(
        &fence("host-b", epoch_b),
        vec![write(&id, b"b1")],
        "20",
    ))
    .await
    .unwrap();

    // A wakes up: its write is fenced off, and renewing tells it so.
    let stale = a
        .commit(shard_commit(
            &fence("host-a", epoch_a),
            vec![write(&id, b"a2")],
            "11",
        ))
        .await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    assert!(!leases.renew("shard-x", "host-a", epoch_a).await.unwrap());
    let c = DynamoStore::new(table.clone(), &names.events);
    c.fetch([id.clone()]).await.unwrap();
    let stored = c.cached(&id).unwrap();
    assert_eq!(
        stored.state.as_deref(),
        Some(&b"b1"[..]),
        "B's state survives"
    );
    assert_eq!(stored.applied["shard-x"], SeqNo::new("20").unwrap());
    let lease = leases.list().await.unwrap().remove(0);
    assert_eq!(
        lease.checkpoint.as_deref(),
        Some("20"),
        "the checkpoint is B's"
    );
    assert_eq!(lease.owner.as_deref(), Some("host-b"));

    // Two writers of one bucket under a valid fence: the one that read an
    // older version is told to read again.
    b.commit(shard_commit(
        &fence("host-b", epoch_b),
        vec![write(&id, b"b2")],
        "30",
    ))
    .await
    .unwrap();
    let conflict = c
        .commit(shard_commit(
            &fence("host-b", epoch_b),
            vec![write(&id, b"c1")],
            "31",
        ))
        .await;
    match conflict {
        Err(StoreError::Conflict(ids)) => assert_eq!(ids, vec![id.clone()]),
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

/// PutRecords that fails every other entry of every other call, the way a
/// throttled shard does, and writes the rest for real.
struct Flaky {
    inner: SdkWriter,
    calls: AtomicUsize,
}

impl RecordWriter for Flaky {
    async fn put(&self, stream: &str, entries: &[Entry]) -> Result<Vec<Option<String>>, String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
            return self.inner.put(stream, entries).await;
        }
        let passed: Vec<Entry> = entries.iter().step_by(2).cloned().collect();
        let mut results = self.inner.put(stream, &passed).await?.into_iter();
        Ok((0..entries.len())
            .map(|i| {
                if i % 2 == 0 {
                    results.next().unwrap()
                } else {
                    Some("ProvisionedThroughputExceededException".to_owned())
                }
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partially_failed_put_records_is_retried_without_duplicating_ids() {
    let aws = aws().await;
    let names = setup(&aws, 2).await;
    let flaky = Flaky {
        inner: SdkWriter(aws.kinesis.clone()),
        calls: AtomicUsize::new(0),
    };
    let sink = KinesisSink::new(flaky, &names.alerts);
    let alerts: Vec<AlertRecord> = (0..1200)
        .map(|i| AlertRecord {
            id: format!("alert-{i:04}"),
            fingerprint: format!("{i:016x}"),
            tenant: format!("client-{:02}", i % 7),
            rule: "test-event".into(),
            rule_version: "1.0.0".into(),
            bucket: String::new(),
            key: format!("test-event-{i}"),
            status: tocsin::alert::Status::Firing,
            severity: tocsin::alert::Severity::Info,
            title: "test event received".into(),
            detail: tocsin::alert::Detail::from_value(&serde_json::json!({ "n": i })),
            at: 0,
            seq: None,
            silenced_by: None,
        })
        .collect();
    sink.put(&alerts).await.unwrap();

    let records = read_stream(&aws, &names.alerts).await;
    let mut ids: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *ids.entry(record["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(ids.len(), 1200, "every alert arrived");
    assert!(ids.values().all(|&n| n == 1), "no id twice");
    assert_eq!(records.len(), 1200);
}

/// Sits between a client and kinesis-local and answers the first
/// `throttle` GetRecords calls the way a throttled shard does.
struct Throttler {
    upstream: String,
    throttle: usize,
    get_records: AtomicUsize,
    http: reqwest::Client,
}

async fn throttling_proxy(throttler: Arc<Throttler>) -> String {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;

    async fn forward(
        axum::extract::State(t): axum::extract::State<Arc<Throttler>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        let target = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if target.ends_with(".GetRecords")
            && t.get_records.fetch_add(1, Ordering::SeqCst) < t.throttle
        {
            let body = r#"{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard"}"#;
            return (
                StatusCode::BAD_REQUEST,
                [("content-type", "application/x-amz-json-1.1")],
                body,
            )
                .into_response();
        }
        let mut request = t.http.post(&t.upstream).body(body);
        for (name, value) in &headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/x-amz-json-1.1")
            .to_owned();
        let bytes = response.bytes().await.unwrap();
        (status, [("content-type", content_type)], bytes).into_response()
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(axum::routing::post(forward))
        .with_state(throttler);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_shard_is_read_after_backing_off() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let seed = support::seed_events();
    put(&aws, &names.events, &seed).await;

    // More throttled calls in a row than the SDK's own retries absorb, so
    // the reader's backoff has to carry it.
    let throttler = Arc::new(Throttler {
        upstream: std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap(),
        throttle: 6,
        get_records: AtomicUsize::new(0),
        http: reqwest::Client::new(),
    });
    let proxy = throttling_proxy(throttler.clone()).await;
    let client = aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&aws.config)
            .endpoint_url(proxy)
            .build(),
    );
    let shard = tocsin::source::kinesis::list_shards(&client, &names.events)
        .await
        .unwrap()
        .remove(0);
    let mut reader =
        tocsin::source::kinesis::ShardReader::open(client, &names.events, &shard.id, None)
            .await
            .unwrap();
    let mut records = Vec::new();
    while records.len() < seed.len() {
        records.extend(reader.next().await.expect("throttling is retried").records);
    }
    let read: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8(r.data().as_ref().to_vec()).unwrap())
        .collect();
    assert_eq!(read, seed, "every record, in order");
    assert!(throttler.get_records.load(Ordering::SeqCst) > 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_over_the_item_limit_is_a_rule_error_and_other_tenants_go_on() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let data = tempfile::tempdir().unwrap();
    let rules = vec![
        ("evil".to_owned(), support::components::HOSTILE.to_owned()),
        (
            "client-01".to_owned(),
            support::components::TEST_EVENT.to_owned(),
        ),
    ];
    let mut config = config(&names, data.path(), &rules);
    // The sandbox would allow 1 MiB; DynamoDB's item limit does not.
    config.limits.max_state_bytes = 1 << 20;
    let host = Server::start(config, Arc::new(SystemClock)).await.unwrap();
    let base = format!("http://{}", host.addr());
    put(
        &aws,
        &names.events,
        &[
            r#"{"clientId":"evil","attack":"state"}"#.to_owned(),
            r#"{"clientId":"client-01","eventType":"test-event"}"#.to_owned(),
        ],
    )
    .await;
    let alerts = alerts_when(&aws, &names.alerts, 1, Duration::from_secs(60)).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].tenant, "client-01");
    let status = status(&base).await.unwrap();
    assert_eq!(status.rule_failures, 1, "{status:?}");
    let states = stored_states(&aws, &names.table).await;
    assert!(
        states.keys().all(|id| id.tenant != "evil"),
        "the oversized state was not stored: {:?}",
        states.keys().collect::<Vec<_>>()
    );
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_its_stream_says_what_is_missing() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let missing = Names {
        events: format!("{}-missing", names.events),
        alerts: names.alerts.clone(),
        dead_letters: names.dead_letters.clone(),
        table: names.table.clone(),
    };
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tocsin"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--source")
        .arg(format!("kinesis:{}", missing.events))
        .arg("--state")
        .arg(format!("dynamodb:{}", missing.table))
        .arg("--rule")
        .arg(format!("client-01={}", support::components::TEST_EVENT))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "Kinesis stream `{}` does not exist: create it with `tocsin aws init`",
            missing.events
        )),
        "{stderr}"
    );

    // A host of the stream points producers there.
    let host = Server::start(
        config(&names, data.path(), &seed_rules()),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/events", host.addr()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains(&names.events));
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_cache_drops_buckets_and_rereads_them_when_needed() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let (table, fence) = held_shard(&aws, &names).await;
    let ids: Vec<BucketId> = (1..=5)
        .map(|m| bucket(&format!("machine-{m:02}")))
        .collect();
    let store = DynamoStore::with_cache(table.clone(), &names.events, 2);
    for (n, id) in ids.iter().enumerate() {
        store.fetch([id.clone()]).await.unwrap();
        assert!(store.cached_len() <= 2, "the cache stays bounded");
        store
            .commit(shard_commit(
                &fence,
                vec![write(id, b"v1")],
                &(n + 1).to_string(),
            ))
            .await
            .unwrap();
    }
    // machine-01 was dropped long ago: reading it again finds its state.
    store.fetch([ids[0].clone()]).await.unwrap();
    let item = store.cached(&ids[0]).unwrap();
    assert_eq!(item.state.as_deref(), Some(&b"v1"[..]));
    assert_eq!(item.version, 1);
    store
        .commit(shard_commit(&fence, vec![write(&ids[0], b"v2")], "10"))
        .await
        .unwrap();
    let states = stored_states(&aws, &names.table).await;
    assert_eq!(states.len(), 5);
    assert_eq!(states[&ids[0]], b"v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_publishes_its_alerts_to_a_kinesis_stream() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let data = tempfile::tempdir().unwrap();
    let config = Config {
        source: Source::Http,
        state: StateBackend::Embedded,
        ..config(&names, data.path(), &seed_rules())
    };
    assert_eq!(config.alerts, AlertsBackend::Kinesis(names.alerts.clone()));
    let host = Server::start(config, Arc::new(SystemClock)).await.unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/events", host.addr()))
        .body(support::seed_events().join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut want: Vec<AlertShape> = Vec::new();
    for (tenant, rule) in support::SEED_RULES {
        want.extend(support::seed_expected(rule, tenant));
    }
    // Published while the host runs, not only after a restart.
    let alerts = alerts_when(&aws, &names.alerts, want.len(), Duration::from_secs(30)).await;
    assert_eq!(
        by_bucket(alerts.iter().map(shape)),
        by_bucket(want),
        "the seed's alerts on the alerts stream"
    );
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_why_alerts_wait_in_the_outbox_until_they_can_be_published() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let data = tempfile::tempdir().unwrap();
    let later = format!("{}-later", names.alerts);
    let config = Config {
        source: Source::Http,
        state: StateBackend::Embedded,
        alerts: AlertsBackend::Kinesis(later.clone()),
        ..config(&names, data.path(), &seed_rules())
    };
    let host = Server::start(config, Arc::new(SystemClock)).await.unwrap();
    let base = format!("http://{}", host.addr());
    let client = reqwest::Client::new();
    let ready = || async {
        let response = client.get(format!("{base}/readyz")).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    // The alerts stream does not exist yet: the event is applied and
    // answered at once; its alert waits, and readiness says why.
    let post = |body: &'static str| {
        let request = client.post(format!("{base}/v1/events")).body(body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["accepted"], 1, "{answer}");
        }
    };
    post(r#"{"eventType":"test-event","clientId":"client-01"}"#).await;
    let started = Instant::now();
    let (status, reason) = loop {
        let (status, reason) = ready().await;
        if status != 200 || started.elapsed() > Duration::from_secs(90) {
            break (status, reason);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503, "{reason}");
    assert!(
        reason.contains("alerts cannot be published (they wait in the outbox)"),
        "{reason}"
    );

    // Once the stream exists, the next batch publishes both, in order.
    tocsin::aws::init(
        &aws.config,
        Some(&names.events),
        Some(&names.table),
        &[&later],
        1,
    )
    .await
    .unwrap();
    post(r#"{"eventType":"test-event","clientId":"client-01"}"#).await;
    let alerts = alerts_when(&aws, &later, 2, Duration::from_secs(90)).await;
    let keys: Vec<&str> = alerts.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, ["test-event-1", "test-event-2"]);
    let started = Instant::now();
    while ready().await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(30), "ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.stop().await.unwrap();
}

/// A shard-x lease held by host-a, and its fence.
async fn held_shard(aws: &Aws, names: &Names) -> (tocsin::aws::Table, Fence) {
    let table = tocsin::aws::Table::new(aws.dynamodb.clone(), &names.table);
    let leases = lease_group(table.clone(), &names.events);
    leases.create("shard-x", &[]).await.unwrap();
    let lease = leases.list().await.unwrap().remove(0);
    let epoch = leases.take(&lease, "host-a").await.unwrap().unwrap();
    let fence = Fence {
        stream: names.events.clone(),
        shard: "shard-x".into(),
        owner: "host-a".into(),
        epoch,
    };
    (table, fence)
}

fn alert(id: &BucketId, n: usize) -> AlertRecord {
    serde_json::from_value(serde_json::json!({
        "id": format!("alert-{n}"), "tenant": id.tenant, "rule": id.rule,
        "rule_version": "1.0.0", "bucket": id.bucket, "key": format!("k-{n}"),
        "status": "firing", "severity": "info", "title": "t", "detail": null, "at": 0
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_outbox_items_beyond_one_transaction_are_all_deleted() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let (table, fence) = held_shard(&aws, &names).await;
    let id = bucket("machine-01");
    let store = DynamoStore::new(table.clone(), &names.events);
    store.fetch([id.clone()]).await.unwrap();
    // 150 batches' alerts committed, none published yet: more outbox items
    // than one transaction can delete beside a write.
    let mut marks = Vec::new();
    for n in 1..=150 {
        let mut change = write(&id, b"s");
        change.alerts.push(alert(&id, n));
        let outbox = store
            .commit(shard_commit(&fence, vec![change], &n.to_string()))
            .await
            .unwrap();
        marks.push(outbox.mark);
    }
    assert_eq!(
        store.unpublished("shard-x").await.unwrap().alerts.len(),
        150
    );
    for mark in marks {
        store.published(mark).await.unwrap();
    }
    assert!(
        store
            .unpublished("shard-x")
            .await
            .unwrap()
            .alerts
            .is_empty(),
        "published items are not published again"
    );
    // The next two batches delete every one of them.
    for n in 151..=152 {
        store
            .commit(shard_commit(&fence, vec![write(&id, b"s")], &n.to_string()))
            .await
            .unwrap();
    }
    let other = DynamoStore::new(table, &names.events);
    let left = other.unpublished("shard-x").await.unwrap().alerts;
    assert!(
        left.is_empty(),
        "{} published alerts still in the outbox, to be published again by the next owner",
        left.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_forgets_what_it_applied_from_shards_read_to_their_end() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let (table, parent) = held_shard(&aws, &names).await;
    let child = Fence {
        shard: "shard-y".into(),
        ..parent.clone()
    };
    let id = bucket("machine-01");
    let store = DynamoStore::new(table.clone(), &names.events);
    store.fetch([id.clone()]).await.unwrap();
    store
        .commit(shard_commit(&parent, vec![write(&id, b"1")], "10"))
        .await
        .unwrap();
    assert!(store.cached(&id).unwrap().applied.contains_key("shard-x"));
    // The parent is read to its end; the child writes the bucket next.
    store.partitions_finished(&["shard-x".to_owned()]);
    let leases = lease_group(table.clone(), &names.events);
    leases
        .create("shard-y", &["shard-x".to_owned()])
        .await
        .unwrap();
    let lease = leases
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.shard == "shard-y")
        .unwrap();
    let epoch = leases.take(&lease, "host-a").await.unwrap().unwrap();
    let child = Fence { epoch, ..child };
    store
        .commit(shard_commit(&child, vec![write(&id, b"2")], "20"))
        .await
        .unwrap();
    let stored = stored_applied(&aws, &names.table, &id).await;
    assert_eq!(
        stored,
        ["shard-y"],
        "only the open shard's position is kept"
    );
}

async fn stored_applied(aws: &Aws, table: &str, id: &BucketId) -> Vec<String> {
    let store = DynamoStore::new(tocsin::aws::Table::new(aws.dynamodb.clone(), table), "any");
    let buckets = store.scan_buckets().await.unwrap();
    let (_, item) = buckets.into_iter().find(|(b, _)| b == id).unwrap();
    let mut shards: Vec<String> = item.applied.into_keys().collect();
    shards.sort();
    shards
}

/// Fair sharing on a shard: a tenant whose call takes seconds is run apart,
/// so another tenant's alert from the same records is on the alerts stream
/// while the slow call still runs. The shard's checkpoint waits for the
/// part run apart, then moves past every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tenant_on_a_shard_is_run_apart_and_the_checkpoint_waits_for_it() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let mut rules = seed_rules();
    rules.push(("evil".to_owned(), support::components::HOSTILE.to_owned()));
    let data = tempfile::tempdir().unwrap();
    let mut config = config(&names, data.path(), &rules);
    config.limits.fuel_per_call = 1 << 42;
    config.limits.deadline_ms = 600_000;
    let host = Server::start(config, Arc::new(SystemClock)).await.unwrap();

    let slow = serde_json::json!({"clientId": "evil", "eventType": "test-event", "attack": "slow", "spin": 3_000_000_000u64});
    let healthy = serde_json::json!({"clientId": "client-01", "eventType": "test-event"});
    put(
        &aws,
        &names.events,
        &[slow.to_string(), healthy.to_string()],
    )
    .await;
    let alerts = alerts_when(&aws, &names.alerts, 1, Duration::from_secs(60)).await;
    assert!(
        alerts.iter().any(|a| a.tenant == "client-01"),
        "the healthy tenant's alert: {alerts:?}"
    );
    assert!(
        alerts.iter().all(|a| a.tenant != "evil"),
        "published before the slow tenant's: {alerts:?}"
    );
    let alerts = alerts_when(&aws, &names.alerts, 2, Duration::from_secs(120)).await;
    assert!(
        alerts
            .iter()
            .any(|a| a.tenant == "evil" && a.title == "slow"),
        "the slow tenant's event is applied too: {alerts:?}"
    );

    // The checkpoint is past both records once the part committed.
    let shard = tocsin::source::kinesis::list_shards(&aws.kinesis, &names.events)
        .await
        .unwrap()
        .remove(0)
        .id;
    let iterator = aws
        .kinesis
        .get_shard_iterator()
        .stream_name(&names.events)
        .shard_id(&shard)
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap()
        .shard_iterator()
        .unwrap()
        .to_owned();
    let records = aws
        .kinesis
        .get_records()
        .shard_iterator(iterator)
        .send()
        .await
        .unwrap();
    let last = records
        .records()
        .last()
        .unwrap()
        .sequence_number()
        .to_owned();
    let leases = lease_group(
        tocsin::aws::Table::new(aws.dynamodb.clone(), &names.table),
        &names.events,
    );
    let started = Instant::now();
    loop {
        let lease = leases.list().await.unwrap().remove(0);
        if lease.checkpoint.as_deref() == Some(last.as_str()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "checkpoint {:?}, want {last}",
            lease.checkpoint
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base = format!("http://{}", host.addr());
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tocsin_tenant_parts_apart_total{tenant=\"evil\"} 1\n"),
        "{metrics}"
    );
    host.stop().await.unwrap();
}

/// A bucket of a rule with a state time-to-live reads as having no state
/// once it has passed, by the host's clock: DynamoDB's TTL deletes items
/// days late, so reads do not wait for it. The item keeps what it applied,
/// and DynamoDB is told when it may delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_past_its_time_to_live_reads_as_none_before_dynamodb_deletes_it() {
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let (table, fence) = held_shard(&aws, &names).await;
    let clock = Arc::new(tocsin::clock::ManualClock::new(1_700_000_000_000));
    let store = DynamoStore::new(table.clone(), &names.events).with_clock(clock.clone());
    let id = bucket("machine-ttl");
    let mut aging = write(&id, b"kept an hour");
    aging.ttl_ms = Some(3_600_000);
    store
        .commit(shard_commit(&fence, vec![aging], "1"))
        .await
        .unwrap();
    async fn prior(store: &DynamoStore, id: &BucketId) -> tocsin::store::Prior {
        store
            .load(std::slice::from_ref(id), "shard-x")
            .await
            .unwrap()
            .remove(0)
    }
    assert_eq!(
        prior(&store, &id).await.state.as_deref(),
        Some(&b"kept an hour"[..])
    );
    clock.set(1_700_000_000_000 + 3_600_000 + 1_000);
    let expired = prior(&store, &id).await;
    assert_eq!(expired.state, None, "past its time-to-live");
    assert_eq!(expired.applied.unwrap().as_str(), "1");
    // A host reading it anew (nothing cached) sees the same.
    let other = DynamoStore::new(table.clone(), &names.events).with_clock(clock.clone());
    assert_eq!(prior(&other, &id).await.state, None);
    let item = aws
        .dynamodb
        .get_item()
        .table_name(&names.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(tocsin::store::dynamo::bucket_pk(&id)),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("state".to_owned()),
        )
        .send()
        .await
        .unwrap()
        .item
        .expect("the item is still there");
    let expires: i64 = item["expires"].as_n().unwrap().parse().unwrap();
    assert_eq!(expires, (1_700_000_000_000 + 3_600_000) / 1000 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_index_follows_each_buckets_timer_and_drops_what_lost_its_bucket() {
    use tocsin::runtime::TimerChange;
    use tocsin::store::dynamo::timer_partition;
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let (table, fence) = held_shard(&aws, &names).await;
    let store = DynamoStore::new(table.clone(), &names.events);
    let (early, late) = (bucket("machine-early"), bucket("machine-late"));
    let set = |id: &BucketId, at: i64| {
        let mut w = write(id, b"running");
        w.timer = TimerChange::Set(at);
        w
    };
    let writes = vec![set(&early, 1_000), set(&late, 5_000)];
    store
        .commit(shard_commit(&fence, writes, "1"))
        .await
        .unwrap();
    // A reader of the index that caches nothing: another host.
    let other = DynamoStore::new(table.clone(), &names.events);
    let due = |id: &BucketId, until: i64| {
        let other = &other;
        let partition = timer_partition(id);
        async move { other.due_timers(&partition, until, 10).await.unwrap() }
    };
    assert_eq!(due(&early, 999).await, vec![]);
    assert!(due(&early, 1_000).await.contains(&(early.clone(), 1_000)));
    assert!(!due(&late, 4_999).await.contains(&(late.clone(), 5_000)));
    assert!(due(&late, 5_000).await.contains(&(late.clone(), 5_000)));
    assert_eq!(
        other.next_timer(&timer_partition(&early)).await.unwrap(),
        Some(1_000)
    );

    // Moved and cancelled in the bucket's own commit: the index follows.
    let mut cancel = write(&early, b"stopped");
    cancel.timer = TimerChange::Cancel;
    store
        .commit(shard_commit(&fence, vec![cancel, set(&late, 9_000)], "2"))
        .await
        .unwrap();
    assert!(
        due(&early, i64::MAX - 1)
            .await
            .iter()
            .all(|(id, _)| id != &early)
    );
    assert_eq!(
        due(&late, 8_999)
            .await
            .iter()
            .filter(|(id, _)| id == &late)
            .count(),
        0,
        "the old due time is gone from the index"
    );
    assert!(due(&late, 9_000).await.contains(&(late.clone(), 9_000)));

    // The bucket item deleted behind the store's back (DynamoDB's TTL):
    // its index item is not due, and is removed.
    aws.dynamodb
        .delete_item()
        .table_name(&names.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(tocsin::store::dynamo::bucket_pk(&late)),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("state".to_owned()),
        )
        .send()
        .await
        .unwrap();
    assert!(due(&late, 9_000).await.iter().all(|(id, _)| id != &late));
    let fresh = DynamoStore::new(table, &names.events);
    assert_eq!(
        fresh.next_timer(&timer_partition(&late)).await.unwrap(),
        None,
        "the index item without its bucket was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_hosts_pending_timer_fires_once_on_the_host_that_takes_its_timer_partition() {
    use tocsin::store::dynamo::{TIMER_PARTITIONS, timer_partition};
    let aws = aws().await;
    let names = setup(&aws, 1).await;
    let rules = vec![(
        "client-01".to_owned(),
        format!(
            "{}?{}",
            support::components::STILL_RUNNING,
            r#"{"running_for":"4s"}"#
        ),
    )];
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut hosts: Vec<Host> = dirs
        .iter()
        .map(|d| spawn_host(&names, d.path(), &rules))
        .collect();
    // Both hosts fire timers: the partitions are shared out.
    let id = BucketId {
        tenant: "client-01".into(),
        rule: "still-running".into(),
        bucket: "machine-01".into(),
    };
    let partition = timer_partition(&id);
    let started = Instant::now();
    let owner = loop {
        let mut held = Vec::new();
        for host in &hosts {
            held.push(status(&host.base).await.map(|s| s.timer_partitions));
        }
        if let [Some(a), Some(b)] = &held[..]
            && a.len() + b.len() == TIMER_PARTITIONS as usize
            && a.len().abs_diff(b.len()) <= 1
        {
            break if a.contains(&partition) { 0 } else { 1 };
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timer partitions not shared out: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let event = r#"{"eventType":"machineStatusChange","clientId":"client-01","machineId":"machine-01","state":"running"}"#;
    put(&aws, &names.events, &[event.to_owned()]).await;
    let reader = DynamoStore::new(
        tocsin::aws::Table::new(aws.dynamodb.clone(), &names.table),
        &names.events,
    );
    async fn pending(reader: &DynamoStore, id: &BucketId) -> Option<i64> {
        reader
            .scan_buckets()
            .await
            .unwrap()
            .into_iter()
            .find(|(bucket, _)| bucket == id)
            .and_then(|(_, item)| item.timer)
    }
    let started = Instant::now();
    let due = loop {
        if let Some(due) = pending(&reader, &id).await {
            break due;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the event's timer was never stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The host that would fire it dies before it is due.
    hosts[owner].child.kill().unwrap();
    hosts[owner].child.wait().unwrap();
    let killed_at = tocsin::clock::Clock::now_ms(&SystemClock);
    assert!(killed_at < due, "killed {} ms after due", killed_at - due);

    let alerts = alerts_when(&aws, &names.alerts, 1, Duration::from_secs(60)).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].key, "still-running-1");
    assert_eq!(alerts[0].status, tocsin::alert::Status::Firing);
    assert!(
        alerts[0].at >= due,
        "fired at {} before due {due}",
        alerts[0].at
    );
    let survivor = &hosts[1 - owner];
    assert!(
        status(&survivor.base)
            .await
            .unwrap()
            .timer_partitions
            .contains(&partition),
        "the survivor took the crashed host's timer partition"
    );
    eprintln!(
        "figures: a crashed host's timer fired {} ms after due (lease {} ms)",
        alerts[0].at - due,
        tocsin::config::DEFAULT_LEASE_MS
    );
    // Spent: the bucket has no timer left, and nothing fired twice.
    let started = Instant::now();
    while pending(&reader, &id).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timer never spent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its firing's commit spent it, and that commit published the alert.
    let again = alerts_when(&aws, &names.alerts, 2, Duration::ZERO).await;
    assert_eq!(again.len(), 1, "fired once: {again:?}");
}
