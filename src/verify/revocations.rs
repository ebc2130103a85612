//! Revocation marks: what the repo event stream (`serve`'s follower, [`crate::follow`])
//! says no longer holds, so that cached facts resting on it stop being used at once instead
//! of at the end of their TTL.
//!
//! Every cached proof outcome and DID document is stamped with the [`Revocations::epoch`]
//! read when its load **began**; a mark for a record (deleted or updated) or a DID (identity
//! change, account deactivated) carries the epoch at which it was made. An entry stamped
//! before a mark that concerns it is no longer used — that covers a load that was in flight
//! when the event came, which a plain removal from the cache would miss (the load would
//! store its stale answer after the removal).
//!
//! Marks only ever shorten what is cached: a mark never makes anything verified. They are
//! kept as long as an entry stamped before them could still be fresh (the longest TTL plus
//! a margin for slow loads). Past [`MAX_RECORD_MARKS_PER_DID`] record marks of one DID,
//! they become one mark of the whole DID (what its stream can flood is its own caches);
//! past [`MAX_MARKS`] in all, the DIDs with the most record marks are widened the same way
//! (each at its newest record mark) until half the marks are left; only if DID marks alone
//! reach it is every entry stamped before now dropped at once (the safe direction) and the
//! marks cleared.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::syntax::Did;

/// Marks kept at most: past it, the most-marked signers' record marks are widened to marks
/// of the signer, and only if that is not enough is everything older dropped at once.
pub const MAX_MARKS: usize = 100_000;

/// Record marks kept per DID at most before they become one mark of the DID (its document
/// and every proof of its records): a stream that reports many changed records of one
/// signer — a hostile PDS can make up any number — makes the engine forget that signer's
/// facts, not everyone's (as reaching [`MAX_MARKS`] would).
pub const MAX_RECORD_MARKS_PER_DID: usize = 1_000;

/// How long past the longest cache TTL a mark is kept: a load may finish (and stamp its
/// entry's expiry) well after it began.
const LOAD_MARGIN: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct Marks {
    /// Record marks by DID, then by `at://` URI.
    records: HashMap<Did, HashMap<String, (u64, Instant)>>,
    /// Record marks in all (the sum of the lengths in `records`).
    record_count: usize,
    dids: HashMap<Did, (u64, Instant)>,
    /// Entries stamped before this are dropped whatever they are.
    floor: u64,
}

impl Marks {
    fn held(&self) -> usize {
        self.record_count + self.dids.len()
    }

    fn insert_record(&mut self, did: &Did, uri: &str, mark: (u64, Instant)) {
        let records = self.records.entry(did.clone()).or_default();
        if records.insert(uri.to_owned(), mark).is_none() {
            self.record_count += 1;
        }
    }

    /// Replaces `did`'s record marks by one mark of the DID, which covers them and more
    /// (its document, and every proof of its records, loaded before it): at `at`, or when
    /// not given at its newest record mark; never earlier than a DID mark it already has.
    fn widen(&mut self, did: &Did, at: Option<(u64, Instant)>) {
        let records = self.records.remove(did).unwrap_or_default();
        self.record_count -= records.len();
        let newest = records.into_values().chain(at).max_by_key(|&(e, _)| e);
        let held = self.dids.get(did).copied();
        if let Some(mark) = newest.into_iter().chain(held).max_by_key(|&(e, _)| e) {
            self.dids.insert(did.clone(), mark);
        }
    }

    /// Drops the marks `old` picks.
    fn age(&mut self, old: impl Fn(&(u64, Instant)) -> bool) {
        for records in self.records.values_mut() {
            records.retain(|_, v| !old(v));
        }
        self.records.retain(|_, r| !r.is_empty());
        self.record_count = self.records.values().map(HashMap::len).sum();
        self.dids.retain(|_, v| !old(v));
    }
}

/// The revocation marks of one engine. Cheap to share.
#[derive(Debug)]
pub struct Revocations {
    epoch: AtomicU64,
    marks: Mutex<Marks>,
    keep: Duration,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::new(Duration::from_secs(3600))
    }
}

