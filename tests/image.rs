//! From image reference to verdict over the network, against real local servers: the CNCF
//! registry (no Referrers API: the `sha256-<hex>` tag fallback runs for real), the official
//! ATProto PDS and PLC directory; and spec-following fakes only for the Referrers API,
//! bearer-token challenges, injected latency and faults. Images, records and signature
//! artifacts are created by the tests.

use std::sync::Arc;
use std::time::Duration;

use crate::common::fake::{Fake, Fault};
use crate::common::registry::{Pusher, payload, real_registry};
use crate::common::world::World;
use crate::common::{cli, signed_image, unique};
use atcr_verify::cli::EngineArgs;
use atcr_verify::net::CountingObserver;
use atcr_verify::policy::TrustPolicy;
use atcr_verify::syntax::ImageRef;
use atcr_verify::verify::{ImageReport, Verifier, VerifyError};
use clap::Parser;
use time::OffsetDateTime;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// An engine for the test world: private addresses allowed, the given registries insecure.
fn engine(
    plc: &str,
    registries: &[&str],
    extra: &[&str],
) -> (Arc<Verifier>, Arc<CountingObserver>) {
    let mut args = vec![
        "x".to_owned(),
        "--plc-url".into(),
        plc.into(),
        "--allow-private-addresses".into(),
    ];
    for r in registries {
        args.push("--insecure-registry".into());
        args.push((*r).into());
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let engine = Flags::parse_from(args).engine.build().unwrap();
    (engine.verifier, engine.requests)
}

/// For the tests that put a proxy in place of the signer's PDS by rewriting its DID document:
/// the directory's document is taken as served (with the default, `log`, that rewrite is
/// refused as a forgery; see tests/plc.rs).
const DIRECTORY: &[&str] = &["--plc-trust", "directory"];

/// A policy trusting `trusted` for everything under `scope`.
fn policy(scope: &str, trusted: &[&str], window: Option<(&str, &str)>) -> TrustPolicy {
    let dids: Vec<String> = trusted.iter().map(|d| format!("      - {d}\n")).collect();
    let mut yaml = format!(
        "version: 1\npolicies:\n  - name: test\n    scope: \"{scope}\"\n    require:\n      - signature: true\n    trustedDIDs:\n{}    action: enforce\n",
        dids.concat()
    );
    if let Some((from, to)) = window {
        yaml.push_str(&format!(
            "trustedDIDs:\n  {}:\n    name: windowed\n    validFrom: \"{from}\"\n    expiresAt: \"{to}\"\n",
            trusted[0]
        ));
    }
    TrustPolicy::from_yaml(&yaml).unwrap()
}

fn did(handle: &str) -> &'static str {
    &World::get().account(handle).did
}

/// A policy trusting only alice for everything on `registry`.
fn alice_only(registry: &str) -> TrustPolicy {
    policy(&format!("{registry}/**"), &[did("alice.test")], None)
}

/// Why the first signature of a report did not count.
fn first_reason(report: &ImageReport) -> String {
    let signature = report.verdict.signatures.first().expect("a signature");
    signature.reason.as_ref().expect("a reason").to_string()
}

async fn verify(
    v: &Verifier,
    image: &ImageRef,
    policy: &TrustPolicy,
) -> Result<ImageReport, VerifyError> {
    v.verify(image, policy, OffsetDateTime::now_utc()).await
}

