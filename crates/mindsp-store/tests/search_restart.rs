//! Crash safety of PostgreSQL's full-text index, which appends leave to a background
//! step: a message committed but not indexed yet (the process stopped first) is found by
//! a search after a restart, and indexed by the background step of the reopened store.
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
