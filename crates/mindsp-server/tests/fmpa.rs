//! Training sessions (FMPA) through the API: invitations notify and schedule one
//! reminder job per invitee and lead time; moving a session moves those jobs (no
//! duplicates), cancelling cancels them; answers, permissions, tenant isolation, bad
//! input that writes nothing; and a reminder job that runs twice notifies once. Over a
//! real SQLite file and the SQL queue in it; no mocks.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use axum::http::{Method, StatusCode};
use chrono::{DateTime, TimeDelta, Timelike, Utc};
use common::TestApp;
use mindsp_core::jobs::{Job, JobState};
use mindsp_core::notify::Notification;
use mindsp_core::reminders::Reminder;
use mindsp_core::{TenantId, UserId};
use mindsp_queue::worker::Handler;
use serde_json::{Value, json};

// ---- helpers ----------------------------------------------------------------------------

/// `now + days`, to the second (so stored times compare exactly).
fn in_days(days: i64) -> DateTime<Utc> {
    (Utc::now() + TimeDelta::days(days))
        .with_nanosecond(0)
        .unwrap()
}

fn session_body(start: DateTime<Utc>, invitees: &[String]) -> Value {
    json!({
        "title": "Manœuvre ARI en milieu enfumé",
        "kind": "ari",
        "description": "Port de l'ARI, recherche de victimes, sortie en binôme.",
        "location": "Centre de secours de Vitrolles — plateau technique",
        "start_at": start.to_rfc3339(),
        "end_at": (start + TimeDelta::hours(3)).to_rfc3339(),
        "invitees": invitees,
    })
}

async fn create(app: &TestApp, token: &str, body: Value) -> Value {
    let r = app.post("/api/fmpa", token, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["session"].clone()
}

/// The `fmpa.reminder` jobs of `tenant`, every state.
async fn reminder_jobs(app: &TestApp, tenant: TenantId) -> Vec<Job> {
    app.jobs(tenant)
        .await
        .into_iter()
        .filter(|j| j.kind == "fmpa.reminder")
        .collect()
}

fn pending(jobs: &[Job]) -> Vec<&Job> {
    jobs.iter().filter(|j| !j.state.is_final()).collect()
}

/// A user's notifications, newest first, straight from the store.
async fn notifications_of(app: &TestApp, tenant: TenantId, user: &str) -> Vec<Notification> {
    let mut tx = app.store.read(tenant).await.unwrap();
    tx.notifications(user.parse::<UserId>().unwrap(), None, false, 100)
        .await
        .unwrap()
}

async fn kinds_of(app: &TestApp, tenant: TenantId, user: &str) -> Vec<String> {
    let mut k: Vec<String> = notifications_of(app, tenant, user)
        .await
        .into_iter()
        .map(|n| n.kind)
        .collect();
    k.reverse();
    k
}

fn key(session: &str, user: &str, offset: i64) -> String {
    format!("reminder:fmpa:{session}:{user}:{offset}")
}

fn invitee<'a>(session: &'a Value, user: &str) -> &'a Value {
    session["invitees"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["user_id"] == user)
        .unwrap_or_else(|| panic!("{user} not among the invitees: {session}"))
}

