//! Real-time events and the port that publishes them.
//!
//! The services publish an [`Envelope`] *after* the change it describes is committed.
//! The envelope names its audience, computed from the members at commit time: a member
//! removed from a conversation is simply absent from the next envelope, so the change
//! reaches their live connections at once. Delivering envelopes to connections (and
//! between nodes) is the business of an adapter (`mindsp-realtime`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, NotificationId, TenantId, UserId};
use crate::model::{ConversationKind, Member, Message};
use crate::notify::Notification;

/// Something that happened, as clients see it. Serialised with a `type` tag in
/// snake case, e.g. `{"type": "new_message", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A message was committed.
    NewMessage {
        /// Its conversation.
        conversation_id: ConversationId,
        /// The stored message, with its `seq`.
        message: Message,
    },
    /// A member's read marker moved.
    MessageRead {
        /// The conversation.
        conversation_id: ConversationId,
        /// Who read.
        user_id: UserId,
        /// Their read marker after the change.
        seq: i64,
        /// The reader's unread count in this conversation; only in the envelope sent to
        /// the reader's own devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unread: Option<i64>,
    },
    /// A member started or stopped typing.
    Typing {
        /// The conversation.
        conversation_id: ConversationId,
        /// Who types.
        user_id: UserId,
        /// Start or stop.
        state: TypingState,
    },
    /// A user came online or went offline.
    Presence {
        /// The user.
        user_id: UserId,
        /// Online or offline.
        status: PresenceStatus,
        /// When they were last connected; set when they go offline.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<DateTime<Utc>>,
        /// Orders this user's presence changes: greater for a later change (see
        /// [`next_presence_version`]). Events can arrive out of order (two nodes
        /// publish them, or two tasks of one node); one whose version is not above the
        /// last one applied for that user is stale. 0: unknown order (a node from
        /// before versions).
        #[serde(default)]
        version: u64,
    },
    /// A conversation was created, renamed, or its members or their roles changed.
    ConversationUpdated {
        /// The conversation.
        conversation_id: ConversationId,
        /// Direct or group.
        kind: ConversationKind,
        /// Its name after the change.
        name: Option<String>,
        /// The members after the change.
        members: Vec<Member>,
        /// Users who are no longer members (a removed member learns it here).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removed: Vec<UserId>,
    },
    /// A notification for the recipient, on every device, with their unread count
    /// after it.
    Notification {
        /// The stored notification.
        notification: Notification,
        /// The recipient's unread notifications now.
        unread: i64,
    },
    /// Some or all of the recipient's notifications were read (on any device).
    NotificationsRead {
        /// The notifications marked read; empty when `all`.
        ids: Vec<NotificationId>,
        /// Every notification was marked read.
        all: bool,
        /// The unread count now.
        unread: i64,
    },
    /// One of the recipient's notifications was deleted.
    NotificationDeleted {
        /// The deleted notification.
        id: NotificationId,
        /// The unread count now.
        unread: i64,
    },
    /// Events of these kinds (`type` values) may not have reached this connection: its
    /// node lost its link to the other nodes for a moment. The client catches up (the
    /// protocol document says how for each kind).
    EventsSkipped {
        /// The kinds that may be missing.
        events: Vec<String>,
    },
    /// A user was deactivated: their live connections must close. Never sent to
    /// clients as a frame; the connection is closed instead.
    AccountDeactivated {
        /// The user.
        user_id: UserId,
    },
    /// A user's password changed: their live connections must close, since each
    /// was opened with a token from before the change. Never sent to clients as a frame.
    PasswordChanged {
        /// The user.
        user_id: UserId,
        /// The new password: when it was set, in milliseconds since the epoch
        /// ([`crate::model::User::password_mark`]). Connections opened with a token for
        /// an older one close; one already opened with a token for this one stays. 0
        /// (from a node before this field): every connection of the user closes.
        #[serde(default)]
        password: i64,
    },
}

/// Typing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    /// Started (or still) typing.
    Start,
    /// Stopped, sent, or timed out.
    Stop,
}

/// The version of a user's next presence change, after one of version `last`: the
/// current time in milliseconds since the Unix epoch, or `last + 1` when that is not
/// above `last`. Versions from the clock stay ordered across restarts (and, with Redis,
/// after Redis lost its data) as long as the clock that gives them does not go back,
/// and two changes in one millisecond still get two.
pub fn next_presence_version(last: u64) -> u64 {
    let now = u64::try_from(crate::model::now().timestamp_millis()).unwrap_or(0);
    now.max(last.saturating_add(1))
}

/// Presence status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// At least one live connection.
    Online,
    /// No live connection.
    Offline,
}

/// Who an envelope is for, within its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "users", rename_all = "snake_case")]
pub enum Audience {
    /// These users, on every device.
    Users(Vec<UserId>),
    /// Every connected user of the tenant (presence).
    Tenant,
}

impl From<Vec<UserId>> for Audience {
    fn from(users: Vec<UserId>) -> Self {
        Audience::Users(users)
    }
}

impl Audience {
    /// Whether `user` is in the audience.
    pub fn includes(&self, user: UserId) -> bool {
        match self {
            Audience::Users(u) => u.contains(&user),
            Audience::Tenant => true,
        }
    }
}

/// An event addressed to an audience of one tenant. Never crosses tenants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The tenant every recipient belongs to.
    pub tenant: TenantId,
    /// The recipients.
    pub audience: Audience,
    /// What happened.
    pub event: Event,
}

impl Envelope {
    /// An envelope for a list of users.
    pub fn to_users(tenant: TenantId, users: Vec<UserId>, event: Event) -> Self {
        Self {
            tenant,
            audience: Audience::Users(users),
            event,
        }
    }
}

/// Publishes committed changes to live connections. Publishing never fails the caller:
/// the change is already committed, and clients recover missed messages by resuming
/// from their cursors. An adapter logs its own errors.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Hands an envelope over for delivery.
    async fn publish(&self, envelope: Envelope);
}

/// A publisher that drops everything: for embedders without real time.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopPublisher;

#[async_trait]
impl Publisher for NoopPublisher {
    async fn publish(&self, _envelope: Envelope) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_in_snake_case() {
        let e = Event::Typing {
            conversation_id: ConversationId::new(),
            user_id: UserId::new(),
            state: TypingState::Start,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "typing");
        assert_eq!(v["state"], "start");
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let r = Event::MessageRead {
            conversation_id: ConversationId::new(),
            user_id: UserId::new(),
            seq: 3,
            unread: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["type"], "message_read");
        assert!(v.get("unread").is_none());
    }

    #[test]
    fn envelopes_round_trip_for_brokers() {
        let env = Envelope {
            tenant: TenantId::new(),
            audience: Audience::Tenant,
            event: Event::Presence {
                user_id: UserId::new(),
                status: PresenceStatus::Offline,
                last_seen: Some(crate::model::now()),
                version: next_presence_version(0),
            },
        };
        let s = serde_json::to_string(&env).unwrap();
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), env);
    }
}
