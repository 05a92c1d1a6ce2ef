//! A CA and a serving certificate for the bulwark webhook, generated with rcgen (ECDSA P-256).
//!
//! kube-apiserver verifies the webhook's certificate against the `caBundle` of the webhook
//! configuration, so the CA certificate is what gets registered and the serving pair is what
//! the webhook loads.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("at least one --dns name or --ip address is needed for the serving certificate")]
    NoNames,
    #[error("invalid DNS name {0:?}")]
    DnsName(String),
    #[error("validity must be from 1 to 3650 days, got {0}")]
    Days(u32),
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// What to put in the serving certificate.
#[derive(Debug, Clone)]
pub struct Request {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

/// A generated CA and serving certificate, PEM encoded.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca_cert_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The Service DNS names kube-apiserver may use to reach a webhook Service.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that run behind.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days));
}

/// A certificate authority that signs serving and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    days: u32,
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

fn check_days(days: u32) -> Result<(), CertError> {
    if (1..=3650).contains(&days) {
        Ok(())
    } else {
        Err(CertError::Days(days))
    }
}

fn leaf_params(common_name: &str, days: u32) -> Result<CertificateParams, CertError> {
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, common_name.to_owned());
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.use_authority_key_identifier_extension = true;
    validity(&mut leaf, days);
    Ok(leaf)
}

impl Ca {
    /// A fresh self-signed CA; what it signs is valid for as many days as the CA itself.
    pub fn new(common_name: &str, days: u32) -> Result<Ca, CertError> {
        check_days(days)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name.to_owned());
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            days,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A serving certificate for the DNS names and IPs; the first name is its common name.
    pub fn server(&self, dns_names: &[String], ips: &[IpAddr]) -> Result<Pair, CertError> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(CertError::NoNames);
        }
        let cn = dns_names
            .first()
            .cloned()
            .or_else(|| ips.first().map(ToString::to_string))
            .unwrap_or_default();
        let mut leaf = leaf_params(&cn, self.days)?;
        for name in dns_names {
            let ia5 = name
                .clone()
                .try_into()
                .map_err(|_| CertError::DnsName(name.clone()))?;
            leaf.subject_alt_names.push(SanType::DnsName(ia5));
        }
        for ip in ips {
            leaf.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(leaf)
    }

    /// A client certificate; Kubernetes reads the common name as the user and each
    /// organization as a group.
    pub fn client(&self, common_name: &str, organizations: &[&str]) -> Result<Pair, CertError> {
        let mut leaf = leaf_params(common_name, self.days)?;
        for org in organizations {
            leaf.distinguished_name
                .push(DnType::OrganizationName, (*org).to_owned());
        }
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(leaf)
    }

    fn sign(&self, params: CertificateParams) -> Result<Pair, CertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A signing key (ECDSA P-256) without a certificate, e.g. for service account tokens.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// PKCS#8 `PRIVATE KEY`.
    pub private_pem: String,
    /// SubjectPublicKeyInfo `PUBLIC KEY`.
    pub public_pem: String,
}

pub fn signing_key() -> Result<SigningKey, CertError> {
    let key = KeyPair::generate()?;
    Ok(SigningKey {
        private_pem: key.serialize_pem(),
        public_pem: key.public_key_pem(),
    })
}

/// Generates a fresh CA and a serving certificate signed by it.
pub fn generate(req: &Request) -> Result<Bundle, CertError> {
    if req.dns_names.is_empty() && req.ips.is_empty() {
        return Err(CertError::NoNames);
    }
    let ca = Ca::new("bulwark webhook CA", req.days)?;
    let leaf = ca.server(&req.dns_names, &req.ips)?;
    Ok(Bundle {
        ca_cert_pem: ca.cert_pem,
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    })
}

/// Paths of the files [`write`] produces.
#[derive(Debug, Clone)]
pub struct Written {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a PEM file through a temporary file and a rename; `private` makes it 0600.
pub fn write_pem(path: &Path, content: &str, private: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.display().to_string(),
        source,
    };
    // Write then rename, so a webhook watching the files never reads half of one.
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(content.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (created if missing).
pub fn write(bundle: &Bundle, dir: &Path) -> Result<Written, CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let out = Written {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    // The key first: a reloading webhook only swaps once both files match.
    write_pem(&out.key, &bundle.key_pem, true)?;
    write_pem(&out.cert, &bundle.cert_pem, false)?;
    write_pem(&out.ca_cert, &bundle.ca_cert_pem, false)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem_for_names_and_ips() {
        let b = generate(&Request {
            dns_names: service_dns_names("bulwark", "bulwark-system"),
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 30,
        })
        .unwrap();
        assert!(b.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(b.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(b.key_pem.contains("PRIVATE KEY"));
        assert_ne!(b.ca_cert_pem, b.cert_pem);
    }

    #[test]
    fn refuses_bad_requests() {
        let r = |dns: &[&str], days| Request {
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ips: vec![],
            days,
        };
        assert!(matches!(generate(&r(&[], 30)), Err(CertError::NoNames)));
        assert!(matches!(generate(&r(&["a"], 0)), Err(CertError::Days(0))));
        assert!(matches!(
            generate(&r(&["bad name\u{7f}é"], 30)),
            Err(CertError::DnsName(_))
        ));
    }

    #[test]
    fn one_ca_signs_servers_and_clients() {
        let ca = Ca::new("test CA", 2).unwrap();
        let server = ca.server(&[], &["127.0.0.1".parse().unwrap()]).unwrap();
        let client = ca.client("alice", &["system:masters"]).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(server.cert_pem, client.cert_pem);
        assert_ne!(server.key_pem, client.key_pem);
        assert!(matches!(ca.server(&[], &[]), Err(CertError::NoNames)));
        assert!(matches!(Ca::new("x", 4000), Err(CertError::Days(4000))));
        let key = signing_key().unwrap();
        assert!(key.private_pem.contains("BEGIN PRIVATE KEY"));
        assert!(key.public_pem.contains("BEGIN PUBLIC KEY"));
    }

    #[test]
    fn writes_three_files() {
        let dir = std::env::temp_dir().join(format!("bulwark-certs-test-{}", std::process::id()));
        let b = generate(&Request {
            dns_names: vec!["localhost".into()],
            ips: vec![],
            days: 1,
        })
        .unwrap();
        let w = write(&b, &dir).unwrap();
        assert_eq!(fs::read_to_string(&w.cert).unwrap(), b.cert_pem);
        assert_eq!(fs::read_to_string(&w.key).unwrap(), b.key_pem);
        assert_eq!(fs::read_to_string(&w.ca_cert).unwrap(), b.ca_cert_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&w.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
