//! The flags that build the verification engine, shared by every face that verifies
//! (`image` and `serve`): outbound rules, timeouts, rate limits, caches, credentials.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::net::{CountingObserver, Guard, HttpClient, NetConfig};
use crate::proof::CarLimits;
use crate::resolve::{
    DidResolver, DockerConfig, HttpDidResolver, HttpRecordSource, HttpRegistry, PlcTrust,
    RecordSource, Registry, RegistryConfig,
};
use crate::syntax::{canonical_registry, check_registry, split_port};
use crate::verify::{Revisions, Verifier, VerifierConfig};

/// Resolver, network and cache flags.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// PLC directory that resolves did:plc identities.
    #[arg(
        long,
        value_name = "URL",
        default_value = "https://plc.directory",
        env = "ATCR_VERIFY_PLC_URL"
    )]
    pub plc_url: Url,
    /// What a did:plc identity is taken from: `log` (its signed operation log, fetched
    /// beside the document and checked against the DID; the directory is only a mirror)
    /// or `directory` (the document as the directory serves it, for a mirror without
    /// `/log/audit`).
    #[arg(
        long,
        value_name = "log|directory",
        default_value = "log",
        value_parser = str::parse::<PlcTrust>,
        env = "ATCR_VERIFY_PLC_TRUST"
    )]
    pub plc_trust: PlcTrust,
    /// Allow loopback, private, link-local and metadata addresses, and plain http:// to
    /// PDS and PLC hosts. For local testing only.
    #[arg(long, env = "ATCR_VERIFY_ALLOW_PRIVATE_ADDRESSES")]
    pub allow_private_addresses: bool,
    /// A registry (HOST:PORT) spoken to over plain HTTP, also allowed on private
    /// addresses. Repeatable; in the environment, a comma-separated list.
    #[arg(
        long = "insecure-registry",
        value_name = "HOST:PORT",
        env = "ATCR_VERIFY_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a Docker config.json (the `.dockerconfigjson` key of a
    /// kubernetes.io/dockerconfigjson secret).
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_REGISTRY_CONFIG")]
    pub registry_config: Option<PathBuf>,
    /// Time allowed to connect to an upstream.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_CONNECT_TIMEOUT"
    )]
    pub connect_timeout: Duration,
    /// Time allowed for one upstream request, body included.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_REQUEST_TIMEOUT"
    )]
    pub request_timeout: Duration,
    /// Requests per second to one upstream host (burst: twice this).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        env = "ATCR_VERIFY_UPSTREAM_RATE"
    )]
    pub upstream_rate: u32,
    /// Longest Retry-After (429) or local rate-limit wait honoured before answering
    /// "rate limited".
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_MAX_RETRY_WAIT"
    )]
    pub max_retry_wait: Duration,
    /// How long a tag → digest answer is reused.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_TAG_TTL"
    )]
    pub tag_ttl: Duration,
    /// How long the signature artifacts of a digest are reused.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "5m",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_REFERRERS_TTL"
    )]
    pub referrers_ttl: Duration,
    /// How long a DID document is reused.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "5m",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_DID_TTL"
    )]
    pub did_ttl: Duration,
    /// How long a proof outcome is reused: the bound on how late a deleted record
    /// (a revoked signature) is noticed.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10m",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_PROOF_TTL"
    )]
    pub proof_ttl: Duration,
    /// How long a permanent failure (not found, invalid) is reused.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_NEGATIVE_TTL"
    )]
    pub negative_ttl: Duration,
    /// How long a transient failure (timeout, 5xx, 429) is reused.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_TRANSIENT_TTL"
    )]
    pub transient_ttl: Duration,
    /// Entries per cache.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20_000,
        env = "ATCR_VERIFY_CACHE_ENTRIES"
    )]
    pub cache_entries: usize,
    /// Signatures proven per image at most (those of DIDs the matched policy trusts, each
    /// signer in turn); the rest are reported `not checked`.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 32,
        env = "ATCR_VERIFY_MAX_SIGNATURES"
    )]
    pub max_signatures: usize,
    /// Signature artifacts whose pointers (signer DID, record URI) are read per image at
    /// most, in the registry's listing order.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::resolve::DEFAULT_MAX_POINTERS,
        env = "ATCR_VERIFY_MAX_POINTERS"
    )]
    pub max_pointers: usize,
    /// Directory where each signer's highest proven repo rev is kept across restarts
    /// (`revisions.json`, rewritten atomically when a rev rises), so that a replay of an old
    /// repo state is refused after a restart too. Without it they are kept in memory only.
    #[arg(long, value_name = "DIR", env = "ATCR_VERIFY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// A built engine and its request counters.
