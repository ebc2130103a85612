//! The signature index: image digest → the signature records of trusted signers that name
//! it, learnt without the registry — from a backfill of each trusted signer's signature
//! collections (`com.atproto.repo.listRecords`) and then from their repo event streams
//! ([`crate::follow`]).
//!
//! The index only **points**, as a registry's signature artifact does (and the artifact was
//! only ever an unsigned pointer too): each record it names is proven by `getRecord`
//! exactly like one an artifact names, and what the index holds is never evidence. So a
//! wrong entry (a PDS listing a record it does not hold, a stale entry) costs one proof
//! attempt that fails, never a false "verified".

use std::collections::HashMap;
use std::sync::RwLock;

use crate::syntax::{AtUri, ImageDigest};

/// Records indexed at most; past it new records are not indexed (their images are still
/// found through the registry's artifacts).
pub const MAX_INDEXED: usize = 1_000_000;

/// Records indexed per digest at most (one signer signing one digest many times).
const MAX_PER_DIGEST: usize = 64;

#[derive(Debug, Default)]
struct Entries {
    by_digest: HashMap<ImageDigest, Vec<AtUri>>,
    by_record: HashMap<AtUri, ImageDigest>,
}

/// Digest → record pointers. Cheap to share.
#[derive(Debug, Default)]
pub struct SignatureIndex {
    entries: RwLock<Entries>,
}

impl SignatureIndex {
    /// Notes that the record `uri` names `digest` (replacing what it named before). False
    /// when the index is full.
    pub fn insert(&self, uri: AtUri, digest: ImageDigest) -> bool {
        let Ok(mut e) = self.entries.write() else {
            return false;
        };
        if let Some(old) = e.by_record.get(&uri).cloned() {
            if old == digest {
                return true;
            }
            remove_pointer(&mut e, &old, &uri);
        } else if e.by_record.len() >= MAX_INDEXED {
            return false;
        }
        let list = e.by_digest.entry(digest.clone()).or_default();
        if list.len() >= MAX_PER_DIGEST {
            return false;
        }
        list.push(uri.clone());
        e.by_record.insert(uri, digest);
        true
    }

    /// Forgets the record `uri` (deleted).
    pub fn remove(&self, uri: &AtUri) {
        let Ok(mut e) = self.entries.write() else {
            return;
        };
        if let Some(digest) = e.by_record.remove(uri) {
            remove_pointer(&mut e, &digest, uri);
        }
    }

    /// The records that name `digest`.
    pub fn lookup(&self, digest: &ImageDigest) -> Vec<AtUri> {
        self.entries
            .read()
            .ok()
            .and_then(|e| e.by_digest.get(digest).cloned())
            .unwrap_or_default()
    }

    /// Records indexed.
    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.by_record.len()).unwrap_or(0)
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove_pointer(e: &mut Entries, digest: &ImageDigest, uri: &AtUri) {
    if let Some(list) = e.by_digest.get_mut(digest) {
        list.retain(|u| u != uri);
        if list.is_empty() {
            e.by_digest.remove(digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> ImageDigest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn uri(rkey: &str) -> AtUri {
        format!("at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/io.atcr.manifest/{rkey}")
            .parse()
            .unwrap()
    }

    #[test]
    fn records_point_at_digests_until_deleted_or_updated() {
        let index = SignatureIndex::default();
        assert!(index.insert(uri("3ka"), digest('a')));
        assert!(index.insert(uri("3kb"), digest('a')));
        assert!(index.insert(uri("3ka"), digest('a')), "again: no duplicate");
        assert_eq!(index.lookup(&digest('a')), vec![uri("3ka"), uri("3kb")]);
        // An update to another digest moves the pointer.
        assert!(index.insert(uri("3kb"), digest('b')));
        assert_eq!(index.lookup(&digest('a')), vec![uri("3ka")]);
        assert_eq!(index.lookup(&digest('b')), vec![uri("3kb")]);
        index.remove(&uri("3ka"));
        assert!(index.lookup(&digest('a')).is_empty());
        assert_eq!(index.len(), 1);
    }
}
