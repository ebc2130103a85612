//! Spec-following fakes for what no local real server can do: an OCI registry with the
//! Referrers API (and `Link` pagination) and bearer-token challenges, and a forwarding proxy
//! in front of the real PLC and PDS. Both count requests and inject latency and faults.
//! Each fake runs its own actix system on a thread, on a free loopback port.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::json;

use super::registry::{OCI_INDEX, sha256};

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer every request with this status (and `Retry-After` seconds when given).
    Status(u16, Option<u64>),
    /// Answer every blob request with a 307 redirect to this URL.
    RedirectBlobs(String),
    /// Answer requests whose path contains the text with this status (other requests
    /// are served normally).
    StatusOnPath(String, u16),
    /// Answer requests whose path contains the text with this status and JSON body (a
    /// hostile upstream's error text); other requests are served normally.
    BodyOnPath(String, u16, Arc<Vec<u8>>),
    /// Answer requests whose path contains the text with a 307 redirect to the same path
    /// and query on this base URL (a server forwarding what it is sent elsewhere).
    RedirectOnPath(String, String),
    /// Answer writes (POST, PUT, PATCH) whose path contains the text with this status (a
    /// registry that serves pulls but refuses some pushes); reads are served normally.
    StatusOnWrite(String, u16),
    /// Answer requests whose path and query contain the text with this recorded answer
    /// (status, content type, body): a replay of what an upstream once said. Other requests
    /// are served normally.
    AnswerOnQuery(String, Recorded),
    /// Answer an upload's start (`POST …/blobs/uploads/`, after the auth check) with this
    /// `Location`, or with none; other requests are served normally.
    UploadLocation(Option<String>),
}

#[derive(Default, Clone)]
struct Store {
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, (String, Vec<u8>)>,
    tags: HashMap<(String, String), String>,
    referrers: HashMap<(String, String), Vec<serde_json::Value>>,
    uploads: u64,
}

/// A recorded proxy answer: status, content type, body.
pub type Recorded = (u16, String, Vec<u8>);

/// Rewrites a proxied body, given the request's path and query.
pub type Transform = Arc<dyn Fn(&str, Vec<u8>) -> Vec<u8> + Send + Sync>;

#[derive(Default)]
struct State {
    store: Mutex<Store>,
    counts: Mutex<BTreeMap<String, u64>>,
    total: AtomicU64,
    latency: Mutex<Duration>,
    /// Requests inside their injected latency now, and the most there ever were at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    fault: Mutex<Option<Fault>>,
    referrers_api: bool,
    page_size: usize,
    bearer: Option<String>,
    basic: Option<String>,
    upstream: Option<String>,
    rewrite: Mutex<Option<(String, String)>>,
    transform: Mutex<Option<Transform>>,
    /// Proxy answers by path and query, recorded as they pass.
    recorded: Mutex<HashMap<String, Recorded>>,
    /// Serve recorded answers without asking upstream.
    replay: std::sync::atomic::AtomicBool,
    /// (path, value) of every `Authorization` header received.
    authorizations: Mutex<Vec<(String, String)>>,
}

/// A running fake.
pub struct Fake {
    pub addr: String,
    state: Arc<State>,
}

impl Fake {
    /// A registry with the Referrers API, `page_size` referrers per page; when `bearer` is
    /// set, every `/v2/` request needs `Authorization: Bearer <bearer>`, obtained from the
    /// `/token` realm it advertises; writes need the token of a scope with `push`
    /// (`<bearer>+push`).
    pub fn registry(page_size: usize, bearer: Option<&str>) -> Fake {
        start(State {
            referrers_api: true,
            page_size,
            bearer: bearer.map(str::to_owned),
            ..State::default()
        })
    }

    /// As [`Fake::registry`] with a bearer token, whose `/token` endpoint also demands
    /// Basic credentials `user:password`.
    pub fn private_registry(bearer: &str, user: &str, password: &str) -> Fake {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        start(State {
            referrers_api: true,
            page_size: 10,
            bearer: Some(bearer.to_owned()),
            basic: Some(format!("Basic {basic}")),
            ..State::default()
        })
    }

    /// A registry without the Referrers API (answers 404 there, like distribution 2.8).
    pub fn registry_without_referrers_api() -> Fake {
        start(State {
            referrers_api: false,
            page_size: 10,
            ..State::default()
        })
    }

