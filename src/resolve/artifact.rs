//! The ATProto signature artifact: the small JSON layer of an OCI referrer whose
//! `artifactType` is [`ARTIFACT_MEDIA_TYPE`] (format: the integration guide, "Fetching
//! Signature Metadata").
//!
//! **Nothing in it is signed.** It is a pointer to where the proof lives (`recordUri`) and
//! who claims to have signed (`did`); the proof itself comes from the DID's own PDS. Its
//! `pdsEndpoint` is kept only to report when it differs from the DID document's PDS; its
//! `handle`, `commitCid` and `signedAt` are not read (the verdict takes them from signed
//! data).

use serde::Deserialize;

use super::ArtifactError;
use crate::syntax::text::outside;
use crate::syntax::{AtUri, Did, ImageDigest};

/// `artifactType` of ATProto signature artifacts, and the media type of their layer.
pub const ARTIFACT_MEDIA_TYPE: &str = "application/vnd.atproto.signature.v1+json";

/// A parsed signature artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureArtifact {
    /// The digest of its manifest in the registry (what `oras discover` lists); `None` for a
    /// pointer that came from the signature index, not from the registry.
    pub digest: Option<ImageDigest>,
    /// The DID it claims signed.
    pub did: Did,
    /// The record holding the proof.
    pub record_uri: AtUri,
    /// The PDS the artifact names (unsigned; the DID document's PDS is used instead).
    pub claimed_pds: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    #[serde(default)]
    subject: Option<WireSubject>,
    atproto: WireAtproto,
}

#[derive(Deserialize)]
struct WireSubject {
    digest: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAtproto {
    did: String,
    record_uri: String,
    #[serde(default)]
    pds_endpoint: Option<String>,
}

impl SignatureArtifact {
    /// Parses the artifact layer. `subject` is the digest the referrer was found for: an
    /// artifact whose own `subject.digest` names another image is refused.
    pub fn parse(
        bytes: &[u8],
        manifest_digest: &ImageDigest,
        subject: &ImageDigest,
    ) -> Result<SignatureArtifact, ArtifactError> {
        let invalid = |reason: String| ArtifactError::Invalid {
            artifact: Some(manifest_digest.clone()),
            reason,
        };
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| {
            invalid(format!(
                "layer is not valid JSON of the expected shape: {}",
                outside(&e.to_string())
            ))
        })?;
        if let Some(found) = wire.subject.and_then(|s| s.digest)
            && found != subject.as_str()
        {
            return Err(invalid(format!(
                "names subject {:?}, expected {subject}",
                outside(&found)
            )));
        }
        let did: Did = wire
            .atproto
            .did
            .parse()
            .map_err(|e| invalid(format!("atproto.did: {e}")))?;
        let record_uri: AtUri = wire
            .atproto
            .record_uri
            .parse()
            .map_err(|e| invalid(format!("atproto.recordUri: {e}")))?;
        if record_uri.did() != &did {
            return Err(invalid(format!(
                "names DID {did} but its record URI belongs to {}",
                record_uri.did()
            )));
        }
        Ok(SignatureArtifact {
            digest: Some(manifest_digest.clone()),
            did,
            record_uri,
            // Only ever compared and shown: kept inert.
            claimed_pds: wire.atproto.pds_endpoint.map(|p| outside(&p)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
    const M: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000002";

    fn parse(json: serde_json::Value) -> Result<SignatureArtifact, ArtifactError> {
        SignatureArtifact::parse(
            &serde_json::to_vec(&json).unwrap(),
            &M.parse().unwrap(),
            &D.parse().unwrap(),
        )
    }

    #[test]
    fn guide_example_parses() {
        let a = parse(serde_json::json!({
            "$type": "io.atcr.atproto.signature", "version": "1.0",
            "subject": {"digest": D, "mediaType": "application/vnd.oci.image.manifest.v1+json"},
            "atproto": {"did": "did:plc:alice123", "handle": "alice.bsky.social",
                "pdsEndpoint": "https://bsky.social",
                "recordUri": "at://did:plc:alice123/io.atcr.manifest/abc123",
                "commitCid": "bafyreih8", "signedAt": "2025-10-31T12:34:56.789Z"},
            "signature": {"algorithm": "ECDSA-K256-SHA256"}
        }))
        .unwrap();
        assert_eq!(a.did.as_str(), "did:plc:alice123");
        assert_eq!(a.claimed_pds.as_deref(), Some("https://bsky.social"));
    }

    #[test]
    fn mismatches_are_refused() {
        let other = "sha256:0000000000000000000000000000000000000000000000000000000000000003";
        let e = parse(serde_json::json!({"subject": {"digest": other},
            "atproto": {"did": "did:plc:a", "recordUri": "at://did:plc:a/io.atcr.manifest/x"}}))
        .unwrap_err();
        assert_eq!(e.code(), "artifact_invalid");
        assert!(e.to_string().contains("names subject"), "{e}");
        let e = parse(serde_json::json!({
            "atproto": {"did": "did:plc:a", "recordUri": "at://did:plc:b/io.atcr.manifest/x"}}))
        .unwrap_err();
        assert!(matches!(
            e,
            ArtifactError::Invalid {
                artifact: Some(_),
                ..
            }
        ));
        assert!(e.to_string().contains("belongs to did:plc:b"), "{e}");
        assert!(parse(serde_json::json!({"atproto": {}})).is_err());
        assert!(parse(serde_json::json!([1, 2])).is_err());
    }
}
