//! The node controller's metrics.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::{Scrape, conn::ConnMetrics, encode, register, registry};

/// Everything `bulwark node-controller` exports.
pub struct NodeMetrics {
    registry: Registry,
    pub phases: IntGaugeVec,
    pub actions: IntCounterVec,
    pub hold: IntGauge,
    pub leader: IntGauge,
    pub findings: IntGaugeVec,
    pub signal_to_taint: Histogram,
    /// The metrics listener's connections.
    pub connections: ConnMetrics,
}

impl NodeMetrics {
    pub fn new() -> Self {
        let registry = registry();
        let r = &registry;
        NodeMetrics {
            phases: register(
                r,
                IntGaugeVec::new(
                    Opts::new("node_phase_nodes", "Nodes per health phase"),
                    &["phase"],
                )
                .expect("valid metric"),
            ),
            actions: register(
                r,
                IntCounterVec::new(
                    Opts::new("node_actions_total", "Node remediation actions by outcome"),
                    &["action", "outcome"],
                )
                .expect("valid metric"),
            ),
            hold: register(
                r,
                IntGauge::new(
                    "node_remediation_hold",
                    "1 while remediation is held (too many unhealthy nodes, a zone down, cool-down)",
                )
                .expect("valid metric"),
            ),
            leader: register(
                r,
                IntGauge::new("node_controller_leader", "1 on the replica that acts")
                    .expect("valid metric"),
            ),
            findings: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "node_audit_findings",
                        "Nodes reported by the protect-nodes audit",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            signal_to_taint: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "node_signal_to_taint_seconds",
                        "From the first unhealthy signal to bulwark's taint",
                    )
                    .buckets(vec![
                        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            connections: ConnMetrics::new(r),
            registry,
        }
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Scrape for NodeMetrics {
    fn scrape(&self) -> String {
        encode(&self.registry)
    }
}
