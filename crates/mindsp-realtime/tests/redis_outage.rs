//! Redis outages: a node whose subscription breaks, whose publishes fail, or whose
//! Redis stops, against private `redis-server` processes on free loopback ports (one
//! per test, killed, paused and restarted by it). Runs where `MINDSP_TEST_REDIS_URL` is
//! set (Redis is installed there); skipped with a message otherwise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use fred::interfaces::{ClientLike, LuaInterface};
use mindsp_core::events::{Envelope, Event, PresenceStatus, TypingState};
use mindsp_core::{ConversationId, TenantId, UserId};
use mindsp_realtime::Realtime;
use mindsp_realtime::hub::RELAYED_KINDS;
use mindsp_realtime::redis::RedisConfig;

#[path = "support/marks.rs"]
mod marks;
#[path = "support/private_redis.rs"]
mod private_redis;
use private_redis::PrivateRedis;

const WAIT: Duration = Duration::from_secs(15);

/// A node of its own on a private Redis server (see [`PrivateRedis`]), with short
/// timeouts; `None` (with a message) when the test cannot run here.
async fn private_node() -> Option<(PrivateRedis, RedisConfig)> {
    if std::env::var("MINDSP_TEST_REDIS_URL").is_err() {
        eprintln!("skipped: set MINDSP_TEST_REDIS_URL to run the Redis outage tests");
        return None;
    }
    let redis = PrivateRedis::start()?;
    let mut config = RedisConfig::new(redis.url());
    config.heartbeat = Duration::from_millis(200);
    config.window = Duration::from_millis(600);
    config.command_timeout = Duration::from_millis(300);
    Some((redis, config))
}

/// A client of the private server, for commands the test gives it.
async fn admin(config: &RedisConfig) -> fred::clients::Client {
    let client = fred::types::Builder::from_config(
        fred::types::config::Config::from_url(&config.url).unwrap(),
    )
    .build()
    .unwrap();
    client.init().await.unwrap();
    client
}

/// `CLIENT PAUSE millis mode` on the private server (`WRITE`: writes and scripts wait;
/// `ALL`: every command).
async fn pause(admin: &fred::clients::Client, millis: u32, mode: &str) {
    let _: String = admin
        .custom(
            fred::cmd!("CLIENT"),
            vec!["PAUSE".to_owned(), millis.to_string(), mode.to_owned()],
        )
        .await
        .unwrap();
}

/// Two nodes, and one user of one tenant connected to each; node a queues at most
/// `capacity_a` events per connection.
struct TwoNodes {
    a: Realtime,
    b: Realtime,
    tenant: TenantId,
    on_a: UserId,
    on_b: UserId,
    conn_a: mindsp_realtime::Connection,
    conn_b: mindsp_realtime::Connection,
}

async fn two_nodes(config: &RedisConfig, capacity_a: usize) -> TwoNodes {
    let a = Realtime::redis(config, capacity_a).await.expect("node a");
    let b = Realtime::redis(config, 64).await.expect("node b");
    let tenant = TenantId::new();
    let (on_a, on_b) = (UserId::new(), UserId::new());
    let (conn_a, _) = a.hub().register(tenant, on_a).unwrap();
    let (conn_b, _) = b.hub().register(tenant, on_b).unwrap();
    TwoNodes {
        a,
        b,
        tenant,
        on_a,
        on_b,
        conn_a,
        conn_b,
    }
}

async fn next(conn: &mut mindsp_realtime::Connection, what: &str) -> Event {
    tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .envelope
        .event
        .clone()
}

/// A connection of `user` opened on `node`, telling `watchers` when it brings them
/// online.
async fn open(
    node: &Realtime,
    tenant: TenantId,
    user: UserId,
    watchers: Vec<UserId>,
) -> mindsp_realtime::Connection {
    node.open(
        tenant,
        user,
        mindsp_realtime::Checked::now(0),
        std::future::ready(watchers),
    )
    .await
    .expect("the node is not shutting down")
}

/// What an [`mindsp_realtime::OfflineSink`] is told, and the sink.
type Told = Arc<Mutex<Vec<(TenantId, UserId, DateTime<Utc>)>>>;

