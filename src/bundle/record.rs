//! Writing a bundle: recording decorators over the HTTP sources, keeping the bytes each
//! fact was checked from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use time::OffsetDateTime;
use url::Url;

use super::format::{
    BundleFile, IdentityEntry, ManifestEntry, RecordEntry, SignatureEntry, SignaturesEntry,
    VERSION, encode, timestamp,
};
use crate::did_document::DidDocument;
use crate::resolve::{
    ArtifactResult, DidResolver, HttpDidResolver, HttpRecordSource, HttpRegistry, ManifestFact,
    RawArtifact, RawIdentity, RawManifest, RecordSource, Registry, ResolveError, SignatureArtifact,
};
use crate::syntax::{AtUri, Did, ImageDigest, ImageRef};

/// (image name, tag when asked by tag, digest).
type ManifestKey = (String, Option<String>, String);
/// (media type, bytes, when fetched).
type ManifestBytes = (String, Vec<u8>, OffsetDateTime);
/// The artifacts read for a subject, with when.
type ArtifactsRead = (Vec<(SignatureArtifact, RawArtifact)>, OffsetDateTime);

/// What the sources fetched, as bytes, with when.
#[derive(Debug, Default)]
struct Recorded {
    manifests: BTreeMap<ManifestKey, ManifestBytes>,
    /// (name, subject) → artifacts.
    signatures: BTreeMap<(String, String), ArtifactsRead>,
    identities: BTreeMap<String, (RawIdentity, OffsetDateTime)>,
    /// URI → (PDS, CAR, when).
    records: BTreeMap<String, (String, Vec<u8>, OffsetDateTime)>,
}

/// Records what a verification fetched, through [`Recorder::sources`], and turns it into a
/// bundle.
#[derive(Debug, Default)]
pub struct Recorder {
    recorded: Mutex<Recorded>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic while recording leaves at worst a missing fact, which the offline check
        // then reports as missing: nothing is wrongly trusted.
        self.recorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's sources: the given HTTP sources, each answer recorded. The DID resolver
    /// must take `did:plc` identities from their operation log ([`crate::resolve::PlcTrust::Log`]),
    /// or the bundle cannot prove them.
    pub fn sources(
        self: &Arc<Self>,
        registry: Arc<HttpRegistry>,
        dids: HttpDidResolver,
        records: HttpRecordSource,
    ) -> (
        Arc<dyn Registry>,
        Arc<dyn DidResolver>,
        Arc<dyn RecordSource>,
    ) {
        (
            Arc::new(Recording {
                inner: registry,
                recorder: self.clone(),
            }),
            Arc::new(Recording {
                inner: dids,
                recorder: self.clone(),
            }),
            Arc::new(Recording {
                inner: records,
                recorder: self.clone(),
            }),
        )
    }

    /// The bundle of what was recorded: every manifest, and of the signatures only those
    /// whose signer the engine went on to resolve (the signers the policy trusts), with
    /// their identities and proofs.
    pub fn bundle(&self, created_at: OffsetDateTime) -> BundleFile {
        let recorded = self.lock();
        let manifests = recorded
            .manifests
            .iter()
            .map(
                |((image, tag, digest), (media_type, bytes, at))| ManifestEntry {
                    image: image.clone(),
                    tag: tag.clone(),
                    digest: digest.clone(),
                    media_type: media_type.clone(),
                    manifest: encode(bytes),
                    fetched_at: timestamp(*at),
                },
            )
            .collect();
        let signatures = recorded
            .signatures
            .iter()
            .map(|((image, subject), (artifacts, at))| SignaturesEntry {
                image: image.clone(),
                subject: subject.clone(),
                fetched_at: timestamp(*at),
                // Every listed artifact (they are small, and capped like online): offline, a
                // policy trusting another signer then finds its pointer, and answers "not in
                // the bundle" (undecided) rather than "unsigned".
                artifacts: artifacts
                    .iter()
                    .map(|(_, raw)| SignatureEntry {
                        digest: raw.digest.to_string(),
                        manifest: encode(&raw.manifest),
                        layer: encode(&raw.layer),
                    })
                    .collect(),
            })
            .collect();
        let identities = recorded
            .identities
            .iter()
            .map(|(did, (raw, at))| IdentityEntry {
                did: did.clone(),
                document: encode(&raw.document),
                log: raw.log.as_deref().map(encode),
                fetched_at: timestamp(*at),
            })
            .collect();
        let records = recorded
            .records
            .iter()
            .map(|(uri, (pds, car, at))| RecordEntry {
                uri: uri.clone(),
                pds: pds.clone(),
                car: encode(car),
                fetched_at: timestamp(*at),
            })
            .collect();
        BundleFile {
            version: VERSION,
            created_at: timestamp(created_at),
            generator: concat!("atcr-verify ", env!("CARGO_PKG_VERSION")).to_owned(),
            manifests,
            signatures,
            identities,
            records,
        }
    }
}

/// A source whose answers are recorded.
#[derive(Debug)]
struct Recording<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

impl Registry for Recording<Arc<HttpRegistry>> {
    fn resolve<'a>(
        &'a self,
        image: &'a ImageRef,
    ) -> BoxFuture<'a, Result<ManifestFact, ResolveError>> {
        Box::pin(async move {
            let (fact, raw): (ManifestFact, RawManifest) = self.inner.resolve_raw(image).await?;
            // A tag beside a digest is not asked for: only a tag alone is a tag fact.
            let tag = image
                .digest()
                .is_none()
                .then(|| image.tag().unwrap_or("latest").to_owned());
            self.recorder.lock().manifests.insert(
                (image.name(), tag, fact.digest.to_string()),
                (
                    fact.media_type.clone(),
                    raw.bytes,
                    OffsetDateTime::now_utc(),
                ),
            );
            Ok(fact)
        })
    }

    fn signature_artifacts<'a>(
        &'a self,
        image: &'a ImageRef,
        subject: &'a ImageDigest,
    ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>> {
        Box::pin(async move {
            let read = self.inner.signature_artifacts_raw(image, subject).await?;
            let mut kept = Vec::new();
            let results = read
                .into_iter()
                .map(|r| {
                    r.map(|(artifact, raw)| {
                        kept.push((artifact.clone(), raw));
                        artifact
                    })
                })
                .collect();
            self.recorder.lock().signatures.insert(
                (image.name(), subject.to_string()),
                (kept, OffsetDateTime::now_utc()),
            );
            Ok(results)
        })
    }
}

impl DidResolver for Recording<HttpDidResolver> {
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
        Box::pin(async move {
            let (document, raw) = self.inner.resolve_raw(did).await?;
            self.recorder
                .lock()
                .identities
                .insert(did.to_string(), (raw, OffsetDateTime::now_utc()));
            Ok(document)
        })
    }
}

impl RecordSource for Recording<HttpRecordSource> {
    fn get_record<'a>(
        &'a self,
        pds: &'a Url,
        uri: &'a AtUri,
    ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>> {
        Box::pin(async move {
            let car = self.inner.get_record(pds, uri).await?;
            self.recorder.lock().records.insert(
                uri.to_string(),
                (pds.to_string(), car.clone(), OffsetDateTime::now_utc()),
            );
            Ok(car)
        })
    }
}
