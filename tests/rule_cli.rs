//! `tocsin rule test`, `tocsin rule inspect` and `tocsin replay` as a user
//! runs them: exit codes, alerts on stdout, errors on stderr.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use tocsin_test_support::{self as support, components};

fn tocsin(args: &[&str], stdin: Option<&str>) -> Output {
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tocsin"))
        .args(args)
        .env("TOCSIN_CACHE_DIR", cache.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tocsin");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn events_file(lines: &[String]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    file
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn alerts(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each stdout line is a JSON alert"))
        .collect()
}

#[test]
fn prints_each_alert_as_a_json_line_and_a_summary() {
    let file = events_file(&support::seed_events());
    let path = file.path().to_str().unwrap();
    let out = tocsin(
        &[
            "rule",
            "test",
            components::ALL_MACHINES_STOPPED,
            "--events",
            path,
            "--batch-size",
            "4",
            "--now",
            "2026-11-25T00:00:00Z",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let alerts = alerts(&out);
    let client_01: Vec<_> = alerts
        .iter()
        .filter(|a| a["tenant"] == "client-01")
        .collect();
    assert_eq!(client_01.len(), 3);
    let first = client_01[0];
    assert_eq!(first["rule"], "all-machines-stopped");
    assert_eq!(first["bucket"], "");
    assert_eq!(first["status"], "firing");
    assert_eq!(first["key"], "all-stopped");
    assert_eq!(first["at"], 1_795_564_800_000i64);
    assert_eq!(first["id"].as_str().unwrap().len(), 32);
    assert!(
        first["title"].as_str().unwrap().contains("stopped"),
        "{first}"
    );
    let summary = stderr(&out);
    let events = support::seed_events().len();
    assert!(
        summary.contains(&format!("events: {events} (")),
        "{summary}"
    );
    assert!(
        summary.contains("tenants: 2") && summary.contains("alerts: 6"),
        "{summary}"
    );
}

#[test]
fn reads_standard_input_and_honours_the_tenant_field() {
    let input = r#"{"eventType":"test-event","tenant":"acme"}
{"eventType":"other","tenant":"acme"}
{"eventType":"test-event","tenant":"globex"}
"#;
    let out = tocsin(
        &[
            "rule",
            "test",
            components::TEST_EVENT,
            "--events",
            "-",
            "--tenant-field",
            "tenant",
        ],
        Some(input),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tenants: Vec<_> = alerts(&out)
        .iter()
        .map(|a| a["tenant"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tenants, ["acme", "globex"]);
}

#[test]
fn a_bad_line_fails_with_its_number_and_reason() {
    let lines = [
        r#"{"eventType":"test-event","clientId":"c1"}"#.to_owned(),
        String::new(),
        r#"{"eventType":"test-event","clientId":"c1""#.to_owned(),
    ];
    let file = events_file(&lines);
    let out = tocsin(
        &[
            "rule",
            "test",
            components::TEST_EVENT,
            "--events",
            file.path().to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("line 3: not valid JSON"),
        "{}",
        stderr(&out)
    );
    assert!(
        out.stdout.is_empty(),
        "nothing runs before the input is read whole"
    );

    let out = tocsin(
        &["rule", "test", components::TEST_EVENT, "--events", "-"],
        Some("{\"eventType\":\"test-event\"}\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("line 1: no tenant: field `clientId` is missing"),
        "{}",
        stderr(&out)
    );

    let out = tocsin(
        &["rule", "test", components::TEST_EVENT, "--events", "-"],
        Some("[1,2]\n"),
    );
    assert!(
        stderr(&out).contains("line 1: not a JSON object"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unreadable_files_and_invalid_components_fail_clearly() {
    let out = tocsin(
        &[
            "rule",
            "test",
            components::TEST_EVENT,
            "--events",
            "/nonexistent/events.ndjson",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read events file /nonexistent/events.ndjson"),
        "{}",
        stderr(&out)
    );

    let out = tocsin(
        &["rule", "test", "/nonexistent/rule.wasm", "--events", "-"],
        Some(""),
    );
    assert!(
        stderr(&out).contains("cannot read rule component /nonexistent/rule.wasm"),
        "{}",
        stderr(&out)
    );

    let junk = events_file(&["this is not wasm".to_owned()]);
    let out = tocsin(
        &[
            "rule",
            "test",
            junk.path().to_str().unwrap(),
            "--events",
            "-",
        ],
        Some(""),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a valid rule component"),
        "{}",
        stderr(&out)
    );

    let out = tocsin(
        &[
            "rule",
            "test",
            components::FORBIDDEN_IMPORT,
            "--events",
            "-",
        ],
        Some(""),
    );
    assert!(
        stderr(&out).contains("imports `evil:net/exfil`"),
        "{}",
        stderr(&out)
    );

    let out = tocsin(
        &[
            "rule",
            "test",
            components::TEST_EVENT,
            "--events",
            "-",
            "--batch-size",
            "0",
        ],
        Some(""),
    );
    assert_eq!(out.status.code(), Some(2), "clap rejects a zero batch size");
}

#[test]
fn a_rule_failure_names_tenant_rule_and_cause() {
    let input = "{\"clientId\":\"evil\"}\n{\"clientId\":\"evil\",\"attack\":\"loop\"}\n";
    let out = tocsin(
        &["rule", "test", components::HOSTILE, "--events", "-"],
        Some(input),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    // Run as the host runs it: the failing event is bisected out and
    // reported by its line, the other is applied, and the test fails.
    assert!(
        err.contains("-: line 2: rule `hostile@0.1.0` of tenant `evil`: ran out of fuel"),
        "{err}"
    );
    assert!(!err.contains("line 1:"), "{err}");
    assert!(err.contains("events: 2 (1 applied)"), "{err}");
    assert!(
        err.ends_with("error: -: the rule did not apply 1 of 2 events (listed above)\n"),
        "{err}"
    );

    let input = r#"{"clientId":"c","eventType":"machineStatusChange","machineId":"m","state":"running"}
{"clientId":"c","eventType":"machineStatusChange","machineId":"m"}
"#;
    let out = tocsin(
        &[
            "rule",
            "test",
            components::ANY_MACHINE_STOPPED,
            "--events",
            "-",
        ],
        Some(input),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("line 2: rule `any-machine-stopped@1.1.0` of tenant `c`: rejected event"),
        "{err}"
    );
    assert!(err.contains("`state` must be a string"), "{err}");

    // A rule may blame an event the batch does not have: reported, no panic.
    let input = "{\"clientId\":\"evil\",\"attack\":\"bad-index\"}\n";
    let out = tocsin(
        &["rule", "test", components::HOSTILE, "--events", "-"],
        Some(input),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("line 1: rule `hostile@0.1.0` of tenant `evil`: rejected event #999 of the batch: made up"),
        "{err}"
    );
}

fn seed_rule_flags() -> Vec<String> {
    support::SEED_RULES
        .iter()
        .flat_map(|(tenant, rule)| {
            [
                "--rule".to_owned(),
                format!("{tenant}={}", support::seed_component(rule)),
            ]
        })
        .collect()
}

/// Per (tenant, rule, bucket), the alerts' shapes in order.
fn by_bucket(
    alerts: &[serde_json::Value],
) -> std::collections::BTreeMap<(String, String, String), Vec<support::AlertShape>> {
    let mut buckets = std::collections::BTreeMap::new();
    for alert in alerts {
        let s = |k: &str| alert[k].as_str().unwrap().to_owned();
        buckets
            .entry((s("tenant"), s("rule"), s("bucket")))
            .or_insert_with(Vec::new)
            .push((s("tenant"), s("rule"), s("bucket"), s("key"), s("status")));
    }
    buckets
}

fn seed_by_bucket() -> std::collections::BTreeMap<(String, String, String), Vec<support::AlertShape>>
{
    let mut buckets = std::collections::BTreeMap::new();
    for (tenant, rule) in support::SEED_RULES {
        for shape in support::seed_expected(rule, tenant) {
            buckets
                .entry((shape.0.clone(), shape.1.clone(), shape.2.clone()))
                .or_insert_with(Vec::new)
                .push(shape);
        }
    }
    buckets
}

#[test]
fn replay_runs_every_configured_rule_over_a_file_and_reports_bad_lines_by_number() {
    let mut lines = support::seed_events();
    lines.insert(3, "not json".to_owned());
    lines.insert(
        5,
        r#"{"eventType":"test-event","clientId":"client-99"}"#.to_owned(),
    );
    let file = events_file(&lines);
    let path = file.path().to_str().unwrap();
    let mut args = vec!["replay".to_owned(), "--events".to_owned(), path.to_owned()];
    args.extend(seed_rule_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tocsin(&args, None);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(by_bucket(&alerts(&out)), seed_by_bucket());
    assert!(err.contains(&format!("{path}:4: not valid JSON")), "{err}");
    assert!(
        err.contains(&format!(
            "{path}:6: unknown tenant `client-99`: no rules are configured for it"
        )),
        "{err}"
    );
    let events = support::seed_events().len() + 1;
    let alerts = alerts(&out).len();
    assert!(
        err.contains(&format!(
            "events: {events}, bad lines: 1, not applied: 1, alerts: {alerts}, "
        )),
        "{err}"
    );
    assert!(err.trim_end().ends_with("events/s"), "{err}");
}

#[test]
fn replay_keeps_state_in_its_data_directory_across_runs() {
    let seed = support::seed_events();
    let (first, second) = seed.split_at(seed.len() / 2);
    let data = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for (n, part) in [first, second].into_iter().enumerate() {
        // Each run names its file apart, as positions (and alert ids) do.
        let file = events_file(part);
        let named = data.path().join(format!("part-{n}.ndjson"));
        std::fs::copy(file.path(), &named).unwrap();
        let mut args = vec![
            "replay".to_owned(),
            "--events".to_owned(),
            named.display().to_string(),
            "--data-dir".to_owned(),
            data.path().join("state").display().to_string(),
            "--batch-size".to_owned(),
            "7".to_owned(),
        ];
        args.extend(seed_rule_flags());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tocsin(&args, None);
        assert!(out.status.success(), "{}", stderr(&out));
        all.extend(alerts(&out));
    }
    assert_eq!(
        by_bucket(&all),
        seed_by_bucket(),
        "two runs on one data directory alert as one run over the whole file"
    );
}

#[test]
fn rule_test_takes_parameters_from_a_file_and_names_a_bad_one() {
    let events = events_file(&support::seed_events());
    let events = events.path().to_str().unwrap();
    let params = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        params.path(),
        support::json_seed_params("all-machines-stopped").to_string(),
    )
    .unwrap();
    let params_path = params.path().to_str().unwrap();
    let args = ["rule", "test", components::JSON_RULE, "--events", events];
    let out = tocsin(&[&args[..], &["--params", params_path]].concat(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: Vec<(String, String, String)> = alerts(&out)
        .iter()
        .filter(|a| a["tenant"] == "client-01")
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_owned();
            (s("rule"), s("key"), s("status"))
        })
        .collect();
    let expect = |status: &str| ("all-machines-stopped".into(), "all".into(), status.into());
    assert_eq!(
        seen,
        [expect("firing"), expect("resolved"), expect("firing")]
    );

    // Without parameters json-rule is a rule that matches every event.
    let out = tocsin(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(alerts(&out).iter().all(|a| a["rule"] == "json-rule"));

    std::fs::write(params.path(), r#"{"evaluate": {"type": "most"}}"#).unwrap();
    let out = tocsin(&[&args[..], &["--params", params_path]].concat(), None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("rejected its parameters: `evaluate.type`: unknown variant `most`, expected `any` or `all`"),
        "{err}"
    );
    std::fs::write(params.path(), "{not json").unwrap();
    let out = tocsin(&[&args[..], &["--params", params_path]].concat(), None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("are not JSON"), "{}", stderr(&out));
}

#[test]
fn replay_runs_a_rule_under_a_name_with_parameters_from_the_flag() {
    let quotes: Vec<String> = [100.0, 102.0, 108.0]
        .iter()
        .enumerate()
        .map(|(i, price)| {
            serde_json::json!({"eventType": "quote", "clientId": "client-05", "ticker": "AMZN",
                               "price": price, "time": 1_795_564_800_000_i64 + i as i64})
            .to_string()
        })
        .collect();
    let events = events_file(&quotes);
    let params = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(params.path(), r#"{"threshold_pct": 5}"#).unwrap();
    let inline = format!(
        "client-05/big-moves={}?{{\"threshold_pct\": 5}}",
        components::PRICE_CHANGE
    );
    let from_file = format!(
        "client-05/also-big={}?@{}",
        components::PRICE_CHANGE,
        params.path().display()
    );
    let default = format!("client-05={}", components::PRICE_CHANGE);
    let out = tocsin(
        &[
            "replay",
            "--events",
            events.path().to_str().unwrap(),
            "--rule",
            &inline,
            "--rule",
            &from_file,
            "--rule",
            &default,
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut per_rule = std::collections::BTreeMap::new();
    for alert in alerts(&out) {
        *per_rule
            .entry(alert["rule"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_rule,
        std::collections::BTreeMap::from([
            ("also-big".to_owned(), 1),
            ("big-moves".to_owned(), 1),
            ("price-change".to_owned(), 2),
        ])
    );

    let out = tocsin(
        &[
            "replay",
            "--events",
            events.path().to_str().unwrap(),
            "--rule",
            &format!("client-05={}?{{oops", components::PRICE_CHANGE),
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("are not JSON"), "{}", stderr(&out));
}

#[test]
fn inspect_prints_manifest_and_imports() {
    let out = tocsin(&["rule", "inspect", components::ANY_MACHINE_STOPPED], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("rule:        any-machine-stopped@1.1.0"),
        "{text}"
    );
    assert!(
        text.contains("filter:      eventType == \"machineStatusChange\""),
        "{text}"
    );
    assert!(text.contains("bucket key:  machineId"), "{text}");
    assert!(text.contains("tocsin:rule/host@0.2.0"), "{text}");
    assert!(!text.contains("wasi:sockets"), "{text}");
}

/// The other way tenants build: `cargo component build --release`
/// (cargo-component 0.21.1, which `scripts/setup` installs). Its output
/// imports `wasi:filesystem` and more, and the host runs it all the same.
#[test]
fn a_rule_built_with_cargo_component_runs_like_the_plain_build() {
    let crate_dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rules-examples/any-machine-stopped"
    );
    let target = tempfile::tempdir().unwrap();
    let build = Command::new("cargo")
        .args(["component", "build", "--release", "--quiet"])
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", target.path())
        .output()
        .expect("cargo component is installed (scripts/setup installs it)");
    assert!(
        build.status.success(),
        "cargo component build failed: {}",
        stderr(&build)
    );
    let wasm = target
        .path()
        .join("wasm32-wasip1/release/any_machine_stopped.wasm");
    let file = events_file(&support::seed_events());
    let args = |rule: &str| {
        tocsin(
            &[
                "rule",
                "test",
                rule,
                "--events",
                file.path().to_str().unwrap(),
                "--now",
                "0",
            ],
            None,
        )
    };
    let component = args(wasm.to_str().unwrap());
    assert!(component.status.success(), "{}", stderr(&component));
    let plain = args(components::ANY_MACHINE_STOPPED);
    assert_eq!(alerts(&component), alerts(&plain));
    assert_eq!(alerts(&component).len(), 14, "7 alerts per tenant");
}

/// `tocsin` with `env` set, without the test's own cache dir.
fn tocsin_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
    command
        .args(args)
        .env_remove("TOCSIN_TOKEN")
        .env_remove("TOCSIN_URL");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run tocsin")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The operator issues a tenant token with the CLI; the tenant uploads,
/// lists and activates its rule with it, and is refused another tenant's.
#[test]
fn the_cli_manages_a_running_hosts_rules_with_tokens() {
    const OPERATOR: &str = "the-operator-token-of-the-cli-test-0123456789";
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("TOCSIN_OPERATOR_TOKEN", OPERATOR)
        .env("RUST_LOG", "warn");
    let (child, base) = support::spawn_serve(&mut command);
    let _host = support::Kill(child);

    let token = tocsin_env(
        &["tenant", "token", "client-01"],
        &[("TOCSIN_URL", &base), ("TOCSIN_TOKEN", OPERATOR)],
    );
    assert!(token.status.success(), "{}", stderr(&token));
    let token = stdout(&token).trim().to_owned();
    assert!(token.starts_with("tocsin_"), "{token}");
    let as_tenant = [
        ("TOCSIN_URL", base.as_str()),
        ("TOCSIN_TOKEN", token.as_str()),
    ];

    let upload = tocsin_env(
        &[
            "rule",
            "upload",
            components::TEST_EVENT,
            "--tenant",
            "client-01",
            "--name",
            "tests",
        ],
        &as_tenant,
    );
    assert!(upload.status.success(), "{}", stderr(&upload));
    assert!(
        stdout(&upload).starts_with("uploaded: client-01/tests version 1 (test-event@"),
        "{}",
        stdout(&upload)
    );
    let list = tocsin_env(&["rule", "list", "--tenant", "client-01"], &as_tenant);
    assert!(list.status.success(), "{}", stderr(&list));
    let listed = stdout(&list);
    let row = listed.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("tests"), "{listed}");
    assert!(
        row.contains("registry") && row.contains("test-event@"),
        "{listed}"
    );

    let activate = tocsin_env(
        &[
            "rule",
            "activate",
            "--tenant",
            "client-01",
            "--name",
            "tests",
            "--version",
            "1",
        ],
        &as_tenant,
    );
    assert!(activate.status.success(), "{}", stderr(&activate));

    let refused = tocsin_env(&["rule", "list", "--tenant", "client-02"], &as_tenant);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("403 Forbidden")
            && stderr(&refused).contains("acts for tenant `client-01` only"),
        "{}",
        stderr(&refused)
    );
    let anonymous = tocsin_env(
        &["rule", "list", "--tenant", "client-01"],
        &[("TOCSIN_URL", &base)],
    );
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(stderr(&anonymous).contains("401"), "{}", stderr(&anonymous));
    assert!(
        stderr(&anonymous).contains("--token or TOCSIN_TOKEN"),
        "{}",
        stderr(&anonymous)
    );
}

/// A tenant's first hour, from an empty directory outside this repository
/// with the `tocsin` binary alone (copied there) and a `HOME` that knows
/// nothing of the checkout: `rule new` → `cargo test` → a build with cargo
/// and with cargo-component → `rule test` passes → upload to a running
/// host with a tenant token → post events → read the alerts.
#[test]
fn a_new_user_goes_from_rule_new_to_alerts_outside_the_repository() {
    const OPERATOR: &str = "the-operator-token-of-the-journey-test-0123";
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let bin = work.path().join("bin/tocsin");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_tocsin"), &bin).unwrap();
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .canonicalize()
        .unwrap();
    // The toolchain stays where rustup put it; nothing else is inherited.
    let real_home = std::path::PathBuf::from(std::env::var_os("HOME").unwrap());
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| real_home.join(".cargo"));
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| real_home.join(".rustup"));
    let user = |program: &std::path::Path, args: &[&str], dir: &std::path::Path| -> Output {
        let mut command = Command::new(program);
        command.args(args).current_dir(dir).env_clear();
        for var in ["PATH", "LANG", "TMPDIR"] {
            if let Some(value) = std::env::var_os(var) {
                command.env(var, value);
            }
        }
        command
            .env("HOME", &home)
            .env("CARGO_HOME", &cargo_home)
            .env("RUSTUP_HOME", &rustup_home)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
    };

    let version = user(&bin, &["--version"], work.path());
    assert_eq!(
        stdout(&version),
        format!(
            "tocsin {} (hosts tocsin:rule@0.2.0 components)\n",
            env!("CARGO_PKG_VERSION")
        )
    );

    let created = user(&bin, &["rule", "new", "hot-machines"], work.path());
    assert!(created.status.success(), "{}", stderr(&created));
    let dir = work.path().join("hot-machines");
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "events.ndjson",
        "README.md",
        "vendor/tocsin-rule/Cargo.toml",
        "vendor/tocsin-rule/src/lib.rs",
        "vendor/tocsin-rule/wit/rule.wit",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // Nothing written points outside the crate.
    let mut pending = vec![dir.clone()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains(checkout.to_str().unwrap()) && !text.contains("path = \"/"),
                "{} points outside the crate",
                path.display()
            );
        }
    }
    let wit = std::fs::read_to_string(dir.join("vendor/tocsin-rule/wit/rule.wit")).unwrap();
    assert_eq!(
        wit,
        std::fs::read_to_string(checkout.join("wit/rule.wit")).unwrap(),
        "the carried contract is the host's"
    );

    // Refusals name what is wrong.
    let again = user(&bin, &["rule", "new", "hot-machines"], work.path());
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        stderr(&again),
        "error: hot-machines is not empty: give a new or empty directory\n"
    );
    let bad = user(&bin, &["rule", "new", "Hot_Machines"], work.path());
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("`Hot_Machines` is not a valid rule crate name"),
        "{}",
        stderr(&bad)
    );

    let cargo = std::path::Path::new("cargo");
    for args in [
        &["test", "--quiet"][..],
        &["build", "--release", "--quiet", "--target", "wasm32-wasip2"],
        &["component", "build", "--release", "--quiet"],
    ] {
        let output = user(cargo, args, &dir);
        assert!(
            output.status.success(),
            "cargo {args:?}: {}",
            stderr(&output)
        );
    }
    let mut components = Vec::new();
    for built in ["wasm32-wasip2", "wasm32-wasip1"] {
        let wasm = dir
            .join("target")
            .join(built)
            .join("release/hot_machines.wasm");
        let size = std::fs::metadata(&wasm).unwrap().len();
        eprintln!("{built}: {} ({size} bytes)", wasm.display());
        assert!(size < 300_000, "{built}: {size} bytes");
        let out = user(
            &bin,
            &[
                "rule",
                "test",
                wasm.to_str().unwrap(),
                "--events",
                "events.ndjson",
            ],
            &dir,
        );
        assert!(out.status.success(), "{built}: {}", stderr(&out));
        let shapes: Vec<(String, String)> = alerts(&out)
            .iter()
            .map(|a| {
                (
                    a["key"].as_str().unwrap().to_owned(),
                    a["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            shapes,
            [
                ("too-hot".into(), "firing".into()),
                ("too-hot".into(), "resolved".into())
            ],
            "{built}"
        );
        components.push(wasm);
    }

    // A host with an operator; the tenant gets a token and uploads.
    let data = work.path().join("data");
    let mut serve = Command::new(&bin);
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .current_dir(work.path())
        .env("HOME", &home)
        .env("TOCSIN_OPERATOR_TOKEN", OPERATOR)
        .env("RUST_LOG", "warn");
    let (child, base) = support::spawn_serve(&mut serve);
    let _host = support::Kill(child);
    let token = tocsin_env(
        &["tenant", "token", "my-tenant"],
        &[("TOCSIN_URL", &base), ("TOCSIN_TOKEN", OPERATOR)],
    );
    assert!(token.status.success(), "{}", stderr(&token));
    let token = stdout(&token).trim().to_owned();
    let as_tenant = [
        ("TOCSIN_URL", base.as_str()),
        ("TOCSIN_TOKEN", token.as_str()),
    ];
    let upload = tocsin_env(
        &[
            "rule",
            "upload",
            components[0].to_str().unwrap(),
            "--tenant",
            "my-tenant",
            "--name",
            "hot-machines",
        ],
        &as_tenant,
    );
    assert!(upload.status.success(), "{}", stderr(&upload));

    let curl = |args: &[&str]| -> String {
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--fail-with-body"])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "curl {args:?}: {}",
            stderr(&output)
        );
        stdout(&output)
    };
    let events = dir.join("events.ndjson");
    let answer = curl(&[
        "--data-binary",
        &format!("@{}", events.display()),
        "--header",
        "Content-Type: application/x-ndjson",
        &format!("{base}/v1/events"),
    ]);
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["accepted"], 6, "{answer}");
    let listed = curl(&[&format!("{base}/v1/tenants/my-tenant/alerts")]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let alerts: Vec<(&str, &str, &str)> = listed
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|a| {
            (
                a["rule"].as_str().unwrap(),
                a["key"].as_str().unwrap(),
                a["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        alerts,
        [
            ("hot-machines", "too-hot", "firing"),
            ("hot-machines", "too-hot", "resolved")
        ]
    );
}

/// `tocsin rule logs` prints why a rule's calls failed, `tocsin tenant
/// dead-letters` the events it failed on as NDJSON, and `tocsin rule
/// resume` lifts its quarantine.
#[test]
fn the_cli_reads_a_rules_logs_and_dead_letters_and_resumes_it() {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tocsin"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--rule")
        .arg(format!("evil={}", components::HOSTILE))
        .env("RUST_LOG", "error");
    let (child, base) = support::spawn_serve(&mut command);
    let _host = support::Kill(child);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for n in 0..3 {
        let body = [
            support::hostile_event("fail"),
            support::hostile_event("panic"),
        ]
        .join("\n");
        let status = runtime.block_on(async {
            reqwest::Client::new()
                .post(format!("{base}/v1/events"))
                .header("idempotency-key", format!("cli-{n}"))
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        });
        assert_eq!(status.as_u16(), 200);
    }
    let host = [("TOCSIN_URL", base.as_str())];
    let rule = ["--tenant", "evil", "--name", "hostile"];

    let logs = tocsin_env(&[&["rule", "logs"][..], &rule].concat(), &host);
    assert!(logs.status.success(), "{}", stderr(&logs));
    let text = stdout(&logs);
    assert!(
        text.contains(
            " error  host rule `hostile@0.1.0` of tenant `evil`: failed: refusing on purpose\n"
        ),
        "{text}"
    );
    assert!(
        text.lines().last().unwrap().contains("quarantined until"),
        "{text}"
    );

    let letters = tocsin_env(&["tenant", "dead-letters", "evil"], &host);
    assert!(letters.status.success(), "{}", stderr(&letters));
    let letters: Vec<serde_json::Value> = stdout(&letters)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 6);
    assert!(letters.iter().all(|l| l["rule"] == "hostile"));

    let resume = tocsin_env(&[&["rule", "resume"][..], &rule].concat(), &host);
    assert!(resume.status.success(), "{}", stderr(&resume));
    assert_eq!(stdout(&resume), "evil/hostile: resumed\n");
    let again = tocsin_env(&[&["rule", "resume"][..], &rule].concat(), &host);
    assert_eq!(
        stdout(&again),
        "evil/hostile: resumed (it was not quarantined on this host)\n"
    );
}

/// A machine that starts running and says nothing more: its timer is in the
/// file's tail. `--until` moves the clock past it, and the alert fires.
#[test]
fn until_moves_the_clock_past_the_last_event_so_timers_in_the_tail_fire() {
    let running = serde_json::json!({
        "eventType": "machineStatusChange", "clientId": "client-01",
        "machineId": "machine-03", "state": "running", "time": "2026-01-01T00:00:00Z",
    });
    let file = events_file(&[running.to_string()]);
    let path = file.path().to_str().unwrap();
    let params = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(params.path(), r#"{"running_for": "10m"}"#).unwrap();
    let run = |until: Option<&str>| {
        let mut args = vec![
            "rule",
            "test",
            components::STILL_RUNNING,
            "--events",
            path,
            "--now",
            "2026-01-01T00:00:01Z",
            "--params",
            params.path().to_str().unwrap(),
        ];
        if let Some(until) = until {
            args.extend(["--until", until]);
        }
        tocsin(&args, None)
    };
    let out = run(None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(alerts(&out).is_empty(), "not yet due at the last event");

    let out = run(Some("2026-01-01T00:09:59Z"));
    assert!(alerts(&out).is_empty(), "one second early");

    let out = run(Some("2026-01-01T01:00:00Z"));
    assert!(out.status.success(), "{}", stderr(&out));
    let alerts = alerts(&out);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["key"], "still-running-1");
    assert_eq!(alerts[0]["status"], "firing");
    assert_eq!(alerts[0]["bucket"], "machine-03");
    // Fired at its due time: ten minutes after the event's time.
    assert_eq!(alerts[0]["at"], 1_767_225_600_000i64 + 600_000);
    assert!(stderr(&out).contains("timers fired: 1"), "{}", stderr(&out));

    let out = run(Some("next tuesday"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`next tuesday` is neither epoch milliseconds nor an RFC 3339 time"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn replay_until_fires_the_timers_due_by_then_once() {
    let running = serde_json::json!({
        "eventType": "machineStatusChange", "clientId": "client-01",
        "machineId": "machine-03", "state": "running",
        "time": "2030-01-01T00:00:00Z",
    });
    let file = events_file(&[running.to_string()]);
    let data = tempfile::tempdir().unwrap();
    // Remembered for ten years: the host's clock jumps from today to 2030.
    let rule = format!(
        r#"client-01={}?{{"forget_after": "3650days"}}"#,
        components::STILL_RUNNING
    );
    let replay = |until: &str| {
        tocsin(
            &[
                "replay",
                "--events",
                file.path().to_str().unwrap(),
                "--rule",
                &rule,
                "--data-dir",
                data.path().to_str().unwrap(),
                "--until",
                until,
            ],
            None,
        )
    };
    // Before the time the machine has run ten minutes by: nothing.
    let out = replay("2030-01-01T00:05:00Z");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(alerts(&out).is_empty());
    assert!(stderr(&out).contains("timers fired: 0"), "{}", stderr(&out));
    // The same file again, later: the event is replayed (a second time,
    // changing nothing: same state) and the timer kept in the data
    // directory fires.
    let out = replay("2030-01-01T00:20:00Z");
    assert!(out.status.success(), "{}", stderr(&out));
    let alerts = alerts(&out);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["key"], "still-running-1");
    assert!(stderr(&out).contains("timers fired: 1"), "{}", stderr(&out));
}

/// `--until` fires exactly the timers due at or before it, each at its due
/// time, in order, on the wall clock as on a fixed one: a replay of a past
/// morning with `--until 08:09` must not fire the 08:10 timer (it did:
/// the clock was today's, long past every timer in the file).
#[test]
fn until_fires_exactly_the_timers_due_by_then_each_at_its_due_time() {
    let at = |minute: u32| format!("2026-11-20T08:{minute:02}:00Z");
    let ms = |minute: i64| 1_795_161_600_000i64 + minute * 60_000;
    let status = |machine: &str, state: &str, minute: u32| {
        serde_json::json!({
            "eventType": "machineStatusChange", "clientId": "client-01",
            "machineId": machine, "state": state, "time": at(minute),
        })
        .to_string()
    };
    let file = events_file(&[
        status("machine-01", "running", 0),
        status("machine-03", "running", 3),
        status("machine-02", "running", 5),
        status("machine-03", "stopped", 7),
    ]);
    let params = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(params.path(), r#"{"running_for": "10m"}"#).unwrap();
    let run = |until: &str| {
        let out = tocsin(
            &[
                "rule",
                "test",
                components::STILL_RUNNING,
                "--events",
                file.path().to_str().unwrap(),
                "--params",
                params.path().to_str().unwrap(),
                "--until",
                until,
            ],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let fired: Vec<(String, i64)> = alerts(&out)
            .iter()
            .map(|a| {
                (
                    a["bucket"].as_str().unwrap().to_owned(),
                    a["at"].as_i64().unwrap(),
                )
            })
            .collect();
        (fired, stderr(&out))
    };
    let (fired, summary) = run(&at(9));
    assert_eq!(fired, [], "nothing is due by 08:09");
    assert!(summary.contains("timers fired: 0"), "{summary}");

    let (fired, summary) = run(&at(10));
    assert_eq!(
        fired,
        [("machine-01".to_owned(), ms(10))],
        "due at 08:10 exactly"
    );
    assert!(summary.contains("timers fired: 1"), "{summary}");

    let (fired, summary) = run(&at(30));
    assert_eq!(
        fired,
        [
            ("machine-01".to_owned(), ms(10)),
            ("machine-02".to_owned(), ms(15))
        ],
        "each at its due time, in order; the stopped machine's timer was cancelled"
    );
    assert!(summary.contains("timers fired: 2"), "{summary}");
}
