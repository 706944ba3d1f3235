//! The job queue on SQLite, in the store's own file.
//!
//! Every write goes through the store's single writer connection under the store's
//! write turn (SQLite has one writer at a time anyway, and the store's message appends
//! take the same turn), so reservations are serialised and no two workers can take the
//! same job. Workers reserve and complete in batches, which is what makes the
//! throughput: one transaction leases up to a batch of jobs, one marks a batch done.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindsp_core::error::{Error, Result};
use mindsp_core::ids::{JobId, TenantId};
use mindsp_core::jobs::*;
use mindsp_core::model::now;
use mindsp_core::ports::TenantTx;
use mindsp_store::sqlite::{SqliteStore, SqliteTx};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::sql::{
    ScopeCount, fold_counts, lease_error, lost_error, minute_of, minute_stats, minute_window,
    reported_state, scope_of, sql_err, superseded_error, tenant_scope, throughput_scope,
    with_total,
};

const COLS: &str = "id, tenant_id, kind, queue, payload, priority, state, run_at, attempts, \
                    max_attempts, unique_key, last_error, created_at, updated_at, finished_at";

/// The SQL job queue on SQLite. Cheap to clone.
#[derive(Clone)]
pub struct SqliteQueue {
    store: SqliteStore,
}

impl SqliteQueue {
    /// A queue in `store`'s database (its migrations created the tables).
    pub fn new(store: &SqliteStore) -> Self {
        Self {
            store: store.clone(),
        }
    }

    /// The store's write pool: reads go straight to it, writes take the write turn
    /// first (`SqliteStore::begin_write`, `SqliteStore::write_turn`).
    fn pool(&self) -> &SqlitePool {
        self.store.pool()
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

fn job_from_row(r: &SqliteRow, at: DateTime<Utc>) -> Result<Job> {
    let payload: String = r.try_get("payload").map_err(sql_err)?;
    let state: String = r.try_get("state").map_err(sql_err)?;
    let run_at = from_ms(r.try_get("run_at").map_err(sql_err)?);
    let state = reported_state(&state, run_at <= at)?;
    Ok(Job {
        id: JobId(r.try_get("id").map_err(sql_err)?),
        tenant: r
            .try_get::<Option<Uuid>, _>("tenant_id")
            .map_err(sql_err)?
            .map(TenantId),
        kind: r.try_get("kind").map_err(sql_err)?,
        queue: r.try_get("queue").map_err(sql_err)?,
        payload: serde_json::from_str(&payload).map_err(|e| Error::Storage(e.to_string()))?,
        priority: r.try_get("priority").map_err(sql_err)?,
        state,
        run_at,
        attempts: r.try_get::<i64, _>("attempts").map_err(sql_err)? as u32,
        max_attempts: r.try_get::<i64, _>("max_attempts").map_err(sql_err)? as u32,
        unique_key: r.try_get("unique_key").map_err(sql_err)?,
        last_error: r.try_get("last_error").map_err(sql_err)?,
        created_at: from_ms(r.try_get("created_at").map_err(sql_err)?),
        updated_at: from_ms(r.try_get("updated_at").map_err(sql_err)?),
        finished_at: r
            .try_get::<Option<i64>, _>("finished_at")
            .map_err(sql_err)?
            .map(from_ms),
    })
}

/// Stores one job on `conn` (inside the caller's transaction).
async fn enqueue_on(conn: &mut SqliteConnection, job: &NewJob) -> Result<Enqueued> {
    job.validate()?;
    let at = now();
    let run_at = ms(job.run_at.unwrap_or(at));
    let payload = serde_json::to_string(&job.payload).map_err(|e| Error::Storage(e.to_string()))?;
    let scope = scope_of(job.tenant);
    if let Some(key) = &job.unique_key {
        let held: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE uniq_scope = ? AND unique_key = ?
               AND state IN ('scheduled', 'ready', 'retrying')",
        )
        .bind(scope)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(sql_err)?;
        if let Some(id) = held {
            return Ok(match job.on_duplicate {
                OnDuplicate::Keep => Enqueued::Kept(JobId(id)),
                OnDuplicate::Replace => {
                    sqlx::query(
                        "UPDATE jobs SET kind = ?, queue = ?, payload = ?, priority = ?,
                                state = ?, run_at = ?, attempts = 0, max_attempts = ?,
                                last_error = NULL, updated_at = ?
                          WHERE id = ?",
                    )
                    .bind(&job.kind)
                    .bind(&job.queue)
                    .bind(&payload)
                    .bind(job.priority)
                    .bind(waiting_state(run_at, ms(at)))
                    .bind(run_at)
                    .bind(job.max_attempts as i64)
                    .bind(ms(at))
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(sql_err)?;
                    Enqueued::Replaced(JobId(id))
                }
            });
        }
    }
    let id = JobId::new();
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, uniq_scope, kind, queue, payload, priority, state,
                           run_at, attempts, max_attempts, unique_key, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
    )
    .bind(id.0)
    .bind(job.tenant.map(|t| t.0))
    .bind(scope)
    .bind(&job.kind)
    .bind(&job.queue)
    .bind(&payload)
    .bind(job.priority)
    .bind(waiting_state(run_at, ms(at)))
    .bind(run_at)
    .bind(job.max_attempts as i64)
    .bind(&job.unique_key)
    .bind(ms(at))
    .bind(ms(at))
    .execute(&mut *conn)
    .await
    .map_err(sql_err)?;
    Ok(Enqueued::Created(id))
}

