//! Crash safety of the full-text index, which appends leave to a background step on both
//! backends: a message committed but not indexed yet (the process stopped first) is
//! found by a search after a restart, and indexed by the background step of the
//! reopened store. On SQLite the index is a file of its own: deleted, or left beside a
//! database restored from an older copy, it is rebuilt from the messages.
//!
//! The unindexed message is written with raw SQL while no store is open, which leaves
//! the database as a process killed between a commit and its indexing does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, ConversationId, Limits, Messaging, TenantId, UserId};
use uuid::Uuid;

/// A tenant with two users in one group, and the group's first message, sent normally.
struct Setup {
    tenant: TenantId,
    sender: UserId,
    reader: Actor,
    outsider: Actor,
    conv: ConversationId,
}

async fn setup(store: Arc<dyn Store>) -> Setup {
    let svc = Messaging::new(store.clone(), Limits::default());
    let mut actors = Vec::new();
    for slug in ["sdis13", "sdis83"] {
        let tenant = store
            .create_tenant(slug, &format!("SDIS {slug}"))
            .await
            .unwrap();
        let mut tx = store.begin(tenant.id).await.unwrap();
        let admin = tx
            .insert_user(&user(&format!("admin@{slug}.fr"), Role::Admin))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let admin = Actor {
            tenant_id: tenant.id,
            user_id: admin.id,
            role: Role::Admin,
        };
        let u = svc
            .create_user(&admin, user(&format!("user@{slug}.fr"), Role::Member))
            .await
            .unwrap();
        actors.push((
            admin,
            Actor {
                tenant_id: tenant.id,
                user_id: u.id,
                role: Role::Member,
            },
        ));
    }
    let (admin, reader) = actors[0];
    let g = svc
        .create_group(&admin, "Garde", &[reader.user_id])
        .await
        .unwrap();
    svc.send(&admin, g.id, "Prise de garde", None)
        .await
        .unwrap();
    Setup {
        tenant: admin.tenant_id,
        sender: admin.user_id,
        reader,
        outsider: actors[1].1,
        conv: g.id,
    }
}

fn user(email: &str, role: Role) -> NewUser {
    NewUser {
        email: email.into(),
        display_name: email.into(),
        role,
        password_hash: "not-a-real-hash".into(),
    }
}

