//! PostgreSQL adapter.
//!
//! One pool serves both [`Store::begin`] and [`Store::read`]; PostgreSQL runs readers and
//! writers concurrently, so there is nothing to gain from splitting it. Reads open
//! `READ ONLY` transactions, so writing through one fails.
//!
//! Tenancy has two walls. The first is the same as SQLite's: every query names
//! `tenant_id = $tenant`. The second is row-level security on users, conversations,
//! members and messages: each unit of work starts by setting `mindsp.tenant_id` for its
//! transaction only, and the policies hide and refuse every row of another tenant (and
//! every row at all when no tenant is set). Superusers and `BYPASSRLS` roles ignore
//! row-level security even when it is forced, so when the store connects as one, every
//! serving connection switches to the `mindsp_app` role the migration creates, after
//! migrations ran under the connecting role; [`PgStore::app_role_check`] reports the role
//! queries really run as.
//!
//! Message appends that arrive together are committed together (group commit, see
//! [`Appender`]): one transaction and a fixed number of statements for up to
//! [`MAX_APPEND_BATCH`] messages, each caller answered after that commit.
//!
//! Appends do not write the full-text index: a trigger keeps their messages in
//! `message_search_pending`, which a search reads too, and a background step moves them
//! into the index in bulk (see [`SearchIndex`]).

use std::any::Any;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, Postgres, QueryBuilder, Row, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::common::{
    AppendQueue, AppendRequest, BatchConversation, BatchState, BulkIndex, GroupCommit, db_err,
    direct_key, plan_batch, prefs_from_json, prefs_to_json, spawn_indexer,
};

/// Embedded migrations, exposed so an embedding application can run them itself.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The role serving connections switch to when the connecting role would bypass
/// row-level security. Created by the migration; it cannot log in.
pub const APP_ROLE: &str = "mindsp_app";

/// How to open a PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A `postgres://` URL.
    pub url: String,
    /// Size of the connection pool.
    pub max_connections: u32,
    /// A schema to hold the tables, created if missing and put alone on the
    /// `search_path` of every connection. `None` keeps the server's `search_path`.
    pub schema: Option<String>,
}

impl PgConfig {
    /// A store at `url` with default settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            schema: None,
        }
    }
}

/// The PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    appends: AppendQueue,
    index: Arc<SearchIndex>,
    /// Held by every clone of the store; the indexing step stops once the last is gone.
    _alive: Arc<()>,
}

