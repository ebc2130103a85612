//! Following trusted signers (issue 17), event by event: an `#account` deactivation on the
//! real PDS, policy reloads adding and dropping subscriptions, the `--max-subscriptions` cap,
//! and — through a fake relay, as no local server sends them on demand — a frame over the
//! size cap and `#sync`/`#identity` frames.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ipld_core::ipld::Ipld;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

use crate::common::registry::real_registry;
use crate::common::repo::encode;
use crate::common::server::Server;
use crate::common::world::World;
use crate::common::{signed_image, wait_until};
use crate::follow::{
    SIGNER, counter, metrics, policy, serve_on_two_streams, serve_trusting,
    serve_with_a_kept_signature, until_backfilled, until_live, until_live_streams, verified,
};

/// The largest frame the follower reads (`atcr_verify::follow::frame::MAX_FRAME`).
const MAX_FRAME: usize = atcr_verify::follow::frame::MAX_FRAME;

/// A did:plc no directory knows: a policy trusting only it follows nobody.
const NOBODY: &str = "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz";

/// The verdict `/provide` gives for `key` (panics on a system error).
async fn verdict(server: &Server, key: &str) -> Value {
    let r = crate::common::server::provide(&crate::common::client(), &server.url, &[key]).await;
    let item = &r["response"]["items"][0];
    assert!(item["error"].is_null(), "{r}");
    item["value"].clone()
}

/// Outbound requests to `url`'s host so far (`atcr_verify_upstream_requests_total`, by host
/// name: the world's PLC directory and PDS share `localhost`).
fn upstream(page: &str, url: &str) -> u64 {
    let host = url::Url::parse(url).unwrap().host_str().unwrap().to_owned();
    counter(
        page,
        &format!("atcr_verify_upstream_requests_total{{host=\"{host}\"}}"),
    )
}

/// Loads of `cache` that went upstream (`atcr_verify_cache_misses_total`).
fn misses(page: &str, cache: &str) -> u64 {
    counter(
        page,
        &format!("atcr_verify_cache_misses_total{{cache=\"{cache}\"}}"),
    )
}

fn events(page: &str, kind: &str) -> u64 {
    counter(
        page,
        &format!("atcr_verify_follow_events_total{{type=\"{kind}\"}}"),
    )
}

/// Deactivating the signer's account on the PDS puts `#account` `active: false` on its
/// stream: the kept verified answer is dropped at once, and the signature is proven again —
/// `getRecord` now answers `RepoDeactivated`, so it no longer counts.
#[tokio::test]
async fn a_deactivated_account_stops_its_kept_signatures() {
    let world = World::get();
    // An account of its own, so that deactivating it disturbs no other test.
    let account = world.create_account("deact", None).await;
    let (did, jwt) = (&account.did, &account.jwt);
    let dir = tempfile::tempdir().unwrap();
    let (server, signed) = serve_with_a_kept_signature(dir.path(), &account).await;
    let before = metrics(&server).await;

    world
        .xrpc_post(
            "com.atproto.server.deactivateAccount",
            Some(jwt),
            &json!({}),
        )
        .await;
    // Generous (the latency is measured for deletes in benches/follow.rs): without the
    // event, the kept answer would stand for the 10 minutes of --proof-ttl.
    wait_until(
        Duration::from_secs(15),
        "the deactivated signer's image refused",
        async || !verified(&server, &signed.name).await,
    )
    .await;
    let value = verdict(&server, &signed.name).await;
    let signature = &value["signatures"][0];
    assert_eq!(signature["uri"], signed.uri.as_str(), "{value}");
    assert_eq!(signature["counted"], false, "{value}");
    assert!(
        signature.to_string().contains("RepoDeactivated"),
        "re-proven, and the PDS refuses the record: {value}"
    );
    let page = metrics(&server).await;
    assert!(events(&page, "account") >= 1, "{page}");
    assert!(
        counter(&page, "atcr_verify_follow_revocations_total")
            > counter(&before, "atcr_verify_follow_revocations_total"),
        "{page}"
    );
    let logs = server.logs();
    assert!(
        logs.lines().any(|l| l.contains("signer changed")
            && l.contains(did.as_str())
            && l.contains("event=\"account\"")),
        "{logs}"
    );
}

