//! The job queue conformance suite: the same assertions against every backend.
//!
//! SQLite always runs (a fresh file per test). PostgreSQL runs when
//! `MINDSP_TEST_POSTGRES_URL` is set (a fresh schema per test), Redis when
//! `MINDSP_TEST_REDIS_URL` is set (a fresh key prefix per test); otherwise those cases
//! print that they were skipped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use mindsp_core::jobs::*;
use mindsp_core::{Error, JobId, TenantId};
use mindsp_queue::worker::{Handler, JobError, RetryPolicy, Schedule, Worker, WorkerConfig};
use serde_json::json;

mod support;
use support::Backend;

const LEASE: Duration = Duration::from_secs(30);

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

/// Reserves from the default queue a job failed with a retry at `retry_at`, which must
/// not come back before then. A machine that stalls past `retry_at` before the reserve
/// begins makes the job due: then the job is returned, to carry on with.
async fn reserve_before(q: &dyn JobQueue, retry_at: chrono::DateTime<Utc>) -> Option<Lease> {
    let began = Utc::now();
    let early = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap();
    assert!(
        // Whole milliseconds: a queue that keeps times in ms makes the job due within the
        // millisecond before `retry_at`.
        early.is_empty() || began.timestamp_millis() >= retry_at.timestamp_millis(),
        "reserved before its retry time"
    );
    early.into_iter().next()
}

async fn reserve_ids(q: &dyn JobQueue, queue: &str, max: u32) -> Vec<JobId> {
    q.reserve(queue, max, LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.job.id)
        .collect()
}

async fn get(q: &dyn JobQueue, id: JobId) -> Job {
    q.job(JobScope::All, id).await.unwrap().expect("job exists")
}

// ---- ordering, delays -----------------------------------------------------------

async fn order_by_priority_then_run_at(b: &Backend) {
    let q = &*b.queue;
    let now = Utc::now();
    let a = q
        .enqueue(&NewJob::new("t.a", json!({})).run_at(now - ms(3000)))
        .await
        .unwrap()
        .id();
    let older = q
        .enqueue(&NewJob::new("t.b", json!({})).run_at(now - ms(5000)))
        .await
        .unwrap()
        .id();
    let urgent = q
        .enqueue(
            &NewJob::new("t.c", json!({}))
                .run_at(now - ms(1000))
                .priority(10),
        )
        .await
        .unwrap()
        .id();
    let later = q
        .enqueue(&NewJob::new("t.d", json!({})).run_at(now + chrono::Duration::hours(1)))
        .await
        .unwrap()
        .id();
    let other_queue = q
        .enqueue(&NewJob::new("t.e", json!({})).queue("other"))
        .await
        .unwrap()
        .id();

    assert_eq!(get(q, later).await.state, JobState::Scheduled);
    assert_eq!(get(q, a).await.state, JobState::Ready);

    let leases = q.reserve(DEFAULT_QUEUE, 10, LEASE).await.unwrap();
    let ids: Vec<JobId> = leases.iter().map(|l| l.job.id).collect();
    assert_eq!(ids, vec![urgent, older, a], "priority first, then run-at");
    for l in &leases {
        assert_eq!(l.job.attempts, 1);
        assert_eq!(l.job.state, JobState::Running);
        assert!(l.expires_at > Utc::now());
    }
    assert_eq!(get(q, urgent).await.state, JobState::Running);
    assert!(reserve_ids(q, DEFAULT_QUEUE, 10).await.is_empty());
    assert_eq!(reserve_ids(q, "other", 10).await, vec![other_queue]);
}

async fn batches_respect_max(b: &Backend) {
    let q = &*b.queue;
    let jobs: Vec<NewJob> = (0..25)
        .map(|i| NewJob::new("t.batch", json!({ "i": i })))
        .collect();
    let ids: Vec<JobId> = q
        .enqueue_batch(&jobs)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            assert!(matches!(e, Enqueued::Created(_)));
            e.id()
        })
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 25);
    assert_eq!(reserve_ids(q, DEFAULT_QUEUE, 10).await.len(), 10);
    assert_eq!(reserve_ids(q, DEFAULT_QUEUE, 10).await.len(), 10);
    assert_eq!(reserve_ids(q, DEFAULT_QUEUE, 10).await.len(), 5);
    let payload = get(q, ids[7]).await.payload;
    assert_eq!(payload, json!({ "i": 7 }));
}

