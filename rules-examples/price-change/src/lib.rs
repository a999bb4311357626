//! Example rule: alert when a quote's price differs by more than
//! `threshold_pct` (a parameter, default 1 %) from the previous quote of the
//! same ticker (relative to that previous price). One
//! bucket per ticker; the first quote of a ticker never fires. Every move is
//! its own alert: a counter in the state makes the keys unique within the
//! bucket (`change-1`, `change-2`, ...). Price moves are not resolved.

use serde::{Deserialize, Serialize};
use tocsin_rule::{Alert, Context, Error, Events, Manifest, Rule, Severity};

pub struct PriceChange;

/// `{"threshold_pct": 0.5}`: a move of more than half a percent fires.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// A move larger than this percentage of the previous price fires.
    pub threshold_pct: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params { threshold_pct: 1.0 }
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The price of the ticker's latest quote.
    pub previous: Option<f64>,
    /// How many moves have fired so far.
    pub changes: u64,
}

impl Rule for PriceChange {
    type Params = Params;
    type State = State;

    fn manifest(_: &Params) -> Manifest {
        Manifest::new("price-change", "1.1.0")
            .when_equals("eventType", "quote")
            .bucket_by(["ticker"])
            .event_time("time")
            .fields(["price"])
    }

    fn evaluate(
        params: &Params,
        state: &mut State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let threshold = params.threshold_pct / 100.0;
        for event in events.iter() {
            let price = event.require_f64("price")?;
            if !price.is_finite() {
                return Err(Error::bad_event(&event, "`price` must be a finite number"));
            }
            // A previous price of zero has no relative change to speak of.
            if let Some(previous) = state.previous.filter(|&p| p != 0.0) {
                let change = (price - previous) / previous.abs();
                if change.abs() > threshold {
                    state.changes += 1;
                    let change_pct = change * 100.0;
                    let ticker = ctx.bucket();
                    let alert = Alert::firing(
                        format!("change-{}", state.changes),
                        format!("{ticker} {change_pct:+.2}% to {price:.2}"),
                    )
                    .severity(Severity::Warning)
                    .field("previous", previous)
                    .field("price", price)
                    .field("change_pct", change_pct)
                    .field("at", event.time());
                    ctx.emit(alert);
                }
            }
            state.previous = Some(price);
        }
        Ok(())
    }
}

