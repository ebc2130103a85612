//! The one outbound HTTP client: timeouts, size caps, address rules, redirects and rate
//! limits for every request the verifier makes (registries, PLC, did:web hosts, PDSes).
//!
//! Owns transport safety only; what a status code *means* is up to the caller
//! ([`crate::resolve`]). Every failure is a [`FetchError`] that says whether it is
//! transient (worth asking again soon) or permanent.

mod guard;
mod limit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use url::Url;

pub use guard::{Guard, Refusal, is_public};
pub use limit::HostLimiter;

/// Outbound settings (all exposed as flags by the faces).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Address and scheme rules.
    pub guard: Guard,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Time allowed for a whole request, body included.
    pub request_timeout: Duration,
    /// Redirects followed per request (each target re-checked).
    pub max_redirects: usize,
    /// Requests per second allowed to one upstream host.
    pub per_host_rate: u32,
    /// Burst allowed above the rate.
    pub per_host_burst: u32,
    /// Longest `Retry-After` (or local rate-limit wait) honoured before answering
    /// "rate limited".
    pub max_retry_wait: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            guard: Guard::default(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            max_redirects: 3,
            per_host_rate: 50,
            per_host_burst: 100,
            max_retry_wait: Duration::from_secs(1),
        }
    }
}

/// Why a request produced no usable response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Connecting failed (refused, reset, DNS failure).
    #[error("{url}: cannot connect: {reason}")]
    Connect {
        /// The URL requested.
        url: String,
        /// The transport's message.
        reason: String,
    },
    /// The upstream answered 429, or the local per-host limit would wait too long.
    #[error("{url}: rate limited{}", retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// The URL requested.
        url: String,
        /// How long the upstream asked to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The outbound rules refuse this URL or every address its name resolves to.
    #[error("{url}: refused: {reason}")]
    Refused {
        /// The URL requested.
        url: String,
        /// Which rule.
        reason: String,
    },
    /// The upstream failed with a server error.
    #[error("{url}: upstream answered HTTP {status}")]
    ServerError {
        /// The URL requested.
        url: String,
        /// The status.
        status: u16,
    },
    /// No complete answer within the timeout.
    #[error("{url}: no answer within {}ms", timeout.as_millis())]
    Timeout {
        /// The URL requested.
        url: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The response body is over the cap for what was asked.
    #[error("{url}: response is over the {cap}-byte limit")]
    TooLarge {
        /// The URL requested.
        url: String,
        /// The cap.
        cap: usize,
    },
    /// Another transport failure (body cut short, protocol error, too many redirects).
    #[error("{url}: {reason}")]
    Transport {
        /// The URL requested.
        url: String,
        /// The transport's message.
        reason: String,
    },
}

impl FetchError {
    /// Whether asking again later may succeed (timeouts, refused connections, 429, 5xx).
    /// Refusals by the outbound rules and oversized responses are permanent.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            FetchError::Refused { .. } | FetchError::TooLarge { .. }
        )
    }
}

/// The most of a non-success answer's body that is read (enough for any XRPC or OCI error
/// JSON); the rest is dropped unread.
pub const MAX_ERROR_BODY: usize = 16 * 1024;

/// A response read in full (within its cap), or, for a status other than 2xx, its first
/// [`MAX_ERROR_BODY`] bytes.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The status (never 429 or 5xx: those are errors).
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

/// Observes each outbound request. The server face exports these as metrics.
pub trait NetObserver: Send + Sync + std::fmt::Debug {
    /// One request to `host` finished after `elapsed`; `error` is set when it failed.
    fn request_done(&self, host: &str, elapsed: Duration, error: Option<&FetchError>);
}

/// The guarded HTTP client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    config: Arc<NetConfig>,
    limiter: Arc<HostLimiter>,
    observer: Option<Arc<dyn NetObserver>>,
}

