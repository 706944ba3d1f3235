//! The durable job queue port.
//!
//! A job is *leased*, not popped: [`JobQueue::reserve`] hands out a [`Lease`] that the
//! worker renews while it runs. When a worker dies its lease expires and the next
//! `reserve` hands the job out again, so delivery is at-least-once and handlers must be
//! idempotent. A job that keeps failing ends `Dead`, visible in monitoring, never
//! dropped. The adapters live in `mindsp-queue`; the conformance suite there states
//! what every implementation must do.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ids::{JobId, TenantId};
use crate::ports::TenantTx;

/// Longest accepted kind or queue name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest accepted unique key.
pub const MAX_UNIQUE_KEY_LEN: usize = 200;
/// Largest accepted payload, as serialized JSON.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Priorities run from `-MAX_PRIORITY` to `MAX_PRIORITY`; higher runs first.
pub const MAX_PRIORITY: i16 = 100;
/// Most attempts a job may be given.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest error text kept on a job.
pub const MAX_ERROR_LEN: usize = 2_000;
/// The queue a job goes to unless it names another.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts a job gets unless it says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its run-at time (never attempted, or released by a stopping worker).
    Scheduled,
    /// Due, waiting for a worker.
    Ready,
    /// Leased by a worker.
    Running,
    /// Done.
    Succeeded,
    /// Failed, waiting for its next attempt (its run-at time).
    Retrying,
    /// Failed on its last attempt, or failed permanently. Stays until retried or discarded.
    Dead,
    /// Cancelled or discarded before it succeeded.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Ready,
        JobState::Running,
        JobState::Succeeded,
        JobState::Retrying,
        JobState::Dead,
        JobState::Cancelled,
    ];

    /// The lowercase name used in storage and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Ready => "ready",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses [`JobState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job will not run again on its own.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Dead | JobState::Cancelled
        )
    }
}

/// What enqueuing does when a pending job (not yet finished) already holds the unique
/// key in the same tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDuplicate {
    /// Keep the existing job; the new one is not stored.
    #[default]
    Keep,
    /// Give the existing job the new payload, priority, run-at time and attempts, as if
    /// it had just been enqueued (moving a training session moves its reminder). A job
    /// that is running at that moment is left to finish and a new one is stored.
    Replace,
}

/// A job to enqueue. Build it with [`NewJob::new`] and the builder methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// Which handler runs it, e.g. `email.send`.
    pub kind: String,
    /// The queue it waits in; workers take jobs per queue.
    pub queue: String,
    /// Arguments for the handler.
    pub payload: serde_json::Value,
    /// The tenant it belongs to, if any; monitoring is scoped by it.
    pub tenant: Option<TenantId>,
    /// Higher runs first among due jobs.
    pub priority: i16,
    /// When it may run; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts before it ends dead.
    pub max_attempts: u32,
    /// At most one pending job per tenant holds a unique key.
    pub unique_key: Option<String>,
    /// What to do when the key is held.
    pub on_duplicate: OnDuplicate,
}

