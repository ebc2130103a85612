//! The policy authors' library run the way Gatekeeper runs it: the ConstraintTemplates in
//! `rego/` are loaded from their YAML into the `regorus` Rego engine (non-strict builtin
//! errors, as Gatekeeper's OPA), with `external_data` registered as an extension that does
//! what Gatekeeper's builtin does (frameworks `constraint/pkg/client/drivers/rego/builtin.go`,
//! `externaldata/{request,response}.go`): it POSTs a ProviderRequest over HTTPS with a
//! Gatekeeper-like client certificate (mTLS, TLS 1.3) to the **running** `atcr-verify serve`,
//! backed by the real local registry, PDS and PLC, and turns the ProviderResponse into the
//! Rego shape `{"responses": [[key, value]...], "errors": [[key, error]...], "status_code",
//! "system_error"}` (null `responses`/`errors` on a failed call; an optional response cache
//! whose hits give `status_code` 0).
//!
//! Inputs are AdmissionReview-shaped (`input.review`, `input.parameters`). Workloads are not
//! judged by Rego of their own: Gatekeeper's ExpansionTemplates turn them into Pods. That
//! expansion is **simulated here** from the ExpansionTemplate manifests themselves (the same
//! steps as gatekeeper `pkg/expansion/system.go`: take `templateSource`, make it a Pod in the
//! workload's namespace named `<workload>-pod`), and so is the Assign mutators' use of
//! `/mutate` (their locations read from `manifests/gatekeeper/`); Gatekeeper itself does not
//! run in these tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::certs::{Pki, pki};
use crate::common::registry::{Pusher, free_port, payload, real_registry};
use crate::common::server::Server;
use crate::common::world::World;
use atcr_verify::syntax::ImageRef;
use serde_json::{Value, json};

/// The workload kinds the ExpansionTemplates cover.
const WORKLOAD_KINDS: [&str; 7] = [
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "ReplicationController",
];

const API_VERSION: &str = "externaldata.gatekeeper.sh/v1beta1";

// ---------------------------------------------------------------------------------------
// The library's files.

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `*.yaml` in `dir` (relative to the crate), parsed, sorted by file name. Each file
/// holds exactly one object.
fn objects(dir: &str) -> Vec<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {dir}");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let value: Value =
                yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, value)
        })
        .collect()
}

fn of_kind(dir: &str, kind: &str) -> Vec<Value> {
    objects(dir)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == kind)
        .collect()
}

fn named<'a>(objects: &'a [Value], name: &str) -> &'a Value {
    objects
        .iter()
        .find(|v| v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no object named {name}"))
}

/// A ConstraintTemplate of `rego/`.
#[derive(Clone, Debug)]
struct Template {
    kind: String,
    package: String,
    rego: String,
}

fn templates() -> BTreeMap<String, Template> {
    of_kind("rego", "ConstraintTemplate")
        .into_iter()
        .map(|t| {
            let kind = t["spec"]["crd"]["spec"]["names"]["kind"]
                .as_str()
                .unwrap()
                .to_owned();
            let rego = t["spec"]["targets"][0]["code"][0]["source"]["rego"]
                .as_str()
                .unwrap()
                .to_owned();
            let package = rego
                .lines()
                .find_map(|l| l.strip_prefix("package "))
                .unwrap()
                .trim()
                .to_owned();
            (
                kind.clone(),
                Template {
                    kind,
                    package,
                    rego,
                },
            )
        })
        .collect()
}

fn template(kind: &str) -> Template {
    templates()
        .remove(kind)
        .unwrap_or_else(|| panic!("no ConstraintTemplate of kind {kind} in rego/"))
}

/// `spec.parameters` of the example Constraint in `manifests/gatekeeper/FILE`.
fn example_parameters(file: &str) -> Value {
    let path = root().join("manifests/gatekeeper").join(file);
    let c: Value = yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    c["spec"]["parameters"].clone()
}

// ---------------------------------------------------------------------------------------
// Gatekeeper's `external_data`, as an extension of the Rego engine.

/// One `external_data` call as Gatekeeper made it.
#[derive(Clone, Debug)]
struct Call {
    /// The keys sent to the provider (cache misses); empty when all came from the cache.
    live: Vec<String>,
    status_code: i64,
}

/// Gatekeeper's provider response cache, per (provider, key): (value, error).
type ResponseCache = Arc<Mutex<HashMap<(String, String), (Value, String)>>>;

#[derive(Clone)]
struct Gatekeeper {
    /// Provider name → URL Gatekeeper posts to (the Provider CRs' paths, on the test server).
    providers: Arc<HashMap<String, String>>,
    ca_pem: Arc<String>,
    /// Gatekeeper's client certificate and key (PEM).
    identity_pem: Arc<String>,
    /// Gatekeeper's provider response cache (`--external-data-provider-response-cache-ttl`),
    /// per (provider, key): (value, error).
    cache: Option<ResponseCache>,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Items lost between provider and Rego (a provider or proxy bug), by key.
    lose: Arc<Mutex<HashSet<String>>>,
    /// A systemError added to every live answer (a provider that reports one beside items).
    extra_system_error: Arc<Mutex<Option<String>>>,
}

/// The Providers of `manifests/gatekeeper/`, their URLs moved onto `base`
/// (`https://127.0.0.1:PORT`), paths kept.
fn providers_at(base: &str) -> HashMap<String, String> {
    of_kind("manifests/gatekeeper", "Provider")
        .into_iter()
        .map(|p| {
            let name = p["metadata"]["name"].as_str().unwrap().to_owned();
            let url = url::Url::parse(p["spec"]["url"].as_str().unwrap()).unwrap();
            (name, format!("{base}{}", url.path()))
        })
        .collect()
}

impl Gatekeeper {
    fn new(base: &str, pki: &Pki) -> Gatekeeper {
        Gatekeeper {
            providers: Arc::new(providers_at(base)),
            ca_pem: Arc::new(pki.server_ca.pem()),
            identity_pem: Arc::new(format!(
                "{}{}",
                pki.gatekeeper.cert_pem, pki.gatekeeper.key_pem
            )),
            cache: None,
            calls: Arc::default(),
            lose: Arc::default(),
            extra_system_error: Arc::default(),
        }
    }

