//! A bounded cache whose entries expire, with single-flight loading: concurrent requests
//! for the same missing key wait on one load (quick_cache's placeholder guard) instead of
//! each going upstream. quick_cache has no TTL, so each entry carries its expiry.
//!
//! The clock is tokio's (so tests can pause and advance it); the interface speaks
//! `std::time::Instant`, which is the same clock whenever time is not paused.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quick_cache::Equivalent;
use quick_cache::sync::Cache;

#[derive(Clone)]
struct Entry<V> {
    value: V,
    expires: Instant,
}

/// Now, on tokio's clock.
pub(super) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Whether a lookup may load what is missing, or only read what is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Load what is missing or expired (concurrent loads of one key share one).
    Load,
    /// Read fresh entries only, never waiting: a missing entry is `None`.
    Peek,
}

/// Hit and miss counts of one cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answers served from the cache.
    pub hits: u64,
    /// Answers that needed a load.
    pub misses: u64,
    /// Entries held now.
    pub len: u64,
}

/// A TTL cache over `quick_cache`.
pub struct TtlCache<K, V> {
    inner: Cache<K, Entry<V>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<K, V> std::fmt::Debug for TtlCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlCache")
            .field("hits", &self.hits.load(Ordering::Relaxed))
            .field("misses", &self.misses.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// A cache of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        TtlCache {
            inner: Cache::new(capacity.max(1)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// As [`TtlCache::get_or_load`] under [`Mode::Load`]; under [`Mode::Peek`], the fresh
    /// cached value only (then `load` is never called and nothing is awaited).
    pub async fn get<F, Fut>(
        &self,
        key: &K,
        mode: Mode,
        load: F,
        ttl: impl Fn(&V) -> Duration,
    ) -> Option<(V, Instant)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        self.get_valid(key, mode, load, ttl, |_| true).await
    }

    /// As [`TtlCache::get`], using a cached value only while `valid` holds for it (an entry
    /// revoked before its TTL ended is loaded anew, and under `Peek` is missing).
    pub async fn get_valid<F, Fut>(
        &self,
        key: &K,
        mode: Mode,
        load: F,
        ttl: impl Fn(&V) -> Duration,
        valid: impl Fn(&V) -> bool,
    ) -> Option<(V, Instant)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        match mode {
            Mode::Load => Some(self.load_valid(key, load, ttl, valid).await),
            Mode::Peek => {
                let found = self.peek_if(key, valid);
                if found.is_none() {
                    self.miss();
                }
                found
            }
        }
    }

    /// The cached value for `key`, or the value `load` produces, cached for the TTL that
    /// `ttl` gives it (zero: not cached); with the instant it expires. Concurrent callers for
    /// one key share one load.
    pub async fn get_or_load<F, Fut>(
        &self,
        key: &K,
        load: F,
        ttl: impl Fn(&V) -> Duration,
    ) -> (V, Instant)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        self.load_valid(key, load, ttl, |_| true).await
    }

    async fn load_valid<F, Fut>(
        &self,
        key: &K,
        load: F,
        ttl: impl Fn(&V) -> Duration,
        valid: impl Fn(&V) -> bool,
    ) -> (V, Instant)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        loop {
            match self.inner.get_value_or_guard_async(key).await {
                Ok(entry) if entry.expires > now() && valid(&entry.value) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return (entry.value, entry.expires);
                }
                Ok(_) => {
                    // Expired or revoked: drop it (unless someone already replaced it) and
                    // load anew.
                    let now = now();
                    self.inner
                        .remove_if(key, |e| e.expires <= now || !valid(&e.value));
                }
                Err(guard) => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    let value = load().await;
                    let ttl = ttl(&value);
                    let expires = now() + ttl;
                    if ttl.is_zero() {
                        drop(guard); // waiters load for themselves
                    } else {
                        let _ = guard.insert(Entry {
                            value: value.clone(),
                            expires,
                        });
                    }
                    return (value, expires);
                }
            }
        }
    }

    /// The cached value for `key` and when it expires, if present and fresh, without
    /// loading anything.
    pub fn peek<Q>(&self, key: &Q) -> Option<(V, Instant)>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.peek_if(key, |_| true)
    }

    /// As [`TtlCache::peek`], for a value `accept` also takes (a hit only then).
    pub fn peek_if<Q>(&self, key: &Q, accept: impl FnOnce(&V) -> bool) -> Option<(V, Instant)>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let entry = self.inner.get(key)?;
        if entry.expires <= now() || !accept(&entry.value) {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some((entry.value, entry.expires))
    }

    /// Counts a lookup that found nothing usable.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Caches `value` for `key` until `expires`.
    pub fn insert(&self, key: K, value: V, expires: Instant) {
        self.inner.insert(key, Entry { value, expires });
    }

    /// Counters for metrics.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            len: self.inner.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn single_flight_and_expiry() {
        let cache = Arc::new(TtlCache::<u32, u32>::new(16));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let cache = Arc::clone(&cache);
            let loads = Arc::clone(&loads);
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load(
                        &1,
                        || async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            7
                        },
                        |_| Duration::from_millis(200),
                    )
                    .await
                    .0
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let v = cache
            .get_or_load(&1, || async { 8 }, |_| Duration::from_secs(1))
            .await
            .0;
        assert_eq!(v, 8, "expired entry is reloaded");
        let v = cache
            .get_or_load(&2, || async { 9 }, |_| Duration::ZERO)
            .await
            .0;
        assert_eq!(v, 9);
        let v = cache
            .get_or_load(&2, || async { 10 }, |_| Duration::ZERO)
            .await
            .0;
        assert_eq!(v, 10, "zero TTL is not cached");
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (19, 4));
    }
}
