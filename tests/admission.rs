//! The Kubernetes ValidatingAdmissionWebhook (`POST /validate`) and the one-image endpoint
//! for OPA's `http.send` (`GET /verify`), driven in process (`atcr_verify::server::configure`
//! under `actix_web::test`) against the real registry, PDS and PLC.

use std::sync::Arc;

use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::world::World;
use crate::server::{call, engine_args, post_to, sign};
use actix_web::{App, test, web};
use atcr_verify::cli::EngineArgs;
use atcr_verify::policy::PolicyHolder;
use atcr_verify::server::admission::{MAX_MESSAGE, MAX_WARNING, WebhookFailure};
use atcr_verify::server::{AppState, Endpoints, Limits, configure};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// Enforce for `reg` (but audit under `reg/admaudit/`), trusting alice; enforce for `down`.
fn policy(dir: &std::path::Path, reg: &str, down: &str) -> std::path::PathBuf {
    let did = &World::get().account("alice.test").did;
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1
policies:
  - name: audited
    scope: \"{reg}/admaudit/**\"
    require:
      - signature: true
    trustedDIDs:
      - {did}
    action: audit
  - name: cluster
    scope: \"{reg}/**\"
    require:
      - signature: true
    trustedDIDs:
      - {did}
    action: enforce
  - name: down
    scope: \"{down}/**\"
    require:
      - signature: true
    trustedDIDs:
      - {did}
    action: enforce
"
        ),
    )
    .unwrap();
    path
}

/// The server's state under the policy file, resolving from `registries`.
fn state(
    policy: &std::path::Path,
    registries: &[&str],
    failure: WebhookFailure,
) -> web::Data<AppState> {
    let mut args = vec!["x"];
    args.extend(engine_args(World::get(), registries));
    let engine = Flags::parse_from(args).engine.build().unwrap();
    web::Data::new(
        AppState::new(
            engine.verifier,
            Arc::new(PolicyHolder::watch_file(policy).unwrap()),
            Limits::default(),
            tokio::runtime::Handle::current(),
        )
        .with_webhook_failure(failure),
    )
}

/// An AdmissionReview of an object of `group`/`kind`.
fn review(uid: &str, group: &str, kind: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": "x"},
            "namespace": "default",
            "operation": "CREATE",
            "object": object,
            "dryRun": false
        }
    }))
    .unwrap()
}

/// A pod spec running `images` (the last one as an init container).
fn pod_spec(images: &[&str]) -> Value {
    let (init, main) = images.split_last().unwrap();
    let containers: Vec<Value> = main
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    json!({"containers": containers, "initContainers": [{"name": "init", "image": init}]})
}

fn pod(images: &[&str]) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod_spec(images)})
}

/// A POST of `body` to `/validate`.
fn validate(body: Vec<u8>) -> actix_web::test::TestRequest {
    post_to("/validate", body)
}

/// The review's `response`, after checking the status, the envelope and the uid.
fn decided(uid: &str, (status, json): (u16, Value)) -> Value {
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(json["kind"], "AdmissionReview");
    assert_eq!(json["response"]["uid"], uid, "uid echoed: {json}");
    json["response"].clone()
}

fn refused(response: &Value) -> &str {
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(response["status"]["code"], 403, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.len() <= MAX_MESSAGE, "{}", message.len());
    message
}

