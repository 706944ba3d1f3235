//! Pieces shared by the SQL adapters: error translation, group commit of appends, and
//! small helpers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
#[cfg(feature = "sqlite")]
use chrono::{DateTime, Utc};
use mindsp_core::model::{Appended, Message, NewMessage};
use mindsp_core::notify::NotificationPrefs;
use mindsp_core::{Error, MessageId, Result, TenantId, UserId};
use tokio::sync::Notify;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Translates a sqlx error into the core's portable error. Unique violations become
/// conflicts with a stable code chosen by the constraint they hit, so callers never
/// look at backend messages.
pub(crate) fn db_err(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e
        && db.is_unique_violation()
    {
        // PostgreSQL names the constraint; SQLite names the columns in its message.
        return unique_violation(db.constraint().unwrap_or_else(|| db.message()));
    }
    Error::Storage(e.to_string())
}

/// The conflict a unique violation means, from the constraint or columns it names.
pub(crate) fn unique_violation(hint: &str) -> Error {
    let (code, message) = if hint.contains("slug") {
        ("slug_taken", "a tenant with this slug already exists")
    } else if hint.contains("email") {
        (
            "email_taken",
            "a user with this e-mail already exists in the tenant",
        )
    } else if hint.contains("direct_key") {
        (
            "direct_exists",
            "a direct conversation between these users already exists",
        )
    } else if hint.contains("idempotency_key") {
        (
            "duplicate_idempotency_key",
            "a message with this idempotency key already exists",
        )
    } else {
        ("conflict", "the change conflicts with existing data")
    };
    Error::conflict(code, message)
}

/// One append waiting for a group commit.
pub(crate) struct AppendRequest {
    pub(crate) tenant: TenantId,
    pub(crate) msg: NewMessage,
}

/// A backend's side of group commit (see [`AppendQueue`]).
#[async_trait]
pub(crate) trait GroupCommit: Send + Sync + 'static {
    /// Appends a whole batch in one transaction and commits it: one answer per request,
    /// in order. `Err` means nothing of the batch was committed, and each request is
    /// then tried alone (one bad request fails only itself); a failure that is the
    /// batch's as a whole (no turn to write) answers every request with its error
    /// instead, since trying each alone would only meet it again.
    async fn append_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Result<Appended>>>;

    /// Appends one message in a transaction of its own, as `Store::append`'s default does.
    async fn append_alone(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended>;

    /// The message stored under `id` in `tenant`, if any.
    async fn stored(&self, tenant: TenantId, id: MessageId) -> Result<Option<Message>>;
}

type Queued = (AppendRequest, oneshot::Sender<Result<Appended>>);

/// The queue in front of a group-commit writer task. The task takes every append
/// waiting (up to its batch bound), has the backend append and commit them together,
/// then answers each caller, so a caller hears back only after the commit that holds
/// its message. The task ends when the last handle to the queue is dropped.
#[derive(Clone)]
pub(crate) struct AppendQueue(mpsc::Sender<Queued>);

impl AppendQueue {
    /// Spawns the writer task. At most `max_batch` appends go in one transaction; when
    /// `capacity` appends are already waiting, callers wait for room (see the backends'
    /// constants).
    pub(crate) fn spawn(writer: impl GroupCommit, max_batch: usize, capacity: usize) -> Self {
        let (queue, waiting) = mpsc::channel(capacity.max(1));
        tokio::spawn(run_group_commit(writer, waiting, max_batch.max(1)));
        Self(queue)
    }

    /// Queues one append and waits for its answer.
    pub(crate) async fn append(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        ask_writer(&self.0, tenant, msg, |request, reply| (request, reply)).await
    }
}

/// Sends one append to a group-commit writer's queue, wrapped by `wrap` into what that
/// queue carries, and waits for the writer's answer.
pub(crate) async fn ask_writer<C>(
    queue: &mpsc::Sender<C>,
    tenant: TenantId,
    msg: &NewMessage,
    wrap: impl FnOnce(AppendRequest, oneshot::Sender<Result<Appended>>) -> C,
) -> Result<Appended> {
    let (reply, answer) = oneshot::channel();
    let request = AppendRequest {
        tenant,
        msg: msg.clone(),
    };
    queue
        .send(wrap(request, reply))
        .await
        .map_err(|_| store_closed())?;
    answer.await.map_err(|_| store_closed())?
}

/// The answer to an append whose writer is gone.
pub(crate) fn store_closed() -> Error {
    Error::Storage("the store is closed".into())
}

