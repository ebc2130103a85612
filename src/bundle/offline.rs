//! Reading a bundle: checked whole, then served to the engine as its sources.

use std::collections::HashMap;
use std::path::Path;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use url::Url;

use super::format::{BundleFile, MAX_BUNDLE_BYTES, VERSION, decode};
use crate::did_document::{DidDocument, MAX_DOCUMENT_BYTES};
use crate::proof::{Car, CarLimits};
use crate::resolve::{
    ArtifactResult, DidResolver, MAX_MANIFEST_BYTES, ManifestFact, RawArtifact, RawIdentity,
    RawManifest, RecordSource, Registry, ResolveError, check_artifact, check_manifest,
    proven_identity,
};
use crate::syntax::text::outside;
use crate::syntax::{AtUri, Did, ImageDigest, ImageRef, parse_datetime};

/// Why a bundle cannot be used. Nothing in a refused bundle is used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The file could not be read.
    #[error("reading bundle {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Over [`MAX_BUNDLE_BYTES`].
    #[error("bundle {path} is over the {cap}-byte limit")]
    TooLarge {
        /// The file.
        path: String,
        /// The cap.
        cap: usize,
    },
    /// Not JSON.
    #[error("bundle {path} is not JSON: {reason}")]
    NotJson {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A version this build does not read.
    #[error(
        "bundle {path} has version {found}; this atcr-verify reads version {VERSION} (export it again with this version)"
    )]
    Version {
        /// The file.
        path: String,
        /// The version found (JSON).
        found: String,
    },
    /// JSON, but not of the bundle's shape (a field missing, bad base64, a malformed DID).
    #[error("bundle {path} is malformed: {at}: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// Where (`manifests[0]`, …).
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes that do not prove what the bundle says they are: a digest, a CID or a
    /// signature does not match.
    #[error("bundle {path} is refused, {at} does not check out: {reason}")]
    Tampered {
        /// The file.
        path: String,
        /// Where, and what (`records[0] (at://…)`).
        at: String,
        /// The rule broken.
        reason: String,
    },
}

impl BundleError {
    /// A stable code: `bundle_unreadable`, `bundle_too_large`, `bundle_not_json`,
    /// `bundle_version`, `bundle_malformed` or `bundle_tampered`.
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::Read { .. } => "bundle_unreadable",
            BundleError::TooLarge { .. } => "bundle_too_large",
            BundleError::NotJson { .. } => "bundle_not_json",
            BundleError::Version { .. } => "bundle_version",
            BundleError::Malformed { .. } => "bundle_malformed",
            BundleError::Tampered { .. } => "bundle_tampered",
        }
    }
}

/// A manifest held by the bundle.
#[derive(Debug)]
struct Held {
    bytes: Vec<u8>,
    media_type: String,
}

/// A bundle whose every part has been checked: the engine's sources, with no network.
#[derive(Debug)]
pub struct Bundle {
    name: String,
    created_at: OffsetDateTime,
    oldest: OffsetDateTime,
    /// (image name, digest) → manifest.
    manifests: HashMap<(String, ImageDigest), Held>,
    /// (image name, tag) → digest.
    tags: HashMap<(String, String), ImageDigest>,
    /// (image name, subject) → artifacts, in listing order.
    signatures: HashMap<(String, ImageDigest), Vec<RawArtifact>>,
    identities: HashMap<Did, RawIdentity>,
    /// Record URI → CAR.
    records: HashMap<String, Vec<u8>>,
}

