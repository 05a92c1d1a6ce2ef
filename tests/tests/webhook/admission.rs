//! Admission answers: the mutate patch, the 429 refusal's shape, count quotas and warn mode,
//! dry runs, and what is exempt (system namespaces, critical pods, other kinds).

use base64::{Engine, prelude::BASE64_STANDARD};
use bulwark::review::fixtures::Fixture;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use crate::support::*;

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
            let r = server.validate_pod(&client, &ns, &format!("p{n}")).await;
            assert_eq!(response(&r)["allowed"], true, "within the burst");
        }
        // A person (kubectl) is told when to come back.
        let by_kubectl = Fixture::pod_create()
            .uid("uid-x")
            .namespace(&ns)
            .object(pod("p3", &ns))
            .user("kubernetes-admin", &["system:masters"])
            .into_value();
        let reply = post(&client, &server.url("/validate"), &by_kubectl).await;
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

/// The Job controller (the fixture's user) queues its own work: the same refusal, but no
/// `retryAfterSeconds`, so kube-apiserver sends no `Retry-After` and its worker is not put to
/// sleep inside the call.
#[tokio::test]
async fn controllers_get_the_refusal_without_retry_after() {
    let server = TestServer::start("defaults:\n  podRate: 1/m\n  podBurst: 1\n").await;
    let client = server.client(Proto::Http1);
    let first = server.validate_pod(&client, "ci", "p0").await;
    assert_eq!(response(&first)["allowed"], true);
    let reply = server.validate_pod(&client, "ci", "p1").await;
    let resp = response(&reply);
    assert_eq!(resp["allowed"], false);
    let status = &resp["status"];
    assert_eq!(status["code"], 429);
    assert_eq!(status["reason"], "TooManyRequests");
    assert!(status.get("details").is_none(), "{status}");
    let message = status["message"].as_str().expect("message");
    assert!(
        message.starts_with("namespace \"ci\" is creating pods faster than its limit of 1/m"),
        "{message}"
    );
    let m = scrape(&server).await;
    for line in [
        "bulwark_refusal_forms_total{form=\"immediate\"} 1",
        "bulwark_retry_after_seconds_count 1",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
}

#[tokio::test]
async fn count_quotas_refuse_and_warn_mode_only_warns() {
    let server = TestServer::start(&format!("{QUIET}  maxPods: 2\n")).await;
    let client = server.client(Proto::H2);
    for n in 0..2 {
        let r = server.validate_pod(&client, "ci", &format!("p{n}")).await;
        assert_eq!(response(&r)["allowed"], true);
    }
    let resp = response(&server.validate_pod(&client, "ci", "p2").await);
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
        let resp = response(&warn.validate_pod(&client, "ci", &format!("p{n}")).await);
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
    let config = format!("{QUIET}  maxPods: 0\nsystemNamespaces: [kube-system, infra]\n");
    let server = TestServer::start(&config).await;
    let client = server.client(Proto::H2);
    let url = server.url("/validate");
    assert_eq!(
        response(&server.validate_pod(&client, "ci", "p").await)["allowed"],
        false
    );
    assert_eq!(
        response(&server.validate_pod(&client, "kube-system", "p").await)["allowed"],
        true
    );
    // A system-critical priority exempts a pod only in a system namespace: any tenant may
    // name the class.
    for (namespace, exempt) in [("infra", true), ("ci", false)] {
        let mut critical = pod("c", namespace);
        critical["spec"]["priorityClassName"] = json!("system-cluster-critical");
        let review = pod_review("u", namespace, critical, false);
        assert_eq!(
            response(&post(&client, &url, &review).await)["allowed"],
            exempt,
            "{namespace}"
        );
    }

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