async fn run_group_commit(
    writer: impl GroupCommit,
    mut queue: mpsc::Receiver<Queued>,
    max_batch: usize,
) {
    let mut waiting = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut waiting, max_batch).await > 0 {
        // Callers answered by the previous batch are usually about to send again: one
        // scheduler turn lets them join this batch instead of the next.
        if waiting.len() < max_batch {
            tokio::task::yield_now().await;
            while waiting.len() < max_batch {
                match queue.try_recv() {
                    Ok(q) => waiting.push(q),
                    Err(_) => break,
                }
            }
        }
        let (batch, replies): (Vec<AppendRequest>, Vec<_>) = waiting.drain(..).unzip();
        match writer.append_batch(&batch).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                // The batch failed as a whole (nothing of it is committed): give each
                // request its own transaction, so one bad request only fails itself.
                tracing::warn!(error = %e, size = batch.len(), "append batch failed; retrying one by one");
                for (req, reply) in batch.iter().zip(replies) {
                    let _ = reply.send(append_alone(&writer, req).await);
                }
            }
        }
    }
}

/// One request on its own. A conflict may mean the message itself is already stored:
/// a batch whose commit reported an error after it had in fact committed, or a caller
/// retrying the very same message. Then the stored message is the answer, as for a
/// repeated idempotency key, instead of an error for a message that exists.
async fn append_alone(writer: &impl GroupCommit, req: &AppendRequest) -> Result<Appended> {
    match writer.append_alone(req.tenant, &req.msg).await {
        Err(e @ Error::Conflict { .. }) => {
            answer_conflict(req, e, writer.stored(req.tenant, req.msg.id).await)
        }
        other => other,
    }
}

/// The answer to a request alone that met `conflict`, given what is `stored` under its
/// message's id: that message when it is this request's (same sender and conversation),
/// else the conflict.
pub(crate) fn answer_conflict(
    req: &AppendRequest,
    conflict: Error,
    stored: Result<Option<Message>>,
) -> Result<Appended> {
    match stored {
        Ok(Some(m))
            if m.sender_id == req.msg.sender_id && m.conversation_id == req.msg.conversation_id =>
        {
            Ok(Appended::Existing(m))
        }
        _ => Err(conflict),
    }
}

/// A backend's full-text index, filled in bulk beside the appends instead of inside
/// their transactions (each backend's `SearchIndex`).
#[async_trait]
pub(crate) trait BulkIndex: Send + Sync + 'static {
    /// Indexes the messages committed before the call that the index does not hold yet.
    async fn index_pending(&self) -> Result<()>;

    /// Whether the store is closed, which ends the background step.
    fn closed(&self) -> bool;
}

/// How often the background step looks for messages it was not told about (appended by
/// a unit of work or by another process) when no append woke it.
const INDEX_IDLE_CHECK: Duration = Duration::from_secs(1);

/// Spawns the step that keeps a full-text index close behind the appends. Each commit of
/// appends wakes it through `wake`; it then lets `gather` pass, so that one pass indexes
/// the messages of many commits, and indexes what is pending. It stops once `alive` has
/// no strong handle left (the store was dropped) or the store is closed. A failed pass is
/// logged and retried at the next wake: a search indexes what it needs itself.
pub(crate) fn spawn_indexer(
    index: Arc<impl BulkIndex>,
    wake: Arc<Notify>,
    gather: Duration,
    alive: Weak<()>,
) {
    tokio::spawn(async move {
        loop {
            let woken = tokio::time::timeout(INDEX_IDLE_CHECK, wake.notified())
                .await
                .is_ok();
            if woken {
                tokio::time::sleep(gather).await;
            }
            if alive.strong_count() == 0 || index.closed() {
                break;
            }
            if let Err(e) = index.index_pending().await {
                if index.closed() {
                    break;
                }
                tracing::warn!(error = %e, "background search indexing failed; will retry");
            }
        }
    });
}

/// An idempotency key in its scope: (conversation, sender, key).
pub(crate) type IdemKey = (Uuid, Uuid, String);

/// What a group-commit writer read, inside its transaction, about a batch.
#[derive(Default)]
pub(crate) struct BatchState {
    /// Messages already stored under the batch's idempotency keys, with their tenant.
    pub(crate) stored: HashMap<IdemKey, (TenantId, Message)>,
    /// The batch's conversations that exist. [`plan_batch`] advances `last_seq` past
    /// the messages it numbers.
    pub(crate) conversations: HashMap<Uuid, BatchConversation>,
    /// Memberships (conversation, user) of the batch's senders.
    pub(crate) members: HashSet<(Uuid, Uuid)>,
}

/// A conversation as a group-commit writer read it, under its write lock.
pub(crate) struct BatchConversation {
    pub(crate) tenant: TenantId,
    pub(crate) last_seq: i64,
    pub(crate) members_version: i64,
}

