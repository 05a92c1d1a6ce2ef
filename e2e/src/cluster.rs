//! A real control plane on 127.0.0.1 with bulwark registered: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok with fake nodes, and `bulwark webhook`, each a
//! local process. `up` starts it (and stops whatever it started if any step fails), `down`
//! stops it, from the same process or another one through the pid files.

use std::{
    future::Future,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod, ServiceAccount},
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    objects,
    pki::{self, Identity, Pki},
    process::{Daemon, RunDir},
};

const STATE_FILE: &str = "cluster.json";
const KWOK_STAGES: &str = include_str!("../kwok/stages.yaml");
/// The annotation bulwark's mutation leaves; its presence proves the webhook is called.
pub const DEFAULTED_ANNOTATION: &str = "bulwark.io/defaulted";

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

/// The processes of a cluster, in start order; `down` stops them in reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Etcd,
    Apiserver,
    ControllerManager,
    Scheduler,
    Kwok,
    Webhook,
    NodeController,
}

impl Component {
    pub const ALL: [Component; 7] = [
        Component::Etcd,
        Component::Apiserver,
        Component::ControllerManager,
        Component::Scheduler,
        Component::Kwok,
        Component::Webhook,
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
            Component::NodeController => "bulwark-node-controller",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub nodes: u32,
    /// The `bulwark` binary to run; default: [`bulwark_binary`].
    pub bulwark: Option<PathBuf>,
    /// Pod slots of each kwok node (`status.capacity.pods`).
    pub pods_per_node: u32,
    /// kube-controller-manager's `--kube-api-qps` (burst twice that); default: its own (20).
    pub controller_qps: Option<u32>,
    /// kube-controller-manager's `--concurrent-job-syncs`; default: its own (5).
    pub job_syncs: Option<u32>,
    /// bulwark's `maxRetryAfterSeconds`; default: 1, which keeps the tests short.
    pub max_retry_after: Option<u32>,
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
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

impl Ports {
    /// Free ports, asked of the kernel all at once so that none repeats.
    fn pick() -> anyhow::Result<Ports> {
        let listeners = (0..8)
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

    fn pki(&self) -> Pki {
        Pki::in_dir(&self.dir)
    }

    /// Shell lines that point kubectl at this cluster.
    pub fn env(&self) -> String {
        format!(
            "export KUBECONFIG={}\nexport PATH={}:$PATH\nexport BULWARK_METRICS_URL={}\n\
             export SCHEDULER_METRICS_URL={}\n",
            self.kubeconfig().display(),
            self.bin_dir.display(),
            self.metrics_url(),
            self.scheduler_metrics_url()
        )
    }

    fn args(&self, component: Component) -> Vec<String> {
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
                // A new CA is served 3 s after it is trusted (60 s in a real cluster).
                "--ca-propagation-seconds=3".into(),
                // The rate is shared among the ready endpoints of this Service (a test makes some).
                "--peers-service=bulwark-webhook".into(),
                // Reviews only from kube-apiserver's client certificate.
                format!("--client-ca={}", d(&p.webhook_client_ca)),
                format!("--config={}", d(&self.dir.join("bulwark.yaml"))),
                format!("--kubeconfig={}", kubeconfig(Identity::Webhook)),
            ],
        };
        args
    }

    fn program(&self, component: Component) -> PathBuf {
        match component {
            Component::Webhook | Component::NodeController => self.bulwark.clone(),
            other => self.bin_dir.join(other.name()),
        }
    }
}

/// When a restarted kube-apiserver was told to stop, had stopped, and was ready again.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    pub signalled: Instant,
    pub stopped: Instant,
    pub ready: Instant,
}

pub struct Cluster {
    pub state: State,
    run: RunDir,
    daemons: Vec<Daemon>,
    /// Set once `up` has handed the cluster over to later `down`/`env` invocations.
    detached: bool,
}

impl Cluster {
    /// Starts a fresh cluster in `opts.dir`, replacing whatever an earlier `up` left there.
    pub async fn up(opts: &Options) -> anyhow::Result<Cluster> {
        let bin_dir = control_plane_binaries()?;
        let bulwark = match &opts.bulwark {
            Some(path) => path.clone(),
            None => bulwark_binary()?,
        };
        if let Ok(mut old) = Cluster::attach(&opts.dir) {
            old.down();
        }
        if opts.dir.exists() {
            std::fs::remove_dir_all(&opts.dir)
                .with_context(|| format!("removing {}", opts.dir.display()))?;
        }
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        let dir = opts
            .dir
            .canonicalize()
            .with_context(|| format!("resolving {}", opts.dir.display()))?;
        let state = State {
            dir: dir.clone(),
            bin_dir,
            bulwark,
            ports: Ports::pick()?,
            nodes: opts.nodes,
            pods_per_node: opts.pods_per_node,
            controller_qps: opts.controller_qps,
            job_syncs: opts.job_syncs,
            max_retry_after: opts.max_retry_after,
        };
        let state_json = serde_json::to_string_pretty(&state).context("encoding cluster state")?;
        std::fs::write(dir.join(STATE_FILE), state_json).context("writing cluster.json")?;
        let mut cluster = Cluster {
            run: RunDir::new(&dir)?,
            state,
            daemons: Vec::new(),
            detached: false,
        };
        if let Err(e) = cluster.start().await {
            cluster.down();
            return Err(e.context(format!(
                "bringing up the cluster (logs in {})",
                dir.join("logs").display()
            )));
        }
        Ok(cluster)
    }

