//! The serving face: `atcr-verify serve`. An actix-web HTTPS server answering
//! Gatekeeper's external-data requests on `/provide` and `/mutate` ([`provider`] is the
//! wire format, [`batch`] runs a request's keys), Kubernetes admission reviews on
//! `/validate` ([`admission`]) and one-image questions from OPA's `http.send` on `/verify`,
//! all through the same engine path, with TLS 1.3 and optional mTLS from files that reload
//! on change ([`tls`]), a request budget, an inbound rate limit, trust-policy hot reload, and
//! `/healthz`, `/readyz` and Prometheus `/metrics` on a separate plain-HTTP port
//! ([`metrics`]).
//!
//! [`configure`] builds the routes over an [`AppState`], so tests can drive them in process;
//! [`run`] wires the configuration, TLS, the reload loop and the two listeners.
//! Verifications run on their own tokio runtime, so a verification that outlives its
//! request's budget keeps going and fills the caches for Gatekeeper's retry.

pub mod admission;
pub mod answers;
pub mod batch;
pub mod metrics;
pub mod provider;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, ResponseError, web};
use base64::Engine as _;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::net::CountingObserver;
use crate::policy::PolicyHolder;
use crate::verify::Verifier;
use admission::WebhookFailure;
use answers::Answers;
use batch::Batch;
use metrics::{Counters, EngineSource, Metrics, ReloadCounters};
use provider::{ErrorBody, Outcome, RequestError};
use tls::{Tls, TlsError, TlsSettings};

/// Everything `serve` needs, validated by the CLI.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTPS (or, with `tls: None`, plain HTTP) listen address.
    pub listen: SocketAddr,
    /// Plain-HTTP address of `/healthz`, `/readyz`, `/metrics`.
    pub metrics_listen: SocketAddr,
    /// TLS; `None` only with `--insecure-http`.
    pub tls: Option<TlsSettings>,
    /// The paths of the two endpoints.
    pub endpoints: Endpoints,
    /// What one request may ask and take.
    pub limits: Limits,
    /// How often the policy and certificate files are checked for changes.
    pub reload_interval: Duration,
    /// HTTP worker threads.
    pub workers: usize,
    /// Threads verifying.
    pub engine_threads: usize,
    /// What `/validate` does when an image cannot be judged now.
    pub webhook_failure: WebhookFailure,
    /// Following trusted signers' repo event streams (`None`: `--no-follow`).
    pub follow: Option<crate::follow::FollowConfig>,
}

/// The paths the server answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The validation endpoint (`/provide`).
    pub provide: String,
    /// The mutation (digest pinning) endpoint (`/mutate`).
    pub mutate: String,
    /// The ValidatingAdmissionWebhook (`/validate`).
    pub validate: String,
    /// One image's verdict for OPA's `http.send` (`/verify`).
    pub verify: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            provide: "/provide".into(),
            mutate: "/mutate".into(),
            validate: "/validate".into(),
            verify: "/verify".into(),
        }
    }
}

/// What one request may ask and take. The defaults are those of `serve`'s flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed for one `/provide` request before unfinished keys are reported as
    /// `deadline_exceeded`.
    pub budget: Duration,
    /// Time allowed for one `/mutate` request (under Gatekeeper's 1 s mutating webhook).
    pub mutate_budget: Duration,
    /// The most one verification may take, background included.
    pub verify_timeout: Duration,
    /// Keys per request.
    pub max_keys: usize,
    /// Request body size, in bytes.
    pub max_body: usize,
    /// Verifications running at once.
    pub concurrency: usize,
    /// Of those, how many one request's keys may hold.
    pub request_concurrency: usize,
    /// Requests per second accepted (0: no limit).
    pub inbound_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            budget: Duration::from_millis(2500),
            mutate_budget: Duration::from_millis(800),
            verify_timeout: Duration::from_secs(30),
            max_keys: 1000,
            max_body: 1024 * 1024,
            concurrency: 128,
            request_concurrency: 32,
            inbound_rate: 500,
        }
    }
}

/// What the provider's handlers share: the batch scheduler, the policy, the limits and
/// the metrics.
#[derive(Debug)]
pub struct AppState {
    batch: Batch,
    policy: Arc<PolicyHolder>,
    max_keys: usize,
    max_body: usize,
    mutate_budget: Duration,
    inbound: Option<DefaultDirectRateLimiter>,
    metrics: Metrics,
    webhook_failure: WebhookFailure,
}