tocsin_rule::export!(PriceChange);

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_rule::json;
    use tocsin_rule::testing::{Harness, abi};

    fn quote(ticker: &str, price: f64, time: &str) -> serde_json::Value {
        json!({"eventType": "quote", "clientId": "client-05", "ticker": ticker, "price": price, "time": time})
    }

    fn detail(alert: &Alert) -> serde_json::Value {
        serde_json::from_str(alert.detail_json()).unwrap()
    }

    #[test]
    fn the_manifest_buckets_by_ticker_on_event_time() {
        let rule = Harness::<PriceChange>::new();
        let manifest = rule.manifest().as_abi();
        assert_eq!(manifest.name, "price-change");
        assert_eq!(manifest.version, "1.1.0");
        assert_eq!(manifest.bucket_key, ["ticker"]);
        assert_eq!(manifest.fields, ["price"]);
        assert_eq!(
            manifest.event_time,
            abi::EventTime::Field("time".to_owned())
        );
    }

    #[test]
    fn the_first_quote_never_fires_and_a_move_over_one_percent_does() {
        let mut rule = Harness::<PriceChange>::new();
        let alerts = rule
            .evaluate("AMZN", &[quote("AMZN", 101.6, "2026-01-01T00:00:00Z")])
            .unwrap();
        assert!(alerts.is_empty());
        assert_eq!(
            rule.state("AMZN"),
            Some(State {
                previous: Some(101.6),
                changes: 0
            })
        );

        let alerts = rule
            .evaluate("AMZN", &[quote("AMZN", 103.2, "2026-01-01T00:00:01Z")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        let alert = &alerts[0];
        assert_eq!(alert.key(), "change-1");
        assert!(alert.is_firing());
        assert_eq!(alert.severity_level(), Severity::Warning);
        assert_eq!(alert.title(), "AMZN +1.57% to 103.20");
        let detail = detail(alert);
        assert_eq!(detail["previous"], json!(101.6));
        assert_eq!(detail["price"], json!(103.2));
        let pct = detail["change_pct"].as_f64().unwrap();
        assert!((pct - 1.574_803).abs() < 1e-6, "change_pct {pct}");
        assert_eq!(detail["at"], json!(1_767_225_601_000_i64));
        assert_eq!(
            rule.state("AMZN"),
            Some(State {
                previous: Some(103.2),
                changes: 1
            })
        );
    }

    #[test]
    fn each_move_gets_its_own_key_and_compares_with_the_previous_quote() {
        let mut rule = Harness::<PriceChange>::new();
        let alerts = rule
            .evaluate(
                "AMZN",
                &[
                    quote("AMZN", 100.0, "2026-01-01T00:00:00Z"),
                    quote("AMZN", 101.0, "2026-01-01T00:00:01Z"), // exactly +1 %: no
                    quote("AMZN", 102.5, "2026-01-01T00:00:02Z"), // +1.49 %
                    quote("AMZN", 103.0, "2026-01-01T00:00:03Z"), // +0.49 %: no
                    quote("AMZN", 101.0, "2026-01-01T00:00:04Z"), // -1.94 %
                    quote("AMZN", 100.0, "2026-01-01T00:00:05Z"), // -0.99 %: no
                ],
            )
            .unwrap();
        let seen: Vec<(&str, &str)> = alerts.iter().map(|a| (a.key(), a.title())).collect();
        assert_eq!(
            seen,
            [
                ("change-1", "AMZN +1.49% to 102.50"),
                ("change-2", "AMZN -1.94% to 101.00"),
            ]
        );
        assert!(alerts.iter().all(Alert::is_firing));
        assert_eq!(
            rule.state("AMZN"),
            Some(State {
                previous: Some(100.0),
                changes: 2
            })
        );

        let alerts = rule
            .evaluate("AMZN", &[quote("AMZN", 98.0, "2026-01-01T00:00:06Z")])
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].key(),
            "change-3",
            "keys never repeat across batches"
        );
        assert_eq!(alerts[0].title(), "AMZN -2.00% to 98.00");
    }

    #[test]
    fn the_threshold_is_a_parameter() {
        let mut rule = Harness::<PriceChange>::with_params_json(r#"{"threshold_pct": 5}"#).unwrap();
        assert_eq!(rule.params().threshold_pct, 5.0);
        let alerts = rule
            .evaluate(
                "AMZN",
                &[
                    quote("AMZN", 100.0, "2026-01-01T00:00:00Z"),
                    quote("AMZN", 104.0, "2026-01-01T00:00:01Z"), // +4 %: no
                    quote("AMZN", 110.0, "2026-01-01T00:00:02Z"), // +5.8 %
                ],
            )
            .unwrap();
        let titles: Vec<&str> = alerts.iter().map(|a| a.title()).collect();
        assert_eq!(titles, ["AMZN +5.77% to 110.00"]);
    }

    #[test]
    fn a_misspelt_or_mistyped_parameter_is_an_error_naming_it() {
        let err = Harness::<PriceChange>::with_params_json(r#"{"threshold": 5}"#)
            .err()
            .unwrap();
        assert_eq!(
            err,
            "`threshold`: unknown field `threshold`, expected `threshold_pct`"
        );
        let err = Harness::<PriceChange>::with_params_json(r#"{"threshold_pct": "5"}"#)
            .err()
            .unwrap();
        assert!(
            err.starts_with("`threshold_pct`: invalid type: string"),
            "{err}"
        );
    }

    #[test]
    fn tickers_do_not_share_previous_prices() {
        let mut rule = Harness::<PriceChange>::new();
        rule.evaluate("AMZN", &[quote("AMZN", 100.0, "2026-01-01T00:00:00Z")])
            .unwrap();
        let alerts = rule
            .evaluate("MSFT", &[quote("MSFT", 400.0, "2026-01-01T00:00:01Z")])
            .unwrap();
        assert!(
            alerts.is_empty(),
            "the first MSFT quote is not compared with AMZN"
        );
        assert_eq!(rule.state("AMZN").unwrap().previous, Some(100.0));
        assert_eq!(rule.state("MSFT").unwrap().previous, Some(400.0));
    }

    #[test]
    fn an_integer_price_is_a_number() {
        let mut rule = Harness::<PriceChange>::new();
        let alerts = rule
            .evaluate(
                "AMZN",
                &[
                    json!({"eventType": "quote", "ticker": "AMZN", "price": 100, "time": "2026-01-01T00:00:00Z"}),
                    json!({"eventType": "quote", "ticker": "AMZN", "price": 98, "time": "2026-01-01T00:00:01Z"}),
                ],
            )
            .unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].title(), "AMZN -2.00% to 98.00");
    }

    #[test]
    fn a_missing_or_non_numeric_price_is_a_bad_event() {
        let mut rule = Harness::<PriceChange>::new();
        let err = rule
            .evaluate(
                "AMZN",
                &[
                    quote("AMZN", 100.0, "2026-01-01T00:00:00Z"),
                    json!({"eventType": "quote", "ticker": "AMZN", "price": "101.6", "time": "2026-01-01T00:00:01Z"}),
                ],
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "bad event #1: `price` must be a number");

        let err = rule
            .evaluate(
                "AMZN",
                &[json!({"eventType": "quote", "ticker": "AMZN", "time": "2026-01-01T00:00:01Z"})],
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "bad event #0: `price` must be a number");
        assert_eq!(rule.state("AMZN"), None, "a failed call changes no state");
    }
}
