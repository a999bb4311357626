//! The request extractors of the routes: axum's own, with their rejections
//! answered like every other error, as JSON `{"error": "…"}` naming the
//! problem, with a status the OpenAPI document lists (axum's own answer
//! them as plain text). Also the check that a JSON body's integers are
//! within the types the document gives them.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use utoipa::Number;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{KnownFormat, Schema, SchemaFormat, SchemaType, Type};

use super::ApiError;

/// `axum::extract::Path`: a segment that is not UTF-8 once decoded is a 400.
pub(super) struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection: PathRejection| {
                ApiError::new(
                    rejection.status(),
                    format!("the path is malformed: {}", rejection.body_text()),
                )
            })
    }
}

/// `axum::extract::Query`: a parameter of the wrong type is a 400 that
/// names it.
pub(super) struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection: QueryRejection| {
                ApiError::new(
                    rejection.status(),
                    format!("the query string is malformed: {}", rejection.body_text()),
                )
            })
    }
}

/// The body's bytes: over the route's body limit is a 413.
pub(super) struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|rejection: BytesRejection| {
                ApiError::new(
                    rejection.status(),
                    format!("the body cannot be read: {}", rejection.body_text()),
                )
            })
    }
}

/// `body` as a `T`, or why not, naming the field at fault. The document
/// gives each integer field a format (`int32` for a `u32`, `int64` for a
/// `u64`) and a minimum: serde alone would take a `u32` up to 2^32 - 1
/// where the document promises at most 2^31 - 1, so every top-level
/// integer field is checked against its schema first.
pub(super) fn from_json<T>(mut body: serde_json::Value) -> Result<T, String>
where
    T: DeserializeOwned + utoipa::PartialSchema,
{
    check_integers(&T::schema(), &mut body)?;
    serde_path_to_error::deserialize(&body).map_err(|e| match e.path().to_string() {
        path if path == "." => e.inner().to_string(),
        path => format!("`{path}`: {}", e.inner()),
    })
}

/// The JSON `body` as a `T` ([`from_json`]), or a 400 saying it is not
/// `what` and why.
pub(super) fn json_body<T>(body: &[u8], what: &str) -> Result<T, ApiError>
where
    T: DeserializeOwned + utoipa::PartialSchema,
{
    serde_json::from_slice(body)
        .map_err(|e| e.to_string())
        .and_then(from_json)
        .map_err(|e| ApiError::new(axum::http::StatusCode::BAD_REQUEST, format!("{what}: {e}")))
}

/// Each integer field of `value` that `schema` describes is within the
/// range of its format, minimum and maximum. One written with a fraction
/// of 0 (`5.0`) is an integer to JSON Schema: it is rewritten as one, which
/// serde takes.
fn check_integers(schema: &RefOr<Schema>, value: &mut serde_json::Value) -> Result<(), String> {
    let (RefOr::T(Schema::Object(object)), serde_json::Value::Object(fields)) = (schema, value)
    else {
        return Ok(());
    };
    for (name, property) in &object.properties {
        let (RefOr::T(Schema::Object(property)), Some(given)) = (property, fields.get_mut(name))
        else {
            continue;
        };
        let integer = match &property.schema_type {
            SchemaType::Type(Type::Integer) => true,
            SchemaType::Array(types) => types.contains(&Type::Integer),
            _ => false,
        };
        if !integer || given.is_null() {
            continue;
        }
        let (low, high) = match &property.format {
            Some(SchemaFormat::KnownFormat(KnownFormat::Int32)) => {
                (i128::from(i32::MIN), i128::from(i32::MAX))
            }
            _ => (i128::from(i64::MIN), i128::from(i64::MAX)),
        };
        let bound = |number: &Option<Number>| match number {
            Some(Number::Int(n)) => Some(*n as i128),
            Some(Number::UInt(n)) => Some(*n as i128),
            Some(Number::Float(n)) => Some(*n as i128),
            None => None,
        };
        let low = bound(&property.minimum).map_or(low, |min| min.max(low));
        let high = bound(&property.maximum).map_or(high, |max| max.min(high));
        let number = given
            .as_i64()
            .map(i128::from)
            .or_else(|| given.as_u64().map(i128::from))
            .or_else(|| {
                // Within ±2^53 a float holds its integer exactly.
                given
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0)
                    .map(|f| f as i128)
            });
        match number {
            Some(n) if (low..=high).contains(&n) => {
                *given = serde_json::Value::from(n as i64);
            }
            _ => return Err(format!("`{name}` must be an integer from {low} to {high}")),
        }
    }
    Ok(())
}
