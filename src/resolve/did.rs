//! DID resolution over HTTP: `did:plc` from a PLC directory
//! (<https://web.plc.directory/spec/v0.1/did-plc>), `did:web` from
//! `https://<host>/.well-known/did.json` (<https://w3c-ccg.github.io/did-method-web/>,
//! hostname only: ATProto does not use did:web paths).
//!
//! With [`PlcTrust::Log`] (the default), a `did:plc` document is taken only when the DID's
//! signed operation log, fetched beside it, proves the same key, PDS and handle
//! ([`crate::plc`]).

use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use url::Url;

use super::{DidResolver, ResolveError};
use crate::did_document::{DidDocument, MAX_DOCUMENT_BYTES};
use crate::net::HttpClient;
use crate::plc::{self, PlcIdentity};
use crate::syntax::Did;

/// What a `did:plc` identity is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlcTrust {
    /// The DID's signed operation log (`/<did>/log/audit`), checked against the DID and
    /// compared with the document: the directory is only a mirror.
    #[default]
    Log,
    /// The directory's document as served: the directory is trusted (for a directory or
    /// mirror that does not serve the audit log).
    Directory,
}

impl std::str::FromStr for PlcTrust {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "log" => Ok(PlcTrust::Log),
            "directory" => Ok(PlcTrust::Directory),
            other => Err(format!(
                "expected `log` or `directory`, found {:?}",
                crate::syntax::text::outside(other)
            )),
        }
    }
}

/// Resolves `did:plc` and `did:web`.
#[derive(Debug, Clone)]
pub struct HttpDidResolver {
    http: HttpClient,
    plc: Url,
    plc_trust: PlcTrust,
}

impl HttpDidResolver {
    /// A resolver asking the PLC directory at `plc` (e.g. `https://plc.directory`).
    pub fn new(http: HttpClient, plc: Url, plc_trust: PlcTrust) -> Self {
        HttpDidResolver {
            http,
            plc,
            plc_trust,
        }
    }

    fn document_url(&self, did: &Did) -> Result<Url, ResolveError> {
        let invalid = |reason: String| ResolveError::Invalid {
            what: format!("DID {did}"),
            reason,
        };
        match did.method() {
            "plc" => {
                let mut url = self.plc.clone();
                url.path_segments_mut()
                    .map_err(|()| invalid(format!("PLC URL {} cannot take a path", self.plc)))?
                    .pop_if_empty()
                    .push(did.as_str());
                Ok(url)
            }
            "web" => {
                let id = did.as_str().strip_prefix("did:web:").unwrap_or("");
                if id.contains(':') {
                    return Err(invalid(
                        "did:web with a path is not supported by ATProto".into(),
                    ));
                }
                // A port is percent-encoded as %3A.
                let host = id.replace("%3A", ":").replace("%3a", ":");
                let scheme = if self.http.config().guard.allow_private_addresses {
                    // Local testing only: the switch also allows plain HTTP.
                    if host.starts_with("localhost") || host.starts_with("127.") {
                        "http"
                    } else {
                        "https"
                    }
                } else {
                    "https"
                };
                Url::parse(&format!("{scheme}://{host}/.well-known/did.json"))
                    .map_err(|e| invalid(format!("did:web host {host:?}: {e}")))
            }
            other => Err(invalid(format!(
                "DID method {other:?} is not supported (did:plc and did:web are)"
            ))),
        }
    }
}

