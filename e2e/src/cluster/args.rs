//! Each component's command line, and the configuration files bulwark and kwok read.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{NodeTimers, State};
use crate::{
    objects,
    pki::{self, Identity},
};

/// How pods live on the fake nodes: kwok's stages, written to kwok.yaml for its --config.
pub(super) const KWOK_STAGES: &str = include_str!("../../kwok/stages.yaml");

/// bulwark's configuration in the e2e cluster. Retry hints are kept short (1-2 s) so that
/// client retries (kubectl, the Job controller) play out within a test's time, and the node
/// controller's clock runs in seconds rather than minutes.
pub const BULWARK_CONFIG: &str = "\
cluster:
  maxPendingPods: 5000
  pendingPerHealthyNode: 30
maxRetryAfterSeconds: 1
reservationTtlSeconds: 30
nodeController:
  grace: 2s
  removeAfter: 5s
  recoverAfter: 3s
  leaseStaleAfter: 6s
  stormCooldown: 5s
  removalInterval: 1s
  maxUnhealthy: 40%
";

/// The heading of [`BULWARK_CONFIG`]'s last section, left out for `NodeTimers::Production`.
const NODE_CONTROLLER_SECTION: &str = "nodeController:\n";

/// kube-apiserver's audit policy: pod creations only, at `Metadata` (who asked, and the
/// response status with its details, e.g. a refusal's `retryAfterSeconds`), nothing else, so
/// a burst of tens of thousands of pods keeps the log in the tens of megabytes and its cost
/// the same with and without bulwark.
pub const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create]
  resources:
  - group: \"\"
    resources: [pods]
- level: None
";

/// The processes of a cluster, in start order; `down` stops them in reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Etcd,
    Apiserver,
    ControllerManager,
    Scheduler,
    Kwok,
    Webhook,
    Cabundle,
    NodeController,
}

impl Component {
    pub const ALL: [Component; 8] = [
        Component::Etcd,
        Component::Apiserver,
        Component::ControllerManager,
        Component::Scheduler,
        Component::Kwok,
        Component::Webhook,
        Component::Cabundle,
        Component::NodeController,
    ];

    /// Its name in logs, pid files and messages; for the control plane, also its binary's.
    pub fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::Apiserver => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
            Component::Kwok => "kwok",
            Component::Webhook => "bulwark-webhook",
            Component::Cabundle => "bulwark-cabundle",
            Component::NodeController => "bulwark-node-controller",
        }
    }
}

/// The webhook's self-managed certificate Secret (in bulwark-system), as in deploy/base.
pub const WEBHOOK_SECRET: &str = "bulwark-webhook-tls";

impl State {
    /// bulwark's `--config` for this cluster: [`BULWARK_CONFIG`] with what `up` was asked for.
    pub(super) fn bulwark_config(&self) -> anyhow::Result<String> {
        let mut config = BULWARK_CONFIG.to_owned();
        if let Some(n) = self.max_retry_after {
            let line = "maxRetryAfterSeconds: 1\n";
            anyhow::ensure!(
                config.contains(line),
                "the e2e bulwark config has no `{}` line to replace",
                line.trim_end()
            );
            config = config.replace(line, &format!("maxRetryAfterSeconds: {n}\n"));
        }
        if self.node_timers == NodeTimers::Production {
            let (before, section) = config
                .split_once(NODE_CONTROLLER_SECTION)
                .context("the e2e bulwark config has no nodeController section")?;
            // Cutting at the heading drops the section only if nothing follows it.
            anyhow::ensure!(
                section.lines().all(|l| l.starts_with(' ')),
                "the nodeController section is not the last of the e2e bulwark config"
            );
            config = before.to_owned();
        }
        if let Some(queueing) = self.queueing_controllers {
            config.push_str(&format!("queueingControllers: {queueing}\n"));
        }
        Ok(config)
    }