impl AppState {
    /// The state of a provider answering with `verifier` under `policy`, within `limits`.
    /// Verifications are spawned on `engine`: `run` gives them a runtime of their own,
    /// tests the one they run on.
    pub fn new(
        verifier: Arc<Verifier>,
        policy: Arc<PolicyHolder>,
        limits: Limits,
        engine: tokio::runtime::Handle,
    ) -> AppState {
        let answers = Arc::new(Answers::new(Arc::clone(verifier.revocations())));
        let metrics = Metrics::new(EngineSource {
            verifier: Arc::clone(&verifier),
            answers: Arc::clone(&answers),
            policy: Arc::clone(&policy),
        });
        let concurrency = limits.concurrency.max(1);
        let inbound = std::num::NonZeroU32::new(limits.inbound_rate)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        AppState {
            batch: Batch {
                verifier,
                answers,
                runtime: engine,
                concurrency: Arc::new(Semaphore::new(concurrency)),
                per_request: limits.request_concurrency.clamp(1, concurrency),
                budget: limits.budget,
                verify_timeout: limits.verify_timeout,
                verification: metrics.verification(),
            },
            policy,
            max_keys: limits.max_keys,
            max_body: limits.max_body,
            mutate_budget: limits.mutate_budget,
            inbound,
            metrics,
            webhook_failure: WebhookFailure::default(),
        }
    }

    /// Sets what `/validate` does when an image cannot be judged now.
    pub fn with_webhook_failure(mut self, failure: WebhookFailure) -> AppState {
        self.webhook_failure = failure;
        self
    }

    /// Adds the follower's subscription and event counters to `/metrics`.
    pub fn with_follow_stats(mut self, stats: Arc<crate::follow::FollowStats>) -> AppState {
        self.metrics.follow(stats);
        self
    }

    /// Adds the upstream and certificate counters to `/metrics`.
    pub fn with_counters(mut self, counters: Counters) -> AppState {
        self.metrics.count(counters);
        self
    }

    /// The `/metrics` page now.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// The inbound rate limit (`--inbound-rate`), which every request passes first.
    fn admit(&self) -> Result<(), RequestError> {
        match &self.inbound {
            Some(limiter) if limiter.check().is_err() => Err(RequestError::RateLimited),
            _ => Ok(()),
        }
    }

    /// Counts a request's keys by outcome in the metrics of `endpoint`.
    fn tally(&self, endpoint: &'static str, outcomes: &[(String, Outcome)]) -> Tally {
        let tally = Tally::of(outcomes);
        for &(label, n) in &tally.counts {
            self.metrics.keys(endpoint, label, n);
        }
        tally
    }
}

/// The server's routes: `POST` on `/provide`, `/mutate` and `/validate`, `GET` on
/// `/verify`; any other method there answers 405 and any other path 404, each with a JSON
/// `ProviderResponse` saying so.
pub fn configure(
    state: web::Data<AppState>,
    endpoints: &Endpoints,
) -> impl FnOnce(&mut web::ServiceConfig) + use<> {
    let Endpoints {
        provide,
        mutate,
        validate,
        verify,
    } = endpoints.clone();
    move |config| {
        config
            .app_data(state)
            .service(
                web::resource(provide)
                    .route(web::post().to(provide_handler))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource(mutate)
                    .route(web::post().to(mutate_handler))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource(validate)
                    .route(web::post().to(validate_handler))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource(verify)
                    .route(web::get().to(verify_handler))
                    .default_service(web::to(method_not_allowed)),
            )
            .default_service(web::to(not_found));
    }
}

async fn provide_handler(payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    let policy = state.policy.load();
    answer("provide", payload, &state, |keys| {
        state.batch.verify(keys, &policy)
    })
    .await
}

async fn mutate_handler(payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    answer("mutate", payload, &state, |keys| {
        state.batch.pin(keys, state.mutate_budget)
    })
    .await
}

