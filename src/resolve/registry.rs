//! An OCI distribution client for exactly what verification needs: resolve a reference to
//! a manifest digest, discover signature referrers (Referrers API with `Link` pagination,
//! and the `sha256-<hex>` tag fallback when the API answers 404), fetch artifact manifests
//! and layers by digest, and check every digest and size.
//!
//! Written on the project's guarded HTTP client rather than `oci-client` (0.18), because
//! that crate reads whole bodies without a cap, does not follow referrers pagination,
//! builds its own HTTP client (so the outbound address rules and per-host limits could not
//! apply), and its referrers fallback turns 403/429 answers into "no referrers" — which
//! here would read as "unsigned". Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md>.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, LINK, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use url::Url;

use super::artifact::ARTIFACT_MEDIA_TYPE;
use super::auth::{Challenge, DockerConfig, parse_challenge};
use super::{
    ArtifactError, ArtifactResult, ManifestFact, Registry, ResolveError, SignatureArtifact,
};
use crate::net::{Fetched, HttpClient};
use crate::syntax::text::outside;
use crate::syntax::{ImageDigest, ImageRef};

mod push;
pub use push::{Attachment, PushError};

/// Cap on any manifest or index read.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Cap on one page of referrers (or the referrers tag index): the manifest cap, the size
/// every registry accepts for a manifest, so one pushed artifact's annotations cannot push
/// a page over it. Entries are parsed borrowing from the page, annotations skipped unread.
const MAX_INDEX_BYTES: usize = MAX_MANIFEST_BYTES;
/// Cap on a signature artifact manifest (a few hundred bytes in practice).
const MAX_ARTIFACT_MANIFEST_BYTES: usize = 256 * 1024;
/// Cap on a signature artifact layer.
pub const MAX_BLOB_BYTES: usize = 64 * 1024;
/// Cap on a token endpoint's answer.
const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Tokens kept (one per registry and repository).
const MAX_TOKENS: usize = 4096;
/// Longest token accepted from a token endpoint.
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Referrers pages followed at most.
const MAX_REFERRER_PAGES: usize = 16;
/// Signature artifacts of one image read at once.
pub const READ_CONCURRENCY: usize = 16;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPT_ANY_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Registry client settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `host:port` of registries spoken to over plain HTTP.
    pub insecure: HashSet<String>,
    /// Credentials by registry.
    pub credentials: DockerConfig,
    /// Signature artifacts whose pointers (DID, record URI) are read per image at most, in
    /// listing order (the rest are ignored and logged). Proofs are bounded separately.
    pub max_pointers: usize,
}

/// Default of [`RegistryConfig::max_pointers`].
pub const DEFAULT_MAX_POINTERS: usize = 256;

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: HashSet::new(),
            credentials: DockerConfig::default(),
            max_pointers: DEFAULT_MAX_POINTERS,
        }
    }
}

/// A cached registry token's key: registry, repository, scope actions.
type TokenKey = (String, String, &'static str);

/// The HTTP [`Registry`]. Its `Debug` leaves the tokens out.
pub struct HttpRegistry {
    http: HttpClient,
    config: RegistryConfig,
    /// `Authorization` values per (registry, repository), with their expiry.
    /// Tokens by (registry, repository, scope actions): a `pull` token is never sent for a
    /// push.
    tokens: Mutex<HashMap<TokenKey, (HeaderValue, Instant)>>,
}

/// An OCI descriptor, its strings borrowed from the document (unknown fields such as
/// `annotations` are skipped without being kept).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor<'a> {
    #[serde(default, borrow)]
    media_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    digest: Cow<'a, str>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, borrow)]
    artifact_type: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    #[serde(default, borrow)]
    media_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    manifests: Vec<Descriptor<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    #[serde(default, borrow)]
    media_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    artifact_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    config: Option<Descriptor<'a>>,
    #[serde(default, borrow)]
    layers: Vec<Descriptor<'a>>,
    #[serde(default, borrow)]
    subject: Option<Descriptor<'a>>,
}

