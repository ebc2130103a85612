//! The caches, as decorators over the sources ([`Registry`], [`DidResolver`],
//! [`RecordSource`]) in the way sigstore-rs's caching OCI client and indigo's
//! `CacheDirectory` wrap their inner clients: any source — the HTTP ones, an in-memory fake
//! — can be wrapped, and a wrapped registry or resolver is itself a [`Registry`] or
//! [`DidResolver`].
//!
//! Each cache holds **facts, not verdicts** (so a policy edit applies to the next
//! verification), each kind with its own TTL; failures are cached briefly, transient ones
//! shortest. Lookups take a [`Mode`]: `Load` fetches what is missing (concurrent callers
//! share one fetch), `Peek` only reads fresh entries and never waits, so the same
//! verification code answers "from cache only" without a second code path. Every lookup
//! also gives the instant its entry expires, from which a verdict's lifetime follows.
//!
//! Proofs are cached as **outcomes** of fetching and checking (`Proofs`), not as the CAR
//! bytes a [`RecordSource`] returns: a proof CAR is kilobytes, its outcome a few hundred
//! bytes, and the engine keeps tens of thousands of them within its memory budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use url::Url;

use super::VerifierConfig;
use super::cache::{CacheStats, Mode, TtlCache};
use super::revisions::Revisions;
use super::revocations::Revocations;
use crate::did_document::{DidDocError, DidDocument};
use crate::proof::{self, ProofError, VerifiedRecord};
use crate::resolve::{
    ArtifactResult, DidResolver, ManifestFact, RecordSource, Registry, ResolveError,
    SignatureArtifact,
};
use crate::syntax::text::outside;
use crate::syntax::{Did, ImageDigest, ImageRef};

/// A cached fact: the value, or the failure that stands in for it until its TTL ends.
pub(super) type Fact<T> = Result<Arc<T>, ResolveError>;
/// What a proof attempt ended in.
pub(super) type ProofOutcome = Result<SignedFacts, ProofError>;

/// What is kept of a proven record: the signed facts the policy reads. The proof is
/// checked once; a whole [`VerifiedRecord`] (CIDs, URI, digest, key type: about 0.6 KB with
/// its strings) is not what tens of thousands of cache entries should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SignedFacts {
    /// When it was signed (the record's `createdAt`, else the commit's `rev`).
    pub(super) signed_at: time::OffsetDateTime,
    /// The record's `repository`, when it has one.
    pub(super) repository: Option<Box<str>>,
}

impl From<VerifiedRecord> for SignedFacts {
    fn from(record: VerifiedRecord) -> Self {
        SignedFacts {
            signed_at: record.signed_at,
            repository: record.repository.map(String::into_boxed_str),
        }
    }
}
/// A value from a cache, with the instant it expires.
pub(super) type Fresh<T> = (T, Instant);

/// A cached value with the revocation epoch read when its load began ([`Revocations`]).
#[derive(Debug, Clone)]
pub(super) struct Stamped<T> {
    since: u64,
    value: T,
}

/// How long a failure is cached: transient ones shortest.
fn failure_ttl(config: &VerifierConfig, e: &ResolveError) -> Duration {
    if e.is_transient() {
        config.transient_ttl
    } else {
        config.negative_ttl
    }
}

/// A [`Registry`] whose answers are cached: reference → manifest (a tag for `tag_ttl`, a
/// digest for `referrers_ttl`), digest → signature artifacts (`referrers_ttl`, or
/// `transient_ttl` when some artifact could not be read for a transient reason).
#[derive(Debug)]
pub struct CachedRegistry {
    inner: Arc<dyn Registry>,
    config: VerifierConfig,
    manifests: TtlCache<(String, String), Result<ManifestFact, ResolveError>>,
    referrers: TtlCache<(String, ImageDigest), Fact<Vec<ArtifactResult>>>,
}

impl CachedRegistry {
    /// `inner`, cached as `config` says.
    pub fn new(inner: Arc<dyn Registry>, config: &VerifierConfig) -> Self {
        CachedRegistry {
            inner,
            config: config.clone(),
            manifests: TtlCache::new(config.cache_capacity),
            referrers: TtlCache::new(config.cache_capacity),
        }
    }

