//! The job queue on PostgreSQL, in the store's own database.
//!
//! Workers on any number of nodes reserve with `FOR UPDATE SKIP LOCKED`: each takes
//! rows nobody else has locked, so two healthy workers never get the same job and
//! never wait for each other. Batches move in one statement each (`unnest` of arrays).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindsp_core::error::{Error, Result};
use mindsp_core::ids::{JobId, TenantId};
use mindsp_core::jobs::*;
use mindsp_core::model::now;
use mindsp_core::ports::TenantTx;
use mindsp_store::postgres::{PgStore, PgTx};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::sql::{
    ScopeCount, fold_counts, lease_error, lost_error, minute_stats, minute_window, reported_state,
    scope_of, sql_err, superseded_error, tenant_scope, throughput_scope, with_total,
};

const COLS: &str = "id, tenant_id, kind, queue, payload, priority, state, run_at, attempts, \
                    max_attempts, unique_key, last_error, created_at, updated_at, finished_at";

/// The SQL job queue on PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct PgQueue {
    pool: PgPool,
    /// When expired leases and due jobs were last looked for (ms since the epoch).
    last_recovery: Arc<AtomicI64>,
}

/// Most jobs promoted from waiting to ready in one reservation.
const PROMOTE_CHUNK: i64 = 5_000;

/// Expired leases and due jobs are looked for at most this often (ms): often enough
/// that a dead worker's jobs come back promptly, rarely enough to keep reservations at
/// one round trip.
const RECOVERY_EVERY_MS: i64 = 100;