/// Writes the policy trusting `dids` over `dir`'s `policy.yaml` at once (a rename), so that
/// a reload never reads half a file.
fn replace_policy(dir: &std::path::Path, dids: &[&str]) {
    let staging = tempfile::tempdir().unwrap();
    let written = policy(staging.path(), dids);
    std::fs::rename(written, dir.join("policy.yaml")).unwrap();
}

/// The follower reads the trusted DIDs from the policy in force: editing the policy file to
/// trust a signer subscribes to its PDS and backfills its records; editing it to trust
/// nobody on that PDS drops the subscription.
#[tokio::test]
async fn a_policy_reload_adds_and_drops_subscriptions() {
    let alice = World::get().account(SIGNER).did.clone();
    let dir = tempfile::tempdir().unwrap();
    let server = serve_trusting(dir.path(), &[NOBODY], &[]);
    let live = |n: u32| format!("atcr_verify_follow_subscriptions{{state=\"live\"}} {n}\n");
    wait_until(
        Duration::from_secs(20),
        "the unknown DID tried",
        async || {
            server
                .logs()
                .lines()
                .any(|l| l.contains("cannot follow this signer yet") && l.contains(NOBODY))
        },
    )
    .await;
    let page = metrics(&server).await;
    assert!(page.contains(&live(0)), "{page}");
    assert!(!server.logs().contains("following trusted signers"));

    replace_policy(dir.path(), &[&alice]);
    until_live(&server).await;
    let stream = format!(
        "stream={}/xrpc/com.atproto.sync.subscribeRepos",
        World::get().pds.replace("http://", "ws://")
    );
    until_backfilled(&server, Some(&alice)).await;
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("following trusted signers") && l.contains(&stream)),
        "{logs}"
    );

    replace_policy(dir.path(), &[NOBODY]);
    until_live_streams(&server, 0).await;
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("no longer following") && l.contains(&stream)),
        "{logs}"
    );
    let page = metrics(&server).await;
    assert_eq!(
        counter(
            &page,
            "atcr_verify_policy_reloads_total{result=\"success\"}"
        ),
        2,
        "{page}"
    );
}

/// Two trusted signers on two streams (bob's document, through a PLC proxy, names the PDS as
/// 127.0.0.1 instead of localhost) and `--max-subscriptions 1`: one stream is followed, the
/// signer of the other is counted as unfollowed and a warning names it.
#[tokio::test]
async fn past_max_subscriptions_a_signer_is_left_unfollowed_and_counted() {
    let world = World::get();
    let alice = world.account(SIGNER).did.clone();
    let bob = world.account("bob.test").did.clone();
    let dir = tempfile::tempdir().unwrap();
    let (server, _plc, _) = serve_on_two_streams(dir.path(), &["--max-subscriptions", "1"]);
    wait_until(
        Duration::from_secs(20),
        "one signer counted as unfollowed",
        async || {
            counter(
                &metrics(&server).await,
                "atcr_verify_follow_unfollowed_signers",
            ) == 1
        },
    )
    .await;
    let page = metrics(&server).await;
    let states: u64 = ["live", "connecting", "backoff"]
        .iter()
        .map(|s| {
            counter(
                &page,
                &format!("atcr_verify_follow_subscriptions{{state=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(states, 1, "exactly one subscription:\n{page}");
    let logs = server.logs();
    let following: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("following trusted signers"))
        .collect();
    assert_eq!(following.len(), 1, "{logs}");
    assert!(following[0].contains("signers=1"), "{logs}");
    // The warning names the signer left out: the one on the other stream.
    let left_out = if following[0].contains("127.0.0.1") {
        &alice
    } else {
        &bob
    };
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("more PDSes than --max-subscriptions")
            && l.contains("unfollowed=1")
            && l.contains(left_out.as_str())),
        "{logs}"
    );
}

/// A `subscribeRepos` stream this test writes to: each frame given to [`FakeRelay::send`]
/// goes to the connection open then (or the next one), and the cursor each connection asked
/// for is kept. What no local server does on demand: `#sync` and `#identity` frames for
/// any DID, and a frame over the follower's size cap.
struct FakeRelay {
    port: u16,
    frames: mpsc::UnboundedSender<Vec<u8>>,
    cursors: Arc<Mutex<Vec<Option<i64>>>>,
}

impl FakeRelay {
    async fn start() -> FakeRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frames, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let cursors = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&cursors);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (rx, seen) = (Arc::clone(&rx), Arc::clone(&seen));
                tokio::spawn(async move {
                    let cursor = Arc::new(Mutex::new(None));
                    let asked = Arc::clone(&cursor);
                    // The handshake callback's signature is tungstenite's.
                    #[allow(clippy::result_large_err)]
                    let callback = move |req: &Request, res: Response| {
                        *asked.lock().unwrap() = req.uri().query().and_then(|q| {
                            url::form_urlencoded::parse(q.as_bytes())
                                .find(|(k, _)| k == "cursor")
                                .and_then(|(_, v)| v.parse::<i64>().ok())
                        });
                        Ok(res)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await
                    else {
                        return;
                    };
                    // One connection at a time takes the frames (the follower opens one).
                    let mut rx = rx.lock().await;
                    seen.lock().unwrap().push(*cursor.lock().unwrap());
                    loop {
                        tokio::select! {
                            // Reading answers the follower's pings; the end ends the connection.
                            m = ws.next() => match m {
                                Some(Ok(_)) => {}
                                _ => return,
                            },
                            f = rx.recv() => match f {
                                Some(f) => {
                                    if ws.send(Message::Binary(f.into())).await.is_err() {
                                        return;
                                    }
                                }
                                None => return,
                            },
                        }
                    }
                });
            }
        });
        FakeRelay {
            port,
            frames,
            cursors,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn send(&self, frame: Vec<u8>) {
        self.frames.send(frame).unwrap();
    }

    fn cursors(&self) -> Vec<Option<i64>> {
        self.cursors.lock().unwrap().clone()
    }
}

