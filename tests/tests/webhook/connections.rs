//! Connections: plain HTTP, TLS garbage and idle connections on the HTTPS port, 300 streams
//! on one h2 connection, a request body that stalls, and the bounds on connections, streams,
//! bodies and idle time.

use std::time::Duration;

use bulwark::serve::conn::Limits;

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

    // 300 concurrent reviews over one h2 connection (more than its 32 streams) all answered:
    // once the client has the server's SETTINGS (after a first request), it queues the rest.
    // Before that, h2 lets a client open streams past the limit, and the server refuses them.
    let client = server.client(Proto::H2);
    let review = pod_review("u-many", "ci", pod("p", "ci"), false);
    let url = server.url("/validate");
    assert_eq!(post(&client, &url, &review).await.status, 200);
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

/// A body sent in chunks, with no Content-Length to refuse it by, is cut off by the streaming
/// limit once it passes 3 MiB: the server does not buffer whatever a client sends.
#[tokio::test]
async fn a_chunked_body_over_the_limit_is_cut_off_while_it_streams() {
    let server = TestServer::start(QUIET).await;
    for proto in BOTH {
        let client: StreamingClient = client_as(&[&server.ca_pem], proto, false, None);
        let Streaming { mut tx, answer } =
            post_streaming(&client, &server.url("/validate"), b"{\"pad\":\"").await;
        let chunk = bytes::Bytes::from(vec![b'x'; 256 * 1024]);
        // Up to 8 MiB; the server stops reading after 3.
        for _ in 0..32 {
            let sent = tokio::time::timeout(Duration::from_secs(2), tx.send_data(chunk.clone()));
            if !matches!(sent.await, Ok(Ok(()))) {
                break;
            }
        }
        drop(tx);
        let resp = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered")
            .expect("task")
            .unwrap_or_else(|e| panic!("{proto:?}: no answer: {e:?}"));
        assert_eq!(resp.status(), 400, "{proto:?}");
        let text = read_reply(resp).await.map(|r| r.text()).unwrap_or_default();
        assert!(
            text.contains("larger than 3145728 bytes"),
            "{proto:?}: {text}"
        );
    }
    let too_large = server
        .webhook
        .metrics()
        .admission
        .bad_requests
        .with_label_values(&["validate", "too_large"])
        .get();
    assert_eq!(too_large, 2);
}

/// The server itself holds at most 32 requests of one h2 connection at once: 40 requests
/// whose bodies never finish, and the server counts 32 in flight.
#[tokio::test]
async fn an_h2_connection_gets_at_most_32_streams_at_once() {
    let server = TestServer::start(QUIET).await;
    let client: StreamingClient = client_as(&[&server.ca_pem], Proto::H2, true, None);
    let body = bytes(&pod_review("u-streams", "ci", pod("p", "ci"), false));
    let mut stalled = Vec::new();
    for _ in 0..40 {
        stalled
            .push(post_streaming(&client, &server.url("/validate"), &body[..body.len() / 2]).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let https = |m: &str| format!("bulwark_{m}{{listener=\"https\"}}");
    assert_eq!(metric(&server, &https("requests_in_flight")).await, 32.0);
    let established = "bulwark_connections{listener=\"https\",state=\"established\"}";
    assert_eq!(metric(&server, established).await, 1.0, "one connection");
    drop(stalled);
}

/// A connection with nothing in progress is closed after the idle timeout (here 1 s, 120 s
/// in production, past kube-apiserver's 90 s), and not before.
#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = TestServer::start_limited(QUIET, None, limits).await;
    let established = "bulwark_connections{listener=\"https\",state=\"established\"}";
    for proto in BOTH {
        let client = server.client(proto);
        let reply = server.validate_pod(&client, "ci", "p").await;
        assert_eq!(response(&reply)["allowed"], true);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            metric(&server, established).await,
            1.0,
            "{proto:?}: closed early"
        );
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(
            metric(&server, established).await,
            0.0,
            "{proto:?}: still open"
        );
    }
}

/// Opens `n` TCP connections from `source` that never send a byte.
async fn silent_from(
    source: &str,
    to: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{source}:0").parse().expect("addr"))
            .expect("bind");
        if let Ok(s) = socket.connect(to).await {
            out.push(s);
        }
    }
    out
}

/// Silent TCP connections and idle TLS connections from other addresses, far more than the
/// server has slots for, do not keep a well-behaved client from being answered at once:
/// handshakes have their own slots and per-address bounds, and at the established bound the
/// connection idle longest makes room.
#[tokio::test]
async fn a_flood_of_idle_and_silent_connections_leaves_room_for_a_real_client() {
    let limits = Limits {
        max_handshakes: 16,
        max_handshakes_per_client: 8,
        max_connections: 16,
        max_connections_per_client: 8,
        ..Limits::default()
    };
    let server = TestServer::start_limited(QUIET, None, limits).await;
    let silent = silent_from("127.0.0.2", server.addr, 300).await;
    let mut idle = Vec::new();
    for source in 3..9 {
        let ip: std::net::IpAddr = format!("127.0.0.{source}").parse().expect("ip");
        for _ in 0..8 {
            let connector = connector_from(&[&server.ca_pem], Proto::Http1, None, Some(ip));
            let client: HttpsClient =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(connector);
            // Answered or not (a slot may be gone by then), the client keeps its connection.
            let _ = get(&client, &server.url("/healthz")).await;
            idle.push(client);
        }
    }
    let handshaking = "bulwark_connections{listener=\"https\",state=\"handshake\"}";
    let established = "bulwark_connections{listener=\"https\",state=\"established\"}";
    assert!(metric(&server, handshaking).await <= 16.0);
    assert!(metric(&server, established).await <= 16.0);
    for i in 0..10 {
        let fresh = client_trusting(&[&server.ca_pem], BOTH[i % 2], false);
        let started = std::time::Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            server.validate_pod(&fresh, "ci", &format!("real-{i}")),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} not answered within 2 s"));
        assert_eq!(response(&reply)["allowed"], true);
        println!("request {i} answered in {:?}", started.elapsed());
    }
    drop((silent, idle));
}

/// One address that sends bodies and stalls holds at most its share of the body budget: with
/// 10 MiB of stalled bodies from 127.0.0.2 (the whole budget here is 8 MiB, its share 2 MiB),
/// a review from another address is still read and answered at once.
#[tokio::test]
async fn stalled_bodies_from_one_address_hold_only_its_share_of_the_budget() {
    let limits = Limits {
        body_budget: 8 * 1024 * 1024,
        body_budget_per_client: 2 * 1024 * 1024,
        ..Limits::default()
    };
    let server = TestServer::start_limited(QUIET, None, limits).await;
    let source = "127.0.0.2".parse().expect("ip");
    let stalling: StreamingClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(connector_from(
                &[&server.ca_pem],
                Proto::H2,
                None,
                Some(source),
            ));
    let mib = vec![b' '; 1024 * 1024];
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(post_streaming(&stalling, &server.url("/validate"), &mib).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = server.client(Proto::Http1);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        server.validate_pod(&client, "ci", "real"),
    )
    .await
    .expect("a review from another address was answered while the budget was held");
    assert_eq!(response(&reply)["allowed"], true);
    drop(stalled);
}
