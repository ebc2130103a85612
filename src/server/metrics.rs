//! Prometheus metrics (`/metrics` on the plain-HTTP health port). Names are
//! `atcr_verify_*`; labels are low-cardinality (endpoint, status, outcome, cache, upstream
//! host, result) and never carry an image reference or a DID.
//!
//! Request, key and latency metrics are recorded as they happen; cache, upstream and
//! reload counters are read from the engine at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::answers::Answers;
use crate::net::CountingObserver;
use crate::policy::PolicyHolder;
use crate::verify::Verifier;
use crate::verify::striped::{STRIPES, Striped, stripe};

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

/// A counter the worker threads add to without sharing a cache line ([`Striped`]).
#[derive(Debug, Clone, Default)]
struct Counter(Arc<Striped>);

impl Counter {
    fn inc(&self) {
        self.0.add(1);
    }

    fn inc_by(&self, n: u64) {
        self.0.add(n);
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.0.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram over [`BUCKETS`], striped like [`Counter`]: each thread observes into its
/// own stripe (bucket counts and sum), a scrape adds the stripes up.
#[derive(Debug, Clone, Default)]
struct Histogram(Arc<[HistogramStripe; STRIPES]>);

#[derive(Debug, Default)]
#[repr(align(128))]
struct HistogramStripe {
    /// Observations per bucket (not cumulative), the last one past the largest bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn observe(&self, v: f64) {
        let Some(stripe) = self.0.get(stripe()) else {
            return;
        };
        let bucket = BUCKETS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(BUCKETS.len());
        if let Some(count) = stripe.buckets.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        // The stripe is this thread's: the exchange succeeds the first time.
        let _ = stripe
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = BUCKETS.iter().copied().chain([f64::INFINITY]);
        let mut buckets: Vec<(f64, u64)> = bounds.map(|b| (b, 0)).collect();
        let mut sum = 0.0;
        for stripe in self.0.iter() {
            for ((_, total), count) in buckets.iter_mut().zip(&stripe.buckets) {
                *total += count.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(stripe.sum.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
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
        let verification = Histogram::default();
        registry.register(
            "atcr_verify_verification_duration_seconds",
            "Time to evaluate one image without a kept answer (from cached facts or upstream)",
            verification.clone(),
        );
        let request_duration = Family::<EndpointLabels, Histogram>::default();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The striped counter and histogram encode what was recorded, from every thread.
    #[test]
    fn striped_metrics_add_up_across_threads() {
        let mut registry = Registry::default();
        let counter = Counter::default();
        let histogram = Histogram::default();
        registry.register("t_requests", "requests", counter.clone());
        registry.register("t_seconds", "seconds", histogram.clone());
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for v in [0.0005, 0.001, 0.02, 0.7, 42.0] {
                        counter.inc();
                        histogram.observe(v);
                    }
                    counter.inc_by(10);
                });
            }
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = |name: &str| -> String {
            let found = text.lines().find(|l| l.starts_with(name));
            found
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        assert_eq!(line("t_requests_total "), "t_requests_total 45");
        assert_eq!(line("t_seconds_count "), "t_seconds_count 15");
        let sum: f64 = line("t_seconds_sum ")["t_seconds_sum ".len()..]
            .parse()
            .unwrap();
        assert!((sum - 3.0 * 42.7215).abs() < 1e-9, "{sum}");
        // Cumulative, bounds inclusive: 0.0005 and 0.001 are both ≤ 1 ms.
        assert_eq!(
            line("t_seconds_bucket{le=\"0.001\"}"),
            "t_seconds_bucket{le=\"0.001\"} 6"
        );
        assert_eq!(
            line("t_seconds_bucket{le=\"0.025\"}"),
            "t_seconds_bucket{le=\"0.025\"} 9"
        );
        assert_eq!(
            line("t_seconds_bucket{le=\"1.0\"}"),
            "t_seconds_bucket{le=\"1.0\"} 12"
        );
        assert_eq!(
            line("t_seconds_bucket{le=\"10.0\"}"),
            "t_seconds_bucket{le=\"10.0\"} 12"
        );
        assert_eq!(
            line("t_seconds_bucket{le=\"+Inf\"}"),
            "t_seconds_bucket{le=\"+Inf\"} 15"
        );
    }
}