fn offline_sink() -> (Told, mindsp_realtime::OfflineSink) {
    let told = Told::default();
    let kept = told.clone();
    let sink: mindsp_realtime::OfflineSink = Arc::new(move |tenant, user, seen| {
        kept.lock().unwrap().push((tenant, user, seen));
    });
    (told, sink)
}

fn typing(tenant: TenantId, to: UserId, state: TypingState) -> Envelope {
    Envelope::to_users(
        tenant,
        vec![to],
        Event::Typing {
            conversation_id: ConversationId::new(),
            user_id: UserId::new(),
            state,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_subscription_tells_every_connection_to_catch_up() {
    let Some((_redis, config)) = private_node().await else {
        return;
    };
    let node = Realtime::redis(&config, 64)
        .await
        .expect("connect to Redis");
    let (tenant, other_tenant) = (TenantId::new(), TenantId::new());
    let (user, other) = (UserId::new(), UserId::new());
    let (mut conn, _) = node.hub().register(tenant, user).unwrap();
    let (mut elsewhere, _) = node.hub().register(other_tenant, other).unwrap();

    // Nothing to catch up while the subscription holds.
    node.publish(typing(tenant, user, TypingState::Start)).await;
    let first = next(&mut conn, "the typing event arrives").await;
    assert!(matches!(first, Event::Typing { .. }));

    let admin = admin(&config).await;
    let killed: i64 = admin
        .custom(
            fred::cmd!("CLIENT"),
            vec!["KILL", "TYPE", "pubsub", "SKIPME", "yes"],
        )
        .await
        .unwrap();
    assert_eq!(killed, 1, "the node's subscriber");

    // Every connection, of every tenant, is told; then live events flow again.
    for c in [&mut conn, &mut elsewhere] {
        let told = tokio::time::timeout(WAIT, c.events.recv())
            .await
            .expect("told to catch up once subscribed again");
        match &told.envelope.event {
            Event::EventsSkipped { events } => assert_eq!(events, RELAYED_KINDS),
            other => panic!("expected events_skipped, got {other:?}"),
        }
        assert!(
            told.frame()
                .starts_with(r#"{"v":1,"type":"events_skipped","events":["new_message""#)
        );
    }
    node.publish(typing(tenant, user, TypingState::Stop)).await;
    let after = next(&mut conn, "live events reach the node again").await;
    assert!(matches!(
        after,
        Event::Typing {
            state: TypingState::Stop,
            ..
        }
    ));
    let _ = admin.quit().await;
}

/// A subscriber connection that stops answering (Redis paused for every command, as a
/// connection silently dropped by the network would look) is noticed by its pings,
/// made again, and the connections are told to catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscriber_connection_is_noticed_and_made_again() {
    let Some((_redis, config)) = private_node().await else {
        return;
    };
    let node = Realtime::redis(&config, 64)
        .await
        .expect("connect to Redis");
    let (mut conn, _) = node.hub().register(TenantId::new(), UserId::new()).unwrap();
    let admin = admin(&config).await;
    pause(&admin, 4000, "ALL").await;
    while !matches!(
        next(&mut conn, "told to catch up after the pause").await,
        Event::EventsSkipped { .. }
    ) {}
    let _ = admin.quit().await;
}

/// A publishing connection that stops answering (Redis paused for every command, as a
/// connection silently dropped by the network would look) is made again. The probes
/// that wait for Redis to answer are writes, and each keeps fred's own check for
/// unresponsive connections quiet: after a few, the node reconnects by itself. Seen
/// from Redis: no connection the node had before the pause is left after it (its
/// subscriber is made again by its pings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_publishing_connection_is_made_again() {
    let Some((_redis, config)) = private_node().await else {
        return;
    };
    let node = Realtime::redis(&config, 64)
        .await
        .expect("connect to Redis");
    let admin = admin(&config).await;
    let before = node_connections(&admin).await;
    assert_eq!(before.len(), 2, "a publishing and a subscribing connection");
    pause(&admin, 3000, "ALL").await;
    // Times out: writes now fail at once and the probes start.
    node.publish(typing(TenantId::new(), UserId::new(), TypingState::Start))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = node_connections(&admin).await;
        if before.iter().all(|id| !now.contains(id)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still connected through {:?} of {before:?}",
            now.intersection(&before).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = admin.quit().await;
}

/// Under steady publishing, the breaker still closes once Redis answers: publishes
/// refused meanwhile keep marking events to tell the other nodes of, and that must not
/// keep the node waiting for a quiet moment that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_publishes_again_once_redis_answers() {
    let Some((_redis, config)) = private_node().await else {
        return;
    };
    let TwoNodes {
        a,
        b: _b,
        tenant,
        on_b,
        mut conn_b,
        ..
    } = two_nodes(&config, 64).await;
    let a = std::sync::Arc::new(a);
    let admin = admin(&config).await;
    pause(&admin, 700, "WRITE").await;
    // `Start` until the pause is over, `Stop` after: the `Start`s that Redis held
    // through the pause arrive at b anyway, so only a `Stop` shows that publishing
    // works again.
    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (a, over) = (a.clone(), over.clone());
            tokio::spawn(async move {
                loop {
                    let state = if over.load(std::sync::atomic::Ordering::SeqCst) {
                        TypingState::Stop
                    } else {
                        TypingState::Start
                    };
                    a.publish(typing(tenant, on_b, state)).await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    over.store(true, std::sync::atomic::Ordering::SeqCst);
    let crossed = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Typing {
                state: TypingState::Stop,
                ..
            } = conn_b.events.recv().await.envelope.event
            {
                break;
            }
        }
    })
    .await;
    busy.iter().for_each(tokio::task::JoinHandle::abort);
    crossed.expect("publishes from the busy node cross Redis again");
    let _ = admin.quit().await;
}

/// The ids of the connections to the private server, `admin`'s own left out.
async fn node_connections(admin: &fred::clients::Client) -> std::collections::BTreeSet<i64> {
    let own: i64 = admin
        .custom(fred::cmd!("CLIENT"), vec!["ID"])
        .await
        .unwrap();
    let list: String = admin
        .custom(fred::cmd!("CLIENT"), vec!["LIST"])
        .await
        .unwrap();
    list.lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|id| *id != own)
        .collect()
}

/// A node whose publish fails while the other node's subscription holds (Redis paused
/// for writes: `CLIENT PAUSE ... WRITE` holds `PUBLISH` too) tells every node once it
/// publishes again, so the other node's connections catch up as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_failed_is_announced_to_every_node_once_publishing_works() {
    let Some((_redis, config)) = private_node().await else {
        return;
    };
    let TwoNodes {
        a,
        b: _b,
        tenant,
        on_a,
        on_b,
        mut conn_a,
        mut conn_b,
    } = two_nodes(&config, 64).await;

    let admin = admin(&config).await;
    pause(&admin, 1500, "WRITE").await;
    tokio::time::timeout(WAIT, a.publish(typing(tenant, on_a, TypingState::Start)))
        .await
        .expect("the publish gives up");
    let local = next(&mut conn_a, "delivered on its own node").await;
    assert!(matches!(local, Event::Typing { .. }));
    // Once Redis takes writes again, publishes go out after the announcement.
    assert!(
        told_then_through(&a, &mut conn_b, tenant, on_b).await,
        "node b's connection was told before the next event"
    );
    let _ = admin.quit().await;
}

