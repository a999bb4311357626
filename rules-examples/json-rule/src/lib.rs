//! Rules written as data. One component whose parameters are the original
//! prototype's rule format (`where` / `partitionBy` / `evaluate`), extended
//! with counting and change windows and a choice of alerting on transitions
//! or on every matching event. See `README.md` for the format and its
//! semantics; in short:
//!
//! - `where` becomes the manifest's filter, checked by the host;
//! - there is one bucket per tenant and rule, and `partitionBy` splits it
//!   into partitions (a machine, a ticker) inside its state;
//! - after each event, the partition's condition (`having`) is brought up
//!   to date, and `evaluate.type` says whether the rule looks at `any`
//!   partition (one alert per partition) or at `all` of them (one alert);
//! - `alert: "transition"` raises when the condition comes to hold and
//!   resolves when it stops; `"every"` raises for each event after which it
//!   holds.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tocsin_rule::windows::{self, Recent};
use tocsin_rule::{
    Alert, Context, Error, Event, Events, Field, Manifest, OldState, Rule, Severity,
};

pub struct JsonRule;

/// The rule, as a tenant writes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "ParamsJson")]
pub struct Params {
    pub name: String,
    pub where_: Vec<Where>,
    pub partition_by: Vec<String>,
    pub evaluate: Evaluate,
    pub alert: AlertOn,
    pub severity: SeverityName,
    pub event_time: Option<String>,
    pub allowed_lateness: Duration,
}

/// [`Params`] as read, before the checks that span fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct ParamsJson {
    /// The rule's name (the manifest's; the tenant may register it under
    /// another).
    name: String,
    #[serde(rename = "where")]
    where_: Vec<Where>,
    partition_by: Vec<String>,
    evaluate: Evaluate,
    alert: AlertOn,
    severity: SeverityName,
    /// A top-level field with each event's time (RFC 3339 or epoch ms);
    /// default: the time the host accepted the event.
    event_time: Option<String>,
    /// How far behind its partition's newest event an event may come and
    /// still count in a window.
    #[serde(with = "tocsin_rule::duration")]
    allowed_lateness: Duration,
}

impl Default for ParamsJson {
    fn default() -> Self {
        ParamsJson {
            name: "json-rule".to_owned(),
            where_: Vec::new(),
            partition_by: Vec::new(),
            evaluate: Evaluate::default(),
            alert: AlertOn::default(),
            severity: SeverityName::default(),
            event_time: None,
            allowed_lateness: windows::DEFAULT_ALLOWED_LATENESS,
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Params::try_from(ParamsJson::default()).expect("the defaults are valid")
    }
}

impl TryFrom<ParamsJson> for Params {
    type Error = String;

    fn try_from(p: ParamsJson) -> Result<Self, String> {
        if let Some(w) = p.where_.iter().find(|w| w.property.is_empty()) {
            return Err(format!(
                "`where`: a condition has an empty `property` ({w:?})"
            ));
        }
        if p.partition_by.iter().any(String::is_empty) {
            return Err("`partitionBy`: a field name is empty".to_owned());
        }
        if let Some(Having::Count {
            property: None,
            equals: Some(_),
            ..
        }) = &p.evaluate.having
        {
            return Err("`evaluate.having`: `equals` needs the `property` it compares".to_owned());
        }
        if let Some(having) = &p.evaluate.having
            && let Some(window) = having.window()
            && window.is_zero()
        {
            return Err("`evaluate.having.window` must be longer than zero".to_owned());
        }
        Ok(Params {
            name: p.name,
            where_: p.where_,
            partition_by: p.partition_by,
            evaluate: p.evaluate,
            alert: p.alert,
            severity: p.severity,
            event_time: p.event_time,
            allowed_lateness: p.allowed_lateness,
        })
    }
}

/// `{"property": "eventType", "equals": "machineStatusChange"}`; `"*"`
/// matches any value.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Where {
    pub property: String,
    pub equals: Literal,
}

/// A JSON string, number, boolean or null to compare a field with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Json")]
pub struct Literal(pub Json);

impl TryFrom<Json> for Literal {
    type Error = String;