#[derive(Debug)]
pub struct Engine {
    /// The verifier.
    pub verifier: Arc<Verifier>,
    /// Upstream requests per host.
    pub requests: Arc<CountingObserver>,
    /// The registry client the verifier reads through (uncached), for reading one
    /// signature artifact by digest.
    pub registry: Arc<HttpRegistry>,
}

/// The uncached network sources an engine reads through.
#[derive(Debug)]
pub(crate) struct Sources {
    /// Registries.
    pub registry: Arc<HttpRegistry>,
    /// DID documents (and did:plc operation logs).
    pub dids: HttpDidResolver,
    /// Repo proofs.
    pub records: HttpRecordSource,
    /// Upstream requests per host.
    pub requests: Arc<CountingObserver>,
    /// The guarded HTTP client the sources share.
    pub http: HttpClient,
}

impl EngineArgs {
    /// Builds the engine, or says which flag is wrong.
    pub fn build(&self) -> Result<Engine, String> {
        let sources = self.sources()?;
        let verifier = self.verifier_over(
            sources.registry.clone(),
            Arc::new(sources.dids),
            Arc::new(sources.records),
        )?;
        Ok(Engine {
            verifier: Arc::new(verifier),
            requests: sources.requests,
            registry: sources.registry,
        })
    }

    /// The network sources these flags describe (outbound rules, timeouts, credentials).
    pub(crate) fn sources(&self) -> Result<Sources, String> {
        let insecure: HashSet<String> = self
            .insecure_registries
            .iter()
            .map(|r| insecure_registry(r))
            .collect::<Result<_, _>>()?;
        let credentials = match &self.registry_config {
            Some(path) => DockerConfig::load(path).map_err(|e| e.to_string())?,
            None => DockerConfig::default(),
        };
        let net = NetConfig {
            guard: Guard {
                allow_private_addresses: self.allow_private_addresses,
                insecure_registries: insecure.clone(),
            },
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            per_host_rate: self.upstream_rate,
            per_host_burst: self.upstream_rate.saturating_mul(2),
            max_retry_wait: self.max_retry_wait,
            ..NetConfig::default()
        };
        net.guard
            .check_url(&self.plc_url)
            .map_err(|r| format!("--plc-url {}: {r}", self.plc_url))?;
        let requests = Arc::new(CountingObserver::default());
        let http = HttpClient::new(net)
            .map_err(|e| e.to_string())?
            .with_observer(requests.clone());
        let registry = HttpRegistry::new(
            http.clone(),
            RegistryConfig {
                insecure,
                credentials,
                max_pointers: self.max_pointers,
            },
        );
        let dids = HttpDidResolver::new(http.clone(), self.plc_url.clone(), self.plc_trust);
        let records = HttpRecordSource::new(http.clone(), CarLimits::default());
        Ok(Sources {
            registry: Arc::new(registry),
            dids,
            records,
            requests,
            http,
        })
    }

