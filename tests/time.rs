//! Time on one machine (`tocsin serve` in-process, embedded store, a clock
//! the test moves): a timer a rule asked for fires with no event, within a
//! second of due on the host's clock, exactly once, also after a restart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tocsin::clock::ManualClock;
use tocsin::config::{Config, RuleEntry};
use tocsin::serve::Server;
use tocsin_test_support::components;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;

fn config(data_dir: &Path) -> Config {
    config_with(data_dir, json!({"running_for": "2s", "forget_after": "1h"}))
}

fn config_with(data_dir: &Path, params: Value) -> Config {
    let mut rule = RuleEntry::new("client-01", components::STILL_RUNNING);
    rule.params = Some(params);
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        max_instances: 8,
        rules: vec![rule],
        ..Config::default()
    }
}

fn status(state: &str) -> String {
    machine_status("machine-03", state)
}

fn machine_status(machine: &str, state: &str) -> String {
    json!({
        "eventType": "machineStatusChange", "clientId": "client-01",
        "machineId": machine, "state": state,
    })
    .to_string()
}

struct Host {
    server: Server,
    base: String,
    http: reqwest::Client,
}

impl Host {
    async fn start(data_dir: &Path, clock: &ManualClock) -> Host {
        Host::start_with(config(data_dir), clock).await
    }