    fn with_cache(mut self) -> Gatekeeper {
        self.cache = Some(Arc::default());
        self
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// frameworks `HandleError`: only `status_code` and `system_error`.
    fn failed(&self, live: Vec<String>, status_code: i64, error: String) -> Value {
        self.calls.lock().unwrap().push(Call { live, status_code });
        json!({"responses": null, "errors": null, "status_code": status_code, "system_error": error})
    }

    /// What Gatekeeper's `external_data` builtin returns for `request`.
    fn external_data(&self, request: &Value) -> Value {
        let provider = request["provider"].as_str().unwrap_or_default().to_owned();
        let keys: Vec<String> = request["keys"]
            .as_array()
            .map(|k| k.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        let mut items: Vec<(String, Value, String)> = Vec::new();
        let mut live = Vec::new();
        for key in keys {
            let hit = self.cache.as_ref().and_then(|c| {
                c.lock()
                    .unwrap()
                    .get(&(provider.clone(), key.clone()))
                    .cloned()
            });
            match hit {
                Some((value, error)) => items.push((key, value, error)),
                None => live.push(key),
            }
        }
        let mut status_code = 0;
        let mut system_error = String::new();
        if !live.is_empty() {
            let Some(url) = self.providers.get(&provider) else {
                return self.failed(live, 400, format!("provider {provider:?} not found"));
            };
            let (status, body) = match self.post(url, &live) {
                Ok(answer) => answer,
                Err(e) => return self.failed(live, 500, e),
            };
            let answered = body["response"]["items"].as_array().cloned();
            for item in answered.unwrap_or_default() {
                let key = item["key"].as_str().unwrap_or_default().to_owned();
                if self.lose.lock().unwrap().contains(&key) {
                    continue;
                }
                let value = item.get("value").cloned().unwrap_or(Value::Null);
                let error = item["error"].as_str().unwrap_or_default().to_owned();
                if let Some(cache) = &self.cache {
                    cache.lock().unwrap().insert(
                        (provider.clone(), key.clone()),
                        (value.clone(), error.clone()),
                    );
                }
                items.push((key, value, error));
            }
            system_error = body["response"]["systemError"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if let Some(extra) = self.extra_system_error.lock().unwrap().clone() {
                system_error = extra;
            }
            status_code = i64::from(status);
        }
        self.calls.lock().unwrap().push(Call { live, status_code });
        let (errors, responses): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(_, _, error)| !error.is_empty());
        json!({
            "responses": responses.into_iter().map(|(k, v, _)| json!([k, v])).collect::<Vec<_>>(),
            "errors": errors.into_iter().map(|(k, _, e)| json!([k, e])).collect::<Vec<_>>(),
            "status_code": status_code,
            "system_error": system_error,
        })
    }

    /// One ProviderRequest over HTTPS, synchronously: the Rego extension is a plain function,
    /// so the call runs on its own thread with its own runtime. Like Gatekeeper's client: TLS
    /// 1.3 minimum, the Provider's CA only, the client certificate presented, the body read
    /// whatever the status; a send, read or decode failure is an error (status 500).
    fn post(&self, url: &str, keys: &[String]) -> Result<(u16, Value), String> {
        let url = url.to_owned();
        let body = json!({"apiVersion": API_VERSION, "kind": "ProviderRequest",
                          "request": {"keys": keys}});
        let ca = Arc::clone(&self.ca_pem);
        let identity = Arc::clone(&self.identity_pem);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                atcr_verify::net::install_crypto_provider();
                let client = reqwest::Client::builder()
                    .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
                    .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
                    .min_tls_version(reqwest::tls::Version::TLS_1_3)
                    .timeout(Duration::from_secs(3))
                    .build()
                    .map_err(|e| format!("failed to get HTTP client: {e}"))?;
                let response = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| format!("failed to send external data request: {e}"))?;
                let status = response.status().as_u16();
                let bytes = response
                    .bytes()
                    .await
                    .map_err(|e| format!("failed to read external data response: {e}"))?;
                let json = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("failed to unmarshal external data response: {e}"))?;
                Ok((status, json))
            })
        })
        .join()
        .unwrap()
    }

    /// The Assign mutators' call to a mutation provider: de-duplicated keys, one request;
    /// any item error, a systemError or `idempotent: false` fails the mutation
    /// (`failurePolicy: Fail` refuses the object). Returns key → pinned reference.
    fn mutate(&self, provider: &str, keys: &[String]) -> Result<HashMap<String, String>, String> {
        let keys: Vec<String> = keys
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let url = self
            .providers
            .get(provider)
            .ok_or_else(|| format!("provider {provider:?} not found"))?;
        let (status, body) = self.post(url, &keys)?;
        let response = &body["response"];
        let system_error = response["systemError"].as_str().unwrap_or_default();
        if status != 200 || !system_error.is_empty() {
            return Err(format!("status {status}: {system_error}"));
        }
        if response["idempotent"] != true {
            return Err("response is not idempotent".into());
        }
        let mut out = HashMap::new();
        for item in response["items"].as_array().cloned().unwrap_or_default() {
            if let Some(error) = item["error"].as_str() {
                return Err(error.to_owned());
            }
            let pinned = item["value"]
                .as_str()
                .ok_or_else(|| format!("value is not a string: {item}"))?;
            out.insert(item["key"].as_str().unwrap().to_owned(), pinned.to_owned());
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// The Rego engine.

struct Rego {
    engine: regorus::Engine,
    package: String,
}

impl Rego {
    fn new(template: &Template, gatekeeper: &Gatekeeper) -> Rego {
        let mut engine = regorus::Engine::new();
        // Gatekeeper's OPA: a builtin error makes its expression undefined, not the query fail.
        engine.set_strict_builtin_errors(false);
        let gk = gatekeeper.clone();
        engine
            .add_extension(
                "external_data".into(),
                1,
                Box::new(move |args: Vec<regorus::Value>| {
                    let request: Value =
                        serde_json::from_str(&args[0].to_json_str().unwrap()).unwrap();
                    regorus::Value::from_json_str(&gk.external_data(&request).to_string())
                }),
            )
            .unwrap();
        engine
            .add_policy(format!("{}.rego", template.package), template.rego.clone())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", template.kind));
        Rego {
            engine,
            package: template.package.clone(),
        }
    }

    /// `data.<package>.violation` for `review` and `parameters`, sorted by message.
    fn violations(&mut self, review: &Value, parameters: &Value) -> Vec<Violation> {
        let input = json!({"review": review, "parameters": parameters});
        self.engine
            .set_input(regorus::Value::from_json_str(&input.to_string()).unwrap());
        let value = self
            .engine
            .eval_rule(format!("data.{}.violation", self.package))
            .unwrap();
        if value == regorus::Value::Undefined {
            return Vec::new();
        }
        let json: Value = serde_json::from_str(&value.to_json_str().unwrap()).unwrap();
        let mut out: Vec<Violation> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Violation {
                msg: v["msg"].as_str().unwrap().to_owned(),
                details: v["details"].clone(),
            })
            .collect();
        out.sort_by(|a, b| a.msg.cmp(&b.msg));
        out
    }

    /// Evaluates one Rego expression (for helper functions of a template).
    fn query(&mut self, query: &str) -> Value {
        self.engine.set_input(regorus::Value::new_object());
        let results = self.engine.eval_query(query.to_owned(), false).unwrap();
        let value = &results.result[0].expressions[0].value;
        serde_json::from_str(&value.to_json_str().unwrap()).unwrap()
    }
}

#[derive(Debug, Clone)]
struct Violation {
    msg: String,
    details: Value,
}

fn messages(v: &[Violation]) -> Vec<&str> {
    v.iter().map(|v| v.msg.as_str()).collect()
}

// ---------------------------------------------------------------------------------------
// Admission inputs.

/// A Pod with `containers`, `initContainers` and `ephemeralContainers` of those images.
fn pod(namespace: &str, containers: &[&str], init: &[&str], ephemeral: &[&str]) -> Value {
    let list = |prefix: &str, images: &[&str]| -> Value {
        images
            .iter()
            .enumerate()
            .map(|(i, image)| json!({"name": format!("{prefix}{i}"), "image": image}))
            .collect()
    };
    let mut spec = json!({"containers": list("c", containers)});
    if !init.is_empty() {
        spec["initContainers"] = list("init", init);
    }
    if !ephemeral.is_empty() {
        spec["ephemeralContainers"] = list("debug", ephemeral);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "app", "namespace": namespace, "labels": {"app": "demo"}},
           "spec": spec})
}

/// The AdmissionReview request Gatekeeper puts in `input.review` for a CREATE of `object`.
fn admission(object: &Value) -> Value {
    let (group, version) = group_version(object);
    let kind = object["kind"].as_str().unwrap();
    let plural = format!("{}s", kind.to_lowercase());
    json!({
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": plural},
        "requestKind": {"group": group, "version": version, "kind": kind},
        "name": object["metadata"]["name"],
        "namespace": object["metadata"]["namespace"],
        "operation": "CREATE",
        "userInfo": {"username": "alice@example.com", "groups": ["system:authenticated"]},
        "object": object,
        "oldObject": null,
        "dryRun": false,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    })
}

fn group_version(object: &Value) -> (String, String) {
    let api_version = object["apiVersion"].as_str().unwrap();
    match api_version.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), api_version.to_owned()),
    }
}

fn applies_to(apply_to: &Value, group: &str, version: &str, kind: &str) -> bool {
    apply_to.as_array().unwrap().iter().any(|a| {
        let has = |field: &str, want: &str| {
            a[field]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == want || x == "*")
        };
        has("groups", group) && has("versions", version) && has("kinds", kind)
    })
}

