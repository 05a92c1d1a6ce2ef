//! Webhook replicas sharing a namespace's rate: each takes its share by the ready endpoints
//! of the webhook's Service.

use std::time::Duration;

use anyhow::ensure;
use bulwark_e2e::objects::BULWARK_NAMESPACE;
use kube::Api;
use serde_json::json;

use crate::support::{Ctx, eventually, pod};

pub async fn replicas_share_the_namespace_rate(ctx: &mut Ctx) -> anyhow::Result<()> {
    let replicas = |ctx: &Ctx| ctx.metric("bulwark_rate_share_replicas", &[]);
    ensure!(replicas(ctx)? == 1.0, "shared before any replica was seen");
    // The webhook asks its Service's endpoints what they serve only while older CAs wait to be
    // retired; the made-up endpoints below must never be connected to, so none may wait.
    let cas = crate::certs::stored(ctx).await?.ca;
    ensure!(
        cas.matches("BEGIN CERTIFICATE").count() == 1,
        "older CAs still wait to be retired: the webhook would probe the made-up endpoints"
    );
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
