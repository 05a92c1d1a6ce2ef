//! What `up` is asked for ([`Options`]) and what it records for `down`, `env` and tests in
//! other processes ([`State`], kept in the cluster directory): directories, binaries, ports.

use std::{net::TcpListener, path::PathBuf, process::Command};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::pki::{self, Identity, Pki};

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub nodes: u32,
    /// The `bulwark` binary to run; default: [`bulwark_binary`](super::bulwark_binary).
    pub bulwark: Option<PathBuf>,
    /// Pod slots of each kwok node (`status.capacity.pods`).
    pub pods_per_node: u32,
    /// kube-controller-manager's `--kube-api-qps` (burst twice that); default: its own (20).
    pub controller_qps: Option<u32>,
    /// kube-controller-manager's `--concurrent-job-syncs`; default: its own (5).
    pub job_syncs: Option<u32>,
    /// bulwark's `maxRetryAfterSeconds`; default: 1, which keeps the tests short.
    pub max_retry_after: Option<u32>,
    /// The node controller's clock: the e2e config's seconds, or its own defaults.
    pub node_timers: NodeTimers,
    /// bulwark's `queueingControllers`; default: not written, so bulwark's own default (true).
    pub queueing_controllers: Option<bool>,
}

/// Which `nodeController:` timings the cluster's bulwark runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeTimers {
    /// Seconds (grace 2s, removeAfter 5s, leaseStaleAfter 6s, ...), so the node tests play
    /// out within a test's time.
    #[default]
    E2e,
    /// No `nodeController:` section: the node controller's own defaults (grace 60s,
    /// removeAfter 10m, leaseStaleAfter 40s, ...), as an install without one runs. For
    /// benchmarks, where a node taken away by a hair-trigger clock would measure the clock.
    Production,
}

impl std::str::FromStr for NodeTimers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "e2e" => Ok(NodeTimers::E2e),
            "production" => Ok(NodeTimers::Production),
            other => Err(format!("{other:?}: expected e2e or production")),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: crate::default_dir(),
            nodes: 4,
            bulwark: None,
            pods_per_node: DEFAULT_PODS_PER_NODE,
            controller_qps: None,
            job_syncs: None,
            max_retry_after: None,
            node_timers: NodeTimers::E2e,
            queueing_controllers: None,
        }
    }
}

/// Pod slots of a kwok node unless `up --pods-per-node` says otherwise (kubelet's default).
pub const DEFAULT_PODS_PER_NODE: u32 = 110;

fn default_pods_per_node() -> u32 {
    DEFAULT_PODS_PER_NODE
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ports {
    pub etcd: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub webhook: u16,
    pub webhook_metrics: u16,
    pub kwok: u16,
    pub node_controller_metrics: u16,
    /// kube-scheduler's HTTPS port; `/metrics` there needs no credentials.
    #[serde(default)]
    pub scheduler: u16,
    /// Where the webhook takes its peers' reports (`--peer-listen`); the same port on
    /// 127.0.0.2 and 127.0.0.3 serves the replicas the rate-sharing tests start.
    #[serde(default)]
    pub webhook_peers: u16,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

impl Ports {
    /// Free ports, asked of the kernel all at once so that none repeats.
    pub(super) fn pick() -> anyhow::Result<Ports> {
        let listeners = (0..9)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .context("finding free ports on 127.0.0.1")?;
        let port = |i: usize| listeners[i].local_addr().map(|a| a.port());
        Ok(Ports {
            etcd: port(0)?,
            etcd_peer: port(1)?,
            apiserver: port(2)?,
            webhook: port(3)?,
            webhook_metrics: port(4)?,
            kwok: port(5)?,
            node_controller_metrics: port(6)?,
            scheduler: port(7)?,
            webhook_peers: port(8)?,
        })
    }
}

/// What `down`, `env` and tests in other processes need to find a running cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub bulwark: PathBuf,
    pub ports: Ports,
    pub nodes: u32,
    #[serde(default = "default_pods_per_node")]
    pub pods_per_node: u32,
    #[serde(default)]
    pub controller_qps: Option<u32>,
    #[serde(default)]
    pub job_syncs: Option<u32>,
    #[serde(default)]
    pub max_retry_after: Option<u32>,
    #[serde(default)]
    pub node_timers: NodeTimers,
    #[serde(default)]
    pub queueing_controllers: Option<bool>,
}

impl State {
    pub fn apiserver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    pub fn webhook_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.webhook)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.ports.webhook_metrics)
    }

    /// kube-scheduler's metrics (HTTPS with a self-signed certificate, no credentials).
    pub fn scheduler_metrics_url(&self) -> String {
        format!("https://127.0.0.1:{}/metrics", self.ports.scheduler)
    }

    /// kube-apiserver's audit log: pod creations only, with their response status
    /// ([`AUDIT_POLICY`](super::AUDIT_POLICY)); rotated files sit next to it.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("logs").join("audit.log")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        pki::kubeconfig_path(&self.dir, Identity::Admin)
    }

    pub fn kubectl(&self) -> PathBuf {
        self.bin_dir.join("kubectl")
    }

    /// Runs kubectl as the admin; its output, or an error with what it printed.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.kubectl())
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.kubectl().display()))?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Helm, built alongside the control plane.
    pub fn helm(&self) -> PathBuf {
        self.bin_dir.join("helm")
    }

    pub(super) fn pki(&self) -> Pki {
        Pki::in_dir(&self.dir)
    }

    /// kubectl plugins: `kubectl-bulwark`, the bulwark binary under kubectl's plugin name.
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    /// `$PATH` with the plugins and the control plane's binaries (kubectl) first.
    pub fn path(&self) -> String {
        let rest = std::env::var("PATH").unwrap_or_default();
        format!(
            "{}:{}:{rest}",
            self.plugin_dir().display(),
            self.bin_dir.display()
        )
    }

    /// Shell lines that point kubectl at this cluster.
    pub fn env(&self) -> String {
        format!(
            "export KUBECONFIG={}\nexport PATH={}:{}:$PATH\nexport BULWARK_METRICS_URL={}\n\
             export SCHEDULER_METRICS_URL={}\n",
            self.kubeconfig().display(),
            self.plugin_dir().display(),
            self.bin_dir.display(),
            self.metrics_url(),
            self.scheduler_metrics_url()
        )
    }
}
