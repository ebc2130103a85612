//! Rendered answers, reused while they stay the answer.
//!
//! Answering a cached key means matching the policy, evaluating the cached facts and
//! serializing about 1.5 KB of verdict JSON — most of the cost of a cached request. So the
//! provider keeps each key's rendered item value, with the policy it was decided under and
//! the instant until which it holds: the earliest expiry of the facts it rests on, or of the
//! verdict itself (a validity window or `maxSignatureAge` boundary; see
//! [`crate::verify::Verifier::verify_cached`]). A reused answer is therefore byte for byte
//! the one a fresh evaluation would give; a policy reload makes every entry stale at once.
//!
//! In front of the shared answers, each worker thread keeps its own copies of the answers
//! it served lately ([`FRONT`] of them), valid under the same two conditions. A shared
//! answer's reference count and the shared cache's lock are cache lines that every request
//! writes, moving them between cores; a thread's front is touched by that thread only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use serde_json::value::RawValue;

use crate::policy::TrustPolicy;
use crate::verify::striped::Striped;
use crate::verify::{CacheStats, ImageReport, TtlCache};

/// How many keys' answers are kept. Each takes about 2 KB; the hot set of a cluster (the
/// images its workloads run) is far smaller than the fact caches.
pub const CAPACITY: usize = 4096;

/// How many answers each thread keeps in its front (emptied when full: the hot ones come
/// back at their next request).
pub const FRONT: usize = 256;

/// An item value serialized once, with its metrics label.
#[derive(Debug)]
pub struct Rendered {
    /// The item `value`.
    pub value: Arc<RawValue>,
    /// The metrics outcome label: `verified`, `not_verified` or `pinned`.
    pub label: &'static str,
    /// The verdict says `deny: true` (never for a pinned reference).
    pub deny: bool,
}

impl Rendered {
    /// A verdict (`/provide`).
    pub fn new(report: &ImageReport) -> Result<Arc<Rendered>, serde_json::Error> {
        let label = if report.verdict.verified {
            "verified"
        } else {
            "not_verified"
        };
        Rendered::of(report, label, report.verdict.deny)
    }

    /// A reference pinned to a digest (`/mutate`).
    pub fn pinned(reference: &str) -> Result<Arc<Rendered>, serde_json::Error> {
        Rendered::of(reference, "pinned", false)
    }

    fn of(
        value: &(impl serde::Serialize + ?Sized),
        label: &'static str,
        deny: bool,
    ) -> Result<Arc<Rendered>, serde_json::Error> {
        Ok(Arc::new(Rendered {
            value: Arc::from(serde_json::value::to_raw_value(value)?),
            label,
            deny,
        }))
    }
}

/// The policy an answer was decided under, held weakly: an old policy's rules are freed
/// at the reload that replaces it, while its allocation stays reserved, so no later policy
/// can share its address and be mistaken for it.
struct Decided(Weak<TrustPolicy>);

impl Decided {
    fn under(policy: &Arc<TrustPolicy>) -> Self {
        Decided(Arc::downgrade(policy))
    }

    fn is(&self, policy: &Arc<TrustPolicy>) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(policy))
    }
}

struct Memo {
    policy: Decided,
    rendered: Arc<Rendered>,
}

/// The rendered answers, by key exactly as Gatekeeper sent it. Entries are shared
/// (`Arc`); each thread serves from its own front first.
#[derive(Debug)]
pub struct Answers {
    /// Tells apart the fronts of different `Answers` on one thread.
    id: u64,
    memo: TtlCache<String, Arc<Memo>>,
    front_hits: Striped,
}

impl Default for Answers {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Answers {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            memo: TtlCache::new(CAPACITY),
            front_hits: Striped::default(),
        }
    }
}

/// A thread's own copy of an answer.
struct Kept {
    policy: Decided,
    until: Instant,
    rendered: Arc<Rendered>,
}

/// A thread's front: the [`Answers`] it belongs to, and its copies.
#[derive(Default)]
struct Front {
    owner: u64,
    kept: HashMap<String, Kept>,
}

thread_local! {
    static FRONTS: RefCell<Front> = RefCell::default();
}