impl Bundle {
    /// Reads and checks the bundle at `path`.
    pub fn load(path: &Path) -> Result<Bundle, BundleError> {
        let name = path.display().to_string();
        let bytes = crate::file::read_capped(path, MAX_BUNDLE_BYTES as u64).map_err(|source| {
            BundleError::Read {
                path: name.clone(),
                source,
            }
        })?;
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                path: name,
                cap: MAX_BUNDLE_BYTES,
            });
        }
        Bundle::parse(&bytes, &name)
    }

    /// Checks a bundle's bytes (`name` says which file, in errors).
    pub fn parse(bytes: &[u8], name: &str) -> Result<Bundle, BundleError> {
        // The top-level object's fields, unparsed: the version is checked before the shape.
        let head: HashMap<String, &RawValue> = serde_json::from_slice(bytes).map_err(|e| {
            let reason = outside(&e.to_string());
            if e.is_data() {
                BundleError::Malformed {
                    path: name.to_owned(),
                    at: "the file".into(),
                    reason: format!("expected a JSON object: {reason}"),
                }
            } else {
                BundleError::NotJson {
                    path: name.to_owned(),
                    reason,
                }
            }
        })?;
        let version = head.get("version").map(|v| v.get());
        let supported = version
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .and_then(|v| v.as_u64())
            == Some(VERSION);
        if !supported {
            return Err(BundleError::Version {
                path: name.to_owned(),
                found: version.map_or("(none)".to_owned(), |v| crate::syntax::text::inert(v, 64)),
            });
        }
        let file: BundleFile =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed {
                path: name.to_owned(),
                at: "the file".into(),
                reason: outside(&e.to_string()),
            })?;
        Checker::new(name).check(file)
    }

    /// Whether the bundle can answer for `image`: its manifest (and for a tag, the
    /// tag → digest fact) is in it.
    pub fn holds(&self, image: &ImageRef) -> bool {
        self.digest_of(image)
            .is_some_and(|d| self.manifests.contains_key(&(image.name(), d)))
    }

    /// The references the bundle holds, for messages: `name:tag` and `name@digest`.
    pub fn references(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .tags
            .keys()
            .map(|(name, tag)| format!("{name}:{tag}"))
            .chain(
                self.manifests
                    .keys()
                    .map(|(name, digest)| format!("{name}@{digest}")),
            )
            .collect();
        all.sort();
        all
    }

    /// When the bundle was written (as its writer says).
    pub fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }

    /// When its oldest fact was fetched (as its writer says): the bundle's age.
    pub fn oldest_fact(&self) -> OffsetDateTime {
        self.oldest
    }

    fn digest_of(&self, image: &ImageRef) -> Option<ImageDigest> {
        match image.digest() {
            Some(d) => Some(d.clone()),
            None => {
                let tag = image.tag().unwrap_or("latest").to_owned();
                self.tags.get(&(image.name(), tag)).cloned()
            }
        }
    }
}

/// Checks each part of a bundle file, naming the part that fails.
struct Checker<'a> {
    name: &'a str,
    oldest: Option<OffsetDateTime>,
}

impl<'a> Checker<'a> {
    fn new(name: &'a str) -> Self {
        Checker { name, oldest: None }
    }

    fn malformed(&self, at: &str, reason: impl std::fmt::Display) -> BundleError {
        BundleError::Malformed {
            path: self.name.to_owned(),
            at: at.to_owned(),
            reason: outside(&reason.to_string()),
        }
    }

    fn tampered(&self, at: &str, reason: impl std::fmt::Display) -> BundleError {
        BundleError::Tampered {
            path: self.name.to_owned(),
            at: at.to_owned(),
            reason: reason.to_string(),
        }
    }

    fn time(&mut self, at: &str, text: &str) -> Result<OffsetDateTime, BundleError> {
        let t = parse_datetime(text).map_err(|e| self.malformed(at, e))?;
        self.oldest = Some(self.oldest.map_or(t, |o| o.min(t)));
        Ok(t)
    }

    fn bytes(&self, at: &str, field: &str, text: &str) -> Result<Vec<u8>, BundleError> {
        decode(text).map_err(|e| self.malformed(at, format!("{field}: {e}")))
    }

    fn parse<T: std::str::FromStr>(&self, at: &str, text: &str) -> Result<T, BundleError>
    where
        T::Err: std::fmt::Display,
    {
        text.parse().map_err(|e| self.malformed(at, e))
    }

