//! What an operator sees: `kubectl bulwark status` (the plugin on PATH) for a throttled
//! namespace and for a user who may read only one namespace, the Throttled Events kubectl
//! shows and how few a burst of refusals makes, and the monitoring manifests (promtool's
//! checks, and every metric they use served by the running webhook and node controller).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use bulwark_e2e::cluster::{deploy_dir, plain_get};
use futures::StreamExt;
use k8s_openapi::api::{batch::v1::Job, core::v1::Event as CoreEvent};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};

use crate::support::{Ctx, eventually, job, pod};

/// bulwark's Throttled Events in `ns`.
async fn throttled_events(ctx: &Ctx, ns: &str) -> anyhow::Result<Vec<CoreEvent>> {
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().fields("reason=Throttled");
    Ok(events.list(&lp).await?.items)
}

/// The refusals the Events count, by reason, summed.
fn counted(events: &[CoreEvent]) -> u64 {
    events
        .iter()
        .filter_map(|e| e.metadata.annotations.as_ref()?.get("bulwark.io/refusals"))
        .flat_map(|c| c.split(','))
        .filter_map(|part| part.split_once('=')?.1.parse::<u64>().ok())
        .sum()
}

/// The row of `ns` in a status table.
fn row<'a>(table: &'a str, ns: &str) -> anyhow::Result<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(ns))
        .with_context(|| format!("no row for {ns} in:\n{table}"))
}

pub async fn kubectl_bulwark_status_explains_a_throttled_job(ctx: &mut Ctx) -> anyhow::Result<()> {
    let ns = ctx
        .namespace(
            "throttled",
            &[
                ("bulwark.io/max-pending-pods", "5"),
                ("bulwark.io/pod-burst", "many"),
            ],
        )
        .await?;
    // 20 pods no node can take: 5 stay pending, and the Job controller is refused the rest.
    let job = job(
        "stuck",
        20,
        json!({"nodeSelector": {"bulwark-e2e/no-such-node": "true"}}),
    )?;
    Api::<Job>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await?;
    let first = eventually(
        Duration::from_secs(30),
        "the Throttled Event of the first refusal",
        || async { Ok(throttled_events(ctx, &ns).await?.into_iter().next()) },
    )
    .await?;
    let note = first.message.clone().unwrap_or_default();
    ensure!(
        note.starts_with("refused ")
            && note.ends_with(
                "in the last 1s: max-pending-pods 5 (annotation bulwark.io/max-pending-pods)"
            ),
        "{note}"
    );
    eventually(Duration::from_secs(20), "5 pods pending", || async {
        Ok((ctx.pending(Some(&ns)).await? == 5).then_some(()))
    })
    .await?;

    // What the Events say before and after the status is read, so both agree with it (the
    // next Event comes a minute after the first).
    let (out, refused) = eventually(Duration::from_secs(30), "a stable count", || async {
        let before = counted(&throttled_events(ctx, &ns).await?);
        let out = ctx.kubectl(&["bulwark", "status", "-n", &ns], None).await?;
        let after = counted(&throttled_events(ctx, &ns).await?);
        Ok((before == after).then_some((out, after)))
    })
    .await?;
    ensure!(out.success, "kubectl bulwark status: {}", out.stderr);
    println!("    $ kubectl bulwark status -n {ns}\n{}", out.stdout);
    // The e2e cluster has bulwark's ConfigMap: nothing had to be assumed.
    ensure!(out.stderr.is_empty(), "stderr: {}", out.stderr);
    let line = row(&out.stdout, &ns)?;
    let cells: Vec<&str> = line
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let expected = [
        ns.as_str(),
        "enforce",
        "5/3000 (built-in)",
        "5/5 (annotation)",
        "5 of 20/s (built-in)",
        &format!("{refused} max-pending"),
        "max-pending-pods 100%",
        "bulwark.io/pod-burst=\"many\"",
    ];
    ensure!(cells == expected, "row {cells:?}, expected {expected:?}");

    let json = ctx
        .kubectl(&["bulwark", "status", "-n", &ns, "-o", "json"], None)
        .await?;
    ensure!(json.success, "{}", json.stderr);
    let v: Value = serde_json::from_str(&json.stdout)?;
    let row = &v["namespaces"][0];
    ensure!(
        v["defaults"]["from"] == "bulwark-system/bulwark-config"
            && row["limits"]["maxPendingPods"] == json!({"value": 5, "source": "annotation"})
            && row["limits"]["podBurst"]
                == json!({"value": 100, "source": "invalid annotation, built-in"})
            && row["pods"]["pending"] == 5,
        "{v:#}"
    );

    // kubectl shows the Event among the namespace's Events, and as the namespace's.
    let events = ctx.kubectl(&["get", "events", "-n", &ns], None).await?;
    let throttled = events
        .stdout
        .lines()
        .find(|l| l.contains("Throttled"))
        .with_context(|| format!("kubectl get events:\n{}", events.stdout))?;
    ensure!(
        throttled.contains(&format!("namespace/{ns}"))
            && throttled.contains("max-pending-pods 5 (annotation bulwark.io/max-pending-pods)"),
        "{throttled}"
    );
    let for_ns = format!("namespace/{ns}");
    let events = ctx
        .kubectl(&["events", "-n", &ns, "--for", &for_ns], None)
        .await?;
    ensure!(
        events.stdout.contains("Throttled"),
        "kubectl events --for: {}",
        events.stdout
    );
    println!(
        "    $ kubectl events -n {ns} --for {for_ns}\n{}",
        events.stdout
    );
    // `kubectl describe ns` lists no Events for a Namespace (kubectl's NamespaceDescriber
    // prints annotations, quotas and limit ranges only); the annotations are what matter.
    let describe = ctx.kubectl(&["describe", "ns", &ns], None).await?;
    ensure!(
        describe.stdout.contains("bulwark.io/max-pending-pods: 5"),
        "{}",
        describe.stdout
    );
    Ok(())
}

