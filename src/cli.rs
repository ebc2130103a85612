//! The command-line faces: `atcr-verify proof` (one proof from files), `policy check` /
//! `policy explain` (trust-policy files), `image` (the whole chain from a shell or CI job)
//! and `serve` (the Gatekeeper provider); and the process faces other programs run:
//! `containerd-verifier` (containerd's image verifier) and `ratify-verifier` (Ratify v1's
//! external verifier plugin).
//!
//! `atcr-verify REF [flags]` is `atcr-verify image REF [flags]` (see [`shorthand`]);
//! `discover` lists an image's signature artifacts (unproven claims); `scan` verifies every
//! image of a pod list.
//!
//! Exit codes (ripgrep style): 0 verified, 1 rejected (the evidence does not prove the
//! signature), 2 usage or input error (bad flags, unreadable files, malformed arguments).

mod bundle;
mod containerd;
mod discover;
mod engine;
mod image;
mod logging;
mod policy;
mod ratify;
mod scan;
mod serve;
mod settings;
mod shorthand;
mod sign;

pub use engine::{Engine, EngineArgs, parse_duration};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::did_document::{DidDocument, MAX_DOCUMENT_BYTES};
use crate::proof::{self, CarLimits, ProofError, VerifiedRecord};
use crate::syntax::{AtUri, ImageDigest};
use crate::verify::Failure;

/// Verify ATProto signatures on container images.
#[derive(Debug, Parser)]
#[command(
    name = "atcr-verify",
    version,
    about,
    after_help = "`atcr-verify REF [FLAGS]` is short for `atcr-verify image REF [FLAGS]` when REF \
                  looks like a registry reference (has a '/', ':' or '@')."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify one proof from files: a getRecord CAR, a DID document, a record URI, a digest.
    ///
    /// Prints the outcome as JSON. Exit 0 verified, 1 rejected, 2 usage or input error.
    Proof(ProofArgs),
    /// Check a trust-policy file, or explain which policy applies to an image.
    Policy(policy::PolicyArgs),
    /// Verify an image: find its signatures, prove them, apply the trust policy.
    ///
    /// Exit 0 verified, 1 not verified, 2 could not evaluate.
    Image(Box<image::ImageArgs>),
    /// Offline, self-certifying bundles: `bundle export REF… -o FILE`, then
    /// `image REF --offline --bundle FILE`.
    Bundle(bundle::BundleArgs),
    /// List the signature artifacts attached to an image and what each claims (signer,
    /// record, PDS): UNVERIFIED claims, nothing is proven.
    ///
    /// Exit 0 listed (zero artifacts too), 2 could not list.
    Discover(Box<discover::DiscoverArgs>),
    /// Verify every image of `kubectl get pods -A -o json` output or of a list of
    /// references (one a line), each distinct image once; a table and a summary.
    ///
    /// Exit 0 the scan ran; 1 with --fail-on when an image is denied (or undecided);
    /// 2 the input cannot be read.
    Scan(Box<scan::ScanArgs>),
    /// Serve Gatekeeper's external-data protocol over HTTPS (the provider).
    Serve(Box<serve::ServeArgs>),
    /// Sign an image for an ATProto account: create the io.atcr.manifest record naming its
    /// digest, and attach the signature artifact in the registry.
    ///
    /// The app password is read from the variable named by --password-env. Exit 0 signed,
    /// 2 not signed (a created record's URI is printed when only the artifact failed).
    Sign(Box<sign::SignArgs>),
    /// containerd (≥ 2.0) image verifier: `-name REF -digest DIGEST -stdin-media-type TYPE`,
    /// the OCI descriptor on stdin.
    ///
    /// Also taken when the first argument is one of those flags (as containerd's bindir
    /// plugin runs it). Settings come from `ATCR_VERIFY_*` variables. Exit 0 admitted,
    /// 1 not verified, 2 could not decide; the reason on stdout.
    #[command(disable_help_flag = true)]
    ContainerdVerifier {
        /// containerd's flags.
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Ratify v1 external verifier plugin: `RATIFY_VERIFIER_*` variables, the plugin input
    /// JSON on stdin, one `VerifierResult` JSON on stdout.
    ///
    /// Also taken when the binary is run with no arguments and `RATIFY_VERIFIER_COMMAND` set
    /// (as Ratify runs plugins). Settings come from `ATCR_VERIFY_*` variables.
    RatifyVerifier,
}

#[derive(Debug, clap::Args)]
struct ProofArgs {
    /// CAR v1 file returned by com.atproto.sync.getRecord.
    #[arg(long, value_name = "FILE")]
    car: PathBuf,
    /// The signer's DID document (JSON), as served by the PLC directory or did:web host.
    #[arg(long, value_name = "FILE")]
    did_doc: PathBuf,
    /// The record: at://<did>/<collection>/<rkey>.
    #[arg(long, value_name = "AT-URI")]
    uri: AtUri,
    /// The image digest the record must name: sha256:<64 hex>.
    #[arg(long, value_name = "DIGEST")]
    digest: ImageDigest,
    /// Largest CAR accepted, in bytes (also the per-block cap).
    #[arg(long, value_name = "BYTES", default_value_t = CarLimits::default().max_total_bytes)]
    max_car_bytes: usize,
}