    async fn start_with(config: Config, clock: &ManualClock) -> Host {
        let server = Server::start(config, Arc::new(clock.clone()))
            .await
            .expect("server starts");
        let base = format!("http://{}", server.addr());
        Host {
            server,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, line: &str) {
        let response = self
            .http
            .post(format!("{}/v1/events", self.base))
            .body(line.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["accepted"], 1, "{answer}");
    }

    /// The tenant's stored buckets: their names and state bytes.
    async fn buckets(&self) -> (Vec<String>, usize) {
        let buckets: Vec<Value> = self
            .http
            .get(format!("{}/v1/tenants/client-01/buckets", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let names = buckets
            .iter()
            .map(|b| b["bucket"].as_str().unwrap().to_owned())
            .collect();
        let bytes = buckets
            .iter()
            .map(|b| b["state"].as_str().unwrap().len() / 2)
            .sum();
        (names, bytes)
    }

    async fn alerts(&self) -> Vec<Value> {
        self.http
            .get(format!("{}/v1/tenants/client-01/alerts", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The tenant's alerts once there are `count` (the host fires timers on
    /// its own task: this waits for it, up to a generous real-time bound).
    async fn alerts_when(&self, count: usize) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let alerts = self.alerts().await;
            if alerts.len() >= count {
                return alerts;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{count} alerts expected, have {alerts:?}"
            );
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timer_fires_with_no_event_once_due_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let host = Host::start(dir.path(), &clock).await;
    // Running since T0 (its arrival): due at T0 + 2 s.
    host.post(&status("running")).await;
    clock.advance(1_000);
    // Stopped with the timer pending; the clock moves on while it is down.
    host.server.stop().await.unwrap();
    clock.set(T0 + 2_400);

    let host = Host::start(dir.path(), &clock).await;
    let alerts = host.alerts_when(1).await;
    let alert = &alerts[0];
    assert_eq!(alert["key"], "still-running-1");
    assert_eq!(alert["status"], "firing");
    assert_eq!(alert["bucket"], "machine-03");
    let at = alert["at"].as_i64().unwrap();
    assert!(
        (T0 + 2_000..=T0 + 3_000).contains(&at),
        "fired within a second of due: {at}"
    );

    // Once: moving the clock further fires nothing again; the state change
    // resolves it.
    clock.advance(5_000);
    host.post(&status("stopped")).await;
    let alerts = host.alerts_when(2).await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[1]["key"], "still-running-1");
    assert_eq!(alerts[1]["status"], "resolved");
    host.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_change_before_due_cancels_the_timer() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let host = Host::start(dir.path(), &clock).await;
    host.post(&status("running")).await;
    clock.advance(1_000);
    host.post(&status("stopped")).await;
    // Running again at T0 + 3 s: due at T0 + 5 s, not before.
    clock.advance(2_000);
    host.post(&status("running")).await;
    clock.advance(2_500);
    let alerts = host.alerts_when(1).await;
    assert_eq!(alerts.len(), 1, "only the second run alerts: {alerts:?}");
    assert_eq!(alerts[0]["detail"]["since"], T0 + 3_000);
    host.server.stop().await.unwrap();
}

/// Machines come and go for a simulated day: each is forgotten an hour
/// after its last event (the rule's state time-to-live), so what is stored
/// stays flat — the last hour's machines — however long the run.
#[tokio::test(flavor = "multi_thread")]
async fn buckets_untouched_past_their_time_to_live_are_removed_and_storage_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let host = Host::start(dir.path(), &clock).await;
    let mut flat = None;
    for round in 0..48 {
        for k in 0..5 {
            host.post(&machine_status(&format!("m-{round}-{k}"), "stopped"))
                .await;
        }
        // This round's machines and the last one's: the ones before were
        // last heard of an hour ago.
        let want: Vec<String> = (round.max(1) - 1..=round)
            .flat_map(|r| (0..5).map(move |k| format!("m-{r}-{k}")))
            .collect();
        let started = Instant::now();
        let bytes = loop {
            let (mut names, bytes) = host.buckets().await;
            names.sort();
            let mut expected = want.clone();
            expected.sort();
            if names == expected {
                break bytes;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: stored {names:?}, want {expected:?}"
            );
            tokio::task::yield_now().await;
        };
        // Ten machines' states, the same size each round from the second on.
        if round >= 1 {
            let flat = *flat.get_or_insert(bytes);
            assert_eq!(bytes, flat, "round {round}: stored bytes");
        }
        clock.advance(30 * 60 * 1000);
    }
    assert!(flat.is_some_and(|bytes| bytes > 0));
    host.server.stop().await.unwrap();
}

/// 2026-01-01T00:00:00Z plus `ms`, as RFC 3339.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(T0 + ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The alert lifecycle's repeat interval and a tenant's silence, as a user
/// of the HTTP API sees them: a repeat carries the alert's key and
/// fingerprint under a new id; silenced alerts are kept, marked and counted.
#[tokio::test(flavor = "multi_thread")]
async fn repeats_keep_the_fingerprint_and_silenced_alerts_are_kept_and_marked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let params = json!({"running_for": "2s", "forget_after": "1h", "repeat_interval": "10s"});
    let host = Host::start_with(config_with(dir.path(), params), &clock).await;
    let silences = format!("{}/v1/tenants/client-01/silences", host.base);

    let refused = host
        .http
        .post(&silences)
        .json(&json!({"matchers": {"bucket": "machine-04"}, "ends_at": "next week", "created_by": "ops", "comment": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let error: Value = refused.json().await.unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .starts_with("`ends_at`: `next week` is not an RFC 3339 time"),
        "{error}"
    );

    let created = host
        .http
        .post(&silences)
        .json(&json!({
            "matchers": {"bucket": "machine-04"},
            "starts_at": rfc3339(0), "ends_at": rfc3339(3_600_000),
            "created_by": "ops", "comment": "machine-04 is being serviced",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let silence: Value = created.json().await.unwrap();
    assert_eq!(silence["state"], "active");
    let id = silence["id"].as_str().unwrap().to_owned();
    let listed: Vec<Value> = host
        .http
        .get(&silences)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["comment"], "machine-04 is being serviced");

    host.post(&machine_status("machine-03", "running")).await;
    host.post(&machine_status("machine-04", "running")).await;
    clock.set(T0 + 2_500);
    let alerts = host.alerts_when(2).await;
    let by_machine = |alerts: &[Value], machine: &str| -> Vec<Value> {
        alerts
            .iter()
            .filter(|a| a["bucket"] == machine)
            .cloned()
            .collect()
    };
    let m3 = by_machine(&alerts, "machine-03");
    let m4 = by_machine(&alerts, "machine-04");
    assert_eq!(m3[0]["status"], "firing");
    assert!(m3[0].get("silenced_by").is_none(), "{m3:?}");
    assert_eq!(m4[0]["status"], "firing", "a silenced alert is kept");
    assert_eq!(m4[0]["silenced_by"], id.as_str());

    // Ten seconds on, both are published again: same key and fingerprint,
    // a new id.
    clock.set(T0 + 13_000);
    let alerts = host.alerts_when(4).await;
    let m3 = by_machine(&alerts, "machine-03");
    assert_eq!(m3.len(), 2, "{alerts:?}");
    assert_eq!(m3[1]["key"], m3[0]["key"]);
    assert_eq!(m3[1]["fingerprint"], m3[0]["fingerprint"]);
    assert_ne!(m3[1]["id"], m3[0]["id"]);
    assert_eq!(m3[1]["detail"]["repeat"], true);
    assert_eq!(
        by_machine(&alerts, "machine-04")[1]["silenced_by"],
        id.as_str()
    );

    // The alert log shows a batch's alerts once committed; its metrics
    // follow a moment later (the commit's bookkeeping): poll for them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = host
            .http
            .get(format!("{}/metrics", host.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let silenced = metrics
            .lines()
            .find(|l| {
                l.starts_with("tocsin_rule_alerts_silenced_total{") && l.contains("still-running")
            })
            .unwrap_or_else(|| panic!("no silenced count in {metrics}"))
            .to_owned();
        if silenced.ends_with(" 2") || std::time::Instant::now() > deadline {
            assert!(silenced.ends_with(" 2"), "{silenced}");
            break;
        }
        tokio::task::yield_now().await;
    }

    // Deleted, the silence marks nothing more; a second delete names it.
    let deleted = host
        .http
        .delete(format!("{silences}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let again = host
        .http
        .delete(format!("{silences}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let error: Value = again.json().await.unwrap();
    assert_eq!(
        error["error"],
        format!("tenant `client-01` has no silence `{id}`")
    );
    clock.set(T0 + 23_000);
    let alerts = host.alerts_when(6).await;
    let m4 = by_machine(&alerts, "machine-04");
    assert_eq!(m4.len(), 3, "{alerts:?}");
    assert!(m4[2].get("silenced_by").is_none(), "{m4:?}");
    host.server.stop().await.unwrap();
}
