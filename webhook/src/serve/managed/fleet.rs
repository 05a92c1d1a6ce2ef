//! What each webhook replica serves: the ready endpoints of the webhook's Service, each asked
//! over TLS for the certificate it presents. Older CAs leave the bundle only once every one of
//! them serves the Secret's current certificate, so no replica that missed a rotation is left
//! serving a certificate kube-apiserver no longer trusts.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client, api::ListParams};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use tokio::net::TcpStream;

use crate::serve::tls::Signatures;

/// How long one endpoint may take to connect and complete the handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("listing the EndpointSlices of Service {service}: {source}")]
    Api {
        service: String,
        source: kube::Error,
    },
    #[error("{addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {PROBE_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("{addr}: served no certificate")]
    NoCertificate { addr: SocketAddr },
    #[error("TLS client: {0}")]
    Tls(#[from] rustls::Error),
}

/// Pure: where the Service's ready endpoints serve HTTPS, each once: the slice's port named
/// `https`, else its first port. An endpoint without conditions counts as ready, as the API
/// documents.
pub fn targets<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("https"))
            .or_else(|| ports.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &ep.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    out.insert(SocketAddr::new(ip, port));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Accepts whatever certificate is presented: the probe only reads which certificate an
/// endpoint serves, and trusts nothing it says. The handshake signature is still checked, so
/// the endpoint holds the key of the certificate it presents.
#[derive(Debug)]
struct Presented(Signatures);

impl ServerCertVerifier for Presented {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// The leaf certificate `addr` serves (DER). Sends nothing but the handshake.
pub async fn served_leaf(addr: SocketAddr) -> Result<Vec<u8>, FleetError> {
    let provider = crate::serve::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Presented(Signatures(provider.clone()))))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| FleetError::Connect { addr, source })?;
        let tls = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| FleetError::Connect { addr, source })?;
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or(FleetError::NoCertificate { addr })
    };
    tokio::time::timeout(PROBE_TIMEOUT, handshake)
        .await
        .map_err(|_| FleetError::Timeout { addr })?
}

/// Whether every one of `targets` serves `cert_pem`'s first certificate. Any endpoint that
/// cannot be asked counts as not serving it.
pub async fn all_serve(targets: &[SocketAddr], cert_pem: &str) -> bool {
    let Some(Ok(want)) = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next() else {
        return false;
    };
    for &addr in targets {
        match served_leaf(addr).await {
            Ok(leaf) if leaf == want.as_ref() => {}
            Ok(_) => {
                tracing::info!(%addr, "a replica still serves an older certificate; older CAs stay trusted");
                return false;
            }
            Err(e) => {
                tracing::info!(error = %e, "cannot tell what a replica serves; older CAs stay trusted");
                return false;
            }
        }
    }
    true
}

/// Whether every ready endpoint of `service` serves `cert_pem`. A Service without ready
/// endpoints has no replica that could serve anything older.
pub async fn service_serves(
    client: &Client,
    namespace: &str,
    service: &str,
    cert_pem: &str,
) -> Result<bool, FleetError> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let slices = api.list(&lp).await.map_err(|source| FleetError::Api {
        service: format!("{namespace}/{service}"),
        source,
    })?;
    Ok(all_serve(&targets(&slices.items), cert_pem).await)
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;
    use tokio::net::TcpListener;

    use super::*;
    use crate::serve::tls::CertStore;

    #[test]
    fn targets_are_the_ready_endpoints_on_the_https_port() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "bulwark-webhook-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "https", "port": 8443}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
            ],
        }))
        .unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            targets([&slice]),
            vec![addr("10.0.0.1:8443"), addr("10.0.0.3:8443")]
        );
    }

    /// A TLS server on loopback serving `pair` to whoever connects, as a replica would.
    pub(crate) async fn replica(pair: &bulwark_certs::Pair) -> SocketAddr {
        let store = CertStore::from_pem(&pair.cert_pem, &pair.key_pem).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(crate::serve::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(store);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn every_replica_must_serve_the_current_certificate() {
        let ip = "127.0.0.1".parse().unwrap();
        let old = bulwark_certs::Ca::new("old", 2)
            .unwrap()
            .server(&[], &[ip])
            .unwrap();
        let new = bulwark_certs::Ca::new("new", 2)
            .unwrap()
            .server(&[], &[ip])
            .unwrap();
        let (a, b) = (replica(&new).await, replica(&new).await);
        assert!(all_serve(&[a, b], &new.cert_pem).await);
        assert!(
            all_serve(&[], &new.cert_pem).await,
            "no replica: none serves anything older"
        );
        let behind = replica(&old).await;
        assert!(!all_serve(&[a, behind, b], &new.cert_pem).await);
        // One that cannot be asked is not taken to serve it.
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!all_serve(&[a, gone], &new.cert_pem).await);
        assert!(!all_serve(&[a], "not a certificate").await);
    }
}
