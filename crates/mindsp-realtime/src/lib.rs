//! MindSP real time: what turns committed changes into frames on live connections.
//!
//! - [`hub`]: this node's connections by tenant and user, bounded queues, close signals.
//! - [`broker`]: the fan-out port between nodes; [`broker::InProcessBroker`] for one node.
//! - [`presence`]: who is online; [`presence::LocalPresence`] for one node.
//! - `redis` (feature `redis`): [`redis::RedisBroker`] and [`redis::RedisPresence`],
//!   the scaled profile where several nodes share one Redis.
//! - [`typing`]: per-connection typing throttle and expiry.
//! - [`limit`]: the per-connection command rate limiter.
//! - [`queue`]: the small bounded queue each connection holds (events, replies).
//! - [`close`]: the WebSocket close codes the server uses.
//!
//! [`Realtime`] puts them together for a server; the WebSocket protocol itself lives in
//! the server (`mindsp-server`'s `ws` module, `docs/PROTOCOL.md`).

pub mod broker;
pub mod hub;
pub mod limit;
pub mod presence;
pub mod queue;
#[cfg(feature = "redis")]
pub mod redis;
pub mod typing;

use std::sync::Arc;

use mindsp_core::events::{Audience, Envelope, Event, PresenceStatus, Publisher};
use mindsp_core::{TenantId, UserId};

pub use broker::{Broker, BrokerPublisher};
pub use hub::{Checked, CloseReason, CloseSignal, Connection, Delivery, Hub, PasswordMark};
pub use presence::{LocalPresence, OfflineSink, Presence, PresenceUnavailable, UserPresence};

/// WebSocket close codes, documented in `docs/PROTOCOL.md`.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The client broke the WebSocket protocol (a continuation with nothing to
    /// continue, reserved bits set, an unmasked frame...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame or message exceeded the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// A server fault.
    pub const INTERNAL: u16 = 1011;
    /// The node is shutting down: reconnect (possibly to another node) and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The access token expired and was not refreshed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Nothing (not even a pong) was heard from the client within the idle timeout.
    pub const IDLE: u16 = 4002;
    /// The account was deactivated.
    pub const DEACTIVATED: u16 = 4003;
    /// The client did not read: its send buffer filled up.
    pub const TOO_SLOW: u16 = 4008;
    /// The user opened more connections on this node than allowed: the oldest is closed
    /// for the newest.
    pub const SUPERSEDED: u16 = 4009;
    /// The user's password changed: the token this connection was opened with no longer
    /// works. Reconnect with a token issued since, or log in again.
    pub const PASSWORD_CHANGED: u16 = 4010;
}

/// The real-time stack of one node: hub, broker and presence.
#[derive(Clone)]
pub struct Realtime {
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    presence: Arc<dyn Presence>,
}

impl std::fmt::Debug for Realtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realtime").field("hub", &self.hub).finish()
    }
}

