//! What an install is made of: the deploy/ manifests and Helm chart against the real API
//! server, and least-privilege RBAC.

use std::collections::BTreeMap;

use anyhow::{Context, bail, ensure};
use bulwark_e2e::{
    cluster::{cert_manager_crds, deploy_dir},
    objects::BULWARK_NAMESPACE,
    pki::{Identity, kubeconfig_path},
};
use serde_json::{Value, json};

use crate::support::Ctx;

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
        ("kustomize mtls", "overlays/mtls"),
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
        ("helm clientAuth", Some("webhook.clientAuth.enabled=true")),
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
