//! The `bulwark` command line: the clap types and their parsing; `commands` runs them.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bulwark",
    version,
    about = "Keeps Kubernetes clusters stable under bursty pod creation"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BULWARK_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the mutating and validating admission webhooks over HTTPS.
    Webhook(Box<WebhookArgs>),
    /// Watch node health; taint unhealthy nodes and mark them for removal (one acting
    /// replica, elected on a Lease).
    NodeController(NodeControllerArgs),
    /// Generate a CA and a serving certificate for the webhook.
    Certs(CertsArgs),
    /// Show each namespace's limits, where they came from, how close it is to them and what
    /// bulwark refused it lately (also `kubectl bulwark status`).
    Status(StatusArgs),
    /// Keep the webhook configurations' caBundle equal to the self-managed certificate
    /// Secret's ca.crt (its own process and ServiceAccount: the webhook may not write them).
    Cabundle(CabundleArgs),
    /// Let every pod held behind bulwark's scheduling gate go at once (hold mode; run it
    /// before uninstalling, or `kubectl -n bulwark-system exec deploy/bulwark-webhook --
    /// bulwark release --all`).
    Release(ReleaseArgs),
}

#[derive(Parser)]
pub struct ReleaseArgs {
    /// Every held pod in the cluster (the only form for now: named so it is never a slip).
    #[arg(long, required = true)]
    pub(crate) all: bool,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StatusOutput {
    /// More columns: the burst, where the mode came from, each annotation problem in full.
    Wide,
    Json,
}

#[derive(Parser)]
pub struct StatusArgs {
    /// The namespace to show (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    pub(crate) namespace: Option<String>,
    /// Every namespace (needs list on namespaces, pods and events cluster-wide).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub(crate) all_namespaces: bool,
    #[arg(short = 'o', long, value_enum)]
    pub(crate) output: Option<StatusOutput>,
    /// kubeconfig (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub(crate) context: Option<String>,
    /// Act as this user, as `kubectl --as` does.
    #[arg(long = "as")]
    pub(crate) as_user: Option<String>,
    /// Act as this group too (repeatable), as `kubectl --as-group` does.
    #[arg(long = "as-group", requires = "as_user")]
    pub(crate) as_group: Vec<String>,
    /// Where bulwark is installed: its ConfigMap bulwark-config holds the defaults.
    #[arg(long, default_value = "bulwark-system")]
    pub(crate) bulwark_namespace: String,
}

#[derive(Parser)]
pub struct CabundleArgs {
    /// Namespace of the certificate Secret (default: $POD_NAMESPACE, else bulwark-system).
    #[arg(long)]
    pub(crate) namespace: Option<String>,
    /// The certificate Secret (the webhook's --cert-secret).
    #[arg(long, default_value = "bulwark-webhook-tls")]
    pub(crate) secret: String,
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "bulwark")]
    pub(crate) webhook_configuration: String,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
}

#[derive(Parser)]
pub struct NodeControllerArgs {
    /// YAML file; its `nodeController:` section holds the knobs (see README).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// Decide and report (log, Events, metrics) but change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Address for plain-HTTP /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:9091")]
    pub(crate) metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else bulwark-system).
    #[arg(long)]
    pub(crate) lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "bulwark-node-controller")]
    pub(crate) lease_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and pid).
    #[arg(long)]
    pub(crate) identity: Option<String>,
}

#[derive(Parser)]
pub struct WebhookArgs {
    /// Address for HTTPS (/mutate, /validate, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub(crate) listen: SocketAddr,
    /// Address for plain-HTTP Prometheus metrics (/metrics).
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub(crate) metrics_listen: SocketAddr,
    /// PEM certificate chain; reloaded when it changes on disk. Either this and --tls-key, or
    /// --cert-secret.
    #[arg(long, requires = "tls_key", conflicts_with = "cert_secret")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key; reloaded when it changes on disk.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) managed: ManagedCertArgs,
    /// The webhook's own Service (in $POD_NAMESPACE or bulwark-system): its ready endpoints
    /// are the replicas that enforce each namespace's limits together, reporting their
    /// consumption to each other on --peer-listen.
    #[arg(long)]
    pub(crate) peers_service: Option<String>,
    /// Address (HTTPS, mutual TLS with the serving key) where the other replicas report their
    /// consumption; with --peers-service. The Service's port named `peers` points here.
    #[arg(long, default_value = "0.0.0.0:8444")]
    pub(crate) peer_listen: SocketAddr,
    /// PEM CA bundle: /mutate and /validate then require a client certificate it signed
    /// (kube-apiserver's, from its admission configuration); probes need none.
    #[arg(long)]
    pub(crate) client_ca: Option<PathBuf>,
    /// With --client-ca, a name reviews may come from: the client certificate's subject CN
    /// or one of its DNS SANs must equal one (repeatable). Without it any certificate of the
    /// CA is accepted, so use a CA that signs nothing else.
    #[arg(long = "client-name", requires = "client_ca")]
    pub(crate) client_names: Vec<String>,
    /// YAML file with cluster defaults (see README).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// Run without an API server: policy from --config only, counts from this process's own
    /// admissions (which expire after reservationTtlSeconds). For trying out and benchmarks.
    #[arg(long)]
    pub(crate) offline: bool,
    /// How often to check the certificate files for changes.
    #[arg(long, default_value_t = 1)]
    pub(crate) cert_reload_seconds: u64,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value_t = 25)]
    pub(crate) drain_seconds: u64,
    /// Run hold mode's releaser: on the replica holding the `bulwark-releaser` Lease, remove
    /// bulwark's scheduling gate from held pods while the pending caps have room (needs
    /// patch on pods: the hold component / Helm `hold.enabled` grants it).
    #[arg(long)]
    pub(crate) release_held_pods: bool,
    /// The releaser's request budget per second (each release is a PATCH and an Event).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub(crate) release_qps: u32,
}

