//! Per-upstream-host outbound rate limit (`governor`, GCRA). A request waits for its slot
//! only as long as the caller can afford; past that it is refused at once, so a limit
//! never turns into a hang.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Forget hosts idle long enough to be back at full burst every this many requests
/// (governor's keyed state otherwise grows with every host ever seen).
const RETAIN_EVERY: u64 = 1024;

/// A keyed limiter over `host:port`.
#[derive(Debug)]
pub struct HostLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    calls: AtomicU64,
}

impl HostLimiter {
    /// `rate` requests per second with `burst` above it (zeros are raised to one).
    pub fn new(rate: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        HostLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            calls: AtomicU64::new(0),
        }
    }

    /// Takes one slot for `key`, waiting at most `max_wait`; `Err` when the wait would be
    /// longer.
    pub async fn acquire(&self, key: &str, max_wait: Duration) -> Result<(), ()> {
        if self.calls.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.limiter.retain_recent();
        }
        let key = key.to_owned();
        let give_up = tokio::time::Instant::now() + max_wait;
        loop {
            match self.limiter.check_key(&key) {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    // One deadline for all the waiting, however often others win the slot.
                    if tokio::time::Instant::now() + wait > give_up {
                        return Err(());
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn burst_then_refuse_without_waiting() {
        let limiter = HostLimiter::new(1, 2);
        assert!(limiter.acquire("a:443", Duration::ZERO).await.is_ok());
        assert!(limiter.acquire("a:443", Duration::ZERO).await.is_ok());
        assert!(limiter.acquire("a:443", Duration::ZERO).await.is_err());
        // Other hosts have their own budget.
        assert!(limiter.acquire("b:443", Duration::ZERO).await.is_ok());
        // A caller that can wait a second gets the next slot.
        assert!(
            limiter
                .acquire("a:443", Duration::from_millis(1500))
                .await
                .is_ok()
        );
    }
}
