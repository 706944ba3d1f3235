//! The messaging service: every rule about who may do what lives here, on top of the
//! storage port. Adapters store; this module decides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::events::{Envelope, Event, Publisher};
use crate::ids::{ConversationId, MessageId, TenantId, UserId};
use crate::model::{
    ActivityCursor, Appended, Conversation, ConversationKind, ConversationSummary, Member,
    MemberRole, Message, NewConversation, NewMessage, NewUser, Role, SearchHit, SeqWindow, User,
};
use crate::notify::{NewNotification, Notifier, kind};
use crate::ports::{Store, TenantTx};

/// Who is acting: established by authentication, never by request content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// The actor's tenant; every operation is confined to it.
    pub tenant_id: TenantId,
    /// The acting user.
    pub user_id: UserId,
    /// Their tenant role.
    pub role: Role,
}

/// Bounds on everything a client can send. Each limit, when exceeded, gives an
/// [`Error::Invalid`] with the code named in its comment.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest message, in characters (`content_too_long`).
    pub max_message_chars: usize,
    /// Largest page of history, conversations or users (`invalid_limit`).
    pub max_page_size: u32,
    /// Page size when the client does not say.
    pub default_page_size: u32,
    /// Largest group (`group_too_large`).
    pub max_group_members: usize,
    /// Longest group or display name, in characters (`name_too_long`).
    pub max_name_chars: usize,
    /// Longest idempotency key, in bytes (`invalid_idempotency_key`).
    pub max_idempotency_key_len: usize,
    /// Longest search query, in characters (`invalid_query`).
    pub max_query_chars: usize,
    /// Most words a search query may hold (`invalid_query`).
    pub max_query_terms: usize,
    /// Deepest search result reachable by paging (`invalid_cursor`).
    pub max_search_offset: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_chars: 4000,
            max_page_size: 100,
            default_page_size: 50,
            max_group_members: 500,
            max_name_chars: 100,
            max_idempotency_key_len: 128,
            max_query_chars: 200,
            max_query_terms: 8,
            max_search_offset: 1000,
        }
    }
}

impl Limits {
    /// Applies the default and checks the bound of a page size.
    pub fn page_size(&self, requested: Option<u32>) -> Result<u32> {
        page_size(requested, self.default_page_size, self.max_page_size)
    }
}

/// `requested`, or `default` when absent; `invalid_limit` outside 1..=`max`. Every
/// paged list of every service applies this one rule.
pub fn page_size(requested: Option<u32>, default: u32, max: u32) -> Result<u32> {
    match requested {
        None => Ok(default.min(max)),
        Some(n) if n >= 1 && n <= max => Ok(n),
        Some(n) => Err(Error::invalid(
            "invalid_limit",
            format!("limit must be between 1 and {max}, got {n}"),
        )),
    }
}

/// Conversation, message, user and search operations for authenticated actors.
///
/// With a [`Publisher`], every committed change that live clients must see is
/// published after its commit (never before): messages, read markers, membership and
/// name changes, deactivations.
#[derive(Clone)]
pub struct Messaging {
    store: Arc<dyn Store>,
    limits: Limits,
    publisher: Option<Arc<dyn Publisher>>,
    notifier: Option<Notifier>,
    audiences: Arc<Audiences>,
}

/// Conversations' members as last read for publishing, each under the membership
/// version it was read at. An append returns the conversation's version; while it is
/// the cached one, the message is published without reading the members again.
#[derive(Default)]
struct Audiences(Mutex<HashMap<(TenantId, ConversationId), CachedMembers>>);

/// A conversation's members at a membership version.
type CachedMembers = (i64, Arc<[UserId]>);

/// Most conversations whose members [`Audiences`] keeps; past it, it starts again empty
/// (about 1 KB per conversation of 10 members over 100,000 conversations at most).
const MAX_CACHED_AUDIENCES: usize = 100_000;

