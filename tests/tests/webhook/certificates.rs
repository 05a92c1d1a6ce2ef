//! Certificates: the serving certificate reloaded during traffic without dropping a request,
//! and a client CA (mTLS) that reviews must present a certificate from.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::support::*;

#[tokio::test]
async fn certificate_reload_during_traffic_drops_nothing() {
    let server = TestServer::start(QUIET).await;
    let staging = temp_dir("rotation");
    let new_ca = write_certs(&staging);
    let old_ca = server.ca_pem.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    // Pooled h2 keeps its connection across the swap; unpooled http/1.1 handshakes anew on
    // every request, so it meets both certificates.
    for (proto, pooled) in [
        (Proto::H2, true),
        (Proto::Http1, false),
        (Proto::Http1, false),
    ] {
        let client = client_trusting(&[&old_ca, &new_ca], proto, pooled);
        let url = server.url("/mutate");
        let (stop, ok) = (stop.clone(), ok.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = bytes(&pod_review("u", "ci", pod(&format!("p{n}"), "ci"), false));
                match send(&client, "POST", &url, body).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}: {}", r.status, r.text())),
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_swap = ok.load(Ordering::Relaxed);
    // Rotate: replace the served files with the new pair (written atomically, key first).
    for f in ["tls.key", "tls.crt"] {
        std::fs::copy(staging.join(f), server.dir.join(format!("{f}.next"))).expect("stage");
        std::fs::rename(server.dir.join(format!("{f}.next")), server.dir.join(f)).expect("swap");
    }
    // A client that trusts only the new CA gets through once the reload has happened.
    let only_new = client_trusting(&[&new_ca], Proto::Http1, false);
    let mut switched = false;
    for _ in 0..100 {
        if get(&only_new, &server.url("/healthz"))
            .await
            .is_ok_and(|r| r.status == 200)
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("worker"));
    }
    let total = ok.load(Ordering::Relaxed);
    assert!(switched, "the new certificate was never served");
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        before_swap > 10 && total > before_swap + 10,
        "traffic flowed: {before_swap} then {total}"
    );
    // And the old CA alone no longer works for new connections.
    let only_old = client_trusting(&[&old_ca], Proto::Http1, false);
    assert!(get(&only_old, &server.url("/healthz")).await.is_err());
    let m = scrape(&server).await;
    assert!(
        m.contains("bulwark_tls_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&staging);
}

/// A client over h2 that trusts the server's CA and presents `identity`.
fn mtls_client(server: &TestServer, identity: Option<&bulwark_certs::Pair>) -> HttpsClient {
    client_as(&[&server.ca_pem], Proto::H2, true, identity)
}

#[tokio::test]
async fn with_a_client_ca_reviews_need_its_client_certificate() {
    let api_ca = bulwark_certs::Ca::new("kube-apiserver client CA", 1).expect("ca");
    let dir = temp_dir("client-ca");
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_path = dir.join("client-ca.crt");
    std::fs::write(&ca_path, api_ca.cert_pem()).expect("write CA");
    let client_ca = bulwark::serve::tls::ClientCa::load(&ca_path).expect("load client CA");
    let server = TestServer::start_with(QUIET, Some(client_ca)).await;
    let review = pod_review("uid-mtls", "ci", pod("p", "ci"), false);

    // kube-apiserver's client certificate, signed by the client CA: reviews are answered.
    let apiserver = api_ca.client("kube-apiserver", &[]).expect("client cert");
    let reply = post(
        &mtls_client(&server, Some(&apiserver)),
        &server.url("/validate"),
        &review,
    )
    .await;
    assert_eq!(response(&reply)["allowed"], true);
    let reply = post(
        &mtls_client(&server, Some(&apiserver)),
        &server.url("/mutate"),
        &review,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // No client certificate: probes work, reviews are refused with 401 and a reason.
    let anonymous = mtls_client(&server, None);
    let probe = get(&anonymous, &server.url("/healthz"))
        .await
        .expect("probe");
    assert_eq!(probe.status, 200);
    let reply = post(&anonymous, &server.url("/validate"), &review).await;
    assert_eq!(reply.status, 401);
    assert!(
        reply.text().contains("client certificate"),
        "{}",
        reply.text()
    );
    let refused = server
        .webhook
        .metrics()
        .admission
        .bad_requests
        .with_label_values(&["validate", "unauthenticated"])
        .get();
    assert_eq!(refused, 1);

    // A certificate from another CA fails the TLS handshake.
    let stranger = bulwark_certs::Ca::new("someone else", 1)
        .expect("ca")
        .client("kube-apiserver", &[])
        .expect("client cert");
    let failed = send(
        &mtls_client(&server, Some(&stranger)),
        "POST",
        &server.url("/validate"),
        bytes(&review),
    )
    .await;
    assert!(
        failed.is_err(),
        "a stranger's certificate was accepted: {:?}",
        failed.map(|r| (r.status, r.text()))
    );

    // A file without a certificate is a start-up error naming it.
    let empty = dir.join("empty.crt");
    std::fs::write(&empty, "").expect("write");
    let err = bulwark::serve::tls::ClientCa::load(&empty).expect_err("empty bundle");
    assert!(err.to_string().contains("empty.crt"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With --client-name, a certificate of the right CA that names someone else (here a
/// kubelet's, as a cluster CA would sign) is refused with 403 before its body is read, and
/// takes nothing: the API server's next review still has the namespace's whole burst.
#[tokio::test]
async fn a_client_certificate_with_the_wrong_name_is_refused_and_consumes_nothing() {
    let api_ca = bulwark_certs::Ca::new("cluster CA", 1).expect("ca");
    let dir = temp_dir("client-names");
    let ca_path = dir.join("client-ca.crt");
    std::fs::write(&ca_path, api_ca.cert_pem()).expect("write CA");
    let client_ca = bulwark::serve::tls::ClientCa::load(&ca_path)
        .expect("load client CA")
        .with_names(vec!["kube-apiserver-webhook-client".into()]);
    let config = "defaults:\n  podRate: 1/h\n  podBurst: 1\n";
    let server = TestServer::start_with(config, Some(client_ca)).await;
    let review = |uid: &str| pod_review(uid, "ci", pod(uid, "ci"), false);

    let kubelet = api_ca
        .client("system:node:worker-1", &["system:nodes"])
        .expect("client cert");
    let forged = mtls_client(&server, Some(&kubelet));
    for n in 0..5 {
        let reply = post(&forged, &server.url("/validate"), &review(&format!("f{n}"))).await;
        assert_eq!(reply.status, 403, "{}", reply.text());
        assert!(
            reply.text().contains("names system:node:worker-1"),
            "{}",
            reply.text()
        );
    }
    let apiserver = api_ca
        .client("kube-apiserver-webhook-client", &[])
        .expect("client cert");
    let real = mtls_client(&server, Some(&apiserver));
    let reply = post(&real, &server.url("/validate"), &review("real")).await;
    assert_eq!(
        response(&reply)["allowed"],
        true,
        "the burst of 1 was still there"
    );
    let reply = post(&real, &server.url("/validate"), &review("second")).await;
    assert_eq!(response(&reply)["status"]["code"], 429, "and it was 1");
    assert_eq!(metric(&server, "bulwark_reviews_authenticated").await, 1.0);
    assert_eq!(
        server
            .webhook
            .metrics()
            .admission
            .refusals
            .with_label_values(&["rate", "enforce"])
            .get(),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_a_client_ca_the_metrics_say_reviews_are_not_authenticated() {
    let server = TestServer::start(QUIET).await;
    assert!(
        scrape(&server)
            .await
            .contains("bulwark_reviews_authenticated 0")
    );
}
