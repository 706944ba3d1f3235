//! The REST API as a client sees it: statuses, error codes, and that refused requests
//! write nothing.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::{PASSWORD, SECRET, TestApp};
use serde_json::{Value, json};

async fn group(app: &TestApp, owner: &str, name: &str, members: &[&str]) -> String {
    let r = app
        .post(
            "/api/conversations",
            owner,
            json!({"kind": "group", "name": name, "member_ids": members}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["conversation"]["id"].as_str().unwrap().to_owned()
}

async fn last_seq(app: &TestApp, token: &str, conv: &str) -> i64 {
    let r = app.get(&format!("/api/conversations/{conv}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["conversation"]["last_seq"].as_i64().unwrap()
}

#[tokio::test]
async fn login_me_and_token_errors() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let me = app.get("/api/me", &admin).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["user"]["email"], "admin@sdis13.fr");
    assert_eq!(me.body["user"]["role"], "admin");
    assert!(me.body["user"].get("password_hash").is_none());

    // Wrong password, unknown user, unknown tenant: one answer for all.
    for (tenant, email, password) in [
        ("sdis13", "admin@sdis13.fr", "wrong-password"),
        ("sdis13", "nobody@sdis13.fr", PASSWORD),
        ("sdis99", "admin@sdis13.fr", PASSWORD),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/auth/login",
                None,
                Some(json!({"tenant": tenant, "email": email, "password": password})),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNAUTHORIZED, "invalid_credentials")
        );
    }
    // E-mail and tenant are case-insensitive.
    app.login("SDIS13", "Admin@SDIS13.fr", PASSWORD).await;

    let r = app.call(Method::GET, "/api/me", None, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let r = app
        .raw(
            Request::get("/api/me")
                .header(header::AUTHORIZATION, format!("Basic {admin}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    // Forged: signed with another secret; tampered: payload edited.
    let claims: Value = {
        let payload = admin.split('.').nth(1).unwrap();
        use base64_decode::decode;
        serde_json::from_slice(&decode(payload)).unwrap()
    };
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-xx!"),
    )
    .unwrap();
    let r = app.get("/api/me", &forged).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    let r = app.get("/api/me", "not.a.token").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );

    // Expired: correctly signed, but past its expiry.
    let mut old = claims.clone();
    old["exp"] = json!(chrono::Utc::now().timestamp() - 5);
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &old,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let r = app.get("/api/me", &expired).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_expired")
    );
}

/// Minimal base64url decoding for reading a token's payload in a test.
mod base64_decode {
    pub(crate) fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => (c - b'A') as u32,
                b'a'..=b'z' => (c - b'a' + 26) as u32,
                b'0'..=b'9' => (c - b'0' + 52) as u32,
                b'-' => 62,
                _ => 63,
            }
        };
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for &c in s.as_bytes() {
            acc = (acc << 6) | val(c);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        out
    }
}

