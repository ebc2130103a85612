//! `atcr-verify` as a containerd (≥ 2.0) image verifier, for the
//! `io.containerd.image-verifier.v1.bindir` plugin.
//!
//! containerd runs every file of its `bin_dir` as
//! `<bin> -name <ref> -digest <digest> -stdin-media-type application/vnd.oci.descriptor.v1+json`
//! (Go's single-dash long flags), writes the image's OCI descriptor as JSON on stdin, reads at
//! most 32 KiB of stdout as the reason, and lets the pull go on only on exit 0; it kills the
//! verifier after `per_verifier_timeout` (10 s by default). So the binary takes that call when
//! its first argument is one of those flags (a symlink to it in `bin_dir` is enough), and also
//! as `atcr-verify containerd-verifier -name …`.
//!
//! It verifies `<ref>` pinned to `<digest>` exactly as `atcr-verify image` does, with the
//! settings of [`super::settings`] (environment, settings file), within `ATCR_VERIFY_TIMEOUT`
//! (8 s by default). Exit 0 only when the image is admitted (`verified` and not `deny`);
//! 1 when it is not; 2 when it could not be decided or the call is malformed: fail closed.

use std::ffi::OsString;
use std::io::Read as _;
use std::process::ExitCode;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::settings::Settings;
use crate::policy::TrustPolicy;
use crate::syntax::text::{inert, outside};
use crate::syntax::{ImageDigest, ImageRef};
use crate::verify::{ImageReport, VerifyError};

/// The only stdin media type understood: an OCI descriptor.
pub const DESCRIPTOR_MEDIA_TYPE: &str = "application/vnd.oci.descriptor.v1+json";

/// Largest descriptor read from stdin.
pub const MAX_STDIN_BYTES: usize = 64 * 1024;

/// What containerd reads of stdout.
pub const MAX_REASON_BYTES: usize = 32 * 1024;

/// The flags containerd passes.
const FLAGS: [&str; 3] = ["name", "digest", "stdin-media-type"];

/// Whether the process was started the way containerd starts a verifier: its first argument
/// is one of containerd's flags.
pub(super) fn invoked(args: &[OsString]) -> bool {
    args.get(1)
        .and_then(|a| a.to_str())
        .and_then(flag_name)
        .is_some_and(|(name, _)| FLAGS.contains(&name))
}

/// `-name`, `--name`, `-name=v` or `--name=v`: the name and the inline value.
fn flag_name(arg: &str) -> Option<(&str, Option<&str>)> {
    let bare = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    Some(match bare.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (bare, None),
    })
}

