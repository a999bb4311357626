//! `tocsin demo`: the prototype's scenario, live. Builds the seed rules,
//! starts the embedded service, drives it with the machine simulator and
//! prints alerts as they arrive.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::seed::{self, Simulator};
use tocsin::alert::{AlertRecord, Status};
use tocsin::clock::SystemClock;
use tocsin::config::{Config, RuleEntry};
use tocsin::serve::Server;

#[derive(Debug, Clone)]
pub struct Options {
    /// Events to send.
    pub events: usize,
    /// Events per second.
    pub rate: f64,
    /// Keep state here instead of a fresh temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Seed of the simulator's random choices.
    pub seed: u64,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let rules: BTreeMap<String, PathBuf> = tokio::task::spawn_blocking(seed::build_rules)
        .await??
        .into_iter()
        .collect();
    let temp;
    let data_dir = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.clone(),
        rules: seed::ASSIGNMENT
            .iter()
            .map(|(tenant, rule)| RuleEntry::new(*tenant, rules[*rule].clone()))
            .collect(),
        ..Config::default()
    };
    let server = Server::start(config, Arc::new(SystemClock)).await?;
    let url = format!("http://{}/v1/events", server.addr());
    eprintln!(
        "serving on http://{} (data in {})",
        server.addr(),
        data_dir.display()
    );
    for (tenant, rule) in seed::ASSIGNMENT {
        eprintln!("  {tenant}: {rule}");
    }
    eprintln!(
        "sending {} events at {} events/s…\n",
        options.events, options.rate
    );

    let started = Instant::now();
    let mut live = server.engine().subscribe();
    let printer = tokio::spawn(async move {
        let mut counts: BTreeMap<(String, String, Status), usize> = BTreeMap::new();
        while let Ok(alert) = live.recv().await {
            print_alert(started, &alert);
            *counts
                .entry((alert.tenant.clone(), alert.rule.clone(), alert.status))
                .or_default() += 1;
        }
        counts
    });

    let client = reqwest::Client::new();
    let mut simulator = Simulator::seed(StdRng::seed_from_u64(options.seed));
    let run = format!("demo-{:x}", rand::random::<u32>());
    // Ten batches a second, however fast the rate.
    let per_batch = ((options.rate / 10.0).ceil() as usize).max(1);
    let mut sent = 0;
    let mut batch_no = 0;
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(per_batch as f64 / options.rate));
    while sent < options.events {
        ticker.tick().await;
        let lines = simulator.events(per_batch.min(options.events - sent));
        seed::post_batch(&client, &url, &format!("{run}-{batch_no}"), &lines, 5).await?;
        sent += lines.len();
        batch_no += 1;
    }
    let stats = server.engine().stats();
    let alerts = stats.alerts.load(std::sync::atomic::Ordering::Relaxed);
    server.stop().await?;
    let counts = printer.await?;
    eprintln!(
        "\n{sent} events sent, {alerts} alerts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for ((tenant, rule, status), n) in counts {
        eprintln!("  {tenant} {rule}: {n} {}", status_name(status));
    }
    Ok(())
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Firing => "firing",
        Status::Resolved => "resolved",
    }
}

fn print_alert(started: Instant, alert: &AlertRecord) {
    let severity = serde_json::to_value(alert.severity).unwrap_or_default();
    println!(
        "[{:>7.2}s] {:<10} {:<21} {:<8} {:<8} {}",
        started.elapsed().as_secs_f64(),
        alert.tenant,
        alert.rule,
        status_name(alert.status).to_uppercase(),
        severity.as_str().unwrap_or_default(),
        alert.title,
    );
}
