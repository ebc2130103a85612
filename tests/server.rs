//! `atcr-verify serve` end to end, backed by the real registry, PDS and PLC (and fakes for
//! latency). What needs the process — TLS and mTLS, certificate and policy reloads, the
//! inbound rate limit beside the health port, its log lines — runs the real binary with
//! Gatekeeper-shaped requests from a real client (certificates generated at test time);
//! the rest of the protocol drives the provider's routes in process
//! (`atcr_verify::server::configure` under `actix_web::test`).

use std::sync::Arc;
use std::time::Duration;

use crate::common::certs::{Ca, GATEKEEPER_SAN, Leaf, pki, write_atomic};
use crate::common::fake::Fake;
use crate::common::registry::{Pusher, free_port, payload, real_registry};
use crate::common::server::Server;
use crate::common::wait_until;
use crate::common::world::World;
use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::{App, test, web};
use atcr_verify::cli::EngineArgs;
use atcr_verify::policy::{PolicyHolder, TrustPolicy};
use atcr_verify::server::{AppState, Endpoints, Limits, configure};
use clap::Parser;
use serde_json::{Value, json};

fn client(ca_pem: &str, identity: Option<&Leaf>) -> reqwest::Client {
    atcr_verify::net::install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(20));
    if let Some(id) = identity {
        b = b.identity(id.identity());
    }
    b.build().unwrap()
}

fn request(keys: &[&str]) -> Value {
    json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1", "kind": "ProviderRequest",
           "request": {"keys": keys}})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> Result<(u16, Value), reqwest::Error> {
    let r = client
        .post(format!("{url}/provide"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let json: Value = r.json().await?;
    Ok((status, json))
}

/// Asks for one key; its item (the test fails when there is none).
async fn item_for(client: &reqwest::Client, url: &str, key: &str) -> Value {
    let (_, json) = post(client, url, serde_json::to_vec(&request(&[key])).unwrap())
        .await
        .unwrap();
    item(&items(&json), key)
        .unwrap_or_else(|| panic!("no item for {key}: {json}"))
        .clone()
}

fn policy_yaml(scope: &str, trusted: &str) -> String {
    format!(
        "version: 1\npolicies:\n  - name: cluster\n    scope: \"{scope}\"\n    require:\n      - signature: true\n    trustedDIDs:\n      - {trusted}\n    action: enforce\n"
    )
}

/// Writes `policy.yaml` in `dir` trusting `handle`'s DID for everything in `reg`.
fn policy_file(dir: &std::path::Path, reg: &str, handle: &str) -> std::path::PathBuf {
    let policy = dir.join("policy.yaml");
    let did = &World::get().account(handle).did;
    std::fs::write(&policy, policy_yaml(&format!("{reg}/**"), did)).unwrap();
    policy
}

fn items(json: &Value) -> Vec<Value> {
    json["response"]["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn item<'a>(items: &'a [Value], key: &str) -> Option<&'a Value> {
    items.iter().find(|i| i["key"] == key)
}

pub(crate) async fn sign(registry: &str, repo: &str, handle: &str) -> String {
    let world = World::get();
    let pusher = Pusher::new(registry);
    let img = pusher
        .image(repo, "v1", &format!("{repo}-{}", std::process::id()))
        .await;
    let writer = world.writer(handle).await;
    let uri = writer.sign(repo, &img.digest).await;
    pusher
        .attach(
            repo,
            &img,
            &payload(&img.digest, writer.did(), &uri, &world.pds),
        )
        .await;
    img.digest
}

pub(crate) fn engine_args<'a>(world: &'a World, registries: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--plc-url", world.plc.as_str(), "--allow-private-addresses"];
    for r in registries {
        args.push("--insecure-registry");
        args.push(r);
    }
    args
}

/// `serve` over plain HTTP under `policy`, resolving from `registries`, with `extra` flags.
pub(crate) fn plain_server(
    dir: &std::path::Path,
    policy: &std::path::Path,
    registries: &[&str],
    extra: &[&str],
) -> Server {
    let mut args = vec!["--insecure-http", "--policy", policy.to_str().unwrap()];
    args.extend(engine_args(World::get(), registries));
    args.extend(extra);
    Server::start(dir, &args)
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// The provider's state in process: an engine built from `engine` flags, under the policy
/// in `policy` (the built-in one when `None`), within `limits`, verifying on the test's
/// runtime.
pub(crate) fn state(
    policy: Option<&std::path::Path>,
    engine: &[&str],
    limits: Limits,
) -> web::Data<AppState> {
    let mut args = vec!["x"];
    args.extend(engine);
    let engine = Flags::parse_from(args).engine.build().unwrap();
    let policy = match policy {
        Some(path) => PolicyHolder::watch_file(path).unwrap(),
        None => PolicyHolder::new(TrustPolicy::builtin().unwrap()),
    };
    web::Data::new(AppState::new(
        engine.verifier,
        Arc::new(policy),
        limits,
        tokio::runtime::Handle::current(),
    ))
}

/// The provider's routes on the default paths, for `test::init_service`.
fn routes(state: &web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) + use<> {
    configure(state.clone(), &Endpoints::default())
}

/// A POST of `body` to `path`.
pub(crate) fn post_to(path: &str, body: Vec<u8>) -> test::TestRequest {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("content-type", "application/json"))
        .set_payload(body)
}

/// Calls the in-process provider; the status and the JSON body.
pub(crate) async fn call<S, R, B>(app: &S, request: R) -> (u16, Value)
where
    S: Service<R, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let response = test::call_service(app, request).await;
    let status = response.status().as_u16();
    let body = test::read_body(response).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, json)
}

