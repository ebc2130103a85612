//! The engine against in-memory sources, on a paused clock: what each cache keeps and for
//! how long, how transient and permanent failures mix, single flight, and that the
//! cache-only answer is the same verification. The sources are fakes of the public traits
//! (`Registry`, `DidResolver`, `RecordSource`) that count their calls; the proofs they
//! serve are real signed repo proofs built in memory, checked by the real proof engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::repo::{Signer, build_mst, cid_for, encode, write_car};
use atcr_verify::did_document::DidDocument;
use atcr_verify::net::FetchError;
use atcr_verify::policy::TrustPolicy;
use atcr_verify::resolve::{
    ArtifactResult, DidResolver, ManifestFact, RecordSource, Registry, ResolveError,
    SignatureArtifact,
};
use atcr_verify::syntax::{AtUri, Did, ImageDigest, ImageRef};
use atcr_verify::verify::{CachedDids, CachedRegistry, Verifier, VerifierConfig, VerifyError};
use futures_util::future::BoxFuture;
use ipld_core::ipld::Ipld;
use time::OffsetDateTime;
use url::Url;

const IMAGE: &str = "registry.example/team/app:v1";
const PDS: &str = "https://pds.example/";

fn digest() -> ImageDigest {
    ImageDigest::of_bytes(b"the image manifest")
}

/// A signer: its DID, key and one record signing [`digest`] for `team/app`.
struct Account {
    did: Did,
    signer: Signer,
    uri: AtUri,
}

fn signer(n: u8) -> Account {
    let did: Did = format!(
        "did:plc:{}",
        "a".repeat(23) + &((b'a' + n) as char).to_string()
    )
    .parse()
    .unwrap();
    let uri = format!("at://{did}/io.atcr.manifest/3jzfcijpj2z2a")
        .parse()
        .unwrap();
    Account {
        did,
        signer: Signer::k256(n + 1),
        uri,
    }
}

impl Account {
    fn document(&self) -> DidDocument {
        let doc = serde_json::json!({
            "id": self.did.as_str(),
            "verificationMethod": [{"id": format!("{}#atproto", self.did), "type": "Multikey",
                "controller": self.did.as_str(), "publicKeyMultibase": self.signer.multikey()}],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": PDS}],
        });
        DidDocument::parse(&self.did, &serde_json::to_vec(&doc).unwrap()).unwrap()
    }

    /// A `getRecord` CAR proving the record: commit, MST and record, signed.
    fn proof(&self) -> Vec<u8> {
        self.proof_at("3jzfcijpj2z2a")
    }

