//! What each attack of the hostile zoo (`tests/components/hostile`) costs
//! the batch it rides in: one batch of 100 seed events of the healthy
//! tenants plus the hostile tenant's attack and one healthy event of its
//! own, through the whole engine (routing, bisecting, the embedded store's
//! commit), against the same batch with no attack (`calm`). The difference
//! is how long a bad call holds its batch back.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tocsin::alert::AlertRecord;
use tocsin::catalogue::{Assignment, StaticCatalogue};
use tocsin::clock::ManualClock;
use tocsin::engine::{Batch, Engine, Lane};
use tocsin::event::Incoming;
use tocsin::runtime::{Runtime, RuntimeConfig};
use tocsin::sink::{AlertSink, SinkError};
use tocsin::store::Progress;
use tocsin::store::embedded::EmbeddedStore;
use tocsin_test_support::{self as support, components};

struct Discard;

#[async_trait::async_trait]
impl AlertSink for Discard {
    async fn publish(&self, _alerts: &[AlertRecord]) -> Result<(), SinkError> {
        Ok(())
    }
}

fn batch(seed: &[Incoming], attack: Option<&str>, n: u64) -> Batch {
    let mut events: Vec<Incoming> = seed.to_vec();
    let mut lines = vec![support::hostile_event("none")];
    if let Some(attack) = attack {
        lines.insert(0, support::hostile_event(attack));
    }
    for line in lines {
        events.push(Incoming::parse(&line, "clientId", 1_000).unwrap());
    }
    for (i, event) in events.iter_mut().enumerate() {
        event.position = format!("{n}:{i}");
    }
    Batch::new(events, Progress::none())
}

fn zoo(c: &mut Criterion) {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        max_instances: 16,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let mut assignments: Vec<Assignment> = support::SEED_RULES
        .iter()
        .map(|(tenant, rule)| Assignment::new(*tenant, support::seed_component(rule)))
        .collect();
    assignments.push(Assignment::new("evil", components::HOSTILE));
    let catalogue = Arc::new(StaticCatalogue::load(&runtime, &assignments).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let engine = Arc::new(Engine::new(
        catalogue,
        store,
        Arc::new(Discard),
        Arc::new(ManualClock::new(1_000)),
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lane = Arc::new(Lane::new("bench"));
    let seed: Vec<Incoming> = support::seed_events()
        .iter()
        .take(100)
        .map(|line| Incoming::parse(line, "clientId", 1_000).unwrap())
        .collect();

    let mut group = c.benchmark_group("zoo");
    group.sample_size(10);
    let mut n = 0;
    let attacks = std::iter::once("calm").chain(support::HOSTILE_ATTACKS.iter().map(|(a, _)| *a));
    for attack in attacks {
        group.bench_function(BenchmarkId::from_parameter(attack), |b| {
            b.iter(|| {
                n += 1;
                let batch = batch(&seed, (attack != "calm").then_some(attack), n);
                rt.block_on(engine.process(&lane, &batch)).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, zoo);
criterion_main!(benches);
