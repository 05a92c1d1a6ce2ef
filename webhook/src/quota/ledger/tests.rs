//! The ledger against the real cache: reservations, expiry, dry runs, warn mode, workflows,
//! concurrency, the waiting lines, the shared rate, and replicas sharing their consumption.

use std::sync::Barrier;

use super::*;
use crate::{
    cluster::cache::{Cache, PodEntry, PodState},
    policy::{
        parse_rate,
        pod::{Held, PodRules},
    },
    quota::{
        ClusterLimits,
        view::{NamespaceInfo, PodCounts},
    },
};

const TTL: Duration = Duration::from_secs(30);

/// A cache, a ledger and the cluster limits, at a fixed start time.
struct Fixture {
    t: Instant,
    cache: Cache,
    ledger: Ledger,
    limits: Limits,
}

impl Fixture {
    fn new(cluster_max_pending: Option<u32>) -> Self {
        let t = Instant::now();
        Fixture {
            t,
            cache: Cache::new(Policy::default(), PodRules::default()),
            ledger: Ledger::new(TTL, t),
            limits: Limits {
                cluster: ClusterLimits {
                    max_pending_pods: cluster_max_pending,
                    pending_per_healthy_node: None,
                },
                workflow_reserved_percent: 20,
                count_quotas: true,
            },
        }
    }

    fn admit_as(
        &self,
        name: Option<&str>,
        p: &Policy,
        ask: Ask<'_>,
        commit: Commit,
        at: Instant,
    ) -> Result<(), Refusal> {
        let req = request("ci", name, p, ask, commit);
        self.ledger.admit(&self.cache, &req, &self.limits, at)
    }

    /// The wait a refusal by [`Draining`] names, for an unnamed pod in `namespace`.
    fn wait_in_draining(
        &self,
        namespace: &str,
        p: &Policy,
        commit: Commit,
        at: Instant,
    ) -> Duration {
        let req = request(namespace, None, p, Ask::default(), commit);
        self.ledger
            .admit(&Draining, &req, &self.limits, at)
            .unwrap_err()
            .expected_wait()
    }

    /// An unnamed pod outside workflows in namespace "ci", at the start time.
    fn admit(&self, p: &Policy, commit: Commit) -> Result<(), Refusal> {
        self.admit_as(None, p, Ask::default(), commit, self.t)
    }

    /// An unnamed pod outside workflows in `namespace`, enforced, at the start time.
    fn enforce_in(&self, namespace: &str, p: &Policy) -> Result<(), Refusal> {
        let req = request(namespace, None, p, Ask::default(), Commit::Enforce);
        self.ledger.admit(&self.cache, &req, &self.limits, self.t)
    }

    fn workflow(&self, p: &Policy, workflow: &'static str) -> Result<(), Refusal> {
        let ask = Ask {
            pending_exempt: false,
            workflow: Some(workflow),
        };
        self.admit_as(None, p, ask, Commit::Enforce, self.t)
    }
}

fn request<'a>(
    namespace: &'a str,
    name: Option<&'a str>,
    policy: &'a Policy,
    ask: Ask<'a>,
    commit: Commit,
) -> Request<'a> {
    Request {
        namespace,
        name,
        policy,
        ask,
        commit,
        joins_line: true,
        unknown_namespace: false,
    }
}

fn counts_only(max_pods: Option<u32>, max_pending: Option<u32>) -> Policy {
    Policy {
        rate: None,
        max_pods,
        max_pending_pods: max_pending,
        ..Policy::default()
    }
}

fn rated(rate: &str, burst: u32) -> Policy {
    Policy {
        rate: parse_rate(rate).unwrap(),
        burst,
        ..counts_only(None, None)
    }
}

fn pending(workflow: Option<&str>) -> PodEntry {
    PodEntry {
        state: PodState::Pending,
        held: Held::All,
        workflow: workflow.map(Arc::from),
    }
}

#[test]
fn without_count_quotas_only_the_rate_refuses() {
    let mut f = Fixture::new(Some(1));
    f.limits.count_quotas = false;
    let p = Policy {
        max_pods: Some(1),
        max_pending_pods: Some(1),
        ..rated("3/m", 3)
    };
    for _ in 0..3 {
        assert_eq!(f.admit(&p, Commit::Enforce), Ok(()));
    }
    assert_eq!(f.admit(&p, Commit::Enforce).unwrap_err().reason(), "rate");
    // Admissions while counts were off still count once they are back on.
    f.limits.count_quotas = true;
    let later = f.t + Duration::from_secs(1);
    let refused = f.admit_as(None, &p, Ask::default(), Commit::Enforce, later);
    assert_eq!(refused.unwrap_err().reason(), "max_pods");
}

