//! The webhook's self-managed certificates as the cluster sees them: the Secret and the
//! caBundles, TLS to the webhook verified against them, reviews only from kube-apiserver's
//! client certificate, `bulwark certs` setting a caBundle, and a dropped caBundle restored.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bulwark_e2e::{
    cluster::{WEBHOOK_SECRET, deploy_dir},
    objects::{BULWARK_NAMESPACE, WEBHOOK_CONFIGURATION, registered_webhooks},
    pki::WEBHOOK_CLIENT_NAME,
};
use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    core::v1::Secret,
};
use kube::Api;
use serde_json::json;

use crate::support::{Ctx, eventually, pod};

/// Sends `request` (HTTP/1.1) over TLS to 127.0.0.1:`port`, verifying the server against
/// `ca_bundle` and presenting no client certificate; the leaf served and the raw reply.
fn https_exchange(port: u16, ca_bundle: &str, request: &[u8]) -> anyhow::Result<(Vec<u8>, String)> {
    https_exchange_as(port, ca_bundle, None, request)
}

/// [`https_exchange`] presenting `identity` (a certificate and key) as the client certificate.
pub fn https_exchange_as(
    port: u16,
    ca_bundle: &str,
    identity: Option<&bulwark_certs::Pair>,
    request: &[u8],
) -> anyhow::Result<(Vec<u8>, String)> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some(pair) => config.with_client_auth_cert(
            CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes()).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())?,
        )?,
    };
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(request)?;
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply);
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate served")?;
    Ok((
        leaf.as_ref().to_vec(),
        String::from_utf8_lossy(&reply).into_owned(),
    ))
}

/// The leaf certificate served on 127.0.0.1:`port`, verified against `ca_bundle`.
pub fn served_certificate(port: u16, ca_bundle: &str) -> anyhow::Result<Vec<u8>> {
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    Ok(https_exchange(port, ca_bundle, request)?.0)
}

pub async fn only_the_api_server_may_send_reviews(ctx: &mut Ctx) -> anyhow::Result<()> {
    // Every admission in these tests comes through kube-apiserver, which presents its client
    // certificate; anyone else without one is refused, while probes stay open.
    //
    // What this checks of the shipped configuration: the webhook here runs with the
    // --client-ca and --client-name flags of deploy/overlays/mtls (the same name, read from
    // the overlay's rendering), and kube-apiserver's client certificate carries that name. The
    // paths differ (the overlay mounts a Secret; here the file is on disk), and so does how the
    // API server is told to present it (here e2e/src/pki.rs writes its admission configuration).
    let overlay = deploy_dir().join("overlays/mtls").display().to_string();
    let rendered = ctx.kubectl(&["kustomize", &overlay], None).await?;
    ensure!(rendered.success, "kustomize mtls: {}", rendered.stderr);
    let shipped: Vec<&str> = rendered
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --client-name="))
        .collect();
    ensure!(
        shipped == [WEBHOOK_CLIENT_NAME],
        "the overlay's --client-name {shipped:?} is not the name kube-apiserver's certificate \
         carries here ({WEBHOOK_CLIENT_NAME})"
    );
    ensure!(
        rendered
            .stdout
            .contains("- --client-ca=/etc/bulwark/client-ca/ca.crt"),
        "the overlay does not pass --client-ca"
    );
    let ca = stored(ctx).await?.ca;
    let port = ctx.state().ports.webhook;
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string();
    let request = format!(
        "POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (_, reply) = https_exchange(port, &ca, request.as_bytes())?;
    ensure!(
        reply.starts_with("HTTP/1.1 401") && reply.contains("client certificate"),
        "a review without a client certificate: {reply}"
    );
    let (_, probe) = https_exchange(
        port,
        &ca,
        b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )?;
    ensure!(probe.starts_with("HTTP/1.1 200"), "readyz: {probe}");
    let ns = ctx.namespace("mtls", &[]).await?;
    ctx.create(&ns, &pod("through-the-api-server", json!({})))
        .await?
        .admitted()?;
    Ok(())
}

pub fn first_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    Ok(CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .context("no certificate in PEM")??
        .as_ref()
        .to_vec())
}

/// The CA bundle, the serving certificate and the staged one in the webhook's Secret (PEM).
pub struct Stored {
    pub ca: String,
    pub cert: String,
    pub next: Option<String>,
}

pub async fn stored(ctx: &Ctx) -> anyhow::Result<Stored> {
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), BULWARK_NAMESPACE)
        .get(WEBHOOK_SECRET)
        .await?;
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .with_context(|| format!("Secret without {k}"))
    };
    ensure!(
        !data.contains_key("ca.key"),
        "the Secret the serving pods read holds a CA key"
    );
    Ok(Stored {
        ca: text("ca.crt")?,
        cert: text("tls.crt")?,
        next: text("next.crt").ok(),
    })
}

/// The caBundle of every webhook in the cluster's own two configurations.
pub async fn ca_bundles(ctx: &Ctx) -> anyhow::Result<Vec<Option<String>>> {
    ca_bundles_of(ctx, WEBHOOK_CONFIGURATION).await
}

