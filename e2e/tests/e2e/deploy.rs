//! What an install is made of: the deploy/ manifests and Helm chart against the real API
//! server, least-privilege RBAC, and the webhook's self-managed certificates.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bulwark_e2e::{
    cluster::{WEBHOOK_SECRET, cert_manager_crds, deploy_dir, free_port},
    objects::{BULWARK_NAMESPACE, WEBHOOK_CONFIGURATION},
    pki::{Identity, kubeconfig_path},
};
use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    core::v1::Secret,
};
use kube::Api;
use serde_json::{Value, json};

use crate::support::{Ctx, SteadyLoad, eventually, pod};

/// One way to install bulwark, rendered to YAML.
struct Rendering {
    name: &'static str,
    yaml: String,
}

/// kustomize (`kubectl kustomize`) for the base and each overlay, and `helm template` with the
/// values that correspond to each.
async fn renderings(ctx: &Ctx) -> anyhow::Result<(Vec<Rendering>, Vec<Rendering>)> {
    let deploy = deploy_dir();
    let mut kustomize = Vec::new();
    for (name, dir) in [
        ("kustomize base", "base"),
        ("kustomize fail-closed", "overlays/fail-closed"),
        ("kustomize cert-manager", "overlays/cert-manager"),
    ] {
        let dir = deploy.join(dir).display().to_string();
        let out = ctx.kubectl(&["kustomize", &dir], None).await?;
        ensure!(out.success, "{name}: {}", out.stderr);
        kustomize.push(Rendering {
            name,
            yaml: out.stdout,
        });
    }
    let chart = deploy.join("helm/bulwark").display().to_string();
    let mut helm = Vec::new();
    for (name, set) in [
        ("helm defaults", None),
        (
            "helm failurePolicy=Fail",
            Some("webhook.failurePolicy=Fail"),
        ),
        ("helm certManager", Some("certManager.enabled=true")),
    ] {
        let mut cmd = tokio::process::Command::new(ctx.state().helm());
        cmd.args(["template", "bulwark", &chart]);
        if let Some(set) = set {
            cmd.args(["--set", set]);
        }
        let out = cmd.output().await.context("running helm")?;
        ensure!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        helm.push(Rendering {
            name,
            yaml: String::from_utf8_lossy(&out.stdout).into_owned(),
        });
    }
    Ok((kustomize, helm))
}

type Key = (String, String, String);

/// The objects of a rendering by kind, namespace and name.
fn objects(r: &Rendering) -> anyhow::Result<BTreeMap<Key, Value>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&r.yaml).with_context(|| format!("parsing {}", r.name))?;
    let mut out = BTreeMap::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let field = |p: &str| {
            doc.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let key = (
            field("/kind"),
            field("/metadata/namespace"),
            field("/metadata/name"),
        );
        ensure!(
            out.insert(key.clone(), doc).is_none(),
            "{}: {key:?} twice",
            r.name
        );
    }
    Ok(out)
}

/// bulwark's own pods must carry requests and limits, or bulwark would refuse to leave them
/// alone elsewhere; and they must meet the restricted Pod Security Standard.
fn check_workloads(r: &Rendering, objs: &BTreeMap<Key, Value>) -> anyhow::Result<usize> {
    let mut checked = 0;
    for ((kind, _, name), obj) in objs {
        let Some(containers) = obj
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array)
        else {
            continue;
        };
        for c in containers {
            for path in [
                "/resources/requests/cpu",
                "/resources/requests/memory",
                "/resources/limits/cpu",
                "/resources/limits/memory",
            ] {
                ensure!(
                    c.pointer(path).is_some(),
                    "{}: {kind} {name} has no {path}",
                    r.name
                );
            }
            ensure!(
                c.pointer("/securityContext/allowPrivilegeEscalation") == Some(&json!(false)),
                "{}: {kind} {name} may escalate privileges",
                r.name
            );
            checked += 1;
        }
    }
    Ok(checked)
}

