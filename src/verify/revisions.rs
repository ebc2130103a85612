//! No rollback: the highest repo revision proven per signer, below which a PDS answer is a
//! replay of an old repo state.
//!
//! The rule (README, "Threat model"): every proof fetched from a PDS whose commit signature
//! verifies under the signer's key shows a signed repo state, whether the record was then
//! found or proven absent (a deletion); its `rev` raises the signer's mark. A proof fetched
//! later whose commit `rev` is below the mark as it stood **when the proof was requested** is
//! refused as stale ([`crate::proof::ProofError::StaleCommit`]). Equal is accepted (the same
//! state, or another record from the same commit); taking the mark before the request means a
//! proof answered just before the signer's next commit is not refused by a concurrent proof
//! that saw that commit. Revs compare as TIDs (lexicographically).
//!
//! Cached outcomes are not re-judged: a proof that was current when fetched stays the answer
//! for `--proof-ttl`, as it always has (a later rev says the repo moved, not that the record
//! went). A rev more than [`CLOCK_SKEW`] ahead of now is not remembered, so one commit from a
//! PDS with a clock far ahead cannot lock the signer out afterwards.
//!
//! Bounded: at most [`MAX_REMEMBERED_DIDS`] signers (proofs are only fetched for DIDs a policy
//! trusts), the least recently used forgotten first. Optionally kept in a file (`--state-dir`),
//! read at start and rewritten atomically (a temporary file of its own, fsync, rename) whenever
//! a mark rises, merged with what the file holds then: processes sharing it (the verifier runs
//! of containerd or Ratify) keep each other's marks, the higher rev winning.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::policy::CLOCK_SKEW;
use crate::syntax::{Did, Tid};

/// Most signers whose highest rev is remembered.
pub const MAX_REMEMBERED_DIDS: usize = 10_000;

/// The file in `--state-dir`.
pub const STATE_FILE: &str = "revisions.json";

/// Largest state file read at start.
const MAX_STATE_BYTES: u64 = 4 * 1024 * 1024;

/// The highest commit rev proven per DID.
#[derive(Debug, Default)]
pub struct Revisions {
    marks: Mutex<Marks>,
    /// Where the marks are kept across restarts, and the lock that orders writes.
    file: Option<(PathBuf, Mutex<()>)>,
}

#[derive(Debug, Default)]
struct Marks {
    by_did: HashMap<Did, Mark>,
    tick: u64,
}

#[derive(Debug)]
struct Mark {
    rev: Tid,
    used: u64,
}

/// The state file: `{"version": 1, "revs": {"did:…": "<rev>"}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    revs: BTreeMap<Did, Tid>,
}

