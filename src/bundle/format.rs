//! The bundle file, version 1 (documented in the README, "Offline bundles"). Bytes are
//! standard base64 (with padding); times are RFC 3339 in UTC.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The format version this build writes and reads.
pub const VERSION: u64 = 1;

/// Largest bundle written or read, in bytes: room for dozens of images with their
/// signers' logs (a signed image takes ~10 KiB), far below what would strain memory.
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;

/// A bundle as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleFile {
    /// [`VERSION`].
    pub version: u64,
    /// When the bundle was written.
    pub created_at: String,
    /// The program that wrote it (`atcr-verify 0.1.0`).
    pub generator: String,
    /// Manifests, with the tag they were asked for when given by tag.
    pub manifests: Vec<ManifestEntry>,
    /// Signature artifacts per subject.
    pub signatures: Vec<SignaturesEntry>,
    /// DID documents (and `did:plc` operation logs).
    pub identities: Vec<IdentityEntry>,
    /// Repo proofs.
    pub records: Vec<RecordEntry>,
}

/// A manifest as the registry served it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestEntry {
    /// The normalized image name, `registry/repository`.
    pub image: String,
    /// The tag asked for (the tag → digest fact), or `null` when asked by digest.
    pub tag: Option<String>,
    /// The digest of `manifest` (re-checked on reading).
    pub digest: String,
    /// Its media type (re-checked on reading).
    pub media_type: String,
    /// The manifest bytes, base64.
    pub manifest: String,
    /// When it was fetched.
    pub fetched_at: String,
}

/// The signature artifacts the registry listed for one subject, every one of them (each an
/// unsigned pointer; the proofs are bundled for the signers the export's policy trusts).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignaturesEntry {
    /// The normalized image name, `registry/repository`.
    pub image: String,
    /// The subject digest.
    pub subject: String,
    /// When they were listed and read.
    pub fetched_at: String,
    /// The artifacts, in the registry's listing order.
    pub artifacts: Vec<SignatureEntry>,
}

/// One signature artifact: its manifest and its one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureEntry {
    /// The artifact manifest's digest.
    pub digest: String,
    /// The artifact manifest, base64.
    pub manifest: String,
    /// The signature layer, base64.
    pub layer: String,
}

/// A signer's identity as its hosts served it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityEntry {
    /// The DID.
    pub did: String,
    /// The DID document, base64.
    pub document: String,
    /// For `did:plc`, the operation log (`/log/audit`), base64.
    pub log: Option<String>,
    /// When they were fetched.
    pub fetched_at: String,
}

/// A record's repo proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordEntry {
    /// The record's `at://` URI.
    pub uri: String,
    /// The PDS it was fetched from (the one the DID document names).
    pub pds: String,
    /// The `com.atproto.sync.getRecord` CAR, base64.
    pub car: String,
    /// When it was fetched.
    pub fetched_at: String,
}

/// Bytes as stored.
pub(crate) fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Stored bytes, or why not.
pub(crate) fn decode(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("not standard base64: {e}"))
}

/// A time as stored.
pub(crate) fn timestamp(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}