impl Realtime {
    /// Assembles a stack; `broker` must feed `hub`.
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>, presence: Arc<dyn Presence>) -> Self {
        Self {
            hub,
            broker,
            presence,
        }
    }

    /// The one-node stack: in-process broker and presence; each connection queues at
    /// most `queue_capacity` events.
    #[cfg(feature = "in-process")]
    pub fn in_process(queue_capacity: usize) -> Self {
        let hub = Hub::new(queue_capacity);
        let broker = Arc::new(broker::InProcessBroker::new(hub.clone()));
        Self::new(hub, broker, Arc::new(LocalPresence::new()))
    }

    /// The scaled stack: envelopes go through Redis pub/sub and presence is shared
    /// through Redis (see [`redis`]); each connection queues at most `queue_capacity`
    /// events.
    #[cfg(feature = "redis")]
    pub async fn redis(
        config: &redis::RedisConfig,
        queue_capacity: usize,
    ) -> Result<Self, redis::RedisError> {
        let hub = Hub::new(queue_capacity);
        let broker = Arc::new(redis::RedisBroker::connect(hub.clone(), config).await?);
        let presence = redis::RedisPresence::start(broker.clone(), config).await?;
        Ok(Self::new(hub, broker, Arc::new(presence)))
    }

    /// Sets who is told of the users presence turns offline by itself: with Redis, the
    /// users of a dead node this one swept, and disconnections written late (the server
    /// keeps their `last_seen` in the store). The others come back from [`Self::close`].
    pub fn on_offline(&self, sink: presence::OfflineSink) {
        self.presence.on_offline(sink);
    }

    /// The local hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The broker as core's publisher port, for `Messaging::with_publisher`.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(BrokerPublisher(self.broker.clone()))
    }

    /// Publishes an envelope through the broker.
    pub async fn publish(&self, envelope: Envelope) {
        self.broker.publish(envelope).await;
    }

    /// Registers a connection of `user` and, when it brings them online, tells
    /// `watchers` (awaited only then): the people who share a conversation with them,
    /// not the whole tenant, whose every member would otherwise get an event for every
    /// colleague who connects. `None` while shutting down. `checked` is what the server
    /// checked of the account and the token (see [`Hub::register_checked`]).
    pub async fn open(
        &self,
        tenant: TenantId,
        user: UserId,
        checked: Checked,
        watchers: impl Future<Output = impl Into<Audience>> + Send,
    ) -> Option<Connection> {
        let (conn, _) = self.hub.register_checked(tenant, user, Some(checked))?;
        if let Some(version) = self.presence.connected(tenant, user).await {
            let watchers = watchers.await.into();
            self.presence_changed(
                tenant,
                user,
                watchers,
                PresenceStatus::Online,
                None,
                version,
            )
            .await;
        }
        Some(conn)
    }

    /// Unregisters a connection and, when it was the user's last, tells `watchers`
    /// (awaited only then) and returns their `last_seen` (for the caller to keep beyond
    /// this process). Once the hub is shutting down ([`Realtime::shutdown`]), only
    /// unregisters: presence is left to the nodes that stay.
    pub async fn close(
        &self,
        conn: Connection,
        watchers: impl Future<Output = impl Into<Audience>> + Send,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let (tenant, user) = (conn.tenant, conn.user);
        drop(conn);
        if self.hub.is_closing() {
            return None;
        }
        let (seen, version) = self.presence.disconnected(tenant, user).await?;
        self.presence_changed(
            tenant,
            user,
            watchers.await.into(),
            PresenceStatus::Offline,
            Some(seen),
            version,
        )
        .await;
        Some(seen)
    }

    /// Refuses new connections, asks every live one to close (1012: reconnect
    /// elsewhere), and leaves this node's users' presence to the nodes that stay
    /// ([`Presence::leaving`]): a rolling restart does not show everyone offline then
    /// online again to their colleagues, and nobody is left online for long (with Redis,
    /// the other nodes' sweep turns offline whoever did not reconnect).
    pub async fn shutdown(&self) {
        self.hub.shutdown();
        self.presence.leaving().await;
    }

    /// Says that this node stopped cleanly, once it will publish nothing more: call it
    /// last, after [`Realtime::shutdown`] and the grace period. With Redis, a node that
    /// did not (it died) makes every node's clients catch up when it is swept, since it
    /// may have held events it could not publish; then its Redis connections are ended
    /// (a `quit` left to `Drop` would race the runtime's end, and fred logs it as a
    /// fatal error).
    pub async fn stopped(&self) {
        self.presence.stopped().await;
        self.broker.close().await;
    }

    /// The presence of `users` of `tenant`; [`PresenceUnavailable`] when it cannot be
    /// read now (Redis away in the scaled profile): unknown, not offline.
    pub async fn presence(
        &self,
        tenant: TenantId,
        users: &[UserId],
    ) -> Result<Vec<UserPresence>, PresenceUnavailable> {
        self.presence.query(tenant, users).await
    }

    async fn presence_changed(
        &self,
        tenant: TenantId,
        user: UserId,
        watchers: Audience,
        status: PresenceStatus,
        last_seen: Option<chrono::DateTime<chrono::Utc>>,
        version: u64,
    ) {
        if matches!(&watchers, Audience::Users(users) if users.is_empty()) {
            return;
        }
        self.broker
            .publish(Envelope {
                tenant,
                audience: watchers,
                event: Event::Presence {
                    user_id: user,
                    status,
                    last_seen,
                    version,
                },
            })
            .await;
    }
}

#[async_trait::async_trait]
impl mindsp_core::notify::OnlineUsers for Realtime {
    /// `None` when presence cannot be read ([`PresenceUnavailable`]).
    async fn online_among(&self, tenant: TenantId, users: &[UserId]) -> Option<Vec<UserId>> {
        let presence = match self.presence.query(tenant, users).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "presence unknown");
                return None;
            }
        };
        Some(
            presence
                .into_iter()
                .filter(|p| p.status == PresenceStatus::Online)
                .map(|p| p.user_id)
                .collect(),
        )
    }
}

#[cfg(all(test, feature = "in-process"))]
mod tests {
    use super::*;

    /// A phone drops and reconnects at once: the offline of its old connection, held
    /// up while its watchers are read, is published after the online of the new one.
    /// The colleague must still see the user online at the end.
    #[tokio::test]
    async fn a_late_offline_does_not_follow_the_online_after_it() {
        let rt = Realtime::in_process(64);
        let (t, user, watcher) = (TenantId::new(), UserId::new(), UserId::new());
        let (mut w, _) = rt.hub().register(t, watcher).unwrap();
        let watchers = || std::future::ready(vec![watcher]);
        let checked = || Checked::now(0);
        let old = rt.open(t, user, checked(), watchers()).await.unwrap();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let closing = {
            let rt = rt.clone();
            tokio::spawn(async move {
                let slow_watchers = async move {
                    let _ = held.await;
                    vec![watcher]
                };
                rt.close(old, slow_watchers).await;
            })
        };
        // The disconnection is counted; its event waits for its watchers.
        while rt.presence(t, &[user]).await.unwrap()[0].status == PresenceStatus::Online {
            tokio::task::yield_now().await;
        }
        let _new = rt.open(t, user, checked(), watchers()).await.unwrap();
        release.send(()).unwrap();
        closing.await.unwrap();

        let mut told = Vec::new();
        while let Ok(d) = w.events.try_recv() {
            if let Event::Presence {
                user_id, status, ..
            } = d.envelope.event
                && user_id == user
            {
                told.push(status);
            }
        }
        assert_eq!(told.last(), Some(&PresenceStatus::Online), "{told:?}");
        let now = rt.presence(t, &[user]).await.unwrap();
        assert_eq!(now[0].status, PresenceStatus::Online);
    }
}
