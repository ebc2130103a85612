//! Following trusted signers (`serve`, on by default): their repo event streams
//! (`com.atproto.sync.subscribeRepos`) tell at once when a signature record is deleted or
//! updated, or a signer's identity or account changes, and the engine forgets what rested
//! on it ([`Revocations`]) instead of waiting for the TTLs.
//!
//! Which signers: every DID the loaded trust policy trusts, re-read at each refresh (so a
//! policy reload adds and drops subscriptions). Where: each DID's PDS as its proven DID
//! document names it (through the engine's cached resolver: the document is loaded again only
//! after the DID TTL, or at once after an `#identity` event revoked it, so a PDS move shows
//! then), one subscription per PDS for the trusted DIDs it hosts, at most
//! `max_subscriptions`; or, with a relay, that one stream for all. Each subscription acts on
//! its hosted DIDs only (kept current at each refresh): a PDS stream carries every repo it
//! hosts, and the events of any other repo — untrusted, or a trusted DID hosted elsewhere —
//! neither revoke nor index anything ([`frame::revocations`], [`frame::indexing`]).
//!
//! Events only ever shorten what is cached: nothing becomes verified because of an event,
//! and an event is never taken as proof (each record is still proven by `getRecord`). A
//! subscription that drops reconnects with backoff (reset only once an event was handled)
//! and resumes from the last sequence number seen; while it is down the ordinary TTLs
//! apply. A live stream is pinged every 30 s (`PING_INTERVAL`) and dropped after
//! 90 s (`IDLE_TIMEOUT`) without an inbound message. A cursor the server refuses
//! (`FutureCursor`, `OutdatedCursor`), or at which 3 (`MAX_FAILURES_AT_CURSOR`) connections
//! in a row ended without an event handled (a frame there that cannot be read), is dropped.
//! A subscription that starts without a cursor (its first connection, no event yet, or a
//! dropped cursor) forgets its hosted DIDs' cached facts once: what happened before it
//! listened is not known. Then the follower backfills them (`listRecords` of each signature
//! collection into the [`SignatureIndex`](crate::verify::SignatureIndex)): only once the
//! stream is live, so that no record signed in between is missed; loading each signer's
//! document first, so that it is warm again for the next cold verification.

pub mod frame;
pub mod socket;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{self, Message};
use url::Url;

use crate::net::Guard;
use crate::policy::PolicyHolder;
use crate::syntax::Did;
use crate::verify::Verifier;
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
    /// The first wait before reconnecting; doubled per failure up to `max_backoff`, back to
    /// this after an event is handled.
    pub first_backoff: Duration,
    /// How often a live stream is pinged.
    pub ping_interval: Duration,
    /// A live stream with no inbound message (a Pong included) for this long is reconnected.
    pub idle_timeout: Duration,
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
            first_backoff: FIRST_BACKOFF,
            ping_interval: PING_INTERVAL,
            idle_timeout: IDLE_TIMEOUT,
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
    /// Each stream's state, with the id of the task that set it.
    states: Mutex<HashMap<String, (u64, State)>>,
    /// Ids of subscription tasks.
    next_task: AtomicU64,
    events: Mutex<BTreeMap<&'static str, u64>>,
    /// Frames refused (over the cap, malformed), and cursors dropped (refused by the server,
    /// or failing 3 times in a row).
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
            for (_, s) in states.values() {
                *out.entry(s.label()).or_default() += 1;
            }
        }
        out
    }

    /// Events seen by type.
    pub fn events(&self) -> BTreeMap<&'static str, u64> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Task `task` of stream `url` is in `state` now.
    fn set(&self, url: &str, task: u64, state: State) {
        if let Ok(mut states) = self.states.lock() {
            states.insert(url.to_owned(), (task, state));
        }
    }

    /// Task `task` of stream `url` ended: its state goes (unless a newer task's is there).
    fn clear(&self, url: &str, task: u64) {
        if let Ok(mut states) = self.states.lock()
            && states.get(url).is_some_and(|&(t, _)| t == task)
        {
            states.remove(url);
        }
    }

    fn task_id(&self) -> u64 {
        self.next_task.fetch_add(1, Ordering::Relaxed)
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
    /// Woken when an identity changed, to re-read PDSes at once.
    refresh: Arc<Notify>,
    /// Backfills running at once at most.
    backfills: Arc<tokio::sync::Semaphore>,
}

