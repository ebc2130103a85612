//! `atcr-verify bundle export REF… -o FILE`: write an offline, self-certifying bundle; and
//! the `--offline --bundle FILE` engine of `atcr-verify image`.
//!
//! Exit codes of `bundle export`: 0 the bundle was written (whatever the verdicts it
//! records), 2 it was not (bad reference or flag, an image that could not be evaluated,
//! over the size cap, the file could not be written).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;
use time::OffsetDateTime;

use super::ErrorBody;
use super::engine::{EngineArgs, parse_duration};
use crate::bundle::{Bundle, MAX_BUNDLE_BYTES, Recorder};
use crate::policy::TrustPolicy;
use crate::resolve::PlcTrust;
use crate::syntax::ImageRef;
use crate::verify::{ImageReport, Verifier, VerifyError};

/// `bundle` subcommands.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Verify images over the network and write everything that verification used into
    /// one file, for `atcr-verify image REF --offline --bundle FILE`.
    ///
    /// Exit 0 written (whatever the verdicts), 2 not written.
    Export(Box<ExportArgs>),
}

/// `bundle export` flags.
#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// The images: [registry/]repository[:tag][@sha256:digest].
    #[arg(value_name = "REF", required = true)]
    images: Vec<String>,
    /// The bundle file to write (replaced atomically).
    #[arg(short = 'o', long, value_name = "FILE")]
    output: PathBuf,
    /// Trust-policy file: only the signers it trusts for an image have their proofs
    /// bundled (default: the example policy built into the binary).
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_POLICY")]
    policy: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Budget for verifying all the images.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    engine: EngineArgs,
}

/// One image of an export, as printed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Exported {
    image: String,
    digest: Option<String>,
    verified: bool,
    deny: bool,
    counted_signatures: u32,
}

/// The export summary, as printed with `--json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    file: String,
    bytes: usize,
    images: Vec<Exported>,
    identities: usize,
    records: usize,
}

/// Runs `bundle`.
pub fn run(args: &BundleArgs) -> ExitCode {
    match &args.command {
        BundleCommand::Export(args) => export(args),
    }
}

const NEEDS_LOG: &str = "a bundle proves each did:plc identity from its operation log; \
    drop --plc-trust directory (use a PLC directory or mirror that serves /log/audit)";

fn export(args: &ExportArgs) -> ExitCode {
    super::logging::init(args.json, tracing::Level::WARN);
    let usage = |message: String| ErrorBody::permanent("usage", message).exit(args.json, None);
    let mut images = Vec::new();
    for text in &args.images {
        match text.parse::<ImageRef>() {
            Ok(i) => images.push(i),
            Err(e) => {
                return ErrorBody::permanent("invalid_reference", e).exit(args.json, Some(text));
            }
        }
    }
    let policy = match TrustPolicy::load_or_builtin(args.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => return usage(e.to_string()),
    };
    if args.engine.plc_trust == PlcTrust::Directory {
        return usage(NEEDS_LOG.into());
    }
    let recorder = Recorder::new();
    let verifier = match args.engine.sources().and_then(|s| {
        let (registry, dids, records) = recorder.sources(s.registry, s.dids, s.records);
        args.engine.verifier_over(registry, dids, records)
    }) {
        Ok(v) => v,
        Err(e) => return usage(e),
    };
    let now = OffsetDateTime::now_utc();
    let (verifier, policy) = (&verifier, &policy);
    let work = async {
        let each = images.iter().map(|image| async move {
            // Resolved first, so that an image no policy scopes is in the bundle too.
            let result = match verifier.resolve(image).await {
                Ok(_) => verifier.verify(image, policy, now).await,
                Err(e) => Err(e),
            };
            (image, result)
        });
        Ok::<_, VerifyError>(futures_util::future::join_all(each).await)
    };
    let results = match super::block_within(args.timeout, work) {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => return ErrorBody::of(&e).exit(args.json, None),
        Err(e) => return usage(e),
    };
    let mut exported = Vec::new();
    for (image, result) in results {
        match result {
            Ok(report) => exported.push(exported_image(&report)),
            Err(e) => {
                let body = ErrorBody::of(&e);
                if !args.json {
                    eprintln!("atcr-verify: no bundle written: {image} could not be evaluated");
                }
                return body.exit(args.json, Some(&image.to_string()));
            }
        }
    }
    let file = recorder.bundle(OffsetDateTime::now_utc());
    let bytes = match serde_json::to_vec_pretty(&file) {
        Ok(b) => b,
        Err(e) => return usage(format!("encoding the bundle: {e}")),
    };
    if bytes.len() > MAX_BUNDLE_BYTES {
        return ErrorBody::permanent(
            "bundle_too_large",
            format!(
                "the bundle would be {} bytes, over the {MAX_BUNDLE_BYTES}-byte limit: export fewer images per file",
                bytes.len()
            ),
        )
        .exit(args.json, None);
    }
    if let Err(e) = crate::file::write_atomically(&args.output, &bytes) {
        return ErrorBody::permanent("usage", format!("writing {}: {e}", args.output.display()))
            .exit(args.json, None);
    }
    let summary = Summary {
        file: args.output.display().to_string(),
        bytes: bytes.len(),
        images: exported,
        identities: file.identities.len(),
        records: file.records.len(),
    };
    if args.json {
        match serde_json::to_string_pretty(&summary) {
            Ok(text) => println!("{text}"),
            Err(e) => return usage(format!("printing the summary: {e}")),
        }
    } else {
        for i in &summary.images {
            let mark = if i.verified {
                "verified"
            } else {
                "NOT verified"
            };
            let name = i.image.split('@').next().unwrap_or(&i.image);
            let at = i
                .digest
                .as_deref()
                .map(|d| format!("@{d}"))
                .unwrap_or_default();
            println!(
                "{mark}: {name}{at} ({} signature(s) counted)",
                i.counted_signatures
            );
        }
        println!(
            "wrote {}: {} image(s), {} signer identit{}, {} record proof(s), {} bytes",
            summary.file,
            summary.images.len(),
            summary.identities,
            if summary.identities == 1 { "y" } else { "ies" },
            summary.records,
            summary.bytes
        );
    }
    ExitCode::SUCCESS
}

