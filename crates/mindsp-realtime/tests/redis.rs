//! The Redis adapters against a real Redis (`MINDSP_TEST_REDIS_URL`; skipped with a
//! message otherwise), each test under a fresh key prefix, purged at the end: two
//! stacks in one process stand for two nodes.

use std::future::ready;
use std::time::Duration;

use fred::interfaces::{ClientLike, LuaInterface};
use mindsp_core::events::{Envelope, Event, PresenceStatus, TypingState};
use mindsp_core::{ConversationId, TenantId, UserId};
use mindsp_realtime::Realtime;
use mindsp_realtime::redis::RedisConfig;

const WAIT: Duration = Duration::from_secs(10);

fn config() -> Option<RedisConfig> {
    let Ok(url) = std::env::var("MINDSP_TEST_REDIS_URL") else {
        eprintln!("skipped: set MINDSP_TEST_REDIS_URL to run the Redis real-time tests");
        return None;
    };
    let mut c = RedisConfig::new(url);
    c.prefix = format!("{{mindsp-test-{}}}:rt:", uuid::Uuid::new_v4().simple());
    c.heartbeat = Duration::from_millis(200);
    c.window = Duration::from_millis(600);
    Some(c)
}

async fn purge(c: &RedisConfig) {
    let config = fred::types::config::Config::from_url(&c.url).unwrap();
    let client = fred::types::Builder::from_config(config).build().unwrap();
    client.init().await.unwrap();
    let _: i64 = client
        .eval(
            "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
             redis.call('DEL', k) n = n + 1 end return n",
            Vec::<String>::new(),
            vec![format!("{}*", c.prefix)],
        )
        .await
        .unwrap();
    let _ = client.quit().await;
}

async fn next_frame(conn: &mut mindsp_realtime::Connection) -> String {
    let d = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("an event arrives");
    d.frame().to_owned()
}

