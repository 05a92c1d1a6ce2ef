//! `bulwark-e2e up|down|env`: the local e2e cluster from the command line.

use std::{path::PathBuf, process::ExitCode};

use bulwark_e2e::{Cluster, Options, cluster::NodeTimers, default_dir, install_crypto};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bulwark-e2e",
    about = "A local Kubernetes control plane with kwok nodes and bulwark registered"
)]
struct Cli {
    /// Directory for the cluster's certificates, data, logs and pid files
    /// (default: $BULWARK_E2E_DIR, else ~/.cache/bulwark/cluster).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a fresh cluster (replacing one already in the directory) and leave it running.
    Up {
        /// Number of kwok nodes.
        #[arg(long, default_value_t = 4)]
        nodes: u32,
        /// Pod slots of each kwok node.
        #[arg(long, default_value_t = bulwark_e2e::cluster::DEFAULT_PODS_PER_NODE)]
        pods_per_node: u32,
        /// kube-controller-manager's API request rate (--kube-api-qps; burst twice that);
        /// default: its own, 20/s, which paces the Job controller's pod creations.
        #[arg(long)]
        controller_qps: Option<u32>,
        /// kube-controller-manager's --concurrent-job-syncs (Job controller workers);
        /// default: its own, 5.
        #[arg(long)]
        job_syncs: Option<u32>,
        /// bulwark's maxRetryAfterSeconds (1 to 3600); default: 1, short for the tests.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3600))]
        max_retry_after: Option<u32>,
        /// The node controller's timings: `e2e` (seconds: grace 2s, removeAfter 5s,
        /// leaseStaleAfter 6s) or `production` (no nodeController section: its own defaults,
        /// grace 60s, removeAfter 10m, leaseStaleAfter 40s).
        #[arg(long, default_value = "e2e")]
        node_timers: NodeTimers,
        /// bulwark's queueingControllers: false refuses kube-controller-manager's controllers
        /// with Retry-After like every other client; default: not written (bulwark's true).
        #[arg(long, action = clap::ArgAction::Set)]
        queueing_controllers: Option<bool>,
    },
    /// Stop every process of the cluster.
    Down,
    /// Print shell lines pointing kubectl at the cluster: eval "$(bulwark-e2e env)".
    Env,
    /// Say which components are running.
    Status,
}

#[tokio::main]
async fn main() -> ExitCode {
    install_crypto();
    let cli = Cli::parse();
    let dir = cli.dir.unwrap_or_else(default_dir);
    let result = match cli.command {
        Cmd::Up {
            nodes,
            pods_per_node,
            controller_qps,
            job_syncs,
            max_retry_after,
            node_timers,
            queueing_controllers,
        } => Cluster::up(&Options {
            dir,
            nodes,
            bulwark: None,
            pods_per_node,
            controller_qps,
            job_syncs,
            max_retry_after,
            node_timers,
            queueing_controllers,
        })
        .await
        .map(|c| {
            let state = c.detach();
            eprintln!(
                "cluster up: kube-apiserver {}, bulwark webhook {}, metrics {}",
                state.apiserver_url(),
                state.webhook_url(),
                state.metrics_url()
            );
            eprintln!("logs: {}", state.dir.join("logs").display());
        }),
        Cmd::Down => Cluster::attach(&dir).map(|mut c| {
            c.down();
            eprintln!("cluster in {} stopped", dir.display());
        }),
        Cmd::Env => Cluster::attach(&dir).map(|c| print!("{}", c.state.env())),
        Cmd::Status => Cluster::attach(&dir).map(|mut c| {
            let running = c.running();
            println!(
                "running: {}",
                if running.is_empty() {
                    "nothing".into()
                } else {
                    running.join(", ")
                }
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}
