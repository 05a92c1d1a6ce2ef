//! The webhook's peers: the ready endpoints of its own Service, from a watch of its
//! EndpointSlices, and where each takes reports of the others' consumption (the slice's port
//! named `peers`). The exchange itself is [`exchange`].

pub mod exchange;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client, ResourceExt, runtime::watcher};
use tokio::sync::watch;

use super::index::{self, Index};
use crate::quota::ledger::Ledger;

/// Where the Service's ready endpoints take peer reports, each once: the slice's port named
/// `peers`, else `default_port` (this replica's own peer port: every replica runs alike).
pub fn peer_targets<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    default_port: u16,
) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for slice in slices {
        let port = slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some("peers"))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(default_port);
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            if let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) {
                out.insert(SocketAddr::new(ip, port));
            }
        }
    }
    out.into_iter().collect()
}

/// Ready endpoints across the Service's slices, each address once (an address may appear in
/// two slices while they are rewritten). An endpoint without conditions counts as ready, as
/// the API documents.
pub fn ready_replicas<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> u32 {
    let mut ready = BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            let is_ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            if is_ready && let Some(address) = ep.addresses.first() {
                ready.insert(address.clone());
            }
        }
    }
    u32::try_from(ready.len()).unwrap_or(u32::MAX)
}

/// Keeps `ledger`'s replica count equal to the ready endpoints of `service` in `namespace`,
/// and `targets` to where they take peer reports (with `peer_port` where a slice names none).
pub fn spawn(
    client: Client,
    namespace: &str,
    service: &str,
    ledger: Arc<Ledger>,
    targets: Option<(watch::Sender<Vec<SocketAddr>>, u16)>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let replicas = Replicas {
        service: service.to_owned(),
        slices: BTreeMap::new(),
        ledger,
        targets,
    };
    tokio::spawn(index::run(api, config, replicas));
}

/// The Service's EndpointSlices, by name.
struct Replicas {
    service: String,
    slices: BTreeMap<String, EndpointSlice>,
    ledger: Arc<Ledger>,
    targets: Option<(watch::Sender<Vec<SocketAddr>>, u16)>,
}

impl Replicas {
    fn recount(&self) {
        let n = ready_replicas(self.slices.values());
        if n.max(1) != self.ledger.replicas() {
            tracing::info!(service = %self.service, replicas = n, "ready webhook replicas");
        }
        self.ledger.set_replicas(n);
        if let Some((targets, port)) = &self.targets {
            targets.send_replace(peer_targets(self.slices.values(), *port));
        }
    }
}

impl Index<EndpointSlice> for Replicas {
    type Listed = EndpointSlice;

    fn apply(&mut self, slice: EndpointSlice, _now: Instant) {
        self.slices.insert(slice.name_any(), slice);
        self.recount();
    }

    fn delete(&mut self, slice: EndpointSlice, _now: Instant) {
        self.slices.remove(&slice.name_any());
        self.recount();
    }

    fn listed(&mut self, slice: EndpointSlice, _now: Instant) -> Option<EndpointSlice> {
        Some(slice)
    }

    fn reset(&mut self, listed: Vec<EndpointSlice>, _now: Instant) {
        self.slices = listed.into_iter().map(|s| (s.name_any(), s)).collect();
        self.recount();
    }

    fn failed(&mut self, e: &watcher::Error, _now: Instant) {
        tracing::warn!(service = %self.service, error = %e, "watch of the webhook's EndpointSlices failed; keeping the last replica count");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "addressType": "IPv4",
            "endpoints": endpoints.iter().map(|(ip, ready)| {
                let mut ep = serde_json::json!({"addresses": [ip]});
                if let Some(r) = ready {
                    ep["conditions"] = serde_json::json!({"ready": r});
                }
                ep
            }).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn peers_are_reached_on_the_port_named_peers_or_the_own_one() {
        let mut a = slice(&[("127.0.0.1", Some(true)), ("127.0.0.2", Some(false))]);
        assert_eq!(
            peer_targets([&a], 8444),
            vec![SocketAddr::from(([127, 0, 0, 1], 8444))]
        );
        a.ports = Some(vec![
            serde_json::from_value(serde_json::json!({"name": "peers", "port": 9444})).unwrap(),
        ]);
        let b = slice(&[("127.0.0.1", None), ("127.0.0.3", None)]);
        assert_eq!(
            peer_targets([&a, &b], 8444),
            vec![
                SocketAddr::from(([127, 0, 0, 1], 8444)),
                SocketAddr::from(([127, 0, 0, 1], 9444)),
                SocketAddr::from(([127, 0, 0, 3], 8444)),
            ]
        );
    }

    #[test]
    fn counts_ready_addresses_once() {
        let a = slice(&[
            ("10.0.0.1", Some(true)),
            ("10.0.0.2", Some(false)),
            ("10.0.0.3", None),
        ]);
        let b = slice(&[("10.0.0.1", Some(true)), ("10.0.0.4", Some(true))]);
        assert_eq!(ready_replicas([&a]), 2);
        assert_eq!(ready_replicas([&a, &b]), 3);
        assert_eq!(ready_replicas(std::iter::empty()), 0);
    }
}
