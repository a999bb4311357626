//! Tenant tokens and quotas: the operator issues and revokes tokens and
//! sets quotas; a tenant may read its own.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::{Body, Path, from_json};
use super::{ApiError, AppState, ErrorBody, for_tenant, operator};
use crate::quota::Quotas;
use crate::registry::{TokenView, validate_tenant};

/// A new token: the only time its secret is shown.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewToken {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    #[serde(flatten)]
    pub record: TokenView,
}

/// Issue a token for the tenant (operator).
#[utoipa::path(post, path = "/v1/tenants/{tenant}/tokens", tag = "tenants",
    params(("tenant" = String, Path)),
    responses(
        (status = 201, body = NewToken),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, description = "Not a valid tenant id", body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn create_token(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = operator(&state, &headers, "issue tokens")?;
    validate_tenant(&tenant)?;
    let (record, token) = state.registry.create_token(&tenant, &caller).await?;
    Ok((StatusCode::CREATED, Json(NewToken { token, record })).into_response())
}

/// The tenant's tokens, revoked ones too; never their secrets.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/tokens", tag = "tenants",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Vec<TokenView>),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn list_tokens(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    Ok(Json(state.registry.tokens(&tenant)))
}

/// Revoke a token (operator): refused on every host from then on.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/tokens/{id}", tag = "tenants",
    params(("tenant" = String, Path), ("id" = String, Path)),
    responses(
        (status = 200, description = "Revoked", body = TokenView),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<TokenView>, ApiError> {
    operator(&state, &headers, "revoke tokens")?;
    Ok(Json(state.registry.revoke_token(&tenant, &id).await?))
}

/// The tenant's quotas.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/quotas", tag = "tenants",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Quotas),
        (status = 400, description = "A malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn get_quotas(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Quotas>, ApiError> {
    for_tenant(&state, &headers, &tenant)?;
    Ok(Json(state.registry.quotas(&tenant)))
}

/// Set the tenant's quotas (operator); fields left out take the host's
/// defaults. Rules reload under the new limits.
#[utoipa::path(put, path = "/v1/tenants/{tenant}/quotas", tag = "tenants",
    params(("tenant" = String, Path)),
    request_body = Quotas,
    responses(
        (status = 200, body = Quotas),
        (status = 400, description = "A malformed path, or not a quotas object: which field, and why", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, description = "Over the body limit", body = ErrorBody),
        (status = 422, description = "Not a valid tenant id, or a quota that must be positive is 0", body = ErrorBody),
        (status = 503, description = "The registry cannot be written now; retry", body = ErrorBody),
    ))]
pub(super) async fn put_quotas(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<Quotas>, ApiError> {
    operator(&state, &headers, "set quotas")?;
    validate_tenant(&tenant)?;
    let bad = |reason: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("not a quotas object: {reason}"),
        )
    };
    // Over the defaults, so a field left out is the default.
    let mut quotas = serde_json::to_value(state.registry.default_quotas()).expect("quotas");
    let given = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(given)) => given,
        Ok(_) => return Err(bad("send a JSON object".to_owned())),
        Err(e) => return Err(bad(e.to_string())),
    };
    if let serde_json::Value::Object(merged) = &mut quotas {
        merged.extend(given);
    }
    let quotas: Quotas = from_json(quotas).map_err(bad)?;
    Ok(Json(state.registry.set_quotas(&tenant, quotas).await?))
}
