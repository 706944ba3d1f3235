//! The scaled profile as users see it: two `mindsp-server` processes sharing one
//! PostgreSQL database (created for the test, dropped after) and one Redis (a fresh key
//! prefix per test), real WebSocket clients on each node.
//!
//! Needs both `MINDSP_TEST_POSTGRES_URL` and `MINDSP_TEST_REDIS_URL`; skipped (with a
//! message) otherwise.

#[path = "../../mindsp-realtime/tests/support/private_redis.rs"]
mod private_redis;
mod wsclient;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fred::interfaces::{ClientLike, LuaInterface};
use mindsp_core::model::{NewUser, Role};
use private_redis::PrivateRedis;
use serde_json::{Value, json};
use sqlx::Connection;
use wsclient::{Client, PASSWORD};

const SECRET: &str = "multinode-secret-multinode-secret-!!";
/// Heartbeat and window of presence in these tests (seconds).
const HEARTBEAT: &str = "1";
const WINDOW: &str = "3";

fn services() -> Option<(String, String)> {
    match (
        std::env::var("MINDSP_TEST_POSTGRES_URL"),
        std::env::var("MINDSP_TEST_REDIS_URL"),
    ) {
        (Ok(pg), Ok(redis)) if !pg.is_empty() && !redis.is_empty() => Some((pg, redis)),
        _ => {
            eprintln!(
                "skipped: set MINDSP_TEST_POSTGRES_URL and MINDSP_TEST_REDIS_URL to run the multi-node tests"
            );
            None
        }
    }
}

/// A fresh database and Redis prefix, dropped and purged when the test ends (even when
/// it fails).
struct Shared {
    admin_url: String,
    db_name: String,
    db_url: String,
    redis_url: String,
    prefix: String,
}

impl Shared {
    async fn new(pg: &str, redis: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("mindsp_mn_{id}");
        let mut conn = sqlx::PgConnection::connect(pg).await.expect("PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let mut url = url::Url::parse(pg).unwrap();
        url.set_path(&format!("/{db_name}"));
        Self {
            admin_url: pg.to_owned(),
            db_name,
            db_url: url.to_string(),
            redis_url: redis.to_owned(),
            prefix: format!("{{mindsp-test-{id}}}:rt:"),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let (admin, db, redis, prefix) = (
            self.admin_url.clone(),
            self.db_name.clone(),
            self.redis_url.clone(),
            self.prefix.clone(),
        );
        // On a thread of its own: this may run while a runtime is unwinding.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
                let config = fred::types::config::Config::from_url(&redis).unwrap();
                let client = fred::types::Builder::from_config(config).build().unwrap();
                if client.init().await.is_ok() {
                    let _: Result<i64, _> = client
                        .eval(
                            "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                             redis.call('DEL', k) n = n + 1 end return n",
                            Vec::<String>::new(),
                            vec![format!("{prefix}*")],
                        )
                        .await;
                    let _ = client.quit().await;
                }
            });
        })
        .join();
    }
}

/// One `mindsp-server serve` process.
struct Node {
    child: Child,
    addr: String,
    /// Its warnings and errors, as logged.
    complaints: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The thread reading its log, done once the process is.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(shared: &Shared) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mindsp-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--no-workers"])
            .args(["--database-url", &shared.db_url])
            .args(["--redis-url", &shared.redis_url])
            .args(["--redis-prefix", &shared.prefix])
            .args(["--presence-heartbeat-secs", HEARTBEAT])
            .args(["--presence-window-secs", WINDOW])
            // One user sends a hundred messages at once over REST.
            .args(["--rest-rate", "100000", "--rest-burst", "100000"])
            .env("MINDSP_JWT_SECRET", SECRET)
            .env("MINDSP_LOG", "info")
            .env_remove("MINDSP_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mindsp-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let complaints = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = complaints.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("addr=") {
                    let addr = line[i + 5..].split_whitespace().next().unwrap_or("");
                    let _ = tx.send(addr.to_owned());
                }
                if line.contains("ERROR") {
                    eprintln!("node: {line}");
                }
                if line.contains(" WARN ") || line.contains(" ERROR ") {
                    kept.lock().unwrap().push(line);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the node printed its address");
        Self {
            child,
            addr,
            complaints,
            reader: Some(reader),
        }
    }

