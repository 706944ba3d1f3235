//! Backends for the queue conformance suite: each test gets a fresh database, schema
//! or Redis key prefix, so runs never interfere.

#![allow(unreachable_pub, dead_code)]

use std::sync::Arc;

use mindsp_core::jobs::JobQueue;
use mindsp_core::ports::Store;

pub struct Backend {
    pub name: &'static str,
    pub queue: Arc<dyn JobQueue>,
    /// The store sharing the queue's database, for SQL backends.
    pub store: Option<Arc<dyn Store>>,
    cleanup: Cleanup,
}

enum Cleanup {
    File(std::path::PathBuf),
    Schema { url: String, schema: String },
    Redis(mindsp_queue::redis::RedisQueue),
}

impl Backend {
    /// A fresh SQLite file in the temporary directory.
    pub async fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("mindsp-qtest-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.db");
        let store = mindsp_store::sqlite::SqliteStore::open(
            mindsp_store::sqlite::SqliteConfig::file(path.to_string_lossy()),
        )
        .await
        .expect("open sqlite");
        let queue = mindsp_queue::sqlite::SqliteQueue::new(&store);
        Self {
            name: "sqlite",
            queue: Arc::new(queue),
            store: Some(Arc::new(store)),
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
        let schema = format!("qtest_{}", uuid::Uuid::new_v4().simple());
        let mut config = mindsp_store::postgres::PgConfig::new(&url);
        config.schema = Some(schema.clone());
        let store = mindsp_store::postgres::PgStore::open(config)
            .await
            .expect("open postgres");
        let queue = mindsp_queue::postgres::PgQueue::new(&store);
        Some(Self {
            name: "postgres",
            queue: Arc::new(queue),
            store: Some(Arc::new(store)),
            cleanup: Cleanup::Schema { url, schema },
        })
    }

    /// A fresh key prefix in the Redis `MINDSP_TEST_REDIS_URL` names, or `None` (with a
    /// line saying so) when it is not set.
    pub async fn redis() -> Option<Self> {
        let Ok(url) = std::env::var("MINDSP_TEST_REDIS_URL") else {
            eprintln!("skipped: MINDSP_TEST_REDIS_URL is not set, Redis case not run");
            return None;
        };
        let prefix = format!("{{mindsp-test-{}}}:", uuid::Uuid::new_v4().simple());
        let queue = mindsp_queue::redis::RedisQueue::connect(&url, &prefix)
            .await
            .expect("connect redis");
        Some(Self {
            name: "redis",
            queue: Arc::new(queue.clone()),
            store: None,
            cleanup: Cleanup::Redis(queue),
        })
    }

    /// Removes what the test created; only reached when the test passed, so a failing
    /// test leaves its data behind for inspection.
    pub async fn finish(self) {
        drop(self.queue);
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
            Cleanup::Redis(queue) => {
                let _ = queue.purge().await;
            }
        }
    }
}
