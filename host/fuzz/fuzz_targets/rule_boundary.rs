//! The host side of the rule boundary: random stored state, random events
//! and parameters through the example rules, run by the engine the hosts
//! run (a scratch engine per rule). Whatever the bytes, a batch commits:
//! each event is applied or rejected naming the rule and why, alerts can be
//! published, timers fire, and no state the store could not hold is kept;
//! the host never panics.

#![no_main]

use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tocsin::catalogue::StaticCatalogue;
use tocsin::engine::Scratch;
use tocsin::event::Incoming;
use tocsin::runtime::{Limits, RuleSettings, Runtime, RuntimeConfig};
use tocsin::store::BucketId;
use tocsin_test_support::components;

#[derive(Debug, Arbitrary)]
struct Input {
    rule: u8,
    /// A stored state for every bucket the events may land in: `None` for
    /// new buckets.
    state: Option<Vec<u8>>,
    events: Vec<Event>,
    /// How far the clock moves before the batch (timers due by then fire).
    later_ms: u32,
}

#[derive(Debug, Arbitrary)]
struct Event {
    kind: u8,
    machine: u8,
    state: u8,
    price: f64,
    amount: i64,
    text: String,
}

const EVENT_TYPES: [&str; 5] = ["machineStatusChange", "test-event", "priceChange", "simSwap", "other"];
const STATES: [&str; 4] = ["running", "stopped", "starting", ""];

impl Event {
    fn json(&self) -> String {
        let mut event = serde_json::json!({
            "clientId": "fuzz",
            "eventType": EVENT_TYPES[self.kind as usize % EVENT_TYPES.len()],
            "machineId": format!("m{}", self.machine % 8),
            "state": STATES.get(self.state as usize).copied().unwrap_or(&self.text),
            "price": self.price,
            "symbol": &self.text,
            "amount": self.amount,
            "accountId": format!("a{}", self.machine % 4),
            "time": if self.state % 3 == 0 { serde_json::json!(self.text) } else { serde_json::json!(self.amount) },
        });
        if self.kind > 200 {
            event["state"] = serde_json::json!({"nested": [self.amount]});
        }
        event.to_string()
    }
}

/// Every bucket key the events above can have.
fn bucket_keys() -> Vec<String> {
    let mut keys = vec![String::new()];
    keys.extend((0..8).map(|m| format!("m{m}")));
    keys.extend((0..4).map(|a| format!("a{a}")));
    keys
}

/// One scratch engine per example rule, with the rule's name.
fn engines() -> &'static Vec<(String, Mutex<Scratch>)> {
    static ENGINES: OnceLock<Vec<(String, Mutex<Scratch>)>> = OnceLock::new();
    ENGINES.get_or_init(|| {
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: None,
            max_instances: 16,
            limits: Limits {
                fuel_per_call: 20_000_000,
                ..Limits::default()
            },
            ..RuntimeConfig::default()
        })
        .expect("a runtime");
        let mut engines = Vec::new();
        for (path, params) in [
            (components::TEST_EVENT, None),
            (components::ALL_MACHINES_STOPPED, None),
            (components::ANY_MACHINE_STOPPED, None),
            (components::FLAPPING, None),
            (components::PRICE_CHANGE, None),
            (components::SIM_FRAUD, None),
            (components::STILL_RUNNING, None),
            (
                components::JSON_RULE,
                Some(tocsin_test_support::json_seed_params("all-machines-stopped")),
            ),
            (components::COUNTER_V2, None),
        ] {
            let wasm = std::fs::read(path).expect("a built component");
            let compiled = runtime.compile(path, &wasm).expect("compiles");
            let settings = RuleSettings { name: None, params };
            let rule = runtime.instantiate("fuzz", &compiled, &settings).expect("loads");
            let name = rule.name().to_owned();
            let catalogue = StaticCatalogue::from_rules([rule]).expect("one rule");
            let scratch = Scratch::new(std::sync::Arc::new(catalogue), 0).expect("a scratch engine");
            engines.push((name, Mutex::new(scratch)));
        }
        engines
    })
}

/// Past the longest quarantine (an hour): a rule quarantined by an earlier
/// input is called again, on probation.
const PAST_QUARANTINE_MS: i64 = 2 * 3_600_000;

fuzz_target!(|input: Input| {
    let engines = engines();
    let (name, scratch) = &engines[input.rule as usize % engines.len()];
    let scratch = scratch.lock().unwrap();
    if let Some(state) = &input.state {
        let states = bucket_keys().into_iter().map(|bucket| {
            let id = BucketId {
                tenant: "fuzz".into(),
                rule: name.clone(),
                bucket,
            };
            (id, state.clone())
        });
        scratch.put_states(states).expect("states are stored");
    }
    let later = scratch.now() + PAST_QUARANTINE_MS + i64::from(input.later_ms);
    let fired = scratch.advance_to(later).expect("timers fire");
    let events: Vec<Incoming> = input
        .events
        .iter()
        .take(64)
        .enumerate()
        .map(|(n, e)| {
            let mut event = Incoming::parse(&e.json(), "clientId", scratch.now()).expect("an event");
            event.position = format!("fuzz:{later}:{n}");
            event
        })
        .collect();
    let count = events.len();
    let ran = scratch.run(events).expect("the batch commits");
    for alert in fired.alerts.iter().chain(&ran.alerts) {
        assert_eq!(alert.tenant, "fuzz");
        assert_eq!(&alert.rule, name);
        assert!(alert.title.len() <= tocsin::alert::MAX_TITLE_BYTES + 3);
        serde_json::to_string(alert).expect("an alert serializes");
    }
    for rejection in &ran.rejected {
        assert!(rejection.index < count);
        assert!(!rejection.reason.is_empty());
    }
    let limits = Limits::default();
    for (id, state) in scratch.states("fuzz").expect("states read back") {
        assert!(state.len() <= limits.max_state_bytes, "{id:?}");
    }
});
