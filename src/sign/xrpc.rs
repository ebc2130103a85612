//! The XRPC calls signing makes on the signer's PDS: `com.atproto.server.createSession`
//! (identifier + app password → access token and DID), `com.atproto.repo.createRecord`,
//! and the public `com.atproto.repo.getRecord` (to check a record given with
//! `--record-uri`). Specs: <https://atproto.com/specs/xrpc>, the lexicons under
//! `com.atproto.server` and `com.atproto.repo`.
//!
//! Every answer is bounded and hostile: sizes are capped, the DID, URI and CID are parsed,
//! and an error answer is reduced to its `error` code (when shaped like one) and an inert,
//! cut `message`. The password and the access token never appear in a message or a
//! `Debug` output.

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::Value;
use url::Url;

use crate::did_document::{DidDocument, MAX_DOCUMENT_BYTES};
use crate::net::{FetchError, Fetched, HttpClient};
use crate::syntax::text::{inert, outside, xrpc_error_code};
use crate::syntax::{AtUri, Did, Nsid};

/// Largest createSession answer (it may carry the DID document).
const MAX_SESSION_BYTES: usize = MAX_DOCUMENT_BYTES + 64 * 1024;
/// Largest createRecord answer (`uri`, `cid`, `commit`, `validationStatus`).
const MAX_CREATED_BYTES: usize = 16 * 1024;
/// Largest getRecord answer read (an `io.atcr.manifest` record is well under 1 KiB, but
/// may list layers).
const MAX_RECORD_BYTES: usize = 256 * 1024;
/// Longest access token accepted.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest XRPC error message repeated.
const MAX_MESSAGE: usize = 200;

/// An app password. Its `Debug` is redacted, it has no `Display`, and it is sent only in the
/// createSession body.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Wraps a password read from the environment.
    pub fn new(password: String) -> Self {
        Password(password)
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A logged-in session: who the PDS says the account is, and its access token.
pub struct Session {
    /// The account's DID.
    pub did: Did,
    /// Its handle, when the PDS named a syntactically valid one.
    pub handle: Option<String>,
    /// The DID document the PDS returned with the session, when it sent one for this DID
    /// (unverified: used only to fill the artifact's informational fields).
    pub did_doc: Option<DidDocument>,
    access: HeaderValue,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("did", &self.did)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

/// A record the PDS created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedRecord {
    /// Its `at://` URI.
    pub uri: AtUri,
    /// The record's CID.
    pub cid: String,
    /// The CID of the commit that created it, when the PDS said.
    pub commit_cid: Option<String>,
}

/// A record read with getRecord.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedRecord {
    /// The record's value.
    pub value: Value,
    /// Its CID, when the PDS said.
    pub cid: Option<String>,
}

/// Why an XRPC call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XrpcError {
    /// No answer: the PDS is down, unreachable, too slow, or the outbound rules refuse it.
    #[error("{method}: {source}")]
    Fetch {
        /// The XRPC method.
        method: &'static str,
        /// The transport failure.
        #[source]
        source: FetchError,
    },
    /// The PDS answered with something the lexicon does not allow.
    #[error("{method} at {pds}: {reason}")]
    Invalid {
        /// The XRPC method.
        method: &'static str,
        /// The PDS.
        pds: String,
        /// What was wrong.
        reason: String,
    },
    /// The PDS refused the call (a 4xx), with its XRPC error code and message.
    #[error(
        "{method} at {pds} refused: HTTP {status}{}{}",
        error.as_deref().map(|e| format!(" {e}")).unwrap_or_default(),
        message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
    )]
    Refused {
        /// The XRPC method.
        method: &'static str,
        /// The PDS.
        pds: String,
        /// The status.
        status: u16,
        /// The XRPC `error` code (`AuthenticationRequired`, `InvalidRequest`, …), when the
        /// answer had one shaped like a code.
        error: Option<String>,
        /// The XRPC `message`, inert and cut.
        message: Option<String>,
    },
}

impl XrpcError {
    /// A stable code: `pds_refused`, `upstream_invalid`, or the transport's
    /// (`upstream_unavailable`, `upstream_refused`, `rate_limited`).
    pub fn code(&self) -> &'static str {
        match self {
            XrpcError::Fetch {
                source: FetchError::Refused { .. },
                ..
            } => "upstream_refused",
            XrpcError::Fetch {
                source: FetchError::RateLimited { .. },
                ..
            } => "rate_limited",
            XrpcError::Fetch {
                source: FetchError::TooLarge { .. },
                ..
            }
            | XrpcError::Invalid { .. } => "upstream_invalid",
            XrpcError::Fetch { .. } => "upstream_unavailable",
            XrpcError::Refused { .. } => "pds_refused",
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            XrpcError::Fetch { source, .. } => source.is_transient(),
            XrpcError::Invalid { .. } | XrpcError::Refused { .. } => false,
        }
    }
}

fn endpoint(pds: &Url, method: &str) -> Url {
    let mut url = pds.clone();
    url.set_path(&format!("xrpc/{method}"));
    url.set_query(None);
    url.set_fragment(None);
    url
}

