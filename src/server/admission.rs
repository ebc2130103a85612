//! The Kubernetes face: a ValidatingAdmissionWebhook (`DESIGN.md` §2c) on `/validate`.
//!
//! An `admission.k8s.io/v1` `AdmissionReview` comes in; the images of its object — a Pod's
//! `containers`, `initContainers` and `ephemeralContainers`, or those of the pod template of
//! a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or CronJob — are judged on the
//! provider's engine path ([`super::batch::Batch::verify`]), and an `AdmissionReview` goes
//! back with the request's `uid`, always with HTTP 200:
//!
//! - a verdict with `deny: true`, or a permanent failure (an invalid reference, no such
//!   image), refuses: `allowed: false`, `status.code` 403, and a `status.message` naming
//!   each refused image and why (at most [`MAX_MESSAGE`] bytes);
//! - a verdict under an `audit` policy that is not verified admits, with a `warnings` entry
//!   (each at most [`MAX_WARNING`] characters);
//! - a transient failure (upstream down, deadline) refuses or admits with a warning, as
//!   [`WebhookFailure`] says (`serve --webhook-failure`).
//!
//! Other kinds, and objects without images, are allowed. `dryRun` changes nothing: judging
//! has no side effects.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::provider::{Outcome, RequestError};
use crate::syntax::text::{inert, outside};

/// The only `apiVersion` accepted and answered.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Longest `status.message`, in bytes.
pub const MAX_MESSAGE: usize = 4096;

/// Longest `warnings` entry, in characters (the API server's advice).
pub const MAX_WARNING: usize = 120;

/// Longest `uid` accepted (the API server sends a 36-character UUID).
const MAX_UID: usize = 128;

/// What a transient failure (the image could not be judged now) does to the admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookFailure {
    /// Refuse, with the reason.
    #[default]
    Deny,
    /// Admit, with a warning naming the failure.
    Allow,
}

/// An `AdmissionReview` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<ReviewRequest>,
}

/// `request` of an `AdmissionReview`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    object: Option<Value>,
    #[serde(default)]
    dry_run: Option<bool>,
}

/// `request.kind`.
#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

/// A parsed review: the uid to echo and the distinct images to judge, in first-seen order.
#[derive(Debug, PartialEq, Eq)]
pub struct Admission {
    /// `request.uid`.
    pub uid: String,
    /// The object's images.
    pub images: Vec<String>,
    /// `request.dryRun`.
    pub dry_run: bool,
}

/// The answer: an `AdmissionReview` with a `response`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    /// Always [`API_VERSION`].
    pub api_version: &'static str,
    /// Always `AdmissionReview`.
    pub kind: &'static str,
    /// The decision.
    pub response: Decision,
}

/// `response` of an `AdmissionReview`.
#[derive(Debug, Serialize)]
pub struct Decision {
    /// The request's uid.
    pub uid: String,
    /// Whether the object is admitted.
    pub allowed: bool,
    /// Why not, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Warnings shown to the client (audit findings, admitted failures).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `response.status` (a `metav1.Status`).
#[derive(Debug, Serialize)]
pub struct Status {
    /// 403 when refused.
    pub code: u16,
    /// The refused images and why.
    pub message: String,
}

/// Parses and checks a review body; at most `max_images` distinct images.
pub fn parse_review(body: &[u8], max_images: usize) -> Result<Admission, RequestError> {
    let review: Review = serde_json::from_slice(body)
        .map_err(|e| RequestError::MalformedReview(outside(&e.to_string())))?;
    if review.api_version != API_VERSION || review.kind != "AdmissionReview" {
        return Err(RequestError::NotAdmissionReview(
            outside(&review.api_version),
            outside(&review.kind),
        ));
    }
    let request = review
        .request
        .ok_or_else(|| RequestError::MalformedReview("no request".into()))?;
    if request.uid.is_empty() || request.uid.len() > MAX_UID {
        return Err(RequestError::MalformedReview(format!(
            "request.uid must hold 1 to {MAX_UID} bytes"
        )));
    }
    let images = match &request.object {
        Some(object) => images_of(&request.kind.group, &request.kind.kind, object),
        None => Vec::new(),
    };
    if images.len() > max_images {
        return Err(RequestError::TooManyKeys {
            found: images.len(),
            limit: max_images,
        });
    }
    Ok(Admission {
        uid: request.uid,
        images,
        dry_run: request.dry_run.unwrap_or(false),
    })
}

/// Where the pod spec of an object of `group`/`kind` is, if it has one.
fn pod_spec_path(group: &str, kind: &str) -> Option<&'static str> {
    match (group, kind) {
        ("", "Pod") => Some("/spec"),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") | ("batch", "Job") => {
            Some("/spec/template/spec")
        }
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

/// The distinct images of an object's pod spec, in first-seen order.
fn images_of(group: &str, kind: &str, object: &Value) -> Vec<String> {
    let Some(spec) = pod_spec_path(group, kind).and_then(|path| object.pointer(path)) else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    let mut images = Vec::new();
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        let containers = spec.get(list).and_then(Value::as_array);
        for container in containers.into_iter().flatten() {
            if let Some(image) = container.get("image").and_then(Value::as_str)
                && seen.insert(image)
            {
                images.push(image.to_owned());
            }
        }
    }
    images
}