    pub(super) async fn manifest(
        &self,
        image: &ImageRef,
        mode: Mode,
    ) -> Option<Fresh<Result<ManifestFact, ResolveError>>> {
        let by_digest = image.digest().is_some();
        self.manifests
            .get(
                &manifest_key(image),
                mode,
                || self.inner.resolve(image),
                |r| match r {
                    Ok(_) if by_digest => self.config.referrers_ttl,
                    Ok(_) => self.config.tag_ttl,
                    Err(e) => failure_ttl(&self.config, e),
                },
            )
            .await
    }

    pub(super) async fn artifacts(
        &self,
        image: &ImageRef,
        digest: &ImageDigest,
        mode: Mode,
    ) -> Option<Fresh<Fact<Vec<ArtifactResult>>>> {
        let has_transient = |list: &[ArtifactResult]| {
            list.iter()
                .any(|a| a.as_ref().is_err_and(|e| e.transient().is_some()))
        };
        self.referrers
            .get(
                &(image.name(), digest.clone()),
                mode,
                || async {
                    self.inner
                        .signature_artifacts(image, digest)
                        .await
                        .map(Arc::new)
                },
                |r| match r {
                    Ok(list) if has_transient(list) => self.config.transient_ttl,
                    Ok(_) => self.config.referrers_ttl,
                    Err(e) => failure_ttl(&self.config, e),
                },
            )
            .await
    }

    pub(super) fn stats(&self) -> (CacheStats, CacheStats) {
        (self.manifests.stats(), self.referrers.stats())
    }
}

impl Registry for CachedRegistry {
    fn resolve<'a>(
        &'a self,
        image: &'a ImageRef,
    ) -> BoxFuture<'a, Result<ManifestFact, ResolveError>> {
        Box::pin(async move {
            match self.manifest(image, Mode::Load).await {
                Some((fact, _)) => fact,
                None => unreachable_peek(),
            }
        })
    }

    fn signature_artifacts<'a>(
        &'a self,
        image: &'a ImageRef,
        subject: &'a ImageDigest,
    ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>> {
        Box::pin(async move {
            match self.artifacts(image, subject, Mode::Load).await {
                Some((fact, _)) => fact.map(|list| list.as_ref().clone()),
                None => unreachable_peek(),
            }
        })
    }
}

/// What [`TtlCache::get`] answers under [`Mode::Load`] is never `None`; a decorator used
/// as its trait only loads.
fn unreachable_peek<T>() -> Result<T, ResolveError> {
    Err(ResolveError::Invalid {
        what: "cache".into(),
        reason: "a load returned nothing (a bug: please report it)".into(),
    })
}

/// A DID document with what verification takes from it, worked out once per load: the
/// PDS URL and the signing key (as `did:key`), or why the document gives none.
#[derive(Debug)]
pub(super) struct ResolvedDid {
    pub(super) document: DidDocument,
    pub(super) endpoint: Result<(Url, String), EndpointError>,
}

/// Why a DID document gives no usable PDS and signing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No `#atproto` key or no `#atproto_pds` service, or a key that does not decode.
    #[error(transparent)]
    Document(#[from] DidDocError),
    /// The PDS is not an http(s) URL with a host.
    #[error(
        "DID document of {did} names PDS {pds:?}, which is not an http(s) URL{}",
        reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
    )]
    NotHttp {
        /// The signer.
        did: Did,
        /// The PDS as the document names it, made inert.
        pds: String,
        /// Why it does not parse, when it does not.
        reason: Option<String>,
    },
}

/// A [`DidResolver`] whose documents are cached for `did_ttl`.
#[derive(Debug)]
pub struct CachedDids {
    inner: Arc<dyn DidResolver>,
    config: VerifierConfig,
    documents: TtlCache<Did, Stamped<Fact<ResolvedDid>>>,
    revocations: Arc<Revocations>,
}

impl CachedDids {
    /// `inner`, cached as `config` says.
    pub fn new(inner: Arc<dyn DidResolver>, config: &VerifierConfig) -> Self {
        CachedDids {
            inner,
            config: config.clone(),
            documents: TtlCache::new(config.cache_capacity),
            revocations: Arc::new(Revocations::default()),
        }
    }

