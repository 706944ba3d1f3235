//! Notifications as users and administrators see them: pushed to every device of the
//! recipient and to nobody else, unread counts kept right on every device, the bell's
//! pagination, preferences (per-type e-mail switch, quiet hours, tenant defaults) as
//! the e-mail jobs they produce show them, and an e-mail arriving at a real SMTP
//! server. Over a real SQLite file and the SQL queue in it; no mocks.

mod common;
mod wsclient;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Timelike, Utc, Weekday};
use common::TestApp;
use common::smtp::SmtpSink;
use mail_parser::MessageParser;
use mindsp_core::TenantId;
use mindsp_core::jobs::{Job, JobState};
use mindsp_core::mail::Mailbox;
use mindsp_core::notify::NobodyOnline;
use mindsp_queue::mail::{SmtpConfig, SmtpMailer};
use mindsp_server::workers::{NotifyServices, WorkerSettings, start_worker};
use serde_json::{Value, json};

// ---- helpers ----------------------------------------------------------------------------

/// The `notification.email` jobs of `tenant` for `user`.
async fn email_jobs(app: &TestApp, tenant: TenantId, user: &str) -> Vec<Job> {
    app.jobs(tenant)
        .await
        .into_iter()
        .filter(|j| j.kind == "notification.email" && j.payload["user_id"] == user)
        .collect()
}