/// A signature artifact as listed by the referrers: its manifest digest, or why the listed
/// digest is unusable.
type Listed = Result<ImageDigest, ArtifactError>;

/// The listed signature artifacts of an index page, in order.
fn listed_signatures(index: Index<'_>) -> impl Iterator<Item = Listed> + '_ {
    index.manifests.into_iter().filter(is_signature).map(|d| {
        d.digest
            .parse::<ImageDigest>()
            .map_err(|_| ArtifactError::Invalid {
                artifact: None,
                reason: format!(
                    "referrer digest {:?} is not sha256:<64 hex>",
                    outside(&d.digest)
                ),
            })
    })
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

fn sha256_digest(bytes: &[u8]) -> ImageDigest {
    ImageDigest::of_bytes(bytes)
}

impl std::fmt::Debug for HttpRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRegistry")
            .field("insecure", &self.config.insecure)
            .finish_non_exhaustive()
    }
}

impl HttpRegistry {
    /// A client over `http` (whose guard should list the same insecure registries).
    pub fn new(http: HttpClient, config: RegistryConfig) -> Self {
        HttpRegistry {
            http,
            config,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn base(&self, registry: &str) -> Result<Url, ResolveError> {
        // `registry` is an image's normalized registry (`ImageRef::registry`): Docker Hub is
        // always `docker.io` here, whichever of its names the reference used, and `:443` is
        // already dropped.
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if self.config.insecure.contains(registry) {
            "http"
        } else {
            "https"
        };
        Url::parse(&format!("{scheme}://{host}/")).map_err(|e| ResolveError::Invalid {
            what: format!("registry {registry:?}"),
            reason: e.to_string(),
        })
    }

    fn url(&self, image: &ImageRef, path: &str) -> Result<Url, ResolveError> {
        let base = self.base(image.registry())?;
        base.join(&format!("v2/{}/{path}", image.repository()))
            .map_err(|e| ResolveError::Invalid {
                what: format!("URL for {image}"),
                reason: e.to_string(),
            })
    }

    fn cached_token(&self, key: &TokenKey) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().ok()?;
        let (value, expires) = tokens.get(key)?;
        (Instant::now() < *expires).then(|| value.clone())
    }

    fn store_token(&self, key: TokenKey, value: HeaderValue, ttl: Duration) {
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.len() >= MAX_TOKENS {
                let now = Instant::now();
                tokens.retain(|_, (_, exp)| *exp > now);
            }
            // Still full of live tokens: use this one once, do not keep it.
            if tokens.len() < MAX_TOKENS {
                tokens.insert(key, (value, Instant::now() + ttl));
            }
        }
    }