impl NewJob {
    /// A job of `kind` with `payload`, due now, on the default queue.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            queue: DEFAULT_QUEUE.to_owned(),
            payload,
            tenant: None,
            priority: 0,
            run_at: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
            on_duplicate: OnDuplicate::Keep,
        }
    }

    /// Puts it on `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Makes it belong to `tenant`.
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Sets its priority.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Delays it until `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Delays it by `delay` from now.
    pub fn delay(self, delay: Duration) -> Self {
        let at = crate::model::now()
            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        self.run_at(at)
    }

    /// Gives it `n` attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Makes it unique by `key` within its tenant, with `policy` on a duplicate.
    pub fn unique(mut self, key: impl Into<String>, policy: OnDuplicate) -> Self {
        self.unique_key = Some(key.into());
        self.on_duplicate = policy;
        self
    }

    /// Checks every limit; backends call it before writing anything.
    pub fn validate(&self) -> Result<()> {
        check_name("kind", &self.kind)?;
        check_name("queue", &self.queue)?;
        if let Some(key) = &self.unique_key
            && (key.is_empty() || key.len() > MAX_UNIQUE_KEY_LEN)
        {
            return Err(Error::invalid(
                "invalid_unique_key",
                format!("a unique key has 1 to {MAX_UNIQUE_KEY_LEN} bytes"),
            ));
        }
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(Error::invalid(
                "invalid_priority",
                format!("priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"),
            ));
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(Error::invalid(
                "invalid_max_attempts",
                format!("max_attempts must be between 1 and {MAX_ATTEMPTS}"),
            ));
        }
        let size = serde_json::to_vec(&self.payload)
            .map_err(|e| Error::invalid("invalid_payload", e.to_string()))?
            .len();
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(
                "payload_too_large",
                format!("a job payload has at most {MAX_PAYLOAD_BYTES} bytes, this one {size}"),
            ));
        }
        Ok(())
    }
}

fn check_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            if what == "kind" {
                "invalid_kind"
            } else {
                "invalid_queue"
            },
            format!(
                "a job {what} has 1 to {MAX_NAME_LEN} characters among a-z, 0-9, '.', '_', '-', ':'"
            ),
        ))
    }
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Identifier.
    pub id: JobId,
    /// Owning tenant, if any.
    pub tenant: Option<TenantId>,
    /// Handler name.
    pub kind: String,
    /// Queue name.
    pub queue: String,
    /// Handler arguments.
    pub payload: serde_json::Value,
    /// Higher runs first.
    pub priority: i16,
    /// Current state; `Ready` and `Scheduled` are told apart by `run_at` and the clock.
    pub state: JobState,
    /// When it may (next) run.
    pub run_at: DateTime<Utc>,
    /// Attempts started so far, the current one included.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Unique key, if any.
    pub unique_key: Option<String>,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// Enqueued at.
    pub created_at: DateTime<Utc>,
    /// Last state change.
    pub updated_at: DateTime<Utc>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Identifies one lease: a job and the token of the reservation that holds it. A
/// stale lease (the job was re-leased after this one expired) no longer matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    /// The job.
    pub id: JobId,
    /// The reservation.
    pub token: Uuid,
}

/// A reserved job.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The job, with `attempts` counting this attempt.
    pub job: Job,
    /// The reservation token.
    pub token: Uuid,
    /// When the lease lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// The reference used to renew, complete, fail or release it.
    pub fn lease_ref(&self) -> LeaseRef {
        LeaseRef {
            id: self.job.id,
            token: self.token,
        }
    }
}

/// What enqueuing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "id")]
pub enum Enqueued {
    /// A new job was stored.
    Created(JobId),
    /// A pending job held the unique key and was kept; nothing was stored.
    Kept(JobId),
    /// A pending job held the unique key and was updated in place.
    Replaced(JobId),
}

impl Enqueued {
    /// The job that now stands for the request.
    pub fn id(&self) -> JobId {
        match *self {
            Enqueued::Created(id) | Enqueued::Kept(id) | Enqueued::Replaced(id) => id,
        }
    }
}

/// Which jobs a monitoring call sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobScope {
    /// Every job (operators, workers).
    All,
    /// The jobs of one tenant (a tenant's administrators).
    Tenant(TenantId),
}

impl JobScope {
    /// Whether a job of `tenant` is in scope.
    pub fn covers(&self, tenant: Option<TenantId>) -> bool {
        match self {
            JobScope::All => true,
            JobScope::Tenant(t) => tenant == Some(*t),
        }
    }
}

/// Number of jobs per state in one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Queue name.
    pub queue: String,
    /// Never attempted (or released), not yet due.
    pub scheduled: u64,
    /// Due, waiting for a worker.
    pub ready: u64,
    /// Leased.
    pub running: u64,
    /// Done (until pruned).
    pub succeeded: u64,
    /// Waiting for a retry.
    pub retrying: u64,
    /// Out of attempts.
    pub dead: u64,
    /// Cancelled or discarded (until pruned).
    pub cancelled: u64,
}

impl QueueCounts {
    /// Adds `n` to the counter of `state`.
    pub fn add(&mut self, state: JobState, n: u64) {
        *match state {
            JobState::Scheduled => &mut self.scheduled,
            JobState::Ready => &mut self.ready,
            JobState::Running => &mut self.running,
            JobState::Succeeded => &mut self.succeeded,
            JobState::Retrying => &mut self.retrying,
            JobState::Dead => &mut self.dead,
            JobState::Cancelled => &mut self.cancelled,
        } += n;
    }

    /// The counter of `state`.
    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Scheduled => self.scheduled,
            JobState::Ready => self.ready,
            JobState::Running => self.running,
            JobState::Succeeded => self.succeeded,
            JobState::Retrying => self.retrying,
            JobState::Dead => self.dead,
            JobState::Cancelled => self.cancelled,
        }
    }
}

/// Jobs that finished in one minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteStat {
    /// Start of the minute.
    pub minute: DateTime<Utc>,
    /// Jobs that succeeded in it.
    pub succeeded: u64,
    /// Attempts that failed in it (retried or dead).
    pub failed: u64,
}

/// A filter for [`JobQueue::list`]. Newest first (by last state change, then id).
#[derive(Debug, Clone, PartialEq)]
pub struct JobFilter {
    /// Which tenant's jobs.
    pub scope: JobScope,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this queue.
    pub queue: Option<String>,
    /// Only jobs older than this one in the listing order (cursor from the last page).
    pub before: Option<(DateTime<Utc>, JobId)>,
    /// Page size.
    pub limit: u32,
}

/// The durable job queue port.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Stores a job (see [`NewJob`] and [`OnDuplicate`]).
    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued>;

    /// Stores many jobs at once, atomically where the backend can. Answers in order.
    async fn enqueue_batch(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.enqueue(job).await?);
        }
        Ok(out)
    }

    /// Stores a job in the caller's storage transaction, so it exists if and only if
    /// that transaction commits. Only a queue living in the same database can; others
    /// answer `Invalid { code: "queue_not_transactional" }`.
    async fn enqueue_in(&self, tx: &mut dyn TenantTx, job: &NewJob) -> Result<Enqueued> {
        let _ = (tx, job);
        Err(Error::invalid(
            "queue_not_transactional",
            "this job queue cannot join a storage transaction",
        ))
    }

    /// Stores many jobs in the caller's storage transaction (see
    /// [`JobQueue::enqueue_in`]). Answers in order. Backends may do it in one
    /// statement; the default enqueues them one by one.
    async fn enqueue_batch_in(
        &self,
        tx: &mut dyn TenantTx,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.enqueue_in(tx, job).await?);
        }
        Ok(out)
    }

    /// Leases up to `max` due jobs of `queue`, highest priority first, then earliest
    /// run-at. Jobs whose lease expired count as due; one that has used its last
    /// attempt ends dead instead ("worker lost"). Each lease counts an attempt.
    async fn reserve(&self, queue: &str, max: u32, lease: Duration) -> Result<Vec<Lease>>;

    /// The earliest moment something in `queue` becomes due (a run-at time or a lease
    /// expiry), if anything is pending. Workers sleep until then.
    async fn next_due(&self, queue: &str) -> Result<Option<DateTime<Utc>>>;

    /// Extends leases by `lease` from now. Answers, in order, whether each lease was
    /// still held.
    async fn renew(&self, leases: &[LeaseRef], lease: Duration) -> Result<Vec<bool>>;

    /// Marks jobs succeeded. A lease no longer held is ignored (the job was re-leased);
    /// answers how many were marked.
    async fn complete(&self, leases: &[LeaseRef]) -> Result<u64>;

    /// Records a failed attempt: with `retry_at`, the job waits in `Retrying` until
    /// then; without, it ends `Dead`. Answers the new state, or `None` if the lease
    /// was no longer held.
    async fn fail(
        &self,
        lease: &LeaseRef,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<JobState>>;

    /// Gives leased jobs back without counting the attempt (a worker shutting down).
    async fn release(&self, leases: &[LeaseRef]) -> Result<u64>;

    /// A job, if in `scope`.
    async fn job(&self, scope: JobScope, id: JobId) -> Result<Option<Job>>;

    /// Cancels a job that has not finished and is not running. `false` if there was
    /// none in scope in such a state.
    async fn cancel(&self, scope: JobScope, id: JobId) -> Result<bool>;

    /// Cancels the pending job holding `key` in `tenant`, if any.
    async fn cancel_unique(&self, tenant: Option<TenantId>, key: &str) -> Result<bool>;

    /// For repeating jobs: enqueues `job` for the firing of `schedule` at `fire_at`
    /// unless that firing was already claimed, by this node or any other. `true` if
    /// this call enqueued it. Claim and job are stored atomically.
    async fn enqueue_tick(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        job: &NewJob,
    ) -> Result<bool>;

    /// Counts per queue and state.
    async fn counts(&self, scope: JobScope) -> Result<Vec<QueueCounts>>;

    /// Succeeded jobs and failed attempts per minute over the last `minutes` minutes,
    /// oldest first, the current minute included.
    async fn throughput(&self, scope: JobScope, minutes: u32) -> Result<Vec<MinuteStat>>;

    /// A page of jobs, newest state change first.
    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>>;

    /// Makes a dead, retrying or cancelled job due now with a fresh set of attempts.
    /// `false` if there was none in scope in such a state.
    async fn retry(&self, scope: JobScope, id: JobId) -> Result<bool>;

    /// Gives up on a dead, retrying or pending job: it ends cancelled. `false` if there
    /// was none in scope in such a state.
    async fn discard(&self, scope: JobScope, id: JobId) -> Result<bool>;

    /// Deletes jobs that finished before `before`, and claims of schedule firings
    /// older than that. Answers how many jobs.
    async fn prune(&self, before: DateTime<Utc>) -> Result<u64>;
}

/// Truncates an error text to [`MAX_ERROR_LEN`] bytes on a character boundary.
pub fn clip_error(error: &str) -> &str {
    if error.len() <= MAX_ERROR_LEN {
        return error;
    }
    let mut end = MAX_ERROR_LEN;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Enqueues `jobs` in the caller's storage transaction; a queue that cannot join it
/// (`queue_not_transactional`, e.g. Redis) leaves them in `after_commit`, for the
/// caller to enqueue once the transaction has committed.
pub async fn enqueue_in_or_defer(
    queue: &dyn JobQueue,
    tx: &mut dyn TenantTx,
    jobs: Vec<NewJob>,
    after_commit: &mut Vec<NewJob>,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    match queue.enqueue_batch_in(tx, &jobs).await {
        Ok(_) => Ok(()),
        Err(Error::Invalid {
            code: "queue_not_transactional",
            ..
        }) => {
            after_commit.extend(jobs);
            Ok(())
        }
        Err(e) => Err(e),
    }
}