async fn broadcast(app: &TestApp, admin: &str, body: Value) -> Value {
    let r = app.post("/api/admin/notifications", admin, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body
}

async fn unread(app: &TestApp, token: &str) -> i64 {
    let r = app.get("/api/notifications/unread-count", token).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["unread"].as_i64().unwrap()
}

async fn bell(app: &TestApp, token: &str, query: &str) -> Value {
    let r = app.get(&format!("/api/notifications{query}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{query}: {:?}", r.body);
    r.body
}

fn titles(page: &Value) -> Vec<String> {
    page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["title"].as_str().unwrap().to_owned())
        .collect()
}

/// Europe/Paris's offset from UTC at `at`, in hours, by the EU rule (summer time from
/// the last Sunday of March to the last Sunday of October, 01:00 UTC): an oracle
/// independent of the server's time-zone database.
fn paris_offset(at: DateTime<Utc>) -> i64 {
    let last_sunday = |month: u32| {
        let mut d = NaiveDate::from_ymd_opt(at.year(), month, 31).unwrap();
        while d.weekday() != Weekday::Sun {
            d = d.pred_opt().unwrap();
        }
        d.and_hms_opt(1, 0, 0).unwrap().and_utc()
    };
    if at >= last_sunday(3) && at < last_sunday(10) {
        2
    } else {
        1
    }
}

/// A quiet window from one hour before to two hours after `now` in a zone `offset`
/// hours from UTC: (start, end, the UTC instant it ends).
fn window_around(now: DateTime<Utc>, offset: i64) -> (String, String, DateTime<Utc>) {
    let local = now + TimeDelta::hours(offset);
    let start = (local - TimeDelta::hours(1)).format("%H:%M").to_string();
    let end_local = (local + TimeDelta::hours(2))
        .with_second(0)
        .unwrap()
        .with_nanosecond(0)
        .unwrap();
    let end = end_local.format("%H:%M").to_string();
    (start, end, end_local - TimeDelta::hours(offset))
}

// ---- push to every device, and to nobody else ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_every_device_of_the_recipient_only_with_counts_kept_right() {
    let s = wsclient::Server::start(wsclient::config()).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let other = s.tenant("sdis83").await;

    let mut a1 = s.connect(&alice).await;
    let mut a2 = s.connect(&alice).await;
    let mut b = s.connect(&bob).await;
    let mut x = s.connect(&other).await;

    // (1) To Alice alone: both her connections, with her unread count.
    let r = s
        .post(
            "/api/admin/notifications",
            &admin.token,
            json!({"user_ids": [alice.id], "title": "Exercice incendie — caserne d'Aix",
                   "body": "Rendez-vous à 9 h, tenue de feu complète.", "link": "/annonces/1"}),
        )
        .await;
    assert_eq!(r["notified"], 1, "{r}");
    let mut first_id = String::new();
    for c in [&mut a1, &mut a2] {
        let f = c.next("notification").await;
        assert_eq!(f["unread"], 1, "{f}");
        let n = &f["notification"];
        assert_eq!(n["user_id"], alice.id.as_str());
        assert_eq!(n["kind"], "SYSTEM");
        assert_eq!(n["title"], "Exercice incendie — caserne d'Aix");
        assert_eq!(n["body"], "Rendez-vous à 9 h, tenue de feu complète.");
        assert_eq!(n["link"], "/annonces/1");
        assert!(n["read_at"].is_null(), "{f}");
        if first_id.is_empty() {
            first_id = n["id"].as_str().unwrap().to_owned();
        } else {
            assert_eq!(n["id"], first_id.as_str(), "the same notification on both");
        }
    }

    // (2) To the whole tenant: the admin, Alice and Bob; not the other tenant.
    let r = s
        .post(
            "/api/admin/notifications",
            &admin.token,
            json!({"title": "Message de la direction", "body": "Vigilance orange canicule."}),
        )
        .await;
    assert_eq!(r["notified"], 3, "admin, Alice and Bob: {r}");
    let mut second_id = String::new();
    for c in [&mut a1, &mut a2] {
        let f = c.next("notification").await;
        assert_eq!(f["notification"]["title"], "Message de la direction");
        assert_eq!(f["unread"], 2, "{f}");
        second_id = f["notification"]["id"].as_str().unwrap().to_owned();
    }
    let f = b.next("notification").await;
    assert_eq!(f["notification"]["title"], "Message de la direction");
    assert_eq!(f["notification"]["user_id"], bob.id.as_str());
    assert_eq!(f["unread"], 1, "{f}");
    assert_ne!(
        f["notification"]["id"],
        second_id.as_str(),
        "one row per recipient"
    );
    let (_, v) = s
        .call(
            reqwest::Method::GET,
            "/api/notifications/unread-count",
            &alice.token,
            None,
        )
        .await;
    assert_eq!(v["unread"], 2, "{v}");

    // (3) Alice reads the first one: both devices learn the new count.
    let r = s
        .post_empty_json(&format!("/api/notifications/{first_id}/read"), &alice.token)
        .await;
    assert_eq!(r["unread"], 1, "{r}");
    assert!(r["notification"]["read_at"].is_string(), "{r}");
    for c in [&mut a1, &mut a2] {
        let f = c.next("notifications_read").await;
        assert_eq!(f["ids"], json!([first_id]), "{f}");
        assert_eq!(f["all"], false, "{f}");
        assert_eq!(f["unread"], 1, "{f}");
    }
    assert_eq!(
        s.get("/api/notifications/unread-count", &alice.token).await["unread"],
        1
    );
    // Reading it again changes nothing and says the same count.
    let r = s
        .post_empty_json(&format!("/api/notifications/{first_id}/read"), &alice.token)
        .await;
    assert_eq!(r["unread"], 1, "{r}");

    // (4) A third one, then Alice deletes the unread second one.
    s.post(
        "/api/admin/notifications",
        &admin.token,
        json!({"user_ids": [alice.id], "title": "Rappel : visite médicale"}),
    )
    .await;
    for c in [&mut a1, &mut a2] {
        let f = c.next("notification").await;
        assert_eq!(f["unread"], 2, "{f}");
    }
    let (status, v) = s
        .call(
            reqwest::Method::DELETE,
            &format!("/api/notifications/{second_id}"),
            &alice.token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["unread"], 1, "{v}");
    assert_eq!(v["deleted"], second_id.as_str());
    for c in [&mut a1, &mut a2] {
        let f = c.next("notification_deleted").await;
        assert_eq!(f["id"], second_id.as_str(), "{f}");
        assert_eq!(f["unread"], 1, "{f}");
    }
    assert_eq!(
        s.get("/api/notifications/unread-count", &alice.token).await["unread"],
        1
    );

    // (5) Read all: both devices go to zero.
    let r = s
        .post_empty_json("/api/notifications/read-all", &alice.token)
        .await;
    assert_eq!(
        (r["marked"].as_u64(), r["unread"].as_i64()),
        (Some(1), Some(0)),
        "{r}"
    );
    for c in [&mut a1, &mut a2] {
        let f = c.next("notifications_read").await;
        assert_eq!(f["all"], true, "{f}");
        assert_eq!(f["unread"], 0, "{f}");
    }
    assert_eq!(
        s.get("/api/notifications/unread-count", &alice.token).await["unread"],
        0
    );
    // Bob's count never moved with Alice's.
    assert_eq!(
        s.get("/api/notifications/unread-count", &bob.token).await["unread"],
        1
    );
    let page = s.get("/api/notifications", &alice.token).await;
    assert_eq!(page["unread"], 0);
    let listed: Vec<&str> = page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "the deleted one is gone: {page}");
    assert!(!listed.contains(&second_id.as_str()));
    assert!(
        page["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["read_at"].is_string()),
        "{page}"
    );

    // (6) Sentinels: Bob, then the other tenant's admin, get one of their own; before
    // it, Bob saw nothing of Alice's, and the other tenant nothing at all.
    s.post(
        "/api/admin/notifications",
        &admin.token,
        json!({"user_ids": [bob.id], "title": "sentinelle Bob"}),
    )
    .await;
    let f = b
        .next_where("notification", |f| {
            f["notification"]["title"] == "sentinelle Bob"
        })
        .await;
    assert_eq!(f["unread"], 2, "{f}");
    let leaked: Vec<Value> = b
        .drain()
        .await
        .into_iter()
        .filter(|f| {
            f["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("notification"))
        })
        .collect();
    assert!(leaked.is_empty(), "Bob received {leaked:?}");
    s.post(
        "/api/admin/notifications",
        &other.token,
        json!({"user_ids": [other.id], "title": "sentinelle sdis83"}),
    )
    .await;
    let f = x.next("notification").await;
    assert_eq!(
        f["notification"]["title"], "sentinelle sdis83",
        "the other tenant's first notification is its own: {f}"
    );
    assert_eq!(f["unread"], 1, "{f}");
    let leaked: Vec<Value> = x
        .drain()
        .await
        .into_iter()
        .filter(|f| {
            f["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("notification"))
        })
        .collect();
    assert!(leaked.is_empty(), "sdis83 received {leaked:?}");
    // Alice's devices saw nothing of Bob's sentinel either.
    for c in [&mut a1, &mut a2] {
        let leaked: Vec<Value> = c
            .drain()
            .await
            .into_iter()
            .filter(|f| {
                f["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("notification"))
            })
            .collect();
        assert!(leaked.is_empty(), "Alice received {leaked:?}");
    }
}

// ---- the bell: pagination and filters --------------------------------------------------

#[tokio::test]
async fn the_list_pages_with_before_filters_unread_and_bounds_its_limit() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let (_, bob) = app.user(&admin, "sdis13", "Bob").await;
    for i in 1..=5 {
        broadcast(
            &app,
            &admin,
            json!({"user_ids": [alice_id], "title": format!("Note {i}")}),
        )
        .await;
    }

    // Newest first, two at a time, following next_before to the end.
    let all = bell(&app, &alice, "?limit=100").await;
    assert_eq!(
        titles(&all),
        ["Note 5", "Note 4", "Note 3", "Note 2", "Note 1"],
        "{all}"
    );
    assert!(all["next_before"].is_null(), "{all}");
    assert_eq!(all["unread"], 5);
    let mut seen = Vec::new();
    let mut query = "?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let page = bell(&app, &alice, &query).await;
        pages += 1;
        let n = page["notifications"].as_array().unwrap().len();
        assert!(n <= 2, "{page}");
        seen.extend(titles(&page));
        match page["next_before"].as_str() {
            Some(c) => {
                assert_eq!(
                    page["notifications"][n - 1]["id"],
                    c,
                    "the cursor is the last id of the page"
                );
                query = format!("?limit=2&before={c}");
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(seen, titles(&all), "every notification once, in order");
    assert_eq!(pages, 3);

    // Unread only.
    let ids: Vec<String> = all["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    for id in [&ids[0], &ids[2]] {
        let r = app
            .post_empty(&format!("/api/notifications/{id}/read"), &alice)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let page = bell(&app, &alice, "?unread_only=true").await;
    assert_eq!(titles(&page), ["Note 4", "Note 2", "Note 1"], "{page}");
    assert_eq!(page["unread"], 3);
    let page = bell(&app, &alice, "?unread_only=true&limit=2").await;
    assert_eq!(titles(&page), ["Note 4", "Note 2"], "{page}");
    let c = page["next_before"].as_str().unwrap();
    let page = bell(
        &app,
        &alice,
        &format!("?unread_only=true&limit=2&before={c}"),
    )
    .await;
    assert_eq!(titles(&page), ["Note 1"], "{page}");
    assert_eq!(unread(&app, &alice).await, 3);

    // Bounds.
    for bad in [0, 101] {
        let r = app
            .get(&format!("/api/notifications?limit={bad}"), &alice)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit"),
            "limit={bad}: {:?}",
            r.body
        );
    }
    assert_eq!(titles(&bell(&app, &alice, "?limit=1").await), ["Note 5"]);
    for bad in [
        "?limit=abc",
        "?limit=-1",
        "?before=pas-un-uuid",
        "?unread_only=peut-etre",
        "?colour=red",
    ] {
        let r = app.get(&format!("/api/notifications{bad}"), &alice).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_query_string"),
            "{bad}: {:?}",
            r.body
        );
    }

    // Bob sees none of Alice's, even with her cursor.
    let page = bell(&app, &bob, "").await;
    assert_eq!(page["notifications"], json!([]), "{page}");
    assert_eq!(page["unread"], 0);
    let page = bell(&app, &bob, &format!("?before={}", ids[0])).await;
    assert_eq!(page["notifications"], json!([]), "{page}");
    let r = app.get("/api/notifications", "not-a-token").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

// ---- isolation ---------------------------------------------------------------------------

#[tokio::test]
async fn nobody_reads_marks_or_deletes_another_users_notification() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let (bob_id, bob) = app.user(&admin, "sdis13", "Bob").await;
    let stranger = app.tenant("sdis83").await;
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id], "title": "Pour Alice seulement"}),
    )
    .await;
    let page = bell(&app, &alice, "").await;
    let id = page["notifications"][0]["id"].as_str().unwrap().to_owned();

    for who in [&bob, &admin, &stranger] {
        let r = app
            .post_empty(&format!("/api/notifications/{id}/read"), who)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{:?}",
            r.body
        );
        let r = app.delete(&format!("/api/notifications/{id}"), who).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{:?}",
            r.body
        );
        // Their read-all does not touch it either.
        let r = app.post_empty("/api/notifications/read-all", who).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    // Still Alice's, still unread.
    let page = bell(&app, &alice, "").await;
    assert_eq!(page["notifications"][0]["id"], id.as_str());
    assert!(page["notifications"][0]["read_at"].is_null(), "{page}");
    assert_eq!(unread(&app, &alice).await, 1);

    // Missing and malformed identifiers.
    let missing = uuid::Uuid::now_v7();
    let r = app
        .post_empty(&format!("/api/notifications/{missing}/read"), &alice)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    let r = app
        .post_empty("/api/notifications/pas-un-uuid/read", &alice)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );
    // Deleting twice: the second is 404.
    let r = app
        .delete(&format!("/api/notifications/{id}"), &alice)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["unread"], 0);
    let r = app
        .delete(&format!("/api/notifications/{id}"), &alice)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);

    // Only an administrator broadcasts, and only to users of their own tenant.
    let r = app
        .post(
            "/api/admin/notifications",
            &bob,
            json!({"title": "Je me prends pour le chef"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let foreign = app.tenant_of(&stranger).await;
    let _ = foreign;
    let r = app.get("/api/me", &stranger).await;
    let stranger_id = r.body["user"]["id"].as_str().unwrap().to_owned();
    for ids in [
        json!([bob_id, uuid::Uuid::now_v7().to_string()]),
        json!([bob_id, stranger_id]),
    ] {
        let r = app
            .post(
                "/api/admin/notifications",
                &admin,
                json!({"user_ids": ids, "title": "Avec un inconnu"}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "unknown_users"),
            "{:?}",
            r.body
        );
    }
    assert_eq!(unread(&app, &bob).await, 0, "nothing written for Bob");
    assert_eq!(unread(&app, &stranger).await, 0);
    // Bad broadcasts.
    for (body, status, code) in [
        (
            json!({"title": "   "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_notification",
        ),
        (
            json!({"title": "x".repeat(201)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_notification",
        ),
        (
            json!({"title": "ok", "kind": "MENTION"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"body": "sans titre"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ] {
        let r = app
            .post("/api/admin/notifications", &admin, body.clone())
            .await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {:?}", r.body);
    }
    let r = app
        .send_text(
            Method::POST,
            "/api/admin/notifications",
            &admin,
            "{\"title\":",
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );
    assert_eq!(unread(&app, &bob).await, 0);
    assert_eq!(unread(&app, &admin).await, 0);
}

// ---- preferences ---------------------------------------------------------------------

#[tokio::test]
async fn preferences_show_defaults_refuse_unknown_keys_and_decide_the_email_job() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;

    // Defaults: every built-in type on both channels, no quiet hours.
    let r = app.get("/api/notifications/preferences", &alice).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["preferences"]["types"], json!({}), "{:?}", r.body);
    let effective = &r.body["effective"];
    for k in [
        "FMPA_INVITATION",
        "FMPA_REMINDER",
        "FMPA_UPDATED",
        "FMPA_CANCELLED",
        "NEW_MESSAGE",
        "MENTION",
        "SYSTEM",
    ] {
        assert_eq!(
            effective["types"][k],
            json!({"in_app": true, "email": true}),
            "{k}: {effective}"
        );
    }
    assert!(effective["quiet_hours"].is_null(), "{effective}");

    // E-mail on (the default): the broadcast enqueues one e-mail job for Alice.
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id], "title": "Avec e-mail"}),
    )
    .await;
    let jobs = email_jobs(&app, tenant, &alice_id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].queue, "email");
    assert_eq!(jobs[0].payload["kind"], "SYSTEM");
    assert_eq!(jobs[0].payload["title"], "Avec e-mail");
    assert!(jobs[0].payload["notification_id"].is_string());
    assert!(
        jobs[0].run_at <= Utc::now(),
        "due now: {:?}",
        jobs[0].run_at
    );

    // E-mail off for SYSTEM: stored in-app, no job.
    let r = app
        .put(
            "/api/notifications/preferences",
            &alice,
            json!({"types": {"SYSTEM": {"email": false}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["effective"]["types"]["SYSTEM"],
        json!({"in_app": true, "email": false})
    );
    assert_eq!(
        r.body["effective"]["types"]["MENTION"],
        json!({"in_app": true, "email": true}),
        "other types keep their defaults"
    );
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id], "title": "Sans e-mail"}),
    )
    .await;
    assert_eq!(email_jobs(&app, tenant, &alice_id).await.len(), 1);
    assert_eq!(titles(&bell(&app, &alice, "").await)[0], "Sans e-mail");

    // In-app off, e-mail on: an e-mail job without a stored notification.
    let r = app
        .put(
            "/api/notifications/preferences",
            &alice,
            json!({"types": {"SYSTEM": {"in_app": false, "email": true}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id], "title": "Par e-mail seulement"}),
    )
    .await;
    let jobs = email_jobs(&app, tenant, &alice_id).await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let by_mail = jobs
        .iter()
        .find(|j| j.payload["title"] == "Par e-mail seulement")
        .expect("the e-mail-only job");
    assert!(by_mail.payload["notification_id"].is_null(), "{by_mail:?}");
    assert_eq!(
        titles(&bell(&app, &alice, "").await)[0],
        "Sans e-mail",
        "nothing stored in-app"
    );
    assert_eq!(unread(&app, &alice).await, 2);

    // Unknown keys and bad values: refused with a code, nothing written.
    let before = app.get("/api/notifications/preferences", &alice).await.body;
    for (body, code) in [
        (
            json!({"types": {"SMS_ALERT": {"email": true}}}),
            "unknown_notification_type",
        ),
        (json!({"types": {"SYSTEM": {"sms": true}}}), "invalid_body"),
        (
            json!({"types": {"SYSTEM": {"email": "oui"}}}),
            "invalid_body",
        ),
        (json!({"colour": "rouge"}), "invalid_body"),
        (
            json!({"quiet_hours": {"start": "25:00", "end": "07:00"}}),
            "invalid_quiet_hours",
        ),
        (
            json!({"quiet_hours": {"start": "22:00", "end": "22:00"}}),
            "invalid_quiet_hours",
        ),
        (
            json!({"quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Mars/Olympus"}}),
            "invalid_quiet_hours",
        ),
        (
            json!({"quiet_hours": {"start": "22:00", "end": "07:00", "volume": 0}}),
            "invalid_body",
        ),
    ] {
        let r = app
            .put("/api/notifications/preferences", &alice, body.clone())
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, code),
            "{body}: {:?}",
            r.body
        );
        let now = app.get("/api/notifications/preferences", &alice).await.body;
        assert_eq!(now, before, "{body} wrote something");
    }
    let r = app
        .send_text(
            Method::PUT,
            "/api/notifications/preferences",
            &alice,
            "{\"types\": {",
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );
    assert_eq!(
        app.get("/api/notifications/preferences", &alice).await.body,
        before
    );
}