/// `/validate`: an `AdmissionReview` in, an `AdmissionReview` out (HTTP 200), or a 4xx
/// with an error JSON when the review cannot be read.
async fn validate_handler(payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    const ENDPOINT: &str = "validate";
    let started = Instant::now();
    let parsed = accept(payload, &state, |body| {
        admission::parse_review(body, state.max_keys)
    })
    .await;
    let response = match parsed {
        Ok(review) => {
            let policy = state.policy.load();
            let outcomes = state.batch.verify(review.images, &policy).await;
            let tally = state.tally(ENDPOINT, &outcomes);
            let answer = admission::respond(review.uid, &outcomes, state.webhook_failure);
            let (allowed, dry_run) = (answer.response.allowed, review.dry_run);
            let message = answer.response.status.as_ref().map(|s| s.message.as_str());
            let ms = started.elapsed().as_millis() as u64;
            if tally.admitted {
                tracing::debug!(endpoint = ENDPOINT, allowed, dry_run, outcomes = %tally, ms, "admission review");
            } else {
                tracing::info!(endpoint = ENDPOINT, allowed, dry_run, outcomes = %tally, message, ms, "admission review");
            }
            HttpResponse::Ok().json(answer)
        }
        Err(refused) => {
            tracing::info!(endpoint = ENDPOINT, status = refused.status_code().as_u16(), error = %refused, "request refused");
            refused.error_json()
        }
    };
    state.metrics.request(
        ENDPOINT,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The query of `/verify`.
#[derive(Debug, serde::Deserialize)]
struct VerifyQuery {
    image: Option<String>,
}

/// `/verify?image=REF`: the verdict JSON with 200 (admitted) or 403 (denied); a failure
/// as an error JSON with 400 (bad or missing reference), 404 (no such image), 502 (the
/// registry's answer is unusable), 503 (transient: ask again).
async fn verify_handler(request: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    const ENDPOINT: &str = "verify";
    let started = Instant::now();
    let response = match verify_query(&request, &state) {
        Ok(image) => {
            let policy = state.policy.load();
            let outcomes = state.batch.verify(vec![image], &policy).await;
            state.tally(ENDPOINT, &outcomes);
            match outcomes.into_iter().next().map(|(_, o)| o) {
                Some(Outcome::Answered(verdict)) => {
                    let status = if verdict.deny {
                        StatusCode::FORBIDDEN
                    } else {
                        StatusCode::OK
                    };
                    HttpResponse::build(status)
                        .content_type("application/json")
                        .body(verdict.value.get().to_owned())
                }
                Some(Outcome::Permanent { code, message }) => {
                    let status = match code {
                        "invalid_reference" => StatusCode::BAD_REQUEST,
                        "not_found" => StatusCode::NOT_FOUND,
                        _ => StatusCode::BAD_GATEWAY,
                    };
                    HttpResponse::build(status).json(ErrorBody::new(code, message, false))
                }
                Some(Outcome::Transient { code, message }) => {
                    HttpResponse::ServiceUnavailable().json(ErrorBody::new(code, message, true))
                }
                None => HttpResponse::ServiceUnavailable().json(ErrorBody::new(
                    "internal_error",
                    "no outcome".into(),
                    true,
                )),
            }
        }
        Err(refused) => refused.error_json(),
    };
    let status = response.status().as_u16();
    let ms = started.elapsed().as_millis() as u64;
    if status == 200 {
        tracing::debug!(endpoint = ENDPOINT, status, ms, "request");
    } else {
        tracing::info!(endpoint = ENDPOINT, status, ms, "request");
    }
    state
        .metrics
        .request(ENDPOINT, status, started.elapsed().as_secs_f64());
    response
}

/// The image `/verify` is asked about, after the inbound rate limit.
fn verify_query(request: &HttpRequest, state: &AppState) -> Result<String, RequestError> {
    state.admit()?;
    let query = web::Query::<VerifyQuery>::from_query(request.query_string())
        .map_err(|e| RequestError::BadQuery(crate::syntax::text::outside(&e.to_string())))?;
    match query.into_inner().image {
        Some(image) if !image.is_empty() => Ok(image),
        _ => Err(RequestError::BadQuery(
            "the image query parameter is required: /verify?image=REF".into(),
        )),
    }
}

async fn not_found() -> Result<HttpResponse, RequestError> {
    Err(RequestError::NotFound)
}

async fn method_not_allowed(request: HttpRequest) -> Result<HttpResponse, RequestError> {
    Err(RequestError::MethodNotAllowed(request.path().to_owned()))
}

/// Keys per outcome label in first-seen order (logged as `{verified: 2, error: 1}`), and
/// whether every key was admitted.
struct Tally {
    counts: Vec<(&'static str, usize)>,
    admitted: bool,
}

impl Tally {
    fn of(outcomes: &[(String, Outcome)]) -> Tally {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for (_, outcome) in outcomes {
            let label = outcome.label();
            match counts.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => counts.push((label, 1)),
            }
        }
        Tally {
            counts,
            admitted: outcomes.iter().all(|(_, o)| o.is_admitted()),
        }
    }

    fn keys(&self) -> usize {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, (label, n)) in self.counts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{label}: {n}")?;
        }
        f.write_str("}")
    }
}

