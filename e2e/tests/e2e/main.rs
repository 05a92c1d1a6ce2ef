//! End-to-end tests: bulwark registered in a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok nodes), driven with kube-rs and kubectl.
//!
//! One cluster serves every test, so this binary runs its own small harness: bring the
//! cluster up, run the tests one after another (several of them change cluster-wide state:
//! node cordons, the API server's life), bring it down whatever happened. Arguments filter
//! tests by substring, like libtest; `--list` lists them.

mod deploy;
mod faults;
mod nodes;
mod support;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bulwark_e2e::{
    Cluster, Options,
    cluster::{Component, DEFAULTED_ANNOTATION},
};
use deploy::{
    a_dropped_ca_bundle_is_restored, certs_cli_sets_the_ca_bundle,
    deploy_manifests_are_accepted_by_the_api_server, kustomize_and_helm_render_the_same_objects,
    only_the_api_server_may_send_reviews, rbac_is_least_privilege,
    replicas_share_the_namespace_rate, self_managed_certificates_rotate_without_failed_admissions,
};
use faults::{
    a_failing_watch_opens_count_quotas_after_the_limit,
    webhook_restart_under_load_loses_no_admission,
};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event as CoreEvent, Node, Pod},
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use nodes::{
    delete_node_removal_deletes_the_node, dry_run_changes_nothing, exec_removal_runs_the_command,
    leadership_fails_over, many_unhealthy_nodes_hold_remediation, stale_lease_taints_the_node,
    unhealthy_node_is_tainted_marked_and_restored,
};
use serde_json::json;
use support::{Ctx, eventually, pod, unschedulable};

type TestFn = for<'a> fn(&'a mut Ctx) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|ctx| Box::pin($name(ctx))) as TestFn)),*]
    };
}

fn tests() -> Vec<(&'static str, TestFn)> {
    suite![
        defaults_are_injected,
        refusal_is_429_with_retry_after,
        kubectl_retries_until_capacity_returns,
        kubectl_prints_the_refusal_when_capacity_stays_gone,
        annotation_changes_apply_within_a_second,
        invalid_annotation_warns_and_keeps_defaults,
        max_pods_counts_live_pods,
        max_pending_counts_unscheduled_pods,
        cluster_pending_cap_follows_schedulable_nodes,
        started_workflows_go_first,
        dry_run_consumes_nothing,
        exempt_namespaces_and_critical_pods,
        self_managed_certificates_rotate_without_failed_admissions,
        a_dropped_ca_bundle_is_restored,
        certs_cli_sets_the_ca_bundle,
        only_the_api_server_may_send_reviews,
        replicas_share_the_namespace_rate,
        webhook_restart_under_load_loses_no_admission,
        a_failing_watch_opens_count_quotas_after_the_limit,
        rbac_is_least_privilege,
        deploy_manifests_are_accepted_by_the_api_server,
        kustomize_and_helm_render_the_same_objects,
        job_of_300_completes_under_pending_cap,
        unhealthy_node_is_tainted_marked_and_restored,
        stale_lease_taints_the_node,
        many_unhealthy_nodes_hold_remediation,
        dry_run_changes_nothing,
        exec_removal_runs_the_command,
        delete_node_removal_deletes_the_node,
        leadership_fails_over,
        // Last: it restarts kube-apiserver under everyone.
        watches_resume_after_apiserver_restart,
    ]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<_> = tests()
        .into_iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .collect();
    if args.iter().any(|a| a == "--list") {
        let names = selected.iter().map(|(name, _)| *name);
        for name in [FAILED_UP].into_iter().chain(names).chain([DOWN]) {
            if filters.is_empty() || filters.iter().any(|f| name.contains(f)) {
                println!("{name}: test");
            }
        }
        return ExitCode::SUCCESS;
    }
    bulwark_e2e::install_crypto();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&filters, selected)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const CLUSTER_DIR_PREFIX: &str = "bulwark-e2e-";

