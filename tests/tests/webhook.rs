//! The real bulwark HTTPS server, in process on 127.0.0.1, driven by a real TLS client over
//! h2 and http/1.1.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use base64::{Engine, prelude::BASE64_STANDARD};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use support::*;

const QUIET: &str = "defaults:\n  podRate: unlimited\n";

fn response(reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    v["response"].clone()
}

fn expect_version(reply: &Reply, proto: Proto) {
    let want = match proto {
        Proto::H2 => http::Version::HTTP_2,
        Proto::Http1 => http::Version::HTTP_11,
    };
    assert_eq!(reply.version, want);
}

#[tokio::test]
async fn mutate_returns_a_patch_that_yields_a_valid_pod() {
    let server = TestServer::start(
        "defaults:\n  defaultRequests: cpu=100m,memory=128Mi\n  defaultLimits: cpu=1,memory=512Mi\n",
    )
    .await;
    for proto in BOTH {
        let client = server.client(proto);
        let original = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "build-1", "namespace": "ci"},
            "spec": {
                "initContainers": [{"name": "fetch", "image": "git"}],
                "containers": [
                    {"name": "main", "image": "busybox"},
                    {"name": "tiny", "image": "busybox", "resources": {"limits": {"cpu": "50m", "memory": "64Mi"}}}
                ]
            }
        });
        let reply = post(
            &client,
            &server.url("/mutate"),
            &pod_review("uid-m", "ci", original.clone(), false),
        )
        .await;
        expect_version(&reply, proto);
        let resp = response(&reply);
        assert_eq!(resp["uid"], "uid-m");
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        // Go's encoding of `[]byte`, which kube-apiserver decodes: a base64 string.
        let patch_bytes = BASE64_STANDARD
            .decode(resp["patch"].as_str().expect("patch is a string"))
            .expect("patch is base64");
        let patch: json_patch::Patch =
            serde_json::from_slice(&patch_bytes).expect("patch is a JSONPatch");
        let mut doc = original;
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        let pod: Pod = serde_json::from_value(doc).expect("patched pod is a valid Pod");
        let spec = pod.spec.expect("spec");
        let res = |c: &k8s_openapi::api::core::v1::Container, kind: &str, r: &str| {
            let rr = c.resources.as_ref().expect("resources");
            let m = if kind == "requests" {
                &rr.requests
            } else {
                &rr.limits
            };
            m.as_ref().and_then(|m| m.get(r)).map(|q| q.0.clone())
        };
        let init = &spec.init_containers.as_ref().expect("init")[0];
        assert_eq!(res(init, "requests", "cpu").as_deref(), Some("100m"));
        assert_eq!(
            res(&spec.containers[0], "limits", "memory").as_deref(),
            Some("512Mi")
        );
        // An existing limit below the default request caps the defaulted request.
        assert_eq!(
            res(&spec.containers[1], "requests", "cpu").as_deref(),
            Some("50m")
        );
        assert_eq!(
            res(&spec.containers[1], "requests", "memory").as_deref(),
            Some("64Mi")
        );
        let annotation = &pod.metadata.annotations.expect("annotations")["bulwark.io/defaulted"];
        assert!(
            annotation.contains("main: requests.cpu=100m"),
            "{annotation}"
        );
        assert!(annotation.contains("init:fetch:"), "{annotation}");
        let warnings = resp["warnings"].as_array().expect("warnings");
        assert!(
            warnings
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("container \"main\"")))
        );
    }
}

#[tokio::test]
async fn refusal_has_the_429_shape_and_an_actionable_message() {
    let server = TestServer::start("defaults:\n  podRate: 1/m\n  podBurst: 2\n").await;
    for (i, proto) in BOTH.into_iter().enumerate() {
        let client = server.client(proto);
        let ns = format!("ci-{i}");
        for n in 0..2 {
            let r = post(
                &client,
                &server.url("/validate"),
                &pod_review("u", &ns, pod(&format!("p{n}"), &ns), false),
            )
            .await;
            assert_eq!(response(&r)["allowed"], true, "within the burst");
        }
        let reply = post(
            &client,
            &server.url("/validate"),
            &pod_review("uid-x", &ns, pod("p3", &ns), false),
        )
        .await;
        expect_version(&reply, proto);
        let resp = response(&reply);
        assert_eq!(resp["uid"], "uid-x");
        assert_eq!(resp["allowed"], false);
        let status = &resp["status"];
        assert_eq!(status["code"], 429);
        assert_eq!(status["reason"], "TooManyRequests");
        assert_eq!(status["status"], "Failure");
        let retry = status["details"]["retryAfterSeconds"]
            .as_u64()
            .expect("retryAfterSeconds");
        // 1/m with the burst used: the next slot is a minute away, clamped to 30s then jittered.
        assert!((30..=45).contains(&retry), "{retry}");
        let message = status["message"].as_str().expect("message");
        assert_eq!(
            message,
            format!(
                "namespace \"{ns}\" is creating pods faster than its limit of 1/m (burst 2); retry in {retry}s (annotation bulwark.io/pod-rate)"
            )
        );
    }
}

