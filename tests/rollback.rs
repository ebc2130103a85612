//! No rollback (issue 15, point 2): whoever answers for a signer's PDS cannot replay an old
//! repo state — one that still holds a record the signer has since deleted — once the engine
//! has proven a newer one. Against the real world (registry, PDS, PLC), with a proxy in front
//! of the PDS that replays the `getRecord` answer it passed earlier, byte for byte.

use std::sync::Arc;

use crate::common::fake::{Fake, Fault, Recorded};
use crate::common::registry::real_registry;
use crate::common::world::World;
use crate::common::{Signed, signed_image};
use atcr_verify::cli::EngineArgs;
use atcr_verify::policy::TrustPolicy;
use atcr_verify::verify::{ImageReport, STATE_FILE, Verifier};
use clap::Parser;
use time::OffsetDateTime;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

const SIGNER: &str = "bob.test";

/// The real PLC and PDS behind proxies; the DID documents name the PDS proxy (so the engine
/// takes the directory's document as served: `--plc-trust directory`; with `log` that
/// rewrite is refused as a forgery, see tests/identity.rs).
struct Upstreams {
    plc: Fake,
    pds: Fake,
}

impl Upstreams {
    fn new() -> Upstreams {
        let world = World::get();
        let pds = Fake::proxy(&world.pds);
        let plc = Fake::proxy(&world.plc);
        plc.rewrite(&world.pds, &pds.url());
        Upstreams { plc, pds }
    }

    /// An engine that caches no proof outcome, so every verification fetches the proof.
    fn engine(&self, extra: &[&str]) -> Arc<Verifier> {
        let plc = self.plc.url();
        let mut args = vec![
            "x",
            "--plc-url",
            &plc,
            "--plc-trust",
            "directory",
            "--allow-private-addresses",
            "--insecure-registry",
            real_registry(),
            "--proof-ttl",
            "0s",
            "--negative-ttl",
            "0s",
        ];
        args.extend_from_slice(extra);
        Flags::parse_from(args).engine.build().unwrap().verifier
    }

    /// The `getRecord` answer that passed for `signed`'s record.
    fn proof_of(&self, signed: &Signed) -> Recorded {
        self.pds
            .recorded(&rkey_query(signed))
            .expect("the proof passed through the proxy")
    }

    /// From now on the PDS answers `answer` for `signed`'s record (everything else live).
    fn replay(&self, signed: &Signed, answer: Recorded) {
        self.pds
            .set_fault(Some(Fault::AnswerOnQuery(rkey_query(signed), answer)));
    }
}

fn rkey_query(signed: &Signed) -> String {
    format!("rkey={}", signed.uri.rsplit('/').next().unwrap())
}

fn policy() -> TrustPolicy {
    let did = &World::get().account(SIGNER).did;
    TrustPolicy::from_yaml(&format!(
        "version: 1\npolicies:\n  - name: t\n    scope: \"{}/**\"\n    trustedDIDs: [{did}]\n",
        real_registry()
    ))
    .unwrap()
}

async fn verify(v: &Verifier, signed: &Signed) -> ImageReport {
    v.verify(&signed.image, &policy(), OffsetDateTime::now_utc())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", signed.name))
}

/// The one signature's reason (`counted` when it counted) and detail.
fn outcome(report: &ImageReport) -> String {
    let [s] = report.verdict.signatures.as_slice() else {
        panic!("one signature: {report:#?}")
    };
    s.reason
        .as_ref()
        .map_or("counted".to_owned(), ToString::to_string)
}

fn assert_stale(report: &ImageReport) {
    assert!(!report.verdict.verified, "{report:#?}");
    let why = outcome(report);
    let did = &World::get().account(SIGNER).did;
    assert!(
        why.starts_with("proof failed: stale commit: the PDS served rev ")
            && why.contains(&format!("of {did}'s repo, older than rev "))
            && why.ends_with("already proven (a replay of an old repo state)"),
        "{why}"
    );
}

