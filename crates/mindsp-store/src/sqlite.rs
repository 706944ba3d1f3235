//! SQLite adapter (the embedded default).
//!
//! One file in WAL mode. Writes go through a pool of exactly one connection, and
//! message appends through a thread with a connection of its own (`append`); the two
//! take turns through the store's write turn, so write transactions queue in-process
//! instead of failing with `SQLITE_BUSY`. Reads go through a separate pool of read-only
//! connections and never wait for writers.
//! `synchronous = NORMAL` (the WAL default recommendation) survives a crash of the
//! process; `synchronous = FULL` also survives power loss, at a throughput cost, and
//! is chosen with [`SqliteConfig::durable_on_power_loss`].
//!
//! Message appends that arrive together are committed together (group commit, see
//! `append`, and [`Appender`] for an in-memory database): one transaction for up to
//! [`MAX_APPEND_BATCH`] messages, each caller answered after that commit.

use std::any::Any;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindsp_core::model::{
    ActivityCursor, Appended, Conversation, ConversationKind, ConversationSummary, Member,
    MemberRole, Message, NewConversation, NewMessage, NewUser, Role, SearchHit, SeqWindow, Tenant,
    User, now,
};
use mindsp_core::notify::{Notification, NotificationPrefs};
use mindsp_core::ports::{DigestEntry, SEARCH_RANK_WINDOW, Store, TenantTx};
use mindsp_core::training::{Attendance, Invitee, SessionFilter, SessionStatus, TrainingSession};
use mindsp_core::{
    ConversationId, Error, MessageId, NotificationId, Result, SessionId, TenantId, UserId,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use uuid::Uuid;

use tokio::sync::Notify;

use crate::common::{
    AppendQueue, AppendRequest, BatchConversation, BatchState, BulkIndex, GroupCommit, db_err,
    direct_key, french_prefix_stem, from_millis, millis, plan_batch, prefs_from_json,
    prefs_to_json, spawn_indexer,
};

/// The user id under which `conversation_state` holds a conversation's head (its last
/// seq and activity) rather than a member's read marker (migration 0006).
macro_rules! head_user {
    () => {
        "X'00000000000000000000000000000000'"
    };
}

/// Joins the head `h` of the conversation `c` (a literal, for `concat!`).
macro_rules! head_join {
    () => {
        concat!(
            "JOIN conversation_state h ON h.conversation_id = c.id AND h.user_id = ",
            head_user!()
        )
    };
}

mod append;

use append::{AppendConfig, AppendThread};

/// Embedded migrations, exposed so an embedding application can run them itself.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How to open a SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// A file path, or `:memory:` for a private in-memory database.
    pub path: String,
    /// Number of read connections (ignored in memory, where one connection serves all).
    pub read_connections: u32,
    /// `synchronous = FULL` instead of `NORMAL`: survive power loss, not only crashes.
    pub durable_on_power_loss: bool,
    /// How long a write waits for its turn (another writer holding the file) before it
    /// fails with a storage error instead of waiting on (30 s, as long as the pool's
    /// connection was waited for before writers took turns).
    pub write_wait: Duration,
}

impl SqliteConfig {
    /// A file database with default settings.
    pub fn file(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            read_connections: 4,
            durable_on_power_loss: false,
            write_wait: Duration::from_secs(30),
        }
    }

    /// A private in-memory database, gone when the store is dropped.
    pub fn memory() -> Self {
        Self::file(":memory:")
    }
}