impl PgStore {
    /// Creates the schema if one is configured, runs pending migrations as the
    /// connecting role, then opens the serving pool.
    ///
    /// Each serving connection checks whether its role bypasses row-level security
    /// (superuser or `BYPASSRLS`); if so it runs `SET ROLE mindsp_app`, which requires
    /// the connecting role to be a member of it (a superuser always is). A role without
    /// either attribute stays itself: the policies are forced, so they bind it too.
    pub async fn open(config: PgConfig) -> Result<Self> {
        let options = PgConnectOptions::from_str(&config.url).map_err(db_err)?;
        let search_path = config
            .schema
            .as_deref()
            .map(|s| format!("SET search_path TO {}", quote_ident(s)));

        // Migrations run on their own connection, before any SET ROLE: the serving role
        // may not create anything.
        let mut conn = PgConnection::connect_with(&options).await.map_err(db_err)?;
        if let Some(schema) = &config.schema {
            match conn
                .execute(&*format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    quote_ident(schema)
                ))
                .await
            {
                // Another process created it concurrently.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {}
                other => {
                    other.map_err(db_err)?;
                }
            }
        }
        if let Some(sql) = &search_path {
            conn.execute(sql.as_str()).await.map_err(db_err)?;
        }
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| Error::Storage(format!("migration failed: {e}")))?;
        conn.close().await.map_err(db_err)?;

        let search_path: Option<Arc<str>> = search_path.map(Into::into);
        let maintenance = Maintenance {
            options: options.clone(),
            search_path: search_path.clone(),
            conn: None,
            can_vacuum: None,
            vacuumed: None,
        };
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            // A failed connection shows at its first query; a ping per unit of work
            // would cost one round trip more on the hot path.
            .test_before_acquire(false)
            .after_connect(move |conn, _meta| {
                let search_path = search_path.clone();
                Box::pin(async move {
                    let bypasses: bool = sqlx::query_scalar(
                        "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                    let mut setup = Vec::new();
                    if let Some(sql) = &search_path {
                        setup.push(sql.to_string());
                    }
                    if bypasses {
                        setup.push(format!("SET ROLE {APP_ROLE}"));
                    }
                    if !setup.is_empty() {
                        conn.execute(&*setup.join("; ")).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(db_err)?;
        let alive = Arc::new(());
        let index = Arc::new(SearchIndex {
            pool: pool.clone(),
            maintenance: tokio::sync::Mutex::new(maintenance),
            wake: Arc::new(Notify::new()),
        });
        spawn_indexer(
            index.clone(),
            index.wake.clone(),
            INDEX_GATHER,
            Arc::downgrade(&alive),
        );
        let appends = AppendQueue::spawn(
            Appender {
                pool: pool.clone(),
                wake: index.wake.clone(),
            },
            MAX_APPEND_BATCH,
            APPEND_QUEUE,
        );
        Ok(Self {
            pool,
            appends,
            index,
            _alive: alive,
        })
    }

    /// The serving pool, for tools and tests that need raw SQL. Its connections run as
    /// the serving role and see no tenant rows until a transaction sets
    /// `mindsp.tenant_id`.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The role a serving connection runs queries as, and whether that role bypasses
    /// row-level security (superuser or `BYPASSRLS`). `false` is what proves the
    /// policies hold for the queries the server really makes.
    pub async fn app_role_check(&self) -> Result<(String, bool)> {
        let row = sqlx::query(
            "SELECT current_user::text AS role, rolsuper OR rolbypassrls AS bypasses
               FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        Ok((
            row.try_get("role").map_err(db_err)?,
            row.try_get("bypasses").map_err(db_err)?,
        ))
    }

    /// Moves every pending message into the full-text index. The store does this by
    /// itself in the background, and a search finds pending messages anyway; this is for
    /// tools that load messages in bulk and want the index complete before measuring.
    pub async fn index_search(&self) -> Result<()> {
        self.index.index_pending().await
    }

    /// Closes the pool and the indexing step's connection.
    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(conn) = self.index.maintenance.lock().await.conn.take() {
            let _ = conn.close().await;
        }
    }

    /// Begins a transaction confined to `tenant`. The tenant goes in the same simple
    /// query as `BEGIN`, which saves a round trip on every unit of work; a UUID's text
    /// form is hex digits and dashes, so it cannot break out of the literal.
    async fn begin_scoped(&self, tenant: TenantId, begin: &str) -> Result<PgTx> {
        begin_scoped(&self.pool, tenant, begin).await
    }
}

/// See [`PgStore::begin_scoped`].
async fn begin_scoped(pool: &PgPool, tenant: TenantId, begin: &str) -> Result<PgTx> {
    let tx = pool
        .begin_with(format!(
            "{begin}; SELECT set_config('mindsp.tenant_id', '{}', true)",
            tenant.0.hyphenated()
        ))
        .await
        .map_err(db_err)?;
    Ok(PgTx { tx, tenant })
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn tenant_from_row(r: &PgRow) -> Result<Tenant> {
    Ok(Tenant {
        id: TenantId(r.try_get("id").map_err(db_err)?),
        slug: r.try_get("slug").map_err(db_err)?,
        name: r.try_get("name").map_err(db_err)?,
        created_at: r.try_get("created_at").map_err(db_err)?,
    })
}

#[async_trait]
impl Store for PgStore {
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
        sqlx::query("INSERT INTO tenants (id, slug, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(t.id.0)
            .bind(&t.slug)
            .bind(&t.name)
            .bind(t.created_at)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(t)
    }

    async fn tenant_by_slug(&self, slug: &str) -> Result<Option<Tenant>> {
        sqlx::query("SELECT id, slug, name, created_at FROM tenants WHERE slug = $1")
            .bind(slug)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .as_ref()
            .map(tenant_from_row)
            .transpose()
    }

    async fn tenant_ids(&self) -> Result<Vec<TenantId>> {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(ids.into_iter().map(TenantId).collect())
    }

    async fn begin(&self, tenant: TenantId) -> Result<Box<dyn TenantTx>> {
        Ok(Box::new(self.begin_scoped(tenant, "BEGIN").await?))
    }

    async fn read(&self, tenant: TenantId) -> Result<Box<dyn TenantTx>> {
        Ok(Box::new(
            self.begin_scoped(tenant, "BEGIN READ ONLY").await?,
        ))
    }

    async fn append(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        self.appends.append(tenant, msg).await
    }
}

/// Most appends committed in one transaction. A larger batch amortises more, but the
/// first caller in it waits for everyone's rows; appends beyond it wait for the next.
pub const MAX_APPEND_BATCH: usize = 256;

/// How long the background indexing step lets appends accumulate after a commit woke
/// it, so that one pass indexes the messages of many commits.
const INDEX_GATHER: Duration = Duration::from_millis(200);

/// Most pending messages moved into the index in one transaction.
const INDEX_CHUNK: i32 = 5000;

/// The full-text index in bulk (migration 0005). A statement-level trigger copies every
/// INSERT's new messages into `message_search_pending`; `mindsp_search` matches those on
/// the fly beside the indexed ones, so a message is found as soon as it is committed,
/// in the search's own snapshot, whatever the isolation level. This step moves them into
/// `message_search` (`mindsp_index_pending`: `to_tsvector`, GIN) outside the appends'
/// transactions, which keeps the pending set small and searches fast.
///
/// The pending table churns: every message is inserted and then deleted. PostgreSQL
/// reclaims the space only by vacuuming, and autovacuum comes too rarely for a table
/// that a search scans, so after moving rows this step vacuums it, on a connection of
/// the connecting role (only a table's owner may vacuum it, and the serving role is not).
struct SearchIndex {
    pool: PgPool,
    maintenance: tokio::sync::Mutex<Maintenance>,
    /// Woken after each commit of appends.
    wake: Arc<Notify>,
}

/// The connection that vacuums `message_search_pending`, opened on first use.
struct Maintenance {
    options: PgConnectOptions,
    search_path: Option<Arc<str>>,
    conn: Option<PgConnection>,
    /// Whether the connecting role may vacuum the table (owner or superuser); checked once.
    can_vacuum: Option<bool>,
    /// When this step last vacuumed.
    vacuumed: Option<std::time::Instant>,
}

/// Least time between two vacuums of `message_search_pending` by one store. A vacuum
/// costs PostgreSQL work whatever it finds, and indexing passes come up to five a second
/// on every node: on the two-node load bench at 200 messages/s, PostgreSQL used 0.33 of
/// a core with a vacuum after every pass and 0.25 with this limit. A second's worth of
/// dead rows is small beside that.
const VACUUM_EVERY: Duration = Duration::from_secs(1);

impl Maintenance {
    /// Vacuums the pending table, if the connecting role may.
    async fn vacuum(&mut self) -> Result<()> {
        if self.can_vacuum == Some(false)
            || self.vacuumed.is_some_and(|at| at.elapsed() < VACUUM_EVERY)
        {
            return Ok(());
        }
        if self.conn.is_none() {
            let mut conn = PgConnection::connect_with(&self.options)
                .await
                .map_err(db_err)?;
            if let Some(sql) = &self.search_path {
                conn.execute(&**sql).await.map_err(db_err)?;
            }
            // `SKIP_LOCKED` reports each skip as a warning, which is expected here.
            conn.execute("SET client_min_messages = error")
                .await
                .map_err(db_err)?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if self.can_vacuum.is_none() {
            let may: bool = sqlx::query_scalar(
                "SELECT r.rolsuper OR pg_has_role(current_user, c.relowner, 'USAGE')
                   FROM pg_class c, pg_roles r
                  WHERE c.oid = 'message_search_pending'::regclass AND r.rolname = current_user",
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
            if !may {
                tracing::info!(
                    "the connecting role does not own message_search_pending: the store leaves vacuuming it to autovacuum"
                );
            }
            self.can_vacuum = Some(may);
            if !may {
                return Ok(());
            }
        }
        // Every node of a deployment runs this step; two vacuums of one table wait for
        // each other (seconds under load), so one that finds the table busy skips it.
        let done = conn
            .execute("VACUUM (SKIP_LOCKED) message_search_pending")
            .await;
        if let Err(e) = done {
            // Reconnect next time.
            self.conn = None;
            return Err(db_err(e));
        }
        self.vacuumed = Some(std::time::Instant::now());
        Ok(())
    }
}

#[async_trait]
impl BulkIndex for SearchIndex {
    async fn index_pending(&self) -> Result<()> {
        // One pass at a time, here and in `index_search`.
        let mut maintenance = self.maintenance.lock().await;
        let mut moved = 0i64;
        loop {
            let taken: i32 = sqlx::query_scalar("SELECT mindsp_index_pending($1)")
                .bind(INDEX_CHUNK)
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
            moved += i64::from(taken);
            if taken < INDEX_CHUNK {
                break;
            }
        }
        if moved > 0 {
            maintenance.vacuum().await?;
        }
        Ok(())
    }

    fn closed(&self) -> bool {
        self.pool.is_closed()
    }
}

/// Appends waiting for the writer. When it is full, callers wait for room: a burst
/// slows senders down instead of growing memory without bound.
const APPEND_QUEUE: usize = 4096;

/// The group-commit writer behind [`AppendQueue`]: one transaction and one commit per
/// batch, and a fixed number of statements whatever its size: `BEGIN` with the first
/// tenant (one round trip), then per tenant one statement for the locks, memberships and
/// idempotency keys and one for the write, and `COMMIT`.
///
/// Row-level security scopes statements to the tenant in `mindsp.tenant_id`, so a batch
/// is split by tenant and the setting changes between the groups (one more statement per
/// further tenant), inside the one transaction: each statement runs under the tenant of
/// the requests it serves, and names it in `tenant_id = $1` as every query does.
///
/// Sequences: each group locks its conversations (`FOR UPDATE`) before reading
/// `last_seq`, and holds them to the commit, so nothing else numbers messages in them
/// meanwhile: neither `append_message` in another transaction (its `UPDATE` waits for
/// the lock, then reads the new `last_seq`) nor the writer of another process. Locks are
/// taken in one order, groups by tenant id and conversations by id within a group, so
/// writers of several processes do not deadlock on each other; a deadlock with some other
/// transaction is broken by PostgreSQL, which fails the batch, and its requests are then
/// retried one by one.
struct Appender {
    pool: PgPool,
    /// Wakes the background indexing step after each commit.
    wake: Arc<Notify>,
}

/// How a batch's transaction begins. Every row a batch reads or writes is reached by its
/// key, but the planner prefers to scan and hash small tables whole (1,000 conversations,
/// say) rather than look 30 keys up, and a prepared statement keeps a generic plan made
/// while the tables were small as they grow. These settings, local to the transaction,
/// make key lookups win (measured: about 15% more appends per second with 1,000
/// conversations); they only discourage the other plans, so nothing fails without an
/// index.
const BATCH_BEGIN: &str = "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off";

#[async_trait]
impl GroupCommit for Appender {
    async fn append_alone(&self, tenant: TenantId, msg: &NewMessage) -> Result<Appended> {
        let mut tx = begin_scoped(&self.pool, tenant, "BEGIN").await?;
        let appended = tx.append_message(msg).await?;
        if appended.created() {
            tx.tx.commit().await.map_err(db_err)?;
            self.wake.notify_one();
        }
        Ok(appended)
    }

    async fn stored(&self, tenant: TenantId, id: MessageId) -> Result<Option<Message>> {
        let mut tx = begin_scoped(&self.pool, tenant, "BEGIN READ ONLY").await?;
        sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE id = $1 AND tenant_id = $2"
        ))
        .bind(id.0)
        .bind(tenant.0)
        .fetch_optional(&mut *tx.tx)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(message_from_row)
        .transpose()
    }

    async fn append_batch(&self, batch: &[AppendRequest]) -> Result<Vec<Result<Appended>>> {
        // Request indexes by tenant; the sort is stable, so each group keeps arrival order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].tenant);
        let mut answers: Vec<Option<Result<Appended>>> = batch.iter().map(|_| None).collect();
        let mut tx: Option<Transaction<'static, Postgres>> = None;
        for group in order.chunk_by(|&a, &b| batch[a].tenant == batch[b].tenant) {
            let tenant = batch[group[0]].tenant;
            let tx = match &mut tx {
                None => tx.insert(begin_scoped(&self.pool, tenant, BATCH_BEGIN).await?.tx),
                Some(tx) => {
                    sqlx::query("SELECT set_config('mindsp.tenant_id', $1, true)")
                        .bind(tenant.0.hyphenated().to_string())
                        .execute(&mut **tx)
                        .await
                        .map_err(db_err)?;
                    tx
                }
            };
            let requests = group.iter().map(|&i| &batch[i]);
            let results = append_group(tx, tenant, requests).await?;
            for (&i, result) in group.iter().zip(results) {
                answers[i] = Some(result);
            }
        }
        if let Some(tx) = tx {
            tx.commit().await.map_err(db_err)?;
            self.wake.notify_one();
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(Error::Storage("append left unanswered".into()))))
            .collect())
    }
}

/// Appends the requests of one tenant inside the batch's transaction, whose
/// `mindsp.tenant_id` is set to `tenant`.
async fn append_group<'a>(
    tx: &mut Transaction<'static, Postgres>,
    tenant: TenantId,
    requests: impl Iterator<Item = &'a AppendRequest> + Clone,
) -> Result<Vec<Result<Appended>>> {
    let mut state = BatchState::default();

    // One statement locks the conversations and reads their sequence, whether each sender
    // is a member, and the message already stored under each idempotency key. Requests
    // are sorted, so conversations are locked in id order; each lookup is its own index
    // scan (`LATERAL`, and `LIMIT 1` which keeps a subquery from being folded into a
    // join), whatever the planner thinks of the tables' sizes. A conversation of another
    // tenant, or none, is not returned.
    //
    // The keys are read in the statement's snapshot, taken before it waited for any
    // lock: a message stored under one of them by a writer that held a lock meanwhile
    // is not seen, and the insert below then fails on the unique index, so the batch is
    // retried one request at a time, which finds it. (Another writer on the same
    // conversations is another node, or a unit of work: rare, and never wrong.)
    let mut lookups: Vec<(Uuid, Uuid, Option<&str>)> = requests
        .clone()
        .map(|r| {
            let m = &r.msg;
            (
                m.conversation_id.0,
                m.sender_id.0,
                m.idempotency_key.as_deref(),
            )
        })
        .collect();
    lookups.sort_unstable();
    lookups.dedup();
    let mut convs = Vec::with_capacity(lookups.len());
    let mut senders = Vec::with_capacity(lookups.len());
    let mut keys = Vec::with_capacity(lookups.len());
    for (c, u, k) in lookups {
        convs.push(c);
        senders.push(u);
        keys.push(k);
    }
    let rows = sqlx::query(
        "SELECT r.c AS conv, c.last_seq, c.members_version, r.u AS user_id,
                m.member IS NOT NULL AS member,
                x.id, x.conversation_id, x.sender_id, x.seq, x.content, x.idempotency_key,
                x.created_at
           FROM unnest($2::uuid[], $3::uuid[], $4::text[]) AS r (c, u, key)
           JOIN LATERAL (SELECT last_seq, members_version FROM conversations
                          WHERE tenant_id = $1 AND id = r.c
                            FOR UPDATE) AS c ON true
           LEFT JOIN LATERAL (SELECT true AS member FROM conversation_members
                               WHERE tenant_id = $1 AND conversation_id = r.c AND user_id = r.u
                               LIMIT 1) AS m ON true
           LEFT JOIN LATERAL (SELECT id, conversation_id, sender_id, seq, content,
                                     idempotency_key, created_at
                                FROM messages
                               WHERE tenant_id = $1 AND conversation_id = r.c AND sender_id = r.u
                                 AND idempotency_key = r.key
                               LIMIT 1) AS x ON true",
    )
    .bind(tenant.0)
    .bind(convs)
    .bind(senders)
    .bind(keys)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_err)?;
    for row in rows {
        let conv: Uuid = row.try_get("conv").map_err(db_err)?;
        state.conversations.insert(
            conv,
            BatchConversation {
                tenant,
                last_seq: row.try_get("last_seq").map_err(db_err)?,
                members_version: row.try_get("members_version").map_err(db_err)?,
            },
        );
        if row.try_get("member").map_err(db_err)? {
            state
                .members
                .insert((conv, row.try_get("user_id").map_err(db_err)?));
        }
        if row
            .try_get::<Option<Uuid>, _>("id")
            .map_err(db_err)?
            .is_some()
        {
            let m = message_from_row(&row)?;
            let key = m.idempotency_key.clone().unwrap_or_default();
            state
                .stored
                .insert((m.conversation_id.0, m.sender_id.0, key), (tenant, m));
        }
    }

    let (results, fresh) = plan_batch(requests, &mut state);
    if fresh.is_empty() {
        return Ok(results);
    }

    // One statement from parallel arrays: the messages, then each conversation's sequence
    // and activity moved to its last new message, and each sender's read marker to their
    // last new message, as `append_message` does message by message.
    let mut cols = FreshColumns::default();
    for m in &fresh {
        cols.ids.push(m.id.0);
        cols.convs.push(m.conversation_id.0);
        cols.senders.push(m.sender_id.0);
        cols.seqs.push(m.seq);
        cols.contents.push(&m.content);
        cols.keys.push(m.idempotency_key.as_deref());
        cols.created.push(m.created_at);
    }
    sqlx::query(
        "WITH new AS (
             SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::uuid[], $5::bigint[], $6::text[],
                                  $7::text[], $8::timestamptz[])
                        AS t (id, conversation_id, sender_id, seq, content, idempotency_key,
                              created_at)
         ), ins AS (
             INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content,
                                   idempotency_key, created_at)
             SELECT id, $1, conversation_id, sender_id, seq, content, idempotency_key, created_at
               FROM new
         ), bump AS (
             UPDATE conversations c
                SET last_seq = l.seq, last_activity_at = l.created_at
               FROM (SELECT DISTINCT ON (conversation_id) conversation_id, seq, created_at
                       FROM new ORDER BY conversation_id, seq DESC) AS l
              WHERE c.tenant_id = $1 AND c.id = l.conversation_id
         )
         UPDATE conversation_members me
            SET last_read_seq = l.seq
           FROM (SELECT conversation_id, sender_id, max(seq) AS seq
                   FROM new GROUP BY conversation_id, sender_id) AS l
          WHERE me.tenant_id = $1 AND me.conversation_id = l.conversation_id
            AND me.user_id = l.sender_id",
    )
    .bind(tenant.0)
    .bind(cols.ids)
    .bind(cols.convs)
    .bind(cols.senders)
    .bind(cols.seqs)
    .bind(cols.contents)
    .bind(cols.keys)
    .bind(cols.created)
    .execute(&mut **tx)
    .await
    .map_err(db_err)?;
    Ok(results)
}

