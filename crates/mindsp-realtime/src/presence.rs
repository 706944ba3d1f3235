//! Presence: a user is online while they have at least one live connection, and
//! offline (with `last_seen`) once the last one closes.
//!
//! [`Presence`] is the port; [`LocalPresence`] counts the connections of this process.
//! Several nodes share `crate::redis::RedisPresence` (feature `redis`), whose node
//! heartbeats expire when a node dies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindsp_core::events::{PresenceStatus, next_presence_version};
use mindsp_core::{TenantId, UserId};
use serde::{Deserialize, Serialize};

/// One user's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPresence {
    /// The user.
    pub user_id: UserId,
    /// Online or offline.
    pub status: PresenceStatus,
    /// When their last connection closed; `None` while online or when never seen
    /// since this node started.
    pub last_seen: Option<DateTime<Utc>>,
    /// The version of the change this state comes from, as in `presence` events (0:
    /// never seen): a client applies an answer or an event only when its version is
    /// above the one it holds for that user.
    pub version: u64,
}

/// Presence could not be read (Redis away): a client shows it as unknown rather than
/// everyone offline, and asks again later.
#[derive(Debug, Clone, thiserror::Error)]
#[error("presence cannot be read now: {0}")]
pub struct PresenceUnavailable(pub String);

/// Told when a presence turned a user offline by itself, with when they were last
/// seen: the users of a dead node it swept, a disconnection it could write only later.
/// The caller learns the others from [`Presence::disconnected`]. Called on the presence's
/// own tasks: it must not wait.
pub type OfflineSink = Arc<dyn Fn(TenantId, UserId, DateTime<Utc>) + Send + Sync>;

/// Tracks who is online, per tenant.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// `user` opened a connection. When this made them online, the version of that
    /// change (see [`next_presence_version`]).
    async fn connected(&self, tenant: TenantId, user: UserId) -> Option<u64>;
    /// A connection of `user` closed. When this made them offline, their `last_seen`
    /// and the version of that change.
    async fn disconnected(&self, tenant: TenantId, user: UserId) -> Option<(DateTime<Utc>, u64)>;
    /// The presence of each of `users`, in the same order; [`PresenceUnavailable`] when
    /// it cannot be read now (shared presence whose store is away).
    async fn query(
        &self,
        tenant: TenantId,
        users: &[UserId],
    ) -> Result<Vec<UserPresence>, PresenceUnavailable>;
    /// This node is shutting down: its connections will close without
    /// [`Presence::disconnected`], and its users' presence is left to the nodes that
    /// stay (those who reconnect to one of them meanwhile stay online without a word).
    /// Does nothing by default: with one node, every client leaves with it.
    async fn leaving(&self) {}
    /// This node stopped cleanly: it will publish nothing more (called last, after its
    /// grace period). Does nothing by default.
    async fn stopped(&self) {}
    /// Sets who is told of the users this presence turns offline by itself (see
    /// [`OfflineSink`]), in place of any set before. Ignored by default: a presence
    /// that does so has to keep it.
    fn on_offline(&self, _sink: OfflineSink) {}
}

#[derive(Default)]
struct Entry {
    connections: u32,
    last_seen: Option<DateTime<Utc>>,
    version: u64,
}

/// Presence from the connections of this process: the embedded, one-node profile.
#[derive(Default)]
pub struct LocalPresence {
    users: Mutex<HashMap<(TenantId, UserId), Entry>>,
}

impl LocalPresence {
    /// Nobody online.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Presence for LocalPresence {
    async fn connected(&self, tenant: TenantId, user: UserId) -> Option<u64> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let e = users.entry((tenant, user)).or_default();
        e.connections += 1;
        if e.connections > 1 {
            return None;
        }
        e.version = next_presence_version(e.version);
        Some(e.version)
    }

    async fn disconnected(&self, tenant: TenantId, user: UserId) -> Option<(DateTime<Utc>, u64)> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let e = users.get_mut(&(tenant, user))?;
        if e.connections == 0 {
            return None;
        }
        e.connections -= 1;
        if e.connections > 0 {
            return None;
        }
        let now = mindsp_core::model::now();
        e.last_seen = Some(now);
        e.version = next_presence_version(e.version);
        Some((now, e.version))
    }

    async fn query(
        &self,
        tenant: TenantId,
        users: &[UserId],
    ) -> Result<Vec<UserPresence>, PresenceUnavailable> {
        let map = self.users.lock().unwrap_or_else(|e| e.into_inner());
        Ok(users
            .iter()
            .map(|u| match map.get(&(tenant, *u)) {
                Some(e) if e.connections > 0 => UserPresence {
                    user_id: *u,
                    status: PresenceStatus::Online,
                    last_seen: None,
                    version: e.version,
                },
                e => UserPresence {
                    user_id: *u,
                    status: PresenceStatus::Offline,
                    last_seen: e.and_then(|e| e.last_seen),
                    version: e.map_or(0, |e| e.version),
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn online_until_the_last_connection_closes() {
        let p = LocalPresence::new();
        let (t, u) = (TenantId::new(), UserId::new());
        let online = p.connected(t, u).await.expect("online now");
        assert!(p.connected(t, u).await.is_none());
        assert!(p.disconnected(t, u).await.is_none());
        let q = p.query(t, &[u]).await.unwrap();
        assert_eq!(q[0].status, PresenceStatus::Online);
        assert_eq!(q[0].version, online);
        let (seen, offline) = p.disconnected(t, u).await.expect("offline now");
        let q = p.query(t, &[u]).await.unwrap();
        assert_eq!(q[0].status, PresenceStatus::Offline);
        assert_eq!(q[0].last_seen, Some(seen));
        assert_eq!(q[0].version, offline);
        // Each change gets a greater version, even within one millisecond.
        let again = p.connected(t, u).await.expect("online again");
        assert!(
            online < offline && offline < again,
            "{online} {offline} {again}"
        );
        // Another tenant's user of the same id is someone else.
        assert_eq!(
            p.query(TenantId::new(), &[u]).await.unwrap()[0].last_seen,
            None
        );
        assert!(p.disconnected(t, u).await.is_some());
        assert!(p.disconnected(t, u).await.is_none());
    }
}