/// Clusters of earlier runs that were killed before they could stop them: their directory
/// names a test process that is gone. Stops what still runs and removes the directory.
fn reap_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CLUSTER_DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(mut stale) = Cluster::attach(&entry.path()) {
            stale.down();
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            println!(
                "removed the cluster of an earlier, interrupted run: {}",
                entry.path().display()
            );
        }
    }
}

/// Checks of the cluster tooling itself, run before and after the tests.
const FAILED_UP: &str = "failed_up_stops_what_it_started";
const DOWN: &str = "down_stops_every_process_and_frees_its_ports";

/// Results as they come, printed like libtest's.
#[derive(Default)]
struct Report {
    passed: usize,
    failed: Vec<&'static str>,
}

impl Report {
    fn record(&mut self, name: &'static str, took: Duration, result: Result<(), String>) {
        let took = took.as_secs_f64();
        match result {
            Ok(()) => {
                println!("test {name} ... ok ({took:.1}s)");
                self.passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED ({took:.1}s)\n    {e}");
                self.failed.push(name);
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}

/// A cluster whose `up` fails half-way (its webhook binary exits at once) must leave no
/// process behind.
async fn failed_up_stops_what_it_started(dir: &std::path::Path) -> Result<(), String> {
    let result = Cluster::up(&Options {
        dir: dir.to_path_buf(),
        nodes: 1,
        bulwark: Some("/bin/false".into()),
        ..Options::default()
    })
    .await;
    let err = match result {
        Ok(_) => return Err("up succeeded with a webhook that exits".into()),
        Err(e) => format!("{e:#}"),
    };
    if !err.contains("bulwark-webhook exited") {
        return Err(format!("unexpected error: {err}"));
    }
    let left = Cluster::processes_in(dir);
    let _ = std::fs::remove_dir_all(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("processes left running: {left:?}"))
    }
}

/// After `down`, no process of the cluster runs and every port it used is free again.
fn down_left_nothing(state: &bulwark_e2e::State) -> Result<(), String> {
    let left = Cluster::processes_in(&state.dir);
    if !left.is_empty() {
        return Err(format!("processes left running: {left:?}"));
    }
    let p = state.ports;
    for port in [
        p.etcd,
        p.etcd_peer,
        p.apiserver,
        p.webhook,
        p.webhook_metrics,
        p.kwok,
        p.scheduler,
    ] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("port {port} still taken: {e}"))?;
    }
    Ok(())
}

async fn run(filters: &[&str], selected: Vec<(&'static str, TestFn)>) -> anyhow::Result<bool> {
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    bulwark_e2e::cluster::build_bulwark()?;
    reap_stale_clusters();
    let base = format!("{CLUSTER_DIR_PREFIX}{}", std::process::id());
    let dir = std::env::temp_dir().join(&base);
    let start = Instant::now();
    let mut report = Report::default();

    if wanted(FAILED_UP) {
        let t0 = Instant::now();
        let scratch = std::env::temp_dir().join(format!("{base}-failed-up"));
        let result = failed_up_stops_what_it_started(&scratch).await;
        report.record(FAILED_UP, t0.elapsed(), result);
    }

    println!(
        "\nrunning {} end-to-end tests (cluster in {})",
        selected.len(),
        dir.display()
    );
    let t0 = Instant::now();
    let cluster = Cluster::up(&Options {
        dir: dir.clone(),
        nodes: 5,
        ..Options::default()
    })
    .await?;
    println!("cluster up in {:.1}s", t0.elapsed().as_secs_f64());
    let client = cluster.client().await?;
    let mut ctx = Ctx::new(cluster, client);
    for (name, test) in selected.iter() {
        let t0 = Instant::now();
        let outcome = AssertUnwindSafe(tokio::time::timeout(
            Duration::from_secs(300),
            test(&mut ctx),
        ))
        .catch_unwind()
        .await;
        let result = match outcome {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("{e:#}")),
            Ok(Err(_)) => Err("timed out after 300s".to_owned()),
            Err(panic) => Err(panic_message(panic.as_ref())),
        };
        let cleanup = ctx.cleanup().await;
        let result = result.and_then(|()| cleanup.map_err(|e| format!("cleaning up: {e:#}")));
        report.record(name, t0.elapsed(), result);
    }

    let mut cluster = ctx.cluster;
    let state = cluster.state.clone();
    let t0 = Instant::now();
    cluster.down();
    if wanted(DOWN) {
        report.record(DOWN, t0.elapsed(), down_left_nothing(&state));
    }

    let total = report.passed + report.failed.len();
    if report.failed.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "\ne2e result: ok. {total} passed in {:.1}s",
            start.elapsed().as_secs_f64()
        );
        Ok(true)
    } else {
        println!(
            "\ne2e result: FAILED. {} of {total} failed: {}; logs kept in {}",
            report.failed.len(),
            report.failed.join(", "),
            dir.join("logs").display()
        );
        Ok(false)
    }
}