    /// A proxy forwarding every GET to `upstream` (e.g. the real PLC or PDS).
    pub fn proxy(upstream: &str) -> Fake {
        start(State {
            upstream: Some(upstream.trim_end_matches('/').to_owned()),
            ..State::default()
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_latency(&self, d: Duration) {
        *self.state.latency.lock().unwrap() = d;
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Replace `from` with `to` in every proxied body (e.g. the PDS URL in DID documents).
    pub fn rewrite(&self, from: &str, to: &str) {
        *self.state.rewrite.lock().unwrap() = Some((from.to_owned(), to.to_owned()));
    }

    /// Pass every proxied body through `transform` (a tampering man in the middle).
    pub fn transform(&self, transform: impl Fn(&str, Vec<u8>) -> Vec<u8> + Send + Sync + 'static) {
        *self.state.transform.lock().unwrap() = Some(Arc::new(transform));
    }

    /// Requests seen, by kind (`manifests`, `blobs`, `referrers`, `token`, `proxy`, …).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.state.counts.lock().unwrap().clone()
    }

    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Serves everything `other` holds (blobs, manifests, tags, referrers).
    pub fn copy_store_from(&self, other: &Fake) {
        let copy = other.state.store.lock().unwrap().clone();
        *self.state.store.lock().unwrap() = copy;
    }

    /// The answer recorded for a proxied path and query containing `text`, if one passed.
    pub fn recorded(&self, text: &str) -> Option<Recorded> {
        let recorded = self.state.recorded.lock().unwrap();
        recorded
            .iter()
            .find(|(path, _)| path.contains(text))
            .map(|(_, answer)| answer.clone())
    }

    /// From now on, answer proxied requests from what was recorded (no upstream).
    pub fn replay(&self, on: bool) {
        self.state.replay.store(on, Ordering::SeqCst);
    }

    /// Puts a manifest into the registry store directly (no HTTP), tagging it when
    /// `tag` is given and indexing it as a referrer when it has a subject.
    pub fn put_manifest(
        &self,
        name: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> String {
        let digest = sha256(&bytes);
        let mut store = self.state.store.lock().unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if let Some(subject) = parsed["subject"]["digest"].as_str() {
            store
                .referrers
                .entry((name.to_owned(), subject.to_owned()))
                .or_default()
                .push(descriptor(media_type, &digest, bytes.len(), &parsed));
        }
        store
            .manifests
            .insert(digest.clone(), (media_type.to_owned(), bytes));
        if let Some(tag) = tag {
            store
                .tags
                .insert((name.to_owned(), tag.to_owned()), digest.clone());
        }
        digest
    }

    /// Puts a blob into the registry store directly.
    pub fn put_blob(&self, bytes: Vec<u8>) -> String {
        let digest = sha256(&bytes);
        self.state
            .store
            .lock()
            .unwrap()
            .blobs
            .insert(digest.clone(), bytes);
        digest
    }

    /// The most requests that were inside their injected latency at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// (path, value) of every `Authorization` header this fake received.
    pub fn authorizations(&self) -> Vec<(String, String)> {
        self.state.authorizations.lock().unwrap().clone()
    }

    /// Forgets the request counts and the most in flight.
    pub fn reset_counts(&self) {
        self.state.counts.lock().unwrap().clear();
        self.state.total.store(0, Ordering::SeqCst);
        self.state.max_in_flight.store(0, Ordering::SeqCst);
    }
}

fn start(state: State) -> Fake {
    let state = Arc::new(state);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let data = web::Data::from(Arc::clone(&state));
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                    .default_service(web::to(handle))
            })
            .workers(2)
            .listen(listener)
            .unwrap()
            .run()
            .await
        })
    });
    Fake { addr, state }
}

/// A referrers-list descriptor of a manifest: with its `artifactType` and, as the
/// distribution spec asks, its `annotations`.
fn descriptor(
    media_type: &str,
    digest: &str,
    size: usize,
    manifest: &serde_json::Value,
) -> serde_json::Value {
    let mut d = json!({"mediaType": media_type, "digest": digest, "size": size,
                       "artifactType": manifest["artifactType"]});
    if let Some(a) = manifest.get("annotations") {
        d["annotations"] = a.clone();
    }
    d
}

fn kind(path: &str) -> &'static str {
    if path.starts_with("/token") {
        "token"
    } else if path.contains("/referrers/") {
        "referrers"
    } else if path.contains("/manifests/") {
        "manifests"
    } else if path.contains("/blobs/") || path.starts_with("/upload/") {
        "blobs"
    } else {
        "other"
    }
}