#[tokio::test]
async fn quiet_hours_hold_the_email_until_they_end_and_urgent_ones_do_not_wait() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let (bob_id, bob) = app.user(&admin, "sdis13", "Bob").await;

    // Alice's quiet hours in Paris (the default zone) cover now; Bob's are in
    // Guadeloupe time (UTC-4, no summer time), also covering now.
    let now = Utc::now();
    let (start, end, paris_end) = window_around(now, paris_offset(now));
    let r = app
        .put(
            "/api/notifications/preferences",
            &alice,
            json!({"quiet_hours": {"start": start, "end": end}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["effective"]["quiet_hours"],
        json!({"start": start, "end": end, "time_zone": "Europe/Paris"})
    );
    let (gstart, gend, guadeloupe_end) = window_around(now, -4);
    let r = app
        .put(
            "/api/notifications/preferences",
            &bob,
            json!({"quiet_hours": {"start": gstart, "end": gend, "time_zone": "America/Guadeloupe"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id, bob_id], "title": "Peut attendre"}),
    )
    .await;
    let jobs = email_jobs(&app, tenant, &alice_id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        jobs[0].run_at, paris_end,
        "held until {end} Paris time (now {now})"
    );
    assert_eq!(jobs[0].state, JobState::Scheduled);
    let jobs = email_jobs(&app, tenant, &bob_id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        jobs[0].run_at, guadeloupe_end,
        "held until {gend} Guadeloupe time (now {now})"
    );
    // The in-app copy is not held.
    assert_eq!(unread(&app, &alice).await, 1);

    // Urgent: leaves now despite quiet hours.
    let before = Utc::now();
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id], "title": "Alerte : renfort demandé", "urgent": true}),
    )
    .await;
    let after = Utc::now();
    let jobs = email_jobs(&app, tenant, &alice_id).await;
    let urgent = jobs
        .iter()
        .find(|j| j.payload["title"] == "Alerte : renfort demandé")
        .expect("the urgent job");
    assert!(
        urgent.run_at >= before - TimeDelta::seconds(1) && urgent.run_at <= after,
        "urgent run_at {} not between {before} and {after}",
        urgent.run_at
    );

    // Quiet hours that do not cover now: due at once.
    let later = now + TimeDelta::hours(paris_offset(now));
    let r = app
        .put(
            "/api/notifications/preferences",
            &alice,
            json!({"quiet_hours": {
                "start": (later + TimeDelta::hours(3)).format("%H:%M").to_string(),
                "end": (later + TimeDelta::hours(4)).format("%H:%M").to_string(),
            }}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let before = Utc::now();
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id], "title": "Hors heures calmes"}),
    )
    .await;
    let after = Utc::now();
    let jobs = email_jobs(&app, tenant, &alice_id).await;
    let j = jobs
        .iter()
        .find(|j| j.payload["title"] == "Hors heures calmes")
        .unwrap();
    assert!(
        j.run_at >= before - TimeDelta::seconds(1) && j.run_at <= after,
        "{}",
        j.run_at
    );
}