#[tokio::test]
async fn signed_image_verifies_through_the_tag_fallback() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let (v, requests) = engine(&world.plc, &[reg], &[]);
    let report = verify(&v, &s.image, &alice_only(reg)).await.unwrap();
    assert!(report.verdict.verified, "{report:#?}");
    assert!(!report.verdict.deny);
    assert_eq!(
        report.digest.as_ref().map(|d| d.as_str()),
        Some(s.pushed.digest.as_str())
    );
    assert_eq!(
        report.verdict.did.as_ref().unwrap().as_str(),
        did("alice.test")
    );
    assert_eq!(report.handle.as_deref(), Some("alice.test"));
    assert!(!report.subject_is_index);
    let sig = &report.verdict.signatures[0];
    assert!(sig.counted);
    assert_eq!(sig.uri.as_deref(), Some(s.uri.as_str()));
    assert!(sig.detail.is_none(), "artifact names the real PDS: no note");
    // Minimum requests: registry 5 (manifest, referrers API 404, fallback tag, artifact
    // manifest, artifact layer), PLC 2 (document and operation log), PDS 1 — both on
    // "localhost".
    let counts = requests.snapshot();
    assert_eq!(counts.get("127.0.0.1").map(|c| c.0), Some(5), "{counts:?}");
    assert_eq!(counts.get("localhost").map(|c| c.0), Some(3), "{counts:?}");
    // The same answer without waiting, from the caches alone (what the provider does first).
    let p = alice_only(reg);
    let (cached, until) = v
        .verify_cached(&s.image, &p, OffsetDateTime::now_utc())
        .unwrap();
    // It holds until the first of its facts expires: the tag's (60 s by default).
    let left = until.saturating_duration_since(std::time::Instant::now());
    assert!(
        left > Duration::from_secs(50) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    assert!(cached.verdict.verified);
    assert_eq!(cached.digest, report.digest);
    assert_eq!(cached.handle, report.handle);
    let (fresh, _) = engine(&world.plc, &[reg], &[]);
    assert!(
        fresh
            .verify_cached(&s.image, &p, OffsetDateTime::now_utc())
            .is_none()
    );
    // A second verification is served from the caches.
    let again = verify(&v, &s.image, &alice_only(reg)).await.unwrap();
    assert!(again.verdict.verified);
    assert_eq!(requests.snapshot(), counts);
}

#[tokio::test]
async fn unsigned_image_is_not_verified() {
    let world = World::get();
    let reg = real_registry();
    let repo = format!("test/{}", unique("unsigned"));
    let pushed = Pusher::new(reg).image(&repo, "v1", &unique("s")).await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let image: ImageRef = format!("{reg}/{repo}@{}", pushed.digest).parse().unwrap();
    let report = verify(&v, &image, &alice_only(reg)).await.unwrap();
    assert!(!report.verdict.verified);
    assert!(report.verdict.deny);
    assert!(report.verdict.signatures.is_empty());
    assert!(
        report
            .verdict
            .reason
            .as_deref()
            .unwrap()
            .contains("no signatures found")
    );
}

#[tokio::test]
async fn no_such_image_is_not_found() {
    let world = World::get();
    let reg = real_registry();
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let image: ImageRef = format!("{reg}/test/{}:nope", unique("missing"))
        .parse()
        .unwrap();
    let err = verify(&v, &image, &alice_only(reg)).await.unwrap_err();
    assert_eq!(err.code(), "not_found", "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn deleted_record_revokes_the_signature() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let p = alice_only(reg);
    let (v, _) = engine(&world.plc, &[reg], &[]);
    assert!(verify(&v, &s.image, &p).await.unwrap().verdict.verified);
    world.writer("alice.test").await.delete(&s.uri).await;
    // The cached proof outcome bounds how late the deletion is noticed; a fresh engine sees it.
    let (fresh, _) = engine(&world.plc, &[reg], &[]);
    let report = verify(&fresh, &s.image, &p).await.unwrap();
    assert!(!report.verdict.verified);
    let reason = first_reason(&report);
    assert!(reason.contains("not in the repo"), "{reason}");
}

#[tokio::test]
async fn replayed_artifact_for_another_image_is_refused() {
    let world = World::get();
    let reg = real_registry();
    let a = signed_image(reg, "alice.test").await;
    // Image B carries an artifact pointing at A's record.
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("replay"));
    let b = pusher.image(&repo, "v1", &unique("b")).await;
    pusher
        .attach(
            &repo,
            &b,
            &payload(&b.digest, did("alice.test"), &a.uri, &world.pds),
        )
        .await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let image: ImageRef = format!("{reg}/{repo}:v1").parse().unwrap();
    let report = verify(&v, &image, &alice_only(reg)).await.unwrap();
    assert!(!report.verdict.verified);
    let reason = first_reason(&report);
    assert!(
        reason.contains("signature belongs to another image"),
        "{reason}"
    );
}

