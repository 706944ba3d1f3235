//! The Redis job queue against a real Redis (`MINDSP_TEST_REDIS_URL`), each test under a
//! fresh key prefix that it deletes when it passes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mindsp_core::jobs::*;
use mindsp_core::{Error, JobId, TenantId};
use mindsp_queue::redis::RedisQueue;
use serde_json::json;

const LEASE: Duration = Duration::from_secs(30);

/// A queue under a fresh prefix, or `None` (saying so) without a Redis to talk to.
async fn queue() -> Option<Arc<RedisQueue>> {
    let Ok(url) = std::env::var("MINDSP_TEST_REDIS_URL") else {
        eprintln!("skipped: MINDSP_TEST_REDIS_URL is not set");
        return None;
    };
    let prefix = format!("{{mindsp-test-{}}}:", uuid::Uuid::new_v4().simple());
    Some(Arc::new(
        RedisQueue::connect(&url, &prefix)
            .await
            .expect("connect to redis"),
    ))
}

async fn done(q: Arc<RedisQueue>) {
    assert!(q.purge().await.unwrap() > 0);
    q.close().await.unwrap();
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

async fn get(q: &RedisQueue, id: JobId) -> Job {
    q.job(JobScope::All, id).await.unwrap().expect("job exists")
}

async fn reserve_ids(q: &RedisQueue, queue: &str, max: u32) -> Vec<JobId> {
    q.reserve(queue, max, LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.job.id)
        .collect()
}

fn filter(scope: JobScope, state: Option<JobState>) -> JobFilter {
    JobFilter {
        scope,
        state,
        queue: None,
        before: None,
        limit: 100,
    }
}

async fn listed(q: &RedisQueue, f: JobFilter) -> Vec<JobId> {
    q.list(&f)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect()
}

#[tokio::test]
async fn reserve_orders_by_priority_then_run_at_then_id() {
    let Some(q) = queue().await else { return };
    let now = Utc::now();
    let enq = |job: NewJob| {
        let q = q.clone();
        async move { q.enqueue(&job).await.unwrap().id() }
    };
    let mid = enq(NewJob::new("t.a", json!({})).run_at(now - ms(3000))).await;
    let old = enq(NewJob::new("t.b", json!({})).run_at(now - ms(5000))).await;
    let urgent = enq(NewJob::new("t.c", json!({})).priority(10)).await;
    let low = enq(NewJob::new("t.d", json!({}))
        .priority(-100)
        .run_at(now - ms(9000)))
    .await;
    let top = enq(NewJob::new("t.e", json!({})).priority(100)).await;
    let later = enq(NewJob::new("t.f", json!({})).run_at(now + chrono::Duration::hours(1))).await;
    // Same priority and run-at: the smaller (older) id first.
    let at = now - ms(1000);
    let tie1 = enq(NewJob::new("t.g", json!({})).run_at(at)).await;
    let tie2 = enq(NewJob::new("t.g", json!({})).run_at(at)).await;
    let elsewhere = enq(NewJob::new("t.h", json!({})).queue("other")).await;

    assert_eq!(get(&q, later).await.state, JobState::Scheduled);
    assert_eq!(get(&q, mid).await.state, JobState::Ready);

    let first = q.reserve(DEFAULT_QUEUE, 2, LEASE).await.unwrap();
    assert_eq!(
        first.iter().map(|l| l.job.id).collect::<Vec<_>>(),
        vec![top, urgent]
    );
    for l in &first {
        assert_eq!(l.job.state, JobState::Running);
        assert_eq!(l.job.attempts, 1);
        assert!(l.expires_at > Utc::now() + chrono::Duration::seconds(25));
    }
    assert_ne!(first[0].token, first[1].token);
    assert_eq!(
        reserve_ids(&q, DEFAULT_QUEUE, 10).await,
        vec![old, mid, tie1, tie2, low]
    );
    assert!(reserve_ids(&q, DEFAULT_QUEUE, 10).await.is_empty());
    assert_eq!(reserve_ids(&q, "other", 10).await, vec![elsewhere]);
    assert_eq!(q.reserve(DEFAULT_QUEUE, 0, LEASE).await.unwrap(), vec![]);
    done(q).await;
}

#[tokio::test]
async fn delayed_jobs_wait_and_next_due_tells_when() {
    let Some(q) = queue().await else { return };
    assert_eq!(q.next_due(DEFAULT_QUEUE).await.unwrap(), None);
    let id = q
        .enqueue(&NewJob::new("t.later", json!({ "x": 1 })).delay(Duration::from_millis(300)))
        .await
        .unwrap()
        .id();
    let job = get(&q, id).await;
    assert_eq!(job.state, JobState::Scheduled);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.payload, json!({ "x": 1 }));
    assert!(reserve_ids(&q, DEFAULT_QUEUE, 10).await.is_empty());
    assert_eq!(q.next_due(DEFAULT_QUEUE).await.unwrap(), Some(job.run_at));

    let counts = q.counts(JobScope::All).await.unwrap();
    assert_eq!((counts[0].scheduled, counts[0].ready), (1, 0));
    assert_eq!(
        listed(&q, filter(JobScope::All, Some(JobState::Scheduled))).await,
        vec![id]
    );

    tokio::time::sleep(Duration::from_millis(350)).await;
    // Due but not yet moved: reported ready all the same.
    assert_eq!(get(&q, id).await.state, JobState::Ready);
    let counts = q.counts(JobScope::All).await.unwrap();
    assert_eq!((counts[0].scheduled, counts[0].ready), (0, 1));
    assert!(
        listed(&q, filter(JobScope::All, Some(JobState::Scheduled)))
            .await
            .is_empty()
    );
    assert_eq!(
        listed(&q, filter(JobScope::All, Some(JobState::Ready))).await,
        vec![id]
    );
    let job = get(&q, id).await;
    assert_eq!(job.updated_at, job.created_at, "coming due is not a change");
    assert!(q.next_due(DEFAULT_QUEUE).await.unwrap().unwrap() <= Utc::now());
    let lease = q.reserve(DEFAULT_QUEUE, 10, LEASE).await.unwrap().remove(0);
    assert_eq!(lease.job.id, id);
    assert_eq!(
        q.next_due(DEFAULT_QUEUE).await.unwrap(),
        Some(lease.expires_at)
    );

    // Ready jobs make next_due "now".
    q.enqueue(&NewJob::new("t.now", json!({}))).await.unwrap();
    assert!(q.next_due(DEFAULT_QUEUE).await.unwrap().unwrap() <= Utc::now());
    done(q).await;
}