const VALIDATE_DENIED: &str = "admission webhook \"validate.bulwark.io\" denied the request: ";

/// Resource names and quantities as written, e.g. `[("cpu", "100m")]`.
type Amounts = Vec<(String, String)>;

/// Requests and limits of a container.
fn resources(pod: &Pod, container: &str) -> (Amounts, Amounts) {
    let spec = pod.spec.clone().unwrap_or_default();
    let all = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let Some(c) = all.into_iter().find(|c| c.name == container) else {
        return (Vec::new(), Vec::new());
    };
    let flat = |m: Option<std::collections::BTreeMap<String, Quantity>>| -> Amounts {
        m.unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    };
    let r = c.resources.clone().unwrap_or_default();
    (flat(r.requests), flat(r.limits))
}

fn pairs(items: &[(&str, &str)]) -> Amounts {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn defaults_are_injected(ctx: &mut Ctx) -> anyhow::Result<()> {
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

async fn refusal_is_429_with_retry_after(ctx: &mut Ctx) -> anyhow::Result<()> {
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
        "{VALIDATE_DENIED}namespace \"{ns}\" has 1 live pods, at its limit of 1; retry in {header}s, when some finish (annotation bulwark.io/max-pods)"
    );
    assert_eq!(status.message, want);
    Ok(())
}

async fn kubectl_retries_until_capacity_returns(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("retry", &[("bulwark.io/max-pending-pods", "1")])
        .await?;
    ctx.create(&ns, &unschedulable("blocker"))
        .await?
        .admitted()?;
    let ctx = &*ctx;
    let args = [
        "-n",
        &ns,
        "-v=4",
        "run",
        "later",
        "--image",
        "registry.k8s.io/pause:3.10",
    ];
    let (out, deleted) = tokio::join!(ctx.kubectl(&args, None), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ctx.delete_pod(&ns, "blocker").await
    });
    deleted?;
    let out = out?;
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

async fn kubectl_prints_the_refusal_when_capacity_stays_gone(ctx: &mut Ctx) -> anyhow::Result<()> {
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
        "Error from server (TooManyRequests): {VALIDATE_DENIED}namespace \"{ns}\" has 1 live pods, at its limit of 1; retry in "
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

/// Polls dry-run creations until bulwark answers `admit`; returns how long that took.
async fn until_decision(
    ctx: &Ctx,
    ns: &str,
    admit: bool,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let probe = pod("probe", json!({}));
    eventually(limit, "bulwark's decision to change", || async {
        let created = ctx.dry_run(ns, &probe).await?;
        Ok((created.is_admitted() == admit).then_some(()))
    })
    .await?;
    Ok(start.elapsed())
}

async fn annotation_changes_apply_within_a_second(ctx: &mut Ctx) -> anyhow::Result<()> {
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

async fn invalid_annotation_warns_and_keeps_defaults(ctx: &mut Ctx) -> anyhow::Result<()> {
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

async fn max_pods_counts_live_pods(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("maxpods", &[("bulwark.io/max-pods", "3")])
        .await?;
    for name in ["a", "b", "c"] {
        ctx.create(&ns, &pod(name, json!({}))).await?.admitted()?;
    }
    let refused = ctx.create(&ns, &pod("d", json!({}))).await?.refused()?;
    ensure!(
        refused
            .message
            .contains("has 3 live pods, at its limit of 3"),
        "{}",
        refused.message
    );
    ctx.delete_pod(&ns, "a").await?;
    ctx.create_when_room(
        &ns,
        &pod("d", json!({})),
        Duration::from_secs(10),
        "room after a deletion",
    )
    .await?;
    Ok(())
}

async fn max_pending_counts_unscheduled_pods(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("maxpending", &[("bulwark.io/max-pending-pods", "3")])
        .await?;
    for i in 0..3 {
        ctx.create(&ns, &unschedulable(&format!("stuck-{i}")))
            .await?
            .admitted()?;
    }
    for candidate in [unschedulable("stuck-3"), pod("schedulable", json!({}))] {
        let refused = ctx.create(&ns, &candidate).await?.refused()?;
        ensure!(
            refused
                .message
                .contains("has 3 pods not yet running, at its limit of 3; retry in"),
            "{}",
            refused.message
        );
    }
    assert_eq!(ctx.pending(Some(&ns)).await?, 3);
    ctx.delete_pod(&ns, "stuck-0").await?;
    ctx.create_when_room(
        &ns,
        &unschedulable("stuck-3"),
        Duration::from_secs(10),
        "room after a deletion",
    )
    .await?;
    Ok(())
}

async fn set_cordon(ctx: &Ctx, node: &str, cordoned: bool) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"spec": {"unschedulable": cordoned}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("cordoning {node}"))?;
    Ok(())
}

async fn cluster_pending_cap_follows_schedulable_nodes(ctx: &mut Ctx) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(30),
        "no pending pods in the cluster",
        || async { Ok((ctx.pending(None).await? == 0).then_some(())) },
    )
    .await?;
    let nodes = ctx.state().nodes;
    for i in 1..nodes {
        set_cordon(ctx, &format!("kwok-node-{i}"), true).await?;
    }
    let result = cluster_cap_with_one_node(ctx).await;
    for i in 1..nodes {
        set_cordon(ctx, &format!("kwok-node-{i}"), false).await?;
    }
    result
}

