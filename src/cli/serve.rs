//! `atcr-verify serve`: the Gatekeeper external-data provider.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::engine::{EngineArgs, parse_duration};
use crate::follow::FollowConfig;
use crate::net::Guard;
use crate::policy::{PolicyHolder, TrustPolicy, env_policy};
use crate::server::admission::WebhookFailure;
use crate::server::tls::{CertSource, TlsSettings};
use crate::server::{self, Endpoints, Limits, ServeConfig};

/// `serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// HTTPS listen address.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:8443",
        env = "ATCR_VERIFY_LISTEN"
    )]
    listen: SocketAddr,
    /// Plain-HTTP address for /healthz, /readyz and /metrics.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9090",
        env = "ATCR_VERIFY_METRICS_LISTEN"
    )]
    metrics_listen: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when the file changes. Without it a
    /// certificate is generated at start and its CA printed for the Provider's caBundle.
    #[arg(
        long,
        value_name = "FILE",
        env = "ATCR_VERIFY_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Serving private key (PEM); reloaded when the file changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "ATCR_VERIFY_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Names the generated certificate is valid for (when no --tls-cert is given).
    #[arg(long = "tls-san", value_name = "NAME", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
    tls_sans: Vec<String>,
    /// CA (PEM) that client certificates must chain to: Gatekeeper's `ca.crt` from secret
    /// gatekeeper-webhook-server-cert. Makes a client certificate mandatory.
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// DNS name the client certificate must carry, e.g.
    /// gatekeeper-webhook-service.gatekeeper-system.svc.
    #[arg(
        long,
        value_name = "NAME",
        env = "ATCR_VERIFY_CLIENT_SAN",
        requires = "client_ca"
    )]
    client_san: Option<String>,
    /// Also accept TLS 1.2 (Gatekeeper itself requires 1.3).
    #[arg(long)]
    tls12: bool,
    /// Serve plain HTTP instead of HTTPS. For local use only: Gatekeeper refuses http://.
    #[arg(long, conflicts_with_all = ["tls_cert", "client_ca"])]
    insecure_http: bool,
    /// Trust-policy file, reloaded when it changes (the last good policy stays in force
    /// when a new one is invalid). Default: the example policy built into the binary.
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_POLICY")]
    policy: Option<PathBuf>,
    /// Path of the validation endpoint.
    #[arg(long, value_name = "PATH", default_value = "/provide")]
    provide_path: String,
    /// Path of the mutation (digest pinning) endpoint.
    #[arg(long, value_name = "PATH", default_value = "/mutate")]
    mutate_path: String,
    /// Path of the Kubernetes ValidatingAdmissionWebhook endpoint.
    #[arg(long, value_name = "PATH", default_value = "/validate")]
    validate_path: String,
    /// Path of the one-image endpoint for OPA's http.send (GET ?image=REF).
    #[arg(long, value_name = "PATH", default_value = "/verify")]
    verify_path: String,
    /// What /validate does when an image cannot be judged now (upstream down, deadline):
    /// deny refuses with the reason, allow admits with a warning.
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        default_value = "deny",
        env = "ATCR_VERIFY_WEBHOOK_FAILURE"
    )]
    webhook_failure: WebhookFailure,
    /// Time budget per /mutate request (Gatekeeper's mutating webhook allows 1 s).
    #[arg(long, value_name = "DURATION", default_value = "800ms", value_parser = parse_duration)]
    mutate_budget: Duration,
    /// Time budget per request; unfinished keys are answered `deadline_exceeded` in
    /// systemError while their verification continues. Keep it under the Provider timeout.
    #[arg(long, value_name = "DURATION", default_value = "2500ms", value_parser = parse_duration)]
    request_budget: Duration,
    /// The most one verification may take, including after its request's budget ran out
    /// (it then goes on to fill the caches); past it the work is dropped.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    verify_timeout: Duration,
    /// Keys accepted per request.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_keys: usize,
    /// Request body size accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    max_body: usize,
    /// Verifications running at once (across requests).
    #[arg(long, value_name = "N", default_value_t = 128)]
    concurrency: usize,
    /// Of `--concurrency`, how many one request's keys may hold, so that one request's keys
    /// on hanging registries cannot hold up the next request (default: a quarter of
    /// `--concurrency`, at least 1).
    #[arg(long, value_name = "N")]
    request_concurrency: Option<usize>,
    /// Provider requests accepted per second (0: unlimited).
    #[arg(long, value_name = "N", default_value_t = 500)]
    inbound_rate: u32,
    /// How often the policy and certificate files are checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    reload_interval: Duration,
    /// HTTP worker threads.
    #[arg(long, value_name = "N", default_value_t = 2)]
    workers: usize,
    /// Verification threads.
    #[arg(long, value_name = "N", default_value_t = 2)]
    engine_threads: usize,
    /// Log format.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Do not follow the trusted signers' repo event streams: a deleted signature record is
    /// then noticed only when --proof-ttl runs out.
    #[arg(long, env = "ATCR_VERIFY_NO_FOLLOW")]
    no_follow: bool,
    /// Follow one relay's com.atproto.sync.subscribeRepos (https:// or wss://) instead of
    /// each trusted signer's PDS.
    #[arg(
        long,
        value_name = "URL",
        env = "ATCR_VERIFY_RELAY",
        conflicts_with = "no_follow"
    )]
    relay: Option<url::Url>,
    /// Repo event streams (one per PDS hosting trusted signers) followed at most; signers
    /// past it are not followed (their caches expire on the TTLs only).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        env = "ATCR_VERIFY_MAX_SUBSCRIPTIONS"
    )]
    max_subscriptions: usize,
    /// Signature records read per trusted signer and signature collection by each backfill
    /// (com.atproto.repo.listRecords) to find signatures without the registry's artifacts.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        env = "ATCR_VERIFY_MAX_BACKFILL"
    )]
    max_backfill: usize,
    /// Signature records indexed at most (about 7.6 MiB per 10,000); past it, images are
    /// found through the registry's artifacts only. One trusted signer holds at most 10,000.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::verify::MAX_INDEXED,
        env = "ATCR_VERIFY_MAX_INDEXED"
    )]
    max_indexed: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs `serve`.