impl Audiences {
    fn get(&self, tenant: TenantId, conv: ConversationId, version: i64) -> Option<Arc<[UserId]>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(tenant, conv))
            .filter(|(v, _)| *v == version)
            .map(|(_, users)| users.clone())
    }

    /// Keeps `users` as the members at `version`, unless a later version is kept.
    fn put(&self, tenant: TenantId, conv: ConversationId, version: i64, users: Arc<[UserId]>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CACHED_AUDIENCES && !map.contains_key(&(tenant, conv)) {
            map.clear();
        }
        match map.get(&(tenant, conv)) {
            Some((v, _)) if *v > version => {}
            _ => {
                map.insert((tenant, conv), (version, users));
            }
        }
    }
}

/// Most users one message may mention (`too_many_mentions`).
pub const MAX_MENTIONS: usize = 50;

impl Messaging {
    /// Builds the service over a store, publishing nothing.
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Self {
        Self {
            store,
            limits,
            publisher: None,
            notifier: None,
            audiences: Arc::default(),
        }
    }

    /// The same service, notifying mentioned members (`MENTION`) through `notifier`.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// The same service, publishing committed changes through `publisher`.
    pub fn with_publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// The publisher, if any.
    pub fn publisher(&self) -> Option<&Arc<dyn Publisher>> {
        self.publisher.as_ref()
    }

    fn publishing(&self) -> bool {
        self.publisher.is_some()
    }

    async fn publish(&self, envelope: Envelope) {
        if let Some(p) = &self.publisher {
            p.publish(envelope).await;
        }
    }

