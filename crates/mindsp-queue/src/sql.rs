//! What the SQLite and PostgreSQL queues share: error mapping, scopes, error texts.

use mindsp_core::error::{Error, Result};
use mindsp_core::ids::TenantId;
use mindsp_core::jobs::NewJob;
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