fn warnings(response: &Value) -> Vec<String> {
    let warnings: Vec<String> = response["warnings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .collect();
    for w in &warnings {
        assert!(w.chars().count() <= MAX_WARNING, "{w}");
    }
    warnings
}

#[actix_web::test]
async fn pods_and_workload_templates_are_judged_image_by_image() {
    let reg = real_registry();
    let pid = std::process::id();
    let signed_repo = format!("adm/signed{pid}");
    sign(reg, &signed_repo, "alice.test").await;
    let signed = format!("{reg}/{signed_repo}:v1");
    let unsigned_repo = format!("adm/unsigned{pid}");
    Pusher::new(reg)
        .image(&unsigned_repo, "v1", "adm-unsigned")
        .await;
    let unsigned = format!("{reg}/{unsigned_repo}:v1");
    let audit_repo = format!("admaudit/unsigned{pid}");
    Pusher::new(reg).image(&audit_repo, "v1", "adm-audit").await;
    let audited = format!("{reg}/{audit_repo}:v1");
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), reg, "127.0.0.1:1");
    let state = state(&policy, &[reg], WebhookFailure::Deny);
    let app =
        test::init_service(App::new().configure(configure(state.clone(), &Endpoints::default())))
            .await;

    // A signed image: allowed, no status, no warning.
    let r = decided(
        "uid-signed",
        call(
            &app,
            validate(review("uid-signed", "", "Pod", pod(&[&signed]))).to_request(),
        )
        .await,
    );
    assert_eq!(r["allowed"], true, "{r}");
    assert!(r.get("status").is_none(), "{r}");
    assert!(warnings(&r).is_empty(), "{r}");

    // An unsigned image under enforce (as an init container): refused, named.
    let r = decided(
        "u2",
        call(
            &app,
            validate(review("u2", "", "Pod", pod(&[&signed, &unsigned]))).to_request(),
        )
        .await,
    );
    let message = refused(&r);
    assert!(message.contains(&unsigned), "{message}");
    assert!(!message.contains(&signed), "{message}");

    // An unsigned image under audit: allowed, with a warning naming it.
    let r = decided(
        "u3",
        call(
            &app,
            validate(review("u3", "", "Pod", pod(&[&audited]))).to_request(),
        )
        .await,
    );
    assert_eq!(r["allowed"], true, "{r}");
    let w = warnings(&r);
    assert_eq!(w.len(), 1, "{r}");
    assert!(w[0].contains("audit"), "{w:?}");

    // A Deployment's template: the unsigned image is found and refused.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "spec": {"template": {"spec": pod_spec(&[&unsigned, &signed])}}});
    let message = refused(&decided(
        "u4",
        call(
            &app,
            validate(review("u4", "apps", "Deployment", deployment)).to_request(),
        )
        .await,
    ))
    .to_owned();
    assert!(message.contains(&unsigned), "{message}");
    let deployment = json!({"spec": {"template": {"spec": pod_spec(&[&signed])}}});
    let r = decided(
        "u5",
        call(
            &app,
            validate(review("u5", "apps", "Deployment", deployment)).to_request(),
        )
        .await,
    );
    assert_eq!(r["allowed"], true, "{r}");

    // A CronJob's job template.
    let cronjob = json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": pod_spec(&[&signed, &unsigned])}}}}});
    let message = refused(&decided(
        "u6",
        call(
            &app,
            validate(review("u6", "batch", "CronJob", cronjob)).to_request(),
        )
        .await,
    ))
    .to_owned();
    assert!(message.contains(&unsigned), "{message}");

    // An invalid reference: refused (permanent).
    let r = decided(
        "u7",
        call(
            &app,
            validate(review("u7", "", "Pod", pod(&["Not A//Reference"]))).to_request(),
        )
        .await,
    );
    let message = refused(&r);
    assert!(message.contains("invalid_reference"), "{message}");

    // Kinds that run no pods, and dry runs, change nothing.
    let r = decided(
        "u8",
        call(
            &app,
            validate(review(
                "u8",
                "",
                "ConfigMap",
                json!({"data": {"image": unsigned}}),
            ))
            .to_request(),
        )
        .await,
    );
    assert_eq!(r["allowed"], true, "{r}");
    let mut dry: Value =
        serde_json::from_slice(&review("u9", "", "Pod", pod(&[&unsigned]))).unwrap();
    dry["request"]["dryRun"] = true.into();
    refused(&decided(
        "u9",
        call(
            &app,
            validate(serde_json::to_vec(&dry).unwrap()).to_request(),
        )
        .await,
    ));

    // A malformed review: 400, with a clear message.
    for body in [
        b"{not json".to_vec(),
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}})).unwrap(),
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})).unwrap(),
    ] {
        let (status, json) = call(&app, post_to("/validate", body).to_request()).await;
        assert_eq!(status, 400, "{json}");
        assert_eq!(json["error"]["code"], "bad_request", "{json}");
        assert_eq!(json["error"]["transient"], false, "{json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("AdmissionReview"), "{message}");
    }
    // A body over --max-body: 413; another method: 405.
    let (status, json) = call(
        &app,
        validate(vec![b' '; Limits::default().max_body + 1]).to_request(),
    )
    .await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["code"], "request_too_large", "{json}");
    let get = test::TestRequest::get().uri("/validate").to_request();
    assert_eq!(test::call_service(&app, get).await.status().as_u16(), 405);
    let metrics = state.metrics_text();
    assert!(
        metrics.contains("atcr_verify_requests_total{endpoint=\"validate\",status=\"200\"}"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn an_upstream_failure_refuses_or_admits_as_webhook_failure_says() {
    let down = format!("127.0.0.1:{}", free_port());
    let image = format!("{down}/adm/any:v1");
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), real_registry(), &down);
    for (failure, allowed) in [(WebhookFailure::Deny, false), (WebhookFailure::Allow, true)] {
        let state = state(&policy, &[&down], failure);
        let app =
            test::init_service(App::new().configure(configure(state, &Endpoints::default()))).await;
        let r = decided(
            "down",
            call(
                &app,
                validate(review("down", "", "Pod", pod(&[&image]))).to_request(),
            )
            .await,
        );
        assert_eq!(r["allowed"], allowed, "{failure:?}: {r}");
        if allowed {
            let w = warnings(&r);
            assert_eq!(w.len(), 1, "{r}");
            assert!(
                w[0].contains(&image) && w[0].contains("could not decide"),
                "{w:?}"
            );
        } else {
            let message = refused(&r);
            assert!(message.contains(&image), "{message}");
        }
    }
}

