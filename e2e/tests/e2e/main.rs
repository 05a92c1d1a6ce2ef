//! End-to-end tests: bulwark registered in a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok nodes), driven with kube-rs and kubectl.
//!
//! One cluster serves every test, so this binary runs its own small harness: bring the
//! cluster up, run the tests one after another (several of them change cluster-wide state:
//! node cordons, the API server's life), bring it down whatever happened. Arguments filter
//! tests by substring, like libtest; `--list` lists them.
//!
//! This file is the harness and the list of tests; the tests live in the modules below, by
//! what they exercise.

mod admission;
mod callers;
mod cert_rotation;
mod certs;
mod deploy;
mod faults;
mod hold;
mod node_controllers;
mod nodes;
mod operators;
mod quotas;
mod rate_sharing;
mod refusal_forms;
mod support;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    process::ExitCode,
    time::{Duration, Instant},
};

use admission::{
    annotation_changes_apply_within_a_second, defaults_are_injected,
    fully_specified_pods_skip_the_mutating_call, invalid_annotation_warns_and_keeps_defaults,
    kubectl_prints_the_refusal_when_capacity_stays_gone, kubectl_retries_until_capacity_returns,
    refusal_is_429_with_retry_after,
};
use bulwark_e2e::{Cluster, Options};
use callers::{
    a_tenants_system_critical_pod_is_throttled_like_any_other,
    forged_reviews_are_refused_and_consume_nothing,
    thousands_of_idle_connections_leave_pod_creation_working,
};
use cert_rotation::self_managed_certificates_rotate_without_failed_admissions;
use certs::{
    a_dropped_ca_bundle_is_restored, certs_cli_sets_the_ca_bundle,
    only_the_api_server_may_send_reviews,
};
use deploy::{
    deploy_manifests_are_accepted_by_the_api_server, kustomize_and_helm_render_the_same_objects,
    rbac_is_least_privilege,
};
use faults::{
    a_failing_watch_opens_count_quotas_after_the_limit, watches_resume_after_apiserver_restart,
    webhook_restart_under_load_loses_no_admission,
};
use futures::FutureExt;
use hold::{
    a_job_over_the_pending_cap_is_held_and_completes_without_a_refusal,
    a_started_workflows_pods_are_released_before_a_new_workflows,
    a_webhook_restarted_mid_line_loses_and_duplicates_nothing,
    held_pods_go_when_the_namespace_stops_holding_and_other_gates_stay,
};
use node_controllers::{
    delete_node_removal_deletes_the_node, dry_run_changes_nothing, exec_removal_runs_the_command,
    leadership_fails_over, removals_stay_spaced_across_a_leader_change,
};
use nodes::{
    many_unhealthy_nodes_hold_remediation, stale_lease_taints_the_node,
    unhealthy_node_is_tainted_marked_and_restored,
};
use operators::{
    a_burst_of_refusals_makes_few_throttled_events,
    a_namespace_reader_gets_its_row_and_a_clear_error_for_all,
    kubectl_bulwark_status_explains_a_throttled_job, monitoring_checks_and_metrics_served,
};
use quotas::{
    cluster_pending_cap_follows_schedulable_nodes, dry_run_consumes_nothing,
    exempt_namespaces_and_critical_pods, job_of_300_completes_under_pending_cap,
    max_pending_counts_unscheduled_pods, max_pods_counts_live_pods, started_workflows_go_first,
};
use rate_sharing::replicas_hold_one_limit_however_calls_are_spread;
use refusal_forms::controllers_are_refused_without_retry_after;
use support::Ctx;

type TestFn = for<'a> fn(&'a mut Ctx) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|ctx| Box::pin($name(ctx))) as TestFn)),*]
    };
}

fn tests() -> Vec<(&'static str, TestFn)> {
    suite![
        defaults_are_injected,
        fully_specified_pods_skip_the_mutating_call,
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
        forged_reviews_are_refused_and_consume_nothing,
        thousands_of_idle_connections_leave_pod_creation_working,
        a_tenants_system_critical_pod_is_throttled_like_any_other,
        replicas_hold_one_limit_however_calls_are_spread,
        webhook_restart_under_load_loses_no_admission,
        a_failing_watch_opens_count_quotas_after_the_limit,
        rbac_is_least_privilege,
        deploy_manifests_are_accepted_by_the_api_server,
        kustomize_and_helm_render_the_same_objects,
        job_of_300_completes_under_pending_cap,
        controllers_are_refused_without_retry_after,
        a_job_over_the_pending_cap_is_held_and_completes_without_a_refusal,
        held_pods_go_when_the_namespace_stops_holding_and_other_gates_stay,
        a_started_workflows_pods_are_released_before_a_new_workflows,
        a_webhook_restarted_mid_line_loses_and_duplicates_nothing,
        kubectl_bulwark_status_explains_a_throttled_job,
        a_namespace_reader_gets_its_row_and_a_clear_error_for_all,
        a_burst_of_refusals_makes_few_throttled_events,
        monitoring_checks_and_metrics_served,
        unhealthy_node_is_tainted_marked_and_restored,
        stale_lease_taints_the_node,
        many_unhealthy_nodes_hold_remediation,
        dry_run_changes_nothing,
        exec_removal_runs_the_command,
        delete_node_removal_deletes_the_node,
        leadership_fails_over,
        removals_stay_spaced_across_a_leader_change,
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
