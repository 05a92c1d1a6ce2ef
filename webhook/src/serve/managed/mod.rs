//! Self-managed serving certificates: which certificate the webhook's Secret should hold.
//!
//! The Secret (type `kubernetes.io/tls`) holds the CA bundle (`ca.crt`, newest CA first), the
//! serving pair (`tls.crt`, `tls.key`) and, while a renewal waits to be trusted, the next pair
//! (`next.crt`, `next.key`). It holds no CA key: every serving certificate is signed by a CA
//! made for it alone, whose key is dropped as soon as it has signed, so nothing in the Secret
//! (which every serving pod reads) can sign another certificate, and a CA that must go is
//! revoked by leaving the bundle. Every replica runs the same plan against the same Secret and
//! writes with the Secret's resourceVersion, so one write wins and the others load it.
//!
//! A renewal (a third of the serving certificate's life left, names that no longer cover the
//! Service, or `bulwark certs rotate [--ca]`) goes in steps, so no admission fails:
//! 1. staged: a new CA joins the bundle first and the pair it signed waits in `next.*`;
//!    `bulwark cabundle` copies the bundle into the webhook configurations' caBundle;
//! 2. trusted: once every caBundle holds the new CA, the time is recorded;
//! 3. served: `ca_propagation` later the next pair becomes the serving pair;
//! 4. retired: older CAs leave the bundle once every ready endpoint of the Service serves the
//!    new certificate and at least `ca_retire_after` has passed since it was first served.

pub mod cabundle;
pub mod fleet;
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
/// Set by `bulwark certs rotate --ca`. Every renewal makes a new CA now, so it asks for the
/// same as `bulwark.io/rotate`; kept so that both requests are answered.
pub const ROTATE_CA_ANNOTATION: &str = "bulwark.io/rotate-ca";
/// The `bulwark.io/rotate-ca` value the newest CA answered.
pub const ROTATED_CA_ANNOTATION: &str = "bulwark.io/rotated-ca";
/// Unix seconds at which a new CA joined the bundle, until the pair it signed is served.
pub const CA_STAGED_ANNOTATION: &str = "bulwark.io/ca-staged-at";
/// Unix seconds at which every caBundle was first seen holding the staged CA.
pub const CA_TRUSTED_ANNOTATION: &str = "bulwark.io/ca-trusted-at";
/// Unix seconds at which the newest CA's certificate was first served, until older CAs are
/// retired.
pub const CA_PROMOTED_ANNOTATION: &str = "bulwark.io/ca-promoted-at";

/// The common name of every CA bulwark makes.
const CA_NAME: &str = "bulwark webhook CA";
/// How soon to ask the replicas again whether they all serve the current certificate.
const FLEET_RECHECK: Duration = Duration::from_secs(30);

/// What the serving certificate must be.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub cert_days: u32,
    /// Keys of new CAs and certificates; what exists keeps its kind until it is replaced.
    pub key: KeyAlgorithm,
    /// How long a new CA is in every caBundle before anything is served with it.
    pub ca_propagation: Duration,
    /// How long after a certificate of a new CA is first served the older CAs stay trusted
    /// at least (and then until every replica is seen serving it).
    pub ca_retire_after: Duration,
}

/// The Secret's contents as read (or to be written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub ca_bundle: String,
    pub cert: String,
    pub key: String,
    /// The staged pair, signed by the newest CA of the bundle; empty when nothing is staged.
    pub next_cert: String,
    pub next_key: String,
    /// The Secret still holds a CA key (`ca.key`, from an earlier bulwark): it is dropped.
    pub legacy_ca_key: bool,
    pub rotate: Option<String>,
    pub rotated: Option<String>,
    pub rotate_ca: Option<String>,
    pub rotated_ca: Option<String>,
    pub ca_staged_at: Option<u64>,
    pub ca_trusted_at: Option<u64>,
    pub ca_promoted_at: Option<u64>,
}

/// What the plan needs to know beyond the Secret, found out by the caller (`sync.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every webhook of both configurations has the newest CA of the bundle in its caBundle.
    pub trusted: bool,
    /// Every ready endpoint of the Service serves the Secret's `tls.crt`.
    pub fleet_current: bool,
}

