//! The process faces, run exactly as their callers run them, against the real registry, PDS
//! and PLC directory: containerd's image verifier (`-name`/`-digest`/`-stdin-media-type`, the
//! descriptor on stdin, exit 0 to allow) and Ratify v1's verifier plugin (no arguments,
//! `RATIFY_VERIFIER_*` variables, JSON on stdin and stdout). Every setting comes from
//! `ATCR_VERIFY_*` variables: those callers pass no other flags.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::world::World;
use crate::common::{signed_image, unique};

const DESCRIPTOR: &str = "application/vnd.oci.descriptor.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn did(handle: &str) -> &'static str {
    &World::get().account(handle).did
}

/// A policy file trusting alice for everything on `registry`, and the settings a test run
/// needs (the test world is on loopback, the registry speaks plain HTTP).
struct Setup {
    _dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

fn setup(registries: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let scopes: Vec<String> = registries
        .iter()
        .map(|r| {
            format!(
                "  - name: t{}\n    scope: \"{r}/**\"\n    trustedDIDs: [{}]\n",
                r.replace([':', '.'], ""),
                did("alice.test")
            )
        })
        .collect();
    std::fs::write(
        &policy,
        format!("version: 1\npolicies:\n{}", scopes.concat()),
    )
    .unwrap();
    let env = vec![
        ("ATCR_VERIFY_POLICY".into(), policy.to_str().unwrap().into()),
        ("ATCR_VERIFY_PLC_URL".into(), World::get().plc.clone()),
        ("ATCR_VERIFY_ALLOW_PRIVATE_ADDRESSES".into(), "true".into()),
        ("ATCR_VERIFY_INSECURE_REGISTRY".into(), registries.join(",")),
    ];
    Setup { _dir: dir, env }
}

/// Runs the binary with `args`, `env` only (as a daemon's child gets it) and `stdin`: exit
/// code, stdout, stderr.
fn run(args: &[&str], env: &[(String, String)], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running atcr-verify");
    // As containerd does: write, then close; a child that stops reading is not an error.
    let mut pipe = child.stdin.take().unwrap();
    let _ = pipe.write_all(stdin);
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// containerd's bindir plugin: `<bin> -name REF -digest DIGEST -stdin-media-type …`, the
/// image's descriptor as JSON on stdin (Go's encoder ends it with a newline).
fn containerd(setup: &Setup, name: &str, digest: &str, stdin_digest: &str) -> (i32, String) {
    let descriptor = format!(
        "{{\"mediaType\":\"{OCI_MANIFEST}\",\"digest\":\"{stdin_digest}\",\"size\":527}}\n"
    );
    let (code, out, err) = run(
        &[
            "-name",
            name,
            "-digest",
            digest,
            "-stdin-media-type",
            DESCRIPTOR,
        ],
        &setup.env,
        descriptor.as_bytes(),
    );
    assert!(
        out.len() <= 32 * 1024 && out.lines().count() == 1,
        "one line of reason: {out:?} (stderr {err})"
    );
    (code, out)
}

#[tokio::test]
async fn containerd_admits_a_signed_image() {
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let setup = setup(&[reg]);
    let (code, out) = containerd(&setup, &s.name, &s.pushed.digest, &s.pushed.digest);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("atcr-verify: verified "), "{out}");
    assert!(out.contains(&s.pushed.digest), "{out}");
    assert!(out.contains(did("alice.test")), "{out}");
    // Also as a subcommand, and with a settings file instead of the environment.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("atcr-verify.env");
    let lines: Vec<String> = setup
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    std::fs::write(&file, lines.concat()).unwrap();
    let descriptor = format!("{{\"digest\":\"{}\"}}", s.pushed.digest);
    let (code, out, _) = run(
        &[
            "containerd-verifier",
            "-name",
            &s.name,
            "-digest",
            &s.pushed.digest,
            "-stdin-media-type",
            DESCRIPTOR,
        ],
        &[(
            "ATCR_VERIFY_ENV_FILE".into(),
            file.to_str().unwrap().to_owned(),
        )],
        descriptor.as_bytes(),
    );
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn containerd_blocks_unsigned_and_untrusted_images() {
    let reg = real_registry();
    let setup = setup(&[reg]);
    // Unsigned.
    let repo = format!("test/{}", unique("unsigned"));
    let pushed = Pusher::new(reg).image(&repo, "v1", &unique("u")).await;
    let name = format!("{reg}/{repo}:v1");
    let (code, out) = containerd(&setup, &name, &pushed.digest, &pushed.digest);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("atcr-verify: NOT verified") && out.contains("no signatures found"),
        "{out}"
    );
    // Signed by bob, whom the policy does not trust.
    let s = signed_image(reg, "bob.test").await;
    let (code, out) = containerd(&setup, &s.name, &s.pushed.digest, &s.pushed.digest);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NOT verified"), "{out}");
}

#[tokio::test]
async fn containerd_fails_closed() {
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    // The registry is down: could not decide, exit 2.
    let down = format!("127.0.0.1:{}", free_port());
    let setup = setup(&[reg, &down]);
    let name = format!("{down}/test/app:v1");
    let (code, out) = containerd(&setup, &name, &s.pushed.digest, &s.pushed.digest);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("could not verify") && out.contains("upstream"),
        "{out}"
    );
    // The descriptor on stdin names another digest than -digest.
    let (code, out) = containerd(&setup, &s.name, &s.pushed.digest, &s.artifact.digest);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("-digest is"), "{out}");
    // A malformed call, a malformed descriptor, a wrong setting.
    let (code, out, _) = run(&["-name", &s.name], &setup.env, b"");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("-digest is missing"), "{out}");
    let (code, out, _) = run(
        &[
            "-name",
            &s.name,
            "-digest",
            &s.pushed.digest,
            "-stdin-media-type",
            DESCRIPTOR,
        ],
        &setup.env,
        b"{",
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not an OCI descriptor"), "{out}");
    let mut env = setup.env.clone();
    env.push(("ATCR_VERIFY_TIMEOUT".into(), "8".into()));
    let (code, out, _) = run(
        &[
            "-name",
            &s.name,
            "-digest",
            &s.pushed.digest,
            "-stdin-media-type",
            DESCRIPTOR,
        ],
        &env,
        format!("{{\"digest\":\"{}\"}}", s.pushed.digest).as_bytes(),
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--timeout"), "{out}");
}

/// Ratify v1's executor: the plugin binary with **no arguments**, the `RATIFY_VERIFIER_*`
/// variables added to the environment, the plugin input on stdin; one `VerifierResult` JSON
/// on stdout.
fn ratify(
    setup: &Setup,
    subject: &str,
    artifact: &str,
    config: serde_json::Value,
) -> (i32, serde_json::Value, String) {
    let stdin = serde_json::json!({
        "config": config,
        "storeConfig": {"version": "1.0.0", "pluginBinDirs": null, "store": {"name": "oras", "useHttp": true}},
        "referenceDesc": {
            "mediaType": OCI_MANIFEST, "digest": artifact, "size": 558,
            "artifactType": "application/vnd.atproto.signature.v1+json",
        },
    });
    let mut env = setup.env.clone();
    env.extend([
        ("RATIFY_VERIFIER_COMMAND".into(), "VERIFY".into()),
        ("RATIFY_VERIFIER_SUBJECT".into(), subject.into()),
        ("RATIFY_VERIFIER_VERSION".into(), "1.0.0".into()),
    ]);
    let (code, out, err) = run(&[], &env, stdin.to_string().as_bytes());
    let json = if code == 0 {
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} (stderr {err})"))
    } else {
        serde_json::Value::Null
    };
    (code, json, err)
}

