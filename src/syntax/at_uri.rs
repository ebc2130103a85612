//! `at://` URIs naming one record (<https://atproto.com/specs/at-uri-scheme>).

use std::str::FromStr;

use super::{Did, Nsid, RecordKey, SyntaxError};

/// `at://<did>/<collection>/<rkey>`: the only AT-URI form that names a signed record.
/// Handles as authority, queries and fragments are refused: a signature must name its
/// signer by DID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AtUri {
    did: Did,
    collection: Nsid,
    rkey: RecordKey,
}

impl AtUri {
    /// The repository (signer) the URI names.
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// The record collection.
    pub fn collection(&self) -> &Nsid {
        &self.collection
    }

    /// The record key.
    pub fn rkey(&self) -> &RecordKey {
        &self.rkey
    }

    /// The MST key of the record: `<collection>/<rkey>`.
    pub fn repo_key(&self) -> String {
        format!("{}/{}", self.collection, self.rkey)
    }
}

impl std::fmt::Display for AtUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at://{}/{}/{}", self.did, self.collection, self.rkey)
    }
}

impl FromStr for AtUri {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let error = |reason| SyntaxError::new("record AT-URI", s, reason);
        let err = |reason| Err(error(reason));
        if s.len() > 8192 {
            return err("longer than 8192 characters");
        }
        let Some(rest) = s.strip_prefix("at://") else {
            return err("must start with \"at://\"");
        };
        let mut parts = rest.split('/');
        let (Some(did), Some(collection), Some(rkey), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return err("must be at://<did>/<collection>/<rkey>");
        };
        let did = did
            .parse()
            .map_err(|_| error("authority must be a DID (handles are not accepted)"))?;
        let collection = collection
            .parse()
            .map_err(|_| error("collection is not a valid NSID"))?;
        let rkey = rkey.parse().map_err(|_| error("record key is not valid"))?;
        Ok(AtUri {
            did,
            collection,
            rkey,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_uri_round_trips() {
        let s = "at://did:plc:7iza6de2dwap2sbkpav7c6c6/io.atcr.manifest/3jzfcijpj2z2a";
        let u: AtUri = s.parse().unwrap();
        assert_eq!(u.to_string(), s);
        assert_eq!(u.repo_key(), "io.atcr.manifest/3jzfcijpj2z2a");
    }

    #[test]
    fn refuses_other_forms() {
        for bad in [
            "at://alice.test/io.atcr.manifest/x",
            "at://did:plc:abc/io.atcr.manifest",
            "at://did:plc:abc/io.atcr.manifest/x/y",
            "at://did:plc:abc/io.atcr.manifest/x?q",
            "https://did:plc:abc/io.atcr.manifest/x",
            "at://did:plc:abc/notnsid/x",
        ] {
            assert!(bad.parse::<AtUri>().is_err(), "{bad}");
        }
    }
}
