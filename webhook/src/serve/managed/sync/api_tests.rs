//! The requests the certificate sync makes: the Secret's read-modify-write and the
//! caBundle of the two webhook configurations.

use base64::{Engine, engine::general_purpose::STANDARD};
use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::serve::managed::cabundle::set_ca_bundle;
use crate::{
    metrics::webhook::WebhookMetrics,
    serve::managed::tests::wanted,
    testing::{ApiServer, Reply},
};

const NS: &str = "bulwark-system";
const NAME: &str = "bulwark-webhook-tls";
const SECRET: &str = "/api/v1/namespaces/bulwark-system/secrets/bulwark-webhook-tls";

fn options() -> ManagedOptions {
    ManagedOptions {
        namespace: NS.into(),
        secret: NAME.into(),
        service: "bulwark-webhook".into(),
        webhook_configuration: "bulwark".into(),
        wanted: wanted(),
    }
}

/// What the plan writes on a first start: a new CA and serving certificate.
fn fresh() -> Stored {
    match plan(None, &wanted(), Observed::default(), SystemTime::now()).expect("certificates") {
        SecretPlan::Write { next, .. } => *next,
        SecretPlan::Keep { .. } => unreachable!("nothing to keep yet"),
    }
}

/// The Secret holding `stored` as the API server returns it.
fn secret(stored: &Stored, resource_version: &str) -> Value {
    let mut base = Secret::default();
    base.metadata.name = Some(NAME.into());
    base.metadata.namespace = Some(NS.into());
    base.metadata.resource_version = Some(resource_version.into());
    if let Some(rotate) = &stored.rotate {
        base.metadata.annotations = Some(BTreeMap::from([(
            ROTATE_ANNOTATION.to_owned(),
            rotate.clone(),
        )]));
    }
    serde_json::to_value(stored.clone().into_secret(base)).expect("serializable")
}

async fn settled(
    server: ApiServer,
    metrics: &TlsMetrics,
) -> Result<(Stored, SystemTime), SyncError> {
    server
        .run(|client| async move {
            let api = Api::namespaced(client.clone(), NS);
            settle(&client, &api, &options(), metrics).await
        })
        .await
}

#[tokio::test]
async fn settle_creates_a_missing_secret_then_keeps_what_it_wrote() {
    let metrics = WebhookMetrics::new().tls;
    let server = ApiServer::new()
        .get(SECRET, Reply::not_found())
        .expect(Method::POST, "/api/v1/namespaces/bulwark-system/secrets?")
        .body(|s| {
            assert_eq!(s["type"], "kubernetes.io/tls");
            assert_eq!(s["metadata"]["name"], NAME);
            assert_eq!(s["metadata"]["namespace"], NS);
            assert_eq!(
                s["metadata"]["labels"],
                json!({"app.kubernetes.io/name": "bulwark", "app.kubernetes.io/component": "webhook"})
            );
            let keys: Vec<&str> = s["data"]
                .as_object()
                .expect("data")
                .keys()
                .map(String::as_str)
                .collect();
            // No CA key: nothing a serving pod reads can sign another certificate.
            assert_eq!(keys, [CA_CRT, TLS_CRT, TLS_KEY]);
        })
        .respond(Reply::Stored)
        .get(SECRET, Reply::LastStored);

    let (stored, recheck) = settled(server, &metrics).await.expect("settled");
    let w = wanted();
    let serving = bulwark_certs::facts(&stored.cert).expect("a certificate");
    assert!(serving.covers(&w.dns_names, &w.ips));
    assert!(recheck > SystemTime::now());
    let created = metrics.cert_writes.with_label_values(&["created"]);
    assert_eq!(created.get(), 1);
}

#[tokio::test]
async fn settle_keeps_a_good_secret_without_writing() {
    let good = fresh();
    let server = ApiServer::new().get(SECRET, Reply::Json(secret(&good, "42")));
    let (stored, _) = settled(server, &WebhookMetrics::new().tls)
        .await
        .expect("settled");
    assert_eq!(stored, good);
}

#[tokio::test]
async fn settle_reads_again_after_a_conflict_and_keeps_the_winners_secret() {
    let ours = Stored {
        rotate: Some("1".into()),
        ..fresh()
    };
    // Another replica answered the same rotation request first.
    let theirs = match plan(
        Some(&ours),
        &wanted(),
        Observed::default(),
        SystemTime::now(),
    )
    .expect("plan")
    {
        SecretPlan::Write { next, .. } => *next,
        SecretPlan::Keep { .. } => unreachable!("a rotation was requested"),
    };
    let metrics = WebhookMetrics::new().tls;
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(secret(&ours, "7")))
        .replace(SECRET, "7")
        .body(|s| assert_eq!(s["metadata"]["annotations"][ROTATED_ANNOTATION], "1"))
        .respond(Reply::conflict())
        .get(SECRET, Reply::Json(secret(&theirs, "8")))
        // Their renewal is staged: is its CA in the caBundles yet? (Not yet registered.)
        .get(MUTATING, Reply::not_found())
        .get(VALIDATING, Reply::not_found());

    let (stored, _) = settled(server, &metrics).await.expect("settled");
    assert_eq!(stored, theirs);
    assert!(stored.is_staged() && stored.next_cert != ours.next_cert);
    let rotated = metrics
        .cert_writes
        .with_label_values(&["rotation_requested"]);
    assert_eq!(rotated.get(), 0, "the lost write is not counted");
}

