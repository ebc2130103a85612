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
//! Caches hold **facts, not verdicts** (so a policy edit applies to the next request):
//! reference → manifest digest, digest → signature artifacts, DID → document, and
//! (record, digest, PDS, key) → proof outcome. Each has its own TTL; failures are cached
//! briefly, transient ones shortest. Concurrent requests for a missing fact share one
//! upstream fetch.
//!
//! An upstream failure is never "unsigned" and never "verified": when the signatures that
//! could be proven do not satisfy the policy and some could not be checked for a transient
//! reason, the answer is that transient error, not a denial.

mod cache;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use time::OffsetDateTime;
use url::Url;

pub use cache::{CacheStats, TtlCache};

use crate::did_document::DidDocument;
use crate::net::FetchError;
use crate::policy::{Evidence, MAX_DETAIL_BYTES, Policy, TrustPolicy, Verdict};
use crate::proof::{self, CarLimits, ProofError, VerifiedRecord};
use crate::resolve::{
    ArtifactResult, DidResolver, ManifestFact, RecordSource, Registry, ResolveError,
    SignatureArtifact,
};
use crate::syntax::text::{inert, outside};
use crate::syntax::{Did, ImageDigest, ImageRef};

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
            VerifyError::Deadline(_) => true,
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
            VerifyError::NotFound(_) => "not_found",
            VerifyError::Upstream { source, .. } => match source {
                ResolveError::Fetch(FetchError::RateLimited { .. }) => "rate_limited",
                ResolveError::Fetch(FetchError::Refused { .. }) => "upstream_refused",
                ResolveError::Fetch(FetchError::TooLarge { .. }) | ResolveError::Invalid { .. } => {
                    "upstream_invalid"
                }
                ResolveError::NotFound { .. } | ResolveError::Deactivated { .. } => "not_found",
                ResolveError::Fetch(_)
                | ResolveError::Denied { .. }
                | ResolveError::Unavailable { .. } => "upstream_unavailable",
            },
        }
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

/// What a proof attempt ended in.
type ProofOutcome = Result<VerifiedRecord, ProofError>;
/// A proof is cached per (record URI, image digest, PDS URL, signing key as did:key).
type ProofKey = (String, ImageDigest, String, String);
/// A cached fact: the value, or the failure that stands in for it until its TTL ends.
type Fact<T> = Result<Arc<T>, ResolveError>;

/// The verification engine. Cheap to share (`Arc`); all state is in caches.
#[derive(Debug)]
pub struct Verifier {
    registry: Arc<dyn Registry>,
    dids: Arc<dyn DidResolver>,
    records: Arc<dyn RecordSource>,
    config: VerifierConfig,
    manifests: TtlCache<(String, String), Result<ManifestFact, ResolveError>>,
    referrers: TtlCache<(String, ImageDigest), Fact<Vec<ArtifactResult>>>,
    documents: TtlCache<Did, Fact<ResolvedDid>>,
    proofs: TtlCache<ProofKey, Fact<ProofOutcome>>,
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

/// A DID document with what verification takes from it, worked out once per load: the
/// PDS URL and the signing key (as `did:key`), or why the document gives none.
#[derive(Debug)]
struct ResolvedDid {
    document: DidDocument,
    endpoint: Result<(Url, String), String>,
}

/// One signature's evidence, plus what the verifier noticed about it and whether it could
/// not be checked for a transient reason.
struct Proven {
    evidence: Evidence,
    note: Option<String>,
    transient: Option<ResolveError>,
}

impl Verifier {
    /// An engine over the given sources.
    pub fn new(
        registry: Arc<dyn Registry>,
        dids: Arc<dyn DidResolver>,
        records: Arc<dyn RecordSource>,
        config: VerifierConfig,
    ) -> Self {
        let cap = config.cache_capacity;
        Verifier {
            registry,
            dids,
            records,
            manifests: TtlCache::new(cap),
            referrers: TtlCache::new(cap),
            documents: TtlCache::new(cap),
            proofs: TtlCache::new(cap),
            config,
        }
    }

    /// Cache counters.
    pub fn stats(&self) -> VerifierStats {
        VerifierStats {
            manifests: self.manifests.stats(),
            referrers: self.referrers.stats(),
            documents: self.documents.stats(),
            proofs: self.proofs.stats(),
        }
    }

    fn failure_ttl(&self, e: &ResolveError) -> Duration {
        if e.is_transient() {
            self.config.transient_ttl
        } else {
            self.config.negative_ttl
        }
    }

    /// The manifest the registry serves for `image` now (from cache when fresh). This is
    /// all the `/mutate` face needs: tag → digest, one registry round trip at most.
    pub async fn resolve(&self, image: &ImageRef) -> Result<ManifestFact, VerifyError> {
        let by_digest = image.digest().is_some();
        let key = manifest_key(image);
        self.manifests
            .get_or_load(
                &key,
                || self.registry.resolve(image),
                |r| match r {
                    Ok(_) if by_digest => self.config.referrers_ttl,
                    Ok(_) => self.config.tag_ttl,
                    Err(e) => self.failure_ttl(e),
                },
            )
            .await
            .map_err(|e| match e {
                ResolveError::NotFound { what } => VerifyError::NotFound(what),
                source => VerifyError::Upstream {
                    context: "resolving the image in its registry",
                    source,
                },
            })
    }