/// Publishes on `from` a typing stop for `to` until `conn` (on another node) gets it
/// through Redis; whether `conn` was told to catch up before. Publishes are retried:
/// until the node sees Redis answer again, they stay on the node.
async fn told_then_through(
    from: &Realtime,
    conn: &mut mindsp_realtime::Connection,
    tenant: TenantId,
    to: UserId,
) -> bool {
    let mut told = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing crossed Redis again"
        );
        from.publish(typing(tenant, to, TypingState::Stop)).await;
        while let Ok(d) = tokio::time::timeout(Duration::from_millis(100), conn.events.recv()).await
        {
            match d.envelope.event {
                Event::EventsSkipped { .. } => told = true,
                Event::Typing {
                    state: TypingState::Stop,
                    ..
                } => return told,
                _ => {}
            }
        }
    }
}

/// A Redis that keeps its connections but takes no write (paused: fred still counts
/// the connection as up, and steady traffic keeps its unresponsive check quiet) costs
/// the node one command timeout, not one per publish: after the first, publishes and
/// presence writes fail at once (delivered on the node only) until Redis answers a
/// probe. Then the other node is told to catch up and publishes cross Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_hangs_costs_one_timeout_not_one_per_send() {
    let Some((_redis, config)) = private_node().await else {
        return;
    };
    // One by one, each waiting for the timeout, these would take twice `WAIT`.
    const SENDS: u32 = 100;
    let TwoNodes {
        a,
        b: _b,
        tenant,
        on_a,
        on_b,
        mut conn_a,
        mut conn_b,
    } = two_nodes(&config, 256).await;

    let admin = admin(&config).await;
    pause(&admin, 60000, "WRITE").await;
    tokio::time::timeout(WAIT, async {
        for _ in 0..SENDS {
            a.publish(typing(tenant, on_a, TypingState::Start)).await;
        }
        // Presence writes too: each opening writes the user's presence.
        for _ in 0..SENDS {
            let opened = a
                .open(
                    tenant,
                    UserId::new(),
                    mindsp_realtime::Checked::now(0),
                    std::future::ready(Vec::new()),
                )
                .await;
            drop(opened);
        }
    })
    .await
    .expect("after the first timeout, writes to a Redis that hangs fail at once");
    for _ in 0..SENDS {
        let local = next(&mut conn_a, "delivered on its own node").await;
        assert!(matches!(local, Event::Typing { .. }), "{local:?}");
    }
    // Presence cannot be read: unknown, rather than everyone offline.
    assert!(a.presence(tenant, &[on_a]).await.is_err());

    let _: String = admin
        .custom(fred::cmd!("CLIENT"), vec!["UNPAUSE"])
        .await
        .unwrap();
    assert!(
        told_then_through(&a, &mut conn_b, tenant, on_b).await,
        "node b's connection was told to catch up before the next event"
    );
    a.presence(tenant, &[on_a])
        .await
        .expect("presence is read again");
    let _ = admin.quit().await;
}

