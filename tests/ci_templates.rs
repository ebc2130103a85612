//! The CI integrations in the repository — the GitHub Action (`action.yml`) and the GitLab CI
//! template (`ci/gitlab/atcr-verify.gitlab-ci.yml`) — run as their runners run them: the YAML
//! is parsed, each step's or job's shell commands are run with bash (`bash --noprofile
//! --norc -eo pipefail` per GitHub step, one `set -eo pipefail` shell for a GitLab job), the
//! inputs and variables given as the runners give them (expressions substituted in `env:`
//! and `run:`, `GITHUB_ENV` carried between steps, `GITHUB_STEP_SUMMARY` a file), with the
//! already-built binary, against the local world: a signed image passes, an unsigned one
//! fails the step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::registry::{Pusher, real_registry};
use crate::common::world::World;
use crate::common::{signed_image, unique};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml(path: &str) -> yaml_serde::Value {
    let text = std::fs::read_to_string(repo_file(path)).unwrap();
    yaml_serde::from_str(&text).unwrap()
}

fn text(v: &yaml_serde::Value) -> String {
    match v {
        yaml_serde::Value::String(s) => s.clone(),
        yaml_serde::Value::Bool(b) => b.to_string(),
        yaml_serde::Value::Number(n) => n.to_string(),
        yaml_serde::Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn system_path() -> String {
    std::env::var("PATH").unwrap_or_default()
}

/// The directory holding the built binary, first on PATH (as an installed binary would be).
fn path_with_binary() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_atcr-verify"));
    format!("{}:{}", bin.parent().unwrap().display(), system_path())
}

/// A world, a policy trusting alice for the real registry, and the flags that reach it.
struct Setup {
    dir: tempfile::TempDir,
    policy: PathBuf,
    flags: String,
}

fn setup() -> Setup {
    let world = World::get();
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\npolicies:\n  - name: ci\n    scope: \"{reg}/**\"\n    trustedDIDs: [{}]\n",
            world.account("alice.test").did
        ),
    )
    .unwrap();
    let flags = format!(
        "--plc-url {} --allow-private-addresses --insecure-registry {reg}",
        world.plc
    );
    Setup { dir, policy, flags }
}

/// What a GitHub Actions run of the composite action left.
struct ActionRun {
    success: bool,
    summary: String,
    outputs: String,
    log: String,
}

/// Substitutes the expressions the action uses; any other expression fails the test.
fn expand(s: &str, inputs: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed expression") + start;
        let expr = rest[start + 3..end].trim();
        let value = if let Some(name) = expr.strip_prefix("inputs.") {
            inputs
                .get(name)
                .unwrap_or_else(|| panic!("no input {name}"))
                .clone()
        } else if expr == "github.action_path" {
            env!("CARGO_MANIFEST_DIR").to_owned()
        } else {
            panic!("expression the test does not model: {expr}");
        };
        out.push_str(&value);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Runs `action.yml`'s steps as the runner does, with `with` as the step's inputs.
fn run_action(with: &[(&str, &str)], work: &Path, path: &str) -> ActionRun {
    let action = yaml("action.yml");
    assert_eq!(text(&action["runs"]["using"]), "composite");
    let mut inputs = BTreeMap::new();
    for (name, spec) in action["inputs"].as_mapping().unwrap() {
        let name = text(name);
        if let Some(default) = spec.get("default") {
            inputs.insert(name, text(default));
        }
    }
    for (name, value) in with {
        assert!(
            action["inputs"].get(*name).is_some(),
            "the action has no input {name}"
        );
        inputs.insert((*name).to_owned(), (*value).to_owned());
    }
    for (name, spec) in action["inputs"].as_mapping().unwrap() {
        if spec.get("required").and_then(|r| r.as_bool()) == Some(true) {
            assert!(inputs.contains_key(&text(name)), "required input {name:?}");
        }
    }
    let files = |name: &str| {
        let p = work.join(name);
        std::fs::write(&p, "").unwrap();
        p
    };
    let (github_env, summary, output) = (
        files("github_env"),
        files("step_summary"),
        files("github_output"),
    );
    let runner_temp = work.join("runner_temp");
    std::fs::create_dir_all(&runner_temp).unwrap();
    let mut carried: BTreeMap<String, String> = BTreeMap::new();
    let mut log = String::new();
    let mut success = true;
    for step in action["runs"]["steps"].as_sequence().unwrap() {
        assert_eq!(text(&step["shell"]), "bash", "{step:?}");
        let script = work.join("step.sh");
        std::fs::write(&script, expand(&text(&step["run"]), &inputs)).unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&script)
            .current_dir(work)
            .env_clear()
            .env("PATH", path)
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("GITHUB_ENV", &github_env)
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env("GITHUB_OUTPUT", &output)
            .env("RUNNER_TEMP", &runner_temp)
            .envs(&carried);
        if let Some(env) = step.get("env").and_then(|e| e.as_mapping()) {
            for (k, v) in env {
                cmd.env(text(k), expand(&text(v), &inputs));
            }
        }
        let out = cmd.output().unwrap();
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        // The runner reads GITHUB_ENV after each step and sets it for the next ones.
        for line in std::fs::read_to_string(&github_env).unwrap().lines() {
            if let Some((k, v)) = line.split_once('=') {
                carried.insert(k.to_owned(), v.to_owned());
            }
        }
        if !out.status.success() {
            success = false;
            break; // later steps do not run after a failed one
        }
    }
    ActionRun {
        success,
        summary: std::fs::read_to_string(&summary).unwrap(),
        outputs: std::fs::read_to_string(&output).unwrap(),
        log,
    }
}