#[tokio::test]
async fn failures_retry_then_die_and_count() {
    let Some(q) = queue().await else { return };
    let tenant = TenantId::new();
    let id = q
        .enqueue(
            &NewJob::new("t.flaky", json!({}))
                .tenant(tenant)
                .max_attempts(2),
        )
        .await
        .unwrap()
        .id();
    let first = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    let retry_at = Utc::now() + ms(250);
    assert_eq!(
        q.fail(&first.lease_ref(), "SMTP 421", Some(retry_at))
            .await
            .unwrap(),
        Some(JobState::Retrying)
    );
    let job = get(&q, id).await;
    assert_eq!(job.state, JobState::Retrying);
    assert_eq!(job.last_error.as_deref(), Some("SMTP 421"));
    assert_eq!(job.run_at.timestamp_millis(), retry_at.timestamp_millis());
    assert_eq!(
        q.fail(&first.lease_ref(), "again", None).await.unwrap(),
        None
    );
    assert_eq!(
        listed(
            &q,
            filter(JobScope::Tenant(tenant), Some(JobState::Retrying))
        )
        .await,
        vec![id]
    );
    // Not handed out before its retry time, unless the machine stalled past it before
    // the reserve began (then the job was due: carry on with it).
    let began = Utc::now();
    let early = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap();
    // Whole milliseconds: the queue keeps times in ms.
    assert!(
        early.is_empty() || began.timestamp_millis() >= retry_at.timestamp_millis(),
        "reserved before its retry time"
    );
    let second = match early.into_iter().next() {
        Some(early) => early,
        None => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Due, still reported retrying until it runs.
            assert_eq!(get(&q, id).await.state, JobState::Retrying);
            q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0)
        }
    };
    assert_eq!((second.job.id, second.job.attempts), (id, 2));
    let long = "é".repeat(MAX_ERROR_LEN);
    assert_eq!(
        q.fail(&second.lease_ref(), &long, None).await.unwrap(),
        Some(JobState::Dead)
    );
    let job = get(&q, id).await;
    assert_eq!(job.state, JobState::Dead);
    assert!(job.finished_at.is_some());
    assert!(job.last_error.unwrap().len() <= MAX_ERROR_LEN);

    let tp = q.throughput(JobScope::Tenant(tenant), 3).await.unwrap();
    assert_eq!(tp.len(), 3);
    assert_eq!(tp.iter().map(|m| m.failed).sum::<u64>(), 2);
    assert_eq!(tp.iter().map(|m| m.succeeded).sum::<u64>(), 0);
    let counts = q.counts(JobScope::Tenant(tenant)).await.unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].dead, 1);
    assert_eq!(counts[0].running + counts[0].retrying + counts[0].ready, 0);
    done(q).await;
}

