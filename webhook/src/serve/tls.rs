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

use crate::metrics::webhook::TlsMetrics;

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
    #[error("client CA {path}: {message}")]
    ClientCa { path: String, message: String },
}

/// The crypto provider for every TLS endpoint: ring, TLS 1.2 and 1.3 only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Handshake signatures checked with a provider's algorithms: what each of bulwark's own
/// certificate verifiers (the fleet probe's, the peers') leaves to rustls.
#[derive(Debug)]
pub struct Signatures(pub Arc<CryptoProvider>);

impl Signatures {
    pub fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    pub fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    pub fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
    parse_pair(
        &read(cert_path)?,
        &read(key_path)?,
        (
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        ),
        provider,
    )
}

/// A PEM chain and key, checked to belong together; `names` say where they came from.
fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    (cert_name, key_name): (&str, &str),
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_name.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_name.to_owned(),
        });
    }
    let key_err = |message: String| TlsError::Key {
        path: key_name.to_owned(),
        message,
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| key_err(e.to_string()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_name.to_owned(),
        key: key_name.to_owned(),
    })?;
    Ok(certified)
}

/// The CAs whose client certificates (kube-apiserver's, from its admission configuration)
/// may send reviews, and the names such a certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientCa {
    roots: Arc<rustls::RootCertStore>,
    /// `--client-name`: the subject CN or a DNS SAN must equal one. Empty: any certificate of
    /// the CA, which is only safe for a CA that signs nothing but the API server's.
    names: Arc<[String]>,
}

/// What the TLS handshake showed of the caller, when client certificates are required for
/// reviews. The verifier has already checked the chain; this is whether the caller is who
/// reviews may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    Verified,
    Absent,
    /// A certificate of the CA, but none of the names reviews may come from: what it names.
    WrongName(String),
}

/// The subject common names and DNS SANs of a DER certificate.
fn names_in(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        names.extend(san.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        }));
    }
    Ok(names)
}

/// Whether the leaf certificate `der` carries one of `wanted` as its CN or a DNS SAN.
pub fn identify(der: &[u8], wanted: &[String]) -> ClientCert {
    if wanted.is_empty() {
        return ClientCert::Verified;
    }
    match names_in(der) {
        Ok(names) if names.iter().any(|n| wanted.contains(n)) => ClientCert::Verified,
        Ok(names) => {
            // Bounded: the names go into a log line and an answer.
            let mut shown = names.join(", ");
            shown.truncate(200);
            ClientCert::WrongName(shown)
        }
        Err(e) => ClientCert::WrongName(format!("unreadable certificate: {e}")),
    }
}