fn map(entries: &[(&str, Ipld)]) -> Ipld {
    Ipld::Map(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

/// A `t` message frame (`#identity`, `#sync`, `#account`, …) with sequence number `seq` for
/// `did`, and `extra` body fields.
fn did_frame(t: &str, seq: i64, did: &str, extra: &[(&str, Ipld)]) -> Vec<u8> {
    let mut body = vec![
        ("seq", Ipld::Integer(seq.into())),
        ("did", Ipld::String(did.to_owned())),
        ("time", Ipld::String("2026-01-01T00:00:00.000Z".into())),
    ];
    body.extend_from_slice(extra);
    let mut bytes = encode(&map(&[
        ("op", Ipld::Integer(1)),
        ("t", Ipld::String(t.to_owned())),
    ]));
    bytes.extend(encode(&map(&body)));
    bytes
}

/// Starts `serve` trusting SIGNER, following `relay` instead of the PDS, and waits until it
/// is live on it and has backfilled SIGNER's records (so that no request of the follower's
/// start is counted later).
async fn serve_through(dir: &std::path::Path, relay: &FakeRelay) -> Server {
    let alice = World::get().account(SIGNER).did.clone();
    let server = serve_trusting(dir, &[&alice], &["--relay", &relay.url()]);
    until_live(&server).await;
    until_backfilled(&server, Some(&alice)).await;
    server
}

async fn ready(server: &Server) -> u16 {
    crate::common::client()
        .get(format!("{}/readyz", server.metrics))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A frame over the 4 MiB cap (refused by the socket before it is read) is counted as a bad
/// frame and drops the connection; the follower reconnects at the last sequence number it
/// handled, and the server stays ready and keeps answering.
#[tokio::test]
async fn a_frame_over_the_cap_is_refused_and_the_stream_resumes_at_its_cursor() {
    let relay = FakeRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = serve_through(dir.path(), &relay).await;
    assert_eq!(relay.cursors(), vec![None]);
    let alice = World::get().account(SIGNER).did.clone();

    // An event to resume after (an active account changes nothing), then the oversized one.
    relay.send(did_frame(
        "#account",
        10,
        &alice,
        &[("active", Ipld::Bool(true))],
    ));
    relay.send(vec![0xa2; MAX_FRAME + 1]);
    wait_until(
        Duration::from_secs(20),
        "a reconnection at the cursor",
        async || relay.cursors() == vec![None, Some(10)],
    )
    .await;
    let page = metrics(&server).await;
    assert_eq!(events(&page, "account"), 1, "{page}");
    assert_eq!(
        counter(&page, "atcr_verify_follow_bad_frames_total"),
        1,
        "{page}"
    );
    assert_eq!(
        counter(&page, "atcr_verify_follow_revocations_total"),
        0,
        "{page}"
    );
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("refused a frame") && l.contains("too long")),
        "{logs}"
    );
    until_live(&server).await;
    assert_eq!(ready(&server).await, 200);
    let signed = signed_image(real_registry(), SIGNER).await;
    assert!(verified(&server, &signed.name).await, "{}", server.logs());
}

/// `#sync` (repo reset) and `#identity` (key rotation, PDS move) of the trusted signer make
/// the server forget its document and proofs: the next /provide after a kept verified answer
/// asks the PLC directory and the PDS again (and, the signature being intact, is verified
/// again). An `#identity` of a DID the policy does not trust changes nothing.
#[tokio::test]
async fn sync_and_identity_frames_forget_the_trusted_signers_document_and_proofs() {
    let world = World::get();
    let alice = world.account(SIGNER).did.clone();
    let bob = world.account("bob.test").did.clone();
    let relay = FakeRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = serve_through(dir.path(), &relay).await;
    let signed = signed_image(real_registry(), SIGNER).await;
    assert!(verified(&server, &signed.name).await, "{}", server.logs());
    assert!(verified(&server, &signed.name).await, "kept");

    let mut seq = 20;
    let mut send = async |t: &str, did: &str| {
        seq += 1;
        let before = metrics(&server).await;
        relay.send(did_frame(t, seq, did, &[]));
        let kind = t.trim_start_matches('#');
        wait_until(Duration::from_secs(10), "the frame handled", async || {
            events(&metrics(&server).await, kind) > events(&before, kind)
        })
        .await;
        assert!(verified(&server, &signed.name).await, "{}", server.logs());
        (before, metrics(&server).await)
    };

    // The PLC directory and the PDS both listen on the world's host.
    assert_eq!(
        url::Url::parse(&world.plc).unwrap().host_str(),
        url::Url::parse(&world.pds).unwrap().host_str()
    );
    let revocations = |page: &str| counter(page, "atcr_verify_follow_revocations_total");

    let (before, after) = send("#identity", &bob).await;
    assert_eq!(revocations(&after), revocations(&before), "{after}");
    assert_eq!(
        upstream(&after, &world.pds),
        upstream(&before, &world.pds),
        "an untrusted DID's identity: the kept answer stands:\n{after}"
    );
    for cache in ["did_document", "proof"] {
        assert_eq!(misses(&after, cache), misses(&before, cache), "{after}");
    }

    for t in ["#sync", "#identity"] {
        let (before, after) = send(t, &alice).await;
        assert_eq!(
            revocations(&after),
            revocations(&before) + 1,
            "{t}:\n{after}"
        );
        // The document (and its operation log) and the record's proof (getRecord).
        for cache in ["did_document", "proof"] {
            assert!(
                misses(&after, cache) > misses(&before, cache),
                "{t}: {cache} loaded again:\n{after}"
            );
        }
        assert!(
            upstream(&after, &world.pds) >= upstream(&before, &world.pds) + 2,
            "{t}: the PLC directory and the PDS asked again:\n{after}"
        );
    }
    let logs = server.logs();
    for kind in ["sync", "identity"] {
        assert!(
            logs.lines().any(|l| l.contains("signer changed")
                && l.contains(&alice)
                && l.contains(&format!("event=\"{kind}\""))),
            "{logs}"
        );
    }
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("signer changed") && l.contains(&bob)),
        "{logs}"
    );
}