/// Accepts a provider request, runs `work` on its keys, answers, and records the request
/// in metrics and in one log event with its keys' outcomes: at INFO when a key was denied
/// or failed or the request was refused, at DEBUG when every key was admitted.
async fn answer<F, Fut>(
    endpoint: &'static str,
    payload: web::Payload,
    state: &AppState,
    work: F,
) -> HttpResponse
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = Vec<(String, Outcome)>>,
{
    let started = Instant::now();
    let (status, response, tally) = match accept(payload, state, |body| {
        provider::parse_request(body, state.max_keys)
    })
    .await
    {
        Ok(keys) => {
            let outcomes = work(keys).await;
            let tally = state.tally(endpoint, &outcomes);
            (StatusCode::OK, Ok(provider::respond(outcomes)), tally)
        }
        Err(refused) => {
            let tally = Tally {
                counts: Vec::new(),
                admitted: false,
            };
            (refused.status_code(), Err(refused), tally)
        }
    };
    let elapsed = started.elapsed();
    let status_code = status.as_u16();
    state
        .metrics
        .request(endpoint, status_code, elapsed.as_secs_f64());
    let (keys, ms) = (tally.keys(), elapsed.as_millis() as u64);
    let refusal = response.as_ref().err().map(ToString::to_string);
    let system_error = match &response {
        Ok(r) if !r.response.system_error.is_empty() => Some(r.response.system_error.as_str()),
        Ok(_) => None,
        Err(_) => refusal.as_deref(),
    };
    if tally.admitted && system_error.is_none() {
        tracing::debug!(endpoint, status = status_code, keys, outcomes = %tally, system_error, ms, "request");
    } else {
        tracing::info!(endpoint, status = status_code, keys, outcomes = %tally, system_error, ms, "request");
    }
    match response {
        Ok(response) => HttpResponse::Ok().json(response),
        Err(refused) => refused.error_response(),
    }
}

/// The checks every request with a body passes: inbound rate, body size, then `parse`
/// (shape, key count). Returns what `parse` read, or the 4xx answer.
async fn accept<T>(
    payload: web::Payload,
    state: &AppState,
    parse: impl FnOnce(&[u8]) -> Result<T, RequestError>,
) -> Result<T, RequestError> {
    state.admit()?;
    let body = read_body(payload, state.max_body).await?;
    parse(&body)
}

