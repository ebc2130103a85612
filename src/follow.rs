//! Following trusted signers (`serve`, on by default): their repo event streams
//! (`com.atproto.sync.subscribeRepos`) tell at once when a signature record is deleted or
//! updated, or a signer's identity or account changes, and the engine forgets what rested
//! on it ([`Revocations`]) instead of waiting for the TTLs.
//!
//! Which signers: every DID the loaded trust policy trusts, re-read at each refresh (so a
//! policy reload adds and drops subscriptions). Where: each DID's PDS as its proven DID
//! document names it (through the engine's cached resolver; a document change shows at the
//! next refresh), one subscription per PDS for all the trusted DIDs it hosts, at most
//! `max_subscriptions`; or, with a relay, that one stream for all. A PDS stream carries
//! every repo it hosts: other repos' events are ignored ([`frame::revocations`]).
//!
//! Events only ever shorten what is cached: nothing becomes verified because of an event,
//! and an event is never taken as proof (each record is still proven by `getRecord`). A
//! subscription that drops reconnects with backoff and resumes from the last sequence number
//! seen; while it is down the ordinary TTLs apply. A subscription that starts without a
//! cursor (its first connection, or no event yet) forgets the trusted DIDs' cached facts
//! once: what happened before it listened is not known.

pub mod frame;
pub mod socket;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use crate::net::Guard;
use crate::policy::PolicyHolder;
use crate::syntax::Did;
use crate::verify::{Revocations, SignatureIndex, Verifier};
use frame::{Event, Indexing, Interest, Revoke};

/// Follower settings (flags of `serve`).
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// One relay to follow instead of each signer's PDS.
    pub relay: Option<Url>,
    /// Subscriptions at most (PDS streams).
    pub max_subscriptions: usize,
    /// Outbound rules for stream URLs.
    pub guard: Guard,
    /// Time allowed to connect (TCP, TLS, WebSocket handshake each).
    pub connect_timeout: Duration,
    /// How often the trusted DIDs and their PDSes are re-read.
    pub refresh: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Records read per trusted DID and signature collection by the backfill at most.
    pub max_backfill: usize,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig {
            relay: None,
            max_subscriptions: 64,
            guard: Guard::default(),
            connect_timeout: Duration::from_secs(5),
            refresh: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            max_backfill: 10_000,
        }
    }
}

/// A subscription's state, as `/metrics` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Opening the stream.
    Connecting,
    /// Reading events.
    Live,
    /// Waiting before the next attempt.
    Backoff,
}

impl State {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Live => "live",
            State::Backoff => "backoff",
        }
    }
}

/// What the follower has done, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct FollowStats {
    states: Mutex<HashMap<String, State>>,
    events: Mutex<BTreeMap<&'static str, u64>>,
    /// Frames refused (over the cap, malformed).
    pub bad_frames: AtomicU64,
    /// Revocations applied (records and DIDs).
    pub revocations: AtomicU64,
    /// Streams opened (first connections and reconnections).
    pub connects: AtomicU64,
    /// Trusted DIDs left unfollowed because of `--max-subscriptions`, at the last refresh.
    pub over_cap: AtomicU64,
}

impl FollowStats {
    /// Subscriptions per state (every state present).
    pub fn states(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = [State::Connecting, State::Live, State::Backoff]
            .into_iter()
            .map(|s| (s.label(), 0))
            .collect();
        if let Ok(states) = self.states.lock() {
            for s in states.values() {
                *out.entry(s.label()).or_default() += 1;
            }
        }
        out
    }

    /// Events seen by type.
    pub fn events(&self) -> BTreeMap<&'static str, u64> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn set(&self, url: &str, state: Option<State>) {
        if let Ok(mut states) = self.states.lock() {
            match state {
                Some(s) => {
                    states.insert(url.to_owned(), s);
                }
                None => {
                    states.remove(url);
                }
            }
        }
    }

    fn event(&self, kind: &'static str) {
        if let Ok(mut events) = self.events.lock() {
            *events.entry(kind).or_default() += 1;
        }
    }
}

/// The follower of one server.
#[derive(Debug)]
pub struct Follower {
    verifier: Arc<Verifier>,
    policy: Arc<PolicyHolder>,
    config: FollowConfig,
    stats: Arc<FollowStats>,
    interest: Arc<ArcSwap<Interest>>,
    /// Woken when an identity changed, to re-read PDSes at once.
    refresh: Arc<Notify>,
}