/// The state a new job waits in: ready when due, scheduled otherwise.
fn waiting_state(run_at: i64, at: i64) -> &'static str {
    if run_at <= at { "ready" } else { "scheduled" }
}

/// Whether a pending job other than `id` holds `id`'s unique key; if so, its id.
async fn superseded_by(conn: &mut SqliteConnection, id: JobId) -> Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT p.id FROM jobs j JOIN jobs p
             ON p.uniq_scope = j.uniq_scope AND p.unique_key = j.unique_key
          WHERE j.id = ? AND p.id <> j.id AND p.state IN ('scheduled', 'ready', 'retrying')",
    )
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sql_err)
}

/// Adds finished attempts to the per-minute counters of each scope and of all.
async fn count_minute(
    conn: &mut SqliteConnection,
    minute: i64,
    counts: &[ScopeCount],
) -> Result<()> {
    for (scope, succeeded, failed) in with_total(counts) {
        sqlx::query(
            "INSERT INTO job_minutes (scope, minute, succeeded, failed) VALUES (?, ?, ?, ?)
             ON CONFLICT (scope, minute) DO UPDATE
                SET succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed",
        )
        .bind(scope)
        .bind(minute)
        .bind(succeeded)
        .bind(failed)
        .execute(&mut *conn)
        .await
        .map_err(sql_err)?;
    }
    Ok(())
}

/// Leases per statement (two parameters each).
const LEASE_CHUNK: usize = 400;
/// Rows per insert (thirteen columns, eleven parameters each).
const INSERT_CHUNK: usize = 500;

/// ` WHERE` the job is running under one of `leases`. A reservation's token is its
/// own, so matching ids and tokens as two sets can only pair a job with a token of
/// the same worker.
fn push_held(q: &mut QueryBuilder<'_, Sqlite>, leases: &[LeaseRef]) {
    q.push(" WHERE state = 'running' AND id IN (");
    let mut ids = q.separated(", ");
    for l in leases {
        ids.push_bind(l.id.0);
    }
    q.push(") AND lease_token IN (");
    let mut tokens: Vec<Uuid> = leases.iter().map(|l| l.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let mut sep = q.separated(", ");
    for t in tokens {
        sep.push_bind(t);
    }
    q.push(")");
}

/// `AND tenant_id = ?` when scoped to a tenant.
fn scope_filter(scope: JobScope) -> &'static str {
    match scope {
        JobScope::All => "",
        JobScope::Tenant(_) => " AND tenant_id = ?",
    }
}