    /// Verifies `image` under `policy` at `now`.
    pub async fn verify(
        &self,
        image: &ImageRef,
        policy: &TrustPolicy,
        now: OffsetDateTime,
    ) -> Result<ImageReport, VerifyError> {
        let Some(matched) = policy.matching(image) else {
            return self.report(image, policy, now, None, &[]);
        };
        let fact = self.resolve(image).await?;
        let proven = if matched.requires_signature() {
            let artifacts = self.artifacts(image, &fact.digest).await?;
            let digest = &fact.digest;
            join_all(
                self.plan(&artifacts, matched)
                    .into_iter()
                    .map(|step| async move {
                        match step {
                            Step::Known(p) => p,
                            Step::Prove(a) => self.prove(a, digest).await,
                        }
                    }),
            )
            .await
        } else {
            Vec::new()
        };
        self.report(image, policy, now, Some(fact), &proven)
    }

    /// As [`Verifier::verify`], but only from fresh cached facts, without waiting for
    /// anything: `None` when any fact is missing or is a cached failure (then use
    /// `verify`). The provider answers cached keys this way, without a task per key.
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
        let mut fresh = Freshness::default();
        let (fact, proven) = match policy.matching(image) {
            None => (None, Vec::new()),
            Some(matched) => {
                let fact = fresh
                    .take(self.manifests.peek(&manifest_key(image))?)
                    .ok()?;
                let proven = if matched.requires_signature() {
                    let artifacts = fresh
                        .take(self.referrers.peek(&(image.name(), fact.digest.clone()))?)
                        .ok()?;
                    self.plan(&artifacts, matched)
                        .into_iter()
                        .map(|step| match step {
                            Step::Known(p) => Some(p),
                            Step::Prove(a) => self.prove_cached(a, &fact.digest, &mut fresh),
                        })
                        .collect::<Option<Vec<Proven>>>()?
                } else {
                    Vec::new()
                };
                (Some(fact), proven)
            }
        };
        let report = self.report(image, policy, now, fact, &proven).ok()?;
        if let Some(at) = report.verdict.changes_at {
            let left = Duration::try_from(at - now).unwrap_or(Duration::ZERO);
            fresh.until(Instant::now() + left);
        }
        let until = fresh.0.unwrap_or_else(|| Instant::now() + UNMATCHED_HOLDS);
        Some((report, until))
    }

    /// Applies the policy to the proven facts and builds the report. `fact` is `None` when
    /// no policy scopes the image (the registry was not asked).
    fn report(
        &self,
        image: &ImageRef,
        policy: &TrustPolicy,
        now: OffsetDateTime,
        fact: Option<ManifestFact>,
        proven: &[Proven],
    ) -> Result<ImageReport, VerifyError> {
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
            .and_then(|did| self.documents.peek(did))
            .and_then(|(d, _)| d.ok())
            .and_then(|d| d.document.claimed_handle().map(str::to_owned));
        let (digest, media_type, subject_is_index) = match fact {
            Some(f) => (Some(f.digest), Some(f.media_type), f.is_index),
            None => (image.digest().cloned(), None, false),
        };
        Ok(ImageReport {
            verdict,
            digest,
            media_type,
            subject_is_index,
            handle,
        })
    }

