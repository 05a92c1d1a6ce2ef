//! Which namespaces are due a Throttled Event, and what it says. The admission path only
//! counts its refusals here ([`Throttled::refused`]); a publisher off the path asks once a
//! second what is due ([`Throttled::due`]): a namespace's first refusal at once, then one
//! report a minute at most while the refusals go on, each summing up what was refused since
//! the last. So a burst of 10,000 refused creations in a namespace costs one Event a minute,
//! not 10,000.
//!
//! Memory is one small entry per namespace refused in about the last minute: an entry whose
//! last report is a minute old and that has been refused nothing since is dropped when it is
//! next looked at.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::refusal::{REASONS, Refusal};

/// At most one report per namespace this often while refusals go on.
pub const EVERY: Duration = Duration::from_secs(60);

/// Refusals of one namespace since its last report.
#[derive(Debug, Default)]
struct Entry {
    /// By reason (the index in [`REASONS`]): how many, and the last refusal, whose limit the
    /// report names.
    by_reason: [Option<(u32, Refusal)>; REASONS.len()],
    /// The first refusal since the last report.
    since: Option<Instant>,
    /// When the last report was taken; `None` before the first of this episode.
    reported: Option<Instant>,
}

impl Entry {
    fn total(&self) -> u64 {
        self.by_reason
            .iter()
            .flatten()
            .map(|(n, _)| u64::from(*n))
            .sum()
    }

    /// When the refusals it holds began to be counted: the last report, or the first refusal.
    fn window_start(&self) -> Option<Instant> {
        self.reported.or(self.since)
    }

    fn is_due(&self, now: Instant) -> bool {
        self.total() > 0
            && self
                .reported
                .is_none_or(|at| now.saturating_duration_since(at) >= EVERY)
    }

    /// Nothing refused since a report at least [`EVERY`] old: the episode is over.
    fn is_over(&self, now: Instant) -> bool {
        self.total() == 0
            && self
                .reported
                .is_none_or(|at| now.saturating_duration_since(at) >= EVERY)
    }
}

/// What one Throttled Event says: the refusals of one namespace over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub namespace: String,
    /// From the previous report (or the first refusal) to this one.
    pub window: Duration,
    /// By reason, the most frequent first: the label, how many, the last refusal.
    pub refusals: Vec<(&'static str, u32, Refusal)>,
}

impl Report {
    pub fn total(&self) -> u64 {
        self.refusals.iter().map(|(_, n, _)| u64::from(*n)).sum()
    }

    /// The window in whole seconds, at least one.
    pub fn window_seconds(&self) -> u64 {
        let secs = self.window.as_secs() + u64::from(self.window.subsec_nanos() > 0);
        secs.max(1)
    }

    /// E.g. `refused 153 pod creations in the last 60s: max-pending-pods 20 (annotation
    /// bulwark.io/max-pending-pods)`; with several reasons, how many each.
    pub fn message(&self) -> String {
        let total = self.total();
        let creations = if total == 1 {
            "pod creation"
        } else {
            "pod creations"
        };
        let limits = match self.refusals.as_slice() {
            [(_, _, only)] => only.limit(),
            several => several
                .iter()
                .map(|(_, n, r)| format!("{n} at {}", r.limit()))
                .collect::<Vec<_>>()
                .join("; "),
        };
        format!(
            "refused {total} {creations} in the last {}s: {limits}",
            self.window_seconds()
        )
    }