#[actix_web::test]
async fn verify_answers_one_image_with_its_verdict_and_a_status() {
    let reg = real_registry();
    let pid = std::process::id();
    let signed_repo = format!("adm/vsigned{pid}");
    sign(reg, &signed_repo, "alice.test").await;
    let signed = format!("{reg}/{signed_repo}:v1");
    let unsigned_repo = format!("adm/vunsigned{pid}");
    Pusher::new(reg)
        .image(&unsigned_repo, "v1", "adm-vunsigned")
        .await;
    let unsigned = format!("{reg}/{unsigned_repo}:v1");
    let down = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), reg, &down);
    let state = state(&policy, &[reg, &down], WebhookFailure::Deny);
    let app =
        test::init_service(App::new().configure(configure(state.clone(), &Endpoints::default())))
            .await;
    let get = |query: String| test::TestRequest::get().uri(&format!("/verify{query}"));
    let encode = |image: &str| image.replace(':', "%3A").replace('/', "%2F");

    // Admitted: 200 with the verdict /provide gives.
    let (status, verdict) = call(
        &app,
        get(format!("?image={}", encode(&signed))).to_request(),
    )
    .await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(verdict["verified"], true, "{verdict}");
    assert_eq!(verdict["deny"], false, "{verdict}");
    let (_, provided) = call(
        &app,
        post_to(
            "/provide",
            serde_json::to_vec(&json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1",
                "kind": "ProviderRequest", "request": {"keys": [signed]}}))
            .unwrap(),
        )
        .to_request(),
    )
    .await;
    assert_eq!(provided["response"]["items"][0]["value"], verdict);

    // Denied: 403 with the verdict.
    let (status, verdict) = call(
        &app,
        get(format!("?image={}", encode(&unsigned))).to_request(),
    )
    .await;
    assert_eq!(status, 403, "{verdict}");
    assert_eq!(verdict["deny"], true, "{verdict}");
    assert!(
        verdict["reason"]
            .as_str()
            .unwrap()
            .contains("no signatures"),
        "{verdict}"
    );

    // Transient: 503; permanent: 404 (no such image) and 400 (bad or missing reference).
    for (query, code, error, transient) in [
        (
            format!("?image={}", encode(&format!("{down}/adm/x:v1"))),
            503,
            "upstream_unavailable",
            true,
        ),
        (
            format!("?image={}", encode(&format!("{reg}/{signed_repo}:nope"))),
            404,
            "not_found",
            false,
        ),
        (
            "?image=Not%20A%2F%2FReference".to_owned(),
            400,
            "invalid_reference",
            false,
        ),
        ("?image=".to_owned(), 400, "bad_request", false),
        (String::new(), 400, "bad_request", false),
    ] {
        let (status, json) = call(&app, get(query.clone()).to_request()).await;
        assert_eq!(status, code, "{query}: {json}");
        assert_eq!(json["error"]["code"], error, "{query}: {json}");
        assert_eq!(json["error"]["transient"], transient, "{query}: {json}");
        assert!(json["error"]["message"].is_string(), "{json}");
    }
    let (status, _) = call(&app, post_to("/verify", Vec::new()).to_request()).await;
    assert_eq!(status, 405);
    let metrics = state.metrics_text();
    assert!(
        metrics.contains("atcr_verify_requests_total{endpoint=\"verify\",status=\"403\"} 1"),
        "{metrics}"
    );
}

