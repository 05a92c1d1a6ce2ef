//! Lifecycle: shutdown drains the requests in flight and stops accepting new connections.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() {
    for proto in BOTH {
        drain_one(proto).await;
    }
}

/// A request whose body is still arriving when shutdown starts is answered; new connections
/// are not accepted; shutdown returns once the request is done.
async fn drain_one(proto: Proto) {
    let mut server = TestServer::start(QUIET).await;
    let client: StreamingClient = client_as(&[&server.ca_pem], proto, true, None);
    let body = bytes(&pod_review("u-drain", "ci", pod("p", "ci"), false));
    let (first, rest) = body.split_at(body.len() / 2);
    let Streaming {
        mut tx,
        answer: in_flight,
    } = post_streaming(&client, &server.url("/mutate"), first).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = server.started.take().expect("running");
    let shutdown = tokio::spawn(started.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !shutdown.is_finished(),
        "{proto:?}: shutdown waits for the in-flight request"
    );
    let fresh = client_trusting(&[&server.ca_pem], Proto::Http1, false);
    assert!(
        get(&fresh, &server.url("/healthz")).await.is_err(),
        "{proto:?}: no new connections once shutdown has started"
    );

    tx.send_data(bytes::Bytes::copy_from_slice(rest))
        .await
        .expect("second half");
    drop(tx);
    let resp = in_flight
        .await
        .expect("task")
        .expect("in-flight request answered");
    assert_eq!(resp.status(), 200, "{proto:?}");
    let body = read_reply(resp).await.expect("body").body;
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["response"]["uid"], "u-drain");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown finishes once drained")
        .expect("shutdown task");
}
