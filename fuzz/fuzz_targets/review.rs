//! Any body: decoding never panics; a review that decodes gets a mutate and a validate answer
//! that serialise to an AdmissionReview echoing its uid, bounded in size. The webhook is the
//! one `bulwark webhook --offline` runs, built through the library entry, and its sweeper runs
//! between inputs.
#![no_main]

use std::{sync::OnceLock, time::Instant};

use bulwark::{config::Config, review::wire::decode, serve::http::Endpoint, webhook::Webhook};
use libfuzzer_sys::fuzz_target;

fn webhook() -> &'static Webhook {
    static WEBHOOK: OnceLock<Webhook> = OnceLock::new();
    WEBHOOK.get_or_init(|| Webhook::new(Config::default().webhook, true))
}

fuzz_target!(|body: &[u8]| {
    let now = Instant::now();
    let webhook = webhook();
    webhook.sweep(now);
    let Ok((mutated, _)) = webhook.answer(Endpoint::Mutate, body, now) else {
        return;
    };
    let (validated, _) = webhook
        .answer(Endpoint::Validate, body, now)
        .expect("what decodes for one endpoint decodes for the other");
    let uid = decode(body).expect("it was answered").allow().uid;
    for out in [mutated, validated] {
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
