//! Test rule `counter` 2.0.0: state schema 2 (the count and the last
//! machine state seen). What it does with a schema-1 state is its
//! parameter `old_state`: `upgrade` (default; keeps the count), `reset`
//! (declared in the manifest: starts afresh) or `refuse` (the SDK's
//! default: an error naming both versions).

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, OldState, Rule};

pub struct Counter;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    pub old_state: OnOld,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOld {
    #[default]
    Upgrade,
    Reset,
    Refuse,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub count: u64,
    pub last: String,
}

impl Rule for Counter {
    type Params = Params;
    type State = State;

    fn manifest(params: &Params) -> Manifest {
        let manifest = Manifest::new("counter", "2.0.0")
            .bucket_by(["machineId"])
            .fields(["state"])
            .state_schema(2);
        match params.old_state {
            OnOld::Reset => manifest.reset_older_state(),
            _ => manifest,
        }
    }

    fn upgrade_state(params: &Params, old: OldState<'_>) -> Result<State, String> {
        match params.old_state {
            OnOld::Upgrade => Ok(State {
                count: old.decode::<u64>()?,
                last: String::new(),
            }),
            _ => Err("asked to refuse older states".to_owned()),
        }
    }

    fn evaluate(
        _: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        for event in events.iter() {
            state.count += 1;
            state.last = event.str("state").unwrap_or_default().to_owned();
            ctx.emit(Alert::firing(format!("count-{}", state.count), "counted"));
        }
        Ok(())
    }
}

tocsin_rule::export!(Counter);
