//! Test rule `counter` 1.0.0: counts each machine's events, state schema 1
//! (the count alone), and raises `count-N` for the N-th.

use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule};

pub struct Counter;

impl Rule for Counter {
    type Params = ();
    type State = u64;

    fn manifest((): &()) -> Manifest {
        Manifest::new("counter", "1.0.0").bucket_by(["machineId"])
    }

    fn evaluate(
        (): &(),
        count: &mut u64,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        for _ in events.iter() {
            *count += 1;
            ctx.emit(Alert::firing(format!("count-{count}"), "counted"));
        }
        Ok(())
    }
}

tocsin_rule::export!(Counter);
