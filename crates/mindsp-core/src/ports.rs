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
use crate::ids::{ConversationId, TenantId, UserId};
use crate::model::{
    ActivityCursor, Appended, Conversation, ConversationSummary, Member, MemberRole, Message,
    NewConversation, NewMessage, NewUser, SearchHit, SeqWindow, Tenant, User,
};

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

    /// Of `ids`, those that exist and are active in this tenant.
    async fn active_users_among(&mut self, ids: &[UserId]) -> Result<Vec<UserId>>;

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
}
