//! A worker *process* killed with SIGKILL while it handles training-session reminders:
//! after a new worker starts, every reminder is delivered and each invitee holds one
//! reminder notification, not two, although some jobs ran twice (the test reports how
//! many). Runs the real binary (`mindsp-server worker`) on a SQLite file.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use mindsp_core::jobs::{DEFAULT_QUEUE, Job, JobFilter, JobQueue, JobScope, JobState};
use mindsp_core::model::{NewUser, Role};
use mindsp_core::notify::{Notifier, NotifyConfig, kind};
use mindsp_core::ports::Store;
use mindsp_core::training::{FMPA_REMINDER_JOB, NewSession, Training, TrainingConfig};
use mindsp_core::{Actor, Limits, UserId};

const INVITEES: usize = 400;

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(db: &Path, mail: &Path) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_mindsp-server"))
        .env_remove("MINDSP_DATABASE_URL")
        .env("MINDSP_LOG", "warn")
        .args(["worker", "--database-url"])
        .arg(format!("sqlite://{}", db.display()))
        .arg("--mail-dir")
        .arg(mail)
        .args(["--workers", "8", "--job-lease-secs", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mindsp-server worker");
    Worker(child)
}

async fn reminders_stored(
    store: &Arc<dyn Store>,
    tenant: mindsp_core::TenantId,
    users: &[UserId],
) -> Vec<usize> {
    let mut tx = store.read(tenant).await.unwrap();
    let mut out = Vec::with_capacity(users.len());
    for u in users {
        let n = tx
            .notifications(*u, None, false, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|n| n.kind == kind::FMPA_REMINDER)
            .count();
        out.push(n);
    }
    out
}

/// The tenant's reminder jobs in `state` (the digest sweep belongs to no tenant).
async fn reminder_jobs(
    queue: &Arc<dyn JobQueue>,
    tenant: mindsp_core::TenantId,
    state: JobState,
) -> Vec<Job> {
    queue
        .list(&JobFilter {
            scope: JobScope::Tenant(tenant),
            state: Some(state),
            queue: Some(DEFAULT_QUEUE.to_owned()),
            before: None,
            limit: 10_000,
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.kind == FMPA_REMINDER_JOB)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_delivers_every_reminder_once_after_recovery() {
    let dir = std::env::temp_dir().join(format!("mindsp-remind-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("mindsp.db");
    let url = format!("sqlite://{}", db.display());
    let store = mindsp_store::open(&url).await.unwrap();
    let queue = mindsp_queue::sql_queue(store.as_ref()).unwrap();

    // A department with an officer and 400 firefighters (password hashes are not
    // checked here).
    let tenant = store
        .create_tenant("sdis84", "SDIS 84 — Vaucluse")
        .await
        .unwrap();
    let mut tx = store.begin(tenant.id).await.unwrap();
    let new = |i: usize, role| NewUser {
        email: format!("sp{i}@sdis84.fr"),
        display_name: format!("Sap {i}"),
        role,
        password_hash: "x".into(),
    };
    let officer = mindsp_core::service::create_user_in(
        tx.as_mut(),
        new(0, Role::Officer),
        &Limits::default(),
    )
    .await
    .unwrap();
    let mut users = Vec::new();
    for i in 1..=INVITEES {
        let u = mindsp_core::service::create_user_in(
            tx.as_mut(),
            new(i, Role::Member),
            &Limits::default(),
        )
        .await
        .unwrap();
        users.push(u.id);
    }
    tx.commit().await.unwrap();

    // A session starting in 1 min 3 s with a reminder 1 min before: the reminders fall
    // due 3 s from now, all at once. No e-mail: in-app only, so the run is about the
    // reminder jobs.
    let notifier = Notifier::new(store.clone(), NotifyConfig::default()).with_queue(queue.clone());
    let training = Training::new(
        store.clone(),
        notifier,
        Some(queue.clone()),
        TrainingConfig::default(),
    );
    let actor = Actor {
        tenant_id: tenant.id,
        user_id: officer.id,
        role: Role::Officer,
    };
    let start = chrono::Utc::now() + TimeDelta::seconds(63);
    training
        .create(
            &actor,
            NewSession {
                title: "Manœuvre ARI en milieu enfumé".into(),
                kind: "ari".into(),
                description: String::new(),
                location: "CIS Avignon".into(),
                start_at: start,
                end_at: start + TimeDelta::hours(3),
                invitees: users.clone(),
                reminder_offsets: Some(vec![1]),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        reminder_jobs(&queue, tenant.id, JobState::Scheduled)
            .await
            .len()
            + reminder_jobs(&queue, tenant.id, JobState::Ready)
                .await
                .len(),
        INVITEES
    );

    // The first worker starts; it is killed once it has stored some reminders but not
    // all.
    let mail = dir.join("mail");
    let mut first = worker(&db, &mail);
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored_at_kill = loop {
        let stored: usize = reminders_stored(&store, tenant.id, &users)
            .await
            .iter()
            .sum();
        if stored >= INVITEES / 20 {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "the first worker stored no reminder in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let running = reminder_jobs(&queue, tenant.id, JobState::Running)
        .await
        .len();
    let succeeded = reminder_jobs(&queue, tenant.id, JobState::Succeeded)
        .await
        .len();
    eprintln!(
        "killed the worker with {stored_at_kill} reminders stored, {succeeded} jobs acknowledged, {running} leased"
    );
    assert!(
        stored_at_kill < INVITEES || running > 0,
        "the worker finished before it was killed: the test proved nothing"
    );

    // A new worker: leases of the dead one expire (2 s) and its jobs run again.
    let _second = worker(&db, &mail);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if reminder_jobs(&queue, tenant.id, JobState::Succeeded)
            .await
            .len()
            == INVITEES
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every reminder job finished after recovery"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = reminders_stored(&store, tenant.id, &users).await;
    let missing = counts.iter().filter(|c| **c == 0).count();
    let doubled = counts.iter().filter(|c| **c > 1).count();
    assert_eq!(
        (missing, doubled),
        (0, 0),
        "every invitee has exactly one reminder"
    );
    let jobs = reminder_jobs(&queue, tenant.id, JobState::Succeeded).await;
    let ran_twice = jobs.iter().filter(|j| j.attempts > 1).count();
    eprintln!(
        "{ran_twice} of {INVITEES} reminder jobs ran more than once; 0 duplicate notifications"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
