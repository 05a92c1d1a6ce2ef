//! Consumption shared between webhook replicas, the way gubernator's GLOBAL behaviour shares
//! it (docs/architecture.md, "Replicas share one limit"): every decision stays local, and each
//! replica tells its peers, in small batches, what it consumed (rate hits since its last
//! report) and what it holds (count reservations the watch has not shown yet). A replica's
//! view of a namespace is its own consumption plus what its peers reported.
//!
//! Pure: the wire form of a report and its bounds ([`Report`]), what a replica keeps of its
//! peers' reports ([`PeerBook`]), which part of a namespace's rate a replica may use
//! ([`Part`]), when a report should go at once ([`near_limit`]) and the documented overshoot
//! ([`overshoot_bound`]). The exchange itself is `cluster::peers`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{decide::Snapshot, rate::Nanos};
use crate::policy::{Policy, Rate, pod::MAX_NAMESPACE_LEN};

/// How often a replica reports when nothing is close to a limit.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);
/// A peer not heard from for this long is out of the group: its reports age out and its
/// share goes back to being its own (the 1/N fallback).
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1000);
/// Namespaces one report may name, in each of its two lists. A replica with more namespaces
/// reserving pods at once sends the ones holding the most; the others are covered by the
/// watch alone, as they were before peers shared anything.
pub const MAX_REPORT_NAMESPACES: usize = 2048;
/// Peers a replica keeps reports from. More than any real install runs; a peer past it is
/// refused until a stale one ages out.
pub const MAX_PEERS: usize = 32;
/// Hits one report may carry for one namespace: a replica answering reviews as fast as it
/// can does not reach this in one sync interval, and a report claiming more is refused.
pub const MAX_HITS: u32 = 100_000;
/// Reservations one report may claim for one namespace (a replica's own bound).
pub const MAX_RESERVED: u32 = super::ledger::MAX_NAMESPACE_RESERVATIONS as u32;
/// The whole body, as read from the connection (the listener enforces it).
pub const MAX_REPORT_BYTES: usize = 512 * 1024;

/// What one replica tells its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The sender's id, random per process: a restarted replica is a new peer.
    pub from: u64,
    /// Increases with every report the sender makes; an older or repeated one is refused.
    pub seq: u64,
    /// Rate hits per namespace since the sender's previous report.
    #[serde(default)]
    pub hits: Vec<Hits>,
    /// The sender's reservations per namespace now (the whole list each time).
    #[serde(default)]
    pub reserved: Vec<Reserved>,
    /// The sender's reservations of pending pods, all namespaces: the cluster cap's share.
    #[serde(default)]
    pub reserved_pending: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hits {
    pub ns: String,
    pub n: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserved {
    pub ns: String,
    pub live: u32,
    pub pending: u32,
}

/// What a replica answers a report with: who it is, so a sender knows its own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub id: u64,
}

/// Why a report was refused; each is a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("not a report: {0}")]
    Malformed(String),
    #[error("{0}")]
    Bounds(String),
    #[error("report {seq} from {from:x} is not newer than {last}")]
    Replay { from: u64, seq: u64, last: u64 },
    #[error("a report from this replica itself")]
    Own,
    #[error("already keeping reports from {MAX_PEERS} peers")]
    TooManyPeers,
}

impl ReportError {
    pub fn label(&self) -> &'static str {
        match self {
            ReportError::Malformed(_) => "malformed",
            ReportError::Bounds(_) => "bounds",
            ReportError::Replay { .. } => "replay",
            ReportError::Own => "own",
            ReportError::TooManyPeers => "too_many_peers",
        }
    }
}

impl Report {
    /// Decodes and bounds-checks a report body.
    pub fn decode(body: &[u8]) -> Result<Report, ReportError> {
        if body.len() > MAX_REPORT_BYTES {
            return Err(ReportError::Bounds(format!(
                "{} bytes, more than {MAX_REPORT_BYTES}",
                body.len()
            )));
        }
        let report: Report =
            serde_json::from_slice(body).map_err(|e| ReportError::Malformed(e.to_string()))?;
        report.check()?;
        Ok(report)
    }

