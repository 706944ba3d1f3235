//! Notification flows on the real SQLite store and SQL queue, below the routes:
//! - a member connected nowhere gets one digest job for many messages, none for the same
//!   messages again, none if they read first, none while connected, none before the
//!   delay, and digests at least the delay apart; the digest e-mail renders; none while
//!   presence cannot be read (Redis away), and the due ones once it can;
//! - a mention notifies the mentioned members, in the message's own transaction;
//! - a notification and its e-mail exist only if their transaction commits;
//! - training sessions at their size limits, reminders after a move, late reminders.

#[path = "../../mindsp-realtime/tests/support/private_redis.rs"]
mod private_redis;

use std::sync::Arc;

use chrono::TimeDelta;
use mindsp_core::jobs::{Job, JobFilter, JobQueue, JobScope};
use mindsp_core::mail::{Mailbox, Mailer};
use mindsp_core::model::{NewUser, Role};
use mindsp_core::notify::{NOTIFICATION_EMAIL_JOB, NobodyOnline, Notifier, NotifyConfig, kind};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, Limits, Messaging, TenantId};
use mindsp_queue::mail::FileMailer;
use mindsp_queue::mail::templates::Templates;
use mindsp_queue::notify::NotificationEmailHandler;
use mindsp_queue::worker::Handler;
use mindsp_realtime::Realtime;

