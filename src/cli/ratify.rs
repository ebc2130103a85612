//! `atcr-verify` as a Ratify v1 external verifier plugin.
//!
//! Ratify v1 finds the plugin binary by the verifier's `type` (else `name`) in its plugin
//! directories and runs it **with no arguments**, with `RATIFY_VERIFIER_COMMAND=VERIFY`,
//! `RATIFY_VERIFIER_SUBJECT=<registry/repository@sha256:…>` and `RATIFY_VERIFIER_VERSION` in
//! the environment, and on stdin
//! `{"config": {"name", "type", "artifactTypes", …parameters}, "storeConfig": {…}, "referenceDesc": {OCI descriptor}}`.
//! It reads one `VerifierResult` JSON object from stdout; a non-zero exit is an error. So the
//! binary takes that call when it has no arguments and `RATIFY_VERIFIER_COMMAND` is set (also
//! as `atcr-verify ratify-verifier`).
//!
//! The plugin judges the one signature artifact `referenceDesc` names: it verifies the subject
//! with the normal engine under the trust policy (`config.policyFile`, else
//! `ATCR_VERIFY_POLICY`, else the built-in one; engine settings from [`super::settings`]),
//! reads that artifact by digest, and succeeds only when the record it points to is a
//! signature that **counted** under the matched policy. A subject that could not be verified
//! (an upstream failure, the deadline) is `isSuccess: false`: fail closed. Bad input (another
//! command, malformed stdin, an unreadable policy) exits 2 with the reason on stderr.
//!
//! Ratify v2 has no external plugins; this serves Ratify v1.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::engine::Engine;
use super::settings::Settings;
use crate::policy::TrustPolicy;
use crate::resolve::ArtifactError;
use crate::syntax::text::{inert, outside};
use crate::syntax::{ImageDigest, ImageRef};
use crate::verify::{ImageReport, VerifyError};

/// The variable that names the operation; its presence (with no arguments) selects this face.
pub const COMMAND_VAR: &str = "RATIFY_VERIFIER_COMMAND";
/// The variable that names the subject image.
pub const SUBJECT_VAR: &str = "RATIFY_VERIFIER_SUBJECT";
/// The variable that names the protocol version.
pub const VERSION_VAR: &str = "RATIFY_VERIFIER_VERSION";

/// Largest stdin read.
const MAX_STDIN_BYTES: u64 = 256 * 1024;

/// Longest `message`.
const MAX_MESSAGE_BYTES: usize = 4096;

/// Whether Ratify started the process: no arguments, and its command variable set.
pub(super) fn invoked(args: &[std::ffi::OsString]) -> bool {
    args.len() == 1 && std::env::var_os(COMMAND_VAR).is_some()
}

/// Why the call could not be taken (exit 2, message on stderr).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// `RATIFY_VERIFIER_COMMAND` is not `VERIFY`.
    #[error("{COMMAND_VAR} {0:?}: only VERIFY is supported")]
    Command(String),
    /// `RATIFY_VERIFIER_VERSION` is not a 1.x version.
    #[error("{VERSION_VAR} {0:?}: only 1.x is supported")]
    Version(String),
    /// `RATIFY_VERIFIER_SUBJECT` is missing or not an image reference.
    #[error("{SUBJECT_VAR}: {0}")]
    Subject(String),
    /// Stdin could not be read.
    #[error("reading stdin: {0}")]
    Stdin(String),
    /// Stdin is not the plugin input.
    #[error("stdin is not Ratify's verifier input: {0}")]
    Input(String),
    /// The settings or the policy could not be read.
    #[error("{0}")]
    Settings(String),
}

/// Ratify's input (the parts read).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Input {
    config: Config,
    #[serde(rename = "referenceDesc")]
    reference: Reference,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    policy_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reference {
    digest: String,
}

/// The checked call.
#[derive(Debug)]
pub struct Call {
    /// The subject image.
    pub subject: ImageRef,
    /// The signature artifact to judge.
    pub artifact: ImageDigest,
    /// The verifier's name (`config.name`).
    pub name: String,
    /// The verifier's type (`config.type`, else its name).
    pub kind: String,
    /// `config.policyFile`.
    pub policy_file: Option<PathBuf>,
}