async fn cluster_cap_with_one_node(ctx: &mut Ctx) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(5),
        "bulwark sees one schedulable node",
        || async { Ok((ctx.metric("bulwark_schedulable_nodes", &[])? == 1.0).then_some(())) },
    )
    .await?;
    let ns = ctx
        .namespace(
            "backlog",
            &[
                ("bulwark.io/max-pending-pods", "unlimited"),
                ("bulwark.io/pod-rate", "unlimited"),
                ("bulwark.io/max-pods", "unlimited"),
            ],
        )
        .await?;
    // pendingPerHealthyNode 30 x 1 schedulable node.
    for i in 0..30 {
        ctx.create(&ns, &unschedulable(&format!("wait-{i}")))
            .await?
            .admitted()?;
    }
    let refused = ctx
        .create(&ns, &unschedulable("wait-30"))
        .await?
        .refused()?;
    ensure!(
        refused.message.contains(
            "the cluster has 30 pods not yet running, at its limit of 30 (30 per schedulable node x 1 nodes)"
        ),
        "{}",
        refused.message
    );
    for i in 1..ctx.state().nodes {
        set_cordon(ctx, &format!("kwok-node-{i}"), false).await?;
    }
    ctx.create_when_room(
        &ns,
        &unschedulable("wait-30"),
        Duration::from_secs(5),
        "a larger cap once nodes return",
    )
    .await?;
    Ok(())
}

fn in_workflow(name: &str, workflow: &str) -> Pod {
    let mut p = unschedulable(name);
    p.metadata.labels = Some([("bulwark.io/workflow".to_owned(), workflow.to_owned())].into());
    p
}

