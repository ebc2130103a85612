//! Prometheus metrics (`/metrics` on the plain-HTTP health port). Names are
//! `atcr_verify_*`; labels are low-cardinality (endpoint, status, outcome, cache, upstream
//! host, result) and never carry an image reference or a DID.
//!
//! Request, key and latency metrics are `prometheus-client` families recorded as they
//! happen; cache, upstream and reload counters are read from the engine at scrape time
//! ([`EngineSource`], [`Counters`]).

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

/// The metrics of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    keys: Family<KeyLabels, Counter>,
    verification: Histogram,
    request_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// Registers every metric; `engine` gives the scrape-time cache and policy counters.
    pub fn new(engine: EngineSource) -> Metrics {
        let mut metrics = Metrics::recorded();
        metrics.registry.register_collector(Box::new(engine));
        metrics
    }

    /// The metrics recorded as requests are answered.
    fn recorded() -> Metrics {
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
        let request_duration: Family<EndpointLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram);
        registry.register(
            "atcr_verify_request_duration_seconds",
            "Time to answer one provider request, by endpoint",
            request_duration.clone(),
        );
        Metrics {
            registry,
            requests,
            keys,
            verification,
            request_duration,
        }
    }

    /// Adds the upstream and certificate counters to the page.
    pub fn count(&mut self, counters: Counters) {
        self.registry.register_collector(Box::new(counters));
    }

    /// Adds the follower's counters.
    pub fn follow(&mut self, stats: Arc<crate::follow::FollowStats>) {
        self.registry
            .register_collector(Box::new(FollowSource(stats)));
    }

    /// One request answered.
    pub fn request(&self, endpoint: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
        self.request_duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    /// `n` keys answered with `outcome`.
    pub fn keys(&self, endpoint: &'static str, outcome: &'static str, n: usize) {
        self.keys
            .get_or_create(&KeyLabels { endpoint, outcome })
            .inc_by(n as u64);
    }

    /// The histogram of evaluations without a kept answer (shared: a clone observes into
    /// it).
    pub fn verification(&self) -> Histogram {
        self.verification.clone()
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

/// Where the scrape-time cache and policy counters come from.
#[derive(Debug, Clone)]
pub struct EngineSource {
    /// The engine (cache counters).
    pub verifier: Arc<Verifier>,
    /// The provider's rendered answers (cache counters).
    pub answers: Arc<Answers>,
    /// The policy holder (reload counters).
    pub policy: Arc<PolicyHolder>,
}

/// Where the scrape-time upstream and certificate counters come from.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Upstream requests per host.
    pub upstream: Arc<CountingObserver>,
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

/// A gauge family of `values` (a count each, capped at `i64::MAX`).
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in values {
        ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX))
            .encode(family.encode_family(labels)?)?;
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
        gauge(
            &mut encoder,
            "atcr_verify_cache_entries",
            "Entries held per cache",
            &per_cache(|s| s.len),
        )?;
        gauge(
            &mut encoder,
            "atcr_verify_signature_index_records",
            "Signature records of trusted signers indexed (bounded by --max-indexed)",
            &[(vec![], self.verifier.index().len() as u64)],
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
        Ok(())
    }
}

/// The follower's counters, read at scrape time.
#[derive(Debug)]
struct FollowSource(Arc<crate::follow::FollowStats>);

impl Collector for FollowSource {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let states: Vec<_> = stats
            .states()
            .into_iter()
            .map(|(state, n)| (vec![("state", state.to_owned())], n))
            .collect();
        gauge(
            &mut encoder,
            "atcr_verify_follow_subscriptions",
            "Repo event stream subscriptions by state (connecting, live, backoff)",
            &states,
        )?;
        gauge(
            &mut encoder,
            "atcr_verify_follow_unfollowed_signers",
            "Trusted DIDs not followed because their PDS is past --max-subscriptions (at the last refresh)",
            &[(vec![], stats.over_cap.load(Ordering::Relaxed))],
        )?;
        let events: Vec<_> = stats
            .events()
            .into_iter()
            .map(|(kind, n)| (vec![("type", kind.to_owned())], n))
            .collect();
        counter(
            &mut encoder,
            "atcr_verify_follow_events",
            "Repo stream events seen by type (commit, identity, account, sync, info, error, other)",
            &events,
        )?;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut encoder,
            "atcr_verify_follow_revocations",
            "Signature records and signers forgotten because of a stream event",
            &[(vec![], load(&stats.revocations))],
        )?;
        counter(
            &mut encoder,
            "atcr_verify_follow_bad_frames",
            "Stream frames refused (over the size cap or malformed), and cursors dropped after repeated failures",
            &[(vec![], load(&stats.bad_frames))],
        )?;
        counter(
            &mut encoder,
            "atcr_verify_follow_connects",
            "Repo event streams opened (first connections and reconnections)",
            &[(vec![], load(&stats.connects))],
        )?;
        Ok(())
    }
}

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
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

    /// Requests, keys and latencies encode under the names, labels and buckets the
    /// dashboards use.
    #[test]
    fn requests_keys_and_latencies_are_encoded() {
        let metrics = Metrics::recorded();
        for v in [0.0005, 0.001, 0.02, 0.7, 42.0] {
            metrics.request("provide", 200, v);
        }
        metrics.request("mutate", 413, 0.002);
        metrics.keys("provide", "verified", 3);
        metrics.keys("provide", "verified", 2);
        metrics.verification().observe(0.003);
        let text = metrics.render();
        for line in [
            "atcr_verify_requests_total{endpoint=\"provide\",status=\"200\"} 5",
            "atcr_verify_requests_total{endpoint=\"mutate\",status=\"413\"} 1",
            "atcr_verify_keys_total{endpoint=\"provide\",outcome=\"verified\"} 5",
            "atcr_verify_request_duration_seconds_count{endpoint=\"provide\"} 5",
            // Cumulative, bounds inclusive: 0.0005 and 0.001 are both ≤ 1 ms.
            "atcr_verify_request_duration_seconds_bucket{le=\"0.001\",endpoint=\"provide\"} 2",
            "atcr_verify_request_duration_seconds_bucket{le=\"1.0\",endpoint=\"provide\"} 4",
            "atcr_verify_request_duration_seconds_bucket{le=\"+Inf\",endpoint=\"provide\"} 5",
            "atcr_verify_verification_duration_seconds_bucket{le=\"0.005\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in {text}");
        }
        for help in [
            "# HELP atcr_verify_requests Provider requests by endpoint and HTTP status.",
            "# TYPE atcr_verify_request_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == help), "no {help} in {text}");
        }
    }
}
