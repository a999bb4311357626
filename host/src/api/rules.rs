//! The rule registry: upload, list, read, activate and delete a tenant's
//! rules.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::extract::{Body, Path, Query, json_body};
use super::{ApiError, AppState, ErrorBody, for_tenant};
use crate::registry::{RuleView, VersionRecord};
use crate::rule_log::LogEntry;

/// A component's bytes, as the document describes an upload: binary, not
/// an array of numbers.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub(super) struct Component(#[allow(dead_code)] Vec<u8>);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct Upload {
    /// The rule's parameters, as JSON (URL-encoded); default: none, the
    /// rule's own defaults.
    params: Option<String>,
    /// Whether the new version runs at once (default `true`); with `false`
    /// it waits for `POST …/activate`.
    activate: Option<bool>,
}

/// Upload a rule component (`application/wasm`) as rule `{rule}` of the
/// tenant: validated (a component of this host's `tocsin:rule` world, only
/// allowed imports, within the tenant's `component_bytes` quota, compiled
/// within a time bound, its manifest produced from the parameters under the
/// tenant's limits), stored by content hash, and added as a new version.
/// Uploading what the latest version already is answers 200 with it.
#[utoipa::path(put, path = "/v1/tenants/{tenant}/rules/{rule}", tag = "rules",
    params(("tenant" = String, Path), ("rule" = String, Path), Upload),
    request_body(content = Component, content_type = "application/wasm"),
    responses(
        (status = 201, description = "A new version", body = VersionRecord),
        (status = 200, description = "The latest version already is this", body = VersionRecord),
        (status = 400, description = "A malformed path or query string: which parameter", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Another tenant's, or over the `rules` or `component_bytes` quota", body = ErrorBody),
        (status = 409, description = "A rule of the host's config has this name", body = ErrorBody),
        (status = 413, description = "Over the largest upload", body = ErrorBody),
        (status = 415, description = "Not `application/wasm`", body = ErrorBody),
        (status = 422, description = "Not a rule this host can run (an empty body too), parameters that are not JSON, or not a valid tenant id: why", body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn put_rule(
    State(state): State<Arc<AppState>>,
    Path((tenant, rule)): Path<(String, String)>,
    Query(upload): Query<Upload>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let caller = for_tenant(&state, &headers, &tenant)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !matches!(
        content_type,
        "application/wasm" | "application/octet-stream"
    ) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "send the component as `Content-Type: application/wasm` (got `{content_type}`)"
            ),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body holds no component",
        ));
    }
    let params = upload
        .params
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| {
            // Well-formed as a query string, refused by meaning: a 422 like
            // parameters the rule itself refuses.
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the parameters are not JSON: {e}"),
            )
        })?;
    let activate = upload.activate.unwrap_or(true);
    let (record, created) = state
        .registry
        .upload(&tenant, &rule, body.to_vec(), params, activate, &caller)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)).into_response())
}

/// The tenant's rules: from the host's config, then registered.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/rules", tag = "rules",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Vec<RuleView>),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn list_rules(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<RuleView>>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    Ok(Json(state.registry.rules(&tenant)))
}

/// One rule: its manifest, versions (hash, size, parameters, who uploaded
/// each and when), and the active version.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/rules/{rule}", tag = "rules",
    params(("tenant" = String, Path), ("rule" = String, Path)),
    responses(
        (status = 200, body = RuleView),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn get_rule(
    State(state): State<Arc<AppState>>,
    Path((tenant, rule)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<RuleView>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    Ok(Json(state.registry.rule(&tenant, &rule)?))
}

/// Stop running a registered rule and forget its versions (its buckets'
/// state stays).
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/rules/{rule}", tag = "rules",
    params(("tenant" = String, Path), ("rule" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "A rule of the host's config", body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn delete_rule(
    State(state): State<Arc<AppState>>,
    Path((tenant, rule)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    state.registry.delete(&tenant, &rule).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Activate {
    /// The version to run.
    version: u32,
}

/// Run another kept version (roll back or forward), on every host.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/rules/{rule}/activate", tag = "rules",
    params(("tenant" = String, Path), ("rule" = String, Path)),
    request_body = Activate,
    responses(
        (status = 200, body = RuleView),
        (status = 400, description = "A malformed path, or not `{\"version\": N}`: why", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such rule or version", body = ErrorBody),
        (status = 409, description = "A rule of the host's config", body = ErrorBody),
        (status = 413, description = "Over the body limit", body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn activate_rule(
    State(state): State<Arc<AppState>>,
    Path((tenant, rule)): Path<(String, String)>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<RuleView>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    let Activate { version } = json_body(&body, "the body must be {\"version\": N}")?;
    Ok(Json(
        state.registry.activate(&tenant, &rule, version).await?,
    ))
}

/// The rule's recent log lines on this host, oldest first: what it wrote
/// (its `log` import, stdout and stderr, as `source: "rule"`) and why its
/// calls failed or it was quarantined (`source: "host"`). The newest 200
/// lines (32 KiB) per rule are kept.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/rules/{rule}/logs", tag = "rules",
    params(("tenant" = String, Path), ("rule" = String, Path)),
    responses(
        (status = 200, body = Vec<LogEntry>),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn rule_logs(
    State(state): State<Arc<AppState>>,
    Path((tenant, rule)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    state.registry.rule(&tenant, &rule)?;
    Ok(Json(state.engine.rule_logs(&tenant, &rule)))
}

/// Lift the rule's quarantine now, on every host (operator only): it runs
/// on its next events instead of waiting out its backoff.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/rules/{rule}/resume", tag = "rules",
    params(("tenant" = String, Path), ("rule" = String, Path)),
    responses(
        (status = 200, description = "Resumed; `was_quarantined` says whether this host had it quarantined", body = Object),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn resume_rule(
    State(state): State<Arc<AppState>>,
    Path((tenant, rule)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = super::operator(&state, &headers, "resume a quarantined rule")?;
    state.registry.rule(&tenant, &rule)?;
    let was = state
        .registry
        .resume(&tenant, &rule, &caller.name())
        .await?;
    Ok(Json(
        serde_json::json!({ "resumed": true, "was_quarantined": was }),
    ))
}