/// Gatekeeper's expansion of `workload` by the ExpansionTemplates of `manifests/gatekeeper/`
/// (gatekeeper `pkg/expansion/system.go` `expandResource`, and the review
/// `augmentedUnstructuredToAdmissionRequest` builds for it): the object at `templateSource`
/// becomes a Pod in the workload's namespace named `<workload>-pod`; its review has kind,
/// name, namespace and object, no operation. Returns (template name, review).
fn expand(workload: &Value) -> Vec<(String, Value)> {
    let (group, version) = group_version(workload);
    let kind = workload["kind"].as_str().unwrap();
    let mut out = Vec::new();
    for t in of_kind("manifests/gatekeeper", "ExpansionTemplate") {
        if !applies_to(&t["spec"]["applyTo"], &group, &version, kind) {
            continue;
        }
        let mut source = workload;
        for part in t["spec"]["templateSource"].as_str().unwrap().split('.') {
            source = &source[part];
        }
        assert!(source.is_object(), "templateSource missing in {kind}");
        let gvk = &t["spec"]["generatedGVK"];
        let mut generated = source.clone();
        let api_version = match gvk["group"].as_str().unwrap() {
            "" => gvk["version"].as_str().unwrap().to_owned(),
            g => format!("{g}/{}", gvk["version"].as_str().unwrap()),
        };
        generated["apiVersion"] = json!(api_version);
        generated["kind"] = gvk["kind"].clone();
        let name = format!(
            "{}-{}",
            workload["metadata"]["name"].as_str().unwrap(),
            gvk["kind"].as_str().unwrap()
        )
        .to_lowercase();
        let namespace = workload["metadata"]["namespace"].clone();
        generated["metadata"]["name"] = json!(name);
        generated["metadata"]["namespace"] = namespace.clone();
        let review = json!({
            "kind": {"group": gvk["group"], "version": gvk["version"], "kind": gvk["kind"]},
            "name": name,
            "namespace": namespace,
            "object": generated,
        });
        out.push((t["metadata"]["name"].as_str().unwrap().to_owned(), review));
    }
    out
}

/// A workload of `kind` whose pod template has those containers and initContainers.
fn workload(kind: &str, namespace: &str, containers: &[&str], init: &[&str]) -> Value {
    let Value::Object(mut pod) = pod(namespace, containers, init, &[]) else {
        unreachable!()
    };
    pod.remove("apiVersion");
    pod.remove("kind");
    pod["metadata"] = json!({"labels": {"app": "demo"}});
    let template = Value::Object(pod);
    let api_version = match kind {
        "Job" | "CronJob" => "batch/v1",
        "ReplicationController" => "v1",
        _ => "apps/v1",
    };
    let selector = json!({"matchLabels": {"app": "demo"}});
    let spec = match kind {
        "CronJob" => json!({"schedule": "*/5 * * * *",
                            "jobTemplate": {"spec": {"template": template}}}),
        "Job" => json!({"template": template}),
        "ReplicationController" => json!({"replicas": 1, "selector": {"app": "demo"},
                                          "template": template}),
        "DaemonSet" => json!({"selector": selector, "template": template}),
        "StatefulSet" => json!({"serviceName": "demo", "replicas": 1, "selector": selector,
                                "template": template}),
        _ => json!({"replicas": 2, "selector": selector, "template": template}),
    };
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"name": format!("demo-{}", kind.to_lowercase()), "namespace": namespace},
           "spec": spec})
}

/// Gatekeeper's Assign mutators of `manifests/gatekeeper/` applied to `object`: for each
/// Assign whose applyTo matches, the strings at its `location` (`a.b[name:*].c`) are sent to
/// its external-data provider (ValueAtLocation) and replaced by the answers. `Err` is a
/// refused object (failurePolicy Fail).
fn apply_assigns(gk: &Gatekeeper, object: &mut Value) -> Result<usize, String> {
    let (group, version) = group_version(object);
    let kind = object["kind"].as_str().unwrap().to_owned();
    let mut assigned = 0;
    for a in of_kind("manifests/gatekeeper", "Assign") {
        if !applies_to(&a["spec"]["applyTo"], &group, &version, &kind) {
            continue;
        }
        let external = &a["spec"]["parameters"]["assign"]["externalData"];
        assert_eq!(external["dataSource"], "ValueAtLocation");
        assert_eq!(external["failurePolicy"], "Fail");
        let location = a["spec"]["location"].as_str().unwrap();
        let mut slots = Vec::new();
        collect(object, &location.split('.').collect::<Vec<_>>(), &mut slots);
        if slots.is_empty() {
            continue;
        }
        let keys: Vec<String> = slots
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        let pinned = gk.mutate(external["provider"].as_str().unwrap(), &keys)?;
        for slot in slots {
            let key = slot.as_str().unwrap().to_owned();
            *slot = json!(
                pinned
                    .get(&key)
                    .ok_or_else(|| format!("no answer for {key}"))?
            );
            assigned += 1;
        }
    }
    Ok(assigned)
}

/// The string fields at `path` (segments; `list[name:*]` means every element of `list`).
fn collect<'a>(value: &'a mut Value, path: &[&str], out: &mut Vec<&'a mut Value>) {
    let Some((first, rest)) = path.split_first() else {
        if value.is_string() {
            out.push(value);
        }
        return;
    };
    if let Some(list) = first.strip_suffix("[name:*]") {
        if let Some(items) = value.get_mut(list).and_then(Value::as_array_mut) {
            for item in items {
                collect(item, rest, out);
            }
        }
    } else if let Some(next) = value.get_mut(*first) {
        collect(next, rest, out);
    }
}

// ---------------------------------------------------------------------------------------
// The provider, the registry and the signers.

/// The images of one test, in the real registry under a per-test prefix.
struct Images {
    /// Signed by alice; policy `production` (enforce) trusts alice.
    verified: String,
    /// Under `production`, no signature.
    unsigned: String,
    /// Under `production`, signed by bob only.
    untrusted: String,
    /// Under `audit-team` (action audit), no signature.
    audit: String,
    /// Scoped by no policy (`defaults.unmatched: allow`).
    unscoped: String,
    /// Under `production`, a tag the registry does not have.
    missing_tag: String,
    bob: String,
}

async fn push_signed(pusher: &Pusher, repo: &str, handle: &str) -> String {
    let world = World::get();
    let image = pusher.image(repo, "v1", &format!("{repo}-signed")).await;
    let writer = world.writer(handle).await;
    let uri = writer.sign(repo, &image.digest).await;
    let sig = payload(&image.digest, writer.did(), &uri, &world.pds);
    pusher.attach(repo, &image, &sig).await;
    image.digest
}

async fn push_images(test: &str) -> Images {
    let world = World::get();
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let base = format!("{test}{}", std::process::id());
    let repo = |area: &str, name: &str| format!("{area}/{base}-{name}");
    push_signed(&pusher, &repo("rego", "good"), "alice.test").await;
    push_signed(&pusher, &repo("rego", "bobs"), "bob.test").await;
    for (area, name) in [("rego", "plain"), ("rego-audit", "plain"), ("other", "any")] {
        let r = repo(area, name);
        pusher.image(&r, "v1", &format!("{r}-unsigned")).await;
    }
    Images {
        verified: format!("{reg}/{}:v1", repo("rego", "good")),
        unsigned: format!("{reg}/{}:v1", repo("rego", "plain")),
        untrusted: format!("{reg}/{}:v1", repo("rego", "bobs")),
        audit: format!("{reg}/{}:v1", repo("rego-audit", "plain")),
        unscoped: format!("{reg}/{}:v1", repo("other", "any")),
        missing_tag: format!("{reg}/{}:no-such-tag", repo("rego", "good")),
        bob: world.account("bob.test").did.clone(),
    }
}

fn trust_policy(reg: &str) -> String {
    let alice = &World::get().account("alice.test").did;
    format!(
        "version: 1\ndefaults:\n  unmatched: allow\npolicies:\n\
         \x20 - name: audit-team\n    scope: \"{reg}/rego-audit/**\"\n    trustedDIDs: [{alice}]\n    action: audit\n\
         \x20 - name: production\n    scope: \"{reg}/rego/**\"\n    trustedDIDs: [{alice}]\n    action: enforce\n\
         \x20 - name: elsewhere\n    scope: \"*/team/**\"\n    trustedDIDs: [{alice}]\n    action: enforce\n"
    )
}

/// `atcr-verify serve` over mTLS with the trust policy above, plus `extra` flags.
fn provider(dir: &Path, pki: &Pki, extra: &[&str]) -> Server {
    let world = World::get();
    let reg = real_registry();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, trust_policy(reg)).unwrap();
    let mut args = pki.serve_args();
    args.extend([
        "--policy",
        policy.to_str().unwrap(),
        "--plc-url",
        world.plc.as_str(),
        "--allow-private-addresses",
        "--insecure-registry",
        reg,
    ]);
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

