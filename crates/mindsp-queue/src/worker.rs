//! The worker runtime: takes jobs from a [`JobQueue`], runs the [`Handler`] registered
//! for their kind, and reports the outcome.
//!
//! Per queue, one dispatcher leases jobs in batches (up to its free slots plus a
//! prefetch) and runs each in a task of its own, at most `concurrency` at a time. A
//! renewer extends every lease it holds, an acker marks finished jobs done in batches,
//! and a failed attempt is retried after the kind's [`RetryPolicy`] until its attempts
//! run out. A panicking handler is an ordinary failure. Repeating [`Schedule`]s enqueue
//! one job per firing across all nodes; finished jobs are pruned after a retention.
//!
//! On [`WorkerHandle::shutdown`] the worker stops taking jobs, gives back those it had
//! leased but not started, waits for running ones up to a grace period, then gives
//! back those too, so another worker takes them at once instead of after their lease.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use mindsp_core::ids::JobId;
use mindsp_core::jobs::{DEFAULT_QUEUE, Job, JobQueue, Lease, LeaseRef, NewJob};
use mindsp_core::model::now;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Why a handler did not finish its job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt (after the kind's backoff), while attempts remain.
    #[error("{0}")]
    Retry(String),
    /// Retrying cannot help: the job ends dead at once, with this error.
    #[error("{0}")]
    Permanent(String),
}

/// Runs the jobs of one kind. Jobs are delivered at least once: a handler must be
/// idempotent (a second run of a finished job does no harm).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of `job`.
    async fn run(&self, job: &Job) -> Result<(), JobError>;
}

/// How long a failed job waits before its next attempt: `base * factor^(n-1)` after
/// the n-th failure, capped at `max`, then spread by ±`jitter` (a fraction) so that
/// jobs failing together do not all come back together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub base: Duration,
    /// Growth per further failure.
    pub factor: f64,
    /// Longest delay.
    pub max: Duration,
    /// Random spread, between 0 (none) and 1.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 10 s, then 20 s, 40 s... up to an hour, ±20 %.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let nominal = (self.base.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let spread = if jitter > 0.0 {
            1.0 + jitter * (2.0 * rand::random::<f64>() - 1.0)
        } else {
            1.0
        };
        Duration::from_secs_f64((nominal * spread).min(self.max.as_secs_f64()).max(0.0))
    }
}

/// A cron-like schedule (UTC), with an optional seconds field:
/// `0 6 * * *` is every day at 06:00, `*/10 * * * * *` every ten seconds.
#[derive(Debug, Clone)]
pub struct Schedule(croner::Cron);

impl Schedule {
    /// Parses a cron expression.
    pub fn parse(expr: &str) -> mindsp_core::Result<Self> {
        croner::Cron::from_str(expr)
            .map(Self)
            .map_err(|e| mindsp_core::Error::invalid("invalid_schedule", format!("{expr:?}: {e}")))
    }

    /// The first firing strictly after `t`, on a whole second, so that every node
    /// computes the same instant for the same firing.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let whole = DateTime::from_timestamp(t.timestamp(), 0)?;
        let next = self.0.find_next_occurrence(&whole, false).ok()?;
        DateTime::from_timestamp(next.timestamp(), 0)
    }
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to serve and how many jobs of each may run at once. Empty means the
    /// default queue with `concurrency`.
    pub queues: Vec<(String, usize)>,
    /// Concurrency of the default queue when `queues` is empty.
    pub concurrency: usize,
    /// Jobs leased ahead of free slots, so a fast handler never waits for a round trip.
    pub prefetch: usize,
    /// Lease length. A dead worker's jobs run again after at most this long (plus
    /// `poll_interval`); leases of live workers are renewed every third of it.
    pub lease: Duration,
    /// Longest sleep when nothing is due: the delay before a job enqueued elsewhere
    /// is noticed.
    pub poll_interval: Duration,
    /// Finished jobs older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    /// How often to prune.
    pub prune_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            concurrency: 10,
            prefetch: 10,
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_millis(200),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            prune_every: Duration::from_secs(3600),
        }
    }
}

struct Registered {
    handler: Arc<dyn Handler>,
    policy: RetryPolicy,
}

struct Repeat {
    name: String,
    schedule: Schedule,
    job: NewJob,
}

