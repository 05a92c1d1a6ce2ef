//! What an install is made of: the deploy/ manifests and Helm chart against the real API
//! server, and least-privilege RBAC.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail, ensure};
use bulwark_e2e::{
    cluster::{cert_manager_crds, deploy_dir, prometheus_operator_crds},
    objects::BULWARK_NAMESPACE,
    pki::{Identity, kubeconfig_path},
};
use serde_json::{Value, json};

use crate::support::{Ctx, eventually};

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
        ("kustomize monitoring", "overlays/monitoring"),
        (
            "kustomize removal-delete-node",
            "overlays/removal-delete-node",
        ),
        (
            "kustomize removal-cluster-api",
            "overlays/removal-cluster-api",
        ),
        ("kustomize mtls", "overlays/mtls"),
        ("kustomize hold", "overlays/hold"),
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
        (
            "helm monitoring",
            Some(
                "monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true,\
                 monitoring.grafanaDashboard.enabled=true",
            ),
        ),
        (
            "helm removal=delete-node",
            Some("nodeController.removal=delete-node"),
        ),
        (
            "helm removal=cluster-api",
            Some("nodeController.removal=cluster-api"),
        ),
        ("helm clientAuth", Some("webhook.clientAuth.enabled=true")),
        ("helm hold", Some("hold.enabled=true")),
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
    // The cert-manager overlay needs cert-manager's CRDs, the monitoring ones
    // prometheus-operator's (the real ones, from their modules).
    for crd in cert_manager_crds()?
        .into_iter()
        .chain(prometheus_operator_crds()?)
    {
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
                "crd/servicemonitors.monitoring.coreos.com",
                "crd/prometheusrules.monitoring.coreos.com",
            ],
            None,
        )
        .await?;
    ensure!(
        out.success,
        "cert-manager and prometheus-operator CRDs: {}",
        out.stderr
    );

    let (kustomize, helm) = renderings(ctx).await?;
    for r in kustomize.iter().chain(&helm) {
        let objs = objects(r)?;
        let containers = check_workloads(r, &objs)?;
        // The webhook, the node controller and (with self-managed certificates) bulwark-cabundle.
        let expected = if r.name.contains("cert-manager") || r.name.contains("certManager") {
            2
        } else {
            3
        };
        ensure!(
            containers == expected,
            "{}: {containers} containers",
            r.name
        );
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

/// Whether the component may do what `line` says (`kubectl auth can-i` arguments). A
/// resource of Cluster API's group goes to a SubjectAccessReview instead: `can-i` checks a
/// resource the cluster does not serve (no Cluster API here) in the core group.
async fn may(ctx: &Ctx, who: Identity, line: &str) -> anyhow::Result<bool> {
    let args: Vec<&str> = line.split_whitespace().collect();
    let Some((resource, group)) = args
        .get(1)
        .and_then(|r| r.split_once('.'))
        .filter(|(_, g)| *g == "cluster.x-k8s.io")
    else {
        return can_i(ctx, who, &args).await;
    };
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let namespace = args
        .iter()
        .position(|a| *a == "-n")
        .and_then(|i| args.get(i + 1))
        .map(|n| (*n).to_owned());
    let user = who
        .impersonates()
        .context("not a ServiceAccount identity")?;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{BULWARK_NAMESPACE}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: args.first().map(|v| (*v).to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                namespace,
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = kube::Api::<SubjectAccessReview>::all(ctx.client.clone())
        .create(&Default::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

pub async fn rbac_is_least_privilege(ctx: &mut Ctx) -> anyhow::Result<()> {
    // The components really act as their ServiceAccounts (so every other test that works
    // shows the grants are enough).
    for who in [
        Identity::Webhook,
        Identity::NodeController,
        Identity::Cabundle,
    ] {
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
    use Identity::{Cabundle as C, NodeController as N, Webhook as W};
    // (who, `kubectl auth can-i` arguments, allowed); $NS is bulwark's namespace.
    let cases: &[(Identity, &str, bool)] = &[
        (W, "watch pods -A", true),
        (W, "create events.events.k8s.io -n default", true),
        (W, "update secret/bulwark-webhook-tls -n $NS", true),
        // The webhook reads its configurations but cannot rewrite them (their rules included).
        (W, "get validatingwebhookconfigurations/bulwark", true),
        (W, "update validatingwebhookconfigurations/bulwark", false),
        (W, "update mutatingwebhookconfigurations/bulwark", false),
        (W, "patch mutatingwebhookconfigurations/bulwark", false),
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
        // Hold mode's releaser (deploy/components/hold, applied in this cluster): it removes
        // the gate, and holds its own Lease only.
        (W, "patch pods -n default", true),
        (W, "update lease/bulwark-releaser -n $NS", true),
        (W, "update lease/bulwark-node-controller -n $NS", false),
        (N, "update nodes", true),
        (N, "patch nodes", false),
        // annotate and exec need no more; deleting nodes or annotating Machines comes with the
        // overlay of that removal mode only (checked below).
        (N, "delete nodes", false),
        (N, "patch machines.cluster.x-k8s.io -A", false),
        (N, "list machines.cluster.x-k8s.io -A", false),
        (N, "watch leases -n kube-node-lease", true),
        (N, "update lease/bulwark-node-controller -n $NS", true),
        // bulwark-cabundle: the caBundle's only writer, reading only the certificate Secret.
        (C, "update validatingwebhookconfigurations/bulwark", true),
        (C, "update mutatingwebhookconfigurations/bulwark", true),
        (C, "update validatingwebhookconfigurations/other", false),
        (C, "create validatingwebhookconfigurations", false),
        (C, "delete mutatingwebhookconfigurations/bulwark", false),
        (C, "get secret/bulwark-webhook-tls -n $NS", true),
        (C, "update secret/bulwark-webhook-tls -n $NS", false),
        (C, "get secrets -n $NS", false),
        (C, "create pods -n default", false),
        (N, "update lease/other -n $NS", false),
        (N, "update leases -n kube-node-lease", false),
        (N, "get secrets -A", false),
        (N, "create pods -n default", false),
        (N, "delete pods -n default", false),
    ];
    for (who, line, want) in cases {
        let line = line.replace("$NS", ns);
        let got = may(ctx, *who, &line).await?;
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
    let mut checks = cases.len();
    // Each removal mode's overlay adds exactly the grant that mode needs.
    use RemovalMode::{ClusterApi, DeleteNode};
    let per_mode: &[(RemovalMode, &str, bool)] = &[
        (DeleteNode, "delete nodes", true),
        (DeleteNode, "patch machines.cluster.x-k8s.io -A", false),
        (DeleteNode, "delete pods -n default", false),
        (ClusterApi, "list machines.cluster.x-k8s.io -A", true),
        (
            ClusterApi,
            "patch machines.cluster.x-k8s.io -n capi-system",
            true,
        ),
        (ClusterApi, "delete machines.cluster.x-k8s.io -A", false),
        (ClusterApi, "delete nodes", false),
    ];
    for mode in [DeleteNode, ClusterApi] {
        let grant = RemovalGrant::apply(ctx, mode).await?;
        let result = async {
            for (_, line, want) in per_mode.iter().filter(|(m, ..)| *m == mode) {
                // RBAC's authorizer sees a new binding within moments, not at once.
                eventually(
                    Duration::from_secs(10),
                    &format!("{mode:?}: can {line} = {want}"),
                    || async { Ok((may(ctx, N, line).await? == *want).then_some(())) },
                )
                .await?;
            }
            anyhow::Ok(())
        }
        .await;
        grant.remove(ctx).await?;
        result?;
    }
    checks += per_mode.len();
    println!("    {checks} permission checks as the ServiceAccounts");
    Ok(())
}

/// A removal mode whose overlay grants the node controller more than deploy/base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalMode {
    DeleteNode,
    ClusterApi,
}

/// The extra RBAC of a removal mode's overlay, applied as an install of that overlay has it.
pub struct RemovalGrant(String);

impl RemovalGrant {
    pub async fn apply(ctx: &Ctx, mode: RemovalMode) -> anyhow::Result<RemovalGrant> {
        let dir = match mode {
            RemovalMode::DeleteNode => "overlays/removal-delete-node",
            RemovalMode::ClusterApi => "overlays/removal-cluster-api",
        };
        let file = deploy_dir()
            .join(dir)
            .join("rbac.yaml")
            .display()
            .to_string();
        let out = ctx.kubectl(&["apply", "-f", &file], None).await?;
        ensure!(out.success, "applying {file}: {}", out.stderr);
        Ok(RemovalGrant(file))
    }

    pub async fn remove(self, ctx: &Ctx) -> anyhow::Result<()> {
        let out = ctx.kubectl(&["delete", "-f", &self.0], None).await?;
        ensure!(out.success, "deleting {}: {}", self.0, out.stderr);
        Ok(())
    }
}