impl ClientCa {
    /// Only certificates naming one of `names` may send reviews (none given: any of the CA).
    pub fn with_names(mut self, names: Vec<String>) -> ClientCa {
        self.names = names.into();
        self
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// What a connection's verified peer certificates (leaf first) say about its caller.
    pub fn check(&self, presented: Option<&[CertificateDer<'_>]>) -> ClientCert {
        match presented.and_then(|chain| chain.first()) {
            None => ClientCert::Absent,
            Some(leaf) => identify(leaf, &self.names),
        }
    }

    pub fn load(path: &Path) -> Result<ClientCa, TlsError> {
        let err = |message: String| TlsError::ClientCa {
            path: path.display().to_string(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read(path)?) {
            roots
                .add(cert.map_err(|e| err(e.to_string()))?)
                .map_err(|e| err(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(err("no PEM certificate found".into()));
        }
        Ok(ClientCa {
            roots: Arc::new(roots),
            names: Arc::new([]),
        })
    }
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

/// Files a serving certificate is loaded from, and the version last loaded.
struct Files {
    cert_path: PathBuf,
    key_path: PathBuf,
    loaded: Mutex<Stamp>,
}

/// The current serving certificate: from files (reloaded when they change) or handed over in
/// memory (self-managed certificates kept in a Secret).
pub struct CertStore {
    files: Option<Files>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The certificate PEM last handed over in memory, to tell a new one from a repeat.
    pem: Mutex<String>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("CertStore");
        if let Some(files) = &self.files {
            d.field("cert_path", &files.cert_path)
                .field("key_path", &files.key_path);
        }
        d.finish_non_exhaustive()
    }
}

/// Where a certificate handed over in memory comes from, for error messages.
const SECRET: (&str, &str) = (
    "tls.crt of the certificate Secret",
    "tls.key of the certificate Secret",
);

impl CertStore {
    /// Loads the files once; a failure here is a start-up error.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let before = stamp(&cert_path, &key_path);
        let key = load_certified_key(&cert_path, &key_path, &provider)?;
        Ok(Arc::new(CertStore {
            files: Some(Files {
                cert_path,
                key_path,
                loaded: Mutex::new(before),
            }),
            provider,
            current: RwLock::new(Arc::new(key)),
            pem: Mutex::new(String::new()),
        }))
    }

    /// A store for a certificate held in memory; [`CertStore::replace`] swaps it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let key = parse_pair(cert_pem.as_bytes(), key_pem.as_bytes(), SECRET, &provider)?;
        Ok(Arc::new(CertStore {
            files: None,
            provider,
            current: RwLock::new(Arc::new(key)),
            pem: Mutex::new(cert_pem.to_owned()),
        }))
    }

    /// Serves `cert_pem` to new connections from now on. Returns `Ok(true)` on a swap,
    /// `Ok(false)` when it is the certificate already served; a bad pair changes nothing.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<bool, TlsError> {
        let mut pem = self.pem.lock().unwrap_or_else(PoisonError::into_inner);
        if *pem == cert_pem {
            return Ok(false);
        }
        let key = parse_pair(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            SECRET,
            &self.provider,
        )?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        cert_pem.clone_into(&mut pem);
        Ok(true)
    }

    /// Reloads if the files changed since the last load. Returns `Ok(true)` on a swap.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let now = stamp(&files.cert_path, &files.key_path);
        let mut loaded = files.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if now.is_none() || now == *loaded {
            return Ok(false);
        }
        let key = load_certified_key(&files.cert_path, &files.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        *loaded = now;
        Ok(true)
    }

    /// A rustls server configuration that serves whatever certificate is current. With
    /// `client_ca`, client certificates are asked for and verified against it; a connection
    /// without one is still accepted (health probes carry none), and the review endpoints
    /// refuse it (see the server).
    pub fn server_config(
        self: &Arc<Self>,
        client_ca: Option<&ClientCa>,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    ca.roots.clone(),
                    self.provider.clone(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Polls the files every `interval` and swaps the certificate when they change; returns at
    /// once for a certificate held in memory.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: TlsMetrics) {
        let Some(files) = &self.files else {
            return;
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(cert = %files.cert_path.display(), "serving certificate reloaded");
                    metrics.reloads.with_label_values(&["ok"]).inc();
                }
                Err(e) => {
                    // Often a rotation caught between writing the two files: keep serving the
                    // old pair and try again at the next tick.
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one");
                    metrics.reloads.with_label_values(&["error"]).inc();
                }
            }
        }
    }
}

impl CertStore {
    /// The certificate and key served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("pem")
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_client_is_known_by_its_common_name_or_a_dns_name() {
        let ca = bulwark_certs::Ca::new("clients", 1).expect("ca");
        let apiserver = ca
            .client("kube-apiserver-webhook-client", &[])
            .expect("pair");
        let wanted = vec!["kube-apiserver-webhook-client".to_string()];
        assert_eq!(
            identify(&der(&apiserver.cert_pem), &wanted),
            ClientCert::Verified
        );
        let kubelet = ca
            .client("system:node:worker-1", &["system:nodes"])
            .expect("pair");
        assert_eq!(
            identify(&der(&kubelet.cert_pem), &wanted),
            ClientCert::WrongName("system:node:worker-1".into())
        );
        let server = ca
            .server(&["kube-apiserver-webhook-client".into()], &[])
            .expect("pair");
        assert_eq!(
            identify(&der(&server.cert_pem), &wanted),
            ClientCert::Verified
        );
        // Without names, the CA alone decides.
        assert_eq!(identify(&der(&kubelet.cert_pem), &[]), ClientCert::Verified);
        assert!(matches!(
            identify(b"junk", &wanted),
            ClientCert::WrongName(_)
        ));
    }
}
