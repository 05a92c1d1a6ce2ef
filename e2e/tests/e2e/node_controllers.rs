//! Node controllers other than the cluster's own: one put in its place with other settings (a
//! dry run, exec removal, delete-node removal), and a standby taking over the Lease when the
//! leader is killed.

use std::time::{Duration, Instant, SystemTime};

use anyhow::ensure;
use bulwark_e2e::cluster::{Component, NODE_CONTROLLER_LEASE, lease_holder};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use crate::{
    deploy::{RemovalGrant, RemovalMode},
    nodes::{
        REMOVAL_TAINT, UNHEALTHY_TAINT, break_node, events, heal_node, marked, nodes, taint_added,
        until_restored, until_tainted, with_broken,
    },
    support::{Ctx, eventually},
};

/// Puts another node controller (`name`, `identity`, `flags`) in the place of the cluster's
/// own, which gives up its Lease on SIGTERM, and waits until the newcomer leads.
async fn swap_in(ctx: &mut Ctx, name: &str, identity: &str, flags: &[&str]) -> anyhow::Result<()> {
    ctx.cluster
        .stop_named(Component::NodeController.name(), false);
    ctx.cluster.spawn_node_controller(name, identity, flags)?;
    until_leader(ctx, identity, Duration::from_secs(30)).await?;
    Ok(())
}

/// Stops the controller `swap_in` started and brings the cluster's own back as leader.
async fn swap_back(ctx: &mut Ctx, name: &str) -> anyhow::Result<()> {
    ctx.cluster.stop_named(name, false);
    ctx.cluster.start_component(Component::NodeController)?;
    until_leader(ctx, "e2e-primary", Duration::from_secs(30)).await?;
    Ok(())
}

/// The e2e config with more `nodeController:` lines, written into the cluster directory.
fn config_with(ctx: &Ctx, file: &str, lines: &str) -> anyhow::Result<String> {
    let path = ctx.state().dir.join(file);
    std::fs::write(
        &path,
        format!("{}{lines}", bulwark_e2e::cluster::BULWARK_CONFIG),
    )?;
    Ok(format!("--config={}", path.display()))
}

pub async fn dry_run_changes_nothing(ctx: &mut Ctx) -> anyhow::Result<()> {
    swap_in(
        ctx,
        "node-controller-dry-run",
        "e2e-dry-run",
        &["--dry-run"],
    )
    .await?;
    let result = dry_run_body(ctx).await;
    swap_back(ctx, "node-controller-dry-run").await?;
    result
}

async fn dry_run_body(ctx: &Ctx) -> anyhow::Result<()> {
    let node = "kwok-node-4";
    with_broken(ctx, &[(node, Some("KernelDeadlock"))], || async {
        break_node(ctx, node, Some("KernelDeadlock")).await?;
        let event = eventually(Duration::from_secs(15), "the dry-run Event", || async {
            Ok(events(ctx, node, "Tainted").await?.into_iter().find(|e| {
                e.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("dry run, nothing changed"))
            }))
        })
        .await?;
        println!("    {}", event.message.unwrap_or_default());
        let n = nodes(ctx).get(node).await?;
        ensure!(
            taint_added(&n, UNHEALTHY_TAINT).is_none() && !marked(&n),
            "dry run changed the node"
        );
        Ok(())
    })
    .await
}

pub async fn exec_removal_runs_the_command(ctx: &mut Ctx) -> anyhow::Result<()> {
    let record = ctx.state().dir.join("removed.txt");
    let lines = format!(
        "  removal: exec\n  removalCommand: [sh, -c, 'echo \"$BULWARK_NODE $BULWARK_REASON\" >> {}']\n",
        record.display()
    );
    let config = config_with(ctx, "exec.yaml", &lines)?;
    swap_in(ctx, "node-controller-exec", "e2e-exec", &[&config]).await?;
    let result = exec_body(ctx, &record).await;
    swap_back(ctx, "node-controller-exec").await?;
    result
}