fn verifier_config() -> serde_json::Value {
    serde_json::json!({
        "name": "atproto", "type": "atcr-verify",
        "artifactTypes": "application/vnd.atproto.signature.v1+json",
    })
}

#[tokio::test]
async fn ratify_succeeds_for_a_counted_signature() {
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let setup = setup(&[reg]);
    let subject = format!("{reg}/{}@{}", s.repo, s.pushed.digest);
    let (code, r, err) = ratify(&setup, &subject, &s.artifact.digest, verifier_config());
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["isSuccess"], true, "{r}");
    assert_eq!(r["name"], "atproto");
    assert_eq!(r["type"], "atcr-verify");
    assert_eq!(r["verifierName"], "atproto");
    assert_eq!(r["verifierType"], "atcr-verify");
    assert_eq!(r["extensions"]["did"], did("alice.test"), "{r}");
    assert_eq!(r["extensions"]["recordUri"], s.uri.as_str());
    assert!(r["extensions"]["signedAt"].is_string(), "{r}");
    assert_eq!(
        r["extensions"]["policy"],
        format!("t{}", reg.replace([':', '.'], ""))
    );
    // The policy named by the Verifier's parameters wins over ATCR_VERIFY_POLICY: one that
    // trusts nobody on this registry.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        format!(
            "version: 1\npolicies:\n  - name: strict\n    scope: \"{reg}/**\"\n    trustedDIDs: [{}]\n",
            did("bob.test")
        ),
    )
    .unwrap();
    let mut config = verifier_config();
    config["policyFile"] = other.to_str().unwrap().into();
    let (code, r, err) = ratify(&setup, &subject, &s.artifact.digest, config);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["isSuccess"], false, "{r}");
    assert_eq!(r["extensions"]["policy"], "strict", "{r}");
    // And also as a subcommand.
    let stdin = serde_json::json!({"config": verifier_config(), "referenceDesc": {"digest": s.artifact.digest}});
    let mut env = setup.env.clone();
    env.extend([
        ("RATIFY_VERIFIER_COMMAND".into(), "VERIFY".into()),
        ("RATIFY_VERIFIER_SUBJECT".into(), subject.clone()),
    ]);
    let (code, out, err) = run(&["ratify-verifier"], &env, stdin.to_string().as_bytes());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"isSuccess\":true"), "{out}");
}

