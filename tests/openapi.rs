//! The API contract: `GET /v1/openapi.json` is a valid OpenAPI 3.1
//! document (by openapi-spec-validator), and every route answers as it
//! describes, malformed input too: schemathesis walks every operation with
//! generated valid and invalid paths, query strings, headers and bodies and
//! checks each answer's status, content type and body against the
//! document; the checks here add what it cannot walk (the endless live
//! stream) and the defects this contract was written for, each checked
//! against the document the same way.
//!
//! Both tools are installed by `./scripts/test` (scripts/api-tools), which
//! exports their paths in TOCSIN_OPENAPI_VALIDATOR and TOCSIN_SCHEMATHESIS.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tocsin::clock::ManualClock;
use tocsin::config::Config;
use tocsin::serve::Server;

const OPERATOR: &str = "operator-token-for-the-openapi-tests-0123456789";

/// Longest a schemathesis run may take before the test fails: it is bounded
/// by examples per operation, this only catches a hang.
const SCHEMATHESIS_DEADLINE: Duration = Duration::from_secs(480);

fn config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        max_instances: 16,
        operator_token: Some(OPERATOR.to_owned()),
        ..Config::default()
    }
}

/// The tool whose path `var` holds. Unset: a failure in CI, which must run
/// every check; elsewhere a printed note and `None` (the test is skipped).
fn tool(var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path));
    }
    let message = format!(
        "{var} is not set: run ./scripts/test, which installs the API tools (scripts/api-tools) and sets it"
    );
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{message}");
    }
    eprintln!("skipped: {message}");
    None
}

struct Host {
    server: Server,
    base: String,
    http: reqwest::Client,
}

/// An answer: status, content type (without parameters) and body.
struct Answer {
    status: StatusCode,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("a JSON body ({e}): {}", self.text))
    }

    /// The `error` of a JSON error body.
    fn error(&self) -> String {
        assert_eq!(self.content_type, "application/json", "{}", self.text);
        let body = self.json();
        let object = body.as_object().expect("an object");
        assert!(
            object.keys().all(|k| k == "error" || k == "quota"),
            "only `error` (and `quota`): {body}"
        );
        body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("a JSON error body: {body}"))
            .to_owned()
    }
}

impl Host {
    async fn start() -> (Host, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(config(dir.path()), Arc::new(ManualClock::new(1_000)))
            .await
            .expect("server starts");
        let host = Host {
            base: format!("http://{}", server.addr()),
            server,
            // A fresh connection per request: the host closes one after
            // refusing a body too large to read, and a pooled client would
            // send the next request down it (a broken pipe, not an answer).
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        };
        (host, dir)
    }

