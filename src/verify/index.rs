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
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::syntax::{AtUri, Did, ImageDigest};

/// Records indexed at most by default (`serve --max-indexed`); past it new records are not
/// indexed (their images are still found through the registry's artifacts). About 7.6 MiB
/// per 10,000 records (benches/follow.rs), so some 38 MiB at this bound, inside the 64 MiB
/// the server is sized for.
pub const MAX_INDEXED: usize = 50_000;

/// Records indexed per signer (DID) at most by default: one signer cannot fill the index.
pub const MAX_INDEXED_PER_DID: usize = 10_000;

/// Records indexed per digest at most (one signer signing one digest many times).
const MAX_PER_DIGEST: usize = 64;

/// What [`SignatureIndex::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexed {
    /// The record now points at the digest (new, or moved from another digest).
    Added,
    /// The record already pointed at the digest: nothing changed.
    Unchanged,
    /// Not indexed: the index, the signer's share or the digest's list is full. A pointer
    /// the record had to another digest is gone.
    Full,
}

#[derive(Debug, Default)]
struct Entries {
    by_digest: HashMap<ImageDigest, Vec<AtUri>>,
    by_record: HashMap<AtUri, ImageDigest>,
    /// Records indexed per signer (entries of `by_record`).
    by_did: HashMap<Did, usize>,
}

/// Digest → record pointers. Cheap to share.
#[derive(Debug)]
pub struct SignatureIndex {
    entries: RwLock<Entries>,
    max_records: AtomicUsize,
    max_per_did: AtomicUsize,
}

impl Default for SignatureIndex {
    fn default() -> Self {
        SignatureIndex::new(MAX_INDEXED, MAX_INDEXED_PER_DID)
    }
}

impl SignatureIndex {
    /// An index of `max_records` records at most, `max_per_did` per signer.
    pub fn new(max_records: usize, max_per_did: usize) -> Self {
        SignatureIndex {
            entries: RwLock::default(),
            max_records: AtomicUsize::new(max_records),
            max_per_did: AtomicUsize::new(max_per_did),
        }
    }

    /// Sets the bounds (records, records per signer); records already indexed stay.
    pub fn set_limits(&self, max_records: usize, max_per_did: usize) {
        self.max_records.store(max_records, Ordering::Relaxed);
        self.max_per_did.store(max_per_did, Ordering::Relaxed);
    }

    /// Notes that the record `uri` names `digest` (replacing what it named before): true
    /// when that changed the index ([`Indexed::Added`]); false when the record already
    /// named it, or the index is full.
    pub fn insert(&self, uri: AtUri, digest: ImageDigest) -> bool {
        self.put(uri, digest) == Indexed::Added
    }

    /// Notes that the record `uri` names `digest` (replacing what it named before).
    pub fn put(&self, uri: AtUri, digest: ImageDigest) -> Indexed {
        let Ok(mut e) = self.entries.write() else {
            return Indexed::Full;
        };
        if let Some(old) = e.by_record.get(&uri) {
            if *old == digest {
                return Indexed::Unchanged;
            }
            // Moved: forgotten first, so that a refusal below leaves no pointer behind.
            forget(&mut e, &uri);
        }
        if e.by_record.len() >= self.max_records.load(Ordering::Relaxed)
            || e.by_did.get(uri.did()).copied().unwrap_or(0)
                >= self.max_per_did.load(Ordering::Relaxed)
            || e.by_digest
                .get(&digest)
                .is_some_and(|list| list.len() >= MAX_PER_DIGEST)
        {
            return Indexed::Full;
        }
        e.by_digest
            .entry(digest.clone())
            .or_default()
            .push(uri.clone());
        *e.by_did.entry(uri.did().clone()).or_default() += 1;
        e.by_record.insert(uri, digest);
        Indexed::Added
    }

    /// Forgets the record `uri` (deleted).
    pub fn remove(&self, uri: &AtUri) {
        let Ok(mut e) = self.entries.write() else {
            return;
        };
        forget(&mut e, uri);
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

/// Removes every trace of `uri`: its pointer, its digest's entry, its signer's count.
fn forget(e: &mut Entries, uri: &AtUri) {
    let Some(digest) = e.by_record.remove(uri) else {
        return;
    };
    if let Some(list) = e.by_digest.get_mut(&digest) {
        list.retain(|u| u != uri);
        if list.is_empty() {
            e.by_digest.remove(&digest);
        }
    }
    if let Some(n) = e.by_did.get_mut(uri.did()) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            e.by_did.remove(uri.did());
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

    fn bobs(rkey: &str) -> AtUri {
        format!("at://did:plc:bbbbbbbbbbbbbbbbbbbbbbbb/io.atcr.manifest/{rkey}")
            .parse()
            .unwrap()
    }

    #[test]
    fn one_signer_cannot_fill_the_index() {
        let index = SignatureIndex::new(5, 3);
        for i in 0..3 {
            assert_eq!(
                index.put(uri(&format!("3k{i}")), digest('a')),
                Indexed::Added
            );
        }
        assert_eq!(
            index.put(uri("3k3"), digest('b')),
            Indexed::Full,
            "alice's share"
        );
        assert_eq!(
            index.put(bobs("3k0"), digest('a')),
            Indexed::Added,
            "bob's own"
        );
        assert_eq!(index.put(bobs("3k1"), digest('b')), Indexed::Added);
        assert_eq!(
            index.put(bobs("3k2"), digest('b')),
            Indexed::Full,
            "the whole index"
        );
        assert_eq!(index.len(), 5);
        // A deleted record frees its signer's share.
        index.remove(&uri("3k0"));
        assert_eq!(index.put(uri("3k3"), digest('b')), Indexed::Added);
        assert_eq!(index.len(), 5);
    }

    #[test]
    fn a_record_refused_on_moving_points_nowhere_and_can_come_back() {
        let index = SignatureIndex::default();
        for i in 0..MAX_PER_DIGEST {
            assert!(index.insert(bobs(&format!("3k{i}")), digest('b')));
        }
        assert!(index.insert(uri("3kx"), digest('a')));
        // An update to the full digest: refused, and the old pointer is gone.
        assert_eq!(index.put(uri("3kx"), digest('b')), Indexed::Full);
        assert!(index.lookup(&digest('a')).is_empty());
        assert!(!index.lookup(&digest('b')).contains(&uri("3kx")));
        assert_eq!(
            index.len(),
            MAX_PER_DIGEST,
            "a record pointing nowhere is not counted"
        );
        // Updated back: indexed again, as a change.
        assert_eq!(index.put(uri("3kx"), digest('a')), Indexed::Added);
        assert_eq!(index.lookup(&digest('a')), vec![uri("3kx")]);
        assert_eq!(index.len(), MAX_PER_DIGEST + 1);
    }

    #[test]
    fn records_point_at_digests_until_deleted_or_updated() {
        let index = SignatureIndex::default();
        assert!(index.insert(uri("3ka"), digest('a')));
        assert!(index.insert(uri("3kb"), digest('a')));
        assert_eq!(
            index.put(uri("3ka"), digest('a')),
            Indexed::Unchanged,
            "again: no duplicate, and no change (a replay drops no kept answer)"
        );
        assert!(!index.insert(uri("3ka"), digest('a')));
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