/// A state file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a state file of this version.
    #[error(
        "{}: not a revisions file ({reason}); expected {{\"version\": 1, \"revs\": {{DID: TID}}}} \
         of at most {MAX_STATE_BYTES} bytes (delete it to start empty)",
        path.display()
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Revisions {
    /// Marks kept in memory only.
    pub fn in_memory() -> Revisions {
        Revisions::default()
    }

    /// Marks kept in `dir`/[`STATE_FILE`], read now when it exists. The directory must be
    /// writable (checked now, with a file that is removed again).
    pub fn open(dir: &Path) -> Result<Revisions, StateError> {
        let path = dir.join(STATE_FILE);
        let mut marks = Marks::default();
        for (did, rev) in read_state(&path)? {
            marks.raise(did, rev);
        }
        let probe = dir.join(format!(".{STATE_FILE}.{}.probe", std::process::id()));
        std::fs::File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|source| StateError::Io {
                path: probe.clone(),
                source,
            })?;
        Ok(Revisions {
            marks: Mutex::new(marks),
            file: Some((path, Mutex::new(()))),
        })
    }

    /// The highest rev proven for `did`, if any.
    pub fn floor(&self, did: &Did) -> Option<Tid> {
        let mut marks = self.marks();
        marks.tick += 1;
        let tick = marks.tick;
        let mark = marks.by_did.get_mut(did)?;
        mark.used = tick;
        Some(mark.rev.clone())
    }

    /// Records that a commit of `did` at `rev` was proven at `now`. True when the mark rose
    /// (then [`Revisions::save`] keeps it, when there is a file).
    pub fn raise(&self, did: &Did, rev: &Tid, now: OffsetDateTime) -> bool {
        if rev.timestamp() > now.checked_add(CLOCK_SKEW).unwrap_or(now) {
            return false;
        }
        self.marks().raise(did.clone(), rev.clone())
    }

    /// How many signers are remembered.
    pub fn len(&self) -> usize {
        self.marks().by_did.len()
    }

    /// Whether no signer is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the marks are kept in a file.
    pub fn is_persistent(&self) -> bool {
        self.file.is_some()
    }

    /// Writes the marks to the state file (nothing without one), merged with what the file
    /// holds now (another process may share it: the higher rev wins, so a mark is never
    /// lowered): a temporary file of its own beside it, synced, then renamed over it.
    /// Blocking.
    pub fn save(&self) -> Result<(), StateError> {
        let Some((path, order)) = &self.file else {
            return Ok(());
        };
        // Held across merge, snapshot and rename, so a later write never loses to an earlier
        // one of this process.
        let _order = order.lock().unwrap_or_else(|p| p.into_inner());
        // A file that became unreadable is overwritten with what this process knows.
        let kept = read_state(path).unwrap_or_default();
        let state = {
            let mut marks = self.marks();
            for (did, rev) in kept {
                marks.raise(did, rev);
            }
            StateFile {
                version: 1,
                revs: marks
                    .by_did
                    .iter()
                    .map(|(d, m)| (d.clone(), m.rev.clone()))
                    .collect(),
            }
        };
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| io(e.into()))?;
        crate::file::write_atomically(path, &bytes).map_err(io)
    }

    fn marks(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The marks a state file holds (none when there is no file).
fn read_state(path: &Path) -> Result<BTreeMap<Did, Tid>, StateError> {
    let bytes = match crate::file::read_capped(path, MAX_STATE_BYTES) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let invalid = |reason: String| StateError::Invalid {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(invalid("too large".into()));
    }
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if state.version != 1 {
        return Err(invalid(format!("version {}", state.version)));
    }
    Ok(state.revs)
}

impl Marks {
    fn raise(&mut self, did: Did, rev: Tid) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(mark) = self.by_did.get_mut(&did) {
            mark.used = tick;
            if rev <= mark.rev {
                return false;
            }
            mark.rev = rev;
            return true;
        }
        if self.by_did.len() >= MAX_REMEMBERED_DIDS {
            let oldest = self
                .by_did
                .iter()
                .min_by_key(|(_, m)| m.used)
                .map(|(d, _)| d.clone());
            if let Some(oldest) = oldest {
                self.by_did.remove(&oldest);
            }
        }
        self.by_did.insert(did, Mark { rev, used: tick });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn did(n: usize) -> Did {
        format!("did:plc:test{n}").parse().unwrap()
    }

    fn tid(s: &str) -> Tid {
        s.parse().unwrap()
    }

    const NOW: &str = "2026-11-29T00:00:00Z";

    fn now() -> OffsetDateTime {
        crate::syntax::parse_datetime(NOW).unwrap()
    }

    #[test]
    fn the_mark_only_rises() {
        let r = Revisions::in_memory();
        assert_eq!(r.floor(&did(1)), None);
        assert!(r.raise(&did(1), &tid("3jzfcijpj2z2b"), now()));
        assert!(!r.raise(&did(1), &tid("3jzfcijpj2z2a"), now()), "lower");
        assert!(!r.raise(&did(1), &tid("3jzfcijpj2z2b"), now()), "equal");
        assert_eq!(r.floor(&did(1)), Some(tid("3jzfcijpj2z2b")));
        assert_eq!(r.floor(&did(2)), None);
    }

    #[test]
    fn a_rev_far_in_the_future_is_not_remembered() {
        let r = Revisions::in_memory();
        // 2222222222222 is the epoch; j… is far in the future.
        assert!(!r.raise(&did(1), &tid("jzzzzzzzzzzzz"), now()));
        assert!(r.is_empty());
    }

    #[test]
    fn the_least_recently_used_signer_is_forgotten_first() {
        let r = Revisions::in_memory();
        for n in 0..MAX_REMEMBERED_DIDS {
            r.raise(&did(n), &tid("3jzfcijpj2z2a"), now());
        }
        r.floor(&did(0)); // used again: kept
        r.raise(&did(MAX_REMEMBERED_DIDS), &tid("3jzfcijpj2z2a"), now());
        assert_eq!(r.len(), MAX_REMEMBERED_DIDS);
        assert!(r.floor(&did(0)).is_some());
        assert!(r.floor(&did(1)).is_none());
    }

    #[test]
    fn marks_survive_a_restart_and_a_bad_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revisions::open(dir.path()).unwrap();
        assert!(r.is_persistent() && r.is_empty());
        r.raise(&did(1), &tid("3jzfcijpj2z2b"), now());
        r.save().unwrap();
        let again = Revisions::open(dir.path()).unwrap();
        assert_eq!(again.floor(&did(1)), Some(tid("3jzfcijpj2z2b")));
        // Two processes sharing the file: each save keeps the other's higher marks.
        again.raise(&did(2), &tid("3jzfcijpj2z2a"), now());
        r.raise(&did(1), &tid("3jzfcijpj2z2c"), now());
        r.save().unwrap();
        again.save().unwrap();
        let merged = Revisions::open(dir.path()).unwrap();
        assert_eq!(merged.floor(&did(1)), Some(tid("3jzfcijpj2z2c")));
        assert_eq!(merged.floor(&did(2)), Some(tid("3jzfcijpj2z2a")));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the state file: {left:?}");
        for bad in [
            "{",
            r#"{"version": 2, "revs": {}}"#,
            r#"{"version": 1, "revs": {"did:plc:x": "not a tid"}}"#,
        ] {
            std::fs::write(dir.path().join(STATE_FILE), bad).unwrap();
            let e = Revisions::open(dir.path()).unwrap_err().to_string();
            assert!(e.contains("not a revisions file"), "{bad}: {e}");
        }
    }
}