impl Revocations {
    /// Marks kept for `longest_ttl` (the longest TTL of the caches they concern) plus a
    /// margin for slow loads.
    pub fn new(longest_ttl: Duration) -> Self {
        Revocations {
            epoch: AtomicU64::new(0),
            marks: Mutex::new(Marks::default()),
            keep: longest_ttl.saturating_add(LOAD_MARGIN),
        }
    }

    /// The epoch now: stamp an entry with it before loading it.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether any mark was made after `since` (for answers rendered from many facts).
    pub fn any_since(&self, since: u64) -> bool {
        self.epoch() > since
    }

    /// The record `uri` (an `at://` URI) of `did` was deleted or updated: proofs of it
    /// loaded before now are not used again.
    pub fn revoke_record(&self, did: &Did, uri: &str) {
        self.mark(|m, e, t| {
            let held = m.records.get(did);
            if held.is_none_or(|r| r.len() < MAX_RECORD_MARKS_PER_DID || r.contains_key(uri)) {
                m.insert_record(did, uri, (e, t));
            } else {
                m.widen(did, Some((e, t)));
            }
        });
    }

    /// `did`'s identity or hosting changed: its document and the proofs of its records
    /// loaded before now are not used again.
    pub fn revoke_did(&self, did: &Did) {
        self.mark(|m, e, t| {
            m.dids.insert(did.clone(), (e, t));
        });
    }

