//! Reading times the way the host does.

/// An RFC 3339 time (`2026-01-01T00:00:10Z`, `…+02:00`, fractions kept to
/// the millisecond) as epoch milliseconds; `None` if it is not one. The host
/// reads a manifest's event-time field the same way; a rule reads other
/// times with it, or an event time it wants to fall back from.
pub fn parse_time(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_as_epoch_milliseconds() {
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Some(1_767_225_600_000));
        assert_eq!(
            parse_time("2026-01-01T02:00:00.250+02:00"),
            Some(1_767_225_600_250)
        );
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2026-01-01"), None);
    }
}