const MUTATING: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/bulwark";
const VALIDATING: &str =
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/bulwark";
const OLD: &str = "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n";
const NEW: &str = "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n";

/// A webhook configuration called `bulwark` whose webhooks have these caBundles.
fn configuration(kind: &str, bundles: &[&str]) -> Value {
    let webhooks: Vec<Value> = bundles
        .iter()
        .enumerate()
        .map(|(i, bundle)| {
            json!({
                "name": format!("w{i}.bulwark.io"),
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {
                    "service": {"name": "bulwark-webhook", "namespace": NS, "path": "/mutate"},
                    "caBundle": STANDARD.encode(bundle),
                },
            })
        })
        .collect();
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": "bulwark", "resourceVersion": "5"},
        "webhooks": webhooks,
    })
}

/// Every webhook of the written configuration trusts `NEW`.
fn all_bundles_new(body: &Value) {
    let webhooks = body["webhooks"].as_array().expect("webhooks");
    assert!(!webhooks.is_empty());
    for w in webhooks {
        assert_eq!(w["clientConfig"]["caBundle"], STANDARD.encode(NEW), "{w}");
    }
}

async fn ca_bundle_results(server: ApiServer) -> [Result<bool, String>; 2] {
    let results = server
        .run(|client| async move { set_ca_bundle(&client, "bulwark", NEW).await })
        .await;
    results.map(|r| r.map_err(|e| e.to_string()))
}

#[tokio::test]
async fn set_ca_bundle_replaces_only_the_configuration_that_differs() {
    let server = ApiServer::new()
        .get(
            MUTATING,
            Reply::Json(configuration("MutatingWebhookConfiguration", &[OLD, NEW])),
        )
        .replace(MUTATING, "5")
        .body(all_bundles_new)
        .respond(Reply::Stored)
        .get(
            VALIDATING,
            Reply::Json(configuration("ValidatingWebhookConfiguration", &[NEW, NEW])),
        );
    assert_eq!(ca_bundle_results(server).await, [Ok(true), Ok(true)]);
}

#[tokio::test]
async fn set_ca_bundle_reports_an_absent_configuration() {
    let server = ApiServer::new()
        .get(MUTATING, Reply::not_found())
        .get(
            VALIDATING,
            Reply::Json(configuration("ValidatingWebhookConfiguration", &[OLD])),
        )
        .replace(VALIDATING, "5")
        .body(all_bundles_new)
        .respond(Reply::Stored);
    assert_eq!(ca_bundle_results(server).await, [Ok(false), Ok(true)]);
}

/// `stored` as the API server returns it, with its staging and retirement annotations.
fn secret_with_state(stored: &Stored, resource_version: &str) -> Value {
    let mut base = Secret::default();
    base.metadata.name = Some(NAME.into());
    base.metadata.namespace = Some(NS.into());
    base.metadata.resource_version = Some(resource_version.into());
    serde_json::to_value(stored.clone().into_secret(base)).expect("serializable")
}

/// A Secret whose renewal was staged: a second CA in the bundle, the next pair waiting.
fn staged() -> Stored {
    let asked = Stored {
        rotate: Some("1".into()),
        ..fresh()
    };
    match plan(
        Some(&asked),
        &wanted(),
        Observed::default(),
        SystemTime::now(),
    )
    .expect("plan")
    {
        SecretPlan::Write { next, .. } => *next,
        SecretPlan::Keep { .. } => unreachable!("a rotation was requested"),
    }
}

#[tokio::test]
async fn settle_drops_a_ca_key_left_by_an_earlier_version() {
    let good = fresh();
    let mut old = secret(&good, "7");
    old["data"]["ca.key"] =
        json!(STANDARD.encode("-----BEGIN PRIVATE KEY-----\nX\n-----END PRIVATE KEY-----\n"));
    let metrics = WebhookMetrics::new().tls;
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(old))
        .replace(SECRET, "7")
        .body(|s| {
            let keys: Vec<&str> = s["data"]
                .as_object()
                .expect("data")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys, [CA_CRT, TLS_CRT, TLS_KEY]);
        })
        .respond(Reply::Stored)
        .get(SECRET, Reply::LastStored);
    let (stored, _) = settled(server, &metrics).await.expect("settled");
    assert_eq!(stored, good, "everything else kept");
    assert_eq!(
        metrics
            .cert_writes
            .with_label_values(&["ca_key_dropped"])
            .get(),
        1
    );
}

