//! `provider_codec`: the per-request JSON work of `/provide` on its own — parsing a
//! Gatekeeper `ProviderRequest` and writing the `ProviderResponse` — for 1 and 100 keys.
//!
//! Run: `cargo bench --bench provider_codec`.

use std::sync::Arc;

use atcr_verify::server::provider::{Item, ProviderResponse, parse_request};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use serde_json::value::RawValue;

fn request(n: usize) -> Vec<u8> {
    let keys: Vec<String> = (0..n)
        .map(|i| format!("registry.example.com:5000/team/app{i}:v1.2.{i}"))
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "externaldata.gatekeeper.sh/v1beta1",
        "kind": "ProviderRequest",
        "request": {"keys": keys},
    }))
    .unwrap()
}

fn response(n: usize) -> ProviderResponse {
    // A verdict of the size a real one has (~900 bytes).
    let value: Arc<RawValue> = Arc::from(
        serde_json::value::to_raw_value(&json!({
            "verified": true,
            "digest": format!("sha256:{}", "a".repeat(64)),
            "policy": "prod", "action": "enforce",
            "did": "did:plc:abcdefghijklmnopqrstuvwx", "handle": "alice.example.com",
            "signedAt": "2026-11-26T07:26:43.123Z",
            "signatures": [{"did": "did:plc:abcdefghijklmnopqrstuvwx", "counted": true,
                "uri": format!("at://did:plc:abcdefghijklmnopqrstuvwx/io.atcr.signature/{}", "3".repeat(13)),
                "reason": "trusted signer within its validity window"}],
            "reason": "1 trusted signature, policy requires 1",
        }))
        .unwrap(),
    );
    let items = (0..n)
        .map(|i| Item {
            key: format!("registry.example.com:5000/team/app{i}:v1.2.{i}"),
            value: Some(Arc::clone(&value)),
            error: None,
        })
        .collect();
    ProviderResponse::new(items, &[])
}

fn bench(c: &mut Criterion) {
    for n in [1, 100] {
        let body = request(n);
        assert_eq!(parse_request(&body, 1000).unwrap().len(), n);
        c.bench_function(&format!("parse_request {n} keys"), |b| {
            b.iter(|| parse_request(std::hint::black_box(&body), 1000))
        });
        let response = response(n);
        c.bench_function(&format!("response to_json {n} keys"), |b| {
            b.iter(|| std::hint::black_box(&response).to_json())
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
