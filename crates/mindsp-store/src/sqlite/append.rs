//! Group commit of message appends on a thread of its own, with a connection of its own.
//!
//! Through sqlx every statement is handed to the connection's worker thread and its
//! answer handed back to the async side; a batch needs at least two such round trips,
//! and the single writer sat idle through each hand-off (about a third of the time at
//! full append rate, `benches/RESULTS.md`). Here one thread takes the waiting appends
//! itself, checks and inserts them with prepared statements on its own connection
//! (`rusqlite`, the same SQLite library sqlx links), commits, answers each caller and
//! goes on with whatever arrived meanwhile: no hand-off between the queue and SQLite.
//!
//! Writers still take turns: the thread holds the store's write turn (see
//! [`super::SqliteStore::write_turn`]) for each batch, as every other writer of the
//! file does, so SQLite never has two writers at once and nobody waits on a busy lock.
//! A file only: an in-memory database is private to the connection that made it, and
//! uses the sqlx writer (`super::Appender`).

use std::sync::Arc;

use mindsp_core::model::{Appended, Message, NewMessage};
use mindsp_core::{ConversationId, Error, MessageId, Result, TenantId, UserId};
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use super::Turn;
use crate::common::{
    AppendRequest, BatchConversation, BatchState, answer_conflict, ask_writer, from_millis, millis,
    plan_batch, store_closed, unique_violation,
};

enum Command {
    Append(AppendRequest, oneshot::Sender<Result<Appended>>),
    /// Close the connection, then say so.
    Close(oneshot::Sender<()>),
}

/// The queue in front of the append thread. Cheap to clone; the thread ends when the
/// last clone is dropped or [`AppendThread::close`] is called.
#[derive(Clone)]
pub(super) struct AppendThread(mpsc::Sender<Command>);

/// How the append thread opens its connection: the pragmas the store's other
/// connections have, for a writer.
pub(super) struct AppendConfig<'a> {
    pub(super) path: &'a str,
    pub(super) durable: bool,
    pub(super) max_batch: usize,
    pub(super) capacity: usize,
}

impl AppendThread {
    /// Opens the thread's connection and starts it. `turn` is the store's write turn;
    /// `wake` is told after each commit that added messages (the search indexer).
    pub(super) fn spawn(config: AppendConfig<'_>, turn: Turn, wake: Arc<Notify>) -> Result<Self> {
        let conn = rusqlite::Connection::open(config.path).map_err(sql_err)?;
        // As the sqlx connections (`SqliteStore::open`): commits never checkpoint (the
        // checkpointer does), and another process may hold the lock a moment.
        conn.execute_batch(&format!(
            "PRAGMA busy_timeout = 10000;
             PRAGMA foreign_keys = ON;
             PRAGMA synchronous = {};
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA journal_size_limit = 67108864;
             PRAGMA cache_size = -65536;
             PRAGMA temp_store = memory;",
            if config.durable { "FULL" } else { "NORMAL" }
        ))
        .map_err(sql_err)?;
        let (queue, waiting) = mpsc::channel(config.capacity.max(1));
        let max_batch = config.max_batch.max(1);
        std::thread::Builder::new()
            .name("mindsp-sqlite-append".into())
            .spawn(move || {
                // A runtime of the thread's own, for the timer of its wait for the write
                // turn (made here: a runtime may not be dropped in an async context).
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(timer) => run(conn, waiting, max_batch, &turn, &timer, &wake),
                    // Appends then fail as "the store is closed".
                    Err(e) => tracing::error!(error = %e, "the append thread cannot start"),
                }
            })
            .map_err(|e| Error::Storage(format!("cannot start the append thread: {e}")))?;
        Ok(Self(queue))
    }

    /// Queues one append and waits for its answer, given after the commit that holds it.
    pub(super) async fn append(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        ask_writer(&self.0, tenant, msg, Command::Append).await
    }

    /// Closes the thread's connection once the appends queued before are answered.
    pub(super) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.0.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// The thread: takes every append waiting (up to `max_batch`), commits them in one
/// transaction under the write turn, answers each caller, and starts over.
fn run(
    mut conn: rusqlite::Connection,
    mut queue: mpsc::Receiver<Command>,
    max_batch: usize,
    turn: &Turn,
    timer: &tokio::runtime::Runtime,
    wake: &Notify,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    let mut close = None;
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Append(request, reply) => {
                    batch.push(request);
                    replies.push(reply);
                }
                Command::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if batch.len() < max_batch {
                next = queue.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            // A writer stuck with the turn fails the batch after the store's wait,
            // rather than holding every sender up for as long as it is stuck.
            let results = match turn.take_blocking(timer) {
                Some(_turn) => commit_batch(&mut conn, &batch),
                None => turn.refuse(batch.len()),
            };
            if results
                .iter()
                .any(|r| matches!(r, Ok(Appended::Created { .. })))
            {
                wake.notify_one();
            }
            for (reply, result) in replies.drain(..).zip(results) {
                let _ = reply.send(result);
            }
            batch.clear();
        }
        if let Some(done) = close.take() {
            drop(conn);
            let _ = done.send(());
            return;
        }
    }
}

/// The whole batch in one transaction; if that fails, each request in one of its own,
/// so that one bad request fails only itself. One answer per request, in order.
fn commit_batch(conn: &mut rusqlite::Connection, batch: &[AppendRequest]) -> Vec<Result<Appended>> {
    match unwound(|| append_in_transaction(conn, batch)) {
        Ok(results) => results,
        Err(e) => {
            tracing::warn!(error = %e, size = batch.len(), "append batch failed; retrying one by one");
            batch
                .iter()
                .map(|r| unwound(|| append_alone(conn, r)))
                .collect()
        }
    }
}