    /// Publishes a `conversation_updated` to the members after the change and to the
    /// `removed` ones.
    async fn publish_conversation(
        &self,
        tenant: TenantId,
        conv: &Conversation,
        members: Vec<Member>,
        removed: Vec<UserId>,
    ) {
        let mut audience: Vec<UserId> = members.iter().map(|m| m.user_id).collect();
        audience.extend(removed.iter().copied());
        self.publish(Envelope::to_users(
            tenant,
            audience,
            Event::ConversationUpdated {
                conversation_id: conv.id,
                kind: conv.kind,
                name: conv.name.clone(),
                members,
                removed,
            },
        ))
        .await;
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ---- users -------------------------------------------------------------------

    /// Creates a user in the actor's tenant; tenant admins only.
    pub async fn create_user(&self, actor: &Actor, new: NewUser) -> Result<User> {
        require_admin(actor)?;
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let user = create_user_in(tx.as_mut(), new, &self.limits).await?;
        tx.commit().await?;
        Ok(user)
    }

    /// The tenant's directory, ordered by name.
    pub async fn list_users(
        &self,
        actor: &Actor,
        after: Option<(String, UserId)>,
        limit: Option<u32>,
    ) -> Result<Vec<User>> {
        let limit = self.limits.page_size(limit)?;
        let mut tx = self.store.read(actor.tenant_id).await?;
        tx.list_users(after, limit).await
    }

    /// One user of the actor's tenant.
    pub async fn user(&self, actor: &Actor, id: UserId) -> Result<User> {
        let mut tx = self.store.read(actor.tenant_id).await?;
        tx.user(id).await?.ok_or(Error::NotFound("user"))
    }

    /// Activates or deactivates a user; tenant admins only, and not themselves.
    pub async fn set_user_active(&self, actor: &Actor, id: UserId, active: bool) -> Result<User> {
        require_admin(actor)?;
        if id == actor.user_id && !active {
            return Err(Error::conflict(
                "cannot_deactivate_self",
                "an administrator cannot deactivate their own account",
            ));
        }
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let user = tx
            .set_user_active(id, active)
            .await?
            .ok_or(Error::NotFound("user"))?;
        tx.commit().await?;
        if !active {
            self.publish(Envelope::to_users(
                actor.tenant_id,
                vec![id],
                Event::AccountDeactivated { user_id: id },
            ))
            .await;
        }
        Ok(user)
    }

    /// Replaces a user's password hash (hashed, and checked against the policy, by the
    /// caller): the user's own (the caller checked their current password), or any
    /// user's of the tenant by a tenant admin. The user's live connections are closed
    /// ([`Event::PasswordChanged`]). Returns the user as stored, their new
    /// `password_changed_at` included.
    pub async fn set_password(&self, actor: &Actor, id: UserId, hash: String) -> Result<User> {
        if id != actor.user_id {
            require_admin(actor)?;
        }
        let mut tx = self.store.begin(actor.tenant_id).await?;
        if !tx.set_password_hash(id, &hash).await? {
            return Err(Error::NotFound("user"));
        }
        let user = tx.user(id).await?.ok_or(Error::NotFound("user"))?;
        tx.commit().await?;
        self.publish(Envelope::to_users(
            actor.tenant_id,
            vec![id],
            Event::PasswordChanged {
                user_id: id,
                password: user.password_mark(),
            },
        ))
        .await;
        Ok(user)
    }

    // ---- conversations -----------------------------------------------------------

    /// Opens the direct conversation between the actor and `other`, creating it if
    /// needed. Returns it and whether it was created.
    pub async fn open_direct(&self, actor: &Actor, other: UserId) -> Result<(Conversation, bool)> {
        if other == actor.user_id {
            return Err(Error::invalid(
                "invalid_members",
                "a direct conversation needs another user",
            ));
        }
        for attempt in 0..2 {
            let mut tx = self.store.begin(actor.tenant_id).await?;
            if let Some(c) = tx.direct_between(actor.user_id, other).await? {
                return Ok((c, false));
            }
            if tx.active_users_among(&[other]).await?.is_empty() {
                return Err(Error::NotFound("user"));
            }
            let new = NewConversation {
                kind: ConversationKind::Direct,
                name: None,
                created_by: actor.user_id,
                members: vec![
                    (actor.user_id, MemberRole::Member),
                    (other, MemberRole::Member),
                ],
            };
            match tx.insert_conversation(&new).await {
                Ok(c) => {
                    let members = if self.publishing() {
                        tx.members(c.id).await?
                    } else {
                        Vec::new()
                    };
                    tx.commit().await?;
                    if self.publishing() {
                        self.publish_conversation(actor.tenant_id, &c, members, Vec::new())
                            .await;
                    }
                    return Ok((c, true));
                }
                // Someone opened the same pair concurrently: read theirs.
                Err(Error::Conflict {
                    code: "direct_exists",
                    ..
                }) if attempt == 0 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::conflict(
            "direct_exists",
            "the direct conversation was created concurrently; retry",
        ))
    }

    /// Creates a group owned by the actor with the given other members.
    pub async fn create_group(
        &self,
        actor: &Actor,
        name: &str,
        members: &[UserId],
    ) -> Result<Conversation> {
        let name = self.check_name(name)?;
        let mut others: Vec<UserId> = members
            .iter()
            .copied()
            .filter(|u| *u != actor.user_id)
            .collect();
        others.sort();
        others.dedup();
        if others.len() + 1 > self.limits.max_group_members {
            return Err(Error::invalid(
                "group_too_large",
                format!(
                    "a group holds at most {} members",
                    self.limits.max_group_members
                ),
            ));
        }
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let found = tx.active_users_among(&others).await?;
        if found.len() != others.len() {
            return Err(Error::NotFound("user"));
        }
        let mut roles = vec![(actor.user_id, MemberRole::Owner)];
        roles.extend(others.into_iter().map(|u| (u, MemberRole::Member)));
        let conv = tx
            .insert_conversation(&NewConversation {
                kind: ConversationKind::Group,
                name: Some(name),
                created_by: actor.user_id,
                members: roles,
            })
            .await?;
        let members = if self.publishing() {
            tx.members(conv.id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        if self.publishing() {
            self.publish_conversation(actor.tenant_id, &conv, members, Vec::new())
                .await;
        }
        Ok(conv)
    }

    /// The actor's conversations, newest activity first.
    pub async fn list_conversations(
        &self,
        actor: &Actor,
        before: Option<ActivityCursor>,
        limit: Option<u32>,
    ) -> Result<Vec<ConversationSummary>> {
        let limit = self.limits.page_size(limit)?;
        let mut tx = self.store.read(actor.tenant_id).await?;
        tx.list_conversations(actor.user_id, before, limit).await
    }

    /// A conversation and its members, for a member of it.
    pub async fn conversation(
        &self,
        actor: &Actor,
        id: ConversationId,
    ) -> Result<(Conversation, Vec<Member>)> {
        let mut tx = self.store.read(actor.tenant_id).await?;
        let (conv, _) = membership(tx.as_mut(), id, actor.user_id).await?;
        let members = tx.members(id).await?;
        Ok((conv, members))
    }

    /// Renames a group; its owners and admins only.
    pub async fn rename(&self, actor: &Actor, id: ConversationId, name: &str) -> Result<()> {
        let name = self.check_name(name)?;
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let (conv, me) = membership(tx.as_mut(), id, actor.user_id).await?;
        require_group(&conv)?;
        require_member_role(&me, MemberRole::Admin, "rename this group")?;
        tx.rename_conversation(id, &name).await?;
        let members = if self.publishing() {
            tx.members(id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        if self.publishing() {
            let conv = Conversation {
                name: Some(name),
                ..conv
            };
            self.publish_conversation(actor.tenant_id, &conv, members, Vec::new())
                .await;
        }
        Ok(())
    }

    /// Adds users to a group as plain members; its owners and admins only. Users
    /// already in it are left as they are.
    pub async fn add_members(
        &self,
        actor: &Actor,
        id: ConversationId,
        users: &[UserId],
    ) -> Result<Vec<Member>> {
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let (conv, me) = membership(tx.as_mut(), id, actor.user_id).await?;
        require_group(&conv)?;
        require_member_role(&me, MemberRole::Admin, "add members")?;
        let mut wanted: Vec<UserId> = users.to_vec();
        wanted.sort();
        wanted.dedup();
        if wanted.is_empty() {
            return Err(Error::invalid(
                "invalid_members",
                "name at least one user to add",
            ));
        }
        if tx.active_users_among(&wanted).await?.len() != wanted.len() {
            return Err(Error::NotFound("user"));
        }
        let current = tx.members(id).await?;
        let new: Vec<UserId> = wanted
            .into_iter()
            .filter(|u| !current.iter().any(|m| m.user_id == *u))
            .collect();
        if current.len() + new.len() > self.limits.max_group_members {
            return Err(Error::invalid(
                "group_too_large",
                format!(
                    "a group holds at most {} members",
                    self.limits.max_group_members
                ),
            ));
        }
        let added = !new.is_empty();
        for u in new {
            tx.upsert_member(id, u, MemberRole::Member).await?;
        }
        let members = tx.members(id).await?;
        tx.commit().await?;
        if added {
            self.publish_conversation(actor.tenant_id, &conv, members.clone(), Vec::new())
                .await;
        }
        Ok(members)
    }

    /// Removes `user` from a group. A member may always remove themselves (leave);
    /// admins may remove members, owners anyone. When the last owner leaves, the
    /// longest-standing admin (or else member) becomes owner, so a group never lacks one.
    pub async fn remove_member(
        &self,
        actor: &Actor,
        id: ConversationId,
        user: UserId,
    ) -> Result<()> {
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let (conv, me) = membership(tx.as_mut(), id, actor.user_id).await?;
        require_group(&conv)?;
        let members = tx.members(id).await?;
        let target = members
            .iter()
            .find(|m| m.user_id == user)
            .ok_or(Error::NotFound("member"))?
            .clone();
        if user != actor.user_id {
            let needed = if target.role == MemberRole::Member {
                MemberRole::Admin
            } else {
                MemberRole::Owner
            };
            require_member_role(&me, needed, "remove this member")?;
        }
        tx.remove_member(id, user).await?;
        let owners_left = members
            .iter()
            .filter(|m| m.user_id != user && m.role == MemberRole::Owner)
            .count();
        if target.role == MemberRole::Owner && owners_left == 0 {
            // Members are ordered by join time; prefer admins.
            let heir = members
                .iter()
                .filter(|m| m.user_id != user)
                .max_by_key(|m| (m.role, std::cmp::Reverse(m.joined_at)));
            if let Some(heir) = heir {
                tx.upsert_member(id, heir.user_id, MemberRole::Owner)
                    .await?;
            }
        }
        let after = if self.publishing() {
            tx.members(id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        if self.publishing() {
            self.publish_conversation(actor.tenant_id, &conv, after, vec![user])
                .await;
        }
        Ok(())
    }

    /// Changes a member's role; owners only. The last owner cannot step down.
    pub async fn set_member_role(
        &self,
        actor: &Actor,
        id: ConversationId,
        user: UserId,
        role: MemberRole,
    ) -> Result<()> {
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let (conv, me) = membership(tx.as_mut(), id, actor.user_id).await?;
        require_group(&conv)?;
        require_member_role(&me, MemberRole::Owner, "change roles")?;
        let members = tx.members(id).await?;
        let target = members
            .iter()
            .find(|m| m.user_id == user)
            .ok_or(Error::NotFound("member"))?;
        let owners = members
            .iter()
            .filter(|m| m.role == MemberRole::Owner)
            .count();
        if target.role == MemberRole::Owner && role != MemberRole::Owner && owners == 1 {
            return Err(Error::conflict(
                "last_owner",
                "a group must keep an owner: make someone else owner first",
            ));
        }
        tx.upsert_member(id, user, role).await?;
        let after = if self.publishing() {
            tx.members(id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        if self.publishing() {
            self.publish_conversation(actor.tenant_id, &conv, after, Vec::new())
                .await;
        }
        Ok(())
    }

    // ---- messages ----------------------------------------------------------------

    /// Sends a message as the actor. Returns once it is committed. With an
    /// idempotency key already used in this conversation, returns the stored message.
    pub async fn send(
        &self,
        actor: &Actor,
        conv: ConversationId,
        content: &str,
        idempotency_key: Option<String>,
    ) -> Result<Appended> {
        let new = self.new_message(actor, conv, content, idempotency_key)?;
        for attempt in 0..2 {
            match self.store.append(actor.tenant_id, &new).await {
                Ok(appended) => {
                    if appended.created() && self.publishing() {
                        self.publish_message(
                            actor.tenant_id,
                            appended.message(),
                            appended.members_version(),
                        )
                        .await;
                    }
                    return Ok(appended);
                }
                // A concurrent send with the same key won the race; the retry reads it.
                Err(Error::Conflict {
                    code: "duplicate_idempotency_key",
                    ..
                }) if attempt == 0 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::conflict(
            "duplicate_idempotency_key",
            "a message with this idempotency key is being sent concurrently; retry",
        ))
    }

    /// Sends a message mentioning some members: each mentioned member other than the
    /// sender gets a `MENTION` notification, stored in the same transaction as the
    /// message (so neither exists without the other). Users who are not members are
    /// ignored: they cannot read the message. Without mentions, or without a notifier,
    /// this is [`Messaging::send`].
    pub async fn send_with_mentions(
        &self,
        actor: &Actor,
        conv: ConversationId,
        content: &str,
        idempotency_key: Option<String>,
        mentions: &[UserId],
    ) -> Result<Appended> {
        if mentions.len() > MAX_MENTIONS {
            return Err(Error::invalid(
                "too_many_mentions",
                format!("a message mentions at most {MAX_MENTIONS} users"),
            ));
        }
        let Some(notifier) = self.notifier.as_ref().filter(|_| !mentions.is_empty()) else {
            return self.send(actor, conv, content, idempotency_key).await;
        };
        let new = self.new_message(actor, conv, content, idempotency_key)?;
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let appended = match tx.append_message(&new).await {
            Ok(a) => a,
            // A concurrent send with the same key won the race: answer what it stored.
            Err(Error::Conflict {
                code: "duplicate_idempotency_key",
                ..
            }) => {
                drop(tx);
                let mut tx = self.store.begin(actor.tenant_id).await?;
                return tx.append_message(&new).await;
            }
            Err(e) => return Err(e),
        };
        if !appended.created() {
            return Ok(appended);
        }
        let message = appended.message().clone();
        let members = tx.members(conv).await?;
        let mentioned: Vec<UserId> = members
            .iter()
            .map(|m| m.user_id)
            .filter(|u| *u != actor.user_id && mentions.contains(u))
            .collect();
        let sender = members
            .iter()
            .find(|m| m.user_id == actor.user_id)
            .map(|m| m.display_name.clone())
            .unwrap_or_default();
        let outbox = if mentioned.is_empty() {
            None
        } else {
            let excerpt: String = message.content.chars().take(200).collect();
            let n = NewNotification::new(
                kind::MENTION,
                format!("{sender} vous a mentionné(e)"),
                excerpt,
            )
            .link(format!("/conversations/{conv}?seq={}", message.seq))
            .data(serde_json::json!({
                "conversation_id": conv,
                "message_id": message.id,
                "seq": message.seq,
                "sender_id": actor.user_id,
            }))
            .key(format!("mention:{}", message.id));
            Some(notifier.notify_in(tx.as_mut(), &mentioned, &n).await?)
        };
        tx.commit().await?;
        if self.publishing() {
            let audience = members.iter().map(|m| m.user_id).collect();
            self.publish_new_message(actor.tenant_id, audience, message)
                .await;
        }
        if let Some(outbox) = outbox {
            notifier.deliver(outbox).await;
        }
        Ok(appended)
    }

    /// The message `actor` asks to send, checked against the limits.
    fn new_message(
        &self,
        actor: &Actor,
        conv: ConversationId,
        content: &str,
        idempotency_key: Option<String>,
    ) -> Result<NewMessage> {
        let content = self.check_content(content)?;
        self.check_idempotency_key(idempotency_key.as_deref())?;
        Ok(NewMessage {
            id: MessageId::new(),
            conversation_id: conv,
            sender_id: actor.user_id,
            content,
            idempotency_key,
            created_at: crate::model::now(),
        })
    }

    /// Publishes a committed message to `audience`.
    async fn publish_new_message(&self, tenant: TenantId, audience: Vec<UserId>, message: Message) {
        self.publish(Envelope::to_users(
            tenant,
            audience,
            Event::NewMessage {
                conversation_id: message.conversation_id,
                message,
            },
        ))
        .await;
    }

    fn check_idempotency_key(&self, key: Option<&str>) -> Result<()> {
        if let Some(k) = key
            && (k.is_empty() || k.len() > self.limits.max_idempotency_key_len)
        {
            return Err(Error::invalid(
                "invalid_idempotency_key",
                format!(
                    "idempotency key must be 1 to {} bytes",
                    self.limits.max_idempotency_key_len
                ),
            ));
        }
        Ok(())
    }

    /// Publishes a committed message to the conversation's members as they are now.
    /// The append is group-committed by the store, so the members are read after it,
    /// from the read pool: a member removed meanwhile does not get it, one added
    /// meanwhile does (and starts with nothing unread). With the membership version the
    /// append saw, members cached at that version are used instead of a read: they were
    /// read after a commit at that version, and no membership change came since.
    async fn publish_message(&self, tenant: TenantId, message: &Message, version: Option<i64>) {
        let conv = message.conversation_id;
        if let Some(users) = version.and_then(|v| self.audiences.get(tenant, conv, v)) {
            self.publish_new_message(tenant, users.to_vec(), message.clone())
                .await;
            return;
        }
        let members = match self.store.read(tenant).await {
            Ok(mut tx) => tx.members(conv).await,
            Err(e) => Err(e),
        };
        match members {
            Ok(members) => {
                let audience: Vec<UserId> = members.into_iter().map(|m| m.user_id).collect();
                if let Some(v) = version {
                    // Read after the commit, so at `version` or later: a later version
                    // makes the next append miss and read again.
                    self.audiences
                        .put(tenant, conv, v, audience.as_slice().into());
                }
                self.publish_new_message(tenant, audience, message.clone())
                    .await;
            }
            // Committed all the same: live clients fill the gap from history when the
            // next message reaches them, or when they resume.
            Err(e) => {
                tracing::warn!(error = %e, conversation = %conv,
                    "message committed but not published: cannot read its members");
            }
        }
    }

    /// A page of a conversation's history, ascending by `seq`.
    pub async fn history(
        &self,
        actor: &Actor,
        conv: ConversationId,
        window: SeqWindow,
        limit: Option<u32>,
    ) -> Result<Vec<Message>> {
        let limit = self.limits.page_size(limit)?;
        match window {
            SeqWindow::Before(s) | SeqWindow::After(s) if s < 0 => {
                return Err(Error::invalid(
                    "invalid_cursor",
                    "cursors are sequence numbers ≥ 0",
                ));
            }
            _ => {}
        }
        let mut tx = self.store.read(actor.tenant_id).await?;
        membership(tx.as_mut(), conv, actor.user_id).await?;
        tx.messages(conv, window, limit).await
    }

    /// The users who see `user`'s presence: everyone who shares a conversation with
    /// them.
    pub async fn contacts(&self, tenant: TenantId, user: UserId) -> Result<Vec<UserId>> {
        let mut tx = self.store.read(tenant).await?;
        tx.contacts(user).await
    }

    /// Marks the conversation read up to `seq` (or its newest message). Returns the
    /// read marker after the call.
    pub async fn mark_read(
        &self,
        actor: &Actor,
        conv: ConversationId,
        seq: Option<i64>,
    ) -> Result<i64> {
        if let Some(s) = seq
            && s < 0
        {
            return Err(Error::invalid("invalid_seq", "seq must be ≥ 0"));
        }
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let (c, me) = membership(tx.as_mut(), conv, actor.user_id).await?;
        let marker = tx
            .mark_read(conv, actor.user_id, seq.unwrap_or(c.last_seq))
            .await?;
        let others: Vec<UserId> = if self.publishing() && marker != me.last_read_seq {
            tx.members(conv)
                .await?
                .into_iter()
                .map(|m| m.user_id)
                .filter(|u| *u != actor.user_id)
                .collect()
        } else {
            Vec::new()
        };
        tx.commit().await?;
        if self.publishing() && marker != me.last_read_seq {
            let event = |unread| Event::MessageRead {
                conversation_id: conv,
                user_id: actor.user_id,
                seq: marker,
                unread,
            };
            if !others.is_empty() {
                self.publish(Envelope::to_users(actor.tenant_id, others, event(None)))
                    .await;
            }
            let unread = (c.last_seq - marker).max(0);
            self.publish(Envelope::to_users(
                actor.tenant_id,
                vec![actor.user_id],
                event(Some(unread)),
            ))
            .await;
        }
        Ok(marker)
    }

    /// Searches the messages the actor can see, best first.
    pub async fn search(
        &self,
        actor: &Actor,
        query: &str,
        conv: Option<ConversationId>,
        offset: u32,
        limit: Option<u32>,
    ) -> Result<Vec<SearchHit>> {
        let limit = self.limits.page_size(limit)?;
        if offset > self.limits.max_search_offset {
            return Err(Error::invalid(
                "invalid_cursor",
                format!(
                    "search pages stop at {} results",
                    self.limits.max_search_offset
                ),
            ));
        }
        let terms = search_terms(query, &self.limits)?;
        let mut tx = self.store.read(actor.tenant_id).await?;
        if let Some(c) = conv {
            membership(tx.as_mut(), c, actor.user_id).await?;
        }
        tx.search(actor.user_id, conv, &terms, offset, limit).await
    }

    fn check_name(&self, name: &str) -> Result<String> {
        let name = name.trim();
        if name.is_empty() {
            return Err(Error::invalid("invalid_name", "name must not be empty"));
        }
        if name.chars().count() > self.limits.max_name_chars {
            return Err(Error::invalid(
                "name_too_long",
                format!(
                    "name is limited to {} characters",
                    self.limits.max_name_chars
                ),
            ));
        }
        Ok(name.to_owned())
    }

    fn check_content(&self, content: &str) -> Result<String> {
        if content.trim().is_empty() {
            return Err(Error::invalid(
                "empty_content",
                "message content must not be empty",
            ));
        }
        if content.chars().count() > self.limits.max_message_chars {
            return Err(Error::invalid(
                "content_too_long",
                format!(
                    "message content is limited to {} characters",
                    self.limits.max_message_chars
                ),
            ));
        }
        Ok(content.to_owned())
    }
}

/// Validates and stores a user inside an open unit of work. Shared by the admin route
/// and by tooling that has no actor (CLI, demo seeding).
pub async fn create_user_in(
    tx: &mut dyn TenantTx,
    mut new: NewUser,
    limits: &Limits,
) -> Result<User> {
    new.email = new.email.trim().to_lowercase();
    let valid_email = new.email.len() <= 254
        && new
            .email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
        && !new.email.chars().any(char::is_whitespace);
    if !valid_email {
        return Err(Error::invalid(
            "invalid_email",
            "a valid e-mail address is required",
        ));
    }
    new.display_name = new.display_name.trim().to_owned();
    if new.display_name.is_empty() || new.display_name.chars().count() > limits.max_name_chars {
        return Err(Error::invalid(
            "invalid_name",
            format!(
                "display name must be 1 to {} characters",
                limits.max_name_chars
            ),
        ));
    }
    tx.insert_user(&new).await
}

/// Splits a search query into lowercase words, rejecting empty or oversize queries.
/// Words are runs of letters and digits, so no query syntax reaches a backend.
pub fn search_terms(query: &str, limits: &Limits) -> Result<Vec<String>> {
    if query.chars().count() > limits.max_query_chars {
        return Err(Error::invalid(
            "invalid_query",
            format!(
                "search query is limited to {} characters",
                limits.max_query_chars
            ),
        ));
    }
    let terms: Vec<String> = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if terms.is_empty() {
        return Err(Error::invalid(
            "invalid_query",
            "search query needs at least one word",
        ));
    }
    if terms.len() > limits.max_query_terms {
        return Err(Error::invalid(
            "invalid_query",
            format!(
                "search query is limited to {} words",
                limits.max_query_terms
            ),
        ));
    }
    Ok(terms)
}

/// `Forbidden` unless the actor administers their tenant.
pub(crate) fn require_admin(actor: &Actor) -> Result<()> {
    if actor.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::forbidden("tenant administrators only"))
    }
}

fn require_group(conv: &Conversation) -> Result<()> {
    if conv.kind == ConversationKind::Group {
        Ok(())
    } else {
        Err(Error::conflict(
            "direct_conversation",
            "members of a direct conversation cannot change",
        ))
    }
}

fn require_member_role(me: &Member, needed: MemberRole, what: &str) -> Result<()> {
    if me.role >= needed {
        Ok(())
    } else {
        Err(Error::forbidden(format!(
            "only a group {} or above may {what}",
            needed.as_str()
        )))
    }
}

/// The conversation and the caller's membership. A non-member gets `NotFound`, exactly
/// as for a conversation that does not exist.
async fn membership(
    tx: &mut dyn TenantTx,
    id: ConversationId,
    user: UserId,
) -> Result<(Conversation, Member)> {
    let conv = tx
        .conversation(id)
        .await?
        .ok_or(Error::NotFound("conversation"))?;
    let me = tx
        .member(id, user)
        .await?
        .ok_or(Error::NotFound("conversation"))?;
    Ok((conv, me))
}