#[test]
fn reservations_count_until_the_watch_shows_the_pod() {
    let f = Fixture::new(None);
    let p = counts_only(Some(2), None);
    let admit = |name: &str| f.admit_as(Some(name), &p, Ask::default(), Commit::Enforce, f.t);
    assert!(admit("a").is_ok());
    assert!(admit("b").is_ok());
    assert_eq!(admit("c").unwrap_err().reason(), "max_pods");
    assert_eq!(f.ledger.reserved(), 2);

    // The watch shows "a": the cache counts it, the reservation goes; still full.
    f.cache.apply_pod("ci", "a", pending(None), f.t);
    f.ledger.observe_created("ci", "a");
    assert_eq!(f.ledger.reserved(), 1);
    assert!(admit("c").is_err());
    // "a" is deleted: a slot opens.
    f.cache.delete_pod("ci", "a", f.t);
    assert!(admit("c").is_ok());
}

#[test]
fn reservations_expire_after_ttl() {
    let f = Fixture::new(None);
    let p = counts_only(None, Some(1));
    let admit = |at: Instant| f.admit_as(None, &p, Ask::default(), Commit::Enforce, at);
    assert!(admit(f.t).is_ok());
    let r = admit(f.t + TTL - Duration::from_millis(1));
    assert_eq!(r.unwrap_err().reason(), "max_pending");
    // The pod never showed up (another webhook refused it): the slot comes back.
    assert!(admit(f.t + TTL).is_ok());
    f.ledger.sweep(f.t + 3 * TTL);
    assert_eq!(f.ledger.reserved(), 0);
}

#[test]
fn generate_name_pods_match_the_oldest_nameless_reservation() {
    let f = Fixture::new(None);
    let p = counts_only(None, None);
    f.admit(&p, Commit::Enforce).unwrap();
    f.admit_as(Some("named"), &p, Ask::default(), Commit::Enforce, f.t)
        .unwrap();
    f.ledger.observe_created("ci", "job-x7k2p");
    f.ledger.observe_created("ci", "unrelated-pod");
    assert_eq!(f.ledger.reserved(), 1, "the named reservation stays");
    f.ledger.observe_created("ci", "named");
    assert_eq!(f.ledger.reserved(), 0);
}

#[test]
fn dry_run_consumes_nothing() {
    let f = Fixture::new(None);
    let p = Policy {
        max_pods: Some(1),
        ..rated("1/m", 1)
    };
    for _ in 0..5 {
        assert!(f.admit(&p, Commit::DryRun).is_ok());
    }
    assert_eq!(f.ledger.reserved(), 0);
    assert!(f.admit(&p, Commit::Enforce).is_ok());
    let r = f.admit(&p, Commit::DryRun);
    assert_eq!(
        r.unwrap_err().reason(),
        "max_pods",
        "dry-run still tells the verdict"
    );
}

#[test]
fn warn_mode_counts_the_pod_but_not_the_rate() {
    let f = Fixture::new(None);
    let p = rated("1/s", 1);
    assert!(f.admit(&p, Commit::Warn).is_ok());
    assert_eq!(f.admit(&p, Commit::Warn).unwrap_err().reason(), "rate");
    assert_eq!(f.ledger.reserved(), 2, "the warned pod is still counted");
    // The rate state did not run ahead: one second later one creation fits again.
    let later = f.t + Duration::from_secs(1);
    assert!(
        f.admit_as(None, &p, Ask::default(), Commit::Enforce, later)
            .is_ok()
    );
}

#[test]
fn workflow_with_a_reservation_counts_as_started() {
    let f = Fixture::new(None);
    let p = counts_only(None, Some(5)); // 1 slot kept for started workflows
    for _ in 0..4 {
        f.workflow(&p, "a").unwrap();
    }
    assert_eq!(f.workflow(&p, "b").unwrap_err().reason(), "workflow_share");
    assert!(f.workflow(&p, "a").is_ok());
    // A workflow whose pods the watch shows is started too.
    f.cache.apply_pod("ci", "c-1", pending(Some("c")), f.t);
    let p10 = counts_only(None, Some(10));
    for _ in 0..3 {
        f.workflow(&p10, "a").unwrap();
    }
    // 9 pending of 10, 2 kept: "c" may, a new "d" may not.
    assert!(f.workflow(&p10, "c").is_ok());
    assert!(f.workflow(&p10, "d").is_err());
}