/// The SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    appends: Appends,
    /// Taken by every writer of the file for as long as it writes (see [`Self::write_turn`]).
    turn: Turn,
    index: Arc<SearchIndex>,
    /// The checkpointer's connection (files only); taken and closed by [`Self::close`].
    checkpoints: Arc<tokio::sync::Mutex<Option<sqlx::SqliteConnection>>>,
    /// Held by every clone of the store; the background tasks stop once the last is gone.
    _alive: Arc<()>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and runs pending migrations.
    pub async fn open(config: SqliteConfig) -> Result<Self> {
        let memory = config.path == ":memory:";
        let base = if memory {
            SqliteConnectOptions::from_str("sqlite::memory:").map_err(db_err)?
        } else {
            SqliteConnectOptions::new()
                .filename(&config.path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
        }
        .synchronous(if config.durable_on_power_loss {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .foreign_keys(true)
        // Another process (the CLI while a server runs) may hold the write lock briefly.
        .busy_timeout(Duration::from_secs(10))
        .pragma("temp_store", "memory")
        // Commits never checkpoint (that would put the copy and its fsyncs on the
        // commit path of the batch's callers); the checkpointer task does it. A WAL
        // that a burst grew is cut back when it starts over.
        .pragma("wal_autocheckpoint", "0")
        .pragma("journal_size_limit", "67108864")
        .pragma("cache_size", "-65536");

        // Every connection sees the full-text index, a file of its own (see `SearchIndex`),
        // as the schema `search`; in memory it is a private in-memory database too.
        let search_file: Arc<str> = if memory {
            ":memory:".into()
        } else {
            format!("{}-search", config.path).into()
        };
        let attach = attach_search(search_file.clone());

        // One writer: SQLite serialises writers anyway; queueing them here avoids
        // SQLITE_BUSY and lets a deferred BEGIN upgrade safely.
        // A connection to a local file does not go stale: no test query before each
        // use (it would be one more round trip on every write).
        let write = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .after_connect(attach.clone())
            .connect_with(base.clone())
            .await
            .map_err(db_err)?;
        MIGRATOR
            .run(&write)
            .await
            .map_err(|e| Error::Storage(format!("migration failed: {e}")))?;
        // The indexer's connection: the database as `main`, which it only reads, and the
        // index as `search`, which only it writes. It checkpoints the index's WAL itself
        // (SQLite's default), since nothing waits on its commits.
        let indexer = if memory {
            let mut conn = write.acquire().await.map_err(db_err)?;
            prepare_search_file(&mut conn, false).await?;
            None
        } else {
            let mut conn =
                sqlx::ConnectOptions::connect(&base.clone().pragma("wal_autocheckpoint", "1000"))
                    .await
                    .map_err(db_err)?;
            attach_search_to(&mut conn, &search_file)
                .await
                .map_err(db_err)?;
            prepare_search_file(&mut conn, true).await?;
            Some(conn)
        };
        let read = if memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(config.read_connections.max(1))
                .idle_timeout(None)
                .max_lifetime(None)
                .after_connect(attach)
                .connect_with(base.read_only(true))
                .await
                .map_err(db_err)?
        };
        let alive = Arc::new(());
        let index = Arc::new(SearchIndex {
            write: write.clone(),
            conn: tokio::sync::Mutex::new(indexer),
            memory,
            wake: Arc::new(Notify::new()),
        });
        spawn_indexer(
            index.clone(),
            index.wake.clone(),
            INDEX_GATHER,
            Arc::downgrade(&alive),
        );
        let turn = Turn {
            lock: Arc::new(tokio::sync::Mutex::new(())),
            wait: config.write_wait,
        };
        let appends = if memory {
            Appends::Pool(AppendQueue::spawn(
                Appender {
                    pool: write.clone(),
                    turn: turn.clone(),
                    index: index.clone(),
                },
                MAX_APPEND_BATCH,
                APPEND_QUEUE,
            ))
        } else {
            Appends::Thread(AppendThread::spawn(
                AppendConfig {
                    path: &config.path,
                    durable: config.durable_on_power_loss,
                    max_batch: MAX_APPEND_BATCH,
                    capacity: APPEND_QUEUE,
                },
                turn.clone(),
                index.wake.clone(),
            )?)
        };
        let checkpoints = Arc::new(tokio::sync::Mutex::new(None));
        if !memory {
            let options = SqliteConnectOptions::new()
                .filename(&config.path)
                .busy_timeout(Duration::from_secs(10));
            let conn = sqlx::ConnectOptions::connect(&options)
                .await
                .map_err(db_err)?;
            *checkpoints.lock().await = Some(conn);
            tokio::spawn(checkpointer(
                checkpoints.clone(),
                turn.clone(),
                Arc::downgrade(&alive),
            ));
        }
        Ok(Self {
            write,
            read,
            appends,
            turn,
            index,
            checkpoints,
            _alive: alive,
        })
    }

    /// The write pool, for tools and tests that need raw SQL. Write through it only while
    /// holding [`Self::write_turn`].
    pub fn pool(&self) -> &SqlitePool {
        &self.write
    }

    /// Waits for, and holds until dropped, the turn to write to the file. Message appends
    /// run on a connection of their own (see `append`), the other writes on the write
    /// pool's; both take this turn first, so SQLite never sees two writers at once
    /// (which it would answer with waits in its busy handler, or with `SQLITE_BUSY` for
    /// a transaction that read before it wrote). Turns are served in order of arrival.
    /// Take it before a connection of [`Self::pool`], never while holding one. Fails
    /// once it has waited [`SqliteConfig::write_wait`], in the queue included: writers
    /// that hold the turn that long are stuck or far too many, and an error is better
    /// than every write of the server waiting behind them. (The checkpointer skips its
    /// step then and tries at its next tick.)
    pub async fn write_turn(&self) -> Result<WriteTurn> {
        self.turn.take().await
    }

    /// A transaction on the write pool with the write turn it needs: hold the turn until
    /// the transaction ends (bind it first, `let (_turn, mut tx) = ...`, so it drops last).
    pub async fn begin_write(&self) -> Result<(WriteTurn, Transaction<'static, Sqlite>)> {
        let turn = self.write_turn().await?;
        let tx = self.write.begin().await.map_err(db_err)?;
        Ok((turn, tx))
    }

    /// Brings the full-text index up to date with every committed message. The store
    /// does this by itself in the background and before each search; this is for tools
    /// that load messages in bulk and want the index complete before measuring.
    pub async fn index_search(&self) -> Result<()> {
        self.index.index_pending().await
    }

    /// Closes every connection of the store. The last one to close checkpoints the WAL
    /// and removes it, so once this returns the database file alone holds everything
    /// (and may be copied).
    pub async fn close(&self) {
        if let Appends::Thread(thread) = &self.appends {
            thread.close().await;
        }
        self.read.close().await;
        self.write.close().await;
        if let Some(conn) = self.index.conn.lock().await.take() {
            let _ = sqlx::Connection::close(conn).await;
        }
        if let Some(conn) = self.checkpoints.lock().await.take() {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// The turn to write to a SQLite store's file, held until dropped
/// ([`SqliteStore::write_turn`]).
pub struct WriteTurn(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

/// The write turn of one file and how long a writer waits for it.
#[derive(Clone)]
pub(crate) struct Turn {
    lock: Arc<tokio::sync::Mutex<()>>,
    wait: Duration,
}

impl Turn {
    /// Waits for the turn, at most `wait`. Turns are served in order of arrival.
    async fn take(&self) -> Result<WriteTurn> {
        match tokio::time::timeout(self.wait, self.lock.clone().lock_owned()).await {
            Ok(guard) => Ok(WriteTurn(guard)),
            Err(_) => Err(self.busy()),
        }
    }

    /// The same from a thread outside the runtime (the append thread), on a runtime of
    /// that thread's own for the timer; `None` when the wait ran out ([`Self::busy`]).
    pub(crate) fn take_blocking(
        &self,
        timer: &tokio::runtime::Runtime,
    ) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        // The timeout is made inside `block_on`: its timer needs the runtime's context.
        timer
            .block_on(async { tokio::time::timeout(self.wait, self.lock.lock()).await })
            .ok()
    }

    /// The answers to a batch of `n` appends that found no turn within the wait.
    pub(crate) fn refuse(&self, n: usize) -> Vec<Result<Appended>> {
        (0..n).map(|_| Err(self.busy())).collect()
    }

    /// The error of a write that found no turn within the wait.
    fn busy(&self) -> Error {
        Error::Storage(format!(
            "the database stayed busy: no turn to write within {} ms",
            self.wait.as_millis()
        ))
    }
}

/// Where appends go: a thread with a connection of its own for a file (see `append`),
/// the write pool's connection for an in-memory database, private to that connection.
#[derive(Clone)]
enum Appends {
    Thread(AppendThread),
    Pool(AppendQueue),
}

/// What a pool runs on each new connection: attach the full-text index's file (a path,
/// or `:memory:`) as the schema `search`.
fn attach_search(
    file: Arc<str>,
) -> impl for<'c> Fn(
    &'c mut sqlx::SqliteConnection,
    sqlx::pool::PoolConnectionMetadata,
) -> std::pin::Pin<Box<dyn Future<Output = sqlx::Result<()>> + Send + 'c>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |conn, _| {
        let file = file.clone();
        Box::pin(async move { attach_search_to(conn, &file).await })
    }
}

async fn attach_search_to(conn: &mut sqlx::SqliteConnection, file: &str) -> sqlx::Result<()> {
    sqlx::query("ATTACH DATABASE ?1 AS search")
        .bind(file)
        .execute(conn)
        .await?;
    Ok(())
}

fn tenant_from_row(r: &SqliteRow) -> Result<Tenant> {
    Ok(Tenant {
        id: TenantId(r.try_get("id").map_err(db_err)?),
        slug: r.try_get("slug").map_err(db_err)?,
        name: r.try_get("name").map_err(db_err)?,
        created_at: from_millis(r.try_get("created_at").map_err(db_err)?),
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    async fn create_tenant(&self, slug: &str, name: &str) -> Result<Tenant> {
        let t = Tenant {
            id: TenantId::new(),
            slug: slug.to_owned(),
            name: name.to_owned(),
            created_at: now(),
        };
        let _turn = self.write_turn().await?;
        sqlx::query("INSERT INTO tenants (id, slug, name, created_at) VALUES (?, ?, ?, ?)")
            .bind(t.id.0)
            .bind(&t.slug)
            .bind(&t.name)
            .bind(millis(t.created_at))
            .execute(&self.write)
            .await
            .map_err(db_err)?;
        Ok(t)
    }

    async fn tenant_by_slug(&self, slug: &str) -> Result<Option<Tenant>> {
        sqlx::query("SELECT id, slug, name, created_at FROM tenants WHERE slug = ?")
            .bind(slug)
            .fetch_optional(&self.read)
            .await
            .map_err(db_err)?
            .as_ref()
            .map(tenant_from_row)
            .transpose()
    }

    async fn tenant_ids(&self) -> Result<Vec<TenantId>> {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&self.read)
            .await
            .map_err(db_err)?;
        Ok(ids.into_iter().map(TenantId).collect())
    }

    async fn begin(&self, tenant: TenantId) -> Result<Box<dyn TenantTx>> {
        let (turn, tx) = self.begin_write().await?;
        Ok(Box::new(SqliteTx {
            tx,
            tenant,
            index: self.index.clone(),
            _turn: Some(turn),
        }))
    }

    async fn read(&self, tenant: TenantId) -> Result<Box<dyn TenantTx>> {
        let tx = self.read.begin().await.map_err(db_err)?;
        Ok(Box::new(SqliteTx {
            tx,
            tenant,
            index: self.index.clone(),
            _turn: None,
        }))
    }

    async fn append(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        match &self.appends {
            Appends::Thread(thread) => thread.append(tenant, msg).await,
            Appends::Pool(queue) => queue.append(tenant, msg).await,
        }
    }
}

/// How often the WAL is copied back into the database file. Between checkpoints the
/// WAL holds what was written meanwhile (a few MB at full append rate).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Most `PASSIVE` checkpoints the first step runs in a row beside the writer, and the
/// duration under which a pass counts as caught up, ending the first step.
const CHECKPOINT_SIDE_PASSES: usize = 4;
const CHECKPOINT_CAUGHT_UP: Duration = Duration::from_millis(5);

/// Copies committed WAL frames into the database file with `PASSIVE` checkpoints, which
/// never block readers, on a connection of its own and in two steps: first beside the
/// writers, repeated while a pass takes long (up to [`CHECKPOINT_SIDE_PASSES`]); then
/// once more holding the write turn, between two append batches, which copies only what
/// was committed during the last pass of the first step and so holds the writers
/// briefly. That step's cost is mostly syncing the WAL written since the last pass
/// began: with one pass of ~40 ms at full append rate it held the writer ~21 ms every
/// 200 ms, with the repeated passes ~13 ms (`benches/RESULTS.md`). Stops when the store
/// closes the connection or the last handle to the store is dropped.
///
/// The second step is what keeps the WAL small: SQLite starts the WAL over from its
/// beginning only after a checkpoint has copied every frame, which a checkpoint running
/// beside a writer that never pauses never does. Under sustained appends the WAL grew
/// without end (3 GB for a 50 MB database in the append benchmark), each commit
/// extending the file instead of overwriting pages the kernel already holds.
async fn checkpointer(
    conn: Arc<tokio::sync::Mutex<Option<sqlx::SqliteConnection>>>,
    turn: Turn,
    alive: Weak<()>,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The WAL's frame count that the last step under the write turn saw.
    let mut copied_under_turn = None;
    while alive.strong_count() > 0 {
        tick.tick().await;
        let mut guard = conn.lock().await;
        let Some(c) = guard.as_mut() else {
            return;
        };
        // Each pass copies what was committed up to its start; while passes are long,
        // the writers committed much meanwhile, which the step under the turn would
        // have to copy and sync.
        let mut frames = None;
        for _ in 0..CHECKPOINT_SIDE_PASSES {
            let began = Instant::now();
            frames = checkpoint(c).await;
            if frames.is_none() || began.elapsed() < CHECKPOINT_CAUGHT_UP {
                break;
            }
        }
        // Nothing committed since the last step under the turn (an idle store) needs no
        // new one: the writers are left alone until something is written.
        if frames.is_none() || frames == Some(0) || frames == copied_under_turn {
            continue;
        }
        // No turn within the wait (a writer stuck with it): skip this step, the next
        // tick tries again.
        let Ok(_turn) = turn.take().await else {
            continue;
        };
        copied_under_turn = checkpoint(c).await;
    }
    if let Some(c) = conn.lock().await.take() {
        let _ = sqlx::Connection::close(c).await;
    }
}

/// One `PASSIVE` checkpoint of the database (`main` only: the writer also has the
/// search index attached, whose own writer checkpoints it): the number of frames the WAL
/// held when it ran, or `None` if it failed, which is logged; the next tick tries again.
async fn checkpoint(conn: &mut sqlx::SqliteConnection) -> Option<i64> {
    match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA main.wal_checkpoint(PASSIVE)")
        .fetch_one(conn)
        .await
    {
        Ok((_busy, frames, _copied)) => Some(frames),
        Err(e) => {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
            None
        }
    }
}

/// How long the background indexer lets appends gather after a commit woke it, so that
/// one pass indexes the messages of many commits (FTS5 writes a segment per commit).
const INDEX_GATHER: Duration = Duration::from_millis(100);

/// Most messages indexed in one transaction of the indexer.
const INDEX_CHUNK: i64 = 5000;

/// The full-text index (migration 0005): a contentless FTS5 table in a file of its own,
/// `<database>-search`, attached to every connection as `search`. Its rowids are the
/// messages' `pk`; `search.index_state` records the last message indexed, in the same
/// transactions as the index, so that the two never disagree after a crash.
///
/// The single writer of the database never touches it: a pass of this indexer reads the
/// messages committed since the last one and indexes them in one transaction of the
/// index file, on a connection of its own, so it runs beside the appends instead of
/// inside them. A pass starts after appends wake it ([`spawn_indexer`]) and before every
/// search ([`SearchIndex::catch_up`]), so a search finds every message committed before
/// it. In memory, where one connection serves everything, the index is a private
/// in-memory database of that connection and a search indexes in its own transaction.
///
/// Messages are never deleted today. When they are, the row must leave the index in the
/// same step: without `AUTOINCREMENT`, a deleted last `pk` is handed out again.
struct SearchIndex {
    /// The database's single writer: closed means the store is closed; in memory, also
    /// the connection the background passes run on.
    write: SqlitePool,
    /// The indexer's own connection (files only); `None` in memory or once closed.
    conn: tokio::sync::Mutex<Option<sqlx::SqliteConnection>>,
    memory: bool,
    /// Woken after each commit of appends.
    wake: Arc<Notify>,
}

/// Creates the index's tables if they are missing, and empties the index if it does not
/// belong to the messages beside it (its last indexed message is not the database's:
/// the database was restored from a backup or replaced, or the file came from
/// elsewhere). The index is then rebuilt by the next passes.
async fn prepare_search_file(conn: &mut sqlx::SqliteConnection, file: bool) -> Result<()> {
    use sqlx::Executor;
    if file {
        conn.execute("PRAGMA search.journal_mode = WAL")
            .await
            .map_err(db_err)?;
    }
    conn.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS search.messages_fts USING fts5 (
             content,
             content = '',
             contentless_delete = 1,
             tokenize = 'unicode61 remove_diacritics 2'
         );
         CREATE TABLE IF NOT EXISTS search.index_state (
             only     INTEGER PRIMARY KEY CHECK (only = 1),
             last_pk  INTEGER NOT NULL,
             last_id  BLOB
         );
         INSERT OR IGNORE INTO search.index_state (only, last_pk, last_id) VALUES (1, 0, NULL);",
    )
    .await
    .map_err(db_err)?;
    let belongs: bool = sqlx::query_scalar(
        "SELECT s.last_pk = 0
                OR EXISTS (SELECT 1 FROM main.messages m WHERE m.pk = s.last_pk AND m.id = s.last_id)
           FROM search.index_state s",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    if !belongs {
        tracing::warn!(
            "the full-text index does not match the messages (database restored or replaced?): rebuilding it"
        );
        conn.execute(
            "DELETE FROM search.messages_fts;
             UPDATE search.index_state SET last_pk = 0, last_id = NULL;",
        )
        .await
        .map_err(db_err)?;
    }
    Ok(())
}

/// Indexes up to [`INDEX_CHUNK`] messages past the last indexed one, inside the caller's
/// transaction; returns the `pk` of the last one it indexed, `None` if none was left.
async fn index_chunk(conn: &mut sqlx::SqliteConnection) -> Result<Option<i64>> {
    let (last, upto): (i64, Option<i64>) = sqlx::query_as(
        "SELECT s.last_pk, max(p.pk)
           FROM search.index_state s
           LEFT JOIN (SELECT pk FROM main.messages
                       WHERE pk > (SELECT last_pk FROM search.index_state)
                       ORDER BY pk LIMIT ?1) p ON 1",
    )
    .bind(INDEX_CHUNK)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    let Some(upto) = upto else {
        return Ok(None);
    };
    sqlx::query(
        "INSERT INTO search.messages_fts (rowid, content)
         SELECT pk, content FROM main.messages WHERE pk > ?1 AND pk <= ?2",
    )
    .bind(last)
    .bind(upto)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    sqlx::query(
        "UPDATE search.index_state
            SET last_pk = ?1, last_id = (SELECT id FROM main.messages WHERE pk = ?1)",
    )
    .bind(upto)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(Some(upto))
}

/// Indexes, chunk by chunk, every message committed before the call (and perhaps some
/// committed since; it stops at the first chunk past the call's last). With nothing
/// new, as before most searches and at every idle check, one read and no transaction.
///
/// Each chunk takes two transactions: one copies the chunk's messages into a temporary
/// table, reading the database briefly, and the next indexes them, touching only the
/// index's file. A transaction that read the database for the whole of the full-text
/// work would keep SQLite from starting the database's WAL over (see `checkpointer`).
async fn index_all(conn: &mut sqlx::SqliteConnection) -> Result<()> {
    use sqlx::{Connection, Executor};
    let (target, last): (Option<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT max(pk) FROM main.messages), last_pk FROM search.index_state",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    let Some(target) = target.filter(|t| *t > last) else {
        return Ok(());
    };
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS index_staged (pk INTEGER PRIMARY KEY, id BLOB, content TEXT);
         DELETE FROM temp.index_staged;",
    )
    .await
    .map_err(db_err)?;
    loop {
        let mut tx = conn.begin().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO temp.index_staged (pk, id, content)
             SELECT pk, id, content FROM main.messages
              WHERE pk > (SELECT last_pk FROM search.index_state) ORDER BY pk LIMIT ?1",
        )
        .bind(INDEX_CHUNK)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        let upto: Option<i64> = sqlx::query_scalar("SELECT max(pk) FROM temp.index_staged")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        let Some(upto) = upto else {
            return Ok(());
        };
        let mut tx = conn.begin().await.map_err(db_err)?;
        tx.execute(
            "INSERT INTO search.messages_fts (rowid, content)
             SELECT pk, content FROM temp.index_staged;
             UPDATE search.index_state
                SET (last_pk, last_id) = (SELECT pk, id FROM temp.index_staged ORDER BY pk DESC LIMIT 1);
             DELETE FROM temp.index_staged;",
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        if upto >= target {
            return Ok(());
        }
    }
}

