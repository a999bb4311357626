//! Ingest, probes and the Kinesis source's status.

use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(feature = "aws")]
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::Body;
use super::{ApiError, AppState, ErrorBody, caller, error, forbidden, operator};
use crate::auth::Caller;
use crate::source::http::{Answer, Refusal};

/// Longest `Idempotency-Key` accepted: room for a UUID and a prefix.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "host", security(()),
    responses((status = 200, description = "`ok`", body = String)))]
pub(super) async fn healthz() -> &'static str {
    "ok"
}

/// Ready while not stopping, the source runs (the HTTP lane takes
/// requests, or the Kinesis source has joined the lease table), and the
/// last commit and the last publish succeeded.
#[utoipa::path(get, path = "/readyz", tag = "host", security(()),
    responses(
        (status = 200, description = "`ready`", body = String),
        (status = 503, description = "Why not", body = ErrorBody),
    ))]
pub(super) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if *state.shutdown.borrow() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    }
    if let Some(reason) = state.sources.iter().find_map(|source| source.not_ready()) {
        return error(StatusCode::SERVICE_UNAVAILABLE, reason);
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

/// Post events (NDJSON, or a JSON array), each naming its tenant. Answers
/// once their effects are durable; bad lines are rejected with their
/// reason while the good ones go through. A tenant token may post only its
/// tenant's events, within its `events_per_second` quota; a request that
/// breaks either is refused whole.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200,
        pattern = r"^[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?$",
        description = "Retries with the same key and body get the first answer, applied once")),
    // Optional: no body is no events, answered with nothing applied. The
    // lines are read whatever the content type says.
    request_body(content = Option<String>, content_type = "application/x-ndjson",
        description = "Events as NDJSON lines, or a JSON array of them; bad lines are answered each with its reason"),
    responses(
        (status = 200, description = "Applied, with the lines not applied", body = Answer),
        (status = 400, description = "Not NDJSON or a JSON array", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "This host reads Kinesis", body = ErrorBody),
        (status = 413, description = "Over the body limit", body = ErrorBody),
        (status = 422, description = "Idempotency key reused for another body", body = ErrorBody),
        (status = 429, description = "Over the `events_per_second` quota", body = ErrorBody),
        (status = 503, description = "Not applied; retry", body = ErrorBody),
    ))]
pub(super) async fn post_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let caller = match caller(&state, &headers) {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    let Some(ingest) = &state.ingest else {
        #[cfg(feature = "aws")]
        let stream = state
            .shards
            .as_ref()
            .map(|(_, settings)| settings.stream.clone())
            .unwrap_or_default();
        #[cfg(not(feature = "aws"))]
        let stream = String::new();
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
    let registry = state.registry.clone();
    let poster = caller.clone();
    let gate = move |events: &[crate::event::Incoming]| -> Result<(), Refusal> {
        let mut per_tenant: BTreeMap<&str, usize> = BTreeMap::new();
        for event in events {
            *per_tenant.entry(event.tenant.as_str()).or_default() += 1;
        }
        if let Caller::Tenant { tenant, .. } = &poster
            && let Some(other) = per_tenant.keys().find(|t| **t != tenant.as_str())
        {
            let what =
                format!("post events of tenant `{other}`; nothing of the request was applied");
            return Err(Refusal::Forbidden(what));
        }
        for (tenant, events) in per_tenant {
            registry.admit_events(tenant, events)?;
        }
        Ok(())
    };
    match ingest.submit_gated(body, key, &gate).await {
        Ok(answer) => Json(answer).into_response(),
        Err(refusal @ Refusal::BadBody(_)) => error(StatusCode::BAD_REQUEST, refusal.to_string()),
        Err(refusal @ Refusal::KeyReused(_)) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, refusal.to_string())
        }
        Err(refusal @ Refusal::NotApplied(_)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, refusal.to_string())
        }
        Err(Refusal::Forbidden(what)) => forbidden(&caller, &what).into_response(),
        Err(Refusal::Quota(exceeded)) => ApiError::from(&exceeded).into_response(),
    }
}

/// What `GET /v1/status` reports.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Status {
    pub host: String,
    pub stream: String,
    /// Shards whose lease this host holds.
    pub shards: Vec<String>,
    /// Timer partitions whose lease this host holds: it fires their timers.
    #[serde(default)]
    pub timer_partitions: Vec<String>,
    /// Shards whose worker stopped on an error retrying cannot heal, with it.
    pub failed: BTreeMap<String, String>,
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
    /// DynamoDB requests looking for due timers and reading their buckets.
    #[serde(default)]
    pub dynamodb_timer_requests: u64,
}

/// The Kinesis source on this host: its shards and counters (operator).
#[utoipa::path(get, path = "/v1/status", tag = "host",
    responses(
        (status = 200, body = Status),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "This host has no Kinesis source", body = ErrorBody),
    ))]
pub(super) async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = operator(&state, &headers, "read the host's status") {
        return refused.into_response();
    }
    match shard_status(&state) {
        Some(status) => Json(status).into_response(),
        None => error(StatusCode::NOT_FOUND, "this host has no Kinesis source"),
    }
}

#[cfg(not(feature = "aws"))]
fn shard_status(_state: &AppState) -> Option<Status> {
    None
}

/// The Kinesis source's status, with that source.
#[cfg(feature = "aws")]
fn shard_status(state: &AppState) -> Option<Status> {
    let (shards, settings) = state.shards.as_ref()?;
    let stats = state.engine.stats();
    let mut held = shards.held.lock().expect("held lock").clone();
    held.sort();
    let mut timer_partitions = shards.timers.lock().expect("timers lock").clone();
    timer_partitions.sort();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Some(Status {
        host: settings.host.clone(),
        stream: settings.stream.clone(),
        shards: held,
        timer_partitions,
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
        dynamodb_timer_requests: state.usage.as_ref().map_or(0, |u| load(&u.timer_requests)),
    })
}

/// Prometheus (OpenMetrics) text: per tenant and rule, events, alerts,
/// fuel, time per batch and failures by cause; host-wide batch and commit
/// time, events, live instances, rules, and with Kinesis each shard's lag
/// and the leases held (operator: it names every tenant).
#[utoipa::path(get, path = "/metrics", tag = "host",
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    operator(&state, &headers, "read the host's metrics")?;
    #[cfg(feature = "aws")]
    let leases = state
        .shards
        .as_ref()
        .map(|(shards, _)| shards.held.lock().expect("held lock").len());
    #[cfg(not(feature = "aws"))]
    let leases = None;
    let text = state.engine.encode_metrics(
        state.registry.runtime().live_instances(),
        state.registry.serving_count(),
        leases,
    );
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
