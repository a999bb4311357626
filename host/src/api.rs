//! The HTTP API of a host: ingest (with the HTTP source), alerts (list and
//! live stream) and bucket state (with the embedded store, which keeps
//! them), the Kinesis source's status, health and readiness.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::alert::AlertRecord;
use crate::engine::Engine;
use crate::source::http::{HttpIngest, Refusal};
use crate::source::shards::{ShardSettings, ShardsState};
use crate::store::AlertLog;

/// Longest `Idempotency-Key` accepted: room for a UUID and a prefix.
const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Most alerts one `GET …/alerts` returns; page with `?after=`.
const MAX_ALERTS_PAGE: usize = 1_000;

/// What the routes serve from.
pub struct AppState {
    pub engine: Arc<Engine>,
    /// With the HTTP source.
    pub ingest: Option<Arc<HttpIngest>>,
    /// With the Kinesis source.
    pub shards: Option<(Arc<ShardsState>, ShardSettings)>,
    /// With a store that keeps the alert log (the embedded one).
    pub log: Option<Arc<dyn AlertLog>>,
    /// DynamoDB requests made, with that store.
    pub usage: Option<Arc<crate::aws::Usage>>,
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let mut router = Router::new()
        .route("/v1/events", post(post_events))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready));
    if state.log.is_some() {
        router = router
            .route("/v1/tenants/{tenant}/alerts", get(list_alerts))
            .route("/v1/tenants/{tenant}/alerts/stream", get(stream_alerts))
            .route("/v1/tenants/{tenant}/buckets", get(list_buckets));
    }
    if state.shards.is_some() {
        router = router.route("/v1/status", get(status));
    }
    router
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Ready while not stopping, the source runs (the HTTP lane takes
/// requests, or the Kinesis source has joined the lease table), and the
/// last commit and the last publish succeeded.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if *state.shutdown.borrow() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    }
    if let Some(ingest) = &state.ingest
        && !ingest.running()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the ingest lane stopped: see the host's log",
        );
    }
    if let Some((shards, _)) = &state.shards
        && !shards.joined.load(Ordering::Relaxed)
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "joining the lease table");
    }
    let health = state.engine.health();
    if let Some(reason) = health.commit_error {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("batches cannot be committed: {reason}"),
        );
    }
    if let Some(reason) = health.publish_error {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("alerts cannot be published (they wait in the outbox): {reason}"),
        );
    }
    "ready".into_response()
}

/// `POST /v1/events`: answers once the events' effects are durable.
async fn post_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(ingest) = &state.ingest else {
        let stream = state
            .shards
            .as_ref()
            .map(|(_, settings)| settings.stream.clone())
            .unwrap_or_default();
        return error(
            StatusCode::CONFLICT,
            format!(
                "this host reads its events from the Kinesis stream `{stream}`: put them there"
            ),
        );
    };
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => Some(key.to_owned()),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ),
                );
            }
        },
    };
    let Ok(body) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not UTF-8");
    };
    match ingest.submit(body, key).await {
        Ok(answer) => Json(answer).into_response(),
        Err(refusal @ Refusal::BadBody(_)) => error(StatusCode::BAD_REQUEST, refusal.to_string()),
        Err(refusal @ Refusal::KeyReused(_)) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, refusal.to_string())
        }
        Err(refusal @ Refusal::NotApplied(_)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, refusal.to_string())
        }
    }
}

/// What `GET /v1/status` reports.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub host: String,
    pub stream: String,
    /// Shards whose lease this host holds.
    pub shards: Vec<String>,
    /// Shards whose worker stopped on an error retrying cannot heal, with it.
    pub failed: std::collections::BTreeMap<String, String>,
    pub events: u64,
    pub alerts: u64,
    pub batches: u64,
    pub conflicts: u64,
    pub rule_failures: u64,
    pub bad_records: u64,
    /// Events of tenants without rules.
    pub unknown_tenant: u64,
    /// DynamoDB requests serving events (reads, commits, outbox reads).
    pub dynamodb_data_requests: u64,
    /// DynamoDB requests of the lease protocol.
    pub dynamodb_lease_requests: u64,
}