pub async fn deploy_manifests_are_accepted_by_the_api_server(ctx: &mut Ctx) -> anyhow::Result<()> {
    // The cert-manager overlay needs cert-manager's CRDs (the real ones, from its module).
    for crd in cert_manager_crds()? {
        let out = ctx
            .kubectl(
                &["apply", "--server-side", "-f", &crd.display().to_string()],
                None,
            )
            .await?;
        ensure!(out.success, "applying {}: {}", crd.display(), out.stderr);
    }
    let out = ctx
        .kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                "crd/certificates.cert-manager.io",
                "crd/issuers.cert-manager.io",
            ],
            None,
        )
        .await?;
    ensure!(out.success, "cert-manager CRDs: {}", out.stderr);

    let (kustomize, helm) = renderings(ctx).await?;
    for r in kustomize.iter().chain(&helm) {
        let objs = objects(r)?;
        let containers = check_workloads(r, &objs)?;
        ensure!(containers == 2, "{}: {containers} containers", r.name);
        // Server-side apply with the field manager that applied the e2e cluster's own copies
        // (namespace, RBAC, registrations): what it owned and a rendering leaves out goes,
        // so each rendering is checked as it would stand, not merged into the e2e objects.
        let out = ctx
            .kubectl(
                &[
                    "apply",
                    "--server-side",
                    "--dry-run=server",
                    "--force-conflicts",
                    "--field-manager=bulwark-e2e",
                    "-f",
                    "-",
                ],
                Some(&r.yaml),
            )
            .await?;
        ensure!(
            out.success,
            "{}: the API server refused: {}",
            r.name,
            out.stderr
        );
        // Warnings would be e.g. Pod Security (the namespace warns on restricted).
        ensure!(
            !out.stderr.contains("Warning"),
            "{}: warnings: {}",
            r.name,
            out.stderr
        );
        let accepted = out
            .stdout
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        ensure!(
            accepted == objs.len(),
            "{}: {accepted} of {} objects accepted:\n{}",
            r.name,
            objs.len(),
            out.stdout
        );
        println!(
            "    {}: {accepted} objects accepted (server dry run)",
            r.name
        );
    }
    Ok(())
}

pub async fn kustomize_and_helm_render_the_same_objects(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (kustomize, helm) = renderings(ctx).await?;
    for (k, h) in kustomize.iter().zip(&helm) {
        let (ko, ho) = (objects(k)?, objects(h)?);
        let only = |a: &BTreeMap<Key, Value>, b: &BTreeMap<Key, Value>| -> Vec<Key> {
            a.keys()
                .filter(|key| !b.contains_key(*key))
                .cloned()
                .collect()
        };
        ensure!(
            ko.keys().eq(ho.keys()),
            "{} vs {}: only in kustomize {:?}, only in helm {:?}",
            k.name,
            h.name,
            only(&ko, &ho),
            only(&ho, &ko)
        );
        for (key, obj) in &ko {
            ensure!(
                Some(obj) == ho.get(key),
                "{key:?} differs between {} and {}:\n{obj:#}\n{:#}",
                k.name,
                h.name,
                ho[key]
            );
        }
        println!("    {} = {}: {} objects", k.name, h.name, ko.len());
    }
    Ok(())
}

/// `kubectl auth can-i` as the component's ServiceAccount.
async fn can_i(ctx: &Ctx, who: Identity, args: &[&str]) -> anyhow::Result<bool> {
    let sa = who
        .impersonates()
        .context("not a ServiceAccount identity")?;
    let mut full = vec!["auth", "can-i", "--as", &sa];
    full.extend_from_slice(args);
    let out = ctx.kubectl(&full, None).await?;
    match out.stdout.trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {}: {other} {}",
            args.join(" "),
            out.stderr
        ),
    }
}

