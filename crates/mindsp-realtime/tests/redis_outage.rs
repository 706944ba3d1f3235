//! A node whose subscription to Redis breaks tells its connections to catch up, against
//! a real Redis (`MINDSP_TEST_REDIS_URL`; skipped with a message otherwise).
//!
//! A test binary of its own: it kills every pub/sub connection of the Redis server,
//! which would disturb the other Redis tests if they ran beside it (cargo runs test
//! binaries one after another).

use std::time::Duration;

use fred::interfaces::ClientLike;
use mindsp_core::events::{Envelope, Event, TypingState};
use mindsp_core::{ConversationId, TenantId, UserId};
use mindsp_realtime::Realtime;
use mindsp_realtime::hub::RELAYED_KINDS;
use mindsp_realtime::redis::RedisConfig;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_subscription_tells_every_connection_to_catch_up() {
    let Ok(url) = std::env::var("MINDSP_TEST_REDIS_URL") else {
        eprintln!("skipped: set MINDSP_TEST_REDIS_URL to run the Redis outage test");
        return;
    };
    let mut config = RedisConfig::new(url.clone());
    config.prefix = format!("{{mindsp-test-{}}}:rt:", uuid::Uuid::new_v4().simple());
    let node = Realtime::redis(&config, 64)
        .await
        .expect("connect to Redis");
    let (tenant, other_tenant) = (TenantId::new(), TenantId::new());
    let (user, other) = (UserId::new(), UserId::new());
    let (mut conn, _) = node.hub().register(tenant, user).unwrap();
    let (mut elsewhere, _) = node.hub().register(other_tenant, other).unwrap();

    // Nothing to catch up while the subscription holds.
    let typing = |state| {
        Envelope::to_users(
            tenant,
            vec![user],
            Event::Typing {
                conversation_id: ConversationId::new(),
                user_id: other,
                state,
            },
        )
    };
    node.publish(typing(TypingState::Start)).await;
    let first = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("the typing event arrives");
    assert!(matches!(first.envelope.event, Event::Typing { .. }));

    let admin =
        fred::types::Builder::from_config(fred::types::config::Config::from_url(&url).unwrap())
            .build()
            .unwrap();
    admin.init().await.unwrap();
    let killed: i64 = admin
        .custom(
            fred::cmd!("CLIENT"),
            vec!["KILL", "TYPE", "pubsub", "SKIPME", "yes"],
        )
        .await
        .unwrap();
    assert!(killed >= 1, "the node's subscriber was connected");

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
    node.publish(typing(TypingState::Stop)).await;
    let after = tokio::time::timeout(WAIT, conn.events.recv())
        .await
        .expect("live events reach the node again");
    assert!(matches!(
        after.envelope.event,
        Event::Typing {
            state: TypingState::Stop,
            ..
        }
    ));
    let _ = admin.quit().await;
}
