//! Retrying a throttled or contended AWS call: exponential backoff with full
//! jitter, so hosts that failed together do not retry together.

use std::time::Duration;

/// First delay.
const BASE: Duration = Duration::from_millis(50);
/// Longest delay.
const CAP: Duration = Duration::from_secs(5);

/// The delay before retry number `attempt` (1-based): uniform in
/// `[0, min(CAP, BASE · 2^attempt))`.
pub fn delay(attempt: u32) -> Duration {
    let ceiling = BASE
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(CAP);
    ceiling.mul_f64(rand::random::<f64>())
}

pub async fn sleep(attempt: u32) {
    tokio::time::sleep(delay(attempt)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        for _ in 0..100 {
            assert!(delay(1) < Duration::from_millis(100));
            assert!(delay(30) <= CAP);
        }
        let late: Duration = (0..200).map(|_| delay(10)).sum();
        let early: Duration = (0..200).map(|_| delay(1)).sum();
        assert!(late > early * 4, "{late:?} vs {early:?}");
    }
}
