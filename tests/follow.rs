//! Following trusted signers (issue 17): `serve` subscribes to the real PDS's
//! `com.atproto.sync.subscribeRepos` and forgets a signature as soon as its record is
//! deleted, instead of when `--proof-ttl` runs out.

use std::time::Duration;

use crate::common::registry::real_registry;
use crate::common::server::Server;
use crate::common::world::World;
use crate::common::{signed_image, wait_until};
use serde_json::{Value, json};

const SIGNER: &str = "alice.test";

/// How long a revocation may take to show in these tests: the bound, generous for
/// a loaded two-core machine (the measured latency is in benches/follow.rs).
const WITHIN: Duration = Duration::from_secs(2);

fn policy(dir: &std::path::Path) -> String {
    let did = &World::get().account(SIGNER).did;
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1\npolicies:\n  - name: follow\n    scope: \"{}/**\"\n    require:\n      - signature: true\n    trustedDIDs:\n      - {did}\n    action: enforce\n",
            real_registry()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Starts `serve` trusting SIGNER, keeping proofs for 10 minutes, with `extra` flags.
fn serve(dir: &std::path::Path, extra: &[&str]) -> Server {
    let world = World::get();
    let policy = policy(dir);
    let mut args = vec![
        "--insecure-http",
        "--policy",
        &policy,
        "--plc-url",
        &world.plc,
        "--allow-private-addresses",
        "--insecure-registry",
        real_registry(),
        "--proof-ttl",
        "10m",
    ];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

/// Whether /provide answers `verified: true` for `key` (panics on a system error).
async fn verified(server: &Server, key: &str) -> bool {
    let body = json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1",
                      "kind": "ProviderRequest", "request": {"keys": [key]}});
    let r: Value = crate::common::client()
        .post(format!("{}/provide", server.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let item = &r["response"]["items"][0];
    assert_eq!(item["key"], key, "{r}");
    assert!(item["error"].is_null(), "{r}");
    item["value"]["verified"].as_bool().unwrap()
}

async fn metrics(server: &Server) -> String {
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
async fn until_live(server: &Server) {
    wait_until(Duration::from_secs(20), "a live subscription", async || {
        metrics(server)
            .await
            .contains("atcr_verify_follow_subscriptions{state=\"live\"} 1")
    })
    .await;
}

/// Sign, verify (kept for 10 minutes), delete the record: the next /provide refuses
/// within 2 s. Without following (`--no-follow`), the kept answer stands.
#[tokio::test]
async fn a_deleted_signature_is_refused_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    until_live(&server).await;
    let signed = signed_image(real_registry(), SIGNER).await;
    assert!(verified(&server, &signed.name).await, "{}", server.logs());
    assert!(verified(&server, &signed.name).await, "kept");

    World::get().writer(SIGNER).await.delete(&signed.uri).await;
    wait_until(WITHIN, "the deleted signature refused", async || {
        !verified(&server, &signed.name).await
    })
    .await;
    let page = metrics(&server).await;
    assert!(
        page.contains("atcr_verify_follow_events_total{type=\"commit\"}"),
        "{page}"
    );
    assert!(
        !page.contains("atcr_verify_follow_revocations_total 0\n"),
        "{page}"
    );
}