pub async fn rbac_is_least_privilege(ctx: &mut Ctx) -> anyhow::Result<()> {
    // The components really act as their ServiceAccounts (so every other test that works
    // shows the grants are enough).
    for who in [Identity::Webhook, Identity::NodeController] {
        let kubeconfig = kubeconfig_path(&ctx.state().dir, who).display().to_string();
        let out = ctx
            .kubectl(
                &[
                    "auth",
                    "whoami",
                    "--kubeconfig",
                    &kubeconfig,
                    "-o",
                    "jsonpath={.status.userInfo.username}",
                ],
                None,
            )
            .await?;
        ensure!(out.success, "whoami: {}", out.stderr);
        ensure!(
            Some(out.stdout.trim()) == who.impersonates().as_deref(),
            "{who:?} acts as {:?}",
            out.stdout
        );
    }
    let ns = BULWARK_NAMESPACE;
    use Identity::{NodeController as N, Webhook as W};
    // (who, `kubectl auth can-i` arguments, allowed); $NS is bulwark's namespace.
    let cases: &[(Identity, &str, bool)] = &[
        (W, "watch pods -A", true),
        (W, "create events.events.k8s.io -n default", true),
        (W, "update secret/bulwark-webhook-tls -n $NS", true),
        (W, "update validatingwebhookconfigurations/bulwark", true),
        (W, "create pods -n default", false),
        (W, "delete pods -n default", false),
        (W, "get secrets -n $NS", false),
        (W, "get secret/other -n $NS", false),
        (W, "get secret/bulwark-webhook-tls -n default", false),
        (W, "update validatingwebhookconfigurations/other", false),
        (W, "watch mutatingwebhookconfigurations/bulwark", true),
        (W, "list validatingwebhookconfigurations", false),
        (W, "patch nodes", false),
        (W, "watch endpointslices.discovery.k8s.io -n $NS", true),
        (W, "watch endpointslices.discovery.k8s.io -n default", false),
        (N, "patch nodes", true),
        (N, "delete nodes", true),
        (N, "watch leases -n kube-node-lease", true),
        (N, "update lease/bulwark-node-controller -n $NS", true),
        (N, "update lease/other -n $NS", false),
        (N, "update leases -n kube-node-lease", false),
        (N, "get secrets -A", false),
        (N, "create pods -n default", false),
        (N, "delete pods -n default", false),
    ];
    for (who, line, want) in cases {
        let line = line.replace("$NS", ns);
        let args: Vec<&str> = line.split_whitespace().collect();
        let got = can_i(ctx, *who, &args).await?;
        ensure!(got == *want, "{who:?} can {line}: {got}, expected {want}");
    }
    // And a real request outside the role is refused by the API server.
    let kubeconfig = kubeconfig_path(&ctx.state().dir, Identity::Webhook)
        .display()
        .to_string();
    let out = ctx
        .kubectl(
            &["get", "secrets", "-n", ns, "--kubeconfig", &kubeconfig],
            None,
        )
        .await?;
    ensure!(
        !out.success && out.stderr.contains("Forbidden"),
        "the webhook listed Secrets: {} {}",
        out.stdout,
        out.stderr
    );
    println!(
        "    {} permission checks as the ServiceAccounts",
        cases.len()
    );
    Ok(())
}

/// Sends `request` (HTTP/1.1) over TLS to 127.0.0.1:`port`, verifying the server against
/// `ca_bundle` and presenting no client certificate; the leaf served and the raw reply.
fn https_exchange(port: u16, ca_bundle: &str, request: &[u8]) -> anyhow::Result<(Vec<u8>, String)> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
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
fn served_certificate(port: u16, ca_bundle: &str) -> anyhow::Result<Vec<u8>> {
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    Ok(https_exchange(port, ca_bundle, request)?.0)
}

pub async fn only_the_api_server_may_send_reviews(ctx: &mut Ctx) -> anyhow::Result<()> {
    // Every admission in these tests comes through kube-apiserver, which presents its client
    // certificate; anyone else without one is refused, while probes stay open.
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

fn first_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    Ok(CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .context("no certificate in PEM")??
        .as_ref()
        .to_vec())
}

struct Stored {
    ca: String,
    cert: String,
}

async fn stored(ctx: &Ctx) -> anyhow::Result<Stored> {
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), BULWARK_NAMESPACE)
        .get(WEBHOOK_SECRET)
        .await?;
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .with_context(|| format!("Secret without {k}"))
    };
    Ok(Stored {
        ca: text("ca.crt")?,
        cert: text("tls.crt")?,
    })
}

/// The caBundle of every webhook in the cluster's own two configurations.
async fn ca_bundles(ctx: &Ctx) -> anyhow::Result<Vec<Option<String>>> {
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
        bundles.len() == 2 && bundles.iter().all(|b| b.as_deref() == Some(ca.as_str())),
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
        "    caBundle removed -> restored by the webhook in {:.2}s",
        took.as_secs_f64()
    );
    Ok(())
}

