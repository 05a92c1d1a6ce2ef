//! Connections of a listener served through `serve::conn`: the webhook's HTTPS and metrics
//! listeners and the node controller's metrics listener.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::{counter, register};

/// Connections on a program's listeners (set by the server).
#[derive(Clone)]
pub struct ConnMetrics {
    open: IntGaugeVec,
    in_flight: IntGaugeVec,
    closed: IntCounterVec,
}

/// One listener's connection metrics.
#[derive(Clone)]
pub struct ListenerMetrics {
    listener: &'static str,
    pub handshaking: IntGauge,
    pub established: IntGauge,
    pub in_flight: IntGauge,
    closed: IntCounterVec,
}

impl ConnMetrics {
    pub(super) fn new(r: &Registry) -> Self {
        ConnMetrics {
            open: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "connections",
                        "Open connections, in handshake or established",
                    ),
                    &["listener", "state"],
                )
                .expect("valid metric"),
            ),
            in_flight: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "requests_in_flight",
                        "Requests being handled (h2 streams and HTTP/1.1 requests)",
                    ),
                    &["listener"],
                )
                .expect("valid metric"),
            ),
            closed: counter(
                r,
                "connections_closed_total",
                "Connections the server closed itself, by why (limits, timeouts, failures)",
                &["listener", "reason"],
            ),
        }
    }

    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        ListenerMetrics {
            listener,
            handshaking: self.open.with_label_values(&[listener, "handshake"]),
            established: self.open.with_label_values(&[listener, "established"]),
            in_flight: self.in_flight.with_label_values(&[listener]),
            closed: self.closed.clone(),
        }
    }
}

impl ListenerMetrics {
    /// A connection the server closed itself, and why (a fixed set of reasons).
    pub fn closed(&self, why: &'static str) {
        self.closed.with_label_values(&[self.listener, why]).inc();
    }
}