/// A `/provide` request for `keys`.
fn provide(keys: &[&str]) -> test::TestRequest {
    post_to("/provide", serde_json::to_vec(&request(keys)).unwrap())
}

/// The item for `key` in an answer (the test fails when there is none).
fn the_item(json: &Value, key: &str) -> Value {
    item(&items(json), key)
        .unwrap_or_else(|| panic!("no item for {key}: {json}"))
        .clone()
}

#[tokio::test]
async fn mixed_batch_over_mtls_lands_each_key_in_its_place() {
    let world = World::get();
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let alice = &world.account("alice.test").did;
    let policy = dir.path().join("policy.yaml");
    // Every image scoped, the dead registry's included (an unscoped one is decided without
    // the network).
    std::fs::write(&policy, policy_yaml("**", alice)).unwrap();
    let repo = format!("srv/mixed{}", std::process::id());
    let digest = sign(reg, &repo, "alice.test").await;
    let unsigned_repo = format!("srv/unsigned{}", std::process::id());
    let unsigned = Pusher::new(reg)
        .image(&unsigned_repo, "v1", "unsigned-seed")
        .await;
    let dead = format!("127.0.0.1:{}", free_port());
    let mut args = pki.serve_args();
    args.extend(["--policy", policy.to_str().unwrap()]);
    args.extend(engine_args(world, &[reg, &dead]));
    let server = Server::start(dir.path(), &args);
    let gk = client(&pki.server_ca.pem(), Some(&pki.gatekeeper));

    let signed_key = format!("{reg}/{repo}:v1");
    let unsigned_key = format!("{reg}/{unsigned_repo}@{}", unsigned.digest);
    let bad_key = "Not A/Valid::Ref";
    let down_key = format!("{dead}/x/y:1");
    let missing_key = format!("{reg}/{repo}:no-such-tag");
    let keys = [
        signed_key.as_str(),
        unsigned_key.as_str(),
        bad_key,
        down_key.as_str(),
        signed_key.as_str(),
        missing_key.as_str(),
    ];
    let (status, json) = post(
        &gk,
        &server.url,
        serde_json::to_vec(&request(&keys)).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(json["apiVersion"], "externaldata.gatekeeper.sh/v1beta1");
    assert_eq!(json["kind"], "ProviderResponse");
    assert_eq!(json["response"]["idempotent"], true);
    let items = items(&json);
    assert_eq!(
        items.len(),
        4,
        "one item per distinct permanent key: {json:#}"
    );

    let v = &item(&items, &signed_key).unwrap()["value"];
    assert_eq!(v["verified"], true, "{v:#}");
    assert_eq!(v["digest"], digest.as_str());
    assert_eq!(v["policy"], "cluster");
    assert_eq!(v["action"], "enforce");
    assert_eq!(v["did"], alice.as_str());
    assert_eq!(v["handle"], "alice.test");
    assert!(v["signedAt"].is_string());
    assert_eq!(v["signatures"][0]["counted"], true);
    assert!(v["reason"].is_null());

    let v = &item(&items, &unsigned_key).unwrap()["value"];
    assert_eq!(v["verified"], false);
    assert_eq!(v["deny"], true);
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("no signatures found")
    );

    let e = item(&items, bad_key).unwrap();
    assert!(e["value"].is_null());
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid_reference: "),
        "{e}"
    );
    let e = item(&items, &missing_key).unwrap();
    assert!(
        e["error"].as_str().unwrap().starts_with("not_found: "),
        "{e}"
    );

    assert!(
        item(&items, &down_key).is_none(),
        "transient failures are never items"
    );
    let system = json["response"]["systemError"].as_str().unwrap();
    assert!(system.starts_with("upstream_unavailable: "), "{system}");
    assert!(system.contains(&down_key), "{system}");

    let metrics = server.metrics_text().await;
    for name in [
        "atcr_verify_requests_total",
        "atcr_verify_keys_total",
        "atcr_verify_verification_duration_seconds_bucket",
        "atcr_verify_cache_hits_total",
        "atcr_verify_cache_misses_total",
        "atcr_verify_upstream_requests_total",
        "atcr_verify_upstream_errors_total",
        "atcr_verify_policy_reloads_total",
        "atcr_verify_certificate_reloads_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(
        !metrics.contains("did:plc") && !metrics.contains(&repo),
        "no DID or image in labels"
    );
    let logs = server.logs_with("outcomes=");
    assert!(
        logs.contains("outcomes="),
        "one log line per request: {logs}"
    );
}