/// Runs `f`; a bug that panics in it becomes an error of that call (its transaction
/// rolls back as it unwinds) instead of ending the thread, after which every append
/// would fail. Each attempt is guarded alone, so answers already committed are kept.
fn unwound<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Error::Storage("the append failed unexpectedly".into())))
}

/// One request on its own. A conflict on the message's id means a caller retried the
/// very same message: the stored one is the answer, as for a repeated idempotency key.
fn append_alone(conn: &mut rusqlite::Connection, req: &AppendRequest) -> Result<Appended> {
    match append_in_transaction(conn, std::slice::from_ref(req)) {
        Ok(mut one) => one.pop().unwrap_or_else(|| Err(store_closed())),
        Err(e @ Error::Conflict { .. }) => {
            answer_conflict(req, e, stored(conn, req.tenant, req.msg.id))
        }
        Err(e) => Err(e),
    }
}

/// A conversation's tenant, head and membership version, if `?2` is a member of `?1`.
const MEMBER_HEAD: &str = concat!(
    "SELECT c.tenant_id, h.seq, c.members_version
       FROM conversation_members m
       JOIN conversations c ON c.id = m.conversation_id ",
    head_join!(),
    " WHERE m.conversation_id = ?1 AND m.user_id = ?2"
);
const MESSAGE_COLS: &str =
    "tenant_id, id, conversation_id, sender_id, seq, content, idempotency_key, created_at";
const INSERT: &str = "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq,
                                            content, idempotency_key, created_at)
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Checks and inserts a batch, then commits: BEGIN IMMEDIATE, one indexed lookup per
/// distinct sender and conversation and per idempotency key, [`plan_batch`] to judge
/// and number the requests, one insert per new message (whose trigger moves the head
/// and the sender's read marker), COMMIT. Statements are prepared once per connection.
pub(super) fn append_in_transaction(
    conn: &mut rusqlite::Connection,
    batch: &[AppendRequest],
) -> Result<Vec<Result<Appended>>> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    let mut state = BatchState::default();
    {
        let mut member = tx.prepare_cached(MEMBER_HEAD).map_err(sql_err)?;
        let mut by_key = tx
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages
                  WHERE conversation_id = ?1 AND sender_id = ?2 AND idempotency_key = ?3"
            ))
            .map_err(sql_err)?;
        for r in batch {
            let (c, u) = (r.msg.conversation_id.0, r.msg.sender_id.0);
            if !state.members.contains(&(c, u)) {
                let found = member
                    .query_row(params![c.as_bytes(), u.as_bytes()], |row| {
                        Ok((uuid(row, 0)?, row.get(1)?, row.get(2)?))
                    })
                    .optional()
                    .map_err(sql_err)?;
                if let Some((tenant, last_seq, members_version)) = found {
                    state.conversations.entry(c).or_insert(BatchConversation {
                        tenant: TenantId(tenant),
                        last_seq,
                        members_version,
                    });
                    state.members.insert((c, u));
                }
            }
            if let Some(key) = &r.msg.idempotency_key {
                let scoped = (c, u, key.clone());
                if state.stored.contains_key(&scoped) {
                    continue;
                }
                if let Some((tenant, m)) = by_key
                    .query_row(params![c.as_bytes(), u.as_bytes(), key], message_from_row)
                    .optional()
                    .map_err(sql_err)?
                {
                    state.stored.insert(scoped, (TenantId(tenant), m));
                }
            }
        }
    }
    let (results, fresh) = plan_batch(batch, &mut state);
    {
        let mut insert = tx.prepare_cached(INSERT).map_err(sql_err)?;
        for m in &fresh {
            let tenant = state.conversations[&m.conversation_id.0].tenant;
            insert
                .execute(params![
                    m.id.0.as_bytes(),
                    tenant.0.as_bytes(),
                    m.conversation_id.0.as_bytes(),
                    m.sender_id.0.as_bytes(),
                    m.seq,
                    m.content,
                    m.idempotency_key,
                    millis(m.created_at)
                ])
                .map_err(sql_err)?;
        }
    }
    tx.commit().map_err(sql_err)?;
    Ok(results)
}

/// The message stored under `id` in `tenant`, if any.
fn stored(conn: &rusqlite::Connection, tenant: TenantId, id: MessageId) -> Result<Option<Message>> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLS} FROM messages WHERE id = ?1 AND tenant_id = ?2"
    ))
    .map_err(sql_err)?
    .query_row(
        params![id.0.as_bytes(), tenant.0.as_bytes()],
        message_from_row,
    )
    .optional()
    .map_err(sql_err)
    .map(|found| found.map(|(_, m)| m))
}

/// A row of [`MESSAGE_COLS`]: the message with its tenant.
fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Uuid, Message)> {
    Ok((
        uuid(row, 0)?,
        Message {
            id: MessageId(uuid(row, 1)?),
            conversation_id: ConversationId(uuid(row, 2)?),
            sender_id: UserId(uuid(row, 3)?),
            seq: row.get(4)?,
            content: row.get(5)?,
            idempotency_key: row.get(6)?,
            created_at: from_millis(row.get(7)?),
        },
    ))
}

/// A UUID column, stored as its 16 bytes (as sqlx stores them).
fn uuid(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Uuid> {
    let bytes: [u8; 16] = row.get(i)?;
    Ok(Uuid::from_bytes(bytes))
}

fn sql_err(e: rusqlite::Error) -> Error {
    if let rusqlite::Error::SqliteFailure(f, message) = &e
        && matches!(
            f.extended_code,
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        )
    {
        return unique_violation(message.as_deref().unwrap_or_default());
    }
    Error::Storage(e.to_string())
}