impl Follower {
    /// A follower of the DIDs `policy` trusts, forgetting into `verifier`'s caches.
    pub fn new(verifier: Arc<Verifier>, policy: Arc<PolicyHolder>, config: FollowConfig) -> Self {
        Follower {
            verifier,
            policy,
            config,
            stats: Arc::new(FollowStats::default()),
            interest: Arc::new(ArcSwap::from_pointee(Interest::default())),
            refresh: Arc::new(Notify::new()),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<FollowStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until the runtime stops: keeps one subscription per stream the trusted DIDs
    /// need, adding and dropping them as the policy and documents change.
    pub async fn run(self) {
        let mut running: HashMap<Url, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut warned_cap = false;
        let mut unresolved = HashSet::new();
        // (DID, collection) pairs backfilled, or being backfilled.
        let backfilled: Arc<Mutex<HashSet<(Did, String)>>> = Arc::default();
        loop {
            let interest = Interest::of(&self.policy.current());
            let wanted = self.streams(&interest, &mut unresolved).await;
            self.backfill(&interest, &unresolved, &backfilled);
            self.interest.store(Arc::new(interest));
            running.retain(|url, task| {
                let keep = wanted.contains_key(url) && !task.is_finished();
                if !keep {
                    task.abort();
                    self.stats.set(url.as_str(), None);
                    tracing::info!(stream = %url, "no longer following");
                }
                keep
            });
            let mut over = 0u64;
            for (url, dids) in &wanted {
                if running.contains_key(url) {
                    continue;
                }
                if running.len() >= self.config.max_subscriptions {
                    over += *dids as u64;
                    continue;
                }
                tracing::info!(stream = %url, signers = dids, "following trusted signers");
                let sub = Subscription {
                    url: url.clone(),
                    interest: Arc::clone(&self.interest),
                    revocations: Arc::clone(self.verifier.revocations()),
                    index: Arc::clone(self.verifier.index()),
                    stats: Arc::clone(&self.stats),
                    config: self.config.clone(),
                    refresh: Arc::clone(&self.refresh),
                };
                running.insert(url.clone(), tokio::spawn(sub.run()));
            }
            self.stats.over_cap.store(over, Ordering::Relaxed);
            if over > 0 && !warned_cap {
                tracing::warn!(
                    unfollowed = over,
                    max = self.config.max_subscriptions,
                    "more PDSes than --max-subscriptions: some trusted signers are not followed \
                     (their caches expire on the TTLs only)"
                );
            }
            warned_cap = over > 0;
            tokio::select! {
                () = tokio::time::sleep(self.config.refresh) => {}
                () = self.refresh.notified() => {}
            }
        }
    }

    /// Starts the backfill of each (trusted DID, signature collection) not yet read whose
    /// PDS is known; one that fails is tried again at the next refresh.
    fn backfill(
        &self,
        interest: &Interest,
        unresolved: &HashSet<Did>,
        done: &Arc<Mutex<HashSet<(Did, String)>>>,
    ) {
        for did in interest.dids.iter().filter(|d| !unresolved.contains(*d)) {
            for collection in &interest.collections {
                let key = (did.clone(), collection.clone());
                let Ok(mut started) = done.lock() else {
                    return;
                };
                if !started.insert(key.clone()) {
                    continue;
                }
                drop(started);
                let verifier = Arc::clone(&self.verifier);
                let done = Arc::clone(done);
                let max = self.config.max_backfill;
                tokio::spawn(async move {
                    let (did, collection) = &key;
                    match verifier.backfill(did, collection, max).await {
                        Ok(n) => {
                            tracing::info!(%did, collection, indexed = n, "backfilled signature records")
                        }
                        Err(e) => {
                            tracing::warn!(%did, collection, error = %e, "backfill failed (tried again at the next refresh)");
                            if let Ok(mut d) = done.lock() {
                                d.remove(&key);
                            }
                        }
                    }
                });
            }
        }
    }

    /// The streams to follow, each with how many trusted DIDs it serves.
    /// A DID whose PDS cannot be found is logged once, until it is found again.
    async fn streams(
        &self,
        interest: &Interest,
        unresolved: &mut HashSet<Did>,
    ) -> BTreeMap<Url, usize> {
        let mut wanted = BTreeMap::new();
        if interest.dids.is_empty() {
            return wanted;
        }
        if let Some(relay) = &self.config.relay {
            match socket::stream_url(relay) {
                Ok(url) => {
                    wanted.insert(url, interest.dids.len());
                }
                Err(e) => tracing::warn!("--relay: {e}"),
            }
            return wanted;
        }
        for did in &interest.dids {
            let url = self
                .verifier
                .signer_pds(did)
                .await
                .and_then(|pds| socket::stream_url(&pds));
            match url {
                Ok(url) => {
                    *wanted.entry(url).or_default() += 1;
                    unresolved.remove(did);
                }
                Err(e) => {
                    if unresolved.insert(did.clone()) {
                        tracing::warn!(%did, error = %e, "cannot follow this signer yet (tried again at each refresh)");
                    }
                }
            }
        }
        unresolved.retain(|d| interest.dids.contains(d));
        wanted
    }
}

/// One stream, reconnected for as long as it is wanted.
struct Subscription {
    url: Url,
    interest: Arc<ArcSwap<Interest>>,
    revocations: Arc<Revocations>,
    index: Arc<SignatureIndex>,
    stats: Arc<FollowStats>,
    config: FollowConfig,
    refresh: Arc<Notify>,
}

/// The first wait before reconnecting; doubled per failure up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

impl Subscription {
    async fn run(self) {
        let mut cursor: Option<i64> = None;
        let mut backoff = FIRST_BACKOFF;
        let shown = self.url.as_str().to_owned();
        loop {
            self.stats.set(&shown, Some(State::Connecting));
            let mut url = self.url.clone();
            if let Some(c) = cursor {
                url.query_pairs_mut().append_pair("cursor", &c.to_string());
            }
            match socket::connect(&url, &self.config.guard, self.config.connect_timeout).await {
                Ok(mut ws) => {
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    self.stats.set(&shown, Some(State::Live));
                    tracing::info!(stream = %shown, cursor, "subscribed");
                    if cursor.is_none() {
                        // What happened before we listened is unknown: forget it once.
                        for did in &self.interest.load().dids {
                            self.revocations.revoke_did(did);
                        }
                    }
                    while let Some(message) = ws.next().await {
                        let bytes = match message {
                            Ok(Message::Binary(bytes)) => bytes,
                            Ok(Message::Close(_)) => break,
                            Ok(_) => continue,
                            Err(e) => {
                                tracing::warn!(stream = %shown, error = %e, "stream failed");
                                break;
                            }
                        };
                        backoff = FIRST_BACKOFF;
                        match frame::decode(&bytes) {
                            Ok(event) => {
                                if !self.handle(&event, &mut cursor) {
                                    break;
                                }
                            }
                            Err(e) => {
                                // Resume from the last good event after a pause; the TTLs
                                // bound what a stream that keeps sending garbage can hide.
                                self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(stream = %shown, error = %e, "refused a frame");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe"),
            }
            self.stats.set(&shown, Some(State::Backoff));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// Applies one event; false when the stream should be dropped (an error frame).
    fn handle(&self, event: &Event, cursor: &mut Option<i64>) -> bool {
        self.stats.event(event.kind());
        let interest = self.interest.load();
        for change in frame::indexing(event, &interest) {
            match change {
                Indexing::Put(uri, digest) => {
                    // A kept "not verified" for that digest is rendered again (with the new
                    // pointer, which is then proven).
                    if self.index.insert(uri, digest) {
                        self.revocations.touch();
                    }
                }
                Indexing::Remove(uri) => self.index.remove(&uri),
            }
        }
        for revoke in frame::revocations(event, &interest) {
            self.stats.revocations.fetch_add(1, Ordering::Relaxed);
            match revoke {
                Revoke::Record(uri) => {
                    tracing::info!(record = %uri, "signature record changed: its proofs are forgotten");
                    self.revocations.revoke_record(&uri);
                }
                Revoke::Did(did) => {
                    tracing::info!(%did, event = event.kind(), "signer changed: its document and proofs are forgotten");
                    self.revocations.revoke_did(&did);
                    self.refresh.notify_one();
                }
            }
        }
        if let Some(seq) = event.seq() {
            *cursor = Some(seq);
        }
        match event {
            Event::Error { error, message } => {
                tracing::warn!(stream = %self.url, error, message, "the stream reported an error");
                false
            }
            Event::Info { name, message } => {
                tracing::info!(stream = %self.url, name, message, "stream info");
                if name == "OutdatedCursor" {
                    // Events were missed: forget what they might have revoked.
                    for did in &self.interest.load().dids {
                        self.revocations.revoke_did(did);
                    }
                }
                true
            }
            _ => true,
        }
    }
}