#[test]
fn concurrent_admissions_never_overshoot_namespace_or_cluster_caps() {
    let f = Arc::new(Fixture::new(Some(120)));
    let p = counts_only(Some(50), None);
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (f, barrier, p) = (f.clone(), barrier.clone(), p.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut ok = [0u32; 4];
                for n in 0..100 {
                    // Four namespaces hammered from every thread at once.
                    let k = (i + n) % 4;
                    let ns = ["a", "b", "c", "d"][k];
                    if f.enforce_in(ns, &p).is_ok() {
                        ok[k] += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut per_ns = [0u32; 4];
    for h in handles {
        for (acc, n) in per_ns.iter_mut().zip(h.join().unwrap()) {
            *acc += n;
        }
    }
    assert!(per_ns.iter().all(|&n| n <= 50), "{per_ns:?}");
    assert_eq!(
        per_ns.iter().sum::<u32>(),
        120,
        "{per_ns:?}: the cluster cap is exact"
    );
    assert_eq!(f.ledger.reserved(), 120);
}

/// A namespace at its pending cap whose pods start at 10 per second.
struct Draining;

impl ClusterView for Draining {
    fn namespace(&self, _: &str) -> Option<Arc<NamespaceInfo>> {
        None
    }
    fn pod_counts(&self, _: &str, _: Option<&str>, _: Instant) -> PodCounts {
        PodCounts {
            pending: 10,
            live: 10,
            pending_drain_rate: 10.0,
            ..Default::default()
        }
    }
    fn cluster_pending(&self) -> u64 {
        10
    }
    fn cluster_drain_rate(&self, _: Instant) -> f64 {
        10.0
    }
    fn schedulable_nodes(&self) -> Option<u32> {
        None
    }
}

#[test]
fn refused_clients_line_up_and_leave_the_line_when_due() {
    let f = Fixture::new(None);
    let p = counts_only(None, Some(10));
    let refuse = |commit, at| f.wait_in_draining("ci", &p, commit, at);
    // A dry run does not retry: it does not join the line.
    assert_eq!(refuse(Commit::DryRun, f.t), Duration::from_millis(100));
    assert_eq!(refuse(Commit::DryRun, f.t), Duration::from_millis(100));
    let waits: Vec<_> = (0..20).map(|_| refuse(Commit::Enforce, f.t)).collect();
    assert_eq!(waits[0], Duration::from_millis(100));
    assert_eq!(
        waits[9],
        Duration::from_secs(1),
        "10th in line at 10 pods/s"
    );
    assert_eq!(waits[19], Duration::from_secs(2));
    // All 20 were told to come back after 1 s (0.1 s rounds up) or 2 s. The periodic sweep
    // keeps a namespace whose line is not empty, although it holds no reservation.
    f.ledger.sweep(f.t + Duration::from_secs(1));
    let later = |secs| refuse(Commit::DryRun, f.t + Duration::from_secs(secs));
    assert_eq!(later(1), Duration::from_millis(1100));
    assert_eq!(later(2), Duration::from_millis(100));
    // Another namespace has its own line.
    let other = f.wait_in_draining("b", &p, Commit::Enforce, f.t);
    assert_eq!(other, Duration::from_millis(100));
}

#[test]
fn refusals_for_the_cluster_cap_line_up_across_namespaces() {
    let f = Fixture::new(Some(10));
    let p = counts_only(None, None);
    let waits = ["a", "b", "c"].map(|ns| f.wait_in_draining(ns, &p, Commit::Enforce, f.t));
    assert_eq!(
        waits,
        [100, 200, 300].map(Duration::from_millis),
        "one line for the cluster cap"
    );
}

#[test]
fn rate_limits_per_namespace() {
    let f = Fixture::new(None);
    let p = rated("5/s", 3);
    for _ in 0..3 {
        f.admit(&p, Commit::Enforce).unwrap();
    }
    let r = f.admit(&p, Commit::Enforce).unwrap_err();
    assert_eq!(r.expected_wait(), Duration::from_millis(200));
    assert!(f.enforce_in("b", &p).is_ok());
}

#[test]
fn replicas_share_the_rate_and_the_refusal_names_the_whole_limit() {
    let f = Fixture::new(None);
    f.ledger.set_replicas(2);
    // 10/s burst 5 over two replicas: this one admits 3 at once (5/2 rounded up), then
    // one every 200 ms.
    let p = rated("10/s", 5);
    for _ in 0..3 {
        f.admit(&p, Commit::Enforce).unwrap();
    }
    let r = f.admit(&p, Commit::Enforce).unwrap_err();
    assert_eq!(r.expected_wait(), Duration::from_millis(200));
    let message = r.message("a", 1);
    assert!(
        message.contains("10/s (burst 5)"),
        "the namespace's limit, not this replica's part: {message}"
    );
    let admit = |at| f.admit_as(None, &p, Ask::default(), Commit::Enforce, at);
    assert!(admit(f.t + Duration::from_millis(200)).is_ok());
    assert!(admit(f.t + Duration::from_millis(200)).is_err());

    // Zero ready replicas seen (e.g. none ready yet) counts as this one alone.
    f.ledger.set_replicas(0);
    assert_eq!(f.ledger.replicas(), 1);
    assert!(f.enforce_in("b", &p).is_ok());
}

fn unknown<'a>(namespace: &'a str, name: Option<&'a str>, policy: &'a Policy) -> Request<'a> {
    Request {
        unknown_namespace: true,
        ..request(namespace, name, policy, Ask::default(), Commit::Enforce)
    }
}

#[test]
fn a_namespace_holds_at_most_its_bound_of_reservations_dropping_the_oldest() {
    let f = Fixture::new(None);
    let p = counts_only(None, None);
    let names: Vec<String> = (0..=MAX_NAMESPACE_RESERVATIONS)
        .map(|i| format!("p{i}"))
        .collect();
    for name in &names {
        f.admit_as(Some(name), &p, Ask::default(), Commit::Enforce, f.t)
            .unwrap();
    }
    assert_eq!(f.ledger.reserved(), MAX_NAMESPACE_RESERVATIONS as u64);
    // The oldest went: the watch showing it releases nothing; the newest is still held.
    f.ledger.observe_created("ci", "p0");
    assert_eq!(f.ledger.reserved(), MAX_NAMESPACE_RESERVATIONS as u64);
    f.ledger.observe_created("ci", names.last().unwrap());
    assert_eq!(f.ledger.reserved(), MAX_NAMESPACE_RESERVATIONS as u64 - 1);
}

#[test]
fn at_the_total_bound_a_namespace_replaces_its_own_oldest() {
    let f = Fixture::new(None);
    let p = counts_only(None, None);
    let per = MAX_NAMESPACE_RESERVATIONS as u64;
    let full = MAX_RESERVATIONS / per;
    for n in 0..full {
        let ns = format!("ns{n}");
        for _ in 0..per {
            f.enforce_in(&ns, &p).unwrap();
        }
    }
    assert_eq!(f.ledger.reserved(), MAX_RESERVATIONS);
    // A refused creation takes nothing, and drops nothing either.
    assert!(f.enforce_in("ns0", &counts_only(Some(0), None)).is_err());
    assert_eq!(
        f.ledger.namespaces.get("ns0").map(|n| n.reservations.len()),
        Some(per as usize)
    );
    // A namespace with reservations trades its oldest for the new one...
    f.enforce_in("ns0", &p).unwrap();
    assert_eq!(f.ledger.reserved(), MAX_RESERVATIONS);
    // ...one with none still gets its first, and only that.
    f.enforce_in("fresh", &p).unwrap();
    f.enforce_in("fresh", &p).unwrap();
    assert_eq!(f.ledger.reserved(), MAX_RESERVATIONS + 1);
}

#[test]
fn unknown_namespaces_are_admitted_under_the_defaults_in_a_small_table() {
    let f = Fixture::new(Some(1000));
    let p = counts_only(None, None);
    // Made-up namespaces, many reviews each: never more than the table's bounds held.
    for n in 0..1000 {
        let ns = format!("made-up-{n}");
        for _ in 0..3 {
            f.ledger
                .admit(&f.cache, &unknown(&ns, None, &p), &f.limits, f.t)
                .unwrap();
        }
    }
    assert_eq!(f.ledger.reserved(), strangers::MAX_RESERVATIONS as u64);
    assert_eq!(f.ledger.strangers_held(), strangers::MAX_NAMESPACES);
    assert!(f.ledger.namespaces.is_empty(), "nothing in the known table");
    // Their slots of the cluster cap are bounded the same way and short-lived.
    assert_eq!(
        f.ledger.reserved_pending.load(Ordering::Relaxed),
        strangers::MAX_RESERVATIONS as u64
    );
    let later = f.t + strangers::TTL;
    f.ledger.sweep(later);
    assert_eq!(f.ledger.reserved(), 0);
    assert_eq!(f.ledger.reserved_pending.load(Ordering::Relaxed), 0);
    assert_eq!(f.ledger.strangers_held(), 0, "no rate state left either");
}

#[test]
fn an_unknown_namespace_is_held_to_the_defaults_and_released_by_the_watch() {
    let f = Fixture::new(None);
    let p = rated("1/s", 2);
    let admit = |name| {
        f.ledger.admit(
            &f.cache,
            &unknown("brand-new", Some(name), &p),
            &f.limits,
            f.t,
        )
    };
    admit("a").unwrap();
    admit("b").unwrap();
    assert!(matches!(admit("c"), Err(Refusal::Rate { .. })));
    // The watch shows the new namespace's pod: its reservation is released as usual.
    f.ledger.observe_created("brand-new", "a");
    assert_eq!(f.ledger.reserved(), 1);
}

/// Two replicas that each fold the other's reports in hold one namespace's rate together,
/// and a replica outside the group keeps its own part.
#[test]
fn replicas_in_one_group_share_the_whole_rate() {
    let a = Fixture::new(None);
    let b = Ledger::new(TTL, a.t);
    for l in [&a.ledger, &b] {
        l.set_replicas(2);
        l.set_group(2);
        l.set_reporting(true);
    }
    let p = rated("10/s", 4);
    let rate_of = |_: &str| Some((p.rate.unwrap(), p.burst));
    let on_b = |at| {
        b.admit(
            &a.cache,
            &request("ci", None, &p, Ask::default(), Commit::Enforce),
            &a.limits,
            at,
        )
    };
    // The whole burst on replica a.
    for _ in 0..4 {
        a.admit(&p, Commit::Enforce).unwrap();
    }
    assert!(a.admit(&p, Commit::Enforce).is_err());
    // a reports; b folds the four hits in and has nothing left either.
    let (report, _) = a.ledger.report(1);
    assert_eq!(
        report.hits,
        vec![Hits {
            ns: "ci".into(),
            n: 4
        }]
    );
    assert_eq!(report.reserved[0].live, 4);
    b.absorb(&report, true, rate_of, a.t).unwrap();
    assert!(on_b(a.t).is_err(), "b saw a's hits");
    // The hits went out once: the next report carries none.
    assert!(a.ledger.report(2).0.hits.is_empty());
    // 100 ms later one creation fits, on whichever replica gets it.
    let later = a.t + Duration::from_millis(100);
    assert!(on_b(later).is_ok());
    b.report(1).0.hits.iter().for_each(|h| assert_eq!(h.n, 1));
}

#[test]
fn a_peer_outside_the_group_keeps_its_own_part_and_its_reservations_still_count() {
    let a = Fixture::new(None);
    a.ledger.set_replicas(2);
    a.ledger.set_group(1);
    let mut p = rated("10/s", 4);
    p.max_pods = Some(5);
    let peer = Report {
        from: 99,
        seq: 1,
        hits: vec![Hits {
            ns: "ci".into(),
            n: 50,
        }],
        reserved: vec![Reserved {
            ns: "ci".into(),
            live: 3,
            pending: 0,
        }],
        reserved_pending: 0,
    };
    let rate_of = |_: &str| Some((p.rate.unwrap(), p.burst));
    a.ledger.absorb(&peer, false, rate_of, a.t).unwrap();
    // Its part is half the burst (2), untouched by the peer's hits; its reservations (3) and
    // these 2 fill max-pods 5.
    a.admit(&p, Commit::Enforce).unwrap();
    a.admit(&p, Commit::Enforce).unwrap();
    let refused = a.admit_as(
        None,
        &p,
        Ask::default(),
        Commit::Enforce,
        a.t + Duration::from_millis(500),
    );
    assert!(
        matches!(refused, Err(Refusal::MaxPods { live: 5, .. })),
        "{refused:?}"
    );
    // Once the peer stops reporting, its reservations age out.
    let later = a.t + peers::PEER_TIMEOUT + Duration::from_secs(1);
    assert!(
        a.admit_as(None, &p, Ask::default(), Commit::Enforce, later)
            .is_ok()
    );
}

#[test]
fn a_report_claiming_many_hits_takes_at_most_the_buckets_and_a_timeout() {
    let a = Fixture::new(None);
    let p = rated("10/s", 4);
    let rate_of = |_: &str| Some((p.rate.unwrap(), p.burst));
    let flood = Report {
        from: 7,
        seq: 1,
        hits: vec![Hits {
            ns: "ci".into(),
            n: peers::MAX_HITS,
        }],
        ..Report::default()
    };
    a.ledger.absorb(&flood, true, rate_of, a.t).unwrap();
    // Refused now, but admitted again once the burst and one peer timeout have passed, not
    // after the 10,000 s the hits would take.
    assert!(a.admit(&p, Commit::Enforce).is_err());
    let after = a.t + peers::PEER_TIMEOUT + Duration::from_millis(100);
    assert!(
        a.admit_as(None, &p, Ask::default(), Commit::Enforce, after)
            .is_ok()
    );
    // Namespaces the cluster does not show take nothing from a report.
    let unknown = Report { seq: 2, ..flood };
    a.ledger.absorb(&unknown, true, |_| None, a.t).unwrap();
}

#[test]
fn near_a_limit_the_peers_are_nudged_at_once() {
    let a = Fixture::new(None);
    let nudged = Arc::new(AtomicU32::new(0));
    let n = nudged.clone();
    a.ledger.on_near_limit(Box::new(move || {
        n.fetch_add(1, Ordering::Relaxed);
    }));
    a.ledger.set_reporting(true);
    let p = rated("10/s", 10);
    for _ in 0..4 {
        a.admit(&p, Commit::Enforce).unwrap();
    }
    assert_eq!(
        nudged.load(Ordering::Relaxed),
        0,
        "far from the limit: batched"
    );
    a.admit(&p, Commit::Enforce).unwrap();
    assert_eq!(
        nudged.load(Ordering::Relaxed),
        1,
        "half the burst used: at once"
    );
}

#[test]
fn without_peers_nothing_is_kept_for_reports() {
    let a = Fixture::new(None);
    let p = rated("10/s", 4);
    a.admit(&p, Commit::Enforce).unwrap();
    assert!(a.ledger.report(1).0.hits.is_empty());
    // Once idle, the namespace is swept: no hit kept it.
    a.ledger.sweep(a.t + TTL + Duration::from_secs(1));
    assert_eq!(
        a.ledger.report(2).0,
        Report {
            from: a.ledger.id(),
            seq: 2,
            ..Report::default()
        }
    );
}

#[test]
fn strangers_are_never_reported() {
    let a = Fixture::new(None);
    a.ledger.set_reporting(true);
    let p = rated("10/s", 4);
    let req = Request {
        unknown_namespace: true,
        ..request("made-up", None, &p, Ask::default(), Commit::Enforce)
    };
    a.ledger.admit(&a.cache, &req, &a.limits, a.t).unwrap();
    let (report, _) = a.ledger.report(1);
    assert!(
        report.hits.is_empty() && report.reserved.is_empty(),
        "{report:?}"
    );
}

/// With two replicas admitting at once, each takes at most its share of the slots its peer
/// may not know of; once the peer confirms the report, the rest are this replica's again.
#[test]
fn unconfirmed_reservations_hold_a_replica_to_its_share_of_the_slots_left() {
    let a = Fixture::new(None);
    a.ledger.set_replicas(2);
    a.ledger.set_group(2);
    a.ledger.set_reporting(true);
    let p = counts_only(Some(6), None);
    // ceil(6 / 2) = 3 unconfirmed at most.
    for _ in 0..3 {
        a.admit(&p, Commit::Enforce).unwrap();
    }
    let refused = a.admit(&p, Commit::Enforce);
    assert!(
        matches!(
            refused,
            Err(Refusal::MaxPods {
                live: 6,
                limit: 6,
                ..
            })
        ),
        "{refused:?}"
    );
    // The peer has the report: 3 known, 3 left, and this replica's share of those is 2.
    let (_, sent) = a.ledger.report(1);
    a.ledger.confirm(&sent);
    a.admit(&p, Commit::Enforce).unwrap();
    a.admit(&p, Commit::Enforce).unwrap();
    assert!(a.admit(&p, Commit::Enforce).is_err());
    // Alone again (no peer to wait for), the rest of the cap is its own.
    a.ledger.set_group(1);
    a.admit(&p, Commit::Enforce).unwrap();
    assert!(a.admit(&p, Commit::Enforce).is_err(), "6 of 6");
}