    /// The same, dropping documents that `revocations` marks.
    pub(super) fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = revocations;
        self
    }

    pub(super) async fn document(&self, did: &Did, mode: Mode) -> Option<Fresh<Fact<ResolvedDid>>> {
        let (stamped, until) = self
            .documents
            .get_valid(
                did,
                mode,
                || async {
                    let since = self.revocations.epoch();
                    let value = self.inner.resolve(did).await.map(|document| {
                        let endpoint = pds_and_key(&document);
                        Arc::new(ResolvedDid { document, endpoint })
                    });
                    Stamped { since, value }
                },
                |r| match &r.value {
                    Ok(_) => self.config.did_ttl,
                    Err(e) => failure_ttl(&self.config, e),
                },
                |r| self.revocations.document_holds(r.since, did),
            )
            .await?;
        Some((stamped.value, until))
    }

    /// The document of `did` when it is cached and fresh (no load, no hit counted twice).
    pub(super) fn cached(&self, did: &Did) -> Option<Arc<ResolvedDid>> {
        self.documents
            .peek_if(did, |r| self.revocations.document_holds(r.since, did))
            .and_then(|(d, _)| d.value.ok())
    }

    pub(super) fn stats(&self) -> CacheStats {
        self.documents.stats()
    }
}

impl DidResolver for CachedDids {
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
        Box::pin(async move {
            match self.document(did, Mode::Load).await {
                Some((fact, _)) => fact.map(|d| d.document.clone()),
                None => unreachable_peek(),
            }
        })
    }
}

/// A proof is cached per (record URI, image digest, PDS URL, signing key as did:key).
type ProofKey = (String, ImageDigest, String, String);

/// Proof outcomes: the CAR fetched from a [`RecordSource`] and checked, cached for
/// `proof_ttl` when it proves the record, `negative_ttl` when the check failed (a stale
/// commit included), and by the failure's kind when the fetch failed. Each fetched proof is
/// checked against, and raises, its signer's highest proven rev ([`Revisions`]).
#[derive(Debug)]
pub struct Proofs {
    records: Arc<dyn RecordSource>,
    config: VerifierConfig,
    outcomes: TtlCache<ProofKey, Stamped<Fact<ProofOutcome>>>,
    revisions: Arc<Revisions>,
    revocations: Arc<Revocations>,
}

impl Proofs {
    /// Proofs from `records`, cached as `config` says.
    pub fn new(records: Arc<dyn RecordSource>, config: &VerifierConfig) -> Self {
        Proofs {
            records,
            config: config.clone(),
            outcomes: TtlCache::new(config.cache_capacity),
            revisions: Arc::new(Revisions::in_memory()),
            revocations: Arc::new(Revocations::default()),
        }
    }

