//! The WebSocket endpoint as clients see it: a real server on 127.0.0.1 over SQLite,
//! real tokio-tungstenite clients. See `docs/PROTOCOL.md`.

mod wsclient;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mindsp_core::events::{Envelope, Event};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsclient::{Client, PASSWORD, Person, Server, config};

fn seq(frame: &Value) -> i64 {
    frame["message"]["seq"].as_i64().unwrap()
}

/// Alice and Bob of `sdis13`, and a group of the two (its id).
/// A `new_message` for `to` alone, of a message that need not be stored.
fn message_to(to: &Person, sender: &Person, conv: &str, seq: i64, content: &str) -> Envelope {
    let conversation_id = conv.parse().unwrap();
    Envelope::to_users(
        to.actor.tenant_id,
        vec![to.actor.user_id],
        Event::NewMessage {
            conversation_id,
            message: mindsp_core::model::Message {
                id: mindsp_core::MessageId::new(),
                conversation_id,
                sender_id: sender.actor.user_id,
                seq,
                content: content.to_owned(),
                idempotency_key: None,
                created_at: mindsp_core::model::now(),
            },
        },
    )
}

/// Messages `m1`..`m{n}` sent by `who` through the service (published before anyone
/// here is connected).
async fn stored_messages(s: &Server, who: &Person, conv: mindsp_core::ConversationId, n: i64) {
    for i in 1..=n {
        s.state
            .messaging
            .send(&who.actor, conv, &format!("m{i}"), None)
            .await
            .unwrap();
    }
}

async fn alice_and_bob(s: &Server) -> (Person, Person, String) {
    let (_, alice, bob, conv) = admin_alice_and_bob(s).await;
    (alice, bob, conv)
}

/// [`alice_and_bob`], and the admin of their tenant.
/// `who` changes their password (from [`PASSWORD`]) to `new`; the answer.
async fn change_password(s: &Server, who: &Person, new: &str) -> Value {
    let body = json!({"current_password": PASSWORD, "new_password": new});
    s.post("/api/me/password", &who.token, body).await
}

/// `who`'s change to `password` (its mark) reaches this node (again), as it would late
/// from another node.
async fn password_changed_late(s: &Server, who: &Person, password: i64) {
    let (tenant, id) = (who.actor.tenant_id, who.actor.user_id);
    let event = Event::PasswordChanged {
        user_id: id,
        password,
    };
    s.state
        .realtime
        .publish(Envelope::to_users(tenant, vec![id], event))
        .await;
}

