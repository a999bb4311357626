//! The rule registry and tenants over HTTP, as operators and tenants use
//! them: upload, versions, activation and rollback, restarts, tokens and
//! who may do what, quotas, and the OpenAPI document of it all. Two hosts
//! on DynamoDB following one registry are in `aws.rs`.

use std::path::Path;
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tocsin::clock::ManualClock;
use tocsin::config::Config;
use tocsin::serve::Server;
use tocsin_test_support::components;

const OPERATOR: &str = "operator-token-for-the-registry-tests-0123456789";

fn config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        max_instances: 32,
        operator_token: Some(OPERATOR.to_owned()),
        ..Config::default()
    }
}

/// A request body and its content type.
type Body<'a> = (&'a str, Vec<u8>);

struct Host {
    server: Server,
    base: String,
    http: reqwest::Client,
}

impl Host {
    async fn start(config: Config) -> Host {
        let server = Server::start(config, Arc::new(ManualClock::new(1_000)))
            .await
            .expect("server starts");
        Host {
            base: format!("http://{}", server.addr()),
            server,
            http: reqwest::Client::new(),
        }
    }

    /// `method path` as `token` (none: no Authorization header), with a
    /// body of `content_type`.
    async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Body<'_>>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn upload(
        &self,
        token: &str,
        tenant: &str,
        rule: &str,
        wasm: &[u8],
        params: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut path = format!("/v1/tenants/{tenant}/rules/{rule}");
        if let Some(params) = params {
            let mut query = reqwest::Url::parse("http://host/").unwrap();
            query
                .query_pairs_mut()
                .append_pair("params", &params.to_string());
            path.push('?');
            path.push_str(query.query().unwrap());
        }
        self.call(
            Some(token),
            Method::PUT,
            &path,
            Some(("application/wasm", wasm.to_vec())),
        )
        .await
    }

    async fn post_events(&self, token: &str, lines: &[Value]) -> (StatusCode, Value) {
        let body: Vec<String> = lines.iter().map(Value::to_string).collect();
        self.call(
            Some(token),
            Method::POST,
            "/v1/events",
            Some(("application/x-ndjson", body.join("\n").into_bytes())),
        )
        .await
    }

    async fn token(&self, tenant: &str) -> String {
        let (status, body) = self
            .call(
                Some(OPERATOR),
                Method::POST,
                &format!("/v1/tenants/{tenant}/tokens"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    async fn alert_keys(&self, token: &str, tenant: &str) -> Vec<String> {
        let (status, alerts) = self
            .call(
                Some(token),
                Method::GET,
                &format!("/v1/tenants/{tenant}/alerts"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{alerts}");
        alerts
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn sorted_keys(host: &Host) -> Vec<String> {
    let mut keys = host.alert_keys(OPERATOR, "client-07").await;
    keys.sort();
    keys
}

fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn quote(ticker: &str, price: f64) -> Value {
    json!({"eventType": "quote", "clientId": "client-05", "ticker": ticker, "price": price, "time": 1_000})
}

fn error_text(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON error body: {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_rule_runs_at_once_and_its_versions_roll_back_and_forward() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path())).await;
    let token = host.token("client-05").await;
    let price_change = wasm(components::PRICE_CHANGE);

    // Version 1: moves over 1 % fire.
    let (status, v1) = host
        .upload(&token, "client-05", "moves", &price_change, None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["manifest"]["name"], "price-change");
    assert_eq!(v1["size"], price_change.len());
    assert!(v1["uploaded_by"].as_str().unwrap().starts_with("token:"));
    // The same bytes and parameters again: no new version.
    let (status, again) = host
        .upload(&token, "client-05", "moves", &price_change, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["version"], 1);

    let (status, _) = host
        .post_events(&token, &[quote("AMZN", 100.0), quote("AMZN", 103.0)])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(host.alert_keys(&token, "client-05").await, ["change-1"]);

    // Version 2 changes only the parameters: a 3 % move no longer fires.
    let (status, v2) = host
        .upload(
            &token,
            "client-05",
            "moves",
            &price_change,
            Some(json!({"threshold_pct": 50})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v2}");
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["content_hash"], v1["content_hash"]);
    assert_eq!(v2["params"], json!({"threshold_pct": 50}));
    host.post_events(&token, &[quote("AMZN", 106.0)]).await;
    assert_eq!(host.alert_keys(&token, "client-05").await, ["change-1"]);

    // Back to version 1: the next 3 % move fires, counting on from the
    // state version 2 left.
    let (status, rule) = host
        .call(
            Some(&token),
            Method::POST,
            "/v1/tenants/client-05/rules/moves/activate",
            Some(("application/json", br#"{"version": 1}"#.to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rule}");
    assert_eq!(rule["active_version"], 1);
    assert_eq!(rule["serving"], 1);
    host.post_events(&token, &[quote("AMZN", 110.0)]).await;
    assert_eq!(
        host.alert_keys(&token, "client-05").await,
        ["change-1", "change-2"]
    );

    let (status, body) = host
        .call(
            Some(&token),
            Method::POST,
            "/v1/tenants/client-05/rules/moves/activate",
            Some(("application/json", br#"{"version": 7}"#.to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        error_text(&body),
        "rule `moves` of tenant `client-05` has no version 7 (it keeps 1, 2)"
    );

    // A restart serves the active version without an upload.
    host.server.stop().await.unwrap();
    let host = Host::start(config(dir.path())).await;
    let (_, rule) = host
        .call(
            Some(OPERATOR),
            Method::GET,
            "/v1/tenants/client-05/rules/moves",
            None,
        )
        .await;
    assert_eq!(rule["active_version"], 1);
    assert_eq!(rule["serving"], 1);
    assert_eq!(rule["versions"].as_array().unwrap().len(), 2);
    host.post_events(&token, &[quote("AMZN", 120.0)]).await;
    assert_eq!(
        host.alert_keys(&token, "client-05").await,
        ["change-1", "change-2", "change-3"],
        "the token, the rule and its state survived the restart"
    );

    // Deleted, it runs no more.
    let (status, _) = host
        .call(
            Some(&token),
            Method::DELETE,
            "/v1/tenants/client-05/rules/moves",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, answer) = host.post_events(&token, &[quote("AMZN", 200.0)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer["rejected"][0]["error"],
        "unknown tenant `client-05`: no rules are configured for it"
    );
    host.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_that_are_not_runnable_rules_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path())).await;
    let refused = |wasm: Vec<u8>| {
        let host = &host;
        async move { host.upload(OPERATOR, "client-01", "r", &wasm, None).await }
    };

    let (status, body) = refused(b"not wasm at all".to_vec()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error_text(&body).starts_with("not a valid rule component"),
        "{body}"
    );

    // The smallest core module: valid Wasm, not a component.
    let (status, body) = refused(b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&body).contains("component"), "{body}");

    let (status, body) = refused(wasm(components::OLD_WORLD)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error_text(&body),
        "is built for tocsin:rule@0.1.0; this host runs tocsin:rule@0.2.0 components"
    );

    let (status, body) = refused(wasm(components::FORBIDDEN_IMPORT)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error_text(&body).starts_with("imports `evil:net/exfil`, which rules may not use"),
        "names the import: {body}"
    );

    // Parameters the rule refuses, and parameters that are not JSON.
    let (status, body) = host
        .upload(
            OPERATOR,
            "client-01",
            "r",
            &wasm(components::PRICE_CHANGE),
            Some(json!({"threshold": 5})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error_text(&body).starts_with("rejected its parameters"),
        "{body}"
    );
    let (status, body) = host
        .call(
            Some(OPERATOR),
            Method::PUT,
            "/v1/tenants/client-01/rules/r?params=%7Bnope",
            Some(("application/wasm", wasm(components::PRICE_CHANGE))),
        )
        .await;
    // A well-formed query string whose parameters are refused, like the
    // rule's own refusal above: 422, not 400 (the document's `params` is any
    // string).
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error_text(&body).starts_with("the parameters are not JSON"),
        "{body}"
    );

    // Over the tenant's component quota, and over any upload.
    let (status, _) = host
        .call(
            Some(OPERATOR),
            Method::PUT,
            "/v1/tenants/client-01/quotas",
            Some(("application/json", br#"{"component_bytes": 1000}"#.to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = refused(wasm(components::TEST_EVENT)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["quota"], "component_bytes");
    assert!(
        error_text(&body)
            .starts_with("tenant `client-01` is over its `component_bytes` quota (1000)"),
        "{body}"
    );
    let (status, _) = refused(vec![0; tocsin::api::MAX_UPLOAD_BYTES + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = host
        .call(
            Some(OPERATOR),
            Method::PUT,
            "/v1/tenants/client-01/rules/r",
            Some(("text/plain", b"hello".to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_text(&body).contains("application/wasm"), "{body}");

    let (_, rules) = host
        .call(
            Some(OPERATOR),
            Method::GET,
            "/v1/tenants/client-01/rules",
            None,
        )
        .await;
    assert_eq!(rules, json!([]), "nothing refused was registered");
    host.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_token_acts_only_for_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path())).await;
    let a = host.token("tenant-a").await;
    let b = host.token("tenant-b").await;
    let test_event = wasm(components::TEST_EVENT);
    assert_eq!(
        host.upload(&b, "tenant-b", "tests", &test_event, None)
            .await
            .0,
        StatusCode::CREATED
    );

    // Everything of tenant B, asked with A's token.
    let activate = || Some(("application/json", br#"{"version": 1}"#.to_vec()));
    let wasm_body = || Some(("application/wasm", test_event.clone()));
    let forbidden: Vec<(Method, &str, Option<Body>)> = vec![
        (Method::GET, "/v1/tenants/tenant-b/rules", None),
        (Method::GET, "/v1/tenants/tenant-b/rules/tests", None),
        (Method::PUT, "/v1/tenants/tenant-b/rules/tests", wasm_body()),
        (
            Method::POST,
            "/v1/tenants/tenant-b/rules/tests/activate",
            activate(),
        ),
        (Method::DELETE, "/v1/tenants/tenant-b/rules/tests", None),
        (Method::GET, "/v1/tenants/tenant-b/alerts", None),
        (Method::GET, "/v1/tenants/tenant-b/alerts/stream", None),
        (Method::GET, "/v1/tenants/tenant-b/buckets", None),
        (Method::GET, "/v1/tenants/tenant-b/tokens", None),
        (Method::GET, "/v1/tenants/tenant-b/quotas", None),
        // The operator's alone, even for its own tenant.
        (Method::POST, "/v1/tenants/tenant-a/tokens", None),
        (
            Method::PUT,
            "/v1/tenants/tenant-a/quotas",
            Some(("application/json", b"{}".to_vec())),
        ),
        (
            Method::DELETE,
            "/v1/tenants/tenant-b/tokens/000000000000",
            None,
        ),
        (Method::GET, "/v1/status", None),
    ];
    for (method, path, body) in forbidden {
        let (status, answer) = host.call(Some(&a), method.clone(), path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
        assert!(
            error_text(&answer).contains("acts for tenant `tenant-a` only"),
            "{method} {path}: {answer}"
        );
    }
    let (status, answer) = host
        .post_events(
            &a,
            &[json!({"eventType": "test-event", "clientId": "tenant-b"})],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        error_text(&answer).contains("post events of tenant `tenant-b`"),
        "{answer}"
    );
    assert!(
        host.alert_keys(&b, "tenant-b").await.is_empty(),
        "nothing applied"
    );

    // No token, a wrong one, a malformed header: 401 on every route.
    for token in [None, Some("tocsin_000000000000_wrong"), Some("")] {
        let (status, answer) = host
            .call(token, Method::GET, "/v1/tenants/tenant-b/rules", None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {answer}");
        error_text(&answer);
    }
    let (status, _) = host
        .post_events("nope", &[json!({"clientId": "tenant-b"})])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The probes and the API's description need none.
    for path in ["/healthz", "/readyz", "/v1/openapi.json"] {
        assert_eq!(
            host.call(None, Method::GET, path, None).await.0,
            StatusCode::OK,
            "{path}"
        );
    }

    // B's own token works; revoked, it does not.
    host.post_events(
        &b,
        &[json!({"eventType": "test-event", "clientId": "tenant-b"})],
    )
    .await;
    assert_eq!(host.alert_keys(&b, "tenant-b").await.len(), 1);
    let (_, tokens) = host
        .call(Some(&b), Method::GET, "/v1/tenants/tenant-b/tokens", None)
        .await;
    let id = tokens[0]["id"].as_str().unwrap().to_owned();
    assert!(b.contains(&id), "a token names its id");
    assert!(
        !tokens.to_string().contains(&b),
        "listing never shows a secret"
    );
    let (status, revoked) = host
        .call(
            Some(OPERATOR),
            Method::DELETE,
            &format!("/v1/tenants/tenant-b/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_string());
    let (status, answer) = host
        .call(Some(&b), Method::GET, "/v1/tenants/tenant-b/rules", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_text(&answer), "the token is unknown or revoked");
    host.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_refuse_what_exceeds_them_and_name_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path())).await;
    let (status, quotas) = host
        .call(
            Some(OPERATOR),
            Method::PUT,
            "/v1/tenants/client-01/quotas",
            Some((
                "application/json",
                br#"{"rules": 1, "events_per_second": 5}"#.to_vec(),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{quotas}");
    assert_eq!(quotas["rules"], 1);
    assert_eq!(
        quotas["fuel_per_call"],
        tocsin::runtime::DEFAULT_FUEL_PER_CALL,
        "a field left out keeps its default"
    );
    let test_event = wasm(components::TEST_EVENT);
    assert_eq!(
        host.upload(OPERATOR, "client-01", "one", &test_event, None)
            .await
            .0,
        StatusCode::CREATED
    );
    let (status, body) = host
        .upload(OPERATOR, "client-01", "two", &test_event, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["quota"], "rules");

    let event = json!({"eventType": "test-event", "clientId": "client-01"});
    let (status, body) = host.post_events(OPERATOR, &vec![event.clone(); 10]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["quota"], "events_per_second");
    assert!(
        error_text(&body).contains("more than one second's worth"),
        "{body}"
    );
    let (status, _) = host.post_events(OPERATOR, &vec![event; 5]).await;
    assert_eq!(status, StatusCode::OK, "within the quota");
    assert_eq!(host.alert_keys(OPERATOR, "client-01").await.len(), 5);

    // Fuel per call is a quota too: too little to read the manifest.
    let (status, _) = host
        .call(
            Some(OPERATOR),
            Method::PUT,
            "/v1/tenants/client-02/quotas",
            Some(("application/json", br#"{"fuel_per_call": 1000}"#.to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = host
        .upload(OPERATOR, "client-02", "tests", &test_event, None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_text(&body), "ran out of fuel (limit 1000 per call)");
    host.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_operator_token_the_host_serves_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut open = config(dir.path());
    open.operator_token = None;
    open.listen = "0.0.0.0:0".parse().unwrap();
    let error = Server::start(open.clone(), Arc::new(ManualClock::new(0)))
        .await
        .err()
        .expect("refused");
    assert!(
        error
            .to_string()
            .starts_with("refusing to listen on 0.0.0.0:0 without an operator token"),
        "{error}"
    );
    // On loopback it serves, and a caller without a token is the operator.
    open.listen = "127.0.0.1:0".parse().unwrap();
    let host = Host::start(open).await;
    let (status, body) = host
        .call(None, Method::POST, "/v1/tenants/client-01/tokens", None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A tenant token still acts for its tenant only.
    let token = body["token"].as_str().unwrap();
    let (status, _) = host
        .call(
            Some(token),
            Method::GET,
            "/v1/tenants/client-02/rules",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    host.server.stop().await.unwrap();
}

/// Every route is in the OpenAPI document, and everything the document
/// describes is a route: each path and method answers as a handler does
/// (a JSON reason), never the router's bare 404 or 405.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path())).await;
    let (status, doc) = host.call(None, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let mut documented: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    let mut routes = vec![
        "GET /healthz",
        "GET /readyz",
        "GET /v1/status",
        "GET /metrics",
        "POST /v1/events",
        "GET /v1/tenants/{tenant}/alerts",
        "GET /v1/tenants/{tenant}/alerts/stream",
        "GET /v1/tenants/{tenant}/buckets",
        "GET /v1/tenants/{tenant}/rules",
        "PUT /v1/tenants/{tenant}/rules/{rule}",
        "GET /v1/tenants/{tenant}/rules/{rule}",
        "DELETE /v1/tenants/{tenant}/rules/{rule}",
        "POST /v1/tenants/{tenant}/rules/{rule}/activate",
        "GET /v1/tenants/{tenant}/rules/{rule}/logs",
        "POST /v1/tenants/{tenant}/rules/{rule}/resume",
        "GET /v1/tenants/{tenant}/dead-letters",
        "POST /v1/tenants/{tenant}/tokens",
        "GET /v1/tenants/{tenant}/tokens",
        "DELETE /v1/tenants/{tenant}/tokens/{id}",
        "GET /v1/tenants/{tenant}/quotas",
        "PUT /v1/tenants/{tenant}/quotas",
        "POST /v1/tenants/{tenant}/silences",
        "GET /v1/tenants/{tenant}/silences",
        "DELETE /v1/tenants/{tenant}/silences/{id}",
    ];
    routes.sort();
    assert_eq!(documented, routes);

    for route in &documented {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{tenant}", "nobody")
            .replace("{rule}", "nothing")
            .replace("{id}", "000000000000");
        let method: Method = method.parse().unwrap();
        // With a tenant token of another tenant every route but the
        // probes answers 403 with a reason: the handler ran.
        let stranger = host.token("stranger").await;
        let (status, body) = host
            .call(Some(&stranger), method.clone(), &path, None)
            .await;
        if path == "/healthz" || path == "/readyz" {
            assert_eq!(status, StatusCode::OK, "{route}");
            continue;
        }
        if path == "/v1/events" {
            // Its body decides: no events is nothing to refuse.
            assert_eq!(status, StatusCode::OK, "{route}: {body}");
            continue;
        }
        assert_eq!(status, StatusCode::FORBIDDEN, "{route}: {body}");
    }
    host.server.stop().await.unwrap();
}

/// A new version reads the state the previous one left (the SDK's
/// versioned state encoding); one that cannot is refused with an error
/// naming both versions, and the bucket keeps its state; one that declares
/// a reset starts afresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_reads_upgrades_refuses_or_resets_the_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(config(dir.path())).await;
    let machine = |id: &str| json!({"clientId": "client-07", "machineId": id, "state": "running"});
    let v1 = wasm(components::COUNTER_V1);
    let v2 = wasm(components::COUNTER_V2);
    host.upload(OPERATOR, "client-07", "counter", &v1, None)
        .await;
    host.post_events(OPERATOR, &[machine("m1"), machine("m1"), machine("m2")])
        .await;
    assert_eq!(sorted_keys(&host).await, ["count-1", "count-1", "count-2"]);

    // Version 2 of schema 2 refusing schema 1: m1's event is rejected,
    // naming both versions; its state is kept.
    let (status, _) = host
        .upload(
            OPERATOR,
            "client-07",
            "counter",
            &v2,
            Some(json!({"old_state": "refuse"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, answer) = host.post_events(OPERATOR, &[machine("m1")]).await;
    let error = answer["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "state schema 1 written by counter@1.0.0 cannot be read by counter@2.0.0 (state schema 2): asked to refuse older states"
        ),
        "{answer}"
    );
    assert_eq!(sorted_keys(&host).await.len(), 3, "nothing raised");

    // Upgrading: m1 counts on from 2.
    host.upload(OPERATOR, "client-07", "counter", &v2, None)
        .await;
    host.post_events(OPERATOR, &[machine("m1")]).await;
    assert!(sorted_keys(&host).await.contains(&"count-3".to_owned()));

    // Back to version 1, which cannot read what version 2 wrote.
    let (_, rule) = host
        .call(
            Some(OPERATOR),
            Method::POST,
            "/v1/tenants/client-07/rules/counter/activate",
            Some(("application/json", br#"{"version": 1}"#.to_vec())),
        )
        .await;
    assert_eq!(rule["active_version"], 1);
    let (_, answer) = host.post_events(OPERATOR, &[machine("m1")]).await;
    assert!(
        answer["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("state schema 2 written by counter@2.0.0 cannot be read by counter@1.0.0 (state schema 1): it is newer"),
        "{answer}"
    );

    // Version 1 counts m3; a version declaring a reset starts it afresh.
    host.post_events(OPERATOR, &[machine("m3"), machine("m3")])
        .await;
    host.upload(
        OPERATOR,
        "client-07",
        "counter",
        &v2,
        Some(json!({"old_state": "reset"})),
    )
    .await;
    host.post_events(OPERATOR, &[machine("m3")]).await;
    let keys = sorted_keys(&host).await;
    assert_eq!(
        keys.iter().filter(|k| *k == "count-1").count(),
        4,
        "m1, m2, m3 and m3 again after the reset: {keys:?}"
    );
    host.server.stop().await.unwrap();
}
