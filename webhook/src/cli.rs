//! The `bulwark` command line: the clap types, and how each subcommand turns its arguments
//! into the library's options and runs.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bulwark::{
    config::Config,
    nodes::controller::NodeControllerOptions,
    serve::{
        managed::{
            Wanted,
            cabundle::{self, CaBundleOptions},
            sync,
        },
        tls::ClientCa,
    },
    webhook::{Certificates, Webhook, WebhookOptions},
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
    namespace: Option<String>,
    /// Every namespace (needs list on namespaces, pods and events cluster-wide).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    #[arg(short = 'o', long, value_enum)]
    output: Option<StatusOutput>,
    /// kubeconfig (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    context: Option<String>,
    /// Act as this user, as `kubectl --as` does.
    #[arg(long = "as")]
    as_user: Option<String>,
    /// Act as this group too (repeatable), as `kubectl --as-group` does.
    #[arg(long = "as-group", requires = "as_user")]
    as_group: Vec<String>,
    /// Where bulwark is installed: its ConfigMap bulwark-config holds the defaults.
    #[arg(long, default_value = "bulwark-system")]
    bulwark_namespace: String,
}

#[derive(Parser)]
pub struct CabundleArgs {
    /// Namespace of the certificate Secret (default: $POD_NAMESPACE, else bulwark-system).
    #[arg(long)]
    namespace: Option<String>,
    /// The certificate Secret (the webhook's --cert-secret).
    #[arg(long, default_value = "bulwark-webhook-tls")]
    secret: String,
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "bulwark")]
    webhook_configuration: String,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[derive(Parser)]
pub struct NodeControllerArgs {
    /// YAML file; its `nodeController:` section holds the knobs (see README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Decide and report (log, Events, metrics) but change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Address for plain-HTTP /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:9091")]
    metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else bulwark-system).
    #[arg(long)]
    lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "bulwark-node-controller")]
    lease_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and pid).
    #[arg(long)]
    identity: Option<String>,
}

#[derive(Parser)]
pub struct WebhookArgs {
    /// Address for HTTPS (/mutate, /validate, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Address for plain-HTTP Prometheus metrics (/metrics).
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// PEM certificate chain; reloaded when it changes on disk. Either this and --tls-key, or
    /// --cert-secret.
    #[arg(long, requires = "tls_key", conflicts_with = "cert_secret")]
    tls_cert: Option<PathBuf>,
    /// PEM private key; reloaded when it changes on disk.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    managed: ManagedCertArgs,
    /// Share each namespace's rate among the ready endpoints of this Service (the webhook's
    /// own, in $POD_NAMESPACE or bulwark-system), so the limit holds across replicas.
    #[arg(long)]
    peers_service: Option<String>,
    /// PEM CA bundle: /mutate and /validate then require a client certificate it signed
    /// (kube-apiserver's, from its admission configuration); probes need none.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// With --client-ca, a name reviews may come from: the client certificate's subject CN
    /// or one of its DNS SANs must equal one (repeatable). Without it any certificate of the
    /// CA is accepted, so use a CA that signs nothing else.
    #[arg(long = "client-name", requires = "client_ca")]
    client_names: Vec<String>,
    /// YAML file with cluster defaults (see README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// kubeconfig to reach the API server; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Run without an API server: policy from --config only, counts from this process's own
    /// admissions (which expire after reservationTtlSeconds). For trying out and benchmarks.
    #[arg(long)]
    offline: bool,
    /// How often to check the certificate files for changes.
    #[arg(long, default_value_t = 1)]
    cert_reload_seconds: u64,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value_t = 25)]
    drain_seconds: u64,
}

