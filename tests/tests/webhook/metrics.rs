//! Metrics: admission requests counted by verdict and reason, refusals, durations and
//! reservations, as `/metrics` shows them.

use std::{sync::Arc, time::Duration};

use bulwark::metrics::nodes::NodeMetrics;
use tokio::sync::watch;

use crate::support::*;

#[tokio::test]
async fn metrics_count_requests_by_verdict_and_reason() {
    let server = TestServer::start(&format!("{QUIET}  maxPods: 1\n")).await;
    let client = server.client(Proto::H2);
    for n in 0..3 {
        server.validate_pod(&client, "ci", &format!("p{n}")).await;
    }
    let m = scrape(&server).await;
    for line in [
        "bulwark_admission_requests_total{endpoint=\"validate\",reason=\"ok\",verdict=\"allowed\"} 1",
        "bulwark_admission_requests_total{endpoint=\"validate\",reason=\"max_pods\",verdict=\"refused\"} 2",
        "bulwark_refusals_total{mode=\"enforce\",reason=\"max_pods\"} 2",
        "bulwark_admission_duration_seconds_count{endpoint=\"validate\"} 3",
        "bulwark_reservations 1",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
}

/// The node controller's metrics listener is the webhook's bounded one (`serve_metrics`, as
/// `bulwark node-controller` starts it): 40 silent connections from one address leave at most
/// 8 of that address's connections open, the rest closed by the server, and a scrape from the
/// same address is still answered.
#[tokio::test]
async fn the_node_controllers_metrics_listener_bounds_each_address() {
    let metrics = Arc::new(NodeMetrics::new());
    let (_stop, stopped) = watch::channel(false);
    let (addr, _serving) = bulwark::serve::serve_metrics(
        "127.0.0.1:0".parse().expect("address"),
        metrics.clone(),
        metrics.connections.listener("metrics"),
        stopped,
        Duration::from_secs(1),
    )
    .await
    .expect("metrics listener");
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = scrape_at(addr).await;
    assert!(page.contains("bulwark_node_remediation_hold"), "{page}");
    let series = |prefix: &str| -> f64 {
        page.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let open = series("bulwark_connections{listener=\"metrics\"");
    assert!(
        open <= 8.0,
        "{open} connections of one address open\n{page}"
    );
    let closed = series("bulwark_connections_closed_total{listener=\"metrics\"");
    assert!(closed >= 32.0, "{closed} closed by the server\n{page}");
    drop(silent);
}