impl Follower {
    /// A follower of the DIDs `policy` trusts, forgetting into `verifier`'s caches.
    pub fn new(verifier: Arc<Verifier>, policy: Arc<PolicyHolder>, config: FollowConfig) -> Self {
        Follower {
            verifier,
            policy,
            config,
            stats: Arc::new(FollowStats::default()),
            refresh: Arc::new(Notify::new()),
            backfills: Arc::new(tokio::sync::Semaphore::new(BACKFILL_CONCURRENCY)),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<FollowStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until the runtime stops: keeps one subscription per stream the trusted DIDs
    /// need, adding and dropping them as the policy and documents change.
    pub async fn run(self) {
        let mut running: HashMap<Url, Running> = HashMap::new();
        let mut warned_cap = false;
        let mut unresolved = HashSet::new();
        let backfilled = Backfills::default();
        loop {
            let began = tokio::time::Instant::now();
            let interest = Interest::of(&self.policy.current());
            let wanted = self.streams(&interest, &mut unresolved).await;
            running.retain(|url, running| {
                let keep = wanted.contains_key(url) && !running.task.is_finished();
                if !keep {
                    running.task.abort();
                    self.stats.clear(url.as_str(), running.id);
                    tracing::info!(stream = %url, "no longer following");
                }
                keep
            });
            let mut unfollowed: Vec<Did> = Vec::new();
            for (url, dids) in wanted {
                let hosted = Arc::new(interest.hosted(dids));
                if let Some(current) = running.get(&url) {
                    let before = current.hosted.load();
                    let joined = hosted.joined_since(&before);
                    let left = before.dids.difference(&hosted.dids).count();
                    if left > 0 {
                        tracing::info!(stream = %url, signers = left, "following fewer trusted signers on this stream");
                    }
                    // Stored first: its events count from now on; then what happened before
                    // (while they did not) is forgotten, and read again by a backfill.
                    current.hosted.store(hosted);
                    if !joined.is_empty() {
                        for did in &joined {
                            self.verifier.revocations().revoke_did(did);
                        }
                        backfilled.forget(|(did, _)| joined.contains(did));
                        tracing::info!(stream = %url, signers = joined.len(), "following more trusted signers on this stream (their cached facts are forgotten)");
                    }
                    continue;
                }
                if running.len() >= self.config.max_subscriptions {
                    unfollowed.extend(hosted.dids.iter().cloned());
                    continue;
                }
                tracing::info!(stream = %url, signers = hosted.dids.len(), "following trusted signers");
                let hosted = Arc::new(ArcSwap::new(hosted));
                let listening = Arc::new(AtomicBool::new(false));
                let id = self.stats.task_id();
                let sub = Subscription {
                    task: id,
                    url: url.clone(),
                    interest: Arc::clone(&hosted),
                    verifier: Arc::clone(&self.verifier),
                    stats: Arc::clone(&self.stats),
                    config: self.config.clone(),
                    refresh: Arc::clone(&self.refresh),
                    backfilled: backfilled.clone(),
                    listening: Arc::clone(&listening),
                };
                let task = tokio::spawn(sub.run());
                running.insert(
                    url,
                    Running {
                        task,
                        id,
                        hosted,
                        listening,
                    },
                );
            }
            // After the interests are current: a DID a stream has just taken on is read
            // after its events started counting.
            self.backfill(&running, &backfilled);
            let over = unfollowed.len();
            self.stats.over_cap.store(over as u64, Ordering::Relaxed);
            if over > 0 && !warned_cap {
                unfollowed.sort();
                let named: Vec<String> = unfollowed.iter().take(10).map(Did::to_string).collect();
                tracing::warn!(
                    unfollowed = over,
                    max = self.config.max_subscriptions,
                    signers = %named.join(" "),
                    "more PDSes than --max-subscriptions: some trusted signers are not followed \
                     (their caches expire on the TTLs only; the first 10 are named)"
                );
            }
            warned_cap = over > 0;
            next_refresh(&self.refresh, began, self.config.refresh).await;
        }
    }

    /// Starts the backfill of each (trusted DID, signature collection) of a stream that is
    /// listening, not read since that stream last started without a cursor (or took the DID
    /// on); one that fails is tried again at the next refresh. So every listing begins after
    /// the events that follow it are being read: no record signed in between is missed.
    /// At most [`BACKFILL_CONCURRENCY`] run at once, each for [`BACKFILL_DEADLINE`] at most;
    /// one asked for again while it runs runs once more when it ends (never two of one pair
    /// at once).
    fn backfill(&self, running: &HashMap<Url, Running>, done: &Backfills) {
        for stream in running.values() {
            if !stream.listening.load(Ordering::SeqCst) {
                continue;
            }
            let hosted = stream.hosted.load();
            for did in &hosted.dids {
                for collection in &hosted.collections {
                    let key = (did.clone(), collection.clone());
                    if !done.start(&key) {
                        continue;
                    }
                    let verifier = Arc::clone(&self.verifier);
                    let done = done.clone();
                    let permits = Arc::clone(&self.backfills);
                    let max = self.config.max_backfill;
                    tokio::spawn(async move {
                        let (did, collection) = &key;
                        let mut unfinished = Unfinished {
                            done: done.clone(),
                            key: key.clone(),
                            armed: true,
                        };
                        loop {
                            let Ok(_permit) = permits.acquire().await else {
                                return;
                            };
                            done.began(&key);
                            let read = tokio::time::timeout(
                                BACKFILL_DEADLINE,
                                verifier.backfill(did, collection, max),
                            )
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("not done within {BACKFILL_DEADLINE:?}"))
                            });
                            match &read {
                                Ok(n) => {
                                    tracing::info!(%did, collection, indexed = n, "backfilled signature records")
                                }
                                Err(e) => {
                                    tracing::warn!(%did, collection, error = %e, "backfill failed (tried again at the next refresh)");
                                }
                            }
                            if !done.ended(&key, read.is_ok()) {
                                unfinished.armed = false;
                                return;
                            }
                        }
                    });
                }
            }
        }
    }

    /// The streams to follow, each with the trusted DIDs it hosts (whose proven document
    /// names that PDS; with a relay, all of them).
    /// A DID whose PDS cannot be found is logged once, until it is found again.
    async fn streams(
        &self,
        interest: &Interest,
        unresolved: &mut HashSet<Did>,
    ) -> BTreeMap<Url, HashSet<Did>> {
        let mut wanted = BTreeMap::new();
        if interest.dids.is_empty() {
            return wanted;
        }
        if let Some(relay) = &self.config.relay {
            match socket::stream_url(relay) {
                Ok(url) => {
                    wanted.insert(url, interest.dids.clone());
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
                    wanted
                        .entry(url)
                        .or_insert_with(HashSet::new)
                        .insert(did.clone());
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

/// A stream's task, the interest it acts on (its hosted DIDs only), and whether it has
/// started listening (connected once).
struct Running {
    task: tokio::task::JoinHandle<()>,
    /// The task's id in the state counts.
    id: u64,
    hosted: Arc<ArcSwap<Interest>>,
    listening: Arc<AtomicBool>,
}

/// Where the backfill of one (DID, collection) pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Waiting for a permit: its listing begins later, so asking for it again changes
    /// nothing.
    Waiting,
    /// Reading; `again`: asked for again meanwhile, so it runs once more when it ends.
    Running { again: bool },
    /// Read since its stream last started without a cursor (or took the DID on).
    Done,
}

/// The (DID, collection) pairs backfilled, or being backfilled.
#[derive(Debug, Clone, Default)]
struct Backfills(Arc<Mutex<HashMap<(Did, String), Fill>>>);

impl Backfills {
    /// Whether `key` is to be read now (it is then waiting for a permit).
    fn start(&self, key: &(Did, String)) -> bool {
        self.0.lock().is_ok_and(|mut fills| {
            if fills.contains_key(key) {
                return false;
            }
            fills.insert(key.clone(), Fill::Waiting);
            true
        })
    }

    /// `key`'s read has its permit and begins now.
    fn began(&self, key: &(Did, String)) {
        if let Ok(mut fills) = self.0.lock() {
            fills.insert(key.clone(), Fill::Running { again: false });
        }
    }

    /// Has the pairs `pick` chooses read again: a done one at the next refresh, a running
    /// one once more when it ends (its listing may have begun before what asked for it).
    fn forget(&self, pick: impl Fn(&(Did, String)) -> bool) {
        if let Ok(mut fills) = self.0.lock() {
            fills.retain(|key, fill| match fill {
                _ if !pick(key) => true,
                Fill::Waiting => true,
                Fill::Running { again } => {
                    *again = true;
                    true
                }
                Fill::Done => false,
            });
        }
    }

    /// A read of `key` ended (`ok`: it succeeded): whether to read it again at once (it
    /// then waits for a permit again).
    fn ended(&self, key: &(Did, String), ok: bool) -> bool {
        let Ok(mut fills) = self.0.lock() else {
            return false;
        };
        if fills.get(key) == Some(&Fill::Running { again: true }) {
            fills.insert(key.clone(), Fill::Waiting);
            return true;
        }
        if ok {
            fills.insert(key.clone(), Fill::Done);
        } else {
            // Tried again at the next refresh.
            fills.remove(key);
        }
        false
    }

    /// `key`'s task ended without finishing (a panic): tried again at the next refresh.
    fn abandon(&self, key: &(Did, String)) {
        if let Ok(mut fills) = self.0.lock() {
            fills.remove(key);
        }
    }
}

/// Abandons a pair whose backfill task ends before it says how its read ended.
struct Unfinished {
    done: Backfills,
    key: (Did, String),
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.armed {
            self.done.abandon(&self.key);
        }
    }
}

/// Removes a stream's state from the counts when its task ends.
struct StateGuard {
    stats: Arc<FollowStats>,
    url: String,
    task: u64,
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        self.stats.clear(&self.url, self.task);
    }
}

/// One stream, reconnected for as long as it is wanted.
struct Subscription {
    /// Its id in the state counts.
    task: u64,
    url: Url,
    /// The trusted DIDs this stream hosts (kept current by the follower at each refresh):
    /// only their events count, and only their facts are forgotten when the cursor is lost.
    interest: Arc<ArcSwap<Interest>>,
    /// The engine whose caches the events shorten.
    verifier: Arc<Verifier>,
    stats: Arc<FollowStats>,
    config: FollowConfig,
    /// Woken to have the follower backfill (after a start without a cursor) or re-read PDSes.
    refresh: Arc<Notify>,
    backfilled: Backfills,
    /// Set once connected: the follower backfills the hosted DIDs of listening streams only.
    listening: Arc<AtomicBool>,
}

/// The shortest time between two re-reads of the trusted DIDs' PDSes (an event that
/// revokes a DID, or a stream starting without a cursor, asks for one at once).
const MIN_REFRESH: Duration = Duration::from_millis(500);
/// Backfills (`listRecords` chains) running at once at most.
const BACKFILL_CONCURRENCY: usize = 4;
/// The longest one backfill may take (it is then a failure, tried again at the next
/// refresh): a slow or hostile PDS holds a permit this long at most.
const BACKFILL_DEADLINE: Duration = Duration::from_secs(120);

/// Waits for the next re-read: `period` from now, or sooner when `asked` is notified, but
/// not before [`MIN_REFRESH`] after `began` (the last re-read's start) — so that a stream
/// asking in a loop cannot keep the follower re-reading documents.
async fn next_refresh(asked: &Notify, began: tokio::time::Instant, period: Duration) {
    tokio::select! {
        () = tokio::time::sleep(period) => {}
        () = asked.notified() => tokio::time::sleep_until(began + MIN_REFRESH).await,
    }
}
/// The first wait before reconnecting; doubled per failure up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How often a live stream is pinged.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A live stream silent (no Pong either) for this long is reconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connections in a row that end without an event handled, at one cursor, after which the
/// cursor is dropped (a frame there that cannot be read would otherwise be replayed forever).
const MAX_FAILURES_AT_CURSOR: u32 = 3;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Closed, failed, went silent or sent a frame that was refused: resume at the cursor.
    Resume,
    /// The server refused the cursor (`FutureCursor`, `OutdatedCursor`): start without one.
    DropCursor,
}

