//! Self-managed serving certificates: which certificate the webhook's Secret should hold.
//!
//! The Secret (type `kubernetes.io/tls`) holds the CA bundle (`ca.crt`, newest CA first), the
//! newest CA's key (`ca.key`) and the serving pair (`tls.crt`, `tls.key`). Every replica runs
//! the same plan against the same Secret and writes with the Secret's resourceVersion, so one
//! write wins and the others load what it wrote.
//!
//! A serving certificate is replaced with a third of its lifetime left, when its names no
//! longer cover the Service, or when `bulwark certs rotate` asks; it is signed by the CA the
//! API server already trusts, so no admission fails. A CA near its end is replaced in two
//! steps: the new CA joins the bundle first (and so the webhook configurations' caBundle), and
//! only after `ca_propagation` does a serving certificate signed by it replace the old one.

pub mod sync;

use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bulwark_certs::{Ca, CertError, KeyAlgorithm, Pair, facts};

/// Set (to any new value) by `bulwark certs rotate` to ask for a new serving certificate.
pub const ROTATE_ANNOTATION: &str = "bulwark.io/rotate";
/// The `bulwark.io/rotate` value the current serving certificate answered.
pub const ROTATED_ANNOTATION: &str = "bulwark.io/rotated";
/// Set by `bulwark certs rotate --ca` to ask for a new CA (in the two steps below).
pub const ROTATE_CA_ANNOTATION: &str = "bulwark.io/rotate-ca";
/// The `bulwark.io/rotate-ca` value the newest CA answered.
pub const ROTATED_CA_ANNOTATION: &str = "bulwark.io/rotated-ca";
/// Unix seconds at which a new CA joined the bundle, until a serving certificate uses it.
pub const CA_STAGED_ANNOTATION: &str = "bulwark.io/ca-staged-at";

/// What the serving certificate must be.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub ca_days: u32,
    pub cert_days: u32,
    /// Keys of new CAs and certificates; what exists keeps its kind until it is replaced.
    pub key: KeyAlgorithm,
    /// How long a new CA stays in the caBundle before anything is served with it.
    pub ca_propagation: Duration,
}

/// The Secret's contents as read (or to be written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    pub rotate: Option<String>,
    pub rotated: Option<String>,
    pub rotate_ca: Option<String>,
    pub rotated_ca: Option<String>,
    pub ca_staged_at: Option<u64>,
}

/// Why the Secret is written; a metric label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Created,
    CaUnusable,
    CaRenewalStaged,
    CaRotationStaged,
    ServingFromNewCa,
    ServingUnusable,
    RotationRequested,
    NamesChanged,
    ServingDue,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Created => "created",
            Why::CaUnusable => "ca_unusable",
            Why::CaRenewalStaged => "ca_renewal_staged",
            Why::CaRotationStaged => "ca_rotation_staged",
            Why::ServingFromNewCa => "serving_from_new_ca",
            Why::ServingUnusable => "serving_unusable",
            Why::RotationRequested => "rotation_requested",
            Why::NamesChanged => "names_changed",
            Why::ServingDue => "serving_due",
        }
    }
}

#[derive(Debug)]
pub enum SecretPlan {
    /// The Secret is right; look again at `recheck_at` at the latest.
    Keep {
        recheck_at: SystemTime,
    },
    Write {
        next: Box<Stored>,
        why: Why,
    },
}

/// The PEM blocks of a bundle, each with its END line.
fn pem_blocks(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|b| b.ends_with(END))
        .map(|b| format!("{b}\n"))
        .collect()
}