impl SearchIndex {
    /// Indexes every message committed before the call, for a search about to run in
    /// `tx`: on the indexer's connection, or in memory inside `tx` itself.
    async fn catch_up(&self, tx: &mut sqlx::SqliteConnection) -> Result<()> {
        if self.memory {
            while index_chunk(tx).await?.is_some() {}
            return Ok(());
        }
        self.index_pending().await
    }
}

#[async_trait]
impl BulkIndex for SearchIndex {
    async fn index_pending(&self) -> Result<()> {
        // One pass at a time: the lock is held through it.
        let mut guard = self.conn.lock().await;
        match guard.as_mut() {
            Some(conn) => index_all(conn).await,
            None if self.memory => {
                drop(guard);
                let mut conn = self.write.acquire().await.map_err(db_err)?;
                index_all(&mut conn).await
            }
            None => Err(Error::Storage("the store is closed".into())),
        }
    }

    fn closed(&self) -> bool {
        self.write.is_closed()
    }
}

/// Most appends committed in one transaction. A larger batch amortises more, but the
/// first caller in it waits for everyone's rows; appends beyond it wait for the next.
pub const MAX_APPEND_BATCH: usize = 256;

/// Appends waiting for the writer. When it is full, callers wait for room: a burst
/// slows senders down instead of growing memory without bound.
const APPEND_QUEUE: usize = 4096;

/// The group-commit writer of an in-memory database, behind [`AppendQueue`] (a file
/// has the append thread instead, `append`): checks a batch with one query,
/// inserts it with one statement and commits once. Through sqlx every statement is a
/// round trip to SQLite's worker thread, and every commit writes the pages it dirtied to
/// the WAL: batching pays both once per batch instead of once per message. A commit
/// wakes the search indexer, which indexes beside the writer.
struct Appender {
    pool: SqlitePool,
    turn: Turn,
    index: Arc<SearchIndex>,
}

#[async_trait]
impl GroupCommit for Appender {
    async fn append_alone(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        let turn = self.turn.take().await?;
        let tx = self.pool.begin().await.map_err(db_err)?;
        let mut tx = SqliteTx {
            tx,
            tenant,
            index: self.index.clone(),
            _turn: Some(turn),
        };
        let appended = tx.append_message(msg).await?;
        if appended.created() {
            tx.tx.commit().await.map_err(db_err)?;
            self.index.wake.notify_one();
        }
        Ok(appended)
    }

    async fn stored(&self, tenant: TenantId, id: MessageId) -> Result<Option<Message>> {
        sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE id = ? AND tenant_id = ?"
        ))
        .bind(id.0)
        .bind(tenant.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(message_from_row)
        .transpose()
    }

    async fn append_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Result<Appended>>> {
        // No turn within the wait: every request of the batch fails now. (An `Err` here
        // would have each retried alone, each waiting the whole wait again.)
        let Ok(_turn) = self.turn.take().await else {
            return Ok(self.turn.refuse(batch.len()));
        };
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        let done = self.append_batch_in(&mut conn, batch).await;
        if done.is_err() {
            // The transaction was begun by hand (below): end it by hand, so that the
            // connection goes back to the pool outside any transaction.
            let _ = sqlx::Executor::execute(&mut *conn, "ROLLBACK").await;
        }
        done
    }
}

impl Appender {
    /// A batch in one transaction and two round trips to SQLite's worker thread: `BEGIN`
    /// travels with the lookup and `COMMIT` with the insert (sqlx runs every statement of
    /// a query string in one go, binding the parameters in order). Through sqlx's
    /// `Transaction`, `BEGIN` and `COMMIT` would each be a round trip of their own, which
    /// the single writer waits through. On an error the caller rolls back.
    async fn append_batch_in(
        &self,
        tx: &mut sqlx::SqliteConnection,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<Appended>>> {
        let mut state = BatchState::default();

        // One statement reads what the batch depends on: its conversations' current
        // sequence with their senders' memberships (`kind` 0), and the messages already
        // stored under its idempotency keys (`kind` 1). Every statement is a round trip
        // to SQLite's worker thread, and the writer waits through each. `r CROSS JOIN`
        // keeps the requests as the outer loop: one index lookup each (a row-value
        // `IN (VALUES …)` scans the whole index).
        let mut q = QueryBuilder::<Sqlite>::new("BEGIN; WITH r(c, u, key) AS (");
        q.push_values(batch, |mut b, r| {
            b.push_bind(r.msg.conversation_id.0)
                .push_bind(r.msg.sender_id.0)
                .push_bind(r.msg.idempotency_key.as_deref());
        });
        q.push(concat!(
            ") SELECT 0 AS kind, c.tenant_id, c.id AS conversation_id, m.user_id AS sender_id,
                      h.seq, c.members_version, NULL AS id, NULL AS content,
                      NULL AS idempotency_key, NULL AS created_at
                 FROM r CROSS JOIN conversation_members m
                   ON m.conversation_id = r.c AND m.user_id = r.u
                 JOIN conversations c ON c.id = m.conversation_id ",
            head_join!(),
            "
               UNION ALL
               SELECT 1, s.tenant_id, s.conversation_id, s.sender_id, s.seq, NULL, s.id,
                      s.content, s.idempotency_key, s.created_at
                 FROM r CROSS JOIN messages s
                   ON s.conversation_id = r.c AND s.sender_id = r.u AND s.idempotency_key = r.key",
        ));
        for row in q.build().fetch_all(&mut *tx).await.map_err(db_err)? {
            let tenant = TenantId(row.try_get("tenant_id").map_err(db_err)?);
            if row.try_get::<i64, _>("kind").map_err(db_err)? == 1 {
                let m = message_from_row(&row)?;
                let key = m.idempotency_key.clone().unwrap_or_default();
                state
                    .stored
                    .insert((m.conversation_id.0, m.sender_id.0, key), (tenant, m));
                continue;
            }
            let conv: Uuid = row.try_get("conversation_id").map_err(db_err)?;
            state.conversations.insert(
                conv,
                BatchConversation {
                    tenant,
                    last_seq: row.try_get("seq").map_err(db_err)?,
                    members_version: row.try_get("members_version").map_err(db_err)?,
                },
            );
            state
                .members
                .insert((conv, row.try_get("sender_id").map_err(db_err)?));
        }

        // Decide each request in arrival order, numbering new messages per conversation.
        let (results, fresh) = plan_batch(batch, &mut state);

        // One multi-row insert per chunk (SQLite binds at most 32,766 parameters); the
        // trigger moves each conversation's sequence and the sender's read marker. The
        // last statement sent commits.
        let chunks: Vec<_> = fresh.chunks(512).collect();
        if chunks.is_empty() {
            sqlx::query("COMMIT")
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, idempotency_key, created_at) ",
            );
            q.push_values(chunk.iter(), |mut b, m| {
                let tenant = state.conversations[&m.conversation_id.0].tenant;
                b.push_bind(m.id.0)
                    .push_bind(tenant.0)
                    .push_bind(m.conversation_id.0)
                    .push_bind(m.sender_id.0)
                    .push_bind(m.seq)
                    .push_bind(m.content.as_str())
                    .push_bind(m.idempotency_key.as_deref())
                    .push_bind(millis(m.created_at));
            });
            if i + 1 == chunks.len() {
                q.push("; COMMIT");
            }
            q.build().execute(&mut *tx).await.map_err(db_err)?;
        }
        if !fresh.is_empty() {
            self.index.wake.notify_one();
        }
        Ok(results)
    }
}

/// A unit of work on SQLite, confined to one tenant.
pub struct SqliteTx {
    tx: Transaction<'static, Sqlite>,
    tenant: TenantId,
    index: Arc<SearchIndex>,
    /// The write turn, for a unit of work; released after the transaction ends (the
    /// fields drop in order).
    _turn: Option<WriteTurn>,
}

impl SqliteTx {
    /// Of `ids`, this tenant's users that `filter` (conditions pushed after the tenant's)
    /// keeps.
    async fn users_among(
        &mut self,
        ids: &[UserId],
        filter: impl FnOnce(&mut QueryBuilder<'_, Sqlite>),
    ) -> Result<Vec<UserId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new("SELECT id FROM users WHERE tenant_id = ");
        q.push_bind(self.tenant.0);
        filter(&mut q);
        q.push(" AND id IN (");
        push_ids(&mut q, ids.iter().map(|id| id.0));
        q.push(")");
        let rows = q.build().fetch_all(&mut *self.tx).await.map_err(db_err)?;
        rows.iter()
            .map(|r| r.try_get::<Uuid, _>("id").map(UserId).map_err(db_err))
            .collect()
    }

    /// The underlying sqlx transaction, for adapters that write in the same unit.
    pub fn transaction(&mut self) -> &mut Transaction<'static, Sqlite> {
        &mut self.tx
    }
}

const USER_COLS: &str =
    "id, tenant_id, email, display_name, role, active, created_at, password_changed_at";
const MESSAGE_COLS: &str =
    "id, conversation_id, sender_id, seq, content, idempotency_key, created_at";
/// A conversation's columns, from [`CONV_FROM`].
const CONV_COLS: &str = "c.id, c.tenant_id, c.kind, c.name, c.created_by, c.created_at,
     h.at AS last_activity_at, h.seq AS last_seq";
/// A conversation (`c`) with its head (`h`).
const CONV_FROM: &str = concat!("conversations c ", head_join!());
/// The head `h` of a conversation `c` already in the query.
const HEAD_JOIN: &str = head_join!();
/// A member row `me` with its read marker `r.seq` (migration 0006).
const READ_JOIN: &str = "JOIN conversation_state r
     ON r.conversation_id = me.conversation_id AND r.user_id = me.user_id";

fn user_from_row(r: &SqliteRow) -> Result<User> {
    Ok(User {
        id: UserId(r.try_get("id").map_err(db_err)?),
        tenant_id: TenantId(r.try_get("tenant_id").map_err(db_err)?),
        email: r.try_get("email").map_err(db_err)?,
        display_name: r.try_get("display_name").map_err(db_err)?,
        role: Role::parse(r.try_get("role").map_err(db_err)?)?,
        active: r.try_get("active").map_err(db_err)?,
        created_at: from_millis(r.try_get("created_at").map_err(db_err)?),
        password_changed_at: r
            .try_get::<Option<i64>, _>("password_changed_at")
            .map_err(db_err)?
            .map(from_millis),
    })
}

