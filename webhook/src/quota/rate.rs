//! GCRA (generic cell rate algorithm): a token bucket kept as one number, the theoretical
//! arrival time (TAT) of the next creation. Pure functions over an injected clock.

use std::time::Duration;

use crate::policy::Rate;

/// Nanoseconds since the ledger's epoch; a plain integer keeps the state `Copy` and small.
pub type Nanos = u64;

/// Decides one creation at `now` against `tat`.
///
/// `Ok(new_tat)` admits it (store `new_tat`); `Err(wait)` refuses it, and `wait` is how long
/// until the bucket has room again.
pub fn check(tat: Nanos, now: Nanos, rate: Rate, burst: u32) -> Result<Nanos, Duration> {
    let interval = u64::try_from(rate.interval.as_nanos()).unwrap_or(u64::MAX);
    let tolerance = interval.saturating_mul(u64::from(burst.saturating_sub(1)));
    let tat = tat.max(now);
    let ahead = tat - now;
    if ahead > tolerance {
        Err(Duration::from_nanos(ahead - tolerance))
    } else {
        Ok(tat.saturating_add(interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_rate;

    const SEC: Nanos = 1_000_000_000;

    fn rate(s: &str) -> Rate {
        parse_rate(s).unwrap().unwrap()
    }

    /// Admits as many as it can at `now`, returning the count and the final TAT.
    fn drain(mut tat: Nanos, now: Nanos, r: Rate, burst: u32) -> (u32, Nanos, Duration) {
        let mut n = 0;
        loop {
            match check(tat, now, r, burst) {
                Ok(t) => {
                    tat = t;
                    n += 1;
                }
                Err(wait) => return (n, tat, wait),
            }
        }
    }

    #[test]
    fn burst_then_sustained_rate() {
        let r = rate("5/s");
        let start = 100 * SEC;
        let (n, tat, wait) = drain(0, start, r, 20);
        assert_eq!(n, 20, "a full bucket admits the burst at once");
        assert_eq!(
            wait,
            Duration::from_millis(200),
            "next slot after one interval"
        );

        // One second later exactly five more fit: the sustained rate.
        let (n, _, _) = drain(tat, start + SEC, r, 20);
        assert_eq!(n, 5);
    }

    #[test]
    fn burst_of_one_is_strict_spacing() {
        let r = rate("2/s");
        let t0 = 10 * SEC;
        let tat = check(0, t0, r, 1).unwrap();
        assert_eq!(check(tat, t0, r, 1), Err(Duration::from_millis(500)));
        assert_eq!(
            check(tat, t0 + SEC / 4, r, 1),
            Err(Duration::from_millis(250))
        );
        assert!(check(tat, t0 + SEC / 2, r, 1).is_ok());
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let r = rate("10/s");
        let (n, tat, _) = drain(0, SEC, r, 3);
        assert_eq!(n, 3);
        let (n, _, _) = drain(tat, 3600 * SEC, r, 3);
        assert_eq!(n, 3, "an hour idle still gives only the burst");
    }

    #[test]
    fn wait_is_never_longer_than_needed() {
        let r = rate("300/m");
        let (_, tat, wait) = drain(0, SEC, r, 5);
        // After waiting exactly `wait`, one creation is admitted.
        let later = SEC + u64::try_from(wait.as_nanos()).unwrap();
        assert!(check(tat, later, r, 5).is_ok());
        assert!(check(tat, later - 1, r, 5).is_err());
    }
}
