//! Orchestration, the only stateful layer: from an image reference to proven signatures to
//! a verdict under the trust policy.
//!
//! For one image (`DESIGN.md` §3): match the trust policy on the normalized name first (an
//! image no policy scopes is decided with no network at all); resolve the reference to the
//! manifest digest the registry serves now; read the pointers (DID, record URI) of the
//! signature artifacts attached to that digest; prove those whose DID the matched policy
//! trusts and whose record is in its signature collections — round-robin across signers, at
//! most `max_proofs` per image — by resolving the signer's DID document, taking the PDS
//! **from the document** (never from the artifact), fetching the repo proof and checking it
//! with [`crate::proof`]; then hand the facts to [`TrustPolicy::evaluate`]. An untrusted
//! signer's artifact is never followed: its DID document and PDS are not contacted, so its
//! hosts can neither slow nor change the answer.
//!
//! The sources are wrapped in caching decorators ([`CachedRegistry`], [`CachedDids`],
//! [`Proofs`]) that hold **facts, not verdicts**, each kind with its own TTL. There is one
//! verification path: [`Verifier::verify`] runs it loading what is missing, and
//! [`Verifier::verify_cached`] runs the same code reading only fresh cache entries, without
//! waiting (the provider answers cached keys that way, without a task per key).
//!
//! An upstream failure is never "unsigned" and never "verified": when the signatures that
//! could be proven do not satisfy the policy and some could not be checked for a transient
//! reason, the answer is that transient error, not a denial.

mod backfill;
mod cache;
mod cached;
mod discover;
mod index;
mod revisions;
mod revocations;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::join_all;
use serde::Serialize;
use time::OffsetDateTime;
use url::Url;

pub use cache::{CacheStats, Mode, TtlCache};
pub use cached::{CachedDids, CachedRegistry, EndpointError, Proofs};
pub use discover::Discovery;
pub use index::{Indexed, MAX_INDEXED, MAX_INDEXED_PER_DID, SignatureIndex};
pub use revisions::{MAX_REMEMBERED_DIDS, Revisions, STATE_FILE, StateError};
pub use revocations::{MAX_MARKS, Revocations};

use crate::policy::{Evidence, MAX_DETAIL_BYTES, Policy, TrustPolicy, Verdict};
use crate::proof::CarLimits;
use crate::resolve::{
    ArtifactResult, DidResolver, ManifestFact, RecordSource, Registry, ResolveError,
    SignatureArtifact,
};
use crate::syntax::text::inert;
use crate::syntax::{Did, ImageDigest, ImageRef};
use cache::now as clock_now;
use cached::{Fact, ProofOutcome};

/// Cache lifetimes and sizes (all exposed as flags by the faces).
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Tag → digest.
    pub tag_ttl: Duration,
    /// Digest → signature artifacts (and digest references → manifest facts).
    pub referrers_ttl: Duration,
    /// DID → document.
    pub did_ttl: Duration,
    /// (record, digest) → proof outcome: the bound on how late a deleted record (a revoked
    /// signature) is noticed.
    pub proof_ttl: Duration,
    /// Permanent failures (not found, invalid, proof failed).
    pub negative_ttl: Duration,
    /// Transient failures (timeouts, 5xx, 429).
    pub transient_ttl: Duration,
    /// Entries per cache.
    pub cache_capacity: usize,
    /// Caps on proof CARs.
    pub car_limits: CarLimits,
    /// Proofs attempted per image at most (`--max-signatures`); pointers past it are
    /// reported `not checked`.
    pub max_proofs: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        VerifierConfig {
            tag_ttl: Duration::from_secs(60),
            referrers_ttl: Duration::from_secs(300),
            did_ttl: Duration::from_secs(300),
            proof_ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(30),
            transient_ttl: Duration::from_secs(2),
            cache_capacity: 20_000,
            car_limits: CarLimits::default(),
            max_proofs: 32,
        }
    }
}

/// Why an image could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The verification did not finish within its budget.
    #[error("verification did not finish within {}ms", .0.as_millis())]
    Deadline(Duration),
    /// Something that cannot happen did (a bug: please report it). Transient, so it is
    /// never cached as an answer.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The image (tag or digest) does not exist in its registry.
    #[error("{0} not found")]
    NotFound(String),
    /// An upstream (registry, PLC, did:web host, PDS) failed.
    #[error("{context}: {source}")]
    Upstream {
        /// What was being done.
        context: &'static str,
        /// The failure.
        #[source]
        source: ResolveError,
    },
}

