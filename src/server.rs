//! The Gatekeeper face: `atcr-verify serve`. An actix-web HTTPS server answering
//! Gatekeeper's external-data requests on `/provide` ([`provider`]), with TLS 1.3 and
//! optional mTLS from files that reload on change ([`tls`]), a request budget, an inbound
//! rate limit, trust-policy hot reload, and `/healthz`, `/readyz` and Prometheus `/metrics`
//! on a separate plain-HTTP port ([`metrics`]).
//!
//! Verifications run on their own tokio runtime, so a verification that outlives its
//! request's budget keeps going and fills the caches for Gatekeeper's retry.

pub mod answers;
pub mod metrics;
pub mod provider;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine as _;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::net::CountingObserver;
use crate::policy::PolicyHolder;
use crate::verify::Verifier;
use answers::Answers;
use metrics::{Counters, EngineSource, Metrics, ReloadCounters};
use provider::{Batch, Outcome, ProviderResponse, RequestError};
use tls::{Tls, TlsSettings};

/// Everything `serve` needs, validated by the CLI.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTPS (or, with `tls: None`, plain HTTP) listen address.
    pub listen: SocketAddr,
    /// Plain-HTTP address of `/healthz`, `/readyz`, `/metrics`.
    pub metrics_listen: SocketAddr,
    /// TLS; `None` only with `--insecure-http`.
    pub tls: Option<TlsSettings>,
    /// Path of the validation endpoint.
    pub provide_path: String,
    /// Path of the mutation (digest pinning) endpoint.
    pub mutate_path: String,
    /// Time allowed for one mutation request (under Gatekeeper's 1 s mutating webhook).
    pub mutate_budget: Duration,
    /// The most one verification may take, background included.
    pub verify_timeout: Duration,
    /// Time allowed for one request before unfinished keys are reported as
    /// `deadline_exceeded`.
    pub budget: Duration,
    /// Keys per request.
    pub max_keys: usize,
    /// Request body size.
    pub max_body: usize,
    /// Verifications running at once.
    pub concurrency: usize,
    /// Of those, how many one request's keys may hold.
    pub request_concurrency: usize,
    /// Requests per second accepted (0: no limit).
    pub inbound_rate: u32,
    /// How often the policy and certificate files are checked for changes.
    pub reload_interval: Duration,
    /// HTTP worker threads.
    pub workers: usize,
    /// Threads verifying.
    pub engine_threads: usize,
}

/// Shared by every handler.
#[derive(Debug)]
pub struct AppState {
    batch: Batch,
    policy: Arc<PolicyHolder>,
    provide_path: String,
    mutate_path: String,
    max_keys: usize,
    max_body: usize,
    mutate_budget: Duration,
    inbound: Option<DefaultDirectRateLimiter>,
    metrics: Arc<Metrics>,
}

