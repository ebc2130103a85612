//! The CLI faces outside the cluster, run as the built binary against the local world (the
//! CNCF registry without a Referrers API, a Referrers-API fake, the PDS and PLC): the
//! `atcr-verify REF` shorthand and its CI line, `discover` and `scan`.

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::fake::Fake;
use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::world::World;
use crate::common::{cli, signed_image, unique};

/// The images of one scenario: signed by alice (trusted), signed by bob (not trusted),
/// unsigned, and one on a registry that is down.
struct Images {
    signed: crate::common::Signed,
    untrusted: crate::common::Signed,
    unsigned: String,
    unsigned_digest: String,
    down: String,
}

async fn images(reg: &str) -> Images {
    let signed = signed_image(reg, "alice.test").await;
    let untrusted = signed_image(reg, "bob.test").await;
    let repo = format!("test/{}", unique("faces-unsigned"));
    let pushed = Pusher::new(reg).image(&repo, "v1", &unique("u")).await;
    Images {
        signed,
        untrusted,
        unsigned: format!("{reg}/{repo}:v1"),
        unsigned_digest: pushed.digest,
        down: format!("127.0.0.1:{}/test/down:v1", free_port()),
    }
}

/// A policy trusting alice for every image, and the flags that reach the world (the down
/// registry named insecure, so that only its being down fails).
fn flags(dir: &std::path::Path, regs: &[&str], down: &str) -> Vec<String> {
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\npolicies:\n  - name: everything\n    scope: \"**\"\n    trustedDIDs: [{}]\n",
            World::get().account("alice.test").did
        ),
    )
    .unwrap();
    let mut flags = vec![
        "--policy".to_owned(),
        policy.to_str().unwrap().to_owned(),
        "--plc-url".into(),
        World::get().plc.clone(),
        "--allow-private-addresses".into(),
        "--connect-timeout".into(),
        "500ms".into(),
    ];
    let down_registry = down.split('/').next().unwrap();
    for r in regs.iter().copied().chain([down_registry]) {
        flags.push("--insecure-registry".into());
        flags.push(r.to_owned());
    }
    flags
}

