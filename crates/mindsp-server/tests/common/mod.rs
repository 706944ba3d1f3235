//! Shared helpers for the server's tests: an app over a fresh SQLite file (and the job
//! queue in it), driven in-process through `tower::ServiceExt::oneshot`; a real SMTP
//! server in `smtp`.

#![allow(dead_code, unreachable_pub)]

pub mod smtp;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use mindsp_core::jobs::JobQueue;
use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_server::{AppState, HttpConfig, router};
use serde_json::{Value, json};
use tower::ServiceExt;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
pub const PASSWORD: &str = "Motdepasse-42";

pub struct TestApp {
    pub app: Router,
    pub store: Arc<dyn Store>,
    /// The SQL job queue in the store's database, the one the routes monitor.
    pub queue: Arc<dyn JobQueue>,
    dir: std::path::PathBuf,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    /// The stable error code of an error reply.
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("<no error code>")
    }
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with_config(HttpConfig::with_secret(SECRET)).await
    }

    pub async fn with_config(config: HttpConfig) -> Self {
        let dir = std::env::temp_dir().join(format!("mindsp-api-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("test.db").display());
        let store = mindsp_store::open(&url).await.unwrap();
        let queue = mindsp_queue::sql_queue(store.as_ref()).unwrap();
        let app = router(AppState::with_queue(store.clone(), queue.clone(), &config));
        Self {
            app,
            store,
            queue,
            dir,
        }
    }

    /// The SQLite file the app runs on.
    pub fn database(&self) -> std::path::PathBuf {
        self.dir.join("test.db")
    }

    /// The tenant of the user holding `token`.
    /// Every job of `tenant` (all queues, all states), newest change first.
    pub async fn jobs(&self, tenant: mindsp_core::TenantId) -> Vec<mindsp_core::jobs::Job> {
        self.queue
            .list(&mindsp_core::jobs::JobFilter {
                scope: mindsp_core::jobs::JobScope::Tenant(tenant),
                state: None,
                queue: None,
                before: None,
                limit: 1000,
            })
            .await
            .unwrap()
    }

    pub async fn tenant_of(&self, token: &str) -> mindsp_core::TenantId {
        let me = self.get("/api/me", token).await;
        assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
        me.body["user"]["tenant_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Creates a tenant with an admin; returns the admin's token.
    pub async fn tenant(&self, slug: &str) -> String {
        let t = self.store.create_tenant(slug, slug).await.unwrap();
        let mut tx = self.store.begin(t.id).await.unwrap();
        tx.insert_user(&NewUser {
            email: format!("admin@{slug}.fr"),
            display_name: format!("Admin {slug}"),
            role: Role::Admin,
            password_hash: mindsp_server::auth::hash_password(PASSWORD).unwrap(),
        })
        .await
        .unwrap();
        tx.commit().await.unwrap();
        self.login(slug, &format!("admin@{slug}.fr"), PASSWORD)
            .await
    }

    /// Creates a member through the admin route; returns (user id, token).
    pub async fn user(&self, admin: &str, slug: &str, name: &str) -> (String, String) {
        let email = format!("{}@{slug}.fr", name.to_lowercase().replace(' ', "."));
        let r = self
            .call(
                Method::POST,
                "/api/admin/users",
                Some(admin),
                Some(json!({"email": email, "display_name": name, "role": "member", "password": PASSWORD})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let id = r.body["user"]["id"].as_str().unwrap().to_owned();
        (id, self.login(slug, &email, PASSWORD).await)
    }

    pub async fn login(&self, slug: &str, email: &str, password: &str) -> String {
        let r = self
            .call(
                Method::POST,
                "/api/auth/login",
                None,
                Some(json!({"tenant": slug, "email": email, "password": password})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.raw(req).await
    }

    /// The whole response, headers included.
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub async fn response(&self, req: Request<Body>) -> axum::response::Response {
        self.app.clone().oneshot(req).await.unwrap()
    }

    pub async fn raw(&self, req: Request<Body>) -> Reply {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply { status, body }
    }

    pub async fn get(&self, uri: &str, token: &str) -> Reply {
        self.call(Method::GET, uri, Some(token), None).await
    }

    pub async fn post(&self, uri: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, uri, Some(token), Some(body)).await
    }

    /// A POST without a body.
    pub async fn post_empty(&self, uri: &str, token: &str) -> Reply {
        self.call(Method::POST, uri, Some(token), None).await
    }
}

impl TestApp {
    /// Like [`TestApp::new`], also answering the app's state (its notifier and
    /// training services, for tests that drive job handlers or a worker).
    pub async fn with_state() -> (Self, AppState) {
        let config = HttpConfig::with_secret(SECRET);
        let dir = std::env::temp_dir().join(format!("mindsp-api-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("test.db").display());
        let store = mindsp_store::open(&url).await.unwrap();
        let queue = mindsp_queue::sql_queue(store.as_ref()).unwrap();
        let state = AppState::with_queue(store.clone(), queue.clone(), &config);
        let app = router(state.clone());
        (
            Self {
                app,
                store,
                queue,
                dir,
            },
            state,
        )
    }

    /// A PUT with a JSON body.
    pub async fn put(&self, uri: &str, token: &str, body: Value) -> Reply {
        self.call(Method::PUT, uri, Some(token), Some(body)).await
    }

    /// A PATCH with a JSON body.
    pub async fn patch(&self, uri: &str, token: &str, body: Value) -> Reply {
        self.call(Method::PATCH, uri, Some(token), Some(body)).await
    }

    /// A DELETE without a body.
    pub async fn delete(&self, uri: &str, token: &str) -> Reply {
        self.call(Method::DELETE, uri, Some(token), None).await
    }

    /// A request with a raw (possibly malformed) JSON body.
    pub async fn send_text(&self, method: Method, uri: &str, token: &str, body: &str) -> Reply {
        self.raw(json_request(method, uri, token, body.to_owned()))
            .await
    }

    /// Creates a user of `role` through the admin route; returns (user id, token).
    pub async fn user_with_role(
        &self,
        admin: &str,
        slug: &str,
        name: &str,
        role: &str,
    ) -> (String, String) {
        let email = format!("{}@{slug}.fr", name.to_lowercase().replace(' ', "."));
        let r = self
            .call(
                Method::POST,
                "/api/admin/users",
                Some(admin),
                Some(json!({"email": email, "display_name": name, "role": role, "password": PASSWORD})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let id = r.body["user"]["id"].as_str().unwrap().to_owned();
        (id, self.login(slug, &email, PASSWORD).await)
    }
}

impl TestApp {
    /// Inserts `n` active members straight into the store (no password anyone can
    /// use, so no hashing): for tests that need many recipients but no tokens.
    pub async fn bulk_members(
        &self,
        tenant: mindsp_core::TenantId,
        slug: &str,
        n: usize,
    ) -> Vec<String> {
        let mut tx = self.store.begin(tenant).await.unwrap();
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let u = tx
                .insert_user(&NewUser {
                    email: format!("pompier{i:03}@{slug}.fr"),
                    display_name: format!("Sapeur {i:03}"),
                    role: Role::Member,
                    password_hash: "!".to_owned(),
                })
                .await
                .unwrap();
            ids.push(u.id.to_string());
        }
        tx.commit().await.unwrap();
        ids
    }
}

/// A request with a bearer token and a JSON body, given as text (possibly malformed).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn json_request(method: Method, uri: &str, token: &str, body: String) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}
