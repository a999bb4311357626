//! The host side of the rule boundary: random stored state, random events
//! and parameters through the example rules. Whatever the bytes, a call
//! either returns an outcome the host can store and publish or fails with
//! a typed error naming tenant, rule and cause; the host never panics and
//! never keeps state the store could not hold.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tocsin::engine::run;
use tocsin::event::Incoming;
use tocsin::runtime::{LoadedRule, Limits, RuleSettings, Runtime, RuntimeConfig, StateChange};
use tocsin_test_support::components;

#[derive(Debug, Arbitrary)]
struct Input {
    rule: u8,
    /// A stored state: `None` for a new bucket.
    state: Option<Vec<u8>>,
    events: Vec<Event>,
    now: i64,
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

fn rules() -> &'static Vec<LoadedRule> {
    static RULES: OnceLock<Vec<LoadedRule>> = OnceLock::new();
    RULES.get_or_init(|| {
        let runtime = Box::leak(Box::new(
            Runtime::new(RuntimeConfig {
                cache_dir: None,
                max_instances: 16,
                limits: Limits {
                    fuel_per_call: 20_000_000,
                    ..Limits::default()
                },
                ..RuntimeConfig::default()
            })
            .expect("a runtime"),
        ));
        let mut rules = Vec::new();
        for (path, params) in [
            (components::TEST_EVENT, None),
            (components::ALL_MACHINES_STOPPED, None),
            (components::ANY_MACHINE_STOPPED, None),
            (components::FLAPPING, None),
            (components::PRICE_CHANGE, None),
            (components::SIM_FRAUD, None),
            (
                components::JSON_RULE,
                Some(tocsin_test_support::json_seed_params("all-machines-stopped")),
            ),
            (components::COUNTER_V2, None),
        ] {
            let wasm = std::fs::read(path).expect("a built component");
            let compiled = runtime.compile(path, &wasm).expect("compiles");
            let settings = RuleSettings { name: None, params };
            rules.push(runtime.instantiate("fuzz", &compiled, &settings).expect("loads"));
        }
        rules
    })
}

fuzz_target!(|input: Input| {
    let rules = rules();
    let rule = &rules[input.rule as usize % rules.len()];
    let events: Vec<Incoming> = input
        .events
        .iter()
        .take(64)
        .enumerate()
        .map(|(n, e)| {
            let mut event = Incoming::parse(&e.json(), "clientId", 0).expect("an event");
            event.position = format!("fuzz:{n}");
            event
        })
        .collect();
    let refs: Vec<&Incoming> = events.iter().collect();
    let state = input.state;
    let result = run::run_rule(rule, &refs, input.now, |_| Ok::<_, ()>(state.clone()));
    let run = result.expect("state lookups do not fail");
    let limits = Limits::default();
    for bucket in run.buckets {
        match bucket.result {
            Ok(outcome) => {
                if let StateChange::Set(bytes) = &outcome.state {
                    assert!(bytes.len() <= limits.max_state_bytes);
                }
                for alert in &outcome.alerts {
                    assert_eq!(alert.tenant, "fuzz");
                    assert!(alert.title.len() <= tocsin::alert::MAX_TITLE_BYTES + 3);
                    serde_json::to_string(alert).expect("an alert serializes");
                }
            }
            Err(error) => {
                assert_eq!(error.tenant, "fuzz");
                assert!(!error.to_string().is_empty());
            }
        }
    }
});
