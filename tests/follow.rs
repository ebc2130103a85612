//! Following trusted signers (issue 17): `serve` subscribes to the real PDS's
//! `com.atproto.sync.subscribeRepos` and forgets a signature as soon as its record is
//! deleted, instead of when `--proof-ttl` runs out.

use std::time::Duration;

use crate::common::fake::Fake;
use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::repo::Signer;
use crate::common::server::Server;
use crate::common::world::{NewAccount, RestartablePds, World};
use crate::common::{Signed, signed_image, signed_image_by, unique, wait_until};
use crate::identity::{audit_log, cid, post, sign};
use serde_json::json;

pub(crate) const SIGNER: &str = "alice.test";

/// How long a revocation may take to show in these tests: the bound, generous for
/// a loaded two-core machine (the measured latency is in benches/follow.rs).
const WITHIN: Duration = Duration::from_secs(2);

/// Writes `dir/policy.yaml` enforcing signatures by `dids` on the real registry; its path.
pub(crate) fn policy(dir: &std::path::Path, dids: &[&str]) -> String {
    let path = dir.join("policy.yaml");
    let list: String = dids.iter().map(|d| format!("      - {d}\n")).collect();
    std::fs::write(
        &path,
        format!(
            "version: 1\npolicies:\n  - name: follow\n    scope: \"{}/**\"\n    require:\n      - signature: true\n    trustedDIDs:\n{list}    action: enforce\n",
            real_registry()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Starts `serve` trusting SIGNER, keeping proofs for 10 minutes, with `extra` flags.
fn serve(dir: &std::path::Path, extra: &[&str]) -> Server {
    serve_trusting(dir, &[&World::get().account(SIGNER).did], extra)
}

/// Starts `serve` trusting `dids`, keeping proofs for 10 minutes, with `extra` flags.
pub(crate) fn serve_trusting(dir: &std::path::Path, dids: &[&str], extra: &[&str]) -> Server {
    let world = World::get();
    let policy = policy(dir, dids);
    let mut args = vec!["--insecure-http", "--policy", &policy];
    if !extra.contains(&"--plc-url") {
        args.extend_from_slice(&["--plc-url", &world.plc]);
    }
    args.extend_from_slice(&[
        "--allow-private-addresses",
        "--insecure-registry",
        real_registry(),
        "--proof-ttl",
        "10m",
    ]);
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

/// Whether /provide answers `verified: true` for `key` (panics on a system error).
pub(crate) async fn verified(server: &Server, key: &str) -> bool {
    let r = crate::common::server::provide(&crate::common::client(), &server.url, &[key]).await;
    let item = &r["response"]["items"][0];
    assert_eq!(item["key"], key, "{r}");
    assert!(item["error"].is_null(), "{r}");
    item["value"]["verified"].as_bool().unwrap()
}

pub(crate) async fn metrics(server: &Server) -> String {
    crate::common::client()
        .get(format!("{}/metrics", server.metrics))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until the server follows one live stream.
pub(crate) async fn until_live(server: &Server) {
    until_live_streams(server, 1).await;
}

/// Waits until exactly `n` of the server's streams are live.
pub(crate) async fn until_live_streams(server: &Server, n: u32) {
    let live = format!("atcr_verify_follow_subscriptions{{state=\"live\"}} {n}\n");
    let what = format!("{n} live subscriptions");
    wait_until(Duration::from_secs(20), &what, async || {
        metrics(server).await.contains(&live)
    })
    .await;
}

/// Waits until the server's logs say it `backfilled signature records` (of `did`, when given).
pub(crate) async fn until_backfilled(server: &Server, did: Option<&str>) {
    wait_until(Duration::from_secs(20), "the backfill", async || {
        server.logs().lines().any(|l| {
            l.contains("backfilled signature records") && did.is_none_or(|d| l.contains(d))
        })
    })
    .await;
}

/// A proxy to the world's PLC directory under which bob.test's DID document names the
/// world's PDS as `127.0.0.1` instead of `localhost` (so his repo is followed on a second
/// stream): the proxy, and that second PDS URL.
fn plc_moving_bob() -> (Fake, String) {
    let world = World::get();
    let bob = world.account("bob.test").did.clone();
    let other_host = world.pds.replace("localhost", "127.0.0.1");
    assert_ne!(other_host, world.pds);
    let plc = Fake::proxy(&world.plc);
    let (pds, other) = (world.pds.clone(), other_host.clone());
    plc.transform(move |path, body| {
        if path.contains(&bob) {
            String::from_utf8(body)
                .unwrap()
                .replace(&pds, &other)
                .into_bytes()
        } else {
            body
        }
    });
    (plc, other_host)
}

/// Starts `serve` trusting alice.test and bob.test on two streams (bob's document read
/// through [`plc_moving_bob`], with `--plc-trust directory`), with `extra` flags: the
/// server, the PLC proxy (keep it bound while the server runs) and bob's PDS URL.
pub(crate) fn serve_on_two_streams(
    dir: &std::path::Path,
    extra: &[&str],
) -> (Server, Fake, String) {
    let world = World::get();
    let (alice, bob) = (&world.account(SIGNER).did, &world.account("bob.test").did);
    let (plc, other_host) = plc_moving_bob();
    let plc_url = plc.url();
    let mut args = vec!["--plc-url", &plc_url, "--plc-trust", "directory"];
    args.extend_from_slice(extra);
    let server = serve_trusting(dir, &[alice, bob], &args);
    (server, plc, other_host)
}

/// Has `account` sign a fresh image, then starts `serve` in `dir` trusting it alone and
/// waits until it is live and has verified the image and kept that answer: the server and
/// the image.
pub(crate) async fn serve_with_a_kept_signature(
    dir: &std::path::Path,
    account: &NewAccount,
) -> (Server, Signed) {
    let signed = signed_image(real_registry(), &account.handle).await;
    let server = serve_trusting(dir, &[&account.did], &[]);
    until_live(&server).await;
    assert!(verified(&server, &signed.name).await, "{}", server.logs());
    assert!(verified(&server, &signed.name).await, "kept");
    (server, signed)
}

/// SIGNER signs a fresh image, `server` verifies it (and keeps that answer), the record is
/// deleted: within 2 s `server` refuses the image. The image.
async fn a_delete_is_refused_within_two_seconds(server: &Server) -> Signed {
    let signed = signed_image(real_registry(), SIGNER).await;
    assert!(verified(server, &signed.name).await, "{}", server.logs());
    assert!(verified(server, &signed.name).await, "kept");
    World::get().writer(SIGNER).await.delete(&signed.uri).await;
    wait_until(WITHIN, "the deleted signature refused", async || {
        !verified(server, &signed.name).await
    })
    .await;
    signed
}

/// Sign, verify (kept for 10 minutes), delete the record: the next /provide refuses
/// within 2 s, and the stream's revocation of that record is what did it.
#[tokio::test]
async fn a_deleted_signature_is_refused_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    until_live(&server).await;
    let signed = a_delete_is_refused_within_two_seconds(&server).await;
    let page = metrics(&server).await;
    assert!(
        counter(&page, "atcr_verify_follow_revocations_total") >= 1,
        "{page}"
    );
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("signature record changed") && l.contains(signed.uri.as_str())),
        "{logs}"
    );
}

/// A TCP forwarder to the PDS (a stream from another address, in the same shape).
struct Forwarder {
    port: u16,
}

impl Forwarder {
    async fn to(url: &str) -> Forwarder {
        let authority = url.trim_start_matches("http://").trim_end_matches('/');
        let target = tokio::net::lookup_host(authority)
            .await
            .unwrap()
            .next()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Forwarder { port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

pub(crate) fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Rotate the signer's signing key through the PLC directory (an operation signed by the
/// account's own recovery key, then a handle update through the PDS, which announces the
/// identity change on the stream): signatures under the old key stop counting within 2 s.
/// A rotation made at the directory alone puts no event on any stream: it shows when the
/// cached document expires (`--did-ttl`), as without following.
#[tokio::test]
async fn a_key_rotation_stops_old_key_signatures_within_two_seconds() {
    let world = World::get();
    // An account of its own (its key is rotated away for good), whose PLC identity lists a
    // recovery key this test holds, above the PDS's rotation key.
    let recovery = Signer::k256(221);
    let account = world.create_account("rot", Some(&recovery.did_key())).await;
    let (did, jwt) = (&account.did, &account.jwt);
    let dir = tempfile::tempdir().unwrap();
    let (server, signed) = serve_with_a_kept_signature(dir.path(), &account).await;

    // The signing key moves to a key the PDS does not hold.
    let log = audit_log(&world.plc, did).await;
    let last = log.last().unwrap()["operation"].clone();
    let mut next = last.clone();
    next.as_object_mut().unwrap().remove("sig");
    next["prev"] = cid(&last).into();
    next["verificationMethods"]["atproto"] = Signer::k256(222).did_key().into();
    post(&world.plc, did, &sign(next, &recovery)).await;
    // The PDS announces identity changes it makes: a new handle (its PLC operation builds
    // on the last one, so the new signing key stays).
    let handle = json!({"handle": format!("{}.test", unique("rot"))});
    world
        .xrpc_post("com.atproto.identity.updateHandle", Some(jwt), &handle)
        .await;

    wait_until(WITHIN, "the old key's signature refused", async || {
        !verified(&server, &signed.name).await
    })
    .await;
}

/// Registry-free discovery: images whose registry lists no signature artifact, signed by
/// a trusted signer's record naming their digest — one before the server starts (found by
/// the backfill), one while it runs (found on the stream) — are verified, each record
/// proven by getRecord; an image nobody signed is still not.
#[tokio::test]
async fn an_image_without_an_artifact_is_verified_from_a_trusted_record_naming_its_digest() {
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let writer = World::get().writer(SIGNER).await;
    let image = async |tag: &str| {
        let repo = format!("test/{}", unique("bare"));
        let pushed = pusher.image(&repo, tag, &unique("seed")).await;
        (format!("{reg}/{repo}:{tag}"), repo, pushed.digest)
    };
    let (before, repo, digest) = image("v1").await;
    writer.sign(&repo, &digest).await;

    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    until_live(&server).await;
    wait_until(
        Duration::from_secs(10),
        "the backfilled signature found",
        async || verified(&server, &before).await,
    )
    .await;

    let (during, repo, digest) = image("v2").await;
    let (unsigned, _, _) = image("v3").await;
    // Not signed yet: "not verified", and that answer is kept...
    assert!(!verified(&server, &during).await);
    // ...until the record that names it is seen.
    writer.sign(&repo, &digest).await;
    wait_until(WITHIN, "the streamed signature found", async || {
        verified(&server, &during).await
    })
    .await;
    assert!(!verified(&server, &unsigned).await);
}

/// The follower backfills a trusted signer once its stream is live, loading the signer's
/// proven document again after the stream's first connection (which starts without a
/// cursor) forgot it: a cold verification then loads no document, only the record proof.
#[tokio::test]
async fn after_the_backfill_a_cold_verification_loads_no_document() {
    let reg = real_registry();
    let repo = format!("test/{}", unique("warm"));
    let pushed = Pusher::new(reg).image(&repo, "v1", &unique("seed")).await;
    World::get()
        .writer(SIGNER)
        .await
        .sign(&repo, &pushed.digest)
        .await;
    let key = format!("{reg}/{repo}@{}", pushed.digest);

    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    until_live(&server).await;
    until_backfilled(&server, None).await;
    let documents = |page: &str| {
        let of = |what: &str| {
            counter(
                page,
                &format!("atcr_verify_cache_{what}_total{{cache=\"did_document\"}}"),
            )
        };
        (of("hits"), of("misses"))
    };
    let (hits, misses) = documents(&metrics(&server).await);
    assert!(verified(&server, &key).await, "{}", server.logs());
    let (hits_after, misses_after) = documents(&metrics(&server).await);
    assert_eq!(
        misses_after, misses,
        "no document loaded on the verification's path"
    );
    assert!(hits_after > hits, "the document came from the cache");
}

/// `--relay URL`: one stream for every trusted signer (here a forwarder to the PDS, whose
/// stream a relay serves in the same shape) instead of each signer's PDS; a delete is seen
/// the same way.
#[tokio::test]
async fn through_a_relay_a_deleted_signature_is_refused_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Forwarder::to(&World::get().pds).await;
    let server = serve(dir.path(), &["--relay", &relay.url()]);
    until_live(&server).await;
    let logs = server.logs();
    let stream = format!(
        "ws://127.0.0.1:{}/xrpc/com.atproto.sync.subscribeRepos",
        relay.port
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("following trusted signers") && l.contains(&stream)),
        "{logs}"
    );
    a_delete_is_refused_within_two_seconds(&server).await;
}

/// Two streams, each hosting one trusted signer (bob's document, through a PLC proxy, names
/// the same PDS as 127.0.0.1 instead of localhost, so his repo is followed on a second
/// subscription). Both streams carry every repo of the PDS, but a delete of alice's signature
/// is acted on by alice's stream only.
#[tokio::test]
async fn each_stream_acts_on_the_trusted_signers_it_hosts_only() {
    let world = World::get();
    let dir = tempfile::tempdir().unwrap();
    let (server, _plc, other_host) = serve_on_two_streams(dir.path(), &[]);
    until_live_streams(&server, 2).await;
    let alice_uri = World::get()
        .writer(SIGNER)
        .await
        .sign(real_registry(), &format!("sha256:{}", unique_hex()))
        .await;
    World::get().writer(SIGNER).await.delete(&alice_uri).await;
    // A later delete in bob's repo: once bob's stream acted on it, it has seen alice's.
    let bob_writer = World::get().writer("bob.test").await;
    let bob_uri = bob_writer
        .sign(real_registry(), &format!("sha256:{}", unique_hex()))
        .await;
    bob_writer.delete(&bob_uri).await;
    let bob_stream = other_host.replace("http://", "ws://");
    wait_until(
        Duration::from_secs(15),
        "bob's delete seen on his stream",
        async || {
            server
                .logs()
                .lines()
                .any(|l| l.contains(&bob_uri) && l.contains(&bob_stream))
        },
    )
    .await;
    let logs = server.logs();
    let alice_stream = world.pds.replace("http://", "ws://");
    assert!(
        logs.lines()
            .any(|l| l.contains(&alice_uri) && l.contains(&alice_stream)),
        "alice's delete acted on by her stream:\n{logs}"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains(&alice_uri) && l.contains(&bob_stream)),
        "alice's delete ignored by bob's stream:\n{logs}"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains(&bob_uri) && l.contains(&alice_stream)),
        "bob's delete ignored by alice's stream:\n{logs}"
    );
}

/// 64 hex digits, different per call.
fn unique_hex() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(unique("digest").as_bytes()))
}