#[tokio::test]
async fn unique_keys_keep_replace_and_scope_per_tenant() {
    let Some(q) = queue().await else { return };
    let t1 = TenantId::new();
    let t2 = TenantId::new();
    let key = "fmpa:42:user:7:24h";
    let at = Utc::now() + chrono::Duration::hours(24);
    let job = |v: i64| NewJob::new("fmpa.reminder", json!({ "v": v })).tenant(t1);

    let first = q
        .enqueue(&job(1).run_at(at).unique(key, OnDuplicate::Keep))
        .await
        .unwrap();
    assert!(matches!(first, Enqueued::Created(_)));
    let id = first.id();
    assert_eq!(
        q.enqueue(&job(2).unique(key, OnDuplicate::Keep))
            .await
            .unwrap(),
        Enqueued::Kept(id)
    );
    assert_eq!(get(&q, id).await.payload, json!({ "v": 1 }));

    // Replace: new payload, priority, time, attempts; the same job.
    let moved = at + chrono::Duration::hours(2);
    let replaced = q
        .enqueue(
            &job(3)
                .run_at(moved)
                .priority(7)
                .max_attempts(9)
                .unique(key, OnDuplicate::Replace),
        )
        .await
        .unwrap();
    assert_eq!(replaced, Enqueued::Replaced(id));
    let stored = get(&q, id).await;
    assert_eq!(stored.payload, json!({ "v": 3 }));
    assert_eq!(stored.priority, 7);
    assert_eq!(stored.max_attempts, 9);
    assert_eq!(stored.run_at.timestamp_millis(), moved.timestamp_millis());
    assert_eq!(stored.state, JobState::Scheduled);
    assert_eq!(stored.unique_key.as_deref(), Some(key));

    // Replace with a time already passed makes it ready.
    q.enqueue(&job(4).unique(key, OnDuplicate::Replace))
        .await
        .unwrap();
    assert_eq!(get(&q, id).await.state, JobState::Ready);
    let counts = q.counts(JobScope::Tenant(t1)).await.unwrap();
    assert_eq!(counts.iter().map(|c| c.scheduled + c.ready).sum::<u64>(), 1);

    // Same key, other tenant, or no tenant: other scopes.
    let other = q
        .enqueue(
            &NewJob::new("fmpa.reminder", json!({}))
                .tenant(t2)
                .unique(key, OnDuplicate::Keep),
        )
        .await
        .unwrap();
    assert!(matches!(other, Enqueued::Created(o) if o != id));
    let untenanted = q
        .enqueue(&NewJob::new("fmpa.reminder", json!({})).unique(key, OnDuplicate::Keep))
        .await
        .unwrap();
    assert!(matches!(untenanted, Enqueued::Created(o) if o != id && o != other.id()));

    // Cancel by key frees it; only in its own scope.
    assert!(!q.cancel_unique(Some(TenantId::new()), key).await.unwrap());
    assert!(q.cancel_unique(Some(t1), key).await.unwrap());
    assert!(!q.cancel_unique(Some(t1), key).await.unwrap());
    assert_eq!(get(&q, id).await.state, JobState::Cancelled);
    assert_eq!(get(&q, other.id()).await.state, JobState::Ready);
    assert!(q.cancel_unique(None, key).await.unwrap());
    assert_eq!(get(&q, untenanted.id()).await.state, JobState::Cancelled);
    let again = q
        .enqueue(&job(5).unique(key, OnDuplicate::Keep))
        .await
        .unwrap();
    assert!(matches!(again, Enqueued::Created(o) if o != id));

    // Replace may move the job to another queue and kind.
    let moving = q
        .enqueue(&NewJob::new("t.m", json!({})).unique("mover", OnDuplicate::Keep))
        .await
        .unwrap()
        .id();
    let moved = q
        .enqueue(
            &NewJob::new("t.n", json!({ "v": 2 }))
                .queue("elsewhere")
                .unique("mover", OnDuplicate::Replace),
        )
        .await
        .unwrap();
    assert_eq!(moved, Enqueued::Replaced(moving));
    let job = get(&q, moving).await;
    assert_eq!(
        (job.kind.as_str(), job.queue.as_str()),
        ("t.n", "elsewhere")
    );
    assert!(job.created_at <= job.updated_at);
    let leased = q.reserve("elsewhere", 5, LEASE).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].job.id, moving);
    let counts = q.counts(JobScope::All).await.unwrap();
    assert!(
        counts
            .iter()
            .any(|c| c.queue == "elsewhere" && c.running == 1)
    );

    // Any text is a key, separators included.
    let odd = "a|b|c:\n é|";
    let first_odd = q
        .enqueue(&NewJob::new("t.o", json!({})).unique(odd, OnDuplicate::Keep))
        .await
        .unwrap();
    assert!(matches!(first_odd, Enqueued::Created(_)));
    assert_eq!(
        q.enqueue(&NewJob::new("t.o", json!({})).unique(odd, OnDuplicate::Keep))
            .await
            .unwrap(),
        Enqueued::Kept(first_odd.id())
    );
    assert_eq!(
        get(&q, first_odd.id()).await.unique_key.as_deref(),
        Some(odd)
    );
    assert!(q.cancel_unique(None, odd).await.unwrap());

    // Inside one batch, the second of two same-key jobs finds the first.
    let batch = q
        .enqueue_batch(&[
            NewJob::new("t.b", json!({ "v": 1 })).unique("batch", OnDuplicate::Keep),
            NewJob::new("t.b", json!({ "v": 2 })),
            NewJob::new("t.b", json!({ "v": 3 })).unique("batch", OnDuplicate::Keep),
            NewJob::new("t.b", json!({ "v": 4 })).unique("batch", OnDuplicate::Replace),
        ])
        .await
        .unwrap();
    assert!(matches!(batch[0], Enqueued::Created(_)));
    assert!(matches!(batch[1], Enqueued::Created(_)));
    assert_eq!(batch[2], Enqueued::Kept(batch[0].id()));
    assert_eq!(batch[3], Enqueued::Replaced(batch[0].id()));
    assert_eq!(get(&q, batch[0].id()).await.payload, json!({ "v": 4 }));
    done(q).await;
}