    /// An image name as the bundle writes it: exactly `ImageRef::name()`.
    fn image_name(&self, at: &str, name: &str) -> Result<String, BundleError> {
        let image: ImageRef = self.parse(at, name)?;
        if image.name() != name || image.tag().is_some() || image.digest().is_some() {
            return Err(self.malformed(
                at,
                format!("image {name:?} is not a normalized name (registry/repository)"),
            ));
        }
        Ok(image.name())
    }

    fn check(mut self, file: BundleFile) -> Result<Bundle, BundleError> {
        let created_at =
            parse_datetime(&file.created_at).map_err(|e| self.malformed("createdAt", e))?;
        let mut bundle = Bundle {
            name: self.name.to_owned(),
            created_at,
            oldest: created_at,
            manifests: HashMap::new(),
            tags: HashMap::new(),
            signatures: HashMap::new(),
            identities: HashMap::new(),
            records: HashMap::new(),
        };
        for (i, m) in file.manifests.iter().enumerate() {
            let at = format!("manifests[{i}]");
            let name = self.image_name(&at, &m.image)?;
            let digest: ImageDigest = self.parse(&at, &m.digest)?;
            self.time(&at, &m.fetched_at)?;
            let at = format!("manifests[{i}] ({name}@{digest})");
            let bytes = self.bytes(&at, "manifest", &m.manifest)?;
            if bytes.len() > MAX_MANIFEST_BYTES {
                return Err(self.malformed(
                    &at,
                    format!("manifest is over the {MAX_MANIFEST_BYTES}-byte limit"),
                ));
            }
            let found = ImageDigest::of_bytes(&bytes);
            if found != digest {
                return Err(self.tampered(
                    &at,
                    format!("the manifest bytes have digest {found}, the bundle says {digest}"),
                ));
            }
            let image: ImageRef = self.parse(&at, &format!("{name}@{digest}"))?;
            let fact = check_manifest(&image, &raw_manifest(&bytes, &m.media_type))
                .map_err(|e| self.tampered(&at, e))?;
            if fact.media_type != m.media_type {
                return Err(self.tampered(
                    &at,
                    format!(
                        "the manifest says media type {:?}, the bundle says {:?}",
                        fact.media_type,
                        outside(&m.media_type)
                    ),
                ));
            }
            if let Some(tag) = &m.tag {
                let _: ImageRef = self.parse(&at, &format!("{name}:{tag}"))?;
                let key = (name.clone(), tag.clone());
                if let Some(other) = bundle.tags.get(&key)
                    && other != &digest
                {
                    return Err(
                        self.malformed(&at, format!("tag {tag:?} is also given as {other}"))
                    );
                }
                bundle.tags.insert(key, digest.clone());
            }
            bundle.manifests.insert(
                (name, digest),
                Held {
                    bytes,
                    media_type: m.media_type.clone(),
                },
            );
        }
        for (i, s) in file.signatures.iter().enumerate() {
            let at = format!("signatures[{i}]");
            let name = self.image_name(&at, &s.image)?;
            let subject: ImageDigest = self.parse(&at, &s.subject)?;
            self.time(&at, &s.fetched_at)?;
            let mut artifacts = Vec::new();
            for (j, a) in s.artifacts.iter().enumerate() {
                let at = format!("signatures[{i}].artifacts[{j}]");
                let digest: ImageDigest = self.parse(&at, &a.digest)?;
                let at = format!("{at} ({digest}, for {name}@{subject})");
                let raw = RawArtifact {
                    digest,
                    manifest: self.bytes(&at, "manifest", &a.manifest)?,
                    layer: self.bytes(&at, "layer", &a.layer)?,
                };
                check_artifact(&subject, &raw).map_err(|e| self.tampered(&at, e))?;
                artifacts.push(raw);
            }
            bundle.signatures.insert((name, subject), artifacts);
        }
        for (i, d) in file.identities.iter().enumerate() {
            let at = format!("identities[{i}]");
            let did: Did = self.parse(&at, &d.did)?;
            self.time(&at, &d.fetched_at)?;
            let at = format!("identities[{i}] ({did})");
            let raw = RawIdentity {
                document: self.bytes(&at, "document", &d.document)?,
                log: match &d.log {
                    Some(log) => Some(self.bytes(&at, "log", log)?),
                    None => None,
                },
            };
            if raw.document.len() > MAX_DOCUMENT_BYTES {
                return Err(self.malformed(
                    &at,
                    format!("document is over the {MAX_DOCUMENT_BYTES}-byte limit"),
                ));
            }
            match proven_identity(&did, &raw) {
                // A deactivated DID is a fact, not a forgery: its signatures will not count.
                Ok(_) | Err(ResolveError::Deactivated { .. }) => {}
                Err(e) => return Err(self.tampered(&at, e)),
            }
            bundle.identities.insert(did, raw);
        }
        for (i, r) in file.records.iter().enumerate() {
            let at = format!("records[{i}]");
            let uri: AtUri = self.parse(&at, &r.uri)?;
            let _: Url = self.parse(&at, &r.pds)?;
            self.time(&at, &r.fetched_at)?;
            let at = format!("records[{i}] ({uri})");
            let car = self.bytes(&at, "car", &r.car)?;
            Car::read(&car, &CarLimits::default()).map_err(|e| self.tampered(&at, e))?;
            bundle.records.insert(uri.to_string(), car);
        }
        if let Some(oldest) = self.oldest {
            bundle.oldest = oldest;
        }
        Ok(bundle)
    }
}

