//! Gatekeeper's external-data protocol (`DESIGN.md` §2): `ProviderRequest` in,
//! `ProviderResponse` out, and the mapping of every outcome to the place Gatekeeper treats
//! correctly.
//!
//! - A decided verdict → `items[].value` (cached by Gatekeeper for its response-cache TTL).
//! - A permanent failure (bad reference, no such image) → `items[].error` with a stable
//!   prefix (`invalid_reference:`, `not_found:`, `upstream_invalid:`, `upstream_refused:`).
//! - A transient failure (upstream down, rate limited, deadline) → **no item**; the key is
//!   named in `systemError` (`upstream_unavailable:`, `rate_limited:`,
//!   `deadline_exceeded:`), because Gatekeeper caches every returned item, errors included,
//!   and the next admission must ask again.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use super::answers::{Answers, Rendered};
use crate::policy::TrustPolicy;
use crate::syntax::ImageRef;
use crate::syntax::text::inert;
use crate::verify::{Verifier, VerifyError};

/// Longest item `error` or `systemError` entry for one key, in bytes.
pub const MAX_ERROR_TEXT: usize = 1024;

/// The only `apiVersion` accepted and answered.
pub const API_VERSION: &str = "externaldata.gatekeeper.sh/v1beta1";

/// A Gatekeeper `ProviderRequest` (its strings borrowed from the body where they can be).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRequest<'a> {
    /// Must be [`API_VERSION`].
    #[serde(borrow)]
    pub api_version: Cow<'a, str>,
    /// Must be `ProviderRequest`.
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    /// The keys.
    pub request: RequestBody,
}

/// `request` of a [`ProviderRequest`].
#[derive(Debug, Deserialize)]
pub struct RequestBody {
    /// Image references (validation) or image strings (mutation).
    pub keys: Vec<String>,
}

/// A Gatekeeper `ProviderResponse`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderResponse {
    /// Always [`API_VERSION`].
    pub api_version: &'static str,
    /// Always `ProviderResponse`.
    pub kind: &'static str,
    /// The answer.
    pub response: ResponseBody,
}

/// `response` of a [`ProviderResponse`].
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseBody {
    /// Always true: the same key gives the same answer until the facts change.
    pub idempotent: bool,
    /// One per answered key.
    pub items: Vec<Item>,
    /// Transient failures and request-level errors; empty when none.
    pub system_error: String,
}

/// One answered key.
#[derive(Debug, Serialize)]
pub struct Item {
    /// The key exactly as sent.
    pub key: String,
    /// The verdict (validation) or pinned reference (mutation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Arc<RawValue>>,
    /// A permanent failure, with a stable prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProviderResponse {
    /// A response holding `items` and `system_error`.
    pub fn new(items: Vec<Item>, system_errors: &[String]) -> Self {
        ProviderResponse {
            api_version: API_VERSION,
            kind: "ProviderResponse",
            response: ResponseBody {
                idempotent: true,
                items,
                system_error: system_errors.join("; "),
            },
        }
    }

    /// A response with no items and one request-level error.
    pub fn system_error(message: String) -> Self {
        Self::new(Vec::new(), &[message])
    }
}

/// Why a request body is refused (4xx).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Not JSON of the ProviderRequest shape.
    #[error("bad_request: body is not a ProviderRequest: {0}")]
    Malformed(String),
    /// Wrong apiVersion or kind.
    #[error(
        "bad_request: expected apiVersion {API_VERSION:?} and kind \"ProviderRequest\", got {0:?} and {1:?}"
    )]
    WrongType(String, String),
    /// More keys than allowed.
    #[error("too_many_keys: {found} keys, the limit is {limit} (--max-keys)")]
    TooManyKeys {
        /// Keys sent.
        found: usize,
        /// The limit.
        limit: usize,
    },
}

/// Parses and checks a request body; returns the distinct keys in first-seen order.
pub fn parse_request(body: &[u8], max_keys: usize) -> Result<Vec<String>, RequestError> {
    let request: ProviderRequest =
        serde_json::from_slice(body).map_err(|e| RequestError::Malformed(e.to_string()))?;
    if request.api_version != API_VERSION || request.kind != "ProviderRequest" {
        return Err(RequestError::WrongType(
            request.api_version.into_owned(),
            request.kind.into_owned(),
        ));
    }
    let keys = request.request.keys;
    if keys.len() > max_keys {
        return Err(RequestError::TooManyKeys {
            found: keys.len(),
            limit: max_keys,
        });
    }
    if keys.len() < 2 {
        return Ok(keys);
    }
    let mut seen = HashSet::with_capacity(keys.len());
    let first: Vec<bool> = keys.iter().map(|k| seen.insert(k.as_str())).collect();
    drop(seen);
    Ok(keys
        .into_iter()
        .zip(first)
        .filter_map(|(k, first)| first.then_some(k))
        .collect())
}

/// What one key ended in: an answer (a verdict for `/provide`, a pinned reference for
/// `/mutate`), or a failure placed where Gatekeeper treats it right.
#[derive(Debug)]
pub enum Outcome {
    /// The answer: an item `value`.
    Answered(Arc<Rendered>),
    /// A permanent failure: an item `error`.
    Permanent(String),
    /// A transient failure: a `systemError` entry, no item.
    Transient(String),
}