/// The new messages of a group as parallel arrays, bound as one parameter each.
#[derive(Default)]
struct FreshColumns<'a> {
    ids: Vec<Uuid>,
    convs: Vec<Uuid>,
    senders: Vec<Uuid>,
    seqs: Vec<i64>,
    contents: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    created: Vec<chrono::DateTime<chrono::Utc>>,
}

/// A unit of work on PostgreSQL, confined to one tenant by its queries and by
/// row-level security.
pub struct PgTx {
    tx: Transaction<'static, Postgres>,
    tenant: TenantId,
}

impl PgTx {
    /// A session of this tenant, with `lock` (`""`, `" FOR UPDATE"`, `" FOR SHARE"`).
    async fn select_session(
        &mut self,
        id: SessionId,
        lock: &str,
    ) -> Result<Option<TrainingSession>> {
        sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM training_sessions WHERE id = $1 AND tenant_id = $2{lock}"
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

    /// The underlying sqlx transaction, for adapters that write in the same unit.
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }
}

const USER_COLS: &str =
    "id, tenant_id, email, display_name, role, active, created_at, password_changed_at";
const MESSAGE_COLS: &str =
    "id, conversation_id, sender_id, seq, content, idempotency_key, created_at";
const CONV_COLS: &str =
    "id, tenant_id, kind, name, created_by, created_at, last_activity_at, last_seq";

