//! Settings of the process faces (containerd's image verifier, Ratify's verifier plugin).
//!
//! Those callers run the binary with their own arguments only, so the trust policy, the
//! budget and every engine flag come from `ATCR_VERIFY_*` variables (the same names as for
//! `image` and `serve`), and, for the variables the environment does not set, from an
//! optional file of `KEY=VALUE` lines: `ATCR_VERIFY_ENV_FILE` when set, else `atcr-verify.env`
//! beside the binary (symlinks resolved). The file only fills in what the environment leaves
//! out: the environment wins.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory as _, Parser};

use super::engine::{EngineArgs, parse_duration};
use crate::syntax::text::outside;

/// The variable naming the settings file.
pub(super) const ENV_FILE_VAR: &str = "ATCR_VERIFY_ENV_FILE";

/// The settings file's name beside the binary.
pub(super) const ENV_FILE: &str = "atcr-verify.env";

/// Largest settings file read.
const MAX_ENV_FILE_BYTES: u64 = 64 * 1024;

/// What a process face runs with.
#[derive(Debug, Parser)]
#[command(name = "atcr-verify", no_binary_name = true)]
pub(super) struct Settings {
    /// Trust-policy file (default: the example policy built into the binary).
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_POLICY")]
    pub policy: Option<PathBuf>,
    /// Budget for the whole verification: well inside the caller's own timeout (containerd
    /// kills a verifier after 10 s by default).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "8s",
        value_parser = parse_duration,
        env = "ATCR_VERIFY_TIMEOUT"
    )]
    pub timeout: Duration,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum SettingsError {
    /// The settings file exists but could not be read.
    #[error("reading {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of the settings file is wrong.
    #[error("{} line {line}: {reason}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A setting has a wrong value (clap's first line, naming the flag).
    #[error("{0}")]
    Invalid(String),
}

impl Settings {
    /// From the environment and the settings file.
    pub fn load() -> Result<Settings, SettingsError> {
        let explicit = std::env::var_os(ENV_FILE_VAR).map(PathBuf::from);
        let path = explicit.clone().or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
            Some(exe.parent()?.join(ENV_FILE))
        });
        let file = match path {
            Some(path) => match crate::file::read_capped(&path, MAX_ENV_FILE_BYTES) {
                Ok(bytes) => Some((path, bytes)),
                // Beside the binary it is optional; named explicitly, it must be there.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => None,
                Err(source) => return Err(SettingsError::Read { path, source }),
            },
            None => None,
        };
        let file = file.as_ref().map(|(p, b)| (p.as_path(), b.as_slice()));
        Settings::from_file(file, |name| std::env::var_os(name).is_some())
    }

    /// Parses the environment (through clap's `env`) with the lines of `file` whose variable
    /// `in_env` says is not set given as the flags they stand for.
    fn from_file(
        file: Option<(&Path, &[u8])>,
        in_env: impl Fn(&str) -> bool,
    ) -> Result<Settings, SettingsError> {
        let mut args = Vec::new();
        if let Some((path, bytes)) = file {
            args = file_args(path, bytes, in_env)?;
        }
        Settings::try_parse_from(args).map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid setting");
            SettingsError::Invalid(first.trim_start_matches("error: ").to_owned())
        })
    }
}

/// The flags the lines of a settings file stand for (`ATCR_VERIFY_TAG_TTL=7s` is
/// `--tag-ttl=7s`), leaving out the variables set in the environment.
fn file_args(
    path: &Path,
    bytes: &[u8],
    in_env: impl Fn(&str) -> bool,
) -> Result<Vec<String>, SettingsError> {
    let line_error = |line: usize, reason: String| SettingsError::Line {
        path: path.to_owned(),
        line,
        reason,
    };
    if bytes.len() as u64 > MAX_ENV_FILE_BYTES {
        return Err(line_error(0, format!("over {MAX_ENV_FILE_BYTES} bytes")));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| line_error(0, e.to_string()))?;
    let command = Settings::command();
    let mut seen = HashSet::new();
    let mut args = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(line_error(n, "expected KEY=VALUE".into()));
        };
        let key = key.trim();
        let value = unquote(value.trim());
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(key))
        else {
            return Err(line_error(n, format!("unknown setting {:?}", outside(key))));
        };
        if !seen.insert(key.to_owned()) {
            return Err(line_error(n, format!("{key} is set twice")));
        }
        if in_env(key) {
            continue;
        }
        let Some(long) = arg.get_long() else {
            continue;
        };
        if arg.get_action().takes_values() {
            args.push(format!("--{long}={value}"));
        } else {
            match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => args.push(format!("--{long}")),
                "" | "0" | "false" | "no" | "off" => {}
                _ => {
                    return Err(line_error(
                        n,
                        format!("{key}: expected true or false, found {:?}", outside(value)),
                    ));
                }
            }
        }
    }
    Ok(args)
}

/// A value without one pair of surrounding quotes.
fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(file: &str, in_env: &[&str]) -> Result<Settings, SettingsError> {
        Settings::from_file(Some((Path::new("f.env"), file.as_bytes())), |k| {
            in_env.contains(&k)
        })
    }

    #[test]
    fn a_settings_file_fills_in_flags() {
        let s = parse(
            "# containerd verifier\n\
             ATCR_VERIFY_POLICY=/etc/atcr/policy.yaml\n\
             export ATCR_VERIFY_TIMEOUT=\"5s\"\n\
             ATCR_VERIFY_INSECURE_REGISTRY=localhost:5000,localhost:5001\n\
             ATCR_VERIFY_ALLOW_PRIVATE_ADDRESSES=true\n\
             \n\
             ATCR_VERIFY_TAG_TTL = '7s'\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            s.policy.as_deref(),
            Some(Path::new("/etc/atcr/policy.yaml"))
        );
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(
            s.engine.insecure_registries,
            ["localhost:5000", "localhost:5001"]
        );
        assert!(s.engine.allow_private_addresses);
        assert_eq!(s.engine.tag_ttl, Duration::from_secs(7));
        let s = parse("ATCR_VERIFY_ALLOW_PRIVATE_ADDRESSES=off\n", &[]).unwrap();
        assert!(!s.engine.allow_private_addresses);
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let args = file_args(
            Path::new("f"),
            b"ATCR_VERIFY_TAG_TTL=7s\nATCR_VERIFY_DID_TTL=9s\n",
            |k| k == "ATCR_VERIFY_TAG_TTL",
        )
        .unwrap();
        assert_eq!(args, ["--did-ttl=9s"]);
    }

    #[test]
    fn a_wrong_settings_file_is_refused_naming_the_line() {
        for (file, needle) in [
            ("ATCR_VERIFY_TAG_TTL=3\n", "--tag-ttl"),
            ("\nATCR_VERIFY_NO_SUCH=1\n", "line 2: unknown setting"),
            ("ATCR_VERIFY_TAG_TTL\n", "line 1: expected KEY=VALUE"),
            (
                "ATCR_VERIFY_TAG_TTL=1s\nATCR_VERIFY_TAG_TTL=2s\n",
                "set twice",
            ),
            (
                "ATCR_VERIFY_ALLOW_PRIVATE_ADDRESSES=maybe\n",
                "true or false",
            ),
            ("ATCR_VERIFY_LOG=debug\n", "unknown setting"),
        ] {
            let e = parse(file, &[]).unwrap_err().to_string();
            assert!(e.contains(needle), "{file:?}: {e}");
        }
    }
}
