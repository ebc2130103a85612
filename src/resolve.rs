//! Fetching facts from the network: image manifests and signature artifacts from OCI
//! registries, DID documents from PLC or did:web hosts, repo proofs from PDSes.
//!
//! Each source sits behind a capability trait ([`Registry`], [`DidResolver`],
//! [`RecordSource`]) with one HTTP implementation; the [`crate::verify`] layer composes
//! them, caches their answers and decides. This layer never decides whether anything is
//! trusted, and classifies every failure as transient or permanent ([`ResolveError`]).

mod artifact;
mod auth;
mod did;
mod pds;
mod registry;

use futures_util::future::BoxFuture;
use url::Url;

pub use artifact::{ARTIFACT_MEDIA_TYPE, SignatureArtifact};
pub use auth::{Credentials, DockerConfig};
pub use did::{HttpDidResolver, PlcTrust, RawIdentity, proven_identity};
pub use pds::HttpRecordSource;
pub use registry::{
    Attachment, DEFAULT_MAX_POINTERS, HttpRegistry, MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, PushError,
    READ_CONCURRENCY, RawArtifact, RawArtifactResult, RawManifest, RegistryConfig, check_artifact,
    check_manifest,
};

use crate::did_document::DidDocument;
use crate::net::FetchError;
use crate::syntax::{AtUri, Did, ImageDigest, ImageRef};

/// Why a fact could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The upstream refused our credentials (401/403 after the auth flow).
    #[error("{url}: access denied (HTTP {status}); check the credentials")]
    Denied {
        /// The URL requested.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// The DID is deactivated or tombstoned.
    #[error("{did} is deactivated (HTTP 410 Gone, or a tombstone ends its operation log)")]
    Deactivated {
        /// The DID.
        did: Did,
    },
    /// The transport failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The upstream answered, but with something that is not what the protocol promises
    /// (bad JSON, wrong digest, wrong media type, unexpected status).
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being fetched.
        what: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A `did:plc` operation log, or the document served beside it, that the DID's own
    /// keys do not prove (a directory that forged, reordered or dropped something).
    #[error(
        "{did}: the PLC directory's answer is not proven by the DID's signed operation log: {source}"
    )]
    Unproven {
        /// The DID.
        did: Did,
        /// The rule broken.
        #[source]
        source: Box<crate::plc::PlcLogError>,
    },
    /// An offline bundle does not hold the fact (it was exported under a policy that did
    /// not need it). Nothing is said about the image: it cannot be decided offline.
    #[error("{what} is not in the bundle (export it again under this policy)")]
    NotInBundle {
        /// What was looked for.
        what: String,
    },
    /// The thing does not exist upstream.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The upstream answered with a status that says "not now" (408, 425) rather than
    /// anything about the thing asked for.
    #[error("{what}: upstream answered HTTP {status}; try again")]
    Unavailable {
        /// What was being fetched.
        what: String,
        /// The status.
        status: u16,
    },
}

/// Classifies a status a fetcher did not expect: 401/403 are access problems and 408/425
/// "not now" (both transient: they say nothing about the image, so they must not be cached
/// as an answer); anything else is an invalid answer (permanent).
pub(crate) fn unexpected_status(
    what: String,
    url: &Url,
    status: reqwest::StatusCode,
) -> ResolveError {
    let url = crate::net::redact(url);
    match status.as_u16() {
        401 | 403 => ResolveError::Denied {
            url,
            status: status.as_u16(),
        },
        408 | 425 => ResolveError::Unavailable {
            what: format!("{what} at {url}"),
            status: status.as_u16(),
        },
        other => ResolveError::Invalid {
            what: format!("{what} at {url}"),
            reason: format!("unexpected HTTP {other}"),
        },
    }
}

impl ResolveError {
    /// A stable code for machines: `rate_limited`, `upstream_refused`, `upstream_invalid`,
    /// `not_found` (permanent) or `upstream_unavailable` (transient).
    pub fn code(&self) -> &'static str {
        match self {
            ResolveError::Fetch(FetchError::RateLimited { .. }) => "rate_limited",
            ResolveError::Fetch(FetchError::Refused { .. }) => "upstream_refused",
            ResolveError::Fetch(FetchError::TooLarge { .. })
            | ResolveError::Invalid { .. }
            | ResolveError::Unproven { .. } => "upstream_invalid",
            ResolveError::NotFound { .. } | ResolveError::Deactivated { .. } => "not_found",
            ResolveError::NotInBundle { .. } => "not_in_bundle",
            ResolveError::Fetch(_)
            | ResolveError::Denied { .. }
            | ResolveError::Unavailable { .. } => "upstream_unavailable",
        }
    }

    /// Whether asking again later may give another answer. Credentials refused count as
    /// transient: an auth problem says nothing about the image and must never be cached
    /// as "unsigned".
    pub fn is_transient(&self) -> bool {
        match self {
            ResolveError::Denied { .. }
            | ResolveError::Unavailable { .. }
            | ResolveError::NotInBundle { .. } => true,
            ResolveError::Fetch(e) => e.is_transient(),
            ResolveError::Deactivated { .. }
            | ResolveError::Invalid { .. }
            | ResolveError::Unproven { .. }
            | ResolveError::NotFound { .. } => false,
        }
    }
}

