//! Example rule: alert when every machine of the tenant is stopped. One
//! bucket per tenant; the state keeps the latest state of every machine seen
//! so far. After each event, in order, the rule checks whether at least one
//! machine has been seen and all of them are `stopped`: entering that
//! condition fires `all-stopped`, leaving it (a machine changes to anything
//! else, or a new machine shows up not stopped) resolves it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, Severity};

pub struct AllMachinesStopped;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Machine id to whether its latest state is `stopped`.
    pub machines: BTreeMap<String, bool>,
    /// Whether the `all-stopped` alert is firing.
    pub all_stopped: bool,
}

impl State {
    fn every_machine_stopped(&self) -> bool {
        !self.machines.is_empty() && self.machines.values().all(|&stopped| stopped)
    }
}

const ALERT_KEY: &str = "all-stopped";

impl Rule for AllMachinesStopped {
    type Params = ();
    type State = State;

    fn manifest((): &()) -> Manifest {
        Manifest::new("all-machines-stopped", "1.0.0")
            .when_equals("eventType", "machineStatusChange")
            .fields(["machineId", "state"])
    }

    fn evaluate(
        (): &(),
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        for event in events.iter() {
            let machine = event.require_str("machineId")?;
            let machine_state = event.require_str("state")?;
            let stopped = machine_state == "stopped";
            // Known machines are updated in place: no key allocated per event.
            match state.machines.get_mut(machine) {
                Some(known) => *known = stopped,
                None => {
                    state.machines.insert(machine.to_owned(), stopped);
                }
            }

            let all_stopped = state.every_machine_stopped();
            if all_stopped && !state.all_stopped {
                let count = state.machines.len();
                let plural = if count == 1 { "" } else { "s" };
                let machines: Vec<&str> = state.machines.keys().map(String::as_str).collect();
                let alert =
                    Alert::firing(ALERT_KEY, format!("all {count} machine{plural} stopped"))
                        .severity(Severity::Critical)
                        .field("machines", machines)
                        .field("last", machine)
                        .field("at", event.time());
                ctx.emit(alert);
            } else if !all_stopped && state.all_stopped {
                let alert = Alert::resolved(ALERT_KEY, format!("{machine} is {machine_state}"))
                    .severity(Severity::Critical)
                    .field("machineId", machine)
                    .field("state", machine_state)
                    .field("at", event.time());
                ctx.emit(alert);
            }
            state.all_stopped = all_stopped;
        }
        Ok(())
    }
}

tocsin_rule::export!(AllMachinesStopped);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::Harness;

    const TENANT: &str = "";

    fn status(machine: &str, state: &str) -> serde_json::Value {
        json!({
            "eventType": "machineStatusChange",
            "clientId": "client-02",
            "machineId": machine,
            "state": state,
        })
    }

    fn machines(entries: &[(&str, bool)]) -> BTreeMap<String, bool> {
        entries.iter().map(|&(m, s)| (m.to_owned(), s)).collect()
    }

    #[test]
    fn the_manifest_reads_machine_id_and_state_with_one_bucket_per_tenant() {
        let rule = Harness::<AllMachinesStopped>::new();
        let manifest = rule.manifest();
        assert_eq!(manifest.name(), "all-machines-stopped");
        assert_eq!(manifest.version(), "1.0.0");
        assert_eq!(manifest.field_names(), ["machineId", "state"]);
        assert!(manifest.as_abi().bucket_key.is_empty());
    }

    #[test]
    fn fires_only_when_the_last_running_machine_stops_and_resolves_when_one_starts() {
        let mut rule = Harness::<AllMachinesStopped>::new();
        let alerts = rule
            .evaluate(
                TENANT,
                &[
                    status("machine-01", "running"),
                    status("machine-02", "stopped"),
                    status("machine-03", "running"),
                    status("machine-01", "stopped"),
                ],
            )
            .unwrap();
        assert!(alerts.is_empty(), "machine-03 still runs: {alerts:?}");

        let alerts = rule
            .evaluate(TENANT, &[status("machine-03", "stopped")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].key(), "all-stopped");
        assert!(alerts[0].is_firing());
        assert_eq!(alerts[0].severity_level(), Severity::Critical);
        assert_eq!(alerts[0].title(), "all 3 machines stopped");
        let detail: serde_json::Value = serde_json::from_str(alerts[0].detail_json()).unwrap();
        assert_eq!(
            detail["machines"],
            json!(["machine-01", "machine-02", "machine-03"])
        );
        assert_eq!(
            rule.state(TENANT),
            Some(State {
                machines: machines(&[
                    ("machine-01", true),
                    ("machine-02", true),
                    ("machine-03", true)
                ]),
                all_stopped: true,
            })
        );

        let repeated = rule
            .evaluate(TENANT, &[status("machine-02", "stopped")])
            .unwrap();
        assert!(repeated.is_empty(), "still all stopped: no new alert");

        let alerts = rule
            .evaluate(TENANT, &[status("machine-03", "starting")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].key(), "all-stopped");
        assert!(!alerts[0].is_firing());
        assert_eq!(alerts[0].title(), "machine-03 is starting");
        assert_eq!(
            rule.state(TENANT),
            Some(State {
                machines: machines(&[
                    ("machine-01", true),
                    ("machine-02", true),
                    ("machine-03", false)
                ]),
                all_stopped: false,
            })
        );
    }

    #[test]
    fn the_condition_is_checked_after_each_event_of_a_batch() {
        let mut rule = Harness::<AllMachinesStopped>::new();
        let alerts = rule
            .evaluate(
                TENANT,
                &[
                    status("machine-01", "stopped"),
                    status("machine-02", "running"),
                    status("machine-02", "stopped"),
                    status("machine-01", "starting"),
                ],
            )
            .unwrap();
        let seen: Vec<(&str, bool, &str)> = alerts
            .iter()
            .map(|a| (a.key(), a.is_firing(), a.title()))
            .collect();
        assert_eq!(
            seen,
            [
                ("all-stopped", true, "all 1 machine stopped"),
                ("all-stopped", false, "machine-02 is running"),
                ("all-stopped", true, "all 2 machines stopped"),
                ("all-stopped", false, "machine-01 is starting"),
            ]
        );
        assert_eq!(
            rule.state(TENANT),
            Some(State {
                machines: machines(&[("machine-01", false), ("machine-02", true)]),
                all_stopped: false,
            })
        );
    }

    #[test]
    fn a_new_machine_that_is_not_stopped_resolves() {
        let mut rule = Harness::<AllMachinesStopped>::new();
        let fired = rule
            .evaluate(
                TENANT,
                &[
                    status("machine-01", "stopped"),
                    status("machine-02", "stopped"),
                ],
            )
            .unwrap();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].title(), "all 1 machine stopped");

        let alerts = rule
            .evaluate(TENANT, &[status("machine-09", "running")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert!(!alerts[0].is_firing());
        assert_eq!(alerts[0].title(), "machine-09 is running");
        assert!(!rule.state(TENANT).unwrap().all_stopped);
    }

    #[test]
    fn an_event_without_machine_id_is_a_bad_event() {
        let mut rule = Harness::<AllMachinesStopped>::new();
        let err = rule
            .evaluate(
                TENANT,
                &[
                    status("machine-01", "stopped"),
                    json!({"eventType": "machineStatusChange", "state": "stopped"}),
                ],
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad event #1: `machineId` must be a string"
        );
        assert_eq!(rule.state(TENANT), None, "a failed call changes no state");
    }
}