pub async fn self_managed_certificates_rotate_without_failed_admissions(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    // First start (cluster up): the webhook created the Secret and set the caBundle.
    let first = stored(ctx).await?;
    let bundles = ca_bundles(ctx).await?;
    ensure!(
        bundles.len() == 2
            && bundles
                .iter()
                .all(|b| b.as_deref() == Some(first.ca.as_str())),
        "caBundles {bundles:?} are not the Secret's CA"
    );
    let created = ctx.metric(
        "bulwark_certificate_secret_writes_total",
        &[("why", "created")],
    )?;
    ensure!(
        created == 1.0,
        "Secret created {created} times by the webhook"
    );
    let primary = ctx.state().ports.webhook;
    ensure!(
        served_certificate(primary, &first.ca)? == first_der(&first.cert)?,
        "the webhook does not serve the Secret's certificate"
    );

    let replica_port = free_port()?;
    ctx.cluster
        .spawn_webhook_replica("webhook-replica", replica_port)?;
    let result = rotate_under_load(ctx, &first, primary, replica_port).await;
    ctx.cluster.stop_named("webhook-replica", false);
    result
}

/// The e2e webhook's --ca-propagation-seconds.
const CA_PROPAGATION: u64 = 3;

fn rotate(ctx: &Ctx, ca: bool) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new(&ctx.state().bulwark);
    cmd.args([
        "certs",
        "rotate",
        "--namespace",
        BULWARK_NAMESPACE,
        "--secret",
        WEBHOOK_SECRET,
    ])
    .arg(format!(
        "--kubeconfig={}",
        ctx.state().kubeconfig().display()
    ));
    if ca {
        cmd.arg("--ca");
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "bulwark certs rotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until every port serves `cert`, verified against `ca` alone.
async fn all_serve(ports: &[u16], ca: &str, cert: &str, what: &str) -> anyhow::Result<()> {
    let want = first_der(cert)?;
    for &port in ports {
        eventually(Duration::from_secs(20), what, || {
            let (ca, want) = (ca.to_owned(), want.clone());
            async move {
                Ok(served_certificate(port, &ca)
                    .ok()
                    .filter(|c| *c == want)
                    .map(|_| ()))
            }
        })
        .await?;
    }
    Ok(())
}

/// A serving-certificate rotation, then a CA rotation; how long each took to be served.
async fn rotations(
    ctx: &Ctx,
    first: &Stored,
    ports: &[u16],
) -> anyhow::Result<(Duration, Duration)> {
    let asked = Instant::now();
    rotate(ctx, false)?;
    let rotated = eventually(
        Duration::from_secs(20),
        "a new certificate in the Secret",
        || async {
            let now = stored(ctx).await?;
            Ok((now.cert != first.cert).then_some(now))
        },
    )
    .await?;
    ensure!(
        rotated.ca == first.ca,
        "the CA changed with a serving-certificate rotation"
    );
    all_serve(
        ports,
        &rotated.ca,
        &rotated.cert,
        "both replicas serving the new certificate",
    )
    .await?;
    let serving = asked.elapsed();

    // A new CA: trusted first (two CAs in the Secret and the caBundles), served only later.
    let asked = Instant::now();
    rotate(ctx, true)?;
    let staged = eventually(Duration::from_secs(20), "the new CA staged", || async {
        let now = stored(ctx).await?;
        Ok((now.ca.matches("BEGIN CERTIFICATE").count() == 2).then_some(now))
    })
    .await?;
    ensure!(
        staged.cert == rotated.cert,
        "served from the new CA before it was trusted"
    );
    ensure!(
        staged.ca.ends_with(&rotated.ca),
        "the old CA left the bundle"
    );
    eventually(
        Duration::from_secs(10),
        "both caBundles holding both CAs",
        || async {
            Ok(ca_bundles(ctx)
                .await?
                .iter()
                .all(|b| b.as_deref() == Some(staged.ca.as_str()))
                .then_some(()))
        },
    )
    .await?;
    let done = eventually(
        Duration::from_secs(CA_PROPAGATION + 20),
        "a certificate of the new CA in the Secret",
        || async {
            let now = stored(ctx).await?;
            Ok((now.cert != staged.cert).then_some(now))
        },
    )
    .await?;
    let new_ca = &staged.ca[..staged.ca.len() - rotated.ca.len()];
    all_serve(
        ports,
        new_ca,
        &done.cert,
        "both replicas serving a certificate of the new CA",
    )
    .await?;
    Ok((serving, asked.elapsed()))
}

async fn rotate_under_load(
    ctx: &mut Ctx,
    first: &Stored,
    primary: u16,
    replica: u16,
) -> anyhow::Result<()> {
    let want = first_der(&first.cert)?;
    eventually(
        Duration::from_secs(30),
        "the second replica serving the same certificate",
        || {
            let (ca, want) = (first.ca.clone(), want.clone());
            async move {
                Ok(served_certificate(replica, &ca)
                    .ok()
                    .filter(|c| *c == want)
                    .map(|_| ()))
            }
        },
    )
    .await?;

    let ns = ctx
        .namespace(
            "certs",
            &[
                ("bulwark.io/pod-rate", "1000/s"),
                ("bulwark.io/pod-burst", "1000"),
            ],
        )
        .await?;
    let load = SteadyLoad::start(ctx.pods(&ns), "steady", Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let result = rotations(ctx, first, &[primary, replica]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed, errors) = load.finish().await?;
    let (serving, ca) = result?;
    ensure!(
        failed == 0,
        "{failed} of {} creations failed: {errors:?}",
        ok + failed
    );
    ensure!(ok >= 40, "only {ok} pods created during the rotations");
    println!(
        "    serving rotation asked -> both replicas serving it: {:.1}s; CA rotation asked -> both serving a certificate of the new CA: {:.1}s (propagation {CA_PROPAGATION}s); {ok} pods created meanwhile, 0 failed",
        serving.as_secs_f64(),
        ca.as_secs_f64()
    );
    Ok(())
}

pub async fn replicas_share_the_namespace_rate(ctx: &mut Ctx) -> anyhow::Result<()> {
    let replicas = |ctx: &Ctx| ctx.metric("bulwark_rate_share_replicas", &[]);
    ensure!(replicas(ctx)? == 1.0, "shared before any replica was seen");
    // Two ready replicas behind the webhook's Service, as the EndpointSlice controller would
    // publish them (the e2e webhook itself is reached by URL).
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "bulwark-webhook", "namespace": BULWARK_NAMESPACE},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 8443}]}
    }))?;
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "bulwark-webhook-e2e", "namespace": BULWARK_NAMESPACE, "labels": {
            "kubernetes.io/service-name": "bulwark-webhook",
            "endpointslice.kubernetes.io/managed-by": "bulwark-e2e"
        }},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false}}
        ],
        "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}]
    }))?;
    let services = Api::<k8s_openapi::api::core::v1::Service>::namespaced(
        ctx.client.clone(),
        BULWARK_NAMESPACE,
    );
    let slices = Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(
        ctx.client.clone(),
        BULWARK_NAMESPACE,
    );
    services.create(&Default::default(), &service).await?;
    slices.create(&Default::default(), &slice).await?;
    let result = shared_rate_body(ctx, &replicas).await;
    slices
        .delete("bulwark-webhook-e2e", &Default::default())
        .await?;
    services
        .delete("bulwark-webhook", &Default::default())
        .await?;
    eventually(
        Duration::from_secs(10),
        "the rate back to one replica",
        || async { Ok((replicas(ctx)? == 1.0).then_some(())) },
    )
    .await?;
    result
}

async fn shared_rate_body(
    ctx: &mut Ctx,
    replicas: &impl Fn(&Ctx) -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(10),
        "two ready replicas seen",
        || async { Ok((replicas(ctx)? == 2.0).then_some(())) },
    )
    .await?;
    let ns = ctx
        .namespace(
            "shared",
            &[
                ("bulwark.io/pod-rate", "1/m"),
                ("bulwark.io/pod-burst", "4"),
            ],
        )
        .await?;
    let mut admitted = 0;
    let mut message = String::new();
    for i in 0..4 {
        match ctx.create(&ns, &pod(&format!("p{i}"), json!({}))).await? {
            crate::support::Created::Pod(_) => admitted += 1,
            crate::support::Created::Refused(s) => message = s.message,
        }
    }
    ensure!(
        admitted == 2,
        "{admitted} of 4 admitted; this replica's share of burst 4 among 2 is 2"
    );
    ensure!(
        message.contains("1/m (burst 4)"),
        "the refusal should name the namespace's limit: {message}"
    );
    println!("    2 ready replicas: this one admitted 2 of a burst of 4, then refused: {message}");
    Ok(())
}