#[tokio::test]
async fn count_quotas_refuse_and_warn_mode_only_warns() {
    let server = TestServer::start(&format!("{QUIET}  maxPods: 2\n")).await;
    let client = server.client(Proto::H2);
    for n in 0..2 {
        let r = post(
            &client,
            &server.url("/validate"),
            &pod_review("u", "ci", pod(&format!("p{n}"), "ci"), false),
        )
        .await;
        assert_eq!(response(&r)["allowed"], true);
    }
    let resp = response(
        &post(
            &client,
            &server.url("/validate"),
            &pod_review("u", "ci", pod("p2", "ci"), false),
        )
        .await,
    );
    assert_eq!(resp["allowed"], false);
    let msg = resp["status"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with("namespace \"ci\" has 2 live pods, at its limit of 2; retry in "),
        "{msg}"
    );
    assert!(msg.ends_with("(annotation bulwark.io/max-pods)"), "{msg}");

    let warn = TestServer::start(&format!("{QUIET}  maxPods: 1\n  mode: warn\n")).await;
    let client = warn.client(Proto::Http1);
    for n in 0..3 {
        let resp = response(
            &post(
                &client,
                &warn.url("/validate"),
                &pod_review("u", "ci", pod(&format!("p{n}"), "ci"), false),
            )
            .await,
        );
        assert_eq!(resp["allowed"], true, "warn mode never denies");
        if n > 0 {
            let w = resp["warnings"][0].as_str().expect("a warning");
            assert!(
                w.starts_with("bulwark (mode warn, not enforced): namespace \"ci\" has"),
                "{w}"
            );
        } else {
            assert!(resp.get("warnings").is_none());
        }
    }
}

#[tokio::test]
async fn dry_run_consumes_nothing() {
    let server = TestServer::start(&format!("{QUIET}  maxPods: 1\n")).await;
    let client = server.client(Proto::H2);
    let validate = |n: u32, dry: bool| {
        let body = pod_review("u", "ci", pod(&format!("p{n}"), "ci"), dry);
        let client = client.clone();
        let url = server.url("/validate");
        async move { response(&post(&client, &url, &body).await) }
    };
    for n in 0..5 {
        assert_eq!(validate(n, true).await["allowed"], true, "dry-run {n}");
    }
    assert_eq!(
        validate(10, false).await["allowed"],
        true,
        "the real create still fits"
    );
    let refused = validate(11, true).await;
    assert_eq!(refused["allowed"], false, "dry-run shows the verdict");
    assert_eq!(refused["status"]["code"], 429);
}

#[tokio::test]
async fn exempt_namespaces_pods_and_other_kinds_pass() {
    let server = TestServer::start(&format!("{QUIET}  maxPods: 0\n")).await;
    let client = server.client(Proto::H2);
    let url = server.url("/validate");
    assert_eq!(
        response(&post(&client, &url, &pod_review("u", "ci", pod("p", "ci"), false)).await)["allowed"],
        false
    );
    assert_eq!(
        response(
            &post(
                &client,
                &url,
                &pod_review("u", "kube-system", pod("p", "kube-system"), false)
            )
            .await
        )["allowed"],
        true
    );
    let mut critical = pod("c", "ci");
    critical["spec"]["priorityClassName"] = json!("system-cluster-critical");
    assert_eq!(
        response(&post(&client, &url, &pod_review("u", "ci", critical, false)).await)["allowed"],
        true
    );

    let mut cm = pod_review(
        "u-cm",
        "ci",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        false,
    );
    cm["request"]["kind"]["kind"] = json!("ConfigMap");
    let resp = response(&post(&client, &url, &cm).await);
    assert_eq!(
        (resp["allowed"].clone(), resp["uid"].clone()),
        (json!(true), json!("u-cm"))
    );
    assert!(resp.get("patch").is_none());
}

