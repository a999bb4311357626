//! A rule that tells what it was handed: for each event, an alert whose
//! detail holds the event time, the raw JSON text and every declared field
//! with its kind. Run through the host and through the native harness, it
//! shows whether the two agree.

use tocsin_rule::{Alert, Context, Error, Events, Field, Manifest, Rule, json};

pub struct Echo;

/// The fields the echo reads: one per kind of value, and a missing one.
pub const FIELDS: [&str; 10] = [
    "s", "i", "f", "big", "b", "n", "obj", "arr", "esc", "missing",
];

impl Rule for Echo {
    type Params = ();
    type State = ();

    fn manifest((): &()) -> Manifest {
        Manifest::new("echo", "0.1.0")
            .when_equals("eventType", "echo")
            .fields(FIELDS)
            .raw_json()
            .event_time("t")
    }

    fn evaluate(
        (): &(),
        (): &mut (),
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        for event in events.iter() {
            let mut fields = serde_json::Map::new();
            for name in FIELDS {
                let value = match event.get(name) {
                    Field::Absent => json!({"absent": true}),
                    Field::Null => json!({"null": null}),
                    Field::Bool(b) => json!({"bool": b}),
                    Field::Int(i) => json!({"int": i}),
                    // Bits, so that the comparison is exact.
                    Field::Float(f) => json!({"float": f.to_bits().to_string()}),
                    Field::Str(s) => json!({"str": s}),
                    Field::Json(text) => json!({"json": text}),
                };
                fields.insert(name.to_owned(), value);
            }
            ctx.emit(
                Alert::firing(format!("echo-{}", event.index()), "echo").detail(json!({
                    "time": event.time(),
                    "raw": event.raw_json(),
                    "fields": fields,
                })),
            );
        }
        Ok(())
    }
}

tocsin_rule::export!(Echo);