    /// Something an answer may rest on changed without revoking a fact (a new signature
    /// record indexed): answers rendered before now are rendered again, from the caches.
    pub fn touch(&self) {
        // Under the lock, as `mark` raises the epoch: a rise in between would be lost.
        let _m = self.marks.lock();
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a proof of `uri` by `did`, stamped `since`, may still be used.
    pub fn proof_holds(&self, since: u64, did: &Did, uri: &str) -> bool {
        let Ok(m) = self.marks.lock() else {
            return false;
        };
        since >= m.floor
            && m.dids.get(did).is_none_or(|&(e, _)| since >= e)
            && m.records
                .get(did)
                .and_then(|r| r.get(uri))
                .is_none_or(|&(e, _)| since >= e)
    }

    /// Whether `did`'s document, stamped `since`, may still be used.
    pub fn document_holds(&self, since: u64, did: &Did) -> bool {
        let Ok(m) = self.marks.lock() else {
            return false;
        };
        since >= m.floor && m.dids.get(did).is_none_or(|&(e, _)| since >= e)
    }

    /// Marks held now (records, DIDs).
    pub fn len(&self) -> (usize, usize) {
        self.marks
            .lock()
            .map(|m| (m.record_count, m.dids.len()))
            .unwrap_or_default()
    }

    /// Whether no mark is held.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Makes a mark. The epoch is raised only **after** the mark is in place, under the lock:
    /// a render that reads the raised epoch then finds the mark in `proof_holds` (which
    /// waits for the lock), and one that read the epoch before sees `any_since` true once the
    /// mark is made. Raising first would let a render read the new epoch, find no mark yet,
    /// and keep a stale answer stamped with the mark's own epoch (`any_since` false).
    fn mark(&self, insert: impl FnOnce(&mut Marks, u64, Instant)) {
        let now = Instant::now();
        probe(self);
        let Ok(mut m) = self.marks.lock() else {
            // A poisoned lock (a panic while holding it) cannot hide a revocation: the epoch
            // still rises, and every check answers "does not hold" while it is poisoned.
            self.epoch.fetch_add(1, Ordering::SeqCst);
            return;
        };
        probe(self);
        let epoch = self.epoch.load(Ordering::SeqCst).saturating_add(1);
        let keep = self.keep;
        let old = |&(_, t): &(u64, Instant)| now.saturating_duration_since(t) > keep;
        if m.held() >= MAX_MARKS {
            m.age(old);
        }
        if m.held() >= MAX_MARKS {
            // The signers with the most record marks are widened (each to one mark of the
            // signer) until half the marks are left: a stream reporting many signers'
            // changes makes the engine forget those signers' facts, not everyone's.
            let mut most: Vec<(usize, Did)> = m
                .records
                .iter()
                .map(|(did, r)| (r.len(), did.clone()))
                .collect();
            most.sort_unstable_by_key(|(n, _)| std::cmp::Reverse(*n));
            for (_, did) in most {
                if m.held() < MAX_MARKS / 2 {
                    break;
                }
                m.widen(&did, None);
            }
        }
        if m.held() >= MAX_MARKS {
            // Everything stamped before this mark goes; the marks are no longer needed.
            m.floor = epoch;
            m.records.clear();
            m.record_count = 0;
            m.dids.clear();
        } else {
            insert(&mut m, epoch, now);
        }
        probe(self);
        self.epoch.store(epoch, Ordering::SeqCst);
    }
}

/// In tests, a reader looking at the epoch between the steps of `mark`, before it is done
/// (see `a_render_during_a_mark_never_keeps_a_stale_answer`); nothing otherwise.
#[cfg(not(test))]
fn probe(_: &Revocations) {}

#[cfg(test)]
thread_local! {
    static PROBE: std::cell::RefCell<Option<Vec<u64>>> = const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
fn probe(r: &Revocations) {
    let epoch = r.epoch();
    PROBE.with(|p| {
        if let Some(seen) = p.borrow_mut().as_mut() {
            seen.push(epoch);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn did(s: &str) -> Did {
        s.parse().unwrap()
    }

    /// The `n`th of many distinct DIDs.
    fn nth(mut n: usize) -> Did {
        let mut id = String::new();
        for _ in 0..24 {
            id.push(char::from(b'a' + (n % 26) as u8));
            n /= 26;
        }
        did(&format!("did:plc:{id}"))
    }

    /// Marks `n` records of many DIDs, fewer than the cap for each.
    fn flood(r: &Revocations, n: usize) {
        for i in 0..n {
            let signer = nth(i / MAX_RECORD_MARKS_PER_DID);
            r.revoke_record(&signer, &format!("at://{signer}/c/{i}"));
        }
    }

    #[test]
    fn marks_drop_what_was_loaded_before_them_only() {
        let r = Revocations::default();
        let alice = did("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa");
        let bob = did("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb");
        let uri = "at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/io.atcr.manifest/3k";
        let before = r.epoch();
        assert!(r.proof_holds(before, &alice, uri));
        r.revoke_record(&alice, uri);
        assert!(r.any_since(before));
        assert!(
            !r.proof_holds(before, &alice, uri),
            "loaded before the delete"
        );
        assert!(r.proof_holds(r.epoch(), &alice, uri), "loaded after it");
        assert!(
            r.proof_holds(before, &alice, &format!("{uri}x")),
            "another record"
        );
        assert!(
            r.document_holds(before, &alice),
            "a record mark spares the document"
        );

        let before = r.epoch();
        r.revoke_did(&bob);
        assert!(!r.document_holds(before, &bob));
        assert!(!r.proof_holds(before, &bob, "at://did:plc:bbbbbbbbbbbbbbbbbbbbbbbb/c/k"));
        assert!(r.document_holds(before, &alice));
        assert_eq!(r.len(), (1, 1));
    }

    /// Runs `mark` with a reader looking at the epoch between each of its steps, and checks
    /// that a render stamped with any epoch it saw either finds the mark or is rendered
    /// again (`any_since`): never a stale answer kept until its TTL.
    fn epochs_seen_during(mark: impl FnOnce()) -> Vec<u64> {
        PROBE.with(|p| *p.borrow_mut() = Some(Vec::new()));
        mark();
        PROBE.with(|p| p.borrow_mut().take()).unwrap_or_default()
    }

    #[test]
    fn a_render_during_a_mark_never_keeps_a_stale_answer() {
        let r = Revocations::default();
        let alice = did("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa");
        let uri = "at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/io.atcr.manifest/3k";
        r.touch();
        let seen = epochs_seen_during(|| r.revoke_record(&alice, uri));
        assert!(
            seen.len() >= 2,
            "the reader looked between the steps: {seen:?}"
        );
        for since in seen {
            assert!(
                r.any_since(since) || !r.proof_holds(since, &alice, uri),
                "a render stamped {since} keeps a verified answer after the delete (epoch {})",
                r.epoch()
            );
        }
        let seen = epochs_seen_during(|| r.revoke_did(&alice));
        for since in seen {
            assert!(r.any_since(since) || !r.document_holds(since, &alice));
        }
    }

    #[test]
    fn a_render_during_the_floor_never_keeps_a_stale_answer() {
        let r = Revocations::new(Duration::from_secs(60));
        let alice = did("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa");
        for i in 0..MAX_MARKS {
            r.revoke_did(&nth(i));
        }
        let seen = epochs_seen_during(|| r.revoke_did(&nth(usize::MAX)));
        assert_eq!(r.len(), (0, 0), "the floor was raised");
        for since in seen {
            assert!(
                r.any_since(since) || !r.document_holds(since, &alice),
                "a render stamped {since} outlives the floor (epoch {})",
                r.epoch()
            );
        }
    }

    #[test]
    fn too_many_marks_drop_everything_older_at_once() {
        let r = Revocations::new(Duration::from_secs(60));
        let alice = did("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa");
        let stamped = r.epoch();
        for i in 0..=MAX_MARKS {
            r.revoke_did(&nth(i + 3));
        }
        assert_eq!(r.len(), (0, 0), "cleared, under a floor");
        assert!(
            !r.document_holds(stamped, &alice),
            "the floor drops older entries"
        );
        assert!(r.document_holds(r.epoch(), &alice));
    }

    #[test]
    fn many_changed_records_of_one_signer_become_one_mark_of_that_signer() {
        let r = Revocations::new(Duration::from_secs(60));
        let (alice, bob) = (nth(1), nth(2));
        let bobs = format!("at://{bob}/io.atcr.manifest/3k");
        let stamped = r.epoch();
        for i in 0..MAX_RECORD_MARKS_PER_DID {
            r.revoke_record(&alice, &format!("at://{alice}/io.atcr.manifest/{i}"));
        }
        assert_eq!(r.len(), (MAX_RECORD_MARKS_PER_DID, 0));
        let first = format!("at://{alice}/io.atcr.manifest/0");
        assert!(
            r.document_holds(stamped, &alice),
            "record marks only so far"
        );
        // Marking one of them again keeps the count.
        r.revoke_record(&alice, &first);
        assert_eq!(r.len(), (MAX_RECORD_MARKS_PER_DID, 0));
        // One more: alice's record marks become one mark of alice.
        r.revoke_record(&alice, &format!("at://{alice}/io.atcr.manifest/more"));
        assert_eq!(r.len(), (0, 1));
        assert!(!r.proof_holds(stamped, &alice, &first), "still forgotten");
        assert!(!r.proof_holds(stamped, &alice, "at://x/never/marked"));
        assert!(!r.document_holds(stamped, &alice));
        // Bob's facts, and anything loaded after the mark, hold.
        assert!(r.proof_holds(stamped, &bob, &bobs));
        assert!(r.document_holds(stamped, &bob));
        assert!(r.proof_holds(r.epoch(), &alice, &first));
    }

    #[test]
    fn past_max_marks_the_signers_with_most_record_marks_are_widened() {
        let r = Revocations::new(Duration::from_secs(60));
        let bystander = did("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb");
        let theirs = format!("at://{bystander}/io.atcr.manifest/3k");
        r.revoke_record(&bystander, &theirs);
        let stamped = r.epoch();
        // Many signers' changes: 100 signers with 1,000 record marks each (under the cap).
        flood(&r, MAX_MARKS);
        let (records, dids) = r.len();
        assert!(records + dids < MAX_MARKS, "widened: {records} + {dids}");
        assert!(dids > 0);
        // The bystander's single mark stands, and its document is untouched.
        assert!(!r.proof_holds(stamped - 1, &bystander, &theirs));
        assert!(r.proof_holds(stamped, &bystander, &theirs));
        assert!(r.document_holds(0, &bystander));
        // Every flooded record is still forgotten, widened or not.
        for i in [0, MAX_MARKS / 2, MAX_MARKS - 1] {
            let signer = nth(i / MAX_RECORD_MARKS_PER_DID);
            assert!(!r.proof_holds(stamped, &signer, &format!("at://{signer}/c/{i}")));
        }
    }
}
