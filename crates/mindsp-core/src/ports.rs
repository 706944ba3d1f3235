//! Storage ports. The adapters in `mindsp-store` implement them; an embedder may write
//! their own. The conformance suite in `mindsp-store/tests` states the behaviour any
//! implementation must have.
//!
//! Tenancy lives in the shape of the API: the only way to reach users, conversations
//! or messages is through a [`TenantTx`], which is opened for exactly one tenant and
//! cannot see any other.

use std::any::Any;

use async_trait::async_trait;

use crate::error::Result;
use chrono::{DateTime, Utc};

use crate::ids::{ConversationId, NotificationId, SessionId, TenantId, UserId};
use crate::model::{
    ActivityCursor, Appended, Conversation, ConversationSummary, Member, MemberRole, Message,
    NewConversation, NewMessage, NewUser, SearchHit, SeqWindow, Tenant, User,
};
use crate::notify::{Notification, NotificationPrefs};
use crate::training::{Attendance, Invitee, SessionFilter, TrainingSession};

/// How many of the most recent matches a search ranks. A word found in 250,000
/// messages would otherwise have every one of them scored for each query; in a chat,
/// the best of the latest few thousand is what a reader is after.
pub const SEARCH_RANK_WINDOW: u32 = 5_000;

/// Entry point of a storage backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend itself, for adapters of the same backend (a job queue in the same
    /// database) to reach its connections.
    fn as_any(&self) -> &dyn Any;

    /// Creates a tenant. `Conflict { code: "slug_taken" }` when the slug exists.
    async fn create_tenant(&self, slug: &str, name: &str) -> Result<Tenant>;

    /// Looks a tenant up by slug; the one lookup that happens before a scope exists
    /// (login names its tenant).
    async fn tenant_by_slug(&self, slug: &str) -> Result<Option<Tenant>>;

    /// Every tenant's id, for work that sweeps all tenants (the unread digest).
    async fn tenant_ids(&self) -> Result<Vec<TenantId>>;

    /// Opens a read-write unit of work confined to `tenant`. Nothing it wrote is visible
    /// to others until [`TenantTx::commit`]; dropping it rolls back.
    async fn begin(&self, tenant: TenantId) -> Result<Box<dyn TenantTx>>;

    /// Opens a read-only unit of work confined to `tenant`. Backends may serve it from
    /// a separate pool so reads never queue behind writes; writing through it fails.
    async fn read(&self, tenant: TenantId) -> Result<Box<dyn TenantTx>>;

    /// Appends one message in a unit of work of its own and commits it, with the
    /// contract of [`TenantTx::append_message`]. It returns only once the message is
    /// durable. Backends may commit the appends of concurrent callers together (group
    /// commit); the default opens, appends and commits alone.
    async fn append(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        let mut tx = self.begin(tenant).await?;
        let appended = tx.append_message(msg).await?;
        if appended.created() {
            tx.commit().await?;
        }
        Ok(appended)
    }
}

/// A unit of work inside one tenant. Every method only ever sees rows of
/// [`TenantTx::tenant`].
///
/// Later capabilities (notifications, jobs) commit their rows in the same transaction
/// as the change that caused them: an adapter for them reaches the backend's own
/// transaction through [`TenantTx::as_any_mut`].
#[async_trait]
pub trait TenantTx: Send {
    /// The tenant this unit of work is confined to.
    fn tenant(&self) -> TenantId;

    /// Makes every write of this unit durable and visible.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// The backend's own transaction, for adapters of the same backend.
    fn as_any_mut(&mut self) -> &mut dyn Any;

    // ---- users -------------------------------------------------------------------

    /// Stores a user. `Conflict { code: "email_taken" }` if the e-mail exists in the tenant.
    async fn insert_user(&mut self, user: &NewUser) -> Result<User>;

    /// A user by id.
    async fn user(&mut self, id: UserId) -> Result<Option<User>>;

    /// A user and their password hash, by (lowercase) e-mail.
    async fn user_credentials(&mut self, email: &str) -> Result<Option<(User, String)>>;

    /// Users ordered by display name, then id, after `after_name`/`after_id` if given.
    async fn list_users(
        &mut self,
        after: Option<(String, UserId)>,
        limit: u32,
    ) -> Result<Vec<User>>;

    /// Sets the active flag; `None` when the user does not exist.
    async fn set_user_active(&mut self, id: UserId, active: bool) -> Result<Option<User>>;

    /// Replaces a user's password hash and sets when it changed: now, or a millisecond
    /// after the change before if that is later (another node's clock ahead), so that
    /// each change of a user's password is later than the one before. False when the
    /// user does not exist.
    async fn set_password_hash(&mut self, id: UserId, hash: &str) -> Result<bool>;