    /// GET with the registry's auth flow ([`Self::send_authed`] for `pull`); 401/403 after
    /// it is [`ResolveError::Denied`].
    async fn get(
        &self,
        image: &ImageRef,
        url: &Url,
        accept: &str,
        cap: usize,
    ) -> Result<Fetched, ResolveError> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(ACCEPT, v);
        }
        let answer = self
            .send_authed(image, Method::GET, url, headers, None, cap, "pull")
            .await?;
        denied_or(answer, url)
    }

    /// `method` on `url` with the registry's auth flow: a cached token for `actions`
    /// (`pull`, or `pull,push` for `atcr-verify sign`) first; on 401, the challenge answered
    /// once (a bearer token of that scope, or the configured Basic credentials) and the
    /// request sent again. Credentials go only to the registry's own origin (an upload
    /// `Location` elsewhere gets none). Returns what the registry answered last, 401/403
    /// included.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_authed(
        &self,
        image: &ImageRef,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
        cap: usize,
        actions: &'static str,
    ) -> Result<Fetched, ResolveError> {
        let own_origin = self.base(image.registry())?.origin() == url.origin();
        let key = (
            image.registry().to_owned(),
            image.repository().to_owned(),
            actions,
        );
        let mut first_headers = headers.clone();
        if own_origin && let Some(token) = self.cached_token(&key) {
            first_headers.insert(AUTHORIZATION, token);
        }
        let first = self
            .http
            .request(method.clone(), url, first_headers, body.clone(), cap)
            .await?;
        if first.status != StatusCode::UNAUTHORIZED || !own_origin {
            return Ok(first);
        }
        let challenge = first
            .headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        let (mut value, ttl) = match challenge {
            Some(Challenge::Bearer { realm, service, .. }) => {
                self.fetch_token(image, &realm, service.as_deref(), actions)
                    .await?
            }
            Some(Challenge::Basic) => match self.config.credentials.credentials(image.registry()) {
                Some(c) => (
                    HeaderValue::from_str(&c.basic_header()).map_err(|_| {
                        ResolveError::Invalid {
                            what: format!("credentials for {}", image.registry()),
                            reason: "not a valid header value".into(),
                        }
                    })?,
                    Duration::from_secs(3600),
                ),
                None => return Ok(first),
            },
            None => return Ok(first),
        };
        value.set_sensitive(true);
        self.store_token(key, value.clone(), ttl);
        let mut retry = headers;
        retry.insert(AUTHORIZATION, value);
        Ok(self.http.request(method, url, retry, body, cap).await?)
    }

    /// The token flow of <https://distribution.github.io/distribution/spec/auth/token/>:
    /// anonymous, or with Basic credentials when the config has them; `actions` is the
    /// scope's action list (`pull`, or `pull,push` for `atcr-verify sign`).
    async fn fetch_token(
        &self,
        image: &ImageRef,
        realm: &str,
        service: Option<&str>,
        actions: &str,
    ) -> Result<(HeaderValue, Duration), ResolveError> {
        let invalid = |reason: String| ResolveError::Invalid {
            what: format!("token endpoint of {}", image.registry()),
            reason,
        };
        let mut url =
            Url::parse(realm).map_err(|e| invalid(format!("realm {:?}: {e}", outside(realm))))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = service {
                q.append_pair("service", service);
            }
            q.append_pair(
                "scope",
                &format!("repository:{}:{actions}", image.repository()),
            );
        }
        let mut headers = HeaderMap::new();
        if let Some(c) = self.config.credentials.credentials(image.registry())
            && let Ok(mut v) = HeaderValue::from_str(&c.basic_header())
        {
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let answer = self.http.get(&url, headers, MAX_TOKEN_BYTES).await?;
        if answer.status == StatusCode::UNAUTHORIZED || answer.status == StatusCode::FORBIDDEN {
            return Err(ResolveError::Denied {
                url: url.to_string(),
                status: answer.status.as_u16(),
            });
        }
        if !answer.status.is_success() {
            return Err(invalid(format!("answered HTTP {}", answer.status.as_u16())));
        }
        let token: TokenAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
            invalid(format!(
                "answer is not token JSON: {}",
                outside(&e.to_string())
            ))
        })?;
        let token = token
            .token
            .clone()
            .or(token.access_token.clone())
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
            .ok_or_else(|| {
                invalid(format!(
                    "answer has no token of at most {MAX_TOKEN_LEN} bytes"
                ))
            })
            .map(|t| (t, token.expires_in))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.0))
            .map_err(|_| invalid("token is not a valid header value".into()))?;
        value.set_sensitive(true);
        // Renew a little early; registries default to 60 s when they do not say.
        let ttl = Duration::from_secs(token.1.unwrap_or(60).clamp(10, 3600) * 9 / 10);
        Ok((value, ttl))
    }

    async fn referrer_descriptors(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
    ) -> Result<Vec<Listed>, ResolveError> {
        let mut url = self.url(image, &format!("referrers/{subject}"))?;
        url.query_pairs_mut()
            .append_pair("artifactType", ARTIFACT_MEDIA_TYPE);
        let mut found = Vec::new();
        for page in 0.. {
            if page >= MAX_REFERRER_PAGES {
                tracing::warn!(%image, "referrers: stopped after {MAX_REFERRER_PAGES} pages");
                break;
            }
            let answer = self.get(image, &url, OCI_INDEX, MAX_INDEX_BYTES).await?;
            if answer.status == StatusCode::NOT_FOUND && page == 0 {
                return self.referrers_by_tag(image, subject).await;
            }
            if answer.status != StatusCode::OK {
                return Err(unexpected(&url, answer.status, "referrers"));
            }
            let index: Index = parse_json(&answer.body, &format!("referrers of {subject}"))?;
            // The API may ignore the filter: keep only signatures, page by page, and stop
            // once there are as many as will be read.
            found.extend(listed_signatures(index));
            if found.len() >= self.config.max_pointers {
                break;
            }
            match next_link(&answer.headers, &url)? {
                Some(next) => url = next,
                None => break,
            }
        }
        Ok(found)
    }

    /// The referrers tag schema: the image index tagged [`referrers_tag`].
    async fn referrers_by_tag(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
    ) -> Result<Vec<Listed>, ResolveError> {
        let tag = referrers_tag(subject);
        let url = self.url(image, &format!("manifests/{tag}"))?;
        let answer = self.get(image, &url, OCI_INDEX, MAX_INDEX_BYTES).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new()); // no referrers: the one 404 that means "none"
        }
        if answer.status != StatusCode::OK {
            return Err(unexpected(&url, answer.status, "referrers tag"));
        }
        let index: Index = parse_json(&answer.body, &format!("referrers tag {tag}"))?;
        if let Some(m) = index.media_type.as_deref().filter(|m| *m != OCI_INDEX) {
            return Err(ResolveError::Invalid {
                what: format!("referrers tag {tag}"),
                reason: format!("media type {:?}, expected {OCI_INDEX}", outside(m)),
            });
        }
        Ok(listed_signatures(index).collect())
    }

    /// One signature artifact of `subject` in `image`'s repository, read by its manifest
    /// `digest` and checked (its type, that its `subject` is `subject`, its one layer, every
    /// digest and size): for each artifact [`Registry::signature_artifacts`] lists, and for a
    /// caller handed one artifact (Ratify's verifier plugins). Whatever goes wrong is this
    /// artifact's failure alone.
    pub async fn signature_artifact(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
        digest: &ImageDigest,
    ) -> ArtifactResult {
        self.signature_artifact_raw(image, subject, digest)
            .await
            .map(|(artifact, _)| artifact)
    }

    /// As [`HttpRegistry::signature_artifact`], with the bytes it was read from (for
    /// recording them in a bundle, `crate::bundle`).
    pub async fn signature_artifact_raw(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
        digest: &ImageDigest,
    ) -> Result<(SignatureArtifact, RawArtifact), ArtifactError> {
        let url = self
            .url(image, &format!("manifests/{digest}"))
            .map_err(ArtifactError::Fetch)?;
        let answer = self
            .get(image, &url, OCI_MANIFEST, MAX_ARTIFACT_MANIFEST_BYTES)
            .await
            .map_err(ArtifactError::Fetch)?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(ArtifactError::NotServed {
                artifact: digest.clone(),
                part: "manifest",
            });
        }
        if answer.status != StatusCode::OK {
            return Err(ArtifactError::Fetch(unexpected(
                &url,
                answer.status,
                "signature artifact manifest",
            )));
        }
        let (layer_digest, size) = artifact_layer(digest, subject, &answer.body)?;
        let url = self
            .url(image, &format!("blobs/{layer_digest}"))
            .map_err(ArtifactError::Fetch)?;
        let blob = self
            .get(image, &url, "application/octet-stream", MAX_BLOB_BYTES)
            .await
            .map_err(ArtifactError::Fetch)?;
        if blob.status == StatusCode::NOT_FOUND {
            return Err(ArtifactError::NotServed {
                artifact: digest.clone(),
                part: "layer",
            });
        }
        if blob.status != StatusCode::OK {
            return Err(ArtifactError::Fetch(unexpected(
                &url,
                blob.status,
                "signature layer",
            )));
        }
        let raw = RawArtifact {
            digest: digest.clone(),
            manifest: answer.body,
            layer: blob.body,
        };
        check_layer(subject, &raw, &layer_digest, size).map(|artifact| (artifact, raw))
    }

    /// As [`Registry::resolve`], with the manifest bytes and headers it was read from (for
    /// recording them in a bundle).
    pub async fn resolve_raw(
        &self,
        image: &ImageRef,
    ) -> Result<(ManifestFact, RawManifest), ResolveError> {
        let reference = image.reference();
        let url = self.url(image, &format!("manifests/{reference}"))?;
        let answer = self
            .get(image, &url, ACCEPT_ANY_MANIFEST, MAX_MANIFEST_BYTES)
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(ResolveError::NotFound {
                what: format!("image {image}"),
            });
        }
        if answer.status != StatusCode::OK {
            return Err(unexpected(&url, answer.status, "manifest"));
        }
        let header = |name| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let raw = RawManifest {
            content_type: header(CONTENT_TYPE),
            claimed_digest: header(reqwest::header::HeaderName::from_static(
                "docker-content-digest",
            )),
            bytes: answer.body,
        };
        check_manifest(image, &raw).map(|fact| (fact, raw))
    }

    /// As [`Registry::signature_artifacts`], with each artifact's bytes when it could be read.
    pub async fn signature_artifacts_raw(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
    ) -> Result<Vec<RawArtifactResult>, ResolveError> {
        self.read_artifacts(image, subject, |read| read).await
    }

    /// The signature artifacts of `subject`, each read and checked, then passed through
    /// `keep` at once (so that bytes not kept are freed per artifact, not once all of
    /// `--max-pointers` are read).
    async fn read_artifacts<T>(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
        keep: fn((SignatureArtifact, RawArtifact)) -> T,
    ) -> Result<Vec<Result<T, ArtifactError>>, ResolveError> {
        let mut listed = self.referrer_descriptors(image, subject).await?;
        let mut seen = HashSet::new();
        listed.retain(|d| d.as_ref().map_or(true, |d| seen.insert(d.clone())));
        if listed.len() > self.config.max_pointers {
            tracing::warn!(
                %image,
                found = listed.len(),
                kept = self.config.max_pointers,
                "more signature artifacts than --max-pointers; the rest are ignored"
            );
            listed.truncate(self.config.max_pointers);
        }
        // In listing order, a bounded number at a time.
        let read = futures_util::stream::iter(listed.into_iter().map(|d| async move {
            match d {
                Ok(digest) => self
                    .signature_artifact_raw(image, subject, &digest)
                    .await
                    .map(keep),
                Err(e) => Err(e),
            }
        }))
        .buffered(READ_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        Ok(read)
    }
}