    fn try_from(value: Json) -> Result<Self, String> {
        match value {
            Json::Array(_) | Json::Object(_) => Err(format!(
                "expected a string, number, boolean or null to compare with, not {value}"
            )),
            scalar => Ok(Literal(scalar)),
        }
    }
}

impl Literal {
    fn is_any(&self) -> bool {
        self.0 == Json::String("*".to_owned())
    }

    /// Whether `field` is this literal (numbers by value; `"*"`: present).
    fn matches(&self, field: Field<'_>) -> bool {
        if self.is_any() {
            return field != Field::Absent;
        }
        match (field, &self.0) {
            (Field::Str(s), Json::String(want)) => s == want,
            (Field::Int(i), Json::Number(want)) => match want.as_i64() {
                Some(want) => i == want,
                None => want.as_f64() == Some(i as f64),
            },
            (Field::Float(f), Json::Number(want)) => want.as_f64() == Some(f),
            (Field::Bool(b), Json::Bool(want)) => b == *want,
            (Field::Null, Json::Null) => true,
            _ => false,
        }
    }

    fn text(&self) -> String {
        match &self.0 {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Evaluate {
    /// Look at `any` partition (default) or at `all` of them together.
    #[serde(rename = "type")]
    pub quantifier: Quantifier,
    /// The condition on a partition; without it every event matches.
    pub having: Option<Having>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantifier {
    #[default]
    Any,
    All,
}

/// The condition on one partition, after each of its events.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "calc", rename_all = "lowercase", deny_unknown_fields)]
pub enum Having {
    /// The partition's latest value of `property` equals `equals`.
    Latest { property: String, equals: Literal },
    /// At least `threshold` of the partition's events (those whose
    /// `property` equals `equals`, if given) within `window` of event time.
    Count {
        #[serde(default)]
        property: Option<String>,
        #[serde(default)]
        equals: Option<Literal>,
        #[serde(with = "tocsin_rule::duration")]
        window: Duration,
        threshold: NonZeroU32,
    },
    /// At least `threshold` changes of `property` within `window` of event
    /// time (the partition's first value is not a change).
    Changes {
        property: String,
        #[serde(with = "tocsin_rule::duration")]
        window: Duration,
        threshold: NonZeroU32,
    },
}

impl Having {
    fn property(&self) -> Option<&str> {
        match self {
            Having::Latest { property, .. } | Having::Changes { property, .. } => Some(property),
            Having::Count { property, .. } => property.as_deref(),
        }
    }

    fn window(&self) -> Option<Duration> {
        match self {
            Having::Latest { .. } => None,
            Having::Count { window, .. } | Having::Changes { window, .. } => Some(*window),
        }
    }

    /// What `count` and `changes` must reach (`latest` counts nothing).
    fn threshold(&self) -> usize {
        match self {
            Having::Latest { .. } => 0,
            Having::Count { threshold, .. } | Having::Changes { threshold, .. } => {
                threshold.get() as usize
            }
        }
    }
}

/// When alerts are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertOn {
    /// When the condition comes to hold (firing) and when it stops
    /// (resolved).
    #[default]
    Transition,
    /// For each event after which the condition holds, an alert of its own.
    Every,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeverityName {
    Info,
    #[default]
    Warning,
    Critical,
}

impl From<SeverityName> for Severity {
    fn from(name: SeverityName) -> Self {
        match name {
            SeverityName::Info => Severity::Info,
            SeverityName::Warning => Severity::Warning,
            SeverityName::Critical => Severity::Critical,
        }
    }
}

/// The one bucket's state: every partition seen.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub partitions: BTreeMap<String, Partition>,
    /// With `all` and `transition`: whether the one alert is firing.
    pub all_firing: bool,
    /// Alerts raised with `every` so far: their keys' counter.
    pub raised: u64,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    /// Whether the condition holds after the partition's latest event.
    pub holds: bool,
    /// The latest value of the condition's property, as text.
    pub last: Option<String>,
    /// `count`: the counted events; `changes`: the changes; both within
    /// the window of the partition's newest event.
    pub window: Recent<()>,
}

/// What version 1.0 stored (state schema 1).
#[derive(Deserialize)]
struct StateV1 {
    partitions: BTreeMap<String, PartitionV1>,
    all_firing: bool,
    raised: u64,
}

#[derive(Deserialize)]
struct PartitionV1 {
    holds: bool,
    last: Option<String>,
    times: Vec<i64>,
}

impl Rule for JsonRule {
    type Params = Params;
    type State = State;

    fn manifest(params: &Params) -> Manifest {
        let mut manifest = Manifest::new(params.name.as_str(), "1.1.0").state_schema(2);
        for w in &params.where_ {
            manifest = if w.equals.is_any() {
                manifest.when_exists(&w.property)
            } else {
                manifest.when_equals(&w.property, literal(&w.equals.0))
            };
        }
        let mut fields: Vec<&str> = params.partition_by.iter().map(String::as_str).collect();
        if let Some(property) = params.evaluate.having.as_ref().and_then(Having::property)
            && !fields.contains(&property)
        {
            fields.push(property);
        }
        manifest = manifest.fields(fields);
        if let Some(field) = &params.event_time {
            manifest = manifest.event_time(field);
        }
        manifest
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let mut key = String::new();
        for event in events.iter() {
            partition_key(&params.partition_by, &event, &mut key);
            // Known partitions are updated in place: no key allocated.
            if !state.partitions.contains_key(key.as_str()) {
                state.partitions.insert(key.clone(), Partition::default());
            }
            let partition = state
                .partitions
                .get_mut(key.as_str())
                .expect("inserted above");
            let was = partition.holds;
            let count = update(params, partition, &event);
            let holds = partition.holds;
            let severity = Severity::from(params.severity);
            // The latest value, for the words of an alert: read only when
            // one is raised.
            let value = |state: &State| state.partitions[key.as_str()].last.clone();
            let describe = |value: &Option<String>| describe(params, count, value.as_deref());
            match (params.evaluate.quantifier, params.alert) {
                (Quantifier::Any, AlertOn::Transition) if holds != was => {
                    let value = value(state);
                    let alert_key = alert_key(&params.partition_by, &key);
                    let title = format!("{}: {}", subject(params, &key), describe(&value));
                    let alert = if holds {
                        Alert::firing(alert_key, title)
                    } else {
                        Alert::resolved(alert_key, title)
                    };
                    let alert = alert.severity(severity);
                    ctx.emit(detail(alert, &key, &value, count, &event));
                }
                (Quantifier::Any, AlertOn::Every) if holds => {
                    let value = value(state);
                    state.raised += 1;
                    let alert_key =
                        format!("{}#{}", alert_key(&params.partition_by, &key), state.raised);
                    let title = format!("{}: {}", subject(params, &key), describe(&value));
                    let alert = Alert::firing(alert_key, title).severity(severity);
                    ctx.emit(detail(alert, &key, &value, count, &event));
                }
                (Quantifier::All, mode) => {
                    // Only this partition changed: the others still hold
                    // as they did, so the check is over every partition
                    // only when this one holds.
                    let all = holds && state.partitions.values().all(|p| p.holds);
                    let n = state.partitions.len();
                    let everywhere = |value: &Option<String>| {
                        format!("all {n} {}: {}", plural(params, n), describe(value))
                    };
                    let raise = match mode {
                        AlertOn::Transition => all != state.all_firing,
                        AlertOn::Every => all,
                    };
                    if raise {
                        let value = value(state);
                        let alert = match mode {
                            AlertOn::Transition if all => Alert::firing("all", everywhere(&value)),
                            AlertOn::Transition => {
                                let title =
                                    format!("{}: {}", subject(params, &key), describe(&value));
                                Alert::resolved("all", title)
                            }
                            AlertOn::Every => {
                                state.raised += 1;
                                Alert::firing(format!("all#{}", state.raised), everywhere(&value))
                            }
                        };
                        state.all_firing = all;
                        let alert = detail(alert.severity(severity), &key, &value, count, &event);
                        ctx.emit(alert.field("partitions", n));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn upgrade_state(_: &Params, old: OldState<'_>) -> Result<State, String> {
        let old: StateV1 = old.decode()?;
        let partitions = old
            .partitions
            .into_iter()
            .map(|(key, p)| {
                let times = p.times.into_iter().map(|t| (t, ())).collect();
                let partition = Partition {
                    holds: p.holds,
                    last: p.last,
                    window: Recent::resume(times, None),
                };
                (key, partition)
            })
            .collect();
        Ok(State {
            partitions,
            all_firing: old.all_firing,
            raised: old.raised,
        })
    }
}

tocsin_rule::export!(JsonRule);

/// A `where` literal as the manifest's filter takes it.
fn literal(value: &Json) -> tocsin_rule::Literal {
    match value {
        Json::Bool(b) => (*b).into(),
        Json::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(f64::NAN).into(),
        },
        Json::String(s) => s.as_str().into(),
        _ => ().into(),
    }
}

/// Bring `partition` up to date with `event`; what `count` or `changes`
/// now counts. An event more than the allowed lateness behind the
/// partition's newest is late for a window: dropped and counted, it changes
/// nothing.
fn update(params: &Params, partition: &mut Partition, event: &Event<'_>) -> usize {
    let at = event.time();
    let Some(having) = params.evaluate.having.as_ref() else {
        partition.holds = true;
        return 0;
    };
    let field = having.property().map(|p| event.get(p));
    let (window, counted) = match having {
        Having::Latest { equals, .. } => {
            let field = field.unwrap_or(Field::Absent);
            partition.holds = equals.matches(field);
            if field == Field::Absent {
                partition.last = None;
            } else {
                remember(&mut partition.last, field);
            }
            return 0;
        }
        Having::Count { window, equals, .. } => {
            let late = !partition
                .window
                .advance(*window, params.allowed_lateness, at);
            if late {
                return partition.window.len();
            }
            if let Some(field) = field {
                remember(&mut partition.last, field);
            }
            let counted = match (equals, field) {
                (Some(equals), Some(field)) => equals.matches(field),
                _ => true,
            };
            (window, counted)
        }
        Having::Changes { window, .. } => {
            let late = !partition
                .window
                .advance(*window, params.allowed_lateness, at);
            if late {
                return partition.window.len();
            }
            // The first value is not a change; an event without the
            // property changes nothing.
            let had = partition.last.is_some();
            let changed = field.is_some_and(|field| remember(&mut partition.last, field));
            (window, changed && had)
        }
    };
    if counted {
        partition
            .window
            .add(*window, params.allowed_lateness, at, ());
    }
    partition.holds = partition.window.len() >= having.threshold();
    partition.window.len()
}

/// Keep `field` as the latest value; whether it differs from the one kept
/// before. An absent field keeps the old one. A string equal to the kept one
/// allocates nothing.
fn remember(last: &mut Option<String>, field: Field<'_>) -> bool {
    if let (Some(kept), Field::Str(s)) = (last.as_deref(), field)
        && kept == s
    {
        return false;
    }
    let Some(value) = text(field) else {
        return false;
    };
    if last.as_deref() == Some(value.as_str()) {
        return false;
    }
    *last = Some(value);
    true
}

/// A field's value as text: strings as they are, anything else as JSON.
fn text(field: Field<'_>) -> Option<String> {
    Some(match field {
        Field::Absent => return None,
        Field::Null => "null".to_owned(),
        Field::Bool(b) => b.to_string(),
        Field::Int(i) => i.to_string(),
        Field::Float(f) => Json::from(f).to_string(),
        Field::Str(s) => s.to_owned(),
        Field::Json(json) => json.to_owned(),
    })
}

/// The partition's key: its `partitionBy` values joined by `/` (`%` and `/`
/// in them percent-encoded), as the host writes bucket keys.
fn partition_key(fields: &[String], event: &Event<'_>, key: &mut String) {
    key.clear();
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            key.push('/');
        }
        if let Some(value) = text(event.get(field)).filter(|v| v != "null") {
            for c in value.chars() {
                match c {
                    '%' => key.push_str("%25"),
                    '/' => key.push_str("%2F"),
                    c => key.push(c),
                }
            }
        }
    }
}

/// The alert key of a partition with `any`: the partition, or `all` when
/// nothing partitions the bucket.
fn alert_key(partition_by: &[String], key: &str) -> String {
    if partition_by.is_empty() {
        "all".to_owned()
    } else {
        key.to_owned()
    }
}

/// What a title is about: the partition, or the rule.
fn subject(params: &Params, key: &str) -> String {
    if params.partition_by.is_empty() {
        params.name.clone()
    } else {
        key.to_owned()
    }
}

fn plural(params: &Params, n: usize) -> String {
    match params.partition_by.as_slice() {
        [one] if n == 1 => one.clone(),
        [one] => format!("{one}s"),
        _ if n == 1 => "partition".to_owned(),
        _ => "partitions".to_owned(),
    }
}

/// The condition's state in words: `state is stopped`, `4 changes of
/// state within 10m`.
fn describe(params: &Params, count: usize, value: Option<&str>) -> String {
    let value = value.unwrap_or("absent");
    match &params.evaluate.having {
        None => "matched".to_owned(),
        Some(Having::Latest { property, .. }) => format!("{property} is {value}"),
        Some(Having::Count {
            property,
            equals,
            window,
            ..
        }) => {
            let events = if count == 1 { "event" } else { "events" };
            let which = match (property, equals) {
                (Some(p), Some(e)) => format!(" with {p} {}", e.text()),
                _ => String::new(),
            };
            let window = tocsin_rule::format_duration(*window);
            format!("{count} {events}{which} within {window}")
        }
        Some(Having::Changes {
            property, window, ..
        }) => {
            let changes = if count == 1 { "change" } else { "changes" };
            let window = tocsin_rule::format_duration(*window);
            format!("{count} {changes} of {property} within {window}")
        }
    }
}

fn detail<'a>(
    alert: Alert<'a>,
    partition: &str,
    value: &Option<String>,
    count: usize,
    event: &Event<'_>,
) -> Alert<'a> {
    alert
        .field("partition", partition)
        .field("value", value)
        .field("count", count)
        .field("at", event.time())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::Harness;

    fn rule(params: Json) -> Harness<JsonRule> {
        Harness::with_params_json(&params.to_string()).unwrap()
    }

    fn error(params: Json) -> String {
        Harness::<JsonRule>::with_params_json(&params.to_string())
            .err()
            .unwrap()
    }

    fn status(machine: &str, state: &str) -> Json {
        json!({"eventType": "machineStatusChange", "clientId": "c", "machineId": machine, "state": state})
    }

    fn seen(alerts: &[Alert<'_>]) -> Vec<(String, bool, String)> {
        alerts
            .iter()
            .map(|a| (a.key().to_owned(), a.is_firing(), a.title().to_owned()))
            .collect()
    }

    fn all_stopped() -> Json {
        json!({
            "name": "all-machines-stopped",
            "where": [{"property": "eventType", "equals": "machineStatusChange"}],
            "partitionBy": ["machineId"],
            "evaluate": {"type": "all", "having": {"calc": "latest", "property": "state", "equals": "stopped"}},
        })
    }

    #[test]
    fn the_prototype_format_becomes_a_manifest() {
        let rule = rule(all_stopped());
        let manifest = rule.manifest().as_abi();
        assert_eq!(manifest.name, "all-machines-stopped");
        assert!(manifest.bucket_key.is_empty(), "one bucket per tenant");
        assert_eq!(manifest.fields, ["machineId", "state"]);
        assert_eq!(manifest.filter.len(), 1);
        assert_eq!(manifest.filter[0].field, "eventType");
    }

    #[test]
    fn all_fires_once_every_partition_matches_and_resolves_when_one_stops() {
        let mut rule = rule(all_stopped());
        let alerts = rule
            .evaluate(
                "",
                &[
                    status("m1", "running"),
                    status("m2", "stopped"),
                    status("m1", "stopped"),
                    status("m2", "stopped"),
                    status("m2", "running"),
                ],
            )
            .unwrap();
        assert_eq!(
            seen(&alerts),
            [
                (
                    "all".into(),
                    true,
                    "all 2 machineIds: state is stopped".into()
                ),
                ("all".into(), false, "m2: state is running".into()),
            ]
        );
        let alerts = rule.evaluate("", &[status("m3", "running")]).unwrap();
        assert!(
            alerts.is_empty(),
            "a new machine not stopped changes nothing: {alerts:?}"
        );
    }

    #[test]
    fn any_fires_and_resolves_per_partition() {
        let mut rule = rule(json!({
            "partitionBy": ["machineId"],
            "evaluate": {"type": "any", "having": {"calc": "latest", "property": "state", "equals": "stopped"}},
            "severity": "critical",
        }));
        let alerts = rule
            .evaluate(
                "",
                &[
                    status("m1", "stopped"),
                    status("m2", "stopped"),
                    status("m1", "stopped"),
                    status("m1", "running"),
                ],
            )
            .unwrap();
        assert_eq!(
            seen(&alerts),
            [
                ("m1".into(), true, "m1: state is stopped".into()),
                ("m2".into(), true, "m2: state is stopped".into()),
                ("m1".into(), false, "m1: state is running".into()),
            ]
        );
        assert_eq!(alerts[0].severity_level(), Severity::Critical);
        let detail: Json = serde_json::from_str(alerts[0].detail_json()).unwrap();
        assert_eq!(detail["partition"], "m1");
        assert_eq!(detail["value"], "stopped");
    }

    #[test]
    fn every_raises_an_alert_per_matching_event() {
        let mut rule = rule(json!({
            "name": "test-event",
            "where": [{"property": "eventType", "equals": "test-event"}],
            "alert": "every",
        }));
        let test = json!({"eventType": "test-event", "clientId": "c"});
        let alerts = rule.evaluate("", &[test.clone(), test.clone()]).unwrap();
        assert_eq!(
            seen(&alerts),
            [
                ("all#1".into(), true, "test-event: matched".into()),
                ("all#2".into(), true, "test-event: matched".into()),
            ]
        );
        let alerts = rule.evaluate("", &[test]).unwrap();
        assert_eq!(alerts[0].key(), "all#3", "keys never repeat");
    }

    #[test]
    fn changes_within_a_window_of_event_time() {
        let mut rule = rule(json!({
            "partitionBy": ["machineId"],
            "eventTime": "time",
            "evaluate": {"having": {"calc": "changes", "property": "state", "window": "10m", "threshold": 3}},
        }));
        let at = |state: &str, minute: u32| json!({"machineId": "m1", "state": state, "time": format!("2026-01-01T00:{minute:02}:00Z")});
        let alerts = rule
            .evaluate(
                "",
                &[
                    at("running", 0),
                    at("stopped", 1),
                    at("running", 2),
                    at("running", 3), // no change
                    at("stopped", 4), // 3rd change: fires
                ],
            )
            .unwrap();
        assert_eq!(
            seen(&alerts),
            [(
                "m1".into(),
                true,
                "m1: 3 changes of state within 10m".into()
            )]
        );
        // Minute 15: the changes at 1, 2 and 4 have left the window.
        let alerts = rule.evaluate("", &[at("running", 15)]).unwrap();
        assert_eq!(
            seen(&alerts),
            [(
                "m1".into(),
                false,
                "m1: 1 change of state within 10m".into()
            )]
        );
    }

    #[test]
    fn an_event_later_than_the_allowed_lateness_is_dropped_and_counted() {
        let params = |lateness: Json| {
            let mut params = json!({
                "partitionBy": ["machineId"],
                "eventTime": "time",
                "evaluate": {"having": {"calc": "changes", "property": "state", "window": "10m", "threshold": 2}},
            });
            if !lateness.is_null() {
                params["allowedLateness"] = lateness;
            }
            params
        };
        let at = |state: &str, second: u32| json!({"machineId": "m1", "state": state, "time": format!("2026-01-01T00:00:{second:02}Z")});
        let events = [at("running", 10), at("stopped", 20), at("running", 14)];

        // 6 s behind the newest event: late by the default 5 s.
        let mut strict = rule(params(Json::Null));
        assert!(strict.evaluate("", &events).unwrap().is_empty());
        let m1 = &strict.state("").unwrap().partitions["m1"];
        assert_eq!((m1.window.len(), m1.window.late()), (1, 1));
        assert_eq!(
            m1.last.as_deref(),
            Some("stopped"),
            "a late event changes nothing"
        );

        let mut patient = rule(params(json!("10s")));
        let alerts = patient.evaluate("", &events).unwrap();
        assert_eq!(
            seen(&alerts),
            [(
                "m1".into(),
                true,
                "m1: 2 changes of state within 10m".into()
            )]
        );
        assert_eq!(patient.state("").unwrap().partitions["m1"].window.late(), 0);

        assert!(
            error(params(json!("a while")))
                .starts_with("`allowedLateness`: `a while` is not a duration"),
            "{}",
            error(params(json!("a while")))
        );
    }

    #[test]
    fn a_state_of_version_1_0_is_upgraded() {
        #[derive(Serialize)]
        struct PartitionV1 {
            holds: bool,
            last: Option<String>,
            times: Vec<i64>,
        }
        #[derive(Serialize)]
        struct StateV1 {
            partitions: BTreeMap<String, PartitionV1>,
            all_firing: bool,
            raised: u64,
        }
        let mut rule = rule(json!({
            "partitionBy": ["machineId"],
            "evaluate": {"having": {"calc": "count", "window": "1m", "threshold": 2}},
        }));
        rule.set_now(1_000_000);
        let old = PartitionV1 {
            holds: false,
            last: None,
            times: vec![990_000],
        };
        rule.store_older(
            "",
            1,
            "json-rule@1.0.0",
            &StateV1 {
                partitions: [("m1".to_owned(), old)].into(),
                all_firing: false,
                raised: 0,
            },
        );
        let alerts = rule.evaluate("", &[json!({"machineId": "m1"})]).unwrap();
        assert_eq!(
            seen(&alerts),
            [("m1".into(), true, "m1: 2 events within 1m".into())],
            "the event counted before the upgrade still counts"
        );
    }

    #[test]
    fn count_counts_matching_events_within_the_window() {
        let mut rule = rule(json!({
            "partitionBy": ["machineId"],
            "evaluate": {"having": {"calc": "count", "property": "state", "equals": "error", "window": 60000, "threshold": 2}},
        }));
        let event = |state: &str| json!({"machineId": "m1", "state": state});
        rule.set_now(0);
        assert!(rule.evaluate("", &[event("error")]).unwrap().is_empty());
        rule.set_now(30_000);
        let alerts = rule.evaluate("", &[event("ok"), event("error")]).unwrap();
        assert_eq!(
            seen(&alerts),
            [(
                "m1".into(),
                true,
                "m1: 2 events with state error within 1m".into()
            )]
        );
        rule.set_now(120_000);
        let alerts = rule.evaluate("", &[event("error")]).unwrap();
        assert!(!alerts[0].is_firing(), "the earlier errors aged out");
    }

    #[test]
    fn where_star_means_present_and_numbers_compare_by_value() {
        let mut rule = rule(json!({
            "where": [{"property": "level", "equals": "*"}],
            "evaluate": {"having": {"calc": "latest", "property": "level", "equals": 5}},
        }));
        let manifest = rule.manifest().as_abi();
        assert_eq!(manifest.filter[0].field, "level");
        let alerts = rule.evaluate("", &[json!({"level": 5.0})]).unwrap();
        assert_eq!(
            seen(&alerts),
            [("all".into(), true, "json-rule: level is 5.0".into())]
        );
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let err = error(json!({"evaluate": {"type": "most"}}));
        assert!(
            err.contains("`evaluate.type`") && err.contains("unknown variant `most`"),
            "{err}"
        );
        let err = error(json!({"partitonBy": ["machineId"]}));
        assert!(err.contains("unknown field `partitonBy`"), "{err}");
        let err = error(
            json!({"evaluate": {"having": {"calc": "changes", "property": "state", "window": "10 minutes please", "threshold": 3}}}),
        );
        assert!(
            err.contains("`10 minutes please` is not a duration"),
            "{err}"
        );
        let err = error(
            json!({"evaluate": {"having": {"calc": "count", "window": "1m", "threshold": 0}}}),
        );
        assert!(err.contains("nonzero"), "{err}");
        let err = error(json!({"evaluate": {"having": {"calc": "latest", "property": "state"}}}));
        assert!(err.contains("missing field `equals`"), "{err}");
        let err = error(json!({"where": [{"property": "x", "equals": {"a": 1}}]}));
        assert!(
            err.contains("`where[0].equals`") && err.contains("not {\"a\":1}"),
            "{err}"
        );
        let err = error(
            json!({"evaluate": {"having": {"calc": "count", "equals": 1, "window": "1m", "threshold": 1}}}),
        );
        assert!(err.contains("`equals` needs the `property`"), "{err}");
    }
}