pub async fn a_namespace_reader_gets_its_row_and_a_clear_error_for_all(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    let ns = ctx
        .namespace("reader", &[("bulwark.io/max-pods", "2")])
        .await?;
    let rbac = format!(
        "apiVersion: v1
kind: ServiceAccount
metadata: {{name: viewer, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: viewer, namespace: {ns}}}
rules:
  - apiGroups: [\"\"]
    resources: [namespaces]
    resourceNames: [{ns}]
    verbs: [get]
  - apiGroups: [\"\"]
    resources: [pods, events]
    verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: viewer, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: viewer}}
subjects: [{{kind: ServiceAccount, name: viewer, namespace: {ns}}}]
"
    );
    let out = ctx.kubectl(&["apply", "-f", "-"], Some(&rbac)).await?;
    ensure!(out.success, "{}", out.stderr);
    ctx.create(&ns, &pod("one", json!({}))).await?.admitted()?;
    let viewer = format!("system:serviceaccount:{ns}:viewer");
    let out = eventually(Duration::from_secs(10), "the viewer's row", || async {
        let out = ctx
            .kubectl(&["bulwark", "status", "-n", &ns, "--as", &viewer], None)
            .await?;
        Ok(out.success.then_some(out))
    })
    .await?;
    println!(
        "    $ kubectl bulwark status -n {ns} --as {viewer}\n{}{}",
        out.stderr, out.stdout
    );
    let line = row(&out.stdout, &ns)?;
    ensure!(
        line.contains("1/2 (annotation)") && line.contains("max-pods 50%"),
        "{line}"
    );
    ensure!(
        out.stderr.trim()
            == "note: bulwark's built-in defaults assumed (not allowed to read ConfigMap bulwark-system/bulwark-config)",
        "{}",
        out.stderr
    );

    let all = ctx
        .kubectl(&["bulwark", "status", "-A", "--as", &viewer], None)
        .await?;
    println!(
        "    $ kubectl bulwark status -A --as {viewer}\n{}",
        all.stderr
    );
    ensure!(
        !all.success,
        "-A worked for a namespace reader: {}",
        all.stdout
    );
    ensure!(
        all.stderr.contains(&format!(
            "User \"{viewer}\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
        )) && all
            .stderr
            .contains("`-n NAMESPACE` shows one namespace you may read"),
        "{}",
        all.stderr
    );
    let other = ctx
        .kubectl(
            &["bulwark", "status", "-n", "default", "--as", &viewer],
            None,
        )
        .await?;
    ensure!(
        !other.success && other.stderr.contains("cannot get resource \"namespaces\""),
        "{}",
        other.stderr
    );
    Ok(())
}

