//! Whether a watch still shows the cluster. Decisions run on the last snapshot while a watch
//! reconnects; once one has been failing for longer than the configured limit, counts from it
//! may be far off in either direction (pods that finished still counted: the cluster would be
//! blocked; pods created since not counted), so the count quotas stop being enforced until it
//! recovers. The rate needs no cache and stays enforced.
//!
//! "Time since the last event" is no such signal: a quiet cluster delivers nothing for hours
//! through a perfectly healthy watch. What a broken watch does deliver is errors: kube-runtime
//! retries it at least every [`crate::backoff::Jittered::for_watches`] maximum (5 s), and each
//! failed try is an error. So a watch is broken from its first error until it delivers an
//! event again, or until [`QUIET`] passes without another error (a re-established watch of a
//! quiet resource delivers nothing).

use std::time::{Duration, Instant};

/// Longer than kube-rs's 30 s connect timeout plus the 5 s maximum back-off, so even retries
/// that hang until that timeout keep a broken watch broken; a quiet resource whose watch came
/// back is taken as recovered after this.
pub const QUIET: Duration = Duration::from_secs(45);

/// The health of one watch, fed by its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchHealth {
    broken_since: Option<Instant>,
    last_error: Option<Instant>,
}

impl WatchHealth {
    /// The watch delivered an event (or a complete list): it works.
    pub fn delivered(&mut self) {
        *self = WatchHealth::default();
    }

    /// The watch (or a retry of it) failed.
    pub fn failed(&mut self, now: Instant) {
        let since = match self.broken_since {
            Some(since) if !self.recovered_quietly(now) => since,
            _ => now,
        };
        self.broken_since = Some(since);
        self.last_error = Some(now);
    }

    fn recovered_quietly(&self, now: Instant) -> bool {
        self.last_error
            .is_some_and(|e| now.saturating_duration_since(e) >= QUIET)
    }

    /// How long the watch has been broken, or `None` while it works.
    pub fn broken_for(&self, now: Instant) -> Option<Duration> {
        if self.recovered_quietly(now) {
            return None;
        }
        self.broken_since
            .map(|since| now.saturating_duration_since(since))
    }
}

/// A watch broken for longer than the limit: counts are not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    pub resource: &'static str,
    pub broken_for: Duration,
    pub limit: Duration,
}

impl Stale {
    /// The most stale of `broken` (resource, broken for) if it is past `limit`.
    pub fn pick(
        broken: impl IntoIterator<Item = (&'static str, Duration)>,
        limit: Duration,
    ) -> Option<Stale> {
        broken
            .into_iter()
            .filter(|(_, d)| *d > limit)
            .max_by_key(|(_, d)| *d)
            .map(|(resource, broken_for)| Stale {
                resource,
                broken_for,
                limit,
            })
    }

    /// The admission warning: what is not enforced, since when, and the knob.
    pub fn warning(&self) -> String {
        format!(
            "bulwark: the watch of {} has been failing for {}s (cacheStaleLimitSeconds {}): \
             pod-count quotas are not enforced until it recovers; the creation rate still is",
            self.resource,
            self.broken_for.as_secs(),
            self.limit.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_quiet_healthy_watch_is_never_broken() {
        let t = Instant::now();
        let h = WatchHealth::default();
        assert_eq!(h.broken_for(t + 3600 * S), None);
    }

    #[test]
    fn broken_from_the_first_error_while_errors_keep_coming() {
        let t = Instant::now();
        let mut h = WatchHealth::default();
        for i in 0..20 {
            h.failed(t + i * 5 * S);
        }
        assert_eq!(h.broken_for(t + 96 * S), Some(96 * S));
    }

    #[test]
    fn an_event_ends_it() {
        let t = Instant::now();
        let mut h = WatchHealth::default();
        h.failed(t);
        h.delivered();
        assert_eq!(h.broken_for(t + S), None);
    }

    #[test]
    fn a_quiet_period_without_errors_ends_it_and_a_later_error_starts_afresh() {
        let t = Instant::now();
        let mut h = WatchHealth::default();
        h.failed(t);
        assert_eq!(h.broken_for(t + QUIET - S), Some(QUIET - S));
        assert_eq!(h.broken_for(t + QUIET), None);
        h.failed(t + 100 * S);
        assert_eq!(h.broken_for(t + 101 * S), Some(S));
    }

    #[test]
    fn only_past_the_limit_and_the_worst_one_is_named() {
        let limit = 60 * S;
        assert_eq!(Stale::pick([("pods", 60 * S)], limit), None);
        let stale = Stale::pick([("pods", 61 * S), ("nodes", 90 * S)], limit);
        assert_eq!(
            stale,
            Some(Stale {
                resource: "nodes",
                broken_for: 90 * S,
                limit
            })
        );
        let text = stale.map(|s| s.warning()).unwrap_or_default();
        assert!(
            text.contains("watch of nodes has been failing for 90s"),
            "{text}"
        );
        assert!(text.contains("cacheStaleLimitSeconds 60"), "{text}");
    }
}
