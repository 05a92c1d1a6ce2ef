//! A real control plane on 127.0.0.1 with bulwark registered: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok with fake nodes, and `bulwark webhook`, each a
//! local process. `up` starts it (and stops whatever it started if any step fails), `down`
//! stops it, from the same process or another one through the pid files.
//!
//! This file holds the [`Cluster`] and its life: up, attach, detach, down, restarts, and the
//! extra processes tests run next to it. The bring-up sequence is in `startup`, each
//! component's command line in `args`, what `up` is asked for and records in `state`, the
//! requests to the running cluster in `client`, and where the binaries come from in
//! `binaries`.

mod args;
mod binaries;
mod client;
mod startup;
mod state;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use kube::Client;

pub use args::{AUDIT_POLICY, BULWARK_CONFIG, Component, WEBHOOK_SECRET};
pub use binaries::{
    build_bulwark, bulwark_binary, cert_manager_crds, control_plane_binaries, deploy_dir,
    prometheus_operator_crds,
};
pub use client::{NODE_CONTROLLER_LEASE, client_from, lease_holder, plain_get, register_webhooks};
pub use state::{DEFAULT_PODS_PER_NODE, NodeTimers, Options, Ports, State, free_port};

use crate::process::{Daemon, RunDir};

const STATE_FILE: &str = "cluster.json";

/// The annotation bulwark's mutation leaves; its presence proves the webhook is called.
pub const DEFAULTED_ANNOTATION: &str = "bulwark.io/defaulted";

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
            node_timers: opts.node_timers,
            queueing_controllers: opts.queueing_controllers,
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
        self.spawn_another(Component::NodeController, name, &flags, None)
    }

    /// Another `bulwark webhook` replica next to the cluster's own, as `name`, serving HTTPS
    /// on `port`; stopped by `down`. It is not registered: the tests call it directly.
    pub fn spawn_webhook_replica(&mut self, name: &str, port: u16) -> anyhow::Result<()> {
        self.spawn_webhook_replica_with(name, port, &[])
    }

    /// [`Cluster::spawn_webhook_replica`] with `extra` flags replacing the cluster's own
    /// (e.g. its --kubeconfig, --config, --metrics-listen or --peer-listen; the last two are
    /// a free port unless given).
    pub fn spawn_webhook_replica_with(
        &mut self,
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let listen = format!("--listen=127.0.0.1:{port}");
        let mut flags = vec![listen.as_str()];
        for own in ["--metrics-listen=127.0.0.1:0", "--peer-listen=127.0.0.1:0"] {
            let flag = own.split('=').next().unwrap_or_default();
            if !extra.iter().any(|f| f.starts_with(flag)) {
                flags.push(own);
            }
        }
        flags.extend_from_slice(extra);
        self.spawn_another(Component::Webhook, name, &flags, None)
    }

    /// [`Cluster::spawn_webhook_replica_with`] inside the network namespace `netns` (started
    /// as `ip netns exec NAME bulwark ...`); its flags name addresses there.
    pub fn spawn_webhook_replica_in(
        &mut self,
        netns: &crate::netns::Netns,
        name: &str,
        flags: &[&str],
    ) -> anyhow::Result<()> {
        self.spawn_another(Component::Webhook, name, flags, Some(netns))
    }

    /// Runs `component` once more as `name` (inside `netns` if given); each of `flags`
    /// replaces the component's flag of the same name (e.g. its --config), or is added.
    fn spawn_another(
        &mut self,
        component: Component,
        name: &str,
        flags: &[&str],
        netns: Option<&crate::netns::Netns>,
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
        let daemon = match netns {
            None => self.run.spawn(name, &self.state.bulwark, &args)?,
            Some(ns) => {
                let mut wrapped = ns.exec_prefix();
                wrapped.push(self.state.bulwark.display().to_string());
                wrapped.extend(args);
                self.run.spawn(name, std::path::Path::new("ip"), &wrapped)?
            }
        };
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