impl PgQueue {
    /// A queue in `store`'s database (its migrations created the tables).
    pub fn new(store: &PgStore) -> Self {
        Self {
            pool: store.pool().clone(),
            last_recovery: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Whether this reservation should first recover expired leases and promote due
    /// jobs (so that a backlog of them is taken by priority).
    fn maintenance_due(&self, at: DateTime<Utc>) -> bool {
        let t = at.timestamp_millis();
        let last = self.last_recovery.load(Ordering::Relaxed);
        t - last >= RECOVERY_EVERY_MS
            && self
                .last_recovery
                .compare_exchange(last, t, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn job_from_row(r: &PgRow, at: DateTime<Utc>) -> Result<Job> {
    let state: String = r.try_get("state").map_err(sql_err)?;
    let run_at: DateTime<Utc> = r.try_get("run_at").map_err(sql_err)?;
    let state = reported_state(&state, run_at <= at)?;
    Ok(Job {
        id: JobId(r.try_get("id").map_err(sql_err)?),
        tenant: r
            .try_get::<Option<Uuid>, _>("tenant_id")
            .map_err(sql_err)?
            .map(TenantId),
        kind: r.try_get("kind").map_err(sql_err)?,
        queue: r.try_get("queue").map_err(sql_err)?,
        payload: r
            .try_get::<Json<serde_json::Value>, _>("payload")
            .map_err(sql_err)?
            .0,
        priority: r.try_get("priority").map_err(sql_err)?,
        state,
        run_at,
        attempts: r.try_get::<i32, _>("attempts").map_err(sql_err)? as u32,
        max_attempts: r.try_get::<i32, _>("max_attempts").map_err(sql_err)? as u32,
        unique_key: r.try_get("unique_key").map_err(sql_err)?,
        last_error: r.try_get("last_error").map_err(sql_err)?,
        created_at: r.try_get("created_at").map_err(sql_err)?,
        updated_at: r.try_get("updated_at").map_err(sql_err)?,
        finished_at: r.try_get("finished_at").map_err(sql_err)?,
    })
}

/// Stores validated jobs on `conn`: jobs without a unique key in one statement, others
/// one by one.
async fn enqueue_many_on(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
    let mut out = Vec::with_capacity(jobs.len());
    if jobs.iter().all(|j| j.unique_key.is_none()) {
        // The common case in one statement.
        let at = now();
        let ids: Vec<Uuid> = jobs.iter().map(|_| JobId::new().0).collect();
        let tenants: Vec<Option<Uuid>> = jobs.iter().map(|j| j.tenant.map(|t| t.0)).collect();
        let scopes: Vec<Uuid> = jobs.iter().map(|j| scope_of(j.tenant)).collect();
        let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
        let queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
        let payloads: Vec<Json<&serde_json::Value>> =
            jobs.iter().map(|j| Json(&j.payload)).collect();
        let priorities: Vec<i16> = jobs.iter().map(|j| j.priority).collect();
        let run_ats: Vec<DateTime<Utc>> = jobs.iter().map(|j| j.run_at.unwrap_or(at)).collect();
        let maxes: Vec<i32> = jobs.iter().map(|j| j.max_attempts as i32).collect();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, uniq_scope, kind, queue, payload, priority,
                                   state, run_at, attempts, max_attempts, created_at, updated_at)
                 SELECT id, tenant_id, uniq_scope, kind, queue, payload, priority,
                        CASE WHEN run_at <= $10 THEN 'ready' ELSE 'scheduled' END,
                        run_at, 0, max_attempts, $10, $10
                   FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                               $6::jsonb[], $7::int2[], $8::timestamptz[], $9::int4[])
                     AS j(id, tenant_id, uniq_scope, kind, queue, payload, priority, run_at,
                          max_attempts)",
        )
        .bind(&ids)
        .bind(&tenants)
        .bind(&scopes)
        .bind(&kinds)
        .bind(&queues)
        .bind(&payloads)
        .bind(&priorities)
        .bind(&run_ats)
        .bind(&maxes)
        .bind(at)
        .execute(&mut *conn)
        .await
        .map_err(sql_err)?;
        out.extend(ids.into_iter().map(|id| Enqueued::Created(JobId(id))));
    } else {
        for job in jobs {
            out.push(enqueue_on(conn, job).await?);
        }
    }
    Ok(out)
}

/// Stores one job on `conn` (inside the caller's transaction). A unique key held by a
/// pending job is settled by the unique index itself, so concurrent enqueuers agree.
async fn enqueue_on(conn: &mut PgConnection, job: &NewJob) -> Result<Enqueued> {
    job.validate()?;
    let at = now();
    let id = JobId::new();
    let on_conflict = match (&job.unique_key, job.on_duplicate) {
        (None, _) => "",
        (Some(_), OnDuplicate::Keep) => {
            " ON CONFLICT (uniq_scope, unique_key)
                WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'ready', 'retrying')
              DO UPDATE SET updated_at = jobs.updated_at"
        }
        (Some(_), OnDuplicate::Replace) => {
            " ON CONFLICT (uniq_scope, unique_key)
                WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'ready', 'retrying')
              DO UPDATE SET kind = EXCLUDED.kind, queue = EXCLUDED.queue,
                 payload = EXCLUDED.payload, priority = EXCLUDED.priority,
                 state = CASE WHEN EXCLUDED.run_at <= EXCLUDED.created_at
                              THEN 'ready' ELSE 'scheduled' END,
                 run_at = EXCLUDED.run_at, attempts = 0,
                 max_attempts = EXCLUDED.max_attempts, last_error = NULL,
                 updated_at = EXCLUDED.updated_at"
        }
    };
    let stored: Uuid = sqlx::query_scalar(&format!(
        "INSERT INTO jobs (id, tenant_id, uniq_scope, kind, queue, payload, priority, state,
                           run_at, attempts, max_attempts, unique_key, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 CASE WHEN $8::timestamptz <= $11::timestamptz THEN 'ready' ELSE 'scheduled' END,
                 $8, 0, $9, $10, $11, $11)
         {on_conflict} RETURNING id"
    ))
    .bind(id.0)
    .bind(job.tenant.map(|t| t.0))
    .bind(scope_of(job.tenant))
    .bind(&job.kind)
    .bind(&job.queue)
    .bind(Json(&job.payload))
    .bind(job.priority)
    .bind(job.run_at.unwrap_or(at))
    .bind(job.max_attempts as i32)
    .bind(&job.unique_key)
    .bind(at)
    .fetch_one(&mut *conn)
    .await
    .map_err(sql_err)?;
    Ok(if stored == id.0 {
        Enqueued::Created(id)
    } else if job.on_duplicate == OnDuplicate::Replace {
        Enqueued::Replaced(JobId(stored))
    } else {
        Enqueued::Kept(JobId(stored))
    })
}