pub async fn delete_node_removal_deletes_the_node(ctx: &mut Ctx) -> anyhow::Result<()> {
    // deploy/base does not let the node controller delete Nodes; the delete-node overlay does.
    let grant = RemovalGrant::apply(ctx, RemovalMode::DeleteNode).await?;
    let config = config_with(ctx, "delete.yaml", "  removal: delete-node\n")?;
    swap_in(ctx, "node-controller-delete", "e2e-delete", &[&config]).await?;
    let result = delete_body(ctx).await;
    swap_back(ctx, "node-controller-delete").await?;
    grant.remove(ctx).await?;
    result
}

async fn delete_body(ctx: &Ctx) -> anyhow::Result<()> {
    let node = "kwok-node-4";
    break_node(ctx, node, Some("KernelDeadlock")).await?;
    let api = nodes(ctx);
    let gone = eventually(
        Duration::from_secs(20),
        "the Node to be deleted",
        || async { Ok(api.get_opt(node).await?.is_none().then_some(())) },
    )
    .await;
    // A replacement comes up under the same name, for the tests that follow.
    if api.get_opt(node).await?.is_none() {
        api.create(
            &Default::default(),
            &bulwark_e2e::objects::kwok_node(4, bulwark_e2e::cluster::DEFAULT_PODS_PER_NODE),
        )
        .await?;
    }
    eventually(
        Duration::from_secs(30),
        "the replacement node Ready",
        || async {
            let n = api.get(node).await?;
            let ready = n
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok(ready.then_some(()))
        },
    )
    .await?;
    gone
}

async fn exec_body(ctx: &Ctx, record: &std::path::Path) -> anyhow::Result<()> {
    let node = "kwok-node-4";
    with_broken(ctx, &[(node, Some("KernelDeadlock"))], || async {
        break_node(ctx, node, Some("KernelDeadlock")).await?;
        let line = eventually(
            Duration::from_secs(20),
            "the removal command to run",
            || async {
                Ok(std::fs::read_to_string(record)
                    .ok()
                    .filter(|t| !t.is_empty()))
            },
        )
        .await?;
        ensure!(
            line.trim() == format!("{node} KernelDeadlock"),
            "command wrote {line:?}"
        );
        ensure!(
            marked(&nodes(ctx).get(node).await?),
            "node not marked before the command"
        );
        Ok(())
    })
    .await
}

async fn until_leader(ctx: &Ctx, identity: &str, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    eventually(limit, &format!("{identity} to lead"), || async {
        Ok((lease_holder(&ctx.client).await?.as_deref() == Some(identity)).then_some(()))
    })
    .await?;
    Ok(start.elapsed())
}

pub async fn leadership_fails_over(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.cluster
        .spawn_node_controller("node-controller-standby", "e2e-standby", &[])?;
    let result = failover_body(ctx).await;
    ctx.cluster.stop_named("node-controller-standby", false);
    if !ctx
        .cluster
        .running()
        .iter()
        .any(|c| c == Component::NodeController.name())
    {
        ctx.cluster.start_component(Component::NodeController)?;
    }
    until_leader(ctx, "e2e-primary", Duration::from_secs(30)).await?;
    result
}

async fn failover_body(ctx: &mut Ctx) -> anyhow::Result<()> {
    until_leader(ctx, "e2e-primary", Duration::from_secs(5)).await?;
    // The standby follows for as long as the leader renews.
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(lease_holder(&ctx.client).await?.as_deref() == Some("e2e-primary"));
    // A crash: no chance to give the lease up.
    ctx.cluster
        .stop_named(Component::NodeController.name(), true);
    let took = until_leader(ctx, "e2e-standby", Duration::from_secs(25)).await?;
    println!(
        "    standby took over {:.1}s after the leader was killed (lease duration 15s)",
        took.as_secs_f64()
    );
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "bulwark-system");
    let transitions = leases
        .get(NODE_CONTROLLER_LEASE)
        .await?
        .spec
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    ensure!(transitions >= 1, "leaseTransitions {transitions}");
    // And the new leader acts.
    let ctx = &*ctx;
    let node = "kwok-node-4";
    with_broken(ctx, &[(node, Some("KernelDeadlock"))], || async {
        break_node(ctx, node, Some("KernelDeadlock")).await?;
        until_tainted(ctx, node, Duration::from_secs(15)).await?;
        Ok(())
    })
    .await
}

