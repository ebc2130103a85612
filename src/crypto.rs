//! Public keys and signatures as ATProto uses them (<https://atproto.com/specs/cryptography>).
//!
//! Owns: parsing keys from `did:key:` strings, `Multikey` and the legacy
//! `EcdsaSecp256{k1,r1}VerificationKey2019` forms of DID documents; verifying 64-byte
//! compact ECDSA signatures over SHA-256 with **low-S only** on both curves. The `k256`
//! crate rejects high-S by itself; `p256` accepts it, so it is checked here for both.
//! Does not: sign, or know where keys come from.

use k256::elliptic_curve::scalar::IsHigh;
use serde::Serialize;

/// The two curves ATProto allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyType {
    /// NIST P-256 (`ES256`).
    #[serde(rename = "p256")]
    P256,
    /// secp256k1 (`ES256K`).
    #[serde(rename = "k256")]
    K256,
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyType::P256 => "p256",
            KeyType::K256 => "k256",
        })
    }
}

/// A parsed public key that can check signatures.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// secp256k1.
    K256(k256::ecdsa::VerifyingKey),
    /// NIST P-256.
    P256(p256::ecdsa::VerifyingKey),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_did_key())
    }
}

/// Multicodec varint prefixes of compressed public keys.
const K256_PREFIX: [u8; 2] = [0xe7, 0x01];
const P256_PREFIX: [u8; 2] = [0x80, 0x24];

/// A key string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not `z` + base58btc.
    #[error("public key {input:?} is not base58btc multibase (expected a leading 'z')")]
    Multibase {
        /// The offending input, truncated.
        input: String,
    },
    /// A multikey whose multicodec prefix is neither secp256k1 nor P-256.
    #[error("public key multicodec prefix {found} is not secp256k1 (e701) or P-256 (8024)")]
    Codec {
        /// Hex of the first two bytes.
        found: String,
    },
    /// The point bytes do not decode to a point on the curve.
    #[error("public key is not a valid {curve} point ({len} bytes)")]
    Point {
        /// Which curve was expected.
        curve: KeyType,
        /// How many bytes were given.
        len: usize,
    },
    /// `did:key:` was expected.
    #[error("{input:?} is not a did:key")]
    NotDidKey {
        /// The offending input, truncated.
        input: String,
    },
    /// A verification method type this verifier does not know.
    #[error(
        "verification method type {found:?} is not Multikey, EcdsaSecp256k1VerificationKey2019 or EcdsaSecp256r1VerificationKey2019"
    )]
    MethodType {
        /// The type found in the DID document.
        found: String,
    },
}

/// A signature that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Not 64 bytes (DER or other encodings are not accepted in ATProto).
    #[error("signature is {found} bytes, expected 64-byte compact r||s")]
    Length {
        /// The length found.
        found: usize,
    },
    /// r or s is zero or not below the curve order.
    #[error("signature is not a valid {0} r||s pair")]
    Malformed(KeyType),
    /// s is in the upper half of the curve order (malleable form, invalid in ATProto).
    #[error("signature has a high-S value, which ATProto forbids ({0})")]
    HighS(KeyType),
    /// The signature does not match the key and message.
    #[error("signature does not verify with the {0} key")]
    Mismatch(KeyType),
}

fn truncate(s: &str) -> String {
    s.chars().take(128).collect()
}

impl PublicKey {
    /// The curve of this key.
    pub fn key_type(&self) -> KeyType {
        match self {
            PublicKey::K256(_) => KeyType::K256,
            PublicKey::P256(_) => KeyType::P256,
        }
    }

    /// Parses `did:key:z…`.
    pub fn from_did_key(s: &str) -> Result<Self, KeyError> {
        let multikey = s
            .strip_prefix("did:key:")
            .ok_or_else(|| KeyError::NotDidKey { input: truncate(s) })?;
        Self::from_multikey(multikey)
    }

    /// Parses a `Multikey` `publicKeyMultibase`: `z` + base58btc(multicodec ‖ compressed point).
    pub fn from_multikey(s: &str) -> Result<Self, KeyError> {
        let bytes = decode_base58btc(s)?;
        match bytes.split_at_checked(2) {
            Some((p, point)) if p == K256_PREFIX => Self::from_sec1(KeyType::K256, point),
            Some((p, point)) if p == P256_PREFIX => Self::from_sec1(KeyType::P256, point),
            _ => Err(KeyError::Codec {
                found: bytes.iter().take(2).map(|b| format!("{b:02x}")).collect(),
            }),
        }
    }