fn denied(image: &str, policy: &str, reason: &str) -> String {
    format!("image {image} is denied by trust policy {policy} (action enforce): {reason}")
}

fn no_signature(policy: &str) -> String {
    format!(
        "policy \"{policy}\" requires 1 signature from its trusted DIDs, 0 counted: no signatures found"
    )
}

// ---------------------------------------------------------------------------------------
// The tests.

/// Shared block between the markers, without the package-specific rest.
fn shared_block(rego: &str) -> &str {
    let start = rego
        .find("# ---- begin atcr-verify shared block ----")
        .expect("begin marker");
    let end = rego
        .find("# ---- end atcr-verify shared block ----")
        .expect("end marker");
    &rego[start..end]
}

#[test]
fn library_files_are_gatekeeper_objects_wired_to_each_other() {
    // ConstraintTemplates: templates.gatekeeper.sh/v1, Rego v1 under code[], name = kind
    // lowercased, no v0 `rego` field, one shared response block, and they compile.
    let raw = of_kind("rego", "ConstraintTemplate");
    assert_eq!(
        raw.len(),
        4,
        "enforce, audit, scoped and http-send templates"
    );
    for t in &raw {
        assert_eq!(t["apiVersion"], "templates.gatekeeper.sh/v1");
        let kind = t["spec"]["crd"]["spec"]["names"]["kind"].as_str().unwrap();
        assert_eq!(t["metadata"]["name"], kind.to_lowercase().as_str());
        let targets = t["spec"]["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0]["target"], "admission.k8s.gatekeeper.sh");
        assert!(
            targets[0].get("rego").is_none(),
            "{kind}: v0 targets[].rego"
        );
        let code = targets[0]["code"].as_array().unwrap();
        assert_eq!(code.len(), 1);
        assert_eq!(code[0]["engine"], "Rego");
        assert_eq!(code[0]["source"]["version"], "v1");
    }
    let mut all = templates();
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        [
            "AtcrVerifyAudit",
            "AtcrVerifyEnforce",
            "AtcrVerifyHttpSend",
            "AtcrVerifyScoped"
        ]
    );
    // The http.send template asks /verify, not the Provider (tested on its own below).
    all.remove("AtcrVerifyHttpSend");
    // rego/kustomization.yaml (for manifests/kustomization.yaml) lists exactly them.
    let kustomization = of_kind("rego", "Kustomization");
    let listed: BTreeSet<String> = kustomization[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = objects("rego")
        .into_iter()
        .filter(|(_, v)| v["kind"] == "ConstraintTemplate")
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, files);
    let blocks: BTreeSet<&str> = all.values().map(|t| shared_block(&t.rego)).collect();
    assert_eq!(
        blocks.len(),
        1,
        "the shared block differs between templates"
    );
    let gk = Gatekeeper::new("https://127.0.0.1:1", &dead_pki());
    let validation_provider =
        named(&of_kind("manifests/gatekeeper", "Provider"), "atcr-verify")["metadata"]["name"]
            .clone();
    for t in all.values() {
        assert_eq!(t.package, t.kind.to_lowercase());
        let mut rego = Rego::new(t, &gk);
        assert_eq!(
            rego.query(&format!("data.{}.provider_name", t.package)),
            validation_provider,
            "{}: Rego asks a Provider that manifests/gatekeeper does not define",
            t.kind
        );
        // No images, no call, no violation (a DELETE or a Pod without containers).
        let empty = json!({"kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": null});
        assert!(rego.violations(&empty, &json!({})).is_empty());
    }
    assert!(
        gk.calls().is_empty(),
        "no external_data call without images"
    );

    // Providers: HTTPS to the Service, /provide and /mutate, integer timeouts, a caBundle.
    let providers = of_kind("manifests/gatekeeper", "Provider");
    assert_eq!(providers.len(), 2);
    for (name, path, timeout) in [
        ("atcr-verify", "/provide", 3),
        ("atcr-verify-mutate", "/mutate", 1),
    ] {
        let p = named(&providers, name);
        assert_eq!(p["apiVersion"], API_VERSION);
        assert_eq!(
            p["spec"]["url"],
            format!("https://atcr-verify.gatekeeper-system.svc:8443{path}").as_str()
        );
        assert_eq!(p["spec"]["timeout"], timeout);
        assert!(
            p["spec"]["caBundle"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
    }

    // Assign mutators: every image field of Pods and of each workload's pod template is
    // pinned through the mutation provider, failing closed.
    let assigns = of_kind("manifests/gatekeeper", "Assign");
    let pinned_at = |group: &str, kind: &str| -> BTreeSet<String> {
        assigns
            .iter()
            .filter(|a| applies_to(&a["spec"]["applyTo"], group, "v1", kind))
            .map(|a| {
                assert_eq!(a["apiVersion"], "mutations.gatekeeper.sh/v1");
                let external = &a["spec"]["parameters"]["assign"]["externalData"];
                assert_eq!(external["provider"], "atcr-verify-mutate");
                assert_eq!(external["dataSource"], "ValueAtLocation");
                assert_eq!(external["failurePolicy"], "Fail");
                let excluded = a["spec"]["match"]["excludedNamespaces"].as_array().unwrap();
                assert!(
                    excluded.contains(&json!("gatekeeper-system")),
                    "atcr-verify runs there"
                );
                a["spec"]["location"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let fields = |prefix: &str, lists: &[&str]| -> BTreeSet<String> {
        lists
            .iter()
            .map(|l| format!("{prefix}spec.{l}[name:*].image"))
            .collect()
    };
    assert_eq!(
        pinned_at("", "Pod"),
        fields("", &["containers", "initContainers", "ephemeralContainers"])
    );
    for (group, kind) in [
        ("apps", "Deployment"),
        ("apps", "ReplicaSet"),
        ("apps", "StatefulSet"),
        ("apps", "DaemonSet"),
        ("batch", "Job"),
        ("", "ReplicationController"),
    ] {
        assert_eq!(
            pinned_at(group, kind),
            fields("spec.template.", &["containers", "initContainers"]),
            "{kind}"
        );
    }
    assert_eq!(
        pinned_at("batch", "CronJob"),
        fields(
            "spec.jobTemplate.spec.template.",
            &["containers", "initContainers"]
        )
    );

    // ExpansionTemplates: each workload kind expands into exactly one Pod.
    for kind in WORKLOAD_KINDS {
        let expanded = expand(&workload(kind, "prod", &["nginx:1"], &[]));
        assert_eq!(expanded.len(), 1, "{kind}");
        let object = &expanded[0].1["object"];
        assert_eq!(object["kind"], "Pod");
        assert_eq!(object["spec"]["containers"][0]["image"], "nginx:1");
    }

    // Example Constraints: enforce for a namespace label, warn cluster-wide, scoped by
    // parameters the template declares.
    let constraints: Vec<Value> = objects("manifests/gatekeeper")
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["apiVersion"] == "constraints.gatekeeper.sh/v1beta1")
        .collect();
    assert_eq!(constraints.len(), 3);
    let raw_by_kind: HashMap<String, &Value> = raw
        .iter()
        .map(|t| {
            (
                t["spec"]["crd"]["spec"]["names"]["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                t,
            )
        })
        .collect();
    for c in &constraints {
        let kind = c["kind"].as_str().unwrap();
        let t = raw_by_kind
            .get(kind)
            .unwrap_or_else(|| panic!("no template for {kind}"));
        let declared = &t["spec"]["crd"]["spec"]["validation"]["openAPIV3Schema"]["properties"];
        if let Some(params) = c["spec"]["parameters"].as_object() {
            for (name, value) in params {
                let schema = &declared[name.as_str()];
                assert!(schema.is_object(), "{kind}: undeclared parameter {name}");
                let ty = schema["type"].as_str().unwrap();
                let ok = match ty {
                    "boolean" => value.is_boolean(),
                    "array" => value.as_array().unwrap().iter().all(Value::is_string),
                    _ => false,
                };
                assert!(ok, "{kind}: parameter {name} is not a {ty}");
            }
        }
        assert_eq!(
            c["spec"]["match"]["kinds"],
            json!([{"apiGroups": [""], "kinds": ["Pod"]}])
        );
    }
    let enforce = named(&constraints, "atcr-verify-enforce");
    assert_eq!(enforce["spec"]["enforcementAction"], "deny");
    assert_eq!(
        enforce["spec"]["match"]["namespaceSelector"]["matchLabels"],
        json!({"atcr-verify/enforce": "true"})
    );
    let audit = named(&constraints, "atcr-verify-audit");
    assert_eq!(audit["kind"], "AtcrVerifyAudit");
    assert!(matches!(
        audit["spec"]["enforcementAction"].as_str(),
        Some("warn" | "dryrun")
    ));
    assert!(
        audit["spec"]["match"].get("namespaceSelector").is_none(),
        "cluster-wide"
    );
    assert!(
        named(&constraints, "atcr-verify-acme")["spec"]["parameters"]["imagePrefixes"].is_array()
    );
}

/// A PKI for Gatekeepers that never reach a provider (only the PEMs in memory are used).
fn dead_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path())
}

#[tokio::test]
async fn pod_images_in_every_container_list_are_judged_by_each_template() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("pods").await;
    let server = provider(dir.path(), &pki, &[]);
    let gk = Gatekeeper::new(&server.url, &pki);
    let bad = "NOT/Valid::ref";
    let i = &images;

    // Every verdict kind, spread over the three container lists; the verified image twice.
    let mixed = admission(&pod(
        "prod",
        &[&i.verified, &i.unsigned, &i.verified],
        &[&i.untrusted, &i.unscoped],
        &[&i.audit, bad, &i.missing_tag],
    ));
    let clean = admission(&pod("prod", &[&i.verified], &[&i.unscoped], &[]));
    let untrusted_reason = format!(
        "policy \"production\" requires 1 signature from its trusted DIDs, 0 counted: {}: untrusted DID",
        i.bob
    );

    // Enforce: deny verdicts and item errors; the audit-scoped, verified and unscoped images
    // pass.
    let mut enforce = Rego::new(&template("AtcrVerifyEnforce"), &gk);
    let v = enforce.violations(&mixed, &json!({}));
    let mut expected = vec![
        denied(&i.unsigned, "production", &no_signature("production")),
        denied(&i.untrusted, "production", &untrusted_reason),
    ];
    expected.sort();
    let (errors, verdicts): (Vec<_>, Vec<_>) = v
        .iter()
        .partition(|v| v.msg.contains("could not be verified"));
    assert_eq!(
        verdicts.iter().map(|v| v.msg.clone()).collect::<Vec<_>>(),
        expected,
        "{v:#?}"
    );
    assert_eq!(errors.len(), 2, "{v:#?}");
    let bad_msg = errors.iter().find(|v| v.msg.contains(bad)).unwrap();
    assert!(
        bad_msg.msg.starts_with(&format!(
            "image {bad} could not be verified: invalid_reference: "
        )),
        "{bad_msg:?}"
    );
    let missing = errors
        .iter()
        .find(|v| v.msg.contains(&i.missing_tag))
        .unwrap();
    assert!(
        missing.msg.starts_with(&format!(
            "image {} could not be verified: not_found: ",
            i.missing_tag
        )),
        "{missing:?}"
    );
    let unsigned = v.iter().find(|v| v.msg.contains(&i.unsigned)).unwrap();
    assert_eq!(
        unsigned.details,
        json!({"image": i.unsigned, "policy": "production", "action": "enforce",
               "reason": no_signature("production")})
    );
    // One external_data call for the review, each distinct image once, sorted.
    let calls = gk.calls();
    assert_eq!(calls.len(), 1);
    let mut sent = vec![
        i.verified.clone(),
        i.unsigned.clone(),
        i.untrusted.clone(),
        i.unscoped.clone(),
        i.audit.clone(),
        bad.to_owned(),
        i.missing_tag.clone(),
    ];
    sent.sort();
    assert_eq!(calls[0].live, sent);
    assert_eq!(calls[0].status_code, 200);
    assert!(enforce.violations(&clean, &json!({})).is_empty());

    // Audit/warn: also the audit-scoped image, with the verdict's own reason.
    let mut audit = Rego::new(&template("AtcrVerifyAudit"), &gk);
    let v = audit.violations(&mixed, &json!({}));
    assert_eq!(v.len(), 5, "{v:#?}");
    let audit_msg = format!(
        "image {} is not verified under trust policy audit-team (action audit): {} (action audit: reported, not denied)",
        i.audit,
        no_signature("audit-team")
    );
    assert!(messages(&v).contains(&audit_msg.as_str()), "{v:#?}");
    let unsigned_msg = format!(
        "image {} is not verified under trust policy production (action enforce): {}",
        i.unsigned,
        no_signature("production")
    );
    assert!(messages(&v).contains(&unsigned_msg.as_str()), "{v:#?}");
    assert_eq!(
        v.iter()
            .filter(|v| v.msg.contains("could not be verified"))
            .count(),
        2
    );
    assert!(audit.violations(&clean, &json!({})).is_empty());

    // Scoped to the production repositories: the same two denials and the not_found error;
    // the audit-team, unscoped and invalid images are outside its prefixes.
    let mut scoped = Rego::new(&template("AtcrVerifyScoped"), &gk);
    let params = json!({"imagePrefixes": [format!("{}/rego/", real_registry())]});
    let v = scoped.violations(&mixed, &params);
    assert_eq!(v.len(), 3, "{v:#?}");
    assert!(messages(&v).contains(&expected[0].as_str()));
    assert!(messages(&v).contains(&expected[1].as_str()));
    assert!(
        messages(&v).contains(&missing.msg.as_str()),
        "the not_found error: {v:#?}"
    );
    let last = gk.calls().last().unwrap().live.clone();
    assert_eq!(
        last,
        [
            i.missing_tag.clone(),
            i.untrusted.clone(),
            i.unsigned.clone(),
            i.verified.clone()
        ]
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn workloads_are_refused_through_their_expansion_templates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("workloads").await;
    let server = provider(dir.path(), &pki, &[]);
    let gk = Gatekeeper::new(&server.url, &pki);
    let mut enforce = Rego::new(&template("AtcrVerifyEnforce"), &gk);
    let mut audit = Rego::new(&template("AtcrVerifyAudit"), &gk);
    let i = &images;
    for kind in WORKLOAD_KINDS {
        // The unsigned image hides in the pod template's initContainers.
        let bad = workload(kind, "prod", &[&i.verified], &[&i.unsigned]);
        // Gatekeeper's own review of the workload object has no Pod spec at the top: the
        // templates find no images there and leave it to the expansion.
        assert!(
            enforce.violations(&admission(&bad), &json!({})).is_empty(),
            "{kind}"
        );
        let expanded = expand(&bad);
        assert_eq!(expanded.len(), 1, "{kind}");
        let (template_name, review) = &expanded[0];
        let expected_template = if kind == "CronJob" {
            "atcr-verify-expand-cronjobs"
        } else {
            "atcr-verify-expand-workloads"
        };
        assert_eq!(template_name, expected_template);
        assert_eq!(
            review["object"]["metadata"]["name"],
            format!("demo-{}-pod", kind.to_lowercase()).as_str()
        );
        assert_eq!(review["namespace"], "prod");
        let v = enforce.violations(review, &json!({}));
        assert_eq!(
            messages(&v),
            [denied(&i.unsigned, "production", &no_signature("production")).as_str()],
            "{kind}"
        );
        let v = audit.violations(review, &json!({}));
        assert_eq!(v.len(), 1, "{kind}: {v:#?}");

        let good = workload(kind, "prod", &[&i.verified], &[&i.unscoped]);
        let (_, review) = &expand(&good)[0];
        assert!(enforce.violations(review, &json!({})).is_empty(), "{kind}");
        assert!(audit.violations(review, &json!({})).is_empty(), "{kind}");
    }
}

#[test]
fn provider_down_or_unknown_refuses_in_every_template() {
    // Nothing listens on the Provider's port: Gatekeeper's call fails, and its builtin
    // answers status_code 500 with null responses and errors.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let gk = Gatekeeper::new(&dead, &dead_pki());
    let a = "atcr.io/acme/api:v1";
    let b = "atcr.io/acme/worker@sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let review = admission(&pod("payments", &[a], &[b], &[]));
    for (kind, params) in [
        (
            "AtcrVerifyEnforce",
            example_parameters("constraint-enforce.yaml"),
        ),
        ("AtcrVerifyAudit", json!({})),
        (
            "AtcrVerifyScoped",
            example_parameters("constraint-scoped.yaml"),
        ),
    ] {
        let mut rego = Rego::new(&template(kind), &gk);
        // Outage (the enforce example's requireDigest adds one violation for the tag).
        let v = rego.violations(&review, &params);
        let failed: Vec<&Violation> = v.iter().filter(|v| v.msg.contains("call failed")).collect();
        assert_eq!(failed.len(), 2, "{kind}: {v:#?}");
        for (violation, image) in failed.iter().zip([a, b]) {
            assert!(
                violation.msg.starts_with(&format!(
                    "image {image} was not verified: the atcr-verify provider call failed (status_code 500): failed to send external data request: "
                )),
                "{kind}: {violation:?}"
            );
            assert_eq!(violation.details["status_code"], 500);
        }
        let expected = if kind == "AtcrVerifyEnforce" { 3 } else { 2 };
        assert_eq!(v.len(), expected, "{kind}: {v:#?}");
        assert_eq!(gk.calls().last().unwrap().status_code, 500);
    }
    // A Provider name Gatekeeper does not know: status_code 400, the same refusal.
    let mut unknown = gk.clone();
    unknown.providers = Arc::new(HashMap::new());
    let mut rego = Rego::new(&template("AtcrVerifyEnforce"), &unknown);
    let v = rego.violations(&review, &json!({}));
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(
        v[0].msg.ends_with(
            "the atcr-verify provider call failed (status_code 400): provider \"atcr-verify\" not found"
        ),
        "{v:#?}"
    );
}

#[tokio::test]
async fn gatekeeper_cache_hits_are_no_violation_and_an_outage_past_the_cache_is() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("cache").await;
    let server = provider(dir.path(), &pki, &[]);
    let gk = Gatekeeper::new(&server.url, &pki).with_cache();
    let i = &images;
    let mut enforce = Rego::new(&template("AtcrVerifyEnforce"), &gk);
    let mut audit = Rego::new(&template("AtcrVerifyAudit"), &gk);
    let review = admission(&pod("prod", &[&i.verified, &i.unsigned], &[], &[]));
    let unsigned = denied(&i.unsigned, "production", &no_signature("production"));

    assert_eq!(
        messages(&enforce.violations(&review, &json!({}))),
        [unsigned.as_str()]
    );
    assert_eq!(gk.calls().last().unwrap().status_code, 200);

    // The provider goes away. Every key of the same Pod is in Gatekeeper's cache: status_code
    // 0, responses present, no system_error: the same verdicts, no spurious violation.
    drop(server);
    assert_eq!(
        messages(&enforce.violations(&review, &json!({}))),
        [unsigned.as_str()]
    );
    let last = gk.calls().last().unwrap().clone();
    assert_eq!((last.live.len(), last.status_code), (0, 0));
    assert_eq!(audit.violations(&review, &json!({})).len(), 1);
    assert_eq!(gk.calls().last().unwrap().status_code, 0);
    let verified_only = admission(&pod("prod", &[&i.verified], &[], &[]));
    assert!(enforce.violations(&verified_only, &json!({})).is_empty());

    // A Pod with one image not in the cache: the live call fails, and Gatekeeper returns only
    // status_code 500 and the error, dropping the cached answers: both images refused.
    let review = admission(&pod("prod", &[&i.verified, &i.untrusted], &[], &[]));
    let v = enforce.violations(&review, &json!({}));
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(
        v.iter().all(|v| v.msg.contains("(status_code 500)")),
        "{v:#?}"
    );
    assert_eq!(
        gk.calls().last().unwrap().live,
        std::slice::from_ref(&i.untrusted)
    );
}

#[tokio::test]
async fn missing_answers_system_errors_and_refused_requests_are_violations() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("missing").await;
    let dead_registry = format!("127.0.0.1:{}", free_port());
    let server = provider(
        dir.path(),
        &pki,
        &["--max-keys", "3", "--insecure-registry", &dead_registry],
    );
    let gk = Gatekeeper::new(&server.url, &pki);
    let i = &images;
    let mut enforce = Rego::new(&template("AtcrVerifyEnforce"), &gk);
    let mut audit = Rego::new(&template("AtcrVerifyAudit"), &gk);
    let mut scoped = Rego::new(&template("AtcrVerifyScoped"), &gk);

    // A transient failure: the provider leaves the key out of its items and names it in
    // systemError (status 200). Only that image is refused.
    let down = format!("{dead_registry}/team/app:v1");
    let review = admission(&pod("prod", &[&i.verified, &down], &[], &[]));
    for rego in [&mut enforce, &mut audit, &mut scoped] {
        let v = rego.violations(&review, &json!({}));
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(
            v[0].msg.starts_with(&format!(
                "image {down} was not verified: atcr-verify gave no answer for it: upstream_unavailable: {down}: "
            )),
            "{v:#?}"
        );
    }
    assert_eq!(gk.calls().last().unwrap().status_code, 200);

    // An answer lost on the way (no item, no system_error): refused, not admitted.
    gk.lose.lock().unwrap().insert(i.verified.clone());
    let review = admission(&pod("prod", &[&i.verified, &i.unsigned], &[], &[]));
    let v = enforce.violations(&review, &json!({}));
    let mut expected = vec![
        denied(&i.unsigned, "production", &no_signature("production")),
        format!(
            "image {} was not verified: atcr-verify gave no answer for it: no system_error either",
            i.verified
        ),
    ];
    expected.sort();
    assert_eq!(messages(&v), expected);
    gk.lose.lock().unwrap().clear();

    // A system_error beside answers for every image: one violation for the review.
    *gk.extra_system_error.lock().unwrap() = Some("internal_error: something broke".into());
    let review = admission(&pod("prod", &[&i.verified], &[], &[]));
    let v = audit.violations(&review, &json!({}));
    assert_eq!(
        messages(&v),
        [format!(
            "atcr-verify reported a system error while verifying {}: internal_error: something broke",
            i.verified
        )
        .as_str()]
    );
    *gk.extra_system_error.lock().unwrap() = None;

    // A request the provider refuses (413: more keys than --max-keys), with a JSON body:
    // status_code 413, no items. Every image refused, none admitted.
    let review = admission(&pod(
        "prod",
        &[&i.verified, &i.unscoped],
        &[&i.audit],
        &[&i.unsigned],
    ));
    let v = enforce.violations(&review, &json!({}));
    assert_eq!(v.len(), 4, "{v:#?}");
    for violation in &v {
        assert!(
            violation
                .msg
                .contains("the atcr-verify provider call failed (status_code 413): too_many_keys: 4 keys, the limit is 3"),
            "{violation:?}"
        );
    }
    assert_eq!(gk.calls().last().unwrap().status_code, 413);
}

#[tokio::test]
async fn assign_mutators_pin_what_validation_then_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("pinning").await;
    let server = provider(dir.path(), &pki, &[]);
    let gk = Gatekeeper::new(&server.url, &pki);
    let i = &images;
    let params = example_parameters("constraint-enforce.yaml");
    assert_eq!(params, json!({"requireDigest": true}));
    let mut enforce = Rego::new(&template("AtcrVerifyEnforce"), &gk);

    // Tags that the mutating webhook did not pin: requireDigest refuses each one, even the
    // verified image.
    let mut object = pod("prod", &[&i.verified], &[&i.unscoped], &[&i.verified]);
    let v = enforce.violations(&admission(&object), &params);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(
        v.iter().all(|v| v
            .msg
            .contains("is not pinned to a digest: requireDigest is set")),
        "{v:#?}"
    );

    // The Pod Assigns pin containers, initContainers and ephemeralContainers through
    // /mutate; validation then asks about the pinned references and admits the Pod.
    assert_eq!(apply_assigns(&gk, &mut object), Ok(3));
    let pinned = object["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        object["spec"]["ephemeralContainers"][0]["image"],
        pinned.as_str()
    );
    let (name, _) = i.verified.rsplit_once(':').unwrap();
    assert!(pinned.starts_with(&format!("{name}@sha256:")), "{pinned}");
    assert!(enforce.violations(&admission(&object), &params).is_empty());
    let sent = gk.calls().last().unwrap().live.clone();
    assert!(sent.iter().all(|k| k.contains("@sha256:")), "{sent:?}");
    assert!(sent.contains(&pinned));

    // A CronJob: the CronJob Assigns pin its job template at apply; its expansion (with the
    // Pod Assigns applied to the generated Pod, as Gatekeeper does) is then admitted.
    let mut cron = workload("CronJob", "prod", &[&i.verified], &[&i.unscoped]);
    assert_eq!(apply_assigns(&gk, &mut cron), Ok(2));
    let template = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(template["containers"][0]["image"], pinned.as_str());
    let (_, review) = expand(&cron).remove(0);
    let mut generated = review["object"].clone();
    assert_eq!(
        apply_assigns(&gk, &mut generated),
        Ok(2),
        "already pinned: unchanged"
    );
    assert_eq!(generated, review["object"]);
    assert!(enforce.violations(&review, &params).is_empty());

    // Pinned but unsigned: pinning is not verification.
    let mut object = pod("prod", &[&i.unsigned], &[], &[]);
    apply_assigns(&gk, &mut object).unwrap();
    let v = enforce.violations(&admission(&object), &params);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(v[0].msg.contains("is denied by trust policy production"));

    // An image /mutate cannot pin fails the mutation (failurePolicy: Fail refuses the Pod).
    let mut object = pod("prod", &[&i.verified, &i.missing_tag], &[], &[]);
    let err = apply_assigns(&gk, &mut object).unwrap_err();
    assert!(err.starts_with("not_found: "), "{err}");
}

#[test]
fn scoped_image_name_is_the_providers_name() {
    // The image name the scope sees is the one atcr-verify normalizes to
    // (`ImageRef::name`, which trust-policy scopes match), for every spelling of a registry.
    let gk = Gatekeeper::new(&format!("https://127.0.0.1:{}", free_port()), &dead_pki());
    let mut scoped = Rego::new(&template("AtcrVerifyScoped"), &gk);
    for reference in [
        "nginx",
        "nginx:1.25",
        "docker.io/nginx",
        "index.docker.io/library/nginx:1",
        "alice/app",
        "ATCR.IO/acme/api:v1",
        "atcr.io/acme/api@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "atcr.io/acme/team/api:v1@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "localhost/app",
        "LocalHost:5000/app:1",
        "localhost:5000",
        "127.0.0.1:5000/a/b:c",
        // The HTTPS port is dropped (also written with leading zeros); other ports are kept.
        "atcr.io:443/acme/api",
        "atcr.io:443/acme/prod-api:v1",
        "ATCR.IO:443/acme/prod-api",
        "atcr.io:0443/acme/api:v1",
        "atcr.io:4430/acme/api",
        "atcr.io:5000/acme/api",
        "localhost:05000/app",
        "127.0.0.1:443/a/b:c",
        "[::1]:443/app",
        "[::1]:5000/app:1",
        "[::1]/app",
        // Docker Hub's hosts are docker.io, with or without :443, `library/` included.
        "registry-1.docker.io/library/nginx:1",
        "registry-1.docker.io/nginx",
        "Registry-1.Docker.IO:443/alice/app:v1",
        "registry-1.docker.io:443/nginx@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "index.docker.io/nginx",
        "index.docker.io:443/nginx",
        "INDEX.DOCKER.IO:0443/alice/app",
        "docker.io:443/nginx",
        // On another port they are other registries.
        "index.docker.io:5000/nginx",
        "registry-1.docker.io:5000/alice/app",
        "docker.io:5000/nginx",
        "registry.hub.docker.com/library/nginx",
    ] {
        let expected = reference.parse::<ImageRef>().unwrap().name();
        let got = scoped.query(&format!(
            "data.atcrverifyscoped.image_name({})",
            json!(reference)
        ));
        assert_eq!(got, expected.as_str(), "{reference}");
    }
}

#[test]
fn scoped_prefixes_cover_port_443_and_docker_hub_hosts() {
    // A prefix in the normalized form covers every spelling containerd pulls from the same
    // registry: with the provider down, each of them is asked about and refused.
    let gk = Gatekeeper::new(&format!("https://127.0.0.1:{}", free_port()), &dead_pki());
    let mut scoped = Rego::new(&template("AtcrVerifyScoped"), &gk);
    let params = json!({"imagePrefixes": ["atcr.io/acme/", "docker.io/library/"]});
    for image in [
        "atcr.io:443/acme/prod-api:v1",
        "ATCR.IO:443/acme/prod-api:v1",
        "atcr.io:0443/acme/prod-api:v1",
        "registry-1.docker.io/library/nginx:1",
        "registry-1.docker.io/nginx:1",
        "registry-1.docker.io:443/library/nginx:1",
        "index.docker.io/library/nginx:1",
        "index.docker.io:443/nginx:1",
        "docker.io:443/library/nginx:1",
    ] {
        let v = scoped.violations(&admission(&pod("prod", &[image], &[], &[])), &params);
        assert_eq!(v.len(), 1, "{image}: {v:#?}");
        assert!(
            v[0].msg.contains("the atcr-verify provider call failed"),
            "{image}: {v:#?}"
        );
        assert_eq!(gk.calls().last().unwrap().live, [image], "{image}");
    }
    // Other ports are other registries, out of these prefixes: never asked about.
    let calls = gk.calls().len();
    for image in [
        "atcr.io:5000/acme/prod-api:v1",
        "registry-1.docker.io:5000/library/nginx:1",
        "ghcr.io/acme/prod-api:v1",
    ] {
        let v = scoped.violations(&admission(&pod("prod", &[image], &[], &[])), &params);
        assert!(v.is_empty(), "{image}: {v:#?}");
    }
    assert_eq!(
        gk.calls().len(),
        calls,
        "nothing out of scope is asked about"
    );
}

#[tokio::test]
async fn scoped_template_asks_only_about_its_prefixes_and_namespaces() {
    // (The image names the prefixes see: `scoped_image_name_is_the_providers_name`.)
    let gk = Gatekeeper::new(&format!("https://127.0.0.1:{}", free_port()), &dead_pki());
    let mut scoped = Rego::new(&template("AtcrVerifyScoped"), &gk);

    // The example constraint's parameters: atcr.io/acme/ in payments and ledger. With the
    // provider down, exactly the in-scope images are refused: the others were never asked.
    // `atcr.io:443/acme/api` is `atcr.io/acme/api` (the HTTPS port is the default), in scope.
    let params = example_parameters("constraint-scoped.yaml");
    let upper = "ATCR.IO/acme/api:v1";
    let digest = "atcr.io/acme/worker@sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let port_443 = "atcr.io:443/acme/api:v1";
    let review = admission(&pod(
        "payments",
        &[
            upper,
            "nginx:1",
            "atcr.io/acmecorp/x:1",
            "atcr.io:5000/acme/api:v1",
        ],
        &[port_443],
        &[digest],
    ));
    let v = scoped.violations(&review, &params);
    assert_eq!(v.len(), 3, "{v:#?}");
    assert_eq!(gk.calls().last().unwrap().live, [upper, digest, port_443]);
    let calls = gk.calls().len();
    let elsewhere = admission(&pod("default", &[upper], &[], &[]));
    assert!(scoped.violations(&elsewhere, &params).is_empty());
    let out_of_scope = admission(&pod("ledger", &["nginx:1"], &[], &[]));
    assert!(scoped.violations(&out_of_scope, &params).is_empty());
    assert_eq!(
        gk.calls().len(),
        calls,
        "nothing out of scope is asked about"
    );

    // Against the real provider: only the production repositories, only in payments.
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("scoped").await;
    let server = provider(dir.path(), &pki, &[]);
    let gk = Gatekeeper::new(&server.url, &pki);
    let mut scoped = Rego::new(&template("AtcrVerifyScoped"), &gk);
    let i = &images;
    let params = json!({"imagePrefixes": [format!("{}/rego/", real_registry())],
                        "namespaces": ["payments"]});
    let review = admission(&pod(
        "payments",
        &[&i.unsigned, &i.audit, &i.verified],
        &[],
        &[],
    ));
    assert_eq!(
        messages(&scoped.violations(&review, &params)),
        [denied(&i.unsigned, "production", &no_signature("production")).as_str()]
    );
    let mut sent = vec![i.unsigned.clone(), i.verified.clone()];
    sent.sort();
    assert_eq!(gk.calls().last().unwrap().live, sent);
    let review = admission(&pod("default", &[&i.unsigned], &[], &[]));
    assert!(scoped.violations(&review, &params).is_empty());
    assert_eq!(gk.calls().len(), 1);
}

#[tokio::test]
async fn readme_custom_rule_example_runs_against_the_provider() {
    // The worked example of README "For policy authors", followed by the shared block.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = &readme[readme.find("### Writing your own rule").unwrap()..];
    let start = section.find("```rego\n").unwrap() + "```rego\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let rego = format!(
        "{example}\n{}",
        shared_block(&template("AtcrVerifyEnforce").rego)
    );
    let custom = Template {
        kind: "AtcrVerifyReleaseSigned".into(),
        package: "atcrverifyreleasesigned".into(),
        rego,
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let images = push_images("readme").await;
    let server = provider(dir.path(), &pki, &[]);
    let gk = Gatekeeper::new(&server.url, &pki);
    let mut rego = Rego::new(&custom, &gk);
    let i = &images;
    let alice = &World::get().account("alice.test").did;
    let verified = admission(&pod("prod", &[&i.verified], &[], &[]));
    assert!(
        rego.violations(&verified, &json!({"dids": [alice]}))
            .is_empty()
    );
    assert_eq!(
        messages(&rego.violations(&verified, &json!({"dids": [i.bob]}))),
        [format!(
            "image {} has no counted signature from the release team ({}); trust policy production, verified true",
            i.verified, i.bob
        )
        .as_str()]
    );
    // No parameter: nobody is accepted (fail closed, not an undefined rule).
    assert_eq!(rego.violations(&verified, &json!({})).len(), 1);
    // The shared block's rules still apply: an item error is refused.
    let review = admission(&pod("prod", &[&i.verified, &i.missing_tag], &[], &[]));
    let v = rego.violations(&review, &json!({"dids": [alice]}));
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(
        v[0].msg.contains("could not be verified: not_found: "),
        "{v:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// AtcrVerifyHttpSend: OPA's http.send against GET /verify.

/// OPA's `http.send` for regorus (which has none): the subset the http-send template uses
/// (GET, `tls_ca_cert`, `raise_error: false`), performed for real, on a thread with a
/// runtime of its own. Records every request object.
#[derive(Clone, Default)]
struct HttpSend {
    requests: Arc<Mutex<Vec<Value>>>,
}

impl HttpSend {
    fn send(&self, request: Value) -> Value {
        self.requests.lock().unwrap().push(request.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(http_get(&request))
        })
        .join()
        .unwrap()
    }

    fn requests(&self) -> Vec<Value> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

/// What `http.send` answers: `{status_code, body, raw_body}`, or with `raise_error: false`
/// a failed call as `{status_code: 0, error: {code, message}}`.
async fn http_get(request: &Value) -> Value {
    atcr_verify::net::install_crypto_provider();
    assert_eq!(request["method"], "GET", "{request}");
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(20));
    if let Some(pem) = request["tls_ca_cert"].as_str() {
        client = client.tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()]);
    }
    let client = client.build().unwrap();
    match client.get(request["url"].as_str().unwrap()).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let raw = r.text().await.unwrap();
            let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
            json!({"status_code": status, "body": body, "raw_body": raw})
        }
        Err(e) => {
            assert_eq!(request["raise_error"], false, "{request}: {e}");
            json!({"status_code": 0, "error": {"code": "eval_http_send_network_error", "message": e.to_string()}})
        }
    }
}