/// Why the call could not be taken (exit 2).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// An argument is not a flag containerd passes.
    #[error("unexpected argument {0:?} (expected -name REF -digest DIGEST -stdin-media-type TYPE)")]
    Unexpected(String),
    /// A flag without its value.
    #[error("-{0} needs a value")]
    NoValue(&'static str),
    /// A flag given twice.
    #[error("-{0} is given twice")]
    Repeated(&'static str),
    /// A flag that must be there is not.
    #[error("-{0} is missing")]
    Missing(&'static str),
    /// An argument that is not UTF-8.
    #[error("an argument is not UTF-8")]
    NotUtf8,
    /// Stdin holds something else than a descriptor.
    #[error("-stdin-media-type {0:?}: only {DESCRIPTOR_MEDIA_TYPE} is understood")]
    MediaType(String),
    /// `-digest` is not `sha256:<64 hex>`.
    #[error("-digest {0:?} is not sha256:<64 hex>")]
    Digest(String),
    /// `-name` is not an image reference.
    #[error("-name {name:?}: {reason}")]
    Name {
        /// The name given (inert).
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// Stdin could not be read, or is too long.
    #[error("reading the descriptor on stdin: {0}")]
    Stdin(String),
    /// Stdin is not an OCI descriptor.
    #[error("the descriptor on stdin is not an OCI descriptor: {0}")]
    Descriptor(String),
    /// The descriptor names another digest than `-digest`.
    #[error("the descriptor on stdin has digest {found:?}, -digest is {expected}")]
    DigestMismatch {
        /// The descriptor's digest (inert).
        found: String,
        /// `-digest`.
        expected: ImageDigest,
    },
}

/// containerd's call, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Call {
    /// The image, pinned to the digest.
    pub image: ImageRef,
    /// The digest containerd resolved.
    pub digest: ImageDigest,
}

/// Parses containerd's arguments (after the program name, and after `containerd-verifier`
/// when given as a subcommand): each flag once, with its value inline or next.
pub fn parse_call(args: &[OsString]) -> Result<(String, ImageDigest), CallError> {
    let mut values: [Option<String>; 3] = [None, None, None];
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let arg = arg.to_str().ok_or(CallError::NotUtf8)?;
        let (name, inline) = flag_name(arg).ok_or_else(|| CallError::Unexpected(outside(arg)))?;
        let Some(i) = FLAGS.iter().position(|f| *f == name) else {
            return Err(CallError::Unexpected(outside(arg)));
        };
        let flag = FLAGS.get(i).copied().unwrap_or("?");
        let value = match inline {
            Some(v) => v.to_owned(),
            None => rest
                .next()
                .ok_or(CallError::NoValue(flag))?
                .to_str()
                .ok_or(CallError::NotUtf8)?
                .to_owned(),
        };
        let Some(slot) = values.get_mut(i) else {
            return Err(CallError::Unexpected(outside(arg)));
        };
        if slot.replace(value).is_some() {
            return Err(CallError::Repeated(flag));
        }
    }
    let [name, digest, media_type] = values;
    let name = name.ok_or(CallError::Missing("name"))?;
    let digest = digest.ok_or(CallError::Missing("digest"))?;
    let media_type = media_type.ok_or(CallError::Missing("stdin-media-type"))?;
    if media_type != DESCRIPTOR_MEDIA_TYPE {
        return Err(CallError::MediaType(outside(&media_type)));
    }
    let digest = digest
        .parse::<ImageDigest>()
        .map_err(|_| CallError::Digest(outside(&digest)))?;
    Ok((name, digest))
}

/// The descriptor on stdin, of which only the digest is read.
#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

/// Checks the descriptor (`stdin`, at most [`MAX_STDIN_BYTES`]) against `-digest` and pins
/// `-name` to it.
pub fn checked_call(name: &str, digest: ImageDigest, stdin: &[u8]) -> Result<Call, CallError> {
    if stdin.len() > MAX_STDIN_BYTES {
        return Err(CallError::Stdin(format!("over {MAX_STDIN_BYTES} bytes")));
    }
    let descriptor: Descriptor = serde_json::from_slice(stdin)
        .map_err(|e| CallError::Descriptor(outside(&e.to_string())))?;
    if descriptor.digest != digest.as_str() {
        return Err(CallError::DigestMismatch {
            found: outside(&descriptor.digest),
            expected: digest,
        });
    }
    let image: ImageRef =
        name.parse()
            .map_err(|e: crate::syntax::SyntaxError| CallError::Name {
                name: outside(name),
                reason: e.to_string(),
            })?;
    if let Some(named) = image.digest()
        && named != &digest
    {
        return Err(CallError::Name {
            name: outside(name),
            reason: format!("names another digest than -digest {digest}"),
        });
    }
    Ok(Call {
        image: image.with_digest(digest.clone()),
        digest,
    })
}

/// The decision, as containerd gets it: exit code and one line of reason.
struct Decision {
    code: u8,
    reason: String,
}

/// Runs the verifier on `args` (containerd's flags).
pub(super) fn run(args: &[OsString]) -> ExitCode {
    super::logging::init(false, tracing::Level::WARN);
    let Decision { code, reason } = decide(args);
    // containerd keeps the first 32 KiB; the cut leaves room for the marker.
    println!("{}", inert(&reason, MAX_REASON_BYTES - 64));
    ExitCode::from(code)
}

fn decide(args: &[OsString]) -> Decision {
    let refused = |reason: String| Decision {
        code: 2,
        reason: format!("atcr-verify: refused the call: {reason}"),
    };
    let (name, digest) = match parse_call(args) {
        Ok(c) => c,
        Err(e) => return refused(e.to_string()),
    };
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin()
        .take(MAX_STDIN_BYTES as u64 + 1)
        .read_to_end(&mut stdin)
    {
        return refused(CallError::Stdin(e.to_string()).to_string());
    }
    let call = match checked_call(&name, digest, &stdin) {
        Ok(c) => c,
        Err(e) => return refused(e.to_string()),
    };
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => return refused(format!("settings: {e}")),
    };
    let policy = match TrustPolicy::load_or_builtin(settings.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => return refused(e.to_string()),
    };
    match verify(&settings, &call.image, &policy) {
        Ok(report) => judge(&call.image, &report),
        Err(e) => Decision {
            code: 2,
            reason: format!(
                "atcr-verify: could not verify {}: {}: {e}",
                call.image,
                e.code()
            ),
        },
    }
}

/// A failure of the engine itself or of the verification.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// The engine could not be built (a setting is wrong).
    #[error("{0}")]
    Engine(String),
    /// The verification could not finish.
    #[error(transparent)]
    Verify(VerifyError),
}

impl Failure {
    /// A stable code: `usage`, or the verification error's.
    fn code(&self) -> &'static str {
        match self {
            Failure::Engine(_) => "usage",
            Failure::Verify(e) => e.code(),
        }
    }
}

