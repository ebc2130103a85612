//! The trust policy: YAML in, a [`TrustPolicy`] out, and from it a [`Verdict`] per image.
//!
//! Pure: no network, no clock (`now` is an argument), no async. The file format is
//! `DESIGN.md` §4 and the guide's "Trust Policies" section; the field-by-field reference is
//! in the README. Stages:
//!
//! - `file`: the serde model (`deny_unknown_fields`), where every field type checks itself,
//!   so a bad DID, glob, duration, datetime or `action` is reported at its own line and column;
//! - `compile`: the checks that span fields (duplicate names, `minSignatures` above the
//!   trusted-DID count, `validFrom` after `expiresAt`, …), located in the file after the fact,
//!   and the warnings `atcr-verify policy check` prints;
//! - `eval`: [`TrustPolicy::evaluate`] — which policy scopes an image, which signatures count;
//! - `holder`: [`PolicyHolder`], the reloadable, lock-free handle a running service keeps;
//! - `env`: [`env_policy`], the implicit policy of `REQUIRE_SIGNATURE`/`TRUSTED_DIDS`.
//!
//! What it deliberately does not do: fetch anything, check proofs (the proof layer does, and
//! hands in [`Evidence`]), or decide how a denial reaches Kubernetes (the faces do).

mod compile;
mod duration;
mod env;
mod eval;
mod explain;
mod file;
mod holder;
mod locate;
mod scope;

use std::path::{Path, PathBuf};

use crate::syntax::ImageRef;

pub use compile::{DEFAULT_SIGNATURE_COLLECTION, MAX_PINNED_KEYS, Policy, TrustedDid};
pub use duration::{DurationError, parse_duration};
pub use env::{EnvPolicyError, env_policy, env_policy_yaml};
pub(crate) use eval::names_repository;
pub use eval::{
    CLOCK_SKEW, Evidence, MAX_DETAIL_BYTES, MAX_REASON_BYTES, MAX_SIGNATURES_JSON_BYTES,
    NotCounted, Proof, SignatureVerdict, Verdict, VerdictAction,
};
pub use explain::Explanation;
pub use file::{Action, Unmatched};
pub use holder::{PolicyHolder, ReloadOutcome, ReloadStats};

/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;

/// The trust policy used when none is given: `policy/trust-policy.yaml`, compiled in. It
/// scopes only the example's images and has `unmatched: deny`, so it fails closed.
pub const DEFAULT_POLICY: &str = include_str!("../policy/trust-policy.yaml");

/// A loaded, checked trust-policy file, ready to evaluate images.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    policies: Vec<Policy>,
    unmatched: Unmatched,
    warnings: Vec<Diagnostic>,
}

impl TrustPolicy {
    /// Parses and checks a policy file's text. Errors carry line, column and the field.
    pub fn from_yaml(text: &str) -> Result<TrustPolicy, PolicyError> {
        let file = locate::parse(text).map_err(|d| PolicyError::Invalid(Diagnostics(vec![d])))?;
        compile::compile(file, text).map_err(|all| PolicyError::Invalid(Diagnostics(all)))
    }

    /// The built-in [`DEFAULT_POLICY`].
    pub fn builtin() -> Result<TrustPolicy, PolicyError> {
        Self::from_yaml(DEFAULT_POLICY)
    }

    /// Reads `path`, or takes the built-in [`DEFAULT_POLICY`] when there is none.
    pub fn load_or_builtin(path: Option<&Path>) -> Result<TrustPolicy, PolicyError> {
        match path {
            Some(path) => Self::load(path),
            None => Self::builtin(),
        }
    }

    /// Reads, parses and checks a policy file (at most [`MAX_POLICY_BYTES`]). Errors name the
    /// file as well.
    pub fn load(path: impl AsRef<Path>) -> Result<TrustPolicy, PolicyError> {
        let path = path.as_ref();
        let bytes = read_policy_file(path)?;
        Self::from_bytes(path, &bytes)
    }

    /// As [`TrustPolicy::from_yaml`] on bytes read from `path` (named in errors).
    fn from_bytes(path: &Path, bytes: &[u8]) -> Result<TrustPolicy, PolicyError> {
        let with_file = |mut all: Diagnostics| {
            for d in &mut all.0 {
                d.file = Some(path.to_owned());
            }
            PolicyError::Invalid(all)
        };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            with_file(Diagnostics(vec![Diagnostic {
                file: None,
                location: None,
                field: None,
                message: format!("not UTF-8 text: {e}"),
            }]))
        })?;
        let mut policy = Self::from_yaml(text).map_err(|e| match e {
            PolicyError::Invalid(all) => with_file(all),
            other => other,
        })?;
        for w in &mut policy.warnings {
            w.file = Some(path.to_owned());
        }
        Ok(policy)
    }

    /// The first policy, in file order, whose scope matches the image's normalized name.
    pub fn matching(&self, image: &ImageRef) -> Option<&Policy> {
        let name = image.name();
        self.policies.iter().find(|p| p.matches_name(&name))
    }

    /// Which policy applies to `image` and what it requires, for `atcr-verify policy explain`.
    pub fn explain(&self, image: &ImageRef) -> Explanation<'_> {
        Explanation::new(self, image)
    }

    /// The policies, in file order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// What happens to an image no policy scopes (`defaults.unmatched`).
    pub fn unmatched(&self) -> Unmatched {
        self.unmatched
    }

    /// Things that load but are probably mistakes (non-canonical `did:plc`, a DID no policy
    /// uses, a wildcard in a registry host, …). `policy check` prints them.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }
}

/// Reads a policy file, refusing one larger than [`MAX_POLICY_BYTES`].
fn read_policy_file(path: &Path) -> Result<Vec<u8>, PolicyError> {
    let bytes =
        crate::file::read_capped(path, MAX_POLICY_BYTES).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file parses badly or breaks rules; says where and which field, for each rule
    /// broken (a file that does not parse has one).
    #[error("{0}")]
    Invalid(Diagnostics),
    /// The file cannot be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("{}: policy file is larger than {MAX_POLICY_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

impl PolicyError {
    /// The first located problem, when the file was read but is invalid.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        self.diagnostics().first()
    }

    /// Every located problem, in file order, when the file was read but is invalid.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Invalid(all) => &all.0,
            _ => &[],
        }
    }
}

/// One problem in a policy file: where it is, which field, and what is wrong. Used for
/// errors and warnings alike. Displays as `file:line:column: field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, when the policy was loaded from one.
    pub file: Option<PathBuf>,
    /// Where in the text, when known.
    pub location: Option<Location>,
    /// The field's path, as `policies[0].minSignatures` or `trustedDIDs.did:plc:x.validFrom`.
    pub field: Option<String>,
    /// What is wrong: expected versus found.
    pub message: String,
}

/// A 1-based line and column in a policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// The problems of an invalid policy file, in file order (never empty); shown on one line,
/// separated by `; `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(Vec<Diagnostic>);

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, &self.location) {
            (Some(file), Some(l)) => write!(f, "{}:{}:{}: ", file.display(), l.line, l.column)?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some(l)) => write!(f, "line {}, column {}: ", l.line, l.column)?,
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}