#[tokio::test]
async fn artifact_did_must_match_its_record_uri() {
    let world = World::get();
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("didmix"));
    let img = pusher.image(&repo, "v1", &unique("d")).await;
    let uri = world
        .writer("alice.test")
        .await
        .sign(&repo, &img.digest)
        .await;
    // Claims bob signed, points at alice's record.
    pusher
        .attach(
            &repo,
            &img,
            &payload(&img.digest, did("bob.test"), &uri, &world.pds),
        )
        .await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let image: ImageRef = format!("{reg}/{repo}:v1").parse().unwrap();
    let report = verify(
        &v,
        &image,
        &policy(
            &format!("{reg}/**"),
            &[did("alice.test"), did("bob.test")],
            None,
        ),
    )
    .await
    .unwrap();
    assert!(!report.verdict.verified);
    let reason = first_reason(&report);
    assert!(reason.contains("record URI belongs to"), "{reason}");
}

#[tokio::test]
async fn artifact_pds_endpoint_is_ignored_and_reported() {
    let world = World::get();
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("pds"));
    let img = pusher.image(&repo, "v1", &unique("p")).await;
    let writer = world.writer("alice.test").await;
    let uri = writer.sign(&repo, &img.digest).await;
    pusher
        .attach(
            &repo,
            &img,
            &payload(&img.digest, writer.did(), &uri, "https://evil.example"),
        )
        .await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let image: ImageRef = format!("{reg}/{repo}:v1").parse().unwrap();
    let report = verify(&v, &image, &alice_only(reg)).await.unwrap();
    assert!(report.verdict.verified, "{report:#?}");
    let detail = report.verdict.signatures[0].detail.as_deref().unwrap();
    assert!(
        detail.contains("evil.example") && detail.contains("ignored"),
        "{detail}"
    );
}

#[tokio::test]
async fn two_signers_one_trusted() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "bob.test").await;
    let repo = s.image.repository().to_owned();
    let alice = world.writer("alice.test").await;
    let uri = alice.sign(&repo, &s.pushed.digest).await;
    Pusher::new(reg)
        .attach(
            &repo,
            &s.pushed,
            &payload(&s.pushed.digest, alice.did(), &uri, &world.pds),
        )
        .await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let report = verify(&v, &s.image, &alice_only(reg)).await.unwrap();
    assert!(report.verdict.verified, "{report:#?}");
    assert_eq!(report.verdict.counted_signatures, 1);
    let bob = report
        .verdict
        .signatures
        .iter()
        .find(|s| s.did.as_ref().map(|d| d.as_str()) == Some(did("bob.test")))
        .unwrap();
    assert_eq!(bob.reason.as_ref().unwrap().to_string(), "untrusted DID");
    assert_eq!(
        report.verdict.did.as_ref().unwrap().as_str(),
        did("alice.test")
    );
}

#[tokio::test]
async fn signer_outside_validity_window() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let p = policy(
        &format!("{reg}/**"),
        &[did("alice.test")],
        Some(("2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z")),
    );
    let report = verify(&v, &s.image, &p).await.unwrap();
    assert!(!report.verdict.verified);
    assert_eq!(
        report.verdict.signatures[0]
            .reason
            .as_ref()
            .unwrap()
            .to_string(),
        "outside validity window"
    );
}

