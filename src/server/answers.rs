//! Rendered answers, reused while they stay the answer.
//!
//! Answering a cached key means matching the policy, evaluating the cached facts and
//! serializing about 1.5 KB of verdict JSON — most of the cost of a cached request. So the
//! provider keeps each key's rendered item value, with the policy it was decided under and
//! the instant until which it holds: the earliest expiry of the facts it rests on, or of the
//! verdict itself (a validity window or `maxSignatureAge` boundary; see
//! [`crate::verify::Verifier::verify_cached`]). A reused answer is therefore byte for byte
//! the one a fresh evaluation would give; a policy reload makes every entry stale at once,
//! and so does any revocation from the repo event stream ([`Revocations`]): an answer is a
//! rendering of many facts, and the facts beneath it are evicted one by one, so the next
//! request renders again from the fact caches (no network unless the fact went).

use std::sync::{Arc, Weak};
use std::time::Instant;

use serde_json::value::RawValue;

use crate::policy::TrustPolicy;
use crate::verify::{CacheStats, ImageReport, Revocations, TtlCache};

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
    /// The verdict says `deny: true` (never for a pinned reference).
    pub deny: bool,
    /// The verdict's reason, when it gives one (what the admission webhook says).
    pub reason: Option<String>,
    /// Not verified under a policy that audits: admitted with a warning by the webhook.
    pub audit: bool,
}

impl Rendered {
    /// A verdict (`/provide`).
    pub fn new(report: &ImageReport) -> Result<Arc<Rendered>, serde_json::Error> {
        let label = if report.verdict.verified {
            "verified"
        } else {
            "not_verified"
        };
        let v = &report.verdict;
        Rendered::of(
            report,
            label,
            Said {
                deny: v.deny,
                reason: v.reason.clone(),
                audit: !v.verified && v.action == crate::policy::VerdictAction::Audit,
            },
        )
    }

    /// A reference pinned to a digest (`/mutate`).
    pub fn pinned(reference: &str) -> Result<Arc<Rendered>, serde_json::Error> {
        Rendered::of(reference, "pinned", Said::default())
    }

    fn of(
        value: &(impl serde::Serialize + ?Sized),
        label: &'static str,
        said: Said,
    ) -> Result<Arc<Rendered>, serde_json::Error> {
        Ok(Arc::new(Rendered {
            value: Arc::from(serde_json::value::to_raw_value(value)?),
            label,
            deny: said.deny,
            reason: said.reason,
            audit: said.audit,
        }))
    }
}

/// What a verdict says beyond its JSON, for the faces that act on it.
#[derive(Default)]
struct Said {
    deny: bool,
    reason: Option<String>,
    audit: bool,
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
    /// The revocation epoch read before the answer was evaluated.
    since: u64,
    rendered: Arc<Rendered>,
}

/// The rendered answers, by key exactly as Gatekeeper sent it.
#[derive(Debug)]
pub struct Answers {
    memo: TtlCache<String, Arc<Memo>>,
    revocations: Arc<Revocations>,
}

impl Default for Answers {
    fn default() -> Self {
        Answers::new(Arc::new(Revocations::default()))
    }
}

impl Answers {
    /// Answers dropped by any mark in `revocations` (the engine's).
    pub fn new(revocations: Arc<Revocations>) -> Self {
        Answers {
            memo: TtlCache::new(CAPACITY),
            revocations,
        }
    }

    /// The revocation epoch now: read it before evaluating an answer to keep.
    pub fn epoch(&self) -> u64 {
        self.revocations.epoch()
    }

    /// The answer for `key` if it was rendered under `policy` and still holds.
    pub fn get(&self, key: &str, policy: &Arc<TrustPolicy>) -> Option<Arc<Rendered>> {
        let holds =
            |memo: &Arc<Memo>| memo.policy.is(policy) && !self.revocations.any_since(memo.since);
        match self.memo.peek_if(key, holds) {
            Some((memo, _)) => Some(Arc::clone(&memo.rendered)),
            None => {
                self.memo.miss();
                None
            }
        }
    }

    /// Keeps `rendered` as the answer for `key` under `policy` until `until` (not at all
    /// when that has passed: a verdict whose text names the current time), or until a
    /// revocation made after epoch `since` ([`Answers::epoch`], read before evaluating).
    pub fn put(
        &self,
        key: &str,
        policy: &Arc<TrustPolicy>,
        rendered: &Arc<Rendered>,
        until: Instant,
        since: u64,
    ) {
        if until <= Instant::now() {
            return;
        }
        let memo = Arc::new(Memo {
            policy: Decided::under(policy),
            since,
            rendered: Arc::clone(rendered),
        });
        self.memo.insert(key.to_owned(), memo, until);
    }

    /// Counters for metrics.
    pub fn stats(&self) -> CacheStats {
        self.memo.stats()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> Arc<TrustPolicy> {
        Arc::new(TrustPolicy::builtin().unwrap())
    }

    fn rendered(text: &str) -> Arc<Rendered> {
        Rendered::pinned(text).unwrap()
    }

    #[test]
    fn answers_hold_under_their_policy_until_their_time() {
        let answers = Answers::default();
        let (p, other) = (policy(), policy());
        let later = Instant::now() + Duration::from_secs(60);
        answers.put("k", &p, &rendered("a@sha256:1"), later, 0);

        // Asked twice: the same shared answer, two hits.
        let first = answers.get("k", &p).unwrap();
        let second = answers.get("k", &p).unwrap();
        assert_eq!(first.value.get(), "\"a@sha256:1\"");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(answers.stats().hits, 2);

        // Another policy: no answer (a miss), and the answer under the first still holds.
        assert!(answers.get("k", &other).is_none());
        assert_eq!(answers.stats().misses, 1);
        assert!(answers.get("k", &p).is_some());

        // An answer whose time has passed is not kept, and one that passes goes.
        answers.put("past", &p, &rendered("p@sha256:0"), Instant::now(), 0);
        assert!(answers.get("past", &p).is_none());
        let until = Instant::now() + Duration::from_millis(30);
        answers.put("soon", &p, &rendered("b@sha256:2"), until, 0);
        let got = answers.get("soon", &p);
        if Instant::now() < until {
            assert!(got.is_some(), "still within its time");
        }
        // Wait for the clock to pass `until`: no fixed guess.
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        assert!(answers.get("soon", &p).is_none());

        // Answers do not keep a policy alive, and a policy allocated after an old one is
        // freed is never taken for it.
        assert_eq!(Arc::strong_count(&p), 1, "held weakly only");
        let old = policy();
        answers.put("x", &old, &rendered("c@sha256:3"), later, 0);
        assert!(answers.get("x", &old).is_some());
        drop(old);
        for _ in 0..20 {
            assert!(answers.get("x", &policy()).is_none());
        }

        // A revocation after the answer was evaluated drops it; one before does not.
        let revocations = Arc::new(Revocations::default());
        let answers = Answers::new(Arc::clone(&revocations));
        let before = answers.epoch();
        revocations.revoke_record(
            &"did:plc:x".parse().unwrap(),
            "at://did:plc:x/io.atcr.manifest/1",
        );
        answers.put("old", &p, &rendered("d@sha256:4"), later, before);
        answers.put("new", &p, &rendered("e@sha256:5"), later, answers.epoch());
        assert!(
            answers.get("old", &p).is_none(),
            "evaluated before the mark"
        );
        assert!(answers.get("new", &p).is_some(), "evaluated after it");
    }
}
