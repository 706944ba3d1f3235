//! Row-level security on PostgreSQL: the second tenancy wall holds for the role the
//! server's queries really run as, even for SQL that forgets the tenant filter.
//! Needs `MINDSP_TEST_POSTGRES_URL`; without it the test says it was skipped.

use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, Limits, Messaging};
use mindsp_store::postgres::{PgConfig, PgStore};
use sqlx::Row;

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
        tenants.push(t.id);
    }
    let (a, b) = (tenants[0], tenants[1]);
    let pool = store.pool();

    // No tenant set: nothing at all is visible.
    for table in ["users", "conversations", "conversation_members", "messages"] {
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
