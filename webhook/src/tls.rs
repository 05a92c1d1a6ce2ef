//! The serving certificate, reloaded when its files change. The certificate is chosen per
//! handshake through a resolver, so swapping it affects only new connections: requests on
//! open connections are never interrupted, and a half-written or mismatched pair is ignored
//! until the files are whole again.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("{path}: no usable private key: {message}")]
    Key { path: String, message: String },
    #[error("certificate {cert} does not match key {key}")]
    Mismatch { cert: String, key: String },
}

/// The crypto provider for every TLS endpoint: ring, TLS 1.2 and 1.3 only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads a PEM certificate chain and private key, checking that they belong together.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_name = cert_path.display().to_string();
    let key_name = key_path.display().to_string();
    let chain = CertificateDer::pem_slice_iter(&read(cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_name.clone(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_name });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|e| TlsError::Key {
        path: key_name.clone(),
        message: e.to_string(),
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_name.clone(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_name,
        key: key_name,
    })?;
    Ok(certified)
}

/// Identifies a version of the files on disk (Kubernetes swaps Secret volumes via symlinks,
/// so the target's metadata is what changes).
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let meta = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    match (meta(cert), meta(key)) {
        (Some((Some(ct), cl)), Some((Some(kt), kl))) => Some((ct, cl, kt, kl)),
        _ => None,
    }
}

/// The current serving certificate, and where it comes from.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    loaded: Mutex<Stamp>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the files once; a failure here is a start-up error.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let before = stamp(&cert_path, &key_path);
        let key = load_certified_key(&cert_path, &key_path, &provider)?;
        Ok(Arc::new(CertStore {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(Arc::new(key)),
            loaded: Mutex::new(before),
        }))
    }

    /// Reloads if the files changed since the last load. Returns `Ok(true)` on a swap.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cert_path, &self.key_path);
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if now.is_none() || now == *loaded {
            return Ok(false);
        }
        let key = load_certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        *loaded = now;
        Ok(true)
    }

    /// A rustls server configuration that serves whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Polls the files every `interval` and swaps the certificate when they change.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<Metrics>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                    metrics.tls_reloads.with_label_values(&["ok"]).inc();
                }
                Err(e) => {
                    // Often a rotation caught between writing the two files: keep serving the
                    // old pair and try again at the next tick.
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one");
                    metrics.tls_reloads.with_label_values(&["error"]).inc();
                }
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}
