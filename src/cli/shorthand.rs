//! `atcr-verify REF [flags]`: shorthand for `atcr-verify image REF [flags]`, as the guide's
//! CI snippets call it.
//!
//! The rewrite inserts `image` before the arguments, so every `image` flag (those added
//! later too) goes through the one `image` parser. It applies only when the first argument
//! is not a subcommand or a flag and has the shape of a registry reference (a `/`, `:` or
//! `@` in it): a bare word is never taken as an image, so a mistyped subcommand is still
//! reported as one (a bare Docker Hub name like `nginx` is spelled `atcr-verify image nginx`).

use std::ffi::OsString;

use clap::CommandFactory;

use super::Cli;

/// The arguments with `image` inserted when the first one is a reference.
pub(super) fn expand(mut args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return args;
    };
    if is_reference(first) || is_offline_flag(first) {
        args.insert(1, OsString::from("image"));
    }
    args
}

/// Whether `arg` is `--offline` or `--bundle`, which the guide writes before the reference
/// (`atcr-verify --offline --bundle bundle.json IMAGE`); no subcommand starts that way.
fn is_offline_flag(arg: &str) -> bool {
    arg == "--offline" || arg == "--bundle" || arg.starts_with("--bundle=")
}

/// Whether `arg`, in first position, names an image rather than a subcommand or flag.
fn is_reference(arg: &str) -> bool {
    if arg.starts_with('-') || !arg.contains(['/', ':', '@']) {
        return false;
    }
    let command = Cli::command();
    let known = command
        .get_subcommands()
        .flat_map(|c| std::iter::once(c.get_name()).chain(c.get_all_aliases()))
        .chain(["help"]);
    !known.into_iter().any(|name| name == arg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expanded(args: &[&str]) -> Vec<String> {
        let args = std::iter::once("atcr-verify")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        expand(args)
            .into_iter()
            .skip(1)
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn a_reference_first_is_an_image_command() {
        for args in [
            &["ghcr.io/acme/app:v1", "--policy", "p.yaml"][..],
            &["localhost:5000/app@sha256:00"],
            &["nginx:1.27", "--json"],
            &["--offline", "--bundle", "b.json", "ghcr.io/acme/app:v1"],
            &["--bundle=b.json", "--offline", "nginx"],
        ] {
            let mut expected = vec!["image".to_owned()];
            expected.extend(args.iter().map(|a| (*a).to_owned()));
            assert_eq!(expanded(args), expected, "{args:?}");
        }
    }

    #[test]
    fn subcommands_flags_and_bare_words_are_left_alone() {
        for args in [
            &["image", "ghcr.io/acme/app:v1"][..],
            &["policy", "check", "p.yaml"],
            &["--version"],
            &["-name", "x/y:1"],
            &["no-such-command"],
            &["nginx"],
            &["help"],
            &[],
        ] {
            assert_eq!(expanded(args), args.to_vec(), "{args:?}");
        }
    }
}