    /// Of `ids`, those that exist and are active in this tenant.
    async fn active_users_among(&mut self, ids: &[UserId]) -> Result<Vec<UserId>>;

    /// Of `ids`, those whose password changed at or after `since`.
    async fn password_changed_among(
        &mut self,
        ids: &[UserId],
        since: DateTime<Utc>,
    ) -> Result<Vec<UserId>>;

    /// Records, for each user of `seen`, that their last connection closed at that
    /// time, unless a later time is recorded already. Users of other tenants, or none,
    /// are left alone.
    async fn record_last_seen(&mut self, seen: &[(UserId, DateTime<Utc>)]) -> Result<()>;

    /// Of `ids`, those with a recorded last connection ([`TenantTx::record_last_seen`]),
    /// and when.
    async fn last_seen_among(&mut self, ids: &[UserId]) -> Result<Vec<(UserId, DateTime<Utc>)>>;

    // ---- conversations -----------------------------------------------------------

    /// Stores a conversation and its members. For a direct conversation,
    /// `Conflict { code: "direct_exists" }` when one already links the same two users.
    async fn insert_conversation(&mut self, conv: &NewConversation) -> Result<Conversation>;

    /// The direct conversation between two users, if any.
    async fn direct_between(&mut self, a: UserId, b: UserId) -> Result<Option<Conversation>>;

    /// A conversation by id.
    async fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>>;

    /// Renames a group.
    async fn rename_conversation(&mut self, id: ConversationId, name: &str) -> Result<()>;

    /// Members with their display names, ordered by join time.
    async fn members(&mut self, conv: ConversationId) -> Result<Vec<Member>>;

    /// One membership, if `user` is a member.
    async fn member(&mut self, conv: ConversationId, user: UserId) -> Result<Option<Member>>;

    /// The users who share at least one conversation with `user` (not `user`), in no
    /// particular order: the people who see `user`'s presence.
    async fn contacts(&mut self, user: UserId) -> Result<Vec<UserId>>;

    /// Adds `user` with `role`, or changes the role of an existing member. A new
    /// member's read marker starts at the conversation's current `last_seq`.
    async fn upsert_member(
        &mut self,
        conv: ConversationId,
        user: UserId,
        role: MemberRole,
    ) -> Result<()>;

    /// Removes a membership; `false` if there was none.
    async fn remove_member(&mut self, conv: ConversationId, user: UserId) -> Result<bool>;

    /// The conversations `user` is a member of, newest activity first, with the last
    /// message and the user's unread count.
    async fn list_conversations(
        &mut self,
        user: UserId,
        before: Option<ActivityCursor>,
        limit: u32,
    ) -> Result<Vec<ConversationSummary>>;

    // ---- messages ----------------------------------------------------------------

    /// Appends a message at `last_seq + 1` if the sender is a member; otherwise
    /// `NotFound("conversation")`. If the sender already used the idempotency key in
    /// this conversation, returns the stored message and writes nothing. The sender's
    /// read marker moves to the new message. Concurrent appends get distinct, gap-free
    /// sequence numbers.
    async fn append_message(&mut self, msg: &NewMessage) -> Result<Appended>;

    /// A page of history, ascending by `seq`.
    async fn messages(
        &mut self,
        conv: ConversationId,
        window: SeqWindow,
        limit: u32,
    ) -> Result<Vec<Message>>;

    /// Moves `user`'s read marker forward to `seq` (never backwards, never past the
    /// last message). Returns the marker after the call.
    async fn mark_read(&mut self, conv: ConversationId, user: UserId, seq: i64) -> Result<i64>;

    /// Full-text search over the messages of conversations `user` is a member of
    /// (optionally one of them), best match first. `terms` are plain words, already
    /// split and lowercased by the caller; every one must match. Ranking considers the
    /// [`SEARCH_RANK_WINDOW`] most recent matches, so a common word costs the same as a
    /// rare one.
    async fn search(
        &mut self,
        user: UserId,
        conv: Option<ConversationId>,
        terms: &[String],
        offset: u32,
        limit: u32,
    ) -> Result<Vec<SearchHit>>;

    // ---- notifications -----------------------------------------------------------

    /// The ids of every active user of the tenant (a notification to everyone).
    async fn active_user_ids(&mut self) -> Result<Vec<UserId>>;

    /// Stores notifications (each names its recipient, a user of the tenant). One whose
    /// recipient already holds a notification with the same `key` is skipped. Answers
    /// the ids stored. Many rows at once must stay fast: a whole tenant of 5,000 users
    /// is notified in one call.
    async fn insert_notifications(&mut self, rows: &[Notification]) -> Result<Vec<NotificationId>>;

    /// `user`'s notifications, newest first (by id), older than `before`; only unread
    /// ones if `unread_only`.
    async fn notifications(
        &mut self,
        user: UserId,
        before: Option<NotificationId>,
        unread_only: bool,
        limit: u32,
    ) -> Result<Vec<Notification>>;