impl Outcome {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Answered(answer) => answer.label,
            Outcome::Permanent(_) => "error",
            Outcome::Transient(t) if t.starts_with("deadline_exceeded") => "deadline_exceeded",
            Outcome::Transient(_) => "transient",
        }
    }

    /// An answer that lets the image in: a verdict without `deny`, or a pinned reference.
    /// A request whose keys are all admitted is logged at DEBUG, any other at INFO.
    pub fn is_admitted(&self) -> bool {
        matches!(self, Outcome::Answered(answer) if !answer.deny)
    }

    /// An answer, or the internal error that kept it from being serialized.
    fn rendered(key: &str, rendered: Result<Arc<Rendered>, serde_json::Error>) -> Self {
        match rendered {
            Ok(rendered) => Outcome::Answered(rendered),
            Err(e) => Outcome::internal(key, e),
        }
    }

    /// Where a failure to evaluate `key` goes: `systemError` when asking again may
    /// succeed, an item `error` when not.
    fn failed(key: &str, e: &VerifyError) -> Self {
        if e.is_transient() {
            Outcome::Transient(inert(&format!("{}: {key}: {e}", e.code()), MAX_ERROR_TEXT))
        } else {
            Outcome::Permanent(inert(&format!("{}: {e}", e.code()), MAX_ERROR_TEXT))
        }
    }

    fn internal(key: &str, e: impl std::fmt::Display) -> Self {
        Outcome::Transient(format!("internal_error: {key}: {e}"))
    }
}

/// Parses a key as an image reference.
fn parse_key(key: &str) -> Result<ImageRef, Outcome> {
    key.parse::<ImageRef>()
        .map_err(|e| Outcome::Permanent(format!("invalid_reference: {e}")))
}

/// A key whose answer is known at once, or the task computing it.
type Pending = Result<tokio::task::JoinHandle<Outcome>, Outcome>;

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
            if let Some((report, until)) = self.verifier.verify_cached(&image, policy, now) {
                let outcome = Outcome::rendered(key, Rendered::new(&report));
                if let Outcome::Answered(rendered) = &outcome {
                    self.answers.put(key, policy, rendered, until);
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
                    Err(_) => Outcome::Transient(format!(
                        "deadline_exceeded: {key}: not finished within {}ms; the work continues, ask again",
                        budget.as_millis()
                    )),
                },
            };
            out.push((key, outcome));
        }
        out
    }
}

/// Builds the response: answers and permanent failures become items, transient failures
/// go to `systemError` only.
pub fn respond(outcomes: Vec<(String, Outcome)>) -> ProviderResponse {
    let mut items = Vec::with_capacity(outcomes.len());
    let mut system = Vec::new();
    for (key, outcome) in outcomes {
        match outcome {
            Outcome::Answered(answer) => items.push(Item {
                key,
                value: Some(Arc::clone(&answer.value)),
                error: None,
            }),
            Outcome::Permanent(error) => items.push(Item {
                key,
                value: None,
                error: Some(error),
            }),
            Outcome::Transient(message) => system.push(message),
        }
    }
    ProviderResponse::new(items, &system)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn requests_are_checked_and_deduplicated() {
        let ok = body(
            serde_json::json!({"apiVersion": API_VERSION, "kind": "ProviderRequest",
            "request": {"keys": ["b", "a", "b", "\u{e9}"]}}),
        );
        assert_eq!(parse_request(&ok, 10).unwrap(), ["b", "a", "\u{e9}"]);
        assert!(matches!(
            parse_request(&ok, 3),
            Err(RequestError::TooManyKeys { found: 4, limit: 3 })
        ));
        assert!(matches!(
            parse_request(b"{", 10),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"[]", 10),
            Err(RequestError::Malformed(_))
        ));
        let wrong = body(
            serde_json::json!({"apiVersion": "externaldata.gatekeeper.sh/v1alpha1",
            "kind": "ProviderRequest", "request": {"keys": []}}),
        );
        assert!(matches!(
            parse_request(&wrong, 10),
            Err(RequestError::WrongType(..))
        ));
        let wrong = body(
            serde_json::json!({"apiVersion": API_VERSION, "kind": "Pod", "request": {"keys": []}}),
        );
        assert!(matches!(
            parse_request(&wrong, 10),
            Err(RequestError::WrongType(..))
        ));
    }

    #[test]
    fn transient_outcomes_never_become_items() {
        let r = respond(vec![
            ("a".into(), Outcome::Permanent("not_found: x".into())),
            (
                "b".into(),
                Outcome::Transient("upstream_unavailable: b: down".into()),
            ),
            (
                "c".into(),
                Outcome::Transient("deadline_exceeded: c: slow".into()),
            ),
            (
                "d".into(),
                Outcome::Answered(Rendered::pinned("r@sha256:x").unwrap()),
            ),
        ]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["apiVersion"], API_VERSION);
        assert_eq!(json["kind"], "ProviderResponse");
        assert_eq!(json["response"]["idempotent"], true);
        assert_eq!(
            json["response"]["items"],
            serde_json::json!([{"key": "a", "error": "not_found: x"}, {"key": "d", "value": "r@sha256:x"}])
        );
        assert_eq!(
            json["response"]["systemError"],
            "upstream_unavailable: b: down; deadline_exceeded: c: slow"
        );
    }
}