async fn delayed_jobs_wait_for_their_time(b: &Backend) {
    let q = &*b.queue;
    let id = q
        .enqueue(&NewJob::new("t.later", json!({})).delay(Duration::from_millis(400)))
        .await
        .unwrap()
        .id();
    let job = get(q, id).await;
    assert_eq!(job.state, JobState::Scheduled);
    assert!(reserve_ids(q, DEFAULT_QUEUE, 10).await.is_empty());
    let due = q
        .next_due(DEFAULT_QUEUE)
        .await
        .unwrap()
        .expect("a job is pending");
    assert!(
        (due - job.run_at).num_milliseconds().abs() <= 1,
        "{due} vs {}",
        job.run_at
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(reserve_ids(q, DEFAULT_QUEUE, 10).await, vec![id]);
    // Only the lease is pending now.
    let due = q
        .next_due(DEFAULT_QUEUE)
        .await
        .unwrap()
        .expect("a lease is pending");
    assert!(due > Utc::now() + chrono::Duration::seconds(20));
    assert_eq!(q.next_due("empty").await.unwrap(), None);
}

// ---- failures --------------------------------------------------------------------

async fn failures_retry_then_die(b: &Backend) {
    let q = &*b.queue;
    let id = q
        .enqueue(&NewJob::new("t.flaky", json!({})).max_attempts(2))
        .await
        .unwrap()
        .id();
    let first = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    let retry_at = Utc::now() + ms(300);
    let state = q
        .fail(&first.lease_ref(), "SMTP 421 busy", Some(retry_at))
        .await
        .unwrap();
    assert_eq!(state, Some(JobState::Retrying));
    let job = get(q, id).await;
    assert_eq!(job.state, JobState::Retrying);
    assert_eq!(job.last_error.as_deref(), Some("SMTP 421 busy"));
    assert_eq!(job.attempts, 1);
    // A second report of the same attempt is ignored.
    assert_eq!(
        q.fail(&first.lease_ref(), "again", None).await.unwrap(),
        None
    );
    let second = match reserve_before(q, retry_at).await {
        Some(early) => early,
        None => {
            tokio::time::sleep(Duration::from_millis(350)).await;
            q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0)
        }
    };
    assert_eq!(second.job.id, id);
    assert_eq!(second.job.attempts, 2);
    assert_ne!(second.token, first.token);
    let long = "é".repeat(MAX_ERROR_LEN);
    let state = q.fail(&second.lease_ref(), &long, None).await.unwrap();
    assert_eq!(state, Some(JobState::Dead));
    let job = get(q, id).await;
    assert_eq!(job.state, JobState::Dead);
    assert!(job.finished_at.is_some());
    assert!(job.last_error.unwrap().len() <= MAX_ERROR_LEN);
    assert!(reserve_ids(q, DEFAULT_QUEUE, 1).await.is_empty());

    let dead = q
        .list(&JobFilter {
            scope: JobScope::All,
            state: Some(JobState::Dead),
            queue: None,
            before: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(dead.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);
}

async fn lease_expiry_hands_the_job_out_again(b: &Backend) {
    let q = &*b.queue;
    let id = q
        .enqueue(&NewJob::new("t.crash", json!({})).max_attempts(2))
        .await
        .unwrap()
        .id();
    // Long enough that the checks made within a lease do not outlast it on a loaded
    // machine; the sleeps outlast it.
    let short = Duration::from_millis(1000);
    let lost = q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().remove(0);
    assert!(q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().is_empty());
    let due = q.next_due(DEFAULT_QUEUE).await.unwrap().unwrap();
    assert!((due - lost.expires_at).num_milliseconds().abs() <= 1);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let again = q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().remove(0);
    assert_eq!(again.job.id, id);
    assert_eq!(again.job.attempts, 2);
    // The worker that lost its lease can no longer act on the job.
    assert_eq!(
        q.renew(&[lost.lease_ref()], LEASE).await.unwrap(),
        vec![false]
    );
    assert_eq!(q.complete(&[lost.lease_ref()]).await.unwrap(), 0);
    assert_eq!(q.fail(&lost.lease_ref(), "late", None).await.unwrap(), None);
    assert_eq!(get(q, id).await.state, JobState::Running);

    // The second worker dies too, on the last attempt: the job ends dead, not lost.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().is_empty());
    let job = get(q, id).await;
    assert_eq!(job.state, JobState::Dead);
    assert!(job.last_error.unwrap().contains("worker lost"));
}

async fn renewed_leases_hold(b: &Backend) {
    let q = &*b.queue;
    q.enqueue(&NewJob::new("t.long", json!({}))).await.unwrap();
    // Renewed every quarter lease: the whole run outlives the lease twice over, and a
    // renewal may come more than a second late on a loaded machine (at 300 / 150 ms,
    // one late renewal under CI load let the lease lapse).
    let short = Duration::from_millis(2000);
    let lease = q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().remove(0);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            q.renew(&[lease.lease_ref()], short).await.unwrap(),
            vec![true]
        );
        assert!(q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().is_empty());
    }
    assert_eq!(q.complete(&[lease.lease_ref()]).await.unwrap(), 1);
    let job = get(q, lease.job.id).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert!(job.finished_at.is_some());
    // Completing twice changes nothing.
    assert_eq!(q.complete(&[lease.lease_ref()]).await.unwrap(), 0);
}

