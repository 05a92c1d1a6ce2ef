//! Which connections a listener lets in and which it closes: the bounds ([`Limits`]) checked
//! against every connection of the listener, by phase and client address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, Semaphore};

use super::super::http;

use crate::metrics::conn::ListenerMetrics;

/// What one listener allows. The defaults are sized for a webhook replica with a 256 MiB
/// memory limit called by kube-apiserver (up to 25 pooled HTTP/1.1 connections per webhook
/// per API server instance, idle for at most 90 s, reviews of tens of kB).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no request in progress for this long is closed. HTTP/1.1 headers
    /// must arrive within it too. Longer than Go's 90 s idle timeout, so kube-apiserver
    /// always closes its pooled connections first and never reuses one as it is closed.
    pub idle_timeout: Duration,
    /// Handshakes in progress at once; at the bound the oldest is cancelled.
    pub max_handshakes: usize,
    /// Handshakes in progress from one address; past it the new connection is closed.
    pub max_handshakes_per_client: usize,
    /// Established connections; at the bound the one idle longest is closed, or the new one
    /// if none is idle.
    pub max_connections: usize,
    /// Established connections from one address; at the bound that address's connection
    /// idle longest is closed, or the new one if none is idle.
    pub max_connections_per_client: usize,
    /// h2 streams per connection; kube-apiserver speaks HTTP/1.1 to webhooks.
    pub max_streams: u32,
    /// Bytes of request bodies being read at once, over all connections.
    pub body_budget: usize,
    /// Of those, what the connections from one address may hold.
    pub body_budget_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_handshakes: 256,
            // kube-apiserver dials a connection per concurrent call beyond its idle pool, so
            // a burst of pod creations can start dozens of handshakes at once.
            max_handshakes_per_client: 64,
            max_connections: 512,
            // kube-apiserver's default of 200 mutating requests in flight, each calling one
            // webhook at a time, with room to spare for a second instance behind one address
            // (a konnectivity agent, SNAT) or its idle pool.
            max_connections_per_client: 256,
            max_streams: 32,
            // 21 of the largest bodies kube-apiserver sends (3 MiB), or thousands of pods.
            body_budget: 64 * 1024 * 1024,
            // Five of the largest bodies, or hundreds of ordinary reviews in flight from one
            // API server; four addresses are needed to take the whole budget.
            body_budget_per_client: 16 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// The metrics listener: a scraper or two, no request bodies.
    pub fn metrics() -> Limits {
        Limits {
            max_handshakes: 16,
            max_handshakes_per_client: 8,
            max_connections: 32,
            max_connections_per_client: 8,
            max_streams: 8,
            body_budget: 0,
            body_budget_per_client: 0,
            ..Limits::default()
        }
    }

    /// The peer listener: a connection or two from each other replica, small reports (each
    /// read with its own bound, `quota::peers::MAX_REPORT_BYTES`).
    pub fn peers() -> Limits {
        Limits {
            max_handshakes: 16,
            max_handshakes_per_client: 4,
            max_connections: 64,
            max_connections_per_client: 4,
            max_streams: 4,
            body_budget: 0,
            body_budget_per_client: 0,
            ..Limits::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Established { in_flight: u32 },
}

#[derive(Debug)]
struct Entry {
    client: IpAddr,
    phase: Phase,
    /// When the handshake began, or the last request on the connection ended.
    since: Instant,
    close: Arc<Notify>,
}

/// Why a connection was not let in, or closed by the server: a metric label.
pub(super) type Why = &'static str;

/// Every connection of one listener, by id: what the bounds are checked against.
#[derive(Default)]
struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
}

impl Table {
    pub(super) fn count(&self, phase: fn(&Phase) -> bool, client: Option<IpAddr>) -> usize {
        self.entries
            .values()
            .filter(|e| phase(&e.phase) && client.is_none_or(|c| e.client == c))
            .count()
    }

