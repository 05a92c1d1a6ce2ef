//! The two forms of a refusal, as kube-apiserver's audit log records them: controllers that
//! queue their own work (the Job controller, the config's `queueingClients`) are refused
//! without `retryAfterSeconds`, so client-go does not sleep inside their create calls; kubectl
//! and other clients still get `Retry-After` and wait it out.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bulwark_e2e::cluster::free_port;
use k8s_openapi::api::{batch::v1::Job, core::v1::ServiceAccount};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use serde_json::{Value, json};

use crate::{
    faults::{route_webhooks, wait_ready},
    support::{Ctx, eventually, job, job_succeeded, kubectl_run_while_blocked, metric_at, pod},
};

const JOB_CONTROLLER: &str = "system:serviceaccount:kube-system:job-controller";
/// The admin kubeconfig's user (the tests' kubectl and kube client).
const ADMIN: &str = "e2e-admin";

/// One pod creation kube-apiserver answered 429, from its audit log.
#[derive(Debug)]
pub(crate) struct Refusal {
    user: String,
    /// `responseStatus.details.retryAfterSeconds`: what became the `Retry-After` header.
    retry_after: Option<u64>,
}

/// The 429s to pod creations in `ns`, from every audit file (rotated ones too).
pub(crate) fn audited_refusals(ctx: &Ctx, ns: &str) -> anyhow::Result<Vec<Refusal>> {
    let log = ctx.state().audit_log();
    let dir = log.parent().context("audit log without a directory")?;
    let mut refusals = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(name.starts_with("audit") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // A line being written as we read is cut short: not an event yet.
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let object = &event["objectRef"];
            let status = &event["responseStatus"];
            if event["verb"] != "create"
                || object["resource"] != "pods"
                || object["namespace"] != ns
                || status["code"] != 429
            {
                continue;
            }
            // `kubectl --as` is recorded as the admin impersonating the user bulwark saw.
            let user = event["impersonatedUser"]["username"]
                .as_str()
                .or_else(|| event["user"]["username"].as_str())
                .unwrap_or_default();
            refusals.push(Refusal {
                user: user.to_owned(),
                retry_after: status["details"]["retryAfterSeconds"].as_u64(),
            });
        }
    }
    Ok(refusals)
}

/// Waits until the audit log holds at least one 429 in `ns` for `user`, then returns them all.
async fn refusals_of(ctx: &Ctx, ns: &str, user: &str) -> anyhow::Result<Vec<Refusal>> {
    eventually(
        Duration::from_secs(10),
        "the refusal in the audit log",
        || async {
            let mine: Vec<_> = audited_refusals(ctx, ns)?
                .into_iter()
                .filter(|r| r.user == user)
                .collect();
            Ok((!mine.is_empty()).then_some(mine))
        },
    )
    .await
}

pub async fn controllers_are_refused_without_retry_after(ctx: &mut Ctx) -> anyhow::Result<()> {
    job_controller_form(ctx).await?;
    kubectl_form(ctx).await?;
    queueing_client_form(ctx).await
}

/// A Job held back by max-pending-pods completes, and none of the 429s its controller got
/// carried Retry-After.
async fn job_controller_form(ctx: &mut Ctx) -> anyhow::Result<()> {
    const PODS: i32 = 40;
    let ns = ctx
        .namespace("queueing", &[("bulwark.io/max-pending-pods", "5")])
        .await?;
    let job = job("held", PODS, json!({}))?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let start = Instant::now();
    jobs.create(&PostParams::default(), &job).await?;
    eventually(Duration::from_secs(180), "the Job to complete", || async {
        Ok((job_succeeded(&jobs, "held").await? >= PODS).then_some(()))
    })
    .await?;
    let took = start.elapsed();
    let refusals = refusals_of(ctx, &ns, JOB_CONTROLLER).await?;
    let hinted: Vec<_> = refusals.iter().filter_map(|r| r.retry_after).collect();
    println!(
        "    Job of {PODS} pods under max-pending-pods 5: {:.1}s; the Job controller got {} 429s, {} with retryAfterSeconds",
        took.as_secs_f64(),
        refusals.len(),
        hinted.len()
    );
    ensure!(
        hinted.is_empty(),
        "{} of the Job controller's {} refusals carried retryAfterSeconds {hinted:?}: its workers slept in client-go's retry",
        hinted.len(),
        refusals.len()
    );
    Ok(())
}