/// Builds the answer to the review `uid` from each image's outcome.
pub fn respond(
    uid: String,
    outcomes: &[(String, Outcome)],
    failure: WebhookFailure,
) -> ReviewResponse {
    let mut refused = Vec::new();
    let mut warnings = Vec::new();
    for (image, outcome) in outcomes {
        let image = outside(image);
        match outcome {
            Outcome::Answered(answer) => {
                let reason = answer.reason.as_deref().unwrap_or("not verified");
                if answer.deny {
                    refused.push(format!("{image}: {}", outside(reason)));
                } else if answer.audit {
                    warnings.push(clip(&format!("atcr-verify audit: {image}: {reason}")));
                }
            }
            Outcome::Permanent { code, message } => {
                refused.push(format!("{image}: {code}: {message}"));
            }
            Outcome::Transient { code, message } => match failure {
                WebhookFailure::Deny => refused.push(format!("{code}: {message}")),
                WebhookFailure::Allow => warnings.push(clip(&format!(
                    "atcr-verify could not decide {image} ({code}); admitted"
                ))),
            },
        }
    }
    let status = (!refused.is_empty()).then(|| Status {
        code: 403,
        message: inert(
            &format!(
                "atcr-verify refused {} image(s): {}",
                refused.len(),
                refused.join("; ")
            ),
            MAX_MESSAGE - 32,
        ),
    });
    ReviewResponse {
        api_version: API_VERSION,
        kind: "AdmissionReview",
        response: Decision {
            uid,
            allowed: status.is_none(),
            status,
            warnings,
        },
    }
}

/// `s` made inert and cut to [`MAX_WARNING`] characters (the last one `…` when cut).
fn clip(s: &str) -> String {
    let s = inert(s, MAX_WARNING * 4);
    if s.chars().count() <= MAX_WARNING {
        return s;
    }
    let mut out: String = s.chars().take(MAX_WARNING - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(kind: (&str, &str), object: Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"apiVersion": API_VERSION, "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": kind.0, "version": "v1", "kind": kind.1},
                        "object": object, "dryRun": true}}),
        )
        .unwrap()
    }

    fn pod_spec() -> Value {
        json!({"containers": [{"name": "a", "image": "r/a:1"}, {"name": "b", "image": "r/a:1"}],
               "initContainers": [{"name": "i", "image": "r/i:1"}],
               "ephemeralContainers": [{"name": "e", "image": "r/e:1"}]})
    }

    #[test]
    fn images_are_found_in_every_kind_that_runs_pods() {
        let all = ["r/a:1", "r/i:1", "r/e:1"];
        for (kind, object) in [
            (("", "Pod"), json!({"spec": pod_spec()})),
            (
                ("apps", "Deployment"),
                json!({"spec": {"template": {"spec": pod_spec()}}}),
            ),
            (
                ("batch", "Job"),
                json!({"spec": {"template": {"spec": pod_spec()}}}),
            ),
            (
                ("batch", "CronJob"),
                json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": pod_spec()}}}}}),
            ),
        ] {
            let admission = parse_review(&review(kind, object), 10).unwrap();
            assert_eq!(admission.images, all, "{kind:?}");
            assert_eq!(admission.uid, "u-1");
            assert!(admission.dry_run);
        }
        let other = parse_review(&review(("", "ConfigMap"), json!({"data": {}})), 10).unwrap();
        assert!(other.images.is_empty());
        assert!(matches!(
            parse_review(&review(("", "Pod"), json!({"spec": pod_spec()})), 2),
            Err(RequestError::TooManyKeys { found: 3, limit: 2 })
        ));
    }

    #[test]
    fn malformed_reviews_are_refused() {
        for body in [
            b"{".to_vec(),
            b"[]".to_vec(),
            serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "AdmissionReview"}))
                .unwrap(),
            serde_json::to_vec(
                &json!({"apiVersion": API_VERSION, "kind": "AdmissionReview",
                "request": {"uid": ""}}),
            )
            .unwrap(),
        ] {
            assert!(matches!(
                parse_review(&body, 10),
                Err(RequestError::MalformedReview(_))
            ));
        }
        let v1beta1 = serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1",
            "kind": "AdmissionReview",
            "request": {"uid": "x", "kind": {"group": "", "version": "v1", "kind": "Pod"}}}))
        .unwrap();
        assert!(matches!(
            parse_review(&v1beta1, 10),
            Err(RequestError::NotAdmissionReview(..))
        ));
    }

    #[test]
    fn failures_refuse_or_warn_as_configured_and_stay_bounded() {
        let outcomes = vec![
            (
                "r/x:1".to_owned(),
                Outcome::Transient {
                    code: "upstream_unavailable",
                    message: format!("r/x:1: {}", "down ".repeat(100)),
                },
            ),
            (
                "bad ref".to_owned(),
                Outcome::Permanent {
                    code: "invalid_reference",
                    message: "x".repeat(10_000),
                },
            ),
        ];
        let deny =
            serde_json::to_value(respond("u".into(), &outcomes, WebhookFailure::Deny)).unwrap();
        assert_eq!(deny["response"]["allowed"], false);
        assert_eq!(deny["response"]["status"]["code"], 403);
        let message = deny["response"]["status"]["message"].as_str().unwrap();
        assert!(message.len() <= MAX_MESSAGE, "{}", message.len());
        assert!(message.contains("upstream_unavailable: r/x:1"), "{message}");
        let allow =
            serde_json::to_value(respond("u".into(), &outcomes[..1], WebhookFailure::Allow))
                .unwrap();
        assert_eq!(allow["response"]["allowed"], true);
        assert_eq!(allow["response"]["uid"], "u");
        let warning = allow["response"]["warnings"][0].as_str().unwrap();
        assert!(warning.chars().count() <= MAX_WARNING, "{warning}");
        assert!(warning.contains("r/x:1"), "{warning}");
        assert_eq!(clip(&"é".repeat(500)).chars().count(), MAX_WARNING);
    }
}