#[tokio::test]
async fn a_running_holder_frees_its_key_and_is_superseded() {
    let Some(q) = queue().await else { return };
    let key = "digest:user:1";
    let job = |v: i64| NewJob::new("t.digest", json!({ "v": v })).unique(key, OnDuplicate::Replace);

    // fail with a retry while a newer job holds the key
    let running = q.enqueue(&job(1)).await.unwrap().id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(lease.job.id, running);
    let newer = q
        .enqueue(&job(2).delay(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(matches!(newer, Enqueued::Created(id) if id != running));
    assert_eq!(
        q.fail(&lease.lease_ref(), "boom", Some(Utc::now()))
            .await
            .unwrap(),
        Some(JobState::Cancelled)
    );
    let job1 = get(&q, running).await;
    assert_eq!(
        job1.last_error,
        Some(format!("superseded by job {}", newer.id()))
    );
    assert!(job1.finished_at.is_some());
    assert_eq!(get(&q, newer.id()).await.state, JobState::Scheduled);
    // The key stays with the newer one.
    assert_eq!(
        q.enqueue(&job(3).unique(key, OnDuplicate::Keep))
            .await
            .unwrap(),
        Enqueued::Kept(newer.id())
    );
    assert!(q.cancel(JobScope::All, newer.id()).await.unwrap());

    // release while a newer job holds the key
    let second = q.enqueue(&job(4)).await.unwrap().id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(lease.job.id, second);
    let third = q
        .enqueue(&job(5).delay(Duration::from_secs(60)))
        .await
        .unwrap()
        .id();
    assert_eq!(q.release(&[lease.lease_ref()]).await.unwrap(), 1);
    assert_eq!(get(&q, second).await.state, JobState::Cancelled);
    assert!(q.cancel(JobScope::All, third).await.unwrap());

    // lease expiry while a newer job holds the key
    let fourth = q.enqueue(&job(6)).await.unwrap().id();
    let lease = q
        .reserve(DEFAULT_QUEUE, 1, Duration::from_millis(50))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(lease.job.id, fourth);
    let fifth = q
        .enqueue(&job(7).delay(Duration::from_secs(60)))
        .await
        .unwrap()
        .id();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(reserve_ids(&q, DEFAULT_QUEUE, 5).await.is_empty());
    let lost = get(&q, fourth).await;
    assert_eq!(lost.state, JobState::Cancelled);
    assert!(lost.last_error.unwrap().contains(&fifth.to_string()));

    // Without a rival, a failed holder takes its key back while it waits.
    assert!(q.cancel(JobScope::All, fifth).await.unwrap());
    let sixth = q.enqueue(&job(8)).await.unwrap().id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(
        q.fail(
            &lease.lease_ref(),
            "later",
            Some(Utc::now() + chrono::Duration::hours(1))
        )
        .await
        .unwrap(),
        Some(JobState::Retrying)
    );
    assert_eq!(
        q.enqueue(&job(9).unique(key, OnDuplicate::Keep))
            .await
            .unwrap(),
        Enqueued::Kept(sixth)
    );
    // A retry of a dead or cancelled job whose key is held now is refused.
    match q.retry(JobScope::All, fourth).await {
        Err(Error::Conflict { code, .. }) => assert_eq!(code, "unique_key_held"),
        other => panic!("{other:?}"),
    }
    assert!(q.retry(JobScope::All, sixth).await.unwrap());
    assert_eq!(get(&q, sixth).await.state, JobState::Ready);
    done(q).await;
}

#[tokio::test]
async fn cancel_and_discard_touch_only_what_they_may() {
    let Some(q) = queue().await else { return };
    let tenant = TenantId::new();
    let delayed = q
        .enqueue(
            &NewJob::new("t.c", json!({}))
                .tenant(tenant)
                .delay(Duration::from_secs(60)),
        )
        .await
        .unwrap()
        .id();
    assert!(
        !q.cancel(JobScope::Tenant(TenantId::new()), delayed)
            .await
            .unwrap()
    );
    assert!(q.cancel(JobScope::Tenant(tenant), delayed).await.unwrap());
    assert!(!q.cancel(JobScope::All, delayed).await.unwrap());
    assert!(!q.cancel(JobScope::All, JobId::new()).await.unwrap());
    assert_eq!(
        q.next_due(DEFAULT_QUEUE).await.unwrap(),
        None,
        "out of the queue"
    );

    let running = q
        .enqueue(&NewJob::new("t.c", json!({})))
        .await
        .unwrap()
        .id();
    let lease = q.reserve(DEFAULT_QUEUE, 1, LEASE).await.unwrap().remove(0);
    assert!(!q.cancel(JobScope::All, running).await.unwrap());
    assert!(!q.discard(JobScope::All, running).await.unwrap());
    // A tenant's scope never covers jobs of no tenant.
    assert!(
        q.job(JobScope::Tenant(tenant), running)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        q.fail(&lease.lease_ref(), "bad", None).await.unwrap(),
        Some(JobState::Dead)
    );
    assert!(
        !q.cancel(JobScope::All, running).await.unwrap(),
        "dead is finished"
    );
    assert!(q.discard(JobScope::All, running).await.unwrap());
    assert_eq!(get(&q, running).await.state, JobState::Cancelled);
    assert_eq!(get(&q, running).await.last_error.as_deref(), Some("bad"));
    assert!(!q.discard(JobScope::All, running).await.unwrap());

    let ready = q
        .enqueue(&NewJob::new("t.c", json!({})))
        .await
        .unwrap()
        .id();
    assert!(q.discard(JobScope::All, ready).await.unwrap());
    assert!(reserve_ids(&q, DEFAULT_QUEUE, 10).await.is_empty());
    let counts = q.counts(JobScope::All).await.unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].cancelled, 3);
    assert_eq!(counts[0].ready + counts[0].scheduled + counts[0].running, 0);
    done(q).await;
}