/// What a registry serves under a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFact {
    /// The digest of the manifest bytes (checked against what was served).
    pub digest: ImageDigest,
    /// Its media type.
    pub media_type: String,
    /// Whether it is an image index (a multi-platform image): then the index digest is the
    /// signature subject.
    pub is_index: bool,
}

/// One signature artifact attached to a subject: parsed, or why it could not be used.
/// A bad artifact belongs to that artifact only: the others still count.
pub type ArtifactResult = Result<SignatureArtifact, ArtifactError>;

/// Why one signature artifact could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// Fetching it failed (it may be transient: see [`ResolveError::is_transient`]).
    #[error("reading the signature artifact: {0}")]
    Fetch(ResolveError),
    /// It was served, but it is not a usable signature artifact (permanent): the rule it
    /// breaks, with the offending value made inert.
    #[error("signature artifact {}: {reason}", artifact.as_ref().map_or("(listed)".to_owned(), ToString::to_string))]
    Invalid {
        /// The artifact manifest's digest, when it is a digest.
        artifact: Option<ImageDigest>,
        /// What is wrong, expected versus found.
        reason: String,
    },
    /// The referrers list it, but the registry does not serve it (or its layer).
    #[error("signature artifact {artifact} is listed but its {part} is not served")]
    NotServed {
        /// The artifact manifest's digest.
        artifact: ImageDigest,
        /// `manifest` or `layer`.
        part: &'static str,
    },
}

impl ArtifactError {
    /// A stable code: the fetch failure's (`upstream_*`, `rate_limited`, `not_found`), or
    /// `artifact_invalid` / `artifact_not_served`.
    pub fn code(&self) -> &'static str {
        match self {
            ArtifactError::Fetch(e) => e.code(),
            ArtifactError::Invalid { .. } => "artifact_invalid",
            ArtifactError::NotServed { .. } => "artifact_not_served",
        }
    }

    /// The artifact manifest's digest, when the failure knows it (a fetch failure names
    /// only the URL it failed on).
    pub fn artifact(&self) -> Option<&ImageDigest> {
        match self {
            ArtifactError::Invalid { artifact, .. } => artifact.as_ref(),
            ArtifactError::NotServed { artifact, .. } => Some(artifact),
            ArtifactError::Fetch(_) => None,
        }
    }

    /// The fetch failure, when asking again later may give another answer.
    pub fn transient(&self) -> Option<&ResolveError> {
        match self {
            ArtifactError::Fetch(e) if e.is_transient() => Some(e),
            _ => None,
        }
    }
}

/// An OCI registry.
pub trait Registry: Send + Sync + std::fmt::Debug {
    /// Resolves a reference (tag or digest) to the manifest the registry serves now.
    fn resolve<'a>(
        &'a self,
        image: &'a ImageRef,
    ) -> BoxFuture<'a, Result<ManifestFact, ResolveError>>;

    /// The ATProto signature artifacts whose subject is `subject` in `image`'s repository,
    /// each fetched by digest and checked (at most the registry's configured number of
    /// pointers, in listing order). A failure to list them is an error; a failure to read
    /// one of them is that artifact's [`ArtifactError`].
    fn signature_artifacts<'a>(
        &'a self,
        image: &'a ImageRef,
        subject: &'a ImageDigest,
    ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>>;
}

/// Resolves DIDs to their documents.
pub trait DidResolver: Send + Sync + std::fmt::Debug {
    /// The DID's current document, whose `id` has been checked against `did`.
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>>;
}

/// Fetches repo proofs (`com.atproto.sync.getRecord` CARs) from a PDS.
pub trait RecordSource: Send + Sync + std::fmt::Debug {
    /// The CAR proving (or disproving) `uri` in the repo hosted at `pds`.
    fn get_record<'a>(
        &'a self,
        pds: &'a Url,
        uri: &'a AtUri,
    ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>>;

    /// One page of `com.atproto.repo.listRecords` of `collection` in `did`'s repo at `pds`:
    /// the records that name an image digest (unproven pointers), and the cursor of the
    /// next page. A source that cannot list answers an error.
    fn list_records<'a>(
        &'a self,
        pds: &'a Url,
        did: &'a Did,
        collection: &'a str,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, Result<RecordPage, ResolveError>> {
        let _ = (pds, did, collection, cursor);
        Box::pin(async {
            Err(ResolveError::Invalid {
                what: "record listing".into(),
                reason: "this record source cannot list records".into(),
            })
        })
    }
}

/// One page of a repo collection's records, as pointers: (record, the digest it names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordPage {
    /// Records of the collection that name a well-formed image digest.
    pub records: Vec<(AtUri, crate::syntax::ImageDigest)>,
    /// Records the page listed, before that filter: a page that lists none is the last,
    /// whatever its cursor says.
    pub listed: usize,
    /// Where the next page starts, when there is one.
    pub cursor: Option<String>,
}