    /// Parses the legacy `publicKeyMultibase` of `EcdsaSecp256k1VerificationKey2019` /
    /// `EcdsaSecp256r1VerificationKey2019`: `z` + base58btc(SEC1 point, no multicodec prefix).
    /// The PLC reference server serves the uncompressed 65-byte form; the interop fixtures
    /// use the compressed 33-byte form; both are SEC1 and both are accepted.
    pub fn from_legacy_multibase(curve: KeyType, s: &str) -> Result<Self, KeyError> {
        Self::from_sec1(curve, &decode_base58btc(s)?)
    }

    /// Parses a DID-document verification method by its `type`.
    pub fn from_verification_method(method_type: &str, multibase: &str) -> Result<Self, KeyError> {
        match method_type {
            "Multikey" => Self::from_multikey(multibase),
            "EcdsaSecp256k1VerificationKey2019" => {
                Self::from_legacy_multibase(KeyType::K256, multibase)
            }
            "EcdsaSecp256r1VerificationKey2019" => {
                Self::from_legacy_multibase(KeyType::P256, multibase)
            }
            other => Err(KeyError::MethodType {
                found: truncate(other),
            }),
        }
    }

    fn from_sec1(curve: KeyType, point: &[u8]) -> Result<Self, KeyError> {
        let bad = || KeyError::Point {
            curve,
            len: point.len(),
        };
        match curve {
            KeyType::K256 => k256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(PublicKey::K256)
                .map_err(|_| bad()),
            KeyType::P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(PublicKey::P256)
                .map_err(|_| bad()),
        }
    }

    /// The `did:key:` form of this key (compressed point with multicodec prefix).
    pub fn to_did_key(&self) -> String {
        let mut bytes = Vec::with_capacity(35);
        match self {
            PublicKey::K256(k) => {
                bytes.extend_from_slice(&K256_PREFIX);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
            PublicKey::P256(k) => {
                bytes.extend_from_slice(&P256_PREFIX);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
        }
        format!(
            "did:key:{}",
            multibase::encode(multibase::Base::Base58Btc, bytes)
        )
    }

    /// Verifies a 64-byte compact signature over SHA-256(`message`), refusing high-S.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        use k256::ecdsa::signature::Verifier;
        if signature.len() != 64 {
            return Err(SignatureError::Length {
                found: signature.len(),
            });
        }
        let curve = self.key_type();
        match self {
            PublicKey::K256(key) => {
                let sig = k256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| SignatureError::Malformed(curve))?;
                if bool::from(sig.s().is_high()) {
                    return Err(SignatureError::HighS(curve));
                }
                key.verify(message, &sig)
                    .map_err(|_| SignatureError::Mismatch(curve))
            }
            PublicKey::P256(key) => {
                let sig = p256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| SignatureError::Malformed(curve))?;
                if bool::from(sig.s().is_high()) {
                    return Err(SignatureError::HighS(curve));
                }
                key.verify(message, &sig)
                    .map_err(|_| SignatureError::Mismatch(curve))
            }
        }
    }
}

