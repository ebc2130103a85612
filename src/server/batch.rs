//! The batch scheduler: one request's keys started at once on the engine runtime, under
//! the process-wide bound on verifications and the request's own share of it, and
//! gathered until the request's budget is spent. What is unfinished then is answered
//! `deadline_exceeded` while its work goes on and fills the caches for Gatekeeper's retry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use super::answers::{Answers, Rendered};
use super::provider::Outcome;
use crate::policy::TrustPolicy;
use crate::syntax::ImageRef;
use crate::verify::{Verifier, VerifyError};

/// Everything a batch needs.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The engine.
    pub verifier: Arc<Verifier>,
    /// Rendered answers of cached keys.
    pub answers: Arc<Answers>,
    /// The runtime verifications run on (they outlive the request that started them).
    pub runtime: tokio::runtime::Handle,
    /// Verifications running at once, across all requests.
    pub concurrency: Arc<Semaphore>,
    /// Of those, how many one request's keys may hold (their work past the request's
    /// budget included), so that one request's keys on hanging upstreams cannot take every
    /// permit from the next request.
    pub per_request: usize,
    /// The request budget.
    pub budget: Duration,
    /// The most one verification may take, in the background included; past it the key is
    /// answered `deadline_exceeded` and its work is dropped.
    pub verify_timeout: Duration,
    /// Observes the time of each evaluation without a kept answer.
    pub verification: Histogram,
}

/// A key whose answer is known at once, or the task computing it.
type Pending = Result<tokio::task::JoinHandle<Outcome>, Outcome>;

impl Batch {
    /// Verifies `keys` under `policy` concurrently, waiting at most the budget. Keys not
    /// finished by then are reported as `deadline_exceeded` while their verification goes
    /// on and fills the caches for Gatekeeper's retry.
    pub async fn verify(
        &self,
        keys: Vec<String>,
        policy: &Arc<TrustPolicy>,
    ) -> Vec<(String, Outcome)> {
        // Read the clock only when some key needs evaluating.
        let now = std::cell::OnceCell::new();
        let share = self.share();
        self.gather(keys, self.budget, |key| {
            // An answer kept from earlier that still holds (counted as a cache hit, not as a
            // verification), or everything cached: answer now, without a task.
            if let Some(rendered) = self.answers.get(key, policy) {
                return Err(Outcome::Answered(rendered));
            }
            let started = Instant::now();
            let now = *now.get_or_init(OffsetDateTime::now_utc);
            let image = parse_key(key)?;
            let since = self.answers.epoch();
            if let Some((report, until)) = self.verifier.verify_cached(&image, policy, now) {
                let outcome = Outcome::rendered(key, Rendered::new(&report));
                if let Outcome::Answered(rendered) = &outcome {
                    self.answers.put(key, policy, rendered, until, since);
                }
                self.verification.observe(started.elapsed().as_secs_f64());
                return Err(outcome);
            }
            let verifier = Arc::clone(&self.verifier);
            let policy = Arc::clone(policy);
            let verification = self.verification.clone();
            let owned = key.to_owned();
            Ok(self.spawn_bounded(key, &share, async move {
                let started = Instant::now();
                let result = verifier.verify(&image, &policy, now).await;
                verification.observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(report) => Outcome::rendered(&owned, Rendered::new(&report)),
                    Err(e) => Outcome::failed(&owned, &e),
                }
            }))
        })
        .await
    }

    /// Pins `keys` to digests for Gatekeeper's `Assign` mutator: each key's value is the
    /// normalized reference with the digest the registry serves for it now
    /// (`nginx:1.25` → `docker.io/library/nginx@sha256:…`); a key that already carries a
    /// digest comes back unchanged. Tag → digest only (cache, or one registry round trip),
    /// within `budget`; a registry failure is never answered with a guessed digest.
    pub async fn pin(&self, keys: Vec<String>, budget: Duration) -> Vec<(String, Outcome)> {
        let share = self.share();
        self.gather(keys, budget, |key| {
            let image = parse_key(key)?;
            if image.digest().is_some() {
                return Err(Outcome::rendered(key, Rendered::pinned(key)));
            }
            let verifier = Arc::clone(&self.verifier);
            let owned = key.to_owned();
            Ok(self.spawn_bounded(key, &share, async move {
                match verifier.resolve(&image).await {
                    Ok(fact) => {
                        let pinned = image.with_digest(fact.digest).to_string();
                        Outcome::rendered(&owned, Rendered::pinned(&pinned))
                    }
                    Err(e) => Outcome::failed(&owned, &e),
                }
            }))
        })
        .await
    }

    /// The permits one request's keys share.
    fn share(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.per_request.max(1)))
    }

    /// Runs `work` on the engine runtime under the request's share of the concurrency
    /// bound, the bound itself, and the verification timeout.
    fn spawn_bounded(
        &self,
        key: &str,
        share: &Arc<Semaphore>,
        work: impl Future<Output = Outcome> + Send + 'static,
    ) -> tokio::task::JoinHandle<Outcome> {
        let permits = Arc::clone(&self.concurrency);
        let share = Arc::clone(share);
        let limit = self.verify_timeout;
        let key = key.to_owned();
        self.runtime.spawn(async move {
            tokio::time::timeout(limit, async move {
                let _mine = share.acquire_owned().await;
                let _permit = permits.acquire_owned().await;
                work.await
            })
            .await
            .unwrap_or_else(|_| Outcome::failed(&key, &VerifyError::Deadline(limit)))
        })
    }

    /// Starts each key's work with `start`, and waits for all of it until `budget` is
    /// spent; what is unfinished then is `deadline_exceeded` (the work goes on).
    async fn gather(
        &self,
        keys: Vec<String>,
        budget: Duration,
        start: impl Fn(&str) -> Pending,
    ) -> Vec<(String, Outcome)> {
        let deadline = tokio::time::Instant::now() + budget;
        let pending: Vec<(String, Pending)> = keys
            .into_iter()
            .map(|key| {
                let started = start(&key);
                (key, started)
            })
            .collect();
        let mut out = Vec::with_capacity(pending.len());
        for (key, task) in pending {
            let outcome = match task {
                Err(done) => done,
                Ok(mut task) => match tokio::time::timeout_at(deadline, &mut task).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(join)) => Outcome::internal(&key, join),
                    Err(_) => Outcome::transient(
                        "deadline_exceeded",
                        &key,
                        format_args!(
                            "not finished within {}ms; the work continues, ask again",
                            budget.as_millis()
                        ),
                    ),
                },
            };
            out.push((key, outcome));
        }
        out
    }
}

/// Parses a key as an image reference.
fn parse_key(key: &str) -> Result<ImageRef, Outcome> {
    key.parse::<ImageRef>()
        .map_err(|e| Outcome::permanent("invalid_reference", e))
}
