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

/// A plain HTTP client for test plumbing (after installing the process's TLS provider).
pub fn client() -> reqwest::Client {
    atcr_verify::net::install_crypto_provider();
    reqwest::Client::new()
}