fn origin(pds: &Url) -> String {
    pds.origin().ascii_serialization()
}

async fn call(
    http: &HttpClient,
    method_name: &'static str,
    http_method: Method,
    url: &Url,
    headers: HeaderMap,
    body: Option<&Value>,
    cap: usize,
) -> Result<Fetched, XrpcError> {
    let mut headers = headers;
    let body =
        match body {
            Some(b) => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Some(serde_json::to_vec(b).map_err(|e| {
                    invalid(method_name, url, format!("serializing the request: {e}"))
                })?)
            }
            None => None,
        };
    let answer = http
        .request(http_method, url, headers, body, cap)
        .await
        .map_err(|source| XrpcError::Fetch {
            method: method_name,
            source,
        })?;
    if !answer.status.is_success() {
        return Err(refused(method_name, url, &answer));
    }
    Ok(answer)
}

/// An error answer: its status, and the XRPC `{"error", "message"}` when it sent them.
fn refused(method: &'static str, url: &Url, answer: &Fetched) -> XrpcError {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    let parsed = serde_json::from_slice::<ErrorBody>(&answer.body).ok();
    let (error, message) = match parsed {
        Some(b) => (
            b.error
                .as_deref()
                .and_then(xrpc_error_code)
                .map(str::to_owned),
            b.message.map(|m| inert(&m, MAX_MESSAGE)),
        ),
        None => (None, None),
    };
    XrpcError::Refused {
        method,
        pds: origin(url),
        status: answer.status.as_u16(),
        error,
        message,
    }
}

fn parse<'a, T: Deserialize<'a>>(
    method: &'static str,
    url: &Url,
    body: &'a [u8],
) -> Result<T, XrpcError> {
    serde_json::from_slice(body).map_err(|e| {
        invalid(
            method,
            url,
            format!(
                "answer is not JSON of the expected shape: {}",
                outside(&e.to_string())
            ),
        )
    })
}

/// `method`'s answer from `url` is not what the method promises.
fn invalid(method: &'static str, url: &Url, reason: String) -> XrpcError {
    XrpcError::Invalid {
        method,
        pds: origin(url),
        reason,
    }
}

/// The optional CID `field` of `method`'s answer, checked ([`checked_cid`]).
fn optional_cid(
    method: &'static str,
    url: &Url,
    field: &str,
    cid: Option<&str>,
) -> Result<Option<String>, XrpcError> {
    cid.map(|c| checked_cid(c).ok_or_else(|| invalid(method, url, format!("{field} is not a CID"))))
        .transpose()
}

/// Logs in: `com.atproto.server.createSession` with `identifier` (a handle, DID or email)
/// and `password` (an app password).
pub async fn create_session(
    http: &HttpClient,
    pds: &Url,
    identifier: &str,
    password: &Password,
) -> Result<Session, XrpcError> {
    const METHOD: &str = "com.atproto.server.createSession";
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer<'a> {
        did: String,
        #[serde(default)]
        handle: Option<String>,
        access_jwt: String,
        #[serde(default, borrow)]
        did_doc: Option<&'a serde_json::value::RawValue>,
    }
    let url = endpoint(pds, METHOD);
    let body = serde_json::json!({"identifier": identifier, "password": password.0});
    let answer = call(
        http,
        METHOD,
        Method::POST,
        &url,
        HeaderMap::new(),
        Some(&body),
        MAX_SESSION_BYTES,
    )
    .await?;
    let a: Answer = parse(METHOD, &url, &answer.body)?;
    let invalid = |reason: String| invalid(METHOD, &url, reason);
    let did: Did = a.did.parse().map_err(|e| {
        invalid(format!(
            "did {:?}: {}",
            outside(&a.did),
            outside(&format!("{e}"))
        ))
    })?;
    if a.access_jwt.is_empty() || a.access_jwt.len() > MAX_TOKEN_LEN {
        return Err(invalid(format!(
            "accessJwt is not 1 to {MAX_TOKEN_LEN} bytes"
        )));
    }
    let mut access = HeaderValue::from_str(&format!("Bearer {}", a.access_jwt))
        .map_err(|_| invalid("accessJwt is not a valid header value".into()))?;
    access.set_sensitive(true);
    let did_doc = a
        .did_doc
        .and_then(|raw| DidDocument::parse(&did, raw.get().as_bytes()).ok());
    Ok(Session {
        handle: a.handle.filter(|h| crate::syntax::is_handle(h)),
        did,
        did_doc,
        access,
    })
}