/// Health state shared with the plain-HTTP port.
#[derive(Debug)]
struct Health {
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Reads the body up to `max` bytes.
async fn read_body(mut payload: web::Payload, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| format!("bad_request: reading the body: {e}"))?;
        if body.len() + chunk.len() > max {
            return Err(format!("request_too_large: body is over {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Every request to the provider port. The two endpoints are fixed paths, so they are
/// matched by string comparison here rather than by actix's router (pattern matching and
/// method guards cost a twentieth of a cached request).
async fn route(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let path = request.path();
    let provide = if path == state.provide_path {
        true
    } else if path == state.mutate_path {
        false
    } else {
        return refused(StatusCode::NOT_FOUND, "not_found: no such endpoint".into());
    };
    if request.method() != Method::POST {
        return refused(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method_not_allowed: {path} takes POST"),
        );
    }
    if provide {
        let policy = state.policy.load();
        answer("provide", payload, &state, |keys| {
            state.batch.verify(keys, &policy)
        })
        .await
    } else {
        answer("mutate", payload, &state, |keys| {
            state.batch.pin(keys, state.mutate_budget)
        })
        .await
    }
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
    let (status, response, tally) = match accept(payload, state).await {
        Ok(keys) => {
            let outcomes = work(keys).await;
            let tally = Tally::of(&outcomes);
            for &(label, n) in &tally.counts {
                state.metrics.keys(endpoint, label, n);
            }
            (StatusCode::OK, provider::respond(outcomes), tally)
        }
        Err((status, response)) => {
            let tally = Tally {
                counts: Vec::new(),
                admitted: false,
            };
            (status, response, tally)
        }
    };
    let elapsed = started.elapsed();
    let status_code = status.as_u16();
    state
        .metrics
        .request(endpoint, status_code, elapsed.as_secs_f64());
    let system_error = &response.response.system_error;
    let (keys, ms) = (tally.keys(), elapsed.as_millis() as u64);
    let system_error = (!system_error.is_empty()).then_some(system_error.as_str());
    if tally.admitted && system_error.is_none() {
        tracing::debug!(endpoint, status = status_code, keys, outcomes = %tally, system_error, ms, "request");
    } else {
        tracing::info!(endpoint, status = status_code, keys, outcomes = %tally, system_error, ms, "request");
    }
    HttpResponse::build(status).json(response)
}

/// The checks every provider request passes: inbound rate, body size, shape, key count.
/// Returns the distinct keys, or the 4xx answer.
async fn accept(
    payload: web::Payload,
    state: &AppState,
) -> Result<Vec<String>, (StatusCode, ProviderResponse)> {
    let refuse = |status, message: String| Err((status, ProviderResponse::system_error(message)));
    if let Some(limiter) = &state.inbound
        && limiter.check().is_err()
    {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited: inbound request rate over --inbound-rate; ask again".into(),
        );
    }
    let body = match read_body(payload, state.max_body).await {
        Ok(b) => b,
        Err(e) if e.starts_with("request_too_large") => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, e);
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    match provider::parse_request(&body, state.max_keys) {
        Ok(keys) => Ok(keys),
        Err(e @ RequestError::TooManyKeys { .. }) => {
            refuse(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// A JSON answer with one request-level error and no items.
fn refused(status: StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(ProviderResponse::system_error(message))
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
        .body(health.metrics.render())
}

/// Runs the server until it is stopped (SIGINT/SIGTERM).
pub fn run(
    config: ServeConfig,
    verifier: Arc<Verifier>,
    upstream: Arc<CountingObserver>,
    policy: Arc<PolicyHolder>,
) -> Result<(), String> {
    crate::net::install_crypto_provider();
    let engine_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.engine_threads.max(1))
        .thread_name("atcr-verify-engine")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the engine runtime: {e}"))?;
    let cert_counters = Arc::new(ReloadCounters::default());
    let answers = Arc::new(Answers::default());
    let mut metrics = Metrics::new(EngineSource {
        verifier: Arc::clone(&verifier),
        answers: Arc::clone(&answers),
        policy: Arc::clone(&policy),
    });
    metrics.count(Counters {
        upstream,
        certificates: Arc::clone(&cert_counters),
    });
    let metrics = Arc::new(metrics);
    let tls = match &config.tls {
        Some(settings) => Some(Arc::new(
            Tls::new(settings.clone(), cert_counters).map_err(|e| e.to_string())?,
        )),
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
    let inbound = (config.inbound_rate > 0).then(|| {
        let rate =
            std::num::NonZeroU32::new(config.inbound_rate).unwrap_or(std::num::NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(rate))
    });
    let state = web::Data::new(AppState {
        batch: Batch {
            verifier,
            answers: Arc::clone(&answers),
            runtime: engine_runtime.handle().clone(),
            concurrency: Arc::new(Semaphore::new(config.concurrency.max(1))),
            per_request: config
                .request_concurrency
                .clamp(1, config.concurrency.max(1)),
            budget: config.budget,
            verify_timeout: config.verify_timeout,
            verification: metrics.verification(),
        },
        policy: Arc::clone(&policy),
        provide_path: config.provide_path.clone(),
        mutate_path: config.mutate_path.clone(),
        max_keys: config.max_keys,
        max_body: config.max_body,
        mutate_budget: config.mutate_budget,
        inbound,
        metrics: Arc::clone(&metrics),
    });
    let health = web::Data::new(Health {
        ready: AtomicBool::new(false),
        metrics,
    });

    // Reload loop: policy and certificate files.
    {
        let policy = Arc::clone(&policy);
        let tls = tls.clone();
        let interval = config.reload_interval;
        engine_runtime.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match policy.reload_if_changed() {
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

    let app_state = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .default_service(web::to(route))
    })
    .workers(config.workers.max(1))
    // A 100-key answer is ~150 KB: with Nagle's algorithm its last segment waits for the
    // client's delayed ACK (40 ms on Linux).
    .tcp_nodelay(true)
    .client_request_timeout(Duration::from_secs(5));
    let server = match &tls {
        Some(tls) => {
            let rustls_config = tls.server_config().map_err(|e| e.to_string())?;
            server.bind_rustls_0_23(config.listen, rustls_config)
        }
        None => server.bind(config.listen),
    }
    .map_err(|e| format!("listening on {}: {e}", config.listen))?;
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
    .map_err(|e| format!("listening on {}: {e}", config.metrics_listen))?;

    tracing::info!(
        listen = %config.listen,
        metrics = %config.metrics_listen,
        tls = tls.is_some(),
        path = %config.provide_path,
        "atcr-verify serving"
    );
    health.ready.store(true, Ordering::Relaxed);
    let result = actix_web::rt::System::new().block_on(async move {
        futures_util::future::try_join(server.run(), metrics_server.run()).await
    });
    drop(engine_runtime);
    result.map(|_| ()).map_err(|e| format!("server: {e}"))
}