async fn started_workflows_go_first(ctx: &mut Ctx) -> anyhow::Result<()> {
    // 20% of 10 (workflowReservedShare) is kept for workflows that already have pods.
    let ns = ctx
        .namespace("workflows", &[("bulwark.io/max-pending-pods", "10")])
        .await?;
    for i in 0..8 {
        ctx.create(&ns, &in_workflow(&format!("wf-{i}-0"), &format!("wf-{i}")))
            .await?
            .admitted()?;
    }
    let refused = ctx
        .create(&ns, &in_workflow("wf-8-0", "wf-8"))
        .await?
        .refused()?;
    ensure!(
        refused.message.contains(
            "the last 2 of its limit of 10 are kept for workflows already running, so new workflow bulwark.io/workflow=wf-8 waits"
        ),
        "{}",
        refused.message
    );
    ctx.create(&ns, &in_workflow("wf-0-1", "wf-0"))
        .await?
        .admitted()?;
    ctx.create(&ns, &in_workflow("wf-1-1", "wf-1"))
        .await?
        .admitted()?;
    let full = ctx
        .create(&ns, &in_workflow("wf-2-1", "wf-2"))
        .await?
        .refused()?;
    ensure!(
        full.message
            .contains("has 10 pods not yet running, at its limit of 10"),
        "{}",
        full.message
    );
    Ok(())
}

async fn dry_run_consumes_nothing(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace(
            "dryrun",
            &[
                ("bulwark.io/max-pods", "1"),
                ("bulwark.io/pod-rate", "1/m"),
                ("bulwark.io/pod-burst", "1"),
            ],
        )
        .await?;
    let manifest = serde_json::to_string(&pod("trial", json!({})))?;
    for _ in 0..5 {
        let out = ctx
            .kubectl(
                &[
                    "-n",
                    &ns,
                    "create",
                    "--dry-run=server",
                    "-o",
                    "json",
                    "-f",
                    "-",
                ],
                Some(&manifest),
            )
            .await?;
        ensure!(out.success, "dry run refused: {}", out.stderr);
        let answered: Pod = serde_json::from_str(&out.stdout)?;
        ensure!(
            resources(&answered, "work").0 == pairs(&[("cpu", "100m"), ("memory", "128Mi")]),
            "dry run not defaulted: {}",
            out.stdout
        );
    }
    // Five dry runs later the single rate token and the single pod slot are still there.
    ctx.create(&ns, &pod("real", json!({}))).await?.admitted()?;
    let refused = ctx
        .dry_run(&ns, &pod("trial", json!({})))
        .await?
        .refused()?;
    ensure!(
        refused.message.contains("at its limit of 1"),
        "{}",
        refused.message
    );
    Ok(())
}

async fn exempt_namespaces_and_critical_pods(ctx: &mut Ctx) -> anyhow::Result<()> {
    // kube-system is outside the webhooks' namespaceSelector: nothing is defaulted.
    let system = ctx
        .create("kube-system", &pod("bulwark-e2e-system", json!({})))
        .await?
        .admitted()?;
    let system_res = resources(&system, "work");
    ctx.delete_pod("kube-system", "bulwark-e2e-system").await?;
    ensure!(
        system_res == (Vec::new(), Vec::new()),
        "kube-system pod got {system_res:?}"
    );

    let ns = ctx
        .namespace("critical", &[("bulwark.io/max-pods", "1")])
        .await?;
    ctx.create(&ns, &pod("filler", json!({})))
        .await?
        .admitted()?;
    ctx.create(&ns, &pod("plain", json!({}))).await?.refused()?;
    ctx.create(
        &ns,
        &pod(
            "critical",
            json!({"spec": {"priorityClassName": "system-cluster-critical"}}),
        ),
    )
    .await?
    .admitted()?;

    let off = ctx.namespace("off", &[("bulwark.io/mode", "off")]).await?;
    let untouched = ctx
        .create(&off, &pod("free", json!({})))
        .await?
        .admitted()?;
    ensure!(
        resources(&untouched, "work") == (Vec::new(), Vec::new()),
        "mode=off pod was defaulted"
    );
    Ok(())
}

#[derive(Default)]
struct PendingWatch {
    pending: std::collections::HashSet<String>,
    max: usize,
}

fn is_pending(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
        == "Pending"
}