fn user_from_row(r: &PgRow) -> Result<User> {
    Ok(User {
        id: UserId(r.try_get("id").map_err(db_err)?),
        tenant_id: TenantId(r.try_get("tenant_id").map_err(db_err)?),
        email: r.try_get("email").map_err(db_err)?,
        display_name: r.try_get("display_name").map_err(db_err)?,
        role: Role::parse(r.try_get("role").map_err(db_err)?)?,
        active: r.try_get("active").map_err(db_err)?,
        created_at: r.try_get("created_at").map_err(db_err)?,
        password_changed_at: r.try_get("password_changed_at").map_err(db_err)?,
    })
}

fn conv_from_row(r: &PgRow) -> Result<Conversation> {
    Ok(Conversation {
        id: ConversationId(r.try_get("id").map_err(db_err)?),
        tenant_id: TenantId(r.try_get("tenant_id").map_err(db_err)?),
        kind: ConversationKind::parse(r.try_get("kind").map_err(db_err)?)?,
        name: r.try_get("name").map_err(db_err)?,
        created_by: UserId(r.try_get("created_by").map_err(db_err)?),
        created_at: r.try_get("created_at").map_err(db_err)?,
        last_activity_at: r.try_get("last_activity_at").map_err(db_err)?,
        last_seq: r.try_get("last_seq").map_err(db_err)?,
    })
}

fn message_from_row(r: &PgRow) -> Result<Message> {
    Ok(Message {
        id: MessageId(r.try_get("id").map_err(db_err)?),
        conversation_id: ConversationId(r.try_get("conversation_id").map_err(db_err)?),
        sender_id: UserId(r.try_get("sender_id").map_err(db_err)?),
        seq: r.try_get("seq").map_err(db_err)?,
        content: r.try_get("content").map_err(db_err)?,
        idempotency_key: r.try_get("idempotency_key").map_err(db_err)?,
        created_at: r.try_get("created_at").map_err(db_err)?,
    })
}

fn member_from_row(r: &PgRow) -> Result<Member> {
    Ok(Member {
        user_id: UserId(r.try_get("user_id").map_err(db_err)?),
        display_name: r.try_get("display_name").map_err(db_err)?,
        role: MemberRole::parse(r.try_get("role").map_err(db_err)?)
            .map_err(|e| Error::Storage(e.to_string()))?,
        last_read_seq: r.try_get("last_read_seq").map_err(db_err)?,
        joined_at: r.try_get("joined_at").map_err(db_err)?,
    })
}

const NOTIFICATION_COLS: &str =
    "id, user_id, kind, title, body, link, data::text AS data, key, created_at, read_at";
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds $1 tenant, $2 id, then the other columns of a session in `SESSION_COLS`
/// order: the insert and the update share it.
fn bind_session<'q>(q: PgQuery<'q>, tenant: TenantId, s: &'q TrainingSession) -> PgQuery<'q> {
    q.bind(tenant.0)
        .bind(s.id.0)
        .bind(&s.title)
        .bind(&s.kind)
        .bind(&s.description)
        .bind(&s.location)
        .bind(s.start_at)
        .bind(s.end_at)
        .bind(s.organizer_id.0)
        .bind(s.status.as_str())
        .bind(&s.reminder_offsets)
        .bind(&s.cancel_reason)
        .bind(s.created_at)
        .bind(s.updated_at)
}

const SESSION_COLS: &str = "id, title, kind, description, location, start_at, end_at, \
     organizer_id, status, reminder_offsets, cancel_reason, created_at, updated_at";

/// Notifications to insert, as one array per column (see `insert_notifications`).
#[derive(Default)]
struct NotificationColumns<'a> {
    id: Vec<Uuid>,
    user_id: Vec<Uuid>,
    kind: Vec<&'a str>,
    title: Vec<&'a str>,
    body: Vec<&'a str>,
    link: Vec<Option<&'a str>>,
    data: Vec<String>,
    key: Vec<Option<&'a str>>,
    created_at: Vec<DateTime<Utc>>,
    read_at: Vec<Option<DateTime<Utc>>>,
}

