//! The verifier tried as an attacker would: junk referrers, hostile upstream text, records
//! from other collections and repositories, and request floods. Each test sets up the
//! attack against the real local world (registry, PDS, PLC) with fakes only where a real
//! server cannot misbehave on purpose (a registry with the Referrers API, a PDS or did:web
//! host answering hostile text, a hanging registry), and checks that the attacker can
//! neither blind the verifier nor knock it over.

use std::sync::Arc;
use std::time::Duration;

use crate::common::fake::{Fake, Fault};
use crate::common::registry::{OCI_INDEX, OCI_MANIFEST, Pushed, Pusher, payload, real_registry};
use crate::common::server::Server;
use crate::common::world::World;
use crate::common::{cli, unique};
use atcr_verify::cli::EngineArgs;
use atcr_verify::policy::TrustPolicy;
use atcr_verify::syntax::ImageRef;
use atcr_verify::verify::{ImageReport, Verifier};
use clap::Parser;
use serde_json::{Value, json};
use time::OffsetDateTime;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// The most JSON one key's answer may take (README, "Threat model").
const ANSWER_BOUND: usize = 64 * 1024;

fn engine(plc: &str, registries: &[&str], extra: &[&str]) -> Arc<Verifier> {
    let mut args = vec!["x", "--plc-url", plc, "--allow-private-addresses"];
    for r in registries {
        args.extend(["--insecure-registry", r]);
    }
    args.extend_from_slice(extra);
    Flags::parse_from(args).engine.build().unwrap().verifier
}

/// For the tests that put a proxy in place of the signer's PDS by rewriting its DID document:
/// the directory's document is taken as served (with the default, `log`, that rewrite is
/// refused as a forgery; see tests/plc.rs).
const DIRECTORY: &[&str] = &["--plc-trust", "directory"];

fn did(handle: &str) -> &'static str {
    &World::get().account(handle).did
}

fn policy_yaml(scope: &str, trusted: &str, extra: &str) -> String {
    format!(
        "version: 1\npolicies:\n  - name: test\n    scope: \"{scope}\"\n    trustedDIDs: [{trusted}]\n{extra}"
    )
}

fn policy(scope: &str, trusted: &str, extra: &str) -> TrustPolicy {
    TrustPolicy::from_yaml(&policy_yaml(scope, trusted, extra)).unwrap()
}

/// A syntactically valid `did:plc` nobody owns, unique per `n`.
fn stranger(n: usize) -> String {
    let tail: String = format!("{n:06}")
        .bytes()
        .map(|b| char::from(b'a' + (b - b'0')))
        .collect();
    format!("did:plc:{}{tail}", "x".repeat(18))
}

/// Pushes a fresh image to `registry` as `repo:v1`.
async fn image(registry: &str, repo: &str) -> (ImageRef, Pushed) {
    let pushed = Pusher::new(registry)
        .image(repo, "v1", &unique("seed"))
        .await;
    let image = format!("{registry}/{repo}:v1").parse().unwrap();
    (image, pushed)
}

/// Attaches an artifact claiming `claimed` signed `record` (a pointer only).
async fn attach_claim(registry: &str, repo: &str, subject: &Pushed, claimed: &str, record: &str) {
    let world = World::get();
    Pusher::new(registry)
        .attach(
            repo,
            subject,
            &payload(&subject.digest, claimed, record, &world.pds),
        )
        .await;
}

/// Has `handle` sign `subject` for real (an `io.atcr.manifest` record naming
/// `repository`) and attaches the artifact; returns the record URI.
async fn sign(
    registry: &str,
    repo: &str,
    subject: &Pushed,
    handle: &str,
    repository: &str,
) -> String {
    let writer = World::get().writer(handle).await;
    let uri = writer.sign(repository, &subject.digest).await;
    attach_claim(registry, repo, subject, writer.did(), &uri).await;
    uri
}

async fn verify(v: &Verifier, image: &ImageRef, p: &TrustPolicy) -> ImageReport {
    v.verify(image, p, OffsetDateTime::now_utc())
        .await
        .unwrap_or_else(|e| panic!("{image}: {e}"))
}

