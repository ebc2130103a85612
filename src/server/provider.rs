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

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::answers::Rendered;
use crate::syntax::text::inert;
use crate::verify::{Failure, VerifyError};

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

/// Why a whole request is refused: the HTTP face's one error type. Each is answered with
/// its 4xx status and a JSON `ProviderResponse` whose `systemError` is `<code>: <message>`
/// (Gatekeeper reads the body whatever the status), through actix's [`ResponseError`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The body could not be read (the connection failed mid-body).
    #[error("bad_request: reading the body: {0}")]
    BodyRead(String),
    /// Not JSON of the ProviderRequest shape.
    #[error("bad_request: body is not a ProviderRequest: {0}")]
    Malformed(String),
    /// Anything but POST on a provider path.
    #[error("method_not_allowed: {0} takes POST")]
    MethodNotAllowed(String),
    /// A path that is neither endpoint.
    #[error("not_found: no such endpoint")]
    NotFound,
    /// Over `--inbound-rate`.
    #[error("rate_limited: inbound request rate over --inbound-rate; ask again")]
    RateLimited,
    /// A body over `--max-body`.
    #[error("request_too_large: body is over {0} bytes")]
    TooLarge(usize),
    /// More keys than allowed.
    #[error("too_many_keys: {found} keys, the limit is {limit} (--max-keys)")]
    TooManyKeys {
        /// Keys sent.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Wrong apiVersion or kind.
    #[error(
        "bad_request: expected apiVersion {API_VERSION:?} and kind \"ProviderRequest\", got {0:?} and {1:?}"
    )]
    WrongType(String, String),
    /// Not JSON of the AdmissionReview shape (`/validate`).
    #[error("bad_request: body is not an AdmissionReview: {0}")]
    MalformedReview(String),
    /// An AdmissionReview of another apiVersion, or another kind (`/validate`).
    #[error(
        "bad_request: expected apiVersion \"admission.k8s.io/v1\" and kind \"AdmissionReview\", got {0:?} and {1:?}"
    )]
    NotAdmissionReview(String, String),
    /// `/verify` without an `image` query parameter, or with a malformed query.
    #[error("bad_request: {0}")]
    BadQuery(String),
}

impl ResponseError for RequestError {
    fn status_code(&self) -> StatusCode {
        match self {
            RequestError::BodyRead(_)
            | RequestError::Malformed(_)
            | RequestError::WrongType(..)
            | RequestError::MalformedReview(_)
            | RequestError::NotAdmissionReview(..)
            | RequestError::BadQuery(_) => StatusCode::BAD_REQUEST,
            RequestError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::NotFound => StatusCode::NOT_FOUND,
            RequestError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            RequestError::TooLarge(_) | RequestError::TooManyKeys { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let text = inert(&self.to_string(), MAX_ERROR_TEXT);
        HttpResponse::build(self.status_code()).json(ProviderResponse::system_error(text))
    }
}

impl RequestError {
    /// The stable code: the text before the first `: ` of the message.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::MethodNotAllowed(_) => "method_not_allowed",
            RequestError::NotFound => "not_found",
            RequestError::RateLimited => "rate_limited",
            RequestError::TooLarge(_) => "request_too_large",
            RequestError::TooManyKeys { .. } => "too_many_keys",
            _ => "bad_request",
        }
    }

    /// The answer of the faces that are not Gatekeeper's (`/validate`, `/verify`): its
    /// status and `{"error": {"code", "message", "transient"}}`; `transient` is true when
    /// asking again may succeed (the inbound rate limit).
    pub fn error_json(&self) -> HttpResponse {
        let text = self.to_string();
        let message = text.split_once(": ").map_or(text.as_str(), |(_, m)| m);
        HttpResponse::build(self.status_code()).json(ErrorBody::new(
            self.code(),
            inert(message, MAX_ERROR_TEXT),
            matches!(self, RequestError::RateLimited),
        ))
    }
}

/// `{"error": {"code", "message", "transient"}}`: a failure as `/verify` and `/validate`
/// answer it (the shape the CLI prints too).
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The failure.
    pub error: Failure,
}

impl ErrorBody {
    /// The body for `code` and `message`.
    pub fn new(code: &'static str, message: String, transient: bool) -> Self {
        ErrorBody {
            error: Failure::new(code, message, transient),
        }
    }
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
/// `/mutate`), or a failure placed where Gatekeeper treats it right. A failure carries its
/// stable code (`not_found`, `deadline_exceeded`, …) apart from its message; the text
/// Gatekeeper sees is `<code>: <message>`.
#[derive(Debug)]
pub enum Outcome {
    /// The answer: an item `value`.
    Answered(Arc<Rendered>),
    /// A permanent failure: an item `error`.
    Permanent {
        /// The stable code.
        code: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A transient failure: a `systemError` entry (naming the key), no item.
    Transient {
        /// The stable code.
        code: &'static str,
        /// The key and what went wrong.
        message: String,
    },
}

impl Outcome {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Answered(answer) => answer.label,
            Outcome::Permanent { .. } => "error",
            Outcome::Transient {
                code: "deadline_exceeded",
                ..
            } => "deadline_exceeded",
            Outcome::Transient { .. } => "transient",
        }
    }

