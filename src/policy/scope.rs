//! Policy scopes: globs over the normalized image name `registry/repository`.
//!
//! Rules (each one keeps a scope from matching more, or less, than its text says):
//! - `*` and `?` stay within one `/`-separated component; `**` crosses components and must be a
//!   whole component (`atcr.io/**`, `atcr.io/**/prod-*`); `[abc]` classes and `{a,b}`
//!   alternatives work as in globset. A lone `**` matches every image.
//! - The first component is the registry, normalized as images are: `atcr.io/*` never
//!   matches `atcr.io.evil.com/x`, and `atcr.io:5000/x` matches only images that name port
//!   5000. A literal registry must look like a host (a `.` or `:`, or `localhost`); `alice/*`
//!   is refused because image names always start with a registry (`docker.io/alice/*`).
//! - A literal registry part is normalized by the same function as image references
//!   ([`canonical_registry`]): lowercased (hosts are case-insensitive), the HTTPS port `:443`
//!   dropped (`atcr.io:443/x` is `atcr.io/x`, and matches `atcr.io:443/x` images, whose name is
//!   `atcr.io/x` too), and `index.docker.io` and `registry-1.docker.io` become `docker.io`. A
//!   registry part with wildcards (`*`, `**`, `*.atcr.io`) is only lowercased. Uppercase in
//!   the path is refused: repository paths are lowercase, so such a scope could never match.
//! - Tags and digests are not part of a name: a `:` in the path or any `@` is refused, as is a
//!   Docker Hub scope without a namespace (`docker.io/nginx`; the name is
//!   `docker.io/library/nginx`).

use std::fmt;
use std::str::FromStr;

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Deserializer};

use crate::syntax::{FromStrVisitor, canonical_registry, check_registry};

/// A checked, normalized scope with its compiled matcher.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    text: String,
    matcher: GlobMatcher,
    warnings: Vec<String>,
}

impl Scope {
    /// The normalized scope text.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the normalized image name `registry/repository` is in scope.
    pub(crate) fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    /// Things that are allowed but likely mistakes.
    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const MAX_LEN: usize = 512;
const GLOB_META: [char; 4] = ['*', '?', '[', '{'];

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '.' | '_' | '-' | '/' | ':' | '*' | '?' | '[' | ']' | '{' | '}' | ',' | '!' | '^'
        )
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("scope is empty".into());
        }
        if s.len() > MAX_LEN {
            return Err(format!("scope is longer than {MAX_LEN} characters"));
        }
        if s.contains('@') {
            return Err(format!(
                "scope {s:?} has a digest; scopes match repository names, not digests"
            ));
        }
        if let Some(c) = s.chars().find(|c| !allowed(*c)) {
            return Err(format!(
                "scope {s:?} has the character {c:?}; scopes use letters, digits, '.', '_', '-', \
                 '/', a ':' before a port, and the glob characters * ? [ ] {{ }} ,"
            ));
        }
        let mut warnings = Vec::new();
        let text = if s == "**" {
            s.to_owned()
        } else {
            let Some((host, path)) = s.split_once('/') else {
                return Err(format!(
                    "scope {s:?} has no '/': write registry/path (e.g. atcr.io/alice/*), or ** for every image"
                ));
            };
            let host = normalize_host(s, host, &mut warnings)?;
            check_path(s, &host, path)?;
            format!("{host}/{path}")
        };
        let glob = GlobBuilder::new(&text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("scope {s:?} is not a valid glob: {}", e.kind()))?;
        Ok(Scope {
            text,
            matcher: glob.compile_matcher(),
            warnings,
        })
    }
}

/// Checks the registry part and returns it normalized as image references are
/// ([`canonical_registry`]: `atcr.io:443` as `atcr.io`, Docker Hub's hosts as `docker.io`);
/// a wildcard registry part only lowercased.
fn normalize_host(scope: &str, host: &str, warnings: &mut Vec<String>) -> Result<String, String> {
    check_recursive(scope, host)?;
    let lower = host.to_ascii_lowercase();
    if host.contains(GLOB_META) {
        if host != "*" && host != "**" {
            warnings.push(format!(
                "the registry part {host:?} mixes text and wildcards, so it can match other \
                 registries' hosts; prefer one scope per registry"
            ));
        }
        return Ok(lower);
    }
    if host.is_empty() {
        return Err(format!(
            "scope {scope:?} starts with '/'; write the registry first (e.g. atcr.io/…)"
        ));
    }
    if !(host.contains(['.', ':']) || lower == "localhost") {
        return Err(format!(
            "scope {scope:?} starts with {host:?}, which is not a registry host (a host has a '.' \
             or ':', or is localhost); image names are matched with their registry, e.g. \
             docker.io/{host}/…"
        ));
    }
    check_registry(&lower).map_err(|reason| format!("scope {scope:?}: {reason}"))?;
    Ok(canonical_registry(&lower))
}

