//! Registry authentication: credentials from a Docker `config.json` (the format of a
//! Kubernetes `kubernetes.io/dockerconfigjson` secret) and the `WWW-Authenticate`
//! challenge flow (Bearer token from the realm, or Basic).
//!
//! Written here rather than taken from `docker_credential` because that crate reads only
//! the process's own Docker config (by environment variable) and runs credential-helper
//! programs; a mounted secret file at a path the operator names is what a cluster has.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::syntax::canonical_registry;

/// Largest `config.json` read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A username and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `Authorization: Basic …` value.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.username, self.password))
        )
    }
}

/// Registry credentials by registry host.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    by_registry: HashMap<String, Credentials>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    auths: HashMap<String, WireAuth>,
}

#[derive(Deserialize)]
struct WireAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Why a Docker config could not be used.
#[derive(Debug, thiserror::Error)]
#[error("registry credentials {path}: {reason}")]
pub struct ConfigError {
    path: String,
    reason: String,
}

impl DockerConfig {
    /// Reads a `config.json` / `.dockerconfigjson` file.
    pub fn load(path: &Path) -> Result<DockerConfig, ConfigError> {
        let err = |reason: String| ConfigError {
            path: path.display().to_string(),
            reason,
        };
        let bytes =
            crate::file::read_capped(path, MAX_CONFIG_BYTES).map_err(|e| err(e.to_string()))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(err(format!("larger than {MAX_CONFIG_BYTES} bytes")));
        }
        Self::parse(&bytes).map_err(err)
    }

    /// Parses the JSON (`{"auths": {"<registry>": {"auth": base64(user:pass)}}}`, or
    /// `username`/`password` fields).
    pub fn parse(bytes: &[u8]) -> Result<DockerConfig, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not a Docker config.json: {e}"))?;
        if !value.is_object() {
            return Err("not a Docker config.json: expected a JSON object".into());
        }
        let wire: Wire =
            serde_json::from_value(value).map_err(|e| format!("not a Docker config.json: {e}"))?;
        let mut by_registry = HashMap::new();
        for (key, entry) in wire.auths {
            let registry = normalize_registry_key(&key);
            let creds = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = STANDARD
                        .decode(auth.trim())
                        .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
                    let text = String::from_utf8(decoded)
                        .map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
                    let (u, p) = text
                        .split_once(':')
                        .ok_or_else(|| format!("auths.{key:?}.auth is not user:password"))?;
                    Credentials {
                        username: u.to_owned(),
                        password: p.to_owned(),
                    }
                }
                (_, Some(username), Some(password)) => Credentials { username, password },
                _ => continue, // identity tokens and helpers are not supported; anonymous
            };
            by_registry.insert(registry, creds);
        }
        Ok(DockerConfig { by_registry })
    }

    /// Credentials for a registry host (`docker.io`, `ghcr.io`, `localhost:5000`), under any
    /// spelling of it that image references normalize to the same registry (`atcr.io:443` is
    /// `atcr.io`, `registry-1.docker.io` is `docker.io`).
    pub fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.by_registry.get(&canonical_registry(registry))
    }
}

/// The registry a `config.json` key names, as image references name it
/// ([`canonical_registry`]): `https://index.docker.io/v1/` → `docker.io`; `ghcr.io/` →
/// `ghcr.io`; `atcr.io:443` → `atcr.io`. `registry.hub.docker.com`, which Docker's tools
/// also write for Docker Hub, → `docker.io`.
fn normalize_registry_key(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = canonical_registry(key.split('/').next().unwrap_or(key));
    match host.as_str() {
        "registry.hub.docker.com" => "docker.io".to_owned(),
        _ => host,
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=…`.
    Basic,
    /// `Bearer realm=…,service=…,scope=…`.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter.
        service: Option<String>,
        /// The `scope` parameter the registry asked for.
        scope: Option<String>,
    },
}

/// Parses one challenge (RFC 7235 `auth-scheme 1*SP auth-param *(, auth-param)`), the form
/// registries send. Unknown schemes give `None`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

fn parse_params(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        let Some((name, rest)) = s.split_once('=') else {
            return out;
        };
        let name = name.trim().to_owned();
        let rest = rest.trim_start();
        let (value, after) = if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, quoted.get(end..).unwrap_or(""))
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            (
                rest.get(..end).unwrap_or("").trim().to_owned(),
                rest.get(end..).unwrap_or(""),
            )
        };
        out.push((name, value));
        s = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(
            parse_challenge(r#"bearer realm=https://t/x, scope="a\"b""#),
            Some(Challenge::Bearer {
                realm: "https://t/x".into(),
                service: None,
                scope: Some("a\"b".into()),
            })
        );
    }

    #[test]
    fn docker_config() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "ghcr.io": {"username": "bot", "password": "tok:en"},
            "quay.io": {"identitytoken": "x"},
            "https://ATCR.IO:443/v2/": {"username": "atcr", "password": "a"},
            "registry.example.com:0443": {"username": "example", "password": "e"},
            "localhost:5000": {"username": "local", "password": "l"}
        }}"#;
        let c = DockerConfig::parse(json).unwrap();
        let hub = c.credentials("docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pass")
        );
        assert_eq!(c.credentials("ghcr.io").unwrap().password, "tok:en");
        assert!(c.credentials("quay.io").is_none());
        // Keys are normalized as image references are: the HTTPS port is dropped, other
        // ports are kept, Docker Hub's hosts are docker.io, on both sides of the lookup.
        assert_eq!(c.credentials("atcr.io").unwrap().username, "atcr");
        assert_eq!(c.credentials("atcr.io:443").unwrap().username, "atcr");
        assert_eq!(
            c.credentials("registry.example.com").unwrap().username,
            "example"
        );
        assert_eq!(c.credentials("localhost:5000").unwrap().username, "local");
        assert!(c.credentials("localhost").is_none());
        assert_eq!(c.credentials("registry-1.docker.io:443"), Some(hub));
        for key in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "registry-1.docker.io",
            "registry-1.docker.io:443",
            "https://registry.hub.docker.com/v2/",
            "docker.io",
        ] {
            let json = format!(r#"{{"auths": {{"{key}": {{"auth": "dXNlcjpwYXNz"}}}}}}"#);
            let c = DockerConfig::parse(json.as_bytes()).unwrap();
            assert_eq!(c.credentials("docker.io"), Some(hub), "{key}");
        }
        assert!(!format!("{hub:?}").contains("pass\""));
        assert!(DockerConfig::parse(br#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
        assert!(DockerConfig::parse(b"[]").is_err());
    }
}
