//! What the SQLite and PostgreSQL queues share: error mapping, scopes, error texts.

use chrono::{DateTime, Utc};
use mindsp_core::error::{Error, Result};
use mindsp_core::ids::TenantId;
use mindsp_core::jobs::{JobState, MinuteStat, NewJob, QueueCounts};
use uuid::Uuid;

pub(crate) fn sql_err(e: sqlx::Error) -> Error {
    Error::Storage(e.to_string())
}

/// The scope of a unique key (and of the throughput counters): the tenant, or the nil
/// UUID for jobs that belong to none. The nil UUID also stands for "all tenants" in
/// the throughput counters.
pub(crate) fn scope_of(tenant: Option<TenantId>) -> Uuid {
    tenant.map(|t| t.0).unwrap_or_else(Uuid::nil)
}

/// The scope under which throughput is counted: the tenant, or nil for all.
pub(crate) fn throughput_scope(scope: mindsp_core::jobs::JobScope) -> Uuid {
    match scope {
        mindsp_core::jobs::JobScope::All => Uuid::nil(),
        mindsp_core::jobs::JobScope::Tenant(t) => t.0,
    }
}

/// Start of the minute containing `ms` (milliseconds since the epoch).
pub(crate) fn minute_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(60_000)
}

/// The job as it is stored in a unit of work of `tenant`: it belongs to that tenant.
pub(crate) fn tenant_scope(tenant: TenantId, job: &NewJob) -> Result<NewJob> {
    match job.tenant {
        Some(t) if t != tenant => Err(Error::invalid(
            "tenant_mismatch",
            "a job enqueued in a tenant's transaction must belong to that tenant",
        )),
        _ => Ok(NewJob {
            tenant: Some(tenant),
            ..job.clone()
        }),
    }
}

pub(crate) fn superseded_error(other: Uuid) -> String {
    format!("superseded by job {other}")
}

pub(crate) fn lost_error(attempts: i64, max: i64) -> String {
    format!("worker lost: lease expired on attempt {attempts} of {max}")
}

pub(crate) fn lease_error(attempts: i64, max: i64) -> String {
    format!("lease expired on attempt {attempts} of {max}; the job runs again")
}

/// Finished attempts of one scope: (scope, succeeded, failed).
pub(crate) type ScopeCount = (Uuid, i64, i64);

/// The counts summed per scope, in scope order, followed by the total under the nil
/// scope. A fixed order of row updates keeps concurrent writers from deadlocking.
pub(crate) fn with_total(counts: &[ScopeCount]) -> Vec<ScopeCount> {
    let mut per: std::collections::BTreeMap<Uuid, (i64, i64)> = Default::default();
    let (mut s, mut f) = (0, 0);
    for &(scope, succeeded, failed) in counts {
        s += succeeded;
        f += failed;
        if !scope.is_nil() {
            let e = per.entry(scope).or_default();
            e.0 += succeeded;
            e.1 += failed;
        }
    }
    let mut out: Vec<ScopeCount> = per.into_iter().map(|(k, (a, b))| (k, a, b)).collect();
    if s + f > 0 {
        out.push((Uuid::nil(), s, f));
    }
    out
}

/// A stored state as reported: a scheduled job whose time has come is `Ready`.
pub(crate) fn reported_state(stored: &str, due: bool) -> Result<JobState> {
    let state = JobState::parse(stored)
        .ok_or_else(|| Error::Storage(format!("unknown job state {stored:?}")))?;
    Ok(if state == JobState::Scheduled && due {
        JobState::Ready
    } else {
        state
    })
}

/// Folds `(queue, stored state, due, count)` rows, ordered by queue, into counts per
/// queue.
pub(crate) fn fold_counts(
    rows: impl IntoIterator<Item = Result<(String, String, bool, i64)>>,
) -> Result<Vec<QueueCounts>> {
    let mut out: Vec<QueueCounts> = Vec::new();
    for row in rows {
        let (queue, state, due, n) = row?;
        let state = reported_state(&state, due)?;
        if out.last().is_none_or(|c| c.queue != queue) {
            out.push(QueueCounts {
                queue,
                ..Default::default()
            });
        }
        if let Some(c) = out.last_mut() {
            c.add(state, n as u64);
        }
    }
    Ok(out)
}

/// The last `minutes` minutes, oldest first, the current one included: their starts in
/// ms since the epoch.
pub(crate) fn minute_window(now_ms: i64, minutes: u32) -> Vec<i64> {
    let current = minute_of(now_ms);
    let n = minutes.max(1) as i64;
    (0..n).map(|i| current - 60_000 * (n - 1 - i)).collect()
}

/// One stat per minute of `window`, filled from `(minute start ms, succeeded, failed)`
/// rows; minutes without a row count zero.
pub(crate) fn minute_stats(
    window: &[i64],
    rows: impl IntoIterator<Item = Result<(i64, i64, i64)>>,
) -> Result<Vec<MinuteStat>> {
    let mut stats: Vec<MinuteStat> = window
        .iter()
        .map(|m| MinuteStat {
            minute: DateTime::<Utc>::from_timestamp_millis(*m).unwrap_or_default(),
            succeeded: 0,
            failed: 0,
        })
        .collect();
    for row in rows {
        let (minute, succeeded, failed) = row?;
        if let Some(i) = window.iter().position(|m| *m == minute) {
            stats[i].succeeded = succeeded as u64;
            stats[i].failed = failed as u64;
        }
    }
    Ok(stats)
}
