//! `retryAfterSeconds` with jitter. client-go sleeps exactly the whole seconds the API server
//! passes on in `Retry-After`, so without jitter every refused client would return at once.

use std::time::Duration;

/// Turns the time until capacity is expected back into whole seconds to tell the client:
/// the base is that time rounded up to whole seconds, at least 1 and at most `max`; the
/// answer is drawn uniformly from the whole seconds `base ..= base + max(1, base / 2)`.
/// Drawing whole seconds (not rounding a continuous draw) keeps the spread at small bases:
/// refused at base 1, clients come back after 1 or 2 seconds, not all after 2.
/// `unit` is a uniform sample from `[0, 1)`.
pub fn retry_after_seconds(expected: Duration, max: Duration, unit: f64) -> u32 {
    let max = max.as_secs_f64().max(1.0);
    let base = expected.as_secs_f64().clamp(1.0, max).ceil();
    let spread = (base / 2.0).floor().max(1.0);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let extra = (unit * (spread + 1.0)).floor().min(spread);
    // At most 1.5 x max + 1 seconds; the cast cannot truncate meaningfully.
    (base + extra).clamp(1.0, f64::from(u32::MAX)) as u32
}

/// [`retry_after_seconds`] with a random sample.
pub fn jittered(expected: Duration, max: Duration) -> u32 {
    retry_after_seconds(expected, max, fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn bounds() {
        for (expected_ms, lo, hi) in [
            (0u64, 1, 2),
            (200, 1, 2),
            (1000, 1, 2),
            (2500, 3, 4),
            (10_000, 10, 15),
            (600_000, 30, 45),
        ] {
            let e = Duration::from_millis(expected_ms);
            assert_eq!(retry_after_seconds(e, MAX, 0.0), lo, "{expected_ms}ms low");
            assert_eq!(
                retry_after_seconds(e, MAX, 0.999_999),
                hi,
                "{expected_ms}ms high"
            );
            for _ in 0..1000 {
                let s = jittered(e, MAX);
                assert!((lo..=hi).contains(&s), "{expected_ms}ms gave {s}");
            }
        }
    }

    #[test]
    fn odd_samples_are_tamed() {
        assert_eq!(
            retry_after_seconds(Duration::from_secs(4), MAX, f64::NAN),
            4
        );
        assert_eq!(retry_after_seconds(Duration::from_secs(4), MAX, 7.0), 6);
        assert_eq!(
            retry_after_seconds(Duration::from_secs(4), Duration::ZERO, 0.0),
            1
        );
    }

    #[test]
    fn short_waits_still_spread() {
        let distinct: std::collections::HashSet<u32> = (0..200)
            .map(|_| jittered(Duration::from_millis(300), MAX))
            .collect();
        assert_eq!(distinct, [1, 2].into(), "base 1 answers 1 or 2");
        assert_eq!(retry_after_seconds(Duration::from_secs(1), MAX, 0.49), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1), MAX, 0.5), 2);
    }

    #[test]
    fn refused_clients_are_spread_out() {
        let e = Duration::from_secs(8);
        let distinct: std::collections::HashSet<u32> = (0..200).map(|_| jittered(e, MAX)).collect();
        assert!(distinct.len() >= 4, "{distinct:?}");
    }
}