/// Why the Secret is written; a metric label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Created,
    CaUnusable,
    ServingUnusable,
    CaKeyDropped,
    CaRotationStaged,
    RotationRequested,
    NamesChanged,
    ServingDue,
    StagedPairUnusable,
    CaTrusted,
    CaNoLongerTrusted,
    ServingFromNewCa,
    OldCasRetired,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Created => "created",
            Why::CaUnusable => "ca_unusable",
            Why::ServingUnusable => "serving_unusable",
            Why::CaKeyDropped => "ca_key_dropped",
            Why::CaRotationStaged => "ca_rotation_staged",
            Why::RotationRequested => "rotation_requested",
            Why::NamesChanged => "names_changed",
            Why::ServingDue => "serving_due",
            Why::StagedPairUnusable => "staged_pair_unusable",
            Why::CaTrusted => "ca_trusted",
            Why::CaNoLongerTrusted => "ca_no_longer_trusted",
            Why::ServingFromNewCa => "serving_from_new_ca",
            Why::OldCasRetired => "old_cas_retired",
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
pub fn pem_blocks(bundle: &str) -> Vec<String> {
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

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

impl Stored {
    /// A renewal is staged: a new CA is in the bundle, its pair not yet served.
    pub fn is_staged(&self) -> bool {
        self.ca_staged_at.is_some()
    }

    /// The newest CA of the bundle, the one a caBundle must hold.
    pub fn newest_ca(&self) -> Option<String> {
        pem_blocks(&self.ca_bundle).into_iter().next()
    }

    /// Older CAs could be retired now, if every replica serves the current certificate: the
    /// caller asks the replicas only then.
    pub fn retire_due(&self, wanted: &Wanted, now: SystemTime) -> bool {
        !self.is_staged()
            && pem_blocks(&self.ca_bundle).len() > 1
            && self
                .ca_promoted_at
                .is_none_or(|t| now >= at(t) + wanted.ca_retire_after)
    }
}

/// A CA made to sign one pair, and that pair. The CA's key goes when this returns: the CA can
/// sign nothing else, ever.
fn issue(wanted: &Wanted) -> Result<(String, Pair), CertError> {
    // A day longer than what it signs, so the pair never outlives its CA.
    let ca_days = wanted.cert_days.saturating_add(1).min(3650);
    let ca = Ca::with_key(CA_NAME, ca_days, wanted.key)?.leaf_days(wanted.cert_days)?;
    let pair = ca.server(&wanted.dns_names, &wanted.ips)?;
    Ok((ca.cert_pem().to_owned(), pair))
}

/// A new CA and serving pair, served at once: nothing usable is served yet.
fn fresh(wanted: &Wanted, s: Option<&Stored>) -> Result<Stored, CertError> {
    let (ca_pem, Pair { cert_pem, key_pem }) = issue(wanted)?;
    let rotate = s.and_then(|s| s.rotate.clone());
    let rotate_ca = s.and_then(|s| s.rotate_ca.clone());
    Ok(Stored {
        ca_bundle: ca_pem,
        cert: cert_pem,
        key: key_pem,
        rotated: rotate.clone(),
        rotate,
        rotated_ca: rotate_ca.clone(),
        rotate_ca,
        ..Stored::default()
    })
}

/// Step 1: a new CA joins the bundle (older ones stay: what is served now was signed by one
/// of them) and the pair it signed waits in `next.*`.
fn stage(s: &Stored, wanted: &Wanted, now: SystemTime) -> Result<Stored, CertError> {
    let (ca_pem, Pair { cert_pem, key_pem }) = issue(wanted)?;
    let mut bundle = ca_pem;
    for old in pem_blocks(&s.ca_bundle) {
        if facts(&old).is_ok_and(|f| now < f.not_after) {
            bundle.push_str(&old);
        }
    }
    Ok(Stored {
        ca_bundle: bundle,
        next_cert: cert_pem,
        next_key: key_pem,
        rotated: s.rotate.clone(),
        rotated_ca: s.rotate_ca.clone(),
        ca_staged_at: Some(unix_ceil(now)),
        ca_trusted_at: None,
        ca_promoted_at: None,
        ..s.clone()
    })
}

/// Decides what the Secret should hold at `now`, generating what is new.
pub fn plan(
    stored: Option<&Stored>,
    wanted: &Wanted,
    observed: Observed,
    now: SystemTime,
) -> Result<SecretPlan, CertError> {
    let write = |next: Stored, why| SecretPlan::Write {
        next: Box::new(next),
        why,
    };
    let Some(s) = stored else {
        return Ok(write(fresh(wanted, None)?, Why::Created));
    };
    // Nothing usable to serve or to trust: start over. The caBundle follows the Secret, so
    // the API server trusts the new CA as soon as it has seen the updated configurations.
    let ca = match s.newest_ca().map(|pem| facts(&pem)) {
        Some(Ok(f)) if now < f.not_after => f,
        _ => return Ok(write(fresh(wanted, Some(s))?, Why::CaUnusable)),
    };
    let serving = match facts(&s.cert) {
        Ok(f) if !s.key.is_empty() && now < f.not_after => f,
        _ => return Ok(write(fresh(wanted, Some(s))?, Why::ServingUnusable)),
    };
    if s.legacy_ca_key {
        return Ok(write(
            Stored {
                legacy_ca_key: false,
                ..s.clone()
            },
            Why::CaKeyDropped,
        ));
    }

    if let Some(staged) = s.ca_staged_at {
        if facts(&s.next_cert).is_err() || s.next_key.is_empty() {
            return Ok(write(stage(s, wanted, now)?, Why::StagedPairUnusable));
        }
        return Ok(match (observed.trusted, s.ca_trusted_at) {
            (false, None) => SecretPlan::Keep {
                recheck_at: at(staged) + wanted.ca_propagation,
            },
            // Dropped from a caBundle since (and being restored): the wait starts over.
            (false, Some(_)) => write(
                Stored {
                    ca_trusted_at: None,
                    ..s.clone()
                },
                Why::CaNoLongerTrusted,
            ),
            (true, None) => write(
                Stored {
                    ca_trusted_at: Some(unix_ceil(now)),
                    ..s.clone()
                },
                Why::CaTrusted,
            ),
            (true, Some(trusted)) if now >= at(trusted) + wanted.ca_propagation => write(
                Stored {
                    cert: s.next_cert.clone(),
                    key: s.next_key.clone(),
                    next_cert: String::new(),
                    next_key: String::new(),
                    ca_staged_at: None,
                    ca_trusted_at: None,
                    ca_promoted_at: Some(unix_ceil(now)),
                    ..s.clone()
                },
                Why::ServingFromNewCa,
            ),
            (true, Some(trusted)) => SecretPlan::Keep {
                recheck_at: at(trusted) + wanted.ca_propagation,
            },
        });
    }

    let renewal = if s.rotate_ca.is_some() && s.rotate_ca != s.rotated_ca {
        Some(Why::CaRotationStaged)
    } else if s.rotate.is_some() && s.rotate != s.rotated {
        Some(Why::RotationRequested)
    } else if !serving.covers(&wanted.dns_names, &wanted.ips) {
        Some(Why::NamesChanged)
    } else if now >= serving.renew_at().min(ca.renew_at()) {
        Some(Why::ServingDue)
    } else {
        None
    };
    if let Some(why) = renewal {
        return Ok(write(stage(s, wanted, now)?, why));
    }
    let next_renewal = serving.renew_at().min(ca.renew_at());
    if s.retire_due(wanted, now) {
        if !observed.fleet_current {
            return Ok(SecretPlan::Keep {
                recheck_at: (now + FLEET_RECHECK).min(next_renewal),
            });
        }
        let newest = s.newest_ca().unwrap_or_default();
        return Ok(write(
            Stored {
                ca_bundle: newest,
                ca_promoted_at: None,
                ..s.clone()
            },
            Why::OldCasRetired,
        ));
    }
    let retire_at = (pem_blocks(&s.ca_bundle).len() > 1)
        .then(|| s.ca_promoted_at.map(|t| at(t) + wanted.ca_retire_after))
        .flatten();
    Ok(SecretPlan::Keep {
        recheck_at: retire_at.map_or(next_renewal, |r| r.min(next_renewal)),
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
            cert_days: 9,
            key: KeyAlgorithm::EcdsaP256,
            ca_propagation: Duration::from_secs(10),
            ca_retire_after: Duration::from_secs(60),
        }
    }

    const NOTHING: Observed = Observed {
        trusted: false,
        fleet_current: false,
    };
    const TRUSTED: Observed = Observed {
        trusted: true,
        fleet_current: false,
    };
    const EVERYWHERE: Observed = Observed {
        trusted: true,
        fleet_current: true,
    };

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

    fn step(s: &Stored, observed: Observed, now: SystemTime) -> (Stored, Why) {
        written(plan(Some(s), &wanted(), observed, now).unwrap())
    }

    fn created(now: SystemTime) -> Stored {
        written(plan(None, &wanted(), NOTHING, now).unwrap()).0
    }

    /// Renewed at `now` (on request, unless `s` already asks): the Secret staged, trusted and
    /// served.
    fn renewed(s: &Stored, now: SystemTime) -> (Stored, Stored, Stored) {
        let w = wanted();
        let mut s = s.clone();
        if s.rotate == s.rotated && s.rotate_ca == s.rotated_ca {
            s.rotate = Some("renew".into());
        }
        let (staged, _) = step(&s, NOTHING, now);
        let (trusted, why) = step(&staged, TRUSTED, now);
        assert_eq!(why, Why::CaTrusted);
        let due = now + w.ca_propagation + Duration::from_secs(1);
        let (served, why) = step(&trusted, TRUSTED, due);
        assert_eq!(why, Why::ServingFromNewCa);
        (staged, trusted, served)
    }

    #[test]
    fn first_start_creates_then_keeps_until_a_third_of_the_life_is_left() {
        let w = wanted();
        let now = SystemTime::now();
        let (s, why) = written(plan(None, &w, NOTHING, now).unwrap());
        assert_eq!(why, Why::Created);
        assert_eq!(pem_blocks(&s.ca_bundle).len(), 1);
        assert!(facts(&s.cert).unwrap().covers(&w.dns_names, &w.ips));
        assert!(!s.is_staged() && s.next_cert.is_empty());

        let recheck = kept(plan(Some(&s), &w, NOTHING, now).unwrap());
        // Serving: 9 days (+5 min slack) of life, renewed with 3 days left.
        let left = facts(&s.cert)
            .unwrap()
            .not_after
            .duration_since(recheck)
            .unwrap();
        assert_eq!(left.as_secs(), (9 * DAY.as_secs() + 300) / 3);
        let (_, why) = step(&s, NOTHING, recheck);
        assert_eq!(why, Why::ServingDue);
    }

    #[test]
    fn a_renewal_is_trusted_before_it_is_served_and_needs_no_ca_key() {
        let w = wanted();
        let start = SystemTime::now();
        let s = created(start);
        let at = start + 6 * DAY;
        let (staged, why) = step(&s, NOTHING, at);
        assert_eq!(why, Why::ServingDue);
        let blocks = pem_blocks(&staged.ca_bundle);
        assert_eq!(blocks.len(), 2, "a new CA first, the old one still trusted");
        assert_eq!(blocks[1], pem_blocks(&s.ca_bundle)[0]);
        assert_eq!(
            staged.cert, s.cert,
            "still serving the old CA's certificate"
        );
        assert!(facts(&staged.next_cert).is_ok() && !staged.next_key.is_empty());
        // Every CA is made for one certificate: a renewal has a CA of its own.
        assert_ne!(blocks[0], blocks[1]);

        // Not in the caBundles yet: nothing changes, however long it takes.
        let until = kept(plan(Some(&staged), &w, NOTHING, at + DAY).unwrap());
        assert!(until < at + DAY);
        // Trusted: recorded, then served `ca_propagation` later.
        let (trusted, why) = step(&staged, TRUSTED, at + Duration::from_secs(2));
        assert_eq!(why, Why::CaTrusted);
        let due = kept(plan(Some(&trusted), &w, TRUSTED, at + Duration::from_secs(2)).unwrap());
        let wait = due.duration_since(at + Duration::from_secs(2)).unwrap();
        assert!(wait >= w.ca_propagation && wait < w.ca_propagation + Duration::from_secs(1));
        let (served, why) = step(&trusted, TRUSTED, due);
        assert_eq!(why, Why::ServingFromNewCa);
        assert_eq!(served.cert, staged.next_cert);
        assert_eq!(served.key, staged.next_key);
        assert!(served.next_cert.is_empty() && !served.is_staged());
        assert_eq!(
            served.ca_bundle, staged.ca_bundle,
            "the old CA stays for now"
        );
        assert!(served.ca_promoted_at.is_some());
    }

    #[test]
    fn a_ca_bundle_that_loses_the_staged_ca_restarts_the_wait() {
        let now = SystemTime::now();
        let (_, trusted, _) = renewed(&created(now), now);
        let (dropped, why) = step(&trusted, NOTHING, now + Duration::from_secs(20));
        assert_eq!(why, Why::CaNoLongerTrusted);
        assert_eq!(dropped.ca_trusted_at, None);
        assert_eq!(dropped.next_cert, trusted.next_cert, "still staged");
    }

    #[test]
    fn old_cas_are_retired_once_every_replica_serves_the_new_certificate() {
        let w = wanted();
        let now = SystemTime::now();
        let first = created(now);
        let (_, _, served) = renewed(&first, now);
        let promoted = at(served.ca_promoted_at.unwrap());
        // Before the floor: kept, whatever the replicas serve, and looked at again then.
        assert!(!served.retire_due(&w, promoted));
        let recheck = kept(plan(Some(&served), &w, EVERYWHERE, promoted).unwrap());
        assert_eq!(recheck, promoted + w.ca_retire_after);
        // After it, only once every replica is seen serving the new certificate.
        let later = promoted + w.ca_retire_after;
        assert!(served.retire_due(&w, later));
        let recheck = kept(plan(Some(&served), &w, TRUSTED, later).unwrap());
        assert_eq!(recheck, later + FLEET_RECHECK);
        let (retired, why) = step(&served, EVERYWHERE, later);
        assert_eq!(why, Why::OldCasRetired);
        assert_eq!(
            pem_blocks(&retired.ca_bundle),
            pem_blocks(&served.ca_bundle)[..1]
        );
        assert!(!pem_blocks(&retired.ca_bundle).contains(&pem_blocks(&first.ca_bundle)[0]));
        assert_eq!(retired.cert, served.cert);
        assert!(!retired.retire_due(&w, later));
        kept(plan(Some(&retired), &w, NOTHING, later).unwrap());
    }

    #[test]
    fn rotation_requests_are_answered_once_with_a_new_ca() {
        let now = SystemTime::now();
        for ca in [false, true] {
            let mut s = created(now);
            if ca {
                s.rotate_ca = Some("1".into());
            } else {
                s.rotate = Some("2026-11-26T00:00:00Z".into());
            }
            let (staged, why) = step(&s, NOTHING, now);
            let expected = if ca {
                Why::CaRotationStaged
            } else {
                Why::RotationRequested
            };
            assert_eq!(why, expected);
            assert_eq!(
                (&staged.rotated, &staged.rotated_ca),
                (&s.rotate, &s.rotate_ca)
            );
            assert_eq!(pem_blocks(&staged.ca_bundle).len(), 2);
            let (_, _, served) = renewed(&s, now);
            // Answered: no second renewal for the same request.
            kept(plan(Some(&served), &wanted(), TRUSTED, now).unwrap());
        }
    }

    #[test]
    fn new_names_are_staged_and_broken_pairs_start_over() {
        let mut w = wanted();
        let now = SystemTime::now();
        let s = created(now);
        w.dns_names.push("bulwark.example.com".into());
        let (staged, why) = written(plan(Some(&s), &w, NOTHING, now).unwrap());
        assert_eq!(why, Why::NamesChanged);
        assert!(
            facts(&staged.next_cert)
                .unwrap()
                .covers(&w.dns_names, &w.ips)
        );

        for (broken, expected) in [
            (
                Stored {
                    cert: "garbage".into(),
                    ..s.clone()
                },
                Why::ServingUnusable,
            ),
            (
                Stored {
                    key: String::new(),
                    ..s.clone()
                },
                Why::ServingUnusable,
            ),
            (
                Stored {
                    ca_bundle: String::new(),
                    ..s.clone()
                },
                Why::CaUnusable,
            ),
        ] {
            let (fixed, why) = step(&broken, NOTHING, now);
            assert_eq!(why, expected);
            assert_ne!(fixed.ca_bundle, s.ca_bundle);
            assert!(facts(&fixed.cert).is_ok() && !fixed.is_staged());
        }
        let (_, why) = step(&s, NOTHING, now + 11 * DAY);
        assert_eq!(why, Why::CaUnusable, "expired");
        let broken_next = Stored {
            next_key: String::new(),
            ..staged.clone()
        };
        let (_, why) = written(plan(Some(&broken_next), &w, TRUSTED, now).unwrap());
        assert_eq!(why, Why::StagedPairUnusable);
    }

    #[test]
    fn a_ca_key_left_by_an_earlier_version_is_dropped() {
        let now = SystemTime::now();
        let s = Stored {
            legacy_ca_key: true,
            ..created(now)
        };
        let (dropped, why) = step(&s, NOTHING, now);
        assert_eq!(why, Why::CaKeyDropped);
        assert_eq!(
            dropped,
            Stored {
                legacy_ca_key: false,
                ..s
            }
        );
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