async fn released_jobs_do_not_lose_an_attempt(b: &Backend) {
    let q = &*b.queue;
    let id = q
        .enqueue(&NewJob::new("t.release", json!({})).max_attempts(1))
        .await
        .unwrap()
        .id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(q.release(&[lease.lease_ref()]).await.unwrap(), 1);
    let job = get(q, id).await;
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(job.attempts, 0);
    let again = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(again.job.attempts, 1);
}

// ---- unique keys, cancel -----------------------------------------------------------

async fn unique_keys_keep_or_replace(b: &Backend) {
    let q = &*b.queue;
    let t1 = TenantId::new();
    let t2 = TenantId::new();
    let at = Utc::now() + chrono::Duration::hours(24);
    let job = |payload: i64, at| {
        NewJob::new("fmpa.reminder", json!({ "v": payload }))
            .tenant(t1)
            .run_at(at)
    };

    let first = q
        .enqueue(&job(1, at).unique("fmpa:42:user:7:24h", OnDuplicate::Keep))
        .await
        .unwrap();
    assert!(matches!(first, Enqueued::Created(_)));
    let kept = q
        .enqueue(&job(2, at).unique("fmpa:42:user:7:24h", OnDuplicate::Keep))
        .await
        .unwrap();
    assert_eq!(kept, Enqueued::Kept(first.id()));
    assert_eq!(get(q, first.id()).await.payload, json!({ "v": 1 }));

    // Moving the session moves the reminder: same job, new time and payload.
    let moved = at + chrono::Duration::hours(2);
    let replaced = q
        .enqueue(&job(3, moved).unique("fmpa:42:user:7:24h", OnDuplicate::Replace))
        .await
        .unwrap();
    assert_eq!(replaced, Enqueued::Replaced(first.id()));
    let stored = get(q, first.id()).await;
    assert_eq!(stored.payload, json!({ "v": 3 }));
    assert_eq!(stored.run_at.timestamp_millis(), moved.timestamp_millis());
    let pending = q
        .counts(JobScope::Tenant(t1))
        .await
        .unwrap()
        .iter()
        .map(|c| c.scheduled + c.ready)
        .sum::<u64>();
    assert_eq!(pending, 1, "never a second reminder");

    // Another tenant's key is another key.
    let other = q
        .enqueue(
            &NewJob::new("fmpa.reminder", json!({}))
                .tenant(t2)
                .unique("fmpa:42:user:7:24h", OnDuplicate::Keep),
        )
        .await
        .unwrap();
    assert!(matches!(other, Enqueued::Created(_)));

    // Cancelling by key frees it.
    assert!(
        q.cancel_unique(Some(t1), "fmpa:42:user:7:24h")
            .await
            .unwrap()
    );
    assert_eq!(get(q, first.id()).await.state, JobState::Cancelled);
    assert!(
        !q.cancel_unique(Some(t1), "fmpa:42:user:7:24h")
            .await
            .unwrap()
    );
    assert_eq!(get(q, other.id()).await.state, JobState::Ready);
    let again = q
        .enqueue(&job(4, at).unique("fmpa:42:user:7:24h", OnDuplicate::Keep))
        .await
        .unwrap();
    assert!(matches!(again, Enqueued::Created(id) if id != first.id()));
}