/// Prove a record, advance the signer's repo (another signature, proven too), delete the
/// record, then replay the old proof: refused as stale. The limit, shown as it is: an engine
/// that never proved a newer rev of the repo accepts the same replay.
#[tokio::test]
async fn a_replayed_old_repo_state_is_refused_once_a_newer_rev_was_proven() {
    let up = Upstreams::new();
    let v = up.engine(&[]);
    let reg = real_registry();
    let first = signed_image(reg, SIGNER).await;
    assert_eq!(outcome(&verify(&v, &first).await), "counted");
    let old = up.proof_of(&first);

    let second = signed_image(reg, SIGNER).await;
    assert_eq!(outcome(&verify(&v, &second).await), "counted");
    World::get().writer(SIGNER).await.delete(&first.uri).await;

    up.replay(&first, old);
    assert_stale(&verify(&v, &first).await);
    // The signer's current state still proves their current signature.
    assert_eq!(outcome(&verify(&v, &second).await), "counted");

    let fresh = up.engine(&[]);
    let replayed = verify(&fresh, &first).await;
    assert!(
        replayed.verdict.verified,
        "without a newer rev seen, a replay is indistinguishable from the current state: {replayed:#?}"
    );
}

/// A deletion's proof of absence is a signed repo state too: once the engine has seen the
/// record gone, the old state that held it is refused.
#[tokio::test]
async fn a_seen_deletion_cannot_be_rolled_back() {
    let up = Upstreams::new();
    let v = up.engine(&[]);
    let first = signed_image(real_registry(), SIGNER).await;
    assert_eq!(outcome(&verify(&v, &first).await), "counted");
    let old = up.proof_of(&first);

    World::get().writer(SIGNER).await.delete(&first.uri).await;
    let revoked = outcome(&verify(&v, &first).await);
    assert!(
        revoked.starts_with("proof failed: record io.atcr.manifest/")
            && revoked.ends_with("is not in the repo (deleted or never written)"),
        "{revoked}"
    );

    up.replay(&first, old);
    assert_stale(&verify(&v, &first).await);
}

/// With `--state-dir`, the highest proven revs outlive the engine: a restarted engine
/// refuses the replay as the first one would have.
#[tokio::test]
async fn with_a_state_dir_the_revs_survive_a_restart() {
    let up = Upstreams::new();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let reg = real_registry();
    let first = signed_image(reg, SIGNER).await;
    let second = signed_image(reg, SIGNER).await;
    {
        let v = up.engine(&["--state-dir", state]);
        assert_eq!(outcome(&verify(&v, &first).await), "counted");
        let old = up.proof_of(&first);
        // The old state (first record only) is recorded; the repo then moves on.
        let third = signed_image(reg, SIGNER).await;
        assert_eq!(outcome(&verify(&v, &third).await), "counted");
        up.replay(&first, old);
    }
    let kept = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    let did = &World::get().account(SIGNER).did;
    assert!(kept.contains(did.as_str()), "{kept}");

    let restarted = up.engine(&["--state-dir", state]);
    assert_stale(&verify(&restarted, &first).await);
    assert_eq!(outcome(&verify(&restarted, &second).await), "counted");
    // Without the state dir, the restarted engine would have accepted it.
    assert_eq!(outcome(&verify(&up.engine(&[]), &first).await), "counted");
}

/// A state dir that cannot hold the file, or a file that is not a revisions file, is refused
/// when the engine is built, naming the flag.
#[test]
fn a_bad_state_dir_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), "{\"version\": 7}").unwrap();
    let missing = dir.path().join("missing");
    for (state, needle) in [
        (dir.path().to_str().unwrap(), "not a revisions file"),
        (missing.to_str().unwrap(), "No such file or directory"),
    ] {
        let e = Flags::parse_from(["x", "--state-dir", state])
            .engine
            .build()
            .unwrap_err();
        assert!(e.starts_with("--state-dir ") && e.contains(needle), "{e}");
    }
}