async fn found(store: Arc<dyn Store>, who: &Actor, word: &str) -> usize {
    Messaging::new(store, Limits::default())
        .search(who, word, None, 0, None)
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_indexes_after_a_restart() {
    use mindsp_store::postgres::{PgConfig, PgStore};
    use sqlx::Connection;

    let Ok(url) = std::env::var("MINDSP_TEST_POSTGRES_URL") else {
        eprintln!("skipped: MINDSP_TEST_POSTGRES_URL is not set, PostgreSQL case not run");
        return;
    };
    let schema = format!("test_{}", Uuid::new_v4().simple());
    let open = || async {
        let mut config = PgConfig::new(&url);
        config.schema = Some(schema.clone());
        PgStore::open(config).await.unwrap()
    };
    let store = open().await;
    let s = setup(Arc::new(store.clone())).await;
    store.close().await;
    drop(store);

    // Committed while no store runs (as the connecting role, outside the serving role's
    // row-level security): the trigger queues it, nothing moves it into the index.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("SET search_path TO {schema}"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, created_at)
         VALUES ($1, $2, $3, $4, 2, 'Fuite de gaz rue Paradis', now())",
    )
    .bind(Uuid::now_v7())
    .bind(s.tenant.0)
    .bind(s.conv.0)
    .bind(s.sender.0)
    .execute(&mut admin)
    .await
    .unwrap();
    // (The first message may still wait too: the store was closed before its step ran.)
    assert!(pending_count(&mut admin).await >= 1);

    // Pending messages are matched in the transaction's tenant only.
    for (tenant, expected) in [(s.tenant, 1i64), (s.outsider.tenant_id, 0)] {
        let mut tx = admin.begin().await.unwrap();
        sqlx::query("SELECT set_config('mindsp.tenant_id', $1, true)")
            .bind(tenant.0.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM mindsp_search(to_tsquery('mindsp_french', 'gaz'), $1, NULL, 10, 0, 100)",
        )
        .bind(s.reader.user_id.0)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(n, expected, "pending message seen from tenant {tenant:?}");
        tx.rollback().await.unwrap();
    }

    // The reopened store finds it, and its background step moves it into the index.
    let store = Arc::new(open().await);
    assert_eq!(found(store.clone(), &s.reader, "gaz").await, 1);
    assert_eq!(found(store.clone(), &s.outsider, "gaz").await, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending_count(&mut admin).await > 0 {
        assert!(Instant::now() < deadline, "not indexed in the background");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let indexed: i64 = sqlx::query_scalar("SELECT count(*) FROM message_search")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(indexed, 2);
    assert_eq!(found(store.clone(), &s.reader, "gaz").await, 1);
    store.close().await;
    drop(store);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await
        .unwrap();
}

async fn pending_count(admin: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM message_search_pending")
        .fetch_one(admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_indexes_after_a_restart_and_rebuilds_a_lost_or_stale_index() {
    use mindsp_store::sqlite::{SqliteConfig, SqliteStore};
    use sqlx::Connection;

    let dir = std::env::temp_dir().join(format!("mindsp-search-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("mindsp.db");
    let db_path = db.to_str().unwrap().to_owned();
    let index_path = format!("{db_path}-search");
    let open = || async {
        SqliteStore::open(SqliteConfig::file(&db_path))
            .await
            .unwrap()
    };
    // The last message the index file holds, read from the file itself.
    let indexed_upto = || async {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{index_path}?mode=ro"))
            .await
            .unwrap();
        let pk: i64 = sqlx::query_scalar("SELECT last_pk FROM index_state")
            .fetch_one(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        pk
    };
    let wait_indexed = |upto: i64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while indexed_upto().await < upto {
            assert!(Instant::now() < deadline, "not indexed in the background");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Appends a message with raw SQL while no store is open (the trigger numbers it).
    let insert = |seq: i64, content: &'static str, s: (TenantId, ConversationId, UserId)| {
        let db_path = db_path.clone();
        async move {
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{db_path}"))
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, 0)",
            )
            .bind(Uuid::now_v7())
            .bind(s.0.0)
            .bind(s.1.0)
            .bind(s.2.0)
            .bind(seq)
            .bind(content)
            .execute(&mut c)
            .await
            .unwrap();
            c.close().await.unwrap();
        }
    };

    // A first message, indexed in the background without any search asking.
    let store = open().await;
    let s = setup(Arc::new(store.clone())).await;
    let ids = (s.tenant, s.conv, s.sender);
    wait_indexed(1).await;
    store.close().await;
    drop(store);
    let backup = dir.join("backup.db");
    std::fs::copy(&db, &backup).unwrap();

    // Committed while no store runs: the reopened store finds it and indexes it.
    insert(2, "Fuite de gaz rue Paradis", ids).await;
    assert_eq!(indexed_upto().await, 1);
    let store = Arc::new(open().await);
    wait_indexed(2).await;
    assert_eq!(found(store.clone(), &s.reader, "gaz").await, 1);
    assert_eq!(found(store.clone(), &s.outsider, "gaz").await, 0);
    assert_eq!(found(store.clone(), &s.reader, "garde").await, 1);
    close_sqlite(store).await;

    // The index file is lost: it is rebuilt from the messages.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{index_path}{suffix}"));
    }
    let store = Arc::new(open().await);
    assert_eq!(found(store.clone(), &s.reader, "gaz").await, 1);
    assert_eq!(found(store.clone(), &s.reader, "garde").await, 1);
    close_sqlite(store).await;

    // The database goes back to the copy taken before the gas leak, and another message
    // takes the gas leak's place (the same `pk`); the newer index file stays. The store
    // sees that the index does not belong to these messages and rebuilds it, so the old
    // words do not point at the new message.
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db_path}{suffix}"));
    }
    std::fs::copy(&backup, &db).unwrap();
    insert(2, "Exercice incendie au centre de secours", ids).await;
    let store = Arc::new(open().await);
    assert_eq!(found(store.clone(), &s.reader, "gaz").await, 0);
    assert_eq!(found(store.clone(), &s.reader, "incendie").await, 1);
    assert_eq!(found(store.clone(), &s.reader, "garde").await, 1);
    close_sqlite(store).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn close_sqlite(store: Arc<dyn Store>) {
    store
        .as_any()
        .downcast_ref::<mindsp_store::sqlite::SqliteStore>()
        .unwrap()
        .close()
        .await;
}