/// Self-managed certificates: kept in a Secret, renewed before expiry, caBundle kept current.
#[derive(clap::Args)]
pub struct ManagedCertArgs {
    /// Keep the serving certificate in this Secret (created if missing) instead of files.
    #[arg(long)]
    cert_secret: Option<String>,
    /// Namespace of the Secret and the Service (default: $POD_NAMESPACE, else bulwark-system).
    #[arg(long)]
    cert_namespace: Option<String>,
    /// The webhook's Service; the certificate names all its DNS forms.
    #[arg(long, default_value = "bulwark-webhook")]
    service: String,
    /// More DNS names for the certificate (repeatable).
    #[arg(long = "cert-dns")]
    cert_dns: Vec<String>,
    /// IP addresses for the certificate (repeatable), e.g. for a URL clientConfig.
    #[arg(long = "cert-ip")]
    cert_ip: Vec<IpAddr>,
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle must hold a new CA
    /// before a certificate it signed is served (`bulwark cabundle` sets it).
    #[arg(long, default_value = "bulwark")]
    webhook_configuration: String,
    /// Serving certificate validity; renewed with a third left. Each one has a CA of its own,
    /// valid a day longer, whose key is not kept.
    #[arg(long, default_value_t = 365)]
    cert_days: u32,
    /// Key of new CAs and certificates: ecdsa-p256, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    cert_key_algorithm: bulwark_certs::KeyAlgorithm,
    /// How long a new CA is in every caBundle before a certificate it signed is served.
    #[arg(long, default_value_t = 60)]
    ca_propagation_seconds: u64,
    /// Older CAs stay in the caBundle at least this long after a new certificate is first
    /// served, and then until every ready endpoint of --service serves it.
    #[arg(long, default_value_t = 600)]
    ca_retire_seconds: u64,
}

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CertsArgs {
    #[command(subcommand)]
    action: Option<CertsAction>,
    /// Directory for ca.crt, tls.crt and tls.key.
    #[arg(long, required = true)]
    out_dir: Option<PathBuf>,
    /// DNS names for the serving certificate (repeatable).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// IP addresses for the serving certificate (repeatable).
    #[arg(long = "ip")]
    ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Key algorithm: ecdsa-p256, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    key_algorithm: bulwark_certs::KeyAlgorithm,
    /// Also set the new CA as the caBundle of this Mutating- and ValidatingWebhookConfiguration.
    #[arg(long)]
    patch_webhook_configuration: Option<String>,
    /// kubeconfig for --patch-webhook-configuration; default: in-cluster config, then $KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
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
fn pod_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|v| !v.is_empty())
}

/// The namespace of bulwark's own objects unless a flag names it.
fn own_namespace(flag: Option<String>) -> String {
    flag.or_else(pod_namespace)
        .unwrap_or_else(|| "bulwark-system".into())
}