fn run(args: &[&str], flags: &[String]) -> (i32, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(flags.iter().map(String::as_str));
    cli(&all)
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

#[tokio::test]
async fn the_shorthand_is_image_and_ends_with_one_ci_line() {
    let reg = real_registry();
    let i = images(reg).await;
    let dir = tempfile::tempdir().unwrap();
    let f = flags(dir.path(), &[reg], &i.down);
    let alice = &World::get().account("alice.test").did;

    // Verified: the same output as `image`, whose last line is the CI line.
    let (code, short, err) = run(&[&i.signed.name], &f);
    assert_eq!(code, 0, "{short}{err}");
    let (code, long, _) = run(&["image", &i.signed.name], &f);
    assert_eq!(code, 0);
    let strip_time = |s: &str| {
        s.lines()
            .filter(|l| !l.contains(" at "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip_time(&short), strip_time(&long));
    assert!(short.starts_with("verified: "), "{short}");
    let line = last_line(&short);
    let expected = format!(
        "VERIFIED {}@{} signed by {alice} (alice.test) at ",
        i.signed.name, i.signed.pushed.digest
    );
    assert!(line.starts_with(&expected), "{line}");
    assert!(line.ends_with(" under policy everything"), "{line}");
    // Every image flag passes through: --json gives the report, with no CI line.
    let (code, out, _) = run(&[&i.signed.name, "--json"], &f);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["verified"],
        true
    );

    // Not verified: unsigned and untrusted, exit 1.
    let (code, out, _) = run(&[&i.unsigned], &f);
    assert_eq!(code, 1, "{out}");
    let line = last_line(&out);
    assert!(
        line.starts_with(&format!(
            "NOT VERIFIED {}@{}: ",
            i.unsigned, i.unsigned_digest
        )) && line.ends_with("(policy everything)"),
        "{line}"
    );
    let (code, out, _) = run(&[&i.untrusted.name], &f);
    assert_eq!(code, 1, "{out}");
    assert!(last_line(&out).starts_with("NOT VERIFIED "), "{out}");

    // Could not evaluate: exit 2, the ERROR line on stdout, the error on stderr.
    let (code, out, err) = run(&[&i.down], &f);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        last_line(&out).starts_with(&format!("ERROR {}: upstream_unavailable: ", i.down)),
        "{out}"
    );
    assert!(err.contains("upstream_unavailable"), "{err}");
    let (code, out, _) = run(&["Bad/Ref:x"], &f);
    assert_eq!(code, 2);
    assert!(
        out.starts_with("ERROR Bad/Ref:x: invalid_reference: "),
        "{out}"
    );
    // A bare word is not taken as an image: a mistyped subcommand stays a usage error.
    let (code, out, err) = cli(&["imgae"]);
    assert_eq!(code, 2);
    assert!(out.is_empty() && err.contains("imgae"), "{err}");
}

#[tokio::test]
async fn discover_lists_the_artifacts_and_their_unverified_claims() {
    let world = World::get();
    let reg = real_registry();
    // The Referrers API (the fake) and the sha256-<hex> tag fallback (the real registry).
    let api = Fake::registry(2, None);
    for registry in [reg, api.addr.as_str()] {
        let i = images(registry).await;
        let dir = tempfile::tempdir().unwrap();
        // discover takes no policy: the engine flags only.
        let f = flags(dir.path(), &[registry], &i.down).split_off(2);
        // A second artifact on the signed image: one that is not a valid signature.
        let pusher = Pusher::new(registry);
        let bad = pusher
            .attach(
                &i.signed.repo,
                &i.signed.pushed,
                &json!({"atproto": {"did": "nope", "recordUri": "x"}}),
            )
            .await;
        // An untrusted signer's artifact is listed as well: nothing is decided here.
        let bob = &world.account("bob.test").did;
        let alice = &world.account("alice.test").did;
        let (code, out, err) = run(&["discover", &i.signed.name, "--json"], &f);
        assert_eq!(code, 0, "{out}{err}");
        let json: Value = serde_json::from_str(&out).unwrap();
        let mut artifacts = json["artifacts"].as_array().unwrap().clone();
        artifacts.sort_by_key(|a| a["did"].is_null());
        assert_eq!(
            json,
            json!({
                "image": i.signed.name,
                "digest": i.signed.pushed.digest,
                "artifacts": json["artifacts"],
            }),
            "{registry}"
        );
        assert_eq!(artifacts.len(), 2, "{json}");
        assert_eq!(
            artifacts[0],
            json!({"digest": i.signed.artifact.digest, "did": alice,
                   "recordUri": i.signed.uri, "claimedPds": world.pds}),
            "{registry}"
        );
        assert_eq!(artifacts[1]["digest"], bad.digest.as_str());
        assert_eq!(artifacts[1]["error"]["code"], "artifact_invalid", "{json}");
        let (code, out, _) = run(&["discover", &i.untrusted.name, "--json"], &f);
        assert_eq!(code, 0);
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["artifacts"][0]["did"], bob.as_str(), "{json}");
        // Human output: the claims, labelled unverified.
        let (code, out, _) = run(&["discover", &i.signed.name], &f);
        assert_eq!(code, 0);
        assert!(out.contains("UNVERIFIED claims"), "{out}");
        assert!(out.contains(&format!("claimed signer: {alice}")), "{out}");
        assert!(
            out.contains(&format!("claimed record: {}", i.signed.uri)),
            "{out}"
        );
        assert!(out.contains("unreadable: artifact_invalid"), "{out}");
        // No artifact: listed, exit 0.
        let (code, out, _) = run(&["discover", &i.unsigned, "--json"], &f);
        assert_eq!(code, 0, "{out}");
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["digest"], i.unsigned_digest.as_str());
        assert_eq!(json["artifacts"], json!([]));
        let (code, out, _) = run(&["discover", &i.unsigned], &f);
        assert_eq!(code, 0);
        assert!(out.contains("0 signature artifacts"), "{out}");
        // Cannot list: exit 2 (registry down, missing image, bad reference).
        let (code, out, _) = run(&["discover", &i.down, "--json"], &f);
        assert_eq!(code, 2);
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["error"]["code"], "upstream_unavailable", "{json}");
        assert_eq!(json["error"]["transient"], true);
        let missing = format!("{registry}/test/none:v1");
        let (code, _, err) = run(&["discover", &missing], &f);
        assert_eq!(code, 2);
        assert!(err.contains("not_found"), "{err}");
        let (code, _, err) = run(&["discover", "Bad/Ref"], &f);
        assert_eq!(code, 2);
        assert!(err.contains("invalid_reference"), "{err}");
    }
}