/// A disconnection that could not be written to Redis (writes paused) is written at a
/// later heartbeat, and the tenant hears that the user is offline: nobody stays online
/// for good because Redis was away when they left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnection_redis_missed_is_written_later() {
    missed_disconnection(false).await;
}

/// The same when the user comes back and leaves again while writes fail at once: the
/// first disconnection, timed out, runs once Redis takes writes again and leaves
/// nothing for the later ones to remove, yet the tenant still hears that the user is
/// offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visit_during_the_outage_does_not_hide_the_disconnection() {
    missed_disconnection(true).await;
}

/// `again`: the user connects and leaves once more right after the first disconnection
/// timed out.
async fn missed_disconnection(again: bool) {
    let Some((_redis, mut config)) = private_node().await else {
        return;
    };
    // Long enough that no node is swept during the pause (a sweep would announce the
    // user offline by another way).
    config.window = Duration::from_secs(30);
    let a = Realtime::redis(&config, 64).await.expect("node a");
    let b = Realtime::redis(&config, 64).await.expect("node b");
    // The server keeps the `last_seen` that node a hands to its sink.
    let (told, sink) = offline_sink();
    a.on_offline(sink);
    let (tenant, user, watcher) = (TenantId::new(), UserId::new(), UserId::new());
    let (mut w, _) = b.hub().register(tenant, watcher).unwrap();
    let conn = open(&a, tenant, user, vec![watcher]).await;
    let online = next(&mut w, "online").await;
    assert!(matches!(
        online,
        Event::Presence {
            status: PresenceStatus::Online,
            ..
        }
    ));

    let admin = admin(&config).await;
    // Over before three probes go unanswered and the connection is made again (which
    // would drop the first disconnection held by Redis rather than run it late).
    pause(&admin, 700, "WRITE").await;
    a.close(conn, std::future::ready(vec![watcher])).await;
    if again {
        let conn = open(&a, tenant, user, vec![watcher]).await;
        a.close(conn, std::future::ready(vec![watcher])).await;
    }
    let seen = loop {
        match next(&mut w, "offline once Redis takes writes again").await {
            Event::Presence {
                user_id,
                status: PresenceStatus::Offline,
                last_seen,
                ..
            } if user_id == user => break last_seen.expect("an offline event says when"),
            _ => {}
        }
    };
    // Written late, so node a's `close` returned nothing: its sink had this `last_seen`.
    assert_eq!(*told.lock().unwrap(), vec![(tenant, user, seen)]);
    // Node b's own writes timed out during the pause too: it reads presence again once
    // Redis has answered its probe.
    let deadline = tokio::time::Instant::now() + WAIT;
    let now = loop {
        if let Ok(now) = b.presence(tenant, &[user]).await {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never read again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(now[0].status, PresenceStatus::Offline);
    // Told once: nothing more about the user over several heartbeats.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(d) = tokio::time::timeout_at(quiet_until, w.events.recv()).await {
        assert!(
            !matches!(d.envelope.event, Event::Presence { user_id, .. } if user_id == user),
            "{:?}",
            d.envelope.event
        );
    }
    let _ = admin.quit().await;
}

/// While Redis is down, publishing and opening connections return (nothing waits for
/// Redis to come back), and this node's own connections still get what is published
/// here. Once Redis is back, every connection is told to catch up and events cross
/// Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_blocks_nobody_and_ends_with_a_notice() {
    let Some((mut redis, config)) = private_node().await else {
        return;
    };
    let node = Realtime::redis(&config, 64)
        .await
        .expect("connect to Redis");
    let (tenant, user) = (TenantId::new(), UserId::new());
    let (mut conn, _) = node.hub().register(tenant, user).unwrap();
    redis.kill();
    tokio::time::timeout(WAIT, node.publish(typing(tenant, user, TypingState::Start)))
        .await
        .expect("publishing returns while Redis is down");
    let local = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("this node's connections get what it published");
    assert!(matches!(local.envelope.event, Event::Typing { .. }));
    assert!(
        node.presence(tenant, &[user]).await.is_err(),
        "presence is unknown while Redis is down"
    );
    // In a tenant of its own: once Redis is back, the node announces its users again.
    let opened = tokio::time::timeout(
        WAIT,
        node.open(
            TenantId::new(),
            UserId::new(),
            mindsp_realtime::Checked::now(0),
            std::future::ready(Vec::new()),
        ),
    )
    .await
    .expect("opening a connection returns while Redis is down");
    drop(opened);

    redis.restart().expect("redis-server starts again");
    let told = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("told to catch up once Redis is back");
    assert!(
        matches!(told.envelope.event, Event::EventsSkipped { .. }),
        "{:?}",
        told.envelope.event
    );
    // Through Redis again (a publish may still fail until the publishing connection
    // is back: then it comes locally, which this check does not tell apart, so the
    // notice above is what shows the subscription is back).
    node.publish(typing(tenant, user, TypingState::Stop)).await;
    let after = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("events flow again");
    assert!(matches!(
        after.envelope.event,
        Event::Typing {
            state: TypingState::Stop,
            ..
        }
    ));
}