    /// The same, from a commit at `rev`.
    fn proof_at(&self, rev: &str) -> Vec<u8> {
        let record = encode(&Ipld::Map(
            [
                ("$type", Ipld::String("io.atcr.manifest".into())),
                ("repository", Ipld::String("team/app".into())),
                ("digest", Ipld::String(digest().to_string())),
                ("createdAt", Ipld::String("2026-01-01T00:00:00Z".into())),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ));
        let record_cid = cid_for(&record);
        let key = format!("io.atcr.manifest/{}", self.uri.rkey());
        let (root, nodes) = build_mst(&[(key, record_cid)]);
        let mut commit: std::collections::BTreeMap<String, Ipld> = [
            ("did", Ipld::String(self.did.to_string())),
            ("version", Ipld::Integer(3)),
            ("data", Ipld::Link(root)),
            ("rev", Ipld::String(rev.into())),
            ("prev", Ipld::Null),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let sig = self.signer.sign(&encode(&Ipld::Map(commit.clone())));
        commit.insert("sig".into(), Ipld::Bytes(sig));
        let commit = encode(&Ipld::Map(commit));
        let commit_cid = cid_for(&commit);
        let mut blocks: Vec<(cid::Cid, Vec<u8>)> = vec![(commit_cid, commit), (record_cid, record)];
        blocks.extend(nodes);
        write_car(&[commit_cid], &blocks)
    }

    fn artifact(&self) -> ArtifactResult {
        Ok(SignatureArtifact {
            digest: Some(ImageDigest::of_bytes(self.uri.to_string().as_bytes())),
            did: self.did.clone(),
            record_uri: self.uri.clone(),
            claimed_pds: None,
        })
    }
}

/// Calls per source, and what each answers (with an optional delay, on tokio's clock).
#[derive(Default, Debug)]
struct World {
    calls: Mutex<HashMap<&'static str, u64>>,
    delay: Mutex<Duration>,
    manifest: Mutex<Option<Result<ManifestFact, ResolveError>>>,
    artifacts: Mutex<Vec<ArtifactResult>>,
    documents: Mutex<HashMap<Did, Result<DidDocument, ResolveError>>>,
    records: Mutex<HashMap<String, Result<Vec<u8>, ResolveError>>>,
    /// Extra delay for one record's proof, by record URI.
    record_delays: Mutex<HashMap<String, Duration>>,
    total: AtomicU64,
}

impl World {
    fn calls(&self, what: &'static str) -> u64 {
        self.calls.lock().unwrap().get(what).copied().unwrap_or(0)
    }

    async fn called(&self, what: &'static str) {
        *self.calls.lock().unwrap().entry(what).or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[derive(Debug, Clone)]
struct Fake(Arc<World>);

impl Registry for Fake {
    fn resolve<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<ManifestFact, ResolveError>> {
        Box::pin(async move {
            self.0.called("manifest").await;
            self.0.manifest.lock().unwrap().clone().unwrap()
        })
    }

    fn signature_artifacts<'a>(
        &'a self,
        _: &'a ImageRef,
        _: &'a ImageDigest,
    ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>> {
        Box::pin(async move {
            self.0.called("artifacts").await;
            Ok(self.0.artifacts.lock().unwrap().clone())
        })
    }
}

impl DidResolver for Fake {
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
        Box::pin(async move {
            self.0.called("document").await;
            self.0.documents.lock().unwrap()[did].clone()
        })
    }
}

impl RecordSource for Fake {
    fn get_record<'a>(
        &'a self,
        _: &'a Url,
        uri: &'a AtUri,
    ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>> {
        Box::pin(async move {
            self.0.called("record").await;
            let delay = self
                .0
                .record_delays
                .lock()
                .unwrap()
                .get(&uri.to_string())
                .copied();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            self.0.records.lock().unwrap()[&uri.to_string()].clone()
        })
    }
}

/// A world where `signers` each signed the image, and an engine over it.
fn setup(signers: &[&Account]) -> (Arc<World>, Verifier) {
    let world = Arc::new(World::default());
    *world.manifest.lock().unwrap() = Some(Ok(ManifestFact {
        digest: digest(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        is_index: false,
    }));
    for s in signers {
        world.artifacts.lock().unwrap().push(s.artifact());
        world
            .documents
            .lock()
            .unwrap()
            .insert(s.did.clone(), Ok(s.document()));
        world
            .records
            .lock()
            .unwrap()
            .insert(s.uri.to_string(), Ok(s.proof()));
    }
    let fake = Arc::new(Fake(Arc::clone(&world)));
    let v = Verifier::new(fake.clone(), fake.clone(), fake, VerifierConfig::default());
    (world, v)
}

fn policy(trusted: &[&Account], min: usize) -> TrustPolicy {
    let dids: Vec<String> = trusted.iter().map(|s| s.did.to_string()).collect();
    TrustPolicy::from_yaml(&format!(
        "version: 1\npolicies:\n  - name: p\n    scope: \"registry.example/**\"\n    trustedDIDs: [{}]\n    minSignatures: {min}\n",
        dids.join(", ")
    ))
    .unwrap()
}

fn image() -> ImageRef {
    IMAGE.parse().unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_780_000_000).unwrap() // 2026-05-28
}

async fn verified(v: &Verifier, p: &TrustPolicy) -> bool {
    v.verify(&image(), p, now()).await.unwrap().verdict.verified
}

fn counts(w: &World) -> [u64; 4] {
    ["manifest", "artifacts", "document", "record"].map(|k| w.calls(k))
}

fn timeout() -> ResolveError {
    ResolveError::Fetch(FetchError::Timeout {
        url: "https://registry.example/v2/".into(),
        timeout: Duration::from_secs(5),
    })
}

#[tokio::test(start_paused = true)]
async fn each_fact_expires_at_its_own_ttl() {
    let alice = signer(0);
    let (w, v) = setup(&[&alice]);
    let p = policy(&[&alice], 1);
    let advance = |s: u64| tokio::time::advance(Duration::from_secs(s));
    assert!(verified(&v, &p).await);
    assert_eq!(counts(&w), [1, 1, 1, 1]);
    advance(59).await;
    assert!(verified(&v, &p).await);
    assert_eq!(counts(&w), [1, 1, 1, 1], "everything cached at 59 s");
    advance(2).await; // 61 s: the tag (60 s)
    assert!(verified(&v, &p).await);
    assert_eq!(counts(&w), [2, 1, 1, 1], "only the tag is asked again");
    advance(240).await; // 301 s: referrers and DID document (5 min), the tag again
    assert!(verified(&v, &p).await);
    assert_eq!(counts(&w), [3, 2, 2, 1]);
    advance(300).await; // 601 s: the proof (10 min)
    assert!(verified(&v, &p).await);
    assert_eq!(counts(&w), [4, 3, 3, 2]);
}

#[tokio::test(start_paused = true)]
async fn the_cache_only_answer_is_the_same_verification() {
    let alice = signer(0);
    let (w, v) = setup(&[&alice]);
    let p = policy(&[&alice], 1);
    assert!(
        v.verify_cached(&image(), &p, now()).is_none(),
        "cold: nothing cached"
    );
    let full = v.verify(&image(), &p, now()).await.unwrap();
    let before = w.total.load(Ordering::SeqCst);
    let (cached, until) = v.verify_cached(&image(), &p, now()).unwrap();
    assert_eq!(
        w.total.load(Ordering::SeqCst),
        before,
        "no source was asked"
    );
    assert_eq!(
        serde_json::to_value(&cached).unwrap(),
        serde_json::to_value(&full).unwrap()
    );
    // It holds until the first of its facts expires: the tag's 60 s.
    let left = until.duration_since(tokio::time::Instant::now().into_std());
    assert_eq!(left, Duration::from_secs(60));
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(
        v.verify_cached(&image(), &p, now()).is_none(),
        "the tag expired"
    );
}

#[tokio::test(start_paused = true)]
async fn failures_are_cached_by_kind() {
    let alice = signer(0);
    let (w, v) = setup(&[&alice]);
    let p = policy(&[&alice], 1);
    // Transient (a timeout): kept 2 s, and the answer is transient, never a verdict.
    *w.manifest.lock().unwrap() = Some(Err(timeout()));
    let e = v.verify(&image(), &p, now()).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(matches!(e, VerifyError::Upstream { .. }));
    tokio::time::advance(Duration::from_millis(1900)).await;
    assert!(v.verify(&image(), &p, now()).await.is_err());
    assert_eq!(w.calls("manifest"), 1);
    tokio::time::advance(Duration::from_millis(200)).await;
    *w.manifest.lock().unwrap() = Some(Err(ResolveError::NotFound {
        what: "image".into(),
    }));
    // Permanent (not found): kept 30 s.
    let e = v.verify(&image(), &p, now()).await.unwrap_err();
    assert_eq!(e, VerifyError::NotFound("image".into()));
    assert_eq!(w.calls("manifest"), 2);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(v.verify(&image(), &p, now()).await.is_err());
    assert_eq!(w.calls("manifest"), 2);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(v.verify(&image(), &p, now()).await.is_err());
    assert_eq!(w.calls("manifest"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_proof_is_kept_for_the_negative_ttl() {
    let alice = signer(0);
    let (w, v) = setup(&[&alice]);
    let p = policy(&[&alice], 1);
    // The record was deleted: the PDS says so (permanent), the signature does not count.
    w.records.lock().unwrap().insert(
        alice.uri.to_string(),
        Err(ResolveError::NotFound {
            what: "record".into(),
        }),
    );
    assert!(!verified(&v, &p).await);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(!verified(&v, &p).await);
    assert_eq!(w.calls("record"), 1);
    // Signed again, it counts once the negative entry has expired.
    w.records
        .lock()
        .unwrap()
        .insert(alice.uri.to_string(), Ok(alice.proof()));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(verified(&v, &p).await);
    assert_eq!(w.calls("record"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_decides_only_when_it_could_matter() {
    let (alice, bob) = (signer(0), signer(1));
    let (w, v) = setup(&[&alice, &bob]);
    w.documents
        .lock()
        .unwrap()
        .insert(bob.did.clone(), Err(timeout()));
    // One of two is enough: verified, bob's failure listed.
    let report = v
        .verify(&image(), &policy(&[&alice, &bob], 1), now())
        .await
        .unwrap();
    assert!(report.verdict.verified);
    let bobs = report
        .verdict
        .signatures
        .iter()
        .find(|s| s.did.as_ref() == Some(&bob.did))
        .unwrap();
    assert!(!bobs.counted);
    // Both needed: bob's failure could change the answer, so the answer is that failure.
    let e = v
        .verify(&image(), &policy(&[&alice, &bob], 2), now())
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    // A permanent failure instead decides: not verified.
    tokio::time::advance(Duration::from_secs(3)).await;
    w.documents.lock().unwrap().insert(
        bob.did.clone(),
        Err(ResolveError::NotFound { what: "DID".into() }),
    );
    let report = v
        .verify(&image(), &policy(&[&alice, &bob], 2), now())
        .await
        .unwrap();
    assert!(!report.verdict.verified);
}

#[tokio::test(start_paused = true)]
async fn concurrent_verifications_share_each_fetch() {
    let alice = signer(0);
    let (w, v) = setup(&[&alice]);
    *w.delay.lock().unwrap() = Duration::from_millis(50);
    let v = Arc::new(v);
    let p = Arc::new(policy(&[&alice], 1));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (v, p) = (Arc::clone(&v), Arc::clone(&p));
            tokio::spawn(async move { verified(&v, &p).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(counts(&w), [1, 1, 1, 1]);
    let stats = v.stats();
    assert_eq!(stats.manifests.misses, 1);
    assert_eq!(stats.manifests.hits, 19);
}

#[tokio::test(start_paused = true)]
async fn a_cached_source_is_itself_a_source() {
    let alice = signer(0);
    let (w, _) = setup(&[&alice]);
    let fake = Arc::new(Fake(Arc::clone(&w)));
    let config = VerifierConfig::default();
    let registry: Arc<dyn Registry> = Arc::new(CachedRegistry::new(fake.clone(), &config));
    let dids: Arc<dyn DidResolver> = Arc::new(CachedDids::new(fake, &config));
    for _ in 0..3 {
        assert_eq!(registry.resolve(&image()).await.unwrap().digest, digest());
        let list = registry
            .signature_artifacts(&image(), &digest())
            .await
            .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(dids.resolve(&alice.did).await.unwrap().did(), &alice.did);
    }
    assert_eq!(counts(&w), [1, 1, 1, 0]);
}

/// No rollback, on the engine's own terms: a proof is stale only against the highest rev
/// proven for the signer **before it was asked for**, so of two proofs fetched at once the
/// slower, older one still counts; a cached outcome is not re-judged when a newer rev is
/// learned; once it expires, the same old answer is refused.
#[tokio::test(start_paused = true)]
async fn a_proof_is_stale_only_against_a_rev_known_before_it_was_asked() {
    let alice = signer(0);
    let (w, v) = setup(&[&alice]);
    let mut newer = signer(0);
    newer.uri = format!("at://{}/io.atcr.manifest/3jzfcijpj2z2c", newer.did)
        .parse()
        .unwrap();
    w.artifacts.lock().unwrap().push(newer.artifact());
    w.records
        .lock()
        .unwrap()
        .insert(newer.uri.to_string(), Ok(newer.proof_at("3jzfcijpj2z2b")));
    w.record_delays
        .lock()
        .unwrap()
        .insert(alice.uri.to_string(), Duration::from_secs(1));
    let p = policy(&[&alice], 1);
    let reasons = |r: &atcr_verify::verify::ImageReport| -> Vec<String> {
        r.verdict
            .signatures
            .iter()
            .map(|s| {
                s.reason
                    .as_ref()
                    .map_or("counted".into(), |r| r.to_string())
            })
            .collect()
    };

    // Both asked at once; the older answer arrives after the newer rev is known.
    let report = v.verify(&image(), &p, now()).await.unwrap();
    assert_eq!(reasons(&report), ["counted", "duplicate"], "{report:#?}");
    // Within the proof TTL the cached outcome stands.
    tokio::time::advance(Duration::from_secs(590)).await;
    let report = v.verify(&image(), &p, now()).await.unwrap();
    assert_eq!(reasons(&report), ["counted", "duplicate"]);
    assert_eq!(w.calls("record"), 2);
    // Asked again, the PDS still answers the old state for the first record: now stale.
    tokio::time::advance(Duration::from_secs(20)).await;
    let report = v.verify(&image(), &p, now()).await.unwrap();
    let r = reasons(&report);
    assert!(report.verdict.verified, "the newer proof still counts");
    assert!(
        r[0].starts_with("proof failed: stale commit: the PDS served rev 3jzfcijpj2z2a of ")
            && r[0].contains("older than rev 3jzfcijpj2z2b already proven"),
        "{r:?}"
    );
    assert_eq!(r[1], "counted");
}