#[actix_web::test]
async fn bad_requests_get_json_system_errors_and_4xx() {
    let limits = Limits {
        max_keys: 3,
        ..Limits::default()
    };
    let app = test::init_service(App::new().configure(routes(&state(None, &[], limits)))).await;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "bad_request: "),
        (serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ProviderRequest", "request": {"keys": []}})).unwrap(), 400, "bad_request: "),
        (serde_json::to_vec(&json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1", "kind": "Nope", "request": {"keys": []}})).unwrap(), 400, "bad_request: "),
        (serde_json::to_vec(&request(&["a", "b", "c", "d"])).unwrap(), 413, "too_many_keys: "),
        (vec![b' '; 2 * 1024 * 1024], 413, "request_too_large: "),
    ];
    for (body, status, prefix) in cases {
        let (got, json) = call(&app, post_to("/provide", body).to_request()).await;
        assert_eq!(got, status, "{json}");
        assert!(
            json["response"]["systemError"]
                .as_str()
                .unwrap()
                .starts_with(prefix),
            "{json}"
        );
        assert_eq!(json["response"]["items"], json!([]));
    }
    // Duplicate keys answered once, in first-seen order, echoed byte for byte.
    let (status, json) = call(
        &app,
        provide(&["BAD REF", "BAD REF", "x@sha256:1"]).to_request(),
    )
    .await;
    assert_eq!(status, 200);
    let keys: Vec<_> = items(&json).iter().map(|i| i["key"].clone()).collect();
    assert_eq!(keys, [json!("BAD REF"), json!("x@sha256:1")]);
    // Other paths and methods: JSON system errors too.
    let other = [
        (
            test::TestRequest::post().uri("/nope"),
            404,
            "not_found: no such endpoint",
        ),
        (
            test::TestRequest::get().uri("/provide"),
            405,
            "method_not_allowed: /provide takes POST",
        ),
        (
            test::TestRequest::put().uri("/mutate"),
            405,
            "method_not_allowed: /mutate takes POST",
        ),
    ];
    for (request, status, error) in other {
        let (got, json) = call(&app, request.to_request()).await;
        assert_eq!(got, status, "{json}");
        assert_eq!(json["response"]["systemError"], error);
        assert_eq!(json["kind"], "ProviderResponse");
    }
}

/// One line per request that matters, in both log formats, from the running server: at
/// INFO for a request with item errors, a refused request and a denial, with keys,
/// outcomes and the system error when there is one. A request whose keys were all
/// admitted is logged at DEBUG (seen here under `ATCR_VERIFY_LOG=info,atcr_verify=debug`).
#[tokio::test]
async fn request_lines_in_text_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    // Under the built-in policy an image no policy scopes is denied, without the network.
    let denied = "unscoped.example/app:v1";
    for (format, filter) in [("text", "info,atcr_verify=debug"), ("json", "info")] {
        let server = Server::start_with_env(
            dir.path(),
            &["--insecure-http", "--log-format", format, "--no-follow"],
            &[("ATCR_VERIFY_LOG", filter)],
        );
        let http = crate::common::client();
        let url = &server.url;
        let body = |keys: &[&str]| serde_json::to_vec(&request(keys)).unwrap();
        // No key, so every key admitted.
        assert_eq!(post(&http, url, body(&[])).await.unwrap().0, 200);
        let errors = body(&["BAD REF", "x@sha256:1"]);
        assert_eq!(post(&http, url, errors).await.unwrap().0, 200);
        assert_eq!(post(&http, url, b"{".to_vec()).await.unwrap().0, 400);
        let (status, json) = post(&http, url, body(&[denied])).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(the_item(&json, denied)["value"]["deny"], true, "{json}");
        let logs = server.logs_with("not_verified");
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains("request")).collect();
        if format == "text" {
            for expected in [
                " DEBUG request endpoint=\"provide\" status=200 keys=0 outcomes={} ms=",
                "  INFO request endpoint=\"provide\" status=200 keys=2 outcomes={error: 2} ms=",
                "  INFO request endpoint=\"provide\" status=400 keys=0 outcomes={} system_error=\"bad_request: ",
                "  INFO request endpoint=\"provide\" status=200 keys=1 outcomes={not_verified: 1} ms=",
            ] {
                assert!(
                    lines.iter().any(|l| l.contains(expected)),
                    "no {expected:?} in\n{logs}"
                );
            }
            assert_eq!(lines.len(), 4, "{logs}");
        } else {
            let events: Vec<Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|l| l["fields"]["message"] == "request")
                .collect();
            assert_eq!(
                events.len(),
                3,
                "the admitted request is not at INFO: {logs}"
            );
            assert!(events.iter().all(|e| e["level"] == "INFO"), "{logs}");
            let fields: Vec<&Value> = events.iter().map(|e| &e["fields"]).collect();
            assert_eq!(
                (
                    &fields[0]["endpoint"],
                    &fields[0]["status"],
                    &fields[0]["keys"]
                ),
                (&json!("provide"), &json!(200), &json!(2))
            );
            assert_eq!(fields[0]["outcomes"], "{error: 2}");
            assert!(fields[0]["ms"].is_u64() && fields[0].get("system_error").is_none());
            assert_eq!(fields[1]["status"], 400);
            let error = fields[1]["system_error"].as_str().unwrap();
            assert!(error.starts_with("bad_request: "), "{error}");
            assert_eq!(
                (&fields[2]["status"], &fields[2]["keys"]),
                (&json!(200), &json!(1))
            );
            assert_eq!(fields[2]["outcomes"], "{not_verified: 1}");
        }
    }
}