/// kubectl, refused in the same cluster, still hears Retry-After and waits it out.
async fn kubectl_form(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("kubectl-form", &[("bulwark.io/max-pending-pods", "1")])
        .await?;
    let ctx = &*ctx;
    let out = kubectl_run_while_blocked(ctx, &ns).await?;
    ensure!(out.success, "kubectl run failed: {}", out.stderr);
    let retries = out.stderr.matches("Got a Retry-After response").count();
    ensure!(retries >= 1, "kubectl did not retry: {}", out.stderr);
    let refusals = refusals_of(ctx, &ns, ADMIN).await?;
    ensure!(
        refusals
            .iter()
            .all(|r| r.retry_after.is_some_and(|s| s >= 1)),
        "a refusal to kubectl without retryAfterSeconds: {refusals:?}"
    );
    println!(
        "    kubectl: {} 429s, each with retryAfterSeconds ({:?}); it retried {retries} times and created the pod after {:.1}s",
        refusals.len(),
        refusals
            .iter()
            .filter_map(|r| r.retry_after)
            .collect::<Vec<_>>(),
        out.took.as_secs_f64()
    );
    Ok(())
}

/// A ServiceAccount listed in `queueingClients` is refused without Retry-After; the admin,
/// not listed, still gets it from the same webhook.
async fn queueing_client_form(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("bots", &[("bulwark.io/max-pods", "1")])
        .await?;
    let bot = format!("system:serviceaccount:{ns}:bot");
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("bot".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    sas.create(&PostParams::default(), &sa).await?;
    let rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "pod-creator", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "bot-creates-pods", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-creator"},
         "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": ns}]},
    ]});
    let applied = ctx
        .kubectl(&["apply", "-f", "-"], Some(&rbac.to_string()))
        .await?;
    ensure!(applied.success, "RBAC for the bot: {}", applied.stderr);
    ctx.create(&ns, &pod("filler", json!({})))
        .await?
        .admitted()?;

    // The cluster's own config plus the bot, in a replica the registrations point at.
    let dir = ctx.state().dir.clone();
    let own = std::fs::read_to_string(dir.join("bulwark.yaml"))?;
    let config = dir.join("bulwark-queueing-clients.yaml");
    std::fs::write(&config, format!("{own}queueingClients: [{bot}]\n"))?;
    let (port, metrics) = (free_port()?, free_port()?);
    ctx.cluster.spawn_webhook_replica_with(
        "bulwark-webhook-queueing",
        port,
        &[
            &format!("--metrics-listen=127.0.0.1:{metrics}"),
            &format!("--config={}", config.display()),
        ],
    )?;
    let result = async {
        wait_ready(metrics, "the replica with queueingClients ready").await?;
        route_webhooks(ctx, &format!("https://127.0.0.1:{port}")).await?;
        queueing_client_body(ctx, &ns, &bot, metrics).await
    }
    .await;
    route_webhooks(ctx, &ctx.state().webhook_url()).await?;
    tokio::task::block_in_place(|| ctx.cluster.stop_named("bulwark-webhook-queueing", false));
    result
}

async fn queueing_client_body(ctx: &Ctx, ns: &str, bot: &str, metrics: u16) -> anyhow::Result<()> {
    let immediate = |port| {
        metric_at(
            port,
            "bulwark_refusal_forms_total",
            &[("form", "immediate")],
        )
    };
    let before = immediate(metrics)?;
    let as_bot = format!("--as={bot}");
    let out = ctx
        .kubectl(
            &[
                &as_bot,
                "-n",
                ns,
                "-v=4",
                "run",
                "bot-task",
                "--image",
                "registry.k8s.io/pause:3.10",
            ],
            None,
        )
        .await?;
    ensure!(!out.success, "the bot's pod was admitted: {}", out.stdout);
    ensure!(
        out.stderr.contains("(TooManyRequests)") && out.stderr.contains("at its limit of 1"),
        "the bot was not refused by bulwark: {}",
        out.stderr
    );
    ensure!(
        !out.stderr.contains("Got a Retry-After response"),
        "kubectl as the bot slept on a Retry-After: {}",
        out.stderr
    );
    let refusals = refusals_of(ctx, ns, bot).await?;
    ensure!(
        refusals.iter().all(|r| r.retry_after.is_none()),
        "a refusal to the listed bot carried retryAfterSeconds: {refusals:?}"
    );
    ensure!(
        immediate(metrics)? > before,
        "bulwark_refusal_forms_total{{form=\"immediate\"}} did not count the bot's refusal"
    );
    // The admin is not listed: the same webhook still hints when to come back.
    let admin = ctx
        .create(ns, &pod("admin-task", json!({})))
        .await?
        .refused()?;
    let hint = admin.details.as_ref().map(|d| d.retry_after_seconds);
    ensure!(
        hint.is_some_and(|s| s >= 1),
        "the admin's refusal carried no retryAfterSeconds: {admin:?}"
    );
    println!(
        "    queueingClients [{bot}]: refused at once in {:.1}s, {} 429s without retryAfterSeconds; the admin still gets retryAfterSeconds {}",
        out.took.as_secs_f64(),
        refusals.len(),
        hint.unwrap_or_default()
    );
    Ok(())
}
