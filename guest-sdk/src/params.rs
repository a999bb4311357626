//! Helpers for reading a rule's parameters.

/// A `std::time::Duration` parameter written as text — `"500ms"`, `"2s"`,
/// `"10m"`, `"1h 30m"` — or as a number of milliseconds. Use it with
/// `#[serde(with = "tocsin_rule::duration")]`:
///
/// ```
/// use std::time::Duration;
/// # use serde::Deserialize;
/// #[derive(Deserialize)]
/// struct Params {
///     #[serde(with = "tocsin_rule::duration")]
///     window: Duration,
/// }
/// let params: Params = serde_json::from_str(r#"{"window": "10m"}"#).unwrap();
/// assert_eq!(params.window, Duration::from_secs(600));
/// let params: Params = serde_json::from_str(r#"{"window": 1500}"#).unwrap();
/// assert_eq!(params.window, Duration::from_millis(1500));
/// ```
pub mod duration {
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    /// Written back as text (`"10m"`), as it is read.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*duration))
    }

    /// An optional duration parameter: `null` or absent is `None`. Use it
    /// with `#[serde(with = "tocsin_rule::duration::option")]`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        #[derive(Deserialize, Serialize)]
        struct Text(#[serde(with = "super")] Duration);

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            Ok(Option::<Text>::deserialize(deserializer)?.map(|Text(d)| d))
        }

        pub fn serialize<S: Serializer>(
            duration: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            duration.map(Text).serialize(serializer)
        }
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(r#"a duration such as "500ms", "2s", "10m" or "1h 30m", or milliseconds"#)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|e| {
                E::custom(format!(
                    "`{text}` is not a duration ({e}); write one such as \"500ms\", \"2s\", \"10m\" or \"1h 30m\""
                ))
            })
        }

        fn visit_u64<E: de::Error>(self, millis: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(millis))
        }

        fn visit_i64<E: de::Error>(self, millis: i64) -> Result<Duration, E> {
            u64::try_from(millis)
                .map(Duration::from_millis)
                .map_err(|_| E::custom(format!("a duration cannot be negative ({millis} ms)")))
        }
    }
}

/// A duration as parameters write it: `10m`, `2s`, `1h 30m`.
pub fn format_duration(duration: std::time::Duration) -> impl std::fmt::Display {
    humantime::format_duration(duration)
}
