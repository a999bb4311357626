//! The commands that talk to a running host: `tocsin rule upload / list /
//! show / activate / delete` and `tocsin tenant token / revoke`. An error
//! answer is printed as the host put it, with the status.

use std::path::Path;

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};

/// A host's API and the token to call it with.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Self {
        Client {
            http: reqwest::Client::new(),
            base: url.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Call `path`; a success's JSON body (or `null`), else an error with
    /// the host's reason.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = build(request).send().await.with_context(|| {
            format!("cannot reach {url} (is the host running? --url / TOCSIN_URL)")
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        if !status.is_success() {
            let reason = body["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            let hint = if status == StatusCode::UNAUTHORIZED {
                " (give a token with --token or TOCSIN_TOKEN)"
            } else {
                ""
            };
            bail!("{method} {path}: {status}: {reason}{hint}");
        }
        Ok((status, body))
    }
}

/// The URL path of `segments`, each percent-encoded as a path segment
/// (tenant ids may hold any character).
fn path(segments: &[&str]) -> String {
    let mut url = reqwest::Url::parse("http://host/").expect("a base URL");
    url.path_segments_mut()
        .expect("an http URL has a path")
        .extend(segments);
    url.path().to_owned()
}

pub fn rule_path(tenant: &str, rule: Option<&str>) -> String {
    match rule {
        Some(rule) => path(&["v1", "tenants", tenant, "rules", rule]),
        None => path(&["v1", "tenants", tenant, "rules"]),
    }
}

/// `/v1/tenants/{tenant}/…` with `rest` (segments of their own).
pub fn tenant_path(tenant: &str, rest: &[&str]) -> String {
    let mut segments = vec!["v1", "tenants", tenant];
    segments.extend(rest);
    path(&segments)
}

/// One line about a version record.
pub fn describe_version(tenant: &str, name: &str, record: &serde_json::Value) -> String {
    format!(
        "{tenant}/{name} version {} ({}@{}, sha256 {}, {} bytes, by {} at {})",
        record["version"],
        record["manifest"]["name"].as_str().unwrap_or("?"),
        record["manifest"]["version"].as_str().unwrap_or("?"),
        record["content_hash"].as_str().unwrap_or("?"),
        record["size"],
        record["uploaded_by"].as_str().unwrap_or("?"),
        record["uploaded_at"].as_str().unwrap_or("?"),
    )
}

pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read rule component {}", path.display()))
}