#[async_trait]
impl JobQueue for SqliteQueue {
    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        let (_turn, mut tx) = self.store.begin_write().await?;
        let out = enqueue_on(&mut tx, job).await?;
        tx.commit().await.map_err(sql_err)?;
        Ok(out)
    }

    async fn enqueue_batch(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        for job in jobs {
            job.validate()?;
        }
        let (_turn, mut tx) = self.store.begin_write().await?;
        let mut out = Vec::with_capacity(jobs.len());
        if jobs.iter().all(|j| j.unique_key.is_none()) {
            // The common case: many rows per statement.
            let at = ms(now());
            for chunk in jobs.chunks(INSERT_CHUNK) {
                let mut q = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO jobs (id, tenant_id, uniq_scope, kind, queue, payload, priority,
                                       state, run_at, attempts, max_attempts, created_at,
                                       updated_at) ",
                );
                let mut err = None;
                q.push_values(chunk, |mut row, job| {
                    let id = JobId::new();
                    let payload = serde_json::to_string(&job.payload).unwrap_or_else(|e| {
                        err = Some(e.to_string());
                        String::new()
                    });
                    row.push_bind(id.0)
                        .push_bind(job.tenant.map(|t| t.0))
                        .push_bind(scope_of(job.tenant))
                        .push_bind(job.kind.clone())
                        .push_bind(job.queue.clone())
                        .push_bind(payload)
                        .push_bind(job.priority)
                        .push_bind(waiting_state(job.run_at.map(ms).unwrap_or(at), at))
                        .push_bind(job.run_at.map(ms).unwrap_or(at))
                        .push("0")
                        .push_bind(job.max_attempts as i64)
                        .push_bind(at)
                        .push_bind(at);
                    out.push(Enqueued::Created(id));
                });
                if let Some(e) = err {
                    return Err(Error::Storage(e));
                }
                q.build().execute(&mut *tx).await.map_err(sql_err)?;
            }
        } else {
            for job in jobs {
                out.push(enqueue_on(&mut tx, job).await?);
            }
        }
        tx.commit().await.map_err(sql_err)?;
        Ok(out)
    }

    async fn enqueue_in(&self, tx: &mut dyn TenantTx, job: &NewJob) -> Result<Enqueued> {
        let job = tenant_scope(tx.tenant(), job)?;
        let Some(tx) = tx.as_any_mut().downcast_mut::<SqliteTx>() else {
            return Err(Error::invalid(
                "queue_not_transactional",
                "a SQLite job queue joins only a SQLite storage transaction",
            ));
        };
        enqueue_on(tx.transaction(), &job).await
    }

    async fn reserve(&self, queue: &str, max: u32, lease: Duration) -> Result<Vec<Lease>> {
        let at = now();
        let t = ms(at);
        let expires = at + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let token = Uuid::new_v4();
        let (_turn, mut tx) = self.store.begin_write().await?;
        recover_leases(&mut tx, queue, t).await?;
        promote_due(&mut tx, queue, t).await?;
        let rows = sqlx::query(&format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_token = ?,
                    lease_expires_at = ?, updated_at = ?
              WHERE id IN (SELECT id FROM jobs WHERE queue = ? AND state = 'ready'
                            ORDER BY priority DESC, run_at, id LIMIT ?)
             RETURNING {COLS}"
        ))
        .bind(token)
        .bind(ms(expires))
        .bind(t)
        .bind(queue)
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(sql_err)?;
        tx.commit().await.map_err(sql_err)?;
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
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT min(t) FROM (
                SELECT min(run_at) AS t FROM jobs
                 WHERE queue = ? AND state IN ('scheduled', 'retrying')
                UNION ALL
                SELECT (SELECT run_at FROM jobs WHERE queue = ? AND state = 'ready' LIMIT 1)
                UNION ALL
                SELECT min(lease_expires_at) FROM jobs WHERE queue = ? AND state = 'running')",
        )
        .bind(queue)
        .bind(queue)
        .bind(queue)
        .fetch_one(self.pool())
        .await
        .map_err(sql_err)?;
        Ok(next.map(from_ms))
    }

    async fn renew(&self, leases: &[LeaseRef], lease: Duration) -> Result<Vec<bool>> {
        let expires = now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let (_turn, mut tx) = self.store.begin_write().await?;
        let mut kept = HashSet::new();
        for chunk in leases.chunks(LEASE_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("UPDATE jobs SET lease_expires_at = ");
            q.push_bind(ms(expires));
            push_held(&mut q, chunk);
            q.push(" RETURNING id");
            let ids: Vec<Uuid> = q
                .build_query_scalar()
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_err)?;
            kept.extend(ids);
        }
        tx.commit().await.map_err(sql_err)?;
        Ok(leases.iter().map(|l| kept.contains(&l.id.0)).collect())
    }

    async fn complete(&self, leases: &[LeaseRef]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let at = ms(now());
        let (_turn, mut tx) = self.store.begin_write().await?;
        let mut per_scope: Vec<ScopeCount> = Vec::new();
        for chunk in leases.chunks(LEASE_CHUNK) {
            let mut q =
                QueryBuilder::<Sqlite>::new("UPDATE jobs SET state = 'succeeded', finished_at = ");
            q.push_bind(at)
                .push(", updated_at = ")
                .push_bind(at)
                .push(", lease_token = NULL, lease_expires_at = NULL");
            push_held(&mut q, chunk);
            q.push(" RETURNING uniq_scope");
            let scopes: Vec<Uuid> = q
                .build_query_scalar()
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_err)?;
            per_scope.extend(scopes.into_iter().map(|s| (s, 1, 0)));
        }
        let total = per_scope.len() as u64;
        count_minute(&mut tx, minute_of(at), &per_scope).await?;
        tx.commit().await.map_err(sql_err)?;
        Ok(total)
    }

    async fn fail(
        &self,
        lease: &LeaseRef,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<JobState>> {
        let at = ms(now());
        let (_turn, mut tx) = self.store.begin_write().await?;
        let scope: Option<Uuid> = sqlx::query_scalar(
            "SELECT uniq_scope FROM jobs WHERE id = ? AND lease_token = ? AND state = 'running'",
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
                None => (JobState::Retrying, error.to_owned(), Some(ms(when))),
            },
        };
        sqlx::query(
            "UPDATE jobs SET state = ?, last_error = ?, run_at = coalesce(?, run_at),
                    updated_at = ?, finished_at = ?, lease_token = NULL, lease_expires_at = NULL
              WHERE id = ?",
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
        count_minute(&mut tx, minute_of(at), &[(scope, 0, 1)]).await?;
        tx.commit().await.map_err(sql_err)?;
        Ok(Some(state))
    }

    async fn release(&self, leases: &[LeaseRef]) -> Result<u64> {
        let at = ms(now());
        let (_turn, mut tx) = self.store.begin_write().await?;
        let mut released = 0;
        for l in leases {
            let held: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM jobs WHERE id = ? AND lease_token = ? AND state = 'running'",
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
                    "UPDATE jobs SET state = 'cancelled', last_error = ?, updated_at = ?,
                            finished_at = ?, lease_token = NULL, lease_expires_at = NULL
                      WHERE id = ?",
                )
                .bind(superseded_error(other))
                .bind(at)
                .bind(at)
                .bind(l.id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_err)?;
            } else {
                sqlx::query(
                    "UPDATE jobs SET state = 'ready', attempts = max(attempts - 1, 0),
                            run_at = min(run_at, ?), updated_at = ?,
                            lease_token = NULL, lease_expires_at = NULL
                      WHERE id = ?",
                )
                .bind(at)
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
            "SELECT {COLS} FROM jobs WHERE id = ?{}",
            scope_filter(scope)
        );
        let mut q = sqlx::query(&sql).bind(id.0);
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        let row = q.fetch_optional(self.pool()).await.map_err(sql_err)?;
        row.map(|r| job_from_row(&r, now())).transpose()
    }

    async fn cancel(&self, scope: JobScope, id: JobId) -> Result<bool> {
        self.finish_pending(scope, id, &["scheduled", "ready", "retrying"], None)
            .await
    }

    async fn cancel_unique(&self, tenant: Option<TenantId>, key: &str) -> Result<bool> {
        let at = ms(now());
        let _turn = self.store.write_turn().await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', updated_at = ?, finished_at = ?
              WHERE uniq_scope = ? AND unique_key = ? AND state IN ('scheduled', 'ready', 'retrying')",
        )
        .bind(at)
        .bind(at)
        .bind(scope_of(tenant))
        .bind(key)
        .execute(self.pool())
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
        let (_turn, mut tx) = self.store.begin_write().await?;
        let claimed = sqlx::query(
            "INSERT INTO job_ticks (schedule, fire_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(schedule)
        .bind(ms(fire_at))
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
        let at = ms(now());
        let sql = format!(
            "SELECT queue, state, run_at <= ? AS due, count(*) AS n FROM jobs
              WHERE 1 = 1{} GROUP BY queue, state, due ORDER BY queue",
            scope_filter(scope)
        );
        let mut q = sqlx::query(&sql).bind(at);
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        let rows = q.fetch_all(self.pool()).await.map_err(sql_err)?;
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
        let window = minute_window(ms(now()), minutes);
        let rows = sqlx::query(
            "SELECT minute, succeeded, failed FROM job_minutes
              WHERE scope = ? AND minute >= ? ORDER BY minute",
        )
        .bind(throughput_scope(scope))
        .bind(window[0])
        .fetch_all(self.pool())
        .await
        .map_err(sql_err)?;
        minute_stats(
            &window,
            rows.iter().map(|r| {
                Ok((
                    r.try_get("minute").map_err(sql_err)?,
                    r.try_get("succeeded").map_err(sql_err)?,
                    r.try_get("failed").map_err(sql_err)?,
                ))
            }),
        )
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let at = now();
        let mut sql = format!(
            "SELECT {COLS} FROM jobs WHERE 1 = 1{}",
            scope_filter(filter.scope)
        );
        match filter.state {
            Some(JobState::Ready) => {
                sql.push_str(" AND (state = 'ready' OR (state = 'scheduled' AND run_at <= ?))")
            }
            Some(JobState::Scheduled) => sql.push_str(" AND state = 'scheduled' AND run_at > ?"),
            Some(_) => sql.push_str(" AND state = ?"),
            None => {}
        }
        if filter.queue.is_some() {
            sql.push_str(" AND queue = ?");
        }
        if filter.before.is_some() {
            sql.push_str(" AND (updated_at < ? OR (updated_at = ? AND id < ?))");
        }
        sql.push_str(" ORDER BY updated_at DESC, id DESC LIMIT ?");
        let mut q = sqlx::query(&sql);
        if let JobScope::Tenant(t) = filter.scope {
            q = q.bind(t.0);
        }
        match filter.state {
            Some(JobState::Ready | JobState::Scheduled) => q = q.bind(ms(at)),
            Some(s) => q = q.bind(s.as_str()),
            None => {}
        }
        if let Some(queue) = &filter.queue {
            q = q.bind(queue);
        }
        if let Some((t, id)) = filter.before {
            q = q.bind(ms(t)).bind(ms(t)).bind(id.0);
        }
        let rows = q
            .bind(filter.limit as i64)
            .fetch_all(self.pool())
            .await
            .map_err(sql_err)?;
        rows.iter().map(|r| job_from_row(r, at)).collect()
    }

    async fn retry(&self, scope: JobScope, id: JobId) -> Result<bool> {
        let at = ms(now());
        let (_turn, mut tx) = self.store.begin_write().await?;
        let sql = format!(
            "SELECT uniq_scope FROM jobs WHERE id = ?
                AND state IN ('dead', 'retrying', 'cancelled'){}",
            scope_filter(scope)
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
            "UPDATE jobs SET state = 'ready', attempts = 0, run_at = ?, updated_at = ?,
                    finished_at = NULL
              WHERE id = ?",
        )
        .bind(at)
        .bind(at)
        .bind(id.0)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?;
        tx.commit().await.map_err(sql_err)?;
        Ok(true)
    }

    async fn discard(&self, scope: JobScope, id: JobId) -> Result<bool> {
        self.finish_pending(scope, id, &["scheduled", "ready", "retrying", "dead"], None)
            .await
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<u64> {
        let before = ms(before);
        let (_turn, mut tx) = self.store.begin_write().await?;
        let done = sqlx::query(
            "DELETE FROM jobs WHERE state IN ('succeeded', 'dead', 'cancelled')
                AND finished_at < ?",
        )
        .bind(before)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?
        .rows_affected();
        sqlx::query("DELETE FROM job_ticks WHERE fire_at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(sql_err)?;
        sqlx::query("DELETE FROM job_minutes WHERE minute < ?")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(sql_err)?;
        tx.commit().await.map_err(sql_err)?;
        Ok(done)
    }
}

impl SqliteQueue {
    /// Moves a job in one of `from` states to cancelled.
    async fn finish_pending(
        &self,
        scope: JobScope,
        id: JobId,
        from: &[&str],
        error: Option<&str>,
    ) -> Result<bool> {
        let at = ms(now());
        let states = from
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', updated_at = ?, finished_at = ?,
                    last_error = coalesce(?, last_error)
              WHERE id = ? AND state IN ({states}){}",
            scope_filter(scope)
        );
        let mut q = sqlx::query(&sql).bind(at).bind(at).bind(error).bind(id.0);
        if let JobScope::Tenant(t) = scope {
            q = q.bind(t.0);
        }
        let _turn = self.store.write_turn().await?;
        Ok(q.execute(self.pool())
            .await
            .map_err(sql_err)?
            .rows_affected()
            == 1)
    }
}