fn reasons(report: &ImageReport) -> Vec<String> {
    report
        .verdict
        .signatures
        .iter()
        .map(|s| {
            s.reason
                .as_ref()
                .map_or("counted".to_owned(), ToString::to_string)
        })
        .collect()
}

/// A PDS error body just under the proof cap (2 MiB), nearly all of it one `error` code
/// full of terminal escapes.
fn hostile_error_body() -> Arc<Vec<u8>> {
    let junk = format!(
        "\u{1b}]0;owned\u{7}\u{1b}[31m{}",
        "A".repeat(2 * 1024 * 1024 - 256)
    );
    let body = json!({"error": junk, "message": "\u{1b}[2J\u{1b}[H"});
    Arc::new(serde_json::to_vec(&body).unwrap())
}

/// Point 1: a trusted signer's PDS (and, not reached at all, an untrusted signer's) answers
/// every proof request with megabytes of error text full of terminal escapes. The verdict,
/// the CLI's output (human and JSON) and the provider's answer stay small and inert.
#[tokio::test]
async fn hostile_upstream_text_is_bounded_and_inert() {
    let world = World::get();
    let fake = Fake::registry(100, None);
    let hostile = Fake::proxy(&world.pds);
    hostile.set_fault(Some(Fault::BodyOnPath(
        "getRecord".into(),
        400,
        hostile_error_body(),
    )));
    let plc = Fake::proxy(&world.plc);
    plc.rewrite(&world.pds, &hostile.url());
    let repo = format!("hostile/{}", unique("text"));
    let (img, pushed) = image(&fake.addr, &repo).await;
    // 31 junk pointers claiming the trusted signer, then the real signature.
    for n in 0..31 {
        let uri = format!("at://{}/io.atcr.manifest/junk{n}", did("alice.test"));
        attach_claim(&fake.addr, &repo, &pushed, did("alice.test"), &uri).await;
    }
    sign(&fake.addr, &repo, &pushed, "alice.test", &repo).await;

    let p = policy(&format!("{}/**", fake.addr), did("alice.test"), "");
    let v = engine(&plc.url(), &[&fake.addr], DIRECTORY);
    let report = verify(&v, &img, &p).await;
    assert!(!report.verdict.verified);
    assert!(
        hostile.total() >= 32,
        "the hostile PDS was asked for each proof"
    );
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.len() <= ANSWER_BOUND, "{} bytes", json.len());
    assert!(
        !json.contains('\u{1b}') && !json.contains('\u{7}'),
        "{json}"
    );
    let reason = report.verdict.reason.as_deref().unwrap();
    assert!(
        reason.len() <= 2048 + 32,
        "{} bytes: {reason}",
        reason.len()
    );
    assert!(!reason.contains("AAAA"), "{reason}");
    // A short error whose code is not shaped like one is not repeated either.
    let bad_code = serde_json::to_vec(&json!({"error": "Bad \u{1b}[2J Code"})).unwrap();
    hostile.set_fault(Some(Fault::BodyOnPath(
        "getRecord".into(),
        400,
        Arc::new(bad_code),
    )));
    let fresh = engine(&plc.url(), &[&fake.addr], DIRECTORY);
    let report = verify(&fresh, &img, &p).await;
    let reason = report.verdict.reason.as_deref().unwrap();
    assert!(reason.contains("(not an XRPC error code)"), "{reason}");
    assert!(
        !reason.contains("Bad") && !reason.contains('\u{1b}'),
        "{reason}"
    );
    hostile.set_fault(Some(Fault::BodyOnPath(
        "getRecord".into(),
        400,
        hostile_error_body(),
    )));

    // The same through the CLI, human and JSON, and through the provider.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        policy_yaml(&format!("{}/**", fake.addr), did("alice.test"), ""),
    )
    .unwrap();
    let key = img.to_string();
    let base = [
        "--policy",
        file.to_str().unwrap(),
        "--plc-url",
        &plc.url(),
        "--plc-trust",
        "directory",
        "--allow-private-addresses",
        "--insecure-registry",
        &fake.addr,
    ];
    for json_flag in [false, true] {
        let mut args = vec!["image", key.as_str()];
        args.extend(base);
        if json_flag {
            args.push("--json");
        }
        let (code, out, err) = cli(&args);
        assert_eq!(code, 1, "{out}{err}");
        assert!(out.len() + err.len() <= ANSWER_BOUND, "{} bytes", out.len());
        assert!(
            !out.contains('\u{1b}') && !err.contains('\u{1b}'),
            "{out}{err}"
        );
    }
    let mut args = vec!["--insecure-http"];
    args.extend(base);
    let server = Server::start(dir.path(), &args);
    let body = json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1",
                      "kind": "ProviderRequest", "request": {"keys": [key]}});
    let answer = crate::common::client()
        .post(format!("{}/provide", server.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(answer.len() <= ANSWER_BOUND, "{} bytes", answer.len());
    assert!(!answer.contains('\u{1b}'), "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        answer["response"]["items"][0]["value"]["verified"], false,
        "{answer}"
    );
    assert!(!server.logs().contains('\u{1b}'));

    // An untrusted signer's hostile host is never even asked.
    let repo = format!("hostile/{}", unique("untrusted"));
    let (img, pushed) = image(&fake.addr, &repo).await;
    for n in 0..31 {
        let uri = format!("at://{}/io.atcr.manifest/junk{n}", did("bob.test"));
        attach_claim(&fake.addr, &repo, &pushed, did("bob.test"), &uri).await;
    }
    hostile.reset_counts();
    plc.reset_counts();
    let report = verify(&v, &img, &p).await;
    assert!(!report.verdict.verified);
    assert_eq!(hostile.total(), 0, "the untrusted signer's PDS was asked");
    assert_eq!(plc.total(), 0, "the untrusted signer's DID was resolved");
    assert!(
        reasons(&report).iter().all(|r| r == "untrusted DID"),
        "{report:?}"
    );
}

/// Point 1: however many signatures an image has, one key's verdict stays under the bound,
/// every counted signature kept and the rest counted in `omittedSignatures`.
#[tokio::test]
async fn a_verdict_with_hundreds_of_signatures_stays_bounded() {
    let world = World::get();
    let fake = Fake::registry(100, None);
    let repo = format!("hostile/{}", unique("many"));
    let (img, pushed) = image(&fake.addr, &repo).await;
    // Long but valid record keys (512 characters) make every entry large.
    for n in 0..250 {
        let rkey = format!("{n:03}{}", "k".repeat(509));
        let uri = format!("at://{}/io.atcr.manifest/{rkey}", stranger(n));
        attach_claim(&fake.addr, &repo, &pushed, &stranger(n), &uri).await;
    }
    sign(&fake.addr, &repo, &pushed, "alice.test", &repo).await;
    let p = policy(&format!("{}/**", fake.addr), did("alice.test"), "");
    let v = engine(&world.plc, &[&fake.addr], &["--upstream-rate", "10000"]);
    let report = verify(&v, &img, &p).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.len() <= ANSWER_BOUND, "{} bytes", json.len());
    let shown = report.verdict.signatures.len();
    assert!(report.verdict.omitted_signatures > 0);
    assert_eq!(shown + report.verdict.omitted_signatures as usize, 251);
    assert!(report.verdict.signatures.iter().any(|s| s.counted));
}