fn notification_from_row(r: &PgRow) -> Result<Notification> {
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
        created_at: r.try_get("created_at").map_err(db_err)?,
        read_at: r.try_get("read_at").map_err(db_err)?,
    })
}

fn session_from_row(r: &PgRow) -> Result<TrainingSession> {
    Ok(TrainingSession {
        id: SessionId(r.try_get("id").map_err(db_err)?),
        title: r.try_get("title").map_err(db_err)?,
        kind: r.try_get("kind").map_err(db_err)?,
        description: r.try_get("description").map_err(db_err)?,
        location: r.try_get("location").map_err(db_err)?,
        start_at: r.try_get("start_at").map_err(db_err)?,
        end_at: r.try_get("end_at").map_err(db_err)?,
        organizer_id: UserId(r.try_get("organizer_id").map_err(db_err)?),
        status: SessionStatus::parse(r.try_get("status").map_err(db_err)?)?,
        reminder_offsets: r.try_get("reminder_offsets").map_err(db_err)?,
        cancel_reason: r.try_get("cancel_reason").map_err(db_err)?,
        created_at: r.try_get("created_at").map_err(db_err)?,
        updated_at: r.try_get("updated_at").map_err(db_err)?,
    })
}

#[async_trait]
impl TenantTx for PgTx {
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
             VALUES ($1, $2, $3, $4, $5, true, $6, $7)",
        )
        .bind(user.id.0)
        .bind(self.tenant.0)
        .bind(&user.email)
        .bind(&user.display_name)
        .bind(user.role.as_str())
        .bind(&u.password_hash)
        .bind(user.created_at)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(user)
    }

    async fn user(&mut self, id: UserId) -> Result<Option<User>> {
        sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users WHERE tenant_id = $1 AND id = $2"
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
            "SELECT {USER_COLS}, password_hash FROM users WHERE tenant_id = $1 AND email = $2"
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
        // Two statements rather than `$3 IS NULL OR ...`, so each keeps its index plan
        // once the server switches the prepared statement to a generic plan.
        let cond = if after.is_some() {
            "AND (display_name, id) > ($3, $4)"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {USER_COLS} FROM users WHERE tenant_id = $1 {cond}
              ORDER BY display_name, id LIMIT $2"
        );
        let mut q = sqlx::query(&sql).bind(self.tenant.0).bind(i64::from(limit));
        if let Some((name, id)) = after {
            q = q.bind(name).bind(id.0);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(db_err)?;
        rows.iter().map(user_from_row).collect()
    }

    async fn set_user_active(&mut self, id: UserId, active: bool) -> Result<Option<User>> {
        sqlx::query(&format!(
            "UPDATE users SET active = $1 WHERE tenant_id = $2 AND id = $3 RETURNING {USER_COLS}"
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
            "UPDATE users SET password_hash = $1, password_changed_at = \
             GREATEST($2, password_changed_at + interval '1 millisecond') \
             WHERE tenant_id = $3 AND id = $4",
        )
        .bind(hash)
        .bind(now())
        .bind(self.tenant.0)
        .bind(id.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn active_users_among(&mut self, ids: &[UserId]) -> Result<Vec<UserId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|u| u.0).collect();
        sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM users WHERE tenant_id = $1 AND active AND id = ANY($2)",
        )
        .bind(self.tenant.0)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)
        .map(|ids| ids.into_iter().map(UserId).collect())
    }

    async fn password_changed_among(
        &mut self,
        ids: &[UserId],
        since: DateTime<Utc>,
    ) -> Result<Vec<UserId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|u| u.0).collect();
        sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM users WHERE tenant_id = $1 AND password_changed_at >= $2 \
             AND id = ANY($3)",
        )
        .bind(self.tenant.0)
        .bind(since)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)
        .map(|ids| ids.into_iter().map(UserId).collect())
    }

    async fn record_last_seen(&mut self, seen: &[(UserId, DateTime<Utc>)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = seen.iter().map(|(u, _)| u.0).collect();
        let ats: Vec<DateTime<Utc>> = seen.iter().map(|(_, at)| *at).collect();
        sqlx::query(
            // A user listed twice keeps the later time (`UPDATE … FROM` would take any).
            "UPDATE users SET last_seen_at = GREATEST(s.at, users.last_seen_at) \
             FROM (SELECT id, MAX(at) AS at \
                   FROM UNNEST($1::uuid[], $2::timestamptz[]) AS v(id, at) GROUP BY id) AS s \
             WHERE users.tenant_id = $3 AND users.id = s.id",
        )
        .bind(ids)
        .bind(ats)
        .bind(self.tenant.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn last_seen_among(&mut self, ids: &[UserId]) -> Result<Vec<(UserId, DateTime<Utc>)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|u| u.0).collect();
        sqlx::query_as::<_, (Uuid, DateTime<Utc>)>(
            "SELECT id, last_seen_at FROM users WHERE tenant_id = $1 \
             AND last_seen_at IS NOT NULL AND id = ANY($2)",
        )
        .bind(self.tenant.0)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)
        .map(|rows| rows.into_iter().map(|(id, at)| (UserId(id), at)).collect())
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
        let (users, roles): (Vec<Uuid>, Vec<&str>) =
            c.members.iter().map(|(u, r)| (u.0, r.as_str())).unzip();
        // One statement: the conversation, then its members from two parallel arrays.
        sqlx::query(
            "WITH c AS (
                 INSERT INTO conversations (id, tenant_id, kind, name, direct_key, created_by,
                                            created_at, last_activity_at, last_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 0)
                 RETURNING id
             )
             INSERT INTO conversation_members (conversation_id, user_id, tenant_id, role, last_read_seq, joined_at)
             SELECT c.id, m.user_id, $2, m.role, 0, $7
               FROM c, unnest($8::uuid[], $9::text[]) AS m (user_id, role)",
        )
        .bind(conv.id.0)
        .bind(self.tenant.0)
        .bind(c.kind.as_str())
        .bind(&c.name)
        .bind(key)
        .bind(c.created_by.0)
        .bind(at)
        .bind(users)
        .bind(roles)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(conv)
    }

    async fn direct_between(&mut self, a: UserId, b: UserId) -> Result<Option<Conversation>> {
        sqlx::query(&format!(
            "SELECT {CONV_COLS} FROM conversations WHERE tenant_id = $1 AND direct_key = $2"
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
            "SELECT {CONV_COLS} FROM conversations WHERE tenant_id = $1 AND id = $2"
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
        sqlx::query("UPDATE conversations SET name = $1 WHERE tenant_id = $2 AND id = $3")
            .bind(name)
            .bind(self.tenant.0)
            .bind(id.0)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn members(&mut self, conv: ConversationId) -> Result<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.display_name, m.role, m.last_read_seq, m.joined_at
               FROM conversation_members m
               JOIN users u ON u.id = m.user_id AND u.tenant_id = m.tenant_id
              WHERE m.tenant_id = $1 AND m.conversation_id = $2
              ORDER BY m.joined_at, m.user_id",
        )
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
               JOIN conversation_members o
                 ON o.conversation_id = me.conversation_id AND o.tenant_id = me.tenant_id
              WHERE me.user_id = $1 AND me.tenant_id = $2 AND o.user_id <> $1",
        )
        .bind(user.0)
        .bind(self.tenant.0)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(ids.into_iter().map(UserId).collect())
    }

    async fn member(&mut self, conv: ConversationId, user: UserId) -> Result<Option<Member>> {
        sqlx::query(
            "SELECT m.user_id, u.display_name, m.role, m.last_read_seq, m.joined_at
               FROM conversation_members m
               JOIN users u ON u.id = m.user_id AND u.tenant_id = m.tenant_id
              WHERE m.tenant_id = $1 AND m.conversation_id = $2 AND m.user_id = $3",
        )
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
            "INSERT INTO conversation_members (conversation_id, user_id, tenant_id, role, last_read_seq, joined_at)
             SELECT c.id, $1, c.tenant_id, $2, c.last_seq, $3
               FROM conversations c WHERE c.tenant_id = $4 AND c.id = $5
             ON CONFLICT (conversation_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(user.0)
        .bind(role.as_str())
        .bind(now())
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
            "DELETE FROM conversation_members WHERE tenant_id = $1 AND conversation_id = $2 AND user_id = $3",
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
        let cond = if before.is_some() {
            "AND (c.last_activity_at, c.id) < ($4, $5)"
        } else {
            ""
        };
        let sql = format!(
            "SELECT c.id, c.tenant_id, c.kind, c.name, c.created_by, c.created_at,
                    c.last_activity_at, c.last_seq, me.last_read_seq,
                    (SELECT count(*) FROM conversation_members x
                      WHERE x.tenant_id = $2 AND x.conversation_id = c.id) AS member_count,
                    lm.id AS lm_id, lm.sender_id AS lm_sender_id, lm.content AS lm_content,
                    lm.idempotency_key AS lm_idempotency_key, lm.created_at AS lm_created_at
               FROM conversation_members me
               JOIN conversations c ON c.id = me.conversation_id AND c.tenant_id = $2
               LEFT JOIN messages lm
                      ON lm.conversation_id = c.id AND lm.seq = c.last_seq AND lm.tenant_id = $2
              WHERE me.user_id = $1 AND me.tenant_id = $2 {cond}
              ORDER BY c.last_activity_at DESC, c.id DESC
              LIMIT $3"
        );
        let mut q = sqlx::query(&sql)
            .bind(user.0)
            .bind(self.tenant.0)
            .bind(i64::from(limit));
        if let Some(c) = before {
            q = q.bind(c.last_activity_at).bind(c.id.0);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(db_err)?;
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
                        created_at: r.try_get("lm_created_at").map_err(db_err)?,
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
        // One statement, one round trip, with or without an idempotency key:
        // - `prior` is the message the sender already stored under the key, if any
        //   (`idempotency_key = NULL` matches nothing);
        // - otherwise `bump` moves the conversation's sequence and activity, if the
        //   sender is a member. Its row lock serialises concurrent appends, and a waiter
        //   re-reads the row it waited for, so sequences are unique and gap-free;
        // - `ins` stores the message at that sequence and `mark` moves the sender's
        //   read marker to it.
        // A concurrent send with the same key fails on `messages_idempotency_key`
        // (`duplicate_idempotency_key`); the service retries and then finds `prior`.
        let row = sqlx::query(
            "WITH prior AS (
                 SELECT id, conversation_id, sender_id, seq, content, idempotency_key, created_at
                   FROM messages
                  WHERE tenant_id = $1 AND conversation_id = $2 AND sender_id = $3
                    AND idempotency_key = $4
             ), bump AS (
                 UPDATE conversations c
                    SET last_seq = c.last_seq + 1, last_activity_at = $5
                  WHERE c.tenant_id = $1 AND c.id = $2
                    AND NOT EXISTS (SELECT 1 FROM prior)
                    AND EXISTS (SELECT 1 FROM conversation_members me
                                 WHERE me.tenant_id = $1 AND me.conversation_id = $2
                                   AND me.user_id = $3)
                 RETURNING c.last_seq, c.members_version
             ), ins AS (
                 INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content,
                                       idempotency_key, created_at)
                 SELECT $6, $1, $2, $3, bump.last_seq, $7, $4, $5 FROM bump
                 RETURNING seq
             ), mark AS (
                 UPDATE conversation_members me
                    SET last_read_seq = ins.seq
                   FROM ins
                  WHERE me.tenant_id = $1 AND me.conversation_id = $2 AND me.user_id = $3
             )
             SELECT false AS created, id, conversation_id, sender_id, seq, content,
                    idempotency_key, created_at, NULL::bigint AS members_version
               FROM prior
             UNION ALL
             SELECT true, NULL, NULL, NULL, seq, NULL, NULL, NULL,
                    (SELECT members_version FROM bump)
               FROM ins",
        )
        .bind(self.tenant.0)
        .bind(m.conversation_id.0)
        .bind(m.sender_id.0)
        .bind(&m.idempotency_key)
        .bind(m.created_at)
        .bind(m.id.0)
        .bind(&m.content)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?
        .ok_or(Error::NotFound("conversation"))?;
        if !row.try_get::<bool, _>("created").map_err(db_err)? {
            return Ok(Appended::Existing(message_from_row(&row)?));
        }
        Ok(Appended::Created {
            message: Message {
                id: m.id,
                conversation_id: m.conversation_id,
                sender_id: m.sender_id,
                seq: row.try_get("seq").map_err(db_err)?,
                content: m.content.clone(),
                idempotency_key: m.idempotency_key.clone(),
                created_at: m.created_at,
            },
            members_version: row.try_get("members_version").map_err(db_err)?,
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
            SeqWindow::Before(s) => ("AND seq < $4", "DESC", Some(s)),
            SeqWindow::After(s) => ("AND seq > $4", "ASC", Some(s)),
        };
        let sql = format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = $1 AND tenant_id = $2 {cond}
              ORDER BY seq {order} LIMIT $3"
        );
        let mut q = sqlx::query(&sql)
            .bind(conv.0)
            .bind(self.tenant.0)
            .bind(i64::from(limit));
        if let Some(b) = bound {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(db_err)?;
        let mut out: Vec<Message> = rows.iter().map(message_from_row).collect::<Result<_>>()?;
        if order == "DESC" {
            out.reverse();
        }
        Ok(out)
    }

    async fn mark_read(&mut self, conv: ConversationId, user: UserId, seq: i64) -> Result<i64> {
        sqlx::query_scalar(
            "UPDATE conversation_members me
                SET last_read_seq = GREATEST(me.last_read_seq, LEAST($1, c.last_seq))
               FROM conversations c
              WHERE c.tenant_id = $3 AND c.id = $2
                AND me.tenant_id = $3 AND me.conversation_id = $2 AND me.user_id = $4
              RETURNING me.last_read_seq",
        )
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
        // Every term must match, as a stemmed, accent-folded word.
        // Terms are letters and digits (see core's `search_terms`); anything else is
        // dropped here too, so no tsquery operator can get through.
        let expr = terms
            .iter()
            .map(|t| {
                t.chars()
                    .filter(|c| c.is_alphanumeric())
                    .collect::<String>()
            })
            .filter(|t| !t.is_empty())
            // Whole words, no `:*` prefix match: the French stemmer already folds
            // plurals and verb forms, and the planner estimates a plain lexeme from
            // the column statistics (a prefix gets a fixed guess), which is what lets
            // it choose between the GIN index and a newest-first walk.
            .collect::<Vec<_>>()
            .join(" & ");
        if expr.is_empty() {
            return Ok(Vec::new());
        }
        // `mindsp_search` (migrations 0002, 0005) reads the GIN index and the messages
        // not indexed yet outside row-level security, which would otherwise forbid using
        // the index, and applies this transaction's tenant itself; the join back to
        // `messages` is under RLS again.
        let rows = sqlx::query(
            "SELECT m.id, m.conversation_id, m.sender_id, m.seq, m.content, m.idempotency_key,
                    m.created_at, s.rank::float8 AS score
               FROM mindsp_search(to_tsquery('mindsp_french', $1), $3, $4, $5, $6, $7) AS s
               JOIN messages m ON m.id = s.message_id AND m.tenant_id = $2
              ORDER BY s.rank DESC, m.id DESC",
        )
        .bind(expr)
        .bind(self.tenant.0)
        .bind(user.0)
        .bind(conv.map(|c| c.0))
        .bind(limit as i32)
        .bind(offset as i32)
        .bind(SEARCH_RANK_WINDOW as i32)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                Ok(SearchHit {
                    message: message_from_row(r)?,
                    rank: r.try_get("score").map_err(db_err)?,
                })
            })
            .collect()
    }

    // ---- notifications -----------------------------------------------------------

    async fn active_user_ids(&mut self) -> Result<Vec<UserId>> {
        let rows: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM users WHERE tenant_id = $1 AND active ORDER BY id")
                .bind(self.tenant.0)
                .fetch_all(&mut *self.tx)
                .await
                .map_err(db_err)?;
        Ok(rows.into_iter().map(UserId).collect())
    }

    async fn insert_notifications(&mut self, rows: &[Notification]) -> Result<Vec<NotificationId>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // One statement whatever the number of rows: the arrays travel as ten
        // parameters. The join keeps recipients to users of this tenant, the unique key
        // index skips duplicates, and the statement trigger moves the unread counters.
        let mut cols = NotificationColumns::default();
        for n in rows {
            cols.id.push(n.id.0);
            cols.user_id.push(n.user_id.0);
            cols.kind.push(&n.kind);
            cols.title.push(&n.title);
            cols.body.push(&n.body);
            cols.link.push(n.link.as_deref());
            cols.data
                .push(serde_json::to_string(&n.data).map_err(|e| Error::Storage(e.to_string()))?);
            cols.key.push(n.key.as_deref());
            cols.created_at.push(n.created_at);
            cols.read_at.push(n.read_at);
        }
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO notifications
                    (id, tenant_id, user_id, kind, title, body, link, data, key, created_at, read_at)
             SELECT r.id, u.tenant_id, r.user_id, r.kind, r.title, r.body, r.link, r.data::jsonb,
                    r.key, r.created_at, r.read_at
               FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[],
                           $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[])
                    AS r(id, user_id, kind, title, body, link, data, key, created_at, read_at)
               JOIN users u ON u.id = r.user_id AND u.tenant_id = $1
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(self.tenant.0)
        .bind(&cols.id)
        .bind(&cols.user_id)
        .bind(&cols.kind)
        .bind(&cols.title)
        .bind(&cols.body)
        .bind(&cols.link)
        .bind(&cols.data)
        .bind(&cols.key)
        .bind(&cols.created_at)
        .bind(&cols.read_at)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(ids.into_iter().map(NotificationId).collect())
    }

    async fn notifications(
        &mut self,
        user: UserId,
        before: Option<NotificationId>,
        unread_only: bool,
        limit: u32,
    ) -> Result<Vec<Notification>> {
        // Distinct statements per shape, so each keeps its index plan when the server
        // switches the prepared statement to a generic plan.
        let unread = if unread_only {
            "AND read_at IS NULL"
        } else {
            ""
        };
        let cursor = if before.is_some() { "AND id < $4" } else { "" };
        let sql = format!(
            "SELECT {NOTIFICATION_COLS} FROM notifications
              WHERE user_id = $1 AND tenant_id = $2 {cursor} {unread}
              ORDER BY id DESC LIMIT $3"
        );
        let mut q = sqlx::query(&sql)
            .bind(user.0)
            .bind(self.tenant.0)
            .bind(i64::from(limit));
        if let Some(b) = before {
            q = q.bind(b.0);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(db_err)?;
        rows.iter().map(notification_from_row).collect()
    }

    async fn notification(
        &mut self,
        user: UserId,
        id: NotificationId,
    ) -> Result<Option<Notification>> {
        sqlx::query(&format!(
            "SELECT {NOTIFICATION_COLS} FROM notifications
              WHERE id = $1 AND user_id = $2 AND tenant_id = $3"
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
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = users.iter().map(|u| u.0).collect();
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT user_id, unread FROM notification_counters
              WHERE tenant_id = $1 AND user_id = ANY($2)",
        )
        .bind(self.tenant.0)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(|(u, n)| (UserId(u), n)).collect())
    }

    async fn mark_notifications_read(
        &mut self,
        user: UserId,
        ids: Option<&[NotificationId]>,
        at: DateTime<Utc>,
    ) -> Result<u64> {
        let done = match ids {
            None => sqlx::query(
                "UPDATE notifications SET read_at = $1
                  WHERE user_id = $2 AND tenant_id = $3 AND read_at IS NULL",
            )
            .bind(at)
            .bind(user.0)
            .bind(self.tenant.0)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?,
            Some(ids) => {
                let ids: Vec<Uuid> = ids.iter().map(|i| i.0).collect();
                sqlx::query(
                    "UPDATE notifications SET read_at = $1
                      WHERE user_id = $2 AND tenant_id = $3 AND read_at IS NULL AND id = ANY($4)",
                )
                .bind(at)
                .bind(user.0)
                .bind(self.tenant.0)
                .bind(ids)
                .execute(&mut *self.tx)
                .await
                .map_err(db_err)?
            }
        };
        Ok(done.rows_affected())
    }

    async fn delete_notification(&mut self, user: UserId, id: NotificationId) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM notifications WHERE id = $1 AND user_id = $2 AND tenant_id = $3",
        )
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
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = users.iter().map(|u| u.0).collect();
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT user_id, prefs::text FROM notification_prefs
              WHERE tenant_id = $1 AND user_id = ANY($2)",
        )
        .bind(self.tenant.0)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        rows.into_iter()
            .map(|(u, p)| Ok((UserId(u), prefs_from_json(&p)?)))
            .collect()
    }

    async fn set_user_notification_prefs(
        &mut self,
        user: UserId,
        prefs: &NotificationPrefs,
    ) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO notification_prefs (user_id, tenant_id, prefs, updated_at)
             SELECT id, tenant_id, $1::jsonb, $2 FROM users WHERE id = $3 AND tenant_id = $4
             ON CONFLICT (user_id) DO UPDATE SET prefs = excluded.prefs, updated_at = excluded.updated_at",
        )
        .bind(prefs_to_json(prefs)?)
        .bind(now())
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
            "SELECT notification_prefs::text FROM tenant_settings WHERE tenant_id = $1",
        )
        .bind(self.tenant.0)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_err)?;
        prefs.flatten().as_deref().map(prefs_from_json).transpose()
    }

    async fn set_tenant_notification_prefs(&mut self, prefs: &NotificationPrefs) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenant_settings (tenant_id, notification_prefs, updated_at)
             VALUES ($1, $2::jsonb, $3)
             ON CONFLICT (tenant_id) DO UPDATE
                SET notification_prefs = excluded.notification_prefs, updated_at = excluded.updated_at",
        )
        .bind(self.tenant.0)
        .bind(prefs_to_json(prefs)?)
        .bind(now())
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
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT me.user_id
               FROM conversations c
               JOIN conversation_members me ON me.conversation_id = c.id
               JOIN users u ON u.id = me.user_id
               JOIN messages first ON first.conversation_id = c.id AND first.seq = me.last_read_seq + 1
               LEFT JOIN digest_state d ON d.user_id = me.user_id AND d.tenant_id = $1
              WHERE c.tenant_id = $1 AND me.tenant_id = $1 AND u.tenant_id = $1 AND u.active
                AND first.tenant_id = $1
                AND c.last_seq > me.last_read_seq
                AND first.created_at <= $2
                AND (d.sent_through IS NULL
                     OR (c.last_activity_at > d.sent_through AND d.sent_through <= $2))
              LIMIT $3",
        )
        .bind(self.tenant.0)
        .bind(unread_since)
        .bind(i64::from(limit))
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
        let convs = sqlx::query(
            "SELECT c.id, c.kind, c.name, c.last_seq, me.last_read_seq,
                    (SELECT ou.display_name FROM conversation_members o
                       JOIN users ou ON ou.id = o.user_id
                      WHERE o.conversation_id = c.id AND o.user_id <> $1
                      ORDER BY o.joined_at, o.user_id LIMIT 1) AS other_name
               FROM conversation_members me
               JOIN conversations c ON c.id = me.conversation_id
               LEFT JOIN digest_state d ON d.user_id = me.user_id AND d.tenant_id = $2
              WHERE me.user_id = $1 AND me.tenant_id = $2 AND c.tenant_id = $2
                AND c.last_seq > me.last_read_seq
                AND (d.sent_through IS NULL OR c.last_activity_at > d.sent_through)
              ORDER BY c.last_activity_at DESC, c.id DESC
              LIMIT $3",
        )
        .bind(user.0)
        .bind(self.tenant.0)
        .bind(i64::from(max_conversations))
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
            let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
                "SELECT u.display_name, m.content, m.created_at
                   FROM messages m JOIN users u ON u.id = m.sender_id
                  WHERE m.conversation_id = $1 AND m.tenant_id = $2 AND m.seq > $3
                  ORDER BY m.seq DESC LIMIT $4",
            )
            .bind(id)
            .bind(self.tenant.0)
            .bind(read)
            .bind(i64::from(max_messages))
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db_err)?;
            let mut messages = rows;
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
             SELECT id, tenant_id, $1 FROM users WHERE id = $2 AND tenant_id = $3
             ON CONFLICT (user_id) DO UPDATE SET sent_through = excluded.sent_through",
        )
        .bind(at)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        );
        let q = sqlx::query(&sql);
        bind_session(q, self.tenant, s)
            .execute(&mut *self.tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn session(&mut self, id: SessionId) -> Result<Option<TrainingSession>> {
        self.select_session(id, "").await
    }

    async fn lock_session(
        &mut self,
        id: SessionId,
        exclusive: bool,
    ) -> Result<Option<TrainingSession>> {
        let lock = if exclusive {
            " FOR UPDATE"
        } else {
            " FOR SHARE"
        };
        self.select_session(id, lock).await
    }

    async fn update_session(&mut self, s: &TrainingSession) -> Result<bool> {
        let q = sqlx::query(
            "UPDATE training_sessions
                SET title = $3, kind = $4, description = $5, location = $6, start_at = $7,
                    end_at = $8, organizer_id = $9, status = $10, reminder_offsets = $11,
                    cancel_reason = $12, created_at = $13, updated_at = $14
              WHERE tenant_id = $1 AND id = $2",
        );
        let done = bind_session(q, self.tenant, s)
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
        let mut q = QueryBuilder::<Postgres>::new(format!(
            "SELECT {SESSION_COLS} FROM training_sessions s WHERE s.tenant_id = "
        ));
        q.push_bind(self.tenant.0);
        if !filter.include_cancelled {
            q.push(" AND s.status = 'scheduled'");
        }
        if let Some(from) = filter.from {
            q.push(" AND s.start_at >= ").push_bind(from);
        }
        if let Some(to) = filter.to {
            q.push(" AND s.start_at < ").push_bind(to);
        }
        if let Some((at, id)) = filter.after {
            q.push(" AND (s.start_at, s.id) > (")
                .push_bind(at)
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
        q.push(" ORDER BY s.start_at, s.id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&mut *self.tx).await.map_err(db_err)?;
        rows.iter().map(session_from_row).collect()
    }

    async fn add_invitees(&mut self, session: SessionId, users: &[UserId]) -> Result<Vec<UserId>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = users.iter().map(|u| u.0).collect();
        // Only users of this tenant, only into a session of this tenant.
        let added: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO training_invitees (session_id, user_id, tenant_id, response, responded_at, invited_at)
             SELECT s.id, u.id, s.tenant_id, 'pending', NULL, $4
               FROM training_sessions s JOIN users u ON u.tenant_id = s.tenant_id
              WHERE s.id = $1 AND s.tenant_id = $2 AND u.id = ANY($3)
             ON CONFLICT DO NOTHING
             RETURNING user_id",
        )
        .bind(session.0)
        .bind(self.tenant.0)
        .bind(ids)
        .bind(now())
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(added.into_iter().map(UserId).collect())
    }

    async fn remove_invitees(
        &mut self,
        session: SessionId,
        users: &[UserId],
    ) -> Result<Vec<UserId>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = users.iter().map(|u| u.0).collect();
        let removed: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM training_invitees
              WHERE session_id = $1 AND tenant_id = $2 AND user_id = ANY($3)
             RETURNING user_id",
        )
        .bind(session.0)
        .bind(self.tenant.0)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(removed.into_iter().map(UserId).collect())
    }

    async fn invitees(&mut self, session: SessionId) -> Result<Vec<Invitee>> {
        let rows = sqlx::query(
            "SELECT i.user_id, u.display_name, i.response, i.responded_at
               FROM training_invitees i JOIN users u ON u.id = i.user_id
              WHERE i.session_id = $1 AND i.tenant_id = $2 AND u.tenant_id = $2
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
                    responded_at: r.try_get("responded_at").map_err(db_err)?,
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
            "UPDATE training_invitees SET response = $1, responded_at = $2
              WHERE session_id = $3 AND user_id = $4 AND tenant_id = $5",
        )
        .bind(response.as_str())
        .bind(at)
        .bind(session.0)
        .bind(user.0)
        .bind(self.tenant.0)
        .execute(&mut *self.tx)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }
}
