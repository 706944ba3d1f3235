//! Entities and the value types that travel between services and ports.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{ConversationId, MessageId, TenantId, UserId};

/// The current time, truncated to the millisecond: the precision every backend stores,
/// so a value written and read back compares equal.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// A fire department (SDIS). Every other entity belongs to exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Identifier.
    pub id: TenantId,
    /// Short lowercase handle used at login, e.g. `sdis13`.
    pub slug: String,
    /// Display name, e.g. « SDIS 13 — Bouches-du-Rhône ».
    pub name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// What a user may do inside their tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Manages users of the tenant.
    Admin,
    /// An officer: organises training, leads teams.
    Officer,
    /// Every other firefighter or staff member.
    Member,
}

impl Role {
    /// Stable text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Officer => "officer",
            Role::Member => "member",
        }
    }

    /// Parses the stored text form.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "admin" => Ok(Role::Admin),
            "officer" => Ok(Role::Officer),
            "member" => Ok(Role::Member),
            other => Err(Error::invalid(
                "invalid_role",
                format!("unknown role {other:?}: expected admin, officer or member"),
            )),
        }
    }
}

/// A person who can log in to one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Identifier.
    pub id: UserId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Login e-mail, unique within the tenant, stored lowercase.
    pub email: String,
    /// Name shown to others, e.g. « Sgt Julien Martin ».
    pub display_name: String,
    /// Permissions inside the tenant.
    pub role: Role,
    /// Inactive users cannot log in and their tokens stop working.
    pub active: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When the password last changed, if ever: access tokens issued before it stop
    /// working. Not shown to clients.
    #[serde(skip)]
    pub password_changed_at: Option<DateTime<Utc>>,
}

impl User {
    /// What names the user's current password: when it last changed, in milliseconds
    /// since the epoch (what both stores keep exactly), 0 if never. Each change of a
    /// user's password gets a greater one than the change before, whatever the nodes'
    /// clocks (`TenantTx::set_password_hash`), so access tokens and live connections
    /// that carry it can be compared: for equality (is this token for the current
    /// password?) or order (was this connection opened for an older one?).
    pub fn password_mark(&self) -> i64 {
        self.password_changed_at.map_or(0, |t| t.timestamp_millis())
    }
}

/// A user to create; the password is already hashed by the caller.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Login e-mail (normalised to lowercase by the service).
    pub email: String,
    /// Name shown to others.
    pub display_name: String,
    /// Permissions inside the tenant.
    pub role: Role,
    /// PHC string of the password hash (argon2id in the reference server).
    pub password_hash: String,
}

/// Direct (exactly two members, one per pair) or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    /// One-to-one.
    Direct,
    /// Named group with roles.
    Group,
}

impl ConversationKind {
    /// Stable text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationKind::Direct => "direct",
            ConversationKind::Group => "group",
        }
    }

    /// Parses the stored text form.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(ConversationKind::Direct),
            "group" => Ok(ConversationKind::Group),
            other => Err(Error::Storage(format!(
                "unknown conversation kind {other:?}"
            ))),
        }
    }
}

/// A member's standing in a group conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Can post and read.
    Member,
    /// Can also add and remove members and rename the group.
    Admin,
    /// Can also change roles; a group always keeps at least one.
    Owner,
}

impl MemberRole {
    /// Stable text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Owner => "owner",
            MemberRole::Admin => "admin",
            MemberRole::Member => "member",
        }
    }

    /// Parses the text form.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "owner" => Ok(MemberRole::Owner),
            "admin" => Ok(MemberRole::Admin),
            "member" => Ok(MemberRole::Member),
            other => Err(Error::invalid(
                "invalid_member_role",
                format!("unknown member role {other:?}: expected owner, admin or member"),
            )),
        }
    }
}

