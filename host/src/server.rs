//! The HTTP API of the embedded service: ingest, alerts (list and live
//! stream), bucket state, health.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::alert::AlertRecord;
use crate::clock::Clock;
use crate::ingest;
use crate::processor::{Answer, Processor, Submission};
use crate::store::AlertLog;

/// Longest `Idempotency-Key` accepted: room for a UUID and a prefix.
const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Most alerts one `GET …/alerts` returns; page with `?after=`.
const MAX_ALERTS_PAGE: usize = 1_000;

pub struct AppState {
    pub processor: Arc<Processor>,
    pub queue: mpsc::Sender<Submission>,
    pub log: Arc<dyn AlertLog>,
    pub clock: Arc<dyn Clock>,
    pub tenant_field: String,
    pub ready: AtomicBool,
    pub shutdown: watch::Receiver<bool>,
    /// Distinguishes requests without an idempotency key.
    pub instance: String,
    pub requests: AtomicU64,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/tenants/{tenant}/alerts", get(list_alerts))
        .route("/v1/tenants/{tenant}/alerts/stream", get(stream_alerts))
        .route("/v1/tenants/{tenant}/buckets", get(list_buckets))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) && !*state.shutdown.borrow() {
        "ready".into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// `POST /v1/events`: answers once the events' effects are durable.
async fn post_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
    if let Some(key) = &key {
        match state.processor.receipt(key) {
            Ok(Some(answer)) => return Json(answer).into_response(),
            Ok(None) => {}
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
    let Ok(body) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not UTF-8");
    };
    let request = match &key {
        Some(key) => format!("key:{key}"),
        None => format!(
            "{}-{}",
            state.instance,
            state.requests.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let arrival = state.clock.now_ms();
    let parsed = match ingest::parse(
        body,
        &state.tenant_field,
        state.processor.catalogue(),
        &request,
        arrival,
    ) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if parsed.events.is_empty() && key.is_none() {
        return Json(Answer {
            accepted: 0,
            rejected: parsed.rejected,
        })
        .into_response();
    }
    let (reply, answer) = oneshot::channel();
    let submission = Submission {
        events: parsed.events,
        rejected: parsed.rejected,
        key,
        reply,
    };
    if state.queue.send(submission).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match answer.await {
        Ok(Ok(answer)) => Json(answer).into_response(),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not applied, retry: {e}"),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not applied, retry: processing failed",
        ),
    }
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
    let log = state.log.clone();
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
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or(page.after);
    // Subscribe before reading the log, so nothing falls between the two.
    let live = state.processor.subscribe();
    let stream = AlertStream {
        tenant,
        log: state.log.clone(),
        live,
        last: resume,
        backlog: std::collections::VecDeque::new(),
        shutdown: state.shutdown.clone(),
    };
    Sse::new(futures::stream::unfold(stream, AlertStream::next)).keep_alive(KeepAlive::default())
}

struct AlertStream {
    tenant: String,
    log: Arc<dyn AlertLog>,
    live: broadcast::Receiver<Arc<AlertRecord>>,
    /// The last `seq` sent; `None`: only live alerts.
    last: Option<u64>,
    backlog: std::collections::VecDeque<AlertRecord>,
    shutdown: watch::Receiver<bool>,
}

impl AlertStream {
    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        loop {
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
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
                if !page.is_empty() {
                    self.backlog.extend(page);
                    continue;
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
                    return Some((Ok(self.event(&alert)), self));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.last.get_or_insert(0);
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
    let log = state.log.clone();
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
