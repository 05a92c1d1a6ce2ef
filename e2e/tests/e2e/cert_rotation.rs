//! Rotations of the webhook's self-managed certificates on two replicas under steady load, with
//! no admission failing: each renewal has a new CA, trusted before it is served and the old
//! one retired after.

use std::time::{Duration, Instant};

use anyhow::ensure;
use bulwark_e2e::{
    cluster::{WEBHOOK_SECRET, free_port},
    objects::{BULWARK_NAMESPACE, registered_webhooks},
};

use crate::{
    certs::{Stored, ca_bundles, first_der, served_certificate, stored},
    support::{Ctx, eventually, steady_load},
};

pub async fn self_managed_certificates_rotate_without_failed_admissions(
    ctx: &mut Ctx,
) -> anyhow::Result<()> {
    // First start (cluster up): the webhook created the Secret and set the caBundle.
    let first = stored(ctx).await?;
    let bundles = ca_bundles(ctx).await?;
    ensure!(
        bundles.len() == registered_webhooks()
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

/// The e2e webhook's --ca-propagation-seconds and --ca-retire-seconds.
const CA_PROPAGATION: u64 = 3;
const CA_RETIRE: u64 = 3;

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

/// Waits until every port serves `cert`, verified against `ca` alone, each within `limit`.
async fn all_serve(
    ports: &[u16],
    ca: &str,
    cert: &str,
    limit: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let want = first_der(cert)?;
    for &port in ports {
        eventually(limit, what, || {
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

/// One rotation (`bulwark certs rotate`, with `--ca` or not: every renewal makes a new CA now)
/// from `before`: the new CA trusted first, its certificate served by every replica next, the
/// old CA retired last. Returns the Secret then and how long until both replicas served it.
async fn rotation(
    ctx: &Ctx,
    before: &Stored,
    ports: &[u16],
    ca: bool,
) -> anyhow::Result<(Stored, Duration)> {
    let asked = Instant::now();
    rotate(ctx, ca)?;
    let staged = eventually(Duration::from_secs(20), "the new CA staged", || async {
        let now = stored(ctx).await?;
        Ok((now.ca.matches("BEGIN CERTIFICATE").count() == 2 && now.next.is_some()).then_some(now))
    })
    .await?;
    ensure!(
        staged.cert == before.cert,
        "served from the new CA before it was trusted"
    );
    ensure!(
        staged.ca.ends_with(&before.ca),
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
    ensure!(
        staged.next.as_deref() == Some(done.cert.as_str()),
        "served something other than what was staged"
    );
    let new_ca = staged.ca[..staged.ca.len() - before.ca.len()].to_owned();
    all_serve(
        ports,
        &new_ca,
        &done.cert,
        Duration::from_secs(20),
        "both replicas serving a certificate of the new CA",
    )
    .await?;
    let served = asked.elapsed();
    // Every replica serves it: the old CA goes, from the Secret and then from the caBundles.
    let retired = eventually(
        Duration::from_secs(CA_RETIRE + 30),
        "the old CA retired",
        || async {
            let now = stored(ctx).await?;
            Ok((now.ca == new_ca).then_some(now))
        },
    )
    .await?;
    eventually(
        Duration::from_secs(10),
        "both caBundles holding only the new CA",
        || async {
            Ok(ca_bundles(ctx)
                .await?
                .iter()
                .all(|b| b.as_deref() == Some(new_ca.as_str()))
                .then_some(()))
        },
    )
    .await?;
    Ok((retired, served))
}

/// A serving-certificate rotation, then a CA rotation; how long each took to be served.
async fn rotations(
    ctx: &Ctx,
    first: &Stored,
    ports: &[u16],
) -> anyhow::Result<(Duration, Duration)> {
    let (after_serving, serving) = rotation(ctx, first, ports, false).await?;
    let (_, ca) = rotation(ctx, &after_serving, ports, true).await?;
    Ok((serving, ca))
}

async fn rotate_under_load(
    ctx: &mut Ctx,
    first: &Stored,
    primary: u16,
    replica: u16,
) -> anyhow::Result<()> {
    all_serve(
        &[replica],
        &first.ca,
        &first.cert,
        Duration::from_secs(30),
        "the second replica serving the same certificate",
    )
    .await?;

    let load = steady_load(ctx, "certs").await?;

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
        "    rotate -> both replicas serving a certificate of its new CA: {:.1}s; rotate --ca -> the same: {:.1}s (propagation {CA_PROPAGATION}s); {ok} pods created meanwhile, 0 failed",
        serving.as_secs_f64(),
        ca.as_secs_f64()
    );
    Ok(())
}
