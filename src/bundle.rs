//! Offline, self-certifying bundles: one versioned JSON file holding every byte that
//! verifying some images needed — each reference's manifest (and, for a tag, the
//! tag → digest fact), every signature artifact listed for it, and for the signers the
//! policy trusts, each one's DID document and `did:plc` operation log and each of their
//! records' `getRecord` CAR — each with the time it was fetched.
//!
//! Writing one ([`Recorder`]): the normal engine runs over recording decorators of the HTTP
//! sources. They call the sources' `*_raw` methods, which return the bytes they checked
//! beside the parsed fact, and keep those bytes. Recording at the source level (rather than
//! in [`crate::net::HttpClient`] by URL) keeps the bundle's format about facts, not URLs,
//! and needs no reverse-mapping of URLs (token requests, referrers pages, redirects) to
//! what they meant.
//!
//! Reading one ([`Bundle`]): the file is checked whole before anything in it is used —
//! every manifest and artifact against its digest, every `did:plc` document against its
//! operation log (signatures, CIDs, the genesis hash), every CAR block against its CID — so
//! a tampered bundle is refused with the place and the rule broken. Then [`Bundle`] is the
//! engine's [`Registry`](crate::resolve::Registry), [`DidResolver`](crate::resolve::DidResolver)
//! and [`RecordSource`](crate::resolve::RecordSource), running the same checks as the
//! network sources over the bundle's bytes, and the normal proof code checks commit
//! signatures and inclusion proofs. Nobody needs to trust whoever built the bundle, except
//! for what no signature covers: a tag's digest and the fetch times (a `did:web` document,
//! which no signature covers either, is refused offline; see the README's "Offline
//! bundles").

mod format;
mod offline;
mod record;

pub use format::{
    BundleFile, IdentityEntry, MAX_BUNDLE_BYTES, ManifestEntry, RecordEntry, SignatureEntry,
    SignaturesEntry, VERSION,
};
pub use offline::{Bundle, BundleError};
pub use record::Recorder;

/// A time as the bundle writes it (RFC 3339, UTC).
pub fn format_time(at: time::OffsetDateTime) -> String {
    format::timestamp(at)
}