/// A node that stops while its sweep of a dead node is held up (Redis paused its
/// writes) waits for that sweep: the dead node's user is announced offline (the sink
/// told) before the stop returns, and the stop counts as clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_the_sweep_under_way() {
    stop_during_a_sweep(Duration::from_secs(3), 1_500, true).await;
}

/// When that sweep outlasts the stop's wait (5 s), it is abandoned and the stop counts
/// as unclean: no clean-stop mark, so whoever sweeps this node tells every client to
/// catch up on what the abandoned sweep removed without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_that_outlasts_the_stop_makes_it_unclean() {
    stop_during_a_sweep(Duration::from_secs(8), 7_000, false).await;
}

/// A node `dead` holding one user stops its heartbeats; just before it expires (the
/// `window`), Redis pauses writes for `pause_ms` (less than the window: a longer gap in
/// sweeping would make the sweep wait a window more), so node `a`'s sweep, which finds
/// `dead` expired, waits in Redis; `a` stops half a second into the pause, and its stop
/// `waits` for the sweep or gives up on it (5 s).
async fn stop_during_a_sweep(window: Duration, pause_ms: u32, waits: bool) {
    let Some((_redis, mut config)) = private_node().await else {
        return;
    };
    // Commands wait through the pause rather than time out: the sweep is under way
    // for as long as the pause lasts.
    config.command_timeout = Duration::from_secs(15);
    config.window = window;
    let a = Realtime::redis(&config, 64).await.expect("node a");
    let dead = Realtime::redis(&config, 64).await.expect("node dead");
    let (told, sink) = offline_sink();
    a.on_offline(sink);
    let (tenant, user) = (TenantId::new(), UserId::new());
    let _conn = open(&dead, tenant, user, vec![]).await;
    let admin = admin(&config).await;
    // No heartbeat from `dead` from now on (its last was at most a heartbeat ago), nor
    // a sweep of its own; it expires a window after its last heartbeat.
    dead.shutdown().await;
    let stopped_beating = tokio::time::Instant::now();
    tokio::time::sleep_until(stopped_beating + window - Duration::from_millis(800)).await;
    pause(&admin, pause_ms, "WRITE").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stopped().await;
    let swept = told.lock().unwrap().clone();
    if waits {
        assert_eq!(swept.len(), 1, "the sweep was not waited for");
        assert_eq!((swept[0].0, swept[0].1), (tenant, user));
    } else {
        assert!(swept.is_empty(), "{swept:?}");
    }
    // A script: Redis holds it until the pause ends, so a late mark would be seen.
    let marks = marks::clean_stop_marks(&admin, &config.prefix).await;
    assert_eq!(marks, i64::from(waits), "clean-stop marks");
    let _ = admin.quit().await;
}

