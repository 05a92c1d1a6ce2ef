//! TLS between webhook replicas (docs/architecture.md, "Replicas share one limit"). A peer is
//! whoever holds the webhook's serving key: each side presents the serving certificate it
//! serves kube-apiserver, and accepts the other's only if that certificate carries the same
//! public key as its own, the handshake signature proving the other holds the private key.
//! Every replica reads the one serving key (the self-managed Secret, or the same mounted
//! files), so no second credential has to be issued, mounted or rotated. While a rotation has
//! reached some replicas and not others they cannot talk, and each falls back to its own
//! 1/N part of every rate until they serve the same key again.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::tls::{CertStore, Signatures};

/// The public key (SubjectPublicKeyInfo, DER) of a certificate.
fn public_key(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// Accepts a peer certificate carrying the serving key's public key, on either side.
#[derive(Debug)]
pub struct SameKey {
    certs: Arc<CertStore>,
    signatures: Signatures,
}

impl SameKey {
    fn new(certs: &Arc<CertStore>) -> Arc<SameKey> {
        Arc::new(SameKey {
            certs: certs.clone(),
            signatures: Signatures(certs.provider()),
        })
    }

    fn verify(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let own = self.certs.current();
        let own_key = own.cert.first().and_then(|c| public_key(c));
        match (own_key, public_key(presented)) {
            (Some(own), Some(theirs)) if own == theirs => Ok(()),
            (_, None) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }
}

impl ServerCertVerifier for SameKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

impl ClientCertVerifier for SameKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Presents the current serving certificate as the client's.
#[derive(Debug)]
struct Serving(Arc<CertStore>);

impl ResolvesClientCert for Serving {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The peer listener's TLS: the serving certificate, and a client certificate with the same
/// key required of every connection.
pub fn server_config(certs: &Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let config = rustls::ServerConfig::builder_with_provider(certs.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SameKey::new(certs))
        .with_cert_resolver(certs.clone());
    Ok(Arc::new(config))
}

/// What a replica connects to its peers with: the serving certificate as its own, and the
/// peer's accepted only with the same key.
pub fn client_config(certs: &Arc<CertStore>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let config = rustls::ClientConfig::builder_with_provider(certs.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SameKey::new(certs))
        .with_client_cert_resolver(Arc::new(Serving(certs.clone())));
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(pair: &bulwark_certs::Pair) -> Arc<CertStore> {
        CertStore::from_pem(&pair.cert_pem, &pair.key_pem).expect("pair")
    }

    fn leaf(s: &CertStore) -> CertificateDer<'static> {
        s.current().cert[0].clone()
    }

    #[test]
    fn a_peer_is_known_by_the_serving_key() {
        let ca = bulwark_certs::Ca::new("webhook", 1).expect("ca");
        let names = ["bulwark-webhook.bulwark-system.svc".to_owned()];
        let served = ca.server(&names, &[]).expect("pair");
        let own = SameKey::new(&store(&served));
        // The same certificate, as every replica reading the Secret serves it.
        assert!(own.verify(&leaf(&store(&served))).is_ok());
        // A certificate for the same names from the same CA, with another key: not a peer.
        let other = ca.server(&names, &[]).expect("pair");
        assert!(own.verify(&leaf(&store(&other))).is_err());
        assert!(own.verify(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
