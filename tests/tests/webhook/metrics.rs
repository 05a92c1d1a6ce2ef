//! Metrics: admission requests counted by verdict and reason, refusals, durations and
//! reservations, as `/metrics` shows them.

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