/// A `#commit` frame of `did`'s repo deleting the signature records `rkeys`.
fn deletes(seq: i64, did: &str, rkeys: impl Iterator<Item = String>) -> Vec<u8> {
    let ops = rkeys
        .map(|rkey| {
            map(&[
                ("action", Ipld::String("delete".into())),
                ("path", Ipld::String(format!("io.atcr.manifest/{rkey}"))),
                ("cid", Ipld::Null),
            ])
        })
        .collect();
    let mut bytes = encode(&map(&[
        ("op", Ipld::Integer(1)),
        ("t", Ipld::String("#commit".into())),
    ]));
    bytes.extend(encode(&map(&[
        ("seq", Ipld::Integer(seq.into())),
        ("repo", Ipld::String(did.to_owned())),
        ("blocks", Ipld::Bytes(vec![])),
        ("ops", Ipld::List(ops)),
    ])));
    bytes
}

/// A stream reporting endless record deletes of one trusted signer (100,500 here: past the
/// 100,000 marks after which everything would be forgotten) makes the server forget that
/// signer's facts only: the other trusted signer's proof stays cached.
#[tokio::test]
async fn a_flood_of_one_signers_record_changes_forgets_that_signer_only() {
    let world = World::get();
    let (alice, bob) = (&world.account(SIGNER).did, &world.account("bob.test").did);
    let relay = FakeRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay_url = relay.url();
    let server = serve_trusting(dir.path(), &[alice, bob], &["--relay", &relay_url]);
    until_live(&server).await;
    let (by_alice, by_bob) = (
        signed_image(real_registry(), SIGNER).await,
        signed_image(real_registry(), "bob.test").await,
    );
    for signed in [&by_alice, &by_bob] {
        assert!(verified(&server, &signed.name).await, "{}", server.logs());
    }

    let (frames, per_frame) = (201, 500);
    for n in 0..frames {
        let rkeys = (0..per_frame).map(move |i| format!("3kflood{n}x{i}"));
        relay.send(deletes(100 + n as i64, alice, rkeys));
    }
    wait_until(Duration::from_secs(60), "the flood handled", async || {
        events(&metrics(&server).await, "commit") >= frames
    })
    .await;
    let page = metrics(&server).await;
    assert!(
        counter(&page, "atcr_verify_follow_revocations_total") >= frames * per_frame,
        "{page}"
    );

    // Bob's proof is still cached; alice's is proven again (her record is intact).
    let proofs = |page: &str| misses(page, "proof");
    let before = proofs(&metrics(&server).await);
    assert!(verified(&server, &by_bob.name).await, "{}", server.logs());
    let after_bob = proofs(&metrics(&server).await);
    assert_eq!(after_bob, before, "bob's proof kept");
    assert!(verified(&server, &by_alice.name).await, "{}", server.logs());
    assert!(
        proofs(&metrics(&server).await) > after_bob,
        "alice's facts forgotten"
    );
}