struct World {
    store: Arc<dyn Store>,
    queue: Arc<dyn JobQueue>,
    messaging: Messaging,
    notifier: Notifier,
    tenant: TenantId,
    people: Vec<Actor>,
    dir: std::path::PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn world(n: usize) -> World {
    let dir = std::env::temp_dir().join(format!("mindsp-digest-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = mindsp_store::open(&format!("sqlite://{}", dir.join("db").display()))
        .await
        .unwrap();
    let queue = mindsp_queue::sql_queue(store.as_ref()).unwrap();
    let tenant = store.create_tenant("sdis06", "SDIS 06").await.unwrap();
    let mut tx = store.begin(tenant.id).await.unwrap();
    let mut people = Vec::new();
    for i in 0..n {
        let u = mindsp_core::service::create_user_in(
            tx.as_mut(),
            NewUser {
                email: format!("sp{i}@sdis06.fr"),
                display_name: format!("Sergent Hélène Dupré {i}"),
                role: Role::Member,
                password_hash: "x".into(),
            },
            &Limits::default(),
        )
        .await
        .unwrap();
        people.push(Actor {
            tenant_id: tenant.id,
            user_id: u.id,
            role: u.role,
        });
    }
    tx.commit().await.unwrap();
    let notifier = Notifier::new(store.clone(), NotifyConfig::default()).with_queue(queue.clone());
    let messaging =
        Messaging::new(store.clone(), Limits::default()).with_notifier(notifier.clone());
    World {
        store,
        queue,
        messaging,
        notifier,
        tenant: tenant.id,
        people,
        dir,
    }
}

async fn email_jobs(w: &World) -> Vec<Job> {
    w.queue
        .list(&JobFilter {
            scope: JobScope::Tenant(w.tenant),
            state: None,
            queue: Some("email".into()),
            before: None,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.kind == NOTIFICATION_EMAIL_JOB)
        .collect()
}

fn digests_for(jobs: &[Job], user: mindsp_core::UserId) -> Vec<&Job> {
    jobs.iter()
        .filter(|j| {
            j.payload["kind"] == kind::NEW_MESSAGE
                && j.payload["user_id"] == serde_json::json!(user)
        })
        .collect()
}

#[tokio::test]
async fn an_offline_member_gets_one_digest_and_a_reader_none() {
    let w = world(4).await;
    let [a, b, c, d] = [w.people[0], w.people[1], w.people[2], w.people[3]];
    let group = w
        .messaging
        .create_group(
            &a,
            "Garde CS Nice-Magnan",
            &[b.user_id, c.user_id, d.user_id],
        )
        .await
        .unwrap();
    for i in 0..5 {
        w.messaging
            .send(
                &a,
                group.id,
                &format!("Départ VSAV n° {i} — feu de véhicule"),
                None,
            )
            .await
            .unwrap();
    }
    // C reads everything before the sweep; D is connected (a live socket on this node).
    w.messaging.mark_read(&c, group.id, None).await.unwrap();
    let realtime = Realtime::in_process(16);
    let _d_online = realtime
        .open(
            w.tenant,
            d.user_id,
            mindsp_realtime::Checked::now(0),
            std::future::ready(Vec::new()),
        )
        .await
        .unwrap();

    // Not yet: the oldest unread message is younger than the delay.
    let n = w
        .notifier
        .digest_sweep(&realtime, TimeDelta::hours(1))
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert!(email_jobs(&w).await.is_empty());

    // After the delay: B alone gets one digest for the five messages.
    let n = w
        .notifier
        .digest_sweep(&realtime, TimeDelta::zero())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let jobs = email_jobs(&w).await;
    assert_eq!(digests_for(&jobs, b.user_id).len(), 1);
    assert!(digests_for(&jobs, c.user_id).is_empty(), "C read first");
    assert!(digests_for(&jobs, d.user_id).is_empty(), "D is connected");
    let digest = &digests_for(&jobs, b.user_id)[0].payload["data"]["digest"];
    assert_eq!(digest[0]["unread"], 5, "{digest}");
    assert_eq!(digest[0]["title"], "Garde CS Nice-Magnan");
    assert_eq!(digest[0]["messages"].as_array().unwrap().len(), 3);

    // The same messages are not sent twice.
    let n = w
        .notifier
        .digest_sweep(&realtime, TimeDelta::zero())
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(digests_for(&email_jobs(&w).await, b.user_id).len(), 1);

    // New messages: a new digest (one, for both).
    for text in ["Retour au centre", "FPT disponible"] {
        w.messaging.send(&a, group.id, text, None).await.unwrap();
    }
    let n = w
        .notifier
        .digest_sweep(&realtime, TimeDelta::zero())
        .await
        .unwrap();
    // B again; C now has 2 unread and is away too. D stays connected.
    assert_eq!(n, 2);
    let jobs = email_jobs(&w).await;
    assert_eq!(digests_for(&jobs, b.user_id).len(), 2);
    assert_eq!(digests_for(&jobs, c.user_id).len(), 1);
    assert!(digests_for(&jobs, d.user_id).is_empty());

    // With the e-mail of NEW_MESSAGE switched off, no digest.
    let prefs: mindsp_core::notify::NotificationPrefs =
        serde_json::from_value(serde_json::json!({"types": {"NEW_MESSAGE": {"email": false}}}))
            .unwrap();
    w.notifier.set_preferences(&b, &prefs).await.unwrap();
    w.messaging
        .send(&a, group.id, "Encore un départ", None)
        .await
        .unwrap();
    w.notifier
        .digest_sweep(&NobodyOnline, TimeDelta::zero())
        .await
        .unwrap();
    assert_eq!(digests_for(&email_jobs(&w).await, b.user_id).len(), 2);

    // The digest job renders into an e-mail naming the conversation and the count.
    let mail_dir = w.dir.join("mail");
    let from = Mailbox {
        name: Some("MindSP".into()),
        address: "no-reply@sdis06.fr".into(),
    };
    let mailer: Arc<dyn Mailer> = Arc::new(FileMailer::new(&mail_dir, from).unwrap());
    let handler = NotificationEmailHandler::new(
        w.store.clone(),
        mailer,
        Templates::default(),
        "https://mindsp.sdis06.fr",
    );
    let job = digests_for(&email_jobs(&w).await, b.user_id)
        .into_iter()
        .find(|j| j.payload["data"]["digest"][0]["unread"] == 5)
        .cloned()
        .unwrap();
    handler.run(&job).await.unwrap();
    let files: Vec<_> = std::fs::read_dir(&mail_dir).unwrap().collect();
    assert_eq!(files.len(), 1);
    let eml = std::fs::read(files[0].as_ref().unwrap().path()).unwrap();
    let parsed = String::from_utf8_lossy(&eml);
    assert!(parsed.contains("sp1@sdis06.fr"), "{parsed}");
    assert!(
        parsed.contains("Subject: 5 messages non lus dans 1 conversation"),
        "{parsed}"
    );

    // The job run again (a worker died before marking it done): the copy has the same
    // Message-ID, made from the job's id, so the receiving side can recognise it.
    handler.run(&job).await.unwrap();
    let expected = format!("Message-ID: <{}@sdis06.fr>", job.id.0.simple());
    let files: Vec<_> = std::fs::read_dir(&mail_dir).unwrap().collect();
    assert_eq!(files.len(), 2);
    for f in files {
        let eml = std::fs::read(f.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&eml);
        assert!(text.contains(&expected), "{expected} in {text}");
    }
}

#[tokio::test]
async fn a_mention_notifies_members_in_the_message_transaction() {
    let w = world(4).await;
    let [a, b, c, outsider] = [w.people[0], w.people[1], w.people[2], w.people[3]];
    let group = w
        .messaging
        .create_group(&a, "FMPA ARI", &[b.user_id, c.user_id])
        .await
        .unwrap();
    let sent = w
        .messaging
        .send_with_mentions(
            &a,
            group.id,
            "@Hélène peux-tu vérifier les bouteilles ARI ?",
            Some("k1".into()),
            &[b.user_id, outsider.user_id, a.user_id],
        )
        .await
        .unwrap();
    assert!(sent.created());
    let page_b = w.notifier.list(&b, None, false, None).await.unwrap();
    assert_eq!(page_b.items.len(), 1);
    let n = &page_b.items[0];
    assert_eq!(n.kind, kind::MENTION);
    assert_eq!(n.data["seq"], sent.message().seq);
    assert_eq!(page_b.unread, 1);
    // Not mentioned, not a member, or the sender: nothing.
    for who in [c, outsider, a] {
        assert!(
            w.notifier
                .list(&who, None, false, None)
                .await
                .unwrap()
                .items
                .is_empty()
        );
    }
    // A retry with the same idempotency key stores nothing new and notifies nobody again.
    let again = w
        .messaging
        .send_with_mentions(
            &a,
            group.id,
            "@Hélène peux-tu vérifier les bouteilles ARI ?",
            Some("k1".into()),
            &[b.user_id],
        )
        .await
        .unwrap();
    assert!(!again.created());
    assert_eq!(
        w.notifier
            .list(&b, None, false, None)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    // A send that fails (the outsider is not a member) leaves no notification behind.
    let refused = w
        .messaging
        .send_with_mentions(&outsider, group.id, "@Hélène", None, &[b.user_id])
        .await;
    assert!(refused.is_err());
    assert_eq!(
        w.notifier
            .list(&b, None, false, None)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    // Too many mentions: refused before anything is written.
    let many: Vec<_> = (0..51).map(|_| mindsp_core::UserId::new()).collect();
    let r = w
        .messaging
        .send_with_mentions(&a, group.id, "x", None, &many)
        .await;
    assert_eq!(r.unwrap_err().code(), "too_many_mentions");
    // The e-mail of the mention was enqueued with it (e-mail is on by default).
    let jobs = email_jobs(&w).await;
    assert_eq!(
        jobs.iter()
            .filter(|j| j.payload["kind"] == kind::MENTION)
            .count(),
        1
    );
}

#[tokio::test]
async fn a_notification_and_its_email_exist_only_if_their_transaction_commits() {
    let w = world(2).await;
    let [a, b] = [w.people[0], w.people[1]];
    let n = mindsp_core::notify::NewNotification::new(kind::SYSTEM, "Exercice NOVI", "Demain 9 h");

    // Rolled back (the unit of work is dropped, as when the change that caused it fails).
    let mut tx = w.store.begin(w.tenant).await.unwrap();
    let outbox = w
        .notifier
        .notify_in(tx.as_mut(), &[a.user_id, b.user_id], &n)
        .await
        .unwrap();
    assert_eq!((outbox.stored().len(), outbox.emails()), (2, 2));
    drop(tx);
    drop(outbox);
    for who in [a, b] {
        let page = w.notifier.list(&who, None, false, None).await.unwrap();
        assert!(page.items.is_empty());
        assert_eq!(page.unread, 0);
    }
    assert!(email_jobs(&w).await.is_empty());

    // Committed: both, with their e-mail jobs.
    let mut tx = w.store.begin(w.tenant).await.unwrap();
    let outbox = w
        .notifier
        .notify_in(tx.as_mut(), &[a.user_id, b.user_id], &n)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    w.notifier.deliver(outbox).await;
    for who in [a, b] {
        assert_eq!(w.notifier.unread_count(&who).await.unwrap(), 1);
    }
    assert_eq!(email_jobs(&w).await.len(), 2);
}

/// Digests are at least the delay apart: a new message right after a digest waits.
#[tokio::test]
async fn digests_are_at_least_the_delay_apart() {
    let w = world(2).await;
    let [a, b] = [w.people[0], w.people[1]];
    let (conv, _) = w.messaging.open_direct(&a, b.user_id).await.unwrap();
    let delay = TimeDelta::milliseconds(600);
    w.messaging
        .send(&a, conv.id, "Garde demain ?", None)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        w.notifier.digest_sweep(&NobodyOnline, delay).await.unwrap(),
        1
    );
    // New activity, but the last digest is younger than the delay.
    w.messaging
        .send(&a, conv.id, "Réponds vite", None)
        .await
        .unwrap();
    assert_eq!(
        w.notifier.digest_sweep(&NobodyOnline, delay).await.unwrap(),
        0
    );
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        w.notifier.digest_sweep(&NobodyOnline, delay).await.unwrap(),
        1
    );
    let jobs = email_jobs(&w).await;
    let digests = digests_for(&jobs, b.user_id);
    assert_eq!(digests.len(), 2);
    // A direct conversation is named after the other member.
    assert_eq!(
        digests[0].payload["data"]["digest"][0]["title"],
        "Sergent Hélène Dupré 0"
    );
}

fn training(w: &World) -> mindsp_core::training::Training {
    mindsp_core::training::Training::new(
        w.store.clone(),
        w.notifier.clone(),
        Some(w.queue.clone()),
        mindsp_core::training::TrainingConfig::default(),
    )
}

fn officer(a: Actor) -> Actor {
    Actor {
        role: Role::Officer,
        ..a
    }
}

fn session(
    title: &str,
    start: chrono::DateTime<chrono::Utc>,
    invitees: Vec<mindsp_core::UserId>,
    offsets: Vec<i64>,
) -> mindsp_core::training::NewSession {
    mindsp_core::training::NewSession {
        title: title.into(),
        kind: "ari".into(),
        description: "é".repeat(4000),
        location: "CIS Grasse".into(),
        start_at: start,
        end_at: start + TimeDelta::hours(2),
        invitees,
        reminder_offsets: Some(offsets),
    }
}

async fn reminders_of(w: &World, who: Actor) -> Vec<mindsp_core::notify::Notification> {
    w.notifier
        .list(&who, None, false, Some(100))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|n| n.kind == kind::FMPA_REMINDER)
        .collect()
}

/// A title and a description at their limits still make valid notifications: the
/// invitation and the cancellation go out, cut with an ellipsis.
#[tokio::test]
async fn sessions_with_the_longest_title_notify_and_cancel() {
    let w = world(2).await;
    let [a, b] = [officer(w.people[0]), w.people[1]];
    let t = training(&w);
    let start = chrono::Utc::now() + TimeDelta::days(3);
    let title = "Manœuvre ".repeat(25).chars().take(200).collect::<String>();
    let s = t
        .create(&a, session(&title, start, vec![b.user_id], vec![1440, 60]))
        .await
        .unwrap();
    t.cancel(&a, s.session.id, Some("Intempéries".into()))
        .await
        .unwrap();
    let items = w.notifier.list(&b, None, false, None).await.unwrap().items;
    assert_eq!(items.len(), 2);
    for n in &items {
        assert!(
            n.title.chars().count() <= 200 && n.title.ends_with('…'),
            "{}",
            n.title
        );
    }
}

/// A reminder that fired before the session moved does not stop the reminder for the
/// new date; the old one, run again, is stale; a reminder after the start is dropped.
#[tokio::test]
async fn a_moved_session_reminds_again_and_a_late_reminder_is_dropped() {
    let w = world(2).await;
    let [a, b] = [officer(w.people[0]), w.people[1]];
    let t = training(&w);
    let start = chrono::Utc::now() + TimeDelta::hours(3);
    let s = t
        .create(
            &a,
            session("Feu de forêt", start, vec![b.user_id], vec![60]),
        )
        .await
        .unwrap();
    let id = s.session.id;
    let reminder = |start_at| mindsp_core::reminders::Reminder {
        subject: format!("fmpa:{id}"),
        user_id: b.user_id,
        offset_minutes: 60,
        start_at,
    };
    let first = reminder(s.session.start_at);
    assert!(t.deliver_reminder(w.tenant, &first).await.unwrap());
    assert!(
        !t.deliver_reminder(w.tenant, &first).await.unwrap(),
        "run twice, once"
    );
    let moved = t
        .update(
            &a,
            id,
            mindsp_core::training::SessionPatch {
                start_at: Some(start + TimeDelta::days(1)),
                end_at: Some(start + TimeDelta::days(1) + TimeDelta::hours(2)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        !t.deliver_reminder(w.tenant, &first).await.unwrap(),
        "stale"
    );
    let second = reminder(moved.session.start_at);
    assert!(t.deliver_reminder(w.tenant, &second).await.unwrap());
    assert_eq!(reminders_of(&w, b).await.len(), 2);

    // A session about to start: its reminder, run late, notifies nobody.
    let soon = chrono::Utc::now() + TimeDelta::milliseconds(400);
    let s = t
        .create(
            &a,
            session("Recyclage PSE2", soon, vec![b.user_id], vec![1]),
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let late = mindsp_core::reminders::Reminder {
        subject: format!("fmpa:{}", s.session.id),
        user_id: b.user_id,
        offset_minutes: 1,
        start_at: s.session.start_at,
    };
    assert!(!t.deliver_reminder(w.tenant, &late).await.unwrap());
    assert_eq!(reminders_of(&w, b).await.len(), 2);
}

/// While presence cannot be read (the scaled profile's Redis is down), the digest
/// sweep sends nothing and moves no mark: e-mailing every candidate would reach the
/// people reading live. Once Redis is back, the user who stayed away gets their digest
/// and the connected one still none. Needs `MINDSP_TEST_REDIS_URL` (Redis installed);
/// skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_digest_while_presence_is_unknown() {
    if std::env::var("MINDSP_TEST_REDIS_URL").is_err() {
        eprintln!("skipped: set MINDSP_TEST_REDIS_URL to run the digest test on Redis presence");
        return;
    }
    let Some(mut redis) = private_redis::PrivateRedis::start() else {
        return;
    };
    let mut config = mindsp_realtime::redis::RedisConfig::new(redis.url());
    config.heartbeat = std::time::Duration::from_millis(200);
    config.window = std::time::Duration::from_secs(30);
    config.command_timeout = std::time::Duration::from_millis(300);
    let realtime = Realtime::redis(&config, 16).await.expect("Redis presence");

    let w = world(3).await;
    let [a, b, d] = [w.people[0], w.people[1], w.people[2]];
    let group = w
        .messaging
        .create_group(&a, "Garde CS Menton", &[b.user_id, d.user_id])
        .await
        .unwrap();
    w.messaging
        .send(&a, group.id, "Départ FPT — feu de broussailles", None)
        .await
        .unwrap();
    let _d_online = realtime
        .open(
            w.tenant,
            d.user_id,
            mindsp_realtime::Checked::now(0),
            std::future::ready(Vec::new()),
        )
        .await
        .unwrap();

    redis.kill();
    let n = w
        .notifier
        .digest_sweep(&realtime, TimeDelta::zero())
        .await
        .unwrap();
    assert_eq!(n, 0, "no digest while presence is unknown");
    assert!(email_jobs(&w).await.is_empty());

    redis.restart().expect("redis-server starts again");
    // Once the node has written its users to the new (empty) Redis, D shows online.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let p = realtime.presence(w.tenant, &[d.user_id]).await;
        if p.is_ok_and(|p| p[0].status == mindsp_core::events::PresenceStatus::Online) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never read again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let n = w
        .notifier
        .digest_sweep(&realtime, TimeDelta::zero())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let jobs = email_jobs(&w).await;
    assert_eq!(digests_for(&jobs, b.user_id).len(), 1, "B stayed away");
    assert!(digests_for(&jobs, d.user_id).is_empty(), "D is connected");
}