    /// Closes (and forgets at once, freeing its slot) the entry `pick` chooses.
    pub(super) fn evict(&mut self, pick: impl Fn(&Entry) -> bool) -> bool {
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| pick(e))
            .min_by_key(|(_, e)| e.since)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| self.entries.remove(&id)) {
            Some(gone) => {
                gone.close.notify_one();
                true
            }
            None => false,
        }
    }
}

fn handshaking(p: &Phase) -> bool {
    *p == Phase::Handshake
}

fn established(p: &Phase) -> bool {
    matches!(p, Phase::Established { .. })
}

/// The connections of one listener and its bounds.
pub(super) struct Registry {
    pub(super) limits: Limits,
    table: Mutex<Table>,
    pub(super) metrics: ListenerMetrics,
    /// Each client address's share of the body budget, while it has connections.
    shares: Mutex<HashMap<IpAddr, Weak<Semaphore>>>,
}

impl Registry {
    pub(super) fn new(limits: Limits, metrics: ListenerMetrics) -> Self {
        Registry {
            limits,
            table: Mutex::default(),
            metrics,
            shares: Mutex::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update of the table completes before anything can panic, so a poisoned one
        // is consistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a new connection from `client` start its handshake, or says why not.
    pub(super) fn begin_handshake(
        &self,
        client: IpAddr,
        now: Instant,
    ) -> Result<(u64, Arc<Notify>), Why> {
        let mut t = self.table();
        if t.count(handshaking, Some(client)) >= self.limits.max_handshakes_per_client {
            return Err("client_handshakes");
        }
        if t.count(handshaking, None) >= self.limits.max_handshakes
            && t.evict(|e| e.phase == Phase::Handshake)
        {
            self.metrics.handshaking.dec();
            self.metrics.closed("handshake_capacity");
        }
        t.next += 1;
        let id = t.next;
        let close = Arc::new(Notify::new());
        t.entries.insert(
            id,
            Entry {
                client,
                phase: Phase::Handshake,
                since: now,
                close: close.clone(),
            },
        );
        self.metrics.handshaking.inc();
        Ok((id, close))
    }

    /// The handshake is done: takes an established slot, or says why there is none.
    pub(super) fn establish(&self, id: u64, now: Instant) -> Result<(), Why> {
        let mut t = self.table();
        let Some(client) = t.entries.get(&id).map(|e| e.client) else {
            return Err("handshake_capacity");
        };
        let refuse = |t: &mut Table, why| {
            t.entries.remove(&id);
            self.metrics.handshaking.dec();
            Err(why)
        };
        if t.count(established, Some(client)) >= self.limits.max_connections_per_client {
            if !t.evict(|e| e.client == client && e.phase == Phase::Established { in_flight: 0 }) {
                return refuse(&mut t, "client_connections");
            }
            self.metrics.established.dec();
            self.metrics.closed("client_evicted_idle");
        }
        if t.count(established, None) >= self.limits.max_connections {
            if !t.evict(|e| e.phase == Phase::Established { in_flight: 0 }) {
                return refuse(&mut t, "capacity");
            }
            self.metrics.established.dec();
            self.metrics.closed("evicted_idle");
        }
        if let Some(e) = t.entries.get_mut(&id) {
            e.phase = Phase::Established { in_flight: 0 };
            e.since = now;
        }
        self.metrics.handshaking.dec();
        self.metrics.established.inc();
        Ok(())
    }

    /// The body budget share of `client`, the same for all its connections.
    pub(super) fn share(&self, client: IpAddr) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(share) = shares.get(&client).and_then(Weak::upgrade) {
            return share;
        }
        // Addresses without connections left hold nothing: forget them.
        shares.retain(|_, s| s.strong_count() > 0);
        let share = http::client_share(self.limits.body_budget_per_client);
        shares.insert(client, Arc::downgrade(&share));
        share
    }

    /// A request on connection `id` started (`+1`) or ended (`-1`).
    pub(super) fn request(&self, id: u64, started: bool) {
        let mut t = self.table();
        if let Some(Entry {
            phase: Phase::Established { in_flight },
            since,
            ..
        }) = t.entries.get_mut(&id)
        {
            *in_flight = if started {
                in_flight.saturating_add(1)
            } else {
                in_flight.saturating_sub(1)
            };
            *since = Instant::now();
        }
        if started {
            self.metrics.in_flight.inc();
        } else {
            self.metrics.in_flight.dec();
        }
    }

    /// When connection `id` passes its idle timeout if nothing happens before; `None` while a
    /// request is in progress.
    pub(super) fn idle_deadline(&self, id: u64) -> Option<Instant> {
        match self.table().entries.get(&id) {
            Some(Entry {
                phase: Phase::Established { in_flight: 0 },
                since,
                ..
            }) => Some(*since + self.limits.idle_timeout),
            _ => None,
        }
    }

    /// The connection's task ended: forget it, unless an eviction already did.
    pub(super) fn forget(&self, id: u64) {
        if let Some(e) = self.table().entries.remove(&id) {
            match e.phase {
                Phase::Handshake => self.metrics.handshaking.dec(),
                Phase::Established { .. } => self.metrics.established.dec(),
            }
        }
    }
}

/// Forgets the connection when its task ends, however it ends.
pub(super) struct Registered {
    pub(super) registry: Arc<Registry>,
    pub(super) id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::webhook::WebhookMetrics;

