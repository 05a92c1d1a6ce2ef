//! The e2e cluster: a real control plane on 127.0.0.1 with kwok nodes and bulwark registered,
//! used by `bulwark-e2e up|down|env` and by the end-to-end tests.

pub mod cluster;
pub mod netns;
pub mod objects;
pub mod pki;
pub mod poll;
pub mod process;
pub mod proxy;

pub use cluster::{Cluster, Options, State};

/// The cache e2e/build.sh fills (BULWARK_CACHE, default ~/.cache/bulwark).
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("BULWARK_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/bulwark"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("bulwark"))
}

/// Where `bulwark-e2e` keeps its cluster unless told otherwise.
pub fn default_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("BULWARK_E2E_DIR") {
        return dir.into();
    }
    cache_dir().join("cluster")
}

/// kube-rs and the webhook probe use rustls with ring; install it once per process.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