/// A subscription's reconnection state: where to resume and how long to wait first.
#[derive(Debug)]
struct Retry {
    cursor: Option<i64>,
    backoff: Duration,
    /// Connections in a row that ended before any event was handled.
    failures: u32,
    first: Duration,
    max: Duration,
}

impl Retry {
    fn new(first: Duration, max: Duration) -> Self {
        Retry {
            cursor: None,
            backoff: first,
            failures: 0,
            first,
            max,
        }
    }

    /// Notes how a connection ended (`handled`: an event was applied): the backoff starts
    /// over only after a handled event; the cursor is dropped when the server refused it or
    /// after [`MAX_FAILURES_AT_CURSOR`] connections in a row without one. The cursor dropped.
    fn ended(&mut self, handled: bool, end: End) -> Option<i64> {
        if handled {
            self.failures = 0;
            self.backoff = self.first;
        } else {
            self.failures += 1;
        }
        let drop_cursor = match end {
            End::DropCursor => true,
            End::Resume => self.failures >= MAX_FAILURES_AT_CURSOR,
        };
        if !drop_cursor {
            return None;
        }
        self.failures = 0;
        self.cursor.take()
    }

    /// The wait before the next attempt (doubled for the one after, up to the maximum).
    fn wait(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.max);
        wait
    }
}

