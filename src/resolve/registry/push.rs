//! Writing to a registry, for `atcr-verify sign`: monolithic blob uploads, manifests by
//! digest, and the referrers tag index of registries without the Referrers API.
//!
//! Spec: OCI distribution 1.1, "Pushing blobs" (POST then PUT), "Pushing Manifests with
//! Subject" and "Referrers Tag Schema"
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md>). The auth
//! flow is the read path's ([`HttpRegistry::get`]) with the token scope
//! `repository:<name>:pull,push`; tokens are cached per (registry, repository, actions), so
//! the push token serves the push's requests and the reads keep their pull token.
//! Credentials go only to the registry's own origin, never to an upload `Location` on
//! another host.

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{HttpRegistry, MAX_INDEX_BYTES, OCI_INDEX, unexpected};
use crate::net::{Fetched, MAX_ERROR_BODY};
use crate::resolve::ResolveError;
use crate::syntax::text::{outside, xrpc_error_code};
use crate::syntax::{ImageDigest, ImageRef};

/// Why a write to the registry failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The registry answered something the distribution spec does not allow.
    #[error("{step}: {reason}")]
    Invalid {
        /// What was being written.
        step: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The registry refused the write (any 4xx, after the auth flow).
    #[error("{step}: the registry refused it (HTTP {status}{detail}){hint}", hint = refusal_hint(*status))]
    Refused {
        /// What was being written.
        step: String,
        /// The status.
        status: u16,
        /// The registry's error code and message, made inert (`: DENIED: …`), or empty.
        detail: String,
    },
    /// The transport or the read/auth path failed.
    #[error("{step}: {source}")]
    Upstream {
        /// What was being written.
        step: String,
        /// The failure.
        #[source]
        source: ResolveError,
    },
}

fn refusal_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => "; pushing needs credentials with push access (--registry-config)",
        405 => "; the registry does not accept pushes (read-only, or a mirror)",
        _ => "",
    }
}

impl PushError {
    /// A stable code: `registry_refused`, `upstream_invalid`, or the read path's.
    pub fn code(&self) -> &'static str {
        match self {
            PushError::Invalid { .. } => "upstream_invalid",
            PushError::Refused { .. } => "registry_refused",
            PushError::Upstream { source, .. } => source.code(),
        }
    }

    /// Whether trying again later may succeed (timeouts, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            PushError::Invalid { .. } | PushError::Refused { .. } => false,
            PushError::Upstream { source, .. } => source.is_transient(),
        }
    }
}

/// How a pushed manifest with a `subject` becomes findable from its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// The registry has the Referrers API: it indexes the manifest itself.
    ReferrersApi,
    /// The registry has no Referrers API: the manifest was added to the image index
    /// tagged `sha256-<hex of the subject>` (the referrers tag schema), or was already in it.
    ReferrersTag {
        /// The tag.
        tag: String,
    },
}

/// Largest answer read from a write (they have empty bodies; an error body is capped
/// lower by the client).
const MAX_WRITE_ANSWER: usize = 64 * 1024;

/// The token scope actions of a push.
const PUSH: &str = "pull,push";

