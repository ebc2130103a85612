//! atcr-verify: admit only container images signed by trusted ATProto identities.
//!
//! Layers, each importing only from those before it:
//! [`syntax`] (identifiers) → [`crypto`] (keys, low-S ECDSA) → [`did_document`] (the
//! `#atproto` key and PDS of a DID) → [`proof`] (CAR, commit, MST, record: bytes in,
//! proven signature out) → [`policy`] (trust-policy YAML → verdict per image) → [`net`]
//! (the guarded outbound HTTP client) → [`resolve`] (registries, DIDs, PDSes, behind
//! traits) → [`bundle`] (the same sources recorded to, and read from, an offline
//! file) → [`verify`] (orchestration and caches) and [`sign`] (the writer's side: record
//! and artifact for an account) → faces ([`server`], [`cli`]; the CLI
//! sets up logging). The proof and policy layers do no network I/O and take every input
//! as bytes or values (the time included), so they can be fuzzed and benchmarked on their
//! own.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod bundle;
pub mod cli;
pub mod crypto;
pub mod did_document;
pub mod file;
pub mod follow;
pub mod net;
pub mod plc;
pub mod policy;
pub mod proof;
pub mod resolve;
pub mod server;
pub mod sign;
pub mod syntax;
pub mod verify;
