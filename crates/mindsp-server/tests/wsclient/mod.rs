//! Helpers for the WebSocket tests: a real server on 127.0.0.1 (in this process, over a
//! fresh SQLite file), REST calls through reqwest, and a tokio-tungstenite client.

#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, TenantId, UserId};
use mindsp_server::{AppState, HttpConfig, router};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
pub const PASSWORD: &str = "Motdepasse-42";
/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(15);
/// How long a test watches for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(600);

pub struct Server {
    pub addr: std::net::SocketAddr,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn config() -> HttpConfig {
    HttpConfig::with_secret(SECRET)
}

/// A person logged in: ids and token.
#[derive(Clone)]
pub struct Person {
    pub id: String,
    pub token: String,
    pub actor: Actor,
}

impl Server {
    pub async fn start(config: HttpConfig) -> Self {
        Self::start_with(config, mindsp_server::ConnectionLimits::default()).await
    }

    pub async fn start_with(config: HttpConfig, limits: mindsp_server::ConnectionLimits) -> Self {
        let dir = std::env::temp_dir().join(format!("mindsp-ws-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(dir, config, limits).await
    }

    /// Stops this server and starts another on the same database, as a restart does:
    /// whatever the server kept in memory (presence among it) starts over.
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub async fn restart(mut self, config: HttpConfig) -> Self {
        let dir = std::mem::take(&mut self.dir);
        drop(self);
        Self::start_in(dir, config, mindsp_server::ConnectionLimits::default()).await
    }

    async fn start_in(
        dir: std::path::PathBuf,
        config: HttpConfig,
        limits: mindsp_server::ConnectionLimits,
    ) -> Self {
        let url = format!("sqlite://{}", dir.join("test.db").display());
        let store = mindsp_store::open(&url).await.unwrap();
        let state = AppState::new(store.clone(), &config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let hub = state.realtime.hub().clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
                hub.shutdown();
            };
            let grace = Duration::from_secs(1);
            let _ = mindsp_server::serve_with(listener, app, shutdown, grace, limits).await;
        });
        Self {
            addr,
            state,
            store,
            http: reqwest::Client::new(),
            stop: Some(tx),
            dir,
        }
    }

    /// A connection of its own to the SQLite file the server runs on (to lock it, or
    /// break it, for a moment).
    pub async fn database_connection(&self) -> sqlx::SqliteConnection {
        use sqlx::Connection;
        let url = format!("sqlite://{}", self.dir.join("test.db").display());
        sqlx::SqliteConnection::connect(&url).await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        let (s, v) = self
            .call(reqwest::Method::POST, path, token, Some(body))
            .await;
        assert!(s < 300, "POST {path}: {s} {v}");
        v
    }

    pub async fn get(&self, path: &str, token: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, path, token, None).await;
        assert!(s < 300, "GET {path}: {s} {v}");
        v
    }