fn decode_base58btc(s: &str) -> Result<Vec<u8>, KeyError> {
    let bad = || KeyError::Multibase { input: truncate(s) };
    if !s.starts_with('z') || s.len() > 256 {
        return Err(bad());
    }
    match multibase::decode(s) {
        Ok((multibase::Base::Base58Btc, bytes)) => Ok(bytes),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    //! The atproto interop crypto fixtures (CC0): every case must pass.
    use super::*;
    use base64::Engine;
    use serde::Deserialize;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/atproto-interop/crypto/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct SigCase {
        comment: String,
        message_base64: String,
        algorithm: String,
        did_doc_suite: String,
        public_key_did: String,
        public_key_multibase: String,
        signature_base64: String,
        valid_signature: bool,
        tags: Vec<String>,
    }

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(s.trim_end_matches('='))
            .unwrap()
    }

    #[test]
    fn signature_fixtures() {
        let cases: Vec<SigCase> =
            serde_json::from_str(&fixture("signature-fixtures.json")).unwrap();
        assert_eq!(cases.len(), 6);
        for c in cases {
            let from_did = PublicKey::from_did_key(&c.public_key_did).unwrap();
            let from_doc =
                PublicKey::from_verification_method(&c.did_doc_suite, &c.public_key_multibase)
                    .unwrap();
            assert_eq!(from_did, from_doc, "{}", c.comment);
            let expected_type = match c.algorithm.as_str() {
                "ES256" => KeyType::P256,
                "ES256K" => KeyType::K256,
                other => panic!("unknown algorithm {other}"),
            };
            assert_eq!(from_did.key_type(), expected_type);
            let result = from_did.verify(&b64(&c.message_base64), &b64(&c.signature_base64));
            assert_eq!(
                result.is_ok(),
                c.valid_signature,
                "{}: {result:?}",
                c.comment
            );
            if c.tags.iter().any(|t| t == "high-s") {
                assert_eq!(
                    result,
                    Err(SignatureError::HighS(expected_type)),
                    "{}",
                    c.comment
                );
            }
            if c.tags.iter().any(|t| t == "der-encoded") {
                assert!(
                    matches!(result, Err(SignatureError::Length { .. })),
                    "{}: {result:?}",
                    c.comment
                );
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct DidKeyCase {
        private_key_bytes_hex: Option<String>,
        private_key_bytes_base58: Option<String>,
        public_did_key: String,
    }

    fn did_key_cases(name: &str, curve: KeyType) {
        let cases: Vec<DidKeyCase> = serde_json::from_str(&fixture(name)).unwrap();
        assert!(!cases.is_empty());
        for c in cases {
            let secret = match (&c.private_key_bytes_hex, &c.private_key_bytes_base58) {
                (Some(h), _) => hex::decode(h).unwrap(),
                (None, Some(b)) => multibase::decode(format!("z{b}")).unwrap().1,
                (None, None) => panic!("fixture without a private key"),
            };
            let derived = match curve {
                KeyType::K256 => PublicKey::K256(
                    *k256::ecdsa::SigningKey::from_slice(&secret)
                        .unwrap()
                        .verifying_key(),
                ),
                KeyType::P256 => PublicKey::P256(
                    *p256::ecdsa::SigningKey::from_slice(&secret)
                        .unwrap()
                        .verifying_key(),
                ),
            };
            let parsed = PublicKey::from_did_key(&c.public_did_key).unwrap();
            assert_eq!(parsed, derived, "{}", c.public_did_key);
            assert_eq!(parsed.key_type(), curve);
            assert_eq!(derived.to_did_key(), c.public_did_key);
        }
    }

    #[test]
    fn w3c_did_key_k256() {
        did_key_cases("w3c_didkey_K256.json", KeyType::K256);
    }

    #[test]
    fn w3c_did_key_p256() {
        did_key_cases("w3c_didkey_P256.json", KeyType::P256);
    }

    #[test]
    fn legacy_uncompressed_point_parses() {
        let sk = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let point = sk.verifying_key().to_encoded_point(false);
        assert_eq!(point.as_bytes().len(), 65);
        let mb = multibase::encode(multibase::Base::Base58Btc, point.as_bytes());
        let key =
            PublicKey::from_verification_method("EcdsaSecp256k1VerificationKey2019", &mb).unwrap();
        assert_eq!(key, PublicKey::K256(*sk.verifying_key()));
    }

    #[test]
    fn bad_keys_are_typed_errors() {
        assert!(matches!(
            PublicKey::from_multikey("fabc"),
            Err(KeyError::Multibase { .. })
        ));
        let ed25519 = multibase::encode(multibase::Base::Base58Btc, [0xed, 0x01, 1, 2, 3]);
        assert_eq!(
            PublicKey::from_multikey(&ed25519),
            Err(KeyError::Codec {
                found: "ed01".into()
            })
        );
        let short = multibase::encode(multibase::Base::Base58Btc, [0xe7, 0x01, 2, 3]);
        assert!(matches!(
            PublicKey::from_multikey(&short),
            Err(KeyError::Point {
                curve: KeyType::K256,
                ..
            })
        ));
        assert!(matches!(
            PublicKey::from_verification_method("Ed25519VerificationKey2020", "z1"),
            Err(KeyError::MethodType { .. })
        ));
        assert!(matches!(
            PublicKey::from_did_key("did:web:x"),
            Err(KeyError::NotDidKey { .. })
        ));
    }
}
