//! Connections: plain HTTP, TLS garbage and idle connections on the HTTPS port, 300 streams
//! on one h2 connection, and a request body that stalls.

use std::time::Duration;

use crate::support::*;

/// Plain HTTP and TLS garbage on the HTTPS port, and idle connections, cost the server nothing
/// it needs: each is dropped, and reviews keep being answered meanwhile.
#[tokio::test]
async fn plain_http_garbage_and_idle_connections_leave_the_server_healthy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(QUIET).await;
    // Idle: connected, never a byte.
    let idle: Vec<_> = futures_idle(server.addr, 50).await;
    let mut plain = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    plain
        .write_all(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "plain HTTP on the TLS port was left hanging");
    assert!(
        !String::from_utf8_lossy(&answer).contains("AdmissionReview"),
        "plain HTTP got a review answer"
    );
    let mut garbage = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
        .await
        .expect("write");
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a broken TLS record was left hanging");

    // 300 concurrent reviews over one h2 connection (more than its 256 streams) all answered.
    let client = server.client(Proto::H2);
    let review = pod_review("u-many", "ci", pod("p", "ci"), false);
    let url = server.url("/validate");
    let replies = futures::future::join_all((0..300).map(|_| post(&client, &url, &review))).await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "a stream was refused"
    );
    drop(idle);
}

async fn futures_idle(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    out
}

/// A body that stops arriving halfway gets a 400 once the 10 s body timeout passes, and the
/// connection's other streams are answered meanwhile.
#[tokio::test]
async fn a_stalled_body_times_out_with_a_400() {
    let server = TestServer::start(QUIET).await;
    let client: StreamingClient = client_as(&[&server.ca_pem], Proto::H2, true, None);
    let body = bytes(&pod_review("u-slow", "ci", pod("p", "ci"), false));
    let started = std::time::Instant::now();
    let Streaming {
        tx,
        answer: stalled,
    } = post_streaming(&client, &server.url("/validate"), &body[..body.len() / 2]).await;

    let quick = server.client(Proto::H2);
    let reply = post(
        &quick,
        &server.url("/validate"),
        &pod_review("u-quick", "ci", pod("q", "ci"), false),
    )
    .await;
    assert_eq!(response(&reply)["allowed"], true);

    let resp = tokio::time::timeout(Duration::from_secs(20), stalled)
        .await
        .expect("answered within the body timeout and some")
        .expect("task")
        .expect("answered, not dropped");
    let took = started.elapsed();
    assert_eq!(resp.status(), 400);
    let text = read_reply(resp).await.expect("body").text();
    assert!(text.contains("not received within 10 seconds"), "{text}");
    assert!(took >= Duration::from_secs(10), "answered after {took:?}");
    drop(tx);
}
