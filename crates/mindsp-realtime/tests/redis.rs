//! The Redis adapters against a real Redis (`MINDSP_TEST_REDIS_URL`; skipped with a
//! message otherwise), each test under a fresh key prefix, purged at the end: two
//! stacks in one process stand for two nodes.

use std::future::ready;
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike, LuaInterface};
use mindsp_core::events::{Envelope, Event, PresenceStatus, TypingState};
use mindsp_core::{ConversationId, TenantId, UserId};
use mindsp_realtime::Realtime;
use mindsp_realtime::redis::RedisConfig;

#[path = "support/marks.rs"]
mod marks;

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

/// A client of the test's Redis, to look at (or purge) its keys directly.
async fn redis_client(c: &RedisConfig) -> fred::clients::Client {
    let config = fred::types::config::Config::from_url(&c.url).unwrap();
    let client = fred::types::Builder::from_config(config).build().unwrap();
    client.init().await.unwrap();
    client
}

async fn purge(c: &RedisConfig) {
    let client = redis_client(c).await;
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

/// Two nodes; `watcher` connected to node 2 (`w`), then `u` to node 1 (`a`), and node 2
/// has told the watcher that `u` is online.
struct Pair {
    n1: Realtime,
    n2: Realtime,
    t: TenantId,
    u: UserId,
    watcher: UserId,
    w: mindsp_realtime::Connection,
    a: mindsp_realtime::Connection,
}

async fn online_on_node_1(c: &RedisConfig) -> Pair {
    let n1 = Realtime::redis(c, 64).await.unwrap();
    let n2 = Realtime::redis(c, 64).await.unwrap();
    let t = TenantId::new();
    let (u, watcher) = (UserId::new(), UserId::new());
    let mut w = n2
        .open(t, watcher, mindsp_realtime::Checked::now(0), ready(vec![u]))
        .await
        .unwrap();
    let a = n1
        .open(t, u, mindsp_realtime::Checked::now(0), ready(vec![watcher]))
        .await
        .unwrap();
    let f = next_about(&mut w, u).await;
    assert!(f.contains(r#""status":"online""#), "{f}");
    Pair {
        n1,
        n2,
        t,
        u,
        watcher,
        w,
        a,
    }
}

/// [`next_about`], and whether an `events_skipped` came before.
async fn next_about_noting_skips(
    conn: &mut mindsp_realtime::Connection,
    user: UserId,
) -> (String, bool) {
    let mut skipped = false;
    loop {
        let f = next_frame(conn).await;
        if f.contains(r#""type":"events_skipped""#) {
            skipped = true;
        } else if f.contains(&user.to_string()) {
            return (f, skipped);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_shared_and_a_dead_node_is_swept_once() {
    let Some(c) = config() else { return };
    // Online on node 1: node 2 is told and its query agrees.
    let Pair {
        n1,
        n2,
        t,
        u,
        watcher,
        mut w,
        a,
    } = online_on_node_1(&c).await;
    let q = n2.presence(t, &[u, UserId::new()]).await.unwrap();
    assert_eq!(q[0].status, PresenceStatus::Online);
    assert_eq!(q[1].status, PresenceStatus::Offline);
    // A second connection on node 2, closed again: no event, still online.
    let b = n2
        .open(t, u, mindsp_realtime::Checked::now(0), ready(vec![watcher]))
        .await
        .unwrap();
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
    // sweeps it and announces the user offline, with last_seen; and since node 1 did not
    // stop cleanly (it may have held events it could not publish), clients are told to
    // catch up.
    std::mem::forget(a);
    drop(n1);
    let (f, skipped) = next_about_noting_skips(&mut w, u).await;
    assert!(
        f.contains(r#""status":"offline""#) && f.contains("last_seen"),
        "{f}"
    );
    assert!(skipped, "clients are told to catch up after a node died");
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

/// A user leaves node 1 as they reach node 2 (a phone that changes network): node 1's
/// `offline`, held up while its watchers are read, is published after node 2's
/// `online`. The versions Redis gave the two changes put them in order: the late one is
/// dropped, and the watcher keeps seeing the user online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_offline_from_another_node_does_not_follow_the_online() {
    let Some(c) = config() else { return };
    let Pair {
        n1,
        n2,
        t,
        u,
        watcher,
        mut w,
        a,
    } = online_on_node_1(&c).await;
    let version = |n: &Realtime| {
        let n = n.clone();
        async move { n.presence(t, &[u]).await.unwrap().remove(0) }
    };
    let online = version(&n2).await;
    assert!(online.version > 0, "{online:?}");

    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let closing = {
        let n1 = n1.clone();
        tokio::spawn(async move {
            let slow_watchers = async move {
                let _ = held.await;
                vec![watcher]
            };
            n1.close(a, slow_watchers).await;
        })
    };
    let deadline = Instant::now() + WAIT;
    let offline = loop {
        let now = version(&n1).await;
        if now.status == PresenceStatus::Offline {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the disconnection is never written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(offline.version > online.version, "{online:?} {offline:?}");
    let _b = n2
        .open(t, u, mindsp_realtime::Checked::now(0), ready(vec![watcher]))
        .await
        .unwrap();
    let back = version(&n1).await;
    assert_eq!(back.status, PresenceStatus::Online);
    assert!(back.version > offline.version, "{offline:?} {back:?}");
    let f = next_about(&mut w, u).await;
    assert!(
        f.contains(r#""status":"online""#) && f.contains(&format!(r#""version":{}"#, back.version)),
        "{f}"
    );

    release.send(()).unwrap();
    closing.await.unwrap();
    // Node 1 publishes in order on one connection: once this typing event arrives, its
    // late offline has arrived before it, and was dropped.
    let marker = ConversationId::new();
    n1.publish(Envelope::to_users(
        t,
        vec![watcher],
        Event::Typing {
            conversation_id: marker,
            user_id: u,
            state: TypingState::Start,
        },
    ))
    .await;
    loop {
        let f = next_about(&mut w, u).await;
        assert!(!f.contains(r#""type":"presence""#), "a stale presence: {f}");
        if f.contains(&marker.to_string()) {
            break;
        }
    }
    purge(&c).await;
}

/// A node that shuts down (`Realtime::shutdown`, at SIGTERM) stops its heartbeats while
/// its process still runs and its sockets close: the other node sweeps it after the
/// window and tells the tenant that its user is offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_stops_its_heartbeats_and_is_swept() {
    let Some(c) = config() else { return };
    let Pair {
        n1,
        n2,
        u,
        watcher,
        mut w,
        a,
        ..
    } = online_on_node_1(&c).await;

    n1.shutdown().await;
    n1.close(a, ready(vec![watcher])).await;
    n1.stopped().await;
    let (f, skipped) = next_about_noting_skips(&mut w, u).await;
    assert!(
        f.contains(r#""status":"offline""#) && f.contains("last_seen"),
        "{f}"
    );
    // It stopped cleanly: nobody needs to catch up.
    tokio::time::sleep(c.window * 2).await;
    assert!(!skipped && w.events.try_recv().is_err());
    drop(n1);
    n2.close(w, ready(vec![u])).await;
    drop(n2);
    purge(&c).await;
}

/// A node whose stop outlasts the window is swept first (as one that died: everyone
/// catches up); its clean-stop mark, coming after, is not written, since no sweep
/// would ever take it away again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_swept_before_its_clean_stop_leaves_no_mark() {
    let Some(c) = config() else { return };
    let Pair {
        n1,
        n2,
        u,
        watcher,
        mut w,
        a,
        ..
    } = online_on_node_1(&c).await;
    n1.shutdown().await;
    let f = next_about(&mut w, u).await;
    assert!(f.contains(r#""status":"offline""#), "{f}");
    n1.close(a, ready(vec![watcher])).await;
    n1.stopped().await;
    let client = redis_client(&c).await;
    let left = marks::clean_stop_marks(&client, &c.prefix).await;
    let _ = client.quit().await;
    assert_eq!(left, 0, "a mark was left behind");
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
        .open(
            t,
            watcher,
            mindsp_realtime::Checked::now(0),
            ready(vec![here, gone]),
        )
        .await
        .unwrap();
    let _conn = node
        .open(
            t,
            here,
            mindsp_realtime::Checked::now(0),
            ready(vec![watcher]),
        )
        .await
        .unwrap();
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

/// A large drift is put right in full, each user told once, and no heartbeat writes
/// more than its share (100): between two heartbeats of the node, this node's set in
/// Redis shrinks by at most that. The node's users span several pages of `SSCAN`, and
/// those Redis has right are never written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_drift_is_put_right_over_several_heartbeats() {
    const DRIFT: usize = 1250;
    const HELD: usize = 1250;
    let Some(mut c) = config() else { return };
    c.resync = Duration::from_millis(400);
    let node = Realtime::redis(&c, 4 * DRIFT).await.unwrap();
    let (t, t2) = (TenantId::new(), TenantId::new());
    let watcher = UserId::new();
    let mut w = node
        .open(t, watcher, mindsp_realtime::Checked::now(0), ready(vec![]))
        .await
        .unwrap();
    // Users connected here, of another tenant (the watcher hears nothing of them).
    let held: Vec<UserId> = (0..HELD).map(|_| UserId::new()).collect();
    let mut conns = Vec::new();
    for u in &held {
        conns.push(
            node.open(t2, *u, mindsp_realtime::Checked::now(0), ready(vec![]))
                .await
                .unwrap(),
        );
    }
    let gone: Vec<UserId> = (0..DRIFT).map(|_| UserId::new()).collect();
    let admin =
        fred::types::Builder::from_config(fred::types::config::Config::from_url(&c.url).unwrap())
            .build()
            .unwrap();
    admin.init().await.unwrap();
    // `mark` the users of tenant ARGV[2] with `ARGV[3]` on this node, and add them to
    // its set: a connection written again would put back its usual '1'.
    let mark = "local p, t, v, node = ARGV[1], ARGV[2], ARGV[3], \
                  redis.call('ZRANGE', KEYS[1], 0, 0)[1] \
                for i = 4, #ARGV do \
                  redis.call('HSET', p .. 'u:' .. t .. ':' .. ARGV[i], node, v) \
                  redis.call('SADD', p .. 'n:' .. node, t .. ':' .. ARGV[i]) \
                end return 1";
    let nodes = format!("{}nodes", c.prefix);
    let marked = |tenant: TenantId, value: &str, users: &[UserId]| {
        let mut args = vec![c.prefix.clone(), tenant.to_string(), value.to_owned()];
        args.extend(users.iter().map(|u| u.to_string()));
        args
    };
    let _: i64 = admin
        .eval(mark, vec![nodes.clone()], marked(t2, "held", &held))
        .await
        .unwrap();
    // The drift: users on this node in Redis, none of them connected here.
    let _: i64 = admin
        .eval(mark, vec![nodes.clone()], marked(t, "1", &gone))
        .await
        .unwrap();

    // The node's last heartbeat and its set's size, read together.
    let observe = "local node = redis.call('ZRANGE', KEYS[1], 0, 0)[1] \
                   return {redis.call('ZSCORE', KEYS[1], node), \
                           redis.call('SCARD', ARGV[1] .. 'n:' .. node)}";
    let mut by_heartbeat: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    let mut told = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (beat, size): (String, i64) = admin
            .eval(observe, vec![nodes.clone()], vec![c.prefix.clone()])
            .await
            .unwrap();
        let seen = by_heartbeat.entry(beat).or_insert((size, size));
        *seen = (seen.0.max(size), seen.1.min(size));
        while let Ok(d) = w.events.try_recv() {
            if let Event::Presence {
                user_id, status, ..
            } = &d.envelope.event
            {
                assert_eq!(*status, PresenceStatus::Offline);
                assert!(told.insert(*user_id), "{user_id} told twice");
            }
        }
        if size == 1 + HELD as i64 && told.len() == DRIFT {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {size} on the node, {} told",
            told.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // (Without the cap, one pass writes them all: observations taken while it runs
    // share its heartbeat with one taken after.) Heartbeats run on a task of their own,
    // and passes follow each other at once when one ran late: on a loaded machine a
    // late heartbeat may see two or three passes of at most 100 each, never 1,250.
    for (beat, (most, least)) in &by_heartbeat {
        assert!(
            most - least <= 300,
            "{} written after heartbeat {beat}",
            most - least
        );
    }
    let q = node.presence(t, &gone).await.unwrap();
    assert!(q.iter().all(|p| p.status == PresenceStatus::Offline));
    assert_eq!(told.len(), DRIFT);
    // One more resync, then: every user held here still carries the mark.
    tokio::time::sleep(c.resync * 2).await;
    let values = "local p, t, node = ARGV[1], ARGV[2], redis.call('ZRANGE', KEYS[1], 0, 0)[1] \
                  local n = 0 for i = 3, #ARGV do \
                    if redis.call('HGET', p .. 'u:' .. t .. ':' .. ARGV[i], node) == 'held' \
                    then n = n + 1 end \
                  end return n";
    let mut args = vec![c.prefix.clone(), t2.to_string()];
    args.extend(held.iter().map(|u| u.to_string()));
    let still: i64 = admin.eval(values, vec![nodes.clone()], args).await.unwrap();
    assert_eq!(
        still as usize, HELD,
        "users Redis had right were written again"
    );
    drop(conns);
    let _ = admin.quit().await;
    drop(w);
    drop(node);
    purge(&c).await;
}