/// The e2e config with `removalInterval` set to `interval` (it is 1 s there).
fn config_with_interval(ctx: &Ctx, file: &str, interval: &str) -> anyhow::Result<String> {
    let base = bulwark_e2e::cluster::BULWARK_CONFIG;
    let line = "  removalInterval: 1s\n";
    ensure!(
        base.contains(line),
        "the e2e config has no `{}`",
        line.trim()
    );
    let path = ctx.state().dir.join(file);
    std::fs::write(
        &path,
        base.replace(line, &format!("  removalInterval: {interval}\n")),
    )?;
    Ok(format!("--config={}", path.display()))
}

/// When bulwark's removal taint was added to `node`, once it is.
async fn until_marked(ctx: &Ctx, node: &str, limit: Duration) -> anyhow::Result<SystemTime> {
    let api = nodes(ctx);
    eventually(limit, &format!("{node} marked for removal"), || {
        let api = api.clone();
        async move {
            let n = api.get(node).await?;
            Ok(taint_added(&n, REMOVAL_TAINT).and_then(|(_, added)| added))
        }
    })
    .await
}

const SPACED_INTERVAL: Duration = Duration::from_secs(40);

pub async fn removals_stay_spaced_across_a_leader_change(ctx: &mut Ctx) -> anyhow::Result<()> {
    let config = config_with_interval(ctx, "spaced.yaml", "40s")?;
    ctx.cluster
        .stop_named(Component::NodeController.name(), false);
    ctx.cluster
        .spawn_node_controller("node-controller-spaced-a", "e2e-spaced-a", &[&config])?;
    let result = match until_leader(ctx, "e2e-spaced-a", Duration::from_secs(30)).await {
        Ok(_) => spaced_body(ctx, &config).await,
        Err(e) => Err(e),
    };
    for name in ["node-controller-spaced-a", "node-controller-spaced-b"] {
        ctx.cluster.stop_named(name, false);
    }
    ctx.cluster.start_component(Component::NodeController)?;
    until_leader(ctx, "e2e-primary", Duration::from_secs(30)).await?;
    result
}

async fn spaced_body(ctx: &mut Ctx, config: &str) -> anyhow::Result<()> {
    let (first, second) = ("kwok-node-4", "kwok-node-3");
    // The leader removes one node...
    break_node(ctx, first, Some("KernelDeadlock")).await?;
    let removed = until_marked(ctx, first, Duration::from_secs(20)).await;
    // ...which recovers, so no node carries the removal any more: only the Lease does.
    heal_node(ctx, first, Some("KernelDeadlock")).await?;
    until_restored(ctx, first).await?;
    let removed = removed?;
    // A standby, then the leader crashes (no chance to hand anything over).
    ctx.cluster
        .spawn_node_controller("node-controller-spaced-b", "e2e-spaced-b", &[config])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.cluster.stop_named("node-controller-spaced-a", true);
    let ctx = &*ctx;
    with_broken(ctx, &[(second, Some("KernelDeadlock"))], || async {
        break_node(ctx, second, Some("KernelDeadlock")).await?;
        let took = until_leader(ctx, "e2e-spaced-b", Duration::from_secs(30)).await?;
        // Tainted by the new leader after the grace, due for removal 5 s later: without the
        // handed-on record it would be removed some 25 s after the first removal.
        let next = until_marked(ctx, second, SPACED_INTERVAL + Duration::from_secs(20)).await?;
        let apart = next.duration_since(removed).unwrap_or_default();
        println!(
            "    new leader after {:.1}s; removals {:.1}s apart (removalInterval {}s)",
            took.as_secs_f64(),
            apart.as_secs_f64(),
            SPACED_INTERVAL.as_secs()
        );
        ensure!(
            apart + Duration::from_secs(1) >= SPACED_INTERVAL,
            "the new leader removed {second} {apart:?} after {first}"
        );
        Ok(())
    })
    .await
}