    /// The cluster an earlier `up` started in `dir`.
    pub fn attach(dir: &Path) -> anyhow::Result<Cluster> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no cluster in {} (reading {})",
                dir.display(),
                path.display()
            )
        })?;
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a cluster state file", path.display()))?;
        let run = RunDir::new(&state.dir)?;
        let mut daemons = run.recorded();
        daemons.sort_by_key(|d| Component::ALL.iter().position(|c| c.name() == d.name));
        Ok(Cluster {
            state,
            run,
            daemons,
            detached: true,
        })
    }

    /// Leaves the processes running after this value is dropped (for `up` from the CLI).
    pub fn detach(mut self) -> State {
        self.detached = true;
        self.state.clone()
    }

    /// Pids of running processes whose command line names `dir`: what a cluster there left
    /// behind, recorded or not.
    pub fn processes_in(dir: &Path) -> Vec<u32> {
        let needle = dir.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                    && crate::process::alive(*pid)
            })
            .collect()
    }

    /// Names of the components whose processes are running.
    pub fn running(&mut self) -> Vec<String> {
        self.daemons
            .iter_mut()
            .filter_map(|d| d.running().then(|| d.name.clone()))
            .collect()
    }

    /// Stops every process, newest first.
    pub fn down(&mut self) {
        while let Some(mut daemon) = self.daemons.pop() {
            self.run.stop(&mut daemon, Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(self.state.dir.join(STATE_FILE));
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from(&self.state.kubeconfig()).await
    }

    fn start_process(&self, component: Component) -> anyhow::Result<Daemon> {
        self.run.spawn(
            component.name(),
            &self.state.program(component),
            &self.state.args(component),
        )
    }

    fn spawn(&mut self, component: Component) -> anyhow::Result<()> {
        let daemon = self.start_process(component)?;
        self.daemons.push(daemon);
        Ok(())
    }

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

    async fn start(&mut self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let step = |what: &str| eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
        let dir = self.state.dir.clone();
        let pki = pki::generate(&dir, &self.state.apiserver_url())?;
        let config = match self.state.max_retry_after {
            Some(n) => {
                let line = "maxRetryAfterSeconds: 1\n";
                anyhow::ensure!(
                    BULWARK_CONFIG.contains(line),
                    "the e2e bulwark config has no `{}` line to replace",
                    line.trim_end()
                );
                BULWARK_CONFIG.replace(line, &format!("maxRetryAfterSeconds: {n}\n"))
            }
            None => BULWARK_CONFIG.to_owned(),
        };
        std::fs::write(dir.join("bulwark.yaml"), config).context("writing bulwark.yaml")?;
        std::fs::write(dir.join("kwok.yaml"), KWOK_STAGES).context("writing kwok.yaml")?;

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
        ])?;

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

        // Registered first, without a caBundle: the webhook fills it in.
        step("registering the webhooks");
        register_webhooks(&client, &self.state.webhook_url()).await?;

        step("starting bulwark webhook");
        self.spawn(Component::Webhook)?;
        let c = client.clone();
        let ca = self
            .wait(
                "the caBundle from the webhook",
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

    async fn wait_apiserver(&mut self) -> anyhow::Result<Client> {
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

    /// Stops kube-apiserver (SIGTERM, as a rolling restart would), keeps it down for
    /// `downtime`, starts it again and waits until it is ready.
    pub async fn restart_apiserver(&mut self, downtime: Duration) -> anyhow::Result<Restart> {
        let index = self
            .daemons
            .iter()
            .position(|d| d.name == Component::Apiserver.name())
            .context("kube-apiserver is not running")?;
        let mut apiserver = self.daemons.remove(index);
        let signalled = Instant::now();
        self.run.stop(&mut apiserver, Duration::from_secs(30));
        let stopped = Instant::now();
        tokio::time::sleep(downtime).await;
        let daemon = self.start_process(Component::Apiserver)?;
        self.daemons.insert(index, daemon);
        self.wait_apiserver().await?;
        Ok(Restart {
            signalled,
            stopped,
            ready: Instant::now(),
        })
    }

    /// Stops the processes recorded under `name` (a component's name, or an extra's);
    /// `kill` sends SIGKILL at once, as a crash would.
    pub fn stop_named(&mut self, name: &str, kill: bool) -> bool {
        let Some(index) = self.daemons.iter().position(|d| d.name == name) else {
            return false;
        };
        let mut daemon = self.daemons.remove(index);
        let grace = if kill {
            Duration::ZERO
        } else {
            Duration::from_secs(10)
        };
        self.run.stop(&mut daemon, grace);
        true
    }

    /// Starts a component again after [`Cluster::stop_named`].
    pub fn start_component(&mut self, component: Component) -> anyhow::Result<()> {
        self.spawn(component)
    }

    /// Another `bulwark node-controller` next to the cluster's own (a standby, or a dry run),
    /// as `name`, with its own identity and `extra` flags; stopped by `down`.
    pub fn spawn_node_controller(
        &mut self,
        name: &str,
        identity: &str,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let identity = format!("--identity={identity}");
        let mut flags = vec![identity.as_str(), "--metrics-listen=127.0.0.1:0"];
        flags.extend_from_slice(extra);
        self.spawn_another(Component::NodeController, name, &flags)
    }

    /// Another `bulwark webhook` replica next to the cluster's own, as `name`, serving HTTPS
    /// on `port`; stopped by `down`. It is not registered: the tests call it directly.
    pub fn spawn_webhook_replica(&mut self, name: &str, port: u16) -> anyhow::Result<()> {
        self.spawn_webhook_replica_with(name, port, &[])
    }

    /// [`Cluster::spawn_webhook_replica`] with `extra` flags replacing the cluster's own
    /// (e.g. its --kubeconfig, --config or --metrics-listen).
    pub fn spawn_webhook_replica_with(
        &mut self,
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let listen = format!("--listen=127.0.0.1:{port}");
        let mut flags = vec![listen.as_str()];
        if !extra.iter().any(|f| f.starts_with("--metrics-listen=")) {
            flags.push("--metrics-listen=127.0.0.1:0");
        }
        flags.extend_from_slice(extra);
        self.spawn_another(Component::Webhook, name, &flags)
    }

    /// Runs `component` once more as `name`; each of `flags` replaces the component's flag of
    /// the same name (e.g. its --config), or is added.
    fn spawn_another(
        &mut self,
        component: Component,
        name: &str,
        flags: &[&str],
    ) -> anyhow::Result<()> {
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_owned();
        let replaced: Vec<String> = flags.iter().map(|a| flag(a)).collect();
        let mut args: Vec<String> = self
            .state
            .args(component)
            .into_iter()
            .filter(|a| !replaced.contains(&flag(a)))
            .collect();
        args.extend(flags.iter().map(|a| (*a).to_owned()));
        let daemon = self.run.spawn(name, &self.state.bulwark, &args)?;
        self.daemons.push(daemon);
        Ok(())
    }

    /// The log file of a component.
    pub fn log(&self, component: Component) -> PathBuf {
        self.run.log(component.name())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.detached {
            self.down();
        }
    }
}

/// The repository's deploy/ directory (kustomize base and overlays, Helm chart).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The cert-manager CRDs e2e/build.sh fetched (Certificate, Issuer).
pub fn cert_manager_crds() -> anyhow::Result<Vec<PathBuf>> {
    let dir = crate::cache_dir().join("crds");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let sub = entry?.path();
        if sub
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("cert-manager-"))
        {
            for f in std::fs::read_dir(&sub)? {
                found.push(f?.path());
            }
        }
    }
    anyhow::ensure!(
        !found.is_empty(),
        "no cert-manager CRDs under {}",
        dir.display()
    );
    found.sort();
    Ok(found)
}

