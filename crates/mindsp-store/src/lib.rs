//! MindSP storage adapters for the ports of `mindsp-core`.
//!
//! - `sqlite` (default feature): one file, WAL, zero services.
//! - `postgres` (feature): PostgreSQL with row-level security as a second tenancy wall.
//!
//! [`open`] picks the backend from a URL, so switching profiles is configuration.

mod common;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::sync::Arc;

use mindsp_core::ports::Store;
use mindsp_core::{Error, Result};

/// Opens the store a URL names and runs its migrations:
/// `sqlite://path/to/file.db`, `sqlite::memory:`, or `postgres://...`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        #[cfg(feature = "sqlite")]
        {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or(path);
            let config = if path == ":memory:" || path.is_empty() {
                sqlite::SqliteConfig::memory()
            } else {
                sqlite::SqliteConfig::file(path)
            };
            return Ok(Arc::new(sqlite::SqliteStore::open(config).await?));
        }
        #[cfg(not(feature = "sqlite"))]
        {
            let _ = rest;
            return Err(Error::Storage("built without the `sqlite` feature".into()));
        }
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        {
            let config = postgres::PgConfig::new(url);
            return Ok(Arc::new(postgres::PgStore::open(config).await?));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(Error::Storage(
            "built without the `postgres` feature".into(),
        ));
    }
    Err(Error::Storage(format!(
        "unsupported database URL {url:?}: expected sqlite://FILE, sqlite::memory: or postgres://..."
    )))
}
