//! DID resolution over HTTP: `did:plc` from a PLC directory
//! (<https://web.plc.directory/spec/v0.1/did-plc>), `did:web` from
//! `https://<host>/.well-known/did.json` (<https://w3c-ccg.github.io/did-method-web/>,
//! hostname only: ATProto does not use did:web paths).

use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use url::Url;

use super::{DidResolver, ResolveError};
use crate::did_document::{DidDocument, MAX_DOCUMENT_BYTES};
use crate::net::HttpClient;
use crate::syntax::Did;

/// Resolves `did:plc` and `did:web`.
#[derive(Debug, Clone)]
pub struct HttpDidResolver {
    http: HttpClient,
    plc: Url,
}

impl HttpDidResolver {
    /// A resolver asking the PLC directory at `plc` (e.g. `https://plc.directory`).
    pub fn new(http: HttpClient, plc: Url) -> Self {
        HttpDidResolver { http, plc }
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

impl DidResolver for HttpDidResolver {
    fn resolve<'a>(&'a self, did: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
        Box::pin(async move {
            let url = self.document_url(did)?;
            let mut headers = HeaderMap::new();
            headers.insert(
                ACCEPT,
                HeaderValue::from_static("application/did+ld+json, application/json"),
            );
            let answer = self.http.get(&url, headers, MAX_DOCUMENT_BYTES).await?;
            match answer.status {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => {
                    return Err(ResolveError::NotFound {
                        what: format!("DID {did}"),
                    });
                }
                StatusCode::GONE => return Err(ResolveError::Deactivated { did: did.clone() }),
                other => {
                    return Err(super::unexpected_status(
                        format!("DID document of {did}"),
                        &url,
                        other,
                    ));
                }
            }
            DidDocument::parse(did, &answer.body).map_err(|e| ResolveError::Invalid {
                what: format!("DID document of {did}"),
                reason: crate::syntax::text::outside(&e.to_string()),
            })
        })
    }
}