async fn handle(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    let path = req.path().to_owned();
    let k = if state.upstream.is_some() {
        "proxy"
    } else {
        kind(&path)
    };
    *state
        .counts
        .lock()
        .unwrap()
        .entry(k.to_owned())
        .or_default() += 1;
    state.total.fetch_add(1, Ordering::SeqCst);
    if let Some(value) = req.headers().get("authorization") {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        state
            .authorizations
            .lock()
            .unwrap()
            .push((path.clone(), value));
    }
    let latency = *state.latency.lock().unwrap();
    if !latency.is_zero() {
        struct Leaving<'a>(&'a AtomicU64);
        impl Drop for Leaving<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _leaving = Leaving(&state.in_flight);
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        actix_web::rt::time::sleep(latency).await;
    }
    let fault = state.fault.lock().unwrap().clone();
    if let Some(Fault::RedirectBlobs(to)) = fault.as_ref()
        && kind(&path) == "blobs"
    {
        return HttpResponse::TemporaryRedirect()
            .insert_header(("Location", to.as_str()))
            .finish();
    }
    if let Some(Fault::BodyOnPath(text, code, body)) = fault.as_ref()
        && path.contains(text.as_str())
    {
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(*code).unwrap())
            .content_type("application/json")
            .body(body.as_ref().clone());
    }
    if let Some(Fault::AnswerOnQuery(text, (code, content_type, body))) = fault.as_ref()
        && req
            .uri()
            .path_and_query()
            .is_some_and(|p| p.as_str().contains(text.as_str()))
    {
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(*code).unwrap())
            .content_type(content_type.as_str())
            .body(body.clone());
    }
    if let Some(Fault::RedirectOnPath(text, base)) = fault.as_ref()
        && path.contains(text.as_str())
    {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        return HttpResponse::TemporaryRedirect()
            .insert_header(("Location", format!("{base}{target}")))
            .finish();
    }
    if let Some(Fault::StatusOnWrite(text, code)) = fault.as_ref()
        && path.contains(text.as_str())
        && matches!(req.method().as_str(), "POST" | "PUT" | "PATCH")
    {
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(*code).unwrap())
            .json(json!({"errors": [{"code": "DENIED", "message": "push refused (injected)"}]}));
    }
    if let Some(Fault::StatusOnPath(text, code)) = fault.as_ref()
        && path.contains(text.as_str())
    {
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(*code).unwrap())
            .json(json!({"errors": [{"code": "FAULT", "message": "injected"}]}));
    }
    if let Some(Fault::Status(code, retry)) = fault {
        let mut r = HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap());
        if let Some(s) = retry {
            r.insert_header(("Retry-After", s.to_string()));
        }
        return r.json(json!({"errors": [{"code": "FAULT", "message": "injected"}]}));
    }
    if let Some(upstream) = &state.upstream {
        return proxy(&req, upstream, &state).await;
    }
    registry(&req, &path, body, &state)
}

async fn proxy(req: &HttpRequest, upstream: &str, state: &State) -> HttpResponse {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    if state.replay.load(Ordering::SeqCst) {
        return match state.recorded.lock().unwrap().get(&path).cloned() {
            Some((status, content_type, body)) => {
                HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                    .content_type(content_type)
                    .body(body)
            }
            None => HttpResponse::BadGateway().body("not recorded"),
        };
    }
    let url = format!("{upstream}{path}");
    let answer = match super::client().get(&url).send().await {
        Ok(a) => a,
        Err(e) => return HttpResponse::BadGateway().body(e.to_string()),
    };
    let status = answer.status().as_u16();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let mut body = answer.bytes().await.unwrap_or_default().to_vec();
    if let Some((from, to)) = state.rewrite.lock().unwrap().clone()
        && let Ok(text) = String::from_utf8(body.clone())
    {
        body = text.replace(&from, &to).into_bytes();
    }
    if let Some(transform) = state.transform.lock().unwrap().clone() {
        body = transform(&path, body);
    }
    state
        .recorded
        .lock()
        .unwrap()
        .insert(path, (status, content_type.clone(), body.clone()));
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
        .content_type(content_type)
        .body(body)
}

