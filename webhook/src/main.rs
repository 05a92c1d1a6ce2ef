//! The `bulwark` command.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bulwark::{
    config::Config,
    server::{self, App, ServeOptions},
    tls::CertStore,
    watch,
};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bulwark",
    version,
    about = "Keeps Kubernetes clusters stable under bursty pod creation"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BULWARK_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mutating and validating admission webhooks over HTTPS.
    Webhook(WebhookArgs),
    /// Watch node health; taint unhealthy nodes and mark them for removal (one acting
    /// replica, elected on a Lease).
    NodeController(NodeControllerArgs),
    /// Generate a CA and a serving certificate for the webhook.
    Certs(CertsArgs),
}

#[derive(Parser)]
struct NodeControllerArgs {
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
struct WebhookArgs {
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
struct ManagedCertArgs {
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
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "bulwark")]
    webhook_configuration: String,
    /// Serving certificate validity; renewed with a third left.
    #[arg(long, default_value_t = 365)]
    cert_days: u32,
    /// CA validity; a new CA is trusted (caBundle) before it signs what is served.
    #[arg(long, default_value_t = 3650)]
    ca_days: u32,
    /// Key of new CAs and certificates: ecdsa-p256, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    cert_key_algorithm: bulwark_certs::KeyAlgorithm,
    /// How long a new CA sits in the caBundle before a certificate it signed is served.
    #[arg(long, default_value_t = 60)]
    ca_propagation_seconds: u64,
}

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct CertsArgs {
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
enum CertsAction {
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
        /// Replace the CA too: it joins the caBundle first, and what it signs is served after
        /// the webhook's --ca-propagation-seconds.
        #[arg(long)]
        ca: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

// jemalloc, not glibc malloc: after a relist of 100,000 pods glibc's per-thread arenas kept
// the freed pages (70 MiB resident against 33 MiB for the same caches built from watch
// events), while jemalloc's background purge hands them back within seconds (35 MiB); it also
// takes 8-12 % fewer instructions per review. Figures: bench/scale.md, bench/throughput.md.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Certs(args) => runtime().and_then(|rt| rt.block_on(certs(args))),
        Command::Webhook(args) => runtime().and_then(|rt| rt.block_on(webhook(args))),
        Command::NodeController(args) => {
            runtime().and_then(|rt| rt.block_on(node_controller(args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn env_or(var: &str, fallback: impl FnOnce() -> String) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(fallback)
}

async fn node_controller(args: NodeControllerArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // Its writes retry on their own (jittered, honouring Retry-After); no second layer.
    let client = kube_client(args.kubeconfig, false).await?;
    let identity = args.identity.unwrap_or_else(|| {
        env_or("POD_NAME", || {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "bulwark".into());
            format!("{host}-{}", std::process::id())
        })
    });
    let opts = bulwark::nodes::controller::Options {
        settings: config.node_controller,
        dry_run: args.dry_run,
        identity,
        lease_namespace: args
            .lease_namespace
            .unwrap_or_else(|| env_or("POD_NAMESPACE", || "bulwark-system".into())),
        lease_name: args.lease_name,
    };
    bulwark::nodes::controller::run(client, opts, Some(args.metrics_listen), shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn certs(args: CertsArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(CertsAction::Rotate {
        namespace,
        secret,
        kubeconfig,
        ca,
    }) = args.action
    {
        let client = kube_client(kubeconfig, true).await?;
        let (key, value) = bulwark::certs::sync::request_rotation(client, &namespace, &secret, ca)
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
        let results = bulwark::certs::sync::set_ca_bundle(&client, name, &bundle.ca_cert_pem).await;
        for (kind, r) in bulwark::certs::sync::CONFIGURATION_KINDS
            .iter()
            .zip(results)
        {
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

fn managed_options(
    args: ManagedCertArgs,
    secret: String,
) -> anyhow::Result<bulwark::certs::sync::Options> {
    // A serving certificate must not outlive the CA that signed it.
    anyhow::ensure!(
        args.cert_days <= args.ca_days,
        "--cert-days ({}) must not exceed --ca-days ({})",
        args.cert_days,
        args.ca_days
    );
    let namespace = args
        .cert_namespace
        .unwrap_or_else(|| env_or("POD_NAMESPACE", || "bulwark-system".into()));
    let mut dns_names = bulwark_certs::service_dns_names(&args.service, &namespace);
    dns_names.extend(args.cert_dns);
    Ok(bulwark::certs::sync::Options {
        wanted: bulwark::certs::Wanted {
            dns_names,
            ips: args.cert_ip,
            ca_days: args.ca_days,
            cert_days: args.cert_days,
            key: args.cert_key_algorithm,
            ca_propagation: Duration::from_secs(args.ca_propagation_seconds),
        },
        namespace,
        secret,
        webhook_configuration: args.webhook_configuration,
    })
}

async fn webhook(args: WebhookArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // The webhook's own namespace is always exempt, so bulwark can never block its own pods.
    if let Ok(ns) = std::env::var("POD_NAMESPACE")
        && !ns.is_empty()
        && !config.is_exempt_namespace(&ns)
    {
        config.exempt_namespaces.push(ns);
    }
    let client_ca = args
        .client_ca
        .as_deref()
        .map(bulwark::tls::ClientCa::load)
        .transpose()?;
    let app = App::new(Arc::new(config), args.offline);
    let client = if args.offline {
        tracing::info!("offline: no API server; policy from config, counts from own admissions");
        None
    } else {
        Some(kube_client(args.kubeconfig, true).await?)
    };
    let certs = match (
        args.tls_cert,
        args.tls_key,
        args.managed.cert_secret.clone(),
    ) {
        (Some(cert), Some(key), None) => CertStore::load(cert, key)?,
        (None, None, Some(secret)) => {
            let client = client.clone().context(
                "--cert-secret needs the API server; use --tls-cert and --tls-key with --offline",
            )?;
            let opts = managed_options(args.managed, secret)?;
            tracing::info!(secret = %format!("{}/{}", opts.namespace, opts.secret), names = ?opts.wanted.dns_names, "self-managed serving certificate");
            bulwark::certs::sync::start(client, opts, app.metrics.clone()).await?
        }
        _ => anyhow::bail!("give either --tls-cert and --tls-key, or --cert-secret"),
    };
    if let (Some(client), Some(service)) = (&client, &args.peers_service) {
        let namespace = env_or("POD_NAMESPACE", || "bulwark-system".into());
        bulwark::peers::spawn(client.clone(), &namespace, service, app.ledger.clone());
    }
    if let Some(client) = client {
        watch::spawn(
            client,
            app.cache.clone(),
            app.ledger.clone(),
            app.metrics.clone(),
        );
    }
    let ledger = app.ledger.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            ledger.sweep(Instant::now());
        }
    });

    let running = server::start(
        app,
        ServeOptions {
            listen: args.listen,
            metrics_listen: Some(args.metrics_listen),
            certs,
            client_ca,
            reload_interval: Duration::from_secs(args.cert_reload_seconds.max(1)),
            drain_timeout: Duration::from_secs(args.drain_seconds),
        },
    )
    .await?;
    shutdown_signal().await;
    tracing::info!("shutdown requested");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

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
