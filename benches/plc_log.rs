//! `plc_log`: what proving a did:plc identity from its operation log costs a cold
//! verification, against taking the directory's document as served — in one run.
//!
//! Run: `cargo bench --bench plc_log`. It starts the real world (PDS + PLC), a fake registry
//! with the Referrers API holding one image signed by alice, and a proxy in front of the
//! real PLC directory. Each round builds a fresh engine (every cache empty) and verifies the
//! image once with `--plc-trust log` and once with `--plc-trust directory`, alternating which
//! goes first. Two settings: the loopback directory as is, and the same with
//! `BENCH_PLC_LATENCY_MS` (default 50) added to every directory answer — there a second
//! round trip to the directory would show as that much more time. Prints the median and
//! 90th percentile of each, their ratio, and the directory requests per verification.
//! `BENCH_ROUNDS` (default 40) rounds per setting.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod common;

use std::time::{Duration, Instant};

use atcr_verify::cli::EngineArgs;
use atcr_verify::policy::TrustPolicy;
use clap::Parser;
use common::fake::Fake;
use common::world::World;
use time::OffsetDateTime;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    common::bench_main("plc_log", run);
}

async fn run() {
    let rounds = common::env_usize("BENCH_ROUNDS", 40);
    let latency = Duration::from_millis(common::env_usize("BENCH_PLC_LATENCY_MS", 50) as u64);
    let world = World::get();
    let registry = Fake::registry(100, None);
    let signed = common::signed_image(&registry.addr, "alice.test").await;
    let plc = Fake::proxy(&world.plc);
    let alice = &world.account("alice.test").did;
    let policy = TrustPolicy::from_yaml(&format!(
        "version: 1\npolicies:\n  - name: bench\n    scope: \"{}/**\"\n    require:\n      - signature: true\n    trustedDIDs:\n      - {alice}\n    action: enforce\n",
        registry.addr
    ))
    .unwrap();

    println!(
        "plc_log: cold verification of one image signed by a did:plc signer, {rounds} rounds per setting"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}",
        "setting", "log p50", "dir p50", "log p90", "dir p90", "p50 ×", "PLC req/run"
    );
    for added in [Duration::ZERO, latency] {
        plc.set_latency(added);
        let mut times = [Vec::new(), Vec::new()];
        let mut requests = [0u64, 0u64];
        for round in 0..rounds {
            for k in 0..2 {
                let mode = (round + k) % 2; // 0 = log, 1 = directory, alternating first
                let trust = ["log", "directory"][mode];
                let engine = Flags::parse_from([
                    "x",
                    "--plc-url",
                    &plc.url(),
                    "--plc-trust",
                    trust,
                    "--allow-private-addresses",
                    "--insecure-registry",
                    &registry.addr,
                    "--upstream-rate",
                    "100000",
                ])
                .engine
                .build()
                .unwrap();
                let before = plc.total();
                let started = Instant::now();
                let report = engine
                    .verifier
                    .verify(&signed.image, &policy, OffsetDateTime::now_utc())
                    .await
                    .unwrap();
                times[mode].push(started.elapsed());
                assert!(report.verdict.verified, "{:?}", report.verdict.reason);
                requests[mode] += plc.total() - before;
            }
        }
        for t in &mut times {
            t.sort();
        }
        let [log, directory] = &times;
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        let ratio = percentile(log, 0.5).as_secs_f64() / percentile(directory, 0.5).as_secs_f64();
        println!(
            "{:<28} {:>10} {:>10} {:>10} {:>10} {:>7.2}× {:>5} / {:<5}",
            format!("PLC +{} ms per answer", added.as_millis()),
            ms(percentile(log, 0.5)),
            ms(percentile(directory, 0.5)),
            ms(percentile(log, 0.9)),
            ms(percentile(directory, 0.9)),
            ratio,
            requests[0] as f64 / rounds as f64,
            requests[1] as f64 / rounds as f64,
        );
    }
}
