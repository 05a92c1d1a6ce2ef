//! What a pod creation meets at the webhook: defaulted requests and limits, the shape of a
//! refusal (HTTP 429, Retry-After, the message), kubectl retrying and then giving up,
//! annotation changes taking effect, and invalid annotations warned about.

use std::time::Duration;

use anyhow::{Context, ensure};
use bulwark_e2e::cluster::DEFAULTED_ANNOTATION;
use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::{Api, api::ListParams};
use serde_json::json;

use crate::support::{
    Ctx, eventually, kubectl_run_while_blocked, pairs, pod, resources, until_decision,
};

const VALIDATE_DENIED: &str = "admission webhook \"validate.bulwark.io\" denied the request: ";

pub async fn defaults_are_injected(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace(
            "defaults",
            &[
                ("bulwark.io/default-requests", "cpu=250m,memory=256Mi"),
                ("bulwark.io/default-limits", "cpu=2,memory=1Gi"),
            ],
        )
        .await?;
    let pause = "registry.k8s.io/pause:3.10";
    let p = pod(
        "mixed",
        json!({"spec": {
            "initContainers": [{"name": "init", "image": pause}],
            "containers": [
                {"name": "work", "image": pause},
                {"name": "capped", "image": pause, "resources": {"limits": {"cpu": "100m"}}},
            ],
        }}),
    );
    ctx.create(&ns, &p).await?.admitted()?;
    // Read back from the API server: what was stored, not what the webhook answered.
    let stored = ctx.pods(&ns).get("mixed").await?;
    let full = (
        pairs(&[("cpu", "250m"), ("memory", "256Mi")]),
        pairs(&[("cpu", "2"), ("memory", "1Gi")]),
    );
    assert_eq!(resources(&stored, "work"), full, "container work");
    assert_eq!(resources(&stored, "init"), full, "init container");
    // A defaulted request never exceeds the limit the pod already has.
    assert_eq!(
        resources(&stored, "capped"),
        (
            pairs(&[("cpu", "100m"), ("memory", "256Mi")]),
            pairs(&[("cpu", "100m"), ("memory", "1Gi")]),
        ),
        "container with its own cpu limit"
    );
    let note = stored
        .metadata
        .annotations
        .unwrap_or_default()
        .get(DEFAULTED_ANNOTATION)
        .cloned()
        .context("no bulwark.io/defaulted annotation")?;
    for c in ["work", "init", "capped"] {
        ensure!(
            note.contains(&format!("{c}: ")),
            "annotation {note:?} misses {c}"
        );
    }

    // What a user sees when kubectl creates such a pod.
    let out = ctx
        .kubectl(&["-n", &ns, "run", "plain", "--image", pause], None)
        .await?;
    ensure!(out.success, "kubectl run failed: {}", out.stderr);
    ensure!(
        out.stderr.contains(&format!(
            "Warning: bulwark: container \"plain\": set requests.cpu=250m,requests.memory=256Mi,limits.cpu=2,limits.memory=1Gi (defaults of namespace \"{ns}\")"
        )),
        "kubectl stderr: {}",
        out.stderr
    );
    Ok(())
}

pub async fn refusal_is_429_with_retry_after(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("refusal", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("first", json!({})))
        .await?
        .admitted()?;

    // A raw request, to see the HTTP status and headers kube-apiserver sends.
    let body = serde_json::to_vec(&pod("second", json!({})))?;
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods"))
        .header("content-type", "application/json")
        .body(kube::client::Body::from(body))?;
    let resp = ctx.client.send(req).await?;
    assert_eq!(resp.status().as_u16(), 429, "HTTP status");
    let header: u32 = resp
        .headers()
        .get("retry-after")
        .context("no Retry-After header")?
        .to_str()?
        .parse()
        .context("Retry-After is not whole seconds")?;
    // maxRetryAfterSeconds is 1 in the e2e cluster; jitter spreads it up to 1.5x.
    ensure!((1..=2).contains(&header), "Retry-After {header}");
    let bytes = resp.into_body().collect_bytes().await?;
    let status: kube::core::Status = serde_json::from_slice(&bytes)?;
    assert_eq!(status.code, 429);
    assert_eq!(status.reason, "TooManyRequests");
    assert_eq!(
        status.details.as_ref().map(|d| d.retry_after_seconds),
        Some(header),
        "details.retryAfterSeconds equals the header"
    );
    let want = format!(
        "{VALIDATE_DENIED}namespace \"{ns}\" has 1 live pod, at its limit of 1; retry in {header}s, when some finish (annotation bulwark.io/max-pods)"
    );
    assert_eq!(status.message, want);
    Ok(())
}

pub async fn kubectl_retries_until_capacity_returns(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("retry", &[("bulwark.io/max-pending-pods", "1")])
        .await?;
    let out = kubectl_run_while_blocked(ctx, &ns).await?;
    ensure!(
        out.success,
        "kubectl run failed after {:?}: {}",
        out.took,
        out.stderr
    );
    ensure!(
        out.stdout.contains("pod/later created"),
        "stdout: {}",
        out.stdout
    );
    let retries = out.stderr.matches("Got a Retry-After response").count();
    ensure!(retries >= 1, "kubectl did not retry: {}", out.stderr);
    println!(
        "    kubectl waited {:.1}s over {retries} Retry-After answers, then created the pod",
        out.took.as_secs_f64()
    );
    ctx.pods(&ns).get("later").await?;
    Ok(())
}

