//! E-mail as an operator and a recipient see it, against a real SMTP server on loopback
//! (aiosmtpd, see `common::smtp`): a job delivers a French invitation; with the server
//! down the job retries with backoff and ends dead, visible to its tenant's admin only;
//! with the server back, the admin's retry delivers it.
//!
//! The worker is the server's own (`mindsp_server::workers::start_worker`), over the
//! SQL queue of a SQLite file, with a fast backoff so the test takes seconds.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chrono::{TimeZone, Utc};
use common::TestApp;
use common::smtp::SmtpSink;
use mail_parser::{MessageParser, MimeHeaders};
use mindsp_core::mail::{Email, MailError, Mailbox, Mailer};
use mindsp_core::{JobId, TenantId};
use mindsp_queue::JobQueue;
use mindsp_queue::mail::templates::{Templates, TrainingSession};
use mindsp_queue::mail::{EmailJob, SmtpConfig, SmtpMailer};
use mindsp_queue::worker::RetryPolicy;
use mindsp_server::workers::{WorkerSettings, start_worker};
use serde_json::Value;

/// The backoff of the test worker: 250 ms, then 500 ms; no jitter. Long enough for
/// the test to see each `retrying` state through the API, short enough to be quick.
const BACKOFF: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(250),
    factor: 2.0,
    max: Duration::from_secs(10),
    jitter: 0.0,
};

fn sender() -> Mailbox {
    Mailbox {
        name: Some("MindSP — SDIS 13".into()),
        address: "ne-pas-repondre@sdis13.fr".into(),
    }
}

fn invitation(name: &str, address: &str, title: &str) -> Email {
    let session = TrainingSession {
        title: title.into(),
        kind: "FMPA".into(),
        // Tuesday 3 March 2026, 14 h 00 – 17 h 00 in Paris.
        starts_at: Utc.with_ymd_and_hms(2026, 3, 3, 13, 0, 0).unwrap(),
        ends_at: Utc.with_ymd_and_hms(2026, 3, 3, 16, 0, 0).unwrap(),
        location: "CIS Aix-en-Provence, plateau de manœuvre".into(),
        organiser: "Lieutenant Benoît Dubois".into(),
        url: "https://mindsp.sdis13.fr/formations/42".into(),
    };
    let to = Mailbox {
        name: Some(name.into()),
        address: address.into(),
    };
    Templates::default().invitation(&to, &session).unwrap()
}

/// The SMTP mailer, noting when each send starts (to measure the backoff).
struct Timed {
    inner: SmtpMailer,
    starts: Mutex<Vec<Instant>>,
}

#[async_trait::async_trait]
impl Mailer for Timed {
    async fn send(&self, email: &Email) -> Result<(), MailError> {
        self.starts.lock().unwrap().push(Instant::now());
        self.inner.send(email).await
    }
}

async fn enqueue(queue: &dyn JobQueue, tenant: TenantId, email: &Email) -> JobId {
    let job = EmailJob::new(email.clone())
        .to_job()
        .tenant(tenant)
        .max_attempts(3);
    queue.enqueue(&job).await.unwrap().id()
}

/// The job as the admin's API shows it.
async fn job(app: &TestApp, admin: &str, id: JobId) -> Value {
    let r = app.get(&format!("/api/admin/jobs/{id}"), admin).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["job"].clone()
}

