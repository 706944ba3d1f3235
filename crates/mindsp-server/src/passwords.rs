//! Password work from HTTP requests, bounded. An argon2id hash costs 19 MiB and tens of
//! milliseconds of CPU: unbounded, a burst of logins would take every core from the
//! real-time service and gigabytes of memory (one hash per blocking thread, up to 512).
//! And a login is a guess: an account that keeps failing is slowed down.
//!
//! - At most [`PasswordLimits::at_once`] hashes run at a time and
//!   [`PasswordLimits::waiting`] more wait; beyond, 503 `busy` with `Retry-After`. A
//!   hash holds its slot until it ends, even when its client hung up.
//! - One login at a time per account (tenant and e-mail, trimmed and lowercased, known
//!   or not, so the answer reveals nothing): another one meanwhile gets 429 `too_many_attempts`, so
//!   guesses sent in parallel count one by one.
//! - After [`PasswordLimits::free_failures`] failed logins in a row, each next try of the
//!   account waits 1 s, then 2 s, 4 s... up to [`PasswordLimits::max_backoff`] (one
//!   minute): 429 `too_many_attempts` with `Retry-After`, without hashing. A success
//!   clears the count; so does an hour without failures.
//! - A device that logged in to the account before (its login carries the device token
//!   it was given, `Tokens::issue_device`) is followed on its own, under the account and
//!   its device id: whoever fails on purpose with someone's address slows down only the
//!   devices that never logged in, not that person's phone. The ceiling is short for
//!   those too (a new device of theirs waits a minute at most).
//!
//! Per node: with several nodes behind a load balancer a guesser gets that many more
//! tries. Not per address: behind a proxy every client would share one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Longest wait imposed on an account (default one minute).
    pub max_backoff: Duration,
}

impl Default for PasswordLimits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            at_once: (cores / 2).max(1),
            waiting: 64,
            free_failures: 5,
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Failures older than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Most accounts followed at once (a few hundred bytes each). When full, those whose
/// last failure is oldest are forgotten first.
const MAX_FOLLOWED: usize = 100_000;

/// What is known of one account's logins.
struct Account {
    /// Failures in a row.
    failures: u32,
    /// The last failure.
    last: Instant,
    /// No try before this.
    until: Instant,
    /// A login of this account is being checked.
    checking: bool,
}

/// The bounded password service of one node.
pub struct Passwords {
    limits: PasswordLimits,
    permits: Arc<Semaphore>,
    /// Requests waiting for a hash or computing one.
    inside: AtomicUsize,
    accounts: Mutex<HashMap<String, Account>>,
}

/// Leaves [`Passwords::inside`] however the request ends (a client that hangs up
/// drops its future while it waits).
struct Inside<'a>(&'a AtomicUsize);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A login let through by [`Passwords::admit`], checked by [`Passwords::verify`].
/// Dropped unchecked (a failed lookup, a client that hung up), it only lets the next
/// login of the account through.
pub struct Attempt<'a> {
    passwords: &'a Passwords,
    account: String,
    /// Whether the password matched, once checked.
    result: Option<bool>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.passwords.finish(&self.account, self.result);
    }
}

