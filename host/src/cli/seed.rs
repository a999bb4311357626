//! The 2018 prototype's world: its three rules, built from `rules-examples/`,
//! and its machine simulator. Used by `tocsin demo`, `tocsin simulate` and
//! `tocsin bench`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use rand::Rng;
use serde_json::json;

/// The seed's rules, by crate name.
pub const RULES: [&str; 3] = ["test-event", "all-machines-stopped", "any-machine-stopped"];

/// The seed's assignment of rules to tenants.
pub const ASSIGNMENT: [(&str, &str); 3] = [
    ("client-01", "test-event"),
    ("client-01", "all-machines-stopped"),
    ("client-02", "any-machine-stopped"),
];

const WASM_TARGET: &str = "wasm32-wasip2";

/// The workspace this binary was built from.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is inside the workspace")
        .to_path_buf()
}

/// Build the seed rules as components (installing the wasm target with
/// rustup if it is missing) and return each one's path, by rule name.
pub fn build_rules() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let workspace = workspace();
    if !workspace.join("rules-examples").is_dir() {
        bail!(
            "the example rules are not at {}: run this from a Tocsin checkout",
            workspace.display()
        );
    }
    ensure_wasm_target()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--profile",
            "rule",
            "--target",
            WASM_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for rule in RULES {
        command.args(["-p", rule]);
    }
    eprintln!("building the seed rules ({})…", RULES.join(", "));
    let status = command.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("building the seed rules failed");
    }
    Ok(RULES
        .iter()
        .map(|rule| {
            let file = format!("{}.wasm", rule.replace('-', "_"));
            let path = target_dir.join(WASM_TARGET).join("rule").join(file);
            (rule.to_string(), path)
        })
        .collect())
}

fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to install the wasm32-wasip2 target")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|t| t.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status()?;
    if !status.success() {
        bail!("`rustup target add {WASM_TARGET}` failed");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MachineState {
    Stopped,
    Starting,
    Running,
}

impl MachineState {
    fn next(self) -> Self {
        match self {
            MachineState::Stopped => MachineState::Starting,
            MachineState::Starting => MachineState::Running,
            MachineState::Running => MachineState::Stopped,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MachineState::Stopped => "stopped",
            MachineState::Starting => "starting",
            MachineState::Running => "running",
        }
    }
}

/// The prototype's debug page: each tick a random machine index moves one
/// step through stopped → starting → running → stopped for every client at
/// once; now and then a client sends a test event.
pub struct Simulator<R> {
    clients: Vec<String>,
    machines: Vec<Vec<MachineState>>,
    rng: R,
    /// One tick in this many also sends a test event.
    test_every: u32,
}

impl<R: Rng> Simulator<R> {
    /// `clients` each with `machines` machines, all stopped.
    pub fn new(clients: Vec<String>, machines: usize, rng: R) -> Self {
        let count = clients.len();
        Simulator {
            clients,
            machines: vec![vec![MachineState::Stopped; machines]; count],
            rng,
            test_every: 10,
        }
    }

    /// The seed's setup: client-01 and client-02 with five machines each.
    pub fn seed(rng: R) -> Self {
        Self::new(vec!["client-01".into(), "client-02".into()], 5, rng)
    }

    /// The events of one tick, as JSON lines.
    pub fn tick(&mut self) -> Vec<String> {
        let machine = self.rng.random_range(0..self.machines[0].len());
        let mut events = Vec::with_capacity(self.clients.len() + 1);
        for (client, machines) in self.clients.iter().zip(&mut self.machines) {
            machines[machine] = machines[machine].next();
            events.push(
                json!({
                    "eventType": "machineStatusChange",
                    "clientId": client,
                    "machineId": format!("machine-{:02}", machine + 1),
                    "state": machines[machine].name(),
                })
                .to_string(),
            );
        }
        if self.rng.random_ratio(1, self.test_every) {
            let client = &self.clients[self.rng.random_range(0..self.clients.len())];
            events.push(json!({"eventType": "test-event", "clientId": client}).to_string());
        }
        events
    }

    /// At least `n` events, whole ticks.
    pub fn events(&mut self, n: usize) -> Vec<String> {
        let mut events = Vec::with_capacity(n + 3);
        while events.len() < n {
            events.extend(self.tick());
        }
        events
    }
}

/// Send `lines` to a host's `POST /v1/events` as one NDJSON batch under
/// `key`, retrying until it is acknowledged or `attempts` run out.
pub async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    lines: &[String],
    attempts: u32,
) -> anyhow::Result<serde_json::Value> {
    let body = lines.join("\n");
    let mut last_error = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(5))).await;
        }
        let response = client
            .post(url)
            .header("content-type", "application/x-ndjson")
            .header("idempotency-key", key)
            .body(body.clone())
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => return Ok(response.json().await?),
            Ok(response) if response.status().is_client_error() => {
                let status = response.status();
                bail!(
                    "{url} refused the batch ({status}): {}",
                    response.text().await?
                );
            }
            Ok(response) => {
                last_error = Some(anyhow::anyhow!("{url} answered {}", response.status()))
            }
            Err(error) => last_error = Some(error.into()),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}