async fn status(State(state): State<Arc<AppState>>) -> Response {
    let Some((shards, settings)) = &state.shards else {
        return error(StatusCode::NOT_FOUND, "this host has no Kinesis source");
    };
    let stats = state.engine.stats();
    let mut held = shards.held.lock().expect("held lock").clone();
    held.sort();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Json(Status {
        host: settings.host.clone(),
        stream: settings.stream.clone(),
        shards: held,
        failed: shards
            .failed
            .lock()
            .expect("failed lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        events: load(&stats.events),
        alerts: load(&stats.alerts),
        batches: load(&shards.batches),
        conflicts: load(&stats.conflicts),
        rule_failures: load(&stats.rule_failures),
        bad_records: load(&shards.bad_records),
        unknown_tenant: load(&stats.unknown_tenant),
        dynamodb_data_requests: state.usage.as_ref().map_or(0, |u| u.data_requests()),
        dynamodb_lease_requests: state.usage.as_ref().map_or(0, |u| load(&u.lease_requests)),
    })
    .into_response()
}

fn alert_log(state: &AppState) -> Arc<dyn AlertLog> {
    state
        .log
        .clone()
        .expect("alert routes exist only with an alert log")
}

#[derive(Debug, Deserialize)]
struct Page {
    /// Only alerts after this cursor (an alert's `seq`).
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/tenants/{tenant}/alerts`: oldest first.
async fn list_alerts(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(MAX_ALERTS_PAGE).min(MAX_ALERTS_PAGE);
    let log = alert_log(&state);
    let after = page.after.unwrap_or(0);
    match tokio::task::spawn_blocking(move || log.alerts(&tenant, after, limit)).await {
        Ok(Ok(alerts)) => Json(alerts).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /v1/tenants/{tenant}/alerts/stream`: server-sent events, one per
/// alert, `id` = its `seq`. Resumes after `?after=` or `Last-Event-ID`.
async fn stream_alerts(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Response> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or(page.after);
    // Subscribe before reading the log, so nothing falls between the two.
    let live = state.engine.subscribe();
    let log = alert_log(&state);
    // A live-only subscriber that falls behind catches up from here, not
    // from the start of history.
    let since = match resume {
        Some(_) => None,
        None => {
            let log = log.clone();
            match tokio::task::spawn_blocking(move || log.last_seq()).await {
                Ok(Ok(seq)) => Some(seq),
                Ok(Err(e)) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
                Err(e) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
    };
    let stream = AlertStream {
        tenant,
        log,
        live,
        last: resume,
        since,
        backlog: std::collections::VecDeque::new(),
        shutdown: state.shutdown.clone(),
        failed: false,
    };
    Ok(Sse::new(futures::stream::unfold(stream, AlertStream::next))
        .keep_alive(KeepAlive::default()))
}

struct AlertStream {
    tenant: String,
    log: Arc<dyn AlertLog>,
    live: broadcast::Receiver<Arc<AlertRecord>>,
    /// The last `seq` sent; `None`: only live alerts.
    last: Option<u64>,
    /// For a live-only subscriber: the log's last `seq` when it subscribed.
    since: Option<u64>,
    backlog: std::collections::VecDeque<AlertRecord>,
    shutdown: watch::Receiver<bool>,
    /// A catch-up failed and the client was told: the stream ends.
    failed: bool,
}

impl AlertStream {
    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(alert) = self.backlog.pop_front() {
                return Some((Ok(self.event(&alert)), self));
            }
            if let Some(after) = self.last {
                // Catch up from the log (on resume, or after lagging behind).
                let (log, tenant) = (self.log.clone(), self.tenant.clone());
                let page = tokio::task::spawn_blocking(move || {
                    log.alerts(&tenant, after, MAX_ALERTS_PAGE)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|page| page.map_err(|e| e.to_string()));
                match page {
                    Ok(page) if !page.is_empty() => {
                        self.backlog.extend(page);
                        continue;
                    }
                    Ok(_) => {}
                    Err(reason) => {
                        // Tell the client, and end: it resumes with
                        // Last-Event-ID and misses nothing.
                        self.failed = true;
                        let event = SseEvent::default().event("error").data(
                            serde_json::json!({
                                "error": format!("cannot read the alert log: {reason}"),
                                "resume_after": after,
                            })
                            .to_string(),
                        );
                        return Some((Ok(event), self));
                    }
                }
            }
            let received = tokio::select! {
                received = self.live.recv() => received,
                _ = self.shutdown.wait_for(|stop| *stop) => return None,
            };
            match received {
                Ok(alert) if alert.tenant == self.tenant => {
                    if self.last.is_some_and(|last| alert.seq.unwrap_or(0) <= last) {
                        continue;
                    }
                    // Alerts are published after their commit is answered:
                    // one committed before a live-only subscriber arrived
                    // can still come by live. It is history, not news.
                    if let (None, Some(since), Some(seq)) = (self.last, self.since, alert.seq)
                        && seq <= since
                    {
                        continue;
                    }
                    return Some((Ok(self.event(&alert)), self));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed some: read them from the log, from where this
                    // subscriber stands (or stood when it subscribed).
                    if self.last.is_none() {
                        self.last = Some(self.since.unwrap_or(0));
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn event(&mut self, alert: &AlertRecord) -> SseEvent {
        self.last = alert.seq.or(self.last);
        let event = SseEvent::default()
            .event("alert")
            .data(serde_json::to_string(alert).expect("alerts serialize"));
        match alert.seq {
            Some(seq) => event.id(seq.to_string()),
            None => event,
        }
    }
}

#[derive(Debug, Serialize)]
struct BucketView {
    rule: String,
    bucket: String,
    /// The encoded state, hex.
    state: String,
}

/// `GET /v1/tenants/{tenant}/buckets`: every stored bucket and its state.
async fn list_buckets(State(state): State<Arc<AppState>>, Path(tenant): Path<String>) -> Response {
    let log = alert_log(&state);
    match tokio::task::spawn_blocking(move || log.buckets(&tenant)).await {
        Ok(Ok(buckets)) => Json(
            buckets
                .into_iter()
                .map(|(id, bytes)| BucketView {
                    rule: id.rule,
                    bucket: id.bucket,
                    state: hex::encode(bytes),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::clock::ManualClock;
    use crate::sink::file::FileSink;
    use crate::store::embedded::EmbeddedStore;

    const TEST_EVENT: &str = r#"{"eventType":"test-event","clientId":"client-01"}"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_subscriber_that_falls_behind_catches_up_from_where_it_subscribed() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = crate::engine::tests::test_event_catalogue();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let sink = Arc::new(FileSink::open(&dir.path().join("alerts.ndjson")).unwrap());
        // Room for two live alerts: one batch of ten overruns it.
        let engine = Arc::new(
            Engine::new(
                Arc::new(catalogue),
                store.clone(),
                sink,
                Arc::new(ManualClock::new(1_000)),
            )
            .with_live_capacity(2),
        );
        let (ingest, _lane) = HttpIngest::start(engine.clone(), "clientId", 1_000)
            .await
            .unwrap();
        // History the subscriber did not ask for.
        for _ in 0..3 {
            ingest.submit(TEST_EVENT, None).await.unwrap();
        }
        let (_stop, shutdown) = watch::channel(false);
        let state = Arc::new(AppState {
            engine,
            ingest: Some(ingest.clone()),
            shards: None,
            log: Some(store),
            usage: None,
            shutdown,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router(state, 1 << 20)).into_future());

        let response = reqwest::get(format!("http://{addr}/v1/tenants/client-01/alerts/stream"))
            .await
            .unwrap();
        let mut stream = response.bytes_stream();
        let batch = [TEST_EVENT; 10].join("\n");
        ingest.submit(&batch, None).await.unwrap();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while text.matches("event: alert").count() < 10 {
            let chunk = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("ten alerts in time");
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        }
        let keys: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap()["key"].to_string())
            .collect();
        let want: Vec<String> = (4..=13).map(|n| format!("\"test-event-{n}\"")).collect();
        assert_eq!(
            keys, want,
            "every alert since it subscribed, once, and none before"
        );
    }
}