#[tokio::test]
async fn a_tick_is_claimed_once_among_concurrent_callers() {
    let Some(q) = queue().await else { return };
    let fire_at = chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue_tick("daily", fire_at, &NewJob::new("t.digest", json!({})))
                .await
                .unwrap()
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += u32::from(t.await.unwrap());
    }
    assert_eq!(claimed, 1);
    assert_eq!(reserve_ids(&q, DEFAULT_QUEUE, 10).await.len(), 1);
    // Another schedule, or another firing, is another claim.
    let job = NewJob::new("t.digest", json!({}));
    assert!(q.enqueue_tick("weekly", fire_at, &job).await.unwrap());
    assert!(
        q.enqueue_tick("daily", fire_at + chrono::Duration::days(1), &job)
            .await
            .unwrap()
    );
    // A bad job is refused before any claim.
    assert!(
        q.enqueue_tick("bad", fire_at, &NewJob::new("Bad!", json!({})))
            .await
            .is_err()
    );
    assert!(q.enqueue_tick("bad", fire_at, &job).await.unwrap());
    // Pruning drops claims older than the limit, not newer ones.
    q.prune(fire_at + chrono::Duration::hours(1)).await.unwrap();
    assert!(q.enqueue_tick("daily", fire_at, &job).await.unwrap());
    assert!(
        !q.enqueue_tick("daily", fire_at + chrono::Duration::days(1), &job)
            .await
            .unwrap()
    );
    done(q).await;
}

#[tokio::test]
async fn expired_leases_come_back_then_die() {
    let Some(q) = queue().await else { return };
    let id = q
        .enqueue(&NewJob::new("t.crash", json!({})).max_attempts(2))
        .await
        .unwrap()
        .id();
    let short = Duration::from_millis(150);
    let lost = q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().remove(0);
    assert!(q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().is_empty());
    assert_eq!(
        q.next_due(DEFAULT_QUEUE).await.unwrap(),
        Some(lost.expires_at)
    );
    assert_eq!(
        listed(&q, filter(JobScope::All, Some(JobState::Running))).await,
        vec![id]
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().remove(0);
    assert_eq!((again.job.id, again.job.attempts), (id, 2));
    assert!(again.job.last_error.unwrap().contains("lease expired"));
    assert_ne!(again.token, lost.token);
    // The first worker's lease is stale now: everything it tries is ignored.
    assert_eq!(
        q.renew(&[lost.lease_ref()], LEASE).await.unwrap(),
        vec![false]
    );
    assert_eq!(q.complete(&[lost.lease_ref()]).await.unwrap(), 0);
    assert_eq!(q.release(&[lost.lease_ref()]).await.unwrap(), 0);
    assert_eq!(q.fail(&lost.lease_ref(), "late", None).await.unwrap(), None);
    let forged = LeaseRef {
        id,
        token: uuid::Uuid::new_v4(),
    };
    assert_eq!(q.complete(&[forged]).await.unwrap(), 0);
    assert_eq!(get(&q, id).await.state, JobState::Running);

    // The second worker dies on the last attempt: dead, not lost.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(q.reserve(DEFAULT_QUEUE, 1, short).await.unwrap().is_empty());
    let job = get(&q, id).await;
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(
        job.last_error.as_deref(),
        Some("worker lost: lease expired on attempt 2 of 2")
    );
    assert!(job.finished_at.is_some());
    assert_eq!(q.next_due(DEFAULT_QUEUE).await.unwrap(), None);
    let counts = q.counts(JobScope::All).await.unwrap();
    assert_eq!((counts[0].dead, counts[0].running), (1, 0));
    done(q).await;
}

#[tokio::test]
async fn renew_holds_and_release_gives_back_the_attempt() {
    let Some(q) = queue().await else { return };
    let a = q
        .enqueue(&NewJob::new("t.long", json!({})))
        .await
        .unwrap()
        .id();
    let b = q
        .enqueue(&NewJob::new("t.long", json!({})).max_attempts(1))
        .await
        .unwrap()
        .id();
    let short = Duration::from_millis(200);
    let leases = q.reserve(DEFAULT_QUEUE, 2, short).await.unwrap();
    let refs: Vec<LeaseRef> = leases.iter().map(Lease::lease_ref).collect();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(q.renew(&refs, short).await.unwrap(), vec![true, true]);
        assert!(q.reserve(DEFAULT_QUEUE, 5, short).await.unwrap().is_empty());
    }
    assert_eq!(q.release(&refs[1..]).await.unwrap(), 1);
    let job = get(&q, b).await;
    assert_eq!((job.state, job.attempts), (JobState::Ready, 0));
    assert_eq!(q.complete(&refs).await.unwrap(), 1, "only a is still held");
    assert_eq!(q.complete(&refs).await.unwrap(), 0);
    assert_eq!(get(&q, a).await.state, JobState::Succeeded);
    let again = q.reserve(DEFAULT_QUEUE, 5, LEASE).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].job.id, again[0].job.attempts), (b, 1));
    assert!(q.renew(&[], LEASE).await.unwrap().is_empty());
    assert_eq!(q.complete(&[]).await.unwrap(), 0);
    done(q).await;
}

