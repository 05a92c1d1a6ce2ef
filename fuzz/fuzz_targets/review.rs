//! Any body: decoding never panics; a review that decodes gets a mutate and a validate answer
//! that serialise to an AdmissionReview echoing its uid, bounded in size.
#![no_main]

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use bulwark::{
    admission::{decode, encode},
    admit::Admitter,
    cache::Cache,
    config::Config,
    ledger::Ledger,
    metrics::Metrics,
};
use libfuzzer_sys::fuzz_target;

fn admitter() -> &'static Admitter {
    static ADMITTER: OnceLock<Admitter> = OnceLock::new();
    ADMITTER.get_or_init(|| {
        let config = Arc::new(Config::default());
        let cache = Arc::new(Cache::new(
            config.defaults.clone(),
            config.workflow_labels.clone(),
        ));
        let ledger = Arc::new(Ledger::new(config.reservation_ttl, Instant::now()));
        Admitter::new(config, cache, ledger, Arc::new(Metrics::new()))
    })
}

fuzz_target!(|body: &[u8]| {
    let Ok(review) = decode(body) else {
        return;
    };
    let uid = review.allow().uid;
    let (mutated, _) = admitter().mutate(&review);
    let (validated, _) = admitter().validate(&review, Instant::now());
    for resp in [mutated, validated] {
        let out = encode(resp);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("answer is JSON");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"].as_str(), Some(uid.as_str()));
        // The patch repeats at most each container's name and a few quantities: the answer
        // stays within a small multiple of the request.
        assert!(
            out.len() <= 32 * body.len() + 64 * 1024,
            "{} for {}",
            out.len(),
            body.len()
        );
    }
});