#[tokio::test]
async fn the_github_action_passes_a_signed_image_and_fails_an_unsigned_one() {
    let s = setup();
    let reg = real_registry();
    let signed = signed_image(reg, "alice.test").await;
    let policy = s.policy.to_str().unwrap();
    let binary = env!("CARGO_BIN_EXE_atcr-verify");

    let work = s.dir.path().join("signed");
    std::fs::create_dir_all(&work).unwrap();
    let run = run_action(
        &[
            ("image", &signed.name),
            ("policy", policy),
            ("args", &s.flags),
            ("binary", binary),
        ],
        &work,
        &system_path(),
    );
    assert!(run.success, "{}", run.log);
    let line = format!("VERIFIED {}@{}", signed.name, signed.pushed.digest);
    assert!(
        run.summary.contains("atcr-verify: ✅ verified"),
        "{}",
        run.summary
    );
    assert!(run.summary.contains(&line), "{}", run.summary);
    assert!(run.summary.contains("(alice.test)"), "{}", run.summary);
    assert!(run.outputs.contains("verified=true\n"), "{}", run.outputs);
    assert!(run.log.lines().any(|l| l.starts_with(&line)), "{}", run.log);

    let repo = format!("test/{}", unique("ci-unsigned"));
    let unsigned = Pusher::new(reg).image(&repo, "v1", &unique("ci")).await;
    let work = s.dir.path().join("unsigned");
    std::fs::create_dir_all(&work).unwrap();
    let run = run_action(
        &[
            ("image", &format!("{reg}/{repo}:v1")),
            ("policy", policy),
            ("args", &s.flags),
            ("binary", binary),
        ],
        &work,
        &system_path(),
    );
    assert!(!run.success, "{}", run.log);
    let line = format!("NOT VERIFIED {reg}/{repo}:v1@{}", unsigned.digest);
    assert!(run.summary.contains("❌ not verified"), "{}", run.summary);
    assert!(run.summary.contains(&line), "{}", run.summary);
    assert!(run.outputs.contains("verified=false\n"), "{}", run.outputs);

    // No binary input: the atcr-verify on PATH is found (a missing image: the step fails,
    // the summary says it could not verify).
    let work = s.dir.path().join("missing");
    std::fs::create_dir_all(&work).unwrap();
    let run = run_action(
        &[
            ("image", &format!("{reg}/{repo}:missing")),
            ("policy", policy),
            ("args", &s.flags),
        ],
        &work,
        &path_with_binary(),
    );
    assert!(!run.success, "{}", run.log);
    assert!(
        run.summary.contains("could not verify (exit 2)") && run.summary.contains("ERROR "),
        "{}",
        run.summary
    );
}

