//! What signing writes, as bytes: the `io.atcr.manifest` record, and the signature artifact
//! in the integration guide's format ("Fetching Signature Metadata", "Crane: Fetch
//! Manifests") — an OCI image manifest with `artifactType`
//! [`ARTIFACT_MEDIA_TYPE`], the empty config, `subject` = the image, one JSON layer, and the
//! `io.atcr.atproto.*` annotations. Pure: no I/O, the time is an argument.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::crypto::{KeyType, PublicKey};
use crate::resolve::ARTIFACT_MEDIA_TYPE;
use crate::syntax::{AtUri, Did, ImageDigest};

/// The OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config's media type (OCI image spec 1.1, "Guidance for an Empty Descriptor").
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty config's bytes: `{}` (digest `sha256:44136fa3…`).
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// The file name `oras pull` gives the layer (as in the guide).
pub const LAYER_TITLE: &str = "atproto-signature.json";
/// The `$type` of the artifact layer.
const LAYER_TYPE: &str = "io.atcr.atproto.signature";

/// The image being signed, as a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Its manifest digest.
    pub digest: ImageDigest,
    /// Its manifest media type.
    pub media_type: String,
    /// Its manifest size in bytes.
    pub size: u64,
}

/// Where the proof lives: what the artifact points at. Only `did` and `record_uri` are read
/// by verifiers; the rest is informational (and unsigned).
#[derive(Debug, Clone)]
pub struct Pointer {
    /// The signer.
    pub did: Did,
    /// The signer's handle, when known.
    pub handle: Option<String>,
    /// The signer's PDS.
    pub pds: String,
    /// The record.
    pub record_uri: AtUri,
    /// The commit that wrote it, when known.
    pub commit_cid: Option<String>,
    /// The record's `createdAt`.
    pub signed_at: String,
    /// The `#atproto` key of the signer's DID document, when known.
    pub key: Option<PublicKey>,
}

/// An ATProto datetime (RFC 3339, UTC, millisecond precision, `Z`), as `createdAt` wants.
pub fn datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_millisecond(t.millisecond()).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The `io.atcr.manifest` record naming `subject` in `repository`: the lexicon's required
/// fields (`repository`, `digest`, `mediaType`, `schemaVersion`, `createdAt`) and `$type`.
pub fn record(repository: &str, subject: &Subject, created_at: &str) -> Value {
    json!({
        "$type": super::COLLECTION,
        "repository": repository,
        "digest": subject.digest.as_str(),
        "mediaType": subject.media_type,
        "schemaVersion": 2,
        "createdAt": created_at,
    })
}

/// The artifact's JSON layer, as the guide shows it.
pub fn layer(subject: &Subject, pointer: &Pointer) -> Vec<u8> {
    let mut atproto = Map::new();
    atproto.insert("did".into(), json!(pointer.did.as_str()));
    if let Some(handle) = &pointer.handle {
        atproto.insert("handle".into(), json!(handle));
    }
    atproto.insert("pdsEndpoint".into(), json!(pointer.pds));
    atproto.insert("recordUri".into(), json!(pointer.record_uri.to_string()));
    if let Some(cid) = &pointer.commit_cid {
        atproto.insert("commitCid".into(), json!(cid));
    }
    atproto.insert("signedAt".into(), json!(pointer.signed_at));
    let mut layer = Map::new();
    layer.insert("$type".into(), json!(LAYER_TYPE));
    layer.insert("version".into(), json!("1.0"));
    layer.insert(
        "subject".into(),
        json!({"digest": subject.digest.as_str(), "mediaType": subject.media_type}),
    );
    layer.insert("atproto".into(), Value::Object(atproto));
    if let Some(key) = &pointer.key {
        let algorithm = match key.key_type() {
            KeyType::K256 => "ECDSA-K256-SHA256",
            KeyType::P256 => "ECDSA-P256-SHA256",
        };
        let did_key = key.to_did_key();
        let multibase = did_key.strip_prefix("did:key:").unwrap_or(&did_key);
        layer.insert(
            "signature".into(),
            json!({
                "algorithm": algorithm,
                "keyId": format!("{}#atproto", pointer.did),
                "publicKeyMultibase": multibase,
            }),
        );
    }
    // Serializing a Value built here cannot fail.
    serde_json::to_vec_pretty(&layer).unwrap_or_default()
}