#[tokio::test]
async fn a_staged_ca_is_recorded_as_trusted_once_both_ca_bundles_hold_it() {
    let staged = staged();
    let newest = staged.newest_ca().expect("a CA");
    let both = format!("{newest}{}", super::super::pem_blocks(&staged.ca_bundle)[1]);
    let holding = |kind: &str| Reply::Json(configuration(kind, &[&both]));
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(secret_with_state(&staged, "7")))
        .get(MUTATING, holding("MutatingWebhookConfiguration"))
        .get(VALIDATING, holding("ValidatingWebhookConfiguration"))
        .replace(SECRET, "7")
        .body(|s| {
            let trusted_at = s["metadata"]["annotations"][CA_TRUSTED_ANNOTATION].as_str();
            assert!(trusted_at.is_some_and(|t| t.parse::<u64>().is_ok()), "{s}");
            assert!(
                s["data"][NEXT_CRT].is_string(),
                "still waiting to be served"
            );
        })
        .respond(Reply::Stored)
        .get(SECRET, Reply::LastStored)
        .get(MUTATING, holding("MutatingWebhookConfiguration"))
        .get(VALIDATING, holding("ValidatingWebhookConfiguration"));
    let (stored, recheck) = settled(server, &WebhookMetrics::new().tls)
        .await
        .expect("settled");
    assert_eq!(
        stored.cert, staged.cert,
        "not served before the propagation time"
    );
    assert!(recheck > SystemTime::now());
}

#[tokio::test]
async fn a_staged_ca_missing_from_one_ca_bundle_is_not_trusted() {
    let staged = staged();
    let old = super::super::pem_blocks(&staged.ca_bundle)[1].clone();
    let newest = staged.newest_ca().expect("a CA");
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(secret_with_state(&staged, "7")))
        .get(
            MUTATING,
            Reply::Json(configuration("MutatingWebhookConfiguration", &[&newest])),
        )
        .get(
            VALIDATING,
            Reply::Json(configuration(
                "ValidatingWebhookConfiguration",
                &[&newest, &old],
            )),
        );
    let (stored, _) = settled(server, &WebhookMetrics::new().tls)
        .await
        .expect("settled");
    assert_eq!(stored.ca_trusted_at, None);
}

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/bulwark-system/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3Dbulwark-webhook";

/// A Secret whose new certificate is served since long ago, the old CA still in the bundle.
fn served_with_old_ca() -> Stored {
    let s = staged();
    Stored {
        cert: s.next_cert.clone(),
        key: s.next_key.clone(),
        next_cert: String::new(),
        next_key: String::new(),
        ca_staged_at: None,
        ca_promoted_at: Some(1_000),
        ..s
    }
}

fn slices(endpoints: &[std::net::SocketAddr]) -> Value {
    let items: Vec<Value> = endpoints
        .iter()
        .map(|a| {
            json!({
                "metadata": {"name": format!("bulwark-webhook-{}", a.port())},
                "addressType": "IPv4",
                "ports": [{"name": "https", "port": a.port()}],
                "endpoints": [{"addresses": [a.ip().to_string()], "conditions": {"ready": true}}],
            })
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {}, "items": items})
}

#[tokio::test]
async fn old_cas_are_retired_once_every_ready_replica_serves_the_new_certificate() {
    let served = served_with_old_ca();
    let pair = bulwark_certs::Pair {
        cert_pem: served.cert.clone(),
        key_pem: served.key.clone(),
    };
    let replica = crate::serve::managed::fleet::tests::replica(&pair).await;
    let newest = served.newest_ca().expect("a CA");
    let metrics = WebhookMetrics::new().tls;
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(secret_with_state(&served, "7")))
        .get(SLICES, Reply::Json(slices(&[replica])))
        .replace(SECRET, "7")
        .body(move |s| {
            let bundle = STANDARD.decode(s["data"][CA_CRT].as_str().unwrap_or_default());
            assert_eq!(
                bundle.ok(),
                Some(newest.into_bytes()),
                "only the newest CA left"
            );
            assert!(s["metadata"]["annotations"][CA_PROMOTED_ANNOTATION].is_null());
        })
        .respond(Reply::Stored)
        .get(SECRET, Reply::LastStored);
    let (stored, _) = settled(server, &metrics).await.expect("settled");
    assert_eq!(super::super::pem_blocks(&stored.ca_bundle).len(), 1);
    assert_eq!(
        metrics
            .cert_writes
            .with_label_values(&["old_cas_retired"])
            .get(),
        1
    );
}

#[tokio::test]
async fn old_cas_stay_while_a_replica_serves_an_older_certificate() {
    let served = served_with_old_ca();
    let behind = bulwark_certs::Ca::new("older", 2)
        .and_then(|ca| ca.server(&[], &["127.0.0.1".parse().expect("an IP")]))
        .expect("a pair");
    let current = bulwark_certs::Pair {
        cert_pem: served.cert.clone(),
        key_pem: served.key.clone(),
    };
    let replicas = [
        crate::serve::managed::fleet::tests::replica(&current).await,
        crate::serve::managed::fleet::tests::replica(&behind).await,
    ];
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(secret_with_state(&served, "7")))
        .get(SLICES, Reply::Json(slices(&replicas)));
    let (stored, _) = settled(server, &WebhookMetrics::new().tls)
        .await
        .expect("settled");
    assert_eq!(super::super::pem_blocks(&stored.ca_bundle).len(), 2, "kept");
}