    async fn call(&self, method: Method, path: &str, body: Option<(&str, Vec<u8>)>) -> Answer {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(OPERATOR);
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| {
                v.to_str()
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        Answer {
            status,
            content_type,
            text: response.text().await.unwrap(),
        }
    }

    async fn document(&self) -> Value {
        let answer = self.call(Method::GET, "/v1/openapi.json", None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(answer.content_type, "application/json");
        answer.json()
    }
}

/// Whether the document lists `answer`'s status, with its content type, for
/// `method template`; an error answer is also `{"error": "…"}`.
fn assert_documented(doc: &Value, method: &Method, template: &str, answer: &Answer) {
    let operation = &doc["paths"][template][method.as_str().to_lowercase()];
    assert!(
        operation.is_object(),
        "{method} {template} is not documented"
    );
    let response = &operation["responses"][answer.status.as_str()];
    assert!(
        response.is_object(),
        "{method} {template} answered {} ({}), which its document does not list: {}",
        answer.status,
        answer.text,
        operation["responses"]
    );
    if let Some(content) = response["content"].as_object() {
        assert!(
            content.contains_key(&answer.content_type),
            "{method} {template} {}: content type `{}` is not documented ({:?})",
            answer.status,
            answer.content_type,
            content.keys().collect::<Vec<_>>()
        );
    }
    if answer.status.is_client_error() || answer.status.is_server_error() {
        answer.error();
    }
}

/// `(method, path, name, in)` of every parameter of the document.
fn parameters(doc: &Value) -> Vec<(String, String, String, String)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                found.push((
                    method.to_uppercase(),
                    path.clone(),
                    parameter["name"].as_str().unwrap().to_owned(),
                    parameter["in"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    found.sort();
    found
}

/// `command`, bounded by `deadline`: its exit status and everything it
/// printed.
fn run(mut command: Command, deadline: Duration) -> (std::process::ExitStatus, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?} starts: {e}"));
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            child.kill().unwrap();
            child.wait().unwrap();
            let printed = std::fs::read_to_string(out.path()).unwrap_or_default();
            panic!("{command:?} did not end within {deadline:?}; it printed:\n{printed}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(out.path()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_served_document_is_valid_openapi_3_1() {
    let Some(validator) = tool("TOCSIN_OPENAPI_VALIDATOR") else {
        return;
    };
    let (host, dir) = Host::start().await;
    let doc = host.document().await;
    assert_eq!(doc["openapi"], "3.1.0");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let mut command = Command::new(&validator);
    command.arg("--schema").arg("3.1").arg(&file);
    let (status, printed) =
        tokio::task::spawn_blocking(move || run(command, Duration::from_secs(120)))
            .await
            .unwrap();
    println!("{printed}");
    assert!(
        status.success(),
        "openapi-spec-validator: {status}\n{printed}"
    );
    assert!(printed.contains("OK"), "{printed}");

    // The parameters each sit where the routes read them.
    let query: Vec<_> = parameters(&doc)
        .into_iter()
        .filter(|(_, _, _, place)| place == "query")
        .map(|(method, path, name, _)| format!("{method} {path} {name}"))
        .collect();
    assert_eq!(
        query,
        [
            "GET /v1/tenants/{tenant}/alerts after",
            "GET /v1/tenants/{tenant}/alerts limit",
            "GET /v1/tenants/{tenant}/alerts/stream after",
            "GET /v1/tenants/{tenant}/alerts/stream limit",
            "GET /v1/tenants/{tenant}/dead-letters after",
            "GET /v1/tenants/{tenant}/dead-letters limit",
            "PUT /v1/tenants/{tenant}/rules/{rule} activate",
            "PUT /v1/tenants/{tenant}/rules/{rule} params",
        ]
    );
    for (method, path, name, place) in parameters(&doc) {
        if place == "path" {
            assert!(
                path.contains(&format!("{{{name}}}")),
                "{method} {path}: path parameter `{name}` is not in the path"
            );
        }
    }
    host.server.stop().await.unwrap();
}

/// schemathesis walks every operation but the endless live stream (its
/// answers are checked below) with generated input, valid and not, and
/// checks every answer against the document: no 5xx, every status and
/// content type documented, bodies and headers as their schemas say,
/// invalid input refused and valid input taken.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_every_answer_as_documented() {
    let Some(schemathesis) = tool("TOCSIN_SCHEMATHESIS") else {
        return;
    };
    let (host, dir) = Host::start().await;
    let examples = std::env::var("TOCSIN_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "30".into());
    // Bodies of the media types schemathesis does not know are sent as
    // generated: NDJSON lines as text, a component as its bytes.
    std::fs::write(
        dir.path().join("tocsin_hooks.py"),
        r#"import json
import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if value is None:
        return b""
    # Not a string (a negative case): bytes that are not text at all,
    # not its JSON, which a JSON array body would make valid.
    return b"\xff" + json.dumps(value).encode()


@schemathesis.serializer("application/wasm")
def wasm(ctx, value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    # Not binary (a negative case): its JSON.
    return json.dumps(value).encode()
"#,
    )
    .unwrap();
    // Valid input must be taken (2xx) or refused for who asks (401, 403),
    // what is missing (404), what clashes (409), or what the schema cannot
    // say (422: a tenant id, a quota of 0, an RFC 3339 time), never with a
    // 400 or a 5xx.
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks.positive_data_acceptance]\n\
         expected-statuses = [\"2xx\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\"]\n",
    )
    .unwrap();
    let mut command = Command::new(&schemathesis);
    command
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("PYTHONPATH", dir.path())
        .env("SCHEMATHESIS_HOOKS", "tocsin_hooks")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/v1/openapi.json", host.base))
        .args(["--checks", "all"])
        .args(["--header", &format!("Authorization: Bearer {OPERATOR}")])
        .args(["--exclude-path", "/v1/tenants/{tenant}/alerts/stream"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &examples])
        // Reproducible in CI; another seed explores elsewhere.
        .args([
            "--seed",
            &std::env::var("TOCSIN_SCHEMATHESIS_SEED").unwrap_or_else(|_| "24".into()),
        ])
        .args(["--workers", "2"])
        .args(["--request-timeout", "30"])
        .arg("--no-shrink")
        .args(["--suppress-health-check", "all"]);
    let (status, printed) =
        tokio::task::spawn_blocking(move || run(command, SCHEMATHESIS_DEADLINE))
            .await
            .unwrap();
    println!("{printed}");
    assert!(
        status.success(),
        "schemathesis found answers the document does not describe: {status}\n{printed}"
    );
    host.server.stop().await.unwrap();
}

/// The malformed input of issue 24, and what schemathesis cannot walk:
/// each answer a JSON error naming the problem, with a status and content
/// type the document lists for the route.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_is_refused_as_documented_naming_the_problem() {
    let (host, _dir) = Host::start().await;
    let doc = host.document().await;
    let alerts = "/v1/tenants/{tenant}/alerts";
    let stream = "/v1/tenants/{tenant}/alerts/stream";
    let dead = "/v1/tenants/{tenant}/dead-letters";
    let rule = "/v1/tenants/{tenant}/rules/{rule}";
    let quotas = "/v1/tenants/{tenant}/quotas";
    let activate = "/v1/tenants/{tenant}/rules/{rule}/activate";
    let silences = "/v1/tenants/{tenant}/silences";
    let at = |template: &str, query: &str| {
        format!(
            "{}{query}",
            template
                .replace("{tenant}", "client-01")
                .replace("{rule}", "r")
        )
    };
    let wasm = || Some(("application/wasm", b"\0asm".to_vec()));
    let json_body = |value: Value| Some(("application/json", value.to_string().into_bytes()));

    // (method, template, query, body, status, words the error must hold)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        Method,
        &str,
        &str,
        Option<(&str, Vec<u8>)>,
        StatusCode,
        &[&str],
    )> = vec![
        (
            Method::GET,
            alerts,
            "?limit=-1",
            None,
            StatusCode::BAD_REQUEST,
            &["limit"],
        ),
        (
            Method::GET,
            alerts,
            "?after=-5",
            None,
            StatusCode::BAD_REQUEST,
            &["after"],
        ),
        (
            Method::GET,
            alerts,
            "?after=x",
            None,
            StatusCode::BAD_REQUEST,
            &["after"],
        ),
        (
            Method::GET,
            alerts,
            "?limit=2147483648",
            None,
            StatusCode::BAD_REQUEST,
            &["limit"],
        ),
        (
            Method::GET,
            alerts,
            "?after=9223372036854775808",
            None,
            StatusCode::BAD_REQUEST,
            &["after"],
        ),
        (
            Method::GET,
            stream,
            "?limit=-1",
            None,
            StatusCode::BAD_REQUEST,
            &["limit"],
        ),
        (
            Method::GET,
            stream,
            "?after=x",
            None,
            StatusCode::BAD_REQUEST,
            &["after"],
        ),
        (
            Method::GET,
            dead,
            "?limit=-1",
            None,
            StatusCode::BAD_REQUEST,
            &["limit"],
        ),
        (
            Method::GET,
            dead,
            "?after=1.5",
            None,
            StatusCode::BAD_REQUEST,
            &["after"],
        ),
        (
            Method::PUT,
            rule,
            "?activate=AAA",
            wasm(),
            StatusCode::BAD_REQUEST,
            &["activate"],
        ),
        (
            Method::PUT,
            rule,
            "?params=%7Bx",
            wasm(),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["parameters", "JSON"],
        ),
        (
            Method::PUT,
            rule,
            "",
            Some(("text/plain", b"x".to_vec())),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &["application/wasm"],
        ),
        (
            Method::PUT,
            quotas,
            "",
            json_body(json!({"rules": 2147483648u64})),
            StatusCode::BAD_REQUEST,
            &["`rules`", "2147483647"],
        ),
        (
            Method::PUT,
            quotas,
            "",
            json_body(json!({"rules": -1})),
            StatusCode::BAD_REQUEST,
            &["`rules`"],
        ),
        (
            Method::PUT,
            quotas,
            "",
            json_body(json!({"fuel_per_call": 9223372036854775808u64})),
            StatusCode::BAD_REQUEST,
            &["`fuel_per_call`"],
        ),
        (
            Method::PUT,
            quotas,
            "",
            json_body(json!({"rules": "many"})),
            StatusCode::BAD_REQUEST,
            &["`rules`"],
        ),
        (
            Method::PUT,
            quotas,
            "",
            Some(("application/json", b"{\"rules\": ".to_vec())),
            StatusCode::BAD_REQUEST,
            &["quotas"],
        ),
        (
            Method::PUT,
            quotas,
            "",
            json_body(json!({"log_bytes": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["log_bytes"],
        ),
        (
            Method::POST,
            activate,
            "",
            json_body(json!({"version": 2147483648u64})),
            StatusCode::BAD_REQUEST,
            &["`version`"],
        ),
        (
            Method::POST,
            activate,
            "",
            json_body(json!({"version": "1"})),
            StatusCode::BAD_REQUEST,
            &["`version`"],
        ),
        (
            Method::POST,
            activate,
            "",
            json_body(json!({"version": 1, "extra": 1})),
            StatusCode::BAD_REQUEST,
            &["extra"],
        ),
        (
            Method::POST,
            activate,
            "",
            Some(("application/json", vec![b' '; 3 << 20])),
            StatusCode::PAYLOAD_TOO_LARGE,
            &["length limit"],
        ),
        (
            Method::POST,
            silences,
            "",
            json_body(json!({"matchers": {}, "ends_at": 5, "created_by": "a", "comment": "b"})),
            StatusCode::BAD_REQUEST,
            &["`ends_at`"],
        ),
    ];
    for (method, template, query, body, status, words) in cases {
        let answer = host.call(method.clone(), &at(template, query), body).await;
        let case = format!("{method} {template}{query}");
        assert_eq!(answer.status, status, "{case}: {}", answer.text);
        let error = answer.error();
        for word in words {
            assert!(error.contains(word), "{case}: `{word}` in {error:?}");
        }
        assert_documented(&doc, &method, template, &answer);
    }

    // In range, the quota is taken.
    let answer = host
        .call(
            Method::PUT,
            &at(quotas, ""),
            json_body(json!({"rules": 2147483647})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json()["rules"], 2147483647);
    assert_documented(&doc, &Method::PUT, quotas, &answer);

    // A path segment that is not UTF-8 once decoded.
    let answer = host.call(Method::GET, "/v1/tenants/%FF/rules", None).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    assert!(answer.error().contains("path"), "{}", answer.text);
    assert_documented(&doc, &Method::GET, "/v1/tenants/{tenant}/rules", &answer);

    // The router's own answers are JSON errors too.
    let answer = host.call(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(
        answer.error().contains("/v1/nothing-here"),
        "{}",
        answer.text
    );
    let response = host
        .http
        .request(Method::PATCH, format!("{}/v1/tenants/t/quotas", host.base))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "GET,HEAD,PUT");
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("PATCH"), "{body}");

    host.server.stop().await.unwrap();
}
