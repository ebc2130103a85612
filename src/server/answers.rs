//! Rendered answers, reused while they stay the answer.
//!
//! Answering a cached key means matching the policy, evaluating the cached facts and
//! serializing about 1.5 KB of verdict JSON — most of the cost of a cached request. So the
//! provider keeps each key's rendered item value, with the policy it was decided under and
//! the instant until which it holds: the earliest expiry of the facts it rests on, or of the
//! verdict itself (a validity window or `maxSignatureAge` boundary; see
//! [`crate::verify::Verifier::verify_cached`]). A reused answer is therefore byte for byte
//! the one a fresh evaluation would give; a policy reload makes every entry stale at once.

use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;

use crate::policy::TrustPolicy;
use crate::verify::{CacheStats, ImageReport, TtlCache};

/// How many keys' answers are kept. Each takes about 2 KB; the hot set of a cluster (the
/// images its workloads run) is far smaller than the fact caches.
pub const CAPACITY: usize = 4096;

/// An item value serialized once, with its metrics label.
#[derive(Debug)]
pub struct Rendered {
    /// The item `value`.
    pub value: Arc<RawValue>,
    /// The metrics outcome label: `verified`, `not_verified` or `pinned`.
    pub label: &'static str,
}

impl Rendered {
    /// A verdict (`/provide`).
    pub fn new(report: &ImageReport) -> Result<Arc<Rendered>, serde_json::Error> {
        let label = if report.verdict.verified {
            "verified"
        } else {
            "not_verified"
        };
        Rendered::of(report, label)
    }

    /// A reference pinned to a digest (`/mutate`).
    pub fn pinned(reference: &str) -> Result<Arc<Rendered>, serde_json::Error> {
        Rendered::of(reference, "pinned")
    }

    fn of(
        value: &(impl serde::Serialize + ?Sized),
        label: &'static str,
    ) -> Result<Arc<Rendered>, serde_json::Error> {
        Ok(Arc::new(Rendered {
            value: Arc::from(serde_json::value::to_raw_value(value)?),
            label,
        }))
    }
}

struct Memo {
    policy: Arc<TrustPolicy>,
    rendered: Arc<Rendered>,
}

/// The rendered answers, by key exactly as Gatekeeper sent it. Entries are shared
/// (`Arc`): a lookup touches one reference count.
#[derive(Debug)]
pub struct Answers {
    memo: TtlCache<String, Arc<Memo>>,
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            memo: TtlCache::new(CAPACITY),
        }
    }
}

impl Answers {
    /// The answer for `key` if it was rendered under `policy` and still holds.
    pub fn get(&self, key: &str, policy: &Arc<TrustPolicy>) -> Option<Arc<Rendered>> {
        let found = self
            .memo
            .peek_if(key, |memo| Arc::ptr_eq(&memo.policy, policy))
            .map(|(memo, _)| Arc::clone(&memo.rendered));
        if found.is_none() {
            self.memo.miss();
        }
        found
    }

    /// Keeps `rendered` as the answer for `key` under `policy` until `until` (not at all
    /// when that has passed: a verdict whose text names the current time).
    pub fn put(
        &self,
        key: &str,
        policy: &Arc<TrustPolicy>,
        rendered: &Arc<Rendered>,
        until: Instant,
    ) {
        if until <= Instant::now() {
            return;
        }
        let memo = Arc::new(Memo {
            policy: Arc::clone(policy),
            rendered: Arc::clone(rendered),
        });
        self.memo.insert(key.to_owned(), memo, until);
    }

    /// Counters for metrics.
    pub fn stats(&self) -> CacheStats {
        self.memo.stats()
    }
}