/// One listed signature artifact with the bytes it was read from, or why it could not be used.
pub type RawArtifactResult = Result<(SignatureArtifact, RawArtifact), ArtifactError>;

/// A manifest as a registry served it: the bytes and the headers that describe them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawManifest {
    /// The manifest bytes.
    pub bytes: Vec<u8>,
    /// `Content-Type`, when sent.
    pub content_type: Option<String>,
    /// `Docker-Content-Digest`, when sent.
    pub claimed_digest: Option<String>,
}

/// A signature artifact as a registry served it: its manifest (under `digest`) and its one
/// layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawArtifact {
    /// The artifact manifest's digest, as listed.
    pub digest: ImageDigest,
    /// The artifact manifest bytes.
    pub manifest: Vec<u8>,
    /// The signature layer bytes.
    pub layer: Vec<u8>,
}

/// Checks a served manifest against the reference it was asked for (its digest, when the
/// reference has one, and `Docker-Content-Digest`) and reads its media type. Pure: the same
/// check for bytes from a registry and from a bundle.
pub fn check_manifest(image: &ImageRef, raw: &RawManifest) -> Result<ManifestFact, ResolveError> {
    let digest = sha256_digest(&raw.bytes);
    let invalid = |reason: String| ResolveError::Invalid {
        what: format!("manifest of {image}"),
        reason,
    };
    if let Some(expected) = image.digest()
        && &digest != expected
    {
        return Err(invalid(format!("served bytes have digest {digest}")));
    }
    if let Some(claimed) = raw.claimed_digest.as_deref()
        && claimed != digest.as_str()
    {
        return Err(invalid(format!(
            "Docker-Content-Digest says {:?}, served bytes are {digest}",
            outside(claimed)
        )));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde::de::IgnoredAny>,
    }
    let head: Head = parse_json(&raw.bytes, &format!("manifest of {image}"))?;
    let content_type = raw
        .content_type
        .as_deref()
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
    let media_type = head
        .media_type
        .or(content_type)
        .unwrap_or_else(|| OCI_MANIFEST.to_owned());
    if !is_media_type(&media_type) {
        return Err(invalid(format!(
            "media type {:?} is not a media type (type/subtype)",
            outside(&media_type)
        )));
    }
    let is_index = media_type == OCI_INDEX
        || media_type == DOCKER_LIST
        || (head.manifests.is_some() && media_type != DOCKER_MANIFEST);
    Ok(ManifestFact {
        digest,
        media_type,
        is_index,
    })
}

