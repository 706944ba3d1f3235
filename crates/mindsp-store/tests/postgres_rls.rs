//! Row-level security on PostgreSQL: the second tenancy wall holds for the role the
//! server's queries really run as, even for SQL that forgets the tenant filter.
//! Needs `MINDSP_TEST_POSTGRES_URL`; without it the test says it was skipped.

use mindsp_core::model::now;
use mindsp_core::model::{NewUser, Role};
use mindsp_core::notify::{Notification, NotificationPrefs};
use mindsp_core::ports::Store;
use mindsp_core::training::{SessionStatus, TrainingSession};
use mindsp_core::{Actor, Limits, Messaging};
use mindsp_core::{NotificationId, SessionId};
use mindsp_store::postgres::{PgConfig, PgStore};
use sqlx::Row;

/// The tables of migration 0004, each with one row per tenant in this test.
const NEW_TABLES: [&str; 7] = [
    "notifications",
    "notification_counters",
    "notification_prefs",
    "tenant_settings",
    "digest_state",
    "training_sessions",
    "training_invitees",
];

/// A raw transaction on the serving pool with `tenant` set, as the store's own do.
async fn scoped(
    pool: &sqlx::PgPool,
    tenant: mindsp_core::TenantId,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('mindsp.tenant_id', $1, true)")
        .bind(tenant.0.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

#[tokio::test]
async fn rls_hides_other_tenants_from_unfiltered_queries() {
    let Ok(url) = std::env::var("MINDSP_TEST_POSTGRES_URL") else {
        eprintln!("skipped: MINDSP_TEST_POSTGRES_URL is not set, row-level security not tested");
        return;
    };
    let schema = format!("test_rls_{}", uuid::Uuid::new_v4().simple());
    let mut config = PgConfig::new(&url);
    config.schema = Some(schema.clone());
    // The same constructor `mindsp_store::open` uses for the server.
    let store = std::sync::Arc::new(PgStore::open(config).await.unwrap());

    // The connecting role in CI is the superuser `postgres`; the serving connections
    // must not run as it.
    let (role, bypasses) = store.app_role_check().await.unwrap();
    assert!(!bypasses, "serving role {role} bypasses row-level security");

    // Two tenants with a conversation and a message each.
    let svc = Messaging::new(store.clone(), Limits::default());
    let mut tenants = Vec::new();
    for slug in ["sdis13", "sdis83"] {
        let t = store.create_tenant(slug, slug).await.unwrap();
        let mut tx = store.begin(t.id).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..2 {
            ids.push(
                tx.insert_user(&NewUser {
                    email: format!("u{i}@{slug}.fr"),
                    display_name: format!("U{i}"),
                    role: Role::Member,
                    password_hash: "x".into(),
                })
                .await
                .unwrap()
                .id,
            );
        }
        tx.commit().await.unwrap();
        let me = Actor {
            tenant_id: t.id,
            user_id: ids[0],
            role: Role::Member,
        };
        let g = svc.create_group(&me, "Garde", &[ids[1]]).await.unwrap();
        svc.send(&me, g.id, &format!("secret de {slug}"), None)
            .await
            .unwrap();
        // A notification, preferences, a digest mark and a training session with an
        // invitee: a row in every table of migration 0004.
        let mut tx = store.begin(t.id).await.unwrap();
        tx.insert_notifications(&[Notification {
            id: NotificationId::new(),
            user_id: ids[1],
            kind: "SYSTEM".into(),
            title: format!("alerte de {slug}"),
            body: String::new(),
            link: None,
            data: serde_json::json!({}),
            key: None,
            created_at: now(),
            read_at: None,
        }])
        .await
        .unwrap();
        tx.set_user_notification_prefs(ids[1], &NotificationPrefs::default())
            .await
            .unwrap();
        tx.set_tenant_notification_prefs(&NotificationPrefs::default())
            .await
            .unwrap();
        tx.set_digest_sent(ids[1], now()).await.unwrap();
        let session = TrainingSession {
            id: SessionId::new(),
            title: format!("FMPA de {slug}"),
            kind: "ari".into(),
            description: String::new(),
            location: "CS".into(),
            start_at: now(),
            end_at: now() + chrono::TimeDelta::hours(1),
            organizer_id: ids[0],
            status: SessionStatus::Scheduled,
            reminder_offsets: vec![60],
            cancel_reason: None,
            created_at: now(),
            updated_at: now(),
        };
        tx.insert_session(&session).await.unwrap();
        tx.add_invitees(session.id, &[ids[1]]).await.unwrap();
        tx.commit().await.unwrap();
        tenants.push(t.id);
    }
    let (a, b) = (tenants[0], tenants[1]);
    let pool = store.pool();

    // No tenant set: nothing at all is visible.
    for table in ["users", "conversations", "conversation_members", "messages"]
        .into_iter()
        .chain(NEW_TABLES)
    {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} visible without a tenant");
    }

    // The search index sits outside row-level security (so it can use its GIN index):
    // the serving role cannot read it, only call the function that applies the tenant.
    let denied = sqlx::query("SELECT count(*) FROM message_search")
        .fetch_one(pool)
        .await;
    assert!(
        denied.is_err(),
        "message_search must not be readable directly"
    );
    // Nor can it read the messages waiting to be indexed.
    let denied = sqlx::query("SELECT count(*) FROM message_search_pending")
        .fetch_one(pool)
        .await;
    assert!(
        denied.is_err(),
        "message_search_pending must not be readable directly"
    );
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mindsp_search(to_tsquery('mindsp_french', 'secret'), NULL, NULL, 10, 0, 100)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(found, 0, "no tenant set: the search function finds nothing");

    // Tenant A set, queries without any tenant filter: only A's rows.
    let mut tx = scoped(pool, a).await;
    let rows = sqlx::query("SELECT tenant_id, content FROM messages")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<String, _>("content"), "secret de sdis13");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(users, 2);
    // Unfiltered writes touch only A's rows.
    let updated = sqlx::query("UPDATE messages SET content = 'écrasé'")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(updated, 1);
    let deleted = sqlx::query("DELETE FROM conversation_members WHERE tenant_id = $1")
        .bind(b.0)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 0, "B's memberships are out of reach");
    tx.rollback().await.unwrap();

    // The same for the tables of migration 0004: A's one row each, nothing of B's.
    let mut tx = scoped(pool, a).await;
    for table in NEW_TABLES {
        let (n, others): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE tenant_id <> $1) FROM {table}"
        ))
        .bind(a.0)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!((n, others), (1, 0), "{table} scoped to A");
    }
    let title: String = sqlx::query_scalar("SELECT title FROM notifications")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(title, "alerte de sdis13");
    for table in NEW_TABLES {
        let updated = sqlx::query(&format!(
            "UPDATE {table} SET tenant_id = tenant_id WHERE tenant_id = $1"
        ))
        .bind(b.0)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(updated, 0, "B's {table} rows are out of reach");
        let deleted = sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = $1"))
            .bind(b.0)
            .execute(&mut *tx)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(deleted, 0, "B's {table} rows cannot be deleted");
    }
    tx.rollback().await.unwrap();
    // Moving A's rows to B, or writing a row for B, is refused.
    for table in NEW_TABLES {
        let mut tx = scoped(pool, a).await;
        let forged = sqlx::query(&format!("UPDATE {table} SET tenant_id = $1"))
            .bind(b.0)
            .execute(&mut *tx)
            .await;
        assert!(
            forged.is_err(),
            "moving {table} rows to another tenant must fail"
        );
        tx.rollback().await.unwrap();
    }
    let mut tx = scoped(pool, a).await;
    let forged = sqlx::query(
        "INSERT INTO tenant_settings (tenant_id, notification_prefs, updated_at)
         VALUES ($1, '{}', now())",
    )
    .bind(b.0)
    .execute(&mut *tx)
    .await;
    assert!(forged.is_err(), "writing B's settings from A must fail");
    tx.rollback().await.unwrap();

    // Writing a row that claims tenant B while scoped to A is refused.
    let mut tx = scoped(pool, a).await;
    let forged = sqlx::query("UPDATE users SET tenant_id = $1")
        .bind(b.0)
        .execute(&mut *tx)
        .await;
    assert!(forged.is_err(), "moving rows to another tenant must fail");
    tx.rollback().await.unwrap();

    // B's message is untouched.
    let mut tx = store.read(b).await.unwrap();
    let b_user = tx.list_users(None, 10).await.unwrap()[0].id;
    let convs = tx.list_conversations(b_user, None, 10).await.unwrap();
    assert_eq!(
        convs[0].last_message.as_ref().unwrap().content,
        "secret de sdis83"
    );
    let mut n = 0;
    for u in tx.list_users(None, 10).await.unwrap() {
        n += tx.notifications(u.id, None, false, 10).await.unwrap().len();
    }
    assert_eq!(n, 1, "B's notification is untouched");
    drop(tx);

    store.close().await;
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut c)
        .await
        .unwrap();
}
