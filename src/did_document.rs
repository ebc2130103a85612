//! DID documents as ATProto reads them (<https://atproto.com/specs/did#did-documents>).
//!
//! Owns: parsing a document's bytes for one expected DID, and finding in it the `#atproto`
//! signing key, the `#atproto_pds` service and the claimed handle. Does not fetch anything,
//! and does not check that the handle points back at the DID (that needs the network).

use serde::Deserialize;

use crate::crypto::{KeyError, PublicKey};
use crate::syntax::Did;

/// Largest DID document accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// A DID document checked to belong to the DID it was fetched for.
#[derive(Debug, Clone)]
pub struct DidDocument {
    did: Did,
    raw: RawDocument,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    id: String,
    #[serde(default)]
    also_known_as: Vec<String>,
    #[serde(default)]
    verification_method: Vec<VerificationMethod>,
    #[serde(default)]
    service: Vec<Service>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerificationMethod {
    id: String,
    #[serde(rename = "type")]
    method_type: String,
    public_key_multibase: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    id: String,
    #[serde(rename = "type")]
    service_type: serde_json::Value,
    service_endpoint: serde_json::Value,
}

/// Why a DID document cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DidDocError {
    /// Larger than [`MAX_DOCUMENT_BYTES`].
    #[error("DID document is {found} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The cap.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// Not JSON of the DID-document shape.
    #[error("DID document is not valid JSON of the expected shape: {reason}")]
    Json {
        /// The parser's message.
        reason: String,
    },
    /// `id` is not the DID the document was fetched for.
    #[error("DID document id {found:?} does not match the expected DID {expected}")]
    IdMismatch {
        /// The DID asked for.
        expected: Did,
        /// The document's id.
        found: String,
    },
    /// No verification method with id `#atproto`.
    #[error("DID document of {did} has no #atproto verification method (no ATProto signing key)")]
    NoSigningKey {
        /// The DID.
        did: Did,
    },
    /// The `#atproto` method's key cannot be parsed.
    #[error("DID document of {did}: #atproto key: {source}")]
    Key {
        /// The DID.
        did: Did,
        /// What is wrong with the key.
        #[source]
        source: KeyError,
    },
    /// No `#atproto_pds` service of type `AtprotoPersonalDataServer`.
    #[error("DID document of {did} has no #atproto_pds service of type AtprotoPersonalDataServer")]
    NoPds {
        /// The DID.
        did: Did,
    },
}