/// After a gap in sweeping longer than the window (Redis away, or restarted from its
/// disk), every node's heartbeat is old, the live ones' too. The first sweep then
/// sweeps nothing for a window, so a live node that beats slowly is not taken for dead
/// and its users are not shown offline. (The gap is made here by ageing every heartbeat
/// and the last sweep by 10 s, at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_nodes_are_not_swept_when_sweeping_resumes_after_a_gap() {
    let Some((_redis, mut config)) = private_node().await else {
        return;
    };
    config.window = Duration::from_secs(5);
    config.heartbeat = Duration::from_millis(100);
    let a = Realtime::redis(&config, 64).await.expect("node a");
    let mut slow = config.clone();
    slow.heartbeat = Duration::from_secs(2);
    let b = Realtime::redis(&slow, 64).await.expect("node b");
    let (tenant, user, watcher) = (TenantId::new(), UserId::new(), UserId::new());
    let (mut w, _) = a.hub().register(tenant, watcher).unwrap();
    let _conn = open(&b, tenant, user, vec![watcher]).await;
    assert!(matches!(
        next(&mut w, "online").await,
        Event::Presence {
            status: PresenceStatus::Online,
            ..
        }
    ));
    let admin = admin(&config).await;
    let aged: i64 = admin
        .eval(
            r"
local t = redis.call('TIME')
local old = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - 10000
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('ZADD', KEYS[1], old, node)
end
redis.call('SET', ARGV[1], old)
return redis.call('ZCARD', KEYS[1])
",
            vec![format!("{}nodes", config.prefix)],
            vec![format!("{}sweep", config.prefix)],
        )
        .await
        .unwrap();
    assert_eq!(aged, 2);
    // Node b beats again within 2 s; node a sweeps every 100 ms meanwhile.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(d) = tokio::time::timeout_at(quiet_until, w.events.recv()).await {
        assert!(
            !matches!(d.envelope.event, Event::Presence { user_id, .. } if user_id == user),
            "{:?}",
            d.envelope.event
        );
    }
    let now = a.presence(tenant, &[user]).await.unwrap();
    assert_eq!(now[0].status, PresenceStatus::Online);
    let _ = admin.quit().await;
}

/// A connection whose write to Redis timed out (writes paused) but ran there once Redis
/// took writes again is still announced: the next heartbeat writes it again, and the
/// tenant hears that the user is online, rather than nothing because Redis already had
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_answer_was_lost_is_still_announced() {
    let Some((_redis, mut config)) = private_node().await else {
        return;
    };
    // No sweep during the pause.
    config.window = Duration::from_secs(30);
    let a = Realtime::redis(&config, 64).await.expect("node a");
    let b = Realtime::redis(&config, 64).await.expect("node b");
    let (tenant, user, watcher) = (TenantId::new(), UserId::new(), UserId::new());
    let (mut w, _) = b.hub().register(tenant, watcher).unwrap();
    let admin = admin(&config).await;
    // Over before three probes go unanswered (the connection would be made again, and
    // the held command dropped rather than run late).
    pause(&admin, 700, "WRITE").await;
    let _conn = open(&a, tenant, user, vec![watcher]).await;
    loop {
        match next(&mut w, "online once written again").await {
            Event::Presence {
                user_id,
                status: PresenceStatus::Online,
                ..
            } if user_id == user => break,
            _ => {}
        }
    }
    let _ = admin.quit().await;
}
