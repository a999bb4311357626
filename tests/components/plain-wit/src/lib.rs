//! The seed's any-machine-stopped rule written from `wit/rule.wit` alone:
//! bindings generated from the contract, the event table read and the alert
//! table built by hand as the WIT documents them, no SDK. The host must run
//! it exactly as it runs the SDK's version.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        path: "../../../wit",
        world: "rule",
    });

    // The world's own `use` brings `manifest`, `event-batch`, `outcome` and
    // `rule-error` to the root of the bindings.
    use tocsin::rule::types::{
        AlertBatch, AlertStatus, Condition, EventTime, Scalar, Severity, StateChange, Test,
        TimerChange,
    };

    /// `value-kind` discriminants, as the WIT numbers them.
    const TEXT: u8 = 5;

    struct PlainRule;

    /// The bytes of `text` a span (`offset << 32 | length`) points at.
    fn span(text: &str, bits: u64) -> &str {
        let start = (bits >> 32) as usize;
        &text[start..start + (bits & 0xffff_ffff) as usize]
    }

    /// Append `s` to `text`; its span.
    fn push(text: &mut String, s: &str) -> u64 {
        let span = ((text.len() as u64) << 32) | s.len() as u64;
        text.push_str(s);
        span
    }

    impl Guest for PlainRule {
        fn manifest(params: String) -> Result<Manifest, String> {
            if params != "null" {
                return Err("this rule takes no parameters".to_owned());
            }
            Ok(Manifest {
                name: "plain-wit".to_owned(),
                version: "1.0.0".to_owned(),
                filter: vec![Condition {
                    field: "eventType".to_owned(),
                    test: Test::Equals(Scalar::Text("machineStatusChange".to_owned())),
                }],
                bucket_key: vec!["machineId".to_owned()],
                fields: vec!["state".to_owned()],
                raw_json: false,
                event_time: EventTime::Arrival,
                state_ttl_ms: None,
            })
        }

        fn evaluate(
            bucket: String,
            state: Option<Vec<u8>>,
            events: EventBatch,
            _now: i64,
        ) -> Result<Outcome, RuleError> {
            // The state is one byte: 1 while the machine is stopped.
            let was = state.as_deref() == Some(&[1]);
            let mut stopped = was;
            let mut alerts = AlertBatch {
                status: Vec::new(),
                severity: Vec::new(),
                spans: Vec::new(),
                text: String::new(),
            };
            // One field per event: entry i of the table is event i.
            for (kind, bits) in events.kinds.iter().zip(&events.values) {
                if *kind != TEXT {
                    return Err(RuleError::Failed("`state` must be a string".to_owned()));
                }
                let now_stopped = span(&events.text, *bits) == "stopped";
                if now_stopped != stopped {
                    alerts.status.push(if now_stopped {
                        AlertStatus::Firing
                    } else {
                        AlertStatus::Resolved
                    });
                    alerts.severity.push(Severity::Critical);
                    let key = push(&mut alerts.text, "stopped");
                    let title = push(&mut alerts.text, &format!("machine {bucket} stopped"));
                    let detail = push(&mut alerts.text, "");
                    alerts.spans.extend([key, title, detail]);
                }
                stopped = now_stopped;
            }
            let state = match (was, stopped) {
                (false, false) | (true, true) => StateChange::Unchanged,
                (_, true) => StateChange::Set(vec![1]),
                (true, false) => StateChange::Delete,
            };
            Ok(Outcome {
                state,
                timer: TimerChange::Keep,
                alerts,
            })
        }

        fn on_timer(
            _bucket: String,
            _state: Option<Vec<u8>>,
            _now: i64,
        ) -> Result<Outcome, RuleError> {
            Err(RuleError::Failed("this rule sets no timers".to_owned()))
        }
    }

    export!(PlainRule);
}