/// Point 2: an artifact manifest over its cap, and another whose annotations swell the
/// referrers page past a megabyte, spoil only themselves: the real signature still counts.
#[tokio::test]
async fn one_bad_artifact_spoils_only_itself() {
    let world = World::get();
    let fake = Fake::registry(100, None);
    let repo = format!("hostile/{}", unique("bad"));
    let (img, pushed) = image(&fake.addr, &repo).await;
    let pusher = Pusher::new(&fake.addr);
    let claim = payload(
        &pushed.digest,
        &stranger(1),
        &format!("at://{}/io.atcr.manifest/x", stranger(1)),
        &world.pds,
    );
    for size in [300 * 1024, 1536 * 1024] {
        let junk = json!({"org.example.junk": "j".repeat(size)});
        pusher
            .attach_annotated(&repo, &pushed, &claim, Some(junk))
            .await;
    }
    sign(&fake.addr, &repo, &pushed, "alice.test", &repo).await;
    let p = policy(&format!("{}/**", fake.addr), did("alice.test"), "");
    let v = engine(&world.plc, &[&fake.addr], &[]);
    let report = verify(&v, &img, &p).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
    let r = reasons(&report);
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(
        r.iter().filter(|r| r.contains("-byte limit")).count(),
        2,
        "{r:?}"
    );

    // The same through the `sha256-<hex>` fallback index of a registry without the
    // Referrers API: a junk entry with a megabyte and a half of annotations comes first.
    let plain = Fake::registry_without_referrers_api();
    let repo = format!("hostile/{}", unique("tag"));
    let (img, pushed) = image(&plain.addr, &repo).await;
    sign(&plain.addr, &repo, &pushed, "alice.test", &repo).await;
    let tag = pushed.digest.replacen(':', "-", 1);
    let index: Value = crate::common::client()
        .get(format!("http://{}/v2/{repo}/manifests/{tag}", plain.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut entries = vec![json!({"mediaType": OCI_MANIFEST,
        "digest": format!("sha256:{}", "0".repeat(64)), "size": 1,
        "artifactType": "application/vnd.atproto.signature.v1+json",
        "annotations": {"org.example.junk": "j".repeat(1536 * 1024)}})];
    entries.extend(index["manifests"].as_array().unwrap().iter().cloned());
    let swollen = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    pusher_for(&plain)
        .manifest(&repo, &tag, OCI_INDEX, &swollen)
        .await;
    let p = policy(&format!("{}/**", plain.addr), did("alice.test"), "");
    let v = engine(&world.plc, &[&plain.addr], &[]);
    let report = verify(&v, &img, &p).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
    assert!(
        reasons(&report)
            .iter()
            .any(|r| r.contains("is listed but its manifest is not served")),
        "{:?}",
        reasons(&report)
    );
}

fn pusher_for(fake: &Fake) -> Pusher {
    Pusher::new(&fake.addr)
}

/// Point 3: 40 junk artifacts listed before the real one, claiming a signer the policy
/// does not trust whose did:web host is down. The real signature is still found and
/// proven, and the untrusted signer's host is never contacted.
#[tokio::test]
async fn referrer_flood_cannot_hide_the_real_signature() {
    let world = World::get();
    let fake = Fake::registry(10, None);
    let down = Fake::registry(10, None);
    down.set_fault(Some(Fault::Status(503, None)));
    let web = format!("did:web:{}", down.addr.replace(':', "%3A"));
    let repo = format!("hostile/{}", unique("flood"));
    let (img, pushed) = image(&fake.addr, &repo).await;
    for n in 0..40 {
        attach_claim(
            &fake.addr,
            &repo,
            &pushed,
            &web,
            &format!("at://{web}/io.atcr.manifest/junk{n}"),
        )
        .await;
    }
    sign(&fake.addr, &repo, &pushed, "alice.test", &repo).await;
    let p = policy(&format!("{}/**", fake.addr), did("alice.test"), "");
    let v = engine(&world.plc, &[&fake.addr], &[]);
    let report = verify(&v, &img, &p).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
    assert_eq!(down.total(), 0, "the untrusted signer's host was contacted");
    let r = reasons(&report);
    assert_eq!(
        r.iter().filter(|r| *r == "untrusted DID").count(),
        40,
        "{r:?}"
    );
    // The real one is proven first, whatever its place in the listing.
    assert_eq!(r.first().map(String::as_str), Some("counted"), "{r:?}");
}

/// Point 4: a record in another collection, or one naming another repository, does not
/// count — unless the policy says it may.
#[tokio::test]
async fn only_signature_records_for_this_repository_count() {
    let reg = real_registry();
    let alice = did("alice.test");
    let scope = format!("{reg}/**");
    let v = engine(&World::get().plc, &[reg], &[]);

    // A third-party app's record in a trusted repo, shaped like a signature.
    let repo = format!("hostile/{}", unique("bookmark"));
    let (img, pushed) = image(reg, &repo).await;
    let writer = World::get().writer("alice.test").await;
    let uri = writer
        .sign_in("com.example.bookmarks.item", &repo, &pushed.digest)
        .await;
    attach_claim(reg, &repo, &pushed, alice, &uri).await;
    let report = verify(&v, &img, &policy(&scope, alice, "")).await;
    assert!(!report.verdict.verified);
    assert_eq!(reasons(&report), ["not a signature record"]);
    let both = "    signatureCollections: [io.atcr.manifest, com.example.bookmarks.item]\n";
    let report = verify(&v, &img, &policy(&scope, alice, both)).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);

    // A signature for the same bytes pushed to a scratch repository.
    let repo = format!("hostile/{}/myapp", unique("team"));
    let (img, pushed) = image(reg, &repo).await;
    sign(reg, &repo, &pushed, "alice.test", "debug-tool").await;
    let report = verify(&v, &img, &policy(&scope, alice, "")).await;
    assert!(!report.verdict.verified);
    assert_eq!(reasons(&report), ["other repository"]);
    let off = "    matchRepository: false\n";
    let report = verify(&v, &img, &policy(&scope, alice, off)).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
    // The repository scoped to the signer (a trailing part of the path) matches.
    let (img, pushed) = image(reg, &format!("{repo}2")).await;
    let last = format!("{}2", repo.rsplit('/').next().unwrap());
    sign(reg, &format!("{repo}2"), &pushed, "alice.test", &last).await;
    let report = verify(&v, &img, &policy(&scope, alice, "")).await;
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
}

/// Point 6: an image no policy scopes is decided before any network, so a registry outage
/// cannot turn a definite answer into a transient one.
#[tokio::test]
async fn unscoped_images_are_decided_without_the_network() {
    let down = Fake::registry(10, None);
    down.set_fault(Some(Fault::Status(503, None)));
    let v = engine(&World::get().plc, &[&down.addr], &[]);
    let img: ImageRef = format!("{}/elsewhere/app:v1", down.addr).parse().unwrap();
    let alice = did("alice.test");
    for (unmatched, verified) in [("deny", false), ("allow", true)] {
        let yaml = format!(
            "{}defaults:\n  unmatched: {unmatched}\n",
            policy_yaml("atcr.io/**", alice, "")
        );
        let p = TrustPolicy::from_yaml(&yaml).unwrap();
        let report = verify(&v, &img, &p).await;
        assert_eq!(report.verdict.verified, verified, "{unmatched}");
        assert_eq!(report.verdict.deny, !verified, "{unmatched}");
        assert_eq!(report.digest, None);
    }
    assert_eq!(down.total(), 0, "the registry was asked");
}

/// Point 6: one request's keys on a hanging registry cannot take every verification
/// permit: another request's key is still answered within its budget.
#[tokio::test]
async fn one_requests_hanging_keys_do_not_hold_up_another_request() {
    let reg = real_registry();
    let hanging = Fake::registry(10, None);
    hanging.set_latency(Duration::from_secs(20));
    let repo = format!("hostile/{}", unique("fair"));
    let (good, pushed) = image(reg, &repo).await;
    sign(reg, &repo, &pushed, "alice.test", &repo).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy_yaml("**", did("alice.test"), "")).unwrap();
    let server = crate::server::plain_server(
        dir.path(),
        &file,
        &[reg, &hanging.addr],
        &["--concurrency", "8", "--request-budget", "2s"],
    );
    let http = crate::common::client();
    let ask = |keys: Vec<String>| {
        let http = http.clone();
        let url = format!("{}/provide", server.url);
        async move {
            let body = json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1",
                              "kind": "ProviderRequest", "request": {"keys": keys}});
            let r = http.post(url).json(&body).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    let flood: Vec<String> = (0..40)
        .map(|n| format!("{}/flood/app{n}:v1", hanging.addr))
        .collect();
    let flooding = tokio::spawn(ask(flood));
    // Wait until the flood's keys hold what permits they can.
    let flood_started = async || hanging.total() >= 2;
    crate::common::wait_until(
        Duration::from_secs(10),
        "the flood reaching its registry",
        flood_started,
    )
    .await;
    let answer = ask(vec![good.to_string()]).await;
    assert_eq!(
        answer["response"]["items"][0]["value"]["verified"], true,
        "{answer}"
    );
    let flood = flooding.await.unwrap();
    assert!(
        flood["response"]["systemError"]
            .as_str()
            .unwrap()
            .contains("deadline_exceeded"),
        "{flood}"
    );
}