/// What a GitLab CI job extending the template left.
struct JobRun {
    success: bool,
    log: String,
    artifact: String,
}

/// Runs the template's `.atcr-verify` job as a job that extends it with `variables` (its own
/// variables win over the template's), the way the runner runs a script: one shell, `set -eo
/// pipefail`, each `script:` entry in turn.
fn run_gitlab(variables: &[(&str, &str)], work: &Path, path: &str) -> JobRun {
    let template = yaml("ci/gitlab/atcr-verify.gitlab-ci.yml");
    let job = &template[".atcr-verify"];
    let mut vars = BTreeMap::new();
    for (k, v) in job["variables"].as_mapping().unwrap() {
        vars.insert(text(k), text(v));
    }
    for (k, v) in variables {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut script = String::from("set -eo pipefail\n");
    for key in ["before_script", "script"] {
        for entry in job
            .get(key)
            .and_then(|s| s.as_sequence())
            .into_iter()
            .flatten()
        {
            script.push_str(&text(entry));
            script.push('\n');
        }
    }
    let file = work.join("job.sh");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("bash")
        .args(["--noprofile", "--norc"])
        .arg(&file)
        .current_dir(work)
        .env_clear()
        .env("PATH", path)
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("CI", "true")
        .env("CI_PROJECT_DIR", work)
        .envs(&vars)
        .output()
        .unwrap();
    // `artifacts: paths` names what the job keeps.
    let kept = text(&job["artifacts"]["paths"][0]);
    JobRun {
        success: out.status.success(),
        log: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        artifact: std::fs::read_to_string(work.join(kept)).unwrap_or_default(),
    }
}

#[tokio::test]
async fn the_gitlab_template_passes_a_signed_image_and_fails_an_unsigned_one() {
    let s = setup();
    let reg = real_registry();
    let signed = signed_image(reg, "alice.test").await;
    let policy = s.policy.to_str().unwrap();
    let path = path_with_binary();
    let job = |name: &str, image: &str| {
        let work = s.dir.path().join(name);
        std::fs::create_dir_all(&work).unwrap();
        run_gitlab(
            &[
                ("ATCR_VERIFY_REF", image),
                ("ATCR_VERIFY_POLICY", policy),
                ("ATCR_VERIFY_ARGS", &s.flags),
            ],
            &work,
            &path,
        )
    };
    let run = job("signed", &signed.name);
    assert!(run.success, "{}", run.log);
    let line = format!("VERIFIED {}@{}", signed.name, signed.pushed.digest);
    assert!(run.log.lines().any(|l| l.starts_with(&line)), "{}", run.log);
    assert!(
        run.artifact.lines().last().unwrap().starts_with(&line),
        "{}",
        run.artifact
    );

    let repo = format!("test/{}", unique("ci-unsigned"));
    let unsigned = Pusher::new(reg).image(&repo, "v1", &unique("ci")).await;
    let run = job("unsigned", &format!("{reg}/{repo}:v1"));
    assert!(!run.success, "{}", run.log);
    let line = format!("NOT VERIFIED {reg}/{repo}:v1@{}", unsigned.digest);
    assert!(run.log.lines().any(|l| l.starts_with(&line)), "{}", run.log);

    // Without ATCR_VERIFY_REF, or without a binary to run, the job fails saying what to set.
    let run = job("no-ref", "");
    assert!(
        !run.success && run.log.contains("set ATCR_VERIFY_REF"),
        "{}",
        run.log
    );
    let work = s.dir.path().join("no-binary");
    std::fs::create_dir_all(&work).unwrap();
    let run = run_gitlab(&[("ATCR_VERIFY_REF", &signed.name)], &work, "/usr/bin:/bin");
    assert!(
        !run.success && run.log.contains("ATCR_VERIFY_INSTALL_FROM"),
        "{}",
        run.log
    );
}