/// Assembles a worker. See [`Worker::builder`].
pub struct WorkerBuilder {
    queue: Arc<dyn JobQueue>,
    config: WorkerConfig,
    handlers: HashMap<String, Registered>,
    repeats: Vec<Repeat>,
}

/// The worker runtime.
pub struct Worker;

impl Worker {
    /// A worker taking jobs from `queue`.
    pub fn builder(queue: Arc<dyn JobQueue>, config: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder {
            queue,
            config,
            handlers: HashMap::new(),
            repeats: Vec::new(),
        }
    }
}

impl WorkerBuilder {
    /// Runs jobs of `kind` with `handler` and the default [`RetryPolicy`].
    pub fn handle(self, kind: &str, handler: Arc<dyn Handler>) -> Self {
        self.handle_with(kind, handler, RetryPolicy::default())
    }

    /// Runs jobs of `kind` with `handler`, retrying after `policy`.
    pub fn handle_with(
        mut self,
        kind: &str,
        handler: Arc<dyn Handler>,
        policy: RetryPolicy,
    ) -> Self {
        self.handlers
            .insert(kind.to_owned(), Registered { handler, policy });
        self
    }

    /// Enqueues `job` at every firing of `schedule`, once across all workers sharing
    /// the queue (the firing is claimed in the queue's storage). `name` identifies the
    /// schedule and must be the same on every node.
    pub fn repeat(mut self, name: &str, schedule: Schedule, job: NewJob) -> Self {
        self.repeats.push(Repeat {
            name: name.to_owned(),
            schedule,
            job,
        });
        self
    }

    /// Starts the worker's tasks on the current runtime.
    pub fn start(self) -> WorkerHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            queue: self.queue,
            handlers: self.handlers,
            config: self.config,
            held: Mutex::new(HashMap::new()),
        });
        let (ack_tx, ack_rx) = mpsc::channel(8192);
        let mut tasks = JoinSet::new();
        let queues = if shared.config.queues.is_empty() {
            vec![(DEFAULT_QUEUE.to_owned(), shared.config.concurrency)]
        } else {
            shared.config.queues.clone()
        };
        let mut lanes = Vec::new();
        for (name, concurrency) in queues {
            let lane = Lane {
                shared: shared.clone(),
                name,
                slots: Arc::new(Semaphore::new(concurrency.max(1))),
                concurrency: concurrency.max(1),
                running: Arc::new(Mutex::new(JoinSet::new())),
                ack: ack_tx.clone(),
            };
            lanes.push(LaneHandle {
                running: lane.running.clone(),
                slots: lane.slots.clone(),
                concurrency: lane.concurrency,
            });
            tasks.spawn(lane.run(stop_rx.clone()));
        }
        drop(ack_tx);
        let acker = tokio::spawn(acker(shared.clone(), ack_rx));
        tasks.spawn(renewer(shared.clone(), stop_rx.clone()));
        for repeat in self.repeats {
            tasks.spawn(repeater(shared.clone(), repeat, stop_rx.clone()));
        }
        if let Some(retention) = shared.config.retention {
            tasks.spawn(pruner(shared.clone(), retention, stop_rx.clone()));
        }
        WorkerHandle {
            stop: stop_tx,
            tasks,
            lanes,
            acker,
            shared,
        }
    }
}

/// What every task of one worker shares.
struct Shared {
    queue: Arc<dyn JobQueue>,
    handlers: HashMap<String, Registered>,
    config: WorkerConfig,
    /// Every lease this worker holds (buffered or running), for renewal and release.
    held: Mutex<HashMap<JobId, LeaseRef>>,
}

impl Shared {
    fn hold(&self, leases: &[Lease]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for l in leases {
            held.insert(l.job.id, l.lease_ref());
        }
    }

    fn unhold(&self, id: JobId) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn held(&self) -> Vec<LeaseRef> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .copied()
            .collect()
    }
}

/// What shutdown needs of a lane: its running handlers and its slots.
struct LaneHandle {
    running: Arc<Mutex<JoinSet<()>>>,
    slots: Arc<Semaphore>,
    concurrency: usize,
}

