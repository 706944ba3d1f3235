//! Password work from HTTP requests, bounded. An argon2id hash costs 19 MiB and tens of
//! milliseconds of CPU: unbounded, a burst of logins would take every core from the
//! real-time service and gigabytes of memory (one hash per blocking thread, up to 512).
//! And a login is a guess: an account that keeps failing is slowed down.
//!
//! - At most [`PasswordLimits::at_once`] hashes run at a time and
//!   [`PasswordLimits::waiting`] more wait; beyond, 503 `busy` with `Retry-After`.
//! - After [`PasswordLimits::free_failures`] failed logins in a row for one account
//!   (tenant and e-mail as typed, known or not, so the answer reveals nothing), each
//!   next try waits 1 s, then 2 s, 4 s... up to [`PasswordLimits::max_backoff`]: 429
//!   `too_many_attempts` with `Retry-After`, without hashing. A success clears the count;
//!   so does an hour without failures.
//!
//! Per node: with several nodes behind a load balancer a guesser gets that many more
//! tries. Not per address: behind a proxy every client would share one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::Semaphore;

use crate::auth;
use crate::error::ApiError;

/// Bounds of [`Passwords`].
#[derive(Debug, Clone)]
pub struct PasswordLimits {
    /// Hashes computed at once (default: half the cores, at least one).
    pub at_once: usize,
    /// Requests that may wait for a hash (default 64); beyond, 503 `busy`.
    pub waiting: usize,
    /// Failed logins of one account in a row before it is slowed down (default 5).
    pub free_failures: u32,
    /// Longest wait imposed on an account (default 15 minutes).
    pub max_backoff: Duration,
}

impl Default for PasswordLimits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            at_once: (cores / 2).max(1),
            waiting: 64,
            free_failures: 5,
            max_backoff: Duration::from_secs(15 * 60),
        }
    }
}

/// Failures older than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Most accounts followed at once (about 100 bytes each).
const MAX_FOLLOWED: usize = 100_000;

struct Failures {
    count: u32,
    last: Instant,
    /// No try before this.
    until: Instant,
}

/// The bounded password service of one node.
pub struct Passwords {
    limits: PasswordLimits,
    permits: Semaphore,
    /// Requests waiting for a hash or computing one.
    inside: AtomicUsize,
    failures: Mutex<HashMap<String, Failures>>,
}

/// Leaves [`Passwords::inside`] however the request ends (a client that hangs up
/// drops its future while it waits).
struct Inside<'a>(&'a AtomicUsize);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Passwords {
    /// A service with these bounds.
    pub fn new(limits: PasswordLimits) -> Self {
        let at_once = limits.at_once.max(1);
        Self {
            limits,
            permits: Semaphore::new(at_once),
            inside: AtomicUsize::new(0),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` on a blocking thread once a hashing slot is free, or refuses at once
    /// (503 `busy`) when too many already wait.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let before = self.inside.fetch_add(1, Ordering::SeqCst);
        let _inside = Inside(&self.inside);
        if before >= self.limits.at_once.max(1) + self.limits.waiting {
            return Err(ApiError::http(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many password checks at once: try again in a moment",
            )
            .retry_after(1));
        }
        let _permit = self.permits.acquire().await.map_err(|_| {
            ApiError::http(StatusCode::SERVICE_UNAVAILABLE, "busy", "shutting down")
        })?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| mindsp_core::Error::Storage(format!("password task failed: {e}")).into())
    }

    /// Hashes a new password (already checked against the policy).
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        Ok(self.run(move || auth::hash_password(&password)).await??)
    }

    /// Refuses (429 `too_many_attempts`) a login of `account` that must wait.
    pub fn admit(&self, account: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.get(account) {
            Some(f) if f.until > now => {
                let wait = (f.until - now).as_secs_f64().ceil() as u64;
                Err(ApiError::http(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_attempts",
                    "too many failed logins for this account: wait before trying again",
                )
                .retry_after(wait.max(1)))
            }
            _ => Ok(()),
        }
    }

    /// Checks a login's password against `hash` (`None`: no such active account, checked
    /// against a decoy so that the time taken says nothing), and counts the result for
    /// `account`.
    pub async fn verify(
        &self,
        account: &str,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, ApiError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| auth::decoy_hash().to_owned());
        let ok = self
            .run(move || auth::verify_password(&password, &hash))
            .await?
            && known;
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            failures.remove(account);
            return Ok(true);
        }
        let now = Instant::now();
        if failures.len() >= MAX_FOLLOWED && !failures.contains_key(account) {
            failures.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if failures.len() >= MAX_FOLLOWED {
                tracing::warn!("too many accounts with failed logins to follow one more");
                return Ok(false);
            }
        }
        let f = failures.entry(account.to_owned()).or_insert(Failures {
            count: 0,
            last: now,
            until: now,
        });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if let Some(over) = f.count.checked_sub(self.limits.free_failures) {
            let backoff = Duration::from_secs(1u64 << over.min(20)).min(self.limits.max_backoff);
            f.until = now + backoff;
        }
        Ok(false)
    }
}

/// The account a login names, as followed by [`Passwords`]: tenant and e-mail as the
/// login compares them.
pub fn account(tenant: &str, email: &str) -> String {
    format!(
        "{}\n{}",
        tenant.trim().to_lowercase(),
        email.trim().to_lowercase()
    )
}