/// Checks a signature artifact's manifest (listed under `digest`, for `subject`) and says
/// which layer holds the signature: its digest and size.
fn artifact_layer(
    digest: &ImageDigest,
    subject: &ImageDigest,
    bytes: &[u8],
) -> Result<(ImageDigest, u64), ArtifactError> {
    let invalid = |reason: String| {
        Err(ArtifactError::Invalid {
            artifact: Some(digest.clone()),
            reason,
        })
    };
    if bytes.len() > MAX_ARTIFACT_MANIFEST_BYTES {
        return invalid(format!(
            "manifest is over the {MAX_ARTIFACT_MANIFEST_BYTES}-byte limit"
        ));
    }
    let served = sha256_digest(bytes);
    if &served != digest {
        return invalid(format!("the manifest served for it has digest {served}"));
    }
    let manifest: Manifest = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => {
            return invalid(format!(
                "manifest is not JSON of the expected shape: {}",
                outside(&e.to_string())
            ));
        }
    };
    let artifact_type = manifest.artifact_type.as_deref().or(manifest
        .config
        .as_ref()
        .and_then(|c| c.media_type.as_deref()));
    if artifact_type != Some(ARTIFACT_MEDIA_TYPE) {
        return invalid(format!(
            "type {:?}, expected {ARTIFACT_MEDIA_TYPE}",
            artifact_type.map(outside)
        ));
    }
    if manifest
        .media_type
        .as_deref()
        .is_some_and(|m| m != OCI_MANIFEST)
    {
        return invalid("not an OCI image manifest".into());
    }
    match manifest.subject.as_ref().map(|s| s.digest.as_ref()) {
        Some(s) if s == subject.as_str() => {}
        other => {
            return invalid(format!(
                "subject {:?}, expected {subject}",
                other.map(outside)
            ));
        }
    }
    let mut layers = manifest
        .layers
        .iter()
        .filter(|l| l.media_type.as_deref() == Some(ARTIFACT_MEDIA_TYPE));
    let (Some(layer), None) = (layers.next(), layers.next()) else {
        return invalid(format!("must have exactly one {ARTIFACT_MEDIA_TYPE} layer"));
    };
    let Ok(layer_digest) = layer.digest.parse::<ImageDigest>() else {
        return invalid("layer digest is not sha256:<64 hex>".into());
    };
    let size = layer.size.unwrap_or(0);
    if size == 0 || size > MAX_BLOB_BYTES as u64 {
        return invalid(format!("layer size {size} is outside 1..={MAX_BLOB_BYTES}"));
    }
    Ok((layer_digest, size))
}

