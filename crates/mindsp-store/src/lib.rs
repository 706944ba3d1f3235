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

/// What a database URL names. Parsed in one place so that every user of a URL (the
/// store, the server's choice of where to keep its token secret) agrees on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseUrl<'a> {
    /// `sqlite://path`, `sqlite:path`: a file (query parameters are ignored).
    SqliteFile(&'a str),
    /// `sqlite::memory:`, `sqlite://:memory:`: a private in-memory database.
    SqliteMemory,
    /// `postgres://...` or `postgresql://...`, passed on as it is.
    Postgres(&'a str),
}

impl<'a> DatabaseUrl<'a> {
    /// Parses a database URL.
    pub fn parse(url: &'a str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or(path);
            return Ok(if path.is_empty() || path == ":memory:" {
                DatabaseUrl::SqliteMemory
            } else {
                DatabaseUrl::SqliteFile(path)
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url));
        }
        Err(Error::Storage(format!(
            "unsupported database URL {url:?}: expected sqlite://FILE, sqlite::memory: or postgres://..."
        )))
    }
}

/// Opens the store a URL names (see [`DatabaseUrl`]) and runs its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    match DatabaseUrl::parse(url)? {
        #[cfg(feature = "sqlite")]
        DatabaseUrl::SqliteFile(path) => Ok(Arc::new(
            sqlite::SqliteStore::open(sqlite::SqliteConfig::file(path)).await?,
        )),
        #[cfg(feature = "sqlite")]
        DatabaseUrl::SqliteMemory => Ok(Arc::new(
            sqlite::SqliteStore::open(sqlite::SqliteConfig::memory()).await?,
        )),
        #[cfg(feature = "postgres")]
        DatabaseUrl::Postgres(url) => Ok(Arc::new(
            postgres::PgStore::open(postgres::PgConfig::new(url)).await?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(Error::Storage(format!(
            "built without the feature for {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::DatabaseUrl;

    #[test]
    fn urls_name_one_thing() {
        use DatabaseUrl::*;
        for (url, want) in [
            ("sqlite://data/mindsp.db", SqliteFile("data/mindsp.db")),
            ("sqlite:mindsp.db?mode=rwc", SqliteFile("mindsp.db")),
            (
                "sqlite:///var/lib/mindsp.db",
                SqliteFile("/var/lib/mindsp.db"),
            ),
            ("sqlite::memory:", SqliteMemory),
            ("sqlite://:memory:", SqliteMemory),
            ("postgres://u@h/db", Postgres("postgres://u@h/db")),
        ] {
            assert_eq!(DatabaseUrl::parse(url).unwrap(), want, "{url}");
        }
        assert!(DatabaseUrl::parse("mysql://x").is_err());
    }
}