/// Writes `record` into `collection` of the session's repo
/// (`com.atproto.repo.createRecord`, record key chosen by the PDS: a TID). The PDS
/// validates the record when it knows the collection's lexicon.
pub async fn create_record(
    http: &HttpClient,
    pds: &Url,
    session: &Session,
    collection: &Nsid,
    record: &Value,
) -> Result<CreatedRecord, XrpcError> {
    const METHOD: &str = "com.atproto.repo.createRecord";
    #[derive(Deserialize)]
    struct Commit {
        cid: String,
    }
    #[derive(Deserialize)]
    struct Answer {
        uri: String,
        cid: String,
        #[serde(default)]
        commit: Option<Commit>,
    }
    let url = endpoint(pds, METHOD);
    let body = serde_json::json!({
        "repo": session.did.as_str(), "collection": collection.as_str(), "record": record,
    });
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, session.access.clone());
    let answer = call(
        http,
        METHOD,
        Method::POST,
        &url,
        headers,
        Some(&body),
        MAX_CREATED_BYTES,
    )
    .await?;
    let a: Answer = parse(METHOD, &url, &answer.body)?;
    let invalid = |reason: String| invalid(METHOD, &url, reason);
    let uri: AtUri = a
        .uri
        .parse()
        .map_err(|e| invalid(format!("uri: {}", outside(&format!("{e}")))))?;
    if uri.did() != &session.did || uri.collection() != collection {
        return Err(invalid(format!(
            "uri {uri} is not in {}'s {collection}",
            session.did
        )));
    }
    let cid = checked_cid(&a.cid).ok_or_else(|| invalid("cid is not a CID".into()))?;
    let commit_cid = optional_cid(
        METHOD,
        &url,
        "commit.cid",
        a.commit.as_ref().map(|c| c.cid.as_str()),
    )?;
    Ok(CreatedRecord {
        uri,
        cid,
        commit_cid,
    })
}

/// Reads the record at `uri` (`com.atproto.repo.getRecord`, public).
pub async fn get_record(
    http: &HttpClient,
    pds: &Url,
    uri: &AtUri,
) -> Result<FetchedRecord, XrpcError> {
    const METHOD: &str = "com.atproto.repo.getRecord";
    #[derive(Deserialize)]
    struct Answer {
        value: Value,
        #[serde(default)]
        cid: Option<String>,
    }
    let mut url = endpoint(pds, METHOD);
    url.query_pairs_mut()
        .append_pair("repo", uri.did().as_str())
        .append_pair("collection", uri.collection().as_str())
        .append_pair("rkey", uri.rkey().as_str());
    let answer = call(
        http,
        METHOD,
        Method::GET,
        &url,
        HeaderMap::new(),
        None,
        MAX_RECORD_BYTES,
    )
    .await?;
    let a: Answer = parse(METHOD, &url, &answer.body)?;
    let cid = optional_cid(METHOD, &url, "cid", a.cid.as_deref())?;
    Ok(FetchedRecord {
        value: a.value,
        cid,
    })
}

/// `s` when it parses as a CID (it is repeated to users and written into the artifact).
fn checked_cid(s: &str) -> Option<String> {
    (s.len() <= 128 && cid::Cid::try_from(s).is_ok()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug() {
        let p = Password::new("hunter22".into());
        assert!(!format!("{p:?}").contains("hunter22"));
    }

    #[test]
    fn error_answers_keep_only_a_code_shaped_code_and_an_inert_message() {
        let url: Url = "https://pds.example/xrpc/x".parse().unwrap();
        let answer = |status: u16, body: &str| Fetched {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        };
        let e = refused(
            "m",
            &url,
            &answer(
                401,
                r#"{"error":"AuthenticationRequired","message":"Invalid identifier or password"}"#,
            ),
        );
        assert_eq!(
            e.to_string(),
            "m at https://pds.example refused: HTTP 401 AuthenticationRequired: Invalid identifier or password"
        );
        assert_eq!(e.code(), "pds_refused");
        let long = "x".repeat(10_000);
        let e = refused(
            "m",
            &url,
            &answer(
                400,
                &format!(r#"{{"error":"not a code\u001b","message":"{long}\u001b"}}"#),
            ),
        );
        let text = e.to_string();
        assert!(text.len() < 400, "{}", text.len());
        assert!(
            !text.contains('\u{1b}') && !text.contains("not a code"),
            "{text}"
        );
        let e = refused("m", &url, &answer(404, "<html>"));
        assert_eq!(e.to_string(), "m at https://pds.example refused: HTTP 404");
    }

    #[test]
    fn endpoints_are_rooted_at_the_pds_origin() {
        let pds: Url = "https://pds.example/some/path?q=1".parse().unwrap();
        assert_eq!(
            endpoint(&pds, "com.atproto.server.createSession").as_str(),
            "https://pds.example/xrpc/com.atproto.server.createSession"
        );
    }

    #[test]
    fn cids_are_checked() {
        assert!(
            checked_cid("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm").is_some()
        );
        assert!(checked_cid("bafyreih8").is_none());
        assert!(checked_cid("").is_none());
        let url: Url = "https://pds.example/xrpc/m".parse().unwrap();
        let good = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
        assert_eq!(optional_cid("m", &url, "cid", None).unwrap(), None);
        assert_eq!(
            optional_cid("m", &url, "cid", Some(good))
                .unwrap()
                .as_deref(),
            Some(good)
        );
        let e = optional_cid("m", &url, "commit.cid", Some("bafyreih8")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "m at https://pds.example: commit.cid is not a CID"
        );
        assert_eq!(e.code(), "upstream_invalid");
    }
}