    /// Every bound a report must keep: a report past one says nothing a replica can trust.
    pub fn check(&self) -> Result<(), ReportError> {
        let bounds = |m: String| Err(ReportError::Bounds(m));
        if self.hits.len() > MAX_REPORT_NAMESPACES || self.reserved.len() > MAX_REPORT_NAMESPACES {
            return bounds(format!(
                "{} hit and {} reservation entries, more than {MAX_REPORT_NAMESPACES}",
                self.hits.len(),
                self.reserved.len()
            ));
        }
        let named = self
            .hits
            .iter()
            .map(|h| &h.ns)
            .chain(self.reserved.iter().map(|r| &r.ns));
        for ns in named {
            if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN {
                return bounds(format!("a namespace name of {} bytes", ns.len()));
            }
        }
        if let Some(h) = self.hits.iter().find(|h| h.n > MAX_HITS) {
            return bounds(format!("{} hits in {}, more than {MAX_HITS}", h.n, h.ns));
        }
        if let Some(r) = self
            .reserved
            .iter()
            .find(|r| r.live > MAX_RESERVED || r.pending > r.live)
        {
            return bounds(format!(
                "{} reserved ({} pending) in {}: more than {MAX_RESERVED}, or more pending than reserved",
                r.live, r.pending, r.ns
            ));
        }
        let most_pending = MAX_RESERVED as u64 * MAX_REPORT_NAMESPACES as u64;
        if self.reserved_pending > most_pending {
            return bounds(format!(
                "{} pending reservations, more than {most_pending}",
                self.reserved_pending
            ));
        }
        Ok(())
    }
}

/// The part of a namespace's rate (and burst) one replica may use: the replicas it shares
/// consumption with (`group`, itself included) out of the ready replicas (`replicas`). All
/// in one group: the whole rate, each replica counting the others' hits. A replica cut off
/// from the others keeps `1/replicas` for itself, and those it can still reach share the
/// rest, so however the replicas are split the namespace's limit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    group: u32,
    replicas: u32,
}

impl Part {
    /// A replica alone: its whole rate.
    pub const WHOLE: Part = Part {
        group: 1,
        replicas: 1,
    };

    /// `group` replicas sharing out of `replicas` ready ones; a group larger than the ready
    /// replicas (a peer seen before its endpoint) counts as all of them, and zero as one.
    pub fn new(group: u32, replicas: u32) -> Part {
        let replicas = replicas.max(1);
        Part {
            group: group.clamp(1, replicas),
            replicas,
        }
    }

    pub fn group(self) -> u32 {
        self.group
    }

    pub fn replicas(self) -> u32 {
        self.replicas
    }

    pub fn is_whole(self) -> bool {
        self.group == self.replicas
    }

    pub fn rate(self, rate: Rate) -> Rate {
        rate.scaled(self.group, self.replicas)
    }

    /// The burst's part, rounded up, so a burst smaller than the number of replicas still
    /// admits one creation per group.
    pub fn burst(self, burst: u32) -> u32 {
        let part = u64::from(burst) * u64::from(self.group);
        u32::try_from(part.div_ceil(u64::from(self.replicas)))
            .unwrap_or(u32::MAX)
            .max(1)
    }
}

/// Whether this replica's consumption should reach its peers at once rather than at the
/// next [`SYNC_EVERY`]. Always for a namespace with a count cap: a burst can take it from
/// empty to full well within one interval, and every replica would fill it alone. For the
/// rate, once half of this replica's part of the burst is used; and near the cluster cap
/// (within a fifth of it), which every namespace shares.
pub fn near_limit(policy: &Policy, snap: &Snapshot, tat: Nanos, now: Nanos, part: Part) -> bool {
    if policy.max_pods.is_some() || policy.max_pending_pods.is_some() {
        return true;
    }
    if let Some(cap) = snap.cluster_cap
        && cap
            .limit
            .saturating_sub(snap.cluster_pending)
            .saturating_mul(5)
            <= cap.limit
    {
        return true;
    }
    let Some(rate) = policy.rate else {
        return false;
    };
    let interval = u64::try_from(part.rate(rate).interval.as_nanos()).unwrap_or(u64::MAX);
    let burst = u64::from(part.burst(policy.burst));
    let used = tat.saturating_sub(now).div_ceil(interval.max(1));
    used.saturating_mul(2) >= burst
}