impl VerifyError {
    /// Whether asking again later may succeed. The Gatekeeper face must not let a
    /// transient failure be cached as an answer.
    pub fn is_transient(&self) -> bool {
        match self {
            VerifyError::Deadline(_) | VerifyError::Internal(_) => true,
            VerifyError::NotFound(_) => false,
            VerifyError::Upstream { source, .. } => source.is_transient(),
        }
    }

    /// A stable prefix for machines: `not_found`, `deadline_exceeded`, `rate_limited`,
    /// `upstream_unavailable` (transient), `upstream_refused` and `upstream_invalid`
    /// (permanent).
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Deadline(_) => "deadline_exceeded",
            VerifyError::Internal(_) => "internal_error",
            VerifyError::NotFound(_) => "not_found",
            VerifyError::Upstream { source, .. } => source.code(),
        }
    }
}

/// A failure as every face reports it, `{"code", "message", "transient"}`: the CLI's
/// `--json` errors, `/verify`'s and `/validate`'s error bodies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The stable code (`not_found`, `upstream_unavailable`, `bad_request`, …).
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
    /// Whether asking again may succeed.
    pub transient: bool,
}

impl Failure {
    /// A failure with `code` and `message`.
    pub fn new(code: &'static str, message: impl std::fmt::Display, transient: bool) -> Self {
        Failure {
            code,
            message: message.to_string(),
            transient,
        }
    }
}

impl From<&VerifyError> for Failure {
    fn from(e: &VerifyError) -> Self {
        Failure::new(e.code(), e, e.is_transient())
    }
}

/// The answer for one image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    /// The policy's verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The manifest digest that was verified (the one to pin); for an image no policy scopes
    /// (decided without the network), the reference's own digest, if it has one.
    pub digest: Option<ImageDigest>,
    /// The media type of that manifest (`null` when the registry was not asked).
    pub media_type: Option<String>,
    /// True when the digest is an image index (multi-platform image): signatures are
    /// checked on the index, not on a platform manifest.
    pub subject_is_index: bool,
    /// The handle the signer's DID document claims (for `did`), unverified.
    pub handle: Option<String>,
}

/// The verification engine. Cheap to share (`Arc`); all state is in its caches.
#[derive(Debug)]
pub struct Verifier {
    registry: CachedRegistry,
    dids: CachedDids,
    proofs: Proofs,
    max_proofs: usize,
    revocations: Arc<Revocations>,
    index: Arc<SignatureIndex>,
}

/// Cache counters by cache name.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifierStats {
    /// Reference → manifest.
    pub manifests: CacheStats,
    /// Digest → artifacts.
    pub referrers: CacheStats,
    /// DID → document.
    pub documents: CacheStats,
    /// Proof outcomes.
    pub proofs: CacheStats,
}

/// One signature's evidence, plus what the verifier noticed about it and whether it could
/// not be checked for a transient reason.
struct Proven {
    evidence: Evidence,
    note: Option<String>,
    transient: Option<ResolveError>,
}

impl Verifier {
    /// An engine over the given sources, each wrapped in its cache.
    pub fn new(
        registry: Arc<dyn Registry>,
        dids: Arc<dyn DidResolver>,
        records: Arc<dyn RecordSource>,
        config: VerifierConfig,
    ) -> Self {
        let longest = config
            .proof_ttl
            .max(config.did_ttl)
            .max(config.negative_ttl);
        let revocations = Arc::new(Revocations::new(longest));
        Verifier {
            registry: CachedRegistry::new(registry, &config),
            dids: CachedDids::new(dids, &config).with_revocations(Arc::clone(&revocations)),
            proofs: Proofs::new(records, &config).with_revocations(Arc::clone(&revocations)),
            max_proofs: config.max_proofs,
            revocations,
            index: Arc::new(SignatureIndex::default()),
        }
    }

    /// The signature index (digest → trusted signers' records), filled by the follower:
    /// its pointers are merged with the registry's artifacts, each still proven.
    pub fn index(&self) -> &Arc<SignatureIndex> {
        &self.index
    }