/// A held manifest as the shared check takes it: the bundle's media type stands for the
/// `Content-Type` the registry sent (used only when the manifest names none).
fn raw_manifest(bytes: &[u8], media_type: &str) -> RawManifest {
    RawManifest {
        bytes: bytes.to_vec(),
        content_type: Some(media_type.to_owned()),
        claimed_digest: None,
    }
}

impl Registry for Bundle {
    fn resolve<'a>(
        &'a self,
        image: &'a ImageRef,
    ) -> BoxFuture<'a, Result<ManifestFact, ResolveError>> {
        Box::pin(async move {
            let not_found = || ResolveError::NotFound {
                what: format!("image {image} in bundle {}", self.name),
            };
            let digest = self.digest_of(image).ok_or_else(not_found)?;
            let held = self
                .manifests
                .get(&(image.name(), digest))
                .ok_or_else(not_found)?;
            check_manifest(image, &raw_manifest(&held.bytes, &held.media_type))
        })
    }

    fn signature_artifacts<'a>(
        &'a self,
        image: &'a ImageRef,
        subject: &'a ImageDigest,
    ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>> {
        Box::pin(async move {
            let artifacts = self
                .signatures
                .get(&(image.name(), subject.clone()))
                .ok_or_else(|| ResolveError::NotFound {
                    what: format!(
                        "the signatures of {}@{subject} in bundle {} (it was exported under a policy that needs none)",
                        image.name(),
                        self.name
                    ),
                })?;
            Ok(artifacts
                .iter()
                .map(|raw| check_artifact(subject, raw))
                .collect())
        })
    }
}

impl DidResolver for Bundle {
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
        Box::pin(async move {
            let raw = self
                .identities
                .get(did)
                .ok_or_else(|| ResolveError::NotInBundle {
                    what: format!("the DID document of {did} (bundle {})", self.name),
                })?;
            if did.method() != "plc" {
                // Only a did:plc identity is proven by signed data (its operation log); a
                // did:web document in a bundle is whatever its builder wrote.
                return Err(ResolveError::Invalid {
                    what: format!("the DID document of {did} in bundle {}", self.name),
                    reason: "a did:web document is not signed data, so a bundle cannot prove \
                             it; verify did:web signers online"
                        .into(),
                });
            }
            proven_identity(did, raw)
        })
    }
}

impl RecordSource for Bundle {
    fn get_record<'a>(
        &'a self,
        _pds: &'a Url,
        uri: &'a AtUri,
    ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>> {
        Box::pin(async move {
            self.records
                .get(&uri.to_string())
                .cloned()
                .ok_or_else(|| ResolveError::NotInBundle {
                    what: format!("the proof of {uri} (bundle {})", self.name),
                })
        })
    }
}