fn conv_from_row(r: &SqliteRow) -> Result<Conversation> {
    Ok(Conversation {
        id: ConversationId(r.try_get("id").map_err(db_err)?),
        tenant_id: TenantId(r.try_get("tenant_id").map_err(db_err)?),
        kind: ConversationKind::parse(r.try_get("kind").map_err(db_err)?)?,
        name: r.try_get("name").map_err(db_err)?,
        created_by: UserId(r.try_get("created_by").map_err(db_err)?),
        created_at: from_millis(r.try_get("created_at").map_err(db_err)?),
        last_activity_at: from_millis(r.try_get("last_activity_at").map_err(db_err)?),
        last_seq: r.try_get("last_seq").map_err(db_err)?,
    })
}

fn message_from_row(r: &SqliteRow) -> Result<Message> {
    Ok(Message {
        id: MessageId(r.try_get("id").map_err(db_err)?),
        conversation_id: ConversationId(r.try_get("conversation_id").map_err(db_err)?),
        sender_id: UserId(r.try_get("sender_id").map_err(db_err)?),
        seq: r.try_get("seq").map_err(db_err)?,
        content: r.try_get("content").map_err(db_err)?,
        idempotency_key: r.try_get("idempotency_key").map_err(db_err)?,
        created_at: from_millis(r.try_get("created_at").map_err(db_err)?),
    })
}

fn member_from_row(r: &SqliteRow) -> Result<Member> {
    Ok(Member {
        user_id: UserId(r.try_get("user_id").map_err(db_err)?),
        display_name: r.try_get("display_name").map_err(db_err)?,
        role: MemberRole::parse(r.try_get("role").map_err(db_err)?)
            .map_err(|e| Error::Storage(e.to_string()))?,
        last_read_seq: r.try_get("last_read_seq").map_err(db_err)?,
        joined_at: from_millis(r.try_get("joined_at").map_err(db_err)?),
    })
}

/// Notifications per multi-row insert (11 parameters each).
const NOTIFICATION_CHUNK: usize = 1000;
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 5000;
/// Users per `last_seen` update (2 parameters each).
const SEEN_CHUNK: usize = 1000;

const NOTIFICATION_COLS: &str =
    "id, user_id, kind, title, body, link, data, key, created_at, read_at";
type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds ?1 tenant, ?2 id, then the other columns of a session in `SESSION_COLS`
/// order: the insert and the update share it.
fn bind_session<'q>(
    q: SqliteQuery<'q>,
    tenant: TenantId,
    s: &'q TrainingSession,
) -> Result<SqliteQuery<'q>> {
    Ok(q.bind(tenant.0)
        .bind(s.id.0)
        .bind(&s.title)
        .bind(&s.kind)
        .bind(&s.description)
        .bind(&s.location)
        .bind(millis(s.start_at))
        .bind(millis(s.end_at))
        .bind(s.organizer_id.0)
        .bind(s.status.as_str())
        .bind(offsets_to_json(&s.reminder_offsets)?)
        .bind(&s.cancel_reason)
        .bind(millis(s.created_at))
        .bind(millis(s.updated_at)))
}

const SESSION_COLS: &str = "id, title, kind, description, location, start_at, end_at, \
     organizer_id, status, reminder_offsets, cancel_reason, created_at, updated_at";

fn notification_from_row(r: &SqliteRow) -> Result<Notification> {
    let data: String = r.try_get("data").map_err(db_err)?;
    Ok(Notification {
        id: NotificationId(r.try_get("id").map_err(db_err)?),
        user_id: UserId(r.try_get("user_id").map_err(db_err)?),
        kind: r.try_get("kind").map_err(db_err)?,
        title: r.try_get("title").map_err(db_err)?,
        body: r.try_get("body").map_err(db_err)?,
        link: r.try_get("link").map_err(db_err)?,
        data: serde_json::from_str(&data).map_err(|e| Error::Storage(e.to_string()))?,
        key: r.try_get("key").map_err(db_err)?,
        created_at: from_millis(r.try_get("created_at").map_err(db_err)?),
        read_at: r
            .try_get::<Option<i64>, _>("read_at")
            .map_err(db_err)?
            .map(from_millis),
    })
}

fn session_from_row(r: &SqliteRow) -> Result<TrainingSession> {
    let offsets: String = r.try_get("reminder_offsets").map_err(db_err)?;
    Ok(TrainingSession {
        id: SessionId(r.try_get("id").map_err(db_err)?),
        title: r.try_get("title").map_err(db_err)?,
        kind: r.try_get("kind").map_err(db_err)?,
        description: r.try_get("description").map_err(db_err)?,
        location: r.try_get("location").map_err(db_err)?,
        start_at: from_millis(r.try_get("start_at").map_err(db_err)?),
        end_at: from_millis(r.try_get("end_at").map_err(db_err)?),
        organizer_id: UserId(r.try_get("organizer_id").map_err(db_err)?),
        status: SessionStatus::parse(r.try_get("status").map_err(db_err)?)?,
        reminder_offsets: serde_json::from_str(&offsets)
            .map_err(|e| Error::Storage(e.to_string()))?,
        cancel_reason: r.try_get("cancel_reason").map_err(db_err)?,
        created_at: from_millis(r.try_get("created_at").map_err(db_err)?),
        updated_at: from_millis(r.try_get("updated_at").map_err(db_err)?),
    })
}

fn offsets_to_json(offsets: &[i64]) -> Result<String> {
    serde_json::to_string(offsets).map_err(|e| Error::Storage(e.to_string()))
}

#[async_trait]
impl TenantTx for SqliteTx {
    fn tenant(&self) -> TenantId {
        self.tenant
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit().await.map_err(db_err)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn insert_user(&mut self, u: &NewUser) -> Result<User> {
        let user = User {
            id: UserId::new(),
            tenant_id: self.tenant,
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            role: u.role,
            active: true,
            created_at: now(),
            password_changed_at: None,
        };
        sqlx::query(
            "INSERT INTO users (id, tenant_id, email, display_name, role, active, password_hash, created_at)
             VALUES (?, ?, ?, ?, ?, 1, ?, ?)",
        )
        .bind(user.id.0)
        .bind(self.tenant.0)
        .bind(&user.email)
        .bind(&user.display_name)
        .bind(user.role.as_str())
        .bind(&u.password_hash)
        .bind(millis(user.created_at))
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(user)
    }

    async fn user(&mut self, id: UserId) -> Result<Option<User>> {
        sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users WHERE tenant_id = ? AND id = ?"
        ))
        .bind(self.tenant.0)
        .bind(id.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(user_from_row)
        .transpose()
    }

