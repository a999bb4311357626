//! The HTTP API of a host: ingest (with the HTTP source), the rule registry
//! (upload, versions, activation), tenant tokens and quotas, silences,
//! alerts (list and live stream) and bucket state (with the embedded store,
//! which keeps them), the Kinesis source's status, health and readiness, and the
//! OpenAPI document of all of it at `GET /v1/openapi.json`, generated from
//! the routes themselves.
//!
//! Every route but the probes (`/healthz`, `/readyz`) and the OpenAPI
//! document asks who is calling: `Authorization: Bearer <token>` with the
//! operator's token, which may do everything, or a tenant token, which may
//! act only for its tenant. A host without an operator token serves only on
//! loopback and treats callers without a token as the operator.
//!
//! Every error answer, the framework's too (a malformed path, query string
//! or body, an unknown route, a method a route does not have), is JSON
//! `{"error": "…"}` naming the problem, with a status the document lists.

mod alerts;
mod dead_letters;
mod events;
mod extract;
mod rules;
mod silences;
mod tenants;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::engine::Engine;
use crate::quota::QuotaExceeded;
use crate::registry::{Registry, RegistryError};
use crate::source::Source;
use crate::source::http::HttpIngest;
#[cfg(feature = "aws")]
use crate::source::shards::{ShardSettings, ShardsState};
use crate::store::AlertLog;

pub use events::Status;

/// Largest component upload: the most any tenant's `component_bytes` quota
/// can usefully be (the request is refused before it is read past this).
pub const MAX_UPLOAD_BYTES: usize = 64 << 20;

/// What the routes serve from.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub registry: Arc<Registry>,
    /// With the HTTP source: what `POST /v1/events` submits to.
    pub ingest: Option<Arc<HttpIngest>>,
    /// With the Kinesis source: what `GET /v1/status` shows.
    #[cfg(feature = "aws")]
    pub shards: Option<(Arc<ShardsState>, ShardSettings)>,
    /// Every source running, for readiness.
    pub sources: Vec<Arc<dyn Source>>,
    /// With a store that keeps the alert log (the embedded one).
    pub log: Option<Arc<dyn AlertLog>>,
    /// DynamoDB requests made, with that store.
    #[cfg(feature = "aws")]
    pub usage: Option<Arc<crate::aws::Usage>>,
    pub shutdown: watch::Receiver<bool>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tocsin",
        description = "Multi-tenant streaming alert engine: events in, tenants' sandboxed rules, alerts out."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "events", description = "Ingest"),
        (name = "rules", description = "The rule registry"),
        (name = "tenants", description = "Tenant tokens and quotas (operator)"),
        (name = "alerts", description = "Alerts and bucket state"),
        (name = "host", description = "Probes and status"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route, with its OpenAPI description collected from the handlers.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(events::post_events).layer(DefaultBodyLimit::max(max_body_bytes)))
        .routes(routes!(events::healthz))
        .routes(routes!(events::ready))
        .routes(routes!(events::status))
        .routes(routes!(events::metrics))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(alerts::stream_alerts))
        .routes(routes!(alerts::list_buckets))
        .routes(routes!(rules::list_rules))
        .routes(
            routes!(rules::put_rule, rules::get_rule, rules::delete_rule)
                .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .routes(routes!(rules::activate_rule))
        .routes(routes!(rules::rule_logs))
        .routes(routes!(rules::resume_rule))
        .routes(routes!(dead_letters::list_dead_letters))
        .routes(routes!(tenants::create_token, tenants::list_tokens))
        .routes(routes!(tenants::revoke_token))
        .routes(routes!(tenants::get_quotas, tenants::put_quotas))
        .routes(routes!(silences::create_silence, silences::list_silences))
        .routes(routes!(silences::delete_silence))
        .with_state(state)
        .split_for_parts();
    let openapi = Arc::new(openapi);
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let openapi = openapi.clone();
                async move { Json(openapi.as_ref().clone()) }
            }),
        )
        // After every route: it applies to those registered before it.
        // axum still adds the `Allow` header.
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("`{}` does not take {method}", uri.path()),
            )
        })
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no route `{}`: GET /v1/openapi.json lists them", uri.path()),
            )
        })
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, and what to do about it.
    pub error: String,
    /// With 403 and 429 for a quota: which one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
}

/// An error answer: its status and [`ErrorBody`]. Handlers return it with
/// `?`; 401 carries `WWW-Authenticate`, 429 `Retry-After`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: message.into(),
                quota: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(self.body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        let status = match &error {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::Conflict(_) => StatusCode::CONFLICT,
            RegistryError::Quota(exceeded) => return exceeded.into(),
            RegistryError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    }
}

impl From<&QuotaExceeded> for ApiError {
    fn from(exceeded: &QuotaExceeded) -> Self {
        let status = if exceeded.retry {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::FORBIDDEN
        };
        ApiError {
            status,
            body: ErrorBody {
                error: exceeded.to_string(),
                quota: Some(exceeded.quota.to_owned()),
            },
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

/// Who is calling, or the 401 that says why nobody is.
fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        if state.registry.has_operator_token() {
            return Err(unauthorized(
                "this host needs a token: send `Authorization: Bearer <token>`",
            ));
        }
        // No operator token: the host serves only on loopback.
        return Ok(Caller::Operator);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    state
        .registry
        .authenticate(token)
        .ok_or_else(|| unauthorized("the token is unknown or revoked"))
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

/// The caller, if it may act for `tenant`.
fn for_tenant(state: &AppState, headers: &HeaderMap, tenant: &str) -> Result<Caller, ApiError> {
    let caller = caller(state, headers)?;
    if !caller.may_act_for(tenant) {
        return Err(forbidden(&caller, &format!("act for tenant `{tenant}`")));
    }
    Ok(caller)
}

/// The caller, if it is the operator.
fn operator(state: &AppState, headers: &HeaderMap, what: &str) -> Result<Caller, ApiError> {
    let caller = caller(state, headers)?;
    if caller != Caller::Operator {
        return Err(forbidden(&caller, what));
    }
    Ok(caller)
}

fn forbidden(caller: &Caller, what: &str) -> ApiError {
    let message = match caller {
        Caller::Operator => format!("the operator may not {what}"),
        Caller::Tenant { tenant, token } => {
            format!("token `{token}` acts for tenant `{tenant}` only: it may not {what}")
        }
    };
    ApiError::new(StatusCode::FORBIDDEN, message)
}