#[tokio::test]
async fn monitoring_counts_lists_and_pages_per_tenant() {
    let Some(q) = queue().await else { return };
    let sdis13 = TenantId::new();
    let sdis84 = TenantId::new();
    let mine = |i: i64| NewJob::new("t.mon", json!({ "i": i })).tenant(sdis13);
    let a = q.enqueue(&mine(1)).await.unwrap().id();
    let email = q.enqueue(&mine(2).queue("email")).await.unwrap().id();
    let later = q
        .enqueue(&mine(3).delay(Duration::from_secs(600)))
        .await
        .unwrap()
        .id();
    let theirs = q
        .enqueue(
            &NewJob::new("t.mon", json!({}))
                .tenant(sdis84)
                .max_attempts(1),
        )
        .await
        .unwrap()
        .id();
    let nobody = q
        .enqueue(&NewJob::new("t.mon", json!({})).queue("email"))
        .await
        .unwrap()
        .id();

    let leases = q.reserve(DEFAULT_QUEUE, 10, LEASE).await.unwrap();
    assert_eq!(leases.len(), 2);
    for l in &leases {
        if l.job.id == a {
            assert_eq!(q.complete(&[l.lease_ref()]).await.unwrap(), 1);
        } else {
            assert_eq!(l.job.id, theirs);
            assert_eq!(
                q.fail(&l.lease_ref(), "no such address", None)
                    .await
                    .unwrap(),
                Some(JobState::Dead)
            );
        }
    }

    let counts = q.counts(JobScope::Tenant(sdis13)).await.unwrap();
    let by: HashMap<&str, &QueueCounts> = counts.iter().map(|c| (c.queue.as_str(), c)).collect();
    assert_eq!(by.len(), 2);
    let d = by[DEFAULT_QUEUE];
    assert_eq!(
        (d.succeeded, d.scheduled, d.dead, d.ready, d.running),
        (1, 1, 0, 0, 0)
    );
    assert_eq!(by["email"].ready, 1);
    let all = q.counts(JobScope::All).await.unwrap();
    assert_eq!(all.iter().map(|c| c.dead).sum::<u64>(), 1);
    assert_eq!(all.iter().map(|c| c.ready).sum::<u64>(), 2);
    assert!(
        q.counts(JobScope::Tenant(TenantId::new()))
            .await
            .unwrap()
            .is_empty()
    );

    let tp = q.throughput(JobScope::Tenant(sdis13), 5).await.unwrap();
    assert_eq!(tp.len(), 5);
    assert!(
        tp.windows(2)
            .all(|w| w[1].minute - w[0].minute == chrono::Duration::minutes(1))
    );
    assert!(tp[4].minute <= Utc::now() && Utc::now() - tp[4].minute < chrono::Duration::minutes(1));
    assert_eq!(
        tp.iter()
            .map(|m| (m.succeeded, m.failed))
            .fold((0, 0), |s, m| (s.0 + m.0, s.1 + m.1)),
        (1, 0)
    );
    let tp_all = q.throughput(JobScope::All, 1).await.unwrap();
    assert_eq!(tp_all.len(), 1);
    assert_eq!((tp_all[0].succeeded, tp_all[0].failed), (1, 1));
    assert_eq!(q.throughput(JobScope::All, 0).await.unwrap().len(), 1);
    assert_eq!(
        q.throughput(JobScope::All, 20_000).await.unwrap().len(),
        20_000
    );

    // Another tenant's job is invisible and untouchable.
    let scoped = JobScope::Tenant(sdis13);
    assert!(q.job(scoped, theirs).await.unwrap().is_none());
    assert!(!q.retry(scoped, theirs).await.unwrap());
    assert!(!q.discard(scoped, theirs).await.unwrap());
    assert!(
        listed(&q, filter(scoped, Some(JobState::Dead)))
            .await
            .is_empty()
    );
    assert_eq!(
        listed(&q, filter(JobScope::All, Some(JobState::Dead))).await,
        vec![theirs]
    );

    // Listing by state, by queue, across tenants.
    assert_eq!(
        listed(&q, filter(scoped, Some(JobState::Scheduled))).await,
        vec![later]
    );
    assert_eq!(
        listed(&q, filter(scoped, Some(JobState::Ready))).await,
        vec![email]
    );
    assert_eq!(
        listed(&q, filter(scoped, Some(JobState::Succeeded))).await,
        vec![a]
    );
    let mut ready_all = listed(&q, filter(JobScope::All, Some(JobState::Ready))).await;
    ready_all.sort();
    let mut expected = vec![email, nobody];
    expected.sort();
    assert_eq!(ready_all, expected);
    let mut f = filter(JobScope::All, None);
    f.queue = Some("email".into());
    let in_email = listed(&q, f).await;
    assert_eq!(in_email.len(), 2);
    assert_eq!(listed(&q, filter(JobScope::All, None)).await.len(), 5);

    // Paging, newest change first, without repeats.
    let everything = q.list(&filter(JobScope::All, None)).await.unwrap();
    assert!(
        everything
            .windows(2)
            .all(|w| (w[0].updated_at, w[0].id) > (w[1].updated_at, w[1].id))
    );
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = q
            .list(&JobFilter {
                scope: JobScope::All,
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
        assert!(page.len() <= 2);
        before = page.last().map(|j| (j.updated_at, j.id));
        seen.extend(page.into_iter().map(|j| j.id));
    }
    assert_eq!(seen, everything.iter().map(|j| j.id).collect::<Vec<_>>());

    // The dead job's tenant retries it, then gives up on it.
    let theirs_scope = JobScope::Tenant(sdis84);
    assert!(q.retry(theirs_scope, theirs).await.unwrap());
    let job = get(&q, theirs).await;
    assert_eq!(
        (job.state, job.attempts, job.finished_at),
        (JobState::Ready, 0, None)
    );
    assert_eq!(job.last_error.as_deref(), Some("no such address"));
    assert!(
        !q.retry(theirs_scope, theirs).await.unwrap(),
        "only failed jobs"
    );
    assert!(q.discard(theirs_scope, theirs).await.unwrap());
    assert_eq!(get(&q, theirs).await.state, JobState::Cancelled);
    done(q).await;
}

#[tokio::test]
async fn paging_through_a_big_batch_of_equal_timestamps() {
    let Some(q) = queue().await else { return };
    let tenant = TenantId::new();
    // One batch: every job has the same creation time, so ids order the page.
    let jobs: Vec<NewJob> = (0..1_500)
        .map(|i| {
            NewJob::new("t.page", json!({ "i": i }))
                .tenant(tenant)
                .queue(if i % 3 == 0 { "rare" } else { "common" })
        })
        .collect();
    let mut ids: Vec<JobId> = q
        .enqueue_batch(&jobs)
        .await
        .unwrap()
        .iter()
        .map(Enqueued::id)
        .collect();
    ids.sort_by(|a, b| b.cmp(a));
    for (scope, state) in [
        (JobScope::Tenant(tenant), Some(JobState::Ready)),
        (JobScope::All, None),
    ] {
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = q
                .list(&JobFilter {
                    scope,
                    state,
                    queue: None,
                    before,
                    limit: 333,
                })
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            before = page.last().map(|j| (j.updated_at, j.id));
            seen.extend(page.into_iter().map(|j| j.id));
        }
        assert_eq!(seen, ids);
    }
    // A sparse queue filter still fills the page (the script is called again).
    let rare = q
        .list(&JobFilter {
            scope: JobScope::Tenant(tenant),
            state: Some(JobState::Ready),
            queue: Some("rare".into()),
            before: None,
            limit: 1_000,
        })
        .await
        .unwrap();
    assert_eq!(rare.len(), 500);
    assert!(rare.iter().all(|j| j.queue == "rare"));
    done(q).await;
}