impl HttpRegistry {
    /// Uploads `bytes` as a blob of `image`'s repository (a monolithic upload: `POST
    /// /blobs/uploads/`, then `PUT <Location>?digest=…` with the bytes); returns its digest.
    pub async fn push_blob(
        &self,
        image: &ImageRef,
        bytes: &[u8],
    ) -> Result<ImageDigest, PushError> {
        let digest = ImageDigest::of_bytes(bytes);
        let step = format!("uploading blob {digest} to {}", image.name());
        let upstream = |source| PushError::Upstream {
            step: step.clone(),
            source,
        };
        let start = self.url(image, "blobs/uploads/").map_err(upstream)?;
        let answer = self
            .send_authed(
                image,
                Method::POST,
                &start,
                HeaderMap::new(),
                Some(Vec::new()),
                MAX_WRITE_ANSWER,
                PUSH,
            )
            .await
            .map_err(upstream)?;
        if answer.status != StatusCode::ACCEPTED {
            return Err(refused(&step, &answer));
        }
        let location = answer
            .headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PushError::Invalid {
                step: step.clone(),
                reason: "HTTP 202 without a Location header".into(),
            })?;
        let mut upload = start.join(location).map_err(|e| PushError::Invalid {
            step: step.clone(),
            reason: format!("Location {:?}: {e}", outside(location)),
        })?;
        upload
            .query_pairs_mut()
            .append_pair("digest", digest.as_str());
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let answer = self
            .send_authed(
                image,
                Method::PUT,
                &upload,
                headers,
                Some(bytes.to_vec()),
                MAX_WRITE_ANSWER,
                PUSH,
            )
            .await
            .map_err(upstream)?;
        if answer.status != StatusCode::CREATED {
            return Err(refused(&step, &answer));
        }
        Ok(digest)
    }

    /// PUTs a manifest under `reference` (a digest or a tag). Returns whether the registry
    /// answered with `OCI-Subject`, which says it indexed the manifest's `subject` as a
    /// referrer (distribution spec 1.1).
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<bool, PushError> {
        let digest = ImageDigest::of_bytes(&bytes);
        let step = format!("pushing manifest {reference} to {}", image.name());
        let upstream = |source| PushError::Upstream {
            step: step.clone(),
            source,
        };
        let url = self
            .url(image, &format!("manifests/{reference}"))
            .map_err(upstream)?;
        let mut headers = HeaderMap::new();
        let content_type = HeaderValue::from_str(media_type).map_err(|_| PushError::Invalid {
            step: step.clone(),
            reason: format!("media type {:?} is not a header value", outside(media_type)),
        })?;
        headers.insert(CONTENT_TYPE, content_type);
        let answer = self
            .send_authed(
                image,
                Method::PUT,
                &url,
                headers,
                Some(bytes),
                MAX_WRITE_ANSWER,
                PUSH,
            )
            .await
            .map_err(upstream)?;
        if !answer.status.is_success() {
            return Err(refused(&step, &answer));
        }
        if let Some(claimed) = answer
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && claimed != digest.as_str()
        {
            return Err(PushError::Invalid {
                step,
                reason: format!(
                    "Docker-Content-Digest says {:?}, the manifest pushed is {digest}",
                    outside(claimed)
                ),
            });
        }
        Ok(answer.headers.contains_key("oci-subject"))
    }

    /// Whether the registry has the Referrers API: `GET /v2/<name>/referrers/<subject>`
    /// answers 200 (the spec's "a registry that supports it MUST answer 200, even with no
    /// referrers") or 404 (it has none, as CNCF distribution 2.8).
    pub async fn has_referrers_api(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
    ) -> Result<bool, ResolveError> {
        let url = self.url(image, &format!("referrers/{subject}"))?;
        let answer = self.get(image, &url, OCI_INDEX, MAX_INDEX_BYTES).await?;
        match answer.status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => Err(unexpected(&url, other, "referrers")),
        }
    }

    /// Adds `descriptor` (a manifest's descriptor with its `artifactType` and annotations)
    /// to the image index tagged `sha256-<hex of subject>`: read it (404: a new, empty
    /// index), append the descriptor unless its digest is already listed, and PUT it back.
    /// Fields of the existing index are kept as they are.
    ///
    /// Two signers updating the same tag at once can lose one entry (the spec has no
    /// compare-and-swap); signing again re-adds it.
    pub async fn add_to_referrers_tag(
        &self,
        image: &ImageRef,
        subject: &ImageDigest,
        descriptor: Value,
    ) -> Result<Attachment, PushError> {
        let tag = super::referrers_tag(subject);
        let step = format!("updating the referrers tag {tag} of {}", image.name());
        let invalid = |reason: String| PushError::Invalid {
            step: step.clone(),
            reason,
        };
        let upstream = |source| PushError::Upstream {
            step: step.clone(),
            source,
        };
        let url = self
            .url(image, &format!("manifests/{tag}"))
            .map_err(upstream)?;
        let answer = self
            .get(image, &url, OCI_INDEX, MAX_INDEX_BYTES)
            .await
            .map_err(upstream)?;
        let mut index = match answer.status {
            StatusCode::NOT_FOUND => serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
            }),
            StatusCode::OK => serde_json::from_slice::<Value>(&answer.body).map_err(|e| {
                invalid(format!(
                    "the index it holds is not JSON: {}",
                    outside(&e.to_string())
                ))
            })?,
            other => return Err(upstream(unexpected(&url, other, "referrers tag"))),
        };
        let Some(fields) = index.as_object_mut() else {
            return Err(invalid("the tag holds JSON that is not an object".into()));
        };
        match fields.get("mediaType").map(Value::as_str) {
            None | Some(Some(OCI_INDEX)) => {}
            Some(other) => {
                return Err(invalid(format!(
                    "the tag holds media type {:?}, not an OCI image index",
                    other.map(outside)
                )));
            }
        }
        let manifests = fields
            .entry("manifests")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Some(manifests) = manifests.as_array_mut() else {
            return Err(invalid("its `manifests` is not an array".into()));
        };
        let digest = descriptor.get("digest").cloned();
        if manifests.iter().any(|m| m.get("digest") == digest.as_ref()) {
            return Ok(Attachment::ReferrersTag { tag });
        }
        manifests.push(descriptor);
        let bytes = serde_json::to_vec(&index)
            .map_err(|e| invalid(format!("serializing the index: {e}")))?;
        self.push_manifest(image, &tag, OCI_INDEX, bytes).await?;
        Ok(Attachment::ReferrersTag { tag })
    }
}

