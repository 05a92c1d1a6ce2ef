//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does it:
//! the holder renews `renewTime` every few seconds; another replica takes over once the
//! lease has not been renewed for its duration. Writes carry the resourceVersion they read,
//! so two replicas racing for an expired lease cannot both win.

use std::time::{Duration, SystemTime};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

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
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: read the lease and create, renew or take it over if we may. `Ok(true)`
    /// when we hold it afterwards; a lost race is `Ok(false)`.
    pub async fn round(&self) -> Result<bool, kube::Error> {
        let now = SystemTime::now();
        let current = self.api.get_opt(&self.name).await?;
        // A Lease without a spec is held by no one: taken over (replaced), not created again.
        let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
        let step = step(spec.as_ref(), &self.identity, now);
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let result = match (step, current) {
            (Step::Follow, _) => return Ok(false),
            (Step::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
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
                // resourceVersion from the read: a concurrent writer makes this a 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
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