    /// One of `user`'s notifications.
    async fn notification(
        &mut self,
        user: UserId,
        id: NotificationId,
    ) -> Result<Option<Notification>>;

    /// Unread notification counts of `users`, in any order; a user with none may be
    /// absent or 0. Must stay fast with 10,000 notifications per user.
    async fn notification_unread_counts(&mut self, users: &[UserId]) -> Result<Vec<(UserId, i64)>>;

    /// Marks `user`'s unread notifications among `ids` (all of them when `None`) read
    /// at `at`. Answers how many changed.
    async fn mark_notifications_read(
        &mut self,
        user: UserId,
        ids: Option<&[NotificationId]>,
        at: DateTime<Utc>,
    ) -> Result<u64>;

    /// Deletes one of `user`'s notifications; `false` if they hold none with that id.
    async fn delete_notification(&mut self, user: UserId, id: NotificationId) -> Result<bool>;

    /// Stored preferences of those of `users` who have any.
    async fn user_notification_prefs(
        &mut self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, NotificationPrefs)>>;

    /// Replaces `user`'s preferences.
    async fn set_user_notification_prefs(
        &mut self,
        user: UserId,
        prefs: &NotificationPrefs,
    ) -> Result<()>;

    /// The tenant's default preferences, if set.
    async fn tenant_notification_prefs(&mut self) -> Result<Option<NotificationPrefs>>;

    /// Replaces the tenant's default preferences.
    async fn set_tenant_notification_prefs(&mut self, prefs: &NotificationPrefs) -> Result<()>;

    // ---- unread digest -----------------------------------------------------------

    /// Users with a conversation whose oldest unread message (the one after their read
    /// marker) was created at or before `unread_since`, and, if they were ever sent a
    /// digest, with activity after it and that digest sent at or before
    /// `unread_since` (so digests are at least the delay apart). At most `limit`, any
    /// order.
    async fn digest_candidates(
        &mut self,
        unread_since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<UserId>>;

    /// For a digest of `user`: each conversation with unread messages newer than their
    /// last digest, newest activity first (at most `max_conversations`), with its
    /// unread count and its latest unread messages (at most `max_messages` each,
    /// oldest first).
    async fn unread_digest(
        &mut self,
        user: UserId,
        max_conversations: u32,
        max_messages: u32,
    ) -> Result<Vec<DigestEntry>>;

    /// Records that `user` was sent (or did not need) a digest covering activity up
    /// to `at`.
    async fn set_digest_sent(&mut self, user: UserId, at: DateTime<Utc>) -> Result<()>;

    // ---- training sessions -------------------------------------------------------

    /// Stores a session.
    async fn insert_session(&mut self, session: &TrainingSession) -> Result<()>;

    /// A session by id.
    async fn session(&mut self, id: SessionId) -> Result<Option<TrainingSession>>;

    /// A session by id, locked until the end of the unit of work against concurrent
    /// changes (`exclusive`) or against changes only (shared), so two changes of one
    /// session never overwrite each other.
    async fn lock_session(
        &mut self,
        id: SessionId,
        exclusive: bool,
    ) -> Result<Option<TrainingSession>>;

    /// Writes every field of an existing session; `false` if there is none.
    async fn update_session(&mut self, session: &TrainingSession) -> Result<bool>;

    /// Sessions matching `filter`, by start then id.
    async fn list_sessions(
        &mut self,
        filter: &SessionFilter,
        limit: u32,
    ) -> Result<Vec<TrainingSession>>;

    /// Invites users (answer pending); those already invited are left as they are.
    /// Answers those newly invited.
    async fn add_invitees(&mut self, session: SessionId, users: &[UserId]) -> Result<Vec<UserId>>;

    /// Withdraws invitations; answers those who were invited.
    async fn remove_invitees(
        &mut self,
        session: SessionId,
        users: &[UserId],
    ) -> Result<Vec<UserId>>;

    /// Invitees with their display names and answers, by name.
    async fn invitees(&mut self, session: SessionId) -> Result<Vec<Invitee>>;

    /// Records an invitee's answer; `false` if `user` is not invited.
    async fn set_response(
        &mut self,
        session: SessionId,
        user: UserId,
        response: Attendance,
        at: DateTime<Utc>,
    ) -> Result<bool>;
}

/// One conversation of an unread digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestEntry {
    /// The conversation.
    pub conversation_id: ConversationId,
    /// Its name: the group's, or the other member's display name for a direct one.
    pub title: String,
    /// Unread messages in it.
    pub unread: i64,
    /// The latest unread messages, oldest first: sender's display name, text, time.
    pub messages: Vec<(String, String, DateTime<Utc>)>,
}
