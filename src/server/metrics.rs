//! Prometheus metrics (`/metrics` on the plain-HTTP health port). Names are
//! `atcr_verify_*`; labels are low-cardinality (endpoint, status, outcome, cache, upstream
//! host, result) and never carry an image reference or a DID.
//!
//! Request, key and latency metrics are recorded as they happen; cache, upstream and
//! reload counters are read from the engine at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::answers::Answers;
use crate::net::CountingObserver;
use crate::policy::PolicyHolder;
use crate::verify::Verifier;

/// Latency buckets (seconds): 1 ms to 10 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Certificate reload counters, shared with the TLS layer.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    /// Successful reloads.
    pub successes: AtomicU64,
    /// Failed reloads (the previous certificate stays in use).
    pub failures: AtomicU64,
}

/// The provider's endpoints, as metric labels.
pub const ENDPOINTS: [&str; 2] = ["provide", "mutate"];
/// Key outcomes, as metric labels.
pub const OUTCOMES: [&str; 6] = [
    "verified",
    "not_verified",
    "pinned",
    "error",
    "transient",
    "deadline_exceeded",
];

/// The metrics of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    keys: Family<KeyLabels, Counter>,
    verification: Histogram,
    request_duration: Family<EndpointLabels, Histogram>,
    /// Per endpoint, the series every answered request touches, looked up once: answered
    /// (200) requests, request duration, and keys per outcome.
    hot: Vec<Hot>,
}