    /// The engine these flags describe (caches, bounds, `--state-dir`) over any sources: the
    /// network's, or a bundle's (`crate::bundle`).
    pub(crate) fn verifier_over(
        &self,
        registry: Arc<dyn Registry>,
        dids: Arc<dyn DidResolver>,
        records: Arc<dyn RecordSource>,
    ) -> Result<Verifier, String> {
        let revisions = match &self.state_dir {
            Some(dir) => {
                let revisions = Revisions::open(dir)
                    .map_err(|e| format!("--state-dir {}: {e}", dir.display()))?;
                Arc::new(revisions)
            }
            None => Arc::new(Revisions::in_memory()),
        };
        let verifier = Verifier::new(
            registry,
            dids,
            records,
            VerifierConfig {
                tag_ttl: self.tag_ttl,
                referrers_ttl: self.referrers_ttl,
                did_ttl: self.did_ttl,
                proof_ttl: self.proof_ttl,
                negative_ttl: self.negative_ttl,
                transient_ttl: self.transient_ttl,
                cache_capacity: self.cache_entries,
                car_limits: CarLimits::default(),
                max_proofs: self.max_signatures,
            },
        )
        .with_revisions(revisions);
        Ok(verifier)
    }
}

/// An `--insecure-registry` value as image references name that registry
/// ([`canonical_registry`]: lowercased, Docker Hub's hosts as `docker.io`), so that
/// `localhost:5000` matches `localhost:5000/app` and `LocalHost:05000` does too. Port 443 is
/// refused: image names drop it (`atcr.io:443/x` is `atcr.io/x`), so the registry could only
/// be reached over plain HTTP on port 80, not the port the flag names.
fn insecure_registry(value: &str) -> Result<String, String> {
    let value = value.trim();
    check_registry(&value.to_ascii_lowercase())
        .map_err(|reason| format!("--insecure-registry {value:?}: {reason}"))?;
    let canonical = canonical_registry(value);
    if split_port(value).1.is_some() && split_port(&canonical).1.is_none() {
        return Err(format!(
            "--insecure-registry {value:?}: port 443 is the HTTPS port, and image names drop it \
             ({canonical}:443/x is {canonical}/x); a plain-HTTP registry needs another port"
        ));
    }
    Ok(canonical)
}

/// A flag's duration, in the grammar policy files use too (`500ms`, `2s`, `5m`, `1d`; see
/// [`crate::policy::parse_duration`]), at most a year (longer is a typo, and would overflow
/// deadline arithmetic).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = crate::policy::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(366 * 86_400) {
        return Err(format!("duration {s:?} is over a year"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_registries_are_named_as_images_name_them() {
        for (flag, name) in [
            ("localhost:5000", "localhost:5000"),
            (" LocalHost:05000 ", "localhost:5000"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("[::1]:5000", "[::1]:5000"),
            ("registry.local", "registry.local"),
            ("registry-1.docker.io", "docker.io"),
        ] {
            assert_eq!(insecure_registry(flag).as_deref(), Ok(name), "{flag}");
            // The name an image on that registry gets.
            let image: crate::syntax::ImageRef =
                format!("{}/team/app", flag.trim()).parse().unwrap();
            assert_eq!(image.registry(), name, "{flag}");
        }
        for (flag, needle) in [
            ("localhost:443", "port 443"),
            ("atcr.io:0443", "port 443"),
            ("[::1]:443", "port 443"),
            ("http://localhost:5000", "registry"),
            ("localhost:99999", "port"),
            ("", "registry host"),
        ] {
            let e = insecure_registry(flag).unwrap_err();
            assert!(
                e.contains(needle) && e.contains("--insecure-registry"),
                "{flag}: {e}"
            );
        }
    }

    /// Every engine flag can be set from the environment (the process faces, run by
    /// containerd or Ratify, get no flags), under `ATCR_VERIFY_<FLAG>`.
    #[test]
    fn every_engine_flag_has_its_environment_variable() {
        use clap::Args as _;
        let command = EngineArgs::augment_args(clap::Command::new("x"));
        let mut n = 0;
        for arg in command.get_arguments() {
            let long = arg.get_long().unwrap();
            let expected = format!("ATCR_VERIFY_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(expected.as_str()),
                "--{long}"
            );
            n += 1;
        }
        assert_eq!(n, 19);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert!(parse_duration("3").is_err(), "a bare number has no unit");
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("100000h").is_err());
    }
}