#[tokio::test]
async fn mtls_refuses_missing_wrong_ca_expired_and_wrong_name_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = Server::start(dir.path(), &pki.serve_args());
    let body = || serde_json::to_vec(&request(&[])).unwrap();
    let ca = pki.server_ca.pem();
    assert_eq!(
        post(&client(&ca, Some(&pki.gatekeeper)), &server.url, body())
            .await
            .unwrap()
            .0,
        200
    );
    let other = Ca::new("someone else");
    for (what, leaf) in [
        ("no client certificate", None),
        (
            "client certificate from another CA",
            Some(other.client(GATEKEEPER_SAN)),
        ),
        (
            "expired client certificate",
            Some(pki.client_ca.expired_client(GATEKEEPER_SAN)),
        ),
        (
            "client certificate for another name",
            Some(pki.client_ca.client("evil.default.svc")),
        ),
    ] {
        let result = post(&client(&ca, leaf.as_ref()), &server.url, body()).await;
        assert!(result.is_err(), "{what} was accepted");
    }
    // And the client refuses a server certificate from a CA it does not trust.
    assert!(
        post(
            &client(&other.pem(), Some(&pki.gatekeeper)),
            &server.url,
            body()
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn certificates_reload_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = Server::start(dir.path(), &pki.serve_args());
    let body = || serde_json::to_vec(&request(&[])).unwrap();
    let old = client(&pki.server_ca.pem(), Some(&pki.gatekeeper));
    assert_eq!(post(&old, &server.url, body()).await.unwrap().0, 200);

    // Rotate the serving certificate to a new CA, and the client CA to a new one.
    let new_server_ca = Ca::new("rotated server CA");
    new_server_ca
        .server(&["localhost", "127.0.0.1"])
        .write(dir.path(), "tls");
    let new_client_ca = Ca::new("rotated gatekeeper-ca");
    write_atomic(&pki.client_ca_file, new_client_ca.pem().as_bytes());
    let new_gatekeeper = new_client_ca.client(GATEKEEPER_SAN);
    let fresh = client(&new_server_ca.pem(), Some(&new_gatekeeper));
    wait_until(
        Duration::from_secs(10),
        "new certificates served",
        async || post(&fresh, &server.url, body()).await.is_ok(),
    )
    .await;
    // The connection opened before the rotation still works.
    assert_eq!(post(&old, &server.url, body()).await.unwrap().0, 200);
    // New handshakes with the old material fail.
    assert!(
        post(
            &client(&pki.server_ca.pem(), Some(&pki.gatekeeper)),
            &server.url,
            body()
        )
        .await
        .is_err()
    );

    // A broken file keeps the current certificate and counts a failure.
    std::fs::write(&pki.cert, "garbage").unwrap();
    let failure = "atcr_verify_certificate_reloads_total{result=\"failure\"} 1";
    wait_until(
        Duration::from_secs(10),
        "the broken certificate file counted",
        async || server.metrics_text().await.contains(failure),
    )
    .await;
    let fresh = client(&new_server_ca.pem(), Some(&new_gatekeeper));
    assert_eq!(post(&fresh, &server.url, body()).await.unwrap().0, 200);
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("atcr_verify_certificate_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(failure), "{metrics}");
}

#[actix_web::test]
async fn deadline_exceeded_is_a_system_error_and_the_retry_is_served_from_cache() {
    let fake = Fake::registry(10, None);
    let repo = format!("srv/slow{}", std::process::id());
    sign(&fake.addr, &repo, "alice.test").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), &fake.addr, "alice.test");
    let limits = Limits {
        budget: Duration::from_millis(300),
        ..Limits::default()
    };
    let engine = engine_args(World::get(), &[&fake.addr]);
    let state = state(Some(&policy), &engine, limits);
    let app = test::init_service(App::new().configure(routes(&state))).await;
    fake.set_latency(Duration::from_millis(250));
    let key = format!("{}/{repo}:v1", fake.addr);
    let (status, json) = call(&app, provide(&[&key]).to_request()).await;
    assert_eq!(status, 200);
    assert!(items(&json).is_empty(), "{json}");
    let system = json["response"]["systemError"].as_str().unwrap();
    assert!(system.starts_with("deadline_exceeded: "), "{system}");
    // The verification went on in the background: once it is done, the retry finds it
    // cached.
    wait_until(
        Duration::from_secs(20),
        "the background verification finished",
        async || {
            let metrics = state.metrics_text();
            metrics.contains("atcr_verify_verification_duration_seconds_count 1")
        },
    )
    .await;
    let before = fake.total();
    let (_, json) = call(&app, provide(&[&key]).to_request()).await;
    let answer = the_item(&json, &key);
    assert_eq!(answer["value"]["verified"], true, "{answer}");
    assert_eq!(fake.total(), before, "no upstream request on retry");
}

