//! `atcr-verify policy check FILE` and `atcr-verify policy explain FILE IMAGE_REF`: the two
//! commands a security engineer runs before `kubectl apply`-ing a trust policy.
//!
//! `check` exits 0 when the file loads (warnings go to stderr), 1 when it is invalid (the
//! located error goes to stderr), 2 when it cannot be read. `explain` prints which policy
//! scopes the image and what it requires, and exits 2 on a bad file or image reference.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy::{PolicyError, TrustPolicy};
use crate::syntax::ImageRef;

/// `policy` subcommands.
#[derive(Debug, clap::Args)]
pub(super) struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PolicyCommand {
    /// Lint a trust-policy file: exit 0 valid (warnings on stderr), 1 invalid, 2 unreadable.
    Check {
        /// The trust-policy YAML file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show which policy scopes an image and what it requires. Exit 2 on bad input.
    Explain {
        /// The trust-policy YAML file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The image reference, e.g. atcr.io/alice/app:v1 or nginx.
        #[arg(value_name = "IMAGE_REF")]
        image: ImageRef,
    },
}

/// Runs a `policy` subcommand.
pub(super) fn run(args: &PolicyArgs) -> ExitCode {
    match &args.command {
        PolicyCommand::Check { file } => check(file),
        PolicyCommand::Explain { file, image } => explain(file, image),
    }
}

fn check(file: &PathBuf) -> ExitCode {
    match TrustPolicy::load(file) {
        Ok(policy) => {
            for w in policy.warnings() {
                eprintln!("warning: {w}");
            }
            let n = policy.policies().len();
            println!(
                "{}: valid, {n} polic{}, {} warning{}, unmatched images: {}",
                file.display(),
                if n == 1 { "y" } else { "ies" },
                policy.warnings().len(),
                if policy.warnings().len() == 1 {
                    ""
                } else {
                    "s"
                },
                policy.unmatched()
            );
            ExitCode::SUCCESS
        }
        Err(e @ PolicyError::Invalid(_)) => {
            for d in e.diagnostics() {
                eprintln!("error: {d}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("atcr-verify: {e}");
            ExitCode::from(2)
        }
    }
}

fn explain(file: &PathBuf, image: &ImageRef) -> ExitCode {
    match TrustPolicy::load(file) {
        Ok(policy) => {
            print!("{}", policy.explain(image));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("atcr-verify: {e}");
            ExitCode::from(2)
        }
    }
}
