use super::*;
use crate::policy::parse_rate;

fn report(from: u64, seq: u64, reserved: &[(&str, u32, u32)], pending: u64) -> Report {
    Report {
        from,
        seq,
        hits: Vec::new(),
        reserved: reserved
            .iter()
            .map(|(ns, live, pending)| Reserved {
                ns: (*ns).into(),
                live: *live,
                pending: *pending,
            })
            .collect(),
        reserved_pending: pending,
    }
}

#[test]
fn peers_reservations_add_up_and_the_last_report_replaces_the_one_before() {
    let t = Instant::now();
    let mut book = PeerBook::new(1);
    book.accept(&report(2, 1, &[("ci", 3, 2)], 2), t).unwrap();
    book.accept(&report(3, 7, &[("ci", 1, 1), ("web", 4, 0)], 1), t)
        .unwrap();
    assert_eq!(book.reserved("ci", t), (4, 3));
    assert_eq!(book.reserved("web", t), (4, 0));
    assert_eq!(book.reserved("other", t), (0, 0));
    assert_eq!(book.reserved_pending(t), 3);
    // Peer 2's next report holds nothing in ci any more.
    book.accept(&report(2, 2, &[], 0), t).unwrap();
    assert_eq!(book.reserved("ci", t), (1, 1));
    assert!(book.heard_from(2, t) && book.heard_from(3, t));
}

#[test]
fn a_silent_peer_ages_out_and_its_reservations_with_it() {
    let t = Instant::now();
    let mut book = PeerBook::new(1);
    book.accept(&report(2, 1, &[("ci", 3, 3)], 3), t).unwrap();
    let just_before = t + PEER_TIMEOUT - Duration::from_millis(1);
    assert_eq!(book.reserved("ci", just_before), (3, 3));
    assert!(book.heard_from(2, just_before));
    let after = t + PEER_TIMEOUT;
    assert_eq!(book.reserved("ci", after), (0, 0));
    assert_eq!(book.reserved_pending(after), 0);
    assert!(!book.heard_from(2, after));
    book.age_out(after);
    assert!(book.is_empty());
}

#[test]
fn own_repeated_and_older_reports_are_refused() {
    let t = Instant::now();
    let mut book = PeerBook::new(1);
    assert_eq!(book.accept(&report(1, 1, &[], 0), t), Err(ReportError::Own));
    book.accept(&report(2, 5, &[("ci", 1, 0)], 0), t).unwrap();
    for seq in [5, 4] {
        let refused = book.accept(&report(2, seq, &[("ci", 9, 0)], 0), t);
        assert_eq!(refused.map_err(|e| e.label()), Err("replay"));
    }
    assert_eq!(book.reserved("ci", t), (1, 0), "a replay changes nothing");
}

#[test]
fn the_book_keeps_a_bounded_number_of_peers() {
    let t = Instant::now();
    let mut book = PeerBook::new(0);
    for id in 1..=MAX_PEERS as u64 {
        book.accept(&report(id, 1, &[], 0), t).unwrap();
    }
    let extra = report(1000, 1, &[], 0);
    assert_eq!(book.accept(&extra, t), Err(ReportError::TooManyPeers));
    // Once the others age out there is room again.
    book.accept(&extra, t + PEER_TIMEOUT).unwrap();
    assert!(book.heard_from(1000, t + PEER_TIMEOUT) && !book.heard_from(1, t + PEER_TIMEOUT));
}