/// The JSON printed for one proof.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Outcome {
    Verified {
        verified: bool,
        #[serde(flatten)]
        record: Box<VerifiedRecord>,
    },
    Rejected {
        verified: bool,
        error: ErrorBody,
    },
}

/// The two-thread runtime a one-shot command runs on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))
}

/// Runs a one-shot command's `work` on a two-thread runtime, bounded by `budget` (past it
/// the answer is `deadline_exceeded`). `Err` only when the runtime cannot start.
pub(crate) fn block_within<T>(
    budget: std::time::Duration,
    work: impl Future<Output = Result<T, crate::verify::VerifyError>>,
) -> Result<Result<T, crate::verify::VerifyError>, String> {
    Ok(runtime()?.block_on(async {
        tokio::time::timeout(budget, work)
            .await
            .unwrap_or(Err(crate::verify::VerifyError::Deadline(budget)))
    }))
}

/// The one error shape every command prints ([`Failure`]: `{"code", "message",
/// "transient"}`) under `"error"` in JSON, one line on stderr otherwise.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub(crate) struct ErrorBody(Failure);

impl ErrorBody {
    /// An error that asking again will not change.
    pub(crate) fn permanent(code: &'static str, message: impl std::fmt::Display) -> Self {
        ErrorBody(Failure::new(code, message, false))
    }

    /// A verification that could not finish.
    pub(crate) fn of(e: &crate::verify::VerifyError) -> Self {
        ErrorBody(Failure::from(e))
    }

    /// The CI summary line for `subject` failing so: `ERROR <subject>: <code>: <message>`,
    /// on one line.
    pub(crate) fn ci_line(&self, subject: &str) -> String {
        one_line(&format!(
            "ERROR {subject}: {}: {}{}",
            self.0.code,
            self.0.message,
            self.again()
        ))
    }

    fn again(&self) -> &'static str {
        if self.0.transient {
            " (transient: try again)"
        } else {
            ""
        }
    }

    /// Prints it (as JSON on stdout with `json`, naming `subject` when there is one, else on
    /// stderr) and gives exit code 2.
    pub(crate) fn exit(self, json: bool, subject: Option<&str>) -> ExitCode {
        if json {
            let out = match subject {
                Some(image) => serde_json::json!({"image": image, "error": self}),
                None => serde_json::json!({"error": self}),
            };
            println!("{out}");
        } else {
            let subject = subject.map(|s| format!("{s}: ")).unwrap_or_default();
            eprintln!(
                "atcr-verify: {subject}{}: {}{}",
                self.0.code,
                self.0.message,
                self.again()
            );
        }
        ExitCode::from(2)
    }
}

/// `s` on one line: a hostile reason must not forge a second summary line in a CI log.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl From<Result<VerifiedRecord, ProofError>> for Outcome {
    fn from(result: Result<VerifiedRecord, ProofError>) -> Self {
        match result {
            Ok(record) => Outcome::Verified {
                verified: true,
                record: Box::new(record),
            },
            Err(e) => Outcome::Rejected {
                verified: false,
                error: ErrorBody::permanent(e.code(), e),
            },
        }
    }
}

/// An error in what the user gave (exit 2).
#[derive(Debug, thiserror::Error)]
enum InputError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("printing the outcome: {0}")]
    Output(#[from] serde_json::Error),
}

/// Parses the process arguments and runs the command.
pub fn run() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if ratify::invoked(&args) {
        return ratify::run();
    }
    if containerd::invoked(&args) {
        return containerd::run(args.get(1..).unwrap_or_default());
    }
    let cli = Cli::parse_from(shorthand::expand(args));
    match cli.command {
        Command::Proof(args) => match run_proof(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("atcr-verify: {e}");
                ExitCode::from(2)
            }
        },
        Command::Policy(args) => policy::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Bundle(args) => bundle::run(&args),
        Command::Discover(args) => discover::run(&args),
        Command::Scan(args) => scan::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Sign(args) => sign::run(&args),
        Command::ContainerdVerifier { args } => containerd::run(&args),
        Command::RatifyVerifier => ratify::run(),
    }
}

fn run_proof(args: &ProofArgs) -> Result<ExitCode, InputError> {
    let limits = CarLimits {
        max_total_bytes: args.max_car_bytes,
        max_block_bytes: args.max_car_bytes,
    };
    let car = read_capped(&args.car, limits.max_total_bytes)?;
    let doc = read_capped(&args.did_doc, MAX_DOCUMENT_BYTES)?;
    let result = DidDocument::parse(args.uri.did(), &doc)
        .map_err(ProofError::from)
        .and_then(|doc| proof::verify_with_document(&car, &doc, &args.uri, &args.digest, &limits));
    let verified = result.is_ok();
    let json = serde_json::to_string_pretty(&Outcome::from(result))?;
    println!("{json}");
    Ok(if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Reads at most `cap + 1` bytes, so an oversized file is refused by the engine's own cap
/// without reading all of it.
fn read_capped(path: &Path, cap: usize) -> Result<Vec<u8>, InputError> {
    crate::file::read_capped(path, cap as u64).map_err(|source| InputError::Read {
        path: path.to_owned(),
        source,
    })
}
