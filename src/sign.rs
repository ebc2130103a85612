//! Signing an image for an ATProto account (`atcr-verify sign`): the writer's side of the
//! chain the verifier proves.
//!
//! 1. Resolve the reference to its manifest digest, media type and size (the registry
//!    source the verifier reads through).
//! 2. Log in on the signer's PDS with an app password (`createSession`).
//! 3. Push the artifact's empty config blob: a registry that refuses pushes is found out
//!    before anything is written on the PDS.
//! 4. Create the `io.atcr.manifest` record naming the digest (`createRecord`) — or, with
//!    `--record-uri`, read an existing one and check it names this digest.
//! 5. Push the signature artifact (layer blob, then the manifest by digest) and make it
//!    findable from the image: by the registry's Referrers API when it has one, else by
//!    adding it to the `sha256-<hex>` tag index.
//!
//! A failure after step 4 created the record is a [`SignFailure`] that carries the record's
//! URI, so the signature is not lost: attaching it again needs no new record.
//!
//! The record's `repository` is the image's repository path as the reference names it
//! (`team/app` for `registry.example/team/app:v1`), or a trailing part of it given with
//! `--repository`: what the verifier's `matchRepository` check accepts.

pub mod artifact;
pub mod xrpc;

use serde::Serialize;
use time::OffsetDateTime;
use url::Url;

use crate::did_document::DidDocument;
use crate::net::HttpClient;
use crate::resolve::{Attachment, DidResolver, HttpRegistry, PushError, ResolveError};
use crate::syntax::{AtUri, Did, ImageRef, Nsid};
use artifact::{Pointer, Subject};
use xrpc::{Password, XrpcError};

/// The collection signatures are written to: the one the verifier reads by default.
pub const COLLECTION: &str = crate::policy::DEFAULT_SIGNATURE_COLLECTION;
/// Longest `repository` the lexicon allows.
pub const MAX_REPOSITORY: usize = 255;

/// An account to log in with.
#[derive(Debug, Clone)]
pub struct Login {
    /// A handle or DID (or the account's email).
    pub identifier: String,
    /// An app password.
    pub password: Password,
}

/// What to sign, and how.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// The image.
    pub image: ImageRef,
    /// The signer's PDS.
    pub pds: Url,
    /// Where the record comes from.
    pub source: RecordSource,
    /// The record's `repository` (see [`repository_for`]).
    pub repository: String,
}

/// Where the signature record comes from.
#[derive(Debug, Clone)]
pub enum RecordSource {
    /// Log in and create a new record.
    Create(Login),
    /// Attach an existing record (after a partial failure): read it from the PDS and check
    /// it names the image's digest.
    Existing(AtUri),
}

/// What was signed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signed {
    /// The reference as given.
    pub image: String,
    /// The manifest digest signed.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The signer.
    pub did: String,
    /// The signer's handle, when the PDS named one.
    pub handle: Option<String>,
    /// The record's `repository` (`None`: an existing record without one).
    pub repository: Option<String>,
    /// The record.
    pub record_uri: String,
    /// The record's CID.
    pub record_cid: Option<String>,
    /// The commit that created it (when created now).
    pub commit_cid: Option<String>,
    /// Whether the record was created now (`false`: an existing one was attached).
    pub record_created: bool,
    /// The signature artifact's manifest digest.
    pub artifact_digest: String,
    /// `referrers-api` or `referrers-tag`.
    pub attached_via: &'static str,
    /// The `sha256-<hex>` tag updated, when the registry has no Referrers API.
    pub referrers_tag: Option<String>,
}