/// A write's answer that is not the expected success: the registry's own error (OCI
/// `{"errors": [{"code", "message"}]}`), inert, when it sent one.
fn refused(step: &str, answer: &Fetched) -> PushError {
    #[derive(serde::Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<OciError>,
    }
    #[derive(serde::Deserialize)]
    struct OciError {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    let body = answer.body.get(..MAX_ERROR_BODY).unwrap_or(&answer.body);
    let detail = serde_json::from_slice::<Errors>(body)
        .ok()
        .and_then(|e| e.errors.into_iter().next())
        .map(|e| {
            let code = e.code.as_deref().and_then(|c| {
                // OCI codes are upper-case with underscores (`NAME_UNKNOWN`).
                let plain = c.replace('_', "");
                xrpc_error_code(&plain).map(|_| c.to_owned())
            });
            let message = e.message.map(|m| crate::syntax::text::inert(&m, 200));
            match (code, message) {
                (Some(c), Some(m)) => format!(": {c}: {m}"),
                (Some(c), None) => format!(": {c}"),
                (None, Some(m)) => format!(": {m}"),
                (None, None) => String::new(),
            }
        })
        .unwrap_or_default();
    PushError::Refused {
        step: step.to_owned(),
        status: answer.status.as_u16(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Fetched {
        Fetched {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn refusals_quote_the_registry_inertly() {
        let e = refused(
            "pushing",
            &answer(
                403,
                r#"{"errors":[{"code":"DENIED","message":"no push\u001b[31m"}]}"#,
            ),
        );
        assert_eq!(e.code(), "registry_refused");
        let text = e.to_string();
        assert!(
            text.contains("HTTP 403: DENIED: no push\\u{1b}[31m"),
            "{text}"
        );
        assert!(text.contains("push access"), "{text}");
        let e = refused(
            "pushing",
            &answer(400, r#"{"errors":[{"code":"bad code!","message":"m"}]}"#),
        );
        assert!(e.to_string().contains("HTTP 400: m)"), "{e}");
        let e = refused("pushing", &answer(405, "<html>"));
        assert!(e.to_string().contains("HTTP 405)"), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
        assert!(!e.is_transient());
    }
}