impl HttpDidResolver {
    /// GETs `url`, up to `limit` bytes, mapping the statuses a directory or did:web host
    /// answers for a missing (404) or deactivated (410) DID.
    async fn fetch(
        &self,
        did: &Did,
        what: &str,
        url: &Url,
        accept: &'static str,
        limit: usize,
    ) -> Result<Vec<u8>, ResolveError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(accept));
        let answer = self.http.get(url, headers, limit).await?;
        match answer.status {
            StatusCode::OK => Ok(answer.body),
            StatusCode::NOT_FOUND => Err(ResolveError::NotFound {
                what: format!("{what} of {did}"),
            }),
            StatusCode::GONE => Err(ResolveError::Deactivated { did: did.clone() }),
            other => Err(super::unexpected_status(
                format!("{what} of {did}"),
                url,
                other,
            )),
        }
    }

    async fn document_bytes(&self, did: &Did, url: &Url) -> Result<Vec<u8>, ResolveError> {
        let accept = "application/did+ld+json, application/json";
        self.fetch(did, "DID document", url, accept, MAX_DOCUMENT_BYTES)
            .await
    }

    /// The document, taken only when the operation log proves what it says. Both are
    /// fetched at once: the log costs one request, not one more round trip.
    async fn proven_document(
        &self,
        did: &Did,
        url: &Url,
    ) -> Result<(DidDocument, RawIdentity), ResolveError> {
        let mut log_url = url.clone();
        log_url
            .path_segments_mut()
            .map_err(|()| ResolveError::Invalid {
                what: format!("DID {did}"),
                reason: format!("PLC URL {} cannot take a path", self.plc),
            })?
            .extend(["log", "audit"]);
        let log = self.fetch(
            did,
            "operation log",
            &log_url,
            "application/json",
            plc::MAX_LOG_BYTES,
        );
        let (log, document) = futures_util::future::join(log, self.document_bytes(did, url)).await;
        let log = log?;
        // A tombstone says "deactivated" even when the document is gone.
        let state = proven_state(did, &log)?;
        let raw = RawIdentity {
            document: document?,
            log: Some(log),
        };
        let document = proven_by(did, &state, &raw.document)?;
        Ok((document, raw))
    }

    /// As [`DidResolver::resolve`], with the bytes the document was taken from: the
    /// document and, for `did:plc` under [`PlcTrust::Log`], the operation log (for recording
    /// them in a bundle, `crate::bundle`).
    pub async fn resolve_raw(&self, did: &Did) -> Result<(DidDocument, RawIdentity), ResolveError> {
        let url = self.document_url(did)?;
        if did.method() == "plc" && self.plc_trust == PlcTrust::Log {
            self.proven_document(did, &url).await
        } else {
            let document = self.document_bytes(did, &url).await?;
            let parsed = parse_document(did, &document)?;
            Ok((
                parsed,
                RawIdentity {
                    document,
                    log: None,
                },
            ))
        }
    }
}

/// A DID's identity as its hosts served it: the DID document's bytes and, for `did:plc`, the
/// operation log's (`/log/audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawIdentity {
    /// The DID document.
    pub document: Vec<u8>,
    /// The `did:plc` operation log, when fetched.
    pub log: Option<Vec<u8>>,
}

/// The document of `did` from its bytes, checked as the resolver checks it under
/// [`PlcTrust::Log`]: a `did:plc` document only when its operation log (which must be
/// there) proves the same key, PDS and handles. Pure: the same check for bytes from the
/// network and from a bundle.
pub fn proven_identity(did: &Did, raw: &RawIdentity) -> Result<DidDocument, ResolveError> {
    if did.method() != "plc" {
        return parse_document(did, &raw.document);
    }
    let Some(log) = &raw.log else {
        return Err(ResolveError::Invalid {
            what: format!("identity of {did}"),
            reason:
                "no operation log: a did:plc document is taken only with the log that proves it"
                    .into(),
        });
    };
    let state = proven_state(did, log)?;
    proven_by(did, &state, &raw.document)
}

fn parse_document(did: &Did, bytes: &[u8]) -> Result<DidDocument, ResolveError> {
    DidDocument::parse(did, bytes).map_err(|e| ResolveError::Invalid {
        what: format!("DID document of {did}"),
        reason: crate::syntax::text::outside(&e.to_string()),
    })
}

fn unproven(did: &Did, source: plc::PlcLogError) -> ResolveError {
    ResolveError::Unproven {
        did: did.clone(),
        source: Box::new(source),
    }
}

/// What the operation log proves now; a tombstone is [`ResolveError::Deactivated`].
fn proven_state(did: &Did, log: &[u8]) -> Result<plc::PlcState, ResolveError> {
    match plc::audit(did, log).map_err(|e| unproven(did, e))? {
        PlcIdentity::Tombstoned => Err(ResolveError::Deactivated { did: did.clone() }),
        PlcIdentity::Active(state) => Ok(state),
    }
}

/// The document, when `state` proves what it says.
fn proven_by(did: &Did, state: &plc::PlcState, bytes: &[u8]) -> Result<DidDocument, ResolveError> {
    let document = parse_document(did, bytes)?;
    state
        .check_document(&document)
        .map_err(|e| unproven(did, e))?;
    Ok(document)
}

impl DidResolver for HttpDidResolver {
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
        Box::pin(async move { self.resolve_raw(did).await.map(|(document, _)| document) })
    }
}
