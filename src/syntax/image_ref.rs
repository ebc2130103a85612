//! Container image references, parsed with the Docker/OCI reference grammar of
//! distribution/reference (<https://github.com/distribution/reference/blob/main/reference.go>)
//! and normalized the way `docker pull` normalizes them.
//!
//! Normalization (so that a trust-policy scope sees one spelling per registry and repository,
//! the registry containerd would reach; [`canonical_registry`]):
//! - no registry → `docker.io`; Docker Hub's other hosts `index.docker.io` and
//!   `registry-1.docker.io` → `docker.io`;
//! - a single-component Docker Hub name gets `library/` (`nginx` → `docker.io/library/nginx`,
//!   `registry-1.docker.io/nginx` too);
//! - the registry host is lowercased (DNS names are case-insensitive: `ATCR.IO/x` is
//!   `atcr.io/x`);
//! - the default HTTPS port is dropped: `atcr.io:443/x` is `atcr.io/x`, `[::1]:443/x` is
//!   `[::1]/x` (and `atcr.io:0443/x`, the same port number, too). Other ports are kept, without
//!   leading zeros: `localhost:5000/x` stays, `localhost:05000/x` is `localhost:5000/x`.
//!
//! Refused: uppercase in the repository path (the grammar only allows lowercase), a bare
//! 64-hex string (an image ID, not a reference), names over 255 characters, tags over 128,
//! and digests other than `sha256:` + 64 lowercase hex (the only form ATCR signs).

use std::str::FromStr;

use super::{ImageDigest, SyntaxError};

/// A parsed, normalized image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<ImageDigest>,
}

/// Longest input accepted (name, tag and digest together, with their separators).
const MAX_LEN: usize = 512;
/// Longest name (registry and repository as written), as in distribution/reference.
const MAX_NAME_LEN: usize = 255;
/// Longest tag, as in distribution/reference.
const MAX_TAG_LEN: usize = 128;

const DEFAULT_REGISTRY: &str = "docker.io";
/// Docker Hub's other host names, which containerd and Docker treat as `docker.io`.
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];
/// The port HTTPS uses when none is written.
const HTTPS_PORT: &str = "443";
const OFFICIAL_PREFIX: &str = "library/";

impl ImageRef {
    /// The registry host, normalized ([`canonical_registry`]), with its port if one other than
    /// 443 was given: `docker.io`, `atcr.io`, `localhost:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path without the registry: `library/nginx`, `alice/app`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The normalized name `registry/repository`, which trust-policy scopes match.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag, if one was given.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// What the registry is asked for: the digest when one was given, else the tag, else
    /// `latest` (a tag beside a digest is ignored, as `docker pull` ignores it).
    pub fn reference(&self) -> String {
        match &self.digest {
            Some(d) => d.to_string(),
            None => self.tag.as_deref().unwrap_or("latest").to_owned(),
        }
    }

    /// The digest, if one was given.
    pub fn digest(&self) -> Option<&ImageDigest> {
        self.digest.as_ref()
    }

    /// The same repository pinned to `digest`, without a tag.
    pub fn with_digest(&self, digest: ImageDigest) -> ImageRef {
        ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let err = |reason| Err(SyntaxError::new("image reference", s, reason));
        if s.is_empty() {
            return err("is empty");
        }
        if s.len() > MAX_LEN {
            return err("longer than 512 characters");
        }
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return err("a 64-hex string is an image ID, not a reference");
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => match digest.parse::<ImageDigest>() {
                Ok(d) => (rest, Some(d)),
                Err(_) => return err("digest must be sha256: followed by 64 lowercase hex digits"),
            },
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (rest.get(..colon), rest.get(colon + 1..))
            }
            _ => (Some(rest), None),
        };
        let name = name.unwrap_or_default();
        if let Some(Err(reason)) = tag.map(check_tag) {
            return err(reason);
        }
        if name.is_empty() {
            return err("repository name is empty");
        }
        if name.len() > MAX_NAME_LEN {
            return err("name longer than 255 characters");
        }
        let (registry, path) = match split_registry(name) {
            Ok(parts) => parts,
            Err(reason) => return err(reason),
        };
        if let Err(reason) = path.split('/').try_for_each(check_path_component) {
            return err(reason);
        }
        let registry = registry.map_or_else(|| DEFAULT_REGISTRY.to_owned(), canonical_registry);
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path.to_owned()
        };
        Ok(ImageRef {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

/// Splits `name` into an optional registry and the path, as distribution's
/// `splitDockerDomain`: the first component is a registry when there is a `/` after it and it
/// has a `.` or `:` or is `localhost`.
fn split_registry(name: &str) -> Result<(Option<&str>, &str), &'static str> {
    let Some((first, path)) = name.split_once('/') else {
        return Ok((None, name));
    };
    let is_host = first.contains(['.', ':']) || first.eq_ignore_ascii_case("localhost");
    if !is_host {
        if first.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err("repository path must be lowercase (a registry host needs a '.' or ':')");
        }
        return Ok((None, name));
    }
    check_registry(first)?;
    Ok((Some(first), path))
}