impl Answers {
    /// The answer for `key` if it was rendered under `policy` and still holds.
    pub fn get(&self, key: &str, policy: &Arc<TrustPolicy>) -> Option<Arc<Rendered>> {
        let now = Instant::now();
        let front = FRONTS.with_borrow_mut(|front| {
            if front.owner != self.id {
                front.kept.clear();
                front.owner = self.id;
            }
            match front.kept.get(key) {
                Some(kept) if kept.until > now && kept.policy.is(policy) => {
                    Some(Arc::clone(&kept.rendered))
                }
                Some(_) => {
                    front.kept.remove(key);
                    None
                }
                None => None,
            }
        });
        if front.is_some() {
            self.front_hits.add(1);
            return front;
        }
        let Some((memo, until)) = self.memo.peek_if(key, |memo| memo.policy.is(policy)) else {
            self.memo.miss();
            return None;
        };
        // This thread's own copy, value bytes included: no reference count shared.
        let value: Box<RawValue> = (*memo.rendered.value).to_owned();
        let rendered = Arc::new(Rendered {
            value: Arc::from(value),
            label: memo.rendered.label,
            deny: memo.rendered.deny,
        });
        FRONTS.with_borrow_mut(|front| {
            if front.kept.len() >= FRONT {
                front.kept.clear();
            }
            let kept = Kept {
                policy: Decided::under(policy),
                until,
                rendered: Arc::clone(&rendered),
            };
            front.kept.insert(key.to_owned(), kept);
        });
        Some(rendered)
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
            policy: Decided::under(policy),
            rendered: Arc::clone(rendered),
        });
        self.memo.insert(key.to_owned(), memo, until);
    }

    /// Counters for metrics.
    pub fn stats(&self) -> CacheStats {
        let shared = self.memo.stats();
        CacheStats {
            hits: shared.hits + self.front_hits.get(),
            ..shared
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> Arc<TrustPolicy> {
        Arc::new(TrustPolicy::from_yaml(crate::cli::DEFAULT_POLICY).unwrap())
    }

    fn rendered(text: &str) -> Arc<Rendered> {
        Rendered::pinned(text).unwrap()
    }

    #[test]
    fn fronts_hold_private_copies_under_the_shared_rules() {
        let answers = Answers::default();
        let (p, other) = (policy(), policy());
        let later = Instant::now() + Duration::from_secs(60);
        answers.put("k", &p, &rendered("a@sha256:1"), later);

        // First ask on this thread: from the shared answers, copied into the front; the
        // second: the same copy from the front. Both count as hits.
        let first = answers.get("k", &p).unwrap();
        let second = answers.get("k", &p).unwrap();
        assert_eq!(first.value.get(), "\"a@sha256:1\"");
        assert!(
            Arc::ptr_eq(&first, &second),
            "second ask served from the front"
        );
        assert_eq!(answers.stats().hits, 2);

        // Another thread gets its own copy: no reference count shared between threads.
        let theirs = std::thread::scope(|s| s.spawn(|| answers.get("k", &p).unwrap()).join());
        let theirs = theirs.unwrap();
        assert_eq!(theirs.value.get(), first.value.get());
        assert!(
            !Arc::ptr_eq(&theirs.value, &first.value),
            "a copy, not a share"
        );

        // Another policy: no answer, from the front or behind it.
        assert!(answers.get("k", &other).is_none());
        assert!(
            answers.get("k", &p).is_some(),
            "the shared answer still holds"
        );

        // An answer past its time is gone from the front too.
        let until = Instant::now() + Duration::from_millis(200);
        answers.put("soon", &p, &rendered("b@sha256:2"), until);
        let got = answers.get("soon", &p);
        if Instant::now() < until {
            assert!(got.is_some(), "still within its time");
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(answers.get("soon", &p).is_none());

        // Answers do not keep a policy alive, and a policy allocated after an old one is
        // freed is never taken for it.
        assert_eq!(Arc::strong_count(&p), 1, "held weakly only");
        let old = policy();
        answers.put("x", &old, &rendered("c@sha256:3"), later);
        assert!(answers.get("x", &old).is_some());
        drop(old);
        for _ in 0..20 {
            assert!(answers.get("x", &policy()).is_none());
        }

        // A full front is emptied, and its keys come back from the shared answers.
        for i in 0..=FRONT {
            answers.put(
                &format!("k{i}"),
                &p,
                &rendered(&format!("k@sha256:{i}")),
                later,
            );
            assert!(answers.get(&format!("k{i}"), &p).is_some());
        }
        let hits = answers.stats().hits;
        let again = answers.get("k0", &p).unwrap();
        assert_eq!(again.value.get(), "\"k@sha256:0\"");
        assert_eq!(answers.stats().hits, hits + 1);
        FRONTS.with_borrow(|front| assert!(front.kept.len() <= FRONT));

        // A second `Answers` on the same thread does not see the first one's front.
        let fresh = Answers::default();
        assert!(fresh.get("k", &p).is_none());
        assert!(answers.get("k", &p).is_some());
    }
}