fn registry(req: &HttpRequest, path: &str, body: web::Bytes, state: &State) -> HttpResponse {
    if path == "/token" {
        if let Some(basic) = &state.basic {
            let got = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if got != Some(basic.as_str()) {
                return HttpResponse::Unauthorized()
                    .json(json!({"errors": [{"code": "UNAUTHORIZED"}]}));
            }
        }
        // A token whose scope grants push is the bearer value with `+push`: writes need it.
        let mut token = state.bearer.clone().unwrap_or_default();
        let scope = url::form_urlencoded::parse(req.query_string().as_bytes())
            .find(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if scope.ends_with(":push") || scope.contains(",push") {
            token.push_str("+push");
        }
        return HttpResponse::Ok().json(json!({"token": token, "expires_in": 300}));
    }
    if let Some(expected) = &state.bearer
        && (path.starts_with("/v2/") || path.starts_with("/upload/"))
    {
        let got = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let push = format!("Bearer {expected}+push");
        let write = matches!(req.method().as_str(), "POST" | "PUT" | "PATCH");
        let granted = got == Some(push.as_str())
            || (!write && got == Some(format!("Bearer {expected}").as_str()));
        if !granted {
            let host = req.connection_info().host().to_owned();
            return HttpResponse::Unauthorized()
                    .insert_header((
                        "WWW-Authenticate",
                        format!(r#"Bearer realm="http://{host}/token",service="fake",scope="repository:x:pull""#),
                    ))
                    .json(json!({"errors": [{"code": "UNAUTHORIZED"}]}));
        }
    }
    if path == "/v2/" {
        return HttpResponse::Ok().json(json!({}));
    }
    let method = req.method().as_str();
    let mut store = state.store.lock().unwrap();
    if let Some(n) = path.strip_prefix("/upload/") {
        let _ = n;
        let digest = req
            .query_string()
            .split('&')
            .find_map(|kv| kv.strip_prefix("digest="))
            .unwrap_or("")
            .replace("%3A", ":");
        if sha256(&body) != digest {
            return HttpResponse::BadRequest().finish();
        }
        store.blobs.insert(digest, body.to_vec());
        return HttpResponse::Created().finish();
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return HttpResponse::NotFound().finish();
    };
    for marker in ["/blobs/uploads/", "/manifests/", "/blobs/", "/referrers/"] {
        let Some(at) = rest.rfind(marker) else {
            continue;
        };
        let name = rest[..at].to_owned();
        let reference = rest[at + marker.len()..].to_owned();
        return match (method, marker) {
            ("POST", "/blobs/uploads/") => {
                store.uploads += 1;
                let location = match state.fault.lock().unwrap().clone() {
                    Some(Fault::UploadLocation(location)) => location,
                    _ => Some(format!("/upload/{}", store.uploads)),
                };
                let mut answer = HttpResponse::Accepted();
                if let Some(location) = location {
                    answer.insert_header(("Location", location));
                }
                answer.finish()
            }
            ("PUT", "/manifests/") => {
                let digest = sha256(&body);
                let media_type = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if let Some(subject) = parsed["subject"]["digest"].as_str() {
                    store
                        .referrers
                        .entry((name.clone(), subject.to_owned()))
                        .or_default()
                        .push(descriptor(&media_type, &digest, body.len(), &parsed));
                }
                store
                    .manifests
                    .insert(digest.clone(), (media_type, body.to_vec()));
                if !reference.starts_with("sha256:") {
                    store.tags.insert((name, reference), digest.clone());
                }
                HttpResponse::Created()
                    .insert_header(("Docker-Content-Digest", digest))
                    .finish()
            }
            ("GET" | "HEAD", "/manifests/") => {
                let digest = if reference.starts_with("sha256:") {
                    Some(reference.clone())
                } else {
                    store.tags.get(&(name, reference)).cloned()
                };
                match digest.and_then(|d| store.manifests.get(&d).map(|m| (d, m.clone()))) {
                    Some((d, (media_type, bytes))) => HttpResponse::Ok()
                        .content_type(media_type)
                        .insert_header(("Docker-Content-Digest", d))
                        .body(bytes),
                    None => HttpResponse::NotFound()
                        .json(json!({"errors": [{"code": "MANIFEST_UNKNOWN"}]})),
                }
            }
            ("GET", "/blobs/") => match store.blobs.get(&reference) {
                Some(b) => HttpResponse::Ok()
                    .content_type("application/octet-stream")
                    .body(b.clone()),
                None => {
                    HttpResponse::NotFound().json(json!({"errors": [{"code": "BLOB_UNKNOWN"}]}))
                }
            },
            ("GET", "/referrers/") if state.referrers_api => {
                let query: HashMap<String, String> =
                    url::form_urlencoded::parse(req.query_string().as_bytes())
                        .into_owned()
                        .collect();
                let page: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
                let all: Vec<serde_json::Value> = store
                    .referrers
                    .get(&(name.clone(), reference.clone()))
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|d| {
                        query
                            .get("artifactType")
                            .is_none_or(|t| d["artifactType"] == t.as_str())
                    })
                    .collect();
                let size = state.page_size.max(1);
                let chunk: Vec<_> = all.iter().skip(page * size).take(size).cloned().collect();
                let mut r = HttpResponse::Ok();
                r.content_type(OCI_INDEX);
                if (page + 1) * size < all.len() {
                    let mut next = url::form_urlencoded::Serializer::new(String::new());
                    if let Some(t) = query.get("artifactType") {
                        next.append_pair("artifactType", t);
                    }
                    next.append_pair("page", &(page + 1).to_string());
                    r.insert_header((
                        "Link",
                        format!(
                            "</v2/{name}/referrers/{reference}?{}>; rel=\"next\"",
                            next.finish()
                        ),
                    ));
                }
                r.body(
                    json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": chunk})
                        .to_string(),
                )
            }
            _ => HttpResponse::NotFound().json(json!({"errors": [{"code": "NOT_FOUND"}]})),
        };
    }
    HttpResponse::NotFound().finish()
}
