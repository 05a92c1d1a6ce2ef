//! Hold mode's releaser: removes bulwark's scheduling gate from held pods while the pending
//! caps have room, in the order [`crate::quota::line`] decides. It runs in the webhook process
//! on one replica at a time (the `bulwark-releaser` Lease), off the admission path, with its
//! own request budget and jittered back-off; the line itself lives on the pods (their gate)
//! and in the watch cache, so a restart or a new leader loses and repeats nothing.

pub mod gate;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use crate::{
    backoff::Jittered,
    cluster::cache::Cache,
    metrics::webhook::ReleaseMetrics,
    nodes::leader::Elector,
    quota::{
        self,
        decide::cluster_cap,
        line::{self, Release, Room},
        view::ClusterView,
    },
};
use gate::{Outcome, Releaser};

/// The releaser's Lease, in the webhook's namespace.
pub const LEASE: &str = "bulwark-releaser";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often the line is looked at: the longest a pod under the caps waits behind the gate,
/// apart from the release call itself.
const PASS_EVERY: Duration = Duration::from_millis(200);
/// Releases in flight at once within a pass (the budget still bounds the rate).
const CONCURRENT_RELEASES: usize = 16;

/// The releaser's own request budget (each release is a PATCH and an Event), so a long line
/// cannot crowd the API server: a token bucket of `per_second`, holding up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            per_second: 100.0,
            burst: 200.0,
        }
    }
}

/// Tokens of a [`Budget`]; pure, so its arithmetic is tested without a clock.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    budget: Budget,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(budget: Budget, now: Instant) -> Self {
        Bucket {
            budget,
            tokens: budget.burst,
            at: now,
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> usize {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.budget.per_second).min(self.budget.burst);
        self.at = now;
        self.tokens.max(0.0) as usize
    }

    pub fn take(&mut self, n: f64) {
        self.tokens -= n;
    }
}

/// Where the releaser runs and what it may spend.
pub struct ReleaserOptions {
    /// The webhook's namespace, where its Lease is.
    pub namespace: String,
    /// This replica's name on the Lease and in Events.
    pub identity: String,
    pub budget: Budget,
}

/// A running releaser.
pub struct Running {
    task: tokio::task::JoinHandle<()>,
    elector: Arc<Elector>,
}

impl Running {
    /// Stops releasing and gives the Lease up, so the replica that replaces this one (a rolling
    /// update, a restart) takes the line over at once instead of after the Lease expires.
    /// Held pods stay held: releasing them on every stop would flood the scheduler.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        // An API server that does not answer must not hold the shutdown up: the Lease then
        // expires on its own.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.elector.release()).await;
    }
}

/// Starts the releaser.
pub fn spawn(
    client: Client,
    cache: Arc<Cache>,
    quota: quota::Settings,
    opts: ReleaserOptions,
    metrics: ReleaseMetrics,
) -> Running {
    let elector = Arc::new(Elector::new(
        Api::<Lease>::namespaced(client.clone(), &opts.namespace),
        LEASE,
        &opts.identity,
        LEASE_DURATION,
    ));
    let releaser = Releaser::new(client, Some(opts.identity));
    let task = tokio::spawn(run(
        elector.clone(),
        releaser,
        cache,
        quota,
        opts.budget,
        metrics,
    ));
    Running { task, elector }
}

async fn run(
    elector: Arc<Elector>,
    releaser: Releaser,
    cache: Arc<Cache>,
    quota: quota::Settings,
    budget: Budget,
    metrics: ReleaseMetrics,
) {
    let backoff = Jittered::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0u32;
    let mut leader = false;
    let mut renew_at = Instant::now();
    let mut bucket = Bucket::new(budget, Instant::now());
    let mut in_flight = HashSet::new();
    let mut turn = 0usize;
    loop {
        let now = Instant::now();
        if now >= renew_at {
            let was = leader;
            leader = match elector.round().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "releaser Lease");
                    false
                }
            };
            if leader != was {
                tracing::info!(leader, "releaser Lease");
                // What was in flight under another leader is not ours to count.
                in_flight.clear();
            }
            metrics.leader.set(i64::from(leader));
            renew_at = now + RENEW_EVERY;
        }
        if !leader || !cache.is_synced() {
            tokio::time::sleep(PASS_EVERY).await;
            continue;
        }
        let mut lines = cache.lines();
        let released_unseen = line::settle(&mut lines, &mut in_flight);
        let room = Room {
            cluster_pending: cache.cluster_pending().saturating_add(released_unseen),
            cluster_cap: cluster_cap(&quota.cluster, cache.schedulable_nodes()),
            workflow_reserved_percent: quota.workflow_reserved_percent,
        };
        // Each release spends two requests: the PATCH and its Event.
        let affordable = bucket.available(Instant::now()) / 2;
        let plan = line::plan(&lines, room, turn, affordable);
        turn = turn.wrapping_add(1);
        bucket.take(2.0 * plan.len() as f64);
        // Concurrently: one call at a time would make the releaser, not the caps, the limit
        // (about 20 releases/s against a busy API server, below what the scheduler clears).
        let outcomes: Vec<(Release, Outcome)> = futures::stream::iter(plan)
            .map(|r| async {
                let outcome = releaser.release(&r).await;
                (r, outcome)
            })
            .buffer_unordered(CONCURRENT_RELEASES)
            .collect()
            .await;
        let mut failed = false;
        for (r, outcome) in outcomes {
            match outcome {
                Outcome::Released => {
                    metrics.released(r.why.label(), "released", created_ago(r.created));
                    in_flight.insert((r.namespace, r.name));
                }
                Outcome::Gone => metrics.released(r.why.label(), "gone", None),
                Outcome::Failed(e) => {
                    tracing::warn!(namespace = %r.namespace, pod = %r.name, error = %e, "releasing a held pod");
                    metrics.released(r.why.label(), "failed", None);
                    failed = true;
                }
            }
        }
        if failed {
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff.delay(failures, fastrand::f64())).await;
        } else {
            failures = 0;
            tokio::time::sleep(PASS_EVERY).await;
        }
    }
}

/// Time since a Unix-seconds creation timestamp; `None` for one in the future (clock skew).
fn created_ago(created: i64) -> Option<Duration> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    now.checked_sub(u64::try_from(created).ok()?)
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_its_burst() {
        let t = Instant::now();
        let mut b = Bucket::new(
            Budget {
                per_second: 10.0,
                burst: 20.0,
            },
            t,
        );
        assert_eq!(b.available(t), 20);
        b.take(20.0);
        assert_eq!(b.available(t), 0);
        assert_eq!(b.available(t + Duration::from_millis(500)), 5);
        assert_eq!(
            b.available(t + Duration::from_secs(60)),
            20,
            "never above the burst"
        );
    }

    #[test]
    fn time_held_is_none_for_a_creation_in_the_future() {
        assert_eq!(created_ago(i64::MAX), None);
        assert_eq!(created_ago(-1), None);
        assert!(created_ago(0).is_some_and(|d| d > Duration::from_secs(1_700_000_000)));
    }
}
