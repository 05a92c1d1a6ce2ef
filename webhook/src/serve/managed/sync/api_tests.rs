//! The requests the certificate sync makes: the Secret's read-modify-write and the
//! caBundle of the two webhook configurations.

use base64::{Engine, engine::general_purpose::STANDARD};
use http::Method;
use serde_json::{Value, json};

use super::*;
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
        webhook_configuration: "bulwark".into(),
        wanted: wanted(),
    }
}

/// What the plan writes on a first start: a new CA and serving certificate.
fn fresh() -> Stored {
    match plan(None, &wanted(), SystemTime::now()).expect("certificates") {
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
            let api = Api::namespaced(client, NS);
            settle(&api, &options(), metrics).await
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
            assert_eq!(keys, [CA_CRT, CA_KEY, TLS_CRT, TLS_KEY]);
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
    let theirs = match plan(Some(&ours), &wanted(), SystemTime::now()).expect("plan") {
        SecretPlan::Write { next, .. } => *next,
        SecretPlan::Keep { .. } => unreachable!("a rotation was requested"),
    };
    let metrics = WebhookMetrics::new().tls;
    let server = ApiServer::new()
        .get(SECRET, Reply::Json(secret(&ours, "7")))
        .replace(SECRET, "7")
        .body(|s| assert_eq!(s["metadata"]["annotations"][ROTATED_ANNOTATION], "1"))
        .respond(Reply::conflict())
        .get(SECRET, Reply::Json(secret(&theirs, "8")));

    let (stored, _) = settled(server, &metrics).await.expect("settled");
    assert_eq!(stored, theirs);
    assert_ne!(stored.cert, ours.cert);
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
