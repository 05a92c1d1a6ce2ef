//! How `up` brings a cluster to life: the configuration files, then each component in order,
//! each waited for (etcd healthy, kube-apiserver ready, kwok nodes Ready, the webhook's
//! caBundle and registration, the node controller's leadership) before the next starts.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};

use super::{
    AUDIT_POLICY, Cluster, Component, DEFAULTED_ANNOTATION,
    args::KWOK_STAGES,
    client::{
        client_from, lease_holder, node_ready, plain_get, probe_pod, ready, register_webhooks,
        webhook_probe_client,
    },
    deploy_dir,
};
use crate::{objects, pki, process::Daemon};

impl Cluster {
    /// Polls `probe` until it yields a value, failing early if any process has died.
    async fn wait<T, F, Fut>(&mut self, what: &str, limit: Duration, probe: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<T>>>,
    {
        let daemons = &mut self.daemons;
        let any_dead = || daemons.iter_mut().try_for_each(Daemon::check);
        crate::poll::until(limit, Duration::from_millis(200), what, any_dead, probe).await
    }

    pub(super) async fn start(&mut self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let step = |what: &str| eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
        let dir = self.state.dir.clone();
        let pki = pki::generate(&dir, &self.state.apiserver_url())?;
        let config = self.state.bulwark_config()?;
        std::fs::write(dir.join("bulwark.yaml"), &config).context("writing bulwark.yaml")?;
        std::fs::write(dir.join("kwok.yaml"), KWOK_STAGES).context("writing kwok.yaml")?;
        std::fs::write(dir.join("audit-policy.yaml"), AUDIT_POLICY)
            .context("writing audit-policy.yaml")?;
        // `kubectl bulwark`: the bulwark binary under kubectl's plugin name, on `env`'s PATH.
        // A hard link (a copy across file systems), not a symlink: the plugin stays the build
        // this cluster runs even when the binary is rebuilt meanwhile.
        let plugins = self.state.plugin_dir();
        std::fs::create_dir_all(&plugins).context("creating the plugin directory")?;
        let plugin = plugins.join("kubectl-bulwark");
        if std::fs::hard_link(&self.state.bulwark, &plugin).is_err() {
            std::fs::copy(&self.state.bulwark, &plugin).context("copying kubectl-bulwark")?;
        }

        step("starting etcd");
        self.spawn(Component::Etcd)?;
        let etcd = self.state.ports.etcd;
        self.wait("etcd", Duration::from_secs(30), || async move {
            Ok(plain_get(etcd, "/health")?
                .contains("\"health\":\"true\"")
                .then_some(()))
        })
        .await?;

        step("starting kube-apiserver");
        self.spawn(Component::Apiserver)?;
        let client = self.wait_apiserver().await?;

        step("starting kube-controller-manager, kube-scheduler, kwok");
        for c in [
            Component::ControllerManager,
            Component::Scheduler,
            Component::Kwok,
        ] {
            self.spawn(c)?;
        }
        let nodes: Api<Node> = Api::all(client.clone());
        let pods = self.state.pods_per_node;
        // Concurrently: a thousand nodes one after another would take a while.
        futures::stream::iter(0..self.state.nodes)
            .map(|i| {
                let nodes = nodes.clone();
                async move {
                    nodes
                        .create(&PostParams::default(), &objects::kwok_node(i, pods))
                        .await
                        .with_context(|| format!("creating node kwok-node-{i}"))
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        // bulwark's namespace, ServiceAccounts and RBAC exactly as an install creates them.
        let base = deploy_dir().join("base");
        self.state.kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=bulwark-e2e",
            "-f",
            &base.join("namespace.yaml").display().to_string(),
            "-f",
            &base.join("rbac.yaml").display().to_string(),
            // And hold mode's grants (deploy/components/hold): the e2e cluster registers it.
            "-f",
            &deploy_dir()
                .join("components/hold/rbac.yaml")
                .display()
                .to_string(),
        ])?;

        // bulwark's ConfigMap as an install has it, with the config the webhook runs on: where
        // `bulwark status` reads the defaults.
        let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "bulwark-config", "namespace": objects::BULWARK_NAMESPACE},
            "data": {"bulwark.yaml": config},
        }))
        .context("the bulwark-config ConfigMap")?;
        Api::<ConfigMap>::namespaced(client.clone(), objects::BULWARK_NAMESPACE)
            .patch(
                "bulwark-config",
                &PatchParams::apply("bulwark-e2e"),
                &Patch::Apply(&config_map),
            )
            .await
            .context("applying the bulwark-config ConfigMap")?;

        let want = self.state.nodes as usize;
        let c = client.clone();
        let limit = Duration::from_secs(60 + u64::from(self.state.nodes) / 10);
        self.wait("kwok nodes Ready", limit, || {
            let nodes: Api<Node> = Api::all(c.clone());
            async move {
                let list = nodes.list(&Default::default()).await?;
                let ready = list.items.iter().filter(|n| node_ready(n)).count();
                Ok((ready >= want).then_some(()))
            }
        })
        .await?;
        let c = client.clone();
        // The controller-manager's service account controller is what creates it.
        self.wait("default ServiceAccount", Duration::from_secs(60), || {
            let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), "default");
            async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
        })
        .await?;

        // Registered first, without a caBundle: bulwark cabundle fills it in from the Secret
        // the webhook creates.
        step("registering the webhooks");
        register_webhooks(&client, &self.state.webhook_url()).await?;

        step("starting bulwark webhook and bulwark cabundle");
        self.spawn(Component::Webhook)?;
        self.spawn(Component::Cabundle)?;
        let c = client.clone();
        let ca = self
            .wait(
                "the caBundle from bulwark cabundle",
                Duration::from_secs(60),
                || {
                    let api: Api<
                        k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration,
                    > = Api::all(c.clone());
                    async move {
                        let config = api.get(objects::WEBHOOK_CONFIGURATION).await?;
                        Ok(config
                            .webhooks
                            .unwrap_or_default()
                            .into_iter()
                            .next()
                            .and_then(|w| w.client_config.ca_bundle)
                            .map(|b| b.0))
                    }
                },
            )
            .await?;
        std::fs::write(&pki.webhook_ca_cert, &ca).context("writing the webhook CA")?;
        let probe = webhook_probe_client(&self.state.webhook_url(), &pki.webhook_ca_cert).await?;
        self.wait("bulwark webhook /readyz", Duration::from_secs(60), || {
            let probe = probe.clone();
            async move { ready(&probe, "/readyz").await }
        })
        .await?;
        let c = client.clone();
        self.wait("webhook registration", Duration::from_secs(30), || {
            let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
            async move {
                let dry = PostParams {
                    dry_run: true,
                    ..PostParams::default()
                };
                let pod = pods.create(&dry, &probe_pod()).await?;
                Ok(pod
                    .metadata
                    .annotations
                    .is_some_and(|a| a.contains_key(DEFAULTED_ANNOTATION))
                    .then_some(()))
            }
        })
        .await?;
        step("starting bulwark node-controller");
        self.spawn(Component::NodeController)?;
        let c = client.clone();
        self.wait(
            "node-controller leadership",
            Duration::from_secs(30),
            || {
                let c = c.clone();
                async move {
                    Ok(lease_holder(&c)
                        .await?
                        .filter(|h| h == "e2e-primary")
                        .map(|_| ()))
                }
            },
        )
        .await?;
        step("ready");
        Ok(())
    }

    pub(super) async fn wait_apiserver(&mut self) -> anyhow::Result<Client> {
        let kubeconfig = self.state.kubeconfig();
        self.wait("kube-apiserver /readyz", Duration::from_secs(90), || {
            let kubeconfig = kubeconfig.clone();
            async move {
                let client = client_from(&kubeconfig).await?;
                Ok(ready(&client, "/readyz").await?.map(|_| client))
            }
        })
        .await
    }
}