/// The keys of a batch are verified concurrently, never more at once than
/// `--concurrency` (and `--request-concurrency`, one request's share): with every registry
/// reply slowed down, the registry sees requests overlap up to the bound and not past it
/// (and past it when the bound is higher).
#[actix_web::test]
async fn batch_keys_are_verified_concurrently_within_the_bound() {
    let fake = Fake::registry(10, None);
    let n = 6;
    let mut keys = Vec::new();
    for i in 0..n {
        let repo = format!("srv/bound{i}-{}", std::process::id());
        sign(&fake.addr, &repo, "alice.test").await;
        keys.push(format!("{}/{repo}:v1", fake.addr));
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), &fake.addr, "alice.test");
    let mut most = Vec::new();
    for bound in [2, 6] {
        // A fresh engine: nothing cached.
        let limits = Limits {
            concurrency: bound,
            request_concurrency: bound,
            budget: Duration::from_secs(30),
            ..Limits::default()
        };
        let engine = engine_args(World::get(), &[&fake.addr]);
        let state = state(Some(&policy), &engine, limits);
        let app = test::init_service(App::new().configure(routes(&state))).await;
        fake.set_latency(Duration::from_millis(80));
        fake.reset_counts();
        let (status, json) = call(&app, provide(&keys).to_request()).await;
        fake.set_latency(Duration::ZERO);
        assert_eq!(status, 200);
        let verified = items(&json)
            .iter()
            .filter(|i| i["value"]["verified"] == true)
            .count();
        assert_eq!(verified, n, "{json}");
        most.push(fake.max_in_flight());
    }
    assert_eq!(
        most[0], 2,
        "bound 2: at most, and indeed, 2 at once ({most:?})"
    );
    assert!(most[1] > 2, "bound 6: more than 2 at once ({most:?})");
}

