//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does it:
//! the holder renews `renewTime` every few seconds; another replica takes over once the
//! lease has not been renewed for its duration. Writes carry the resourceVersion they read,
//! so two replicas racing for an expired lease cannot both win.
//!
//! The Lease also carries the plan's [`Safety`] state, in two annotations only the leader
//! writes: every renewal writes the latest (so a hold is recorded every few seconds while it
//! lasts), a removal is recorded before it is carried out, and a replica that takes the
//! Lease over reads them in the same request, before it may act.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

use super::plan::Safety;

/// When the last removal was decided (RFC 3339), on the leader Lease.
pub const LAST_REMOVAL_ANNOTATION: &str = "bulwark.io/last-removal";
/// When a remediation hold was last in force (RFC 3339), on the leader Lease.
pub const LAST_HOLD_ANNOTATION: &str = "bulwark.io/last-hold";

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader Lease: {0}")]
    Api(#[from] kube::Error),
    #[error("leader Lease: held by another replica")]
    NotHolder,
    #[error("leader Lease: changed by others on every attempt")]
    Contended,
}

fn rfc3339(t: SystemTime) -> Option<String> {
    Timestamp::try_from(t).ok().map(|t| t.to_string())
}

/// Pure: the safety state a Lease records. A time after `now` (a skewed clock) counts as now;
/// a value that does not parse counts as absent.
pub fn recorded(meta: &ObjectMeta, now: SystemTime) -> Safety {
    let time = |key: &str| {
        meta.annotations
            .as_ref()?
            .get(key)?
            .parse::<Timestamp>()
            .ok()
            .map(|t| SystemTime::from(t).min(now))
    };
    Safety {
        last_removal: time(LAST_REMOVAL_ANNOTATION),
        last_hold: time(LAST_HOLD_ANNOTATION),
    }
}

/// Pure: writes `safety` into a Lease's annotations; a time it does not have is left as is.
pub fn record(meta: &mut ObjectMeta, safety: Safety) {
    for (key, time) in [
        (LAST_REMOVAL_ANNOTATION, safety.last_removal),
        (LAST_HOLD_ANNOTATION, safety.last_hold),
    ] {
        if let Some(text) = time.and_then(rfc3339) {
            meta.annotations
                .get_or_insert_with(Default::default)
                .insert(key.to_owned(), text);
        }
    }
}

/// What to do with the lease as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Its holder stopped renewing (or gave it up): take it over.
    TakeOver,
    /// Someone else holds it.
    Follow,
}

/// Pure: the step for a lease seen at `now`.
pub fn step(lease: Option<&LeaseSpec>, me: &str, now: SystemTime) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Step::Renew;
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(15),
    );
    let renewed = spec
        .renew_time
        .as_ref()
        .map(|t| SystemTime::from(t.0))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if holder.is_empty() || renewed + duration <= now {
        Step::TakeOver
    } else {
        Step::Follow
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The newest safety state known: read from the Lease, or noted by the controller.
    safety: Mutex<Safety>,
}

fn micro(t: SystemTime) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .ok()
        .map(MicroTime)
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Elector {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            safety: Mutex::new(Safety::default()),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The newest safety state known. Once [`Elector::round`] has returned `Ok(true)`, it
    /// includes what the Lease recorded when this replica took it.
    pub fn safety(&self) -> Safety {
        *self.safety.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Merges `safety` in; the next renewal writes it to the Lease.
    pub fn note(&self, safety: Safety) -> Safety {
        let mut known = self.safety.lock().unwrap_or_else(PoisonError::into_inner);
        *known = known.merge(safety);
        *known
    }

    /// One round: read the lease and create, renew or take it over if we may. `Ok(true)`
    /// when we hold it afterwards; a lost race is `Ok(false)`.
    pub async fn round(&self) -> Result<bool, LeaderError> {
        let now = SystemTime::now();
        let current = self.api.get_opt(&self.name).await?;
        // Read before anything is decided: a replica taking over knows its predecessor's
        // spacing and cooldown before `true` lets it act.
        let read = current
            .as_ref()
            .map(|l| recorded(&l.metadata, now))
            .unwrap_or_default();
        let safety = self.note(read);
        // A Lease without a spec is held by no one: taken over (replaced), not created again.
        let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
        let step = step(spec.as_ref(), &self.identity, now);
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let result = match (step, current) {
            (Step::Follow, _) => return Ok(false),
            (Step::Create, _) | (_, None) => {
                let mut metadata = ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                };
                record(&mut metadata, safety);
                let lease = Lease {
                    metadata,
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: micro(now),
                        renew_time: micro(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (step, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if step == Step::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = micro(now);
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = micro(now);
                record(&mut lease.metadata, safety);
                // resourceVersion from the read: a concurrent writer makes this a 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Records on the Lease a removal decided at `at`, before it is carried out: a leader
    /// that stops right after (or whose node is deleted) still hands it on. Refused unless
    /// this replica holds the Lease; a conflict with its own renewal reads again.
    pub async fn record_removal(&self, at: SystemTime) -> Result<(), LeaderError> {
        let removal = Safety {
            last_removal: Some(at),
            last_hold: None,
        };
        for _ in 0..3 {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Err(LeaderError::NotHolder);
            };
            let holder = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref());
            if holder != Some(self.identity.as_str()) {
                return Err(LeaderError::NotHolder);
            }
            let wanted = self
                .safety()
                .merge(recorded(&lease.metadata, SystemTime::now()))
                .merge(removal);
            record(&mut lease.metadata, wanted);
            match self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    // Known only once written: a removal that could not be recorded is not
                    // carried out, and must not space the next one either.
                    self.note(wanted);
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaderError::Contended)
    }

    /// Gives the lease up on shutdown so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        record(&mut lease.metadata, self.safety());
        let _ = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
    }
}

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: SystemTime, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: micro(renewed),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn the_record_reads_back_what_was_written() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Duration::from_secs;
        let mut meta = ObjectMeta::default();
        assert_eq!(recorded(&meta, t0), Safety::default());
        let safety = Safety {
            last_removal: Some(t0),
            last_hold: Some(t0 + s(5)),
        };
        record(&mut meta, safety);
        assert_eq!(recorded(&meta, t0 + s(60)), safety);
        // Later than now (a skewed clock): counted as now. Unreadable: absent.
        assert_eq!(recorded(&meta, t0 + s(2)).last_hold, Some(t0 + s(2)));
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        annotations.insert(LAST_REMOVAL_ANNOTATION.into(), "yesterday".into());
        assert_eq!(recorded(&meta, t0 + s(60)).last_removal, None);
        // A time the record does not have leaves the annotation as it is.
        record(&mut meta, Safety::default());
        assert_eq!(recorded(&meta, t0 + s(60)).last_hold, Some(t0 + s(5)));
    }

    #[test]
    fn steps() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Duration::from_secs;
        assert_eq!(step(None, "me", t0), Step::Create);
        assert_eq!(
            step(Some(&spec(Some("me"), t0, 15)), "me", t0 + s(100)),
            Step::Renew
        );
        assert_eq!(
            step(Some(&spec(Some("other"), t0, 15)), "me", t0 + s(14)),
            Step::Follow
        );
        assert_eq!(
            step(Some(&spec(Some("other"), t0, 15)), "me", t0 + s(15)),
            Step::TakeOver
        );
        assert_eq!(
            step(Some(&spec(None, t0, 15)), "me", t0),
            Step::TakeOver,
            "released"
        );
    }
}