pub fn run(args: &ServeArgs) -> ExitCode {
    super::logging::init(args.log_format == "json", tracing::Level::INFO);
    let result = serve(args);
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atcr-verify: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: &ServeArgs) -> Result<(), String> {
    let policy = match &args.policy {
        Some(path) => PolicyHolder::watch_file(path).map_err(|e| e.to_string())?,
        None => {
            let var = |name| std::env::var(name).ok();
            match env_policy(
                var("REQUIRE_SIGNATURE").as_deref(),
                var("TRUSTED_DIDS").as_deref(),
            )
            .map_err(|e| e.to_string())?
            {
                Some(policy) => {
                    tracing::info!(
                        "no --policy: using the policy of REQUIRE_SIGNATURE/TRUSTED_DIDS"
                    );
                    PolicyHolder::new(policy)
                }
                None => PolicyHolder::new(
                    TrustPolicy::builtin().map_err(|e| format!("built-in policy: {e}"))?,
                ),
            }
        }
    };
    for (flag, path) in [
        ("--provide-path", &args.provide_path),
        ("--mutate-path", &args.mutate_path),
        ("--validate-path", &args.validate_path),
        ("--verify-path", &args.verify_path),
    ] {
        // A path is matched literally: braces would make it a pattern for actix's router.
        if !path.starts_with('/') || path.contains(['{', '}']) {
            return Err(format!(
                "{flag} {path:?} must start with / and hold no braces"
            ));
        }
    }
    let engine = args.engine.build()?;
    engine.verifier.index().set_limits(
        args.max_indexed,
        crate::verify::MAX_INDEXED_PER_DID.min(args.max_indexed),
    );
    let follow = follow_config(args)?;
    let tls = (!args.insecure_http).then(|| TlsSettings {
        cert: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => CertSource::SelfSigned {
                names: args.tls_sans.clone(),
            },
        },
        client_ca: args.client_ca.clone(),
        client_san: args.client_san.clone(),
        allow_tls12: args.tls12,
    });
    server::run(
        ServeConfig {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            tls,
            endpoints: Endpoints {
                provide: args.provide_path.clone(),
                mutate: args.mutate_path.clone(),
                validate: args.validate_path.clone(),
                verify: args.verify_path.clone(),
            },
            limits: limits(args),
            reload_interval: args.reload_interval,
            workers: args.workers,
            engine_threads: args.engine_threads,
            webhook_failure: args.webhook_failure,
            follow,
        },
        engine.verifier,
        engine.requests,
        Arc::new(policy),
    )
    .map_err(|e| e.to_string())
}

/// What the follower does, or `None` under `--no-follow`.
fn follow_config(args: &ServeArgs) -> Result<Option<FollowConfig>, String> {
    if args.no_follow {
        return Ok(None);
    }
    let guard = Guard {
        allow_private_addresses: args.engine.allow_private_addresses,
        ..Guard::default()
    };
    if let Some(relay) = &args.relay {
        let stream =
            crate::follow::socket::stream_url(relay).map_err(|e| format!("--relay {e}"))?;
        let mut twin = stream.clone();
        let _ = twin.set_scheme(if stream.scheme() == "wss" {
            "https"
        } else {
            "http"
        });
        guard
            .check_url(&twin)
            .map_err(|r| format!("--relay {relay}: {r}"))?;
    }
    Ok(Some(FollowConfig {
        relay: args.relay.clone(),
        max_subscriptions: args.max_subscriptions,
        guard,
        connect_timeout: args.engine.connect_timeout.max(Duration::from_secs(2)),
        refresh: args.reload_interval.max(Duration::from_secs(2)),
        max_backfill: args.max_backfill,
        ..FollowConfig::default()
    }))
}

/// The request limits the flags give.
fn limits(args: &ServeArgs) -> Limits {
    Limits {
        budget: args.request_budget,
        mutate_budget: args.mutate_budget,
        verify_timeout: args.verify_timeout,
        max_keys: args.max_keys,
        max_body: args.max_body,
        concurrency: args.concurrency,
        request_concurrency: args
            .request_concurrency
            .unwrap_or(args.concurrency / 4)
            .max(1),
        inbound_rate: args.inbound_rate,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// `Limits::default()` (what in-process users start from) is what `serve` runs with
    /// when no flag is given.
    #[test]
    fn default_limits_are_the_flags_defaults() {
        let flags = Flags::try_parse_from(["serve"]).unwrap();
        assert_eq!(limits(&flags.serve), Limits::default());
    }
}