#[tokio::test]
async fn policy_reloads_and_keeps_the_last_good_one() {
    let world = World::get();
    let reg = real_registry();
    let repo = format!("srv/policy{}", std::process::id());
    sign(reg, &repo, "alice.test").await;
    let dir = tempfile::tempdir().unwrap();
    // First: only bob trusted.
    let policy = policy_file(dir.path(), reg, "bob.test");
    let server = plain_server(dir.path(), &policy, &[reg], &[]);
    let url = &server.url;
    let key = format!("{reg}/{repo}:v1");
    let http = crate::common::client();
    let verified = || async { item_for(&http, url, &key).await["value"]["verified"].clone() };
    // Asked three times: verified, then answered from the caches (and the answer
    // kept), then the kept answer reused.
    for _ in 0..3 {
        assert_eq!(verified().await, false);
    }
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("atcr_verify_cache_hits_total{cache=\"answer\"} 1"),
        "{metrics}"
    );

    // A policy edit applies to the next request, kept answers included.
    write_atomic(
        &policy,
        policy_yaml(&format!("{reg}/**"), &world.account("alice.test").did).as_bytes(),
    );
    wait_until(
        Duration::from_secs(10),
        "the policy edit applied",
        async || verified().await == true,
    )
    .await;
    write_atomic(&policy, b"version: 1\npolicies: [ {bad");
    let failure = "atcr_verify_policy_reloads_total{result=\"failure\"} 1";
    wait_until(
        Duration::from_secs(10),
        "the bad policy counted",
        async || server.metrics_text().await.contains(failure),
    )
    .await;
    assert_eq!(
        verified().await,
        true,
        "the last good policy stays in force"
    );
    let metrics = server.metrics_text().await;
    assert!(metrics.contains(failure), "{metrics}");
    assert!(
        server
            .logs_with("keeping the last good one")
            .contains("keeping the last good one")
    );
}

#[tokio::test]
async fn inbound_rate_limit_answers_a_clear_system_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--insecure-http", "--inbound-rate", "1"]);
    let url = &server.url;
    let http = crate::common::client();
    let mut limited = None;
    for _ in 0..5 {
        let (status, json) = post(&http, url, serde_json::to_vec(&request(&[])).unwrap())
            .await
            .unwrap();
        if status == 429 {
            limited = Some(json);
            break;
        }
    }
    let json = limited.expect("no request was limited");
    assert!(
        json["response"]["systemError"]
            .as_str()
            .unwrap()
            .starts_with("rate_limited: ")
    );
    let r = reqwest::get(format!("{}/healthz", server.metrics))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[actix_web::test]