#[tokio::test]
async fn plc_down_is_transient_never_unsigned() {
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let dead = format!("http://127.0.0.1:{}", crate::common::registry::free_port());
    let (v, _) = engine(&dead, &[reg], &[]);
    let err = verify(&v, &s.image, &alice_only(reg)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(err.code(), "upstream_unavailable", "{err}");
}

#[tokio::test]
async fn pds_down_is_transient() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    // The PLC answers with the real document, whose PDS now points at a dead port.
    let plc = Fake::proxy(&world.plc);
    plc.rewrite(
        &world.pds,
        &format!("http://127.0.0.1:{}", crate::common::registry::free_port()),
    );
    let (v, _) = engine(&plc.url(), &[reg], DIRECTORY);
    let err = verify(&v, &s.image, &alice_only(reg)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn registry_down_is_transient() {
    let world = World::get();
    let dead = format!("127.0.0.1:{}", crate::common::registry::free_port());
    let (v, _) = engine(&world.plc, &[&dead], &[]);
    let image: ImageRef = format!("{dead}/test/app:v1").parse().unwrap();
    let err = verify(&v, &image, &alice_only(&dead)).await.unwrap_err();
    assert!(err.is_transient());
    assert_eq!(err.code(), "upstream_unavailable");
}

#[tokio::test]
async fn registry_429_is_rate_limited_not_unsigned() {
    let world = World::get();
    let fake = Fake::registry(10, None);
    let s = signed_image(&fake.addr, "alice.test").await;
    let (v, _) = engine(&world.plc, &[&fake.addr], &[]);
    let p = alice_only(&fake.addr);
    fake.set_fault(Some(Fault::Status(429, Some(30))));
    let err = verify(&v, &s.image, &p).await.unwrap_err();
    assert_eq!(err.code(), "rate_limited", "{err}");
    assert!(err.is_transient());
    fake.set_fault(None);
    let (v, _) = engine(&world.plc, &[&fake.addr], &[]);
    assert!(verify(&v, &s.image, &p).await.unwrap().verdict.verified);
    // 503 is transient as well.
    let (v, _) = engine(&world.plc, &[&fake.addr], &[]);
    fake.set_fault(Some(Fault::Status(503, None)));
    let err = verify(&v, &s.image, &p).await.unwrap_err();
    assert!(err.is_transient());
    assert_eq!(err.code(), "upstream_unavailable");
}

#[tokio::test]
async fn slow_upstream_past_the_deadline() {
    let world = World::get();
    let fake = Fake::registry(10, None);
    let s = signed_image(&fake.addr, "alice.test").await;
    fake.set_latency(Duration::from_millis(1500));
    let (v, _) = engine(&world.plc, &[&fake.addr], &["--request-timeout", "300ms"]);
    let p = alice_only(&fake.addr);
    let started = std::time::Instant::now();
    let err = verify(&v, &s.image, &p).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("no answer within 300ms"), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "the timeout, not the upstream, ended it"
    );
}

#[tokio::test]
async fn referrers_api_with_pagination_behind_anonymous_bearer_auth() {
    let world = World::get();
    let fake = Fake::registry(1, None);
    let s = signed_image(&fake.addr, "bob.test").await;
    let repo = s.image.repository().to_owned();
    let alice = world.writer("alice.test").await;
    let uri = alice.sign(&repo, &s.pushed.digest).await;
    Pusher::new(&fake.addr)
        .attach(
            &repo,
            &s.pushed,
            &payload(&s.pushed.digest, alice.did(), &uri, &world.pds),
        )
        .await;
    // Served by a registry that demands an anonymous bearer token.
    let served = Fake::registry(1, Some("anon-token"));
    served.copy_store_from(&fake);
    let image: ImageRef = format!("{}/{repo}:v1", served.addr).parse().unwrap();
    let (v, _) = engine(&world.plc, &[&served.addr], &[]);
    let p = alice_only(&served.addr);
    let report = verify(&v, &image, &p).await.unwrap();
    assert!(report.verdict.verified, "{report:#?}");
    assert_eq!(report.verdict.signatures.len(), 2, "both pages were read");
    let counts = served.counts();
    assert_eq!(counts.get("referrers"), Some(&2), "two pages: {counts:?}");
    // The first request is challenged (401), then the tag and both artifacts.
    assert_eq!(counts.get("manifests"), Some(&4), "{counts:?}");
    assert_eq!(counts.get("token"), Some(&1), "{counts:?}");
}

#[tokio::test]
async fn bearer_challenge_with_docker_config_credentials() {
    let world = World::get();
    // Content is pushed to an open fake, then served by one that demands a token, whose
    // realm demands Basic credentials from the Docker config.
    let open = Fake::registry(10, None);
    let s = signed_image(&open.addr, "alice.test").await;
    let private = Fake::private_registry("tok-123", "robot", "hunter2");
    private.copy_store_from(&open);
    let image: ImageRef = format!("{}/{}:v1", private.addr, s.image.repository())
        .parse()
        .unwrap();
    let p = alice_only(&private.addr);

    let (anon, _) = engine(&world.plc, &[&private.addr], &[]);
    let err = verify(&anon, &image, &p).await.unwrap_err();
    assert!(err.to_string().contains("access denied"), "{err}");
    assert!(err.is_transient(), "an auth failure is never 'unsigned'");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("robot:hunter2");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            private.addr
        ),
    )
    .unwrap();
    let (v, _) = engine(
        &world.plc,
        &[&private.addr],
        &["--registry-config", config.to_str().unwrap()],
    );
    private.reset_counts();
    let report = verify(&v, &image, &p).await.unwrap();
    assert!(report.verdict.verified, "{report:#?}");
    assert_eq!(private.counts().get("token"), Some(&1), "one token, reused");
}