#[tokio::test]
async fn ratify_fails_for_an_untrusted_signer_and_fails_closed() {
    let reg = real_registry();
    let s = signed_image(reg, "bob.test").await;
    let setup = setup(&[reg]);
    let subject = format!("{reg}/{}@{}", s.repo, s.pushed.digest);
    let (code, r, err) = ratify(&setup, &subject, &s.artifact.digest, verifier_config());
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["isSuccess"], false, "{r}");
    assert_eq!(r["extensions"]["did"], did("bob.test"), "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("does not count"),
        "{r}"
    );
    // An artifact that is not a signature of this subject (the image manifest itself).
    let (code, r, _) = ratify(&setup, &subject, &s.pushed.digest, verifier_config());
    assert_eq!(code, 0);
    assert_eq!(r["isSuccess"], false, "{r}");
    // The registry is down: not decided, so not a success.
    let down = format!("127.0.0.1:{}", free_port());
    let setup = self::setup(&[&down]);
    let (code, r, _) = ratify(
        &setup,
        &format!("{down}/test/app@{}", s.pushed.digest),
        &s.artifact.digest,
        verifier_config(),
    );
    assert_eq!(code, 0);
    assert_eq!(r["isSuccess"], false, "{r}");
    assert!(
        r["extensions"]["error"]
            .as_str()
            .unwrap()
            .starts_with("upstream"),
        "{r}"
    );
}

#[test]
fn ratify_refuses_malformed_input() {
    let setup = setup(&["localhost:5000"]);
    let base = |command: &str| {
        let mut env = setup.env.clone();
        env.extend([
            ("RATIFY_VERIFIER_COMMAND".into(), command.into()),
            (
                "RATIFY_VERIFIER_SUBJECT".into(),
                "localhost:5000/app:v1".into(),
            ),
            ("RATIFY_VERIFIER_VERSION".into(), "1.0.0".into()),
        ]);
        env
    };
    let (code, out, err) = run(&[], &base("VERIFY"), b"{\"config\": ");
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("not Ratify's verifier input"), "{err}");
    let (code, _, err) = run(&[], &base("VERSION"), b"{}");
    assert_ne!(code, 0);
    assert!(err.contains("only VERIFY"), "{err}");
    // A wrong setting or an unreadable policy is an error too, not a verdict.
    let digest = format!("sha256:{}", "1".repeat(64));
    let input = serde_json::json!({"config": {"policyFile": "/nonexistent/p.yaml"}, "referenceDesc": {"digest": digest}});
    let (code, out, err) = run(&[], &base("VERIFY"), input.to_string().as_bytes());
    assert_ne!(code, 0);
    assert!(
        out.is_empty() && err.contains("/nonexistent/p.yaml"),
        "{out}{err}"
    );
    let mut env = base("VERIFY");
    env.push(("ATCR_VERIFY_TAG_TTL".into(), "3".into()));
    let input = serde_json::json!({"config": {}, "referenceDesc": {"digest": digest}});
    let (code, _, err) = run(&[], &env, input.to_string().as_bytes());
    assert_ne!(code, 0);
    assert!(err.contains("--tag-ttl"), "{err}");
}

/// A registry that does not answer cannot hold the pull past the budget
/// (`ATCR_VERIFY_TIMEOUT`, well inside containerd's 10 s): the verifier exits 2, in time.
#[tokio::test]
async fn containerd_answers_within_its_budget() {
    let fake = crate::common::fake::Fake::registry(10, None);
    let s = signed_image(&fake.addr, "alice.test").await;
    fake.set_latency(std::time::Duration::from_secs(20));
    let mut setup = setup(&[&fake.addr]);
    setup.env.push(("ATCR_VERIFY_TIMEOUT".into(), "1s".into()));
    setup
        .env
        .push(("ATCR_VERIFY_REQUEST_TIMEOUT".into(), "10s".into()));
    let started = std::time::Instant::now();
    let (code, out) = containerd(&setup, &s.name, &s.pushed.digest, &s.pushed.digest);
    let took = started.elapsed();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("deadline_exceeded"), "{out}");
    assert!(took < std::time::Duration::from_secs(4), "{took:?}");
}
