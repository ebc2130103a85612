//! `follow`: what following trusted signers' repo event streams buys (issue 17, point 4).
//!
//! Run: `cargo bench --bench follow`. It starts the real world (PDS + PLC), the real
//! registry and `atcr-verify serve` (following, `--proof-ttl 10m`) trusting alice, and
//! measures, on loopback:
//!
//! 1. eviction latency: `BENCH_DELETES` (default 50) times, sign a fresh image, verify it
//!    through `/provide` (the answer is then kept), delete its record, and time from the
//!    `deleteRecord` answer to the first `/provide` that refuses it (polled every 2 ms);
//!    p50, p99 and the largest.
//! 2. upstream requests of a cold verification with the index warm: a fresh server (empty
//!    caches) that has backfilled its index (which loads the signer's document again after
//!    its stream's first connection, which starts without a cursor, forgot it), asked once
//!    for an image with no signature artifact, by digest and by tag; the requests per host
//!    (from `/metrics`) — an upper bound on the round trips on the critical path.
//! 3. memory of the signature index per 10,000 records (bytes held by its allocations,
//!    from a counting allocator in this binary).

#[path = "../tests/common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use atcr_verify::verify::SignatureIndex;
use common::registry::{Pusher, real_registry};
use common::server::Server;
use common::world::World;

/// Bytes held by live allocations of this process.
struct Counting;
static HELD: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SIGNER: &str = "alice.test";

fn main() {
    common::bench_main("follow", run);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).ceil() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn serve(dir: &std::path::Path) -> Server {
    let world = World::get();
    serve_with(dir, real_registry(), &world.plc, &[])
}

fn serve_with(dir: &std::path::Path, reg: &str, plc: &str, extra: &[&str]) -> Server {
    let world = World::get();
    let did = &world.account(SIGNER).did;
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\npolicies:\n  - name: bench\n    scope: \"{}/**\"\n    require:\n      - signature: true\n    trustedDIDs:\n      - {did}\n    action: enforce\n",
            reg
        ),
    )
    .unwrap();
    let policy = policy.display().to_string();
    let mut args = vec![
        "--insecure-http",
        "--policy",
        &policy,
        "--plc-url",
        plc,
        "--allow-private-addresses",
        "--insecure-registry",
        reg,
        "--proof-ttl",
        "10m",
        "--upstream-rate",
        "10000",
        "--inbound-rate",
        "0",
    ];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