impl Subscription {
    async fn run(self) {
        let mut retry = Retry::new(self.config.first_backoff, self.config.max_backoff);
        let shown = self.url.as_str().to_owned();
        // However the task ends (aborted by the follower included), its state goes.
        let _state = StateGuard {
            stats: Arc::clone(&self.stats),
            url: shown.clone(),
            task: self.task,
        };
        loop {
            self.stats.set(&shown, self.task, State::Connecting);
            let mut url = self.url.clone();
            if let Some(c) = retry.cursor {
                url.query_pairs_mut().append_pair("cursor", &c.to_string());
            }
            match socket::connect(&url, &self.config.guard, self.config.connect_timeout).await {
                Ok(ws) => {
                    if retry.cursor.is_none() {
                        self.start_over();
                    }
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    self.stats.set(&shown, self.task, State::Live);
                    tracing::info!(stream = %shown, cursor = retry.cursor, "subscribed");
                    let mut handled = false;
                    let end = self.read(ws, &mut retry.cursor, &mut handled).await;
                    if let Some(c) = retry.ended(handled, end) {
                        self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            stream = %shown,
                            cursor = c,
                            "cannot resume at this cursor: starting without one (the hosted \
                             signers' cached facts are forgotten)"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe"),
            }
            self.stats.set(&shown, self.task, State::Backoff);
            tokio::time::sleep(retry.wait()).await;
        }
    }

    /// Reads `ws` until it ends, pinging it every `ping_interval` and giving up after
    /// `idle_timeout` without an inbound message; `handled` is set once an event with a
    /// sequence number has been applied.
    async fn read(
        &self,
        mut ws: socket::Socket,
        cursor: &mut Option<i64>,
        handled: &mut bool,
    ) -> End {
        let shown = self.url.as_str();
        let start = tokio::time::Instant::now();
        let mut ping =
            tokio::time::interval_at(start + self.config.ping_interval, self.config.ping_interval);
        let mut last_inbound = start;
        // Whether this connection forgot the hosted signers' facts already (at its start
        // without a cursor, or at an `OutdatedCursor` info): once per connection is enough.
        let mut started_over = cursor.is_none();
        loop {
            let message = tokio::select! {
                m = ws.next() => m,
                _ = ping.tick() => {
                    let ping = ws.send(Message::Ping(Default::default()));
                    match tokio::time::timeout(self.config.idle_timeout, ping).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => {
                            tracing::warn!(stream = %shown, error = %e, "stream failed");
                            return End::Resume;
                        }
                        Err(_) => {
                            tracing::warn!(stream = %shown, "stream accepts no ping: reconnecting");
                            return End::Resume;
                        }
                    }
                }
                () = tokio::time::sleep_until(last_inbound + self.config.idle_timeout) => {
                    tracing::warn!(
                        stream = %shown,
                        idle = ?self.config.idle_timeout,
                        "no message from the stream (nor a pong): reconnecting"
                    );
                    return End::Resume;
                }
            };
            last_inbound = tokio::time::Instant::now();
            let bytes = match message {
                Some(Ok(Message::Binary(bytes))) => bytes,
                None | Some(Ok(Message::Close(_))) => return End::Resume,
                Some(Ok(_)) => continue,
                Some(Err(e @ tungstenite::Error::Capacity(_))) => {
                    // A frame over MAX_FRAME: the socket's cap refuses it before reading it.
                    self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %shown, error = %e, "refused a frame");
                    return End::Resume;
                }
                Some(Err(e)) => {
                    tracing::warn!(stream = %shown, error = %e, "stream failed");
                    return End::Resume;
                }
            };
            match frame::decode(&bytes) {
                Ok(event) => {
                    if let Event::Error { error, .. } = &event
                        && (error == "FutureCursor" || error == "OutdatedCursor")
                    {
                        self.handle(&event, cursor, &mut started_over);
                        return End::DropCursor;
                    }
                    if !self.handle(&event, cursor, &mut started_over) {
                        return End::Resume;
                    }
                    if event.seq().is_some() {
                        *handled = true;
                    }
                }
                Err(e) => {
                    // Resume from the last good event after a pause; after
                    // MAX_FAILURES_AT_CURSOR in a row the cursor is dropped.
                    self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %shown, error = %e, "refused a frame");
                    return End::Resume;
                }
            }
        }
    }

    /// What happened before this stream was listened to (from now on) is not known: forgets
    /// the hosted signers' cached facts and has the follower backfill their records again
    /// at once. The backfill loads each signer's document first (stamped after the
    /// revocation), so a cold verification afterwards waits for its record proofs only; and
    /// a record signed while the stream was not read is indexed.
    fn start_over(&self) {
        let hosted = self.interest.load();
        for did in &hosted.dids {
            self.verifier.revocations().revoke_did(did);
        }
        self.backfilled.forget(|(did, _)| hosted.dids.contains(did));
        self.listening.store(true, Ordering::SeqCst);
        self.refresh.notify_one();
    }

    /// Applies one event, then counts it; false when the stream should be dropped (an
    /// error frame).
    fn handle(&self, event: &Event, cursor: &mut Option<i64>, started_over: &mut bool) -> bool {
        let interest = self.interest.load();
        for change in frame::indexing(event, &interest) {
            match change {
                Indexing::Put(uri, digest) => {
                    // A kept "not verified" for that digest is rendered again (with the new
                    // pointer, which is then proven).
                    if self.verifier.index().insert(uri, digest) {
                        self.verifier.revocations().touch();
                    }
                }
                Indexing::Remove(uri) => self.verifier.index().remove(&uri),
            }
        }
        for revoke in frame::revocations(event, &interest) {
            match revoke {
                Revoke::Record(did, uri) => {
                    tracing::info!(stream = %self.url, record = %uri, "signature record changed: its proofs are forgotten");
                    self.verifier.revocations().revoke_record(&did, &uri);
                }
                Revoke::Did(did) => {
                    tracing::info!(stream = %self.url, %did, event = event.kind(), "signer changed: its document and proofs are forgotten");
                    self.verifier.revocations().revoke_did(&did);
                    self.refresh.notify_one();
                }
            }
            self.stats.revocations.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(seq) = event.seq() {
            *cursor = Some(seq);
        }
        let keep = match event {
            Event::Error { error, message } => {
                tracing::warn!(stream = %self.url, error, message, "the stream reported an error");
                false
            }
            Event::Info { name, message } => {
                tracing::info!(stream = %self.url, name, message, "stream info");
                if name == "OutdatedCursor" && !*started_over {
                    // Events were missed: forget what they might have revoked.
                    *started_over = true;
                    self.start_over();
                }
                true
            }
            _ => true,
        };
        self.stats.event(event.kind());
        keep
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use ipld_core::ipld::Ipld;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    use super::*;
    use crate::did_document::DidDocument;
    use crate::resolve::{
        ArtifactResult, DidResolver, ManifestFact, RecordSource, Registry, ResolveError,
    };
    use crate::syntax::{AtUri, ImageDigest, ImageRef};
    use crate::verify::{Revocations, VerifierConfig};
    use futures_util::future::BoxFuture;

    const ALICE: &str = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    const BOB: &str = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";

    use super::frame::test_frames::{frame, map, s};

    /// A `#commit` of `repo` deleting one signature record.
    fn delete(seq: i64, repo: &str, rkey: &str) -> Vec<u8> {
        let op = map(&[
            ("action", s("delete")),
            ("path", s(&format!("io.atcr.manifest/{rkey}"))),
            ("cid", Ipld::Null),
        ]);
        frame(
            map(&[("op", Ipld::Integer(1)), ("t", s("#commit"))]),
            map(&[
                ("seq", Ipld::Integer(seq.into())),
                ("repo", s(repo)),
                ("blocks", Ipld::Bytes(vec![])),
                ("ops", Ipld::List(vec![op])),
            ]),
        )
    }

    /// A `#commit` frame that cannot be decoded (no repo, no ops).
    fn unreadable() -> Vec<u8> {
        frame(
            map(&[("op", Ipld::Integer(1)), ("t", s("#commit"))]),
            map(&[("seq", Ipld::Integer(11))]),
        )
    }

    fn error(name: &str) -> Vec<u8> {
        frame(
            map(&[("op", Ipld::Integer(-1))]),
            map(&[("error", s(name))]),
        )
    }

    /// What the fake stream does once it has sent its frames.
    enum After {
        Close,
        /// Keep the connection open and read nothing (no Pong ever).
        Hold,
    }

    /// A local `subscribeRepos` stream: connection `n` (from 0) with cursor `c` gets
    /// `script(n, c)`. Each connection's cursor is sent on the receiver.
    async fn stream(
        script: impl Fn(usize, Option<i64>) -> (Vec<Vec<u8>>, After) + Send + 'static,
    ) -> (Url, mpsc::UnboundedReceiver<Option<i64>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for n in 0.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let seen = Arc::new(StdMutex::new(None));
                let seen2 = Arc::clone(&seen);
                // The handshake callback's signature is tungstenite's.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, res: Response| {
                    let cursor = req.uri().query().and_then(|q| {
                        url::form_urlencoded::parse(q.as_bytes())
                            .find(|(k, _)| k == "cursor")
                            .and_then(|(_, v)| v.parse().ok())
                    });
                    *seen2.lock().unwrap() = cursor;
                    Ok(res)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    continue;
                };
                let cursor = *seen.lock().unwrap();
                let _ = tx.send(cursor);
                let (frames, after) = script(n, cursor);
                for f in frames {
                    let _ = ws.send(Message::Binary(f.into())).await;
                }
                match after {
                    After::Close => {
                        let _ = ws.close(None).await;
                    }
                    After::Hold => {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            drop(ws);
                        });
                    }
                }
            }
        });
        let url = Url::parse(&format!(
            "ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos"
        ))
        .unwrap();
        (url, rx)
    }

    fn config() -> FollowConfig {
        FollowConfig {
            guard: Guard {
                allow_private_addresses: true,
                ..Guard::default()
            },
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            ..FollowConfig::default()
        }
    }

    /// Sources that answer nothing.
    #[derive(Debug, Default)]
    struct Nowhere;

    fn nothing<T>() -> BoxFuture<'static, Result<T, ResolveError>> {
        Box::pin(async {
            Err(ResolveError::Invalid {
                what: "anything".into(),
                reason: "a unit test's source serves nothing".into(),
            })
        })
    }

    impl Registry for Nowhere {
        fn resolve<'a>(
            &'a self,
            _: &'a ImageRef,
        ) -> BoxFuture<'a, Result<ManifestFact, ResolveError>> {
            nothing()
        }
        fn signature_artifacts<'a>(
            &'a self,
            _: &'a ImageRef,
            _: &'a ImageDigest,
        ) -> BoxFuture<'a, Result<Vec<ArtifactResult>, ResolveError>> {
            nothing()
        }
    }

    impl DidResolver for Nowhere {
        fn resolve<'a>(&'a self, _: &'a Did) -> BoxFuture<'a, Result<DidDocument, ResolveError>> {
            nothing()
        }
    }

    impl RecordSource for Nowhere {
        fn get_record<'a>(
            &'a self,
            _: &'a Url,
            _: &'a AtUri,
        ) -> BoxFuture<'a, Result<Vec<u8>, ResolveError>> {
            nothing()
        }
    }

    /// A subscription to `url` for the trusted DIDs `hosted`, over an engine whose sources
    /// serve nothing.
    fn subscription(
        url: Url,
        hosted: &[&str],
        config: FollowConfig,
    ) -> (Subscription, Arc<Revocations>) {
        let nowhere = Arc::new(Nowhere);
        let verifier = Arc::new(Verifier::new(
            nowhere.clone(),
            nowhere.clone(),
            nowhere.clone(),
            VerifierConfig::default(),
        ));
        let interest = Interest {
            dids: hosted.iter().map(|d| d.parse().unwrap()).collect(),
            collections: ["io.atcr.manifest".to_owned()].into(),
        };
        let revocations = Arc::clone(verifier.revocations());
        let sub = Subscription {
            task: 0,
            url,
            interest: Arc::new(ArcSwap::from_pointee(interest)),
            verifier,
            stats: Arc::new(FollowStats::default()),
            config,
            refresh: Arc::new(Notify::new()),
            backfilled: Backfills::default(),
            listening: Arc::default(),
        };
        (sub, revocations)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Option<i64>>) -> Option<i64> {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the subscription reconnects")
            .expect("the stream runs")
    }

    fn outdated_cursor() -> Vec<u8> {
        frame(
            map(&[("op", Ipld::Integer(1)), ("t", s("#info"))]),
            map(&[
                ("name", s("OutdatedCursor")),
                ("message", s("events were missed")),
            ]),
        )
    }

    #[tokio::test]
    async fn an_outdated_cursor_forgets_once_per_connection() {
        let (url, mut rx) = stream(|_, cursor| match cursor {
            None => (vec![delete(10, ALICE, "3ka")], After::Close),
            Some(_) => (
                vec![
                    outdated_cursor(),
                    outdated_cursor(),
                    outdated_cursor(),
                    delete(11, ALICE, "3kb"),
                ],
                After::Hold,
            ),
        })
        .await;
        let (sub, revocations) = subscription(url, &[ALICE], config());
        let stats = Arc::clone(&sub.stats);
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        assert_eq!(next(&mut rx).await, Some(10));
        while stats.events().get("commit").copied().unwrap_or(0) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Each mark raises the epoch once: the start without a cursor and the first delete,
        // then one start-over for the three infos and the second delete.
        assert_eq!(revocations.epoch(), 4);
        assert_eq!(stats.events().get("info").copied(), Some(3));
        task.abort();
    }

    #[test]
    fn a_task_clears_only_its_own_state() {
        let stats = FollowStats::default();
        stats.set("ws://a", 1, State::Live);
        stats.set("ws://a", 2, State::Connecting);
        stats.clear("ws://a", 1);
        assert_eq!(
            stats.states().get("connecting"),
            Some(&1),
            "the newer task's"
        );
        stats.clear("ws://a", 2);
        assert_eq!(stats.states().values().sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn an_aborted_subscription_leaves_no_state() {
        let (url, mut rx) = stream(|_, _| (vec![], After::Hold)).await;
        let (sub, _) = subscription(url, &[ALICE], config());
        let stats = Arc::clone(&sub.stats);
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        while stats.states().get("live") != Some(&1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(stats.states().values().sum::<u64>(), 0);
    }

    #[test]
    fn a_backfill_asked_for_while_it_runs_runs_once_more() {
        let b = Backfills::default();
        let key = (ALICE.parse::<Did>().unwrap(), "io.atcr.manifest".to_owned());
        let fill = || b.0.lock().unwrap().get(&key).copied();
        assert!(b.start(&key));
        assert!(!b.start(&key), "never two of one pair at once");
        b.forget(|_| true);
        assert_eq!(
            fill(),
            Some(Fill::Waiting),
            "its listing begins later anyway"
        );
        b.began(&key);
        b.forget(|_| true);
        assert_eq!(fill(), Some(Fill::Running { again: true }));
        assert!(b.ended(&key, true), "asked for while it ran: once more");
        assert_eq!(fill(), Some(Fill::Waiting));
        b.began(&key);
        assert!(!b.ended(&key, true));
        assert_eq!(fill(), Some(Fill::Done));
        assert!(!b.start(&key), "done");
        b.forget(|_| true);
        assert_eq!(fill(), None, "a done one is read at the next refresh");
        assert!(b.start(&key));
        b.began(&key);
        assert!(!b.ended(&key, false));
        assert_eq!(fill(), None, "a failed one too");
        assert!(b.start(&key));
        drop(Unfinished {
            done: b.clone(),
            key: key.clone(),
            armed: true,
        });
        assert_eq!(fill(), None, "an abandoned one too");
    }

    #[tokio::test(start_paused = true)]
    async fn the_follower_rereads_at_most_once_per_min_refresh() {
        let asked = Notify::new();
        let period = Duration::from_secs(5);
        // Asked at once after a re-read began: not before MIN_REFRESH.
        let began = tokio::time::Instant::now();
        asked.notify_one();
        next_refresh(&asked, began, period).await;
        assert_eq!(began.elapsed(), MIN_REFRESH);
        // Asked later than that: at once.
        let began = tokio::time::Instant::now();
        tokio::time::sleep(MIN_REFRESH * 2).await;
        asked.notify_one();
        next_refresh(&asked, began, period).await;
        assert_eq!(began.elapsed(), MIN_REFRESH * 2);
        // Not asked: after the period.
        let began = tokio::time::Instant::now();
        next_refresh(&asked, began, period).await;
        assert_eq!(began.elapsed(), period);
    }

    #[test]
    fn the_backoff_grows_until_an_event_is_handled() {
        let ms = Duration::from_millis;
        let mut r = Retry::new(ms(250), ms(1500));
        r.cursor = Some(10);
        assert_eq!(r.wait(), ms(250));
        // Connections ending on a refused frame or an error, before any event: no reset.
        assert_eq!(r.ended(false, End::Resume), None);
        assert_eq!(r.wait(), ms(500));
        assert_eq!(r.ended(false, End::Resume), None);
        assert_eq!(r.wait(), ms(1000));
        // The third at the same cursor drops it.
        assert_eq!(r.ended(false, End::Resume), Some(10));
        assert_eq!(r.cursor, None);
        assert_eq!(r.wait(), ms(1500), "still backing off, up to the maximum");
        // An event handled starts the backoff over.
        r.cursor = Some(12);
        assert_eq!(r.ended(true, End::Resume), None);
        assert_eq!(r.wait(), ms(250));
        // The server refusing the cursor drops it at once.
        assert_eq!(r.ended(true, End::DropCursor), Some(12));
    }

    #[tokio::test]
    async fn a_frame_that_cannot_be_read_at_the_cursor_drops_it_after_three_tries() {
        let (url, mut rx) = stream(|_, cursor| match cursor {
            None => (vec![delete(10, ALICE, "3ka"), unreadable()], After::Close),
            Some(_) => (vec![unreadable()], After::Close),
        })
        .await;
        let (sub, _) = subscription(url, &[ALICE], config());
        let stats = Arc::clone(&sub.stats);
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        for _ in 0..MAX_FAILURES_AT_CURSOR {
            assert_eq!(next(&mut rx).await, Some(10));
        }
        assert_eq!(next(&mut rx).await, None, "the cursor is dropped");
        assert!(stats.bad_frames.load(Ordering::Relaxed) > MAX_FAILURES_AT_CURSOR as u64);
        task.abort();
    }

    #[tokio::test]
    async fn a_future_cursor_error_drops_the_cursor_at_once() {
        let (url, mut rx) = stream(|_, cursor| match cursor {
            None => (vec![delete(10, ALICE, "3ka")], After::Close),
            Some(_) => (vec![error("FutureCursor")], After::Close),
        })
        .await;
        let (sub, _) = subscription(url, &[ALICE], config());
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        assert_eq!(next(&mut rx).await, Some(10));
        assert_eq!(next(&mut rx).await, None, "the cursor is dropped");
        task.abort();
    }

    #[tokio::test]
    async fn a_silent_stream_is_reconnected() {
        let (url, mut rx) = stream(|_, _| (vec![], After::Hold)).await;
        let config = FollowConfig {
            ping_interval: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(300),
            ..config()
        };
        let (sub, _) = subscription(url, &[ALICE], config);
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        // The silent connection is given up: a second one comes.
        assert_eq!(next(&mut rx).await, None);
        task.abort();
    }

    #[tokio::test]
    async fn a_start_without_cursor_has_the_hosted_signers_backfilled_again() {
        let (url, mut rx) = stream(|_, cursor| match cursor {
            None => (vec![delete(10, ALICE, "3ka")], After::Close),
            Some(_) => (vec![delete(11, ALICE, "3kb")], After::Hold),
        })
        .await;
        let (sub, _) = subscription(url, &[ALICE], config());
        let (stats, refresh, listening) = (
            Arc::clone(&sub.stats),
            Arc::clone(&sub.refresh),
            Arc::clone(&sub.listening),
        );
        let backfilled = sub.backfilled.clone();
        let pair = |did: &str| (did.parse::<Did>().unwrap(), "io.atcr.manifest".to_owned());
        let read = |did: &str| backfilled.0.lock().unwrap().get(&pair(did)) == Some(&Fill::Done);
        let backfill = |did: &str| {
            assert!(backfilled.start(&pair(did)));
            backfilled.began(&pair(did));
            assert!(!backfilled.ended(&pair(did), true));
        };
        backfill(ALICE);
        backfill(BOB);
        assert!(!listening.load(Ordering::SeqCst));
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        tokio::time::timeout(Duration::from_secs(30), refresh.notified())
            .await
            .expect("the follower is woken to backfill");
        assert!(listening.load(Ordering::SeqCst));
        // The hosted signer is read again; a signer of another stream is not.
        assert!(!read(ALICE));
        assert!(read(BOB));
        // The follower reads it; then resuming at the cursor forgets nothing.
        backfill(ALICE);
        assert_eq!(next(&mut rx).await, Some(10));
        while stats.events().get("commit").copied().unwrap_or(0) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(read(ALICE));
        task.abort();
    }

    #[tokio::test]
    async fn a_stream_acts_on_the_signers_it_hosts_only() {
        let (url, mut rx) = stream(|_, _| {
            (
                vec![delete(10, BOB, "3kb"), delete(11, ALICE, "3ka")],
                After::Hold,
            )
        })
        .await;
        let (sub, revocations) = subscription(url, &[ALICE], config());
        let stats = Arc::clone(&sub.stats);
        let since = revocations.epoch();
        let task = tokio::spawn(sub.run());
        assert_eq!(next(&mut rx).await, None);
        while stats.events().get("commit").copied().unwrap_or(0) < 2 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (alice, bob): (Did, Did) = (ALICE.parse().unwrap(), BOB.parse().unwrap());
        // Starting without a cursor forgets the hosted signer only.
        assert!(!revocations.document_holds(since, &alice));
        assert!(revocations.document_holds(since, &bob));
        // A delete in a repo it does not host revokes nothing.
        assert!(revocations.proof_holds(since, &bob, &format!("at://{BOB}/io.atcr.manifest/3kb")));
        assert!(!revocations.proof_holds(
            since,
            &alice,
            &format!("at://{ALICE}/io.atcr.manifest/3ka")
        ));
        task.abort();
    }
}