/// Checks a signature artifact's bytes — the manifest against its digest, type and
/// `subject`, the layer against the manifest's descriptor — and parses the layer. Pure: the
/// same check for bytes from a registry and from a bundle.
pub fn check_artifact(subject: &ImageDigest, raw: &RawArtifact) -> ArtifactResult {
    let (layer_digest, size) = artifact_layer(&raw.digest, subject, &raw.manifest)?;
    check_layer(subject, raw, &layer_digest, size)
}

/// The rest of [`check_artifact`] once the manifest gave the layer's descriptor: the layer
/// against it, then parsed.
fn check_layer(
    subject: &ImageDigest,
    raw: &RawArtifact,
    layer_digest: &ImageDigest,
    size: u64,
) -> ArtifactResult {
    let layer = &raw.layer;
    if layer.len() as u64 != size || &sha256_digest(layer) != layer_digest {
        return Err(ArtifactError::Invalid {
            artifact: Some(raw.digest.clone()),
            reason: format!(
                "layer does not match its descriptor ({} bytes, digest {}; the descriptor says {size} bytes, {layer_digest})",
                layer.len(),
                sha256_digest(layer)
            ),
        });
    }
    SignatureArtifact::parse(layer, &raw.digest, subject)
}

impl Registry for HttpRegistry {
    fn resolve<'a>(
        &'a self,
        image: &'a ImageRef,
    ) -> BoxFuture<'a, Result<ManifestFact, ResolveError>> {
        Box::pin(async move { self.resolve_raw(image).await.map(|(fact, _)| fact) })
    }

    fn signature_artifacts<'a>(
        &'a self,
        image: &'a ImageRef,
        subject: &'a ImageDigest,
    ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>> {
        Box::pin(async move { self.read_artifacts(image, subject, |(a, _)| a).await })
    }
}