/// The next frame that names `user` (the watcher's own presence is skipped).
async fn next_about(conn: &mut mindsp_realtime::Connection, user: UserId) -> String {
    loop {
        let f = next_frame(conn).await;
        if f.contains(&user.to_string()) {
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_delivers_each_envelope_once_its_own_included() {
    let Some(c) = config() else { return };
    let n1 = Realtime::redis(&c, 16).await.unwrap();
    let n2 = Realtime::redis(&c, 16).await.unwrap();
    let (t, other) = (TenantId::new(), TenantId::new());
    let u = UserId::new();
    let (mut on1, _) = n1.hub().register(t, u).unwrap();
    let (mut on2, _) = n2.hub().register(t, u).unwrap();
    let (mut foreign, _) = n2.hub().register(other, u).unwrap();
    for _ in 0..3 {
        n1.publish(Envelope::to_users(
            t,
            vec![u],
            Event::Typing {
                conversation_id: ConversationId::new(),
                user_id: UserId::new(),
                state: TypingState::Start,
            },
        ))
        .await;
    }
    for conn in [&mut on1, &mut on2] {
        for _ in 0..3 {
            assert!(next_frame(conn).await.contains(r#""type":"typing""#));
        }
    }
    // Watching for what should not come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        on1.events.try_recv().is_err(),
        "delivered twice on the publishing node"
    );
    assert!(on2.events.try_recv().is_err());
    assert!(foreign.events.try_recv().is_err(), "crossed tenants");
    drop((n1, n2));
    purge(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_shared_and_a_dead_node_is_swept_once() {
    let Some(c) = config() else { return };
    let n1 = Realtime::redis(&c, 64).await.unwrap();
    let n2 = Realtime::redis(&c, 64).await.unwrap();
    let t = TenantId::new();
    let (u, watcher) = (UserId::new(), UserId::new());
    let mut w = n2.open(t, watcher, ready(vec![u])).await.unwrap();

    // Online on node 1: node 2 is told and its query agrees.
    let a = n1.open(t, u, ready(vec![watcher])).await.unwrap();
    let f = next_about(&mut w, u).await;
    assert!(f.contains(r#""status":"online""#), "{f}");
    let q = n2.presence(t, &[u, UserId::new()]).await.unwrap();
    assert_eq!(q[0].status, PresenceStatus::Online);
    assert_eq!(q[1].status, PresenceStatus::Offline);
    // A second connection on node 2, closed again: no event, still online.
    let b = n2.open(t, u, ready(vec![watcher])).await.unwrap();
    n2.close(b, ready(vec![watcher])).await;
    assert_eq!(
        n1.presence(t, &[u]).await.unwrap()[0].status,
        PresenceStatus::Online
    );
    // The same user id in another tenant is someone else.
    assert_eq!(
        n1.presence(TenantId::new(), &[u]).await.unwrap()[0].status,
        PresenceStatus::Offline
    );

    // Node 1 stops heartbeating with the connection still open (as if killed): node 2
    // sweeps it and announces the user offline, with last_seen.
    std::mem::forget(a);
    drop(n1);
    let f = next_about(&mut w, u).await;
    assert!(
        f.contains(r#""status":"offline""#) && f.contains("last_seen"),
        "{f}"
    );
    let q = n2.presence(t, &[u]).await.unwrap();
    assert_eq!(q[0].status, PresenceStatus::Offline);
    assert!(q[0].last_seen.is_some());
    // One event for that transition: several sweeps later, nothing more.
    tokio::time::sleep(c.window * 2).await;
    assert!(w.events.try_recv().is_err());
    n2.close(w, ready(vec![u])).await;
    drop(n2);
    purge(&c).await;
}

/// A node that shuts down (`Realtime::shutdown`, at SIGTERM) stops its heartbeats while
/// its process still runs and its sockets close: the other node sweeps it after the
/// window and tells the tenant that its user is offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_stops_its_heartbeats_and_is_swept() {
    let Some(c) = config() else { return };
    let n1 = Realtime::redis(&c, 64).await.unwrap();
    let n2 = Realtime::redis(&c, 64).await.unwrap();
    let t = TenantId::new();
    let (u, watcher) = (UserId::new(), UserId::new());
    let mut w = n2.open(t, watcher, ready(vec![u])).await.unwrap();
    let a = n1.open(t, u, ready(vec![watcher])).await.unwrap();
    let f = next_about(&mut w, u).await;
    assert!(f.contains(r#""status":"online""#), "{f}");

    n1.shutdown().await;
    n1.close(a, ready(vec![watcher])).await;
    let f = next_about(&mut w, u).await;
    assert!(
        f.contains(r#""status":"offline""#) && f.contains("last_seen"),
        "{f}"
    );
    drop(n1);
    n2.close(w, ready(vec![u])).await;
    drop(n2);
    purge(&c).await;
}

/// Presence in Redis that drifted from what a node holds (say a command of a dropped
/// connection that reached Redis after newer ones) is put right at the node's next
/// resync: a user it does not hold turns offline, one it holds turns online again, and
/// the tenant hears of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_puts_its_drifted_presence_right_at_its_resync() {
    let Some(mut c) = config() else { return };
    c.resync = Duration::from_millis(600);
    let node = Realtime::redis(&c, 64).await.unwrap();
    let t = TenantId::new();
    let (here, gone, watcher) = (UserId::new(), UserId::new(), UserId::new());
    let mut w = node
        .open(t, watcher, ready(vec![here, gone]))
        .await
        .unwrap();
    let _conn = node.open(t, here, ready(vec![watcher])).await.unwrap();
    let f = next_about(&mut w, here).await;
    assert!(f.contains(r#""status":"online""#), "{f}");

    // The drift, written straight into Redis: `gone` on this node without a
    // connection, `here` no longer on it.
    let admin =
        fred::types::Builder::from_config(fred::types::config::Config::from_url(&c.url).unwrap())
            .build()
            .unwrap();
    admin.init().await.unwrap();
    let script = "local p, t, node = ARGV[1], ARGV[2], redis.call('ZRANGE', KEYS[1], 0, 0)[1] \
                  redis.call('HSET', p .. 'u:' .. t .. ':' .. ARGV[3], node, '1') \
                  redis.call('SADD', p .. 'n:' .. node, t .. ':' .. ARGV[3]) \
                  redis.call('HDEL', p .. 'u:' .. t .. ':' .. ARGV[4], node) \
                  redis.call('SREM', p .. 'n:' .. node, t .. ':' .. ARGV[4]) return 1";
    let _: i64 = admin
        .eval(
            script,
            vec![format!("{}nodes", c.prefix)],
            vec![
                c.prefix.clone(),
                t.to_string(),
                gone.to_string(),
                here.to_string(),
            ],
        )
        .await
        .unwrap();

    // Both told, in either order.
    let (mut told_gone, mut told_here) = (false, false);
    while !(told_gone && told_here) {
        let f = next_frame(&mut w).await;
        told_gone |= f.contains(&gone.to_string()) && f.contains(r#""status":"offline""#);
        told_here |= f.contains(&here.to_string()) && f.contains(r#""status":"online""#);
    }
    let q = node.presence(t, &[here, gone]).await.unwrap();
    assert_eq!(q[0].status, PresenceStatus::Online);
    assert_eq!(q[1].status, PresenceStatus::Offline);
    // Put right once: the resyncs that follow find nothing to write or tell.
    tokio::time::sleep(c.resync * 2).await;
    assert!(w.events.try_recv().is_err(), "nothing more to tell");
    let _ = admin.quit().await;
    drop(node);
    purge(&c).await;
}
