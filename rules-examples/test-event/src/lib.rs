//! Example rule: a firing alert for every event with
//! `eventType == "test-event"`, so a tenant can check its pipeline end to end.
//! One bucket per tenant; a counter in the state makes every alert key unique
//! within the bucket (`test-event-1`, `test-event-2`, ...). Test alerts are
//! never resolved.

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, Severity};

pub struct TestEvent;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// How many test events this tenant has sent so far.
    pub received: u64,
}

const TITLE: &str = "test event received";

impl Rule for TestEvent {
    type Params = ();
    type State = State;

    fn manifest((): &()) -> Manifest {
        Manifest::new("test-event", "1.0.0").when_equals("eventType", "test-event")
    }

    fn evaluate(
        (): &(),
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        for event in events.iter() {
            state.received += 1;
            let n = state.received;
            let alert = Alert::firing(format!("test-event-{n}"), TITLE)
                .severity(Severity::Info)
                .field("n", n)
                .field("at", event.time());
            ctx.emit(alert);
        }
        Ok(())
    }
}

tocsin_rule::export!(TestEvent);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::{Harness, abi};

    const TENANT: &str = "";

    fn test_event() -> serde_json::Value {
        json!({"eventType": "test-event", "clientId": "client-07"})
    }

    #[test]
    fn the_manifest_filters_on_the_event_type_with_one_bucket_per_tenant() {
        let rule = Harness::<TestEvent>::new();
        let manifest = rule.manifest().as_abi();
        assert_eq!(manifest.name, "test-event");
        assert_eq!(manifest.version, "1.0.0");
        assert_eq!(
            manifest.filter,
            vec![abi::Condition {
                field: "eventType".to_owned(),
                test: abi::Test::Equals(abi::Scalar::Text("test-event".to_owned())),
            }]
        );
        assert!(manifest.bucket_key.is_empty(), "one bucket per tenant");
        assert!(manifest.fields.is_empty(), "the rule reads no field");
        assert_eq!(manifest.event_time, abi::EventTime::Arrival);
    }

    #[test]
    fn every_event_fires_an_info_alert_with_its_own_key() {
        let mut rule = Harness::<TestEvent>::new();
        rule.set_now(1_767_225_600_000);
        let alerts = rule
            .evaluate(TENANT, &[test_event(), test_event()])
            .unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0].key(), "test-event-1");
        assert_eq!(alerts[1].key(), "test-event-2");
        for alert in &alerts {
            assert!(alert.is_firing());
            assert_eq!(alert.severity_level(), Severity::Info);
            assert_eq!(alert.title(), "test event received");
        }
        let detail: serde_json::Value = serde_json::from_str(alerts[1].detail_json()).unwrap();
        assert_eq!(
            detail,
            json!({"n": 2, "at": 1_767_225_600_000_i64}),
            "detail carries the counter and the arrival time"
        );
        assert_eq!(rule.state(TENANT), Some(State { received: 2 }));
    }

    #[test]
    fn the_counter_survives_between_batches_so_keys_never_repeat() {
        let mut rule = Harness::<TestEvent>::new();
        rule.evaluate(TENANT, &[test_event()]).unwrap();
        let alerts = rule.evaluate(TENANT, &[test_event()]).unwrap();
        let keys: Vec<&str> = alerts.iter().map(|a| a.key()).collect();
        assert_eq!(keys, ["test-event-2"]);

        let empty = rule.evaluate(TENANT, &[]).unwrap();
        assert!(empty.is_empty());
        assert_eq!(rule.state(TENANT), Some(State { received: 2 }));
        assert_eq!(rule.timer(TENANT), None);
    }
}
