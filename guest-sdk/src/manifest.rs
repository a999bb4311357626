//! What a rule declares about itself: name, version, the events it wants and
//! how they are grouped into buckets. The host evaluates all of it natively.

use std::time::Duration;

use crate::abi;

/// A rule's declaration, built with chained calls:
///
/// ```
/// use tocsin_rule::Manifest;
///
/// let manifest = Manifest::new("any-machine-stopped", "1.0.0")
///     .when_equals("eventType", "machineStatusChange")
///     .bucket_by(["machineId"])
///     .fields(["machineId", "state"]);
/// assert_eq!(manifest.name(), "any-machine-stopped");
/// ```
#[derive(Clone, Debug)]
pub struct Manifest {
    inner: abi::Manifest,
    /// Guest-side only: how this version's state relates to older ones'.
    state_schema: u32,
    reset_older_state: bool,
}

/// A literal compared with an event field by the host's filter.
#[derive(Clone, Debug)]
pub struct Literal(abi::Scalar);

impl From<&str> for Literal {
    fn from(value: &str) -> Self {
        Literal(abi::Scalar::Text(value.to_owned()))
    }
}

impl From<String> for Literal {
    fn from(value: String) -> Self {
        Literal(abi::Scalar::Text(value))
    }
}

impl From<bool> for Literal {
    fn from(value: bool) -> Self {
        Literal(abi::Scalar::Boolean(value))
    }
}

impl From<i64> for Literal {
    fn from(value: i64) -> Self {
        Literal(abi::Scalar::Integer(value))
    }
}

impl From<f64> for Literal {
    fn from(value: f64) -> Self {
        Literal(abi::Scalar::Float(value))
    }
}

impl From<()> for Literal {
    fn from((): ()) -> Self {
        Literal(abi::Scalar::Null)
    }
}

impl Manifest {
    /// A rule called `name` at semantic version `version`, wanting every
    /// event of its tenant, with one bucket per tenant and no fields.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Manifest {
            inner: abi::Manifest {
                name: name.into(),
                version: version.into(),
                filter: Vec::new(),
                bucket_key: Vec::new(),
                fields: Vec::new(),
                raw_json: false,
                event_time: abi::EventTime::Arrival,
                state_ttl_ms: None,
            },
            state_schema: 1,
            reset_older_state: false,
        }
    }

    /// The schema of the rule's `State` (default 1). Raise it when a new
    /// version changes `State` so that what older versions stored no longer
    /// decodes: the new version then reads older states through
    /// [`Rule::upgrade_state`](crate::Rule::upgrade_state), or starts
    /// afresh if it declares [`reset_older_state`](Self::reset_older_state).
    /// A state it cannot read is an error naming both versions, never a
    /// silent reset.
    pub fn state_schema(mut self, schema: u32) -> Self {
        self.state_schema = schema.max(1);
        self
    }

    /// Buckets holding a state of an older schema start from the default
    /// state instead of being upgraded.
    pub fn reset_older_state(mut self) -> Self {
        self.reset_older_state = true;
        self
    }

    pub(crate) fn state_codec(&self) -> crate::state::Codec {
        crate::state::Codec {
            label: format!("{}@{}", self.inner.name, self.inner.version),
            schema: self.state_schema,
            reset_older: self.reset_older_state,
        }
    }

    /// Only events whose top-level `field` equals `value`.
    pub fn when_equals(mut self, field: &str, value: impl Into<Literal>) -> Self {
        self.push(field, abi::Test::Equals(value.into().0));
        self
    }

    /// Only events whose top-level `field` equals one of `values`.
    pub fn when_one_of<L: Into<Literal>>(
        mut self,
        field: &str,
        values: impl IntoIterator<Item = L>,
    ) -> Self {
        let values = values.into_iter().map(|v| v.into().0).collect();
        self.push(field, abi::Test::OneOf(values));
        self
    }

    /// Only events that have a top-level `field` (any value, `null` too).
    pub fn when_exists(mut self, field: &str) -> Self {
        self.push(field, abi::Test::Exists);
        self
    }

    /// One bucket per distinct combination of these top-level fields.
    pub fn bucket_by<'a>(mut self, fields: impl IntoIterator<Item = &'a str>) -> Self {
        self.inner.bucket_key = fields.into_iter().map(str::to_owned).collect();
        self
    }

    /// The top-level fields the rule reads through [`Event`](crate::Event)
    /// accessors. Only these cross into the sandbox, already typed.
    pub fn fields<'a>(mut self, fields: impl IntoIterator<Item = &'a str>) -> Self {
        self.inner.fields = fields.into_iter().map(str::to_owned).collect();
        self
    }

    /// Also hand each event's raw JSON text to the rule
    /// ([`Event::raw_json`](crate::Event::raw_json)).
    pub fn raw_json(mut self) -> Self {
        self.inner.raw_json = true;
        self
    }

    /// Take event time from this top-level field (RFC 3339 string or epoch
    /// milliseconds) instead of the arrival time.
    pub fn event_time(mut self, field: &str) -> Self {
        self.inner.event_time = abi::EventTime::Field(field.to_owned());
        self
    }

    /// Forget a bucket's state once it has seen no event for `ttl`.
    pub fn state_ttl(mut self, ttl: Duration) -> Self {
        self.inner.state_ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The declared fields, in order.
    pub fn field_names(&self) -> &[String] {
        &self.inner.fields
    }

    fn push(&mut self, field: &str, test: abi::Test) {
        self.inner.filter.push(abi::Condition {
            field: field.to_owned(),
            test,
        });
    }

    #[doc(hidden)]
    pub fn into_abi(self) -> abi::Manifest {
        self.inner
    }

    #[doc(hidden)]
    pub fn as_abi(&self) -> &abi::Manifest {
        &self.inner
    }
}