/// The one name of a registry `host[:port]`, as containerd treats registries: the host
/// lowercased; the port without leading zeros, and dropped when it is 443, the HTTPS default
/// (`atcr.io:443` is `atcr.io`, `[::1]:443` is `[::1]`); Docker Hub's hosts `index.docker.io`
/// and `registry-1.docker.io` (with or without `:443`) as `docker.io`. Image references,
/// trust-policy scopes, `--insecure-registry` values and credential keys all name registries
/// through this, so no spelling of a registry steps around a scope written with another.
///
/// Meant for registries [`check_registry`] accepts; any other string comes back lowercased
/// and otherwise unchecked (it never panics).
pub(crate) fn canonical_registry(registry: &str) -> String {
    let lower = registry.to_ascii_lowercase();
    let (host, port) = split_port(&lower);
    let port = port.map(|p| match p.trim_start_matches('0') {
        "" => "0",
        digits => digits,
    });
    let host = match host {
        h if DOCKER_HUB_ALIASES.contains(&h) && matches!(port, None | Some(HTTPS_PORT)) => {
            DEFAULT_REGISTRY
        }
        h => h,
    };
    match port {
        None | Some(HTTPS_PORT) => host.to_owned(),
        Some(port) => format!("{host}:{port}"),
    }
}

/// `host[:port]` → (`host`, `port`); a bracketed IPv6 host keeps its brackets
/// (`[::1]:5000` → (`[::1]`, `5000`)).
pub(crate) fn split_port(registry: &str) -> (&str, Option<&str>) {
    if registry.starts_with('[') {
        return match registry.find("]:") {
            Some(close) => {
                // `close` is the byte of the ASCII ']', so `close + 1` is a char boundary.
                let (host, port) = registry.split_at(close + 1);
                (host, port.strip_prefix(':'))
            }
            None => (registry, None),
        };
    }
    match registry.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    }
}

/// `host[:port]`, where host is a DNS name (components of letters, digits and inner hyphens)
/// or a bracketed IPv6 address.
pub(crate) fn check_registry(registry: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(v6) = registry.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err("registry IPv6 address is missing its ']'");
        };
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err("registry IPv6 address may only have hex digits and ':'");
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err("registry IPv6 address must be followed by ':port' or '/'"),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let component_ok = |c: &str| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
        };
        if !host.split('.').all(component_ok) {
            return Err(
                "registry host must be dot-separated labels of letters, digits and inner hyphens",
            );
        }
    }
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !ok {
            return Err("registry port must be a number from 1 to 65535");
        }
    }
    Ok(())
}