/// Checks the environment (`var` looks a variable up) and stdin.
pub fn parse_call(var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Call, CallError> {
    let command = var(COMMAND_VAR).unwrap_or_default();
    if command != "VERIFY" {
        return Err(CallError::Command(outside(&command)));
    }
    if let Some(version) = var(VERSION_VAR)
        && !(version == "1" || version.starts_with("1."))
    {
        return Err(CallError::Version(outside(&version)));
    }
    let subject = var(SUBJECT_VAR).ok_or_else(|| CallError::Subject("not set".into()))?;
    let subject: ImageRef = subject
        .parse()
        .map_err(|e: crate::syntax::SyntaxError| CallError::Subject(e.to_string()))?;
    if stdin.len() as u64 > MAX_STDIN_BYTES {
        return Err(CallError::Stdin(format!("over {MAX_STDIN_BYTES} bytes")));
    }
    let input: Input =
        serde_json::from_slice(stdin).map_err(|e| CallError::Input(outside(&e.to_string())))?;
    let artifact = input.reference.digest.parse::<ImageDigest>().map_err(|_| {
        CallError::Input(format!(
            "referenceDesc.digest {:?} is not sha256:<64 hex>",
            outside(&input.reference.digest)
        ))
    })?;
    let name = input
        .config
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "atcr-verify".to_owned());
    let kind = input.config.kind.filter(|t| !t.is_empty());
    Ok(Call {
        subject,
        artifact,
        kind: outside(kind.as_deref().unwrap_or(&name)),
        name: outside(&name),
        policy_file: input.config.policy_file,
    })
}

/// Ratify's `VerifierResult`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VerifierResult {
    is_success: bool,
    message: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    verifier_name: String,
    verifier_type: String,
    extensions: Extensions,
}

/// What the result says beyond success.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Extensions {
    /// The signer, when the artifact could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    did: Option<String>,
    /// When the record was signed, when it was proven.
    #[serde(skip_serializing_if = "Option::is_none")]
    signed_at: Option<String>,
    /// The record the artifact points to.
    #[serde(skip_serializing_if = "Option::is_none")]
    record_uri: Option<String>,
    /// The matched policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    /// The subject's digest that was verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_digest: Option<String>,
    /// Whether the subject as a whole met the matched policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    image_verified: Option<bool>,
    /// The stable code of a failure to decide.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// Runs the plugin.
pub(super) fn run() -> ExitCode {
    super::logging::init(false, tracing::Level::WARN);
    let bad = |e: CallError| {
        eprintln!("atcr-verify: {e}");
        ExitCode::from(2)
    };
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut stdin)
    {
        return bad(CallError::Stdin(e.to_string()));
    }
    let call = match parse_call(|k| std::env::var(k).ok(), &stdin) {
        Ok(c) => c,
        Err(e) => return bad(e),
    };
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => return bad(CallError::Settings(format!("settings: {e}"))),
    };
    let path = call.policy_file.as_deref().or(settings.policy.as_deref());
    let policy = match TrustPolicy::load_or_builtin(path) {
        Ok(p) => p,
        Err(e) => return bad(CallError::Settings(e.to_string())),
    };
    let engine = match settings.engine.build() {
        Ok(e) => e,
        Err(e) => return bad(CallError::Settings(format!("settings: {e}"))),
    };
    let (is_success, message, extensions) = judge(&engine, settings.timeout, &call, &policy);
    let result = VerifierResult {
        is_success,
        message: inert(&message, MAX_MESSAGE_BYTES),
        name: call.name.clone(),
        kind: call.kind.clone(),
        verifier_name: call.name,
        verifier_type: call.kind,
        extensions,
    };
    match serde_json::to_string(&result) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("atcr-verify: printing the result: {e}");
            ExitCode::from(2)
        }
    }
}

/// What became of the subject and the artifact.
enum Found {
    /// The subject's report, and the artifact read by digest (or why it could not be).
    Both(
        Box<ImageReport>,
        Result<crate::resolve::SignatureArtifact, ArtifactError>,
    ),
    /// No policy scopes the subject: the registry was not asked.
    Unscoped,
}

