//! `hostile_rss`: the server's peak memory while a hostile PDS answers every proof request
//! with megabytes of error text.
//!
//! Run: `cargo bench --bench hostile_rss`. It starts the real world (PDS + PLC), a fake
//! registry with the Referrers API, a proxy in front of the PDS that answers every
//! `getRecord` with `400 {"error": <2 MiB>, "message": …}` (escape sequences
//! included), and a proxy in front of the PLC that names that PDS in every DID document —
//! so the hostile text comes from a **trusted** signer's PDS, the case the verifier cannot
//! avoid asking. `BENCH_CONCURRENT` images (default 16), each with 31 junk signature
//! artifacts claiming the trusted signer plus the real one, are asked about at once, each
//! in its own `/provide` request to the release `atcr-verify serve`; then the same with an
//! untrusted signer. Prints the peak RSS (`VmHWM`) and the largest answer.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod common;

use std::sync::Arc;

use common::fake::{Fake, Fault};
use common::registry::{Pusher, payload};
use common::server::Server;
use common::world::World;
use serde_json::json;

/// Pushes `n` images, each with 31 junk artifacts claiming `claimed` and one real
/// signature by alice; returns their keys.
async fn images(registry: &str, claimed: &str, tag: &str, n: usize) -> Vec<String> {
    let world = World::get();
    let pusher = Pusher::new(registry);
    let writer = world.writer("alice.test").await;
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let repo = format!("hostile/{tag}{i}-{}", std::process::id());
        let image = pusher.image(&repo, "v1", &format!("{repo}-seed")).await;
        for j in 0..31 {
            let uri = format!("at://{claimed}/io.atcr.manifest/junk{j}");
            let claim = payload(&image.digest, claimed, &uri, &world.pds);
            pusher.attach(&repo, &image, &claim).await;
        }
        let uri = writer.sign(&repo, &image.digest).await;
        let real = payload(&image.digest, writer.did(), &uri, &world.pds);
        pusher.attach(&repo, &image, &real).await;
        keys.push(format!("{registry}/{repo}:v1"));
    }
    keys
}

fn main() {
    common::bench_main("hostile_rss", run);
}

async fn run() {
    let n = common::env_usize("BENCH_CONCURRENT", 16);
    let world = World::get();
    let fake = Fake::registry(100, None);
    let hostile = Fake::proxy(&world.pds);
    let junk = format!("\u{1b}]0;owned\u{7}{}", "A".repeat(2 * 1024 * 1024 - 256));
    let body = serde_json::to_vec(&json!({"error": junk, "message": "\u{1b}[2J"})).unwrap();
    hostile.set_fault(Some(Fault::BodyOnPath(
        "getRecord".into(),
        400,
        Arc::new(body),
    )));
    let plc = Fake::proxy(&world.plc);
    plc.rewrite(&world.pds, &hostile.url());
    let alice = world.account("alice.test").did.clone();
    let bob = world.account("bob.test").did.clone();
    eprintln!("hostile_rss: pushing {n} images × 32 artifacts, twice");
    let trusted = images(&fake.addr, &alice, "t", n).await;
    let untrusted = images(&fake.addr, &bob, "u", n).await;

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\npolicies:\n  - name: all\n    scope: \"**\"\n    trustedDIDs: [{alice}]\n"
        ),
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--insecure-http",
            "--policy",
            policy.to_str().unwrap(),
            "--plc-url",
            &plc.url(),
            // The PDS is replaced by rewriting the DID document, which `log` would refuse.
            "--plc-trust",
            "directory",
            "--allow-private-addresses",
            "--insecure-registry",
            &fake.addr,
            "--upstream-rate",
            "100000",
            "--request-budget",
            "60s",
        ],
    );
    let pid = server.pid();
    let idle = common::proc_status_kib(pid, "VmRSS:");
    let client = common::client();
    let mut rows = Vec::new();
    for (label, keys) in [
        ("trusted signer's PDS", &trusted),
        ("untrusted signer", &untrusted),
    ] {
        hostile.reset_counts();
        let asks = keys.iter().map(|key| {
            let client = client.clone();
            let url = format!("{}/provide", server.url);
            let body = json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1",
                              "kind": "ProviderRequest", "request": {"keys": [key]}});
            async move {
                let text = client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                assert!(!text.contains('\u{1b}'), "an escape reached the answer");
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let verified = &v["response"]["items"][0]["value"]["verified"];
                assert!(verified.is_boolean(), "{text:.2000}");
                text.len()
            }
        });
        let sizes = futures_util::future::join_all(asks).await;
        rows.push(format!(
            "| {n} concurrent requests, hostile text from the {label} | peak RSS {:.1} MiB | largest answer {} bytes | hostile PDS asked {} times |",
            common::proc_status_kib(pid, "VmHWM:") as f64 / 1024.0,
            sizes.iter().max().unwrap(),
            hostile.total()
        ));
    }
    println!(
        "| hostile_rss (idle RSS {:.1} MiB) | | | |",
        idle as f64 / 1024.0
    );
    println!("|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
