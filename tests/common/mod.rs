//! Shared test harness: the real ATProto world (`world`), the real OCI registry and a push
//! client (`registry`), spec-following fakes for faults and the Referrers API (`fake`), and
//! proof-editing tools (`repo`).

#![allow(dead_code)]

pub mod certs;
pub mod fake;
pub mod registry;
pub mod repo;
pub mod server;
pub mod world;

use std::time::{Duration, Instant};

/// Polls `condition` every 20 ms until it holds; fails the test, naming `what`, if it
/// still does not after `within`.
pub async fn wait_until(within: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP client for test plumbing (after installing the process's TLS provider).
pub fn client() -> reqwest::Client {
    atcr_verify::net::install_crypto_provider();
    reqwest::Client::new()
}
