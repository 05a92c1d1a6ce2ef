//! A network namespace of the test's own, for processes that must have addresses a Kubernetes
//! object accepts: kube-apiserver refuses loopback addresses in EndpointSlices, so webhook
//! replicas that find each other through one live in a namespace whose loopback interface
//! carries a few addresses of its own. Nothing in it routes anywhere else: it has no other
//! interface. The test reaches in and out through forwarders whose sockets are opened inside
//! the namespace from a thread that joined it.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A network namespace, removed on drop.
pub struct Netns {
    pub name: String,
    path: PathBuf,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Creates `name` (replacing one an interrupted run left) with its loopback up and
    /// carrying `addresses` besides 127.0.0.1.
    pub fn create(name: &str, addresses: &[Ipv4Addr]) -> anyhow::Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
            path: PathBuf::from("/var/run/netns").join(name),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        for a in addresses {
            ns.add_address(*a)?;
        }
        Ok(ns)
    }

    pub fn add_address(&self, a: Ipv4Addr) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ])
    }

    /// Takes `a` away: sockets bound to it stay, but nothing reaches them until it is back.
    pub fn remove_address(&self, a: Ipv4Addr) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.name,
            "addr",
            "del",
            &format!("{a}/32"),
            "dev",
            "lo",
        ])
    }

    /// The words that run a command inside the namespace: `ip netns exec NAME`.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }

    /// Runs `f` on a thread that joined the namespace; sockets it opens belong to it.
    fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            // SAFETY: setns only reads the descriptor, which stays open for the call, and
            // changes the network namespace of this thread alone, which ends after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// A listener on `addr` inside the namespace.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<StdListener> {
        self.within(move || {
            let l = StdListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
    }

    /// A connection to `addr` inside the namespace.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<StdStream> {
        self.within(move || {
            let s = StdStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Forwards a free port on 127.0.0.1 of the test's namespace to `target` inside `ns`; the
/// port, and the task (aborted to stop).
pub async fn forward_in(
    ns: Arc<Netns>,
    target: SocketAddr,
) -> anyhow::Result<(u16, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let ns = ns.clone();
            tokio::spawn(async move {
                let Ok(Ok(std)) = tokio::task::spawn_blocking(move || ns.connect(target)).await
                else {
                    return;
                };
                if let Ok(mut outbound) = TcpStream::from_std(std) {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok((port, task))
}

/// Forwards `listen` inside `ns` to `target` in the test's namespace (e.g. the API server).
pub async fn forward_out(
    ns: &Netns,
    listen: SocketAddr,
    target: SocketAddr,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::from_std(
        ns.bind(listen)
            .with_context(|| format!("binding {listen} in {}", ns.name))?,
    )?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}
