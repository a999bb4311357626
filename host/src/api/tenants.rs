//! Tenant tokens and quotas: the operator issues and revokes tokens and
//! sets quotas; a tenant may read its own.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{AppState, ErrorBody, error, for_tenant, operator, registry_error};
use crate::registry::quota::Quotas;
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
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, description = "Not a valid tenant id", body = ErrorBody),
    ))]
pub(super) async fn create_token(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match operator(&state, &headers, "issue tokens") {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    if let Err(e) = validate_tenant(&tenant) {
        return registry_error(e);
    }
    match state.registry.create_token(&tenant, &caller).await {
        Ok((record, token)) => {
            (StatusCode::CREATED, Json(NewToken { token, record })).into_response()
        }
        Err(e) => registry_error(e),
    }
}

/// The tenant's tokens, revoked ones too; never their secrets.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/tokens", tag = "tenants",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Vec<TokenView>),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn list_tokens(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = for_tenant(&state, &headers, &tenant) {
        return refused.into_response();
    }
    Json(state.registry.tokens(&tenant)).into_response()
}

/// Revoke a token (operator): refused on every host from then on.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/tokens/{id}", tag = "tenants",
    params(("tenant" = String, Path), ("id" = String, Path)),
    responses(
        (status = 200, description = "Revoked", body = TokenView),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = operator(&state, &headers, "revoke tokens") {
        return refused.into_response();
    }
    match state.registry.revoke_token(&tenant, &id).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => registry_error(e),
    }
}

/// The tenant's quotas.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/quotas", tag = "tenants",
    params(("tenant" = String, Path)),
    responses(
        (status = 200, body = Quotas),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(super) async fn get_quotas(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = for_tenant(&state, &headers, &tenant) {
        return refused.into_response();
    }
    Json(state.registry.quotas(&tenant)).into_response()
}

/// Set the tenant's quotas (operator); fields left out take the host's
/// defaults. Rules reload under the new limits.
#[utoipa::path(put, path = "/v1/tenants/{tenant}/quotas", tag = "tenants",
    params(("tenant" = String, Path)),
    request_body = Quotas,
    responses(
        (status = 200, body = Quotas),
        (status = 400, description = "Not a quotas object", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub(super) async fn put_quotas(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = operator(&state, &headers, "set quotas") {
        return refused.into_response();
    }
    if let Err(e) = validate_tenant(&tenant) {
        return registry_error(e);
    }
    // Over the defaults, so a field left out is the default.
    let mut quotas = serde_json::to_value(state.registry.default_quotas()).expect("quotas");
    let given = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(given)) => given,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "not a quotas object: send a JSON object",
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a quotas object: {e}")),
    };
    if let serde_json::Value::Object(merged) = &mut quotas {
        merged.extend(given);
    }
    let quotas: Quotas = match serde_json::from_value(quotas) {
        Ok(quotas) => quotas,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a quotas object: {e}")),
    };
    match state.registry.set_quotas(&tenant, quotas).await {
        Ok(quotas) => Json(quotas).into_response(),
        Err(e) => registry_error(e),
    }
}
