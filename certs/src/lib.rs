//! A CA and a serving certificate for the bulwark webhook, generated with rcgen (ECDSA P-256
//! by default, RSA on request).
//!
//! kube-apiserver verifies the webhook's certificate against the `caBundle` of the webhook
//! configuration, so the CA certificate is what gets registered and the serving pair is what
//! the webhook loads.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration as StdDuration, SystemTime, UNIX_EPOCH},
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
    #[error("unknown key algorithm {0:?} (ecdsa-p256, rsa-2048, rsa-3072, rsa-4096)")]
    KeyAlgorithm(String),
    #[error("generating an RSA key: {0}")]
    Rsa(String),
    #[error("not a PEM certificate: {0}")]
    Parse(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The kind of key a CA and the certificates it signs get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// Small, fast, accepted everywhere Kubernetes runs.
    #[default]
    EcdsaP256,
    /// For environments whose policy asks for RSA; `bits` is 2048, 3072 or 4096.
    Rsa { bits: usize },
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, CertError> {
        match s {
            "ecdsa-p256" => Ok(KeyAlgorithm::EcdsaP256),
            "rsa-2048" => Ok(KeyAlgorithm::Rsa { bits: 2048 }),
            "rsa-3072" => Ok(KeyAlgorithm::Rsa { bits: 3072 }),
            "rsa-4096" => Ok(KeyAlgorithm::Rsa { bits: 4096 }),
            other => Err(CertError::KeyAlgorithm(other.to_owned())),
        }
    }
}

impl KeyAlgorithm {
    fn generate(self) -> Result<KeyPair, CertError> {
        match self {
            KeyAlgorithm::EcdsaP256 => Ok(KeyPair::generate()?),
            // ring signs with RSA but cannot generate RSA keys; the rsa crate generates the
            // key only, every signature is ring's.
            KeyAlgorithm::Rsa { bits } => {
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                    .map_err(|e| CertError::Rsa(e.to_string()))?;
                let pem = key
                    .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                    .map_err(|e| CertError::Rsa(e.to_string()))?;
                Ok(KeyPair::from_pkcs8_pem_and_sign_algo(
                    &pem,
                    &rcgen::PKCS_RSA_SHA256,
                )?)
            }
        }
    }
}

/// What to put in the serving certificate.
#[derive(Debug, Clone)]
pub struct Request {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
    pub key: KeyAlgorithm,
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
    key_pem: String,
    days: u32,
    key: KeyAlgorithm,
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
    /// A fresh self-signed CA (ECDSA P-256); what it signs is valid for as many days as the
    /// CA itself.
    pub fn new(common_name: &str, days: u32) -> Result<Ca, CertError> {
        Ca::with_key(common_name, days, KeyAlgorithm::EcdsaP256)
    }

    /// A fresh self-signed CA whose key, and the keys of what it signs, are `key`.
    pub fn with_key(common_name: &str, days: u32, key_alg: KeyAlgorithm) -> Result<Ca, CertError> {
        check_days(days)?;
        let key = key_alg.generate()?;
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
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            days,
            key: key_alg,
        })
    }

    /// A CA kept from earlier (e.g. in a Secret), signing certificates valid for `days`.
    /// What it signs gets `key` keys.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        days: u32,
        key: KeyAlgorithm,
    ) -> Result<Ca, CertError> {
        check_days(days)?;
        let key_alg = key;
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            days,
            key: key_alg,
        })
    }

    /// The same CA, signing certificates valid for `days` instead of its own lifetime.
    pub fn leaf_days(mut self, days: u32) -> Result<Ca, CertError> {
        check_days(days)?;
        self.days = days;
        Ok(self)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
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
        let key = self.key.generate()?;
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

/// What a certificate says about itself that decides when to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Facts {
    /// When to replace it: with a third of its lifetime left, as cert-manager does by default,
    /// so a missed renewal still leaves weeks to notice.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(StdDuration::ZERO);
        self.not_after - life / 3
    }

    /// Whether it names every one of `dns_names` and `ips`.
    pub fn covers(&self, dns_names: &[String], ips: &[IpAddr]) -> bool {
        dns_names.iter().all(|n| self.dns_names.contains(n))
            && ips.iter().all(|ip| self.ips.contains(ip))
    }
}