async fn verified(http: &reqwest::Client, server: &Server, key: &str) -> bool {
    let r = common::server::provide(http, &server.url, &[key]).await;
    let item = &r["response"]["items"][0];
    assert!(item["error"].is_null(), "{r}");
    item["value"]["verified"].as_bool().unwrap()
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run() {
    let http = common::client();
    let world = World::get();
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    until("a live subscription", async || {
        server
            .metrics_text()
            .await
            .contains("atcr_verify_follow_subscriptions{state=\"live\"} 1")
    })
    .await;

    // 1. Eviction latency.
    let n = common::env_usize("BENCH_DELETES", 50);
    let writer = world.writer(SIGNER).await;
    let mut latencies = Vec::with_capacity(n);
    // Split at the follower's log line of the revocation (wall clock, same machine): the
    // PDS's share (its sequencer polls its database with a backoff of up to 1 s when idle)
    // and the stream's, then the verifier's (re-proving the record, refusing).
    let (mut to_event, mut after_event) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let signed = common::signed_image(reg, SIGNER).await;
        assert!(verified(&http, &server, &signed.name).await);
        assert!(verified(&http, &server, &signed.name).await, "kept");
        writer.delete(&signed.uri).await;
        let (t0, deleted) = (Instant::now(), time::OffsetDateTime::now_utc());
        loop {
            if !verified(&http, &server, &signed.name).await {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never refused");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let took = t0.elapsed();
        latencies.push(took);
        let logs = server.logs_with(&signed.uri);
        let logged = logs
            .lines()
            .find(|l| l.contains("signature record changed") && l.contains(&signed.uri))
            .and_then(|l| l.split_whitespace().next())
            .and_then(seconds_of_day)
            .expect("the revocation is logged");
        let since = deleted.time();
        let deleted = f64::from(since.hour()) * 3600.0
            + f64::from(since.minute()) * 60.0
            + f64::from(since.second())
            + f64::from(since.nanosecond()) / 1e9;
        // Across midnight the log's clock has wrapped.
        let gap = (logged - deleted).rem_euclid(86_400.0);
        let event = Duration::try_from_secs_f64(gap).unwrap_or(Duration::ZERO);
        to_event.push(event);
        after_event.push(took.saturating_sub(event));
    }
    let ms = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        percentile(v, p).as_secs_f64() * 1e3
    };
    println!(
        "follow: eviction latency, deleteRecord answered -> /provide refuses, {n} deletes: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; of which until the follower logged the \
         revocation (the PDS and the stream) p50 {:.1} ms, p99 {:.1} ms; after it (the \
         verifier) p50 {:.1} ms, p99 {:.1} ms",
        ms(&mut latencies, 0.5),
        ms(&mut latencies, 0.99),
        latencies.last().unwrap().as_secs_f64() * 1e3,
        ms(&mut to_event, 0.5),
        ms(&mut to_event, 0.99),
        ms(&mut after_event, 0.5),
        ms(&mut after_event, 0.99),
    );
    drop(server);

    // 2. Upstream requests of a cold verification, index warm.
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", common::unique("bench-bare"));
    let pushed = pusher.image(&repo, "v1", &common::unique("seed")).await;
    writer.sign(&repo, &pushed.digest).await;
    let by_digest = format!("{reg}/{repo}@{}", pushed.digest);
    let by_tag = format!("{reg}/{repo}:v1");
    for (what, key) in [("digest", &by_digest), ("tag", &by_tag)] {
        let dir = tempfile::tempdir().unwrap();
        let server = serve(dir.path());
        // Live and backfilled: the backfill starts once the stream is live, after its first
        // connection (which starts without a cursor) forgot the signer's document, and
        // loads the document again.
        until("the backfill", async || {
            server.logs().contains("backfilled signature records")
                && server
                    .metrics_text()
                    .await
                    .contains("atcr_verify_follow_subscriptions{state=\"live\"} 1")
        })
        .await;
        let before = upstream(&server.metrics_text().await);
        let t0 = Instant::now();
        assert!(verified(&http, &server, key).await, "{}", server.logs());
        let took = t0.elapsed();
        let after = upstream(&server.metrics_text().await);
        let diff: Vec<String> = after
            .iter()
            .map(|(host, n)| {
                (
                    host,
                    n - before
                        .iter()
                        .find(|(h, _)| h == host)
                        .map_or(0, |(_, m)| *m),
                )
            })
            .filter(|(_, d)| *d > 0)
            .map(|(host, d)| format!("{host}: {d}"))
            .collect();
        println!(
            "follow: cold verification by {what}, index warm, no artifact in the registry: \
             {:.1} ms, upstream requests {}",
            took.as_secs_f64() * 1e3,
            diff.join(", ")
        );
    }

    // 2b. Round trips on the critical path: the same, with every upstream answer 50 ms
    // late (a registry with the Referrers API, the PLC directory and the PDS behind
    // proxies; the documents name the PDS proxy, so `--plc-trust directory`). The proxies
    // speak plain HTTP only, so the stream is read from the PDS itself, given as the relay;
    // the backfill (which starts once the stream is live) loads the signer's document.
    // `BENCH_ROUNDS` (default 5) fresh servers each; the median and the smallest.
    let delay = Duration::from_millis(50);
    let rounds = common::env_usize("BENCH_ROUNDS", 5);
    let fake = common::fake::Fake::registry(100, None);
    let pds = common::fake::Fake::proxy(&world.pds);
    let plc = common::fake::Fake::proxy(&world.plc);
    plc.rewrite(&world.pds, &pds.url());
    let fpusher = Pusher::new(&fake.addr);
    let repo = format!("test/{}", common::unique("bench-rt"));
    let pushed = fpusher.image(&repo, "v1", &common::unique("seed")).await;
    writer.sign(&repo, &pushed.digest).await;
    for (what, key) in [
        ("digest", format!("{}/{repo}@{}", fake.addr, pushed.digest)),
        ("tag", format!("{}/{repo}:v1", fake.addr)),
    ] {
        let mut took = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            for f in [&fake, &pds, &plc] {
                f.set_latency(Duration::ZERO);
            }
            let dir = tempfile::tempdir().unwrap();
            let plc_url = plc.url();
            let server = serve_with(
                dir.path(),
                &fake.addr,
                &plc_url,
                &["--plc-trust", "directory", "--relay", &world.pds],
            );
            until("the backfill", async || {
                server.logs().contains("backfilled signature records")
            })
            .await;
            for f in [&fake, &pds, &plc] {
                f.set_latency(delay);
            }
            let t0 = Instant::now();
            assert!(verified(&http, &server, &key).await, "{}", server.logs());
            took.push(t0.elapsed());
        }
        took.sort();
        let rt = |d: Duration| d.as_secs_f64() / delay.as_secs_f64();
        let (median, least) = (percentile(&took, 0.5), took[0]);
        println!(
            "follow: cold verification by {what}, index and document warm, every upstream answer \
             {} ms late, {rounds} rounds: median {:.0} ms = {:.2} round trips on the critical \
             path, least {:.0} ms = {:.2}",
            delay.as_millis(),
            median.as_secs_f64() * 1e3,
            rt(median),
            least.as_secs_f64() * 1e3,
            rt(least)
        );
    }

    // 3. Index memory per 10,000 records.
    let did = &world.account(SIGNER).did;
    let index = SignatureIndex::default();
    let before = HELD.load(Ordering::SeqCst);
    for i in 0..10_000u32 {
        let uri = format!("at://{did}/io.atcr.manifest/3k{i:011}")
            .parse()
            .unwrap();
        let digest = format!("sha256:{:064x}", i).parse().unwrap();
        index.insert(uri, digest);
    }
    let held = HELD.load(Ordering::SeqCst) - before;
    println!(
        "follow: signature index, 10,000 records (one digest each): {:.2} MiB ({} bytes per record)",
        held as f64 / (1024.0 * 1024.0),
        held / 10_000
    );
    assert_eq!(index.len(), 10_000);
}

/// Seconds since midnight (UTC) of a log line's timestamp (`2026-11-29T23:56:09.475327Z`).
fn seconds_of_day(ts: &str) -> Option<f64> {
    let clock = ts.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = clock.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// `atcr_verify_upstream_requests_total` per host.
fn upstream(page: &str) -> Vec<(String, u64)> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("atcr_verify_upstream_requests_total{host=\"")?;
            let (host, n) = rest.split_once("\"} ")?;
            Some((host.to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}