async fn admin_alice_and_bob(s: &Server) -> (Person, Person, Person, String) {
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let conv = s.group(&alice, &[&bob]).await;
    (admin, alice, bob, conv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_with_typing_and_read_receipts_and_outsiders_get_nothing() {
    let mut cfg = config();
    cfg.ws.typing_ttl = Duration::from_millis(300);
    cfg.ws.typing_throttle = Duration::from_millis(100);
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let carol = s.user(&admin, "sdis13", "Carol").await;
    let other_admin = s.tenant("sdis83").await;
    let conv = s.group(&alice, &[&bob]).await;

    let mut a = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;
    let mut b2 = s.connect(&bob).await;
    let mut c = s.connect(&carol).await;
    let mut x = s.connect(&other_admin).await;

    // Sent over the socket: acked with the stored message.
    let ack = a
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "Départ VSAV 1", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(ack["created"], true);
    let stored = seq(&ack);
    let got = b.next("new_message").await;
    assert_eq!(got["conversation_id"], conv.as_str());
    assert_eq!(seq(&got), stored);
    assert_eq!(got["message"]["content"], "Départ VSAV 1");
    assert_eq!(seq(&b2.next("new_message").await), stored);
    // The sender's own connection gets it too (for its other devices' sake).
    assert_eq!(seq(&a.next("new_message").await), stored);
    let history = s
        .get(&format!("/api/conversations/{conv}/messages"), &bob.token)
        .await;
    let last = history["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["seq"].as_i64(), Some(stored));
    assert_eq!(last["id"], got["message"]["id"]);

    // The same key again: the stored message, nothing new delivered.
    let again = a
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "Départ VSAV 1", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(again["created"], false);
    assert_eq!(seq(&again), stored);

    // Typing reaches the other member, and stops by itself.
    a.ok("typing", json!({"conversation_id": conv, "state": "start"}))
        .await;
    let t = b.next("typing").await;
    assert_eq!(
        (t["user_id"].as_str(), t["state"].as_str()),
        (Some(alice.id.as_str()), Some("start"))
    );
    let t = b.next("typing").await;
    assert_eq!(
        (t["user_id"].as_str(), t["state"].as_str()),
        (Some(alice.id.as_str()), Some("stop"))
    );

    // Read receipt: the sender sees ✓✓; the reader's other device its unread count.
    let r = b.ok("mark_read", json!({"conversation_id": conv})).await;
    assert_eq!(r["last_read_seq"].as_i64(), Some(stored));
    let receipt = a.next("message_read").await;
    assert_eq!(receipt["user_id"], bob.id.as_str());
    assert_eq!(receipt["seq"].as_i64(), Some(stored));
    assert!(receipt.get("unread").is_none(), "{receipt}");
    let mine = b2.next("message_read").await;
    assert_eq!(mine["unread"].as_i64(), Some(0));

    // Sent through REST: the same path, delivered over the socket.
    let rest = s
        .post(
            &format!("/api/conversations/{conv}/messages"),
            &alice.token,
            json!({"content": "Retour CIS"}),
        )
        .await;
    let got = b.next("new_message").await;
    assert_eq!(seq(&got), rest["message"]["seq"].as_i64().unwrap());
    assert_eq!(seq(&got), stored + 1);
    // Bob's second device is now one message behind.
    let mine = b2.next("new_message").await;
    assert_eq!(seq(&mine), stored + 1);

    // A member of the tenant outside the conversation, and another tenant: nothing,
    // not even presence (Carol shares no conversation with anyone).
    let leaked = c.drain().await;
    assert!(leaked.is_empty(), "carol received {leaked:?}");
    let leaked = x.drain().await;
    assert!(
        leaked.iter().all(|f| f["type"] == "presence"),
        "sdis83 received {leaked:?}"
    );
    // Presence never crosses tenants either: sdis83 saw only its own admin (itself).
    assert!(
        leaked
            .iter()
            .all(|f| f["user_id"] == other_admin.id.as_str()),
        "{leaked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_last_tab() {
    let s = Server::start(config()).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let conv = s.group(&alice, &[&bob]).await;
    // Carol shares no conversation with Alice: she is never told about her.
    let carol = s.user(&admin, "sdis13", "Carol").await;
    let mut c = s.connect(&carol).await;
    let mut b = s.connect(&bob).await;

    let mut tab1 = s.connect(&alice).await;
    let online = b
        .next_where("presence", |f| f["user_id"] == alice.id.as_str())
        .await;
    assert_eq!(online["status"], "online");
    let tab2 = s.connect(&alice).await;
    let q = b.ok("presence", json!({"conversation_id": conv})).await;
    let find = |q: &Value, id: &str| {
        q["presence"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(find(&q, &alice.id)["status"], "online");
    assert_eq!(find(&q, &bob.id)["status"], "online");
    // The answer carries the version of the change it comes from, as the event does.
    assert!(online["version"].as_u64().unwrap() > 0, "{online}");
    assert_eq!(find(&q, &alice.id)["version"], online["version"]);
    // The REST route answers the same, for a page that has no socket yet; an outsider
    // learns nothing (404).
    let rest = s
        .get(&format!("/api/conversations/{conv}/presence"), &bob.token)
        .await;
    assert_eq!(find(&rest, &alice.id)["status"], "online");
    let (status, _) = s
        .call(
            reqwest::Method::GET,
            &format!("/api/conversations/{conv}/presence"),
            &carol.token,
            None,
        )
        .await;
    assert_eq!(status, 404);

    // One tab closes: still online, and nobody is told otherwise.
    tab1.ws.close(None).await.unwrap();
    drop(tab1);
    let seen = b.quiet_except_presence().await;
    assert!(seen.is_empty(), "{seen:?}");
    let q = b.ok("presence", json!({"conversation_id": conv})).await;
    assert_eq!(find(&q, &alice.id)["status"], "online");

    // The last one closes: offline, with last_seen.
    drop(tab2);
    let offline = b
        .next_where("presence", |f| {
            f["user_id"] == alice.id.as_str() && f["status"] == "offline"
        })
        .await;
    assert!(offline["last_seen"].is_string(), "{offline}");
    let q = b.ok("presence", json!({"conversation_id": conv})).await;
    assert_eq!(find(&q, &alice.id)["status"], "offline");
    assert_eq!(find(&q, &alice.id)["last_seen"], offline["last_seen"]);
    assert!(offline["version"].as_u64() > online["version"].as_u64());
    assert_eq!(find(&q, &alice.id)["version"], offline["version"]);
    assert_eq!(find(&rest, &alice.id)["version"], online["version"]);
    let heard = c.drain().await;
    assert!(heard.is_empty(), "carol was told {heard:?}");
}

/// `last_seen` outlives the server: after a restart (presence starts over, in memory),
/// a colleague still reads when Alice was last connected, as the `offline` event said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_outlives_a_restart() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let mut b = s.connect(&bob).await;
    let a = s.connect(&alice).await;
    let about_alice = |status: &'static str| {
        let id = alice.id.clone();
        move |f: &Value| f["user_id"] == id.as_str() && f["status"] == status
    };
    b.next_where("presence", about_alice("online")).await;
    drop(a);
    let offline = b.next_where("presence", about_alice("offline")).await;
    assert!(offline["last_seen"].is_string(), "{offline}");
    // Written on a task of its own: once the store has it.
    let (tenant, id) = (alice.actor.tenant_id, alice.actor.user_id);
    let deadline = tokio::time::Instant::now() + wsclient::WAIT;
    loop {
        let mut tx = s.store.read(tenant).await.unwrap();
        if !tx.last_seen_among(&[id]).await.unwrap().is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);

    let s = s.restart(config()).await;
    let mut b = s.connect(&bob).await;
    for answer in [
        b.ok("presence", json!({"conversation_id": conv})).await,
        s.get(&format!("/api/conversations/{conv}/presence"), &bob.token)
            .await,
    ] {
        let alice_now = answer["presence"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user_id"] == alice.id.as_str())
            .cloned()
            .unwrap();
        assert_eq!(alice_now["status"], "offline");
        assert_eq!(alice_now["last_seen"], offline["last_seen"], "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_exactly_what_was_missed_then_live_without_seam() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();

    let mut b = s.connect(&bob).await;
    let first = s
        .post(
            &format!("/api/conversations/{conv}/messages"),
            &alice.token,
            json!({"content": "m0"}),
        )
        .await;
    let cursor = seq(&b.next("new_message").await);
    assert_eq!(cursor, first["message"]["seq"].as_i64().unwrap());
    drop(b);

    // 100 messages while Bob is away.
    for i in 1..=100 {
        s.state
            .messaging
            .send(&alice.actor, cid, &format!("m{i}"), None)
            .await
            .unwrap();
    }

    // Bob comes back; 20 more are sent while he resumes. They start once the first
    // replayed message shows that the server holds his cursor: a live message that
    // reached the connection before its `resume` would be delivered first (PROTOCOL:
    // a conversation without a cursor starts at the first message seen live).
    let mut b = s.connect(&bob).await;
    let id = b
        .command("resume", json!({"cursors": {conv.clone(): cursor}}))
        .await;
    let first_replayed = b.next("new_message").await;
    assert_eq!(first_replayed["message"]["content"], "m1");
    let messaging = s.state.messaging.clone();
    let actor = alice.actor;
    let live = tokio::spawn(async move {
        for i in 101..=120 {
            messaging
                .send(&actor, cid, &format!("m{i}"), None)
                .await
                .unwrap();
        }
    });
    live.await.unwrap();
    let mut seqs = vec![seq(&first_replayed)];
    let mut acked = None;
    while seqs.len() < 120 {
        let deadline = tokio::time::Instant::now() + wsclient::WAIT;
        let f = tokio::time::timeout_at(deadline, b.next_any())
            .await
            .expect("frames keep coming");
        match f["type"].as_str() {
            Some("new_message") => {
                assert_eq!(f["message"]["content"], format!("m{}", seqs.len() + 1));
                seqs.push(seq(&f));
            }
            Some("ack") => {
                assert_eq!(f["id"], id);
                acked = Some(f);
            }
            Some("presence") => {}
            _ => panic!("unexpected {f}"),
        }
    }
    let expected: Vec<i64> = (cursor + 1..=cursor + 120).collect();
    assert_eq!(
        seqs, expected,
        "every missed and live message once, in order"
    );
    let acked = match acked {
        Some(a) => a,
        None => b.reply_to(&id).await,
    };
    assert!(acked["replayed"].as_u64().unwrap() >= 100, "{acked}");
    // No duplicate follows; the next live one comes once.
    s.post(
        &format!("/api/conversations/{conv}/messages"),
        &alice.token,
        json!({"content": "m121"}),
    )
    .await;
    let f = b.next("new_message").await;
    assert_eq!(seq(&f), cursor + 121);
    let rest = b.quiet_except_presence().await;
    assert!(rest.is_empty(), "{rest:?}");

    // A cursor for a conversation Bob cannot see is answered, not obeyed.
    let other = s.tenant("sdis83").await;
    let foreign = s.group(&other, &[]).await;
    let r = b
        .ok("resume", json!({"cursors": {foreign.clone(): 0}}))
        .await;
    assert_eq!(r["not_found"], json!([foreign]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_answers_and_the_server_keeps_serving() {
    let mut cfg = config();
    cfg.ws.max_message_bytes = 8 * 1024;
    cfg.ws.rate_per_sec = 5;
    cfg.ws.rate_burst = 20;
    cfg.ws.allowed_origins = vec!["https://chat.sdis13.fr".into()];
    let s = Server::start(cfg).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let other = s.tenant("sdis83").await;
    let foreign = s.group(&other, &[]).await;
    let mut b = s.connect(&bob).await;
    let mut a = s.connect(&alice).await;

    async fn error_of(a: &mut Client, raw: &str) -> Value {
        a.send_raw(raw).await;
        a.next("error").await
    }
    let e = error_of(&mut a, "not json").await;
    assert_eq!(
        (e["code"].as_str(), &e["id"]),
        (Some("malformed_json"), &Value::Null)
    );
    let e = error_of(&mut a, "[1,2]").await;
    assert_eq!(e["code"], "invalid_frame");
    let e = error_of(&mut a, r#"{"v":1,"type":"ping"}"#).await;
    assert_eq!(e["code"], "missing_id");
    let e = error_of(&mut a, r#"{"v":1,"id":"x","type":"launch_missiles"}"#).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("unknown_type"), Some("x"))
    );
    let e = error_of(
        &mut a,
        r#"{"v":1,"id":"y","type":"send","conversation_id":5,"content":"x"}"#,
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_frame"), Some("y"))
    );
    let e = error_of(&mut a, r#"{"v":1,"id":"z","type":"ping","extra":true}"#).await;
    assert_eq!(e["code"], "invalid_frame");
    let e = error_of(&mut a, r#"{"v":2,"id":"w","type":"ping"}"#).await;
    assert_eq!(e["code"], "unsupported_version");
    a.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(a.next("error").await["code"], "unsupported_frame");
    // Another tenant's conversation, or a missing one: not_found, alike.
    let e = a
        .call("send", json!({"conversation_id": foreign, "content": "x"}))
        .await;
    assert_eq!(e["code"], "not_found");
    let missing = uuid::Uuid::now_v7().to_string();
    let e2 = a
        .call("send", json!({"conversation_id": missing, "content": "x"}))
        .await;
    assert_eq!(
        (e2["code"].clone(), e2["message"].clone()),
        (e["code"].clone(), e["message"].clone())
    );
    let e = a
        .call(
            "typing",
            json!({"conversation_id": foreign, "state": "start"}),
        )
        .await;
    assert_eq!(e["code"], "not_found");
    let e = a
        .call("presence", json!({"conversation_id": foreign}))
        .await;
    assert_eq!(e["code"], "not_found");
    let e = a
        .call("send", json!({"conversation_id": conv, "content": "  "}))
        .await;
    assert_eq!(e["code"], "empty_content");

    // A flood beyond the rate limit: rate_limited, and the connection stays.
    let before = tokio::time::Instant::now();
    let ids: Vec<Value> = {
        let mut ids = Vec::new();
        for _ in 0..50 {
            ids.push(a.command("ping", json!({})).await);
        }
        ids
    };
    let mut limited = 0;
    for id in &ids {
        let r = a.reply_to(id).await;
        if r["type"] == "error" {
            assert_eq!(r["code"], "rate_limited");
            limited += 1;
        }
    }
    assert!(limited > 0, "50 commands at once with a burst of 20");
    // Still usable once the bucket refills (bounded wait).
    loop {
        let r = a.call("ping", json!({})).await;
        if r["type"] == "ack" {
            break;
        }
        assert!(
            before.elapsed() < wsclient::WAIT,
            "the connection stays usable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Binary frames count too.
    for _ in 0..50 {
        a.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    }
    let mut codes = Vec::new();
    while codes.len() < 50 {
        codes.push(a.next("error").await["code"].as_str().unwrap().to_owned());
    }
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");

    // Oversize: closed with 1009.
    let mut big = s.connect(&alice).await;
    big.send_raw(&"x".repeat(9 * 1024)).await;
    assert_eq!(big.close_code().await, Some(1009));

    // Refused before any socket: no token, forged token, foreign origin.
    let (st, body) = Client::refused(format!("ws://{}/ws", s.addr)).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let forged = {
        let mut t = alice.token.clone();
        t.pop();
        t.push(if alice.token.ends_with('A') { 'B' } else { 'A' });
        t
    };
    let (st, body) = Client::refused(s.ws_url(&forged)).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    let mut req = s.ws_url(&alice.token).into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let (st, body) = Client::refused(req).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    let mut req = s.ws_url(&alice.token).into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://chat.sdis13.fr".parse().unwrap());
    let (_ok, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    // The Authorization header works as well as the query.
    let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", alice.token).parse().unwrap(),
    );
    let (_ok, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let (st, _) = Client::refused(format!("ws://{}/ws?token={}&x=1", s.addr, alice.token)).await;
    assert_eq!(st, 400);
    // A valid token without a WebSocket handshake: a plain GET, or a protocol version
    // other than 13.
    let plain = reqwest::get(format!("http://{}/ws?token={}", s.addr, alice.token))
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    let body: Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "websocket_required");
    let mut req = s.ws_url(&alice.token).into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-version", "8".parse().unwrap());
    let (st, body) = Client::refused(req).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (400, Some("websocket_required"))
    );

    // After all that, everyone is still served (Alice's first socket has spent its
    // rate budget: she sends from another one).
    let mut a2 = s.connect(&alice).await;
    let ack = a2
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "toujours là"}),
        )
        .await;
    let got = b.next("new_message").await;
    assert_eq!(seq(&got), seq(&ack));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refresh_extends_the_connection_and_expiry_closes_it() {
    let mut cfg = config();
    cfg.token_ttl = Duration::from_secs(2);
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;

    let mut refreshed = s.connect(&alice).await;
    let mut left = s.connect(&alice).await;
    // A token of an hour, signed with the server's secret (as a login would give).
    let long = mindsp_server::auth::Tokens::new(wsclient::SECRET, Duration::from_secs(3600));
    let me = s.get("/api/me", &alice.token).await;
    let user: mindsp_core::model::User = serde_json::from_value(me["user"].clone()).unwrap();
    let r = refreshed
        .ok(
            "refresh_token",
            json!({"token": long.issue(&user).unwrap()}),
        )
        .await;
    assert!(r["expires_at"].is_string(), "{r}");
    // Someone else's token, or a forged one, is refused and changes nothing.
    let e = refreshed
        .call("refresh_token", json!({"token": bob.token}))
        .await;
    assert_eq!(e["code"], "token_mismatch");
    let e = refreshed
        .call("refresh_token", json!({"token": "not-a-token"}))
        .await;
    assert_eq!(e["code"], "invalid_token");

    assert_eq!(left.close_code().await, Some(4001));
    // The first token has expired by now; the refreshed connection is still served.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    refreshed.ok("ping", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_closes_sockets_and_removal_stops_deliveries() {
    let s = Server::start(config()).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let carol = s.user(&admin, "sdis13", "Carol").await;
    let conv = s.group(&alice, &[&bob, &carol]).await;
    let mut a = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;
    let mut c = s.connect(&carol).await;

    // A message before the removal reaches Carol (and leaves the conversation's members
    // in the publisher's cache, which the removal must invalidate).
    a.ok(
        "send",
        json!({"conversation_id": conv, "content": "avec Carol"}),
    )
    .await;
    assert_eq!(
        c.next("new_message").await["message"]["content"],
        "avec Carol"
    );
    b.next("new_message").await;

    // Removal: Carol learns it, then gets nothing more of the conversation.
    let (st, _) = s
        .call(
            reqwest::Method::DELETE,
            &format!("/api/conversations/{conv}/members/{}", carol.id),
            &alice.token,
            None,
        )
        .await;
    assert_eq!(st, 204);
    let upd = c.next("conversation_updated").await;
    assert_eq!(upd["removed"], json!([carol.id]));
    assert_eq!(upd["members"].as_array().unwrap().len(), 2);
    let upd = b.next("conversation_updated").await;
    assert_eq!(upd["conversation_id"], conv.as_str());
    a.ok(
        "send",
        json!({"conversation_id": conv, "content": "sans Carol"}),
    )
    .await;
    b.next("new_message").await;
    let seen = c.quiet_except_presence().await;
    assert!(seen.is_empty(), "{seen:?}");
    let e = c
        .call(
            "send",
            json!({"conversation_id": conv, "content": "encore moi"}),
        )
        .await;
    assert_eq!(e["code"], "not_found");

    // Deactivation: Bob's socket closes at once with 4003; others carry on.
    let (st, _) = s
        .call(
            reqwest::Method::PATCH,
            &format!("/api/admin/users/{}", bob.id),
            &admin.token,
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(b.close_code().await, Some(4003));
    let (st, _) = Client::refused(s.ws_url(&bob.token)).await;
    assert_eq!(st, 401);
    a.ok("ping", json!({})).await;
}

/// A password change closes every socket its user has open, with 4010, whether they
/// changed it themselves or an admin reset it: each was opened with a token from before.
/// The token the change answers opens a socket again; the old one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_closes_the_users_sockets() {
    let s = Server::start(config()).await;
    let (admin, alice, bob, conv) = admin_alice_and_bob(&s).await;
    let mut phone = s.connect(&alice).await;
    let mut tablet = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;

    let changed = change_password(&s, &alice, "Caserne-Nord-2026").await;
    for tab in [&mut phone, &mut tablet] {
        assert_eq!(tab.close_code().await, Some(4010));
    }
    let (st, body) = Client::refused(s.ws_url(&alice.token)).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (401, Some("token_revoked"))
    );
    let new_token = changed["access_token"].as_str().unwrap().to_owned();
    let alice = Person {
        token: new_token,
        ..alice
    };
    let mut again = s.connect(&alice).await;
    // The change reaches this node again, late (as it would from another node, after
    // Alice reconnected with the token the change answered): her new socket stays.
    let (tenant, id) = (alice.actor.tenant_id, alice.actor.user_id);
    let mut tx = s.store.read(tenant).await.unwrap();
    let password = tx.user(id).await.unwrap().unwrap().password_mark();
    drop(tx);
    password_changed_late(&s, &alice, password).await;
    // Bob was not touched; Alice's new socket is served.
    b.ok(
        "send",
        json!({"conversation_id": conv, "content": "tu me reçois ?"}),
    )
    .await;
    let m = again.next("new_message").await;
    assert_eq!(m["message"]["content"], "tu me reçois ?");

    // An admin's reset closes the new socket too; Bob's stays.
    let (st, _) = s
        .call(
            reqwest::Method::PATCH,
            &format!("/api/admin/users/{}", alice.id),
            &admin.token,
            Some(json!({"password": "Garde-du-jour-7"})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(again.close_code().await, Some(4010));
    b.ok("ping", json!({})).await;
    // A new password with a deactivation: closed as deactivated, told not to come back.
    let (st, _) = s
        .call(
            reqwest::Method::PATCH,
            &format!("/api/admin/users/{}", bob.id),
            &admin.token,
            Some(json!({"password": "Garde-du-jour-8", "active": false})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(b.close_code().await, Some(4003));
}

/// A socket that refreshed its token with one for a password set since (the change
/// made elsewhere, its event not here yet) is spared when that change's event arrives;
/// a socket still on the old token is closed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_refreshed_with_the_new_password_survives_its_late_close() {
    let s = Server::start(config()).await;
    let (_admin, alice, bob, conv) = admin_alice_and_bob(&s).await;
    let mut refreshed = s.connect(&alice).await;
    let mut stale = s.connect(&alice).await;
    // The password changes in the store, as on another node whose event is late.
    let (tenant, id) = (alice.actor.tenant_id, alice.actor.user_id);
    let hash = mindsp_server::auth::hash_password(PASSWORD).unwrap();
    let mut tx = s.store.begin(tenant).await.unwrap();
    assert!(tx.set_password_hash(id, &hash).await.unwrap());
    let password = tx.user(id).await.unwrap().unwrap().password_mark();
    tx.commit().await.unwrap();
    let token = s.login("sdis13", "alice@sdis13.fr").await;
    refreshed
        .ok("refresh_token", json!({ "token": token }))
        .await;
    password_changed_late(&s, &alice, password).await;
    assert_eq!(stale.close_code().await, Some(4010));
    let mut b = s.connect(&bob).await;
    b.ok(
        "send",
        json!({"conversation_id": conv, "content": "toujours là ?"}),
    )
    .await;
    let m = refreshed.next("new_message").await;
    assert_eq!(m["message"]["content"], "toujours là ?");
}

/// A password changed by a node whose clock runs an hour ahead (its change time is in
/// the future here): a change made here after it still gets a later mark, so its close
/// reaches the sockets opened for the password before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_one_stamped_by_a_clock_ahead_still_closes_the_sockets() {
    let s = Server::start(config()).await;
    let (_admin, alice, _bob, _conv) = admin_alice_and_bob(&s).await;
    let ahead = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let mut db = s.database_connection().await;
    sqlx::query("UPDATE users SET password_changed_at = ? WHERE id = ?")
        .bind(ahead)
        .bind(alice.actor.user_id.0)
        .execute(&mut db)
        .await
        .unwrap();
    drop(db);
    let alice = Person {
        token: s.login("sdis13", "alice@sdis13.fr").await,
        ..alice
    };
    let mut socket = s.connect(&alice).await;
    let changed = change_password(&s, &alice, "Caserne-Nord-2026").await;
    assert!(changed["access_token"].is_string(), "{changed}");
    assert_eq!(socket.close_code().await, Some(4010));
    let mut tx = s.store.read(alice.actor.tenant_id).await.unwrap();
    let mark = tx
        .user(alice.actor.user_id)
        .await
        .unwrap()
        .unwrap()
        .password_mark();
    assert!(mark > ahead, "{mark} after {ahead}");
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1012_and_exits() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("mindsp-ws-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mindsp-server"))
        .env_remove("MINDSP_JWT_SECRET")
        .env_remove("MINDSP_DATABASE_URL")
        .env("MINDSP_LOG", "info")
        .args([
            "serve",
            "--demo",
            "--no-workers",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
        ])
        .arg(format!("sqlite://{}", dir.join("m.db").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("addr=") {
                let _ = tx.send(
                    line[i + 5..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                );
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("listening");
    let http = reqwest::Client::new();
    let v: Value = http
        .post(format!("http://{addr}/api/auth/login"))
        .json(&json!({"tenant": "sdis13", "email": "admin@sdis13.fr", "password": "Password123!"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["access_token"].as_str().unwrap();
    let mut c = Client::connect(&format!("ws://{addr}/ws?token={token}")).await;
    c.ok("ping", json!({})).await;
    let list: Value = http
        .get(format!("http://{addr}/api/conversations"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv = list["conversations"][0]["id"].as_str().unwrap().to_owned();
    let ack = c
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "avant l'arrêt"}),
        )
        .await;

    let pid = child.id().to_string();
    let signalled_at = mindsp_core::model::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(c.close_code().await, Some(1012));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));

    // The acked message survived: a restarted server has it.
    let store = mindsp_store::open(&format!("sqlite://{}", dir.join("m.db").display()))
        .await
        .unwrap();
    let t = store.tenant_by_slug("sdis13").await.unwrap().unwrap();
    let mut tx = store.read(t.id).await.unwrap();
    let msgs = tx
        .messages(
            conv.parse().unwrap(),
            mindsp_core::model::SeqWindow::Latest,
            5,
        )
        .await
        .unwrap();
    assert_eq!(msgs.last().unwrap().seq, seq(&ack));
    // The admin was connected until the shutdown: the store keeps that as when they
    // were last seen (presence, in memory, is gone with the process).
    let admin: mindsp_core::UserId = v["user"]["id"].as_str().unwrap().parse().unwrap();
    let seen = tx.last_seen_among(&[admin]).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].1 >= signalled_at, "{seen:?} before {signalled_at}");
    drop(tx);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// Messages published out of order around the first one a connection sees live go out
/// once each: a second copy of one (a publish that timed out and came back through
/// Redis) is dropped, and a `resume` afterwards replays only what is still missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_below_the_first_live_one_go_out_once() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let id: mindsp_core::ConversationId = conv.parse().unwrap();
    stored_messages(&s, &alice, id, 12).await;
    let stored = s
        .store
        .read(alice.actor.tenant_id)
        .await
        .unwrap()
        .messages(id, mindsp_core::model::SeqWindow::After(0), 20)
        .await
        .unwrap();
    let mut b = s.connect(&bob).await;
    let hub = s.state.realtime.hub().clone();
    let publish = |seq: i64| {
        hub.deliver(Envelope::to_users(
            bob.actor.tenant_id,
            vec![bob.actor.user_id],
            Event::NewMessage {
                conversation_id: id,
                message: stored[seq as usize - 1].clone(),
            },
        ))
    };
    // 12 is seen first; 11 and 9 come after it, 9 twice; 10 never comes live.
    for seq in [12, 11, 9, 9] {
        publish(seq);
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            b.next("new_message").await["message"]["seq"]
                .as_i64()
                .unwrap(),
        );
    }
    assert_eq!(seen, [12, 11, 9]);
    // The client resumes from 7: only 8 and 10 are missing.
    let ack = b.ok("resume", json!({"cursors": {conv.clone(): 7}})).await;
    let mut replayed = Vec::new();
    for f in b.quiet_except_presence().await {
        if f["type"] == "new_message" {
            replayed.push(f["message"]["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(replayed, [8, 10], "{ack}");
    assert_eq!(ack["replayed"], 2);
    // Live again after the newest.
    publish(12);
    let m = s
        .state
        .messaging
        .send(&alice.actor, id, "m13", None)
        .await
        .unwrap();
    let got = b.next("new_message").await;
    assert_eq!(got["message"]["seq"], m.message().seq);
}

/// When the store cannot be read to replay (a storage fault: here its tables are renamed
/// away for a while), the client is told to read the gap over HTTP (`resync`) rather
/// than miss it, both in a `resume` and when a live message arrives ahead of the one
/// expected; a conversation that cannot be read at all is listed in the ack's `failed`,
/// with nothing changed for it, and resumes once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_the_store_cannot_serve_asks_for_a_resync() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let id: mindsp_core::ConversationId = conv.parse().unwrap();
    stored_messages(&s, &alice, id, 8).await;
    let mut b = s.connect(&bob).await;
    let mut db = s.database_connection().await;
    let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
    sqlx::query(&rename("messages", "messages_away"))
        .execute(&mut db)
        .await
        .unwrap();

    let ack = b.ok("resume", json!({"cursors": {conv.clone(): 2}})).await;
    assert_eq!(ack["resync"], json!([conv]), "{ack}");
    let told = b.next("resync").await;
    assert_eq!(
        (told["from_seq"].as_i64(), told["last_seq"].as_i64()),
        (Some(2), Some(8))
    );

    // A live message ahead of the next one expected: the gap cannot be read either.
    s.state
        .realtime
        .hub()
        .deliver(message_to(&bob, &alice, &conv, 11, "m11"));
    let first = b.next_any().await;
    assert_eq!(first["type"], "resync", "told before the message: {first}");
    assert_eq!(
        (first["from_seq"].as_i64(), first["last_seq"].as_i64()),
        (Some(8), Some(10))
    );
    assert_eq!(b.next("new_message").await["message"]["seq"], 11);

    // A conversation that cannot be read at all.
    sqlx::query(&rename("conversations", "conversations_away"))
        .execute(&mut db)
        .await
        .unwrap();
    let ack = b.ok("resume", json!({"cursors": {conv.clone(): 11}})).await;
    assert_eq!(ack["failed"], json!([conv]), "{ack}");
    for (away, table) in [
        ("conversations_away", "conversations"),
        ("messages_away", "messages"),
    ] {
        sqlx::query(&rename(away, table))
            .execute(&mut db)
            .await
            .unwrap();
    }
    let ack = b.ok("resume", json!({"cursors": {conv.clone(): 6}})).await;
    assert_eq!(
        (ack["failed"].clone(), ack["replayed"].clone()),
        (json!([]), json!(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_pinged_and_reaped() {
    let mut cfg = config();
    cfg.ws.ping_interval = Duration::from_millis(200);
    cfg.ws.idle_timeout = Duration::from_secs(1);
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let mut silent = s.connect(&admin).await;
    let mut alive = s.connect(&admin).await;
    // `alive` reads (its client answers pings); `silent` does not read at all.
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1800) {
        alive.drain().await;
    }
    alive.ok("ping", json!({})).await;
    assert_eq!(silent.close_code().await, Some(4002));
}

/// A conversation too far behind its cursor is not replayed over the socket: the client
/// gets `resync` and reads the history over HTTP; live events go on from the newest
/// message, and a conversation within the limit is replayed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_far_behind_asks_for_a_resync_instead_of_a_long_replay() {
    let mut cfg = config();
    cfg.ws.max_resume_messages = 10;
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let far = s.group(&alice, &[&bob]).await;
    let near = s.group(&alice, &[&bob]).await;
    let (far_id, near_id): (mindsp_core::ConversationId, mindsp_core::ConversationId) =
        (far.parse().unwrap(), near.parse().unwrap());
    for i in 1..=15 {
        s.state
            .messaging
            .send(&alice.actor, far_id, &format!("f{i}"), None)
            .await
            .unwrap();
    }
    for i in 1..=5 {
        s.state
            .messaging
            .send(&alice.actor, near_id, &format!("n{i}"), None)
            .await
            .unwrap();
    }
    let mut b = s.connect(&bob).await;
    let id = b
        .command(
            "resume",
            json!({"cursors": {far.clone(): 0, near.clone(): 0}}),
        )
        .await;
    let acked = b.reply_to(&id).await;
    assert_eq!(acked["resync"], json!([far]), "{acked}");
    assert_eq!(acked["replayed"], 5, "{acked}");
    let resync = b.next("resync").await;
    assert_eq!(resync["conversation_id"], far.as_str());
    assert_eq!(
        (resync["from_seq"].as_i64(), resync["last_seq"].as_i64()),
        (Some(0), Some(15))
    );
    let mut replayed = Vec::new();
    for _ in 0..5 {
        let f = b.next("new_message").await;
        assert_eq!(
            f["conversation_id"],
            near.as_str(),
            "nothing of the far one: {f}"
        );
        replayed.push(seq(&f));
    }
    assert_eq!(replayed, vec![1, 2, 3, 4, 5]);
    // Live messages of the far conversation continue from its newest.
    s.state
        .messaging
        .send(&alice.actor, far_id, "f16", None)
        .await
        .unwrap();
    let live = b.next("new_message").await;
    assert_eq!(
        (live["conversation_id"].as_str(), seq(&live)),
        (Some(far.as_str()), 16)
    );
}

/// A client that falls behind misses typing and presence instead of being cut off, and
/// is told so once it has caught up; no message is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_misses_presence_and_is_told_once_caught_up() {
    use mindsp_core::events::{Audience, Envelope, Event, PresenceStatus};
    let mut cfg = config();
    cfg.ws.queue_capacity = 64;
    let s = Server::start(cfg).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();
    let hub = s.state.realtime.hub().clone();

    // Bob does not read: messages fill his socket, then his queue; a presence event
    // after each one is queued while his queue is under half full, skipped after.
    let mut behind = s.connect(&bob).await;
    let text = "intervention en cours, renfort demandé ".repeat(80);
    let mut sent = 0;
    while hub.skipped_ephemeral() == 0 {
        assert!(sent < 20_000, "Bob's queue never reached half full");
        s.state
            .messaging
            .send(&alice.actor, cid, &text, None)
            .await
            .unwrap();
        sent += 1;
        hub.deliver(Envelope {
            tenant: alice.actor.tenant_id,
            audience: Audience::Tenant,
            event: Event::Presence {
                user_id: mindsp_core::UserId::new(),
                status: PresenceStatus::Online,
                last_seen: None,
                version: 0,
            },
        });
    }
    assert_eq!(hub.slow_disconnects(), 0, "nobody was cut off");

    // Reading at last, Bob gets every message, then the notice, once.
    let notice = behind.next("events_skipped").await;
    assert_eq!(notice["events"], json!(["typing", "presence"]));
    let kept = behind.drain().await;
    let messages = kept.iter().filter(|f| f["type"] == "new_message").count();
    assert_eq!(messages, sent, "every message arrived");
    assert!(kept.iter().all(|f| f["type"] != "events_skipped"));
    behind.ok("ping", json!({})).await;
}

/// A message that reaches a new connection live before its `resume` is not sent again
/// by the replay: the replay sends only the older ones the client lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_live_message_sends_each_message_once() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();
    let send = |i: usize| {
        let messaging = s.state.messaging.clone();
        let actor = alice.actor;
        async move {
            messaging
                .send(&actor, cid, &format!("m{i}"), None)
                .await
                .unwrap()
        }
    };
    let cursor = send(0).await.message().seq;
    for i in 1..=30 {
        send(i).await;
    }

    // Bob connects; a live message arrives before his resume does.
    let mut b = s.connect(&bob).await;
    send(31).await;
    let live = b.next("new_message").await;
    assert_eq!(live["message"]["content"], "m31");
    let ack = b
        .ok("resume", json!({"cursors": {conv.clone(): cursor}}))
        .await;
    assert_eq!(ack["replayed"], 30, "{ack}");
    send(32).await;
    b.next_where("new_message", |f| f["message"]["content"] == "m32")
        .await;
    let mut contents: Vec<String> = b
        .drain()
        .await
        .iter()
        .filter(|f| f["type"] == "new_message")
        .map(|f| f["message"]["content"].as_str().unwrap().to_owned())
        .collect();
    contents.sort_by_key(|c| c[1..].parse::<u32>().unwrap());
    let want: Vec<String> = (1..=30).map(|i| format!("m{i}")).collect();
    assert_eq!(contents, want, "the 30 older ones once, and m31 not again");
}

/// Alice and Bob in a group, Bob connected and past a first message `m0` that reached
/// him live, then `m1`..`mN` stored by a service that publishes nothing: they reach Bob
/// only as the test publishes them ([`Quiet::publish`]).
struct Quiet<'a> {
    s: &'a Server,
    alice: Person,
    bob: Person,
    conv: mindsp_core::ConversationId,
    first_seq: i64,
    stored: Vec<mindsp_core::model::Message>,
}

impl<'a> Quiet<'a> {
    /// The setting, and Bob's client.
    async fn new(s: &'a Server, n: usize) -> (Self, Client) {
        let (alice, bob, conv) = alice_and_bob(s).await;
        let conv: mindsp_core::ConversationId = conv.parse().unwrap();
        let mut b = s.connect(&bob).await;
        let first = s
            .state
            .messaging
            .send(&alice.actor, conv, "m0", None)
            .await
            .unwrap();
        assert_eq!(b.next("new_message").await["message"]["content"], "m0");
        let quiet =
            mindsp_core::Messaging::new(s.store.clone(), s.state.messaging.limits().clone());
        let mut stored = Vec::new();
        for i in 1..=n {
            let m = quiet
                .send(&alice.actor, conv, &format!("m{i}"), None)
                .await
                .unwrap();
            stored.push(m.message().clone());
        }
        let q = Self {
            s,
            alice,
            bob,
            conv,
            first_seq: first.message().seq,
            stored,
        };
        (q, b)
    }

    /// Publishes `event` to Bob, as the service would after a commit.
    async fn publish(&self, event: Event) {
        let to_bob = Envelope::to_users(
            self.alice.actor.tenant_id,
            vec![self.bob.actor.user_id],
            event,
        );
        self.s.state.realtime.publish(to_bob).await;
    }
}

/// Messages published out of order (the commits of one batch are published by several
/// tasks, in any order) reach a client once each and in order: one ahead of the next
/// expected waits for its predecessor to arrive live, or is preceded by it read from
/// the store when it never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_out_of_order_arrive_once_and_in_order() {
    let s = Server::start(config()).await;
    let (q, mut b) = Quiet::new(&s, 7).await;
    let publish = |i: usize| {
        q.publish(Event::NewMessage {
            conversation_id: q.conv,
            message: q.stored[i - 1].clone(),
        })
    };
    // m2 before m1; m4 and m5 never published, m6 then m7.
    publish(2).await;
    publish(1).await;
    publish(3).await;
    publish(7).await;
    publish(6).await;

    let mut got = Vec::new();
    for _ in 1..=7 {
        got.push(b.next("new_message").await);
    }
    let contents: Vec<&str> = got
        .iter()
        .map(|f| f["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
    let seqs: Vec<i64> = got.iter().map(seq).collect();
    let want: Vec<i64> = (1..=7).map(|i| q.first_seq + i).collect();
    assert_eq!(seqs, want);
    // Nothing twice.
    b.ok("ping", json!({})).await;
    let again = b.drain().await;
    assert!(
        again.iter().all(|f| f["type"] != "new_message"),
        "{again:?}"
    );
}

/// A client that closes gets the server's close frame back (a clean close, not a
/// dropped connection), even though the server gathers its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_a_close_frame() {
    use futures::StreamExt;

    let s = Server::start(config()).await;
    let (alice, _bob, _conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    a.ws.close(None).await.unwrap();
    let answer = tokio::time::timeout(wsclient::WAIT, a.ws.next())
        .await
        .expect("the server answers within the wait");
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "expected the server's close frame, got {answer:?}"
    );
}

/// A message longer than one frame (the server sends it in fragments) arrives whole, to
/// the other member and in the sender's acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_message_arrives_whole() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;
    // 3,840 characters (3,900 bytes, accents included): several fragments.
    let text = "Feu de broussailles, secteur Sainte-Victoire : renfort demandé. ".repeat(60);
    let ack = a
        .ok("send", json!({"conversation_id": conv, "content": text}))
        .await;
    let got = b.next("new_message").await;
    assert_eq!(got["message"]["content"], text.as_str());
    assert_eq!(seq(&got), seq(&ack));
}

/// A read marker never overtakes a message held for a gap: published right after a
/// message whose predecessor was not published, it reaches the client after both (the
/// predecessor read from the store). On a current-thread runtime the two envelopes are
/// queued before the connection's writer runs, so they land in one batch.
#[tokio::test]
async fn a_read_marker_waits_for_the_messages_held_before_it() {
    let s = Server::start(config()).await;
    let (q, mut b) = Quiet::new(&s, 2).await;
    // m2 alone is published, then a read marker up to it.
    let m2 = q.stored[1].clone();
    q.publish(Event::NewMessage {
        conversation_id: q.conv,
        message: m2.clone(),
    })
    .await;
    q.publish(Event::MessageRead {
        conversation_id: q.conv,
        user_id: q.alice.actor.user_id,
        seq: m2.seq,
        unread: None,
    })
    .await;
    let mut order = Vec::new();
    while order.len() < 3 {
        let f = b.next_any().await;
        match f["type"].as_str().unwrap() {
            "new_message" => order.push(f["message"]["content"].as_str().unwrap().to_owned()),
            "message_read" => order.push("message_read".to_owned()),
            _ => {}
        }
    }
    assert_eq!(order, ["m1", "m2", "message_read"]);
    assert_eq!(m2.seq, q.first_seq + 2);
}

/// When events may have been lost on their way to a node (it lost its link to the other
/// nodes, `Hub::events_lost`), its connections get `events_skipped` naming every kind,
/// and the node checks the accounts connected to it: a deactivation lost on its way
/// closes that user's sockets then, with 4003, and a password change with 4010.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_on_the_way_close_deactivated_accounts_and_clients_catch_up() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let admin = s.tenant("sdis83").await;
    let carol = s.user(&admin, "sdis83", "Carol").await;
    let mut a = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;
    let mut c = s.connect(&carol).await;
    // Bob is deactivated in the store and Carol's password changes, and the events that
    // would close their sockets are lost (nothing is published).
    let mut tx = s.store.begin(bob.actor.tenant_id).await.unwrap();
    tx.set_user_active(bob.actor.user_id, false).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = s.store.begin(carol.actor.tenant_id).await.unwrap();
    tx.set_password_hash(carol.actor.user_id, "a-new-hash")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    b.ok("ping", json!({})).await;
    c.ok("ping", json!({})).await;

    s.state.realtime.hub().events_lost();
    let told = a.next("events_skipped").await;
    let kinds: Vec<&str> = told["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(kinds, mindsp_realtime::hub::RELAYED_KINDS);
    assert_eq!(b.close_code().await, Some(4003));
    assert_eq!(c.close_code().await, Some(4010));
    // Alice's connection carries on.
    let sent = a
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "toujours là"}),
        )
        .await;
    assert_eq!(sent["message"]["content"], "toujours là");
}

/// One user keeps at most `max_connections_per_user` connections on a node: one more
/// closes their oldest (4009) and they stay online for the others; the node's own cap
/// refuses upgrades with 503 `server_full`, REST still answers, and a connection that
/// goes makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_user_and_per_node() {
    let mut cfg = config();
    cfg.ws.max_connections_per_user = 2;
    cfg.ws.max_connections = 4;
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let carol = s.user(&admin, "sdis13", "Carol").await;
    let conv = s.group(&alice, &[&bob]).await;
    let mut b = s.connect(&bob).await;
    let mut tab1 = s.connect(&alice).await;
    b.next_where("presence", |f| f["user_id"] == alice.id.as_str())
        .await;
    let mut tab2 = s.connect(&alice).await;
    let mut tab3 = s.connect(&alice).await;
    assert_eq!(
        tab1.close_code().await,
        Some(4009),
        "the oldest tab is closed"
    );
    b.ok(
        "send",
        json!({"conversation_id": conv, "content": "toujours là ?"}),
    )
    .await;
    for tab in [&mut tab2, &mut tab3] {
        let m = tab.next("new_message").await;
        assert_eq!(m["message"]["content"], "toujours là ?");
    }
    let told = b.drain().await;
    assert!(
        !told.iter().any(|f| f["type"] == "presence"),
        "alice never went offline: {told:?}"
    );

    // Bob and two tabs of Alice, and the closed tab until it is gone: then Carol fits.
    let url = s.ws_url(&carol.token);
    let mut c = connect_when_room(&url).await;
    c.ok("ping", json!({})).await;
    // Four: the next one is refused before any socket, and REST still answers.
    let (status, body) = Client::refused(url.as_str()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("server_full"))
    );
    let (status, _) = s
        .call(
            reqwest::Method::GET,
            "/api/conversations",
            &carol.token,
            None,
        )
        .await;
    assert_eq!(status, 200);
    drop(tab3);
    let mut again = connect_when_room(&url).await;
    again.ok("ping", json!({})).await;
    tab2.ok("ping", json!({})).await;
}

/// Connects to `url` once the node has room (it answers 503 `server_full` meanwhile),
/// within 10 s.
async fn connect_when_room(url: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Client::try_connect(url).await {
            Ok(c) => return c,
            Err((503, body)) if tokio::time::Instant::now() < deadline => {
                assert_eq!(body["error"]["code"], "server_full", "{body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(answer) => panic!("no room: {answer:?}"),
        }
    }
}

/// A client that stops reading while its system still answers (a frozen app): once a
/// write to it has found no room for the write timeout, its connection goes, and its
/// slot on the node with it. Its queue is large enough never to overflow (no 4008), and
/// its writer, blocked in a write, could not act on the idle timeout that passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    const EVENTS: i64 = 8_000;
    let mut cfg = config();
    cfg.ws.queue_capacity = 2 * EVENTS as usize;
    cfg.ws.idle_timeout = Duration::from_secs(1);
    cfg.ws.max_connections = 1;
    let limits = mindsp_server::ConnectionLimits {
        write_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let s = Server::start_with(cfg, limits).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let _frozen = s.connect(&bob).await;
    let hub = s.state.realtime.hub().clone();
    // About 24 MB, more than the two sockets' buffers hold.
    let text = "feu de broussailles, renfort demandé ".repeat(80);
    for seq in 1..=EVENTS {
        hub.deliver(message_to(&bob, &alice, &conv, seq, &text));
    }
    let mut next = connect_when_room(&s.ws_url(&alice.token)).await;
    next.ok("ping", json!({})).await;
    assert_eq!(hub.slow_disconnects(), 0, "not cut as too slow");
}

/// A client that asks for an upgrade and goes at once (before reading the 101, or
/// right after it) gives its slot back: the node has only one here, and a real
/// connection gets it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_abandoned_by_their_client_give_their_slot_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for read_first in [false, true] {
        let mut cfg = config();
        cfg.ws.max_connections = 1;
        let s = Server::start(cfg).await;
        let (alice, _, _) = alice_and_bob(&s).await;
        let request = format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            alice.token, s.addr
        );
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        if read_first {
            let mut answer = [0u8; 12];
            tcp.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"HTTP/1.1 101");
        }
        drop(tcp);
        let mut c = connect_when_room(&s.ws_url(&alice.token)).await;
        c.ok("ping", json!({})).await;
    }
}

/// Takes the database's write lock on `db` (until its `COMMIT`): the commits of the
/// server wait meanwhile.
async fn hold_writes(db: &mut sqlx::SqliteConnection) {
    sqlx::query("BEGIN IMMEDIATE").execute(db).await.unwrap();
}

/// A message whose sender is cut off while it commits still reaches the other members
/// once committed: over the socket when the node closes the connection meanwhile, over
/// REST when the request's deadline passes meanwhile. (The database is locked for a
/// moment by another connection, so the commit waits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cut_off_while_it_commits_is_still_published() {
    let mut cfg = config();
    cfg.request_timeout = Duration::from_millis(300);
    // The close waits this long for the send under way (see the next test).
    cfg.ws.close_timeout = Duration::from_millis(500);
    let s = Server::start(cfg).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;
    let mut db = s.database_connection().await;

    hold_writes(&mut db).await;
    a.command(
        "send",
        json!({"conversation_id": conv, "content": "par le socket"}),
    )
    .await;
    // The send is waiting for the database; the node closes the socket.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hub = s.state.realtime.hub();
    hub.close_user(
        alice.actor.tenant_id,
        alice.actor.user_id,
        mindsp_realtime::CloseReason::Superseded,
    );
    assert_eq!(a.close_code().await, Some(4009));
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    let m = b.next("new_message").await;
    assert_eq!(m["message"]["content"], "par le socket");

    hold_writes(&mut db).await;
    let (status, body) = s
        .call(
            reqwest::Method::POST,
            &format!("/api/conversations/{conv}/messages"),
            &alice.token,
            Some(json!({"content": "par REST"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (408, Some("request_timeout"))
    );
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    let m = b.next("new_message").await;
    assert_eq!(m["message"]["content"], "par REST");
}

/// When the node closes a connection (4003 here: the account was just deactivated;
/// 1012 at SIGTERM, 4009, 4010) while a `send` on it is committing, the command
/// finishes and its ack goes out before the close frame: a client told its message is
/// stored need not send it again. What the client sends once the close is asked is not
/// carried out: a stolen token's socket cannot pipeline commands into the seconds its
/// close takes. (The database is locked by another connection for a moment, so the
/// commit waits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_client_sends_after_its_close_is_asked_is_carried_out() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    let mut db = s.database_connection().await;
    hold_writes(&mut db).await;
    let id = a
        .command(
            "send",
            json!({"conversation_id": conv, "content": "juste avant"}),
        )
        .await;
    // The send is under way, waiting for the database.
    commands_running(&s, 1).await;
    s.state.realtime.hub().close_user(
        alice.actor.tenant_id,
        alice.actor.user_id,
        mindsp_realtime::CloseReason::Deactivated,
    );
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"conversation_id": conv, "content": format!("après {i}")});
        ids.push(a.command("send", body).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    let ack = a.reply_to(&id).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut frames = Vec::new();
    let code = loop {
        match tokio::time::timeout(wsclient::WAIT, a.ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(Message::Text(t)))) => frames.push(t.to_string()),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(4003));
    assert!(
        frames
            .iter()
            .all(|f| !ids.iter().any(|id| f.contains(&id.to_string()))),
        "answered after the close: {frames:?}"
    );
    let cid = conv.parse().unwrap();
    let stored = s
        .state
        .messaging
        .history(
            &bob.actor,
            cid,
            mindsp_core::model::SeqWindow::Latest,
            Some(50),
        )
        .await
        .unwrap();
    let contents: Vec<&str> = stored.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["juste avant"]);
}

/// At a stop, a command cut off from its client (its socket closed with 1012 while it
/// waited for the database) finishes before the node goes on to close its broker:
/// `finish_commands` waits for it, so what it commits is also published while other
/// nodes can still hear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_the_commands_still_committing() {
    let mut cfg = config();
    cfg.ws.close_timeout = Duration::from_millis(300);
    let s = Server::start(cfg).await;
    let (alice, _bob, conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    let mut db = s.database_connection().await;
    hold_writes(&mut db).await;
    a.command(
        "send",
        json!({"conversation_id": conv, "content": "pendant l'arrêt"}),
    )
    .await;
    commands_running(&s, 1).await;
    // The stop (as `close_websockets` begins it; its `last_seen` write would wait for
    // the database too): the socket closes once its close timeout is over, the send
    // still waiting.
    s.state.realtime.shutdown().await;
    assert_eq!(a.close_code().await, Some(1012));
    let state = s.state.clone();
    let finishing =
        tokio::spawn(async move { state.finish_commands(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!finishing.is_finished(), "the send is still committing");
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    assert!(finishing.await.unwrap());
    let (status, page) = s
        .call(
            reqwest::Method::GET,
            &format!("/api/conversations/{conv}/messages"),
            &alice.token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["content"], "pendant l'arrêt", "{page}");

    // The same for a REST change still committing.
    hold_writes(&mut db).await;
    let post = {
        let (http, url, token) = (
            s.http.clone(),
            format!("http://{}/api/conversations/{conv}/messages", s.addr),
            alice.token.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"content": "par REST pendant l'arrêt"}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    commands_running(&s, 1).await;
    let state = s.state.clone();
    let finishing =
        tokio::spawn(async move { state.finish_commands(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !finishing.is_finished(),
        "the REST send is still committing"
    );
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    assert!(finishing.await.unwrap());
    assert_eq!(post.await.unwrap(), 201);
}

/// Waits (at most 10 s) until `n` commands run on tasks of their own.
async fn commands_running(s: &Server, n: usize) {
    for _ in 0..1000 {
        if s.state.commands_running() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} commands never ran at once");
}

/// A client that only listens answers nothing but pings: it must be pinged even while
/// its connection's queue is never empty (else it is closed as silent, 4002, after the
/// idle timeout). The writer always has events waiting here, and pings still go out
/// among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_a_queue_never_empty_is_still_pinged() {
    const EVENTS: usize = 300_000;
    let mut cfg = config();
    cfg.ws.ping_interval = Duration::from_millis(10);
    cfg.ws.idle_timeout = Duration::from_secs(60);
    cfg.ws.queue_capacity = EVENTS + 1;
    let s = Server::start(cfg).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let mut b = s.connect(&bob).await;
    let hub = s.state.realtime.hub().clone();
    // Bob reads nothing yet: the socket's buffers fill (a few MB, a small part of these
    // 50 MB) and the rest waits in the queue.
    for seq in 1..=EVENTS as i64 {
        hub.deliver(Envelope::to_users(
            bob.actor.tenant_id,
            vec![bob.actor.user_id],
            Event::MessageRead {
                conversation_id: conv.parse().unwrap(),
                user_id: alice.actor.user_id,
                seq,
                unread: None,
            },
        ));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // From the moment the writer could write again, its queue held events until the
    // last: pings written past the socket's buffers came from a busy writer.
    let (mut read, mut pings_among) = (0, 0);
    while read < EVENTS {
        match tokio::time::timeout(Duration::from_secs(30), b.ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => read += 1,
            Ok(Some(Ok(Message::Ping(_)))) if read > EVENTS / 3 => pings_among += 1,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("after {read} events: {other:?}"),
        }
    }
    assert!(
        pings_among > 0,
        "no ping among the last two thirds of the events"
    );
    b.ok("ping", json!({})).await;
}

/// A client that does not read, cut off (4008) while its socket is full, can neither take
/// our close frame nor answer it: its socket, and its slot on the node, go once that
/// frame's timeout is over, without waiting a second time for an answer that cannot
/// come (that took about 2 × the close timeout + 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_take_the_close_frame_is_let_go_after_one_timeout() {
    let mut cfg = config();
    cfg.ws.queue_capacity = 8;
    cfg.ws.close_timeout = Duration::from_secs(3);
    cfg.ws.max_connections = 1;
    let s = Server::start(cfg).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let _deaf = s.connect(&bob).await;
    let hub = s.state.realtime.hub().clone();
    // Long messages, a few at a time, so that the writer keeps up until the socket is
    // full (Bob reads nothing): only then does its queue fill.
    let text = "feu de broussailles, renfort demandé ".repeat(80);
    let mut seq = 0;
    while hub.slow_disconnects() == 0 {
        assert!(seq < 200_000, "the client was never cut off");
        for _ in 0..4 {
            seq += 1;
            hub.deliver(message_to(&bob, &alice, &conv, seq, &text));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cut = tokio::time::Instant::now();
    let mut next = connect_when_room(&s.ws_url(&alice.token)).await;
    let waited = cut.elapsed();
    assert!(
        waited < Duration::from_millis(5500),
        "the node's only slot was free again after {waited:?}"
    );
    next.ok("ping", json!({})).await;
}

/// Gap-free resume under fire. Three members send 480 messages with short random
/// pauses, concurrently (commits of one batch are published in any order), while Bob's
/// client drops its connection again and again after a random few milliseconds,
/// mid-replay included, and comes back with `resume` and the `seq` below which it
/// holds every message. On each connection Bob gets no message twice; once the resume
/// is acked (its replay done) he holds every message from his cursor up to the newest
/// he got there; after the ack each message is the one after the last; and in the end
/// he has them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_under_live_traffic_and_repeated_drops_is_gap_free() {
    const EACH: usize = 160;
    let s = Server::start(config()).await;
    let admin = s.tenant("sdis13").await;
    let mut senders = Vec::new();
    for name in ["Ana", "Bea", "Cyr"] {
        senders.push(s.user(&admin, "sdis13", name).await);
    }
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let members: Vec<&Person> = senders.iter().chain([&bob]).collect();
    let conv = s.group(&admin, &members).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        | 1;
    // xorshift: enough for pauses and lifetimes. The seed is in every failure message,
    // though timing decides as much as it does.
    let random = move |state: &mut u32| {
        *state ^= *state << 13;
        *state ^= *state >> 17;
        *state ^= *state << 5;
        *state
    };
    let sending: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(k, who)| {
            let (messaging, actor) = (s.state.messaging.clone(), who.actor);
            let mut state = (seed ^ (k as u32 + 1).wrapping_mul(0x9E37_79B9)) | 1;
            tokio::spawn(async move {
                for i in 0..EACH {
                    let pause = random(&mut state) % 12;
                    tokio::time::sleep(Duration::from_millis(pause.into())).await;
                    messaging
                        .send(&actor, cid, &format!("{k}-{i}"), None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let total = (EACH * senders.len()) as i64;

    let mut have = std::collections::BTreeSet::new();
    let mut state = seed;
    let (mut rounds, mut acked_rounds) = (0, 0);
    let finished = tokio::time::Instant::now() + Duration::from_secs(120);
    while have.len() < total as usize {
        assert!(
            tokio::time::Instant::now() < finished,
            "seed {seed}: still missing {} after {rounds} connections",
            total - have.len() as i64
        );
        rounds += 1;
        let cursor = (1..).find(|n| !have.contains(n)).unwrap() - 1;
        let sent_all = sending.iter().all(tokio::task::JoinHandle::is_finished);
        // Short lives while messages flow; long enough to finish once they stop.
        let life = if sent_all {
            Duration::from_secs(5)
        } else {
            // A third of them barely open: their replay is cut short.
            let most = if random(&mut state) % 3 == 0 { 3 } else { 30 };
            Duration::from_millis((random(&mut state) % most).into())
        };
        let mut c = Client::connect(&s.ws_url(&bob.token)).await;
        let id = c
            .command("resume", json!({"cursors": {conv.clone(): cursor}}))
            .await;
        let deadline = tokio::time::Instant::now() + life;
        let (mut before_ack, mut after_ack) = (Vec::new(), Vec::new());
        let mut acked = false;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, c.ws.next()).await {
            let Message::Text(text) = frame else { continue };
            let f: Value = serde_json::from_str(text.as_str()).unwrap();
            match f["type"].as_str().unwrap() {
                "new_message" => {
                    assert_eq!(f["conversation_id"], conv.as_str());
                    let seq = f["message"]["seq"].as_i64().unwrap();
                    if acked {
                        after_ack.push(seq);
                    } else {
                        before_ack.push(seq);
                    }
                }
                "ack" if f["id"] == id => acked = true,
                "presence" | "conversation_updated" => {}
                other => panic!("seed {seed}: unexpected {other}: {f}"),
            }
            if sent_all
                && acked
                && have.len() + after_ack.len() + before_ack.len() >= total as usize
            {
                // Everything may be here: look once more below, with a fresh cursor.
                break;
            }
        }
        drop(c);
        if !sent_all {
            // Away for a moment: the next replay is longer, and may be cut in turn.
            let away = random(&mut state) % 60;
            tokio::time::sleep(Duration::from_millis(away.into())).await;
        }
        let got: Vec<i64> = before_ack.iter().chain(&after_ack).copied().collect();
        let unique: std::collections::BTreeSet<i64> = got.iter().copied().collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "seed {seed}: twice on one connection from {cursor}: {got:?}"
        );
        if acked {
            acked_rounds += 1;
            // The replay is done at the ack: no hole from the cursor to the newest.
            let newest = before_ack
                .iter()
                .copied()
                .max()
                .unwrap_or(cursor)
                .max(cursor);
            for n in cursor + 1..=newest {
                assert!(
                    unique.contains(&n),
                    "seed {seed}: {n} missing after resume from {cursor}: {before_ack:?}"
                );
            }
            // Then live, each the next one.
            let mut last = newest;
            for &n in &after_ack {
                assert_eq!(
                    n,
                    last + 1,
                    "seed {seed}: after the ack from {cursor}: {after_ack:?}"
                );
                last = n;
            }
        }
        have.extend(unique);
    }
    for task in sending {
        task.await.unwrap();
    }
    assert_eq!(have, (1..=total).collect(), "seed {seed}");
    // The test meant something: connections were dropped mid-flow, and replays finished.
    assert!(
        rounds > 5 && acked_rounds >= 1,
        "seed {seed}: {rounds} connections, {acked_rounds} acked"
    );
}

/// A text frame that is not UTF-8 closes the connection with 1007, a continuation with
/// nothing to continue with 1002 (RFC 6455, section 7.4.1): the client learns why,
/// rather than a close without a code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_their_codes() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let s = Server::start(config()).await;
    let (alice, _bob, _conv) = alice_and_bob(&s).await;
    let not_utf8 = Frame::message(vec![b'{', 0xC3, 0x28, b'}'], OpCode::Data(Data::Text), true);
    let orphan = Frame::message(b"suite".to_vec(), OpCode::Data(Data::Continue), true);
    for (frame, code) in [(not_utf8, 1007), (orphan, 1002)] {
        let mut c = s.connect(&alice).await;
        c.ws.send(Message::Frame(frame)).await.unwrap();
        assert_eq!(c.close_code().await, Some(code));
    }
}

/// A `resume` is charged a command per 25 cursors beyond its first (each costs the
/// store a read or more), as debt if need be: one of the 1,000 allowed goes through,
/// then the bucket (40) is empty and the next command is refused with `rate_limited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_is_charged_by_its_cursors() {
    let mut cfg = config();
    // Slow refills: the ping after the resume finds the bucket still in debt however
    // long the resume's read of its cursors took.
    cfg.ws.rate_per_sec = 1;
    let s = Server::start(cfg).await;
    let (alice, _bob, _conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    let cursors: serde_json::Map<String, Value> = (0..1000)
        .map(|_| (mindsp_core::ConversationId::new().to_string(), json!(0)))
        .collect();
    let resume = a.command("resume", json!({ "cursors": cursors })).await;
    let ping = a.command("ping", json!({})).await;
    // The writer answers in order: the resume's ack first.
    let ack = a.reply_to(&resume).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["not_found"].as_array().unwrap().len(), 1000);
    let refused = a.reply_to(&ping).await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
}

/// A resume cursor beyond the conversation's newest message (a store restored from a
/// backup, a client's mistake) is taken as that message: the client is told to read
/// the conversation again (`resync` from 0), and the next message reaches it rather
/// than be dropped as one it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_of_the_store_is_brought_back() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();
    s.state
        .messaging
        .send(&alice.actor, cid, "premier", None)
        .await
        .unwrap();
    let mut b = s.connect(&bob).await;
    let ack = b
        .ok("resume", json!({"cursors": {conv.clone(): 500}}))
        .await;
    assert_eq!(ack["resync"], json!([conv]), "{ack}");
    let resync = b.next("resync").await;
    assert_eq!(
        (resync["from_seq"].as_i64(), resync["last_seq"].as_i64()),
        (Some(0), Some(1))
    );
    s.state
        .messaging
        .send(&alice.actor, cid, "deuxième", None)
        .await
        .unwrap();
    let live = b.next("new_message").await;
    assert_eq!(live["message"]["seq"], 2, "{live}");
}

/// A removed member hears nothing more of the conversation once told of the removal,
/// not even events published late (a send whose audience was read just before the
/// removal); and once added back, they get its messages again even when one is
/// published before the change's own event reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_late_do_not_reach_a_removed_member() {
    let s = Server::start(config()).await;
    let (alice, bob, conv) = alice_and_bob(&s).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();
    let mut b = s.connect(&bob).await;
    let rt = &s.state.realtime;
    rt.publish(message_to(&bob, &alice, &conv, 1, "avant"))
        .await;
    assert_eq!(b.next("new_message").await["message"]["content"], "avant");

    s.state
        .messaging
        .remove_member(&alice.actor, cid, bob.actor.user_id)
        .await
        .unwrap();
    b.next_where("conversation_updated", |f| {
        f["removed"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    rt.publish(message_to(&bob, &alice, &conv, 2, "en retard"))
        .await;
    rt.publish(Envelope::to_users(
        bob.actor.tenant_id,
        vec![bob.actor.user_id],
        Event::Typing {
            conversation_id: cid,
            user_id: alice.actor.user_id,
            state: mindsp_core::events::TypingState::Start,
        },
    ))
    .await;

    // Added back by a service that publishes nothing: the change's event is still on
    // its way when the next message reaches Bob.
    let quiet = mindsp_core::Messaging::new(s.store.clone(), s.state.messaging.limits().clone());
    quiet
        .add_members(&alice.actor, cid, &[bob.actor.user_id])
        .await
        .unwrap();
    rt.publish(message_to(&bob, &alice, &conv, 3, "de retour"))
        .await;
    let next = b.next("new_message").await;
    assert_eq!(next["message"]["content"], "de retour", "{next}");
    let heard: Vec<Value> = b.drain().await;
    assert!(
        heard
            .iter()
            .all(|f| f["type"] != "typing" && f["type"] != "new_message"),
        "{heard:?}"
    );
}

/// When the store cannot say who shares a conversation with a user who goes offline,
/// the whole tenant is told rather than nobody: otherwise colleagues would see them
/// online for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_is_told_to_the_tenant_when_contacts_cannot_be_read() {
    let s = Server::start(config()).await;
    let (alice, bob, _conv) = alice_and_bob(&s).await;
    let mut a = s.connect(&alice).await;
    let b = s.connect(&bob).await;
    a.next_where("presence", |f| {
        f["user_id"] == bob.id.as_str() && f["status"] == "online"
    })
    .await;
    let mut db = s.database_connection().await;
    sqlx::query("ALTER TABLE conversation_members RENAME TO members_away")
        .execute(&mut db)
        .await
        .unwrap();
    drop(b);
    let offline = a
        .next_where("presence", |f| f["user_id"] == bob.id.as_str())
        .await;
    assert_eq!(offline["status"], "offline", "{offline}");
    sqlx::query("ALTER TABLE members_away RENAME TO conversation_members")
        .execute(&mut db)
        .await
        .unwrap();
}