/// Installs rustls' ring provider as the process default (idempotent). Every TLS user in
/// the process (this client, the server) goes through it.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl HttpClient {
    /// Builds the client.
    pub fn new(config: NetConfig) -> Result<Self, FetchError> {
        install_crypto_provider();
        let guard = Arc::new(config.guard.clone());
        let redirect_guard = Arc::clone(&guard);
        let max_redirects = config.max_redirects;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(Refusal(format!("more than {max_redirects} redirects")));
            }
            match redirect_guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refusal) => attempt.error(refusal),
            }
        });
        let inner = reqwest::Client::builder()
            .user_agent(concat!("atcr-verify/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirect(policy)
            .dns_resolver(Arc::new(guard.resolver()))
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(60))
            // After a burst, keep a few warm connections per host, not one per request
            // that ran concurrently (each holds buffers).
            .pool_max_idle_per_host(8)
            .build()
            .map_err(|e| FetchError::Transport {
                url: String::new(),
                reason: format!("building the HTTP client: {e}"),
            })?;
        let limiter = Arc::new(HostLimiter::new(
            config.per_host_rate,
            config.per_host_burst,
        ));
        Ok(HttpClient {
            inner,
            config: Arc::new(config),
            limiter,
            observer: None,
        })
    }

    /// Reports every request to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn NetObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The settings in force.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// GETs `url` with `headers`, reading at most `cap` body bytes. 429 and 5xx are errors;
    /// every other status is returned for the caller to interpret. One 429 whose
    /// `Retry-After` fits within `max_retry_wait` is waited out and retried.
    pub async fn get(
        &self,
        url: &Url,
        headers: HeaderMap,
        cap: usize,
    ) -> Result<Fetched, FetchError> {
        self.request(Method::GET, url, headers, None, cap).await
    }

    /// Sends `method` to `url` with `headers` and `body` (the writes of `atcr-verify sign`:
    /// XRPC POSTs, registry uploads), under the same rules as [`HttpClient::get`]: the
    /// outbound guard, the per-host limit, the timeout, `cap` on the answer, 429 and 5xx as
    /// errors. A 429 is retried as for GET: the upstream did not process the request.
    pub async fn request(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
        cap: usize,
    ) -> Result<Fetched, FetchError> {
        let mut retried = false;
        loop {
            match self
                .request_once(method.clone(), url, headers.clone(), body.clone(), cap)
                .await
            {
                Err(FetchError::RateLimited {
                    retry_after: Some(wait),
                    ..
                }) if !retried && wait <= self.config.max_retry_wait => {
                    retried = true;
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn request_once(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
        cap: usize,
    ) -> Result<Fetched, FetchError> {
        let host = url.host_str().unwrap_or("").to_owned();
        let started = Instant::now();
        let result = self.send(method, url, headers, body, cap, &host).await;
        if let Some(observer) = &self.observer {
            observer.request_done(&host, started.elapsed(), result.as_ref().err());
        }
        result
    }

    async fn send(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
        cap: usize,
        host: &str,
    ) -> Result<Fetched, FetchError> {
        let url_text = redact(url);
        self.config
            .guard
            .check_url(url)
            .map_err(|r| FetchError::Refused {
                url: url_text.clone(),
                reason: r.0,
            })?;
        let key = match url.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        self.limiter
            .acquire(&key, self.config.max_retry_wait)
            .await
            .map_err(|()| FetchError::RateLimited {
                url: url_text.clone(),
                retry_after: None,
            })?;
        let timeout = self.config.request_timeout;
        let work = async {
            let mut request = self.inner.request(method, url.clone()).headers(headers);
            if let Some(body) = body {
                request = request.body(body);
            }
            let mut response = request
                .send()
                .await
                .map_err(|e| classify(&url_text, timeout, e))?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(FetchError::RateLimited {
                    url: url_text.clone(),
                    retry_after: retry_after(response.headers().get(RETRY_AFTER)),
                });
            }
            if status.is_server_error() {
                return Err(FetchError::ServerError {
                    url: url_text.clone(),
                    status: status.as_u16(),
                });
            }
            // An answer other than success is read only as far as an error body needs:
            // its text is the upstream's choice, and a long one says nothing more.
            if !status.is_success() {
                let mut body = Vec::new();
                while body.len() < MAX_ERROR_BODY
                    && let Some(chunk) = response
                        .chunk()
                        .await
                        .map_err(|e| classify(&url_text, timeout, e))?
                {
                    let room = MAX_ERROR_BODY - body.len();
                    body.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or(&chunk));
                }
                return Ok(Fetched {
                    status,
                    headers: response.headers().clone(),
                    body,
                });
            }
            let too_large = || FetchError::TooLarge {
                url: url_text.clone(),
                cap,
            };
            if response.content_length().is_some_and(|n| n > cap as u64) {
                return Err(too_large());
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| classify(&url_text, timeout, e))?
            {
                if body.len().saturating_add(chunk.len()) > cap {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Fetched {
                status,
                headers: response.headers().clone(),
                body,
            })
        };
        // reqwest's own timeout covers the request; this one also bounds the body loop.
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                url: url_text,
                timeout,
            }),
        }
    }
}

/// The URL without its query and fragment (which may hold tokens), for messages: the one
/// place URLs are made fit to show.
pub(crate) fn redact(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

fn classify(url: &str, timeout: Duration, e: reqwest::Error) -> FetchError {
    // The guard's refusal travels inside the transport error: find it.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(refusal) = s.downcast_ref::<Refusal>() {
            return FetchError::Refused {
                url: url.to_owned(),
                reason: refusal.0.clone(),
            };
        }
        source = s.source();
    }
    // Without the URL: after a redirect it can be a presigned URL carrying a signature.
    let (timed_out, connect) = (e.is_timeout(), e.is_connect());
    let reason = error_chain(&e.without_url());
    if timed_out {
        FetchError::Timeout {
            url: url.to_owned(),
            timeout,
        }
    } else if connect {
        FetchError::Connect {
            url: url.to_owned(),
            reason,
        }
    } else {
        FetchError::Transport {
            url: url.to_owned(),
            reason,
        }
    }
}

/// The transport's messages, made inert: they can quote what the peer sent.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    crate::syntax::text::outside(&text)
}

/// `Retry-After` in delta-seconds (the HTTP-date form is treated as unknown).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Distinct hosts [`CountingObserver`] counts separately.
const MAX_COUNTED_HOSTS: usize = 256;

/// Counts requests per host (the first 256 hosts, the rest as `other`); the server's
/// upstream metrics and the tests read it.
#[derive(Debug, Default)]
pub struct CountingObserver {
    hosts: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

impl CountingObserver {
    /// `(requests, errors)` per host so far.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        self.hosts.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl NetObserver for CountingObserver {
    fn request_done(&self, host: &str, _elapsed: Duration, error: Option<&FetchError>) {
        if let Ok(mut hosts) = self.hosts.lock() {
            // Hosts come from Pod specs and DID documents: past a bound, count the rest
            // together so the metrics stay small.
            let host = if hosts.contains_key(host) || hosts.len() < MAX_COUNTED_HOSTS {
                host
            } else {
                "other"
            };
            let entry = hosts.entry(host.to_owned()).or_default();
            entry.0 += 1;
            entry.1 += u64::from(error.is_some());
        }
    }
}