#[tokio::test]
async fn prune_removes_only_old_finished_jobs() {
    let Some(q) = queue().await else { return };
    let tenant = TenantId::new();
    let ok = q
        .enqueue(&NewJob::new("t.p", json!({})).tenant(tenant))
        .await
        .unwrap()
        .id();
    let bad = q
        .enqueue(&NewJob::new("t.p", json!({})))
        .await
        .unwrap()
        .id();
    let leases = q.reserve(DEFAULT_QUEUE, 2, LEASE).await.unwrap();
    for l in &leases {
        if l.job.id == ok {
            q.complete(&[l.lease_ref()]).await.unwrap();
        } else {
            q.fail(&l.lease_ref(), "x", None).await.unwrap();
        }
    }
    let gone = q
        .enqueue(&NewJob::new("t.p", json!({})))
        .await
        .unwrap()
        .id();
    assert!(q.cancel(JobScope::All, gone).await.unwrap());
    let pending = q
        .enqueue(&NewJob::new("t.p", json!({})).delay(Duration::from_secs(60)))
        .await
        .unwrap()
        .id();
    let running = q
        .enqueue(&NewJob::new("t.p", json!({})))
        .await
        .unwrap()
        .id();
    assert_eq!(reserve_ids(&q, DEFAULT_QUEUE, 1).await, vec![running]);

    assert_eq!(
        q.prune(Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(q.prune(Utc::now()).await.unwrap(), 3);
    for id in [ok, bad, gone] {
        assert!(q.job(JobScope::All, id).await.unwrap().is_none());
    }
    for id in [pending, running] {
        assert!(q.job(JobScope::All, id).await.unwrap().is_some());
    }
    let counts = q.counts(JobScope::All).await.unwrap();
    assert_eq!(counts.len(), 1);
    let c = &counts[0];
    assert_eq!(
        (c.succeeded, c.dead, c.cancelled, c.scheduled, c.running),
        (0, 0, 0, 1, 1)
    );
    assert!(q.counts(JobScope::Tenant(tenant)).await.unwrap().is_empty());
    assert_eq!(listed(&q, filter(JobScope::All, None)).await.len(), 2);
    done(q).await;
}

#[tokio::test]
async fn concurrent_reservers_never_share_a_job() {
    let Some(q) = queue().await else { return };
    const N: usize = 3_000;
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| NewJob::new("t.race", json!({ "i": i })))
        .collect();
    q.enqueue_batch(&jobs).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let leases = q.reserve(DEFAULT_QUEUE, 41, LEASE).await.unwrap();
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
    assert_eq!(all.len(), N);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), N);
    let counts = q.counts(JobScope::All).await.unwrap();
    assert_eq!(counts[0].succeeded, N as u64);
    assert_eq!(counts[0].ready + counts[0].running, 0);
    let tp = q.throughput(JobScope::All, 2).await.unwrap();
    assert_eq!(tp.iter().map(|m| m.succeeded).sum::<u64>(), N as u64);
    done(q).await;
}