/// Runs `scan` with `stdin` as its input.
fn scan_stdin(args: &[&str], flags: &[String], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
        .arg("scan")
        .args(args)
        .args(flags)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pod(images: &[&str]) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .map(|i| json!({"name": "c", "image": i}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": unique("p"), "namespace": "default"},
           "spec": {"containers": containers}})
}

#[tokio::test]
async fn scan_verifies_each_distinct_image_once_and_counts_pods() {
    let reg = real_registry();
    let i = images(reg).await;
    let dir = tempfile::tempdir().unwrap();
    let f = flags(dir.path(), &[reg], &i.down);
    let alice = &World::get().account("alice.test").did;

    // A list of references: comments and blanks skipped, a bad line is that line's error.
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!(
            "# images\n{}\n\n{}\n{}\n  {}  \n{}\nBad Ref\n{}\n",
            i.signed.name, i.unsigned, i.untrusted.name, i.down, i.signed.name, i.signed.name
        ),
    )
    .unwrap();
    let list = list.to_str().unwrap();
    let (code, out, err) = run(&["scan", list, "--json"], &f);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.is_empty(),
        "no progress bar when stderr is not a terminal: {err}"
    );
    let json: Value = serde_json::from_str(&out).unwrap();
    let rows = json["images"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["image"] == name)
            .unwrap_or_else(|| panic!("{name}: {json}"))
    };
    assert_eq!(rows.len(), 5, "{json}");
    assert_eq!(
        row(&i.signed.name),
        &json!({"image": i.signed.name, "verified": true, "deny": false, "did": alice,
                "policy": "everything", "pods": 0, "error": null})
    );
    for name in [&i.unsigned, &i.untrusted.name] {
        let r = row(name);
        assert_eq!(
            (&r["verified"], &r["deny"], &r["error"]),
            (&json!(false), &json!(true), &json!(null)),
            "{r}"
        );
        assert_eq!(r["policy"], "everything");
    }
    assert_eq!(row(&i.down)["error"]["code"], "upstream_unavailable");
    // The policy that applies is named even when the image could not be verified.
    assert_eq!(row(&i.down)["policy"], "everything");
    assert_eq!(row("Bad Ref")["policy"], json!(null));
    assert_eq!(row(&i.down)["error"]["transient"], true);
    assert_eq!(row("Bad Ref")["error"]["code"], "invalid_reference");
    assert_eq!(
        json["summary"],
        json!({"images": 5, "verified": 1, "denied": 2, "undecided": 2, "pods": 0, "podsAdmitted": 0})
    );
    // The keys are exactly the documented ones.
    let keys: Vec<&str> = rows[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "deny", "did", "error", "image", "pods", "policy", "verified"
        ]
    );

    // --fail-on: denied fails on a denied image, undecided on a denied or undecided one.
    assert_eq!(run(&["scan", list, "--fail-on", "denied"], &f).0, 1);
    assert_eq!(run(&["scan", list, "--fail-on", "undecided"], &f).0, 1);
    let only = dir.path().join("signed-and-down.txt");
    std::fs::write(&only, format!("{}\n{}\n", i.signed.name, i.down)).unwrap();
    let only = only.to_str().unwrap();
    assert_eq!(run(&["scan", only, "--fail-on", "denied"], &f).0, 0);
    assert_eq!(run(&["scan", only, "--fail-on", "undecided"], &f).0, 1);
    assert_eq!(run(&["scan", only], &f).0, 0);

    // A pod list on stdin: init and ephemeral containers count, pods per image, admitted
    // pods are those with no denied or undecided image.
    let mut with_init = pod(&[&i.signed.name]);
    with_init["spec"]["initContainers"] = json!([{"name": "i", "image": i.unsigned}]);
    let mut with_debug = pod(&[&i.signed.name]);
    with_debug["spec"]["ephemeralContainers"] = json!([{"name": "d", "image": i.signed.name}]);
    let pods = json!({"apiVersion": "v1", "kind": "List", "items": [
        pod(&[&i.signed.name]),
        with_debug,
        with_init,
        pod(&[&i.signed.name, &i.down]),
    ]});
    let (code, out, err) = scan_stdin(&["-", "--json"], &f, pods.to_string().as_bytes());
    assert_eq!(code, 0, "{out}{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        json["summary"],
        json!({"images": 3, "verified": 1, "denied": 1, "undecided": 1, "pods": 4, "podsAdmitted": 2})
    );
    let pods_of = |name: &str| {
        json["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["image"] == name)
            .unwrap()["pods"]
            .clone()
    };
    assert_eq!(pods_of(&i.signed.name), 4);
    assert_eq!(pods_of(&i.unsigned), 1);
    assert_eq!(pods_of(&i.down), 1);

    // The table: one row per image and the summary.
    let (code, out, _) = scan_stdin(&["-"], &f, pods.to_string().as_bytes());
    assert_eq!(code, 0);
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("IMAGE"), "{out}");
    let signed_row = out.lines().find(|l| l.starts_with(&i.signed.name)).unwrap();
    for cell in ["verified", alice.as_str(), "(alice.test)", "everything"] {
        assert!(signed_row.contains(cell), "{signed_row}");
    }
    assert!(signed_row.ends_with(" 4"), "{signed_row}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&i.unsigned) && l.contains("denied")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&i.down) && l.contains("undecided: upstream_unavailable")),
        "{out}"
    );
    assert_eq!(
        last_line(&out),
        "3 images: 1 verified, 1 denied, 1 undecided; 4 pods, 2 admitted"
    );
    let (_, out, _) = run(&["scan", only], &f);
    assert_eq!(
        last_line(&out),
        "2 images: 1 verified, 0 denied, 1 undecided"
    );

    // Input that cannot be read: exit 2, whatever --fail-on says.
    let missing = dir.path().join("missing.json");
    let (code, _, err) = run(&["scan", missing.to_str().unwrap()], &f);
    assert_eq!(code, 2);
    assert!(err.contains("missing.json"), "{err}");
    let deployments = json!({"kind": "List", "items": [{"kind": "Deployment"}]});
    let (code, out, _) = scan_stdin(&["-", "--json"], &f, deployments.to_string().as_bytes());
    assert_eq!(code, 2);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Deployment"),
        "{json}"
    );
    let (code, _, _) = scan_stdin(&["-"], &f, b"{ not json");
    assert_eq!(code, 2);
    // An empty list scans nothing, successfully.
    let (code, out, _) = scan_stdin(
        &["-", "--json", "--fail-on", "undecided"],
        &f,
        b"# nothing\n",
    );
    assert_eq!(code, 0, "{out}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["images"], json!([]));
}

