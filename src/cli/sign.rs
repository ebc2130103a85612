//! `atcr-verify sign REF --pds URL --identifier HANDLE_OR_DID --password-env VAR`: sign an
//! image for an ATProto account (see [`crate::sign`]).
//!
//! The app password is read from the environment variable named by `--password-env`, never
//! from the command line (where `ps` and shell history would show it), and is never
//! printed. Exit codes: 0 signed, 2 not signed (bad flags, login refused, PDS or registry
//! down, push refused). When the record was created but the artifact could not be
//! attached, the failure says so and prints the record's URI and the command that attaches
//! it (`--record-uri`).

use std::process::ExitCode;

use time::OffsetDateTime;
use url::Url;

use super::ErrorBody;
use super::engine::EngineArgs;
use crate::net::{HttpClient, NetConfig};
use crate::sign::xrpc::Password;
use crate::sign::{Login, RecordSource, SignFailure, SignRequest, Signed};
use crate::syntax::{AtUri, ImageRef};
use crate::verify::Failure;

/// `sign` flags.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The image: [registry/]repository[:tag][@sha256:digest].
    #[arg(value_name = "REF")]
    image: String,
    /// The signer's PDS (where the record is written, or read with --record-uri).
    #[arg(long, value_name = "URL")]
    pds: Url,
    /// The account: its handle or DID.
    #[arg(
        long,
        value_name = "HANDLE_OR_DID",
        required_unless_present = "record_uri"
    )]
    identifier: Option<String>,
    /// The environment variable holding the account's app password.
    #[arg(long, value_name = "VAR", required_unless_present = "record_uri")]
    password_env: Option<String>,
    /// Attach this existing io.atcr.manifest record (e.g. after a failed push) instead of
    /// creating one: no login; the record must name the image's digest.
    #[arg(
        long,
        value_name = "AT-URI",
        conflicts_with_all = ["identifier", "password_env", "repository"]
    )]
    record_uri: Option<String>,
    /// The record's `repository`: the image's repository path (the default) or a trailing
    /// part of it, e.g. `myapp` for atcr.io/alice/myapp.
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,
    /// Print what was signed as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs `sign`.
pub fn run(args: &SignArgs) -> ExitCode {
    super::logging::init(args.json, tracing::Level::WARN);
    let usage = |message: String| ErrorBody::permanent("usage", message).exit(args.json, None);
    let image: ImageRef = match args.image.parse() {
        Ok(i) => i,
        Err(e) => {
            return ErrorBody::permanent("invalid_reference", e).exit(args.json, Some(&args.image));
        }
    };
    let repository = match crate::sign::repository_for(&image, args.repository.as_deref()) {
        Ok(r) => r,
        Err(e) => return usage(format!("--repository: {e}")),
    };
    let source = match (&args.record_uri, &args.identifier, &args.password_env) {
        (Some(uri), _, _) => match uri.parse::<AtUri>() {
            Ok(uri) => RecordSource::Existing(uri),
            Err(e) => return usage(format!("--record-uri: {e}")),
        },
        (None, Some(identifier), Some(var)) => {
            let identifier = identifier.trim();
            if identifier.is_empty()
                || identifier.len() > 253
                || identifier
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace())
            {
                return usage(format!(
                    "--identifier {:?}: expected a handle or DID",
                    crate::syntax::text::outside(identifier)
                ));
            }
            match password(var) {
                Ok(password) => RecordSource::Create(Login {
                    identifier: identifier.to_owned(),
                    password,
                }),
                Err(e) => return usage(e),
            }
        }
        _ => return usage("--identifier and --password-env, or --record-uri, are required".into()),
    };
    // The sources only: signing reads and writes, it verifies nothing (no caches, no
    // --state-dir).
    let sources = match args.engine.sources() {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    if let Err(refusal) = sources.http.config().guard.check_url(&args.pds) {
        return usage(format!(
            "--pds {}: {refusal} (a local PDS needs --allow-private-addresses)",
            crate::net::redact(&args.pds)
        ));
    }
    let request = SignRequest {
        image,
        pds: args.pds.clone(),
        source,
        repository,
    };
    let runtime = match super::runtime() {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    // No overall deadline: every request has its own timeout (--request-timeout), there are
    // a dozen at most, and cutting the work short after the record is created would lose
    // its URI.
    // The PDS client follows no redirect: createSession carries the password in its body,
    // and a redirect would re-send it to wherever the PDS points.
    let pds_http = match HttpClient::new(NetConfig {
        max_redirects: 0,
        ..sources.http.config().clone()
    }) {
        Ok(h) => h,
        Err(e) => return usage(e.to_string()),
    };
    let result = runtime.block_on(crate::sign::sign(
        &pds_http,
        &sources.registry,
        &sources.dids,
        &request,
        OffsetDateTime::now_utc(),
    ));
    match result {
        Ok(signed) => {
            if args.json {
                match serde_json::to_string_pretty(&signed) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return usage(format!("printing the outcome: {e}")),
                }
            } else {
                print!("{}", human(&signed));
            }
            ExitCode::SUCCESS
        }
        Err(failure) => fail(args, &request, &failure),
    }
}