/// Most jobs promoted from waiting to ready in one reservation.
const PROMOTE_CHUNK: i64 = 5_000;

/// Moves the jobs of `queue` whose time has come from waiting to ready, oldest first.
async fn promote_due(conn: &mut SqliteConnection, queue: &str, at: i64) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'ready'
          WHERE id IN (SELECT id FROM jobs
                        WHERE queue = ? AND state IN ('scheduled', 'retrying') AND run_at <= ?
                        ORDER BY run_at LIMIT ?)",
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
/// attempt, or cancelled when a newer pending job took their unique key.
async fn recover_leases(conn: &mut SqliteConnection, queue: &str, at: i64) -> Result<()> {
    let expired = sqlx::query(
        "SELECT id, attempts, max_attempts FROM jobs
          WHERE queue = ? AND state = 'running' AND lease_expires_at <= ?",
    )
    .bind(queue)
    .bind(at)
    .fetch_all(&mut *conn)
    .await
    .map_err(sql_err)?;
    for r in expired {
        let id = JobId(r.try_get("id").map_err(sql_err)?);
        let attempts: i64 = r.try_get("attempts").map_err(sql_err)?;
        let max: i64 = r.try_get("max_attempts").map_err(sql_err)?;
        let (state, error) = if attempts >= max {
            ("dead", Some(lost_error(attempts, max)))
        } else if let Some(other) = superseded_by(&mut *conn, id).await? {
            ("cancelled", Some(superseded_error(other)))
        } else {
            ("ready", Some(lease_error(attempts, max)))
        };
        sqlx::query(
            "UPDATE jobs SET state = ?, last_error = ?, updated_at = ?,
                    finished_at = CASE WHEN ? = 'ready' THEN NULL ELSE ? END,
                    lease_token = NULL, lease_expires_at = NULL
              WHERE id = ?",
        )
        .bind(state)
        .bind(error)
        .bind(at)
        .bind(state)
        .bind(at)
        .bind(id.0)
        .execute(&mut *conn)
        .await
        .map_err(sql_err)?;
    }
    Ok(())
}
