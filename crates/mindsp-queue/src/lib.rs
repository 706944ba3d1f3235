//! MindSP durable job queue: backends for the [`JobQueue`] port of `mindsp-core`, the
//! worker runtime that runs handlers, and e-mail delivery through lettre.
//!
//! - `sqlite` (default feature), `postgres`: jobs in the same database as the messages,
//!   so a job can be enqueued in the transaction of the change that caused it.
//! - `redis` (feature): jobs in Redis through `fred`, moved by Lua scripts.
//! - [`worker`]: handlers per kind, leases renewed while they run, retries with
//!   backoff, repeating schedules, graceful shutdown.
//! - [`mail`]: SMTP and file-drop mailers, French templates, the `email.send` handler.

pub use mindsp_core::jobs::*;

pub mod mail;
pub mod notify;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod worker;

use std::sync::Arc;

use mindsp_core::ports::Store;
use mindsp_core::{Error, Result};

/// Opens the job queue a URL names: `sql` (or an empty string) for tables in the
/// store's own database, `redis://...` for Redis (with the `redis` feature), keys
/// under `prefix`.
pub async fn open(url: &str, store: &dyn Store, prefix: &str) -> Result<Arc<dyn JobQueue>> {
    if url.is_empty() || url == "sql" {
        return sql_queue(store);
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        return Ok(Arc::new(redis::RedisQueue::connect(url, prefix).await?));
        #[cfg(not(feature = "redis"))]
        return Err(Error::Storage(format!(
            "built without the redis feature; cannot open {prefix}queue at a Redis URL"
        )));
    }
    Err(Error::Storage(format!(
        "unsupported queue URL {url:?}: expected sql or redis://..."
    )))
}

/// The SQL queue in `store`'s database, whichever backend it is.
pub fn sql_queue(store: &dyn Store) -> Result<Arc<dyn JobQueue>> {
    #[cfg(feature = "sqlite")]
    if let Some(s) = store
        .as_any()
        .downcast_ref::<mindsp_store::sqlite::SqliteStore>()
    {
        return Ok(Arc::new(sqlite::SqliteQueue::new(s)));
    }
    #[cfg(feature = "postgres")]
    if let Some(s) = store
        .as_any()
        .downcast_ref::<mindsp_store::postgres::PgStore>()
    {
        return Ok(Arc::new(postgres::PgQueue::new(s)));
    }
    let _ = store;
    Err(Error::Storage(
        "this store has no SQL job queue; configure a Redis queue".into(),
    ))
}