pub async fn a_burst_of_refusals_makes_few_throttled_events(ctx: &mut Ctx) -> anyhow::Result<()> {
    const BURST: u64 = 10_000;
    let ns = ctx
        .namespace("storm", &[("bulwark.io/max-pods", "0")])
        .await?;
    let refused_before = ctx.metric(
        "bulwark_refusals_total",
        &[("reason", "max_pods"), ("mode", "enforce")],
    )?;
    let pods = ctx.pods(&ns);
    let start = Instant::now();
    let refused = futures::stream::iter(0..BURST)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let p = pod(&format!("burst-{i}"), json!({}));
                matches!(
                    pods.create(&PostParams::default(), &p).await,
                    Err(kube::Error::Api(s)) if s.code == 429
                )
            }
        })
        .buffer_unordered(64)
        .filter(|refused| std::future::ready(*refused))
        .count()
        .await as u64;
    let took = start.elapsed();
    ensure!(refused == BURST, "{refused} of {BURST} refused");
    let metric = ctx.metric(
        "bulwark_refusals_total",
        &[("reason", "max_pods"), ("mode", "enforce")],
    )? - refused_before;
    ensure!(metric == BURST as f64, "the metric counted {metric}");
    // The tail of the burst is reported at most a minute after the report before it.
    let events = eventually(
        Duration::from_secs(75),
        "every refusal in some Event",
        || async {
            let events = throttled_events(ctx, &ns).await?;
            Ok((counted(&events) == BURST).then_some(events))
        },
    )
    .await?;
    // One at the first refusal, then at most one a minute.
    let most = 2 + took.as_secs() / 60;
    println!(
        "    {BURST} creations refused in {:.1}s: {} Throttled Events (at most {most})",
        took.as_secs_f64(),
        events.len()
    );
    for e in &events {
        println!("      {}", e.message.as_deref().unwrap_or_default());
    }
    ensure!(
        (events.len() as u64) <= most,
        "{} Events for {BURST} refusals in {took:?}",
        events.len()
    );
    Ok(())
}

/// promtool's unit tests of the alerts: each fires when it should, with the text it should.
const RULE_TESTS: &str = include_str!("../../monitoring/rules-test.yaml");

/// Metrics the manifests use that bulwark does not serve: Prometheus' own, kube-state-metrics'.
const EXTERNAL: [&str; 2] = ["up", "kube_deployment_status_replicas_available"];

/// Every `bulwark_*` name in `text`.
fn bulwark_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("bulwark_") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// The metric names a /metrics page serves, histograms with their series' suffixes.
fn served(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_owned());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        }
    }
    names
}

pub async fn monitoring_checks_and_metrics_served(ctx: &mut Ctx) -> anyhow::Result<()> {
    let component = deploy_dir().join("components/monitoring");
    let rule: Value = serde_saphyr::from_str(&std::fs::read_to_string(
        component.join("prometheus-rule.yaml"),
    )?)?;
    let dashboard = std::fs::read_to_string(component.join("dashboard.json"))?;
    let dashboard: Value = serde_json::from_str(&dashboard).context("dashboard.json")?;

    // promtool reads the PrometheusRule's spec as a rules file (JSON is YAML).
    let dir = ctx.state().dir.join("promtool");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_string_pretty(&rule["spec"])?,
    )?;
    std::fs::write(dir.join("rules-test.yaml"), RULE_TESTS)?;
    let promtool = ctx.state().bin_dir.join("promtool");
    for args in [
        vec!["check", "rules", "rules.yaml"],
        vec!["test", "rules", "rules-test.yaml"],
    ] {
        let out = tokio::process::Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .await
            .context("running promtool")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("    $ promtool {}\n{}", args.join(" "), text.trim_end());
        ensure!(out.status.success(), "promtool {}: {text}", args.join(" "));
    }

    // The queries: every rule expression and every dashboard target.
    let mut queries = Vec::new();
    for group in rule["spec"]["groups"].as_array().into_iter().flatten() {
        for r in group["rules"].as_array().into_iter().flatten() {
            queries.push(r["expr"].as_str().unwrap_or_default().to_owned());
        }
    }
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap_or_default().to_owned());
        }
    }
    ensure!(
        panels >= 10 && queries.len() >= 20,
        "{panels} panels, {} queries",
        queries.len()
    );

    // Counters with labels are served from their first increment: one refusal makes the
    // refusal families appear.
    let ns = ctx
        .namespace("metrics", &[("bulwark.io/max-pods", "0")])
        .await?;
    ctx.create(&ns, &pod("refused", json!({})))
        .await?
        .refused()?;
    let ports = ctx.state().ports;
    let mut available = served(&plain_get(ports.webhook_metrics, "/metrics")?);
    available.extend(served(&plain_get(
        ports.node_controller_metrics,
        "/metrics",
    )?));
    let mut used = BTreeSet::new();
    for q in &queries {
        used.extend(bulwark_names(q));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !available.contains(*n)).collect();
    ensure!(missing.is_empty(), "used but not served: {missing:?}");
    for external in EXTERNAL {
        ensure!(
            queries.iter().any(|q| q.contains(external)),
            "{external} is listed as used but no query uses it"
        );
    }
    println!(
        "    {} queries use {} bulwark metrics, all served: {}",
        queries.len(),
        used.len(),
        used.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