async fn a_running_job_gives_way_to_its_replacement(b: &Backend) {
    let q = &*b.queue;
    let key = "digest:user:1";
    let running = q
        .enqueue(&NewJob::new("t.digest", json!({ "v": 1 })).unique(key, OnDuplicate::Replace))
        .await
        .unwrap()
        .id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(lease.job.id, running);
    // While it runs, the key is free: a new job is stored.
    let newer = q
        .enqueue(
            &NewJob::new("t.digest", json!({ "v": 2 }))
                .unique(key, OnDuplicate::Replace)
                .delay(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert!(matches!(newer, Enqueued::Created(id) if id != running));
    // The running one fails: it does not come back beside its replacement.
    let state = q
        .fail(&lease.lease_ref(), "boom", Some(Utc::now()))
        .await
        .unwrap();
    assert_eq!(state, Some(JobState::Cancelled));
    assert!(
        get(q, running)
            .await
            .last_error
            .unwrap()
            .contains("superseded")
    );
    assert_eq!(get(q, newer.id()).await.state, JobState::Scheduled);
}

async fn cancel_only_pending_jobs(b: &Backend) {
    let q = &*b.queue;
    let id = q
        .enqueue(&NewJob::new("t.cancel", json!({})).delay(Duration::from_secs(60)))
        .await
        .unwrap()
        .id();
    assert!(q.cancel(JobScope::All, id).await.unwrap());
    assert_eq!(get(q, id).await.state, JobState::Cancelled);
    assert!(!q.cancel(JobScope::All, id).await.unwrap());
    assert!(!q.cancel(JobScope::All, JobId::new()).await.unwrap());

    let running = q
        .enqueue(&NewJob::new("t.cancel", json!({})))
        .await
        .unwrap()
        .id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(lease.job.id, running);
    assert!(
        !q.cancel(JobScope::All, running).await.unwrap(),
        "a running job finishes"
    );
}

// ---- repeating schedules -----------------------------------------------------------

async fn a_firing_is_claimed_once(b: &Backend) {
    let q = b.queue.clone();
    let fire_at = chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue_tick("daily-digest", fire_at, &NewJob::new("t.digest", json!({})))
                .await
                .unwrap()
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap() as u32;
    }
    assert_eq!(claimed, 1);
    assert_eq!(reserve_ids(&*q, DEFAULT_QUEUE, 10).await.len(), 1);
    let next = fire_at + chrono::Duration::days(1);
    assert!(
        q.enqueue_tick("daily-digest", next, &NewJob::new("t.digest", json!({})))
            .await
            .unwrap()
    );
}

// ---- concurrency -------------------------------------------------------------------

async fn concurrent_reservers_never_share_a_job(b: &Backend) {
    let q = b.queue.clone();
    const N: usize = 2_000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let jobs: Vec<NewJob> = chunk
            .iter()
            .map(|i| NewJob::new("t.race", json!({ "i": i })))
            .collect();
        q.enqueue_batch(&jobs).await.unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let leases = q.reserve(DEFAULT_QUEUE, 37, LEASE).await.unwrap();
                if leases.is_empty() {
                    break;
                }
                let refs: Vec<LeaseRef> = leases.iter().map(Lease::lease_ref).collect();
                assert_eq!(q.complete(&refs).await.unwrap(), refs.len() as u64);
                mine.extend(leases.into_iter().map(|l| l.job.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), N, "every job handed out exactly once");
    assert_eq!(distinct.len(), N);
}

// ---- monitoring --------------------------------------------------------------------

async fn monitoring_is_scoped_by_tenant(b: &Backend) {
    let q = &*b.queue;
    let sdis13 = TenantId::new();
    let sdis84 = TenantId::new();
    let mine = |i: i64| NewJob::new("t.mon", json!({ "i": i })).tenant(sdis13);
    let a = q.enqueue(&mine(1)).await.unwrap().id();
    let bb = q.enqueue(&mine(2).queue("email")).await.unwrap().id();
    q.enqueue(&mine(3).delay(Duration::from_secs(600)))
        .await
        .unwrap();
    let theirs = q
        .enqueue(
            &NewJob::new("t.mon", json!({}))
                .tenant(sdis84)
                .max_attempts(1),
        )
        .await
        .unwrap()
        .id();

    // Run `a` to success and `theirs` to death.
    let leases = q.reserve(DEFAULT_QUEUE, 10, LEASE).await.unwrap();
    assert_eq!(leases.len(), 2);
    for l in &leases {
        if l.job.id == a {
            assert_eq!(q.complete(&[l.lease_ref()]).await.unwrap(), 1);
        } else {
            assert_eq!(l.job.id, theirs);
            let st = q
                .fail(&l.lease_ref(), "no such address", None)
                .await
                .unwrap();
            assert_eq!(st, Some(JobState::Dead));
        }
    }

    let counts = q.counts(JobScope::Tenant(sdis13)).await.unwrap();
    let by_queue: HashMap<&str, &QueueCounts> =
        counts.iter().map(|c| (c.queue.as_str(), c)).collect();
    assert_eq!(by_queue.len(), 2);
    let d = by_queue[DEFAULT_QUEUE];
    assert_eq!((d.succeeded, d.scheduled, d.dead, d.ready), (1, 1, 0, 0));
    assert_eq!(by_queue["email"].ready, 1);
    let all = q.counts(JobScope::All).await.unwrap();
    assert_eq!(all.iter().map(|c| c.dead).sum::<u64>(), 1);

    let tp = q.throughput(JobScope::Tenant(sdis13), 5).await.unwrap();
    assert_eq!(tp.len(), 5);
    assert!(tp.windows(2).all(|w| w[0].minute < w[1].minute));
    assert_eq!(tp.iter().map(|m| m.succeeded).sum::<u64>(), 1);
    assert_eq!(tp.iter().map(|m| m.failed).sum::<u64>(), 0);
    let tp_all = q.throughput(JobScope::All, 5).await.unwrap();
    assert_eq!(tp_all.iter().map(|m| m.failed).sum::<u64>(), 1);

    // Another tenant's job is invisible and untouchable.
    let scoped = JobScope::Tenant(sdis13);
    assert!(q.job(scoped, theirs).await.unwrap().is_none());
    assert!(!q.retry(scoped, theirs).await.unwrap());
    assert!(!q.discard(scoped, theirs).await.unwrap());
    assert!(!q.cancel(scoped, theirs).await.unwrap());
    let dead_here = q
        .list(&JobFilter {
            scope: scoped,
            state: Some(JobState::Dead),
            queue: None,
            before: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert!(dead_here.is_empty());
    assert_eq!(get(q, theirs).await.state, JobState::Dead);

    // Paging through a tenant's jobs, newest change first, without repeats.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = q
            .list(&JobFilter {
                scope: scoped,
                state: None,
                queue: None,
                before,
                limit: 2,
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|j| (j.updated_at, j.id));
        seen.extend(page.into_iter().map(|j| j.id));
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 3);
    let email = q
        .list(&JobFilter {
            scope: scoped,
            state: Some(JobState::Ready),
            queue: Some("email".into()),
            before: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(email.iter().map(|j| j.id).collect::<Vec<_>>(), vec![bb]);

    // Their administrator retries the dead job: due now, fresh attempts.
    let theirs_scope = JobScope::Tenant(sdis84);
    assert!(q.retry(theirs_scope, theirs).await.unwrap());
    let job = get(q, theirs).await;
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(job.attempts, 0);
    assert!(
        !q.retry(theirs_scope, theirs).await.unwrap(),
        "only failed jobs"
    );
    assert!(q.discard(theirs_scope, theirs).await.unwrap());
    assert_eq!(get(q, theirs).await.state, JobState::Cancelled);
    assert!(!q.discard(theirs_scope, theirs).await.unwrap());
}

async fn prune_removes_finished_jobs(b: &Backend) {
    let q = &*b.queue;
    let done = q
        .enqueue(&NewJob::new("t.prune", json!({})))
        .await
        .unwrap()
        .id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    q.complete(&[lease.lease_ref()]).await.unwrap();
    let pending = q
        .enqueue(&NewJob::new("t.prune", json!({})).delay(Duration::from_secs(60)))
        .await
        .unwrap()
        .id();
    assert_eq!(
        q.prune(Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap(),
        0
    );
    assert!(q.job(JobScope::All, done).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(q.prune(Utc::now()).await.unwrap(), 1);
    assert!(q.job(JobScope::All, done).await.unwrap().is_none());
    assert!(q.job(JobScope::All, pending).await.unwrap().is_some());
}

// ---- input limits ------------------------------------------------------------------

async fn bad_jobs_are_refused(b: &Backend) {
    let q = &*b.queue;
    let cases = [
        (NewJob::new("Bad Kind!", json!({})), "invalid_kind"),
        (NewJob::new("t.ok", json!({})).queue(""), "invalid_queue"),
        (
            NewJob::new("t.ok", json!({})).priority(500),
            "invalid_priority",
        ),
        (
            NewJob::new("t.ok", json!({})).max_attempts(0),
            "invalid_max_attempts",
        ),
        (
            NewJob::new("t.ok", json!({})).unique("k".repeat(500), OnDuplicate::Keep),
            "invalid_unique_key",
        ),
        (
            NewJob::new("t.ok", json!({ "x": "a".repeat(MAX_PAYLOAD_BYTES) })),
            "payload_too_large",
        ),
    ];
    for (job, code) in cases {
        match q.enqueue(&job).await {
            Err(Error::Invalid { code: got, .. }) => assert_eq!(got, code),
            other => panic!("{code}: {other:?}"),
        }
        let batch = vec![NewJob::new("t.ok", json!({})), job];
        assert!(q.enqueue_batch(&batch).await.is_err());
    }
    let total: u64 = q
        .counts(JobScope::All)
        .await
        .unwrap()
        .iter()
        .map(|c| JobState::ALL.iter().map(|s| c.get(*s)).sum::<u64>())
        .sum();
    assert_eq!(
        total, 0,
        "nothing written, not even the valid half of a batch"
    );
}

// ---- the unit of work ----------------------------------------------------------------

async fn jobs_commit_with_the_change_that_caused_them(b: &Backend) {
    let q = &*b.queue;
    let Some(store) = &b.store else {
        // A queue outside the database says so instead of pretending.
        let store = mindsp_store::open("sqlite::memory:").await.unwrap();
        let tenant = store.create_tenant("sdis13", "SDIS 13").await.unwrap().id;
        let mut tx = store.begin(tenant).await.unwrap();
        let err = q
            .enqueue_in(&mut *tx, &NewJob::new("t.tx", json!({})))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "queue_not_transactional");
        return;
    };
    let tenant = store.create_tenant("sdis13", "SDIS 13").await.unwrap().id;

    let mut tx = store.begin(tenant).await.unwrap();
    let rolled_back = q
        .enqueue_in(&mut *tx, &NewJob::new("t.tx", json!({ "v": 1 })))
        .await
        .unwrap()
        .id();
    drop(tx);
    assert!(q.job(JobScope::All, rolled_back).await.unwrap().is_none());

    let mut tx = store.begin(tenant).await.unwrap();
    let committed = q
        .enqueue_in(&mut *tx, &NewJob::new("t.tx", json!({ "v": 2 })))
        .await
        .unwrap()
        .id();
    tx.commit().await.unwrap();
    let job = q
        .job(JobScope::Tenant(tenant), committed)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        job.tenant,
        Some(tenant),
        "a job stored in a tenant's unit belongs to it"
    );

    let mut tx = store.begin(tenant).await.unwrap();
    let err = q
        .enqueue_in(
            &mut *tx,
            &NewJob::new("t.tx", json!({})).tenant(TenantId::new()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "tenant_mismatch");
    drop(tx);

    // A batch in one unit of work: all or nothing, in order, unique keys honoured.
    let batch: Vec<NewJob> = (0..50)
        .map(|i| NewJob::new("t.batch", json!({ "i": i })))
        .chain([
            NewJob::new("t.batch", json!({ "u": 1 })).unique("b-key", OnDuplicate::Keep),
            NewJob::new("t.batch", json!({ "u": 2 })).unique("b-key", OnDuplicate::Keep),
        ])
        .collect();
    let mut tx = store.begin(tenant).await.unwrap();
    let dropped = q.enqueue_batch_in(&mut *tx, &batch).await.unwrap();
    drop(tx);
    for e in &dropped {
        assert!(q.job(JobScope::All, e.id()).await.unwrap().is_none());
    }
    let mut tx = store.begin(tenant).await.unwrap();
    let stored = q.enqueue_batch_in(&mut *tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(stored.len(), 52);
    assert_eq!(
        stored[50].id(),
        stored[51].id(),
        "the second holder of a key is kept out"
    );
    for (i, e) in stored.iter().take(50).enumerate() {
        let job = q
            .job(JobScope::Tenant(tenant), e.id())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.payload["i"], i);
        assert_eq!(job.tenant, Some(tenant));
    }
}

// ---- the worker runtime on this backend ------------------------------------------------

/// Job, attempt, when it ran, its run-at time.
type Run = (JobId, u32, chrono::DateTime<Utc>, chrono::DateTime<Utc>);

/// Records every run of every job.
#[derive(Default)]
struct Recorder {
    runs: Mutex<Vec<Run>>,
    fail_first: u32,
}

#[async_trait]
impl Handler for Recorder {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        self.runs
            .lock()
            .unwrap()
            .push((job.id, job.attempts, Utc::now(), job.run_at));
        if job.attempts <= self.fail_first {
            return Err(JobError::Retry(format!("failing attempt {}", job.attempts)));
        }
        Ok(())
    }
}

fn fast_config() -> WorkerConfig {
    WorkerConfig {
        poll_interval: Duration::from_millis(50),
        ..WorkerConfig::default()
    }
}

async fn retries_follow_the_backoff(b: &Backend) {
    let recorder = Arc::new(Recorder {
        fail_first: 2,
        ..Default::default()
    });
    let policy = RetryPolicy {
        base: Duration::from_millis(200),
        factor: 2.0,
        max: Duration::from_secs(5),
        jitter: 0.0,
    };
    let worker = Worker::builder(b.queue.clone(), fast_config())
        .handle_with("t.backoff", recorder.clone(), policy)
        .start();
    let id = b
        .queue
        .enqueue(&NewJob::new("t.backoff", json!({})).max_attempts(5))
        .await
        .unwrap()
        .id();
    wait_for(&*b.queue, id, JobState::Succeeded).await;
    worker.shutdown(Duration::from_secs(5)).await;
    let runs = recorder.runs.lock().unwrap().clone();
    assert_eq!(runs.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    let gap1 = (runs[1].2 - runs[0].2).num_milliseconds();
    let gap2 = (runs[2].2 - runs[1].2).num_milliseconds();
    assert!(
        gap1 >= 200,
        "first retry after the base delay, was {gap1} ms"
    );
    assert!(
        gap2 >= 400,
        "second retry after twice as long, was {gap2} ms"
    );
}

async fn two_workers_never_run_a_job_twice(b: &Backend) {
    let recorder = Arc::new(Recorder::default());
    let config = WorkerConfig {
        concurrency: 8,
        ..fast_config()
    };
    let w1 = Worker::builder(b.queue.clone(), config.clone())
        .handle("t.pair", recorder.clone())
        .start();
    let w2 = Worker::builder(b.queue.clone(), config)
        .handle("t.pair", recorder.clone())
        .start();
    const N: usize = 1_000;
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| NewJob::new("t.pair", json!({ "i": i })))
        .collect();
    let ids: Vec<JobId> = b
        .queue
        .enqueue_batch(&jobs)
        .await
        .unwrap()
        .iter()
        .map(Enqueued::id)
        .collect();
    wait_for(&*b.queue, *ids.last().unwrap(), JobState::Succeeded).await;
    for id in &ids {
        wait_for(&*b.queue, *id, JobState::Succeeded).await;
    }
    w1.shutdown(Duration::from_secs(5)).await;
    w2.shutdown(Duration::from_secs(5)).await;
    let runs = recorder.runs.lock().unwrap().clone();
    let distinct: HashSet<JobId> = runs.iter().map(|r| r.0).collect();
    assert_eq!(distinct.len(), N);
    assert_eq!(
        runs.len(),
        N,
        "no job ran twice while both workers were healthy"
    );
}

async fn a_schedule_fires_once_across_workers(b: &Backend) {
    let recorder = Arc::new(Recorder::default());
    let schedule = Schedule::parse("*/1 * * * * *").unwrap();
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Worker::builder(b.queue.clone(), fast_config())
                .handle("t.tick", recorder.clone())
                .repeat(
                    "every-second",
                    schedule.clone(),
                    NewJob::new("t.tick", json!({})),
                )
                .start(),
        );
    }
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    for w in workers {
        w.shutdown(Duration::from_secs(5)).await;
    }
    let runs = recorder.runs.lock().unwrap().clone();
    assert!(runs.len() >= 2, "fired {} times in 3.5 s", runs.len());
    assert!(runs.len() <= 4, "fired {} times in 3.5 s", runs.len());
    let mut firings: Vec<i64> = runs.iter().map(|r| r.3.timestamp_millis()).collect();
    firings.sort();
    let before = firings.len();
    firings.dedup();
    assert_eq!(
        firings.len(),
        before,
        "one run per firing, not one per worker"
    );
    assert!(
        firings.iter().all(|t| t % 1000 == 0),
        "each job runs for its firing time"
    );
}

async fn bad_jobs_fail_and_the_worker_goes_on(b: &Backend) {
    struct Strict;
    #[async_trait]
    impl Handler for Strict {
        async fn run(&self, job: &Job) -> Result<(), JobError> {
            #[derive(serde::Deserialize)]
            #[allow(dead_code)]
            struct Args {
                user: String,
            }
            let _: Args = serde_json::from_value(job.payload.clone())
                .map_err(|e| JobError::Permanent(format!("bad payload: {e}")))?;
            Ok(())
        }
    }
    struct Panics;
    #[async_trait]
    impl Handler for Panics {
        async fn run(&self, _job: &Job) -> Result<(), JobError> {
            panic!("handler bug");
        }
    }
    let worker = Worker::builder(b.queue.clone(), fast_config())
        .handle("t.strict", Arc::new(Strict))
        .handle_with(
            "t.panics",
            Arc::new(Panics),
            RetryPolicy {
                base: Duration::from_millis(10),
                ..RetryPolicy::default()
            },
        )
        .start();
    let q = &*b.queue;
    let unknown = q
        .enqueue(&NewJob::new("t.nobody", json!({})))
        .await
        .unwrap()
        .id();
    let bad = q
        .enqueue(&NewJob::new("t.strict", json!({ "user": 42 })))
        .await
        .unwrap()
        .id();
    let panics = q
        .enqueue(&NewJob::new("t.panics", json!({})).max_attempts(2))
        .await
        .unwrap()
        .id();
    let fine = q
        .enqueue(&NewJob::new("t.strict", json!({ "user": "sergent" })))
        .await
        .unwrap()
        .id();
    let unknown = wait_for(q, unknown, JobState::Dead).await;
    assert!(unknown.last_error.unwrap().contains("unknown job kind"));
    let bad = wait_for(q, bad, JobState::Dead).await;
    assert_eq!(
        bad.attempts, 1,
        "a payload that does not parse is not retried"
    );
    assert!(bad.last_error.unwrap().contains("bad payload"));
    let panics = wait_for(q, panics, JobState::Dead).await;
    assert_eq!(panics.attempts, 2);
    assert!(panics.last_error.unwrap().contains("handler bug"));
    wait_for(q, fine, JobState::Succeeded).await;
    // Still serving after all that.
    let after = q
        .enqueue(&NewJob::new("t.strict", json!({ "user": "caporal" })))
        .await
        .unwrap()
        .id();
    wait_for(q, after, JobState::Succeeded).await;
    worker.shutdown(Duration::from_secs(5)).await;
}

async fn shutdown_releases_what_it_did_not_finish(b: &Backend) {
    struct Slow;
    #[async_trait]
    impl Handler for Slow {
        async fn run(&self, _job: &Job) -> Result<(), JobError> {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        }
    }
    let worker = Worker::builder(b.queue.clone(), fast_config())
        .handle("t.slow", Arc::new(Slow))
        .start();
    let id = b
        .queue
        .enqueue(&NewJob::new("t.slow", json!({})))
        .await
        .unwrap()
        .id();
    wait_for(&*b.queue, id, JobState::Running).await;
    worker.shutdown(Duration::from_millis(200)).await;
    let job = get(&*b.queue, id).await;
    assert_eq!(
        job.state,
        JobState::Ready,
        "given back at once, not left to its lease"
    );
    assert_eq!(job.attempts, 0);
}

/// Waits (bounded) until a job reaches `state`.
async fn wait_for(q: &dyn JobQueue, id: JobId, state: JobState) -> Job {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = get(q, id).await;
        if job.state == state {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job stuck in {:?} (wanted {state:?}): {job:?}",
            job.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = crate::Backend::sqlite().await;
                    super::$case(&b).await;
                    b.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(b) = crate::Backend::postgres().await else { return };
                    super::$case(&b).await;
                    b.finish().await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(b) = crate::Backend::redis().await else { return };
                    super::$case(&b).await;
                    b.finish().await;
                }
            )*
        }
    };
}

conformance!(
    order_by_priority_then_run_at,
    batches_respect_max,
    delayed_jobs_wait_for_their_time,
    failures_retry_then_die,
    lease_expiry_hands_the_job_out_again,
    renewed_leases_hold,
    released_jobs_do_not_lose_an_attempt,
    unique_keys_keep_or_replace,
    a_running_job_gives_way_to_its_replacement,
    cancel_only_pending_jobs,
    a_firing_is_claimed_once,
    concurrent_reservers_never_share_a_job,
    monitoring_is_scoped_by_tenant,
    prune_removes_finished_jobs,
    bad_jobs_are_refused,
    jobs_commit_with_the_change_that_caused_them,
    retries_follow_the_backoff,
    two_workers_never_run_a_job_twice,
    a_schedule_fires_once_across_workers,
    bad_jobs_fail_and_the_worker_goes_on,
    shutdown_releases_what_it_did_not_finish,
);