impl DidDocument {
    /// Parses a document fetched for `did`, refusing one whose `id` is another DID.
    pub fn parse(did: &Did, bytes: &[u8]) -> Result<Self, DidDocError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(DidDocError::TooLarge {
                limit: MAX_DOCUMENT_BYTES,
                found: bytes.len(),
            });
        }
        let raw: RawDocument = serde_json::from_slice(bytes).map_err(|e| DidDocError::Json {
            reason: crate::syntax::text::outside(&e.to_string()),
        })?;
        if raw.id != did.as_str() {
            return Err(DidDocError::IdMismatch {
                expected: did.clone(),
                found: raw.id.chars().take(256).collect(),
            });
        }
        Ok(DidDocument {
            did: did.clone(),
            raw,
        })
    }

    /// The DID this document belongs to.
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// True when `id` is `#<fragment>` or `<did>#<fragment>`.
    fn is_fragment(&self, id: &str, fragment: &str) -> bool {
        let local = id.strip_prefix(self.did.as_str()).unwrap_or(id);
        local.strip_prefix('#') == Some(fragment)
    }

    /// The ATProto signing key: the verification method `#atproto`.
    pub fn signing_key(&self) -> Result<PublicKey, DidDocError> {
        let method = self
            .raw
            .verification_method
            .iter()
            .find(|m| self.is_fragment(&m.id, "atproto"))
            .ok_or_else(|| DidDocError::NoSigningKey {
                did: self.did.clone(),
            })?;
        let multibase = method.public_key_multibase.as_deref().unwrap_or_default();
        PublicKey::from_verification_method(&method.method_type, multibase).map_err(|source| {
            DidDocError::Key {
                did: self.did.clone(),
                source,
            }
        })
    }

    /// The PDS endpoint: service `#atproto_pds` of type `AtprotoPersonalDataServer`.
    /// Returned as the document states it; the network layer checks it before use.
    pub fn pds_endpoint(&self) -> Result<&str, DidDocError> {
        self.raw
            .service
            .iter()
            .find(|s| {
                self.is_fragment(&s.id, "atproto_pds")
                    && s.service_type.as_str() == Some("AtprotoPersonalDataServer")
            })
            .and_then(|s| s.service_endpoint.as_str())
            .ok_or_else(|| DidDocError::NoPds {
                did: self.did.clone(),
            })
    }

    /// `alsoKnownAs`, as served.
    pub fn also_known_as(&self) -> &[String] {
        &self.raw.also_known_as
    }

    /// The handle the document claims (first `at://` entry of `alsoKnownAs`), unverified;
    /// `None` when that entry is not a syntactically valid handle (it is shown to users).
    pub fn claimed_handle(&self) -> Option<&str> {
        self.raw
            .also_known_as
            .iter()
            .find_map(|a| a.strip_prefix("at://"))
            .filter(|h| crate::syntax::is_handle(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    fn doc(method_id: &str, service_id: &str, id: &str) -> String {
        format!(
            r#"{{"@context":["https://www.w3.org/ns/did/v1"],"id":"{id}",
              "alsoKnownAs":["at://alice.test"],
              "verificationMethod":[{{"id":"{method_id}","type":"Multikey","controller":"{DID}",
                "publicKeyMultibase":"zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"}}],
              "service":[{{"id":"{service_id}","type":"AtprotoPersonalDataServer",
                "serviceEndpoint":"https://pds.example.com"}}]}}"#
        )
    }

    fn did() -> Did {
        DID.parse().unwrap()
    }

    #[test]
    fn finds_key_service_and_handle_with_both_id_forms() {
        for (m, s) in [
            ("#atproto", "#atproto_pds"),
            (&*format!("{DID}#atproto"), &*format!("{DID}#atproto_pds")),
        ] {
            let d = DidDocument::parse(&did(), doc(m, s, DID).as_bytes()).unwrap();
            let key = d.signing_key().unwrap();
            assert_eq!(
                key.to_did_key(),
                "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"
            );
            assert_eq!(d.pds_endpoint().unwrap(), "https://pds.example.com");
            assert_eq!(d.claimed_handle(), Some("alice.test"));
        }
    }

    #[test]
    fn other_did_is_refused() {
        let other = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let e = DidDocument::parse(&did(), doc("#atproto", "#atproto_pds", other).as_bytes())
            .unwrap_err();
        assert!(matches!(e, DidDocError::IdMismatch { .. }), "{e}");
    }

    #[test]
    fn missing_atproto_key_says_so() {
        let d = DidDocument::parse(&did(), doc("#other", "#atproto_pds", DID).as_bytes()).unwrap();
        let e = d.signing_key().unwrap_err();
        assert_eq!(e, DidDocError::NoSigningKey { did: did() });
        assert!(e.to_string().contains("no #atproto verification method"));
        // A method for another DID's fragment does not count.
        let foreign = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa#atproto";
        let d = DidDocument::parse(&did(), doc(foreign, "#atproto_pds", DID).as_bytes()).unwrap();
        assert!(matches!(
            d.signing_key(),
            Err(DidDocError::NoSigningKey { .. })
        ));
    }

    #[test]
    fn missing_pds_and_garbage() {
        let d = DidDocument::parse(&did(), doc("#atproto", "#other", DID).as_bytes()).unwrap();
        assert!(matches!(d.pds_endpoint(), Err(DidDocError::NoPds { .. })));
        assert!(matches!(
            DidDocument::parse(&did(), b"{not json"),
            Err(DidDocError::Json { .. })
        ));
        let big = vec![b' '; MAX_DOCUMENT_BYTES + 1];
        assert!(matches!(
            DidDocument::parse(&did(), &big),
            Err(DidDocError::TooLarge { .. })
        ));
    }
}