fn check_path(scope: &str, host: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!(
            "scope {scope:?} has no repository path; use {host}/** for every repository of a registry"
        ));
    }
    if path.split('/').any(str::is_empty) {
        return Err(format!("scope {scope:?} has an empty path component (//)"));
    }
    if path.contains(':') {
        return Err(format!(
            "scope {scope:?} has a ':' in the path; scopes match repository names, tags are not part of them"
        ));
    }
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "scope {scope:?} has uppercase in the repository path, which image names never have, \
             so it could never match; write it in lowercase"
        ));
    }
    check_recursive(scope, path)?;
    if host == "docker.io" && !path.contains('/') && path != "**" {
        return Err(format!(
            "scope {scope:?} could never match: Docker Hub names always have a namespace \
             (docker.io/library/nginx for official images)"
        ));
    }
    Ok(())
}

/// `**` crosses `/` only as a whole component; elsewhere globset would quietly read it as `*`.
fn check_recursive(scope: &str, part: &str) -> Result<(), String> {
    if part.split('/').any(|c| c.contains("**") && c != "**") {
        return Err(format!(
            "scope {scope:?}: `**` must be a whole path component (atcr.io/**/app); use * within a component"
        ));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Scope>::new("a scope glob"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(s: &str) -> Scope {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn star_stays_in_a_component_double_star_crosses() {
        // (scope, name, matches)
        for (s, name, expected) in [
            ("atcr.io/*", "atcr.io/app", true),
            ("atcr.io/*", "atcr.io/alice/app", false),
            ("atcr.io/**", "atcr.io/app", true),
            ("atcr.io/**", "atcr.io/alice/app", true),
            ("atcr.io/**", "atcr.io/a/b/c/d", true),
            ("atcr.io/*/prod-*", "atcr.io/alice/prod-api", true),
            ("atcr.io/*/prod-*", "atcr.io/alice/team/prod-api", false),
            ("atcr.io/*/prod-*", "atcr.io/alice/dev-api", false),
            ("atcr.io/**/prod-*", "atcr.io/alice/team/prod-api", true),
            ("atcr.io/**/prod-*", "atcr.io/prod-api", true),
            ("atcr.io/alice/app", "atcr.io/alice/app", true),
            ("atcr.io/alice/app", "atcr.io/alice/app2", false),
            ("atcr.io/alice/app", "atcr.io/alice/ap", false),
            ("atcr.io/alice/ap?", "atcr.io/alice/app", true),
            ("atcr.io/{alice,bob}/*", "atcr.io/bob/x", true),
            ("atcr.io/{alice,bob}/*", "atcr.io/eve/x", false),
            ("atcr.io/[ab]*/x", "atcr.io/bob/x", true),
            ("**", "docker.io/library/nginx", true),
            ("*/alice/*", "atcr.io/alice/x", true),
            ("*/alice/*", "ghcr.io/alice/x", true),
            ("**/prod-*", "ghcr.io/a/b/prod-x", true),
            // Host confusion: a scope never matches more than its text says.
            ("atcr.io/*", "atcr.io.evil.com/x", false),
            ("atcr.io/**", "atcr.io.evil.com/x", false),
            ("atcr.io/**", "evilatcr.io/x", false),
            ("atcr.io/**", "atcr.io:5000/x", false),
            ("atcr.io:5000/x", "atcr.io/x", false),
            // Names are normalized (`atcr.io:443/x` images are named `atcr.io/x`), and so is
            // the registry part of a scope: port 443 is the same registry.
            ("atcr.io:443/x", "atcr.io/x", true),
            ("atcr.io:0443/x", "atcr.io/x", true),
            ("atcr.io:443/*/prod-*", "atcr.io/acme/prod-api", true),
            ("ATCR.IO/x", "atcr.io/x", true),
            ("index.docker.io/library/*", "docker.io/library/nginx", true),
            (
                "registry-1.docker.io/library/*",
                "docker.io/library/nginx",
                true,
            ),
            (
                "registry-1.docker.io:443/alice/*",
                "docker.io/alice/app",
                true,
            ),
            ("docker.io/library/*", "docker.io/library/nginx", true),
            ("localhost:5000/**", "localhost:5000/a/b", true),
            ("localhost:5000/**", "localhost/a", false),
        ] {
            assert_eq!(scope(s).matches(name), expected, "{s} vs {name}");
        }
    }

    #[test]
    fn normalizes_the_registry_part() {
        assert_eq!(scope("ATCR.IO/alice/*").as_str(), "atcr.io/alice/*");
        assert_eq!(
            scope("Index.Docker.IO/library/*").as_str(),
            "docker.io/library/*"
        );
        assert_eq!(scope("LOCALHOST/x").as_str(), "localhost/x");
        assert_eq!(scope("atcr.io:443/x").as_str(), "atcr.io/x");
        assert_eq!(scope("ATCR.IO:443/acme/*").as_str(), "atcr.io/acme/*");
        assert_eq!(scope("localhost:5000/x").as_str(), "localhost:5000/x");
        assert_eq!(scope("localhost:05000/x").as_str(), "localhost:5000/x");
        for hub in [
            "registry-1.docker.io/library/*",
            "Registry-1.Docker.IO:443/library/*",
            "index.docker.io:443/library/*",
            "docker.io:443/library/*",
        ] {
            assert_eq!(scope(hub).as_str(), "docker.io/library/*", "{hub}");
        }
        assert_eq!(
            scope("registry-1.docker.io:5000/x").as_str(),
            "registry-1.docker.io:5000/x"
        );
        // Wildcard registry parts are left as written (lowercased).
        assert_eq!(scope("*/x").as_str(), "*/x");
        assert_eq!(scope("**/x").as_str(), "**/x");
        assert_eq!(scope("*.ATCR.IO/x").as_str(), "*.atcr.io/x");
        assert_eq!(scope("atcr.io:44*/x").as_str(), "atcr.io:44*/x");
        assert!(scope("atcr.io/**").warnings().is_empty());
        assert!(scope("*/x").warnings().is_empty());
        assert_eq!(scope("atcr.io*/x").warnings().len(), 1);
        assert_eq!(scope("*.atcr.io/x").warnings().len(), 1);
    }

    #[test]
    fn refuses_scopes_that_cannot_say_what_they_mean() {
        for (s, needle) in [
            ("", "empty"),
            ("atcr.io", "no '/'"),
            ("*", "no '/'"),
            ("atcr.io/", "no repository path"),
            ("atcr.io//x", "empty path component"),
            ("/x", "starts with '/'"),
            ("alice/*", "not a registry host"),
            ("library/nginx", "not a registry host"),
            ("atcr.io/Alice/*", "uppercase"),
            ("atcr.io/alice/app:latest", "tags are not part"),
            ("atcr.io/alice/app@sha256:00", "digest"),
            ("atcr.io/alice app", "character ' '"),
            ("atcr.io/a\\b", "character '\\\\'"),
            ("atcr.io/app**", "whole path component"),
            ("atcr.io/**app/x", "whole path component"),
            ("a**/x", "whole path component"),
            ("atcr.io/[a", "not a valid glob"),
            ("atcr.io/{a,b", "not a valid glob"),
            ("atcr.io/[z-a]", "not a valid glob"),
            ("docker.io/nginx", "namespace"),
            ("docker.io/*", "namespace"),
            // Docker Hub under another of its names, or with :443, is still Docker Hub.
            ("registry-1.docker.io/nginx", "namespace"),
            ("index.docker.io:443/nginx", "namespace"),
            ("atcr.io:99999/x", "port"),
            ("-atcr.io/x", "registry host"),
        ] {
            let e = s
                .parse::<Scope>()
                .err()
                .unwrap_or_else(|| panic!("accepted {s:?}"));
            assert!(e.contains(needle), "{s:?}: {e}");
        }
    }
}
