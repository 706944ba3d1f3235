//! Backends for the conformance suite: each test gets a fresh database.

#![allow(unreachable_pub)]

use std::sync::Arc;

use mindsp_core::ports::Store;

pub struct Backend {
    pub store: Arc<dyn Store>,
    cleanup: Cleanup,
}

enum Cleanup {
    File(std::path::PathBuf),
    Schema { url: String, schema: String },
}

impl Backend {
    /// A fresh SQLite file in the temporary directory.
    pub async fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("mindsp-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.db");
        let store = mindsp_store::sqlite::SqliteStore::open(
            mindsp_store::sqlite::SqliteConfig::file(path.to_string_lossy()),
        )
        .await
        .expect("open sqlite");
        Self {
            store: Arc::new(store),
            cleanup: Cleanup::File(dir),
        }
    }

    /// A fresh schema in the database `MINDSP_TEST_POSTGRES_URL` names, or `None` (with
    /// a line saying so) when it is not set.
    pub async fn postgres() -> Option<Self> {
        let Ok(url) = std::env::var("MINDSP_TEST_POSTGRES_URL") else {
            eprintln!("skipped: MINDSP_TEST_POSTGRES_URL is not set, PostgreSQL case not run");
            return None;
        };
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut config = mindsp_store::postgres::PgConfig::new(&url);
        config.schema = Some(schema.clone());
        let store = mindsp_store::postgres::PgStore::open(config)
            .await
            .expect("open postgres");
        Some(Self {
            store: Arc::new(store),
            cleanup: Cleanup::Schema { url, schema },
        })
    }

    /// Removes what the test created; only reached when the test passed, so a failing
    /// test leaves its database behind for inspection.
    pub async fn finish(self) {
        drop(self.store);
        match self.cleanup {
            Cleanup::File(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Schema { url, schema } => {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut c)
                        .await;
                }
            }
        }
    }
}