impl Passwords {
    /// A service with these bounds.
    pub fn new(limits: PasswordLimits) -> Self {
        let at_once = limits.at_once.max(1);
        Self {
            limits,
            permits: Arc::new(Semaphore::new(at_once)),
            inside: AtomicUsize::new(0),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` on a blocking thread once a hashing slot is free, or refuses at once
    /// (503 `busy`) when too many already wait. The slot goes with the work, so a client
    /// that hangs up does not free it before the hash ends.
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
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| {
            ApiError::http(StatusCode::SERVICE_UNAVAILABLE, "busy", "shutting down")
        })?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| mindsp_core::Error::Storage(format!("password task failed: {e}")).into())
    }

    /// Hashes a new password (already checked against the policy).
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        Ok(self.run(move || auth::hash_password(&password)).await??)
    }

    /// Lets a login of `account` ([`account`]) through, or refuses it (429
    /// `too_many_attempts`) while the account must wait or another of its logins is
    /// being checked.
    pub fn admit(&self, account: String) -> Result<Attempt<'_>, ApiError> {
        let now = Instant::now();
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let refuse = |wait: Duration| {
            let secs = wait.as_secs_f64().ceil() as u64;
            ApiError::http(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many logins for this account: wait before trying again",
            )
            .retry_after(secs.max(1))
        };
        match accounts.get_mut(&account) {
            Some(a) if a.until > now => return Err(refuse(a.until - now)),
            Some(a) if a.checking => return Err(refuse(Duration::from_secs(1))),
            Some(a) => a.checking = true,
            None => {
                if accounts.len() >= MAX_FOLLOWED {
                    forget_oldest(&mut accounts, now);
                }
                accounts.insert(
                    account.clone(),
                    Account {
                        failures: 0,
                        last: now,
                        until: now,
                        checking: true,
                    },
                );
            }
        }
        Ok(Attempt {
            passwords: self,
            account,
            result: None,
        })
    }

    /// Checks the password of an admitted login against `hash` (`None`: no such active
    /// account, checked against a decoy so that the time taken says nothing), and counts
    /// the result for its account.
    pub async fn verify(
        &self,
        mut attempt: Attempt<'_>,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, ApiError> {
        let ok = self
            .run(move || {
                let known = hash.is_some();
                let hash = match &hash {
                    Some(h) => h.as_str(),
                    None => auth::decoy_hash(),
                };
                auth::verify_password(&password, hash) && known
            })
            .await?;
        attempt.result = Some(ok);
        Ok(ok)
    }

    /// Ends the check of a login of `account`: `Some(ok)` its result, `None` unchecked.
    fn finish(&self, account: &str, result: Option<bool>) {
        let now = Instant::now();
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(a) = accounts.get_mut(account) else {
            return;
        };
        a.checking = false;
        match result {
            Some(true) => {
                accounts.remove(account);
            }
            None if a.failures == 0 => {
                accounts.remove(account);
            }
            None => {}
            Some(false) => {
                if now.duration_since(a.last) >= FORGET_AFTER {
                    a.failures = 0;
                }
                a.failures += 1;
                a.last = now;
                if let Some(over) = a.failures.checked_sub(self.limits.free_failures) {
                    let backoff =
                        Duration::from_secs(1u64 << over.min(20)).min(self.limits.max_backoff);
                    a.until = now + backoff;
                }
            }
        }
    }
}

/// Makes room among followed accounts: those not failing for an hour go, then those
/// whose last failure is oldest, down to nine tenths of [`MAX_FOLLOWED`] (never one being
/// checked), so that the next tenth of new accounts finds room without another pass.
fn forget_oldest(accounts: &mut HashMap<String, Account>, now: Instant) {
    accounts.retain(|_, a| a.checking || now.duration_since(a.last) < FORGET_AFTER);
    let keep = MAX_FOLLOWED / 10 * 9;
    if accounts.len() <= keep {
        return;
    }
    let mut lasts: Vec<Instant> = accounts
        .values()
        .filter(|a| !a.checking)
        .map(|a| a.last)
        .collect();
    let n = (accounts.len() - keep).min(lasts.len());
    if n == 0 {
        return;
    }
    let cut = *lasts.select_nth_unstable(n - 1).1;
    accounts.retain(|_, a| a.checking || a.last > cut);
}

/// The account a login names, as followed by [`Passwords`]: its tenant slug and
/// e-mail, trimmed and lowercased as the login looks them up.
pub fn account(slug: &str, email: &str) -> String {
    format!("{slug}\n{email}")
}

/// `account` as followed for one device that logged in to it before (its device token).
pub fn on_device(account: &str, device: uuid::Uuid) -> String {
    format!("{account}\n{device}")
}

/// A signed-in user's own account, as followed when they give their current password
/// (a password change).
pub fn own_account(user: mindsp_core::UserId) -> String {
    format!("user\n{user}")
}