/// Why signing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The existing record cannot be attached: it is not a signature of this image.
    #[error("record {uri}: {reason}")]
    ExistingRecord {
        /// The record.
        uri: String,
        /// What does not match.
        reason: String,
    },
    /// The PDS refused to log in, or could not be asked.
    #[error("logging in as {identifier:?}: {source}")]
    Login {
        /// The identifier given.
        identifier: String,
        /// The failure.
        #[source]
        source: XrpcError,
    },
    /// Writing to the registry failed.
    #[error(transparent)]
    Push(#[from] PushError),
    /// Creating or reading the record failed.
    #[error("{what}: {source}")]
    Record {
        /// What was being done.
        what: &'static str,
        /// The failure.
        #[source]
        source: XrpcError,
    },
    /// The reference could not be resolved to a manifest.
    #[error("resolving the image: {0}")]
    Resolve(#[source] ResolveError),
}

impl SignError {
    /// A stable code: `login_refused`, `pds_refused`, `registry_refused`,
    /// `record_mismatch`, or the underlying failure's (`not_found`,
    /// `upstream_unavailable`, …).
    pub fn code(&self) -> &'static str {
        match self {
            SignError::ExistingRecord { .. } => "record_mismatch",
            SignError::Login {
                source: XrpcError::Refused { .. },
                ..
            } => "login_refused",
            SignError::Login { source, .. } | SignError::Record { source, .. } => source.code(),
            SignError::Push(e) => e.code(),
            SignError::Resolve(e) => e.code(),
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SignError::ExistingRecord { .. } => false,
            SignError::Login { source, .. } | SignError::Record { source, .. } => {
                source.is_transient()
            }
            SignError::Push(e) => e.is_transient(),
            SignError::Resolve(e) => e.is_transient(),
        }
    }
}

/// A failed signing, and the record it leaves behind when it got that far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignFailure {
    /// What failed.
    pub error: SignError,
    /// The signature record, when it was created (or given) before the failure: the
    /// artifact is what is missing, and `--record-uri` attaches it.
    pub record: Option<AtUri>,
}

impl From<SignError> for SignFailure {
    fn from(error: SignError) -> Self {
        SignFailure {
            error,
            record: None,
        }
    }
}

/// The `repository` a record for `image` names: `given` when it is the image's repository
/// path or a trailing part of it on a `/` boundary (what the verifier's `matchRepository`
/// accepts), else the whole path. `Err` says why `given` cannot be used.
pub fn repository_for(image: &ImageRef, given: Option<&str>) -> Result<String, String> {
    let path = image.repository();
    let chosen = match given {
        None => path,
        Some(g) => {
            // The verifier's own rule, so that the two cannot disagree.
            if !crate::policy::names_repository(path, g) {
                return Err(format!(
                    "{g:?} is not the image's repository {path:?} or a trailing part of it \
                     (on a `/` boundary); the verifier would not count the signature"
                ));
            }
            g
        }
    };
    // Image names are capped at 255 characters already; the lexicon's cap is kept here too.
    if chosen.len() > MAX_REPOSITORY {
        return Err(format!(
            "{chosen:?} is {} bytes; the io.atcr.manifest lexicon allows {MAX_REPOSITORY} \
             (give a trailing part with --repository)",
            chosen.len()
        ));
    }
    Ok(chosen.to_owned())
}