/// Builds the engine of `settings` and verifies `image` under `policy` within the budget.
pub(super) fn verify(
    settings: &Settings,
    image: &ImageRef,
    policy: &TrustPolicy,
) -> Result<ImageReport, Failure> {
    let engine = settings.engine.build().map_err(Failure::Engine)?;
    let work = engine
        .verifier
        .verify(image, policy, OffsetDateTime::now_utc());
    super::block_within(settings.timeout, work)
        .map_err(Failure::Engine)?
        .map_err(Failure::Verify)
}

/// Exit 0 only for an admitted image.
fn judge(image: &ImageRef, report: &ImageReport) -> Decision {
    let v = &report.verdict;
    let policy = v.policy.as_deref().unwrap_or("(none)");
    if v.verified && !v.deny {
        let signer = match (&v.did, v.signed_at) {
            (Some(did), Some(at)) => format!(
                ", signed by {did} at {}",
                at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
            ),
            _ => String::new(),
        };
        return Decision {
            code: 0,
            reason: format!(
                "atcr-verify: verified {image}: policy {policy}, signatures counted {}/{}{signer}",
                v.counted_signatures, v.required_signatures
            ),
        };
    }
    let why = v
        .reason
        .as_deref()
        .unwrap_or("the verdict is deny (defaults.unmatched)");
    Decision {
        code: 1,
        reason: format!("atcr-verify: NOT verified {image}: policy {policy}: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn containerd_calls_are_recognised() {
        for first in [
            "-name",
            "-digest",
            "--name",
            "-stdin-media-type=x",
            "-name=a",
        ] {
            assert!(invoked(&args(&["atcr-verify", first])), "{first}");
        }
        for first in ["image", "-h", "--help", "-n", "--version", "-names"] {
            assert!(!invoked(&args(&["atcr-verify", first])), "{first}");
        }
        assert!(!invoked(&args(&["atcr-verify"])));
    }

    #[test]
    fn containerd_arguments_are_parsed_as_go_flags() {
        let call = args(&[
            "-name",
            "localhost:5000/app:v1",
            "-digest",
            D,
            "-stdin-media-type",
            DESCRIPTOR_MEDIA_TYPE,
        ]);
        let (name, digest) = parse_call(&call).unwrap();
        assert_eq!(name, "localhost:5000/app:v1");
        assert_eq!(digest.as_str(), D);
        let inline = args(&[
            &format!("--digest={D}"),
            "--name=a/b",
            &format!("-stdin-media-type={DESCRIPTOR_MEDIA_TYPE}"),
        ]);
        assert_eq!(parse_call(&inline).unwrap().0, "a/b");
        for (list, expected) in [
            (
                vec!["-name", "a", "-digest", D],
                CallError::Missing("stdin-media-type"),
            ),
            (vec!["-name"], CallError::NoValue("name")),
            (
                vec!["-name", "a", "-name", "b"],
                CallError::Repeated("name"),
            ),
            (vec!["-verbose"], CallError::Unexpected("-verbose".into())),
            (vec!["extra"], CallError::Unexpected("extra".into())),
            (
                vec![
                    "-name",
                    "a",
                    "-digest",
                    "sha256:x",
                    "-stdin-media-type",
                    DESCRIPTOR_MEDIA_TYPE,
                ],
                CallError::Digest("sha256:x".into()),
            ),
            (
                vec![
                    "-name",
                    "a",
                    "-digest",
                    D,
                    "-stdin-media-type",
                    "text/plain",
                ],
                CallError::MediaType("text/plain".into()),
            ),
        ] {
            assert_eq!(parse_call(&args(&list)), Err(expected), "{list:?}");
        }
    }

    #[test]
    fn the_descriptor_must_name_the_digest() {
        let digest: ImageDigest = D.parse().unwrap();
        let stdin = format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","size":527}}"#
        );
        let call = checked_call("localhost:5000/app:v1", digest.clone(), stdin.as_bytes()).unwrap();
        assert_eq!(call.image.to_string(), format!("localhost:5000/app@{D}"));
        let other = stdin.replace("1111", "2222");
        assert!(matches!(
            checked_call("a/b", digest.clone(), other.as_bytes()),
            Err(CallError::DigestMismatch { .. })
        ));
        assert!(matches!(
            checked_call("a/b", digest.clone(), b"not json"),
            Err(CallError::Descriptor(_))
        ));
        assert!(matches!(
            checked_call("UPPER/x", digest.clone(), stdin.as_bytes()),
            Err(CallError::Name { .. })
        ));
        let long = vec![b' '; MAX_STDIN_BYTES + 1];
        assert!(matches!(
            checked_call("a/b", digest, &long),
            Err(CallError::Stdin(_))
        ));
    }
}