/// The webhook's self-managed certificate Secret (in bulwark-system), as in deploy/base.
pub const WEBHOOK_SECRET: &str = "bulwark-webhook-tls";

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

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod for the registration probe; only ever sent as a dry run.
fn probe_pod() -> Pod {
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
async fn webhook_probe_client(url: &str, ca: &Path) -> anyhow::Result<Client> {
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
async fn ready(client: &Client, path: &str) -> anyhow::Result<Option<()>> {
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

/// Builds (once per version, cached) the control plane binaries; returns their directory.
pub fn control_plane_binaries() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(dir))
}

/// The `bulwark` binary: `$BULWARK_BIN`, or the one in the cargo target directory this
/// program was built into (tests build it first with [`build_bulwark`]).
pub fn bulwark_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("BULWARK_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("bulwark"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no bulwark binary next to {} (run `cargo build -p bulwark` or set BULWARK_BIN)",
                exe.display()
            )
        })
}

/// `cargo build -p bulwark`, so tests run against the current source.
pub fn build_bulwark() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "--quiet", "-p", "bulwark", "--bin", "bulwark"];
    // Same profile as this program, so the binary lands where `bulwark_binary` looks.
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    let status = Command::new(cargo)
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build -p bulwark")?;
    if !status.success() {
        bail!("cargo build -p bulwark failed ({status})");
    }
    Ok(())
}