    /// A permanent failure of a key.
    pub(super) fn permanent(code: &'static str, message: impl std::fmt::Display) -> Self {
        Outcome::Permanent {
            code,
            message: inert(&message.to_string(), MAX_ERROR_TEXT),
        }
    }

    /// A transient failure of `key`.
    pub(super) fn transient(code: &'static str, key: &str, why: impl std::fmt::Display) -> Self {
        Outcome::Transient {
            code,
            message: inert(&format!("{key}: {why}"), MAX_ERROR_TEXT),
        }
    }

    /// An answer that lets the image in: a verdict without `deny`, or a pinned reference.
    /// A request whose keys are all admitted is logged at DEBUG, any other at INFO.
    pub fn is_admitted(&self) -> bool {
        matches!(self, Outcome::Answered(answer) if !answer.deny)
    }

    /// An answer, or the internal error that kept it from being serialized.
    pub(super) fn rendered(key: &str, rendered: Result<Arc<Rendered>, serde_json::Error>) -> Self {
        match rendered {
            Ok(rendered) => Outcome::Answered(rendered),
            Err(e) => Outcome::internal(key, e),
        }
    }

    /// Where a failure to evaluate `key` goes: `systemError` when asking again may
    /// succeed, an item `error` when not.
    pub(super) fn failed(key: &str, e: &VerifyError) -> Self {
        if e.is_transient() {
            Outcome::transient(e.code(), key, e)
        } else {
            Outcome::permanent(e.code(), e)
        }
    }

    pub(super) fn internal(key: &str, e: impl std::fmt::Display) -> Self {
        Outcome::transient("internal_error", key, e)
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
            Outcome::Permanent { code, message } => items.push(Item {
                key,
                value: None,
                error: Some(format!("{code}: {message}")),
            }),
            Outcome::Transient { code, message } => system.push(format!("{code}: {message}")),
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
    fn refusals_map_once_to_a_status_and_a_json_system_error() {
        for (e, status, code) in [
            (RequestError::NotFound, 404, "not_found"),
            (
                RequestError::MethodNotAllowed("/provide".into()),
                405,
                "method_not_allowed",
            ),
            (RequestError::RateLimited, 429, "rate_limited"),
            (RequestError::TooLarge(10), 413, "request_too_large"),
            (
                RequestError::TooManyKeys { found: 3, limit: 2 },
                413,
                "too_many_keys",
            ),
            (RequestError::Malformed("x".into()), 400, "bad_request"),
            (RequestError::BodyRead("reset".into()), 400, "bad_request"),
            (
                RequestError::WrongType("a".into(), "b".into()),
                400,
                "bad_request",
            ),
            (
                RequestError::MalformedReview("x".into()),
                400,
                "bad_request",
            ),
            (
                RequestError::NotAdmissionReview("a".into(), "b".into()),
                400,
                "bad_request",
            ),
            (RequestError::BadQuery("x".into()), 400, "bad_request"),
        ] {
            assert_eq!(e.code(), code, "{e}");
            // The other faces' error JSON: the same status and code, the message without it.
            let response = e.error_json();
            assert_eq!(response.status().as_u16(), status);
            let json = body_json(response);
            assert_eq!(json["error"]["code"], code, "{json}");
            assert_eq!(
                json["error"]["transient"],
                matches!(e, RequestError::RateLimited),
                "{json}"
            );
            let message = json["error"]["message"].as_str().unwrap();
            assert!(!message.starts_with(code), "{message}");
            assert_eq!(e.status_code().as_u16(), status, "{e}");
            let response = e.error_response();
            assert_eq!(response.status().as_u16(), status);
            let json = body_json(response);
            assert_eq!(json["response"]["items"], serde_json::json!([]));
            let system = json["response"]["systemError"].as_str().unwrap();
            assert!(system.starts_with(&format!("{code}: ")), "{system}");
        }
    }

    /// The JSON body of an answer built in memory.
    fn body_json(response: HttpResponse) -> serde_json::Value {
        let body = actix_web::body::to_bytes(response.into_body());
        let body = futures_util::FutureExt::now_or_never(body)
            .unwrap()
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn transient_outcomes_never_become_items() {
        let r = respond(vec![
            ("a".into(), Outcome::permanent("not_found", "x")),
            (
                "b".into(),
                Outcome::transient("upstream_unavailable", "b", "down"),
            ),
            (
                "c".into(),
                Outcome::transient("deadline_exceeded", "c", "slow"),
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
