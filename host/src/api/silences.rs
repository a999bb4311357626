//! A tenant's silences: the tenant (or the operator) creates, lists and
//! deletes them; the alerts they match are kept and published marked
//! `silenced_by`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::{Body, Path, json_body};
use super::{ApiError, AppState, ErrorBody, for_tenant};
use crate::registry::silences::{NewSilence, SilenceView};

/// Silence the tenant's alerts that match, from `starts_at` (default: now)
/// to `ends_at`.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/silences", tag = "alerts",
    params(("tenant" = String, Path)),
    request_body = NewSilence,
    responses(
        (status = 201, body = SilenceView),
        (status = 400, description = "A malformed path, or not a silence object: which field, and why", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "The tenant keeps the most silences", body = ErrorBody),
        (status = 413, description = "Over the body limit", body = ErrorBody),
        (status = 422, description = "A matcher, time, author or comment is refused", body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn create_silence(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let caller = for_tenant(&state, &headers, &tenant)?;
    let new: NewSilence = json_body(&body, "not a silence object")?;
    let now = state.engine.clock().now_ms();
    let silence = state
        .registry
        .create_silence(&tenant, new, &caller, now)
        .await?;
    Ok((StatusCode::CREATED, Json(silence)).into_response())
}

/// The tenant's silences, pending, active and expired, by start.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/silences", tag = "alerts",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Vec<SilenceView>),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn list_silences(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<SilenceView>>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    let now = state.engine.clock().now_ms();
    Ok(Json(state.registry.silence_views(&tenant, now)))
}

/// Remove a silence: the alerts it matched are published unmarked again.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/silences/{id}", tag = "alerts",
    params(("tenant" = String, Path), ("id" = String, Path)),
    responses(
        (status = 200, description = "Removed", body = SilenceView),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn delete_silence(
    State(state): State<Arc<AppState>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<SilenceView>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    let now = state.engine.clock().now_ms();
    Ok(Json(
        state.registry.delete_silence(&tenant, &id, now).await?,
    ))
}
