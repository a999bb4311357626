//! Alerts (list and live stream) and bucket state, from the embedded
//! store's alert log.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::extract::{Path, Query};
use super::{ApiError, AppState, ErrorBody, for_tenant};
use crate::alert::AlertRecord;
use crate::store::AlertLog;

/// Most alerts one `GET …/alerts` returns; page with `?after=`.
const MAX_ALERTS_PAGE: usize = 1_000;

/// The alert log, for a tenant the caller may act for.
fn alert_log(
    state: &AppState,
    headers: &HeaderMap,
    tenant: &str,
) -> Result<Arc<dyn AlertLog>, ApiError> {
    for_tenant(state, headers, tenant)?;
    state.log.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this host keeps no alert log (its state is in DynamoDB): read alerts from the alerts stream",
        )
    })
}

/// `read` on the alert log, on a blocking thread.
async fn read<T: Send + 'static>(
    log: Arc<dyn AlertLog>,
    read: impl FnOnce(&dyn AlertLog) -> crate::store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(move || read(log.as_ref())).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// `?after=&limit=`. Signed types, checked non-negative, so what the
/// query string may hold is what the document says: an `int64` and an
/// `int32`, each at least 0.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct Page {
    /// Only records after this cursor (their `seq`).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many (and at most 1,000).
    #[param(minimum = 0)]
    limit: Option<i32>,
}

impl Page {
    /// The cursor (default: from the start) and how many, at most `max`.
    pub(super) fn bounds(&self, max: usize) -> Result<(u64, usize), ApiError> {
        let negative = |name: &str| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the query string is malformed: `{name}` must be at least 0"),
            )
        };
        let after = u64::try_from(self.after.unwrap_or(0)).map_err(|_| negative("after"))?;
        let limit = match self.limit {
            None => max,
            Some(limit) => usize::try_from(limit).map_err(|_| negative("limit"))?,
        };
        Ok((after, limit.min(max)))
    }
}

/// A tenant's alerts, oldest first (embedded store).
#[utoipa::path(get, path = "/v1/tenants/{tenant}/alerts", tag = "alerts",
    params(("tenant" = String, Path), Page),
    responses(
        (status = 200, description = "Alerts with their `seq`", body = Vec<Object>),
        (status = 400, description = "A malformed path or query string: which parameter", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No alert log on this host", body = ErrorBody),
        (status = 503, description = "The alert log cannot be read now; retry", body = ErrorBody),
    ))]
pub(super) async fn list_alerts(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Json<Vec<AlertRecord>>, ApiError> {
    let (after, limit) = page.bounds(MAX_ALERTS_PAGE)?;
    let log = alert_log(&state, &headers, &tenant)?;
    Ok(Json(
        read(log, move |log| log.alerts(&tenant, after, limit)).await?,
    ))
}

/// A tenant's alerts as server-sent events, one per alert, `id` = its
/// `seq`; resumes after `?after=` or `Last-Event-ID` (embedded store).
#[utoipa::path(get, path = "/v1/tenants/{tenant}/alerts/stream", tag = "alerts",
    params(("tenant" = String, Path), Page),
    responses(
        (status = 200, description = "`text/event-stream` of `alert` events", content_type = "text/event-stream", body = String),
        (status = 400, description = "A malformed path or query string: which parameter", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No alert log on this host", body = ErrorBody),
        (status = 503, description = "The alert log cannot be read now; retry", body = ErrorBody),
    ))]
pub(super) async fn stream_alerts(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Response> {
    let (after, _) = page
        .bounds(MAX_ALERTS_PAGE)
        .map_err(IntoResponse::into_response)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or(page.after.map(|_| after));
    let log = alert_log(&state, &headers, &tenant).map_err(IntoResponse::into_response)?;
    // Subscribe before reading the log, so nothing falls between the two.
    let live = state.engine.subscribe();
    // A live-only subscriber that falls behind catches up from here, not
    // from the start of history.
    let since = match resume {
        Some(_) => None,
        None => Some(
            read(log.clone(), |log| log.last_seq())
                .await
                .map_err(IntoResponse::into_response)?,
        ),
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BucketView {
    rule: String,
    bucket: String,
    /// The encoded state, hex.
    state: String,
}

/// Every stored bucket of a tenant and its state (embedded store).
#[utoipa::path(get, path = "/v1/tenants/{tenant}/buckets", tag = "alerts",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Vec<BucketView>),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No alert log on this host", body = ErrorBody),
        (status = 503, description = "The store cannot be read now; retry", body = ErrorBody),
    ))]
pub(super) async fn list_buckets(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<BucketView>>, ApiError> {
    let log = alert_log(&state, &headers, &tenant)?;
    let buckets = read(log, move |log| log.buckets(&tenant)).await?;
    Ok(Json(
        buckets
            .into_iter()
            .map(|(id, bytes)| BucketView {
                rule: id.rule,
                bucket: id.bucket,
                state: hex::encode(bytes),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::api::router;
    use crate::catalogue::{LiveCatalogue, StaticCatalogue};
    use crate::clock::ManualClock;
    use crate::engine::Engine;
    use crate::registry::Registry;
    use crate::runtime::{Runtime, RuntimeConfig};
    use crate::sink::file::FileSink;
    use crate::source::http::HttpIngest;
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
        let (ingest, _lane) = HttpIngest::start(engine.clone(), "clientId", 1_000, 1 << 20, true)
            .await
            .unwrap();
        // History the subscriber did not ask for.
        for _ in 0..3 {
            ingest.submit(TEST_EVENT, None).await.unwrap();
        }
        let (_stop, shutdown) = watch::channel(false);
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: 4,
            cache_dir: None,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let registry = Registry::open(
            Arc::new(crate::registry::embedded::EmbeddedRegistry::new(&store)),
            Arc::new(runtime),
            Arc::new(LiveCatalogue::new(StaticCatalogue::default())),
            Default::default(),
            None,
        )
        .await
        .unwrap();
        let state = Arc::new(AppState {
            engine,
            registry,
            ingest: Some(ingest.clone()),
            #[cfg(feature = "aws")]
            shards: None,
            sources: Vec::new(),
            log: Some(store),
            #[cfg(feature = "aws")]
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