/// A running worker.
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    lanes: Vec<LaneHandle>,
    acker: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl WorkerHandle {
    /// Stops taking jobs, waits up to `grace` for running ones, gives back the rest,
    /// and returns once every outcome is recorded.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        // Dispatchers give back their unstarted leases and stop; the others stop.
        while self.tasks.join_next().await.is_some() {}
        let deadline = Instant::now() + grace;
        for lane in &self.lanes {
            // Every slot free means every handler of the lane has finished.
            let all = lane.slots.acquire_many(lane.concurrency as u32);
            let _ = tokio::time::timeout_at(deadline, all).await;
        }
        for lane in &self.lanes {
            lane.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .abort_all();
        }
        for lane in &self.lanes {
            let mut set =
                std::mem::take(&mut *lane.running.lock().unwrap_or_else(|e| e.into_inner()));
            while set.join_next().await.is_some() {}
        }
        let unfinished = self.shared.held();
        if !unfinished.is_empty() {
            match self.shared.queue.release(&unfinished).await {
                Ok(n) => tracing::info!(released = n, "worker stopped; unfinished jobs given back"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not give jobs back; their leases will expire")
                }
            }
        }
        // Every sender is gone once the lanes and handlers are: the acker drains and ends.
        drop(self.lanes);
        let _ = self.acker.await;
    }
}

/// The dispatcher of one queue.
struct Lane {
    shared: Arc<Shared>,
    name: String,
    slots: Arc<Semaphore>,
    concurrency: usize,
    running: Arc<Mutex<JoinSet<()>>>,
    ack: mpsc::Sender<LeaseRef>,
}

impl Lane {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let config = &self.shared.config;
        let mut buffer: VecDeque<Lease> = VecDeque::new();
        let mut idle_until = Instant::now();
        'dispatch: loop {
            let permit = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                p = self.slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let lease = loop {
                if let Some(lease) = buffer.pop_front() {
                    break lease;
                }
                if Instant::now() < idle_until {
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => break 'dispatch,
                        _ = tokio::time::sleep_until(idle_until) => {}
                    }
                }
                let want = self.slots.available_permits() + 1 + config.prefetch;
                match self
                    .shared
                    .queue
                    .reserve(&self.name, want as u32, config.lease)
                    .await
                {
                    Ok(leases) => {
                        self.shared.hold(&leases);
                        if leases.len() < want {
                            idle_until = self.idle_until().await;
                        }
                        buffer.extend(leases);
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.name, error = %e, "reserving jobs failed");
                        idle_until = Instant::now() + config.poll_interval;
                    }
                }
            };
            let shared = self.shared.clone();
            let ack = self.ack.clone();
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .spawn(async move {
                    run_one(&shared, lease, &ack).await;
                    drop(permit);
                });
            // Reap finished tasks so the set does not grow.
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            while running.try_join_next().is_some() {}
        }
        // Leased but never started: give them back now.
        let unstarted: Vec<LeaseRef> = buffer.iter().map(Lease::lease_ref).collect();
        if !unstarted.is_empty() {
            for l in &unstarted {
                self.shared.unhold(l.id);
            }
            if let Err(e) = self.shared.queue.release(&unstarted).await {
                tracing::warn!(error = %e, "could not give back unstarted jobs");
            }
        }
    }

    /// When to look again after the queue ran dry: its next due moment, at most a
    /// poll interval away.
    async fn idle_until(&self) -> Instant {
        let poll = self.shared.config.poll_interval;
        let wake = Instant::now() + poll;
        match self.shared.queue.next_due(&self.name).await {
            Ok(Some(at)) => {
                let wait = (at - now()).to_std().unwrap_or(Duration::ZERO);
                (Instant::now() + wait.max(Duration::from_millis(2))).min(wake)
            }
            Ok(None) => wake,
            Err(e) => {
                tracing::warn!(queue = %self.name, error = %e, "next_due failed");
                wake
            }
        }
    }
}

