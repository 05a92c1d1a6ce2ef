//! Exponential back-off with full jitter, for bulwark's own API clients (watch
//! re-connection, writes). Every replica and every watch draws its own delay, so clients that
//! lost the API server together do not come back together.

use std::time::Duration;

use futures::Stream;
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};

/// A watch that resumes after errors with the jittered back-off every bulwark watch uses.
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config).backoff(Jittered::for_watches())
}

#[derive(Debug, Clone)]
pub struct Jittered {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Jittered {
    pub fn new(min: Duration, max: Duration) -> Self {
        Jittered {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// Watches: decisions run on the last snapshot while a watch is down, so reconnect
    /// sooner than kube-runtime's default (0.8 s doubling to 30 s); three watches per
    /// replica are cheap for the API server even at a 5 s ceiling.
    pub fn for_watches() -> Self {
        Jittered::new(Duration::from_millis(250), Duration::from_secs(5))
    }

    /// The delay for an attempt, given a uniform sample `unit` from [0, 1): somewhere in
    /// [min, ceiling], the ceiling doubling from `min` per attempt up to `max`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.min + (ceiling - self.min).mul_f64(unit)
    }
}

impl Iterator for Jittered {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.delay(self.attempt, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        Some(d)
    }
}

impl Backoff for Jittered {
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_to_max_and_jitter_spans_it() {
        let b = Jittered::new(Duration::from_millis(250), Duration::from_secs(5));
        let ms = |attempt, unit| b.delay(attempt, unit).as_millis();
        assert_eq!(ms(0, 0.99), 250, "first retry at the floor");
        assert_eq!(ms(1, 0.0), 250);
        assert_eq!(ms(1, 1.0), 500);
        assert_eq!(ms(3, 1.0), 2000);
        assert_eq!(ms(5, 1.0), 5000, "capped");
        assert_eq!(ms(60, 1.0), 5000, "no overflow on long outages");
        assert_eq!(ms(5, 0.5), 2625, "full jitter over [min, ceiling]");
        assert_eq!(ms(2, f64::NAN), 250);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Jittered::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..10 {
            assert!(b.next().is_some_and(|d| d <= Duration::from_secs(1)));
        }
        b.reset();
        assert!(b.next().is_some_and(|d| d == Duration::from_millis(100)));
    }
}