    /// Indexes the records of `did`'s `collection` (from the PDS its document names) that
    /// name an image digest, from at most `max` listed records, page by page: how many were
    /// indexed. A hostile PDS cannot keep it paging: see [`backfill`](mod@backfill).
    pub async fn backfill(&self, did: &Did, collection: &str, max: usize) -> Result<usize, String> {
        let pds = self.signer_pds(did).await?;
        let done = backfill::backfill(
            self.proofs.records().as_ref(),
            &pds,
            did,
            collection,
            max,
            &self.index,
            &self.revocations,
        )
        .await?;
        if matches!(
            done.stop,
            backfill::Stop::RepeatedCursor | backfill::Stop::Pages
        ) {
            tracing::warn!(
                %did,
                collection,
                pages = done.pages,
                listed = done.listed,
                stop = ?done.stop,
                "backfill stopped before the end of the listing"
            );
        }
        Ok(done.indexed)
    }

    /// The engine's revocation marks: what the repo event stream says no longer holds
    /// (see [`Revocations`]). Marking only ever shortens what is cached.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The PDS that `did`'s (proven, cached) DID document names, loading the document when
    /// it is not cached: where its repo event stream is.
    pub async fn signer_pds(&self, did: &Did) -> Result<Url, String> {
        let Some((resolved, _)) = self.dids.document(did, Mode::Load).await else {
            return Err("a load gave no answer".into());
        };
        let resolved = resolved.map_err(|e| format!("resolving {did}: {e}"))?;
        match &resolved.endpoint {
            Ok((pds, _)) => Ok(pds.clone()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The same engine, remembering each signer's highest proven repo rev in `revisions`
    /// (by default in memory, per engine): see [`Revisions`] for the no-rollback rule.
    pub fn with_revisions(mut self, revisions: Arc<Revisions>) -> Self {
        self.proofs = self.proofs.with_revisions(revisions);
        self
    }

    /// Cache counters.
    pub fn stats(&self) -> VerifierStats {
        let (manifests, referrers) = self.registry.stats();
        VerifierStats {
            manifests,
            referrers,
            documents: self.dids.stats(),
            proofs: self.proofs.stats(),
        }
    }

    /// The manifest the registry serves for `image` now (from cache when fresh). This is
    /// all the `/mutate` face needs: tag → digest, one registry round trip at most.
    pub async fn resolve(&self, image: &ImageRef) -> Result<ManifestFact, VerifyError> {
        match self.registry.manifest(image, Mode::Load).await {
            Some((fact, _)) => fact.map_err(manifest_error),
            None => Err(VerifyError::Internal("a load gave no answer")),
        }
    }

    /// Verifies `image` under `policy` at `now`, loading whatever is not cached.
    pub async fn verify(
        &self,
        image: &ImageRef,
        policy: &TrustPolicy,
        now: OffsetDateTime,
    ) -> Result<ImageReport, VerifyError> {
        match self.evaluate(image, policy, now, Mode::Load).await {
            Some(result) => result.map(|(report, _)| report),
            None => Err(VerifyError::Internal("a load gave no answer")),
        }
    }

    /// As [`Verifier::verify`], from fresh cached facts only and without waiting: `None`
    /// when a fact is missing or the answer would be an error (then use `verify`).
    ///
    /// The report comes with the instant until which it stays the answer: the earliest
    /// expiry of the facts it rests on, or of the verdict itself (a validity window or
    /// `maxSignatureAge` boundary), whichever comes first. A verdict that rests on no fact
    /// (an image no policy scopes) holds for [`UNMATCHED_HOLDS`] under the same policy.
    pub fn verify_cached(
        &self,
        image: &ImageRef,
        policy: &TrustPolicy,
        now: OffsetDateTime,
    ) -> Option<(ImageReport, Instant)> {
        // Under `Peek` nothing is awaited, so the future is ready at its first poll.
        self.evaluate(image, policy, now, Mode::Peek)
            .now_or_never()
            .flatten()?
            .ok()
    }

    /// The one verification path. `None` only under [`Mode::Peek`], when a fact is not
    /// cached.
    async fn evaluate(
        &self,
        image: &ImageRef,
        policy: &TrustPolicy,
        now: OffsetDateTime,
        mode: Mode,
    ) -> Option<Result<(ImageReport, Instant), VerifyError>> {
        let mut fresh = Freshness::default();
        let Some(matched) = policy.matching(image) else {
            return Some(self.report(image, policy, now, None, &[], fresh));
        };
        // A digest reference names its digest already: its signature artifacts are listed,
        // and the index's records for it proven, while the manifest is resolved.
        let ref_digest = image.digest().filter(|_| matched.requires_signature());
        let early_listing = async {
            match ref_digest {
                Some(d) => Some(self.registry.artifacts(image, d, mode).await),
                None => None,
            }
        };
        let (manifest, early, ()) = futures_util::future::join3(
            self.registry.manifest(image, mode),
            early_listing,
            self.prove_indexed(ref_digest, matched, mode, now),
        )
        .await;
        let fact = match fresh.take(manifest?) {
            Ok(fact) => fact,
            Err(e) => return Some(Err(manifest_error(e))),
        };
        let mut proven = Vec::new();
        let mut registry_failure = None;
        if matched.requires_signature() {
            let digest = &fact.digest;
            let listing = match early {
                Some(listing) if ref_digest == Some(digest) => listing,
                _ => {
                    // A tag: the listing and the index's proofs for the digest it resolved
                    // to, side by side.
                    futures_util::future::join(
                        self.registry.artifacts(image, digest, mode),
                        self.prove_indexed(Some(digest), matched, mode, now),
                    )
                    .await
                    .0
                }
            };
            let listed = fresh.take(listing?);
            let indexed = self.index.lookup(digest);
            let artifacts: Vec<ArtifactResult> = match listed {
                Ok(list) => merge(&list, indexed),
                // The registry could not list its pointers, but the index has some: prove
                // those; when they do not verify the image, the answer is the registry's
                // failure (never "unsigned").
                Err(source) if !indexed.is_empty() => {
                    registry_failure = Some(source);
                    merge(&[], indexed)
                }
                Err(source) => {
                    return Some(Err(VerifyError::Upstream {
                        context: "finding signatures in the registry",
                        source,
                    }));
                }
            };
            let steps = self.plan(&artifacts, matched);
            let results = join_all(steps.into_iter().map(|step| async move {
                match step {
                    Step::Known(p) => Some((*p, None)),
                    Step::Prove(a) => self.prove(a, digest, mode, now).await,
                }
            }))
            .await;
            for (p, until) in results.into_iter().collect::<Option<Vec<_>>>()? {
                if let Some(until) = until {
                    fresh.until(until);
                }
                proven.push(p);
            }
        }
        let report = self.report(image, policy, now, Some(fact), &proven, fresh);
        match (report, registry_failure) {
            (Ok((r, _)), Some(source)) if !r.verdict.verified => Some(Err(VerifyError::Upstream {
                context: "finding signatures in the registry",
                source,
            })),
            (report, _) => Some(report),
        }
    }

    /// Applies the policy to the proven facts and builds the report, with the instant until
    /// which it holds. `fact` is `None` when no policy scopes the image (the registry was not
    /// asked).
    fn report(
        &self,
        image: &ImageRef,
        policy: &TrustPolicy,
        now: OffsetDateTime,
        fact: Option<ManifestFact>,
        proven: &[Proven],
        mut fresh: Freshness,
    ) -> Result<(ImageReport, Instant), VerifyError> {
        let evidence: Vec<Evidence> = proven.iter().map(|p| p.evidence.clone()).collect();
        let mut verdict = policy.evaluate(image, &evidence, now);
        if !verdict.verified
            && let Some(source) = proven.iter().find_map(|p| p.transient.clone())
        {
            return Err(VerifyError::Upstream {
                context: "checking a signature",
                source,
            });
        }
        // The verdict's list may be shorter than the evidence (it is bounded): match notes
        // by record URI.
        for signature in &mut verdict.signatures {
            let note = proven
                .iter()
                .find(|p| p.evidence.uri.is_some() && p.evidence.uri == signature.uri)
                .and_then(|p| p.note.as_ref());
            if let Some(note) = note {
                let detail = match signature.detail.take() {
                    Some(d) => format!("{d}; {note}"),
                    None => note.clone(),
                };
                signature.detail = Some(inert(&detail, MAX_DETAIL_BYTES));
            }
        }
        // The signer's document was just used to prove the signature, so it is cached.
        let handle = verdict
            .did
            .as_ref()
            .and_then(|did| self.dids.cached(did))
            .and_then(|d| d.document.claimed_handle().map(str::to_owned));
        if let Some(at) = verdict.changes_at {
            let left = Duration::try_from(at - now).unwrap_or(Duration::ZERO);
            fresh.until(clock_now() + left);
        }
        let until = fresh.0.unwrap_or_else(|| clock_now() + UNMATCHED_HOLDS);
        let (digest, media_type, subject_is_index) = match fact {
            Some(f) => (Some(f.digest), Some(f.media_type), f.is_index),
            None => (image.digest().cloned(), None, false),
        };
        let report = ImageReport {
            verdict,
            digest,
            media_type,
            subject_is_index,
            handle,
        };
        Ok((report, until))
    }

    /// What to do with each artifact under `policy`: prove it — only when the policy trusts
    /// its DID and its record is in a signature collection, at most `max_proofs`, each
    /// trusted DID's artifacts in turn so that one signer's many pointers cannot crowd out
    /// another's — or report it at once, with no network (an unreadable artifact, an
    /// untrusted signer, another collection, a pointer past the bound). Proofs come first.
    fn plan<'a>(&self, artifacts: &'a [ArtifactResult], policy: &Policy) -> Vec<Step<'a>> {
        let mut nth: HashMap<&Did, usize> = HashMap::new();
        let mut ranked = Vec::new();
        let mut rest = Vec::new();
        for (i, artifact) in artifacts.iter().enumerate() {
            match artifact {
                Ok(a)
                    if policy.trusted(&a.did).is_some()
                        && policy.accepts_collection(a.record_uri.collection().as_str()) =>
                {
                    let round = nth.entry(&a.did).or_insert(0);
                    *round += 1;
                    ranked.push((*round, i, a));
                }
                Ok(a) => rest.push(Step::Known(Box::new(Proven::not_checked(
                    a,
                    "its signer or record cannot count under the matched policy",
                )))),
                Err(e) => rest.push(Step::Known(Box::new(Proven::failed(
                    None,
                    None,
                    e.to_string(),
                    e.transient().cloned(),
                )))),
            }
        }
        ranked.sort_by_key(|&(round, i, _)| (round, i));
        let max = self.max_proofs;
        let mut steps: Vec<Step<'a>> = ranked
            .into_iter()
            .enumerate()
            .map(|(k, (_, _, a))| {
                if k < max {
                    Step::Prove(a)
                } else {
                    Step::Known(Box::new(Proven::not_checked(
                        a,
                        &format!("more than {max} trusted signatures to prove (--max-signatures)"),
                    )))
                }
            })
            .collect();
        steps.extend(rest);
        steps
    }

    /// Proves the records the index names for `digest` that `policy` would prove (trusted
    /// signer, signature collection, at most `max_proofs`), only to fill the proof cache
    /// while the registry is asked: the plan then finds them proven. Nothing under `Peek`.
    async fn prove_indexed(
        &self,
        digest: Option<&ImageDigest>,
        policy: &Policy,
        mode: Mode,
        now: OffsetDateTime,
    ) {
        let Some(digest) = digest.filter(|_| mode == Mode::Load) else {
            return;
        };
        let pointers: Vec<SignatureArtifact> = self
            .index
            .lookup(digest)
            .into_iter()
            .filter(|uri| {
                policy.trusted(uri.did()).is_some()
                    && policy.accepts_collection(uri.collection().as_str())
            })
            .take(self.max_proofs)
            .map(|uri| SignatureArtifact {
                digest: None,
                did: uri.did().clone(),
                record_uri: uri,
                claimed_pds: None,
            })
            .collect();
        join_all(pointers.iter().map(|a| self.prove(a, digest, mode, now))).await;
    }

    /// Proves one artifact's record: the signer's document, then the proof from the PDS it
    /// names. With the earliest expiry of the facts used; `None` under [`Mode::Peek`] when
    /// one is not cached.
    async fn prove(
        &self,
        artifact: &SignatureArtifact,
        digest: &ImageDigest,
        mode: Mode,
        now: OffsetDateTime,
    ) -> Option<(Proven, Option<Instant>)> {
        let did = &artifact.did;
        let uri = artifact.record_uri.to_string();
        let (resolved, doc_until) = self.dids.document(did, mode).await?;
        let resolved = match resolved {
            Ok(d) => d,
            Err(e) => {
                let transient = e.is_transient().then(|| e.clone());
                let failed = Proven::failed(
                    Some(did),
                    Some(&uri),
                    format!("resolving {did}: {e}"),
                    transient,
                );
                return Some((failed, Some(doc_until)));
            }
        };
        let (pds, key) = match &resolved.endpoint {
            Ok(found) => found,
            Err(reason) => {
                let failed = Proven::failed(Some(did), Some(&uri), reason.to_string(), None);
                return Some((failed, Some(doc_until)));
            }
        };
        let (outcome, proof_until) = self
            .proofs
            .outcome(artifact, &resolved, pds, key, digest, mode, now)
            .await?;
        let proven = Proven::from_outcome(artifact, &uri, key, outcome, pds_note(artifact, pds));
        Some((proven, Some(doc_until.min(proof_until))))
    }
}

/// How long a verdict that rests on no cached fact (an image no policy scopes, decided
/// without the network) is kept as the answer under the same policy.
pub const UNMATCHED_HOLDS: Duration = Duration::from_secs(3600);

/// The registry's artifacts, then the index's pointers to records no artifact names (one
/// proof per record).
fn merge(listed: &[ArtifactResult], indexed: Vec<crate::syntax::AtUri>) -> Vec<ArtifactResult> {
    let mut merged = listed.to_vec();
    for uri in indexed {
        let known = listed
            .iter()
            .any(|a| a.as_ref().is_ok_and(|a| a.record_uri == uri));
        if !known {
            merged.push(Ok(SignatureArtifact {
                digest: None,
                did: uri.did().clone(),
                record_uri: uri,
                claimed_pds: None,
            }));
        }
    }
    merged
}

/// One artifact's part in a verification: already known, or to be proven.
enum Step<'a> {
    Known(Box<Proven>),
    Prove(&'a SignatureArtifact),
}

/// The earliest expiry among the cached facts an answer was built from.
#[derive(Default)]
struct Freshness(Option<Instant>);

impl Freshness {
    fn until(&mut self, t: Instant) {
        self.0 = Some(self.0.map_or(t, |u| u.min(t)));
    }