#[tokio::test]
async fn deactivated_users_are_locked_out_at_once() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (id, token) = app.user(&admin, "sdis13", "Lucie Roux").await;
    assert_eq!(app.get("/api/me", &token).await.status, StatusCode::OK);
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/admin/users/{id}"),
            Some(&admin),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["user"]["active"], false);
    let r = app.get("/api/me", &token).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    let r = app
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(
                json!({"tenant": "sdis13", "email": "lucie.roux@sdis13.fr", "password": PASSWORD}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn admin_routes_need_an_admin() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (_, member) = app.user(&admin, "sdis13", "Karim Benali").await;
    let body = json!({"email": "x@sdis13.fr", "display_name": "X", "role": "member", "password": PASSWORD});
    let r = app.post("/api/admin/users", &member, body.clone()).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app.post("/api/admin/users", &admin, body.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app.post("/api/admin/users", &admin, body).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "email_taken"));
    let r = app
        .post(
            "/api/admin/users",
            &admin,
            json!({"email": "y@sdis13.fr", "display_name": "Y", "role": "member", "password": "court"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "weak_password")
    );
    let r = app
        .post(
            "/api/admin/users",
            &admin,
            json!({"email": "y@sdis13.fr", "display_name": "Y", "role": "général", "password": PASSWORD}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    // The directory lists the tenant, pages with a cursor.
    let r = app.get("/api/users?limit=2", &member).await;
    assert_eq!(r.body["users"].as_array().unwrap().len(), 2);
    let cursor = r.body["next_cursor"].as_str().unwrap().to_owned();
    let r = app
        .get(
            &format!("/api/users?limit=2&cursor={}", urlencode(&cursor)),
            &member,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["users"].as_array().unwrap().len(), 1);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn conversation_flow() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (u1, t1) = app.user(&admin, "sdis13", "Julien Martin").await;
    let (u2, t2) = app.user(&admin, "sdis13", "Sophie Bernard").await;

    // Direct: created once, found after.
    let r = app
        .post(
            "/api/conversations",
            &t1,
            json!({"kind": "direct", "user_id": u2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let direct = r.body["conversation"]["id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            "/api/conversations",
            &t2,
            json!({"kind": "direct", "user_id": u1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["conversation"]["id"], direct.as_str());

    // Messages, with an idempotent retry.
    let uri = format!("/api/conversations/{direct}/messages");
    for i in 1..=30 {
        let r = app
            .post(
                &uri,
                &t1,
                json!({"content": format!("message {i}"), "idempotency_key": format!("k{i}")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.body["message"]["seq"], i);
    }
    let r = app
        .post(
            &uri,
            &t1,
            json!({"content": "message 30", "idempotency_key": "k30"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["message"]["seq"], 30);

    // Unread for the other side, then read.
    let r = app.get("/api/conversations", &t2).await;
    assert_eq!(r.body["conversations"][0]["unread_count"], 30);
    assert_eq!(
        r.body["conversations"][0]["last_message"]["content"],
        "message 30"
    );
    let r = app
        .post(
            &format!("/api/conversations/{direct}/read"),
            &t2,
            json!({"seq": 10}),
        )
        .await;
    assert_eq!(r.body["last_read_seq"], 10);
    let r = app.get("/api/conversations", &t2).await;
    assert_eq!(r.body["conversations"][0]["unread_count"], 20);
    let r = app
        .call(
            Method::POST,
            &format!("/api/conversations/{direct}/read"),
            Some(&t2),
            None,
        )
        .await;
    assert_eq!(r.body["last_read_seq"], 30);

    // History pages: newest, then older with the cursor, then newer from a point.
    let r = app.get(&format!("{uri}?limit=10"), &t2).await;
    let seqs: Vec<i64> = r.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (21..=30).collect::<Vec<_>>());
    let before = r.body["before_cursor"].as_i64().unwrap();
    let r = app
        .get(&format!("{uri}?limit=10&before={before}"), &t2)
        .await;
    assert_eq!(r.body["messages"][0]["seq"], 11);
    let r = app.get(&format!("{uri}?limit=10&after=25"), &t2).await;
    assert_eq!(r.body["messages"].as_array().unwrap().len(), 5);
    assert_eq!(r.body["after_cursor"], 30);

    // Group management over HTTP.
    let (u3, t3) = app.user(&admin, "sdis13", "Karim Benali").await;
    let g = group(&app, &t1, "CIS Aix — garde", &[&u2]).await;
    let r = app
        .post(
            &format!("/api/conversations/{g}/members"),
            &t1,
            json!({"user_ids": [u3]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["members"].as_array().unwrap().len(), 3);
    let r = app
        .post(
            &format!("/api/conversations/{g}/messages"),
            &t3,
            json!({"content": "Présent !"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/conversations/{g}/members/{u3}"),
            Some(&t1),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .post(
            &format!("/api/conversations/{g}/messages"),
            &t3,
            json!({"content": "Toujours là ?"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app
        .get(&format!("/api/conversations/{g}/messages"), &t3)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/conversations/{g}"),
            Some(&t2),
            Some(json!({"name": "X"})),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/conversations/{g}/members/{u1}"),
            Some(&t1),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "last_owner"));
    let r = app
        .call(
            Method::POST,
            &format!("/api/conversations/{g}/leave"),
            Some(&t1),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get(&format!("/api/conversations/{g}"), &t2).await;
    assert_eq!(r.body["members"][0]["role"], "owner");

    // Search, across conversations and in one.
    app.post(
        &format!("/api/conversations/{g}/messages"),
        &t2,
        json!({"content": "Consignes de sécurité ARI"}),
    )
    .await;
    let r = app.get("/api/search?q=securite", &t2).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["results"].as_array().unwrap().len(), 1);
    assert_eq!(
        r.body["results"][0]["message"]["content"],
        "Consignes de sécurité ARI"
    );
    let r = app
        .get(
            &format!("/api/conversations/{direct}/search?q=securite"),
            &t2,
        )
        .await;
    assert_eq!(r.body["results"].as_array().unwrap().len(), 0);
    let r = app.get("/api/search?q=securite", &t1).await;
    assert_eq!(
        r.body["results"].as_array().unwrap().len(),
        0,
        "t1 left the group"
    );
}

#[tokio::test]
async fn another_tenant_learns_nothing_through_any_route() {
    let app = TestApp::new().await;
    let admin_a = app.tenant("sdis13").await;
    let admin_b = app.tenant("sdis83").await;
    let (ua1, ta1) = app.user(&admin_a, "sdis13", "Julien Martin").await;
    let (ua2, _) = app.user(&admin_a, "sdis13", "Sophie Bernard").await;
    let (ub, tb) = app.user(&admin_b, "sdis83", "Paul Varois").await;
    let g = group(&app, &ta1, "Secret SDIS 13", &[&ua2]).await;
    app.post(
        &format!("/api/conversations/{g}/messages"),
        &ta1,
        json!({"content": "Plan ORSEC incendie"}),
    )
    .await;
    let missing = uuid::Uuid::now_v7().to_string();

    // Every route that names A's conversation answers B exactly as for a missing one.
    for conv in [g.as_str(), missing.as_str()] {
        let c = format!("/api/conversations/{conv}");
        let calls: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, c.clone(), None),
            (Method::PATCH, c.clone(), Some(json!({"name": "pris"}))),
            (Method::GET, format!("{c}/messages"), None),
            (
                Method::POST,
                format!("{c}/messages"),
                Some(json!({"content": "intrusion"})),
            ),
            (Method::POST, format!("{c}/read"), Some(json!({"seq": 1}))),
            (
                Method::POST,
                format!("{c}/members"),
                Some(json!({"user_ids": [ub]})),
            ),
            (Method::DELETE, format!("{c}/members/{ua2}"), None),
            (
                Method::PATCH,
                format!("{c}/members/{ua2}"),
                Some(json!({"role": "admin"})),
            ),
            (Method::POST, format!("{c}/leave"), None),
            (Method::GET, format!("{c}/search?q=incendie"), None),
        ];
        for (method, uri, body) in calls {
            for token in [&tb, &admin_b] {
                let r = app
                    .call(method.clone(), &uri, Some(token), body.clone())
                    .await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::NOT_FOUND, "not_found"),
                    "{method} {uri}"
                );
            }
        }
    }
    // A's users are invisible too.
    let r = app
        .post(
            "/api/conversations",
            &tb,
            json!({"kind": "direct", "user_id": ua1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post(
            "/api/conversations",
            &tb,
            json!({"kind": "group", "name": "x", "member_ids": [ua1]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/admin/users/{ua1}"),
            Some(&admin_b),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/api/users", &tb).await;
    assert!(
        r.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["email"].as_str().unwrap().ends_with("sdis83.fr"))
    );
    let r = app.get("/api/conversations", &tb).await;
    assert_eq!(r.body["conversations"].as_array().unwrap().len(), 0);
    let r = app.get("/api/search?q=incendie", &tb).await;
    assert_eq!(r.body["results"].as_array().unwrap().len(), 0);

    // Nothing was written to A's conversation.
    let r = app.get(&format!("/api/conversations/{g}"), &ta1).await;
    assert_eq!(r.body["conversation"]["name"], "Secret SDIS 13");
    assert_eq!(r.body["conversation"]["last_seq"], 1);
    assert_eq!(r.body["members"].as_array().unwrap().len(), 2);
    // And the deactivation did not happen.
    assert_eq!(app.get("/api/me", &ta1).await.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_gets_its_documented_error_and_writes_nothing() {
    let mut config = mindsp_server::HttpConfig::with_secret(SECRET);
    config.max_body_bytes = 16 * 1024;
    let app = TestApp::with_config(config).await;
    let admin = app.tenant("sdis13").await;
    let (_, t1) = app.user(&admin, "sdis13", "Julien Martin").await;
    let g = group(&app, &t1, "Garde", &[]).await;
    let uri = format!("/api/conversations/{g}/messages");
    app.post(&uri, &t1, json!({"content": "premier"})).await;

    let send_raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut req =
            Request::post(uri.clone()).header(header::AUTHORIZATION, format!("Bearer {t1}"));
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        req.body(Body::from(body)).unwrap()
    };
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            send_raw("{\"content\": ", Some("application/json")),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            send_raw("not json", Some("application/json")),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            send_raw("{\"content\": 42}", Some("application/json")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            send_raw("{}", Some("application/json")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            send_raw(
                "{\"content\": \"x\", \"admin\": true}",
                Some("application/json"),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            send_raw("{\"content\": \"x\"}", None),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            send_raw("{\"content\": \"   \"}", Some("application/json")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_content",
        ),
    ];
    for (req, status, code) in cases {
        let r = app.raw(req).await;
        assert_eq!((r.status, r.code()), (status, code), "{:?}", r.body);
    }
    let r = app
        .post(&uri, &t1, json!({"content": "x".repeat(4001)}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "content_too_long")
    );
    let r = app
        .post(&uri, &t1, json!({"content": "x".repeat(20_000)}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let r = app
        .post(
            &uri,
            &t1,
            json!({"content": "x", "idempotency_key": "k".repeat(200)}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_idempotency_key")
    );
    assert_eq!(
        last_seq(&app, &t1, &g).await,
        1,
        "no refused request wrote a message"
    );

    // Query strings and cursors.
    for (q, status, code) in [
        ("limit=abc", StatusCode::BAD_REQUEST, "invalid_query_string"),
        ("limit=-1", StatusCode::BAD_REQUEST, "invalid_query_string"),
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit"),
        (
            "limit=1000",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_limit",
        ),
        (
            "before=-5",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_cursor",
        ),
        (
            "before=abc",
            StatusCode::BAD_REQUEST,
            "invalid_query_string",
        ),
        (
            "before=3&after=1",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_cursor",
        ),
        (
            "colour=red",
            StatusCode::BAD_REQUEST,
            "invalid_query_string",
        ),
    ] {
        let r = app.get(&format!("{uri}?{q}"), &t1).await;
        assert_eq!((r.status, r.code()), (status, code), "{q}");
    }
    let r = app.get("/api/conversations?cursor=garbage", &t1).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor")
    );
    let r = app.get("/api/search?q=feu&cursor=xyz", &t1).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor")
    );
    let r = app.get("/api/search", &t1).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_query_string")
    );
    let r = app.get("/api/search?q=%20%20", &t1).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_query")
    );

    // Identifiers.
    let r = app.get("/api/conversations/not-a-uuid", &t1).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );
    let r = app
        .get(&format!("/api/conversations/{}", uuid::Uuid::now_v7()), &t1)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app
        .post(
            "/api/conversations",
            &t1,
            json!({"kind": "direct", "user_id": uuid::Uuid::now_v7()}),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app
        .post("/api/conversations", &t1, json!({"kind": "channel"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    let r = app.get("/api/nothing-here", &t1).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app
        .post(
            &format!("/api/conversations/{g}/read"),
            &t1,
            json!({"seq": "deux"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    assert_eq!(last_seq(&app, &t1, &g).await, 1);
}

#[tokio::test]
async fn healthz_answers() {
    let app = TestApp::new().await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// A route asked with a method it does not take answers 405 with the same error body as
/// every other error, and says which methods it takes.
#[tokio::test]
async fn a_wrong_method_gets_405_with_our_error_body() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    for (method, uri, token, allowed) in [
        (
            Method::PUT,
            "/api/conversations",
            Some(admin.as_str()),
            "GET,HEAD,POST",
        ),
        (Method::DELETE, "/healthz", None, "GET,HEAD"),
        (Method::POST, "/ws", None, "GET,HEAD"),
        (Method::GET, "/api/auth/login", None, "POST"),
    ] {
        let mut req = Request::builder().method(method.clone()).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = app.response(req.body(Body::empty()).unwrap()).await;
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}"
        );
        let allow = resp.headers()[header::ALLOW]
            .to_str()
            .unwrap()
            .replace(' ', "");
        let mut allow: Vec<&str> = allow.split(',').collect();
        allow.sort_unstable();
        assert_eq!(allow.join(","), allowed, "{method} {uri}");
        let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method} {uri}: {body}"
        );
    }
}

// ---- job monitoring -------------------------------------------------------------------

mod jobs {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::http::StatusCode;
    use mindsp_core::jobs::{JobScope, NewJob, OnDuplicate};
    use mindsp_core::{JobId, TenantId};
    use mindsp_queue::worker::{Handler, JobError, Worker, WorkerConfig};
    use serde_json::{Value, json};

    use super::common::TestApp;

    /// Succeeds when the payload says `"ok": true`, fails for good otherwise.
    struct Outcome;

    #[async_trait::async_trait]
    impl Handler for Outcome {
        async fn run(&self, job: &mindsp_core::jobs::Job) -> Result<(), JobError> {
            if job.payload["ok"] == true {
                Ok(())
            } else {
                Err(JobError::Permanent("refused by the test handler".into()))
            }
        }
    }

    /// A job of `tenant` due in an hour, so it stays put without a worker.
    async fn later(app: &TestApp, tenant: Option<TenantId>, queue: &str) -> JobId {
        let mut job = NewJob::new("test.later", json!({"n": 1}))
            .queue(queue)
            .delay(Duration::from_secs(3600));
        job.tenant = tenant;
        app.queue.enqueue(&job).await.unwrap().id()
    }

    fn ids(body: &Value) -> Vec<String> {
        body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn stats_count_per_queue_and_minute_within_the_tenant() {
        let app = TestApp::new().await;
        let a = app.tenant("sdis13").await;
        let b = app.tenant("sdis83").await;
        let (ta, tb) = (app.tenant_of(&a).await, app.tenant_of(&b).await);
        let mut jobs = Vec::new();
        for (tenant, ok) in [
            (Some(ta), true),
            (Some(ta), true),
            (Some(ta), true),
            (Some(ta), false),
            (Some(ta), false),
            (Some(tb), true),
            (None, true),
        ] {
            let mut job = NewJob::new("test.outcome", json!({ "ok": ok }));
            job.tenant = tenant;
            jobs.push(app.queue.enqueue(&job).await.unwrap().id());
        }
        let worker = Worker::builder(
            app.queue.clone(),
            WorkerConfig {
                poll_interval: Duration::from_millis(20),
                ..WorkerConfig::default()
            },
        )
        .handle("test.outcome", Arc::new(Outcome))
        .start();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for id in &jobs {
            loop {
                let job = app.queue.job(JobScope::All, *id).await.unwrap().unwrap();
                if job.state.is_final() {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{job:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        worker.shutdown(Duration::from_secs(2)).await;
        // One more job, waiting: counted as scheduled.
        later(&app, Some(ta), "default").await;

        let r = app.get("/api/admin/jobs/stats?minutes=5", &a).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let queues = r.body["queues"].as_array().unwrap();
        assert_eq!(queues.len(), 1, "{:?}", r.body);
        let q = &queues[0];
        assert_eq!(q["queue"], "default");
        assert_eq!(
            (&q["succeeded"], &q["dead"], &q["scheduled"], &q["running"]),
            (&json!(3), &json!(2), &json!(1), &json!(0))
        );
        let minutes = r.body["throughput"].as_array().unwrap();
        assert_eq!(minutes.len(), 5);
        let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
        assert_eq!((sum("succeeded"), sum("failed")), (3, 2));
        assert!(minutes.iter().all(|m| m["minute"].is_string()));

        // The other tenant sees its own job only; the default window is 15 minutes.
        let r = app.get("/api/admin/jobs/stats", &b).await;
        assert_eq!(r.status, StatusCode::OK);
        let q = &r.body["queues"][0];
        assert_eq!((&q["succeeded"], &q["dead"]), (&json!(1), &json!(0)));
        let minutes = r.body["throughput"].as_array().unwrap();
        assert_eq!(minutes.len(), 15);
        let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
        assert_eq!((sum("succeeded"), sum("failed")), (1, 0));

        for bad in ["0", "121"] {
            let r = app
                .get(&format!("/api/admin/jobs/stats?minutes={bad}"), &a)
                .await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::BAD_REQUEST, "invalid_minutes")
            );
        }
        assert_eq!(
            app.get("/api/admin/jobs/stats?minutes=120", &a)
                .await
                .status,
            StatusCode::OK
        );
        let r = app.get("/api/admin/jobs/stats?minutes=abc", &a).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_query_string")
        );
    }

    #[tokio::test]
    async fn monitoring_is_for_admins_only() {
        let app = TestApp::new().await;
        let admin = app.tenant("sdis13").await;
        let (_, member) = app.user(&admin, "sdis13", "Karim Benali").await;
        let id = later(&app, Some(app.tenant_of(&admin).await), "default").await;
        for (uri, post) in [
            ("/api/admin/jobs/stats".to_owned(), false),
            ("/api/admin/jobs".to_owned(), false),
            (format!("/api/admin/jobs/{id}"), false),
            (format!("/api/admin/jobs/{id}/retry"), true),
            (format!("/api/admin/jobs/{id}/discard"), true),
        ] {
            let r = if post {
                app.post_empty(&uri, &member).await
            } else {
                app.get(&uri, &member).await
            };
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::FORBIDDEN, "forbidden"),
                "{uri}"
            );
            let r = app
                .call(
                    if post {
                        axum::http::Method::POST
                    } else {
                        axum::http::Method::GET
                    },
                    &uri,
                    None,
                    None,
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
        }
        // The member's attempt to discard changed nothing.
        let r = app.get(&format!("/api/admin/jobs/{id}"), &admin).await;
        assert_eq!(r.body["job"]["state"], "scheduled");
    }

    #[tokio::test]
    async fn list_filters_pages_and_refuses_bad_parameters() {
        let app = TestApp::new().await;
        let admin = app.tenant("sdis13").await;
        let other = app.tenant("sdis83").await;
        let tenant = app.tenant_of(&admin).await;
        let mut mine = Vec::new();
        for _ in 0..5 {
            mine.push(later(&app, Some(tenant), "default").await.to_string());
        }
        let mail = later(&app, Some(tenant), "email").await.to_string();
        later(&app, Some(app.tenant_of(&other).await), "default").await;
        later(&app, None, "default").await;

        // Newest state change first, two at a time, until next_cursor is null.
        let mut seen = Vec::new();
        let mut uri = "/api/admin/jobs?queue=default&limit=2".to_owned();
        loop {
            let r = app.get(&uri, &admin).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            seen.extend(ids(&r.body));
            match r.body["next_cursor"].as_str() {
                Some(c) => uri = format!("/api/admin/jobs?queue=default&limit=2&before={c}"),
                None => break,
            }
        }
        let newest_first: Vec<String> = mine.iter().rev().cloned().collect();
        assert_eq!(seen, newest_first);

        let r = app.get("/api/admin/jobs", &admin).await;
        assert_eq!(ids(&r.body).len(), 6, "the tenant's jobs only");
        let j = &r.body["jobs"][0];
        assert_eq!(j["id"], mail);
        for key in [
            "id",
            "kind",
            "queue",
            "state",
            "payload",
            "priority",
            "attempts",
            "max_attempts",
            "run_at",
            "unique_key",
            "last_error",
            "created_at",
            "updated_at",
            "finished_at",
        ] {
            assert!(j.get(key).is_some(), "{key} in {j}");
        }
        assert!(j.get("tenant").is_none());
        let r = app.get("/api/admin/jobs?queue=email", &admin).await;
        assert_eq!(ids(&r.body), vec![mail]);
        let r = app.get("/api/admin/jobs?state=scheduled", &admin).await;
        assert_eq!(ids(&r.body).len(), 6);
        let r = app.get("/api/admin/jobs?state=dead", &admin).await;
        assert_eq!(r.body["jobs"], json!([]));

        let r = app.get("/api/admin/jobs?state=zombie", &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_state")
        );
        let long = "q".repeat(65);
        let r = app
            .get(&format!("/api/admin/jobs?queue={long}"), &admin)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_queue")
        );
        for limit in ["0", "101"] {
            let r = app
                .get(&format!("/api/admin/jobs?limit={limit}"), &admin)
                .await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit")
            );
        }
        for cursor in ["nope", "12_not-a-uuid", "x_0193"] {
            let r = app
                .get(&format!("/api/admin/jobs?before={cursor}"), &admin)
                .await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor")
            );
        }
        let r = app.get("/api/admin/jobs?tenant=all", &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_query_string")
        );
    }

    #[tokio::test]
    async fn retry_and_discard_follow_the_job_state() {
        let app = TestApp::new().await;
        let admin = app.tenant("sdis13").await;
        let other = app.tenant("sdis83").await;
        let tenant = app.tenant_of(&admin).await;
        let id = later(&app, Some(tenant), "default").await;
        let retry = format!("/api/admin/jobs/{id}/retry");
        let discard = format!("/api/admin/jobs/{id}/discard");

        // Pending: cannot be retried, can be discarded (once).
        let r = app.post_empty(&retry, &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "invalid_job_state")
        );
        let r = app.post_empty(&discard, &admin).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["job"]["state"], "cancelled");
        assert!(r.body["job"]["finished_at"].is_string());
        let r = app.post_empty(&discard, &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "invalid_job_state")
        );
        // Cancelled: a retry makes it due now, with fresh attempts.
        let r = app.post_empty(&retry, &admin).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["job"]["state"], "ready");
        assert_eq!(r.body["job"]["attempts"], 0);
        assert!(r.body["job"]["finished_at"].is_null());

        // Missing, foreign and malformed ids.
        let missing = JobId::new();
        for uri in [
            format!("/api/admin/jobs/{missing}"),
            format!("/api/admin/jobs/{missing}/retry"),
            format!("/api/admin/jobs/{missing}/discard"),
        ] {
            let r = if uri.ends_with(&missing.to_string()) {
                app.get(&uri, &admin).await
            } else {
                app.post_empty(&uri, &admin).await
            };
            assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
        }
        let r = app.post_empty(&discard, &other).await;
        assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
        let r = app.get(&format!("/api/admin/jobs/{id}"), &admin).await;
        assert_eq!(
            r.body["job"]["state"], "ready",
            "the stranger changed nothing"
        );
        let r = app.get("/api/admin/jobs/not-a-uuid", &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_id")
        );

        // A job whose unique key another pending job took cannot come back.
        let key_job = |run_in: u64| {
            NewJob::new("test.later", json!({}))
                .tenant(tenant)
                .unique("rappel-fmpa-42", OnDuplicate::Keep)
                .delay(Duration::from_secs(run_in))
        };
        let first = app.queue.enqueue(&key_job(3600)).await.unwrap().id();
        let r = app
            .post_empty(&format!("/api/admin/jobs/{first}/discard"), &admin)
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let second = app.queue.enqueue(&key_job(7200)).await.unwrap().id();
        assert_ne!(first, second);
        let r = app
            .post_empty(&format!("/api/admin/jobs/{first}/retry"), &admin)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "unique_key_held")
        );
    }

    #[tokio::test]
    async fn without_a_queue_the_routes_say_so() {
        use mindsp_server::{AppState, HttpConfig, router};
        let mut app = TestApp::new().await;
        let admin = app.tenant("sdis13").await;
        let mut state = AppState::new(app.store.clone(), &HttpConfig::with_secret(super::SECRET));
        assert!(state.jobs.is_some(), "AppState::new finds the SQL queue");
        state.jobs = None;
        app.app = router(state);
        let r = app.get("/api/admin/jobs", &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable")
        );
    }
}

/// Pages from an allowed browser origin may call the API (CORS): the preflight is
/// answered, answers and errors carry the origin; any other origin gets no CORS header,
/// and without a configured list none is ever sent.
#[tokio::test]
async fn allowed_browser_origins_may_call_the_api() {
    use mindsp_server::HttpConfig;

    const PAGE: &str = "https://chat.sdis13.fr";
    let mut config = HttpConfig::with_secret(SECRET);
    config.ws.allowed_origins = vec![format!("{PAGE}/")];
    let app = TestApp::with_config(config).await;
    let admin = app.tenant("sdis13").await;
    let allowed_origin = |r: &axum::response::Response| {
        r.headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // The preflight of a cross-origin POST with a token and a JSON body.
    for (origin, expected) in [(PAGE, Some(PAGE)), ("https://ailleurs.example", None)] {
        let r = app
            .response(
                Request::builder()
                    .method(Method::OPTIONS)
                    .uri("/api/conversations")
                    .header(header::ORIGIN, origin)
                    .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                    .header(
                        header::ACCESS_CONTROL_REQUEST_HEADERS,
                        "authorization,content-type",
                    )
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(allowed_origin(&r).as_deref(), expected, "{origin}");
        if expected.is_some() {
            assert!(r.status().is_success(), "{:?}", r.status());
            let listed = |h| {
                r.headers()
                    .get(h)
                    .map(|v| v.to_str().unwrap().to_ascii_lowercase())
                    .unwrap_or_default()
            };
            assert!(listed(header::ACCESS_CONTROL_ALLOW_METHODS).contains("post"));
            let headers = listed(header::ACCESS_CONTROL_ALLOW_HEADERS);
            assert!(headers.contains("authorization") && headers.contains("content-type"));
        }
    }

    // Answers and errors alike carry the allowed origin, so the page can read them.
    for (token, status) in [
        (Some(admin.as_str()), StatusCode::OK),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let mut req = Request::get("/api/me").header(header::ORIGIN, "https://CHAT.sdis13.fr");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let r = app.response(req.body(Body::empty()).unwrap()).await;
        assert_eq!(r.status(), status);
        assert_eq!(
            allowed_origin(&r).as_deref(),
            Some("https://CHAT.sdis13.fr")
        );
        // Including how long to wait after a 429 or a 503.
        let exposed = r.headers().get(header::ACCESS_CONTROL_EXPOSE_HEADERS);
        assert!(
            exposed.is_some_and(|v| v.to_str().unwrap().eq_ignore_ascii_case("retry-after")),
            "{exposed:?}"
        );
    }
    let r = app
        .response(
            Request::get("/api/me")
                .header(header::ORIGIN, "https://ailleurs.example")
                .header(header::AUTHORIZATION, format!("Bearer {admin}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(allowed_origin(&r), None);

    // No list: no CORS at all (the server's own pages need none).
    let plain = TestApp::new().await;
    let r = plain
        .response(
            Request::get("/healthz")
                .header(header::ORIGIN, PAGE)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(allowed_origin(&r), None);
}

async fn try_login(
    app: &TestApp,
    tenant: &str,
    email: &str,
    password: &str,
) -> axum::response::Response {
    let body = json!({"tenant": tenant, "email": email, "password": password});
    app.response(
        Request::post("/api/auth/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

async fn error_code(r: axum::response::Response) -> (StatusCode, Option<u64>, String) {
    let status = r.status();
    let retry = r
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, retry, code)
}

/// An account that keeps failing is slowed down (429 with `Retry-After`, before any
/// hashing: even the right password waits), alike whether it exists or not, and longer
/// at each further failure; other accounts are not; once the wait is over the right
/// password works and starts the count over.
#[tokio::test]
async fn repeated_failed_logins_slow_the_account_down() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (_, _) = app.user(&admin, "sdis13", "Alice").await;
    let failed = (
        StatusCode::UNAUTHORIZED,
        None,
        "invalid_credentials".to_owned(),
    );
    for email in ["admin@sdis13.fr", "nobody@sdis13.fr"] {
        for _ in 0..5 {
            let r = error_code(try_login(&app, "sdis13", email, "wrong-password").await).await;
            assert_eq!(r, failed, "{email}");
        }
        // Typed differently, the same account.
        let r = error_code(try_login(&app, " SDIS13", &email.to_uppercase(), PASSWORD).await).await;
        assert_eq!(
            r,
            (
                StatusCode::TOO_MANY_REQUESTS,
                Some(1),
                "too_many_attempts".into()
            ),
            "{email}"
        );
    }
    // Another account of the tenant is not held back.
    app.login("sdis13", "alice@sdis13.fr", PASSWORD).await;

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // The right password, once the wait is over: in, and the count starts over.
    app.login("sdis13", "admin@sdis13.fr", PASSWORD).await;
    let r = error_code(try_login(&app, "sdis13", "admin@sdis13.fr", "wrong-password").await).await;
    assert_eq!(r, failed);
    // A sixth failure in a row waits twice as long.
    let r = error_code(try_login(&app, "sdis13", "nobody@sdis13.fr", "wrong-password").await).await;
    assert_eq!(r, failed);
    let r = error_code(try_login(&app, "sdis13", "nobody@sdis13.fr", "wrong-password").await).await;
    assert_eq!(
        r,
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some(2),
            "too_many_attempts".into()
        )
    );
}

/// At most `at_once` password hashes run and `waiting` more wait: a burst of logins
/// beyond that gets 503 `busy` with `Retry-After` at once, the others their usual
/// answer, and logins work again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_beyond_the_hashing_queue_is_refused_at_once() {
    let mut config = mindsp_server::HttpConfig::with_secret(SECRET);
    config.passwords.at_once = 1;
    config.passwords.waiting = 2;
    let app = std::sync::Arc::new(TestApp::with_config(config).await);
    app.tenant("sdis13").await;
    let mut burst = Vec::new();
    for i in 0..24 {
        let app = app.clone();
        burst.push(tokio::spawn(async move {
            let email = format!("guess{i}@sdis13.fr");
            error_code(try_login(&app, "sdis13", &email, "wrong-password").await).await
        }));
    }
    let mut answers = std::collections::BTreeMap::new();
    for h in burst {
        let (status, retry, code) = h.await.unwrap();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!((retry, code.as_str()), (Some(1), "busy"));
        } else {
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::UNAUTHORIZED, "invalid_credentials")
            );
        }
        *answers.entry(status.as_u16()).or_insert(0) += 1;
    }
    assert!(answers.get(&503).is_some_and(|n| *n > 0), "{answers:?}");
    assert!(answers.get(&401).is_some_and(|n| *n >= 3), "{answers:?}");
    app.login("sdis13", "admin@sdis13.fr", PASSWORD).await;
}

/// Reads from `tcp` until the server closes it; panics if it is still open after 10 s.
async fn closed_by_server(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection is still open; read so far: {got:?}"),
        }
    }
}

/// Serves `app` on a loopback port with these connection limits until the test ends.
async fn serve_on_loopback(
    app: &TestApp,
    limits: mindsp_server::ConnectionLimits,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mindsp_server::serve_with(
        listener,
        app.app.clone(),
        std::future::pending(),
        std::time::Duration::from_secs(1),
        limits,
    ));
    addr
}

/// A connection that never sends a request, and a keep-alive connection idle between
/// requests, are closed after the header timeout (phones that vanish leave such
/// connections, each holding a socket); a WebSocket is not, and requests still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_http_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let limits = mindsp_server::ConnectionLimits {
        header_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let addr = serve_on_loopback(&app, limits).await;

    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_server(&mut silent).await.is_empty());

    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: mindsp\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(closed_by_server(&mut idle).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "one answer, then closed: {answer}");

    let url = format!("ws://{addr}/ws?token={admin}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    use futures::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"v":1,"type":"ping","id":"p"}"#,
    ))
    .await
    .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(
        reply.to_text().unwrap().contains(r#""type":"ack""#),
        "{reply}"
    );
}

/// A client that sends requests and reads none of the answers holds its connection only
/// until a write to it has found no room for the write timeout. (hyper reads the next
/// request, and so starts its header timeout, only once an answer is written out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_no_answer_is_dropped_after_the_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::new().await;
    let ms = std::time::Duration::from_millis;
    let limits = mindsp_server::ConnectionLimits {
        header_timeout: ms(300),
        write_timeout: ms(300),
        ..Default::default()
    };
    let addr = serve_on_loopback(&app, limits).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (_unread, mut requests) = stream.into_split();
    // Requests, pipelined, until the server drops the connection; never an answer read.
    let chunk = b"GET /healthz HTTP/1.1\r\nHost: mindsp\r\n\r\n".repeat(1000);
    let sent = tokio::spawn(async move {
        let mut chunks = 0u64;
        while requests.write_all(&chunk).await.is_ok() {
            chunks += 1;
        }
        chunks
    });
    // The server's send buffer (autotuned up to megabytes on loopback) must fill first:
    // tens of thousands of answers, slow for a debug build on a busy machine (30 s was
    // once not enough in CI). Without the write timeout the connection is never dropped.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(120), sent).await;
    let chunks = ended
        .expect("the server never dropped the connection")
        .unwrap();
    assert!(chunks > 0);
}

/// Beyond `max_connections`, a new connection waits in the backlog, unanswered, until
/// one closes; an upgraded WebSocket keeps its place until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let limits = mindsp_server::ConnectionLimits {
        max_connections: 2,
        ..Default::default()
    };
    let addr = serve_on_loopback(&app, limits).await;
    // A WebSocket and a connection that says nothing take both places.
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={admin}"))
        .await
        .unwrap();
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: mindsp\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 256];
    let wait = std::time::Duration::from_millis(500);
    let early = tokio::time::timeout(wait, third.read(&mut answer)).await;
    assert!(early.is_err(), "answered beyond the cap: {early:?}");
    // The WebSocket ends: its place goes to the third.
    drop(ws);
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), third.read(&mut answer))
        .await
        .expect("answered once a place is free")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

/// A login whose account cannot be read (a storage fault: the users table is renamed
/// away for a moment) gives the account back: the next login is checked, not refused
/// as one still under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_the_store_fails_leaves_the_account_free() {
    use sqlx::Connection;
    let app = TestApp::new().await;
    app.tenant("sdis13").await;
    let url = format!("sqlite://{}", app.database().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("ALTER TABLE users RENAME TO users_away")
        .execute(&mut db)
        .await
        .unwrap();
    let failed = try_login(&app, "sdis13", "admin@sdis13.fr", PASSWORD).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    sqlx::query("ALTER TABLE users_away RENAME TO users")
        .execute(&mut db)
        .await
        .unwrap();
    app.login("sdis13", "admin@sdis13.fr", PASSWORD).await;
}

/// Guesses sent in parallel for one account are checked one at a time: the others are
/// refused at once (429), so they cannot slip past the slowdown together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_for_one_account_are_checked_one_at_a_time() {
    let app = std::sync::Arc::new(TestApp::new().await);
    app.tenant("sdis13").await;
    let mut guesses = Vec::new();
    for i in 0..12 {
        let app = app.clone();
        guesses.push(tokio::spawn(async move {
            let guess = format!("guess-{i}");
            error_code(try_login(&app, "sdis13", "admin@sdis13.fr", &guess).await).await
        }));
    }
    let (mut checked, mut refused) = (0, 0);
    for g in guesses {
        match g.await.unwrap() {
            (StatusCode::UNAUTHORIZED, None, code) if code == "invalid_credentials" => checked += 1,
            (StatusCode::TOO_MANY_REQUESTS, Some(_), code) if code == "too_many_attempts" => {
                refused += 1
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        refused > 0 && checked < 12,
        "{checked} checked, {refused} refused"
    );
    // The refused ones were not counted as failures: under five checked, the right
    // password still works at once.
    if checked < 5 {
        app.login("sdis13", "admin@sdis13.fr", PASSWORD).await;
    }
}

/// A device that logged in before (it sends the `device_token` it was given) is not held
/// back by failures from elsewhere with the same address; another account's device
/// token does not help; and a device token is not an access token.
#[tokio::test]
async fn a_known_device_is_not_held_back_by_failures_from_elsewhere() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (_, _) = app.user(&admin, "sdis13", "Alice").await;
    let login = |email: &str, password: &str, device: Option<&str>| {
        let mut body = json!({"tenant": "sdis13", "email": email, "password": password});
        if let Some(d) = device {
            body["device_token"] = json!(d);
        }
        app.call(Method::POST, "/api/auth/login", None, Some(body))
    };
    let first = login("admin@sdis13.fr", PASSWORD, None).await;
    assert_eq!(first.status, StatusCode::OK);
    let device = first.body["device_token"].as_str().unwrap().to_owned();
    let alice = login("alice@sdis13.fr", PASSWORD, None).await;
    let alices = alice.body["device_token"].as_str().unwrap().to_owned();

    // Someone else fails five times with the address.
    for _ in 0..5 {
        let r = login("admin@sdis13.fr", "wrong-password", None).await;
        assert_eq!(r.code(), "invalid_credentials");
    }
    let r = login("admin@sdis13.fr", PASSWORD, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts")
    );
    let r = login("admin@sdis13.fr", PASSWORD, Some(&alices)).await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "Alice's device is not the admin's"
    );
    // The admin's own device gets in, and a new device token for the same device.
    let r = login("admin@sdis13.fr", PASSWORD, Some(&device)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["device_token"].is_string());
    // A device token opens nothing.
    let r = app.get("/api/me", &device).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );

    // A device token of a password that no longer holds (here: the account was
    // deactivated) is no proof: the login counts for the account, which must wait.
    let alice_id = alice.body["user"]["id"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        let r = login("alice@sdis13.fr", "wrong-password", None).await;
        assert_eq!(r.code(), "invalid_credentials");
    }
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/admin/users/{alice_id}"),
            Some(&admin),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = login("alice@sdis13.fr", PASSWORD, Some(&alices)).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts")
    );
}

/// Once the shutdown begins, new connections are refused at once (a load balancer then
/// tries another node) while the requests under way finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_refused_once_the_shutdown_begins() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(mindsp_server::serve_with(
        listener,
        app.app.clone(),
        async move {
            let _ = stopped.await;
        },
        std::time::Duration::from_secs(20),
        mindsp_server::ConnectionLimits {
            header_timeout: std::time::Duration::from_secs(5),
            ..Default::default()
        },
    ));
    // A request under way (its headers half sent) keeps the server draining.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let mut refused = false;
    for _ in 0..40 {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert!(
        refused,
        "new connections were still taken in while draining"
    );
    assert!(
        !served.is_finished(),
        "the request under way is still being waited for"
    );
    // It finishes, and the server with it.
    slow.write_all(b"st: mindsp\r\n\r\n").await.unwrap();
    let answer = String::from_utf8(closed_by_server(&mut slow).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio::time::timeout(std::time::Duration::from_secs(10), served)
        .await
        .expect("the server ends once its last request is answered")
        .unwrap()
        .unwrap();
}

/// A request whose body trickles in (or stops) is answered 408 `request_timeout` once
/// the request timeout is over, and its connection closed, instead of holding it as long
/// as the client likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_gets_a_request_timeout() {
    use tokio::io::AsyncWriteExt;
    let mut config = mindsp_server::HttpConfig::with_secret(SECRET);
    config.request_timeout = std::time::Duration::from_millis(300);
    let app = TestApp::with_config(config).await;
    let addr = serve_on_loopback(&app, Default::default()).await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /api/auth/login HTTP/1.1\r\nHost: mindsp\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"tenant\": ",
    )
    .await
    .unwrap();
    let answer = String::from_utf8(closed_by_server(&mut slow).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
}

/// A user changes their own password (the current one first, checked like a login); an
/// admin sets a new one for a user who forgot theirs; the old password no longer opens.
#[tokio::test]
async fn passwords_are_changed_by_their_user_or_reset_by_an_admin() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let change = |current: &str, new: &str| {
        app.call(
            Method::POST,
            "/api/me/password",
            Some(&alice),
            Some(json!({"current_password": current, "new_password": new})),
        )
    };
    let r = change("not-my-password", "Caserne-Nord-2026").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "wrong_password")
    );
    let r = change(PASSWORD, "court").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "weak_password")
    );
    let changed = change(PASSWORD, "Caserne-Nord-2026").await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    // Whoever logged in with the old password is out; this session goes on with the
    // token of the answer.
    let stale = app.get("/api/me", &alice).await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
    // The socket too (checked before the upgrade).
    let r = app
        .call(Method::GET, &format!("/ws?token={alice}"), None, None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
    let alice = changed.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(app.get("/api/me", &alice).await.status, StatusCode::OK);
    let old = error_code(try_login(&app, "sdis13", "alice@sdis13.fr", PASSWORD).await).await;
    assert_eq!(old.2, "invalid_credentials");
    app.login("sdis13", "alice@sdis13.fr", "Caserne-Nord-2026")
        .await;

    // Reset by the admin; a member may not.
    let uri = format!("/api/admin/users/{alice_id}");
    let reset = |token: String, body: Value| {
        let uri = uri.clone();
        let app = &app;
        async move {
            app.call(Method::PATCH, &uri, Some(&token), Some(body))
                .await
        }
    };
    let r = reset(alice.clone(), json!({"password": "Je-prends-la-main-1"})).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = reset(admin.clone(), json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    // Not their own: that needs the current password, and nothing changes.
    let me = app.get("/api/me", &admin).await.body["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/admin/users/{me}"),
            Some(&admin),
            Some(json!({"password": "Je-prends-la-main-1", "active": false})),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "own_password"));
    assert_eq!(app.get("/api/me", &admin).await.status, StatusCode::OK);
    let r = reset(admin.clone(), json!({"password": "Garde-du-jour-7"})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["user"]["active"], true);
    assert!(r.body["user"].get("password_hash").is_none());
    let old =
        error_code(try_login(&app, "sdis13", "alice@sdis13.fr", "Caserne-Nord-2026").await).await;
    assert_eq!(old.2, "invalid_credentials");
    app.login("sdis13", "alice@sdis13.fr", "Garde-du-jour-7")
        .await;
}

