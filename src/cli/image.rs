//! `atcr-verify image REF`: the whole chain from a shell or a CI job.
//!
//! Exit codes: 0 verified, 1 not verified, 2 could not evaluate (bad reference, bad
//! flags or policy, no such image, upstream failure, deadline).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use time::OffsetDateTime;

use super::ErrorBody;
use super::engine::{EngineArgs, parse_duration};
use crate::policy::TrustPolicy;
use crate::syntax::ImageRef;
use crate::verify::ImageReport;

/// `image` flags.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// The image: [registry/]repository[:tag][@sha256:digest].
    #[arg(value_name = "REF")]
    image: String,
    /// Trust-policy file (default: the example policy built into the binary).
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_POLICY")]
    policy: Option<PathBuf>,
    /// Print the verdict as JSON.
    #[arg(long)]
    json: bool,
    /// Budget for the whole verification.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Verify from a bundle alone (`--bundle`), with no network at all.
    #[arg(long, requires = "bundle")]
    offline: bool,
    /// The bundle `atcr-verify bundle export` wrote (with `--offline`).
    #[arg(long, value_name = "FILE", requires = "offline")]
    bundle: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs `image`.
pub fn run(args: &ImageArgs) -> ExitCode {
    super::logging::init(args.json, tracing::Level::WARN);
    // Every exit 2 ends the human output with its CI line (`ERROR <image>: <code>: …`).
    let fail = |body: ErrorBody, subject: Option<&str>| {
        if !args.json {
            println!("{}", body.ci_line(subject.unwrap_or(&args.image)));
        }
        body.exit(args.json, subject)
    };
    let usage = |message: String| fail(ErrorBody::permanent("usage", message), None);
    let image: ImageRef = match args.image.parse() {
        Ok(i) => i,
        Err(e) => {
            return fail(
                ErrorBody::permanent("invalid_reference", e),
                Some(&args.image),
            );
        }
    };
    let policy = match TrustPolicy::load_or_builtin(args.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => return usage(e.to_string()),
    };
    let (verifier, bundle) = match args.bundle.as_deref().filter(|_| args.offline) {
        Some(path) => match super::bundle::offline_engine(&args.engine, path) {
            Ok((verifier, bundle)) => {
                if let Err(e) = super::bundle::check_held(&bundle, path, &image) {
                    return fail(e, Some(&image.to_string()));
                }
                (verifier, Some((bundle, path)))
            }
            Err(e) => return fail(e, Some(&image.to_string())),
        },
        None => match args.engine.build() {
            Ok(e) => (e.verifier, None),
            Err(e) => return usage(e),
        },
    };
    let now = OffsetDateTime::now_utc();
    if let Some((bundle, path)) = &bundle
        && !args.json
    {
        eprintln!("{}", super::bundle::age_line(bundle, path, now));
    }
    let work = verifier.verify(&image, &policy, now);
    let result = match super::block_within(args.timeout, work) {
        Ok(result) => result,
        Err(e) => return usage(e),
    };
    match result {
        Ok(report) => {
            if args.json {
                #[derive(serde::Serialize)]
                struct Printed<'a> {
                    #[serde(flatten)]
                    report: &'a ImageReport,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    bundle: Option<serde_json::Value>,
                }
                let printed = Printed {
                    report: &report,
                    bundle: bundle
                        .as_ref()
                        .map(|(bundle, path)| super::bundle::age(bundle, path, now)),
                };
                match serde_json::to_string_pretty(&printed) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return usage(format!("printing the verdict: {e}")),
                }
            } else {
                print!("{}", human(&report));
                println!("{}", ci_line(&report));
            }
            if report.verdict.verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(ErrorBody::of(&e), Some(&image.to_string())),
    }
}

/// The one line a CI log needs, last on stdout: `VERIFIED <image>@<digest> signed by <did>
/// (<handle>) at <time> under policy <name>`, or `NOT VERIFIED <image>: <reason>`.
pub(super) fn ci_line(report: &ImageReport) -> String {
    let v = &report.verdict;
    let name = v.image.split('@').next().unwrap_or(&v.image);
    let subject = match &report.digest {
        Some(digest) => format!("{name}@{digest}"),
        None => name.to_owned(),
    };
    let policy = v.policy.as_deref().unwrap_or("(none)");
    let line = if v.verified {
        let by = match (&v.did, v.signed_at) {
            (Some(did), at) => {
                let handle = claimed_handle(report);
                let at = at
                    .and_then(|at| {
                        at.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .map(|at| format!(" at {at}"))
                    .unwrap_or_default();
                format!(" signed by {did}{handle}{at}")
            }
            (None, _) => " (no signature required)".to_owned(),
        };
        format!("VERIFIED {subject}{by} under policy {policy}")
    } else {
        let reason = v
            .reason
            .as_deref()
            .unwrap_or("no policy scopes it (the registry was not asked)");
        format!("NOT VERIFIED {subject}: {reason} (policy {policy})")
    };
    super::one_line(&line)
}

/// The CI line when the image could not be evaluated (exit 2).
/// ` (handle)` when the signer's document claims one (unverified), else nothing.
fn claimed_handle(report: &ImageReport) -> String {
    report
        .handle
        .as_deref()
        .map(|h| format!(" ({h})"))
        .unwrap_or_default()
}

fn human(report: &ImageReport) -> String {
    let v = &report.verdict;
    let mut out = String::new();
    let mark = if v.verified {
        "verified"
    } else {
        "NOT verified"
    };
    let name = v.image.split('@').next().unwrap_or(&v.image);
    let _ = match &report.digest {
        Some(digest) => writeln!(out, "{mark}: {name}@{digest}"),
        None => writeln!(
            out,
            "{mark}: {name} (no policy scopes it: the registry was not asked)"
        ),
    };
    if report.subject_is_index {
        let _ = writeln!(
            out,
            "  subject: image index ({}); signatures are checked on the index",
            report.media_type.as_deref().unwrap_or("?")
        );
    }
    let policy = v.policy.as_deref().unwrap_or("(none)");
    let action = serde_json::to_value(v.action).ok();
    let action = action.as_ref().and_then(|a| a.as_str()).unwrap_or("?");
    let _ = writeln!(
        out,
        "  policy: {policy}, action: {action}, signatures counted: {}/{}",
        v.counted_signatures, v.required_signatures
    );
    if let (Some(did), Some(at)) = (&v.did, v.signed_at) {
        let handle = claimed_handle(report);
        let at = at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| at.to_string());
        let _ = writeln!(out, "  signed by {did}{handle} at {at}");
    }
    for s in &v.signatures {
        let who = s
            .did
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "?".into());
        let status = match &s.reason {
            None => "counted".to_owned(),
            Some(r) => r.to_string(),
        };
        let _ = writeln!(
            out,
            "  - {who} {}: {status}",
            s.uri.as_deref().unwrap_or("")
        );
        if let Some(d) = &s.detail {
            let _ = writeln!(out, "      {d}");
        }
    }
    if let Some(reason) = &v.reason {
        let _ = writeln!(out, "  reason: {reason}");
    }
    if v.deny {
        let _ = writeln!(out, "  admission: deny");
    }
    out
}