/// Reads the body up to `max` bytes.
async fn read_body(mut payload: web::Payload, max: usize) -> Result<Vec<u8>, RequestError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| RequestError::BodyRead(e.to_string()))?;
        if body.len() + chunk.len() > max {
            return Err(RequestError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Health state shared with the plain-HTTP port.
#[derive(Debug)]
struct Health {
    ready: AtomicBool,
    state: web::Data<AppState>,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok\n")
}

async fn readyz(health: web::Data<Health>) -> HttpResponse {
    if health.ready.load(Ordering::Relaxed) {
        HttpResponse::Ok().body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable().body("not ready\n")
    }
}

async fn metrics_page(health: web::Data<Health>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(health.state.metrics_text())
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A listen address is taken or not allowed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine's runtime did not start.
    #[error("starting the engine runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The server failed while running.
    #[error("server: {0}")]
    Server(#[source] std::io::Error),
    /// The certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Runs the server until it is stopped (SIGINT/SIGTERM).
pub fn run(
    config: ServeConfig,
    verifier: Arc<Verifier>,
    upstream: Arc<CountingObserver>,
    policy: Arc<PolicyHolder>,
) -> Result<(), ServeError> {
    crate::net::install_crypto_provider();
    let engine_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.engine_threads.max(1))
        .thread_name("atcr-verify-engine")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let certificates = Arc::new(ReloadCounters::default());
    let tls = match &config.tls {
        Some(settings) => Some(Arc::new(Tls::new(
            settings.clone(),
            Arc::clone(&certificates),
        )?)),
        None => {
            tracing::warn!(
                "--insecure-http: serving plain HTTP; Gatekeeper refuses http:// providers, use this locally only"
            );
            None
        }
    };
    if let Some(ca) = tls.as_ref().and_then(|t| t.generated_ca_pem.as_ref()) {
        let bundle = base64::engine::general_purpose::STANDARD.encode(ca);
        eprintln!("atcr-verify: no --tls-cert given; serving a generated certificate.");
        eprintln!("atcr-verify: Provider caBundle (base64 of the generated CA):\n{bundle}");
    }
    let mut state = AppState::new(
        Arc::clone(&verifier),
        Arc::clone(&policy),
        config.limits.clone(),
        engine_runtime.handle().clone(),
    )
    .with_webhook_failure(config.webhook_failure)
    .with_counters(Counters {
        upstream,
        certificates,
    });
    if let Some(follow) = &config.follow {
        let follower = crate::follow::Follower::new(
            Arc::clone(&verifier),
            Arc::clone(&policy),
            follow.clone(),
        );
        state = state.with_follow_stats(follower.stats());
        engine_runtime.spawn(follower.run());
    } else {
        tracing::info!("--no-follow: revocations are noticed when the caches expire");
    }
    let state = web::Data::new(state);
    let health = web::Data::new(Health {
        ready: AtomicBool::new(false),
        state: state.clone(),
    });

    // Reload loop: policy and certificate files.
    {
        let policy = Arc::clone(&policy);
        let tls = tls.clone();
        let interval = config.reload_interval;
        let revocations = Arc::clone(verifier.revocations());
        engine_runtime.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A signer trusted again (or a signature collection added) must not count
                // proofs cached before: changes made while it was not trusted were not
                // followed. Forgotten before the new policy is in force.
                let forget = |old: &crate::policy::TrustPolicy,
                              new: &crate::policy::TrustPolicy| {
                    use crate::follow::frame::Interest;
                    for did in Interest::of(new).joined_since(&Interest::of(old)) {
                        revocations.revoke_did(&did);
                    }
                };
                match policy.reload_if_changed_with(forget) {
                    crate::policy::ReloadOutcome::Reloaded => {
                        tracing::info!("trust policy reloaded")
                    }
                    crate::policy::ReloadOutcome::Failed(e) => {
                        tracing::warn!("trust policy not reloaded, keeping the last good one: {e}")
                    }
                    _ => {}
                }
                if let Some(tls) = &tls {
                    tls.reload_if_changed();
                }
            }
        });
    }

    let endpoints = config.endpoints.clone();
    let server =
        HttpServer::new(move || App::new().configure(configure(state.clone(), &endpoints)))
            .workers(config.workers.max(1))
            // A 100-key answer is ~150 KB: with Nagle's algorithm its last segment waits for the
            // client's delayed ACK (40 ms on Linux).
            .tcp_nodelay(true)
            .client_request_timeout(Duration::from_secs(5));
    let server = match &tls {
        Some(tls) => {
            let rustls_config = tls.server_config()?;
            server.bind_rustls_0_23(config.listen, rustls_config)
        }
        None => server.bind(config.listen),
    }
    .map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let health_state = health.clone();
    let metrics_server = HttpServer::new(move || {
        App::new()
            .app_data(health_state.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_page))
    })
    .workers(1)
    .bind(config.metrics_listen)
    .map_err(|source| ServeError::Listen {
        addr: config.metrics_listen,
        source,
    })?;

    tracing::info!(
        listen = %config.listen,
        metrics = %config.metrics_listen,
        tls = tls.is_some(),
        provide = %config.endpoints.provide,
        mutate = %config.endpoints.mutate,
        validate = %config.endpoints.validate,
        verify = %config.endpoints.verify,
        "atcr-verify serving"
    );
    health.ready.store(true, Ordering::Relaxed);
    let result = actix_web::rt::System::new().block_on(async move {
        futures_util::future::try_join(server.run(), metrics_server.run()).await
    });
    drop(engine_runtime);
    result.map(|_| ()).map_err(ServeError::Server)
}