fn pod_name() -> Option<String> {
    std::env::var("POD_NAME").ok().filter(|v| !v.is_empty())
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Webhook(args) => webhook(*args).await,
            Command::NodeController(args) => node_controller(args).await,
            Command::Certs(args) => certs(args).await,
            Command::Status(args) => status(args).await,
            Command::Cabundle(args) => cabundle(args).await,
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

async fn node_controller(args: NodeControllerArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_ref())?;
    // Its writes retry on their own (jittered, honouring Retry-After); no second layer.
    let client = kube_client(args.kubeconfig, false).await?;
    let identity = args.identity.or_else(pod_name).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "bulwark".into());
        format!("{host}-{}", std::process::id())
    });
    let opts = NodeControllerOptions {
        settings: config.node_controller,
        dry_run: args.dry_run,
        identity,
        lease_namespace: own_namespace(args.lease_namespace),
        lease_name: args.lease_name,
    };
    bulwark::nodes::controller::run(client, opts, Some(args.metrics_listen), shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn cabundle(args: CabundleArgs) -> anyhow::Result<()> {
    let client = kube_client(args.kubeconfig, true).await?;
    let opts = CaBundleOptions {
        namespace: own_namespace(args.namespace),
        secret: args.secret,
        webhook_configuration: args.webhook_configuration,
    };
    tracing::info!(secret = %format!("{}/{}", opts.namespace, opts.secret), configuration = %opts.webhook_configuration, "keeping the caBundle current");
    cabundle::run(client, opts, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if let Some(CertsAction::Rotate {
        namespace,
        secret,
        kubeconfig,
        ca,
    }) = args.action
    {
        let client = kube_client(kubeconfig, true).await?;
        let (key, value) = sync::request_rotation(client, &namespace, &secret, ca)
            .await
            .with_context(|| format!("asking for a rotation on Secret {namespace}/{secret}"))?;
        let what = if ca {
            "a new CA (trusted first, served after --ca-propagation-seconds)"
        } else {
            "a new serving certificate"
        };
        eprintln!(
            "asked for {what} ({key} = {value}); the webhook replicas act on it within seconds"
        );
        return Ok(());
    }
    let out_dir = args
        .out_dir
        .context("--out-dir is required to generate certificates")?;
    let bundle = bulwark_certs::generate(&bulwark_certs::Request {
        dns_names: args.dns,
        ips: args.ip,
        days: args.days,
        key: args.key_algorithm,
    })?;
    let written = bulwark_certs::write(&bundle, &out_dir)?;
    eprintln!(
        "wrote {}, {}, {}",
        written.ca_cert.display(),
        written.cert.display(),
        written.key.display()
    );
    if let Some(name) = &args.patch_webhook_configuration {
        let client = kube_client(args.kubeconfig, true).await?;
        let results = sync::set_ca_bundle(&client, name, &bundle.ca_cert_pem).await;
        for (kind, r) in sync::CONFIGURATION_KINDS.iter().zip(results) {
            match r.with_context(|| format!("setting the caBundle of {kind} {name}"))? {
                true => eprintln!("caBundle of {kind} {name} set"),
                false => anyhow::bail!("{kind} {name} not found"),
            }
        }
    }
    // The caBundle value for the webhook configurations.
    println!("{}", BASE64.encode(bundle.ca_cert_pem.as_bytes()));
    Ok(())
}

async fn kube_client(kubeconfig: Option<PathBuf>, retry: bool) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config or kubeconfig found (use --kubeconfig or --offline)")?,
    };
    config.default_retry = retry;
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// The user's client, as kubectl builds it: the kubeconfig and context given or the default
/// ones, with `--as`; kube-rs retries a throttled read on its own.
async fn user_client(args: &StatusArgs) -> anyhow::Result<kube::Client> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        (None, Some(context)) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("using kubeconfig context {context}"))?,
        (None, None) => kube::Config::infer()
            .await
            .context("no kubeconfig or in-cluster config found (use --kubeconfig)")?,
    };
    if let Some(user) = &args.as_user {
        config.auth_info.impersonate = Some(user.clone());
        if !args.as_group.is_empty() {
            config.auth_info.impersonate_groups = Some(args.as_group.clone());
        }
    }
    kube::Client::try_from(config).context("building the Kubernetes client")
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    use bulwark::status::{
        limits::Origin,
        read::{Scope, read},
        table,
    };
    let client = user_client(&args).await?;
    let scope = match (&args.namespace, args.all_namespaces) {
        (_, true) => Scope::All,
        (Some(ns), false) => Scope::Namespace(ns.clone()),
        (None, false) => Scope::Namespace(client.default_namespace().to_owned()),
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let snapshot = read(&client, &scope, &args.bulwark_namespace, now).await?;
    let rows = table::rows(
        &snapshot.defaults,
        &args.bulwark_namespace,
        &snapshot.namespaces,
        &snapshot.pods,
        snapshot.refusals.as_ref().ok(),
    );
    if matches!(args.output, Some(StatusOutput::Json)) {
        let mut out = table::json(&rows, &snapshot.defaults);
        if let Err(why) = &snapshot.refusals {
            out["refusalsUnknownBecause"] = why.as_str().into();
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    // What the table could not know goes to stderr, as kubectl's warnings do.
    if let Origin::Assumed(why) = &snapshot.defaults.origin {
        eprintln!("note: bulwark's built-in defaults assumed ({why})");
    }
    if let Err(why) = &snapshot.refusals {
        eprintln!("note: refusals unknown, bulwark's Events could not be read ({why})");
    }
    if rows.is_empty() {
        eprintln!("No namespaces found.");
    }
    let wide = matches!(args.output, Some(StatusOutput::Wide));
    print!("{}", table::text(&rows, wide));
    Ok(())
}

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

impl ManagedCertArgs {
    fn options(self, secret: String) -> anyhow::Result<sync::ManagedOptions> {
        anyhow::ensure!(
            (1..=3650).contains(&self.cert_days),
            "--cert-days must be from 1 to 3650, got {}",
            self.cert_days
        );
        let namespace = own_namespace(self.cert_namespace);
        let mut dns_names = bulwark_certs::service_dns_names(&self.service, &namespace);
        dns_names.extend(self.cert_dns);
        Ok(sync::ManagedOptions {
            wanted: Wanted {
                dns_names,
                ips: self.cert_ip,
                cert_days: self.cert_days,
                key: self.cert_key_algorithm,
                ca_propagation: Duration::from_secs(self.ca_propagation_seconds),
                ca_retire_after: Duration::from_secs(self.ca_retire_seconds),
            },
            namespace,
            secret,
            service: self.service,
            webhook_configuration: self.webhook_configuration,
        })
    }
}

async fn webhook(args: WebhookArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_ref())?;
    let client_ca = args
        .client_ca
        .as_deref()
        .map(ClientCa::load)
        .transpose()?
        .map(|ca| ca.with_names(args.client_names));
    let client = if args.offline {
        None
    } else {
        Some(kube_client(args.kubeconfig, true).await?)
    };
    let certificates = match (
        args.tls_cert,
        args.tls_key,
        args.managed.cert_secret.clone(),
    ) {
        (Some(cert), Some(key), None) => Certificates::Files { cert, key },
        (None, None, Some(secret)) => Certificates::Managed(args.managed.options(secret)?),
        _ => anyhow::bail!("give either --tls-cert and --tls-key, or --cert-secret"),
    };
    let started = Webhook::start(WebhookOptions {
        settings: config.webhook,
        client,
        own_namespace: pod_namespace(),
        identity: pod_name(),
        peers_service: args.peers_service,
        certificates,
        client_ca,
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        reload_interval: Duration::from_secs(args.cert_reload_seconds.max(1)),
        drain_timeout: Duration::from_secs(args.drain_seconds),
        limits: Default::default(),
    })
    .await?;
    shutdown_signal().await;
    tracing::info!("shutdown requested");
    started.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops bulwark");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