    /// Waits (at most 30 s) for the process to end; the warnings and errors it logged
    /// after the first `skip`.
    fn complaints_at_exit(&mut self, skip: usize) -> Vec<String> {
        for _ in 0..300 {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the node did not exit"
        );
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.complaints.lock().unwrap()[skip..].to_vec()
    }

    /// SIGTERM: the node closes its sockets with 1012 and exits.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL: no close frame, no goodbye to Redis.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connects `who`; returns once the node has registered the connection for live
    /// events (it answers commands only after).
    async fn connect(&self, who: &Person) -> Client {
        let mut c = Client::connect(&format!("ws://{}/ws?token={}", self.addr, who.token)).await;
        c.ok("ping", json!({})).await;
        c
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        let resp = reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {path}: {status} {v}");
        v
    }

    async fn get(&self, path: &str, token: &str) -> Value {
        let resp = reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}");
        resp.json().await.unwrap()
    }

    async fn login(&self, email: &str) -> Person {
        let v: Value = reqwest::Client::new()
            .post(self.url("/api/auth/login"))
            .json(&json!({"tenant": "sdis13", "email": email, "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = v["access_token"].as_str().expect("token").to_owned();
        let me = self.get("/api/me", &token).await;
        Person {
            id: me["user"]["id"].as_str().unwrap().to_owned(),
            token,
        }
    }

    /// A member of the tenant, created by `admin`, logged in on this node.
    async fn user(&self, admin: &Person, name: &str) -> Person {
        let email = format!("{}@sdis13.fr", name.to_lowercase());
        self.post(
            "/api/admin/users",
            &admin.token,
            json!({"email": email, "display_name": name, "role": "member", "password": PASSWORD}),
        )
        .await;
        self.login(&email).await
    }

    async fn group(&self, owner: &Person, members: &[&Person]) -> String {
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
}

#[derive(Clone)]
struct Person {
    id: String,
    token: String,
}

/// The database with its schema and the tenant `sdis13` with an administrator, then
/// two nodes; the administrator logged in on the first.
async fn cluster(shared: &Shared) -> (Node, Node, Person) {
    {
        let store = mindsp_store::open(&shared.db_url).await.unwrap();
        let t = store.create_tenant("sdis13", "SDIS 13").await.unwrap();
        let mut tx = store.begin(t.id).await.unwrap();
        tx.insert_user(&NewUser {
            email: "admin@sdis13.fr".into(),
            display_name: "Admin".into(),
            role: Role::Admin,
            password_hash: mindsp_server::auth::hash_password(PASSWORD).unwrap(),
        })
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let n1 = Node::start(shared);
    let n2 = Node::start(shared);
    let admin = n1.login("admin@sdis13.fr").await;
    (n1, n2, admin)
}

/// `who`'s `last_seen` in the store, once written (the nodes gather these writes for a
/// moment), or `None` after 10 s.
async fn stored_last_seen(shared: &Shared, who: &Person) -> Option<chrono::DateTime<chrono::Utc>> {
    let store = mindsp_store::open(&shared.db_url).await.unwrap();
    let tenant = store.tenant_by_slug("sdis13").await.unwrap().unwrap().id;
    let user: mindsp_core::UserId = who.id.parse().unwrap();
    for _ in 0..100 {
        let seen = store
            .read(tenant)
            .await
            .unwrap()
            .last_seen_among(&[user])
            .await
            .unwrap();
        if let Some((_, at)) = seen.first() {
            return Some(*at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn seq(frame: &Value) -> i64 {
    frame["message"]["seq"].as_i64().unwrap()
}

fn of_type<'a>(frames: &'a [Value], kind: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_typing_receipts_and_presence_cross_nodes() {
    let Some((pg, redis)) = services() else {
        return;
    };
    let shared = Shared::new(&pg, &redis).await;
    let (n1, n2, admin) = cluster(&shared).await;
    let alice = n1.user(&admin, "Alice").await;
    let dave = n1.user(&admin, "Dave").await;
    let bob = n2.user(&admin, "Bob").await;
    let carol = n2.user(&admin, "Carol").await;
    let conv = n1.group(&alice, &[&bob, &dave]).await;

    // Bob (node 2) is there first and sees Alice (node 1) come online.
    let mut b = n2.connect(&bob).await;
    let mut c = n2.connect(&carol).await;
    let mut d = n1.connect(&dave).await;
    let mut a = n1.connect(&alice).await;
    let online = b
        .next_where("presence", |f| f["user_id"] == alice.id.as_str())
        .await;
    assert_eq!(online["status"], "online");
    // The presence query on node 1 reads Redis: Bob, connected to node 2, is online.
    let q = a.ok("presence", json!({"conversation_id": conv})).await;
    let status_of = |q: &Value, id: &str| {
        q["presence"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user_id"] == id)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status_of(&q, &bob.id), "online");
    assert_eq!(status_of(&q, &dave.id), "online");

    // A message sent on node 1 reaches node 2 with the stored seq.
    let ack = a
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "Départ VSAV 1", "idempotency_key": "k1"}),
        )
        .await;
    let stored = seq(&ack);
    let got = b.next("new_message").await;
    assert_eq!(seq(&got), stored);
    assert_eq!(got["message"]["content"], "Départ VSAV 1");
    assert_eq!(got["message"]["id"], ack["message"]["id"]);
    assert_eq!(seq(&d.next("new_message").await), stored);
    assert_eq!(seq(&a.next("new_message").await), stored);

    // Typing on node 1: Bob (node 2) sees it, and Dave (same node as Alice) sees it
    // exactly once: the publishing node delivers only what comes back from Redis.
    a.ok("typing", json!({"conversation_id": conv, "state": "start"}))
        .await;
    let t = b.next("typing").await;
    assert_eq!(t["user_id"], alice.id.as_str());
    assert_eq!(t["state"], "start");
    let t = d.next("typing").await;
    assert_eq!(t["state"], "start");
    a.ok("typing", json!({"conversation_id": conv, "state": "stop"}))
        .await;
    assert_eq!(b.next("typing").await["state"], "stop");
    assert_eq!(d.next("typing").await["state"], "stop");

    // Bob (node 2) reads Alice's message: the receipt reaches node 1.
    let read = b
        .ok("mark_read", json!({"conversation_id": conv, "seq": stored}))
        .await;
    assert_eq!(read["last_read_seq"], stored);
    let receipt = a
        .next_where("message_read", |f| f["user_id"] == bob.id.as_str())
        .await;
    assert_eq!(receipt["seq"], stored);
    assert_eq!(
        d.next_where("message_read", |f| f["user_id"] == bob.id.as_str())
            .await["seq"],
        stored
    );
    // His own unread count, computed at commit time, is in his copy.
    let mine = b
        .next_where("message_read", |f| f["user_id"] == bob.id.as_str())
        .await;
    assert_eq!(mine["unread"], 0);

    // And a reply from node 2 reaches node 1.
    let reply = b
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "Reçu", "idempotency_key": "k2"}),
        )
        .await;
    assert_eq!(seq(&reply), stored + 1);
    assert_eq!(seq(&a.next("new_message").await), stored + 1);
    assert_eq!(seq(&d.next("new_message").await), stored + 1);
    assert_eq!(seq(&b.next("new_message").await), stored + 1);

    // Nothing was delivered twice on either node, and Carol (not a member) got
    // nothing but presence.
    for (who, client) in [("alice", &mut a), ("dave", &mut d), ("bob", &mut b)] {
        let rest = client.quiet_except_presence().await;
        assert!(
            of_type(&rest, "new_message").is_empty() && of_type(&rest, "typing").is_empty(),
            "{who} got more: {rest:?}"
        );
    }
    let leaked = c.quiet_except_presence().await;
    assert!(leaked.is_empty(), "carol got {leaked:?}");

    // Bob leaves node 2: node 1 sees him offline, with last_seen.
    drop(b);
    let off = a
        .next_where("presence", |f| {
            f["user_id"] == bob.id.as_str() && f["status"] == "offline"
        })
        .await;
    assert!(off["last_seen"].is_string(), "{off}");
    let q = a.ok("presence", json!({"conversation_id": conv})).await;
    assert_eq!(status_of(&q, &bob.id), "offline");

    // Dave changes his password on node 2: his socket on node 1 closes (4010).
    n2.post(
        "/api/me/password",
        &dave.token,
        json!({"current_password": PASSWORD, "new_password": "Caserne-Nord-2026"}),
    )
    .await;
    assert_eq!(d.close_code().await, Some(4010));
    a.ok("ping", json!({})).await;
    drop((n1, n2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_gets_exactly_the_missed_messages_then_live() {
    let Some((pg, redis)) = services() else {
        return;
    };
    let shared = Shared::new(&pg, &redis).await;
    let (n1, n2, admin) = cluster(&shared).await;
    let alice = n1.user(&admin, "Alice").await;
    let bob = n1.user(&admin, "Bob").await;
    let conv = n1.group(&alice, &[&bob]).await;

    // Bob reads the first message on node 1, then loses his connection.
    let mut b = n1.connect(&bob).await;
    let first = n1
        .post(
            &format!("/api/conversations/{conv}/messages"),
            &alice.token,
            json!({"content": "message 0"}),
        )
        .await;
    let cursor = seq(&b.next("new_message").await);
    assert_eq!(cursor, first["message"]["seq"].as_i64().unwrap());
    drop(b);

    // 100 messages go through node 1 while he is away.
    let mut sent = Vec::new();
    for i in 1..=100 {
        let m = n1
            .post(
                &format!("/api/conversations/{conv}/messages"),
                &alice.token,
                json!({"content": format!("message {i}")}),
            )
            .await;
        sent.push(m["message"]["seq"].as_i64().unwrap());
    }

    // He comes back on node 2 with his cursor: exactly those 100, in order, then live.
    let mut b = n2.connect(&bob).await;
    let ack = b
        .ok("resume", json!({"cursors": {conv.as_str(): cursor}}))
        .await;
    assert_eq!(ack["replayed"], 100);
    assert_eq!(ack["not_found"], json!([]));
    // The replay came before the ack; the client kept those frames.
    let frames = b.drain().await;
    let got: Vec<i64> = of_type(&frames, "new_message")
        .into_iter()
        .map(seq)
        .collect();
    assert_eq!(got, sent, "replayed exactly the missed ones, in order");
    let live = n1
        .post(
            &format!("/api/conversations/{conv}/messages"),
            &alice.token,
            json!({"content": "live"}),
        )
        .await;
    let next = b.next("new_message").await;
    assert_eq!(seq(&next), live["message"]["seq"].as_i64().unwrap());
    assert_eq!(seq(&next), sent.last().unwrap() + 1);
    let rest = b.quiet_except_presence().await;
    assert!(of_type(&rest, "new_message").is_empty(), "{rest:?}");
    drop((n1, n2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_its_users_offline_for_the_others() {
    let Some((pg, redis)) = services() else {
        return;
    };
    let shared = Shared::new(&pg, &redis).await;
    let (mut n1, n2, admin) = cluster(&shared).await;
    let alice = n1.user(&admin, "Alice").await;
    let bob = n2.user(&admin, "Bob").await;
    let conv = n1.group(&alice, &[&bob]).await;

    let mut b = n2.connect(&bob).await;
    // Alice has two tabs on node 1.
    let _a1 = n1.connect(&alice).await;
    let _a2 = n1.connect(&alice).await;
    b.next_where("presence", |f| {
        f["user_id"] == alice.id.as_str() && f["status"] == "online"
    })
    .await;
    let q = b.ok("presence", json!({"conversation_id": conv})).await;
    assert!(
        q["presence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["user_id"] == alice.id.as_str() && p["status"] == "online"),
        "{q}"
    );

    // Node 1 dies without a word. Within the heartbeat window (3 s here; the wait is
    // bounded by the client's 15 s), node 2 tells Bob that Alice is offline.
    n1.kill();
    let off = b
        .next_where("presence", |f| {
            f["user_id"] == alice.id.as_str() && f["status"] == "offline"
        })
        .await;
    assert!(off["last_seen"].is_string(), "{off}");
    // Node 2 swept her: it keeps that time in the store too, where it outlives Redis
    // (which keeps nothing on disk) and is what a node falls back to.
    let seen: chrono::DateTime<chrono::Utc> = off["last_seen"].as_str().unwrap().parse().unwrap();
    assert_eq!(stored_last_seen(&shared, &alice).await, Some(seen));
    let q = b.ok("presence", json!({"conversation_id": conv})).await;
    let alice_now = q["presence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user_id"] == alice.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(alice_now["status"], "offline", "{q}");
    assert!(alice_now["last_seen"].is_string(), "{q}");
    // One offline event for one transition, though she had two connections.
    let more = b.drain().await;
    assert!(
        !more
            .iter()
            .any(|f| f["type"] == "presence" && f["user_id"] == alice.id.as_str()),
        "{more:?}"
    );
    drop(n2);
}

/// A node shutting down (SIGTERM, a rolling restart) leaves its users' presence to the
/// node that stays: one who reconnects there at once, as the 1012 close asks, shows the
/// others no offline-then-online flicker; one who does not turns offline when node 1 is
/// swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_node_leaves_presence_to_the_node_that_stays() {
    let Some((pg, redis)) = services() else {
        return;
    };
    let shared = Shared::new(&pg, &redis).await;
    let (mut n1, n2, admin) = cluster(&shared).await;
    let alice = n1.user(&admin, "Alice").await;
    let carol = n1.user(&admin, "Carol").await;
    let bob = n2.user(&admin, "Bob").await;
    let conv = n1.group(&alice, &[&bob, &carol]).await;

    let mut b = n2.connect(&bob).await;
    let mut a = n1.connect(&alice).await;
    let mut c = n1.connect(&carol).await;
    for who in [&alice, &carol] {
        b.next_where("presence", |f| {
            f["user_id"] == who.id.as_str() && f["status"] == "online"
        })
        .await;
    }
    b.drain().await;

    let before = n1.complaints.lock().unwrap().len();
    n1.terminate();
    assert_eq!(a.close_code().await, Some(1012));
    assert_eq!(c.close_code().await, Some(1012));
    // A clean stop logs no warning (fred's "fatal error" at a `quit` that raced the
    // runtime's end was one).
    let complaints = n1.complaints_at_exit(before);
    assert!(complaints.is_empty(), "{complaints:#?}");
    let _a = n2.connect(&alice).await;
    // Carol does not come back: offline once node 1, silent, is swept (3 s window).
    b.next_where("presence", |f| {
        f["user_id"] == carol.id.as_str() && f["status"] == "offline"
    })
    .await;
    let seen = b.drain().await;
    assert!(
        !seen
            .iter()
            .any(|f| f["type"] == "presence" && f["user_id"] == alice.id.as_str()),
        "Alice moved to node 2 without going offline: {seen:?}"
    );
    let q = b.ok("presence", json!({"conversation_id": conv})).await;
    let status = |who: &Person| {
        q["presence"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user_id"] == who.id.as_str())
            .map(|p| p["status"].clone())
    };
    assert_eq!(status(&alice), Some(json!("online")), "{q}");
    assert_eq!(status(&carol), Some(json!("offline")), "{q}");
}

/// Notifications in the scaled profile: one created on node 1 reaches the recipient's
/// socket on node 2, and a reminder run by a separate `mindsp-server worker` process
/// (no HTTP, no sockets of its own) reaches it too, through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_reminders_from_a_worker_process_cross_nodes() {
    let Some((pg, redis)) = services() else {
        return;
    };
    let shared = Shared::new(&pg, &redis).await;
    let (n1, n2, admin) = cluster(&shared).await;
    let bob = n2.user(&admin, "Bob").await;
    n1.post(
        "/api/admin/users",
        &admin.token,
        json!({"email": "ltn.roux@sdis13.fr", "display_name": "Ltn Roux", "role": "officer", "password": PASSWORD}),
    )
    .await;
    let officer = n1.login("ltn.roux@sdis13.fr").await;
    let mut b = n2.connect(&bob).await;

    // An administrator's notification, created on node 1.
    n1.post(
        "/api/admin/notifications",
        &admin.token,
        json!({"user_ids": [bob.id], "title": "Exercice NOVI demain", "body": "9 h au stade"}),
    )
    .await;
    let f = b.next("notification").await;
    assert_eq!(f["notification"]["title"], "Exercice NOVI demain");
    assert_eq!(f["unread"], 1);

    // A session starting in 63 s with a reminder 1 min before: due in 3 s. The nodes run
    // no worker; a worker process does.
    let start = chrono::Utc::now() + chrono::TimeDelta::seconds(63);
    let created = n1
        .post(
            "/api/fmpa",
            &officer.token,
            json!({
                "title": "Manœuvre ARI", "kind": "ari", "location": "CIS Aix",
                "start_at": start, "end_at": start + chrono::TimeDelta::hours(2),
                "invitees": [bob.id], "reminder_offsets": [1]
            }),
        )
        .await;
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    let invitation = b.next("notification").await;
    assert_eq!(invitation["notification"]["kind"], "FMPA_INVITATION");

    let mail = std::env::temp_dir().join(format!("mindsp-mn-mail-{}", uuid::Uuid::new_v4()));
    let mut worker = Command::new(env!("CARGO_BIN_EXE_mindsp-server"))
        .args(["worker", "--database-url", &shared.db_url])
        .args(["--redis-url", &shared.redis_url])
        .args(["--redis-prefix", &shared.prefix])
        .args(["--presence-heartbeat-secs", HEARTBEAT])
        .args(["--presence-window-secs", WINDOW])
        .arg("--mail-dir")
        .arg(&mail)
        .env("MINDSP_LOG", "warn")
        .env_remove("MINDSP_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mindsp-server worker");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reminder = loop {
        let f = b.next("notification").await;
        if f["notification"]["kind"] == "FMPA_REMINDER" {
            break f;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reminder reached node 2"
        );
    };
    assert_eq!(
        reminder["notification"]["data"]["session_id"],
        session.as_str()
    );
    assert_eq!(reminder["unread"], 3);
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = std::fs::remove_dir_all(&mail);
}

/// While a node's Redis is down, presence is unknown rather than "everyone offline":
/// the socket's `presence` command and `GET …/presence` answer `presence_unavailable`
/// (503), and sends are still acknowledged. Once Redis is back (empty: a restart keeps
/// nothing), the node writes its users again and presence reads as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_unavailable_not_offline_while_redis_is_down() {
    let Some((pg, _)) = services() else {
        return;
    };
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let shared = Shared::new(&pg, &redis.url()).await;
    let (n1, _n2, admin) = cluster(&shared).await;
    let alice = n1.user(&admin, "Alice").await;
    let bob = n1.user(&admin, "Bob").await;
    let conv = n1.group(&alice, &[&bob]).await;
    let mut a = n1.connect(&alice).await;
    let _b = n1.connect(&bob).await;
    let both_online = |q: &Value| {
        q["presence"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["status"] == "online"))
    };
    let q = a.ok("presence", json!({"conversation_id": conv})).await;
    assert!(both_online(&q), "{q}");

    redis.kill();
    let r = a.call("presence", json!({"conversation_id": conv})).await;
    assert_eq!(r["code"], "presence_unavailable", "{r}");
    let resp = reqwest::Client::new()
        .get(n1.url(&format!("/api/conversations/{conv}/presence")))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "presence_unavailable", "{body}");
    a.ok(
        "send",
        json!({"conversation_id": conv, "content": "Redis est tombé", "idempotency_key": "k1"}),
    )
    .await;

    redis.restart().expect("redis-server starts again");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = a.call("presence", json!({"conversation_id": conv})).await;
        if r["type"] == "ack" && both_online(&r) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never read again: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