/// A user who sends changes faster than the write rate gets 429 `rate_limited` with
/// `Retry-After`, and nothing is stored for the refused ones; other kinds of change are
/// counted too; their reads, another user's writes, and their own once the bucket
/// refilled, go through.
#[tokio::test]
async fn writes_beyond_the_rate_per_user_are_refused() {
    let mut config = mindsp_server::HttpConfig::with_secret(SECRET);
    // One token a second: a refill between two requests in a row would need a stall
    // of that long.
    config.write_rate = mindsp_server::rates::WriteRate {
        per_sec: 1,
        burst: 3,
    };
    let app = TestApp::with_config(config).await;
    let admin = app.tenant("sdis13").await;
    let (_, alice) = app.user(&admin, "sdis13", "Alice").await;
    let (bob_id, bob) = app.user(&admin, "sdis13", "Bob").await;
    let conv = group(&app, &alice, "Garde", &[&bob_id]).await;
    let messages = format!("/api/conversations/{conv}/messages");
    let write = |method: Method, uri: &str, token: &str, body: Value| {
        app.response(common::json_request(method, uri, token, body.to_string()))
    };
    let send =
        |token: &str, text: &str| write(Method::POST, &messages, token, json!({ "content": text }));
    let refused = (
        StatusCode::TOO_MANY_REQUESTS,
        Some(1),
        "rate_limited".to_owned(),
    );
    let before = last_seq(&app, &alice, &conv).await;
    let mut passed = 0;
    loop {
        let answer = error_code(send(&alice, &format!("message {passed}")).await).await;
        if answer == refused {
            break;
        }
        assert_eq!(answer.0, StatusCode::CREATED, "{answer:?}");
        passed += 1;
        assert!(passed < 10, "never refused");
    }
    // The group's creation took one of Alice's three.
    assert!(passed >= 2, "{passed}");
    // A rename is counted as well.
    let rename = write(
        Method::PATCH,
        &format!("/api/conversations/{conv}"),
        &alice,
        json!({"name": "Garde de nuit"}),
    );
    assert_eq!(error_code(rename.await).await, refused);
    // Bob has a bucket of his own; Alice's reads are not counted.
    assert_eq!(
        error_code(send(&bob, "reçu").await).await.0,
        StatusCode::CREATED
    );
    for _ in 0..5 {
        assert_eq!(app.get(&messages, &alice).await.status, StatusCode::OK);
    }
    // Alice's refused ones stored nothing.
    assert_eq!(last_seq(&app, &alice, &conv).await, before + passed + 1);
    // Once the bucket refilled, Alice goes on.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        error_code(send(&alice, "again").await).await.0,
        StatusCode::CREATED
    );
}