    /// The signature artifacts attached to `digest` (cached). A listing in which some
    /// artifact could not be read for a transient reason is kept only briefly.
    async fn artifacts(
        &self,
        image: &ImageRef,
        digest: &ImageDigest,
    ) -> Result<Arc<Vec<ArtifactResult>>, VerifyError> {
        let key = (image.name(), digest.clone());
        let has_transient = |list: &[ArtifactResult]| {
            list.iter()
                .any(|a| a.as_ref().is_err_and(|e| e.transient().is_some()))
        };
        self.referrers
            .get_or_load(
                &key,
                || async {
                    self.registry
                        .signature_artifacts(image, digest)
                        .await
                        .map(Arc::new)
                },
                |r| match r {
                    Ok(list) if has_transient(list) => self.config.transient_ttl,
                    Ok(_) => self.config.referrers_ttl,
                    Err(e) => self.failure_ttl(e),
                },
            )
            .await
            .map_err(|source| VerifyError::Upstream {
                context: "finding signatures in the registry",
                source,
            })
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
                Ok(a) => rest.push(Step::Known(Proven::not_checked(
                    a,
                    "its signer or record cannot count under the matched policy",
                ))),
                Err(e) => rest.push(Step::Known(Proven::failed(
                    None,
                    None,
                    e.to_string(),
                    e.transient().cloned(),
                ))),
            }
        }
        ranked.sort_by_key(|&(round, i, _)| (round, i));
        let max = self.config.max_proofs;
        let mut steps: Vec<Step<'a>> = ranked
            .into_iter()
            .enumerate()
            .map(|(k, (_, _, a))| {
                if k < max {
                    Step::Prove(a)
                } else {
                    Step::Known(Proven::not_checked(
                        a,
                        &format!("more than {max} trusted signatures to prove (--max-signatures)"),
                    ))
                }
            })
            .collect();
        steps.extend(rest);
        steps
    }

    async fn document(&self, did: &Did) -> Result<Arc<ResolvedDid>, ResolveError> {
        self.documents
            .get_or_load(
                did,
                || async {
                    self.dids.resolve(did).await.map(|document| {
                        let endpoint = pds_and_key(&document);
                        Arc::new(ResolvedDid { document, endpoint })
                    })
                },
                |r| match r {
                    Ok(_) => self.config.did_ttl,
                    Err(e) => self.failure_ttl(e),
                },
            )
            .await
    }

    async fn prove(&self, artifact: &SignatureArtifact, digest: &ImageDigest) -> Proven {
        let did = &artifact.did;
        let uri = artifact.record_uri.to_string();
        let resolved = match self.document(did).await {
            Ok(d) => d,
            Err(e) => {
                let transient = e.is_transient().then(|| e.clone());
                return Proven::failed(
                    Some(did),
                    Some(&uri),
                    format!("resolving {did}: {e}"),
                    transient,
                );
            }
        };
        let (pds, key) = match &resolved.endpoint {
            Ok(found) => found,
            Err(reason) => return Proven::failed(Some(did), Some(&uri), reason.clone(), None),
        };
        let cache_key = (uri.clone(), digest.clone(), pds.to_string(), key.clone());
        let outcome = self
            .proofs
            .get_or_load(
                &cache_key,
                || async {
                    let car = self.records.get_record(pds, &artifact.record_uri).await?;
                    Ok(Arc::new(proof::verify_with_document(
                        &car,
                        &resolved.document,
                        &artifact.record_uri,
                        digest,
                        &self.config.car_limits,
                    )))
                },
                |r| match r {
                    Ok(outcome) if outcome.is_ok() => self.config.proof_ttl,
                    Ok(_) => self.config.negative_ttl,
                    Err(e) => self.failure_ttl(e),
                },
            )
            .await;
        Proven::from_outcome(artifact, &uri, outcome, pds_note(artifact, pds))
    }

    /// As [`Verifier::prove`], from fresh cached successes only.
    fn prove_cached(
        &self,
        artifact: &SignatureArtifact,
        digest: &ImageDigest,
        fresh: &mut Freshness,
    ) -> Option<Proven> {
        let uri = artifact.record_uri.to_string();
        let resolved = fresh.take(self.documents.peek(&artifact.did)?).ok()?;
        let Ok((pds, key)) = &resolved.endpoint else {
            return None;
        };
        let cache_key = (uri.clone(), digest.clone(), pds.to_string(), key.clone());
        let outcome = fresh.take(self.proofs.peek(&cache_key)?).ok()?;
        Some(Proven::from_outcome(
            artifact,
            &uri,
            Ok(outcome),
            pds_note(artifact, pds),
        ))
    }
}

/// How long a verdict that rests on no cached fact (an image no policy scopes, decided
/// without the network) is kept as the answer under the same policy.
pub const UNMATCHED_HOLDS: Duration = Duration::from_secs(3600);

/// One artifact's part in a verification: already known, or to be proven.
enum Step<'a> {
    Known(Proven),
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

    /// The evidence a proof attempt gives.
    fn from_outcome(
        artifact: &SignatureArtifact,
        uri: &str,
        outcome: Fact<ProofOutcome>,
        note: Option<String>,
    ) -> Proven {
        let did = &artifact.did;
        let mut proven = match outcome {
            Ok(outcome) => match outcome.as_ref() {
                Ok(record) => Proven {
                    evidence: Evidence::verified(did.clone(), uri, record.signed_at)
                        .with_repository(record.repository.clone()),
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

/// The manifest cache key of a reference: (name, tag or digest).
fn manifest_key(image: &ImageRef) -> (String, String) {
    let reference = match image.digest() {
        Some(d) => d.to_string(),
        None => image.tag().unwrap_or("latest").to_owned(),
    };
    (image.name(), reference)
}

/// The PDS URL and signing key (as `did:key`) a DID document gives, or why not.
fn pds_and_key(document: &DidDocument) -> Result<(Url, String), String> {
    let key = document.signing_key().map_err(|e| e.to_string())?;
    let pds = document.pds_endpoint().map_err(|e| e.to_string())?;
    let shown = outside(pds);
    let url = Url::parse(pds).map_err(|e| {
        format!(
            "DID document of {} names PDS {shown:?}: {e}",
            document.did()
        )
    })?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(format!(
            "DID document of {} names PDS {shown:?}, which is not an http(s) URL",
            document.did()
        ));
    }
    Ok((url, key.to_did_key()))
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