    /// The counts for machines, e.g. `max_pending=153,rate=7` (what `bulwark status` reads
    /// back from the Event).
    pub fn counts(&self) -> String {
        self.refusals
            .iter()
            .map(|(reason, n, _)| format!("{reason}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Refusals per namespace since each one's last report.
#[derive(Debug, Default)]
pub struct Throttled {
    namespaces: DashMap<Box<str>, Entry>,
}

impl Throttled {
    pub fn new() -> Self {
        Throttled::default()
    }

    /// Counts one enforced refusal in `namespace`: the admission path's only work here.
    pub fn refused(&self, namespace: &str, refusal: &Refusal, now: Instant) {
        let Some(slot) = REASONS.iter().position(|r| *r == refusal.reason()) else {
            return;
        };
        // The common case, a namespace already refusing, needs no allocation.
        let mut entry = match self.namespaces.get_mut(namespace) {
            Some(entry) => entry,
            None => self.namespaces.entry(namespace.into()).or_default(),
        };
        entry.since.get_or_insert(now);
        match &mut entry.by_reason[slot] {
            Some((n, last)) => {
                *n = n.saturating_add(1);
                last.clone_from(refusal);
            }
            empty => *empty = Some((1, refusal.clone())),
        }
    }

    /// The reports due at `now`, at most `max` of them (those waiting longest first; the rest
    /// stay counted and are due at the next call), and forgets the namespaces whose episode
    /// is over.
    pub fn due(&self, now: Instant, max: usize) -> Vec<Report> {
        self.namespaces.retain(|_, entry| !entry.is_over(now));
        let mut waiting: Vec<(Instant, Box<str>)> = self
            .namespaces
            .iter()
            .filter(|e| e.is_due(now))
            .filter_map(|e| Some((e.window_start()?, e.key().clone())))
            .collect();
        waiting.sort();
        waiting.truncate(max);
        let mut reports = Vec::with_capacity(waiting.len());
        for (start, namespace) in waiting {
            let Some(mut entry) = self.namespaces.get_mut(&namespace) else {
                continue;
            };
            let mut refusals: Vec<(&'static str, u32, Refusal)> = REASONS
                .iter()
                .zip(entry.by_reason.iter_mut())
                .filter_map(|(reason, slot)| slot.take().map(|(n, r)| (*reason, n, r)))
                .collect();
            refusals.sort_by_key(|r| std::cmp::Reverse(r.1));
            entry.since = None;
            entry.reported = Some(now);
            reports.push(Report {
                namespace: namespace.into(),
                window: now.saturating_duration_since(start),
                refusals,
            });
        }
        reports
    }

    /// Namespaces held: refused lately, or reported less than [`EVERY`] ago.
    pub fn len(&self) -> usize {
        self.namespaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_rate;

    fn pending(limit: u32) -> Refusal {
        Refusal::MaxPending {
            pending: limit,
            limit,
            expected: Duration::from_secs(1),
        }
    }

    fn rate() -> Refusal {
        Refusal::Rate {
            rate: parse_rate("50/s").unwrap().unwrap(),
            burst: 50,
            wait: Duration::from_millis(20),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_refusal_is_reported_at_once_then_once_a_minute() {
        let log = Throttled::new();
        let t = Instant::now();
        assert!(log.due(t, 10).is_empty(), "nothing refused, nothing due");

        log.refused("batch", &pending(20), t);
        log.refused("batch", &pending(20), t + SECOND / 2);
        // The publisher's next tick, within a second of the first refusal.
        let first = log.due(t + SECOND, 10);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].namespace, "batch");
        assert_eq!(first[0].total(), 2);
        assert_eq!(
            first[0].message(),
            "refused 2 pod creations in the last 1s: max-pending-pods 20 (annotation bulwark.io/max-pending-pods)"
        );
        assert_eq!(first[0].counts(), "max_pending=2");

        // 151 more over the next minute: nothing until a minute after the first report.
        for i in 0..151 {
            log.refused(
                "batch",
                &pending(20),
                t + SECOND + Duration::from_millis(390 * i),
            );
        }
        for s in 2..61 {
            assert!(
                log.due(t + SECOND * s, 10).is_empty(),
                "reported again {s}s after the first refusal"
            );
        }
        let second = log.due(t + SECOND * 61, 10);
        assert_eq!(second.len(), 1);
        assert_eq!(
            second[0].message(),
            "refused 151 pod creations in the last 60s: max-pending-pods 20 (annotation bulwark.io/max-pending-pods)"
        );
        assert!(log.due(t + SECOND * 62, 10).is_empty());

        // Quiet for a minute after the last report: forgotten, and the next refusal starts a
        // new episode, reported at once.
        assert!(log.due(t + SECOND * 121, 10).is_empty());
        assert!(log.is_empty(), "an episode that ended is dropped");
        log.refused("batch", &pending(20), t + SECOND * 200);
        let again = log.due(t + SECOND * 201, 10);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].total(), 1);
        assert_eq!(
            again[0].message(),
            "refused 1 pod creation in the last 1s: max-pending-pods 20 (annotation bulwark.io/max-pending-pods)"
        );
    }

    #[test]
    fn a_report_names_each_reason_most_frequent_first() {
        let log = Throttled::new();
        let t = Instant::now();
        log.refused("ci", &rate(), t);
        for _ in 0..3 {
            log.refused("ci", &pending(5), t);
        }
        let report = &log.due(t + SECOND, 10)[0];
        assert_eq!(report.counts(), "max_pending=3,rate=1");
        assert_eq!(
            report.message(),
            "refused 4 pod creations in the last 1s: 3 at max-pending-pods 5 (annotation bulwark.io/max-pending-pods); 1 at pod-rate 50/s, burst 50 (annotations bulwark.io/pod-rate, bulwark.io/pod-burst)"
        );
    }

    #[test]
    fn the_report_names_the_last_limit_seen() {
        let log = Throttled::new();
        let t = Instant::now();
        log.refused("ci", &pending(5), t);
        // The namespace's annotation changed meanwhile.
        log.refused("ci", &pending(8), t);
        let report = &log.due(t + SECOND, 10)[0];
        assert!(
            report
                .message()
                .ends_with("max-pending-pods 8 (annotation bulwark.io/max-pending-pods)")
        );
    }

    #[test]
    fn a_burst_of_ten_thousand_refusals_in_ten_minutes_is_eleven_reports() {
        let log = Throttled::new();
        let t = Instant::now();
        let mut reports = Vec::new();
        let mut refused = 0u64;
        // 10,000 refusals spread over 600 s, the publisher asking every second.
        for tick in 0..=660u32 {
            let now = t + SECOND * tick;
            if tick < 600 {
                for k in 0..17u32 {
                    if refused < 10_000 {
                        log.refused(
                            "burst",
                            &pending(20),
                            now + Duration::from_millis(50 * u64::from(k)),
                        );
                        refused += 1;
                    }
                }
            }
            reports.extend(log.due(now + SECOND / 2, 10));
        }
        let counted: u64 = reports.iter().map(Report::total).sum();
        assert_eq!(counted, 10_000, "every refusal is in some report");
        // One at once, then one a minute while the burst lasts, and one for its tail.
        assert_eq!(
            reports.len(),
            11,
            "{:?}",
            reports.iter().map(Report::total).collect::<Vec<_>>()
        );
        assert!(log.is_empty());
    }

    #[test]
    fn memory_is_bounded_by_the_namespaces_refusing_lately() {
        let log = Throttled::new();
        let t = Instant::now();
        for i in 0..1000 {
            log.refused(&format!("ns-{i}"), &pending(1), t);
        }
        assert_eq!(log.len(), 1000);
        // At most 100 reports a call: the others stay counted and are due next time, oldest
        // first.
        let mut reported = 0;
        for s in 1..=10 {
            let due = log.due(t + SECOND * s, 100);
            assert_eq!(due.len(), 100);
            reported += due.len();
        }
        assert_eq!(reported, 1000);
        assert!(log.due(t + SECOND * 11, 100).is_empty());
        // A minute after each was reported, with nothing refused since, none is held.
        log.due(t + SECOND * 71, 100);
        assert!(log.is_empty(), "{} namespaces still held", log.len());
    }
}