#[tokio::test]
async fn image_index_digest_is_the_subject() {
    let world = World::get();
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("index"));
    let amd64 = pusher.image(&repo, "amd64", &unique("i")).await;
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": crate::common::registry::OCI_INDEX,
        "manifests": [{"mediaType": crate::common::registry::OCI_MANIFEST, "digest": amd64.digest, "size": amd64.size,
                        "platform": {"architecture": "amd64", "os": "linux"}}]});
    let pushed = pusher
        .manifest(&repo, "multi", crate::common::registry::OCI_INDEX, &index)
        .await;
    let writer = world.writer("alice.test").await;
    let uri = writer.sign(&repo, &pushed.digest).await;
    pusher
        .attach(
            &repo,
            &pushed,
            &payload(&pushed.digest, writer.did(), &uri, &world.pds),
        )
        .await;
    let (v, _) = engine(&world.plc, &[reg], &[]);
    let image: ImageRef = format!("{reg}/{repo}:multi").parse().unwrap();
    let report = verify(&v, &image, &alice_only(reg)).await.unwrap();
    assert!(report.verdict.verified, "{report:#?}");
    assert!(report.subject_is_index);
    assert_eq!(
        report.digest.as_ref().map(|d| d.as_str()),
        Some(pushed.digest.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_requests_are_minimal_and_single_flight() {
    let world = World::get();
    let fake = Fake::registry(10, None);
    let s = signed_image(&fake.addr, "alice.test").await;
    let pds = Fake::proxy(&world.pds);
    let plc = Fake::proxy(&world.plc);
    plc.rewrite(&world.pds, &pds.url());
    let p = alice_only(&fake.addr);

    fake.reset_counts();
    let (v, _) = engine(&plc.url(), &[&fake.addr], DIRECTORY);
    assert!(verify(&v, &s.image, &p).await.unwrap().verdict.verified);
    let one = (fake.counts(), plc.total(), pds.total());
    // Registry: manifest by tag, referrers (API), artifact manifest, artifact layer.
    assert_eq!(one.0.values().sum::<u64>(), 4, "{:?}", one.0);
    assert_eq!((one.1, one.2), (1, 1), "one DID document, one proof");

    fake.reset_counts();
    plc.reset_counts();
    pds.reset_counts();
    let (v, _) = engine(&plc.url(), &[&fake.addr], DIRECTORY);
    let p = Arc::new(p);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (v, p, image) = (Arc::clone(&v), Arc::clone(&p), s.image.clone());
            tokio::spawn(async move { verify(&v, &image, &p).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap().verdict.verified);
    }
    assert_eq!(
        (fake.counts(), plc.total(), pds.total()),
        one,
        "50 concurrent cold requests, same upstream count"
    );
}

/// With the default `--plc-trust log`, a cold verification asks the directory twice (the
/// document and the operation log, at once) and a second image of the same signer not at
/// all; a document whose #atproto key was swapped in transit is refused, never verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signers_identity_is_proven_from_its_operation_log() {
    let world = World::get();
    let fake = Fake::registry(10, None);
    let first = signed_image(&fake.addr, "alice.test").await;
    let second = signed_image(&fake.addr, "alice.test").await;
    let plc = Fake::proxy(&world.plc);
    let p = alice_only(&fake.addr);
    let (v, _) = engine(&plc.url(), &[&fake.addr], &[]);
    assert!(verify(&v, &first.image, &p).await.unwrap().verdict.verified);
    assert_eq!(plc.counts().get("proxy"), Some(&2), "one document, one log");
    assert!(
        verify(&v, &second.image, &p)
            .await
            .unwrap()
            .verdict
            .verified
    );
    assert_eq!(plc.total(), 2, "the identity is cached with the DID TTL");

    // The document's #atproto key swapped for another valid key; the log left alone.
    plc.transform(|path, body| {
        if path.ends_with("/log/audit") {
            return body;
        }
        let mut doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        doc["verificationMethod"][0]["type"] = "Multikey".into();
        doc["verificationMethod"][0]["publicKeyMultibase"] =
            crate::common::repo::Signer::k256(77).multikey().into();
        serde_json::to_vec(&doc).unwrap()
    });
    let (v, _) = engine(&plc.url(), &[&fake.addr], &[]);
    let report = verify(&v, &first.image, &p).await.unwrap();
    assert!(!report.verdict.verified);
    let reason = first_reason(&report);
    assert!(
        reason.contains("disagrees with the signed operation log on #atproto key")
            && reason.contains(&crate::common::repo::Signer::k256(77).did_key()),
        "{reason}"
    );
}

#[tokio::test]
async fn private_addresses_are_refused_by_default() {
    let world = World::get();
    let reg = real_registry();
    // Registry named insecure, PLC on loopback without --allow-private-addresses.
    let engine = Flags::parse_from(["x", "--plc-url", &world.plc, "--insecure-registry", reg])
        .engine
        .build();
    let err = engine.unwrap_err();
    assert!(err.contains("plain http://"), "{err}");
    // A registry on loopback that is not named insecure is refused before any request.
    let plc = "https://plc.directory";
    let engine = Flags::parse_from(["x", "--plc-url", plc])
        .engine
        .build()
        .unwrap();
    let image: ImageRef = format!("{reg}/test/app:v1").parse().unwrap();
    let err = verify(&engine.verifier, &image, &alice_only(reg))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "upstream_refused", "{err}");
    assert!(!err.is_transient());
    assert!(engine.requests.snapshot().values().all(|(n, _)| *n <= 1));
}