    async fn user_credentials(&mut self, email: &str) -> Result<Option<(User, String)>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLS}, password_hash FROM users WHERE tenant_id = ? AND email = ?"
        ))
        .bind(self.tenant.0)
        .bind(email)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                user_from_row(&r)?,
                r.try_get("password_hash").map_err(db_err)?,
            ))),
        }
    }

    async fn list_users(
        &mut self,
        after: Option<(String, UserId)>,
        limit: u32,
    ) -> Result<Vec<User>> {
        let (name, id) = match after {
            Some((n, i)) => (Some(n), Some(i.0)),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users WHERE tenant_id = ?1
               AND (?2 IS NULL OR (display_name, id) > (?2, ?3))
             ORDER BY display_name, id LIMIT ?4"
        ))
        .bind(self.tenant.0)
        .bind(name)
        .bind(id)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter().map(user_from_row).collect()
    }

    async fn set_user_active(&mut self, id: UserId, active: bool) -> Result<Option<User>> {
        sqlx::query(&format!(
            "UPDATE users SET active = ? WHERE tenant_id = ? AND id = ? RETURNING {USER_COLS}"
        ))
        .bind(active)
        .bind(self.tenant.0)
        .bind(id.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(user_from_row)
        .transpose()
    }

    async fn set_password_hash(&mut self, id: UserId, hash: &str) -> Result<bool> {
        let done = sqlx::query(
            // Always later than the change before, whatever the clocks of the nodes
            // that made them: the change's time names the password (`password_mark`).
            "UPDATE users SET password_hash = ?, \
             password_changed_at = MAX(?, COALESCE(password_changed_at, 0) + 1) \
             WHERE tenant_id = ? AND id = ?",
        )
        .bind(hash)
        .bind(now().timestamp_millis())
        .bind(self.tenant.0)
        .bind(id.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn active_users_among(&mut self, ids: &[UserId]) -> Result<Vec<UserId>> {
        self.users_among(ids, |q| {
            q.push(" AND active = 1");
        })
        .await
    }

    async fn password_changed_among(
        &mut self,
        ids: &[UserId],
        since: DateTime<Utc>,
    ) -> Result<Vec<UserId>> {
        self.users_among(ids, |q| {
            q.push(" AND password_changed_at >= ")
                .push_bind(since.timestamp_millis());
        })
        .await
    }

    async fn record_last_seen(&mut self, seen: &[(UserId, DateTime<Utc>)]) -> Result<()> {
        // One statement per chunk, not one per user: a crowd of disconnections (a proxy
        // reloads) holds the write turn, which messages wait for, as briefly as can be.
        for chunk in seen.chunks(SEEN_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("WITH v(id, at) AS (");
            q.push_values(chunk, |mut b, (id, at)| {
                b.push_bind(id.0).push_bind(at.timestamp_millis());
            });
            // A user listed twice keeps the later time (`UPDATE … FROM` would take any).
            q.push(
                "), s AS (SELECT id, MAX(at) AS at FROM v GROUP BY id) \
                 UPDATE users SET last_seen_at = MAX(s.at, COALESCE(users.last_seen_at, 0)) \
                 FROM s WHERE users.id = s.id AND users.tenant_id = ",
            );
            q.push_bind(self.tenant.0);
            q.build().execute(&mut *self.tx).await.map_err(db_err)?;
        }
        Ok(())
    }

    async fn last_seen_among(&mut self, ids: &[UserId]) -> Result<Vec<(UserId, DateTime<Utc>)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q =
            QueryBuilder::<Sqlite>::new("SELECT id, last_seen_at FROM users WHERE tenant_id = ");
        q.push_bind(self.tenant.0);
        q.push(" AND last_seen_at IS NOT NULL AND id IN (");
        push_ids(&mut q, ids.iter().map(|id| id.0));
        q.push(")");
        let rows = q.build().fetch_all(&mut *self.tx).await.map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let id = r.try_get::<Uuid, _>("id").map_err(db_err)?;
                let ms = r.try_get::<i64, _>("last_seen_at").map_err(db_err)?;
                Ok((UserId(id), from_millis(ms)))
            })
            .collect()
    }

    async fn insert_conversation(&mut self, c: &NewConversation) -> Result<Conversation> {
        let at = now();
        let conv = Conversation {
            id: ConversationId::new(),
            tenant_id: self.tenant,
            kind: c.kind,
            name: c.name.clone(),
            created_by: c.created_by,
            created_at: at,
            last_activity_at: at,
            last_seq: 0,
        };
        let key = match (c.kind, c.members.as_slice()) {
            (ConversationKind::Direct, [(a, _), (b, _)]) => Some(direct_key(*a, *b)),
            (ConversationKind::Direct, _) => {
                return Err(Error::invalid(
                    "invalid_members",
                    "a direct conversation has exactly two members",
                ));
            }
            (ConversationKind::Group, _) => None,
        };
        sqlx::query(
            "INSERT INTO conversations (id, tenant_id, kind, name, direct_key, created_by, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(conv.id.0)
        .bind(self.tenant.0)
        .bind(c.kind.as_str())
        .bind(&c.name)
        .bind(key)
        .bind(c.created_by.0)
        .bind(millis(at))
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO conversation_members (conversation_id, user_id, tenant_id, role, joined_at) ",
        );
        q.push_values(&c.members, |mut b, (user, role)| {
            b.push_bind(conv.id.0)
                .push_bind(user.0)
                .push_bind(self.tenant.0)
                .push_bind(role.as_str())
                .push_bind(millis(at));
        });
        q.build().execute(&mut *self.tx).await.map_err(db_err)?;
        Ok(conv)
    }

    async fn direct_between(&mut self, a: UserId, b: UserId) -> Result<Option<Conversation>> {
        sqlx::query(&format!(
            "SELECT {CONV_COLS} FROM {CONV_FROM} WHERE c.tenant_id = ? AND c.direct_key = ?"
        ))
        .bind(self.tenant.0)
        .bind(direct_key(a, b))
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(conv_from_row)
        .transpose()
    }

    async fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>> {
        sqlx::query(&format!(
            "SELECT {CONV_COLS} FROM {CONV_FROM} WHERE c.tenant_id = ? AND c.id = ?"
        ))
        .bind(self.tenant.0)
        .bind(id.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(conv_from_row)
        .transpose()
    }

    async fn rename_conversation(&mut self, id: ConversationId, name: &str) -> Result<()> {
        sqlx::query("UPDATE conversations SET name = ? WHERE tenant_id = ? AND id = ?")
            .bind(name)
            .bind(self.tenant.0)
            .bind(id.0)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn members(&mut self, conv: ConversationId) -> Result<Vec<Member>> {
        let rows = sqlx::query(&format!(
            "SELECT me.user_id, u.display_name, me.role, r.seq AS last_read_seq, me.joined_at
                   FROM conversation_members me JOIN users u ON u.id = me.user_id {READ_JOIN}
                  WHERE me.tenant_id = ? AND me.conversation_id = ?
                  ORDER BY me.joined_at, me.user_id"
        ))
        .bind(self.tenant.0)
        .bind(conv.0)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter().map(member_from_row).collect()
    }

    async fn contacts(&mut self, user: UserId) -> Result<Vec<UserId>> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT o.user_id
               FROM conversation_members me
               JOIN conversation_members o ON o.conversation_id = me.conversation_id
              WHERE me.user_id = ?1 AND me.tenant_id = ?2 AND o.user_id <> ?1",
        )
        .bind(user.0)
        .bind(self.tenant.0)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(ids.into_iter().map(UserId).collect())
    }

    async fn member(&mut self, conv: ConversationId, user: UserId) -> Result<Option<Member>> {
        sqlx::query(&format!(
            "SELECT me.user_id, u.display_name, me.role, r.seq AS last_read_seq, me.joined_at
                   FROM conversation_members me JOIN users u ON u.id = me.user_id {READ_JOIN}
                  WHERE me.tenant_id = ? AND me.conversation_id = ? AND me.user_id = ?"
        ))
        .bind(self.tenant.0)
        .bind(conv.0)
        .bind(user.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(member_from_row)
        .transpose()
    }

    async fn upsert_member(
        &mut self,
        conv: ConversationId,
        user: UserId,
        role: MemberRole,
    ) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id, tenant_id, role, joined_at)
             SELECT c.id, ?, c.tenant_id, ?, ?
               FROM conversations c WHERE c.tenant_id = ? AND c.id = ?
             ON CONFLICT (conversation_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(user.0)
        .bind(role.as_str())
        .bind(millis(now()))
        .bind(self.tenant.0)
        .bind(conv.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("conversation"));
        }
        Ok(())
    }

    async fn remove_member(&mut self, conv: ConversationId, user: UserId) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM conversation_members WHERE tenant_id = ? AND conversation_id = ? AND user_id = ?",
        )
        .bind(self.tenant.0)
        .bind(conv.0)
        .bind(user.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_conversations(
        &mut self,
        user: UserId,
        before: Option<ActivityCursor>,
        limit: u32,
    ) -> Result<Vec<ConversationSummary>> {
        let (at, id) = match before {
            Some(c) => (Some(millis(c.last_activity_at)), Some(c.id.0)),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "SELECT {CONV_COLS}, r.seq AS last_read_seq,
                    (SELECT count(*) FROM conversation_members x WHERE x.conversation_id = c.id) AS member_count,
                    lm.id AS lm_id, lm.sender_id AS lm_sender_id, lm.content AS lm_content,
                    lm.idempotency_key AS lm_idempotency_key, lm.created_at AS lm_created_at
               FROM conversation_members me {READ_JOIN}
               JOIN conversations c ON c.id = me.conversation_id {HEAD_JOIN}
               LEFT JOIN messages lm ON lm.conversation_id = c.id AND lm.seq = h.seq
              WHERE me.user_id = ?1 AND me.tenant_id = ?2 AND c.tenant_id = ?2
                AND (?3 IS NULL OR (h.at, c.id) < (?3, ?4))
              ORDER BY h.at DESC, c.id DESC
              LIMIT ?5"
        ))
        .bind(user.0)
        .bind(self.tenant.0)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let conversation = conv_from_row(r)?;
                let read: i64 = r.try_get("last_read_seq").map_err(db_err)?;
                let lm_id: Option<Uuid> = r.try_get("lm_id").map_err(db_err)?;
                let last_message = match lm_id {
                    None => None,
                    Some(mid) => Some(Message {
                        id: MessageId(mid),
                        conversation_id: conversation.id,
                        sender_id: UserId(r.try_get("lm_sender_id").map_err(db_err)?),
                        seq: conversation.last_seq,
                        content: r.try_get("lm_content").map_err(db_err)?,
                        idempotency_key: r.try_get("lm_idempotency_key").map_err(db_err)?,
                        created_at: from_millis(r.try_get("lm_created_at").map_err(db_err)?),
                    }),
                };
                Ok(ConversationSummary {
                    unread_count: (conversation.last_seq - read).max(0),
                    member_count: r.try_get("member_count").map_err(db_err)?,
                    conversation,
                    last_message,
                })
            })
            .collect()
    }

    async fn append_message(&mut self, m: &NewMessage) -> Result<Appended> {
        if let Some(key) = &m.idempotency_key {
            let existing = sqlx::query(&format!(
                "SELECT {MESSAGE_COLS} FROM messages
                  WHERE conversation_id = ? AND sender_id = ? AND idempotency_key = ? AND tenant_id = ?
                    AND idempotency_key IS NOT NULL"
            ))
            .bind(m.conversation_id.0)
            .bind(m.sender_id.0)
            .bind(key)
            .bind(self.tenant.0)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(db_err)?;
            if let Some(r) = existing {
                return Ok(Appended::Existing(message_from_row(&r)?));
            }
        }
        // One statement: the sequence is read under the single writer, membership is
        // checked by the join, and the trigger moves the conversation and read marker.
        let row: Option<(i64, i64)> = sqlx::query_as(concat!(
            "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, idempotency_key, created_at)
             SELECT ?1, c.tenant_id, c.id, me.user_id, h.seq + 1, ?2, ?3, ?4
               FROM conversations c ",
            head_join!(),
            "
               JOIN conversation_members me ON me.conversation_id = c.id AND me.user_id = ?5
              WHERE c.tenant_id = ?6 AND c.id = ?7
             RETURNING seq, (SELECT members_version FROM conversations WHERE id = ?7)",
        ))
        .bind(m.id.0)
        .bind(&m.content)
        .bind(&m.idempotency_key)
        .bind(millis(m.created_at))
        .bind(m.sender_id.0)
        .bind(self.tenant.0)
        .bind(m.conversation_id.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?;
        let (seq, members_version) = row.ok_or(Error::NotFound("conversation"))?;
        Ok(Appended::Created {
            message: Message {
                id: m.id,
                conversation_id: m.conversation_id,
                sender_id: m.sender_id,
                seq,
                content: m.content.clone(),
                idempotency_key: m.idempotency_key.clone(),
                created_at: m.created_at,
            },
            members_version: Some(members_version),
        })
    }

    async fn messages(
        &mut self,
        conv: ConversationId,
        window: SeqWindow,
        limit: u32,
    ) -> Result<Vec<Message>> {
        let (cond, order, bound) = match window {
            SeqWindow::Latest => ("", "DESC", None),
            SeqWindow::Before(s) => ("AND seq < ?", "DESC", Some(s)),
            SeqWindow::After(s) => ("AND seq > ?", "ASC", Some(s)),
        };
        let sql = format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = ? AND tenant_id = ? {cond}
              ORDER BY seq {order} LIMIT ?"
        );
        let mut q = sqlx::query(&sql).bind(conv.0).bind(self.tenant.0);
        if let Some(b) = bound {
            q = q.bind(b);
        }
        let rows = q
            .bind(limit)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db_err)?;
        let mut out: Vec<Message> = rows.iter().map(message_from_row).collect::<Result<_>>()?;
        if order == "DESC" {
            out.reverse();
        }
        Ok(out)
    }

    async fn mark_read(&mut self, conv: ConversationId, user: UserId, seq: i64) -> Result<i64> {
        sqlx::query_scalar(concat!(
            "UPDATE conversation_state
                SET seq = max(seq, min(?1, (SELECT h.seq FROM conversation_state h
                                             WHERE h.conversation_id = ?2 AND h.user_id = ",
            head_user!(),
            ")))
              WHERE conversation_id = ?2 AND user_id = ?4
                AND EXISTS (SELECT 1 FROM conversation_members m
                             WHERE m.conversation_id = ?2 AND m.user_id = ?4 AND m.tenant_id = ?3)
              RETURNING seq",
        ))
        .bind(seq)
        .bind(conv.0)
        .bind(self.tenant.0)
        .bind(user.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .ok_or(Error::NotFound("conversation"))
    }

    async fn search(
        &mut self,
        user: UserId,
        conv: Option<ConversationId>,
        terms: &[String],
        offset: u32,
        limit: u32,
    ) -> Result<Vec<SearchHit>> {
        // Terms are letters and digits only (see core's `search_terms`), so quoting
        // them cannot inject FTS5 syntax.
        let expr = terms
            .iter()
            .map(|t| format!("\"{}\"*", french_prefix_stem(t)))
            .collect::<Vec<_>>()
            .join(" ");
        // Every message committed before this call is indexed first, so a search finds
        // what its caller was told is stored.
        self.index.catch_up(&mut self.tx).await?;
        // The inner query walks matches newest first (FTS5 serves rowid order) and
        // keeps the first SEARCH_RANK_WINDOW the user may see; only those are ranked.
        let rows = sqlx::query(
            "SELECT * FROM (
                SELECT m.pk, m.id, m.conversation_id, m.sender_id, m.seq, m.content,
                       m.idempotency_key, m.created_at, bm25(messages_fts) AS score
                  FROM search.messages_fts
                  JOIN messages m ON m.pk = messages_fts.rowid
                 WHERE messages_fts MATCH ?1 AND m.tenant_id = ?2
                   AND m.conversation_id IN (SELECT conversation_id FROM conversation_members
                                              WHERE user_id = ?3 AND tenant_id = ?2)
                   AND (?4 IS NULL OR m.conversation_id = ?4)
                 ORDER BY messages_fts.rowid DESC
                 LIMIT ?7)
              ORDER BY score, pk DESC
              LIMIT ?5 OFFSET ?6",
        )
        .bind(expr)
        .bind(self.tenant.0)
        .bind(user.0)
        .bind(conv.map(|c| c.0))
        .bind(limit)
        .bind(offset)
        .bind(SEARCH_RANK_WINDOW)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                Ok(SearchHit {
                    message: message_from_row(r)?,
                    // bm25 is lower-is-better; expose higher-is-better.
                    rank: -r.try_get::<f64, _>("score").map_err(db_err)?,
                })
            })
            .collect()
    }

    // ---- notifications -----------------------------------------------------------

    async fn active_user_ids(&mut self) -> Result<Vec<UserId>> {
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM users WHERE tenant_id = ? AND active = 1 ORDER BY id",
        )
        .bind(self.tenant.0)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(UserId).collect())
    }

    async fn insert_notifications(&mut self, rows: &[Notification]) -> Result<Vec<NotificationId>> {
        let mut stored = Vec::with_capacity(rows.len());
        // 11 parameters a row: chunks stay far below SQLite's 32,766 bound. The join
        // keeps recipients to users of this tenant; the unique key index skips
        // duplicates, and the trigger moves each recipient's unread counter.
        for chunk in rows.chunks(NOTIFICATION_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "WITH r(id, user_id, kind, title, body, link, data, key, created_at, read_at) AS (",
            );
            let mut data = Vec::with_capacity(chunk.len());
            for n in chunk {
                data.push(
                    serde_json::to_string(&n.data).map_err(|e| Error::Storage(e.to_string()))?,
                );
            }
            q.push_values(chunk.iter().zip(&data), |mut b, (n, d)| {
                b.push_bind(n.id.0)
                    .push_bind(n.user_id.0)
                    .push_bind(n.kind.as_str())
                    .push_bind(n.title.as_str())
                    .push_bind(n.body.as_str())
                    .push_bind(n.link.as_deref())
                    .push_bind(d.as_str())
                    .push_bind(n.key.as_deref())
                    .push_bind(millis(n.created_at))
                    .push_bind(n.read_at.map(millis));
            });
            q.push(
                ") INSERT INTO notifications
                     (id, tenant_id, user_id, kind, title, body, link, data, key, created_at, read_at)
                   SELECT r.id, u.tenant_id, r.user_id, r.kind, r.title, r.body, r.link, r.data,
                          r.key, r.created_at, r.read_at
                     FROM r CROSS JOIN users u ON u.id = r.user_id
                    WHERE u.tenant_id = ",
            );
            q.push_bind(self.tenant.0);
            q.push(" ON CONFLICT DO NOTHING RETURNING id");
            let ids: Vec<Uuid> = q
                .build_query_scalar()
                .fetch_all(&mut *self.tx)
                .await
                .map_err(db_err)?;
            stored.extend(ids.into_iter().map(NotificationId));
        }
        Ok(stored)
    }

    async fn notifications(
        &mut self,
        user: UserId,
        before: Option<NotificationId>,
        unread_only: bool,
        limit: u32,
    ) -> Result<Vec<Notification>> {
        let unread = if unread_only {
            "AND read_at IS NULL"
        } else {
            ""
        };
        let rows = sqlx::query(&format!(
            "SELECT {NOTIFICATION_COLS} FROM notifications
              WHERE user_id = ?1 AND tenant_id = ?2 AND (?3 IS NULL OR id < ?3) {unread}
              ORDER BY id DESC LIMIT ?4"
        ))
        .bind(user.0)
        .bind(self.tenant.0)
        .bind(before.map(|b| b.0))
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter().map(notification_from_row).collect()
    }

    async fn notification(
        &mut self,
        user: UserId,
        id: NotificationId,
    ) -> Result<Option<Notification>> {
        sqlx::query(&format!(
            "SELECT {NOTIFICATION_COLS} FROM notifications
              WHERE id = ? AND user_id = ? AND tenant_id = ?"
        ))
        .bind(id.0)
        .bind(user.0)
        .bind(self.tenant.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(notification_from_row)
        .transpose()
    }

    async fn notification_unread_counts(&mut self, users: &[UserId]) -> Result<Vec<(UserId, i64)>> {
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(ID_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT user_id, unread FROM notification_counters WHERE tenant_id = ",
            );
            q.push_bind(self.tenant.0).push(" AND user_id IN (");
            push_ids(&mut q, chunk.iter().map(|u| u.0));
            q.push(")");
            for r in q.build().fetch_all(&mut *self.tx).await.map_err(db_err)? {
                out.push((
                    UserId(r.try_get("user_id").map_err(db_err)?),
                    r.try_get("unread").map_err(db_err)?,
                ));
            }
        }
        Ok(out)
    }

    async fn mark_notifications_read(
        &mut self,
        user: UserId,
        ids: Option<&[NotificationId]>,
        at: DateTime<Utc>,
    ) -> Result<u64> {
        let Some(ids) = ids else {
            let done = sqlx::query(
                "UPDATE notifications SET read_at = ?
                  WHERE user_id = ? AND tenant_id = ? AND read_at IS NULL",
            )
            .bind(millis(at))
            .bind(user.0)
            .bind(self.tenant.0)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
            return Ok(done.rows_affected());
        };
        let mut changed = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("UPDATE notifications SET read_at = ");
            q.push_bind(millis(at))
                .push(" WHERE user_id = ")
                .push_bind(user.0)
                .push(" AND tenant_id = ")
                .push_bind(self.tenant.0)
                .push(" AND read_at IS NULL AND id IN (");
            push_ids(&mut q, chunk.iter().map(|id| id.0));
            q.push(")");
            changed += q
                .build()
                .execute(&mut *self.tx)
                .await
                .map_err(db_err)?
                .rows_affected();
        }
        Ok(changed)
    }

    async fn delete_notification(&mut self, user: UserId, id: NotificationId) -> Result<bool> {
        let done =
            sqlx::query("DELETE FROM notifications WHERE id = ? AND user_id = ? AND tenant_id = ?")
                .bind(id.0)
                .bind(user.0)
                .bind(self.tenant.0)
                .execute(&mut *self.tx)
                .await
                .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn user_notification_prefs(
        &mut self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, NotificationPrefs)>> {
        let mut out = Vec::new();
        for chunk in users.chunks(ID_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT user_id, prefs FROM notification_prefs WHERE tenant_id = ",
            );
            q.push_bind(self.tenant.0).push(" AND user_id IN (");
            push_ids(&mut q, chunk.iter().map(|u| u.0));
            q.push(")");
            for r in q.build().fetch_all(&mut *self.tx).await.map_err(db_err)? {
                let prefs: String = r.try_get("prefs").map_err(db_err)?;
                out.push((
                    UserId(r.try_get("user_id").map_err(db_err)?),
                    prefs_from_json(&prefs)?,
                ));
            }
        }
        Ok(out)
    }

    async fn set_user_notification_prefs(
        &mut self,
        user: UserId,
        prefs: &NotificationPrefs,
    ) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO notification_prefs (user_id, tenant_id, prefs, updated_at)
             SELECT id, tenant_id, ?1, ?2 FROM users WHERE id = ?3 AND tenant_id = ?4
             ON CONFLICT (user_id) DO UPDATE SET prefs = excluded.prefs, updated_at = excluded.updated_at",
        )
        .bind(prefs_to_json(prefs)?)
        .bind(millis(now()))
        .bind(user.0)
        .bind(self.tenant.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("user"));
        }
        Ok(())
    }

    async fn tenant_notification_prefs(&mut self) -> Result<Option<NotificationPrefs>> {
        let prefs: Option<Option<String>> = sqlx::query_scalar(
            "SELECT notification_prefs FROM tenant_settings WHERE tenant_id = ?",
        )
        .bind(self.tenant.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?;
        prefs.flatten().as_deref().map(prefs_from_json).transpose()
    }

    async fn set_tenant_notification_prefs(&mut self, prefs: &NotificationPrefs) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenant_settings (tenant_id, notification_prefs, updated_at) VALUES (?, ?, ?)
             ON CONFLICT (tenant_id) DO UPDATE
                SET notification_prefs = excluded.notification_prefs, updated_at = excluded.updated_at",
        )
        .bind(self.tenant.0)
        .bind(prefs_to_json(prefs)?)
        .bind(millis(now()))
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    // ---- unread digest -----------------------------------------------------------

    async fn digest_candidates(
        &mut self,
        unread_since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        let rows: Vec<Uuid> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT me.user_id
               FROM {CONV_FROM}
               JOIN conversation_members me ON me.conversation_id = c.id
               {READ_JOIN}
               JOIN users u ON u.id = me.user_id
               JOIN messages first ON first.conversation_id = c.id AND first.seq = r.seq + 1
               LEFT JOIN digest_state d ON d.user_id = me.user_id AND d.tenant_id = ?1
              WHERE c.tenant_id = ?1 AND me.tenant_id = ?1 AND u.tenant_id = ?1 AND u.active = 1
                AND h.seq > r.seq
                AND first.created_at <= ?2
                AND (d.sent_through IS NULL
                     OR (h.at > d.sent_through AND d.sent_through <= ?2))
              LIMIT ?3"
        ))
        .bind(self.tenant.0)
        .bind(millis(unread_since))
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(UserId).collect())
    }

    async fn unread_digest(
        &mut self,
        user: UserId,
        max_conversations: u32,
        max_messages: u32,
    ) -> Result<Vec<DigestEntry>> {
        let convs = sqlx::query(&format!(
            "SELECT c.id, c.kind, c.name, h.seq AS last_seq, r.seq AS last_read_seq,
                    (SELECT ou.display_name FROM conversation_members o
                       JOIN users ou ON ou.id = o.user_id
                      WHERE o.conversation_id = c.id AND o.user_id <> ?1
                      ORDER BY o.joined_at, o.user_id LIMIT 1) AS other_name
               FROM conversation_members me {READ_JOIN}
               JOIN conversations c ON c.id = me.conversation_id {HEAD_JOIN}
               LEFT JOIN digest_state d ON d.user_id = me.user_id AND d.tenant_id = ?2
              WHERE me.user_id = ?1 AND me.tenant_id = ?2 AND c.tenant_id = ?2
                AND h.seq > r.seq
                AND (d.sent_through IS NULL OR h.at > d.sent_through)
              ORDER BY h.at DESC, c.id DESC
              LIMIT ?3"
        ))
        .bind(user.0)
        .bind(self.tenant.0)
        .bind(max_conversations)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        let mut out = Vec::with_capacity(convs.len());
        for c in &convs {
            let id: Uuid = c.try_get("id").map_err(db_err)?;
            let last_seq: i64 = c.try_get("last_seq").map_err(db_err)?;
            let read: i64 = c.try_get("last_read_seq").map_err(db_err)?;
            let kind = ConversationKind::parse(c.try_get("kind").map_err(db_err)?)?;
            let title: Option<String> = match kind {
                ConversationKind::Direct => c.try_get("other_name").map_err(db_err)?,
                ConversationKind::Group => c.try_get("name").map_err(db_err)?,
            };
            let rows = sqlx::query(
                "SELECT u.display_name, m.content, m.created_at
                   FROM messages m JOIN users u ON u.id = m.sender_id
                  WHERE m.conversation_id = ? AND m.tenant_id = ? AND m.seq > ?
                  ORDER BY m.seq DESC LIMIT ?",
            )
            .bind(id)
            .bind(self.tenant.0)
            .bind(read)
            .bind(max_messages)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db_err)?;
            let mut messages = rows
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get("display_name").map_err(db_err)?,
                        r.try_get("content").map_err(db_err)?,
                        from_millis(r.try_get("created_at").map_err(db_err)?),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            messages.reverse();
            out.push(DigestEntry {
                conversation_id: ConversationId(id),
                title: title.unwrap_or_default(),
                unread: last_seq - read,
                messages,
            });
        }
        Ok(out)
    }

    async fn set_digest_sent(&mut self, user: UserId, at: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO digest_state (user_id, tenant_id, sent_through)
             SELECT id, tenant_id, ?1 FROM users WHERE id = ?2 AND tenant_id = ?3
             ON CONFLICT (user_id) DO UPDATE SET sent_through = excluded.sent_through",
        )
        .bind(millis(at))
        .bind(user.0)
        .bind(self.tenant.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    // ---- training sessions -------------------------------------------------------

    async fn insert_session(&mut self, s: &TrainingSession) -> Result<()> {
        let sql = format!(
            "INSERT INTO training_sessions (tenant_id, {SESSION_COLS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        );
        let q = sqlx::query(&sql);
        bind_session(q, self.tenant, s)?
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn session(&mut self, id: SessionId) -> Result<Option<TrainingSession>> {
        sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM training_sessions WHERE id = ? AND tenant_id = ?"
        ))
        .bind(id.0)
        .bind(self.tenant.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(session_from_row)
        .transpose()
    }

    async fn lock_session(
        &mut self,
        id: SessionId,
        _exclusive: bool,
    ) -> Result<Option<TrainingSession>> {
        // One writer at a time: a read in a write unit of work is already exclusive.
        self.session(id).await
    }

    async fn update_session(&mut self, s: &TrainingSession) -> Result<bool> {
        let q = sqlx::query(
            "UPDATE training_sessions
                SET title = ?3, kind = ?4, description = ?5, location = ?6, start_at = ?7,
                    end_at = ?8, organizer_id = ?9, status = ?10, reminder_offsets = ?11,
                    cancel_reason = ?12, created_at = ?13, updated_at = ?14
              WHERE tenant_id = ?1 AND id = ?2",
        );
        let done = bind_session(q, self.tenant, s)?
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_sessions(
        &mut self,
        filter: &SessionFilter,
        limit: u32,
    ) -> Result<Vec<TrainingSession>> {
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {SESSION_COLS} FROM training_sessions s WHERE s.tenant_id = "
        ));
        q.push_bind(self.tenant.0);
        if !filter.include_cancelled {
            q.push(" AND s.status = 'scheduled'");
        }
        if let Some(from) = filter.from {
            q.push(" AND s.start_at >= ").push_bind(millis(from));
        }
        if let Some(to) = filter.to {
            q.push(" AND s.start_at < ").push_bind(millis(to));
        }
        if let Some((at, id)) = filter.after {
            q.push(" AND (s.start_at, s.id) > (")
                .push_bind(millis(at))
                .push(", ")
                .push_bind(id.0)
                .push(")");
        }
        if let Some(user) = filter.involving {
            q.push(" AND (s.organizer_id = ")
                .push_bind(user.0)
                .push(
                    " OR EXISTS (SELECT 1 FROM training_invitees i
                                  WHERE i.session_id = s.id AND i.user_id = ",
                )
                .push_bind(user.0)
                .push(" AND i.tenant_id = ")
                .push_bind(self.tenant.0)
                .push("))");
        }
        q.push(" ORDER BY s.start_at, s.id LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(&mut *self.tx).await.map_err(db_err)?;
        rows.iter().map(session_from_row).collect()
    }

    async fn add_invitees(&mut self, session: SessionId, users: &[UserId]) -> Result<Vec<UserId>> {
        let mut added = Vec::new();
        let at = millis(now());
        for chunk in users.chunks(ID_CHUNK) {
            // Only users of this tenant, only into a session of this tenant.
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO training_invitees (session_id, user_id, tenant_id, response, responded_at, invited_at)
                 SELECT s.id, u.id, s.tenant_id, 'pending', NULL, ",
            );
            q.push_bind(at)
                .push(" FROM training_sessions s JOIN users u ON u.tenant_id = s.tenant_id WHERE s.id = ")
                .push_bind(session.0)
                .push(" AND s.tenant_id = ")
                .push_bind(self.tenant.0)
                .push(" AND u.id IN (");
            push_ids(&mut q, chunk.iter().map(|u| u.0));
            q.push(") ON CONFLICT DO NOTHING RETURNING user_id");
            let ids: Vec<Uuid> = q
                .build_query_scalar()
                .fetch_all(&mut *self.tx)
                .await
                .map_err(db_err)?;
            added.extend(ids.into_iter().map(UserId));
        }
        Ok(added)
    }

    async fn remove_invitees(
        &mut self,
        session: SessionId,
        users: &[UserId],
    ) -> Result<Vec<UserId>> {
        let mut removed = Vec::new();
        for chunk in users.chunks(ID_CHUNK) {
            let mut q =
                QueryBuilder::<Sqlite>::new("DELETE FROM training_invitees WHERE session_id = ");
            q.push_bind(session.0)
                .push(" AND tenant_id = ")
                .push_bind(self.tenant.0)
                .push(" AND user_id IN (");
            push_ids(&mut q, chunk.iter().map(|u| u.0));
            q.push(") RETURNING user_id");
            let ids: Vec<Uuid> = q
                .build_query_scalar()
                .fetch_all(&mut *self.tx)
                .await
                .map_err(db_err)?;
            removed.extend(ids.into_iter().map(UserId));
        }
        Ok(removed)
    }

    async fn invitees(&mut self, session: SessionId) -> Result<Vec<Invitee>> {
        let rows = sqlx::query(
            "SELECT i.user_id, u.display_name, i.response, i.responded_at
               FROM training_invitees i JOIN users u ON u.id = i.user_id
              WHERE i.session_id = ?1 AND i.tenant_id = ?2 AND u.tenant_id = ?2
              ORDER BY u.display_name, i.user_id",
        )
        .bind(session.0)
        .bind(self.tenant.0)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                Ok(Invitee {
                    user_id: UserId(r.try_get("user_id").map_err(db_err)?),
                    display_name: r.try_get("display_name").map_err(db_err)?,
                    response: Attendance::parse(r.try_get("response").map_err(db_err)?)
                        .map_err(|e| Error::Storage(e.to_string()))?,
                    responded_at: r
                        .try_get::<Option<i64>, _>("responded_at")
                        .map_err(db_err)?
                        .map(from_millis),
                })
            })
            .collect()
    }

    async fn set_response(
        &mut self,
        session: SessionId,
        user: UserId,
        response: Attendance,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE training_invitees SET response = ?, responded_at = ?
              WHERE session_id = ? AND user_id = ? AND tenant_id = ?",
        )
        .bind(response.as_str())
        .bind(millis(at))
        .bind(session.0)
        .bind(user.0)
        .bind(self.tenant.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }
}