pub async fn kubectl_prints_the_refusal_when_capacity_stays_gone(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("full", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("only", json!({}))).await?.admitted()?;
    let out = ctx
        .kubectl(
            &[
                "-n",
                &ns,
                "run",
                "extra",
                "--image",
                "registry.k8s.io/pause:3.10",
            ],
            None,
        )
        .await?;
    ensure!(!out.success, "kubectl run succeeded: {}", out.stdout);
    let line = out
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let prefix = format!(
        "Error from server (TooManyRequests): {VALIDATE_DENIED}namespace \"{ns}\" has 1 live pod, at its limit of 1; retry in "
    );
    ensure!(
        line.starts_with(&prefix)
            && line.ends_with("s, when some finish (annotation bulwark.io/max-pods)"),
        "kubectl printed: {line}"
    );
    // client-go retried (10 times, 1-2 s each) before giving up.
    ensure!(
        out.took >= Duration::from_secs(9),
        "gave up after {:?}",
        out.took
    );
    println!(
        "    kubectl gave up after {:.1}s: {line}",
        out.took.as_secs_f64()
    );
    Ok(())
}

pub async fn annotation_changes_apply_within_a_second(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("tune", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("one", json!({}))).await?.admitted()?;
    ctx.dry_run(&ns, &pod("two", json!({}))).await?.refused()?;
    ctx.annotate(&ns, "bulwark.io/max-pods", "3").await?;
    let raised = until_decision(ctx, &ns, true, Duration::from_secs(1)).await?;
    ctx.annotate(&ns, "bulwark.io/max-pods", "1").await?;
    let lowered = until_decision(ctx, &ns, false, Duration::from_secs(1)).await?;
    println!(
        "    raise seen in {} ms, lowering in {} ms",
        raised.as_millis(),
        lowered.as_millis()
    );
    Ok(())
}

pub async fn invalid_annotation_warns_and_keeps_defaults(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("typo", &[("bulwark.io/pod-rate", "fast")])
        .await?;
    let out = ctx
        .kubectl(
            &[
                "-n",
                &ns,
                "run",
                "p",
                "--image",
                "registry.k8s.io/pause:3.10",
            ],
            None,
        )
        .await?;
    ensure!(out.success, "kubectl run failed: {}", out.stderr);
    ensure!(
        out.stderr.lines().any(|l| l.starts_with("Warning: ")
            && l.contains("annotation bulwark.io/pod-rate=\"fast\" is invalid")
            && l.contains("using the default")),
        "no warning about the annotation: {}",
        out.stderr
    );
    let stored = ctx.pods(&ns).get("p").await?;
    assert_eq!(
        resources(&stored, "p"),
        (
            pairs(&[("cpu", "100m"), ("memory", "128Mi")]),
            pairs(&[("cpu", "1"), ("memory", "512Mi")]),
        ),
        "built-in defaults apply"
    );
    let events: Api<CoreEvent> = Api::all(ctx.client.clone());
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=Namespace,involvedObject.name={ns},reason=InvalidAnnotation"
    ));
    let event = eventually(
        Duration::from_secs(10),
        "the InvalidAnnotation Event",
        || {
            let events = events.clone();
            let lp = lp.clone();
            async move { Ok(events.list(&lp).await?.items.into_iter().next()) }
        },
    )
    .await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.message.unwrap_or_default();
    ensure!(
        note.contains("bulwark.io/pod-rate"),
        "event message: {note}"
    );
    Ok(())
}

/// kube-apiserver's count of calls to the mutating webhook.
async fn mutate_calls(ctx: &Ctx) -> anyhow::Result<f64> {
    ctx.apiserver_metric(
        "apiserver_admission_webhook_admission_duration_seconds_count",
        &[("name", "mutate.bulwark.io")],
    )
    .await
}

/// The mutating webhook's matchConditions: a pod with every request and limit bulwark would
/// set is not sent to it at all, and one without resources still is, and is defaulted.
pub async fn fully_specified_pods_skip_the_mutating_call(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("skip-mutate", &[]).await?;
    let pause = "registry.k8s.io/pause:3.10";
    let full = json!({
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"cpu": "200m", "memory": "128Mi"},
    });
    let complete = pod(
        "complete",
        json!({"spec": {
            "initContainers": [{"name": "init", "image": pause, "resources": full}],
            "containers": [{"name": "work", "image": pause, "resources": full}],
        }}),
    );
    let before = mutate_calls(ctx).await?;
    ctx.create(&ns, &complete).await?.admitted()?;
    let after = mutate_calls(ctx).await?;
    ensure!(
        after == before,
        "a fully specified pod was sent to the mutating webhook ({before} -> {after} calls)"
    );
    let stored = ctx.pods(&ns).get("complete").await?;
    let annotations = stored.metadata.annotations.unwrap_or_default();
    ensure!(
        !annotations.contains_key(DEFAULTED_ANNOTATION),
        "not defaulted: {annotations:?}"
    );

    // Its init container lacks a memory limit: called, and defaulted.
    let partial = pod(
        "partial",
        json!({"spec": {
            "initContainers": [{"name": "init", "image": pause,
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "200m"}}}],
            "containers": [{"name": "work", "image": pause, "resources": full}],
        }}),
    );
    ctx.create(&ns, &partial).await?.admitted()?;
    let called = mutate_calls(ctx).await?;
    ensure!(
        called == after + 1.0,
        "{after} -> {called} calls for a pod lacking a limit"
    );
    let stored = ctx.pods(&ns).get("partial").await?;
    let note = stored
        .metadata
        .annotations
        .unwrap_or_default()
        .get(DEFAULTED_ANNOTATION)
        .cloned()
        .context("the partial pod was not defaulted")?;
    ensure!(note == "init:init: limits.memory=512Mi", "{note}");
    Ok(())
}