#[tokio::test]
async fn image_command_exit_codes_and_json() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\npolicies:\n  - name: t\n    scope: \"{reg}/**\"\n    trustedDIDs: [{}]\n",
            did("alice.test")
        ),
    )
    .unwrap();
    let image = s.image.to_string();
    let base = [
        "--policy",
        file.to_str().unwrap(),
        "--plc-url",
        &world.plc,
        "--allow-private-addresses",
        "--insecure-registry",
        reg,
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["image"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&base);
        cli(&args)
    };
    let (code, out, err) = run(&[&image, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["digest"], s.pushed.digest.as_str());
    assert_eq!(json["did"], did("alice.test"));
    assert_eq!(json["handle"], "alice.test");
    let (code, out, _) = run(&[&image]);
    assert_eq!(code, 0);
    assert!(out.starts_with("verified: "), "{out}");

    let repo = format!("test/{}", unique("cli"));
    let unsigned = Pusher::new(reg).image(&repo, "v1", &unique("c")).await;
    let (code, out, _) = run(&[&format!("{reg}/{repo}@{}", unsigned.digest), "--json"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["verified"],
        false
    );

    let (code, out, _) = run(&["UPPER/Case:x", "--json"]);
    assert_eq!(code, 2);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["error"]["code"],
        "invalid_reference"
    );
    let (code, _, err) = run(&[&format!("{reg}/{repo}:missing")]);
    assert_eq!(code, 2);
    assert!(err.contains("not_found"), "{err}");
    // Every failure has the one error shape: code, message, transient.
    let missing = dir.path().join("missing.yaml");
    let out = cli(&[
        "image",
        &image,
        "--json",
        "--policy",
        missing.to_str().unwrap(),
    ])
    .1;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["error"]["code"], "usage", "{json}");
    assert_eq!(json["error"]["transient"], false, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing.yaml")
    );
}

