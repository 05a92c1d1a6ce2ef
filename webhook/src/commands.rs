//! What each subcommand does with its parsed arguments (`cli`): turn them into the
//! library's options and run.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bulwark::{
    config::Config,
    metrics::nodes::NodeMetrics,
    nodes::controller::NodeControllerOptions,
    release::Budget,
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

use crate::cli::*;

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
            Command::Release(args) => release_all(args).await,
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
    let metrics = Arc::new(NodeMetrics::new());
    // Served for the life of the process, which ends with the controller.
    let (stop_metrics, stopped) = watch::channel(false);
    let (local, serving) = bulwark::serve::serve_metrics(
        args.metrics_listen,
        metrics.clone(),
        metrics.connections.listener("metrics"),
        stopped,
        Duration::from_secs(1),
    )
    .await?;
    tracing::info!(%local, "metrics listening");
    let ran = bulwark::nodes::controller::run(client, opts, metrics, shutdown_signal()).await;
    let _ = stop_metrics.send(true);
    let _ = serving.await;
    ran?;
    tracing::info!("stopped");
    Ok(())
}

async fn release_all(args: ReleaseArgs) -> anyhow::Result<()> {
    debug_assert!(args.all);
    let client = kube_client(args.kubeconfig, false).await?;
    let releaser = bulwark::release::gate::Releaser::new(client, pod_name());
    let (released, failed) = releaser
        .release_all()
        .await
        .context("listing pods to release")?;
    println!("released {released} held pods");
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("bulwark: not released: {f}");
        }
        anyhow::bail!("{} held pods could not be released", failed.len());
    }
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
        let results = cabundle::set_ca_bundle(&client, name, &bundle.ca_cert_pem).await;
        for (kind, r) in cabundle::CONFIGURATION_KINDS.iter().zip(results) {
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
        peer_listen: args.peers_service.as_ref().map(|_| args.peer_listen),
        peers_service: args.peers_service,
        certificates,
        client_ca,
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        reload_interval: Duration::from_secs(args.cert_reload_seconds.max(1)),
        drain_timeout: Duration::from_secs(args.drain_seconds),
        limits: Default::default(),
        releaser: args.release_held_pods.then(|| Budget {
            per_second: f64::from(args.release_qps),
            burst: f64::from(args.release_qps) * 2.0,
        }),
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