    pub async fn login(&self, slug: &str, email: &str) -> String {
        let v: Value = self
            .http
            .post(self.url("/api/auth/login"))
            .json(&json!({"tenant": slug, "email": email, "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["access_token"].as_str().expect("token").to_owned()
    }

    async fn person(&self, token: String) -> Person {
        let me = self.get("/api/me", &token).await;
        let u = &me["user"];
        Person {
            id: u["id"].as_str().unwrap().to_owned(),
            actor: Actor {
                tenant_id: u["tenant_id"]
                    .as_str()
                    .unwrap()
                    .parse::<TenantId>()
                    .unwrap(),
                user_id: u["id"].as_str().unwrap().parse::<UserId>().unwrap(),
                role: serde_json::from_value::<Role>(u["role"].clone()).unwrap(),
            },
            token,
        }
    }

    /// A tenant with its admin.
    pub async fn tenant(&self, slug: &str) -> Person {
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
        let token = self.login(slug, &format!("admin@{slug}.fr")).await;
        self.person(token).await
    }

    /// A member of the admin's tenant.
    pub async fn user(&self, admin: &Person, slug: &str, name: &str) -> Person {
        let email = format!("{}@{slug}.fr", name.to_lowercase());
        self.post(
            "/api/admin/users",
            &admin.token,
            json!({"email": email, "display_name": name, "role": "member", "password": PASSWORD}),
        )
        .await;
        let token = self.login(slug, &email).await;
        self.person(token).await
    }

    /// A group owned by `owner` with `members`; its id.
    pub async fn group(&self, owner: &Person, members: &[&Person]) -> String {
        let ids: Vec<&str> = members.iter().map(|p| p.id.as_str()).collect();
        let v = self
            .post(
                "/api/conversations",
                &owner.token,
                json!({"kind": "group", "name": "CIS Aix — garde", "member_ids": ids}),
            )
            .await;
        v["conversation"]["id"].as_str().unwrap().to_owned()
    }

    /// Connects `who` and waits until the server has registered the connection for
    /// live events (it answers commands only after): what is published afterwards
    /// reaches it. The upgrade alone returns a moment before that.
    pub async fn connect(&self, who: &Person) -> Client {
        let mut c = Client::connect(&self.ws_url(&who.token)).await;
        c.ok("ping", json!({})).await;
        c
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that keeps the frames it skipped while waiting for others.
pub struct Client {
    pub ws: Ws,
    pending: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        match Self::try_connect(url).await {
            Ok(c) => c,
            Err((status, body)) => panic!("websocket refused: {status} {body}"),
        }
    }

    /// The HTTP answer to an upgrade that must be refused: (status, body).
    pub async fn refused(req: impl IntoClientRequest + Unpin) -> (u16, Value) {
        match Self::try_connect(req).await {
            Ok(_) => panic!("the upgrade was accepted"),
            Err(answer) => answer,
        }
    }

    /// A connection, or the HTTP answer (status, body) that refused the upgrade.
    pub async fn try_connect(req: impl IntoClientRequest + Unpin) -> Result<Self, (u16, Value)> {
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => {
                assert_eq!(resp.status(), 101);
                Ok(Self {
                    ws,
                    pending: VecDeque::new(),
                    next_id: 1,
                })
            }
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends a command; returns its id.
    pub async fn command(&mut self, kind: &str, mut body: Value) -> Value {
        let id = json!(format!("c{}", self.next_id));
        self.next_id += 1;
        body["v"] = json!(1);
        body["type"] = json!(kind);
        body["id"] = id.clone();
        self.send_raw(&body.to_string()).await;
        id
    }

    /// Sends a command and waits for its ack or error; events meanwhile are kept.
    pub async fn call(&mut self, kind: &str, body: Value) -> Value {
        let id = self.command(kind, body).await;
        self.reply_to(&id).await
    }

    /// Like `call`, asserting an ack.
    pub async fn ok(&mut self, kind: &str, body: Value) -> Value {
        let r = self.call(kind, body).await;
        assert_eq!(r["type"], "ack", "{kind}: {r}");
        r
    }

    pub async fn reply_to(&mut self, id: &Value) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = self
                .read_frame(deadline)
                .await
                .unwrap_or_else(|| panic!("no reply to {id}"));
            if (f["type"] == "ack" || f["type"] == "error") && f["id"] == *id {
                return f;
            }
            self.pending.push_back(f);
        }
    }

    /// The next frame from the socket; `None` at the deadline. Panics on close.
    async fn read_frame(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    assert_eq!(v["v"], 1, "{v}");
                    return Some(v);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next frame of any type (kept ones first).
    pub async fn next_any(&mut self) -> Value {
        if let Some(f) = self.pending.pop_front() {
            return f;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        self.read_frame(deadline).await.expect("a frame arrives")
    }

    /// The next frame of type `kind` (skipping and keeping others), within `WAIT`.
    pub async fn next(&mut self, kind: &str) -> Value {
        self.next_where(kind, |_| true).await
    }

    /// The next frame of type `kind` that satisfies `pred`.
    pub async fn next_where(&mut self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self
            .pending
            .iter()
            .position(|f| f["type"] == kind && pred(f))
        {
            return self.pending.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = self
                .read_frame(deadline)
                .await
                .unwrap_or_else(|| panic!("no {kind} frame arrived"));
            if f["type"] == kind && pred(&f) {
                return f;
            }
            self.pending.push_back(f);
        }
    }

    /// Every frame that arrives within `QUIET` (and those kept), except presence.
    pub async fn quiet_except_presence(&mut self) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Some(f) = self.read_frame(deadline).await {
            self.pending.push_back(f);
        }
        self.pending
            .drain(..)
            .filter(|f| f["type"] != "presence")
            .collect()
    }

    /// Every frame that arrives within `QUIET`, kept ones included.
    pub async fn drain(&mut self) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Some(f) = self.read_frame(deadline).await {
            self.pending.push_back(f);
        }
        self.pending.drain(..).collect()
    }

    /// Reads (discarding frames) until the server closes; the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("the server did not close the connection"),
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return None,
            }
        }
    }
}

impl Server {
    /// A POST without a body, asserting success.
    pub async fn post_empty_json(&self, path: &str, token: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::POST, path, token, None).await;
        assert!(s < 300, "POST {path}: {s} {v}");
        v
    }
}
