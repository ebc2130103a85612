//! Counters many threads add to without sharing a cache line. A counter every request
//! touches, shared by the server's worker threads, moves its cache line from core to core
//! on every add; here each thread adds to its own stripe (a cache line of its own) and a
//! read sums the stripes. Reads are rare (a metrics scrape), adds are per request.
//! A fixed array and a thread-local index, small enough not to need a crate.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per counter: threads beyond this share stripes (still correct, just contended).
pub const STRIPES: usize = 8;

/// The stripe of the calling thread: threads are numbered as they first ask, so the
/// server's worker threads, started together, get different stripes.
pub fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    MINE.with(|mine| *mine)
}

/// One value on a cache line of its own (128 bytes: adjacent-line prefetch pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line(AtomicU64);

/// A `u64` sum added to from many threads.
#[derive(Debug, Default)]
pub struct Striped([Line; STRIPES]);

impl Striped {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        if let Some(line) = self.0.get(stripe()) {
            line.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The sum so far.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|line| line.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn adds_from_many_threads_all_count() {
        let counter = Arc::new(Striped::default());
        let threads: Vec<_> = (0..(STRIPES + 3))
            .map(|t| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.add(t as u64 + 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let expected: u64 = (1..=(STRIPES as u64 + 3)).map(|n| n * 1000).sum();
        assert_eq!(counter.get(), expected);
    }
}
