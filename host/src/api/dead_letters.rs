//! A tenant's dead letters: the events a rule failed on or that waited out
//! a quarantine, with the reason (embedded mode: the host's dead-letter
//! file).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use super::alerts::Page;
use super::extract::{Path, Query};
use super::{ApiError, AppState, ErrorBody, for_tenant};
use crate::sink::dead_letters::DeadLetter;

/// Most dead letters one request returns; page with `?after=`.
const MAX_PAGE: usize = 1_000;

/// A tenant's dead letters, oldest first: each names the rule, the cause
/// and reason, where the event came from, and the event itself. Save them
/// as NDJSON and `tocsin replay` runs them again, each against its rule.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/dead-letters", tag = "dead letters",
    params(("tenant" = String, Path), Page),
    responses(
        (status = 200, description = "Dead letters with their `seq`", body = Vec<Object>),
        (status = 400, description = "A malformed path or query string: which parameter", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "This host sends dead letters to a stream", body = ErrorBody),
        (status = 503, description = "The dead-letter log cannot be read now; retry", body = ErrorBody),
    ))]
pub(super) async fn list_dead_letters(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    let (after, limit) = page.bounds(MAX_PAGE)?;
    let engine = state.engine.clone();
    let read = tokio::task::spawn_blocking(move || {
        let Some(sink) = engine.dead_letters() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "this host keeps no dead letters",
            ));
        };
        let Some(log) = sink.log() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "this host sends dead letters to {}: read them there",
                    sink.describe()
                ),
            ));
        };
        log.dead_letters(&tenant, after, limit)
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    });
    match read.await {
        Ok(letters) => Ok(Json(letters?)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}
