//! Repo proofs from a PDS: `com.atproto.sync.getRecord`
//! (<https://docs.bsky.app/docs/api/com-atproto-sync-get-record>), a CAR holding the
//! signed commit, the MST path and the record.

use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use serde::Deserialize;
use url::Url;

use super::{RecordPage, RecordSource, ResolveError};
use crate::net::HttpClient;
use crate::proof::CarLimits;
use crate::syntax::text::xrpc_error_code;
use crate::syntax::{AtUri, Did};

/// Fetches getRecord CARs over HTTP.
#[derive(Debug, Clone)]
pub struct HttpRecordSource {
    http: HttpClient,
    limits: CarLimits,
}

impl HttpRecordSource {
    /// A source reading at most `limits.max_total_bytes` per proof.
    pub fn new(http: HttpClient, limits: CarLimits) -> Self {
        HttpRecordSource { http, limits }
    }
}

/// An XRPC error body.
#[derive(Deserialize)]
struct XrpcError {
    #[serde(default)]
    error: Option<String>,
}

/// Records read per `listRecords` page (the XRPC maximum).
const LIST_PAGE: &str = "100";
/// The most a `listRecords` page may weigh.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Deserialize)]
struct WireList {
    #[serde(default)]
    records: Vec<WireListed>,
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Deserialize)]
struct WireListed {
    uri: String,
    #[serde(default)]
    value: Option<WireValue>,
}

#[derive(Deserialize)]
struct WireValue {
    #[serde(default)]
    digest: Option<String>,
}

impl HttpRecordSource {
    async fn list(
        &self,
        pds: &Url,
        did: &Did,
        collection: &str,
        cursor: Option<&str>,
    ) -> Result<RecordPage, ResolveError> {
        let mut url = pds
            .join("/xrpc/com.atproto.repo.listRecords")
            .map_err(|e| ResolveError::Invalid {
                what: format!("PDS URL {pds}"),
                reason: e.to_string(),
            })?;
        url.query_pairs_mut()
            .append_pair("repo", did.as_str())
            .append_pair("collection", collection)
            .append_pair("limit", LIST_PAGE);
        if let Some(c) = cursor {
            url.query_pairs_mut().append_pair("cursor", c);
        }
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let answer = self.http.get(&url, headers, MAX_LIST_BYTES).await?;
        if answer.status != StatusCode::OK {
            return Err(super::unexpected_status(
                format!("records of {did} in {collection}"),
                &url,
                answer.status,
            ));
        }
        let wire: WireList =
            serde_json::from_slice(&answer.body).map_err(|e| ResolveError::Invalid {
                what: format!("listRecords of {did} in {collection} from {pds}"),
                reason: e.to_string(),
            })?;
        // Only records of this repo and collection, naming a well-formed digest, are kept:
        // the page is the PDS's word, a pointer at most.
        let listed = wire.records.len();
        let records = wire
            .records
            .into_iter()
            .filter_map(|r| {
                let uri: AtUri = r.uri.parse().ok()?;
                if uri.did() != did || uri.collection().as_str() != collection {
                    return None;
                }
                let digest = r.value?.digest?.parse().ok()?;
                Some((uri, digest))
            })
            .collect();
        let cursor = wire.cursor.filter(|c| !c.is_empty() && c.len() <= 512);
        Ok(RecordPage {
            records,
            listed,
            cursor,
        })
    }
}

impl RecordSource for HttpRecordSource {
    fn list_records<'a>(
        &'a self,
        pds: &'a Url,
        did: &'a Did,
        collection: &'a str,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, Result<RecordPage, ResolveError>> {
        Box::pin(self.list(pds, did, collection, cursor))
    }

    fn get_record<'a>(
        &'a self,
        pds: &'a Url,
        uri: &'a AtUri,
    ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>> {
        Box::pin(async move {
            let mut url = pds.join("/xrpc/com.atproto.sync.getRecord").map_err(|e| {
                ResolveError::Invalid {
                    what: format!("PDS URL {pds}"),
                    reason: e.to_string(),
                }
            })?;
            url.query_pairs_mut()
                .append_pair("did", uri.did().as_str())
                .append_pair("collection", uri.collection().as_str())
                .append_pair("rkey", uri.rkey().as_str());
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static("application/vnd.ipld.car"));
            let answer = self
                .http
                .get(&url, headers, self.limits.max_total_bytes)
                .await?;
            if answer.status == StatusCode::OK {
                return Ok(answer.body);
            }
            // The code is the PDS's text: kept only when it is shaped like an XRPC code.
            let code = serde_json::from_slice::<XrpcError>(&answer.body)
                .ok()
                .and_then(|e| e.error)
                .map(|c| match xrpc_error_code(&c) {
                    Some(_) => c,
                    None => "not an XRPC error code".to_owned(),
                })
                .unwrap_or_default();
            match (answer.status, code.as_str()) {
                (_, "RecordNotFound") | (StatusCode::NOT_FOUND, _) => Err(ResolveError::NotFound {
                    what: format!("record {uri} on {pds} (deleted, or never written)"),
                }),
                (_, "RepoNotFound" | "RepoDeactivated" | "RepoTakendown" | "RepoSuspended") => {
                    Err(ResolveError::NotFound {
                        what: format!("repo of {} on {pds} ({code})", uri.did()),
                    })
                }
                (status, _) => Err(super::unexpected_status(
                    format!(
                        "proof of {uri}{}",
                        if code.is_empty() {
                            String::new()
                        } else {
                            format!(" ({code})")
                        }
                    ),
                    &url,
                    status,
                )),
            }
        })
    }
}