/// The PDS process killed (SIGKILL) and started again on the same data: the subscription
/// resumes from its cursor (the PDS's sequencer outlives the process) and so sees a delete
/// made while it was down; meanwhile /readyz stays ready. The delete is made by the same PDS started in between on a side
/// port the follower does not know: it is in the PDS's history before the follower can
/// reconnect, where only resuming from the cursor can see it (a fresh subscription starts
/// at the head). The refusal comes from the stream: the proof TTL is 10 minutes, the
/// revocation is counted and logged, and the subscription never started over without a
/// cursor (which would forget the signer's cached facts and re-prove them).
#[tokio::test]
async fn a_killed_and_restarted_pds_is_resumed_from_the_cursor() {
    let mut pds = RestartablePds::start(&format!("{}.test", unique("rs")));
    let dir = tempfile::tempdir().unwrap();
    let server = serve_trusting(dir.path(), &[&pds.did], &[]);
    until_live(&server).await;
    let signed = signed_image_by(real_registry(), &pds.writer().await, &pds.url()).await;
    assert!(verified(&server, &signed.name).await, "{}", server.logs());
    wait_until(Duration::from_secs(10), "a commit event seen", async || {
        counter(
            &metrics(&server).await,
            "atcr_verify_follow_events_total{type=\"commit\"}",
        ) > 0
    })
    .await;
    let revocations = "atcr_verify_follow_revocations_total";
    let before = counter(&metrics(&server).await, revocations);

    pds.kill();
    until_live_streams(&server, 0).await;
    pds.start_at(free_port());
    pds.writer().await.delete(&signed.uri).await;
    pds.kill();
    assert!(
        verified(&server, &signed.name).await,
        "while the stream is down, the kept answer stands until its TTL"
    );
    let ready = crate::common::client()
        .get(format!("{}/readyz", server.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready while a stream is down");
    pds.restart();

    wait_until(
        Duration::from_secs(60),
        "the delete made while down refused",
        async || !verified(&server, &signed.name).await,
    )
    .await;
    let logs = server.logs();
    let stream = format!(
        "ws://localhost:{}/xrpc/com.atproto.sync.subscribeRepos",
        pds.home
    );
    let subscribed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("subscribed") && l.contains(&stream))
        .collect();
    assert!(subscribed.len() >= 2, "reconnected:\n{logs}");
    assert!(!subscribed[0].contains("cursor="), "{logs}");
    assert!(
        subscribed[1..].iter().all(|l| l.contains("cursor=")),
        "every reconnection resumed from a cursor:\n{logs}"
    );
    assert!(
        !logs.contains("cannot resume at this cursor"),
        "the cursor was kept:\n{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains("signature record changed")
            && l.contains(&signed.uri)
            && l.contains(&stream)),
        "the delete came on the stream:\n{logs}"
    );
    assert!(
        counter(&metrics(&server).await, revocations) > before,
        "{}",
        metrics(&server).await
    );
}