#[tokio::test]
async fn malformed_bodies_get_a_clear_400_and_the_server_stays_healthy() {
    let server = TestServer::start(QUIET).await;
    let big = {
        let mut p = pod("big", "ci");
        p["metadata"]["annotations"] = json!({"filler": "x".repeat(5 * 1024 * 1024)});
        serde_json::to_vec(&pod_review("u", "ci", p, false)).expect("json")
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"hello".to_vec(), "not valid JSON"),
        (
            "truncated",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"Adm"#.to_vec(),
            "not valid JSON",
        ),
        (
            "wrong apiVersion",
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#
                .to_vec(),
            "expected apiVersion \"admission.k8s.io/v1\"",
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "has no request",
        ),
        ("5 MiB body", big, "larger than 3145728 bytes"),
    ];
    for proto in BOTH {
        let client = server.client(proto);
        for (name, body, expect) in &cases {
            for endpoint in ["/mutate", "/validate"] {
                let reply = send(&client, "POST", &server.url(endpoint), body.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{name} {endpoint} {proto:?}: {e}"));
                assert_eq!(
                    reply.status,
                    400,
                    "{name} {endpoint} {proto:?}: {}",
                    reply.text()
                );
                assert!(reply.text().contains(expect), "{name}: {}", reply.text());
            }
        }
        let health = send(&client, "GET", &server.url("/healthz"), "")
            .await
            .expect("healthz");
        assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));
        let ready = send(&client, "GET", &server.url("/readyz"), "")
            .await
            .expect("readyz");
        assert_eq!(ready.status, 200);
    }
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("bulwark_bad_requests_total{endpoint=\"validate\",error=\"too_large\"} 2"),
        "{metrics}"
    );
}

async fn scrape(server: &TestServer) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.metrics_addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

