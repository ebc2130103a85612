//! The backfill of the [`SignatureIndex`]: a trusted signer's signature collection read page
//! by page with `com.atproto.repo.listRecords`.
//!
//! The pages come from the signer's PDS and are hostile like everything else: a PDS that
//! answers empty pages with ever new cursors, cursors that come back, or one record per page
//! must not keep the backfill going. It stops at the first page that lists no record (before
//! the digest filter), at a cursor seen before, after `max` listed records, and after a
//! bounded number of pages.

use std::collections::HashSet;

use url::Url;

use super::{Revocations, SignatureIndex};
use crate::resolve::RecordSource;
use crate::syntax::Did;

/// Records a `listRecords` page holds when full (the `limit` the client asks for).
const PAGE: usize = 100;

/// Pages read at least before the page bound stops a backfill (PDSes may answer pages
/// shorter than asked); the bound is `max / PAGE + 1` when that is larger.
const MIN_PAGES: usize = 1_000;

/// Why a backfill stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The last page: no cursor, or a page listing no record.
    End,
    /// `max` records listed.
    Max,
    /// A cursor came back.
    RepeatedCursor,
    /// The page bound was reached.
    Pages,
}

/// What a backfill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backfilled {
    /// Records newly indexed (or moved to another digest).
    pub indexed: usize,
    /// Records the pages listed.
    pub listed: usize,
    /// Pages read.
    pub pages: usize,
    /// Why it stopped.
    pub stop: Stop,
}

/// The page bound of a backfill of `max` records.
fn max_pages(max: usize) -> usize {
    (max / PAGE).saturating_add(1).max(MIN_PAGES)
}