/// One path component: lowercase alphanumeric runs joined by `.`, `_`, `__` or any run of `-`.
fn check_path_component(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("repository path has an empty component");
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("repository path must be lowercase");
    }
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    if !b.first().is_some_and(alnum) || !b.last().is_some_and(alnum) {
        return Err("repository path components must start and end with a letter or digit");
    }
    let mut separator = String::new();
    for &x in b {
        if alnum(&x) {
            if !matches!(separator.as_str(), "" | "." | "_" | "__")
                && !separator.bytes().all(|s| s == b'-')
            {
                return Err("repository path separators must be '.', '_', '__' or hyphens");
            }
            separator.clear();
        } else if matches!(x, b'.' | b'_' | b'-') {
            separator.push(char::from(x));
        } else {
            return Err("repository path may only have lowercase letters, digits, '.', '_', '-'");
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), &'static str> {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let b = tag.as_bytes();
    if b.is_empty() {
        return Err("tag is empty");
    }
    if b.len() > MAX_TAG_LEN {
        return Err("tag longer than 128 characters");
    }
    if !b.first().is_some_and(word) {
        return Err("tag must start with a letter, digit or '_'");
    }
    if !b.iter().all(|x| word(x) || matches!(x, b'.' | b'-')) {
        return Err("tag may only have letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

impl serde::Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(super::FromStrVisitor::<ImageRef>::new("an image reference"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// (input, registry, repository, tag, has digest, display)
    #[test]
    #[allow(clippy::type_complexity)] // a table of cases
    fn normalizes_like_docker() {
        let digest = format!("sha256:{HEX}");
        let cases: Vec<(String, &str, &str, Option<&str>, bool, String)> = vec![
            (
                "nginx".into(),
                "docker.io",
                "library/nginx",
                None,
                false,
                "docker.io/library/nginx".into(),
            ),
            (
                "nginx:1.25".into(),
                "docker.io",
                "library/nginx",
                Some("1.25"),
                false,
                "docker.io/library/nginx:1.25".into(),
            ),
            (
                "alice/app".into(),
                "docker.io",
                "alice/app",
                None,
                false,
                "docker.io/alice/app".into(),
            ),
            (
                "docker.io/nginx".into(),
                "docker.io",
                "library/nginx",
                None,
                false,
                "docker.io/library/nginx".into(),
            ),
            (
                "index.docker.io/nginx".into(),
                "docker.io",
                "library/nginx",
                None,
                false,
                "docker.io/library/nginx".into(),
            ),
            (
                "index.docker.io/alice/app:v1".into(),
                "docker.io",
                "alice/app",
                Some("v1"),
                false,
                "docker.io/alice/app:v1".into(),
            ),
            (
                "atcr.io/alice/app:latest".into(),
                "atcr.io",
                "alice/app",
                Some("latest"),
                false,
                "atcr.io/alice/app:latest".into(),
            ),
            (
                "ATCR.IO/alice/app".into(),
                "atcr.io",
                "alice/app",
                None,
                false,
                "atcr.io/alice/app".into(),
            ),
            (
                "atcr.io/app".into(),
                "atcr.io",
                "app",
                None,
                false,
                "atcr.io/app".into(),
            ),
            (
                "localhost/app".into(),
                "localhost",
                "app",
                None,
                false,
                "localhost/app".into(),
            ),
            (
                "LOCALHOST/app".into(),
                "localhost",
                "app",
                None,
                false,
                "localhost/app".into(),
            ),
            (
                "localhost:5000/a/b/c:t".into(),
                "localhost:5000",
                "a/b/c",
                Some("t"),
                false,
                "localhost:5000/a/b/c:t".into(),
            ),
            // The HTTPS port is the default: dropped, as containerd reaches the same host.
            (
                "atcr.io:443/x".into(),
                "atcr.io",
                "x",
                None,
                false,
                "atcr.io/x".into(),
            ),
            (
                "ATCR.IO:443/acme/prod-api:v1".into(),
                "atcr.io",
                "acme/prod-api",
                Some("v1"),
                false,
                "atcr.io/acme/prod-api:v1".into(),
            ),
            (
                "atcr.io:0443/x".into(),
                "atcr.io",
                "x",
                None,
                false,
                "atcr.io/x".into(),
            ),
            (
                "[::1]:443/x".into(),
                "[::1]",
                "x",
                None,
                false,
                "[::1]/x".into(),
            ),
            (
                "[::1]/x".into(),
                "[::1]",
                "x",
                None,
                false,
                "[::1]/x".into(),
            ),
            // Other ports are kept, as numbers.
            (
                "atcr.io:4430/x".into(),
                "atcr.io:4430",
                "x",
                None,
                false,
                "atcr.io:4430/x".into(),
            ),
            (
                "localhost:05000/x".into(),
                "localhost:5000",
                "x",
                None,
                false,
                "localhost:5000/x".into(),
            ),
            // Docker Hub's hosts are one registry, docker.io (with library/ for one component).
            (
                "registry-1.docker.io/library/nginx:1".into(),
                "docker.io",
                "library/nginx",
                Some("1"),
                false,
                "docker.io/library/nginx:1".into(),
            ),
            (
                "registry-1.docker.io/nginx".into(),
                "docker.io",
                "library/nginx",
                None,
                false,
                "docker.io/library/nginx".into(),
            ),
            (
                "Registry-1.Docker.IO/alice/app".into(),
                "docker.io",
                "alice/app",
                None,
                false,
                "docker.io/alice/app".into(),
            ),
            (
                "registry-1.docker.io:443/alice/app:v1".into(),
                "docker.io",
                "alice/app",
                Some("v1"),
                false,
                "docker.io/alice/app:v1".into(),
            ),
            (
                "index.docker.io:443/nginx".into(),
                "docker.io",
                "library/nginx",
                None,
                false,
                "docker.io/library/nginx".into(),
            ),
            (
                "INDEX.DOCKER.IO:0443/alice/app".into(),
                "docker.io",
                "alice/app",
                None,
                false,
                "docker.io/alice/app".into(),
            ),
            (
                "docker.io:443/nginx:1.25".into(),
                "docker.io",
                "library/nginx",
                Some("1.25"),
                false,
                "docker.io/library/nginx:1.25".into(),
            ),
            // On another port it is some other registry: no alias, no library/.
            (
                "index.docker.io:5000/nginx".into(),
                "index.docker.io:5000",
                "nginx",
                None,
                false,
                "index.docker.io:5000/nginx".into(),
            ),
            (
                "docker.io:5000/nginx".into(),
                "docker.io:5000",
                "nginx",
                None,
                false,
                "docker.io:5000/nginx".into(),
            ),
            (
                "registry:5000/x".into(),
                "registry:5000",
                "x",
                None,
                false,
                "registry:5000/x".into(),
            ),
            (
                "[::1]:5000/x".into(),
                "[::1]:5000",
                "x",
                None,
                false,
                "[::1]:5000/x".into(),
            ),
            (
                "localhost:5000".into(),
                "docker.io",
                "library/localhost",
                Some("5000"),
                false,
                "docker.io/library/localhost:5000".into(),
            ),
            (
                format!("atcr.io/alice/app@{digest}"),
                "atcr.io",
                "alice/app",
                None,
                true,
                format!("atcr.io/alice/app@{digest}"),
            ),
            (
                format!("atcr.io/alice/app:v1@{digest}"),
                "atcr.io",
                "alice/app",
                Some("v1"),
                true,
                format!("atcr.io/alice/app:v1@{digest}"),
            ),
            (
                format!("nginx@{digest}"),
                "docker.io",
                "library/nginx",
                None,
                true,
                format!("docker.io/library/nginx@{digest}"),
            ),
            (
                "a/b.c/d__e/f-g---h:_T.a-g".into(),
                "docker.io",
                "a/b.c/d__e/f-g---h",
                Some("_T.a-g"),
                false,
                "docker.io/a/b.c/d__e/f-g---h:_T.a-g".into(),
            ),
        ];
        for (input, registry, repository, tag, has_digest, display) in cases {
            let r: ImageRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), registry, "{input}");
            assert_eq!(r.repository(), repository, "{input}");
            assert_eq!(r.name(), format!("{registry}/{repository}"), "{input}");
            assert_eq!(r.tag(), tag, "{input}");
            assert_eq!(r.digest().is_some(), has_digest, "{input}");
            assert_eq!(r.to_string(), display, "{input}");
            // The normalized form parses back to the same reference.
            assert_eq!(display.parse::<ImageRef>().unwrap(), r, "{input}");
        }
    }

    #[test]
    fn canonical_registry_is_one_name_per_registry() {
        for (registry, canonical) in [
            ("atcr.io", "atcr.io"),
            ("ATCR.IO", "atcr.io"),
            ("atcr.io:443", "atcr.io"),
            ("atcr.io:0443", "atcr.io"),
            ("atcr.io:5000", "atcr.io:5000"),
            ("atcr.io:05000", "atcr.io:5000"),
            ("atcr.io:44", "atcr.io:44"),
            ("atcr.io:4430", "atcr.io:4430"),
            ("localhost:5000", "localhost:5000"),
            ("[::1]", "[::1]"),
            ("[::1]:443", "[::1]"),
            ("[::443]", "[::443]"),
            ("[::443]:5000", "[::443]:5000"),
            ("docker.io", "docker.io"),
            ("docker.io:443", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("index.docker.io:443", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("Registry-1.Docker.IO:443", "docker.io"),
            ("registry-1.docker.io:5000", "registry-1.docker.io:5000"),
            ("registry.hub.docker.com", "registry.hub.docker.com"),
            ("hub.docker.io", "hub.docker.io"),
        ] {
            assert_eq!(canonical_registry(registry), canonical, "{registry}");
            // A fixed point: the canonical name is its own canonical name.
            assert_eq!(canonical_registry(canonical), canonical, "{registry}");
        }
    }

    #[test]
    fn split_port_keeps_ipv6_brackets() {
        assert_eq!(split_port("atcr.io"), ("atcr.io", None));
        assert_eq!(split_port("atcr.io:443"), ("atcr.io", Some("443")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("[::1]:5000"), ("[::1]", Some("5000")));
    }

    #[test]
    fn refuses_what_the_grammar_refuses() {
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "is empty"),
            ("Nginx".into(), "must be lowercase"),
            ("atcr.io/Alice/app".into(), "must be lowercase"),
            ("Alice/app".into(), "must be lowercase"),
            ("atcr.io//app".into(), "empty component"),
            ("atcr.io/app/".into(), "empty component"),
            ("/app".into(), "empty component"),
            ("atcr.io/-app".into(), "start and end"),
            ("atcr.io/app-".into(), "start and end"),
            ("atcr.io/a..b".into(), "separators"),
            ("atcr.io/a___b".into(), "separators"),
            ("atcr.io/a._b".into(), "separators"),
            ("atcr.io/a b".into(), "may only have"),
            ("atcr.io/app:".into(), "tag is empty"),
            ("atcr.io/app:-x".into(), "tag must start"),
            ("atcr.io/app:a+b".into(), "tag may only"),
            (format!("atcr.io/app:{}", "t".repeat(129)), "tag longer"),
            (format!("atcr.io/{}", "a".repeat(250)), "name longer"),
            ("x".repeat(600), "longer than 512"),
            ("atcr.io/app@sha256:abc".into(), "digest must be"),
            (format!("atcr.io/app@sha512:{HEX}{HEX}"), "digest must be"),
            (
                format!("atcr.io/app@sha256:{}", HEX.to_uppercase()),
                "digest must be",
            ),
            (HEX.into(), "image ID"),
            ("atcr.io:0/x".into(), "port"),
            ("atcr.io:65536/x".into(), "port"),
            ("atcr.io:/x".into(), "port"),
            ("atcr.io:44a/x".into(), "port"),
            ("-atcr.io/x".into(), "registry host"),
            ("atcr..io/x".into(), "registry host"),
            ("atcr_io.com/x".into(), "registry host"),
            ("[::1/x".into(), "IPv6"),
            ("[zz]:5000/x".into(), "IPv6"),
            ("https://atcr.io/x".into(), "registry"),
        ];
        for (input, needle) in cases {
            let e = input
                .parse::<ImageRef>()
                .err()
                .unwrap_or_else(|| panic!("accepted {input:?}"));
            assert!(e.to_string().contains(needle), "{input:?}: {e}");
            assert_eq!(e.what, "image reference");
        }
    }

    #[test]
    fn with_digest_drops_the_tag() {
        let r: ImageRef = "atcr.io/alice/app:v1".parse().unwrap();
        let d: ImageDigest = format!("sha256:{HEX}").parse().unwrap();
        let pinned = r.with_digest(d.clone());
        assert_eq!(
            pinned.to_string(),
            format!("atcr.io/alice/app@sha256:{HEX}")
        );
        assert_eq!(pinned.tag(), None);
        assert_eq!(pinned.digest(), Some(&d));
        assert_eq!(pinned.name(), r.name());
    }

    #[test]
    fn serde_is_the_normalized_string() {
        let r: ImageRef = serde_json::from_str("\"nginx:1\"").unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "\"docker.io/library/nginx:1\""
        );
        assert!(serde_json::from_str::<ImageRef>("\"Nginx\"").is_err());
    }
}