async fn list_ids(app: &TestApp, token: &str, query: &str) -> Vec<String> {
    let r = app.get(&format!("/api/fmpa{query}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{query}: {:?}", r.body);
    r.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Checks the pending reminders of `session`: one per invitee and lead time, keyed,
/// due `offset` minutes before `start`, carrying `start`. Answers them by key.
fn check_reminders(
    jobs: &[Job],
    session: &str,
    invitees: &[String],
    start: DateTime<Utc>,
) -> BTreeMap<String, Job> {
    let live = pending(jobs);
    assert_eq!(
        live.len(),
        invitees.len() * 2,
        "pending reminders: {live:#?}"
    );
    let mut by_key = BTreeMap::new();
    for j in live {
        let k = j.unique_key.clone().expect("a reminder job is keyed");
        assert_eq!(j.state, JobState::Scheduled, "{j:?}");
        let r: Reminder = serde_json::from_value(j.payload.clone()).unwrap();
        assert_eq!(r.subject, format!("fmpa:{session}"));
        assert_eq!(r.start_at, start, "{j:?}");
        assert!(r.offset_minutes == 1440 || r.offset_minutes == 60, "{j:?}");
        assert_eq!(
            j.run_at,
            start - TimeDelta::minutes(r.offset_minutes),
            "{j:?}"
        );
        assert_eq!(k, key(session, &r.user_id.to_string(), r.offset_minutes));
        assert!(by_key.insert(k, j.clone()).is_none(), "duplicate key");
    }
    let expected: BTreeSet<String> = invitees
        .iter()
        .flat_map(|u| [key(session, u, 1440), key(session, u, 60)])
        .collect();
    assert_eq!(by_key.keys().cloned().collect::<BTreeSet<_>>(), expected);
    by_key
}

// ---- the life of a session ---------------------------------------------------------------

#[tokio::test]
async fn twenty_invitees_get_forty_reminders_that_move_with_the_session_and_go_when_cancelled() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (officer_id, officer) = app
        .user_with_role(&admin, "sdis13", "Lieutenant Dubois", "officer")
        .await;
    let invitees = app.bulk_members(tenant, "sdis13", 20).await;
    let start = in_days(3);

    let s = create(&app, &officer, session_body(start, &invitees)).await;
    let id = s["id"].as_str().unwrap().to_owned();
    assert_eq!(s["status"], "scheduled");
    assert_eq!(s["organizer_id"], officer_id.as_str());
    assert_eq!(s["reminder_offsets"], json!([1440, 60]));
    assert_eq!(s["invitees"].as_array().unwrap().len(), 20);
    for u in &invitees {
        assert_eq!(invitee(&s, u)["response"], "pending");
    }
    let r = app.get(&format!("/api/fmpa/{id}"), &officer).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["session"]["title"], "Manœuvre ARI en milieu enfumé");
    assert_eq!(list_ids(&app, &officer, "").await, vec![id.clone()]);

    // 20 invitations, one each; the organiser gets none.
    for u in &invitees {
        let ns = notifications_of(&app, tenant, u).await;
        assert_eq!(ns.len(), 1, "{u}: {ns:?}");
        assert_eq!(ns[0].kind, "FMPA_INVITATION");
        assert_eq!(ns[0].link.as_deref(), Some(format!("/fmpa/{id}").as_str()));
        assert_eq!(ns[0].data["session_id"], id.as_str());
        assert!(
            ns[0].body.contains("Manœuvre ARI en milieu enfumé"),
            "{:?}",
            ns[0]
        );
    }
    assert!(notifications_of(&app, tenant, &officer_id).await.is_empty());
    // 40 reminders, keyed, due 24 h and 1 h before; 20 invitation e-mails.
    let jobs = reminder_jobs(&app, tenant).await;
    assert_eq!(jobs.len(), 40, "{jobs:#?}");
    let first = check_reminders(&jobs, &id, &invitees, start);
    let emails: Vec<Job> = app
        .jobs(tenant)
        .await
        .into_iter()
        .filter(|j| j.kind == "notification.email")
        .collect();
    assert_eq!(emails.len(), 20);
    assert!(
        emails
            .iter()
            .all(|j| j.payload["kind"] == "FMPA_INVITATION")
    );

    // A change of title alone: no FMPA_UPDATED, reminders untouched.
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &officer,
            json!({"title": "Manœuvre ARI — milieu enfumé"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        kinds_of(&app, tenant, &invitees[0]).await,
        ["FMPA_INVITATION"]
    );
    let jobs = reminder_jobs(&app, tenant).await;
    assert_eq!(jobs.len(), 40);
    check_reminders(&jobs, &id, &invitees, start);

    // Moved one day later: the same 40 jobs, moved; everyone told.
    let moved = start + TimeDelta::days(1);
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &officer,
            json!({"start_at": moved.to_rfc3339(), "end_at": (moved + TimeDelta::hours(3)).to_rfc3339()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body["session"]["start_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().unwrap()),
        Some(moved)
    );
    let jobs = reminder_jobs(&app, tenant).await;
    assert_eq!(jobs.len(), 40, "moved, not added: {jobs:#?}");
    let second = check_reminders(&jobs, &id, &invitees, moved);
    for (k, j) in &second {
        assert_eq!(j.id, first[k].id, "{k} kept its job");
    }
    for u in &invitees {
        assert_eq!(
            kinds_of(&app, tenant, u).await,
            ["FMPA_INVITATION", "FMPA_UPDATED"],
            "{u}"
        );
    }

    // Cancelled: every reminder cancelled, everyone told.
    let r = app
        .post(
            &format!("/api/fmpa/{id}/cancel"),
            &officer,
            json!({"reason": "Vigilance rouge orages"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["session"]["status"], "cancelled");
    assert_eq!(r.body["session"]["cancel_reason"], "Vigilance rouge orages");
    let jobs = reminder_jobs(&app, tenant).await;
    assert_eq!(jobs.len(), 40);
    assert!(pending(&jobs).is_empty(), "{:#?}", pending(&jobs));
    assert!(jobs.iter().all(|j| j.state == JobState::Cancelled));
    for u in &invitees {
        let ns = notifications_of(&app, tenant, u).await;
        assert_eq!(ns[0].kind, "FMPA_CANCELLED", "{u}: {ns:?}");
        assert!(ns[0].body.contains("Vigilance rouge orages"), "{:?}", ns[0]);
        assert_eq!(ns.iter().filter(|n| n.kind == "FMPA_CANCELLED").count(), 1);
    }

    // A cancelled session is no longer changed, cancelled or answered.
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &officer,
            json!({"title": "Encore"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "session_cancelled")
    );
    let r = app
        .post_empty(&format!("/api/fmpa/{id}/cancel"), &officer)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "session_cancelled")
    );
    assert!(list_ids(&app, &officer, "").await.is_empty());
    assert_eq!(
        list_ids(&app, &officer, "?include_cancelled=true").await,
        vec![id.clone()]
    );
    // Still exactly 20 + 20 + 20 in-app notifications overall, none doubled.
    let mut total = 0;
    for u in &invitees {
        total += notifications_of(&app, tenant, u).await.len();
    }
    assert_eq!(total, 60);
}

#[tokio::test]
async fn invitees_answer_and_nobody_else_does_or_organises() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (_, officer) = app
        .user_with_role(&admin, "sdis13", "Capitaine Roux", "officer")
        .await;
    let (_, other_officer) = app
        .user_with_role(&admin, "sdis13", "Lieutenant Blanc", "officer")
        .await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let (bob_id, _bob) = app.user(&admin, "sdis13", "Bob").await;
    let (_, carol) = app.user(&admin, "sdis13", "Carol").await;
    let s = create(
        &app,
        &officer,
        session_body(in_days(5), &[alice_id.clone(), bob_id.clone()]),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let respond = format!("/api/fmpa/{id}/respond");

    let r = app
        .post(&respond, &alice, json!({"response": "present"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let me = invitee(&r.body["session"], &alice_id);
    assert_eq!(me["response"], "present");
    assert!(me["responded_at"].is_string(), "{me}");
    assert_eq!(invitee(&r.body["session"], &bob_id)["response"], "pending");
    let r = app
        .post(&respond, &alice, json!({"response": "absent"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = app.get(&format!("/api/fmpa/{id}"), &alice).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(invitee(&r.body["session"], &alice_id)["response"], "absent");

    // Not invited: 403, even the organiser's colleague.
    for who in [&carol, &other_officer] {
        let r = app
            .post(&respond, who, json!({"response": "present"}))
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{:?}",
            r.body
        );
    }
    // Bad answers.
    for body in [
        json!({"response": "peut-être"}),
        json!({"response": "pending"}),
        json!({"response": ""}),
    ] {
        let r = app.post(&respond, &alice, body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_response"),
            "{body}: {:?}",
            r.body
        );
    }
    for body in [
        json!({"response": "present", "comment": "en retard"}),
        json!({}),
    ] {
        let r = app.post(&respond, &alice, body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            "{body}: {:?}",
            r.body
        );
    }
    let r = app.get(&format!("/api/fmpa/{id}"), &alice).await;
    assert_eq!(invitee(&r.body["session"], &alice_id)["response"], "absent");

    // A member organises nothing; only the organiser or an admin changes a session.
    let r = app
        .post(
            "/api/fmpa",
            &alice,
            session_body(in_days(6), std::slice::from_ref(&bob_id)),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{:?}",
        r.body
    );
    for who in [&alice, &other_officer] {
        let r = app
            .patch(
                &format!("/api/fmpa/{id}"),
                who,
                json!({"location": "Ailleurs"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
        let r = app.post_empty(&format!("/api/fmpa/{id}/cancel"), who).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    }
    assert_eq!(
        kinds_of(&app, tenant, &bob_id).await,
        ["FMPA_INVITATION"],
        "a refused member's session invited nobody"
    );
    assert_eq!(list_ids(&app, &alice, "").await, vec![id.clone()]);
    // An administrator may change it: a new place tells the invitees.
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &admin,
            json!({"location": "CIS Aix-en-Provence, tour de manœuvre"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        kinds_of(&app, tenant, &bob_id).await,
        ["FMPA_INVITATION", "FMPA_UPDATED"]
    );
    // `mine`: the invitee's sessions, not the outsider's.
    assert_eq!(list_ids(&app, &alice, "?mine=true").await, vec![id.clone()]);
    assert!(list_ids(&app, &carol, "?mine=true").await.is_empty());
    // Cancel without a body works too.
    let r = app
        .post_empty(&format!("/api/fmpa/{id}/cancel"), &officer)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["session"]["cancel_reason"].is_null());
    let r = app
        .post(&respond, &alice, json!({"response": "present"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "session_cancelled")
    );
}

#[tokio::test]
async fn another_tenants_session_is_not_found_and_not_listed() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let (alice_id, _) = app.user(&admin, "sdis13", "Alice").await;
    let stranger = app.tenant("sdis83").await;
    let (_, stranger_member) = app.user(&stranger, "sdis83", "Xavier").await;
    let s = create(&app, &admin, session_body(in_days(2), &[alice_id])).await;
    let id = s["id"].as_str().unwrap().to_owned();

    for who in [&stranger, &stranger_member] {
        let r = app.get(&format!("/api/fmpa/{id}"), who).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{:?}",
            r.body
        );
        let r = app
            .patch(&format!("/api/fmpa/{id}"), who, json!({"title": "Piraté"}))
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "PATCH: {:?}", r.body);
        let r = app.post_empty(&format!("/api/fmpa/{id}/cancel"), who).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "cancel: {:?}", r.body);
        let r = app
            .post(
                &format!("/api/fmpa/{id}/respond"),
                who,
                json!({"response": "present"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "respond: {:?}", r.body);
        for q in ["", "?include_cancelled=true", "?mine=true"] {
            assert!(list_ids(&app, who, q).await.is_empty(), "{q}");
        }
    }
    // Untouched.
    let r = app.get(&format!("/api/fmpa/{id}"), &admin).await;
    assert_eq!(r.body["session"]["title"], s["title"]);
    assert_eq!(r.body["session"]["status"], "scheduled");
    assert_eq!(r.body["session"]["updated_at"], s["updated_at"]);

    // Missing and malformed identifiers.
    let missing = uuid::Uuid::now_v7();
    let r = app.get(&format!("/api/fmpa/{missing}"), &admin).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/api/fmpa/pas-un-uuid", &admin).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );
}

#[tokio::test]
async fn bad_sessions_are_refused_with_a_code_and_write_nothing() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (alice_id, alice) = app.user(&admin, "sdis13", "Alice").await;
    let stranger = app.tenant("sdis83").await;
    let stranger_id = app.get("/api/me", &stranger).await.body["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ok = || session_body(in_days(2), std::slice::from_ref(&alice_id));
    let with = |field: &str, v: Value| {
        let mut b = ok();
        b[field] = v;
        b
    };
    let start = in_days(2);

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            with("end_at", json!((start - TimeDelta::hours(1)).to_rfc3339())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dates",
        ),
        (
            with("end_at", json!(start.to_rfc3339())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dates",
        ),
        (
            {
                let past = Utc::now() - TimeDelta::hours(2);
                let mut b = ok();
                b["start_at"] = json!(past.to_rfc3339());
                b["end_at"] = json!((past + TimeDelta::hours(1)).to_rfc3339());
                b
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dates",
        ),
        (
            with("end_at", json!((start + TimeDelta::days(30)).to_rfc3339())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dates",
        ),
        (
            with(
                "invitees",
                json!([alice_id, uuid::Uuid::now_v7().to_string()]),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_users",
        ),
        (
            with("invitees", json!([alice_id, stranger_id])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_users",
        ),
        (
            with("invitees", json!(["pas-un-uuid"])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            with("colour", json!("rouge")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            with("start_at", json!("demain matin")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            with("reminder_offsets", json!([0])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reminders",
        ),
        (
            with("reminder_offsets", json!([-60])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reminders",
        ),
        (
            with("reminder_offsets", json!([30 * 24 * 60 + 1])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reminders",
        ),
        (
            with("reminder_offsets", json!([1, 2, 3, 4, 5, 6, 7, 8, 9])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reminders",
        ),
        (
            with("reminder_offsets", json!(["1h"])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            with("title", json!("   ")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_session",
        ),
        (
            with("kind", json!("ARI enfumé")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_session",
        ),
        (
            with("location", json!("")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_session",
        ),
    ];
    for (body, status, code) in cases {
        let r = app.post("/api/fmpa", &admin, body.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {:?}", r.body);
    }
    for raw in ["{\"title\": ", "{\"title\": \"x\",}", "not json"] {
        let r = app.send_text(Method::POST, "/api/fmpa", &admin, raw).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "malformed_json"),
            "{raw}"
        );
    }

    // Nothing was written: no session, no notification, no job.
    assert!(
        list_ids(&app, &admin, "?include_cancelled=true")
            .await
            .is_empty()
    );
    assert!(notifications_of(&app, tenant, &alice_id).await.is_empty());
    let r = app.get("/api/notifications/unread-count", &alice).await;
    assert_eq!(r.body["unread"], 0);
    assert!(app.jobs(tenant).await.is_empty(), "no job");

    // Bad changes to a good session change nothing either.
    let s = create(&app, &admin, ok()).await;
    let id = s["id"].as_str().unwrap().to_owned();
    let before_jobs = reminder_jobs(&app, tenant).await;
    assert_eq!(pending(&before_jobs).len(), 2);
    let s_start: DateTime<Utc> = s["start_at"].as_str().unwrap().parse().unwrap();
    let patches: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"end_at": (s_start - TimeDelta::minutes(1)).to_rfc3339()}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dates",
        ),
        (
            json!({"start_at": (Utc::now() - TimeDelta::hours(1)).to_rfc3339()}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dates",
        ),
        (
            json!({"invite": [uuid::Uuid::now_v7().to_string()], "location": "Ailleurs"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_users",
        ),
        (
            json!({"reminder_offsets": [0, 60]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reminders",
        ),
        (
            json!({"invite": [alice_id], "uninvite": [alice_id]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_session",
        ),
        (
            json!({"status": "cancelled"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ];
    for (body, status, code) in patches {
        let r = app
            .patch(&format!("/api/fmpa/{id}"), &admin, body.clone())
            .await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {:?}", r.body);
    }
    let r = app
        .send_text(
            Method::PATCH,
            &format!("/api/fmpa/{id}"),
            &admin,
            "{\"title\"",
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );
    let r = app
        .send_text(
            Method::POST,
            &format!("/api/fmpa/{id}/cancel"),
            &admin,
            "{\"raison\": \"typo\"}",
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        "{:?}",
        r.body
    );
    let after = app.get(&format!("/api/fmpa/{id}"), &admin).await.body["session"].clone();
    assert_eq!(after, s, "the session is unchanged");
    assert_eq!(kinds_of(&app, tenant, &alice_id).await, ["FMPA_INVITATION"]);
    let after_jobs = reminder_jobs(&app, tenant).await;
    assert_eq!(after_jobs.len(), before_jobs.len());
    for j in &after_jobs {
        let b = before_jobs.iter().find(|b| b.id == j.id).unwrap();
        assert_eq!((j.state, j.run_at), (b.state, b.run_at), "{j:?}");
    }
    // Listing bounds.
    for bad in [0, 101] {
        let r = app.get(&format!("/api/fmpa?limit={bad}"), &admin).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit")
        );
    }
}

// ---- reminders run at least once, notify once ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_job_run_twice_notifies_once_and_stale_ones_notify_nobody() {
    let (app, state) = TestApp::with_state().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let (_, officer) = app
        .user_with_role(&admin, "sdis13", "Lieutenant Dubois", "officer")
        .await;
    let (bob, bob_token) = app.user(&admin, "sdis13", "Bob").await;
    let others = app.bulk_members(tenant, "sdis13", 3).await;
    let (alice, carol, dave) = (others[0].clone(), others[1].clone(), others[2].clone());
    let start = in_days(2);
    let s = create(
        &app,
        &officer,
        session_body(
            start,
            &[alice.clone(), bob.clone(), carol.clone(), dave.clone()],
        ),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let job_of = |jobs: &[Job], user: &str, offset: i64| -> Job {
        jobs.iter()
            .find(|j| j.unique_key.as_deref() == Some(key(&id, user, offset).as_str()))
            .unwrap_or_else(|| panic!("no reminder {user}/{offset}"))
            .clone()
    };
    let reminders_of = |ns: Vec<Notification>| -> Vec<Notification> {
        ns.into_iter()
            .filter(|n| n.kind == "FMPA_REMINDER")
            .collect()
    };
    let reminder_emails = |jobs: Vec<Job>, user: &str| -> usize {
        jobs.iter()
            .filter(|j| {
                j.kind == "notification.email"
                    && j.payload["kind"] == "FMPA_REMINDER"
                    && j.payload["user_id"] == user
            })
            .count()
    };
    let jobs = reminder_jobs(&app, tenant).await;
    let handler = mindsp_queue::notify::ReminderHandler::new(state.training.clone());

    // The same job twice, one after the other: one notification, one e-mail.
    let job = job_of(&jobs, &alice, 60);
    handler.run(&job).await.expect("first run");
    handler.run(&job).await.expect("second run");
    let ns = reminders_of(notifications_of(&app, tenant, &alice).await);
    assert_eq!(ns.len(), 1, "{ns:#?}");
    assert_eq!(ns[0].data["offset_minutes"], 60);
    assert_eq!(ns[0].data["session_id"], id.as_str());
    assert!(ns[0].body.contains("dans 1 h"), "{}", ns[0].body);
    assert_eq!(reminder_emails(app.jobs(tenant).await, &alice), 1);
    // The other lead time is a reminder of its own.
    handler.run(&job_of(&jobs, &alice, 1440)).await.unwrap();
    let ns = reminders_of(notifications_of(&app, tenant, &alice).await);
    assert_eq!(ns.len(), 2, "{ns:#?}");
    assert_eq!(reminder_emails(app.jobs(tenant).await, &alice), 2);
    // Through the service: already delivered, so nothing stored.
    let r: Reminder = serde_json::from_value(job.payload.clone()).unwrap();
    assert!(!state.training.deliver_reminder(tenant, &r).await.unwrap());

    // Two workers running it at once (a lease that expired): still one.
    let job = job_of(&jobs, &carol, 60);
    let (a, b) = tokio::join!(handler.run(&job), handler.run(&job));
    a.unwrap();
    b.unwrap();
    assert_eq!(
        reminders_of(notifications_of(&app, tenant, &carol).await).len(),
        1
    );

    // Bob answered absent: his reminder notifies nobody.
    let r = app
        .post(
            &format!("/api/fmpa/{id}/respond"),
            &bob_token,
            json!({"response": "absent"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    handler.run(&job_of(&jobs, &bob, 60)).await.unwrap();
    assert!(reminders_of(notifications_of(&app, tenant, &bob).await).is_empty());

    // Moved: the old payload (old start) is stale, the moved job is current.
    let old = job_of(&jobs, &carol, 1440);
    let moved = start + TimeDelta::hours(5);
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &officer,
            json!({"start_at": moved.to_rfc3339(), "end_at": (moved + TimeDelta::hours(3)).to_rfc3339()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    handler.run(&old).await.unwrap();
    assert_eq!(
        reminders_of(notifications_of(&app, tenant, &carol).await).len(),
        1,
        "a stale reminder notifies nobody"
    );
    let jobs = reminder_jobs(&app, tenant).await;
    let current = job_of(
        &pending(&jobs).into_iter().cloned().collect::<Vec<_>>(),
        &carol,
        1440,
    );
    assert_eq!(
        current.payload["start_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().unwrap()),
        Some(moved)
    );
    handler.run(&current).await.unwrap();
    assert_eq!(
        reminders_of(notifications_of(&app, tenant, &carol).await).len(),
        2
    );

    // Cancelled: Dave's reminder notifies nobody.
    let dave_job = job_of(&jobs, &dave, 60);
    let r = app
        .post_empty(&format!("/api/fmpa/{id}/cancel"), &officer)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    handler.run(&dave_job).await.unwrap();
    assert!(reminders_of(notifications_of(&app, tenant, &dave).await).is_empty());
}

#[tokio::test]
async fn reminders_already_past_are_cancelled_and_removed_invitees_lose_theirs() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let tenant = app.tenant_of(&admin).await;
    let invitees = app.bulk_members(tenant, "sdis13", 3).await;
    let s = create(&app, &admin, session_body(in_days(2), &invitees)).await;
    let id = s["id"].as_str().unwrap().to_owned();
    assert_eq!(pending(&reminder_jobs(&app, tenant).await).len(), 6);

    // Moved to start in 30 minutes: both lead times are past, no reminder is left.
    let soon = (Utc::now() + TimeDelta::minutes(30))
        .with_nanosecond(0)
        .unwrap();
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &admin,
            json!({"start_at": soon.to_rfc3339(), "end_at": (soon + TimeDelta::hours(2)).to_rfc3339()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let jobs = reminder_jobs(&app, tenant).await;
    assert!(pending(&jobs).is_empty(), "{:#?}", pending(&jobs));

    // Moved to start in 2 hours: the 1-hour reminders come back, the 24-hour ones not.
    let later = (Utc::now() + TimeDelta::hours(2))
        .with_nanosecond(0)
        .unwrap();
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &admin,
            json!({"start_at": later.to_rfc3339(), "end_at": (later + TimeDelta::hours(2)).to_rfc3339()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let jobs = reminder_jobs(&app, tenant).await;
    let live = pending(&jobs);
    let keys: BTreeSet<String> = live.iter().filter_map(|j| j.unique_key.clone()).collect();
    let expected: BTreeSet<String> = invitees.iter().map(|u| key(&id, u, 60)).collect();
    assert_eq!(keys, expected, "{live:#?}");
    assert!(
        live.iter()
            .all(|j| j.run_at == later - TimeDelta::minutes(60))
    );

    // Uninvited: that invitee's reminder goes; a new invitee gets one and an invitation.
    let newcomer = app.bulk_members(tenant, "cis-aix", 1).await.remove(0);
    let r = app
        .patch(
            &format!("/api/fmpa/{id}"),
            &admin,
            json!({"uninvite": [invitees[0]], "invite": [newcomer]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let listed: BTreeSet<&str> = r.body["session"]["invitees"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([
            invitees[1].as_str(),
            invitees[2].as_str(),
            newcomer.as_str()
        ])
    );
    let jobs = reminder_jobs(&app, tenant).await;
    let keys: BTreeSet<String> = pending(&jobs)
        .iter()
        .filter_map(|j| j.unique_key.clone())
        .collect();
    let expected: BTreeSet<String> = [&invitees[1], &invitees[2], &newcomer]
        .iter()
        .map(|u| key(&id, u, 60))
        .collect();
    assert_eq!(keys, expected);
    assert_eq!(kinds_of(&app, tenant, &newcomer).await, ["FMPA_INVITATION"]);
}

#[tokio::test]
async fn sessions_are_listed_by_start_a_page_at_a_time() {
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let mut made = Vec::new();
    for days in [4, 2, 3] {
        let s = create(&app, &admin, session_body(in_days(days), &[])).await;
        made.push((days, s["id"].as_str().unwrap().to_owned()));
    }
    made.sort();
    let by_start: Vec<String> = made.into_iter().map(|(_, id)| id).collect();
    assert_eq!(list_ids(&app, &admin, "").await, by_start);
    let r = app.get("/api/fmpa?limit=2", &admin).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let first: Vec<&str> = r.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(first, by_start[..2]);
    let cursor = r.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let rest = list_ids(&app, &admin, &format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(rest, by_start[2..]);
    let r = app.get("/api/fmpa?cursor=n-importe-quoi", &admin).await;
    assert_eq!(r.code(), "invalid_cursor", "{:?}", r.body);
    assert!(r.status.is_client_error());
    // `from`/`to` bound the start.
    let from = in_days(3) - TimeDelta::hours(1);
    let to = in_days(3) + TimeDelta::hours(1);
    let q = format!(
        "?from={}&to={}",
        from.format("%Y-%m-%dT%H:%M:%SZ"),
        to.format("%Y-%m-%dT%H:%M:%SZ")
    );
    assert_eq!(list_ids(&app, &admin, &q).await, by_start[1..2]);
}