/// Whether a pending job other than `id` holds `id`'s unique key; if so, its id.
async fn superseded_by(conn: &mut PgConnection, id: JobId) -> Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT p.id FROM jobs j JOIN jobs p
             ON p.uniq_scope = j.uniq_scope AND p.unique_key = j.unique_key
          WHERE j.id = $1 AND p.id <> j.id AND p.state IN ('scheduled', 'ready', 'retrying')",
    )
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sql_err)
}

/// Adds finished attempts to the per-minute counters of each scope and of all.
async fn count_minute(
    conn: &mut PgConnection,
    at: DateTime<Utc>,
    counts: &[ScopeCount],
) -> Result<()> {
    let rows = with_total(counts);
    if rows.is_empty() {
        return Ok(());
    }
    let scopes: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let succeeded: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let failed: Vec<i64> = rows.iter().map(|r| r.2).collect();
    sqlx::query(
        "INSERT INTO job_minutes (scope, minute, succeeded, failed)
         SELECT s, date_trunc('minute', $1::timestamptz), ok, ko
           FROM unnest($2::uuid[], $3::int8[], $4::int8[]) AS c(s, ok, ko)
         ON CONFLICT (scope, minute) DO UPDATE
            SET succeeded = job_minutes.succeeded + EXCLUDED.succeeded,
                failed = job_minutes.failed + EXCLUDED.failed",
    )
    .bind(at)
    .bind(&scopes)
    .bind(&succeeded)
    .bind(&failed)
    .execute(&mut *conn)
    .await
    .map_err(sql_err)?;
    Ok(())
}

fn scope_filter(scope: JobScope, n: usize) -> String {
    match scope {
        JobScope::All => String::new(),
        JobScope::Tenant(_) => format!(" AND tenant_id = ${n}"),
    }
}

fn lease_arrays(leases: &[LeaseRef]) -> (Vec<Uuid>, Vec<Uuid>) {
    leases.iter().map(|l| (l.id.0, l.token)).unzip()
}