    /// The value of a cache entry, noting its expiry.
    fn take<V>(&mut self, (value, expires): (V, Instant)) -> V {
        self.until(expires);
        value
    }
}

/// A failure to resolve the image itself.
fn manifest_error(e: ResolveError) -> VerifyError {
    match e {
        ResolveError::NotFound { what } => VerifyError::NotFound(what),
        source => VerifyError::Upstream {
            context: "resolving the image in its registry",
            source,
        },
    }
}

impl Proven {
    fn failed(
        did: Option<&Did>,
        uri: Option<&str>,
        reason: String,
        transient: Option<ResolveError>,
    ) -> Proven {
        Proven {
            evidence: Evidence::failed(did.cloned(), uri.map(str::to_owned), reason),
            note: None,
            transient,
        }
    }

    /// An artifact whose proof is not attempted.
    fn not_checked(artifact: &SignatureArtifact, why: &str) -> Proven {
        Proven {
            evidence: Evidence::not_checked(
                artifact.did.clone(),
                artifact.record_uri.to_string(),
                why,
            ),
            note: None,
            transient: None,
        }
    }

    /// The evidence a proof attempt under `key` (a did:key) gives.
    fn from_outcome(
        artifact: &SignatureArtifact,
        uri: &str,
        key: &str,
        outcome: Fact<ProofOutcome>,
        note: Option<String>,
    ) -> Proven {
        let did = &artifact.did;
        let mut proven = match outcome {
            Ok(outcome) => match outcome.as_ref() {
                Ok(record) => Proven {
                    evidence: Evidence::verified(did.clone(), uri, record.signed_at)
                        .with_repository(record.repository.as_deref().map(str::to_owned))
                        .with_key(key.to_owned()),
                    note: None,
                    transient: None,
                },
                Err(e) => Proven::failed(Some(did), Some(uri), e.to_string(), None),
            },
            Err(e) => {
                let transient = e.is_transient().then(|| e.clone());
                Proven::failed(
                    Some(did),
                    Some(uri),
                    format!("fetching the proof: {e}"),
                    transient,
                )
            }
        };
        proven.note = note;
        proven
    }
}

/// Says so when the artifact's (unsigned) `pdsEndpoint` differs from the DID document's.
fn pds_note(artifact: &SignatureArtifact, pds: &Url) -> Option<String> {
    let claimed = artifact.claimed_pds.as_deref()?;
    let same = Url::parse(claimed).is_ok_and(|c| c.origin() == pds.origin());
    (!same).then(|| {
        format!(
            "artifact names PDS {claimed:?}; ignored, the DID document's PDS {} was used",
            pds.as_str().trim_end_matches('/')
        )
    })
}