/// Indexes the records of `did`'s `collection` at `pds` that name an image digest, from at
/// most `max` listed records; answers rendered before a page that indexed something are
/// rendered again (`revocations.touch()`).
pub(crate) async fn backfill(
    source: &dyn RecordSource,
    pds: &Url,
    did: &Did,
    collection: &str,
    max: usize,
    index: &SignatureIndex,
    revocations: &Revocations,
) -> Result<Backfilled, String> {
    let mut cursor: Option<String> = None;
    let mut cursors = HashSet::new();
    let mut done = Backfilled {
        indexed: 0,
        listed: 0,
        pages: 0,
        stop: Stop::Pages,
    };
    let pages = max_pages(max);
    while done.pages < pages {
        if done.listed >= max {
            done.stop = Stop::Max;
            break;
        }
        let page = source
            .list_records(pds, did, collection, cursor.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        done.pages += 1;
        let listed = page.listed.max(page.records.len());
        let room = max - done.listed;
        let mut indexed = 0;
        for (uri, digest) in page.records.into_iter().take(room) {
            if index.insert(uri, digest) {
                indexed += 1;
            }
        }
        done.listed = done.listed.saturating_add(listed);
        done.indexed += indexed;
        if indexed > 0 {
            revocations.touch();
        }
        if listed == 0 {
            done.stop = Stop::End;
            break;
        }
        match page.cursor {
            None => {
                done.stop = Stop::End;
                break;
            }
            // A cursor seen before would page in a loop.
            Some(next) if !cursors.insert(next.clone()) => {
                done.stop = Stop::RepeatedCursor;
                break;
            }
            Some(next) => cursor = Some(next),
        }
    }
    if done.stop == Stop::Pages && done.listed >= max {
        done.stop = Stop::Max;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::future::BoxFuture;

    use super::*;
    use crate::resolve::{RecordPage, ResolveError};
    use crate::syntax::{AtUri, ImageDigest};

    const DID: &str = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    const COLLECTION: &str = "io.atcr.manifest";

    /// A PDS whose pages never end: `page(n)` is the n-th page (from 0). Past `GIVE_UP`
    /// calls it fails, so that a backfill that would page forever ends the test with an
    /// error instead of hanging it.
    #[derive(Debug)]
    struct Endless {
        page: fn(usize) -> RecordPage,
        calls: Mutex<usize>,
    }

    const GIVE_UP: usize = 100_000;

    impl Endless {
        fn new(page: fn(usize) -> RecordPage) -> Self {
            Endless {
                page,
                calls: Mutex::new(0),
            }
        }

        fn calls(&self) -> usize {
            *self.calls.lock().unwrap()
        }
    }

    impl RecordSource for Endless {
        fn get_record<'a>(
            &'a self,
            _: &'a Url,
            _: &'a AtUri,
        ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>> {
            Box::pin(async {
                Err(ResolveError::Invalid {
                    what: "record".into(),
                    reason: "none".into(),
                })
            })
        }

        fn list_records<'a>(
            &'a self,
            _: &'a Url,
            _: &'a Did,
            _: &'a str,
            _: Option<&'a str>,
        ) -> BoxFuture<'a, Result<RecordPage, ResolveError>> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                *calls += 1;
                *calls - 1
            };
            let page = (self.page)(n);
            Box::pin(async move {
                if n >= GIVE_UP {
                    return Err(ResolveError::Invalid {
                        what: "listing".into(),
                        reason: "still paging".into(),
                    });
                }
                Ok(page)
            })
        }
    }

    fn record(n: usize) -> (AtUri, ImageDigest) {
        (
            format!("at://{DID}/{COLLECTION}/3k{n}").parse().unwrap(),
            format!("sha256:{n:064x}").parse().unwrap(),
        )
    }

    async fn run(source: &Endless, max: usize) -> Result<Backfilled, String> {
        let pds: Url = "https://pds.example".parse().unwrap();
        let did: Did = DID.parse().unwrap();
        backfill(
            source,
            &pds,
            &did,
            COLLECTION,
            max,
            &SignatureIndex::default(),
            &Revocations::default(),
        )
        .await
    }

    #[tokio::test]
    async fn empty_pages_with_new_cursors_end_the_backfill() {
        let pds = Endless::new(|n| RecordPage {
            cursor: Some(format!("c{n}")),
            ..RecordPage::default()
        });
        let done = run(&pds, 10_000).await.expect("terminates");
        assert_eq!((done.stop, done.pages, pds.calls()), (Stop::End, 1, 1));
    }

    #[tokio::test]
    async fn a_cursor_that_comes_back_ends_the_backfill() {
        // Pages of records that name no digest (filtered out), cursors a, b, a, b, …
        let pds = Endless::new(|n| RecordPage {
            listed: 100,
            cursor: Some(if n % 2 == 0 { "a" } else { "b" }.into()),
            ..RecordPage::default()
        });
        let done = run(&pds, 10_000).await.expect("terminates");
        assert_eq!((done.stop, done.pages), (Stop::RepeatedCursor, 3));
    }

    #[tokio::test]
    async fn listed_records_count_toward_max_even_when_filtered_out() {
        let pds = Endless::new(|n| RecordPage {
            listed: 100,
            cursor: Some(format!("c{n}")),
            ..RecordPage::default()
        });
        let done = run(&pds, 1_000).await.expect("terminates");
        assert_eq!((done.stop, done.pages, done.listed), (Stop::Max, 10, 1_000));
    }

    #[tokio::test]
    async fn one_record_pages_stop_at_the_page_bound() {
        let pds = Endless::new(|n| RecordPage {
            records: vec![record(n)],
            listed: 1,
            cursor: Some(format!("c{n}")),
        });
        let done = run(&pds, 1_000_000).await.expect("terminates");
        assert_eq!(done.stop, Stop::Pages);
        assert_eq!(done.pages, max_pages(1_000_000));
        assert_eq!(
            (done.pages, done.indexed),
            (10_001, 10_000),
            "10,000 per DID"
        );
    }

    #[tokio::test]
    async fn an_honest_listing_is_read_to_its_end() {
        let pds = Endless::new(|n| RecordPage {
            records: (n * 100..n * 100 + 100).map(record).collect(),
            listed: 100,
            cursor: (n < 4).then(|| format!("c{n}")),
        });
        let done = run(&pds, 10_000).await.unwrap();
        assert_eq!((done.stop, done.pages, done.indexed), (Stop::End, 5, 500));
    }
}