/// Signs `request.image`: see the module documentation for the steps. `http` speaks to the
/// PDS (the face gives it a client that follows no redirect: the login carries the
/// password); `registry` to the registry; `dids` resolves the
/// signer's DID document (as the verifier will), for the artifact's informational fields
/// (the PDS, the `#atproto` key).
pub async fn sign(
    http: &HttpClient,
    registry: &HttpRegistry,
    dids: &dyn DidResolver,
    request: &SignRequest,
    now: OffsetDateTime,
) -> Result<Signed, SignFailure> {
    let image = &request.image;
    // The bytes whose digest is signed give the descriptor's size: no second download.
    let (fact, raw) = registry
        .resolve_raw(image)
        .await
        .map_err(SignError::Resolve)?;
    let size = raw.bytes.len() as u64;
    let subject = Subject {
        digest: fact.digest,
        media_type: fact.media_type,
        size,
    };
    let collection: Nsid = COLLECTION.parse().map_err(|_| {
        SignError::Resolve(ResolveError::Invalid {
            what: "collection".into(),
            reason: COLLECTION.into(),
        })
    })?;
    let session = match &request.source {
        RecordSource::Create(login) => Some(
            xrpc::create_session(http, &request.pds, &login.identifier, &login.password)
                .await
                .map_err(|source| SignError::Login {
                    identifier: login.identifier.clone(),
                    source,
                })?,
        ),
        RecordSource::Existing(_) => None,
    };
    // Before anything is written on the PDS: can we push at all?
    registry
        .push_blob(image, artifact::EMPTY_CONFIG)
        .await
        .map_err(SignError::Push)?;

    let (record, created_at, record_cid, commit_cid, repository) = match (&request.source, &session)
    {
        (RecordSource::Existing(uri), _) => {
            let found = existing(http, &request.pds, uri, image, &subject, &collection).await?;
            (
                uri.clone(),
                found.created_at,
                found.cid,
                None,
                found.repository,
            )
        }
        (RecordSource::Create(_), session) => {
            let created_at = artifact::datetime(now);
            let body = artifact::record(&request.repository, &subject, &created_at);
            let created = match session {
                Some(session) => {
                    xrpc::create_record(http, &request.pds, session, &collection, &body).await
                }
                // A session is made above whenever the source is Create.
                None => Err(XrpcError::Invalid {
                    method: "com.atproto.repo.createRecord",
                    pds: request.pds.to_string(),
                    reason: "no session".into(),
                }),
            }
            .map_err(|source| SignError::Record {
                what: "creating the signature record",
                source,
            })?;
            (
                created.uri,
                created_at,
                Some(created.cid),
                created.commit_cid,
                Some(request.repository.clone()),
            )
        }
    };
    let record_created = matches!(request.source, RecordSource::Create(_));
    let keep_record = |error: SignError| SignFailure {
        error,
        record: Some(record.clone()),
    };

    let did: Did = record.did().clone();
    let document = match dids.resolve(&did).await {
        Ok(d) => Some(d),
        Err(e) => {
            // Only the artifact's informational fields come from it; the verifier resolves
            // the DID itself (and will say what is wrong).
            let from_session = session.as_ref().and_then(|s| s.did_doc.clone());
            let using = if from_session.is_some() {
                "the artifact's PDS and key come from the DID document the PDS sent with the session (unverified)"
            } else {
                "the artifact names the --pds URL and no key"
            };
            tracing::warn!(%did, error = %e, "cannot resolve the signer's DID document; {using}");
            from_session
        }
    };
    let pds = document
        .as_ref()
        .and_then(|d| d.pds_endpoint().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| request.pds.as_str().trim_end_matches('/').to_owned());
    let pointer = Pointer {
        did: did.clone(),
        handle: session.as_ref().and_then(|s| s.handle.clone()).or_else(|| {
            document
                .as_ref()
                .and_then(DidDocument::claimed_handle)
                .map(str::to_owned)
        }),
        pds: crate::syntax::text::outside(&pds),
        record_uri: record.clone(),
        commit_cid: commit_cid.clone(),
        signed_at: created_at,
        key: document.as_ref().and_then(|d| d.signing_key().ok()),
    };
    let layer = artifact::layer(&subject, &pointer);
    let manifest = artifact::manifest(&subject, &layer, &pointer);
    let artifact_digest = crate::syntax::ImageDigest::of_bytes(&manifest);
    let attachment = attach(registry, image, &subject, &layer, manifest, &pointer)
        .await
        .map_err(keep_record)?;
    let (attached_via, referrers_tag) = match attachment {
        Attachment::ReferrersApi => ("referrers-api", None),
        Attachment::ReferrersTag { tag } => ("referrers-tag", Some(tag)),
    };
    Ok(Signed {
        image: image.to_string(),
        digest: subject.digest.to_string(),
        media_type: subject.media_type,
        did: did.to_string(),
        handle: pointer.handle,
        repository,
        record_uri: record.to_string(),
        record_cid,
        commit_cid,
        record_created,
        artifact_digest: artifact_digest.to_string(),
        attached_via,
        referrers_tag,
    })
}