#[tokio::test]
async fn tenant_defaults_apply_to_users_without_their_own_and_only_admins_set_them() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let (bob_id, bob) = app.user(&admin, "sdis13", "Bob").await;
    let (_, officer) = app
        .user_with_role(&admin, "sdis13", "Lieutenant Dubois", "officer")
        .await;
    let stranger = app.tenant("sdis83").await;

    let r = app
        .get("/api/admin/notifications/preferences", &admin)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["preferences"]["types"], json!({}), "{:?}", r.body);

    // Non-admins: 403, on both verbs; nothing written.
    for who in [&alice, &officer] {
        let r = app
            .put(
                "/api/admin/notifications/preferences",
                who,
                json!({"types": {"SYSTEM": {"email": false}}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "PUT: {:?}", r.body);
        let r = app.get("/api/admin/notifications/preferences", who).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "GET: {:?}", r.body);
    }
    let r = app
        .get("/api/admin/notifications/preferences", &admin)
        .await;
    assert_eq!(r.body["preferences"]["types"], json!({}), "{:?}", r.body);

    // Bob has his own setting for MENTION only; SYSTEM e-mail he inherits.
    let r = app
        .put(
            "/api/notifications/preferences",
            &bob,
            json!({"types": {"MENTION": {"in_app": false}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    // The admin turns SYSTEM e-mail off for the tenant.
    let r = app
        .put(
            "/api/admin/notifications/preferences",
            &admin,
            json!({"types": {"SYSTEM": {"email": false}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["preferences"]["types"]["SYSTEM"],
        json!({"email": false})
    );
    let r = app.get("/api/notifications/preferences", &alice).await;
    assert_eq!(r.body["preferences"]["types"], json!({}), "her own: none");
    assert_eq!(
        r.body["effective"]["types"]["SYSTEM"],
        json!({"in_app": true, "email": false}),
        "{:?}",
        r.body
    );
    let r = app.get("/api/notifications/preferences", &bob).await;
    assert_eq!(
        r.body["effective"]["types"]["SYSTEM"],
        json!({"in_app": true, "email": false}),
        "Bob inherits what he did not set: {:?}",
        r.body
    );
    assert_eq!(
        r.body["effective"]["types"]["MENTION"],
        json!({"in_app": false, "email": true})
    );
    // Another tenant is not affected.
    let r = app.get("/api/notifications/preferences", &stranger).await;
    assert_eq!(
        r.body["effective"]["types"]["SYSTEM"],
        json!({"in_app": true, "email": true})
    );

    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id, bob_id], "title": "Défauts du SDIS"}),
    )
    .await;
    assert!(email_jobs(&app, tenant, &alice_id).await.is_empty());
    assert!(email_jobs(&app, tenant, &bob_id).await.is_empty());
    assert_eq!(unread(&app, &alice).await, 1);

    // Alice's own setting wins over the tenant's.
    let r = app
        .put(
            "/api/notifications/preferences",
            &alice,
            json!({"types": {"SYSTEM": {"email": true}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [alice_id, bob_id], "title": "Choix d'Alice"}),
    )
    .await;
    assert_eq!(email_jobs(&app, tenant, &alice_id).await.len(), 1);
    assert!(email_jobs(&app, tenant, &bob_id).await.is_empty());

    // Tenant quiet hours apply to Bob, who has none of his own.
    let now = Utc::now();
    let (start, end, paris_end) = window_around(now, paris_offset(now));
    let r = app
        .put(
            "/api/admin/notifications/preferences",
            &admin,
            json!({"quiet_hours": {"start": start, "end": end}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = app
        .put(
            "/api/notifications/preferences",
            &bob,
            json!({"types": {"SYSTEM": {"email": true}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["effective"]["quiet_hours"]["end"], end,
        "{:?}",
        r.body
    );
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [bob_id], "title": "Heures calmes du SDIS"}),
    )
    .await;
    let jobs = email_jobs(&app, tenant, &bob_id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].run_at, paris_end);

    // Bad tenant defaults: refused, nothing written.
    let before = app
        .get("/api/admin/notifications/preferences", &admin)
        .await
        .body;
    for (body, code) in [
        (
            json!({"types": {"PAGER": {"email": true}}}),
            "unknown_notification_type",
        ),
        (json!({"types": {"SYSTEM": {"sms": true}}}), "invalid_body"),
    ] {
        let r = app
            .put("/api/admin/notifications/preferences", &admin, body.clone())
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, code),
            "{body}: {:?}",
            r.body
        );
    }
    assert_eq!(
        app.get("/api/admin/notifications/preferences", &admin)
            .await
            .body,
        before
    );
}

// ---- an e-mail arriving ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_on_arrives_with_its_recipient_subject_and_accents_and_an_email_off_does_not() {
    let Some(sink) = SmtpSink::start() else {
        return;
    };
    let (app, state) = TestApp::with_state().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let r = app
        .post(
            "/api/admin/users",
            &admin,
            json!({"email": "elodie.lefevre@sdis13.fr", "display_name": "Sergent Élodie Lefèvre",
                   "role": "member", "password": common::PASSWORD}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let elodie = r.body["user"]["id"].as_str().unwrap().to_owned();
    let (karim, karim_token) = app.user(&admin, "sdis13", "Karim").await;
    let r = app
        .put(
            "/api/notifications/preferences",
            &karim_token,
            json!({"types": {"SYSTEM": {"email": false}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    let from = Mailbox {
        name: Some("MindSP — SDIS 13".into()),
        address: "ne-pas-repondre@sdis13.fr".into(),
    };
    let mut smtp = SmtpConfig::from_url(&sink.url(), from).unwrap();
    smtp.timeout = Duration::from_secs(5);
    let mailer = Arc::new(SmtpMailer::new(smtp).unwrap());
    let worker = start_worker(
        app.queue.clone(),
        mailer,
        &WorkerSettings {
            concurrency: 2,
            lease: Duration::from_secs(5),
            retention: None,
            public_url: "https://mindsp.sdis13.fr".into(),
            ..WorkerSettings::default()
        },
        Some(NotifyServices {
            store: app.store.clone(),
            notifier: state.notifier.clone(),
            training: state.training.clone(),
            online: Arc::new(NobodyOnline),
        }),
    )
    .unwrap();

    let title = "Réunion de sécurité — caserne d'Aix, à 18 h";
    let body = "Présence obligatoire. Tenue de manœuvre ; apportez votre carnet « ARI ».";
    broadcast(
        &app,
        &admin,
        json!({"user_ids": [elodie, karim], "title": title, "body": body, "link": "/annonces/42"}),
    )
    .await;
    assert!(email_jobs(&app, tenant, &karim).await.is_empty());
    let received = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["elodie.lefevre@sdis13.fr"]);
    assert_eq!(received[0].mail_from, "ne-pas-repondre@sdis13.fr");
    let m = MessageParser::default()
        .parse(&received[0].raw)
        .expect("a parsable message");
    assert_eq!(m.subject(), Some(title));
    let to = m.to().and_then(|t| t.first()).expect("a To header");
    assert_eq!(to.address(), Some("elodie.lefevre@sdis13.fr"));
    assert_eq!(to.name(), Some("Sergent Élodie Lefèvre"));
    let text = m.body_text(0).expect("a text part");
    assert!(text.contains(body), "{text}");
    assert!(
        text.contains("https://mindsp.sdis13.fr/annonces/42"),
        "{text}"
    );
    let html = m.body_html(0).expect("an HTML part");
    assert!(html.contains("manœuvre"), "{html}");

    // The job ends succeeded; Karim's never existed, so nothing else arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let jobs = email_jobs(&app, tenant, &elodie).await;
        assert_eq!(jobs.len(), 1);
        if jobs[0].state == JobState::Succeeded {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", jobs[0]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.received().len(), 1);
    worker.shutdown(Duration::from_secs(2)).await;
}