/// A conversation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// Identifier.
    pub id: ConversationId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Direct or group.
    pub kind: ConversationKind,
    /// Group name; `None` for direct conversations.
    pub name: Option<String>,
    /// Who created it.
    pub created_by: UserId,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Time of the last message, or of creation when there is none yet.
    pub last_activity_at: DateTime<Utc>,
    /// Sequence number of the newest message (0 when empty).
    pub last_seq: i64,
}

/// A conversation to create.
#[derive(Debug, Clone)]
pub struct NewConversation {
    /// Direct or group.
    pub kind: ConversationKind,
    /// Group name.
    pub name: Option<String>,
    /// Creator; becomes owner of a group.
    pub created_by: UserId,
    /// Every member with their role, creator included.
    pub members: Vec<(UserId, MemberRole)>,
}

/// One membership row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member.
    pub user_id: UserId,
    /// Name shown to others.
    pub display_name: String,
    /// Standing in the conversation.
    pub role: MemberRole,
    /// Highest sequence number this member has read.
    pub last_read_seq: i64,
    /// When they joined.
    pub joined_at: DateTime<Utc>,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Identifier.
    pub id: MessageId,
    /// Conversation it belongs to.
    pub conversation_id: ConversationId,
    /// Author.
    pub sender_id: UserId,
    /// Position in the conversation: 1, 2, 3... with no gaps.
    pub seq: i64,
    /// Text content.
    pub content: String,
    /// Key chosen by the client to make retried sends safe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Commit time.
    pub created_at: DateTime<Utc>,
}

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Identifier to give the message if it is created.
    pub id: MessageId,
    /// Target conversation.
    pub conversation_id: ConversationId,
    /// Author; must be a member.
    pub sender_id: UserId,
    /// Validated text.
    pub content: String,
    /// Optional client idempotency key.
    pub idempotency_key: Option<String>,
    /// Time to record.
    pub created_at: DateTime<Utc>,
}

/// Result of an append: either a new message or the one already stored under the same
/// idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Newly stored.
    Created {
        /// The message as stored.
        message: Message,
        /// The conversation's membership version as the append saw it: it changes
        /// with every member added or removed, so a publisher that cached the members
        /// under this version may use them without reading them again. `None` when the
        /// store does not keep one (the publisher then reads the members each time).
        members_version: Option<i64>,
    },
    /// Stored earlier with the same idempotency key; nothing new was written.
    Existing(Message),
}

impl Appended {
    /// The message, whichever way it came.
    pub fn message(&self) -> &Message {
        match self {
            Appended::Created { message: m, .. } | Appended::Existing(m) => m,
        }
    }
    /// Whether this call created it.
    pub fn created(&self) -> bool {
        matches!(self, Appended::Created { .. })
    }
    /// The membership version seen by the append that created the message.
    pub fn members_version(&self) -> Option<i64> {
        match self {
            Appended::Created {
                members_version, ..
            } => *members_version,
            Appended::Existing(_) => None,
        }
    }
}

/// Which slice of a conversation's history to read. Pages are always returned in
/// ascending `seq` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqWindow {
    /// The newest messages.
    Latest,
    /// Messages with `seq < before`, newest first when cut by the limit.
    Before(i64),
    /// Messages with `seq > after`, oldest first when cut by the limit.
    After(i64),
}

/// A conversation as shown in a user's list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    /// The conversation.
    #[serde(flatten)]
    pub conversation: Conversation,
    /// The newest message, if any.
    pub last_message: Option<Message>,
    /// Messages after the user's read marker.
    pub unread_count: i64,
    /// Number of members.
    pub member_count: i64,
}

/// Cursor into a user's conversation list, ordered by last activity then id, descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityCursor {
    /// Last activity of the last item of the previous page.
    pub last_activity_at: DateTime<Utc>,
    /// Its id, to break ties.
    pub id: ConversationId,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    /// The matching message.
    pub message: Message,
    /// Backend-specific relevance; higher is better. Only comparable within one result list.
    pub rank: f64,
}