/// Pushes `ids` as the bound items of an `IN (...)` list already opened in `q`.
fn push_ids(q: &mut QueryBuilder<'_, Sqlite>, ids: impl Iterator<Item = Uuid>) {
    let mut sep = q.separated(", ");
    for id in ids {
        sep.push_bind(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tenant: TenantId, conv: ConversationId, sender: UserId, key: &str) -> AppendRequest {
        AppendRequest {
            tenant,
            msg: NewMessage {
                id: MessageId::new(),
                conversation_id: conv,
                sender_id: sender,
                content: format!("message {key}"),
                idempotency_key: Some(key.to_owned()),
                created_at: now(),
            },
        }
    }

    /// The tenant `sdis13` with one member, and the open transaction that made them.
    async fn tenant_with_one_user(
        store: &SqliteStore,
    ) -> (mindsp_core::model::Tenant, UserId, Box<dyn TenantTx>) {
        let t = store.create_tenant("sdis13", "SDIS 13").await.unwrap();
        let mut tx = store.begin(t.id).await.unwrap();
        let user = NewUser {
            email: "sp@sdis13.fr".into(),
            display_name: "Sapeur".into(),
            role: Role::Member,
            password_hash: String::new(),
        };
        let a = tx.insert_user(&user).await.unwrap().id;
        (t, a, tx)
    }

    /// A group "Garde" with `owner` as its only member.
    async fn group_of(tx: &mut dyn TenantTx, owner: UserId) -> ConversationId {
        tx.insert_conversation(&NewConversation {
            kind: ConversationKind::Group,
            name: Some("Garde".into()),
            created_by: owner,
            members: vec![(owner, MemberRole::Owner)],
        })
        .await
        .unwrap()
        .id
    }

    /// Two tenants with two users each, a group of the first user with a message sent
    /// under the key `k1`, and a batch that asks for every answer a batch can give.
    async fn batch_fixture(store: &SqliteStore) -> (Appended, [AppendRequest; 6]) {
        let mut people = Vec::new();
        let mut tenants = Vec::new();
        for slug in ["sdis13", "sdis84"] {
            let t = store.create_tenant(slug, slug).await.unwrap();
            let mut tx = store.begin(t.id).await.unwrap();
            for i in 0..2 {
                let user = NewUser {
                    email: format!("sp{i}@{slug}.fr"),
                    display_name: format!("Sapeur {i}"),
                    role: Role::Member,
                    password_hash: String::new(),
                };
                people.push(tx.insert_user(&user).await.unwrap().id);
            }
            tx.commit().await.unwrap();
            tenants.push(t.id);
        }
        let (a, b, stranger) = (people[0], people[1], people[2]);
        let mut tx = store.begin(tenants[0]).await.unwrap();
        let conv = group_of(tx.as_mut(), a).await;
        tx.commit().await.unwrap();
        let first = store
            .append(tenants[0], &request(tenants[0], conv, a, "k1").msg)
            .await
            .unwrap();
        let batch = [
            request(tenants[0], conv, a, "k1"), // stored before: that message
            request(tenants[0], conv, a, "k2"), // new: seq 2
            request(tenants[0], conv, a, "k2"), // repeated within the batch
            request(tenants[0], conv, b, "k3"), // not a member
            request(tenants[1], conv, stranger, "k4"), // another tenant
            request(tenants[1], conv, a, "k1"), // another tenant asking for a stored key
        ];
        (first, batch)
    }

    fn assert_batch_answers(first: &Appended, answers: &[Result<Appended>]) {
        let seq = |i: usize| match &answers[i] {
            Ok(Appended::Created { message, .. }) => ("created", message.seq),
            Ok(Appended::Existing(m)) => ("existing", m.seq),
            Err(Error::NotFound(_)) => ("not found", 0),
            Err(e) => panic!("answer {i}: {e:?}"),
        };
        assert_eq!(first.message().seq, 1);
        assert_eq!(seq(0), ("existing", 1));
        assert_eq!(seq(1), ("created", 2));
        assert_eq!(seq(2), ("existing", 2));
        assert_eq!(seq(3), ("not found", 0));
        assert_eq!(seq(4), ("not found", 0));
        assert_eq!(seq(5), ("not found", 0));
    }

    /// The batch answers repeated keys, non-members and other tenants by itself: the
    /// whole batch commits (`Ok`), instead of failing on the unique index and falling
    /// back to one transaction per message, which would give the same answers slowly.
    /// In memory, through the write pool's connection.
    #[tokio::test]
    async fn a_batch_answers_known_keys_and_strangers_without_falling_back() {
        let store = SqliteStore::open(SqliteConfig::memory()).await.unwrap();
        let (first, batch) = batch_fixture(&store).await;
        let appender = Appender {
            pool: store.pool().clone(),
            turn: store.turn.clone(),
            index: store.index.clone(),
        };
        let answers = appender.append_batch(&batch).await.expect("batch commits");
        assert_batch_answers(&first, &answers);
    }

    /// The same on a file, through the append thread's transaction.
    #[tokio::test]
    async fn a_batch_on_the_append_connection_answers_the_same() {
        let dir = std::env::temp_dir().join(format!("mindsp-batch-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("batch.db").to_string_lossy().into_owned();
        let store = SqliteStore::open(SqliteConfig::file(&path)).await.unwrap();
        let (first, batch) = batch_fixture(&store).await;
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let answers = append::append_in_transaction(&mut conn, &batch).expect("batch commits");
        assert_batch_answers(&first, &answers);
        drop(conn);
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Appends (on their own connection) and units of work (on the write pool's) take
    /// turns: a unit of work that reads before it writes, while appends commit
    /// continuously, neither fails with `SQLITE_BUSY` nor waits out the busy timeout,
    /// and every acknowledged append is stored, numbered without gaps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_and_units_of_work_take_turns() {
        let dir = std::env::temp_dir().join(format!("mindsp-turns-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("turns.db").to_string_lossy().into_owned();
        let store = SqliteStore::open(SqliteConfig::file(&path)).await.unwrap();
        let (t, a, mut tx) = tenant_with_one_user(&store).await;
        let conv = group_of(tx.as_mut(), a).await;
        tx.commit().await.unwrap();

        const SENDERS: usize = 8;
        const EACH: usize = 100;
        let mut appends = Vec::new();
        for s in 0..SENDERS {
            let store = store.clone();
            appends.push(tokio::spawn(async move {
                for i in 0..EACH {
                    store
                        .append(t.id, &request(t.id, conv, a, &format!("{s}-{i}")).msg)
                        .await
                        .expect("append");
                }
            }));
        }
        let mut units = Vec::new();
        for _ in 0..2 {
            let store = store.clone();
            units.push(tokio::spawn(async move {
                let mut marked = 0;
                while marked < 40 {
                    let mut tx = store.begin(t.id).await.expect("begin");
                    // Read first (this snapshot is what an append committed meanwhile
                    // would make stale), then write.
                    let head = tx.conversation(conv).await.expect("read").unwrap().last_seq;
                    tx.mark_read(conv, a, head)
                        .await
                        .expect("write after a read");
                    tx.commit().await.expect("commit");
                    marked += 1;
                    tokio::task::yield_now().await;
                }
            }));
        }
        for task in appends.into_iter().chain(units) {
            task.await.unwrap();
        }

        let mut tx = store.read(t.id).await.unwrap();
        let seqs: Vec<i64> = tx
            .messages(conv, SeqWindow::Latest, 1000)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs.len(), SENDERS * EACH);
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=(SENDERS * EACH) as i64).collect::<Vec<_>>());
        drop(tx);
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A writer stuck with the turn holds the others up for the store's `write_wait`
    /// only: appends (on the thread and in memory), units of work, tenant creation and
    /// `write_turn` itself then fail with a storage error, store nothing, and work again
    /// once the turn is free.
    #[tokio::test]
    async fn writes_give_up_when_the_turn_stays_taken() {
        let dir = std::env::temp_dir().join(format!("mindsp-stuck-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stuck.db").to_string_lossy().into_owned();
        let quick = |mut config: SqliteConfig| {
            config.write_wait = Duration::from_millis(100);
            config
        };
        for store in [
            SqliteStore::open(quick(SqliteConfig::file(&path)))
                .await
                .unwrap(),
            SqliteStore::open(quick(SqliteConfig::memory()))
                .await
                .unwrap(),
        ] {
            let (t, a, mut tx) = tenant_with_one_user(&store).await;
            let conv = group_of(tx.as_mut(), a).await;
            tx.commit().await.unwrap();

            let stuck = store.write_turn().await.unwrap();
            // Each gives up within the wait, far sooner than this.
            async fn busy<T>(write: impl Future<Output = Result<T>>) {
                match tokio::time::timeout(Duration::from_secs(10), write).await {
                    Ok(Err(Error::Storage(text))) => assert!(text.contains("no turn"), "{text}"),
                    Ok(Err(e)) => panic!("expected the busy error, got {e}"),
                    Ok(Ok(_)) => panic!("wrote while another writer held the turn"),
                    Err(_) => panic!("still waiting for the turn after 10 s"),
                }
            }
            busy(store.append(t.id, &request(t.id, conv, a, "stuck").msg)).await;
            // Many at once: their batches fail together, each caller within about one
            // wait (not one wait per request after another: 150 waits would be 15 s).
            let many: Vec<_> = (0..150)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let msg = request(t.id, conv, a, &format!("many-{i}")).msg;
                        busy(store.append(t.id, &msg)).await;
                    })
                })
                .collect();
            for task in many {
                task.await.unwrap();
            }
            busy(store.begin(t.id)).await;
            busy(store.create_tenant("other", "Other")).await;
            busy(store.write_turn()).await;
            drop(stuck);

            let appended = store
                .append(t.id, &request(t.id, conv, a, "free").msg)
                .await
                .expect("the turn is free again");
            assert_eq!(
                appended.message().seq,
                1,
                "the refused append stored nothing"
            );
            store.close().await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// In memory the index is filled inside the search's own transaction, which a read
    /// usually ends without committing: each search still finds every message sent
    /// before it, and the background passes on the one connection do not get in the way.
    #[tokio::test]
    async fn an_in_memory_store_finds_each_message_sent_before_a_search() {
        let store = SqliteStore::open(SqliteConfig::memory()).await.unwrap();
        let (t, a, mut tx) = tenant_with_one_user(&store).await;
        let conv = group_of(tx.as_mut(), a).await;
        tx.commit().await.unwrap();
        let found = |word: &'static str| {
            let store = store.clone();
            async move {
                let mut tx = store.read(t.id).await.unwrap();
                let hits = tx.search(a, None, &[word.into()], 0, 10).await.unwrap();
                hits.len()
            }
        };
        for (i, word) in ["incendie", "secours", "incendie"].into_iter().enumerate() {
            let mut msg = request(t.id, conv, a, &format!("k{i}")).msg;
            msg.content = format!("Départ {word} numéro {i}");
            store.append(t.id, &msg).await.unwrap();
            assert_eq!(found("numero").await, i + 1, "after message {i}");
        }
        assert_eq!(found("incendie").await, 2);
        store.index_search().await.unwrap();
        assert_eq!(found("secours").await, 1);
    }

    /// Sustained appends do not grow the WAL without end: the checkpointer's last step,
    /// on the writer, copies every frame, so SQLite starts the WAL over and overwrites it.
    /// A checkpoint that only ran beside the writer never caught up with it, and the WAL
    /// then held every page each commit wrote, at least one page per message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_sustained_appends() {
        let dir = std::env::temp_dir().join(format!("mindsp-wal-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wal.db");
        let store = SqliteStore::open(SqliteConfig::file(path.to_str().unwrap()))
            .await
            .unwrap();
        let (t, a, mut tx) = tenant_with_one_user(&store).await;
        let mut convs = Vec::new();
        for _ in 0..200 {
            convs.push(group_of(tx.as_mut(), a).await);
        }
        tx.commit().await.unwrap();
        let convs = Arc::new(convs);

        // 32 senders for three seconds (bounded by a count too), over 200 conversations.
        let until = Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for s in 0..32 {
            let (store, convs) = (store.clone(), convs.clone());
            tasks.push(tokio::spawn(async move {
                let mut sent = 0usize;
                while std::time::Instant::now() < until && sent < 20_000 {
                    let conv = convs[(s * 7 + sent * 13) % convs.len()];
                    let msg = request(t.id, conv, a, &format!("{s}-{sent}")).msg;
                    store.append(t.id, &msg).await.unwrap();
                    sent += 1;
                }
                sent
            }));
        }
        let mut sent = 0;
        for task in tasks {
            sent += task.await.unwrap();
        }
        let wal = std::fs::metadata(dir.join("wal.db-wal")).unwrap().len();
        eprintln!("{sent} messages appended; WAL file {wal} bytes");
        assert!(sent > 1000, "too few appends to tell: {sent}");
        // Each commit writes about 2.6 pages per message here (the conversation's index
        // leaves and rows); starting over keeps the WAL to a fraction of a page each.
        assert!(
            wal < sent as u64 * 4096,
            "the WAL grew with every commit: {wal} bytes after {sent} messages"
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database written before migration 0006 keeps every conversation's sequence and
    /// activity and every member's read marker when they move to `conversation_state`,
    /// and appends, reads and new members go on from them.
    #[tokio::test]
    async fn an_existing_database_keeps_its_heads_and_read_markers() {
        let dir = std::env::temp_dir().join(format!("mindsp-upgrade-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.db");
        let (t, a, b, c, conv) = (
            TenantId::new(),
            UserId::new(),
            UserId::new(),
            UserId::new(),
            ConversationId::new(),
        );
        {
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal);
            let pool = SqlitePool::connect_with(options).await.unwrap();
            // The migrations as they were before 0006, through sqlx's public API: a
            // directory holding copies of the first five files.
            let old = dir.join("migrations");
            std::fs::create_dir_all(&old).unwrap();
            let ours = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
            for file in std::fs::read_dir(&ours).unwrap() {
                let name = file.unwrap().file_name();
                if name.to_string_lossy().as_ref() < "0006" {
                    std::fs::copy(ours.join(&name), old.join(&name)).unwrap();
                }
            }
            let before = sqlx::migrate::Migrator::new(old).await.unwrap();
            assert_eq!(before.iter().count(), 5);
            before.run(&pool).await.unwrap();
            sqlx::query("INSERT INTO tenants VALUES (?, 'sdis13', 'SDIS 13', 0)")
                .bind(t.0)
                .execute(&pool)
                .await
                .unwrap();
            for (u, email) in [(a, "a@sdis13.fr"), (b, "b@sdis13.fr"), (c, "c@sdis13.fr")] {
                sqlx::query("INSERT INTO users VALUES (?, ?, ?, ?, 'member', 1, '', 0)")
                    .bind(u.0)
                    .bind(t.0)
                    .bind(email)
                    .bind(email)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            sqlx::query(
                "INSERT INTO conversations (id, tenant_id, kind, name, created_by, created_at, last_activity_at, last_seq)
                 VALUES (?, ?, 'group', 'CIS Aubagne', ?, 1000, 1000, 0)",
            )
            .bind(conv.0)
            .bind(t.0)
            .bind(a.0)
            .execute(&pool)
            .await
            .unwrap();
            for (u, role) in [(a, "owner"), (b, "member")] {
                sqlx::query(
                    "INSERT INTO conversation_members (conversation_id, user_id, tenant_id, role, last_read_seq, joined_at)
                     VALUES (?, ?, ?, ?, 0, 1000)",
                )
                .bind(conv.0)
                .bind(u.0)
                .bind(t.0)
                .bind(role)
                .execute(&pool)
                .await
                .unwrap();
            }
            // Three messages from `a` (the old trigger moves the head and a's marker),
            // of which `b` has read the first.
            for seq in 1..=3i64 {
                sqlx::query(
                    "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, created_at)
                     VALUES (?, ?, ?, ?, ?, 'Départ en intervention', ?)",
                )
                .bind(MessageId::new().0)
                .bind(t.0)
                .bind(conv.0)
                .bind(a.0)
                .bind(seq)
                .bind(1000 + seq * 1000)
                .execute(&pool)
                .await
                .unwrap();
            }
            sqlx::query("UPDATE conversation_members SET last_read_seq = 1 WHERE user_id = ?")
                .bind(b.0)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }

        let store = SqliteStore::open(SqliteConfig::file(path.to_str().unwrap()))
            .await
            .unwrap();
        let mut tx = store.begin(t).await.unwrap();
        let head = tx.conversation(conv).await.unwrap().unwrap();
        assert_eq!(head.last_seq, 3);
        assert_eq!(head.last_activity_at.timestamp_millis(), 4000);
        let markers = |members: Vec<Member>| {
            let mut m: Vec<(UserId, i64)> = members
                .into_iter()
                .map(|m| (m.user_id, m.last_read_seq))
                .collect();
            m.sort();
            m
        };
        let mut expected = vec![(a, 3), (b, 1)];
        expected.sort();
        assert_eq!(markers(tx.members(conv).await.unwrap()), expected);
        let unread = |list: Vec<ConversationSummary>| list[0].unread_count;
        assert_eq!(unread(tx.list_conversations(b, None, 10).await.unwrap()), 2);
        assert_eq!(unread(tx.list_conversations(a, None, 10).await.unwrap()), 0);

        // The sequence goes on; the sender's marker moves, the other's does not.
        let msg = request(t, conv, b, "after").msg;
        assert_eq!(tx.append_message(&msg).await.unwrap().message().seq, 4);
        assert_eq!(unread(tx.list_conversations(a, None, 10).await.unwrap()), 1);
        assert_eq!(unread(tx.list_conversations(b, None, 10).await.unwrap()), 0);
        // A member added now has read up to the head; a removed one leaves no marker.
        tx.upsert_member(conv, c, MemberRole::Member).await.unwrap();
        assert_eq!(tx.member(conv, c).await.unwrap().unwrap().last_read_seq, 4);
        assert!(tx.remove_member(conv, b).await.unwrap());
        assert!(matches!(
            tx.mark_read(conv, b, 4).await,
            Err(Error::NotFound("conversation"))
        ));
        tx.commit().await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_state")
            .fetch_one(&store.read)
            .await
            .unwrap();
        assert_eq!(left, 3, "the head, a's marker and c's marker");
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
