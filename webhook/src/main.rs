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
    /// PEM certificate chain; reloaded when it changes on disk.
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key; reloaded when it changes on disk.
    #[arg(long)]
    tls_key: PathBuf,
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

#[derive(Parser)]
struct CertsArgs {
    /// Directory for ca.crt, tls.crt and tls.key.
    #[arg(long)]
    out_dir: PathBuf,
    /// DNS names for the serving certificate (repeatable).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// IP addresses for the serving certificate (repeatable).
    #[arg(long = "ip")]
    ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Certs(args) => certs(args),
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

fn certs(args: CertsArgs) -> anyhow::Result<()> {
    let bundle = bulwark_certs::generate(&bulwark_certs::Request {
        dns_names: args.dns,
        ips: args.ip,
        days: args.days,
    })?;
    let written = bulwark_certs::write(&bundle, &args.out_dir)?;
    eprintln!(
        "wrote {}, {}, {}",
        written.ca_cert.display(),
        written.cert.display(),
        written.key.display()
    );
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
    let certs = CertStore::load(args.tls_cert.clone(), args.tls_key.clone())?;
    let app = App::new(Arc::new(config), args.offline);

    if args.offline {
        tracing::info!("offline: no API server; policy from config, counts from own admissions");
    } else {
        let client = kube_client(args.kubeconfig, true).await?;
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