/// The caBundle of every webhook in the two configurations called `name`.
async fn ca_bundles_of(ctx: &Ctx, name: &str) -> anyhow::Result<Vec<Option<String>>> {
    let text =
        |b: Option<k8s_openapi::ByteString>| b.map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let m = Api::<MutatingWebhookConfiguration>::all(ctx.client.clone())
        .get(name)
        .await?;
    let v = Api::<ValidatingWebhookConfiguration>::all(ctx.client.clone())
        .get(name)
        .await?;
    let mut out: Vec<_> = m
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| text(w.client_config.ca_bundle))
        .collect();
    out.extend(
        v.webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| text(w.client_config.ca_bundle)),
    );
    Ok(out)
}

pub async fn certs_cli_sets_the_ca_bundle(ctx: &mut Ctx) -> anyhow::Result<()> {
    // Its own pair of configurations (never called: they match no namespace), so the cluster's
    // registration keeps its self-managed caBundle.
    let name = "bulwark-certs-cli";
    let (mut mutating, mut validating) =
        bulwark_e2e::objects::webhook_configurations(&ctx.state().webhook_url());
    mutating.metadata.name = Some(name.into());
    validating.metadata.name = Some(name.into());
    let nothing = || {
        Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("bulwark-e2e/never".to_owned(), "x".to_owned())].into()),
                ..Default::default()
            },
        )
    };
    for w in mutating.webhooks.iter_mut().flatten() {
        w.namespace_selector = nothing();
    }
    for w in validating.webhooks.iter_mut().flatten() {
        w.namespace_selector = nothing();
    }
    let (m_api, v_api) = (
        Api::<MutatingWebhookConfiguration>::all(ctx.client.clone()),
        Api::<ValidatingWebhookConfiguration>::all(ctx.client.clone()),
    );
    m_api.create(&Default::default(), &mutating).await?;
    v_api.create(&Default::default(), &validating).await?;
    let result = certs_cli_body(ctx, name).await;
    m_api.delete(name, &Default::default()).await?;
    v_api.delete(name, &Default::default()).await?;
    result
}

async fn certs_cli_body(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let dir = ctx.state().dir.join("certs-cli");
    let out = std::process::Command::new(&ctx.state().bulwark)
        .args([
            "certs",
            "--dns",
            "bulwark-webhook.bulwark-system.svc",
            "--ip",
            "127.0.0.1",
        ])
        .arg(format!("--out-dir={}", dir.display()))
        .arg(format!("--patch-webhook-configuration={name}"))
        .arg(format!(
            "--kubeconfig={}",
            ctx.state().kubeconfig().display()
        ))
        .output()?;
    ensure!(
        out.status.success(),
        "bulwark certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = std::fs::read(dir.join("ca.crt"))?;
    use base64::Engine;
    let printed = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8_lossy(&out.stdout).trim())?;
    ensure!(printed == ca, "the printed caBundle is not ca.crt");
    let bundles = ca_bundles_of(ctx, name).await?;
    let ca = String::from_utf8(ca)?;
    ensure!(
        bundles.len() == registered_webhooks()
            && bundles.iter().all(|b| b.as_deref() == Some(ca.as_str())),
        "caBundles not set to ca.crt"
    );
    // A configuration that does not exist is an error, not silence.
    let out = std::process::Command::new(&ctx.state().bulwark)
        .args([
            "certs",
            "--dns",
            "x",
            "--patch-webhook-configuration=absent",
        ])
        .arg(format!("--out-dir={}", dir.display()))
        .arg(format!(
            "--kubeconfig={}",
            ctx.state().kubeconfig().display()
        ))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("MutatingWebhookConfiguration absent not found"),
        "patching an absent configuration: {err}"
    );
    Ok(())
}

pub async fn a_dropped_ca_bundle_is_restored(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ca = stored(ctx).await?.ca;
    let api = Api::<ValidatingWebhookConfiguration>::all(ctx.client.clone());
    // What a re-install from manifests without a caBundle, or a careless edit, does.
    let patch = json!([{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]);
    let dropped = Instant::now();
    api.patch(
        WEBHOOK_CONFIGURATION,
        &Default::default(),
        &kube::api::Patch::Json::<()>(serde_json::from_value(patch)?),
    )
    .await?;
    eventually(Duration::from_secs(10), "the caBundle restored", || async {
        Ok(ca_bundles(ctx)
            .await?
            .iter()
            .all(|b| b.as_deref() == Some(ca.as_str()))
            .then_some(()))
    })
    .await?;
    let took = dropped.elapsed();
    let ns = ctx.namespace("cabundle", &[]).await?;
    ctx.create(&ns, &pod("after-repair", json!({})))
        .await?
        .admitted()?;
    println!(
        "    caBundle removed -> restored by bulwark cabundle in {:.2}s",
        took.as_secs_f64()
    );
    Ok(())
}