/// Whole Unix seconds, rounded up, so a wait counted from it is never cut short.
fn unix_ceil(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// A new CA and serving certificate; `requests` are the rotation requests they answer.
fn fresh(wanted: &Wanted, requests: (Option<String>, Option<String>)) -> Result<Stored, CertError> {
    let (rotate, rotate_ca) = requests;
    let ca = Ca::with_key("bulwark webhook CA", wanted.ca_days, wanted.key)?
        .leaf_days(wanted.cert_days)?;
    let Pair { cert_pem, key_pem } = ca.server(&wanted.dns_names, &wanted.ips)?;
    Ok(Stored {
        ca_bundle: ca.cert_pem().to_owned(),
        ca_key: ca.key_pem().to_owned(),
        cert: cert_pem,
        key: key_pem,
        rotated: rotate.clone(),
        rotate,
        rotated_ca: rotate_ca.clone(),
        rotate_ca,
        ca_staged_at: None,
    })
}

/// Decides what the Secret should hold at `now`, generating what is new.
pub fn plan(
    stored: Option<&Stored>,
    wanted: &Wanted,
    now: SystemTime,
) -> Result<SecretPlan, CertError> {
    let write = |next: Stored, why| SecretPlan::Write {
        next: Box::new(next),
        why,
    };
    let Some(s) = stored else {
        return Ok(write(fresh(wanted, (None, None))?, Why::Created));
    };
    let blocks = pem_blocks(&s.ca_bundle);
    let newest_ca = blocks.first().map(String::as_str).unwrap_or_default();
    let (ca, ca_facts) = match (
        Ca::from_pem(newest_ca, &s.ca_key, wanted.cert_days, wanted.key),
        facts(newest_ca),
    ) {
        (Ok(ca), Ok(f)) if now < f.not_after => (ca, f),
        // Nothing can be signed: start over. The caBundle follows the Secret, so the API
        // server trusts the new CA as soon as it has seen the patched configurations.
        _ => {
            let requests = (s.rotate.clone(), s.rotate_ca.clone());
            return Ok(write(fresh(wanted, requests)?, Why::CaUnusable));
        }
    };
    let issue = |why| -> Result<SecretPlan, CertError> {
        let Pair { cert_pem, key_pem } = ca.server(&wanted.dns_names, &wanted.ips)?;
        Ok(write(
            Stored {
                cert: cert_pem,
                key: key_pem,
                rotated: s.rotate.clone(),
                ca_staged_at: None,
                ..s.clone()
            },
            why,
        ))
    };

    if let Some(staged) = s.ca_staged_at {
        let due = UNIX_EPOCH + Duration::from_secs(staged) + wanted.ca_propagation;
        return if now >= due {
            issue(Why::ServingFromNewCa)
        } else {
            Ok(SecretPlan::Keep { recheck_at: due })
        };
    }
    let ca_requested = s.rotate_ca.is_some() && s.rotate_ca != s.rotated_ca;
    if ca_requested || now >= ca_facts.renew_at() {
        let new_ca = Ca::with_key("bulwark webhook CA", wanted.ca_days, wanted.key)?;
        // Older CAs stay trusted while they are valid: the serving certificate in use was
        // signed by one of them.
        let mut bundle = new_ca.cert_pem().to_owned();
        for old in &blocks {
            if facts(old).is_ok_and(|f| now < f.not_after) {
                bundle.push_str(old);
            }
        }
        return Ok(write(
            Stored {
                ca_bundle: bundle,
                ca_key: new_ca.key_pem().to_owned(),
                ca_staged_at: Some(unix_ceil(now)),
                rotated_ca: s.rotate_ca.clone(),
                ..s.clone()
            },
            if ca_requested {
                Why::CaRotationStaged
            } else {
                Why::CaRenewalStaged
            },
        ));
    }
    let serving = match facts(&s.cert) {
        Ok(f) if !s.key.is_empty() => f,
        _ => return issue(Why::ServingUnusable),
    };
    if s.rotate.is_some() && s.rotate != s.rotated {
        return issue(Why::RotationRequested);
    }
    if !serving.covers(&wanted.dns_names, &wanted.ips) {
        return issue(Why::NamesChanged);
    }
    if now >= serving.renew_at() {
        return issue(Why::ServingDue);
    }
    Ok(SecretPlan::Keep {
        recheck_at: serving.renew_at().min(ca_facts.renew_at()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    pub(super) fn wanted() -> Wanted {
        Wanted {
            dns_names: bulwark_certs::service_dns_names("bulwark-webhook", "bulwark-system"),
            ips: vec!["127.0.0.1".parse().unwrap()],
            ca_days: 30,
            cert_days: 9,
            key: KeyAlgorithm::EcdsaP256,
            ca_propagation: Duration::from_secs(10),
        }
    }

    fn written(p: SecretPlan) -> (Stored, Why) {
        match p {
            SecretPlan::Write { next, why } => (*next, why),
            SecretPlan::Keep { .. } => panic!("expected a write, got {p:?}"),
        }
    }

    fn kept(p: SecretPlan) -> SystemTime {
        match p {
            SecretPlan::Keep { recheck_at } => recheck_at,
            SecretPlan::Write { why, .. } => panic!("expected keep, got a write for {why:?}"),
        }
    }

    #[test]
    fn first_start_creates_then_keeps_until_a_third_of_the_life_is_left() {
        let w = wanted();
        let now = SystemTime::now();
        let (s, why) = written(plan(None, &w, now).unwrap());
        assert_eq!(why, Why::Created);
        assert_eq!(pem_blocks(&s.ca_bundle).len(), 1);
        assert!(facts(&s.cert).unwrap().covers(&w.dns_names, &w.ips));

        let recheck = kept(plan(Some(&s), &w, now).unwrap());
        // Serving: 9 days (+5 min slack) of life, renewed with 3 days left.
        let left = facts(&s.cert)
            .unwrap()
            .not_after
            .duration_since(recheck)
            .unwrap();
        assert_eq!(left.as_secs(), (9 * DAY.as_secs() + 300) / 3);

        let (renewed, why) = written(plan(Some(&s), &w, recheck).unwrap());
        assert_eq!(why, Why::ServingDue);
        assert_eq!(
            renewed.ca_bundle, s.ca_bundle,
            "same CA, caBundle unchanged"
        );
        assert_eq!(renewed.ca_key, s.ca_key);
        assert_ne!(renewed.cert, s.cert);
        assert_ne!(renewed.key, s.key);
    }

    #[test]
    fn rotation_requests_are_answered_once() {
        let w = wanted();
        let now = SystemTime::now();
        let (mut s, _) = written(plan(None, &w, now).unwrap());
        s.rotate = Some("2026-11-26T00:00:00Z".into());
        let (r, why) = written(plan(Some(&s), &w, now).unwrap());
        assert_eq!(why, Why::RotationRequested);
        assert_eq!(r.rotated, r.rotate);
        assert_ne!(r.cert, s.cert);
        kept(plan(Some(&r), &w, now).unwrap());
    }

    #[test]
    fn new_names_and_broken_serving_pairs_get_a_new_certificate() {
        let mut w = wanted();
        let now = SystemTime::now();
        let (s, _) = written(plan(None, &w, now).unwrap());
        w.dns_names.push("bulwark.example.com".into());
        let (r, why) = written(plan(Some(&s), &w, now).unwrap());
        assert_eq!(why, Why::NamesChanged);
        assert!(facts(&r.cert).unwrap().covers(&w.dns_names, &w.ips));

        for broken in [
            Stored {
                cert: "garbage".into(),
                ..r.clone()
            },
            Stored {
                key: String::new(),
                ..r.clone()
            },
        ] {
            let (fixed, why) = written(plan(Some(&broken), &w, now).unwrap());
            assert_eq!(why, Why::ServingUnusable);
            assert_eq!(fixed.ca_bundle, r.ca_bundle);
        }
    }

    #[test]
    fn an_unusable_or_expired_ca_starts_over() {
        let w = wanted();
        let now = SystemTime::now();
        let (s, _) = written(plan(None, &w, now).unwrap());
        for broken in [
            Stored {
                ca_key: "garbage".into(),
                ..s.clone()
            },
            Stored {
                ca_bundle: String::new(),
                ..s.clone()
            },
        ] {
            let (r, why) = written(plan(Some(&broken), &w, now).unwrap());
            assert_eq!(why, Why::CaUnusable);
            assert_ne!(r.ca_bundle, s.ca_bundle);
        }
        let (_, why) = written(plan(Some(&s), &w, now + 31 * DAY).unwrap());
        assert_eq!(why, Why::CaUnusable);
    }

    #[test]
    fn a_new_ca_is_trusted_before_anything_is_served_with_it() {
        let w = wanted();
        let start = SystemTime::now();
        let (s, _) = written(plan(None, &w, start).unwrap());
        // The CA (30 days) is due with 10 days left; the serving certificate was renewed on
        // day 15 and is not due before the CA.
        let at = start + 21 * DAY;
        let s = Stored {
            cert: String::new(),
            ..s
        };
        let (s, _) = written(plan(Some(&s), &w, start + 15 * DAY).unwrap());
        let (staged, why) = written(plan(Some(&s), &w, at).unwrap());
        assert_eq!(why, Why::CaRenewalStaged);
        let blocks = pem_blocks(&staged.ca_bundle);
        assert_eq!(blocks.len(), 2, "new CA first, the old one still trusted");
        assert_eq!(blocks[1], pem_blocks(&s.ca_bundle)[0]);
        assert_eq!(
            staged.cert, s.cert,
            "still served by the old CA's certificate"
        );

        let until = kept(plan(Some(&staged), &w, at).unwrap());
        // Staged at whole seconds, rounded up: never less than the propagation time.
        let wait = until.duration_since(at).unwrap();
        assert!(wait >= w.ca_propagation && wait < w.ca_propagation + Duration::from_secs(1));

        let (served, why) = written(plan(Some(&staged), &w, until).unwrap());
        assert_eq!(why, Why::ServingFromNewCa);
        assert_eq!(served.ca_staged_at, None);
        assert_eq!(served.ca_bundle, staged.ca_bundle);
        assert_ne!(served.cert, s.cert);
        assert_ne!(
            pem_blocks(&served.ca_bundle)[0],
            pem_blocks(&s.ca_bundle)[0]
        );
        // (Certificates are dated by the wall clock, not by the simulated day 21, so the
        // new CA cannot be judged at `until` here.)
    }

    #[test]
    fn a_requested_ca_rotation_is_staged_once() {
        let w = wanted();
        let now = SystemTime::now();
        let (mut s, _) = written(plan(None, &w, now).unwrap());
        s.rotate_ca = Some("1".into());
        let (staged, why) = written(plan(Some(&s), &w, now).unwrap());
        assert_eq!(why, Why::CaRotationStaged);
        assert_eq!(pem_blocks(&staged.ca_bundle).len(), 2);
        assert_eq!(staged.rotated_ca, staged.rotate_ca);
        let (served, why) = written(
            plan(
                Some(&staged),
                &w,
                now + w.ca_propagation + Duration::from_secs(1),
            )
            .unwrap(),
        );
        assert_eq!(why, Why::ServingFromNewCa);
        // Answered: no second new CA for the same request.
        kept(plan(Some(&served), &w, now).unwrap());
    }

    #[test]
    fn bundles_split_into_certificates() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----";
        assert_eq!(
            pem_blocks(&format!("{a}{b}\n")),
            vec![a.to_owned(), format!("{b}\n")]
        );
        assert!(pem_blocks("").is_empty());
        assert!(pem_blocks("no pem here").is_empty());
    }
}