/// Runs one leased job and reports its outcome.
async fn run_one(shared: &Shared, lease: Lease, ack: &mpsc::Sender<LeaseRef>) {
    let job = &lease.job;
    let lease_ref = lease.lease_ref();
    let Some(registered) = shared.handlers.get(&job.kind) else {
        shared.unhold(job.id);
        report_failure(
            shared,
            &lease_ref,
            &format!("unknown job kind {:?}", job.kind),
            None,
        )
        .await;
        return;
    };
    let outcome = AssertUnwindSafe(registered.handler.run(job))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(JobError::Retry(format!("handler panicked: {text}")))
        });
    shared.unhold(job.id);
    match outcome {
        Ok(()) => {
            if ack.send(lease_ref).await.is_err() {
                tracing::warn!(job = %job.id, "acker gone; the job will run again");
            }
        }
        Err(JobError::Retry(e)) => {
            let retry_at = (job.attempts < job.max_attempts).then(|| {
                now()
                    + chrono::Duration::from_std(registered.policy.delay(job.attempts))
                        .unwrap_or(chrono::Duration::MAX)
            });
            report_failure(shared, &lease_ref, &e, retry_at).await;
        }
        Err(JobError::Permanent(e)) => report_failure(shared, &lease_ref, &e, None).await,
    }
}

async fn report_failure(
    shared: &Shared,
    lease: &LeaseRef,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
) {
    for attempt in 0..3 {
        match shared.queue.fail(lease, error, retry_at).await {
            Ok(state) => {
                tracing::info!(job = %lease.id, ?state, error, "job attempt failed");
                return;
            }
            Err(e) => {
                tracing::warn!(job = %lease.id, error = %e, attempt, "recording a failure failed");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
}

/// Marks finished jobs done, in batches.
async fn acker(shared: Arc<Shared>, mut rx: mpsc::Receiver<LeaseRef>) {
    let mut batch = Vec::with_capacity(1024);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        for attempt in 0..5 {
            match shared.queue.complete(&batch).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, n = batch.len(), "marking jobs done failed");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        batch.clear();
    }
}

/// Renews every lease the worker holds, every third of the lease length.
async fn renewer(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let every = shared.config.lease / 3;
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let held = shared.held();
        if held.is_empty() {
            continue;
        }
        match shared.queue.renew(&held, shared.config.lease).await {
            Ok(kept) => {
                let lost = kept.iter().filter(|k| !**k).count();
                if lost > 0 {
                    tracing::warn!(lost, "leases lost; those jobs may run elsewhere too");
                }
            }
            Err(e) => tracing::warn!(error = %e, "renewing leases failed"),
        }
    }
}

/// Enqueues a repeating job at each firing of its schedule.
async fn repeater(shared: Arc<Shared>, repeat: Repeat, mut stop: watch::Receiver<bool>) {
    let mut after = now();
    while let Some(fire_at) = repeat.schedule.next_after(after) {
        let wait = (fire_at - now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let job = repeat.job.clone().run_at(fire_at);
        match shared.queue.enqueue_tick(&repeat.name, fire_at, &job).await {
            Ok(true) => tracing::debug!(schedule = %repeat.name, %fire_at, "schedule fired"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(schedule = %repeat.name, error = %e, "schedule could not fire")
            }
        }
        after = fire_at;
    }
}

/// Deletes finished jobs older than the retention.
async fn pruner(shared: Arc<Shared>, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let before = now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        match shared.queue.prune(before).await {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "finished jobs pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning jobs failed"),
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(shared.config.prune_every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.0,
        };
        let d: Vec<u64> = (1..=6).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 10, 10]);
        let j = RetryPolicy { jitter: 0.5, ..p };
        for _ in 0..100 {
            let d = j.delay(3).as_secs_f64();
            assert!((2.0..=6.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn schedules_parse_with_or_without_seconds() {
        let t = DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let daily = Schedule::parse("0 6 * * *").unwrap();
        assert_eq!(
            daily.next_after(t).unwrap().to_rfc3339(),
            "2026-11-26T06:00:00+00:00"
        );
        let often = Schedule::parse("*/10 * * * * *").unwrap();
        assert_eq!(
            often.next_after(t).unwrap().to_rfc3339(),
            "2026-11-25T10:00:10+00:00"
        );
        // Two nodes a fraction of a second apart agree on the instant of a firing.
        let a = often
            .next_after(t + chrono::Duration::milliseconds(137))
            .unwrap();
        let b = often
            .next_after(t + chrono::Duration::milliseconds(912))
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.timestamp_subsec_nanos(), 0);
        assert_eq!(
            Schedule::parse("every day").unwrap_err().code(),
            "invalid_schedule"
        );
    }
}