/// Verifies the subject, reads the artifact, and says whether its signature counted.
fn judge(
    engine: &Engine,
    budget: Duration,
    call: &Call,
    policy: &TrustPolicy,
) -> (bool, String, Extensions) {
    let mut ext = Extensions::default();
    let undecided = |ext: Extensions, what: String| (false, what, ext);
    let work = async {
        let report = engine
            .verifier
            .verify(&call.subject, policy, OffsetDateTime::now_utc())
            .await?;
        let Some(subject) = report
            .digest
            .clone()
            .filter(|_| report.verdict.policy.is_some())
        else {
            return Ok(Found::Unscoped);
        };
        let artifact = engine
            .registry
            .signature_artifact(&call.subject, &subject, &call.artifact)
            .await;
        Ok::<_, VerifyError>(Found::Both(Box::new(report), artifact))
    };
    let found = match super::block_within(budget, work) {
        Ok(found) => found,
        Err(e) => return undecided(ext, e),
    };
    let (report, artifact) = match found {
        Ok(Found::Both(report, artifact)) => (report, artifact),
        Ok(Found::Unscoped) => {
            return (
                false,
                format!(
                    "no policy scopes {}: no signature can count for it",
                    call.subject
                ),
                ext,
            );
        }
        Err(e) => {
            ext.error = Some(e.code());
            return undecided(
                ext,
                format!("could not verify {}: {}: {e}", call.subject, e.code()),
            );
        }
    };
    let v = &report.verdict;
    ext.policy = v.policy.clone();
    ext.subject_digest = report.digest.as_ref().map(ToString::to_string);
    ext.image_verified = Some(v.verified);
    let artifact = match artifact {
        Ok(a) => a,
        Err(e) => {
            ext.error = Some(e.code());
            let message = match &e {
                ArtifactError::Fetch(_) => format!("{e} ({})", call.artifact),
                // These name the artifact.
                _ => e.to_string(),
            };
            return (false, message, ext);
        }
    };
    let uri = artifact.record_uri.to_string();
    ext.did = Some(artifact.did.to_string());
    ext.record_uri = Some(uri.clone());
    let policy_name = v.policy.as_deref().unwrap_or("(none)");
    let Some(signature) = v.signatures.iter().find(|s| s.uri.as_deref() == Some(&uri)) else {
        return (
            false,
            format!(
                "signature {uri} by {} was not among the signatures checked for {} (past --max-pointers, or left out of the verdict)",
                artifact.did, call.subject
            ),
            ext,
        );
    };
    ext.signed_at = signature.signed_at.and_then(|t| t.format(&Rfc3339).ok());
    if signature.counted {
        (
            true,
            format!(
                "signature {uri} by {} counts under policy {policy_name}",
                artifact.did
            ),
            ext,
        )
    } else {
        let reason = signature
            .reason
            .as_ref()
            .map_or_else(|| "not counted".to_owned(), ToString::to_string);
        let detail = signature
            .detail
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        (
            false,
            format!(
                "signature {uri} by {} does not count under policy {policy_name}: {reason}{detail}",
                artifact.did
            ),
            ext,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const SUBJECT: &str = "localhost:5000/app@sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn ratify_input_is_parsed() {
        let stdin = format!(
            r#"{{"config": {{"name": "atproto", "type": "atcr-verify", "artifactTypes": "application/vnd.atproto.signature.v1+json", "policyFile": "/etc/p.yaml"}},
                "storeConfig": {{"version": "1.0.0", "pluginBinDirs": null, "store": {{"name": "oras"}}}},
                "referenceDesc": {{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "{D}", "size": 558, "artifactType": "application/vnd.atproto.signature.v1+json"}}}}"#
        );
        let vars = [
            (COMMAND_VAR, "VERIFY"),
            (SUBJECT_VAR, SUBJECT),
            (VERSION_VAR, "1.0.0"),
        ];
        let call = parse_call(env(&vars), stdin.as_bytes()).unwrap();
        assert_eq!(call.subject.to_string(), SUBJECT);
        assert_eq!(call.artifact.as_str(), D);
        assert_eq!(call.name, "atproto");
        assert_eq!(call.kind, "atcr-verify");
        assert_eq!(
            call.policy_file.as_deref(),
            Some(std::path::Path::new("/etc/p.yaml"))
        );
        // The type defaults to the name.
        let bare =
            format!(r#"{{"config": {{"name": "x"}}, "referenceDesc": {{"digest": "{D}"}}}}"#);
        let call = parse_call(env(&vars), bare.as_bytes()).unwrap();
        assert_eq!((call.name.as_str(), call.kind.as_str()), ("x", "x"));
    }

    #[test]
    fn bad_ratify_input_is_refused() {
        let good = format!(r#"{{"config": {{}}, "referenceDesc": {{"digest": "{D}"}}}}"#);
        for (vars, stdin, needle) in [
            (
                vec![(COMMAND_VAR, "VERSION"), (SUBJECT_VAR, SUBJECT)],
                good.clone(),
                "only VERIFY",
            ),
            (
                vec![
                    (COMMAND_VAR, "VERIFY"),
                    (SUBJECT_VAR, SUBJECT),
                    (VERSION_VAR, "2.0.0"),
                ],
                good.clone(),
                "only 1.x",
            ),
            (vec![(COMMAND_VAR, "VERIFY")], good.clone(), "not set"),
            (
                vec![(COMMAND_VAR, "VERIFY"), (SUBJECT_VAR, "UPPER/x")],
                good.clone(),
                SUBJECT_VAR,
            ),
            (
                vec![(COMMAND_VAR, "VERIFY"), (SUBJECT_VAR, SUBJECT)],
                "{".to_owned(),
                "not Ratify's verifier input",
            ),
            (
                vec![(COMMAND_VAR, "VERIFY"), (SUBJECT_VAR, SUBJECT)],
                r#"{"config": {}, "referenceDesc": {"digest": "sha256:x"}}"#.to_owned(),
                "referenceDesc.digest",
            ),
        ] {
            let e = parse_call(env(&vars), stdin.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{vars:?}: {e}");
        }
    }
}