    fn registry(limits: Limits) -> Registry {
        Registry {
            limits,
            table: Mutex::default(),
            metrics: WebhookMetrics::new().connections.listener("https"),
            shares: Mutex::default(),
        }
    }

    #[test]
    fn the_idle_timeout_outlasts_the_api_servers_own() {
        // Go's http.Transport closes idle connections after 90 s; closing sooner races reuse.
        assert!(Limits::default().idle_timeout > Duration::from_secs(90));
    }

    #[test]
    fn at_capacity_the_longest_idle_connection_makes_room_and_busy_ones_stay() {
        let r = registry(Limits {
            max_connections: 2,
            ..Limits::default()
        });
        let t = Instant::now();
        let ip = |n| IpAddr::from([127, 0, 0, n]);
        let open = |n, at| {
            let (id, close) = r.begin_handshake(ip(n), at).expect("handshake slot");
            r.establish(id, at).map(|()| (id, close))
        };
        let (old, old_close) = open(2, t).unwrap();
        let (busy, _) = open(3, t + Duration::from_secs(1)).unwrap();
        r.request(busy, true);
        // Full: the idle one goes, and is told to close.
        let (_new, _) = open(4, t + Duration::from_secs(2)).unwrap();
        assert!(r.idle_deadline(old).is_none(), "evicted");
        assert!(
            futures::FutureExt::now_or_never(old_close.notified()).is_some(),
            "told to close"
        );
        // With every connection busy, the new one is refused instead.
        let (fifth, _) = open(5, t + Duration::from_secs(3)).unwrap();
        r.request(fifth, true);
        assert_eq!(open(6, t + Duration::from_secs(4)).err(), Some("capacity"));
        assert!(r.table().entries.contains_key(&busy));
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let r = registry(Limits {
            max_handshakes: 4,
            max_handshakes_per_client: 2,
            ..Limits::default()
        });
        let t = Instant::now();
        let flood = IpAddr::from([127, 0, 0, 2]);
        assert!(r.begin_handshake(flood, t).is_ok());
        assert!(r.begin_handshake(flood, t).is_ok());
        assert_eq!(r.begin_handshake(flood, t).err(), Some("client_handshakes"));
        // Others get in; at the total bound the oldest handshake is cancelled.
        for n in 3..6 {
            assert!(r.begin_handshake(IpAddr::from([127, 0, 0, n]), t).is_ok());
        }
        assert_eq!(r.table().count(handshaking, None), 4);
    }
}