fn system_time(ts: i64) -> SystemTime {
    match u64::try_from(ts) {
        Ok(secs) => UNIX_EPOCH + StdDuration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

/// Reads the first certificate of a PEM text (a bundle's first is the newest by convention).
pub fn facts(cert_pem: &str) -> Result<Facts, CertError> {
    use x509_parser::{extensions::GeneralName, pem::parse_x509_pem};
    let (_, pem) =
        parse_x509_pem(cert_pem.as_bytes()).map_err(|e| CertError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let validity = cert.validity();
    let mut out = Facts {
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        dns_names: Vec::new(),
        ips: Vec::new(),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => out.dns_names.push((*n).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        out.ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        out.ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Generates a fresh CA and a serving certificate signed by it.
pub fn generate(req: &Request) -> Result<Bundle, CertError> {
    if req.dns_names.is_empty() && req.ips.is_empty() {
        return Err(CertError::NoNames);
    }
    let ca = Ca::with_key("bulwark webhook CA", req.days, req.key)?;
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

/// Writes a PEM file through a temporary file and a rename, so a webhook watching the files
/// never reads half of one. `private` (keys) makes it 0600, others 0644.
///
/// The temporary file gets an unpredictable name beside `path` and is created exclusively
/// (`create_new`: never an existing file, never through a symlink) with its final mode, so a
/// key is not readable by others at any moment, whatever was in the directory before.
pub fn write_pem(path: &Path, content: &str, private: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.display().to_string(),
        source,
    };
    let (mut file, tmp) = create_temporary(path, private).map_err(err)?;
    let written = file
        .write_all(content.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// A new file beside `path`, `.NAME.RANDOM.tmp`, created exclusively with its final mode.
fn create_temporary(path: &Path, private: bool) -> std::io::Result<(fs::File, PathBuf)> {
    use rsa::rand_core::{OsRng, RngCore};
    use std::io::{Error, ErrorKind};
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    // A name someone else made first is skipped; a few attempts are plenty for random names.
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", OsRng.next_u64()));
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if private { 0o600 } else { 0o644 });
        }
        #[cfg(not(unix))]
        let _ = private;
        match opts.open(&tmp) {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(
        ErrorKind::AlreadyExists,
        "no free temporary file name beside it",
    ))
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
            key: KeyAlgorithm::EcdsaP256,
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
            key: KeyAlgorithm::default(),
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
    fn facts_decide_renewal_and_a_kept_ca_signs_again() {
        let ca = Ca::new("test CA", 3650).unwrap().leaf_days(30).unwrap();
        let names = service_dns_names("bulwark-webhook", "bulwark-system");
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let leaf = ca.server(&names, &[ip]).unwrap();
        let f = facts(&leaf.cert_pem).unwrap();
        let life = f.not_after.duration_since(f.not_before).unwrap();
        // 30 days plus the five minutes of clock slack.
        assert_eq!(life.as_secs(), 30 * 86_400 + 300);
        assert_eq!(f.not_after.duration_since(f.renew_at()).unwrap(), life / 3);
        assert!(f.covers(&names, &[ip]));
        assert!(!f.covers(&["other".to_owned()], &[]));
        assert!(!f.covers(&[], &["10.0.0.1".parse().unwrap()]));

        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem(), 1, KeyAlgorithm::EcdsaP256).unwrap();
        let second = again.server(&names, &[]).unwrap();
        let f2 = facts(&second.cert_pem).unwrap();
        assert_eq!(
            f2.not_after
                .duration_since(f2.not_before)
                .unwrap()
                .as_secs(),
            86_400 + 300
        );
        let ca_facts = facts(ca.cert_pem()).unwrap();
        assert!(ca_facts.not_after > f.not_after);

        assert!(matches!(
            facts("not a certificate"),
            Err(CertError::Parse(_))
        ));
        assert!(Ca::from_pem(ca.cert_pem(), "garbage", 1, KeyAlgorithm::EcdsaP256).is_err());
    }

    #[test]
    fn rsa_on_request() {
        let alg: KeyAlgorithm = "rsa-2048".parse().unwrap();
        assert_eq!(alg, KeyAlgorithm::Rsa { bits: 2048 });
        assert!(matches!(
            "rsa-1024".parse::<KeyAlgorithm>(),
            Err(CertError::KeyAlgorithm(_))
        ));
        let ca = Ca::with_key("rsa CA", 30, alg).unwrap();
        let leaf = ca.server(&["bulwark-webhook".into()], &[]).unwrap();
        assert!(leaf.key_pem.contains("BEGIN PRIVATE KEY"));
        // A kept RSA CA loads from its PEM and signs again.
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem(), 1, alg).unwrap();
        let second = again.server(&["bulwark-webhook".into()], &[]).unwrap();
        assert!(
            facts(&second.cert_pem)
                .unwrap()
                .covers(&["bulwark-webhook".into()], &[])
        );
        // The key is RSA: its SubjectPublicKeyInfo says rsaEncryption (1.2.840.113549.1.1.1).
        let (_, pem) = x509_parser::pem::parse_x509_pem(second.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(
            cert.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.113549.1.1.1"
        );
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_written_exclusively_and_private_from_the_start() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir =
            std::env::temp_dir().join(format!("bulwark-certs-exclusive-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let key = dir.join("tls.key");
        // What someone with write access to the directory could leave at a guessable
        // temporary name: a world-readable file, and a symlink to a file of their choosing.
        let planted = dir.join("tls.tmp");
        fs::write(&planted, "planted").unwrap();
        fs::set_permissions(&planted, fs::Permissions::from_mode(0o666)).unwrap();
        let cert = dir.join("ca.crt");
        let elsewhere = dir.join("elsewhere");
        symlink(&elsewhere, dir.join("ca.tmp")).unwrap();

        write_pem(&key, "KEY", true).unwrap();
        write_pem(&cert, "CERT", false).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "KEY");
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert!(
            fs::symlink_metadata(&cert).unwrap().is_file(),
            "not a symlink"
        );
        assert_eq!(
            fs::read_to_string(&planted).unwrap(),
            "planted",
            "left alone"
        );
        assert!(!elsewhere.exists(), "nothing written through the symlink");
        // Overwriting keeps the mode, and no temporary file is left behind.
        write_pem(&key, "KEY2", true).unwrap();
        assert_eq!(mode(&key), 0o600);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.crt", "ca.tmp", "tls.key", "tls.tmp"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_three_files() {
        let dir = std::env::temp_dir().join(format!("bulwark-certs-test-{}", std::process::id()));
        let b = generate(&Request {
            dns_names: vec!["localhost".into()],
            ips: vec![],
            days: 1,
            key: KeyAlgorithm::default(),
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