/// The app password from the environment variable `var`.
fn password(var: &str) -> Result<Password, String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Ok(Password::new(p)),
        Ok(_) => Err(format!(
            "--password-env {var}: the variable is empty; it must hold the account's app password"
        )),
        Err(std::env::VarError::NotPresent) => Err(format!(
            "--password-env {var}: the variable is not set; it must hold the account's app \
             password (create one in the account's settings; never pass it as an argument)"
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!(
            "--password-env {var}: the variable is not valid UTF-8"
        )),
    }
}

/// Prints a failure (exit 2), saying so loudly when the record was created and only the
/// artifact is missing.
fn fail(args: &SignArgs, request: &SignRequest, failure: &SignFailure) -> ExitCode {
    let error = Failure::new(
        failure.error.code(),
        &failure.error,
        failure.error.is_transient(),
    );
    let created = matches!(request.source, RecordSource::Create(_)) && failure.record.is_some();
    let retry = failure.record.as_ref().map(|uri| {
        format!(
            "atcr-verify sign {} --pds {} --record-uri {uri}",
            request.image,
            request.pds.as_str().trim_end_matches('/')
        )
    });
    if args.json {
        let out = serde_json::json!({
            "image": request.image.to_string(),
            "error": error,
            "recordUri": failure.record.as_ref().map(ToString::to_string),
            "recordCreated": created,
            "retry": retry,
        });
        println!("{out}");
        return ExitCode::from(2);
    }
    let again = if error.transient {
        " (transient: try again)"
    } else {
        ""
    };
    eprintln!(
        "atcr-verify: {}: {}: {}{again}",
        request.image, error.code, error.message
    );
    if let (Some(uri), Some(retry)) = (&failure.record, &retry) {
        let what = if created {
            "was created on the PDS"
        } else {
            "exists"
        };
        eprintln!(
            "atcr-verify: the signature record {uri} {what}, but the signature artifact is not \
             attached to the image; attach it with:\n  {retry}"
        );
    }
    ExitCode::from(2)
}

fn human(s: &Signed) -> String {
    let name = s.image.split('@').next().unwrap_or(&s.image);
    let who = match &s.handle {
        Some(h) => format!("{} ({h})", s.did),
        None => s.did.clone(),
    };
    let how = if s.record_created {
        "created"
    } else {
        "existing"
    };
    let attached = match &s.referrers_tag {
        Some(tag) => {
            format!("listed in the referrers tag {tag} (the registry has no Referrers API)")
        }
        None => "indexed by the registry's Referrers API".to_owned(),
    };
    let repository = match &s.repository {
        Some(r) => format!("repository {r:?}"),
        None => "no repository".to_owned(),
    };
    format!(
        "signed: {name}@{}\n  record: {} ({how}, by {who}, {repository})\n  artifact: {}, {attached}\n",
        s.digest, s.record_uri, s.artifact_digest
    )
}
