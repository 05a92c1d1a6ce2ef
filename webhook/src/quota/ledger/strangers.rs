//! Namespaces the cluster does not show. Once the namespace watch has listed every namespace,
//! a review for another one is either for a namespace created a moment ago (kube-apiserver's
//! NamespaceLifecycle plugin refuses creates in a namespace that does not exist, before any
//! webhook is called, but the watch may not have delivered it yet) or forged, with a made-up
//! name. Either way it is decided under the defaults, and what it leaves behind is kept here,
//! apart from the real namespaces: few namespaces, few reservations, a short life. So made-up
//! names cannot grow memory or hold more than [`MAX_RESERVATIONS`] slots of the cluster
//! pending cap, for at most [`TTL`].

use std::time::{Duration, Instant};

use super::{Keep, NamespaceLedger, Reservation};

/// Namespaces kept at once. At the bound the one unused longest is dropped with its
/// reservations and rate state: a real new namespace dropped so starts a fresh burst, until
/// the watch shows it (well under a second on a healthy cluster).
pub const MAX_NAMESPACES: usize = 64;
/// Reservations kept, in all these namespaces together. At the bound the oldest is dropped.
pub const MAX_RESERVATIONS: usize = 32;
/// How long a reservation here counts at most (less if `reservationTtlSeconds` is shorter):
/// long enough for the watch to show a real new namespace's pods.
pub const TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub(super) struct Strangers {
    namespaces: Vec<Stranger>,
}

#[derive(Debug)]
struct Stranger {
    name: Box<str>,
    ledger: NamespaceLedger,
    last_used: Instant,
}

impl Strangers {
    /// How a stranger's reservations are kept, given the configured TTL.
    pub(super) fn keep(ttl: Duration) -> Keep {
        Keep {
            ttl: ttl.min(TTL),
            max_reservations: MAX_RESERVATIONS,
            // Kept by `entry`, across these namespaces.
            max_total: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.namespaces.len()
    }

    /// The state of `name`, made if new, with room for one more reservation; returns the
    /// reservations dropped to make that room, for the caller to release.
    pub(super) fn entry(
        &mut self,
        name: &str,
        now: Instant,
    ) -> (&mut NamespaceLedger, Vec<Reservation>) {
        let mut dropped = Vec::new();
        let held: usize = self
            .namespaces
            .iter()
            .map(|s| s.ledger.reservations.len())
            .sum();
        if held >= MAX_RESERVATIONS
            && let Some(oldest) = self
                .namespaces
                .iter_mut()
                .filter(|s| !s.ledger.reservations.is_empty())
                .min_by_key(|s| s.ledger.reservations.front().map(|r| r.expires))
            && let Some(r) = oldest.ledger.reservations.pop_front()
        {
            oldest.ledger.forget(&r);
            dropped.push(r);
        }
        let at = match self.namespaces.iter().position(|s| *s.name == *name) {
            Some(at) => at,
            None => {
                if self.namespaces.len() >= MAX_NAMESPACES
                    && let Some(unused) = self
                        .namespaces
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, s)| s.last_used)
                        .map(|(i, _)| i)
                {
                    let gone = self.namespaces.swap_remove(unused);
                    dropped.extend(gone.ledger.reservations);
                }
                self.namespaces.push(Stranger {
                    name: name.into(),
                    ledger: NamespaceLedger::default(),
                    last_used: now,
                });
                self.namespaces.len() - 1
            }
        };
        let stranger = &mut self.namespaces[at];
        stranger.last_used = now;
        (&mut stranger.ledger, dropped)
    }

    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut NamespaceLedger> {
        self.namespaces
            .iter_mut()
            .find(|s| *s.name == *name)
            .map(|s| &mut s.ledger)
    }

    /// Keeps the namespaces for which `keep` says true.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&mut NamespaceLedger) -> bool) {
        self.namespaces.retain_mut(|s| keep(&mut s.ledger));
    }
}