#[test]
fn reports_past_their_bounds_are_refused() {
    let ok = report(2, 1, &[("ci", 3, 1)], 1);
    assert!(ok.check().is_ok());
    let mut body = serde_json::to_vec(&ok).unwrap();
    assert_eq!(Report::decode(&body).unwrap(), ok);

    let too_many = Report {
        hits: (0..=MAX_REPORT_NAMESPACES)
            .map(|i| Hits {
                ns: format!("n{i}"),
                n: 1,
            })
            .collect(),
        ..ok.clone()
    };
    let bad = [
        too_many,
        report(2, 1, &[("", 1, 0)], 0),
        report(2, 1, &[(&"x".repeat(64), 1, 0)], 0),
        report(2, 1, &[("ci", MAX_RESERVED + 1, 0)], 0),
        report(2, 1, &[("ci", 1, 2)], 0),
        Report {
            hits: vec![Hits {
                ns: "ci".into(),
                n: MAX_HITS + 1,
            }],
            ..ok.clone()
        },
        report(2, 1, &[], u64::MAX),
    ];
    for r in bad {
        assert_eq!(r.check().map_err(|e| e.label()), Err("bounds"), "{r:?}");
    }
    for body in [
        &b"{}"[..],
        b"[]",
        b"{\"from\":1,\"seq\":1,\"extra\":1}",
        b"\xff",
    ] {
        assert_eq!(
            Report::decode(body).map_err(|e| e.label()),
            Err("malformed")
        );
    }
    body.resize(MAX_REPORT_BYTES + 1, b' ');
    assert_eq!(Report::decode(&body).map_err(|e| e.label()), Err("bounds"));
}

#[test]
fn the_part_is_the_whole_rate_for_one_group_and_a_share_for_a_split_one() {
    let r = parse_rate("30/s").unwrap().unwrap();
    let whole = Part::new(3, 3);
    assert!(whole.is_whole());
    assert_eq!(whole.rate(r).interval, r.interval);
    assert_eq!(whole.burst(10), 10);

    // Cut off from both others: its 1/3; the two still together share 2/3.
    let alone = Part::new(1, 3);
    assert_eq!(alone.rate(r).interval, r.interval * 3);
    assert_eq!(alone.burst(10), 4);
    let pair = Part::new(2, 3);
    assert_eq!(pair.rate(r).interval, r.interval * 3 / 2);
    assert_eq!(pair.burst(10), 7);
    assert_eq!(pair.burst(1), 1, "never less than one");

    // A group larger than the ready replicas is all of them; nothing ready is one.
    assert_eq!(Part::new(5, 3), whole);
    assert_eq!(Part::new(0, 0), Part::WHOLE);
}

#[test]
fn reports_go_at_once_for_capped_namespaces_half_a_burst_used_or_near_the_cluster_cap() {
    let mut policy = Policy {
        rate: parse_rate("10/s").unwrap(),
        burst: 10,
        max_pods: None,
        max_pending_pods: None,
        ..Policy::default()
    };
    let sec = 1_000_000_000;
    let now = 100 * sec;
    let snap = Snapshot::default();
    // Four of ten used: not yet; five: yes.
    assert!(!near_limit(
        &policy,
        &snap,
        now + 4 * sec / 10,
        now,
        Part::WHOLE
    ));
    assert!(near_limit(
        &policy,
        &snap,
        now + 5 * sec / 10,
        now,
        Part::WHOLE
    ));
    // An idle bucket (TAT in the past) is far from it.
    assert!(!near_limit(&policy, &snap, now - sec, now, Part::WHOLE));
    // The cluster cap, within a fifth.
    let cluster = |pending| Snapshot {
        cluster_pending: pending,
        cluster_cap: Some(crate::quota::decide::ClusterCap {
            limit: 100,
            basis: crate::quota::decide::CapBasis::Absolute,
        }),
        ..Snapshot::default()
    };
    assert!(!near_limit(
        &policy,
        &cluster(79),
        now - sec,
        now,
        Part::WHOLE
    ));
    assert!(near_limit(
        &policy,
        &cluster(80),
        now - sec,
        now,
        Part::WHOLE
    ));
    // Any count cap: always.
    policy.rate = None;
    assert!(!near_limit(&policy, &snap, 0, now, Part::WHOLE));
    policy.max_pods = Some(100);
    assert!(near_limit(&policy, &snap, 0, now, Part::WHOLE));
    policy.max_pods = None;
    policy.max_pending_pods = Some(100);
    assert!(near_limit(&policy, &snap, 0, now, Part::WHOLE));
}

#[test]
fn the_overshoot_bound_grows_with_the_other_replicas_the_burst_and_the_lag() {
    let lag = Duration::from_millis(100);
    assert_eq!(overshoot_bound(20.0, 10, lag, 1), 0.0);
    assert_eq!(overshoot_bound(20.0, 10, lag, 3), 2.0 * (10.0 + 2.0));
    assert!(overshoot_bound(20.0, 10, lag * 2, 3) > overshoot_bound(20.0, 10, lag, 3));
}