impl Rego {
    /// A template that calls `http.send` (answered by `send`) instead of external data.
    fn with_http_send(template: &Template, send: &HttpSend) -> Rego {
        let mut engine = regorus::Engine::new();
        engine.set_strict_builtin_errors(false);
        let send = send.clone();
        engine
            .add_extension(
                "http.send".into(),
                1,
                Box::new(move |args: Vec<regorus::Value>| {
                    let request: Value =
                        serde_json::from_str(&args[0].to_json_str().unwrap()).unwrap();
                    regorus::Value::from_json_str(&send.send(request).to_string())
                }),
            )
            .unwrap();
        engine
            .add_policy(format!("{}.rego", template.package), template.rego.clone())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", template.kind));
        Rego {
            engine,
            package: template.package.clone(),
        }
    }
}

#[tokio::test]
async fn http_send_template_admits_only_what_verify_answers_200() {
    let images = push_images("hsend").await;
    let world = World::get();
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, trust_policy(reg)).unwrap();
    // TLS without client certificates: http.send presents none.
    let server = Server::start(
        dir.path(),
        &[
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            "--plc-url",
            world.plc.as_str(),
            "--allow-private-addresses",
            "--insecure-registry",
            reg,
        ],
    );
    let template = template("AtcrVerifyHttpSend");
    let send = HttpSend::default();
    let mut rego = Rego::with_http_send(&template, &send);
    let verify_url = format!("{}/verify", server.url);
    let params =
        json!({"verifyURL": verify_url, "tlsCACert": pki.server_ca.pem(), "cacheSeconds": 30});
    let review = |images: &[&str]| admission(&pod("default", images, &[], &[]));

    // Verified, audited and unscoped images are admitted (200); one GET each, cacheable.
    let v = rego.violations(
        &review(&[&images.verified, &images.audit, &images.unscoped]),
        &params,
    );
    assert!(v.is_empty(), "{v:?}");
    let requests = send.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(r["method"], "GET");
        assert_eq!(r["raise_error"], false);
        assert_eq!(r["cache"], true);
        assert_eq!(r["force_cache"], true);
        assert_eq!(r["force_cache_duration_seconds"], 30);
        assert_eq!(r["tls_ca_cert"], pki.server_ca.pem().as_str());
        assert!(
            r["url"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{verify_url}?image="))
        );
    }
    let encoded = format!(
        "{verify_url}?image={}",
        images.verified.replace(':', "%3A").replace('/', "%2F")
    );
    assert!(
        requests.iter().any(|r| r["url"] == encoded.as_str()),
        "{encoded} in {requests:?}"
    );

    // Denied (403): the verdict's reason.
    let v = rego.violations(&review(&[&images.unsigned, &images.untrusted]), &params);
    assert_eq!(v.len(), 2, "{v:?}");
    let unsigned = v
        .iter()
        .find(|v| v.details["image"] == images.unsigned.as_str())
        .unwrap();
    assert_eq!(
        unsigned.msg,
        format!(
            "image {} is denied by atcr-verify: {}",
            images.unsigned,
            no_signature("production")
        )
    );

    // No such image (404), an invalid reference (400): could not decide.
    let v = rego.violations(&review(&[&images.missing_tag, "Not A//Reference"]), &params);
    let m = messages(&v);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(
        m.iter().any(|m| m.starts_with(&format!(
            "image {}: atcr-verify could not decide (status 404): ",
            images.missing_tag
        ))),
        "{m:?}"
    );
    assert!(
        m.iter().any(|m| m
            .starts_with("image Not A//Reference: atcr-verify could not decide (status 400): ")),
        "{m:?}"
    );

    // Fail closed: the wrong CA, nothing listening, no verifyURL.
    let other_ca = dead_pki().server_ca.pem();
    let dead = format!("https://127.0.0.1:{}/verify", free_port());
    for params in [
        json!({"verifyURL": verify_url, "tlsCACert": other_ca}),
        json!({"verifyURL": dead, "tlsCACert": pki.server_ca.pem()}),
    ] {
        let v = rego.violations(&review(&[&images.verified]), &params);
        assert_eq!(v.len(), 1, "{params}: {v:?}");
        assert!(
            v[0].msg.starts_with(&format!(
                "image {}: atcr-verify could not decide (status 0): ",
                images.verified
            )),
            "{}",
            v[0].msg
        );
    }
    let v = rego.violations(&review(&[&images.verified]), &json!({}));
    assert_eq!(
        messages(&v),
        [format!(
            "image {}: atcr-verify could not decide: no answer (is the verifyURL parameter set?)",
            images.verified
        )]
    );
    // No images, no call.
    send.requests();
    assert!(rego.violations(&review(&[]), &params).is_empty());
    assert!(send.requests().is_empty());
}