#[tokio::test]
async fn redirects_are_limited_and_rechecked() {
    let world = World::get();
    let fake = Fake::registry(10, None);
    let s = signed_image(&fake.addr, "alice.test").await;
    let p = alice_only(&fake.addr);
    // The registry is named insecure (allowed on loopback); the PLC is public-looking, so
    // private addresses stay refused everywhere else.
    let strict = |extra: &[&str]| {
        let mut args = vec![
            "x",
            "--plc-url",
            "https://plc.directory",
            "--insecure-registry",
            &fake.addr,
        ];
        args.extend_from_slice(extra);
        Flags::parse_from(args).engine.build().unwrap().verifier
    };
    // A refused redirect spoils only the artifact it was for: the image is not verified,
    // and the signature's entry says why.
    let refused = |report: ImageReport, needle: &str| {
        assert!(!report.verdict.verified, "{report:?}");
        let reason = first_reason(&report);
        assert!(
            reason.contains("refused") && reason.contains(needle),
            "{reason}"
        );
    };
    // A blob redirect to another loopback port (not the named registry) is refused.
    let elsewhere = format!(
        "http://127.0.0.1:{}/blob",
        crate::common::registry::free_port()
    );
    fake.set_fault(Some(Fault::RedirectBlobs(elsewhere)));
    refused(
        verify(&strict(&[]), &s.image, &p).await.unwrap(),
        "plain http://",
    );
    // A redirect to the cloud metadata address is refused too.
    fake.set_fault(Some(Fault::RedirectBlobs(
        "http://169.254.169.254/latest/meta-data".into(),
    )));
    refused(verify(&strict(&[]), &s.image, &p).await.unwrap(), "refused");
    // A redirect loop stops after the limit.
    let own = format!("http://{}/v2/loop/blobs/sha256:0", fake.addr);
    fake.set_fault(Some(Fault::RedirectBlobs(own)));
    refused(
        verify(&strict(&[]), &s.image, &p).await.unwrap(),
        "more than 3 redirects",
    );
    let _ = world;
}

#[tokio::test]
async fn referrers_and_fallback_failures_are_never_unsigned() {
    let world = World::get();
    // Referrers API answering 401/403/429/5xx once the manifest has resolved.
    let api = Fake::registry(10, None);
    let s = signed_image(&api.addr, "alice.test").await;
    let p = alice_only(&api.addr);
    for (status, code) in [
        (401, "upstream_unavailable"),
        (403, "upstream_unavailable"),
        (429, "rate_limited"),
        (500, "upstream_unavailable"),
        (503, "upstream_unavailable"),
    ] {
        api.set_fault(Some(Fault::StatusOnPath("/referrers/".into(), status)));
        let (v, _) = engine(&world.plc, &[&api.addr], &[]);
        let err = verify(&v, &s.image, &p).await.unwrap_err();
        assert_eq!(err.code(), code, "referrers HTTP {status}: {err}");
        assert!(err.is_transient(), "referrers HTTP {status}");
    }
    // No Referrers API (404): the sha256-<hex> tag fallback, failing the same ways.
    let tagged = Fake::registry_without_referrers_api();
    let s = signed_image(&tagged.addr, "alice.test").await;
    let p = alice_only(&tagged.addr);
    let (v, _) = engine(&world.plc, &[&tagged.addr], &[]);
    assert!(
        verify(&v, &s.image, &p).await.unwrap().verdict.verified,
        "fallback works"
    );
    for status in [401, 403, 429, 500] {
        tagged.set_fault(Some(Fault::StatusOnPath(
            "/manifests/sha256-".into(),
            status,
        )));
        let (v, _) = engine(&world.plc, &[&tagged.addr], &[]);
        let err = verify(&v, &s.image, &p).await.unwrap_err();
        assert!(err.is_transient(), "fallback HTTP {status}: {err}");
    }
    // A 404 on the fallback tag is the one answer that means "no signatures".
    tagged.set_fault(Some(Fault::StatusOnPath("/manifests/sha256-".into(), 404)));
    let (v, _) = engine(&world.plc, &[&tagged.addr], &[]);
    let report = verify(&v, &s.image, &p).await.unwrap();
    assert!(!report.verdict.verified);
    assert!(report.verdict.signatures.is_empty());
}
