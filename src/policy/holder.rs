//! A trust policy a running service can reload without ever blocking evaluation.
//!
//! The policy sits in an [`ArcSwap`]: readers take an `Arc` snapshot without a lock, and a
//! reload swaps in a new one atomically, so an evaluation in progress keeps the policy it
//! started with. [`PolicyHolder::reload_if_changed`] re-reads the file through its path,
//! following symlinks, and compares a SHA-256 of the content with the last content it saw, so
//! a Kubernetes ConfigMap update — which swaps the `..data` symlink to a new directory rather
//! than writing the file — is caught like an in-place edit. A bad new file is refused and the
//! last good policy stays; successes and failures are counted for metrics. The caller owns the
//! timer (the server ticks every few seconds); nothing here spawns a thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use super::{PolicyError, TrustPolicy, read_policy_file};

/// A swappable trust policy, optionally tied to the file it was loaded from.
#[derive(Debug)]
pub struct PolicyHolder {
    current: ArcSwap<TrustPolicy>,
    path: Option<PathBuf>,
    state: Mutex<Seen>,
    successes: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What the last reload attempt saw on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Content([u8; 32]),
    ReadError(String),
    Nothing,
}

/// What [`PolicyHolder::reload_if_changed`] did.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReloadOutcome {
    /// The file changed and is invalid or unreadable; the last good policy stays in force.
    Failed(PolicyError),
    /// The file changed and the new policy is now in force.
    Reloaded,
    /// The file's content is the same as at the last attempt (or the holder watches no file).
    Unchanged,
}

/// Reload counters, for metrics. The initial load is not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadStats {
    /// Reloads that put a new policy in force.
    pub successes: u64,
    /// Reloads refused (bad or unreadable file); each distinct bad content counts once.
    pub failures: u64,
    /// Why the latest attempt failed, while the file on disk is still failing; `None` after a
    /// successful reload.
    pub last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PolicyHolder {
    /// A holder for a fixed policy; [`reload_if_changed`](Self::reload_if_changed) does nothing.
    pub fn new(policy: TrustPolicy) -> PolicyHolder {
        PolicyHolder {
            current: ArcSwap::from_pointee(policy),
            path: None,
            state: Mutex::new(Seen::Nothing),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Loads the policy at `path` (it must be valid) and remembers the file for reloads. Give
    /// the path as mounted (`/config/trust-policy.yaml`), not its resolved target, so a
    /// ConfigMap `..data` swap is followed.
    pub fn watch_file(path: impl Into<PathBuf>) -> Result<PolicyHolder, PolicyError> {
        let path = path.into();
        let bytes = read_policy_file(&path)?;
        let policy = TrustPolicy::from_bytes(&path, &bytes)?;
        Ok(PolicyHolder {
            current: ArcSwap::from_pointee(policy),
            state: Mutex::new(Seen::Content(Sha256::digest(&bytes).into())),
            path: Some(path),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// The policy in force: a snapshot that a concurrent reload does not change. Lock-free.
    pub fn current(&self) -> Arc<TrustPolicy> {
        self.current.load_full()
    }

    /// The policy in force, without touching its shared reference count (for hot paths;
    /// hold the guard briefly).
    pub fn load(&self) -> arc_swap::Guard<Arc<TrustPolicy>> {
        self.current.load()
    }

    /// The watched file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the watched file and, if its content differs from the last attempt, loads it:
    /// a valid file replaces the policy in force, an invalid or unreadable one is counted as a
    /// failure and leaves the last good policy in force. Concurrent calls are serialized with
    /// each other, never with [`current`](Self::current).
    pub fn reload_if_changed(&self) -> ReloadOutcome {
        self.reload_if_changed_with(|_, _| {})
    }

    /// [`reload_if_changed`](Self::reload_if_changed), calling `before(old, new)` before a
    /// valid new policy replaces the old one (to forget what the new one must not trust from
    /// the old one's time).
    pub fn reload_if_changed_with(
        &self,
        before: impl FnOnce(&TrustPolicy, &TrustPolicy),
    ) -> ReloadOutcome {
        let Some(path) = &self.path else {
            return ReloadOutcome::Unchanged;
        };
        let mut seen = lock(&self.state);
        let bytes = match read_policy_file(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                let now = Seen::ReadError(e.to_string());
                if *seen == now {
                    return ReloadOutcome::Unchanged;
                }
                *seen = now;
                return self.fail(e);
            }
        };
        let now = Seen::Content(Sha256::digest(&bytes).into());
        if *seen == now {
            return ReloadOutcome::Unchanged;
        }
        *seen = now;
        match TrustPolicy::from_bytes(path, &bytes) {
            Ok(policy) => {
                before(&self.current.load(), &policy);
                self.current.store(Arc::new(policy));
                self.successes.fetch_add(1, Ordering::Relaxed);
                *lock(&self.last_error) = None;
                ReloadOutcome::Reloaded
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&self, e: PolicyError) -> ReloadOutcome {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(e.to_string());
        ReloadOutcome::Failed(e)
    }

    /// Reload counters so far.
    pub fn reload_stats(&self) -> ReloadStats {
        ReloadStats {
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        }
    }
}