/// Polls the job through the API until it is in `state`; answers every distinct
/// (state, attempts) seen on the way, in order.
async fn watch_until(app: &TestApp, admin: &str, id: JobId, state: &str) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Vec<(String, u64)> = Vec::new();
    loop {
        let j = job(app, admin, id).await;
        let now = (
            j["state"].as_str().unwrap().to_owned(),
            j["attempts"].as_u64().unwrap(),
        );
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now.0 == state {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "job never reached {state}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checks a received message against what was rendered: recipient, decoded subject,
/// a text and an HTML part with the rendered contents.
fn assert_delivered(raw: &[u8], email: &Email) {
    let m = MessageParser::default()
        .parse(raw)
        .expect("a parsable message");
    assert_eq!(m.subject(), Some(email.subject.as_str()));
    let to = m.to().and_then(|t| t.first()).expect("a To header");
    assert_eq!(to.address(), Some(email.to.address.as_str()));
    assert_eq!(to.name(), email.to.name.as_deref());
    let root = m.content_type().expect("a content type");
    assert_eq!(
        (root.ctype(), root.subtype()),
        ("multipart", Some("alternative"))
    );
    let normalise = |s: &str| s.replace("\r\n", "\n").trim_end().to_owned();
    assert_eq!(
        normalise(&m.body_text(0).expect("a text part")),
        normalise(&email.text)
    );
    assert_eq!(
        normalise(&m.body_html(0).expect("an HTML part")),
        normalise(email.html.as_deref().unwrap())
    );
}

#[tokio::test]
async fn email_delivered_retried_dead_then_delivered_on_admin_retry() {
    let Some(sink) = SmtpSink::start() else {
        return;
    };
    let app = TestApp::new().await;
    let admin = app.tenant("sdis13").await;
    let stranger = app.tenant("sdis83").await;
    let tenant = app.tenant_of(&admin).await;

    let mut smtp = SmtpConfig::from_url(&sink.url(), sender()).unwrap();
    smtp.timeout = Duration::from_secs(5);
    let mailer = Arc::new(Timed {
        inner: SmtpMailer::new(smtp).unwrap(),
        starts: Mutex::new(Vec::new()),
    });
    let worker = start_worker(
        app.queue.clone(),
        mailer.clone(),
        &WorkerSettings {
            concurrency: 2,
            lease: Duration::from_secs(5),
            retention: None,
            email_retry: BACKOFF,
            ..WorkerSettings::default()
        },
        None,
    )
    .unwrap();

    // (a) The server is up: the invitation arrives as rendered.
    let first = invitation(
        "Sergent Élodie Lefèvre",
        "elodie.lefevre@sdis13.fr",
        "Secours routier et désincarcération",
    );
    assert!(first.subject.contains("désincarcération"));
    let id = enqueue(app.queue.as_ref(), tenant, &first).await;
    let received = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].mail_from, "ne-pas-repondre@sdis13.fr");
    assert_eq!(received[0].rcpt_tos, ["elodie.lefevre@sdis13.fr"]);
    assert_delivered(&received[0].raw, &first);
    watch_until(&app, &admin, id, "succeeded").await;
    let done = job(&app, &admin, id).await;
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["queue"], "email");
    assert_eq!(done["kind"], "email.send");
    assert!(done["finished_at"].is_string(), "{done}");

    // (b) The server is down: three attempts, 250 ms then 500 ms apart, then dead.
    let port = sink.port;
    drop(sink);
    let second = invitation(
        "Caporal Karim Benali",
        "karim.benali@sdis13.fr",
        "Incendie en milieu clos — phénomènes thermiques",
    );
    let id = enqueue(app.queue.as_ref(), tenant, &second).await;
    let seen = watch_until(&app, &admin, id, "dead").await;
    for attempts in [1, 2] {
        assert!(
            seen.contains(&("retrying".to_owned(), attempts)),
            "retrying after attempt {attempts} was visible: {seen:?}"
        );
    }
    assert_eq!(seen.last(), Some(&("dead".to_owned(), 3)), "{seen:?}");
    let starts = mailer.starts.lock().unwrap().clone();
    assert_eq!(
        starts.len(),
        4,
        "one send for the first job, three for this one"
    );
    for (i, expected) in [(2, BACKOFF.delay(1)), (3, BACKOFF.delay(2))] {
        let gap = starts[i] - starts[i - 1];
        // run_at is kept to the millisecond, so an attempt may start up to 1 ms early.
        assert!(
            gap + Duration::from_millis(1) >= expected,
            "attempt {i} came {gap:?} after the previous one, backoff {expected:?}"
        );
    }

    let dead = app.get("/api/admin/jobs?state=dead", &admin).await;
    assert_eq!(dead.status, StatusCode::OK, "{:?}", dead.body);
    let jobs = dead.body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{:?}", dead.body);
    assert_eq!(jobs[0]["id"], id.to_string());
    assert_eq!(jobs[0]["attempts"], 3);
    assert_eq!(jobs[0]["max_attempts"], 3);
    let error = jobs[0]["last_error"].as_str().unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert_eq!(
        jobs[0]["payload"]["email"]["to"]["address"],
        "karim.benali@sdis13.fr"
    );
    assert!(dead.body["next_cursor"].is_null());

    // Another tenant's administrator sees none of it.
    let theirs = app.get("/api/admin/jobs?state=dead", &stranger).await;
    assert_eq!(theirs.status, StatusCode::OK);
    assert_eq!(theirs.body["jobs"], serde_json::json!([]));
    for (uri, post) in [
        (format!("/api/admin/jobs/{id}"), false),
        (format!("/api/admin/jobs/{id}/retry"), true),
        (format!("/api/admin/jobs/{id}/discard"), true),
    ] {
        let r = if post {
            app.post_empty(&uri, &stranger).await
        } else {
            app.get(&uri, &stranger).await
        };
        assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    }
    assert_eq!(job(&app, &admin, id).await["state"], "dead");

    // (c) The server is back on the same port: the admin retries, the e-mail arrives.
    let sink = SmtpSink::on_port(port).expect("aiosmtpd restarted on its port");
    let r = app
        .post_empty(&format!("/api/admin/jobs/{id}/retry"), &admin)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_ne!(r.body["job"]["state"], "dead");
    assert!(r.body["job"]["attempts"].as_u64().unwrap() <= 1);
    let received = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["karim.benali@sdis13.fr"]);
    assert_delivered(&received[0].raw, &second);
    watch_until(&app, &admin, id, "succeeded").await;
    assert_eq!(job(&app, &admin, id).await["attempts"], 1);

    // A finished job cannot be retried again.
    let r = app
        .post_empty(&format!("/api/admin/jobs/{id}/retry"), &admin)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "invalid_job_state")
    );
    worker.shutdown(Duration::from_secs(2)).await;
}