/// A signer that joins a running stream (trusted again after a policy reload dropped it,
/// or moved to a PDS already followed) has its cached facts forgotten at that moment: its
/// events were not counted before, so a delete made meanwhile must not leave its kept
/// proof standing until `--proof-ttl` (10 minutes here). A policy reload that trusts it
/// again forgets them before the new policy answers anything.
#[tokio::test]
async fn a_signer_joining_a_running_stream_is_forgotten_first() {
    let world = World::get();
    let (alice, bob) = (&world.account(SIGNER).did, &world.account("bob.test").did);
    let both: [&str; 2] = [alice, bob];
    let dir = tempfile::tempdir().unwrap();
    let server = serve_trusting(dir.path(), &both, &[]);
    until_live(&server).await;
    let signed = signed_image(real_registry(), "bob.test").await;
    assert!(verified(&server, &signed.name).await, "{}", server.logs());

    // Bob leaves the stream's signers; his record is deleted while his events do not count.
    replace_policy(dir.path(), &[alice]);
    wait_until(
        Duration::from_secs(20),
        "bob no longer followed",
        async || {
            server
                .logs()
                .contains("following fewer trusted signers on this stream")
        },
    )
    .await;
    world.writer("bob.test").await.delete(&signed.uri).await;
    // A record alice signs after the delete is indexed once the stream has passed it.
    let index = "atcr_verify_signature_index_records";
    let indexed = counter(&metrics(&server).await, index);
    signed_image(real_registry(), SIGNER).await;
    wait_until(
        Duration::from_secs(20),
        "the stream past the delete",
        async || counter(&metrics(&server).await, index) > indexed,
    )
    .await;
    assert!(
        !server.logs().contains(signed.uri.as_str()),
        "the delete was not acted on"
    );

    // Bob is trusted again: his cached facts are forgotten before the policy is in force,
    // so the first answer under it shows the delete (the follower re-reads the policy
    // only at its next refresh)...
    let reloads = "atcr_verify_policy_reloads_total{result=\"success\"}";
    let reloaded = counter(&metrics(&server).await, reloads);
    replace_policy(dir.path(), &both);
    wait_until(Duration::from_secs(20), "the policy reloaded", async || {
        counter(&metrics(&server).await, reloads) > reloaded
    })
    .await;
    assert!(!verified(&server, &signed.name).await, "{}", server.logs());
    // ...and he joins the stream again, forgotten and backfilled there too.
    wait_until(Duration::from_secs(20), "bob followed again", async || {
        server
            .logs()
            .contains("following more trusted signers on this stream")
    })
    .await;
    assert!(!verified(&server, &signed.name).await, "{}", server.logs());
}