async fn mutate_pins_to_the_digest_validation_verifies() {
    let reg = real_registry();
    let repo = format!("srv/pin{}", std::process::id());
    let digest = sign(reg, &repo, "alice.test").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg, "alice.test");
    let dead = format!("127.0.0.1:{}", free_port());
    let engine = engine_args(World::get(), &[reg, &dead]);
    let state = state(Some(&policy), &engine, Limits::default());
    let app = test::init_service(App::new().configure(routes(&state))).await;
    let tag_key = format!("{reg}/{repo}:v1");
    let pinned_key = format!("{reg}/{repo}@{digest}");
    let down_key = format!("{dead}/x/y:1");
    let keys = [
        tag_key.as_str(),
        tag_key.as_str(),
        pinned_key.as_str(),
        "NOPE::",
        down_key.as_str(),
    ];
    let body = serde_json::to_vec(&request(&keys)).unwrap();
    let (status, json) = call(&app, post_to("/mutate", body).to_request()).await;
    assert_eq!(status, 200);
    assert_eq!(json["response"]["idempotent"], true);
    let got = items(&json);
    assert_eq!(got.len(), 3, "{json:#}");
    assert_eq!(
        item(&got, &tag_key).unwrap()["value"],
        pinned_key.as_str(),
        "pinned to the digest"
    );
    assert_eq!(
        item(&got, &pinned_key).unwrap()["value"],
        pinned_key.as_str(),
        "unchanged"
    );
    assert!(
        item(&got, "NOPE::").unwrap()["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid_reference: ")
    );
    assert!(
        json["response"]["systemError"]
            .as_str()
            .unwrap()
            .starts_with("upstream_unavailable: "),
        "{json}"
    );
    // Validation of the pinned reference verifies that same digest.
    let ask = async |key: &str| {
        let (_, json) = call(&app, provide(&[key]).to_request()).await;
        the_item(&json, key)["value"].clone()
    };
    let value = ask(&pinned_key).await;
    assert_eq!(value["verified"], true);
    assert_eq!(value["digest"], digest.as_str());
    // Someone re-pushes the tag after admission: what was admitted (the pinned digest)
    // does not change, and the new content is unsigned.
    let repushed = Pusher::new(reg)
        .image(&repo, "v1", "re-pushed content")
        .await;
    assert_ne!(repushed.digest, digest);
    assert_eq!(ask(&pinned_key).await["digest"], digest.as_str());
    let new_pin = format!("{reg}/{repo}@{}", repushed.digest);
    assert_eq!(ask(&new_pin).await["verified"], false);
}

#[actix_web::test]
async fn a_kept_answer_ends_when_a_fact_it_rests_on_expires() {
    let reg = real_registry();
    let repo = format!("srv/kept{}", std::process::id());
    let signed = sign(reg, &repo, "alice.test").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg, "alice.test");
    let mut engine = engine_args(World::get(), &[reg]);
    engine.extend(["--tag-ttl", "2s"]);
    let state = state(Some(&policy), &engine, Limits::default());
    let app = test::init_service(App::new().configure(routes(&state))).await;
    let key = format!("{reg}/{repo}:v1");
    let ask = async || {
        let (_, json) = call(&app, provide(&[&key]).to_request()).await;
        the_item(&json, &key)["value"].clone()
    };
    for _ in 0..3 {
        let v = ask().await;
        assert_eq!(
            (v["verified"].clone(), v["digest"].clone()),
            (true.into(), signed.clone().into())
        );
    }
    // The tag now names an unsigned image: once the tag's 2 s are over, the kept answer
    // is not reused.
    let unsigned = Pusher::new(reg).image(&repo, "v1", "kept-unsigned").await;
    let mut v = Value::Null;
    wait_until(
        Duration::from_secs(10),
        "the tag's new digest answered",
        async || {
            v = ask().await;
            v["digest"] == unsigned.digest.as_str()
        },
    )
    .await;
    assert_eq!(v["verified"], false, "{v:#}");
}
