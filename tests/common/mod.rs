//! Shared test harness: the real ATProto world (`world`), the real OCI registry and a push
//! client (`registry`), spec-following fakes for faults and the Referrers API (`fake`), and
//! proof-editing tools (`repo`).

#![allow(dead_code)]

pub mod certs;
pub mod fake;
pub mod registry;
pub mod repo;
pub mod server;
pub mod world;

use std::time::{Duration, Instant};

/// Polls `condition` every 20 ms until it holds; fails the test, naming `what`, if it
/// still does not after `within`.
pub async fn wait_until(within: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name no other test (or earlier run) uses: `prefix`, the process id and a counter.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A fresh image in a registry, signed for real: its record on the PDS and its signature
/// artifact in the registry.
pub struct Signed {
    /// `registry/repo:v1`.
    pub name: String,
    /// The same, parsed.
    pub image: atcr_verify::syntax::ImageRef,
    /// The repository path.
    pub repo: String,
    /// The image manifest.
    pub pushed: registry::Pushed,
    /// The signature artifact's manifest.
    pub artifact: registry::Pushed,
    /// The signature record's `at://` URI.
    pub uri: String,
}

/// Pushes a fresh image to `registry` and has `handle` sign it (record + artifact).
pub async fn signed_image(registry: &str, handle: &str) -> Signed {
    let world = world::World::get();
    signed_image_by(registry, &world.writer(handle).await, &world.pds).await
}

/// Pushes a fresh image to `registry` and has `writer`, on the PDS at `pds`, sign it.
pub async fn signed_image_by(registry: &str, writer: &world::Writer, pds: &str) -> Signed {
    let pusher = registry::Pusher::new(registry);
    let repo = format!("test/{}", unique("signed"));
    let pushed = pusher.image(&repo, "v1", &unique("seed")).await;
    let uri = writer.sign(&repo, &pushed.digest).await;
    let artifact = pusher
        .attach(
            &repo,
            &pushed,
            &registry::payload(&pushed.digest, writer.did(), &uri, pds),
        )
        .await;
    let name = format!("{registry}/{repo}:v1");
    Signed {
        image: name.parse().unwrap(),
        name,
        repo,
        pushed,
        artifact,
        uri,
    }
}

/// Runs the built `atcr-verify` with `args`: exit code, stdout, stderr.
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
        .args(args)
        .output()
        .expect("running atcr-verify");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A benchmark setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A benchmark binary's `main`: runs `run` on a two-thread runtime, only under `cargo bench`
/// (`cargo test --all-targets` runs bench binaries without `--bench`, and must not start a
/// minutes-long load run).
pub fn bench_main<F: std::future::Future>(name: &str, run: impl FnOnce() -> F) {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("{name}: run with `cargo bench --bench {name}`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

/// A plain HTTP client for test plumbing (after installing the process's TLS provider).
pub fn client() -> reqwest::Client {
    atcr_verify::net::install_crypto_provider();
    reqwest::Client::new()
}