/// The integration guide's Deployment: no `--policy`, `REQUIRE_SIGNATURE=true` and
/// `TRUSTED_DIDS`: the real binary enforces a signature by a listed DID on every image;
/// a malformed DID stops it at start.
#[tokio::test]
async fn the_guides_environment_enforces_without_a_policy_file() {
    let world = World::get();
    let reg = real_registry();
    let pid = std::process::id();
    let signed_repo = format!("adm/envsigned{pid}");
    sign(reg, &signed_repo, "alice.test").await;
    let signed = format!("{reg}/{signed_repo}:v1");
    let bobs_repo = format!("adm/envbob{pid}");
    sign(reg, &bobs_repo, "bob.test").await;
    let bobs = format!("{reg}/{bobs_repo}:v1");
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--insecure-http"];
    args.extend(engine_args(world, &[reg]));
    let alice = world.account("alice.test").did.as_str();
    let server = crate::common::server::Server::start_with_env(
        dir.path(),
        &args,
        &[
            ("REQUIRE_SIGNATURE", "true"),
            (
                "TRUSTED_DIDS",
                &format!("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa,{alice}"),
            ),
        ],
    );
    let client = crate::common::client();
    let verify = async |image: &str| {
        let r = client
            .get(format!(
                "{}/verify?image={}",
                server.url,
                image.replace(':', "%3A").replace('/', "%2F")
            ))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    };
    let (status, verdict) = verify(&signed).await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(verdict["policy"], "env", "{verdict}");
    assert_eq!(verdict["action"], "enforce", "{verdict}");
    let (status, verdict) = verify(&bobs).await;
    assert_eq!(status, 403, "bob is not trusted: {verdict}");
    // Any image is in scope: one in a registry nobody signs for is denied too.
    let r = client
        .post(format!("{}/validate", server.url))
        .header("content-type", "application/json")
        .body(review("env", "", "Pod", pod(&[&signed, &bobs])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let json: Value = r.json().await.unwrap();
    let message = refused(&json["response"]).to_owned();
    assert!(
        message.contains(&bobs) && !message.contains(&signed),
        "{message}"
    );
    drop(server);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
        .args(["serve", "--insecure-http", "--listen", "127.0.0.1:0"])
        .env("REQUIRE_SIGNATURE", "true")
        .env("TRUSTED_DIDS", "did:plc:ok,not-a-did")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("REQUIRE_SIGNATURE/TRUSTED_DIDS") && stderr.contains("not-a-did"),
        "{stderr}"
    );
}