/// The most creations the replicas together can admit above a namespace's rate limit, in any
/// window: each of the other `replicas - 1` may admit, before its report lands, what its
/// bucket held (the burst) plus what the rate refills during the report's delay (`lag`:
/// one [`SYNC_EVERY`] far from the limit, one round trip near it). A count cap is exceeded
/// by at most what the other replicas admit in the namespace during one report's delay
/// (reports of capped namespaces go at once, so one or two round trips).
pub fn overshoot_bound(rate_per_second: f64, burst: u32, lag: Duration, replicas: u32) -> f64 {
    let others = f64::from(replicas.saturating_sub(1));
    others * (f64::from(burst) + rate_per_second * lag.as_secs_f64())
}

/// What one peer last reported.
#[derive(Debug, Default)]
struct Peer {
    heard: Option<Instant>,
    seq: u64,
    reserved: HashMap<Box<str>, (u32, u32)>,
    reserved_pending: u64,
}

/// What a replica keeps of its peers' reports: their reservations, until they age out.
/// Hits are not kept: they are folded into the namespaces' rate state as they arrive.
#[derive(Debug)]
pub struct PeerBook {
    own: u64,
    peers: HashMap<u64, Peer>,
}

impl PeerBook {
    pub fn new(own: u64) -> PeerBook {
        PeerBook {
            own,
            peers: HashMap::new(),
        }
    }

    /// Takes a report in: its reservations replace the peer's last ones. Refuses one from
    /// this replica, one not newer than the peer's last, and a new peer past [`MAX_PEERS`]
    /// (after dropping those aged out).
    pub fn accept(&mut self, report: &Report, now: Instant) -> Result<(), ReportError> {
        if report.from == self.own {
            return Err(ReportError::Own);
        }
        if !self.peers.contains_key(&report.from) && self.peers.len() >= MAX_PEERS {
            self.age_out(now);
            if self.peers.len() >= MAX_PEERS {
                return Err(ReportError::TooManyPeers);
            }
        }
        let peer = self.peers.entry(report.from).or_default();
        if peer.heard.is_some() && report.seq <= peer.seq {
            return Err(ReportError::Replay {
                from: report.from,
                seq: report.seq,
                last: peer.seq,
            });
        }
        peer.heard = Some(now);
        peer.seq = report.seq;
        peer.reserved = report
            .reserved
            .iter()
            .filter(|r| r.live > 0)
            .map(|r| (Box::from(r.ns.as_str()), (r.live, r.pending)))
            .collect();
        peer.reserved_pending = report.reserved_pending;
        Ok(())
    }

    fn fresh(&self, now: Instant) -> impl Iterator<Item = (&u64, &Peer)> {
        self.peers.iter().filter(move |(_, p)| {
            p.heard
                .is_some_and(|h| now.saturating_duration_since(h) < PEER_TIMEOUT)
        })
    }

    /// Whether `peer` reported within [`PEER_TIMEOUT`].
    pub fn heard_from(&self, peer: u64, now: Instant) -> bool {
        self.fresh(now).any(|(id, _)| *id == peer)
    }

    /// The peers' reservations in `ns` (all, pending), from those heard from lately.
    pub fn reserved(&self, ns: &str, now: Instant) -> (u32, u32) {
        self.fresh(now)
            .filter_map(|(_, p)| p.reserved.get(ns))
            .fold((0, 0), |(l, p), (live, pending)| {
                (l.saturating_add(*live), p.saturating_add(*pending))
            })
    }

    /// The peers' reservations of pending pods in all namespaces.
    pub fn reserved_pending(&self, now: Instant) -> u64 {
        self.fresh(now)
            .map(|(_, p)| p.reserved_pending)
            .fold(0, u64::saturating_add)
    }

    /// Forgets peers not heard from within [`PEER_TIMEOUT`].
    pub fn age_out(&mut self, now: Instant) {
        self.peers.retain(|_, p| {
            p.heard
                .is_some_and(|h| now.saturating_duration_since(h) < PEER_TIMEOUT)
        });
    }

    /// Whether any peer is kept at all: a lone replica's admissions skip the book.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests;
