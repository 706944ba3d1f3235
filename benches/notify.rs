//! Notification benchmarks:
//!
//! 1. `tenant`: a `SYSTEM` notification to every user of a department of 5,000 users,
//!    half of them connected (one connection each, registered in this process's
//!    real-time hub): from the call until the last connected user has its
//!    `notification` event in its queue. Stored, e-mail jobs enqueued (SQL queue, in the
//!    same transaction: e-mail is on by default) and pushed.
//! 2. `list`: a user holding 10,000 notifications (half unread): the first page of 30
//!    with the unread count (what `GET /api/notifications` does), a page deep in the
//!    list by cursor, the unread-only page, and the unread count alone (p50/p99/max).
//!
//! `cargo bench -p mindsp-benches --bench notify` runs SQLite; with
//! `MINDSP_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1/mindsp_bench` it runs
//! PostgreSQL too. `MINDSP_BENCH_USERS` (default 5,000) and
//! `MINDSP_BENCH_NOTIFICATIONS` (default 10,000) change the sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mindsp_core::model::{NewUser, Role};
use mindsp_core::notify::{NewNotification, Notification, Notifier, NotifyConfig, kind};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, Limits, NotificationId, TenantId, UserId};
use mindsp_realtime::Realtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let users: usize = env_or("MINDSP_BENCH_USERS", 5_000);
    let notifications: usize = env_or("MINDSP_BENCH_NOTIFICATIONS", 10_000);
    let dir = std::env::temp_dir().join(format!("mindsp-bench-notify-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;

    println!("## SQLite (file, WAL, synchronous=NORMAL)");
    let url = format!("sqlite://{}", dir.join("notify.db").display());
    run(mindsp_store::open(&url).await?, users, notifications).await?;

    if let Ok(url) = std::env::var("MINDSP_BENCH_POSTGRES_URL") {
        println!("\n## PostgreSQL");
        let mut config = mindsp_store::postgres::PgConfig::new(&url);
        config.schema = Some(format!("nbench_{}", uuid::Uuid::new_v4().simple()));
        let store = mindsp_store::postgres::PgStore::open(config).await?;
        run(Arc::new(store), users, notifications).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn run(store: Arc<dyn Store>, users: usize, notifications: usize) -> anyhow::Result<()> {
    let queue = mindsp_queue::sql_queue(store.as_ref())?;
    let tenant = store
        .create_tenant(
            &format!("bench{}", uuid::Uuid::new_v4().simple()),
            "SDIS bench",
        )
        .await?;
    let mut ids = Vec::with_capacity(users);
    let mut tx = store.begin(tenant.id).await?;
    for i in 0..users {
        let u = mindsp_core::service::create_user_in(
            tx.as_mut(),
            NewUser {
                email: format!("sp{i}@bench.fr"),
                display_name: format!("Sap {i:05}"),
                role: if i == 0 { Role::Admin } else { Role::Member },
                password_hash: "x".into(),
            },
            &Limits::default(),
        )
        .await?;
        ids.push(u.id);
    }
    tx.commit().await?;
    let admin = Actor {
        tenant_id: tenant.id,
        user_id: ids[0],
        role: Role::Admin,
    };

    // 1. A whole department, half of it connected.
    let realtime = Realtime::in_process(64);
    let notifier = Notifier::new(store.clone(), NotifyConfig::default())
        .with_publisher(realtime.publisher())
        .with_queue(queue.clone());
    let mut conns = Vec::new();
    // Registered with the hub directly: `Realtime::open` would also announce each
    // user's presence to the whole tenant, 2,500² events this benchmark is not about.
    for u in ids.iter().step_by(2) {
        let (conn, _) = realtime.hub().register(tenant.id, *u).expect("hub open");
        conns.push(conn);
    }
    let mut times = Vec::new();
    for round in 0..5 {
        let n = NewNotification::new(
            kind::SYSTEM,
            format!("Exercice plan rouge n° {round}"),
            "Exercice NOVI demain 9 h au stade Vélodrome : tous les personnels disponibles.",
        );
        let t = Instant::now();
        let sent = notifier.broadcast(&admin, None, &n).await?;
        for c in conns.iter_mut() {
            loop {
                let d = tokio::time::timeout(Duration::from_secs(10), c.events.recv()).await?;
                if matches!(
                    d.envelope.event,
                    mindsp_core::events::Event::Notification { .. }
                ) {
                    break;
                }
            }
        }
        let took = t.elapsed();
        assert_eq!(sent, users);
        times.push(took);
        println!(
            "tenant: {users} users notified ({} connected, e-mail jobs enqueued): {:.0} ms",
            conns.len(),
            took.as_secs_f64() * 1e3
        );
    }
    times.sort();
    println!(
        "tenant: median {:.0} ms, worst {:.0} ms (target < 1000 ms)",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    drop(conns);

    // 2. One user with many notifications, half read.
    let user = ids[1];
    seed(store.as_ref(), tenant.id, user, notifications).await?;
    let actor = Actor {
        tenant_id: tenant.id,
        user_id: user,
        role: Role::Member,
    };
    let plain = Notifier::new(store.clone(), NotifyConfig::default());
    let first = plain.list(&actor, None, false, Some(30)).await?;
    let deep_cursor = {
        let mut tx = store.read(tenant.id).await?;
        let all = tx
            .notifications(user, None, false, (notifications as u32 / 2).clamp(1, 100))
            .await?;
        all.last().map(|n| n.id)
    };
    let unread_expected = first.unread;
    let mut hist = [new_hist(), new_hist(), new_hist(), new_hist()];
    for i in 0..4_000 {
        let t = Instant::now();
        match i % 4 {
            0 => {
                let p = plain.list(&actor, None, false, Some(30)).await?;
                assert_eq!(p.unread, unread_expected);
            }
            1 => {
                plain.list(&actor, deep_cursor, false, Some(30)).await?;
            }
            2 => {
                plain.list(&actor, None, true, Some(30)).await?;
            }
            _ => {
                assert_eq!(plain.unread_count(&actor).await?, unread_expected);
            }
        }
        hist[i % 4].record(t.elapsed().as_micros() as u64)?;
    }
    for (name, h) in [
        "list: first page of 30 + unread count",
        "list: a page by cursor",
        "list: unread only",
        "unread count alone",
    ]
    .iter()
    .zip(hist.iter())
    {
        println!(
            "{name} ({notifications} notifications, {unread_expected} unread): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 2 ms)",
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.max() as f64 / 1e3
        );
    }
    Ok(())
}

/// Stores `n` notifications for `user`, the older half read.
async fn seed(store: &dyn Store, tenant: TenantId, user: UserId, n: usize) -> anyhow::Result<()> {
    let mut left = n;
    let mut made = 0;
    while left > 0 {
        let batch = left.min(2_000);
        let mut tx = store.begin(tenant).await?;
        let rows: Vec<Notification> = (0..batch)
            .map(|i| Notification {
                id: NotificationId::new(),
                user_id: user,
                kind: kind::FMPA_INVITATION.to_owned(),
                title: format!("Invitation n° {}", made + i),
                body: "Vous êtes convoqué(e) à la formation « Secours routier ».".to_owned(),
                link: Some("/fmpa/x".to_owned()),
                data: serde_json::json!({"n": made + i}),
                key: None,
                created_at: mindsp_core::model::now(),
                read_at: None,
            })
            .collect();
        tx.insert_notifications(&rows).await?;
        if made + batch <= n / 2 {
            tx.mark_notifications_read(user, None, mindsp_core::model::now())
                .await?;
        }
        tx.commit().await?;
        made += batch;
        left -= batch;
    }
    Ok(())
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
