//! What the end-to-end suites share: the built rule components and the seed
//! scenario of the original prototype.

/// Paths of the components built from `rules-examples/*` and
/// `tests/components/*`, one constant per crate (`ANY_MACHINE_STOPPED`, …).
pub mod components {
    include!(concat!(env!("OUT_DIR"), "/components.rs"));
}

use serde_json::json;

pub const CLIENTS: [&str; 2] = ["client-01", "client-02"];
pub const MACHINES: usize = 5;

fn status(client: &str, machine: usize, state: &str) -> String {
    json!({
        "eventType": "machineStatusChange",
        "clientId": client,
        "machineId": format!("machine-{machine:02}"),
        "state": state,
    })
    .to_string()
}

fn test_event(client: &str) -> String {
    json!({"eventType": "test-event", "clientId": client}).to_string()
}

/// The seed scenario as NDJSON lines, both clients moving in lockstep:
/// every machine goes starting → running; client-01 sends a test event;
/// machines stop one by one; machine-03 starts and stops again; both clients
/// send a test event.
pub fn seed_events() -> Vec<String> {
    let mut lines = Vec::new();
    let both = |lines: &mut Vec<String>, machine, state| {
        for client in CLIENTS {
            lines.push(status(client, machine, state));
        }
    };
    for machine in 1..=MACHINES {
        both(&mut lines, machine, "starting");
        both(&mut lines, machine, "running");
    }
    lines.push(test_event("client-01"));
    for machine in 1..=MACHINES {
        both(&mut lines, machine, "stopped");
    }
    both(&mut lines, 3, "starting");
    both(&mut lines, 3, "stopped");
    lines.push(test_event("client-01"));
    lines.push(test_event("client-02"));
    lines
}

/// An alert reduced to what the seed scenario fixes:
/// `(tenant, rule, bucket, key, status)`.
pub type AlertShape = (String, String, String, String, String);

fn shape(tenant: &str, rule: &str, bucket: &str, key: &str, status: &str) -> AlertShape {
    (
        tenant.into(),
        rule.into(),
        bucket.into(),
        key.into(),
        status.into(),
    )
}

/// The alerts each seed rule raises over [`seed_events`] when it runs for
/// `tenant`, in order.
pub fn seed_expected(rule: &str, tenant: &str) -> Vec<AlertShape> {
    match rule {
        "test-event" => {
            let count = if tenant == "client-01" { 2 } else { 1 };
            (1..=count)
                .map(|n| shape(tenant, rule, "", &format!("test-event-{n}"), "firing"))
                .collect()
        }
        "all-machines-stopped" => ["firing", "resolved", "firing"]
            .iter()
            .map(|status| shape(tenant, rule, "", "all-stopped", status))
            .collect(),
        "any-machine-stopped" => {
            let mut alerts: Vec<_> = (1..=MACHINES)
                .map(|m| {
                    shape(
                        tenant,
                        rule,
                        &format!("machine-{m:02}"),
                        "stopped",
                        "firing",
                    )
                })
                .collect();
            alerts.push(shape(tenant, rule, "machine-03", "stopped", "resolved"));
            alerts.push(shape(tenant, rule, "machine-03", "stopped", "firing"));
            alerts
        }
        other => panic!("`{other}` is not a seed rule"),
    }
}

/// The seed's assignment of rules to tenants.
pub const SEED_RULES: [(&str, &str); 3] = [
    ("client-01", "test-event"),
    ("client-01", "all-machines-stopped"),
    ("client-02", "any-machine-stopped"),
];

/// Every attack of the hostile component (`tests/components/hostile`), by
/// the `attack` field that picks it, with the cause its event is
/// dead-lettered under; `None`: the call succeeds (it only reads what the
/// sandbox shows it).
pub const HOSTILE_ATTACKS: [(&str, Option<&str>); 17] = [
    ("loop", Some("out_of_fuel")),
    ("memory", Some("out_of_memory")),
    ("recursion", Some("stack_overflow")),
    ("panic", Some("panic")),
    ("alerts", Some("output_too_large")),
    ("alert-bytes", Some("output_too_large")),
    ("log", Some("output_too_large")),
    ("print", Some("output_too_large")),
    ("state", Some("output_too_large")),
    ("fail", Some("failed")),
    ("bad-index", Some("bad_event")),
    ("sleep", Some("blocked")),
    ("clock", None),
    ("random", None),
    ("peek", None),
    ("slow", None),
    ("none", None),
];

/// An event of tenant `evil` that makes the hostile rule `attack`.
pub fn hostile_event(attack: &str) -> String {
    serde_json::json!({"clientId": "evil", "eventType": "test-event", "attack": attack}).to_string()
}

/// The component path of a seed rule by name.
pub fn seed_component(rule: &str) -> &'static str {
    match rule {
        "test-event" => components::TEST_EVENT,
        "all-machines-stopped" => components::ALL_MACHINES_STOPPED,
        "any-machine-stopped" => components::ANY_MACHINE_STOPPED,
        other => panic!("`{other}` is not a seed rule"),
    }
}

/// The seed rule `rule` written as json-rule parameters, from
/// `rules-examples/json-rule/seed-rules/`.
pub fn json_seed_params(rule: &str) -> serde_json::Value {
    let path = format!(
        "{}/../../rules-examples/json-rule/seed-rules/{rule}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Start a `tocsin serve` command (its stdout piped) and wait for its first
/// line, `listening on ADDR`: the child and its base URL.
pub fn spawn_serve(command: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tocsin serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    let base = format!("http://{addr}");
    (child, base)
}

/// A child process killed (and reaped) when this goes out of scope, also
/// when the test fails.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bundled_sample_is_the_seed_scenario() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../rules-examples/seed.ndjson"
        );
        let parse = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap();
        let bundled: Vec<_> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(parse)
            .collect();
        let generated: Vec<_> = super::seed_events().iter().map(|l| parse(l)).collect();
        assert_eq!(bundled, generated);
    }
}