/// Judges each request of a batch in order, as `append_message` would one after the
/// other: a key already stored answers `Existing`, a key repeated in the batch answers
/// `Existing` of its first message (both `NotFound` to another tenant), a sender who is
/// not a member of a conversation of their tenant gets `NotFound("conversation")`, and
/// every other request becomes a new message numbered after its conversation's
/// `last_seq`. Returns one answer per request and the new messages, in order.
pub(crate) fn plan_batch<'a>(
    batch: impl IntoIterator<Item = &'a AppendRequest>,
    state: &mut BatchState,
) -> (Vec<Result<Appended>>, Vec<Message>) {
    let mut results = Vec::new();
    let mut fresh: Vec<Message> = Vec::new();
    let mut fresh_keys: HashMap<IdemKey, (TenantId, usize)> = HashMap::new();
    for r in batch {
        let m = &r.msg;
        let key = m
            .idempotency_key
            .clone()
            .map(|k| (m.conversation_id.0, m.sender_id.0, k));
        if let Some(k) = &key {
            if let Some((tenant, existing)) = state.stored.get(k) {
                results.push(if *tenant == r.tenant {
                    Ok(Appended::Existing(existing.clone()))
                } else {
                    Err(Error::NotFound("conversation"))
                });
                continue;
            }
            if let Some(&(tenant, i)) = fresh_keys.get(k) {
                results.push(if tenant == r.tenant {
                    Ok(Appended::Existing(fresh[i].clone()))
                } else {
                    Err(Error::NotFound("conversation"))
                });
                continue;
            }
        }
        let allowed = state
            .members
            .contains(&(m.conversation_id.0, m.sender_id.0));
        let Some(conv) = state
            .conversations
            .get_mut(&m.conversation_id.0)
            .filter(|c| allowed && c.tenant == r.tenant)
        else {
            results.push(Err(Error::NotFound("conversation")));
            continue;
        };
        conv.last_seq += 1;
        let message = Message {
            id: m.id,
            conversation_id: m.conversation_id,
            sender_id: m.sender_id,
            seq: conv.last_seq,
            content: m.content.clone(),
            idempotency_key: m.idempotency_key.clone(),
            created_at: m.created_at,
        };
        if let Some(k) = key {
            fresh_keys.insert(k, (r.tenant, fresh.len()));
        }
        fresh.push(message.clone());
        results.push(Ok(Appended::Created {
            message,
            members_version: Some(conv.members_version),
        }));
    }
    (results, fresh)
}

/// Notification preferences as stored (JSON text).
pub(crate) fn prefs_to_json(prefs: &NotificationPrefs) -> Result<String> {
    serde_json::to_string(prefs).map_err(|e| Error::Storage(e.to_string()))
}

/// Notification preferences from their stored JSON.
pub(crate) fn prefs_from_json(json: &str) -> Result<NotificationPrefs> {
    serde_json::from_str(json)
        .map_err(|e| Error::Storage(format!("stored notification preferences: {e}")))
}

/// The key that makes a direct conversation unique per pair, whatever the order.
pub(crate) fn direct_key(a: UserId, b: UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("{lo}:{hi}")
}

#[cfg(feature = "sqlite")]
pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

#[cfg(feature = "sqlite")]
pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Light French suffix stripping for backends without a French stemmer: the stem is
/// then matched as a prefix, so « interventions » and « intervenir » find
/// « intervention », « pompier » finds « pompiers ». Short words are left whole.
#[cfg(feature = "sqlite")]
pub(crate) fn french_prefix_stem(term: &str) -> String {
    const SUFFIXES: &[&str] = &[
        "issements",
        "issement",
        "ements",
        "ement",
        "ations",
        "ation",
        "ences",
        "ence",
        "ables",
        "able",
        "euses",
        "euse",
        "eurs",
        "eur",
        "ives",
        "ive",
        "ifs",
        "if",
        "ées",
        "és",
        "ée",
        "é",
        "ir",
        "er",
        "ez",
        "ons",
        "ent",
        "es",
        "s",
        "x",
        "e",
    ];
    let chars = term.chars().count();
    for suffix in SUFFIXES {
        let stem_len = chars.saturating_sub(suffix.chars().count());
        if term.ends_with(suffix) && stem_len >= 4 {
            return term.chars().take(stem_len).collect();
        }
    }
    term.to_owned()
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::french_prefix_stem;

    #[test]
    fn stems_keep_short_words_and_cut_common_endings() {
        assert_eq!(french_prefix_stem("feu"), "feu");
        assert_eq!(french_prefix_stem("pompiers"), "pompier");
        assert_eq!(french_prefix_stem("interventions"), "interventi");
        assert_eq!(french_prefix_stem("intervenir"), "interven");
        assert_eq!(french_prefix_stem("sécurité"), "sécurit");
    }
}
