//! A TCP forwarder on 127.0.0.1 for fault tests: in front of several webhook replicas it
//! balances connections round robin; in front of the API server it can cut every connection
//! and refuse new ones, as a network partition would, and heal again.
//!
//! Where it differs from a Service: a backend that refuses the connection is skipped and the
//! next one tried. kube-proxy does not retry; a stopped replica leaves a Service when its
//! endpoint goes (not ready, or terminating), and until kube-proxy has that update new
//! connections to it fail. The skip stands in for that update, done at once: a test through
//! this balancer shows that no admission is lost once the endpoint is gone, not during the
//! second or so before it is (which a real rolling restart covers by draining: the old pod
//! keeps serving after it leaves the endpoints, `--drain-seconds`).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

#[derive(Default)]
struct Shared {
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
    cut: AtomicBool,
    connections: Mutex<Vec<AbortHandle>>,
    /// Connections forwarded to each backend, in `backends` order.
    forwarded: Vec<AtomicUsize>,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding a free port on 127.0.0.1 to `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Proxy> {
        Proxy::start_at(([127, 0, 0, 1], 0).into(), backends).await
    }

    /// Starts forwarding `listen` (port 0: a free one) to `backends`.
    pub async fn start_at(listen: SocketAddr, backends: Vec<SocketAddr>) -> anyhow::Result<Proxy> {
        anyhow::ensure!(!backends.is_empty(), "a proxy needs a backend");
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the proxy on {listen}"))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            forwarded: backends.iter().map(|_| AtomicUsize::new(0)).collect(),
            backends,
            ..Shared::default()
        });
        let acceptor = tokio::spawn(accept(listener, shared.clone()));
        Ok(Proxy {
            port,
            shared,
            acceptor,
        })
    }

    /// Drops every open connection and refuses new ones (accepted, then closed at once).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let open = std::mem::take(&mut *self.connections());
        for connection in open {
            connection.abort();
        }
    }

    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// How many connections went to each backend so far.
    pub fn forwarded(&self) -> Vec<usize> {
        let counts = &self.shared.forwarded;
        counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
        let connections = &self.shared.connections;
        connections.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((inbound, _)) = listener.accept().await {
        if shared.cut.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let task = tokio::spawn(forward(inbound, shared.clone()));
        let mut open = shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.retain(|c| !c.is_finished());
        open.push(task.abort_handle());
    }
}

async fn forward(mut inbound: TcpStream, shared: Arc<Shared>) {
    let n = shared.backends.len();
    let first = shared.next.fetch_add(1, Ordering::Relaxed);
    for i in (0..n).map(|k| (first + k) % n) {
        if let Ok(mut outbound) = TcpStream::connect(shared.backends[i]).await {
            shared.forwarded[i].fetch_add(1, Ordering::Relaxed);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            return;
        }
    }
}