#[derive(Debug)]
struct Hot {
    endpoint: &'static str,
    answered: Counter,
    duration: Histogram,
    keys: Vec<(&'static str, Counter)>,
}

// Static label sets: recording a request allocates nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Metrics {
    /// Registers every metric; `engine` gives the scrape-time counters.
    pub fn new(engine: EngineSource) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "atcr_verify_requests",
            "Provider requests by endpoint and HTTP status",
            requests.clone(),
        );
        let keys = Family::<KeyLabels, Counter>::default();
        registry.register(
            "atcr_verify_keys",
            "Keys answered, by endpoint and outcome (verified, not_verified, error, transient, deadline_exceeded)",
            keys.clone(),
        );
        let verification = histogram();
        registry.register(
            "atcr_verify_verification_duration_seconds",
            "Time to evaluate one image without a kept answer (from cached facts or upstream)",
            verification.clone(),
        );
        let request_duration = Family::<EndpointLabels, Histogram>::new_with_constructor(
            histogram as fn() -> Histogram,
        );
        registry.register(
            "atcr_verify_request_duration_seconds",
            "Time to answer one provider request, by endpoint",
            request_duration.clone(),
        );
        registry.register_collector(Box::new(engine));
        let hot = ENDPOINTS
            .iter()
            .map(|&endpoint| Hot {
                endpoint,
                answered: requests
                    .get_or_create(&RequestLabels {
                        endpoint,
                        status: 200,
                    })
                    .clone(),
                duration: request_duration
                    .get_or_create(&EndpointLabels { endpoint })
                    .clone(),
                keys: OUTCOMES
                    .iter()
                    .map(|&outcome| {
                        let counter = keys.get_or_create(&KeyLabels { endpoint, outcome });
                        (outcome, counter.clone())
                    })
                    .collect(),
            })
            .collect();
        Metrics {
            registry,
            requests,
            keys,
            verification,
            request_duration,
            hot,
        }
    }

    fn hot(&self, endpoint: &str) -> Option<&Hot> {
        self.hot.iter().find(|h| h.endpoint == endpoint)
    }

    /// One request answered.
    pub fn request(&self, endpoint: &'static str, status: u16, seconds: f64) {
        match self.hot(endpoint) {
            Some(hot) => {
                if status == 200 {
                    hot.answered.inc();
                } else {
                    self.requests
                        .get_or_create(&RequestLabels { endpoint, status })
                        .inc();
                }
                hot.duration.observe(seconds);
            }
            None => {
                self.requests
                    .get_or_create(&RequestLabels { endpoint, status })
                    .inc();
                self.request_duration
                    .get_or_create(&EndpointLabels { endpoint })
                    .observe(seconds);
            }
        }
    }

    /// `n` keys answered with `outcome`.
    pub fn keys(&self, endpoint: &'static str, outcome: &'static str, n: usize) {
        let hot = self
            .hot(endpoint)
            .and_then(|h| h.keys.iter().find(|(o, _)| *o == outcome));
        match hot {
            Some((_, counter)) => counter.inc_by(n as u64),
            None => self
                .keys
                .get_or_create(&KeyLabels { endpoint, outcome })
                .inc_by(n as u64),
        };
    }

    /// One verification took `seconds`.
    pub fn verification(&self, seconds: f64) {
        self.verification.observe(seconds);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Where scrape-time counters come from.
#[derive(Debug, Clone)]
pub struct EngineSource {
    /// The engine (cache counters).
    pub verifier: Arc<Verifier>,
    /// The provider's rendered answers (cache counters).
    pub answers: Arc<Answers>,
    /// Upstream requests per host.
    pub upstream: Arc<CountingObserver>,
    /// The policy holder (reload counters).
    pub policy: Arc<PolicyHolder>,
    /// Certificate reloads.
    pub certificates: Arc<ReloadCounters>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in values {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for EngineSource {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.verifier.stats();
        let caches = [
            ("manifest", stats.manifests),
            ("referrers", stats.referrers),
            ("did_document", stats.documents),
            ("proof", stats.proofs),
            ("answer", self.answers.stats()),
        ];
        let per_cache =
            |f: fn(&crate::verify::CacheStats) -> u64| -> Vec<(Vec<(&str, String)>, u64)> {
                caches
                    .iter()
                    .map(|(name, s)| (vec![("cache", (*name).to_owned())], f(s)))
                    .collect()
            };
        counter(
            &mut encoder,
            "atcr_verify_cache_hits",
            "Answers served from a cache",
            &per_cache(|s| s.hits),
        )?;
        counter(
            &mut encoder,
            "atcr_verify_cache_misses",
            "Answers that needed an upstream load",
            &per_cache(|s| s.misses),
        )?;
        {
            let gauge = ConstGauge::new(0i64);
            let mut family = encoder.encode_descriptor(
                "atcr_verify_cache_entries",
                "Entries held per cache",
                None,
                gauge.metric_type(),
            )?;
            for (name, s) in &caches {
                let labels = vec![("cache", (*name).to_owned())];
                ConstGauge::new(i64::try_from(s.len).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let upstream = self.upstream.snapshot();
        let requests: Vec<_> = upstream
            .iter()
            .map(|(host, (n, _))| (vec![("host", host.clone())], *n))
            .collect();
        let errors: Vec<_> = upstream
            .iter()
            .map(|(host, (_, e))| (vec![("host", host.clone())], *e))
            .collect();
        counter(
            &mut encoder,
            "atcr_verify_upstream_requests",
            "Outbound requests per upstream host",
            &requests,
        )?;
        counter(
            &mut encoder,
            "atcr_verify_upstream_errors",
            "Outbound requests that failed (timeout, connect, 429, 5xx, refused, too large)",
            &errors,
        )?;
        let policy = self.policy.reload_stats();
        counter(
            &mut encoder,
            "atcr_verify_policy_reloads",
            "Trust-policy reloads by result (a failure keeps the last good policy)",
            &[
                (vec![("result", "success".to_owned())], policy.successes),
                (vec![("result", "failure".to_owned())], policy.failures),
            ],
        )?;
        counter(
            &mut encoder,
            "atcr_verify_certificate_reloads",
            "Serving and client-CA certificate reloads by result (a failure keeps the previous one)",
            &[
                (
                    vec![("result", "success".to_owned())],
                    self.certificates.successes.load(Ordering::Relaxed),
                ),
                (
                    vec![("result", "failure".to_owned())],
                    self.certificates.failures.load(Ordering::Relaxed),
                ),
            ],
        )?;
        Ok(())
    }
}