/// The `io.atcr.atproto.*` annotations of the artifact manifest (and of its entry in a
/// referrers list), plus its creation time.
pub fn annotations(pointer: &Pointer) -> Value {
    json!({
        "io.atcr.atproto.did": pointer.did.as_str(),
        "io.atcr.atproto.pds": pointer.pds,
        "io.atcr.atproto.recordUri": pointer.record_uri.to_string(),
        "org.opencontainers.image.created": pointer.signed_at,
    })
}

/// The artifact manifest: `subject` the image, the empty config, the one `layer`.
pub fn manifest(subject: &Subject, layer: &[u8], pointer: &Pointer) -> Vec<u8> {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_MEDIA_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": ImageDigest::of_bytes(EMPTY_CONFIG).as_str(),
            "size": EMPTY_CONFIG.len(),
        },
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest.as_str(),
            "size": subject.size,
        },
        "layers": [{
            "mediaType": ARTIFACT_MEDIA_TYPE,
            "digest": ImageDigest::of_bytes(layer).as_str(),
            "size": layer.len(),
            "annotations": {"org.opencontainers.image.title": LAYER_TITLE},
        }],
        "annotations": annotations(pointer),
    });
    serde_json::to_vec(&manifest).unwrap_or_default()
}

/// The manifest's entry in the referrers tag index: its descriptor with `artifactType` and
/// annotations, as a registry's Referrers API would list it.
pub fn index_entry(manifest: &[u8], pointer: &Pointer) -> Value {
    json!({
        "mediaType": OCI_MANIFEST,
        "digest": ImageDigest::of_bytes(manifest).as_str(),
        "size": manifest.len(),
        "artifactType": ARTIFACT_MEDIA_TYPE,
        "annotations": annotations(pointer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (Subject, Pointer) {
        let subject = Subject {
            digest: ImageDigest::of_bytes(b"image"),
            media_type: OCI_MANIFEST.into(),
            size: 5,
        };
        let pointer = Pointer {
            did: "did:plc:ewvi7nxzyoun6zhxrhs64oiz".parse().unwrap(),
            handle: Some("alice.test".into()),
            pds: "https://pds.example".into(),
            record_uri: "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/io.atcr.manifest/3m4xgq2kz7c2s"
                .parse()
                .unwrap(),
            commit_cid: None,
            signed_at: "2026-11-29T21:00:00.123Z".into(),
            key: None,
        };
        (subject, pointer)
    }

    /// What is written is what the verifier reads: the layer parses as a signature artifact
    /// for the subject, naming the record.
    #[test]
    fn the_layer_is_what_the_verifier_reads() {
        let (subject, pointer) = fixture();
        let layer = layer(&subject, &pointer);
        let manifest_bytes = manifest(&subject, &layer, &pointer);
        let parsed = crate::resolve::SignatureArtifact::parse(
            &layer,
            &ImageDigest::of_bytes(&manifest_bytes),
            &subject.digest,
        )
        .unwrap();
        assert_eq!(parsed.did, pointer.did);
        assert_eq!(parsed.record_uri, pointer.record_uri);
        let m: Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(m["artifactType"], ARTIFACT_MEDIA_TYPE);
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(m["subject"]["digest"], subject.digest.as_str());
        assert_eq!(m["layers"][0]["size"], layer.len());
        assert_eq!(
            m["annotations"]["io.atcr.atproto.recordUri"],
            pointer.record_uri.to_string()
        );
    }

    #[test]
    fn datetimes_are_utc_milliseconds() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_764_450_000_123_456_789).unwrap();
        assert_eq!(datetime(t), "2025-11-29T21:00:00.123Z");
        let t = OffsetDateTime::from_unix_timestamp(1_764_450_000).unwrap();
        assert!(datetime(t).ends_with('Z'), "{}", datetime(t));
        crate::syntax::parse_datetime(&datetime(t)).unwrap();
    }
}