/// Self-managed certificates: kept in a Secret, renewed before expiry, caBundle kept current.
#[derive(clap::Args)]
pub struct ManagedCertArgs {
    /// Keep the serving certificate in this Secret (created if missing) instead of files.
    #[arg(long)]
    pub(crate) cert_secret: Option<String>,
    /// Namespace of the Secret and the Service (default: $POD_NAMESPACE, else bulwark-system).
    #[arg(long)]
    pub(crate) cert_namespace: Option<String>,
    /// The webhook's Service; the certificate names all its DNS forms.
    #[arg(long, default_value = "bulwark-webhook")]
    pub(crate) service: String,
    /// More DNS names for the certificate (repeatable).
    #[arg(long = "cert-dns")]
    pub(crate) cert_dns: Vec<String>,
    /// IP addresses for the certificate (repeatable), e.g. for a URL clientConfig.
    #[arg(long = "cert-ip")]
    pub(crate) cert_ip: Vec<IpAddr>,
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle must hold a new CA
    /// before a certificate it signed is served (`bulwark cabundle` sets it).
    #[arg(long, default_value = "bulwark")]
    pub(crate) webhook_configuration: String,
    /// Serving certificate validity; renewed with a third left. Each one has a CA of its own,
    /// valid a day longer, whose key is not kept.
    #[arg(long, default_value_t = 365)]
    pub(crate) cert_days: u32,
    /// Key of new CAs and certificates: ecdsa-p256, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    pub(crate) cert_key_algorithm: bulwark_certs::KeyAlgorithm,
    /// How long a new CA is in every caBundle before a certificate it signed is served.
    #[arg(long, default_value_t = 60)]
    pub(crate) ca_propagation_seconds: u64,
    /// Older CAs stay in the caBundle at least this long after a new certificate is first
    /// served, and then until every ready endpoint of --service serves it.
    #[arg(long, default_value_t = 600)]
    pub(crate) ca_retire_seconds: u64,
}

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub(crate) action: Option<CertsAction>,
    /// Directory for ca.crt, tls.crt and tls.key.
    #[arg(long, required = true)]
    pub(crate) out_dir: Option<PathBuf>,
    /// DNS names for the serving certificate (repeatable).
    #[arg(long = "dns")]
    pub(crate) dns: Vec<String>,
    /// IP addresses for the serving certificate (repeatable).
    #[arg(long = "ip")]
    pub(crate) ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub(crate) days: u32,
    /// Key algorithm: ecdsa-p256, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    pub(crate) key_algorithm: bulwark_certs::KeyAlgorithm,
    /// Also set the new CA as the caBundle of this Mutating- and ValidatingWebhookConfiguration.
    #[arg(long)]
    pub(crate) patch_webhook_configuration: Option<String>,
    /// kubeconfig for --patch-webhook-configuration; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum CertsAction {
    /// Ask the webhook replicas for a new self-managed serving certificate now.
    Rotate {
        /// Namespace of the certificate Secret.
        #[arg(long, default_value = "bulwark-system")]
        namespace: String,
        /// The certificate Secret (the webhook's --cert-secret).
        #[arg(long, default_value = "bulwark-webhook-tls")]
        secret: String,
        /// kubeconfig; default: in-cluster config, then $KUBECONFIG.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Ask for a new CA too. Every renewal makes one now (joining the caBundle first,
        /// served after the webhook's --ca-propagation-seconds), so this asks for the same.
        #[arg(long)]
        ca: bool,
    },
}

/// `$POD_NAMESPACE` (set from the downward API in the install), if set.
/// `kubectl bulwark ...` runs this binary as `kubectl-bulwark` (kubectl's plugin convention:
/// an executable of that name on PATH, e.g. a symlink); its usage then says so.
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let plugin = std::env::args_os()
        .next()
        .and_then(|argv0| {
            std::path::Path::new(&argv0)
                .file_name()
                .map(|n| n.to_string_lossy().starts_with("kubectl-bulwark"))
        })
        .unwrap_or(false);
    let mut command = Cli::command();
    if plugin {
        command = command.bin_name("kubectl bulwark");
    }
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}
