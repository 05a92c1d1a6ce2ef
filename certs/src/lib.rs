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

/// Generates a fresh CA and a serving certificate signed by it.
pub fn generate(req: &Request) -> Result<Bundle, CertError> {
    if req.dns_names.is_empty() && req.ips.is_empty() {
        return Err(CertError::NoNames);
    }
    if !(1..=3650).contains(&req.days) {
        return Err(CertError::Days(req.days));
    }

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "bulwark webhook CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, req.days);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    for name in &req.dns_names {
        let ia5 = name
            .clone()
            .try_into()
            .map_err(|_| CertError::DnsName(name.clone()))?;
        leaf.subject_alt_names.push(SanType::DnsName(ia5));
    }
    for ip in &req.ips {
        leaf.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    leaf.distinguished_name = DistinguishedName::new();
    let cn = req
        .dns_names
        .first()
        .cloned()
        .or_else(|| req.ips.first().map(ToString::to_string))
        .unwrap_or_default();
    leaf.distinguished_name.push(DnType::CommonName, cn);
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    validity(&mut leaf, req.days);
    let cert = leaf.signed_by(&key, &issuer)?;

    Ok(Bundle {
        ca_cert_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Paths of the files [`write`] produces.
#[derive(Debug, Clone)]
pub struct Written {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_file(path: &Path, content: &str, private: bool) -> Result<(), CertError> {
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
    write_file(&out.key, &bundle.key_pem, true)?;
    write_file(&out.cert, &bundle.cert_pem, false)?;
    write_file(&out.ca_cert, &bundle.ca_cert_pem, false)?;
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