    /// The same, dropping outcomes that `revocations` marks.
    pub(super) fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = revocations;
        self
    }

    /// The same, remembering revs in `revisions` (kept in a file, or shared).
    pub(super) fn with_revisions(mut self, revisions: Arc<Revisions>) -> Self {
        self.revisions = revisions;
        self
    }

    /// The outcome of proving `artifact`'s record for `digest` from the PDS and under the
    /// key of `signer`'s document, at `now`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn outcome(
        &self,
        artifact: &SignatureArtifact,
        signer: &ResolvedDid,
        pds: &Url,
        key: &str,
        digest: &ImageDigest,
        mode: Mode,
        now: time::OffsetDateTime,
    ) -> Option<Fresh<Fact<ProofOutcome>>> {
        let uri = &artifact.record_uri;
        let cache_key = (
            uri.to_string(),
            digest.clone(),
            pds.to_string(),
            key.to_owned(),
        );
        let did = uri.did();
        let uri_text = &cache_key.0;
        let (stamped, until) = self
            .outcomes
            .get_valid(
                &cache_key,
                mode,
                || async {
                    let since = self.revocations.epoch();
                    let value = self.load_outcome(artifact, signer, pds, digest, now).await;
                    Stamped { since, value }
                },
                |r| match &r.value {
                    Ok(outcome) if outcome.is_ok() => self.config.proof_ttl,
                    Ok(_) => self.config.negative_ttl,
                    Err(e) => failure_ttl(&self.config, e),
                },
                |r| self.revocations.proof_holds(r.since, did, uri_text),
            )
            .await?;
        Some((stamped.value, until))
    }

    /// Fetches and checks one proof.
    async fn load_outcome(
        &self,
        artifact: &SignatureArtifact,
        signer: &ResolvedDid,
        pds: &Url,
        digest: &ImageDigest,
        now: time::OffsetDateTime,
    ) -> Fact<ProofOutcome> {
        let uri = &artifact.record_uri;
        // The mark as it stands before asking (see `revisions`).
        let did = uri.did();
        let floor = self.revisions.floor(did);
        let car = self.records.get_record(pds, uri).await?;
        let checked = proof::check_with_document(
            &car,
            &signer.document,
            uri,
            digest,
            &self.config.car_limits,
            floor.as_ref(),
        );
        if let Some(rev) = &checked.rev
            && self.revisions.raise(did, rev, now)
            && self.revisions.is_persistent()
        {
            self.persist().await;
        }
        if let Err(e @ ProofError::StaleCommit { .. }) = &checked.record {
            tracing::warn!(pds = %pds, error = %e, "refused a replayed repo state");
        }
        Ok(Arc::new(checked.record.map(SignedFacts::from)))
    }

    /// Writes the marks to the state file, off the async threads. A failure is logged: the
    /// mark stays in memory and the next rise writes again.
    async fn persist(&self) {
        let revisions = Arc::clone(&self.revisions);
        match tokio::task::spawn_blocking(move || revisions.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not keep the highest proven revs"),
            Err(e) => tracing::warn!(error = %e, "could not keep the highest proven revs"),
        }
    }

    pub(super) fn stats(&self) -> CacheStats {
        self.outcomes.stats()
    }

    /// The source proofs come from (which also lists records).
    pub(super) fn records(&self) -> &Arc<dyn RecordSource> {
        &self.records
    }
}

/// The manifest cache key of a reference: (name, tag or digest).
fn manifest_key(image: &ImageRef) -> (String, String) {
    (image.name(), image.reference())
}

/// The PDS URL and signing key (as `did:key`) a DID document gives, or why not.
fn pds_and_key(document: &DidDocument) -> Result<(Url, String), EndpointError> {
    let key = document.signing_key()?;
    let pds = document.pds_endpoint()?;
    let not_http = |reason: Option<String>| EndpointError::NotHttp {
        did: document.did().clone(),
        pds: outside(pds),
        reason,
    };
    let url = Url::parse(pds).map_err(|e| not_http(Some(e.to_string())))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(not_http(None));
    }
    Ok((url, key.to_did_key()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    fn document(pds: &str) -> DidDocument {
        let json = format!(
            r##"{{"id":"{DID}","verificationMethod":[{{"id":"#atproto","type":"Multikey",
                "controller":"{DID}","publicKeyMultibase":"zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"}}],
              "service":[{{"id":"#atproto_pds","type":"AtprotoPersonalDataServer",
                "serviceEndpoint":{pds}}}]}}"##
        );
        DidDocument::parse(&DID.parse().unwrap(), json.as_bytes()).unwrap()
    }

    #[test]
    fn a_document_gives_an_http_pds_and_a_did_key_or_says_why_not() {
        let (url, key) = pds_and_key(&document(r#""https://pds.example.com""#)).unwrap();
        assert_eq!(url.as_str(), "https://pds.example.com/");
        assert!(key.starts_with("did:key:z"), "{key}");
        for pds in [
            r#""ftp://pds.example.com""#,
            r#""not a url""#,
            r#""mailto:a@b""#,
        ] {
            match pds_and_key(&document(pds)) {
                Err(EndpointError::NotHttp {
                    did, pds: shown, ..
                }) => {
                    assert_eq!(did.as_str(), DID);
                    assert!(!shown.is_empty());
                }
                other => panic!("{pds}: {other:?}"),
            }
        }
        // A PDS URL with terminal escapes is shown inert.
        let e = pds_and_key(&document(r#""\u001b[31mx""#)).unwrap_err();
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
        // No service at all: the document's own error.
        let json = format!(r#"{{"id":"{DID}"}}"#);
        let bare = DidDocument::parse(&DID.parse().unwrap(), json.as_bytes()).unwrap();
        assert!(matches!(
            pds_and_key(&bare),
            Err(EndpointError::Document(_))
        ));
    }
}