#[async_trait]
impl JobQueue for PgQueue {
    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        let mut conn = self.pool.acquire().await.map_err(sql_err)?;
        enqueue_on(&mut conn, job).await
    }

    async fn enqueue_batch(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        for job in jobs {
            job.validate()?;
        }
        let mut tx = self.pool.begin().await.map_err(sql_err)?;
        let out = enqueue_many_on(&mut tx, jobs).await?;
        tx.commit().await.map_err(sql_err)?;
        Ok(out)
    }

    async fn enqueue_batch_in(
        &self,
        tx: &mut dyn TenantTx,
        jobs: &[NewJob],
    ) -> Result<Vec<Enqueued>> {
        let tenant = tx.tenant();
        let jobs = jobs
            .iter()
            .map(|j| {
                j.validate()?;
                tenant_scope(tenant, j)
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(tx) = tx.as_any_mut().downcast_mut::<PgTx>() else {
            return Err(Error::invalid(
                "queue_not_transactional",
                "a PostgreSQL job queue joins only a PostgreSQL storage transaction",
            ));
        };
        enqueue_many_on(tx.transaction(), &jobs).await
    }

    async fn enqueue_in(&self, tx: &mut dyn TenantTx, job: &NewJob) -> Result<Enqueued> {
        let job = tenant_scope(tx.tenant(), job)?;
        let Some(tx) = tx.as_any_mut().downcast_mut::<PgTx>() else {
            return Err(Error::invalid(
                "queue_not_transactional",
                "a PostgreSQL job queue joins only a PostgreSQL storage transaction",
            ));
        };
        enqueue_on(tx.transaction(), &job).await
    }

    async fn reserve(&self, queue: &str, max: u32, lease: Duration) -> Result<Vec<Lease>> {
        let at = now();
        let expires = at + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let token = Uuid::new_v4();
        if self.maintenance_due(at) {
            let mut tx = self.pool.begin().await.map_err(sql_err)?;
            recover_leases(&mut tx, queue, at).await?;
            promote_due(&mut tx, queue, at).await?;
            tx.commit().await.map_err(sql_err)?;
        }
        // One statement without an explicit transaction: one round trip per batch. It
        // takes the best ready jobs and, in case promotion has not caught up, due jobs
        // still waiting; both through their own index.
        let rows = sqlx::query(&format!(
            "WITH ready AS (
                SELECT id, priority, run_at FROM jobs
                 WHERE queue = $1 AND state = 'ready'
                 ORDER BY priority DESC, run_at, id LIMIT $3
                 FOR UPDATE SKIP LOCKED),
             waiting AS (
                SELECT id, priority, run_at FROM jobs
                 WHERE queue = $1 AND state IN ('scheduled', 'retrying') AND run_at <= $2
                 ORDER BY run_at LIMIT $3
                 FOR UPDATE SKIP LOCKED),
             picked AS (
                SELECT id FROM (SELECT * FROM ready UNION ALL SELECT * FROM waiting) c
                 ORDER BY priority DESC, run_at, id LIMIT $3)
             UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, lease_token = $4,
                    lease_expires_at = $5, updated_at = $2
               FROM picked WHERE j.id = picked.id
             RETURNING {}",
            COLS.split(", ")
                .map(|c| format!("j.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(queue)
        .bind(at)
        .bind(max as i64)
        .bind(token)
        .bind(expires)
        .fetch_all(&self.pool)
        .await
        .map_err(sql_err)?;
        let mut leases = rows
            .iter()
            .map(|r| {
                Ok(Lease {
                    job: job_from_row(r, at)?,
                    token,
                    expires_at: expires,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        leases.sort_by(|a, b| {
            (b.job.priority, a.job.run_at, a.job.id).cmp(&(a.job.priority, b.job.run_at, b.job.id))
        });
        Ok(leases)
    }

    async fn next_due(&self, queue: &str) -> Result<Option<DateTime<Utc>>> {
        sqlx::query_scalar(
            "SELECT least(
                (SELECT min(run_at) FROM jobs
                  WHERE queue = $1 AND state IN ('scheduled', 'retrying')),
                (SELECT run_at FROM jobs WHERE queue = $1 AND state = 'ready' LIMIT 1),
                (SELECT min(lease_expires_at) FROM jobs WHERE queue = $1 AND state = 'running'))",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await
        .map_err(sql_err)
    }

    async fn renew(&self, leases: &[LeaseRef], lease: Duration) -> Result<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let expires = now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let (ids, tokens) = lease_arrays(leases);
        let kept: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE jobs j SET lease_expires_at = $3
               FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
              WHERE j.id = l.id AND j.lease_token = l.token AND j.state = 'running'
             RETURNING j.id",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(expires)
        .fetch_all(&self.pool)
        .await
        .map_err(sql_err)?;
        let kept: std::collections::HashSet<Uuid> = kept.into_iter().collect();
        Ok(ids.iter().map(|id| kept.contains(id)).collect())
    }

    async fn complete(&self, leases: &[LeaseRef]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = lease_arrays(leases);
        // Marking done and counting in one statement: one round trip per batch. The
        // counters are written in scope order (the nil "all" scope first) so
        // concurrent batches lock them in the same order.
        let done: i64 = sqlx::query_scalar(
            "WITH done AS (
                UPDATE jobs j SET state = 'succeeded', finished_at = $3, updated_at = $3,
                       lease_token = NULL, lease_expires_at = NULL
                  FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
                 WHERE j.id = l.id AND j.lease_token = l.token AND j.state = 'running'
                RETURNING j.uniq_scope),
             counted AS (
                INSERT INTO job_minutes (scope, minute, succeeded, failed)
                SELECT s, date_trunc('minute', $3::timestamptz), count(*), 0
                  FROM (SELECT uniq_scope AS s FROM done
                         UNION ALL SELECT '00000000-0000-0000-0000-000000000000'::uuid FROM done) c
                 GROUP BY s ORDER BY s
                ON CONFLICT (scope, minute) DO UPDATE
                   SET succeeded = job_minutes.succeeded + EXCLUDED.succeeded)
             SELECT count(*) FROM done",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(sql_err)?;
        Ok(done as u64)
    }

    async fn fail(
        &self,
        lease: &LeaseRef,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<JobState>> {
        let at = now();
        let mut tx = self.pool.begin().await.map_err(sql_err)?;
        let scope: Option<Uuid> = sqlx::query_scalar(
            "SELECT uniq_scope FROM jobs
              WHERE id = $1 AND lease_token = $2 AND state = 'running' FOR UPDATE",
        )
        .bind(lease.id.0)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql_err)?;
        let Some(scope) = scope else {
            return Ok(None);
        };
        let (state, error, run_at) = match retry_at {
            None => (JobState::Dead, error.to_owned(), None),
            Some(when) => match superseded_by(&mut tx, lease.id).await? {
                Some(other) => (JobState::Cancelled, superseded_error(other), None),
                None => (JobState::Retrying, error.to_owned(), Some(when)),
            },
        };
        sqlx::query(
            "UPDATE jobs SET state = $1, last_error = $2, run_at = coalesce($3, run_at),
                    updated_at = $4, finished_at = $5, lease_token = NULL, lease_expires_at = NULL
              WHERE id = $6",
        )
        .bind(state.as_str())
        .bind(clip_error(&error))
        .bind(run_at)
        .bind(at)
        .bind(state.is_final().then_some(at))
        .bind(lease.id.0)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?;
        count_minute(&mut tx, at, &[(scope, 0, 1)]).await?;
        tx.commit().await.map_err(sql_err)?;
        Ok(Some(state))
    }

    async fn release(&self, leases: &[LeaseRef]) -> Result<u64> {
        let at = now();
        let mut tx = self.pool.begin().await.map_err(sql_err)?;
        let mut released = 0;
        for l in leases {
            let held: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM jobs
                  WHERE id = $1 AND lease_token = $2 AND state = 'running' FOR UPDATE",
            )
            .bind(l.id.0)
            .bind(l.token)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_err)?;
            if held.is_none() {
                continue;
            }
            if let Some(other) = superseded_by(&mut tx, l.id).await? {
                sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', last_error = $1, updated_at = $2,
                            finished_at = $2, lease_token = NULL, lease_expires_at = NULL
                      WHERE id = $3",
                )
                .bind(superseded_error(other))
                .bind(at)
                .bind(l.id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_err)?;
            } else {
                sqlx::query(
                    "UPDATE jobs SET state = 'ready', attempts = greatest(attempts - 1, 0),
                            run_at = least(run_at, $1), updated_at = $1,
                            lease_token = NULL, lease_expires_at = NULL
                      WHERE id = $2",
                )
                .bind(at)
                .bind(l.id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_err)?;
            }
            released += 1;
        }
        tx.commit().await.map_err(sql_err)?;
        Ok(released)
    }

    async fn job(&self, scope: JobScope, id: JobId) -> Result<Option<Job>> {
        let sql = format!(
            "SELECT {COLS} FROM jobs WHERE id = $1{}",
            scope_filter(scope, 2)
        );
        let mut q = sqlx::query(&sql).bind(id.0);
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        let row = q.fetch_optional(&self.pool).await.map_err(sql_err)?;
        row.map(|r| job_from_row(&r, now())).transpose()
    }

    async fn cancel(&self, scope: JobScope, id: JobId) -> Result<bool> {
        self.cancel_in(scope, id, "'scheduled', 'ready', 'retrying'")
            .await
    }

    async fn cancel_unique(&self, tenant: Option<TenantId>, key: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', updated_at = $1, finished_at = $1
              WHERE uniq_scope = $2 AND unique_key = $3 AND state IN ('scheduled', 'ready', 'retrying')",
        )
        .bind(now())
        .bind(scope_of(tenant))
        .bind(key)
        .execute(&self.pool)
        .await
        .map_err(sql_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn enqueue_tick(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        job: &NewJob,
    ) -> Result<bool> {
        job.validate()?;
        let mut tx = self.pool.begin().await.map_err(sql_err)?;
        let claimed = sqlx::query(
            "INSERT INTO job_ticks (schedule, fire_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(schedule)
        .bind(fire_at)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?
        .rows_affected()
            == 1;
        if claimed {
            enqueue_on(&mut tx, job).await?;
            tx.commit().await.map_err(sql_err)?;
        }
        Ok(claimed)
    }

    async fn counts(&self, scope: JobScope) -> Result<Vec<QueueCounts>> {
        let sql = format!(
            "SELECT queue, state, run_at <= $1 AS due, count(*) AS n FROM jobs
              WHERE true{} GROUP BY queue, state, due ORDER BY queue",
            scope_filter(scope, 2)
        );
        let mut q = sqlx::query(&sql).bind(now());
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(sql_err)?;
        fold_counts(rows.iter().map(|r| {
            Ok((
                r.try_get("queue").map_err(sql_err)?,
                r.try_get("state").map_err(sql_err)?,
                r.try_get("due").map_err(sql_err)?,
                r.try_get("n").map_err(sql_err)?,
            ))
        }))
    }

    async fn throughput(&self, scope: JobScope, minutes: u32) -> Result<Vec<MinuteStat>> {
        let window = minute_window(now().timestamp_millis(), minutes);
        let rows = sqlx::query(
            "SELECT minute, succeeded, failed FROM job_minutes
              WHERE scope = $1 AND minute >= $2 ORDER BY minute",
        )
        .bind(throughput_scope(scope))
        .bind(DateTime::<Utc>::from_timestamp_millis(window[0]).unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(sql_err)?;
        minute_stats(
            &window,
            rows.iter().map(|r| {
                let minute: DateTime<Utc> = r.try_get("minute").map_err(sql_err)?;
                Ok((
                    minute.timestamp_millis(),
                    r.try_get("succeeded").map_err(sql_err)?,
                    r.try_get("failed").map_err(sql_err)?,
                ))
            }),
        )
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let at = now();
        let mut n = 1;
        let mut next = || {
            n += 1;
            n
        };
        let mut sql = format!("SELECT {COLS} FROM jobs WHERE $1::timestamptz IS NOT NULL");
        if let JobScope::Tenant(_) = filter.scope {
            sql.push_str(&format!(" AND tenant_id = ${}", next()));
        }
        match filter.state {
            Some(JobState::Ready) => {
                sql.push_str(" AND (state = 'ready' OR (state = 'scheduled' AND run_at <= $1))")
            }
            Some(JobState::Scheduled) => sql.push_str(" AND state = 'scheduled' AND run_at > $1"),
            Some(_) => sql.push_str(&format!(" AND state = ${}", next())),
            None => {}
        }
        if filter.queue.is_some() {
            sql.push_str(&format!(" AND queue = ${}", next()));
        }
        if filter.before.is_some() {
            let (t, i) = (next(), next());
            sql.push_str(&format!(" AND (updated_at, id) < (${t}, ${i})"));
        }
        sql.push_str(&format!(
            " ORDER BY updated_at DESC, id DESC LIMIT ${}",
            next()
        ));
        let mut q = sqlx::query(&sql).bind(at);
        if let JobScope::Tenant(t) = filter.scope {
            q = q.bind(t.0);
        }
        match filter.state {
            Some(JobState::Ready | JobState::Scheduled) | None => {}
            Some(s) => q = q.bind(s.as_str()),
        }
        if let Some(queue) = &filter.queue {
            q = q.bind(queue);
        }
        if let Some((t, id)) = filter.before {
            q = q.bind(t).bind(id.0);
        }
        let rows = q
            .bind(filter.limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(sql_err)?;
        rows.iter().map(|r| job_from_row(r, at)).collect()
    }

    async fn retry(&self, scope: JobScope, id: JobId) -> Result<bool> {
        let at = now();
        let mut tx = self.pool.begin().await.map_err(sql_err)?;
        let sql = format!(
            "SELECT id FROM jobs WHERE id = $1
                AND state IN ('dead', 'retrying', 'cancelled'){} FOR UPDATE",
            scope_filter(scope, 2)
        );
        let mut q = sqlx::query(&sql).bind(id.0);
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        if q.fetch_optional(&mut *tx).await.map_err(sql_err)?.is_none() {
            return Ok(false);
        }
        if superseded_by(&mut tx, id).await?.is_some() {
            return Err(Error::conflict(
                "unique_key_held",
                "another pending job holds this job's unique key",
            ));
        }
        sqlx::query(
            "UPDATE jobs SET state = 'ready', attempts = 0, run_at = $1, updated_at = $1,
                    finished_at = NULL
              WHERE id = $2",
        )
        .bind(at)
        .bind(id.0)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?;
        tx.commit().await.map_err(sql_err)?;
        Ok(true)
    }

    async fn discard(&self, scope: JobScope, id: JobId) -> Result<bool> {
        self.cancel_in(scope, id, "'scheduled', 'ready', 'retrying', 'dead'")
            .await
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut tx = self.pool.begin().await.map_err(sql_err)?;
        let done = sqlx::query(
            "DELETE FROM jobs WHERE state IN ('succeeded', 'dead', 'cancelled')
                AND finished_at < $1",
        )
        .bind(before)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?
        .rows_affected();
        for table in ["job_ticks WHERE fire_at", "job_minutes WHERE minute"] {
            sqlx::query(&format!("DELETE FROM {table} < $1"))
                .bind(before)
                .execute(&mut *tx)
                .await
                .map_err(sql_err)?;
        }
        tx.commit().await.map_err(sql_err)?;
        Ok(done)
    }
}

impl PgQueue {
    /// Moves a job in one of `states` (a SQL list) to cancelled.
    async fn cancel_in(&self, scope: JobScope, id: JobId, states: &str) -> Result<bool> {
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', updated_at = $1, finished_at = $1
              WHERE id = $2 AND state IN ({states}){}",
            scope_filter(scope, 3)
        );
        let mut q = sqlx::query(&sql).bind(now()).bind(id.0);
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        Ok(q.execute(&self.pool)
            .await
            .map_err(sql_err)?
            .rows_affected()
            == 1)
    }
}

/// Moves the jobs of `queue` whose time has come from waiting to ready, oldest first.
async fn promote_due(conn: &mut PgConnection, queue: &str, at: DateTime<Utc>) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'ready'
          WHERE id IN (SELECT id FROM jobs
                        WHERE queue = $1 AND state IN ('scheduled', 'retrying') AND run_at <= $2
                        ORDER BY run_at LIMIT $3
                        FOR UPDATE SKIP LOCKED)",
    )
    .bind(queue)
    .bind(at)
    .bind(PROMOTE_CHUNK)
    .execute(&mut *conn)
    .await
    .map_err(sql_err)?;
    Ok(())
}

/// Makes the expired leases of `queue` due again, or dead when they used their last
/// attempt, or cancelled when a newer pending job took their unique key. Rows another
/// reserver is recovering are skipped.
async fn recover_leases(conn: &mut PgConnection, queue: &str, at: DateTime<Utc>) -> Result<()> {
    let expired = sqlx::query(
        "SELECT id, attempts, max_attempts FROM jobs
          WHERE queue = $1 AND state = 'running' AND lease_expires_at <= $2
          FOR UPDATE SKIP LOCKED",
    )
    .bind(queue)
    .bind(at)
    .fetch_all(&mut *conn)
    .await
    .map_err(sql_err)?;
    for r in expired {
        let id = JobId(r.try_get("id").map_err(sql_err)?);
        let attempts = r.try_get::<i32, _>("attempts").map_err(sql_err)? as i64;
        let max = r.try_get::<i32, _>("max_attempts").map_err(sql_err)? as i64;
        let (state, error) = if attempts >= max {
            ("dead", lost_error(attempts, max))
        } else if let Some(other) = superseded_by(&mut *conn, id).await? {
            ("cancelled", superseded_error(other))
        } else {
            ("ready", lease_error(attempts, max))
        };
        sqlx::query(
            "UPDATE jobs SET state = $1, last_error = $2, updated_at = $3,
                    finished_at = CASE WHEN $1 = 'ready' THEN NULL ELSE $3 END,
                    lease_token = NULL, lease_expires_at = NULL
              WHERE id = $4",
        )
        .bind(state)
        .bind(error)
        .bind(at)
        .bind(id.0)
        .execute(&mut *conn)
        .await
        .map_err(sql_err)?;
    }
    Ok(())
}