/// Pushes the layer and the manifest, then makes the manifest findable from the subject.
async fn attach(
    registry: &HttpRegistry,
    image: &ImageRef,
    subject: &Subject,
    layer: &[u8],
    manifest: Vec<u8>,
    pointer: &Pointer,
) -> Result<Attachment, SignError> {
    registry.push_blob(image, layer).await?;
    let entry = artifact::index_entry(&manifest, pointer);
    let digest = crate::syntax::ImageDigest::of_bytes(&manifest);
    let indexed = registry
        .push_manifest(image, digest.as_str(), artifact::OCI_MANIFEST, manifest)
        .await?;
    let api = indexed
        || registry
            .has_referrers_api(image, &subject.digest)
            .await
            .map_err(|source| PushError::Upstream {
                step: format!("asking {} for its Referrers API", image.registry()),
                source,
            })?;
    if api {
        return Ok(Attachment::ReferrersApi);
    }
    Ok(registry
        .add_to_referrers_tag(image, &subject.digest, entry)
        .await?)
}

/// Reads an existing record and checks it is a signature of `subject` in `image`'s
/// repository: in the signature collection, `$type` that collection, `digest` the
/// subject's, and its `repository` (when it has one) one that `matchRepository` accepts.
async fn existing(
    http: &HttpClient,
    pds: &Url,
    uri: &AtUri,
    image: &ImageRef,
    subject: &Subject,
    collection: &Nsid,
) -> Result<Existing, SignError> {
    let mismatch = |reason: String| SignError::ExistingRecord {
        uri: uri.to_string(),
        reason,
    };
    if uri.collection() != collection {
        return Err(mismatch(format!("is not in {collection}")));
    }
    let fetched = xrpc::get_record(http, pds, uri)
        .await
        .map_err(|source| SignError::Record {
            what: "reading the record given with --record-uri",
            source,
        })?;
    let text = |field: &str| fetched.value.get(field).and_then(|v| v.as_str());
    if text("$type") != Some(collection.as_str()) {
        return Err(mismatch(format!("its $type is not {collection}")));
    }
    match text("digest") {
        Some(d) if d == subject.digest.as_str() => {}
        other => {
            return Err(mismatch(format!(
                "names digest {:?}, not the image's {}",
                other.map(crate::syntax::text::outside),
                subject.digest
            )));
        }
    }
    let created_at = text("createdAt")
        .filter(|t| crate::syntax::parse_datetime(t).is_ok())
        .ok_or_else(|| mismatch("has no valid createdAt".into()))?;
    let repository = match fetched.value.get("repository") {
        None => None,
        Some(named) => {
            let named = named
                .as_str()
                .ok_or_else(|| mismatch("its repository is not a string".into()))?;
            Some(repository_for(image, Some(named)).map_err(|e| {
                mismatch(format!(
                    "its repository {}",
                    crate::syntax::text::outside(&e)
                ))
            })?)
        }
    };
    Ok(Existing {
        created_at: created_at.to_owned(),
        cid: fetched.cid,
        repository,
    })
}

/// What an existing record says.
struct Existing {
    created_at: String,
    cid: Option<String>,
    repository: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_is_the_path_or_a_trailing_part() {
        let image: ImageRef = "registry.example/alice/team/app:v1".parse().unwrap();
        assert_eq!(repository_for(&image, None).unwrap(), "alice/team/app");
        for ok in ["app", "team/app", "alice/team/app"] {
            assert_eq!(repository_for(&image, Some(ok)).unwrap(), ok);
        }
        for bad in ["", "pp", "/app", "eam/app", "other", "alice/team/app/x"] {
            let e = repository_for(&image, Some(bad)).unwrap_err();
            assert!(e.contains("trailing part"), "{bad}: {e}");
        }
    }
}