async fn job_of_300_completes_under_pending_cap(ctx: &mut Ctx) -> anyhow::Result<()> {
    const CAP: usize = 20;
    const PODS: i32 = 300;
    let ns = ctx
        .namespace("batch", &[("bulwark.io/max-pending-pods", "20")])
        .await?;
    let seen = Arc::new(Mutex::new(PendingWatch::default()));
    let watch = {
        let seen = seen.clone();
        let mut events = watcher(ctx.pods(&ns), watcher::Config::default()).boxed();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let Ok(mut s) = seen.lock() else { break };
                match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        let name = p.metadata.name.clone().unwrap_or_default();
                        if is_pending(&p) {
                            s.pending.insert(name);
                        } else {
                            s.pending.remove(&name);
                        }
                        s.max = s.max.max(s.pending.len());
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        s.pending.remove(&p.metadata.name.unwrap_or_default());
                    }
                    _ => {}
                }
            }
        })
    };
    let refusals_before = ctx.metric("bulwark_refusals_total", &[("reason", "max_pending")])?;
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "burst"},
        "spec": {
            "completions": PODS,
            "parallelism": PODS,
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "work", "image": "registry.k8s.io/pause:3.10"}],
            }},
        }
    }))?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let start = Instant::now();
    jobs.create(&PostParams::default(), &job).await?;
    let done = eventually(Duration::from_secs(240), "the Job to complete", || async {
        let j = jobs.get("burst").await?;
        let status = j.status.unwrap_or_default();
        if status.failed.unwrap_or(0) > 0 {
            bail!("Job has failed pods");
        }
        Ok((status.succeeded.unwrap_or(0) >= PODS).then_some(()))
    })
    .await;
    let took = start.elapsed();
    watch.abort();
    let max = seen.lock().map(|s| s.max).unwrap_or(usize::MAX);
    let refusals =
        ctx.metric("bulwark_refusals_total", &[("reason", "max_pending")])? - refusals_before;
    println!(
        "    Job of {PODS} pods: {:.1}s to complete, at most {max} pending (cap {CAP}), {refusals} creations refused for max-pending",
        took.as_secs_f64()
    );
    done?;
    ensure!(max <= CAP, "{max} pods were pending at once, cap {CAP}");
    ensure!(refusals > 0.0, "the cap never held the Job controller back");
    Ok(())
}

async fn watches_resume_after_apiserver_restart(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("restart", &[("bulwark.io/max-pending-pods", "2")])
        .await?;
    for name in ["held-0", "held-1"] {
        ctx.create(&ns, &unschedulable(name)).await?.admitted()?;
    }
    let restart = ctx
        .cluster
        .restart_apiserver(Duration::from_secs(5))
        .await?;
    let ready = restart.ready;
    println!(
        "    kube-apiserver: {:.1}s from SIGTERM to exit, down {:.1}s, ready again",
        (restart.stopped - restart.signalled).as_secs_f64(),
        (restart.ready - restart.stopped).as_secs_f64()
    );
    // The snapshot from before the restart still decides: the namespace is full.
    ctx.dry_run(&ns, &pod("probe", json!({})))
        .await?
        .refused()?;
    ctx.delete_pod(&ns, "held-0").await?;
    let deleted = Instant::now();
    let caught_up = until_decision(ctx, &ns, true, Duration::from_secs(45)).await?;
    println!(
        "    after the restart, decisions reflected a deletion {:.1}s later ({:.1}s after the API server was ready)",
        caught_up.as_secs_f64(),
        (deleted + caught_up - ready).as_secs_f64()
    );
    let log = std::fs::read_to_string(ctx.cluster.log(Component::Webhook))?;
    ensure!(
        log.contains("watch failed; retrying with back-off"),
        "the webhook never noticed the API server going away"
    );
    // And the webhook keeps counting correctly afterwards.
    ctx.create(&ns, &unschedulable("held-2"))
        .await?
        .admitted()?;
    ctx.create(&ns, &unschedulable("held-3")).await?.refused()?;
    Ok(())
}
