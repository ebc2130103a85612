//! Fuzzes the trust-policy loader, then evaluates an image reference taken from the same
//! input against whatever loaded. Seeds: `fuzz/corpus/policy/` (the guide's example and
//! `policy/trust-policy.yaml`). Run: `cargo fuzz run policy`.
#![no_main]

use atcr_verify::policy::{Evidence, TrustPolicy};
use atcr_verify::syntax::ImageRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The last line, a YAML comment, doubles as an image reference: `# atcr.io/alice/app`.
    let last = text.lines().last().unwrap_or_default();
    let reference = last.strip_prefix("# ").unwrap_or(last);
    let image = reference.parse::<ImageRef>();
    if let Ok(image) = &image {
        let again: ImageRef = image.to_string().parse().expect("normalized form reparses");
        assert_eq!(&again, image);
    }
    if let (Ok(policy), Ok(image)) = (TrustPolicy::from_yaml(text), image) {
        let _ = policy.explain(&image).to_string();
        let _ = policy.evaluate(&image, &[], time::OffsetDateTime::UNIX_EPOCH);
        let signer = Evidence::failed(None, None, "fuzz");
        let _ = policy.evaluate(&image, &[signer], time::OffsetDateTime::UNIX_EPOCH);
    }
});