#[tokio::test]
async fn metrics_count_requests_by_verdict_and_reason() {
    let server = TestServer::start(&format!("{QUIET}  maxPods: 1\n")).await;
    let client = server.client(Proto::H2);
    for n in 0..3 {
        post(
            &client,
            &server.url("/validate"),
            &pod_review("u", "ci", pod(&format!("p{n}"), "ci"), false),
        )
        .await;
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
                let body =
                    serde_json::to_vec(&pod_review("u", "ci", pod(&format!("p{n}"), "ci"), false))
                        .expect("json");
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
        if send(&only_new, "GET", &server.url("/healthz"), "")
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
    assert!(
        send(&only_old, "GET", &server.url("/healthz"), "")
            .await
            .is_err()
    );
    let m = scrape(&server).await;
    assert!(
        m.contains("bulwark_tls_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&staging);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() {
    for proto in BOTH {
        drain_one(proto).await;
    }
}

/// A request whose body is still arriving when shutdown starts is answered; new connections
/// are not accepted; shutdown returns once the request is done.
async fn drain_one(proto: Proto) {
    use http_body_util::{BodyExt, channel::Channel};
    let mut server = TestServer::start(QUIET).await;
    let client = client_with_body::<Channel<bytes::Bytes>>(&[&server.ca_pem], proto, true);
    let body =
        serde_json::to_vec(&pod_review("u-drain", "ci", pod("p", "ci"), false)).expect("json");
    let (first, rest) = body.split_at(body.len() / 2);
    let (mut tx, channel) = Channel::<bytes::Bytes>::new(1);
    let req = http::Request::post(server.url("/mutate"))
        .header("content-type", "application/json")
        .body(channel)
        .expect("request");
    let in_flight = tokio::spawn(client.request(req));
    tx.send_data(bytes::Bytes::copy_from_slice(first))
        .await
        .expect("first half");
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
        send(&fresh, "GET", &server.url("/healthz"), "")
            .await
            .is_err(),
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
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(v["response"]["uid"], "u-drain");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown finishes once drained")
        .expect("shutdown task");
}

/// A client over h2 that trusts the server's CA and presents `identity`.
fn mtls_client(server: &TestServer, identity: Option<&bulwark_certs::Pair>) -> HttpsClient {
    let mut builder =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    builder.http2_only(true);
    builder.build(connector_as(&[&server.ca_pem], Proto::H2, identity))
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
    let probe = send(&anonymous, "GET", &server.url("/healthz"), "")
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
        serde_json::to_vec(&review).expect("json"),
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

/// An AdmissionReview for `object` of `kind`, as a JSON value to be mangled by the cases.
fn review_of(kind: &str, resource: &str, object: Value) -> Value {
    bulwark::review::fixtures::Fixture::pod_create()
        .uid("u-hostile")
        .kind(kind, resource)
        .object(object)
        .into_value()
}

fn with_resources(resources: Value) -> Value {
    let mut p = pod("p", "ci");
    p["spec"]["containers"][0]["resources"] = resources;
    p
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// Hostile and odd bodies, each with the bounded answer it must get: a 400 naming what is
/// wrong, or (for what is valid JSON of the right shape) an ordinary answer that leaves what
/// the user wrote to the API server's own validation. The server stays healthy throughout.
#[tokio::test]
async fn hostile_bodies_get_bounded_answers() {
    let server = TestServer::start(QUIET).await;
    let good = pod_review("u-hostile", "ci", pod("p", "ci"), false);
    let mut uid_number = good.clone();
    uid_number["request"]["uid"] = json!(5);
    let mut no_object = good.clone();
    no_object["request"]["object"] = Value::Null;
    let mut operation_typo = good.clone();
    operation_typo["request"]["operation"] = json!("CREAT");
    let mut containers_number = good.clone();
    containers_number["request"]["object"]["spec"]["containers"] = json!(5);
    let mut request_string = good.clone();
    request_string["request"] = json!("yes");
    let deep_object = {
        let mut v = good.clone();
        v["request"]["object"]["metadata"]["annotations"] = Value::Null;
        let mut text = String::from_utf8(bytes(&v)).expect("utf8");
        let nest = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        text = text.replace(
            "\"annotations\":null",
            &format!("\"annotations\":null,\"x-unknown\":{nest}"),
        );
        text.into_bytes()
    };
    let many_containers = {
        let mut p = pod("p", "ci");
        p["spec"]["containers"] = Value::Array(
            (0..5000)
                .map(|i| json!({"name": format!("c{i}"), "image": "i"}))
                .collect(),
        );
        bytes(&pod_review("u-hostile", "ci", p, false))
    };
    let long_name = bytes(&pod_review(
        "u-hostile",
        "ci",
        pod(&"n".repeat(100_000), "ci"),
        false,
    ));
    let truncated = {
        let b = bytes(&good);
        b[..b.len() / 2].to_vec()
    };
    let near_limit = {
        let mut p = pod("p", "ci");
        p["metadata"]["annotations"] = json!({"big": "x".repeat(2_900_000)});
        bytes(&pod_review("u-hostile", "ci", p, false))
    };
    let over_limit = {
        let mut p = pod("p", "ci");
        p["metadata"]["annotations"] = json!({"big": "x".repeat(3_200_000)});
        bytes(&pod_review("u-hostile", "ci", p, false))
    };
    let mut old_api = good.clone();
    old_api["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut configmap_as_pod = good.clone();
    configmap_as_pod["request"]["object"] =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let duplicate_uid = String::from_utf8(bytes(&good))
        .expect("utf8")
        .replacen("\"uid\":", "\"uid\":\"dup\",\"uid\":", 1)
        .into_bytes();
    let mut connect = good.clone();
    connect["request"]["operation"] = json!("CONNECT");
    let nul_name = bytes(&pod_review("u-hostile", "ci", pod("a\u{0}b", "ci"), false));

    // (name, endpoint, body, status, text the answer must contain)
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("empty body", "validate", vec![], 400, "not valid JSON"),
        (
            "whitespace",
            "validate",
            b"  \n ".to_vec(),
            400,
            "not valid JSON",
        ),
        ("null", "validate", b"null".to_vec(), 400, "does not match"),
        ("array", "validate", b"[]".to_vec(), 400, "does not match"),
        (
            "string",
            "mutate",
            b"\"AdmissionReview\"".to_vec(),
            400,
            "does not match",
        ),
        ("number", "mutate", b"1e999".to_vec(), 400, "not valid JSON"),
        (
            "non-UTF-8",
            "validate",
            b"{\"kind\":\"\xff\xfe\"}".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "UTF-8 BOM",
            "validate",
            [b"\xef\xbb\xbf".as_slice(), &bytes(&good)].concat(),
            400,
            "not valid JSON",
        ),
        (
            "trailing garbage",
            "validate",
            [bytes(&good), b"}}".to_vec()].concat(),
            400,
            "not valid JSON",
        ),
        (
            "two documents",
            "validate",
            [bytes(&good), bytes(&good)].concat(),
            400,
            "not valid JSON",
        ),
        (
            "5000-deep nesting in an unknown pod field is skipped",
            "mutate",
            deep_object.clone(),
            200,
            "\"allowed\":true",
        ),
        (
            "5000-deep nesting",
            "validate",
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            400,
            "does not match",
        ),
        (
            "wrong kind",
            "validate",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod","request":null}"#.to_vec(),
            400,
            "expected apiVersion",
        ),
        (
            "request is a string",
            "validate",
            bytes(&request_string),
            400,
            "does not match",
        ),
        (
            "uid is a number",
            "mutate",
            bytes(&uid_number),
            400,
            "expected a string",
        ),
        (
            "operation typo",
            "validate",
            bytes(&operation_typo),
            400,
            "does not match",
        ),
        (
            "containers is a number",
            "mutate",
            bytes(&containers_number),
            400,
            "pod object",
        ),
        (
            "pod CREATE without object",
            "validate",
            bytes(&no_object),
            200,
            "\"allowed\":true",
        ),
        (
            "unknown kind passes",
            "validate",
            bytes(&review_of(
                "Widget",
                "widgets",
                json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "a Deployment passes",
            "mutate",
            bytes(&review_of(
                "Deployment",
                "deployments",
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}),
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "absurd cpu limit kept for the API server to judge",
            "mutate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"limits": {"cpu": "1e400"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "negative memory kept",
            "mutate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"requests": {"memory": "-5Gi"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "unreadable quantity kept",
            "validate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"limits": {"cpu": "lots"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "request above limit kept",
            "mutate",
            bytes(&pod_review(
                "u-hostile",
                "ci",
                with_resources(json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}})),
                false,
            )),
            200,
            "\"allowed\":true",
        ),
        (
            "5000 containers",
            "mutate",
            many_containers,
            200,
            "bulwark.io/defaulted",
        ),
        (
            "100 kB pod name",
            "validate",
            long_name,
            200,
            "\"allowed\":true",
        ),
        (
            "truncated review",
            "validate",
            truncated,
            400,
            "not valid JSON",
        ),
        (
            "a 2.9 MB pod, under the body limit",
            "mutate",
            near_limit,
            200,
            "\"allowed\":true",
        ),
        (
            "a 3.2 MB body, over the limit",
            "validate",
            over_limit,
            400,
            "3145728",
        ),
        (
            "admission.k8s.io/v1beta1",
            "validate",
            bytes(&old_api),
            400,
            "expected apiVersion",
        ),
        (
            "a ConfigMap as the pod",
            "mutate",
            bytes(&configmap_as_pod),
            400,
            "pod object",
        ),
        (
            "duplicate uid key",
            "validate",
            duplicate_uid,
            400,
            "duplicate field",
        ),
        (
            "CONNECT on a pod passes",
            "validate",
            bytes(&connect),
            200,
            "\"allowed\":true",
        ),
        (
            "NUL in a pod name",
            "validate",
            nul_name,
            200,
            "\"allowed\":true",
        ),
    ];
    let client = server.client(Proto::H2);
    for (name, endpoint, body, status, expect) in &cases {
        let reply = send(
            &client,
            "POST",
            &server.url(&format!("/{endpoint}")),
            body.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(reply.status, *status, "{name}: {}", reply.text());
        let text = reply.text();
        assert!(
            text.contains(expect),
            "{name}: {}",
            &text[..text.len().min(400)]
        );
        // Bounded by the request: a mutate patch for many containers is the largest answer,
        // about 10 times its pod for 5000 containers (a JSONPatch op and an annotation entry per
        // container, in base64). Written as JSON arrays of byte values it was 28 times.
        assert!(
            text.len() <= 12 * body.len() + 64 * 1024,
            "{name}: a {} byte answer to {} bytes",
            text.len(),
            body.len()
        );
    }
    let health = send(&client, "GET", &server.url("/healthz"), "")
        .await
        .expect("healthz");
    assert_eq!(health.status, 200);
    // A good review is still answered normally after all of them.
    let reply = post(&client, &server.url("/validate"), &good).await;
    assert_eq!(response(&reply)["allowed"], true);
}

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
    use http_body_util::{BodyExt, channel::Channel};
    let server = TestServer::start(QUIET).await;
    let client = client_with_body::<Channel<bytes::Bytes>>(&[&server.ca_pem], Proto::H2, true);
    let body = bytes(&pod_review("u-slow", "ci", pod("p", "ci"), false));
    let (mut tx, channel) = Channel::<bytes::Bytes>::new(1);
    let req = http::Request::post(server.url("/validate"))
        .header("content-type", "application/json")
        .body(channel)
        .expect("request");
    let started = std::time::Instant::now();
    let stalled = tokio::spawn(client.request(req));
    tx.send_data(bytes::Bytes::copy_from_slice(&body[..body.len() / 2]))
        .await
        .expect("first half");

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
    let text = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("not received within 10 seconds"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    assert!(took >= Duration::from_secs(10), "answered after {took:?}");
    drop(tx);
}