fn exported_image(report: &ImageReport) -> Exported {
    Exported {
        image: report.verdict.image.clone(),
        digest: report.digest.as_ref().map(ToString::to_string),
        verified: report.verdict.verified,
        deny: report.verdict.deny,
        counted_signatures: report.verdict.counted_signatures,
    }
}

/// The engine of `image --offline --bundle FILE`: the bundle, checked whole, as its only
/// source. No HTTP client is built, so nothing can reach the network.
pub(crate) fn offline_engine(
    engine: &EngineArgs,
    path: &Path,
) -> Result<(Arc<Verifier>, Arc<Bundle>), ErrorBody> {
    if engine.plc_trust == PlcTrust::Directory {
        return Err(ErrorBody::permanent("usage", NEEDS_LOG));
    }
    let bundle = Arc::new(Bundle::load(path).map_err(|e| ErrorBody::permanent(e.code(), e))?);
    let verifier = engine
        .verifier_over(bundle.clone(), bundle.clone(), bundle.clone())
        .map_err(|e| ErrorBody::permanent("usage", e))?;
    Ok((Arc::new(verifier), bundle))
}

/// Refuses a reference the bundle cannot answer for.
pub(crate) fn check_held(bundle: &Bundle, path: &Path, image: &ImageRef) -> Result<(), ErrorBody> {
    if bundle.holds(image) {
        return Ok(());
    }
    let held = bundle.references();
    const SHOWN: usize = 20;
    let listed = match held.len() {
        0 => "nothing".to_owned(),
        n if n <= SHOWN => held.join(", "),
        n => format!(
            "{} and {} more",
            held.get(..SHOWN).unwrap_or_default().join(", "),
            n - SHOWN
        ),
    };
    Err(ErrorBody::permanent(
        "not_in_bundle",
        format!(
            "{image} is not in bundle {} (it holds {listed}); a tag needs its tag → digest fact, \
             so export the reference as you verify it (`atcr-verify bundle export {image} -o FILE`)",
            path.display()
        ),
    ))
}

/// How old the bundle is, for `--json` (`bundle`) and stderr.
pub(crate) fn age(bundle: &Bundle, path: &Path, now: OffsetDateTime) -> serde_json::Value {
    let oldest = bundle.oldest_fact();
    let seconds = (now - oldest).whole_seconds().max(0);
    serde_json::json!({
        "file": path.display().to_string(),
        "createdAt": crate::bundle::format_time(bundle.created_at()),
        "oldestFact": crate::bundle::format_time(oldest),
        "ageSeconds": seconds,
    })
}

/// The age line printed on stderr.
pub(crate) fn age_line(bundle: &Bundle, path: &Path, now: OffsetDateTime) -> String {
    let oldest = bundle.oldest_fact();
    let seconds = u64::try_from((now - oldest).whole_seconds()).unwrap_or(0);
    format!(
        "bundle {}: its oldest fact was fetched at {} ({} ago); written {}",
        path.display(),
        crate::bundle::format_time(oldest),
        humantime::format_duration(Duration::from_secs(seconds)),
        crate::bundle::format_time(bundle.created_at()),
    )
}