#[tokio::test]
async fn scan_asks_for_each_distinct_image_once_at_most_concurrency_at_a_time() {
    let fake = Fake::registry(10, None);
    let pusher = Pusher::new(&fake.addr);
    let mut names = Vec::new();
    for _ in 0..6 {
        let repo = format!("test/{}", unique("bound"));
        pusher.image(&repo, "v1", &unique("b")).await;
        names.push(format!("{}/{repo}:v1", fake.addr));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = flags(dir.path(), &[&fake.addr], "127.0.0.1:1/x");
    // Each image listed twice.
    let input = format!("{}\n{}\n", names.join("\n"), names.join("\n"));
    for (bound, expected) in [("1", 1), ("3", 3)] {
        fake.set_latency(std::time::Duration::from_millis(60));
        fake.reset_counts();
        let (code, out, err) = scan_stdin(
            &["-", "--json", "--concurrency", bound],
            &f,
            input.as_bytes(),
        );
        fake.set_latency(std::time::Duration::ZERO);
        assert_eq!(code, 0, "{out}{err}");
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["summary"]["images"], 6, "{json}");
        assert_eq!(json["summary"]["denied"], 6, "{json}");
        // One manifest and one referrers request per distinct image.
        let counts = fake.counts();
        assert_eq!(counts.get("manifests"), Some(&6), "{counts:?}");
        assert_eq!(counts.get("referrers"), Some(&6), "{counts:?}");
        assert_eq!(fake.max_in_flight(), expected, "--concurrency {bound}");
    }
    let (code, _, err) = run(&["scan", "-", "--concurrency", "0"], &f);
    assert_eq!(code, 2, "{err}");
}
