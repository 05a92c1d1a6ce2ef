//! Requests to the running cluster: kube clients from kubeconfigs, the webhook registrations,
//! the node controller's Lease, the readiness probes `up` waits on, and plain-HTTP GETs.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, bail};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::objects;

/// The node controller's leader-election Lease.
pub const NODE_CONTROLLER_LEASE: &str = "bulwark-node-controller";

/// Who holds the node controller's Lease.
pub async fn lease_holder(client: &Client) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "bulwark-system");
    Ok(leases
        .get_opt(NODE_CONTROLLER_LEASE)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

pub(super) fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod for the registration probe; only ever sent as a dry run.
pub(super) fn probe_pod() -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bulwark-e2e-probe"},
        "spec": {"containers": [{"name": "probe", "image": "registry.k8s.io/pause:3.10"}]}
    }))
    .unwrap_or_default()
}

/// Registers bulwark's two webhooks at `base_url` as the cluster's own field manager, so that
/// moving them (a fault test points them elsewhere and back) leaves the objects exactly as
/// registration made them; the caBundle belongs to the webhook and is kept.
pub async fn register_webhooks(client: &Client, base_url: &str) -> anyhow::Result<()> {
    let pp = PatchParams::apply("bulwark-e2e").force();
    let (mutating, validating) = objects::webhook_configurations(base_url);
    apply(client, &mutating, &pp).await?;
    apply(client, &validating, &pp).await
}

async fn apply<K>(client: &Client, obj: &K, pp: &PatchParams) -> anyhow::Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().context("object without a name")?;
    let api: Api<K> = Api::all(client.clone());
    api.patch(&name, pp, &Patch::Apply(obj))
        .await
        .with_context(|| format!("applying {} {name}", K::kind(&())))?;
    Ok(())
}

/// A client for a kubeconfig file.
pub async fn client_from(path: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("using kubeconfig {}", path.display()))?;
    // kube-rs retries 429 on its own (up to 15 times, backing off to minutes); the harness
    // and the tests must see each answer as it comes, and do their own polling.
    config.default_retry = false;
    Client::try_from(config).context("building a Kubernetes client")
}

/// A client for the webhook's own HTTPS endpoints, trusting the webhook CA.
pub(super) async fn webhook_probe_client(url: &str, ca: &Path) -> anyhow::Result<Client> {
    let kc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "webhook", "cluster": {"server": url, "certificate-authority": ca}}],
        "users": [{"name": "anonymous", "user": {}}],
        "contexts": [{"name": "webhook", "context": {"cluster": "webhook", "user": "anonymous"}}],
        "current-context": "webhook",
    });
    let kc: Kubeconfig = serde_json::from_value(kc).context("webhook probe kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Client::try_from(config).context("building the webhook probe client")
}

/// `Some` when GET `path` answers 2xx with "ok".
pub(super) async fn ready(client: &Client, path: &str) -> anyhow::Result<Option<()>> {
    let req = http::Request::get(path)
        .body(Vec::new())
        .context("building a readiness request")?;
    let text = client.request_text(req).await?;
    Ok(text.trim().eq_ignore_ascii_case("ok").then_some(()))
}

/// A plain-HTTP GET on 127.0.0.1 (etcd's /health, the webhook's /metrics): the body.
pub fn plain_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}