/// Whether `s` has the shape of a media type (RFC 6838: `type/subtype`, each at most 127
/// restricted-name characters); manifests' media types are reported to users.
fn is_media_type(s: &str) -> bool {
    let part = |p: &str| {
        (1..=127).contains(&p.len())
            && p.starts_with(|c: char| c.is_ascii_alphanumeric())
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    s.split_once('/')
        .is_some_and(|(t, sub)| part(t) && part(sub))
}

/// Whether a referrer descriptor is an ATProto signature artifact.
fn is_signature(d: &Descriptor<'_>) -> bool {
    d.artifact_type.as_deref() == Some(ARTIFACT_MEDIA_TYPE)
}

fn denied_or(answer: Fetched, url: &Url) -> Result<Fetched, ResolveError> {
    if answer.status == StatusCode::UNAUTHORIZED || answer.status == StatusCode::FORBIDDEN {
        return Err(ResolveError::Denied {
            url: crate::net::redact(url),
            status: answer.status.as_u16(),
        });
    }
    Ok(answer)
}

fn unexpected(url: &Url, status: StatusCode, what: &str) -> ResolveError {
    super::unexpected_status(what.to_owned(), url, status)
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, ResolveError> {
    serde_json::from_slice(body).map_err(|e| ResolveError::Invalid {
        what: what.to_owned(),
        reason: format!(
            "not valid JSON of the expected shape: {}",
            outside(&e.to_string())
        ),
    })
}

/// The `rel="next"` target of a `Link` header, resolved against `current`; it must stay on
/// the same registry.
fn next_link(headers: &HeaderMap, current: &Url) -> Result<Option<Url>, ResolveError> {
    for value in headers.get_all(LINK) {
        let Ok(text) = value.to_str() else { continue };
        for link in text.split(',') {
            let mut parts = link.split(';');
            let Some(target) = parts.next() else { continue };
            let is_next = parts.any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            if !is_next {
                continue;
            }
            let target = target.trim().trim_start_matches('<').trim_end_matches('>');
            let next = current.join(target).map_err(|e| ResolveError::Invalid {
                what: "referrers Link header".into(),
                reason: e.to_string(),
            })?;
            if next.origin() != current.origin() {
                return Err(ResolveError::Invalid {
                    what: "referrers Link header".into(),
                    reason: format!("next page {} is on another host", outside(next.as_str())),
                });
            }
            return Ok(Some(next));
        }
    }
    Ok(None)
}

/// The tag of `subject`'s referrers index in the referrers tag schema: `sha256-<hex>`.
pub(crate) fn referrers_tag(subject: &ImageDigest) -> String {
    subject.as_str().replacen(':', "-", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers() {
        let current: Url = "https://r.example/v2/a/referrers/sha256:x?artifactType=t"
            .parse()
            .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(next_link(&h, &current).unwrap(), None);
        h.insert(
            LINK,
            HeaderValue::from_static("</v2/a/referrers/sha256:x?n=2&last=b>; rel=\"next\""),
        );
        assert_eq!(
            next_link(&h, &current).unwrap().unwrap().as_str(),
            "https://r.example/v2/a/referrers/sha256:x?n=2&last=b"
        );
        h.insert(
            LINK,
            HeaderValue::from_static("<https://evil.example/v2/x>; rel=\"next\""),
        );
        assert!(next_link(&h, &current).is_err());
    }

    #[test]
    fn every_spelling_of_a_registry_reaches_its_one_host() {
        let http = HttpClient::new(crate::net::NetConfig::default()).unwrap();
        let registry = HttpRegistry::new(
            http,
            RegistryConfig {
                insecure: ["localhost:5000".to_owned()].into(),
                ..RegistryConfig::default()
            },
        );
        for (reference, url) in [
            ("nginx", "https://registry-1.docker.io/v2/library/nginx/"),
            (
                "index.docker.io/nginx",
                "https://registry-1.docker.io/v2/library/nginx/",
            ),
            (
                "registry-1.docker.io:443/alice/app:v1",
                "https://registry-1.docker.io/v2/alice/app/",
            ),
            (
                "atcr.io:443/acme/prod-api:v1",
                "https://atcr.io/v2/acme/prod-api/",
            ),
            ("atcr.io:5000/acme/app", "https://atcr.io:5000/v2/acme/app/"),
            ("[::1]:443/app", "https://[::1]/v2/app/"),
            ("localhost:5000/app", "http://localhost:5000/v2/app/"),
            ("localhost:05000/app", "http://localhost:5000/v2/app/"),
        ] {
            let image: ImageRef = reference.parse().unwrap();
            assert_eq!(
                registry.url(&image, "").unwrap().as_str(),
                url,
                "{reference}"
            );
        }
    }

    #[test]
    fn media_types_have_the_rfc_6838_shape() {
        for good in [
            OCI_MANIFEST,
            OCI_INDEX,
            DOCKER_LIST,
            "application/json",
            "a/b+c.d-e",
        ] {
            assert!(is_media_type(good), "{good}");
        }
        let long = format!("application/{}", "x".repeat(128));
        for bad in [
            "",
            "application",
            "/json",
            "application/",
            "a/b/c",
            "a b/c",
            "a/\u{1b}[31m",
            long.as_str(),
        ] {
            assert!(!is_media_type(bad), "{bad:?}");
        }
    }

    #[test]
    fn digest_of_bytes() {
        assert_eq!(
            sha256_digest(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