#[tokio::test]
async fn bad_jobs_are_refused_and_nothing_is_written() {
    let Some(q) = queue().await else { return };
    let cases = [
        (NewJob::new("Bad Kind!", json!({})), "invalid_kind"),
        (NewJob::new("t.ok", json!({})).queue(""), "invalid_queue"),
        (
            NewJob::new("t.ok", json!({})).priority(101),
            "invalid_priority",
        ),
        (
            NewJob::new("t.ok", json!({})).max_attempts(0),
            "invalid_max_attempts",
        ),
        (
            NewJob::new("t.ok", json!({})).unique("", OnDuplicate::Keep),
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
    assert!(q.counts(JobScope::All).await.unwrap().is_empty());
    assert!(q.enqueue_batch(&[]).await.unwrap().is_empty());
    // Extremes that are valid are stored as given.
    let id = q
        .enqueue(
            &NewJob::new(
                "a.b_c-d:e",
                json!({ "s": "ünïcødé \u{1F692}", "n": [1, 2.5, null] }),
            )
            .priority(-100)
            .max_attempts(MAX_ATTEMPTS)
            .unique("k".repeat(MAX_UNIQUE_KEY_LEN), OnDuplicate::Keep),
        )
        .await
        .unwrap()
        .id();
    let job = get(&q, id).await;
    assert_eq!(
        job.payload,
        json!({ "s": "ünïcødé \u{1F692}", "n": [1, 2.5, null] })
    );
    assert_eq!((job.priority, job.max_attempts), (-100, MAX_ATTEMPTS));
    assert_eq!(job.tenant, None);
    assert_eq!(job.kind, "a.b_c-d:e");
    done(q).await;
}

#[tokio::test]
async fn the_scripts_come_back_after_a_script_flush() {
    let Some(q) = queue().await else { return };
    let id = q
        .enqueue(&NewJob::new("t.a", json!({})))
        .await
        .unwrap()
        .id();
    let _: () = fred::interfaces::LuaInterface::script_flush(q.pool(), false)
        .await
        .unwrap();
    assert_eq!(reserve_ids(&q, DEFAULT_QUEUE, 1).await, vec![id]);
    let _: () = fred::interfaces::LuaInterface::script_flush(q.pool(), false)
        .await
        .unwrap();
    assert!(q.enqueue(&NewJob::new("t.b", json!({}))).await.is_ok());
    done(q).await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_storage_error() {
    if std::env::var("MINDSP_TEST_REDIS_URL").is_err() {
        eprintln!("skipped: MINDSP_TEST_REDIS_URL is not set");
        return;
    }
    let mut config = mindsp_queue::redis::RedisQueueConfig::new("redis://127.0.0.1:1");
    config.command_timeout = Duration::from_secs(2);
    let res = tokio::time::timeout(Duration::from_secs(20), RedisQueue::connect_with(config))
        .await
        .expect("connecting gives up");
    match res {
        Err(Error::Storage(_)) => {}
        other => panic!("{other:?}"),
    }
}