    pub(super) fn args(&self, component: Component) -> Vec<String> {
        let p = self.pki();
        let d = |path: &Path| path.display().to_string();
        let kubeconfig = |who| d(&pki::kubeconfig_path(&self.dir, who));
        let ports = self.ports;
        let args: Vec<String> = match component {
            Component::Etcd => vec![
                format!("--name=e2e"),
                format!("--data-dir={}", d(&self.dir.join("etcd"))),
                format!("--listen-client-urls=http://127.0.0.1:{}", ports.etcd),
                format!("--advertise-client-urls=http://127.0.0.1:{}", ports.etcd),
                format!("--listen-peer-urls=http://127.0.0.1:{}", ports.etcd_peer),
                format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                    ports.etcd_peer
                ),
                format!("--initial-cluster=e2e=http://127.0.0.1:{}", ports.etcd_peer),
                // A throw-away cluster: durability costs time and buys nothing here.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            Component::Apiserver => vec![
                format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.apiserver),
                format!("--tls-cert-file={}", d(&p.apiserver_cert)),
                format!("--tls-private-key-file={}", d(&p.apiserver_key)),
                format!("--client-ca-file={}", d(&p.ca_cert)),
                format!("--cert-dir={}", d(&self.dir.join("pki/generated"))),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", d(&p.service_account_pub)),
                format!(
                    "--service-account-signing-key-file={}",
                    d(&p.service_account_key)
                ),
                format!("--service-cluster-ip-range={}", pki::SERVICE_CIDR),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--admission-control-config-file={}", d(&p.admission_config)),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                // The `kubernetes` Service cannot point at a loopback address; nothing in
                // this cluster needs it, so do not keep trying.
                "--endpoint-reconciler-type=none".into(),
                format!(
                    "--audit-policy-file={}",
                    d(&self.dir.join("audit-policy.yaml"))
                ),
                format!("--audit-log-path={}", d(&self.audit_log())),
                // Megabytes; a 20,000-pod burst with its refusals writes well under one file.
                "--audit-log-maxsize=200".into(),
                "--audit-log-maxbackup=5".into(),
                // End watches before the HTTP server's shutdown, which otherwise waits a full
                // minute for them: a restart then takes seconds, as in a real rolling restart.
                "--shutdown-watch-termination-grace-period=2s".into(),
            ],
            Component::ControllerManager => {
                let mut args = vec![
                    format!("--kubeconfig={}", kubeconfig(Identity::ControllerManager)),
                    "--use-service-account-credentials=true".into(),
                    format!(
                        "--service-account-private-key-file={}",
                        d(&p.service_account_key)
                    ),
                    format!("--root-ca-file={}", d(&p.ca_cert)),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                ];
                if let Some(qps) = self.controller_qps {
                    args.push(format!("--kube-api-qps={qps}"));
                    args.push(format!("--kube-api-burst={}", qps.saturating_mul(2)));
                }
                if let Some(syncs) = self.job_syncs {
                    args.push(format!("--concurrent-job-syncs={syncs}"));
                }
                args
            }
            Component::Scheduler => vec![
                format!("--kubeconfig={}", kubeconfig(Identity::Scheduler)),
                "--leader-elect=false".into(),
                // Metrics (scheduling attempts, queue sizes) for benchmarks, on loopback
                // with a self-signed certificate and no credentials needed for /metrics.
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.scheduler),
                format!("--cert-dir={}", d(&self.dir.join("pki/scheduler"))),
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
            ],
            Component::Kwok => vec![
                format!("--kubeconfig={}", kubeconfig(Identity::Kwok)),
                format!("--config={}", d(&self.dir.join("kwok.yaml"))),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                // Renewed every 2 s; the node controller calls a lease stale after 6 s.
                "--node-lease-duration-seconds=8".into(),
                "--node-ip=127.0.0.1".into(),
                "--cidr=10.244.0.1/16".into(),
                format!("--server-address=127.0.0.1:{}", ports.kwok),
            ],
            Component::NodeController => vec![
                "node-controller".into(),
                format!(
                    "--metrics-listen=127.0.0.1:{}",
                    ports.node_controller_metrics
                ),
                format!("--config={}", d(&self.dir.join("bulwark.yaml"))),
                format!("--kubeconfig={}", kubeconfig(Identity::NodeController)),
                "--lease-namespace=bulwark-system".into(),
                "--identity=e2e-primary".into(),
            ],
            // The caBundle's only writer, as deploy/base runs it.
            Component::Cabundle => vec![
                "cabundle".into(),
                format!("--namespace={}", objects::BULWARK_NAMESPACE),
                format!("--secret={WEBHOOK_SECRET}"),
                format!("--webhook-configuration={}", objects::WEBHOOK_CONFIGURATION),
                format!("--kubeconfig={}", kubeconfig(Identity::Cabundle)),
            ],
            Component::Webhook => vec![
                "webhook".into(),
                format!("--listen=127.0.0.1:{}", ports.webhook),
                format!("--metrics-listen=127.0.0.1:{}", ports.webhook_metrics),
                // Self-managed certificates, as a plain install runs: the Secret is created on
                // first start and the caBundle of the registrations kept current.
                format!("--cert-secret={WEBHOOK_SECRET}"),
                format!("--cert-namespace={}", objects::BULWARK_NAMESPACE),
                "--cert-ip=127.0.0.1".into(),
                format!("--webhook-configuration={}", objects::WEBHOOK_CONFIGURATION),
                // A new CA is served 3 s after it is trusted (60 s in a real cluster), and
                // older CAs go 3 s after that at the earliest (600 s).
                "--ca-propagation-seconds=3".into(),
                "--ca-retire-seconds=3".into(),
                // The rate is shared among the ready endpoints of this Service (a test makes some).
                "--peers-service=bulwark-webhook".into(),
                format!("--peer-listen=127.0.0.1:{}", ports.webhook_peers),
                // Hold mode's releaser, as deploy/components/hold runs it.
                "--release-held-pods".into(),
                // Reviews only from kube-apiserver's client certificate, by its name, as
                // deploy/overlays/mtls runs it.
                format!("--client-ca={}", d(&p.webhook_client_ca)),
                format!("--client-name={}", pki::WEBHOOK_CLIENT_NAME),
                format!("--config={}", d(&self.dir.join("bulwark.yaml"))),
                format!("--kubeconfig={}", kubeconfig(Identity::Webhook)),
            ],
        };
        args
    }

    pub(super) fn program(&self, component: Component) -> PathBuf {
        match component {
            Component::Webhook | Component::Cabundle | Component::NodeController => {
                self.bulwark.clone()
            }
            other => self.bin_dir.join(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeTimers, Ports};

    fn state(node_timers: NodeTimers, queueing: Option<bool>, retry: Option<u32>) -> State {
        State {
            dir: "/tmp/x".into(),
            bin_dir: "/tmp/bin".into(),
            bulwark: "/tmp/bulwark".into(),
            ports: Ports {
                etcd: 1,
                etcd_peer: 2,
                apiserver: 3,
                webhook: 4,
                webhook_metrics: 5,
                kwok: 6,
                node_controller_metrics: 7,
                scheduler: 8,
                webhook_peers: 9,
            },
            nodes: 1,
            pods_per_node: 110,
            controller_qps: None,
            job_syncs: None,
            max_retry_after: retry,
            node_timers,
            queueing_controllers: queueing,
        }
    }

    #[test]
    fn the_default_config_is_the_e2e_one() {
        let config = state(NodeTimers::E2e, None, None).bulwark_config().unwrap();
        assert_eq!(config, BULWARK_CONFIG);
    }

    #[test]
    fn production_timers_leave_the_node_controller_section_out() {
        let config = state(NodeTimers::Production, Some(false), Some(30))
            .bulwark_config()
            .unwrap();
        assert!(!config.contains("nodeController:"), "{config}");
        assert!(!config.contains("grace:"), "{config}");
        assert!(config.contains("maxRetryAfterSeconds: 30\n"), "{config}");
        assert!(config.ends_with("queueingControllers: false\n"), "{config}");
        assert!(config.contains("pendingPerHealthyNode: 30\n"), "{config}");
    }

    #[test]
    fn the_apiserver_keeps_an_audit_log_of_pod_creations() {
        let args = state(NodeTimers::E2e, None, None).args(Component::Apiserver);
        assert!(args.contains(&"--audit-log-path=/tmp/x/logs/audit.log".to_owned()));
        assert!(AUDIT_POLICY.contains("resources: [pods]"));
    }
}
