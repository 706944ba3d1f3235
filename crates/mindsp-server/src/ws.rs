//! `GET /ws`: the WebSocket endpoint. The protocol is documented, frame by frame, in
//! `docs/PROTOCOL.md`.
//!
//! Before the upgrade: the `Origin` is checked against the allow-list (403), the node
//! must have a free slot ([`WsConfig::max_connections`], 503) and the token (`?token=` or
//! `Authorization: Bearer`) must name an active user (401); no socket is opened
//! otherwise.
//!
//! Each connection runs two halves in one task:
//! - the *reader* parses client frames, applies the rate limit, runs commands through
//!   the same [`Messaging`](mindsp_core::Messaging) service as REST, relays typing and
//!   watches token expiry and idleness;
//! - the *writer* owns the socket's sending side: replies from the reader, events from
//!   the hub (with the per-conversation cursors that make delivery gap-free and
//!   duplicate-free), resume replays, pings, and the close frame.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use mindsp_core::events::{Audience, Envelope, Event, TypingState};
use mindsp_core::model::{Message as StoredMessage, SeqWindow};
use mindsp_core::{Actor, ConversationId, Error, TenantId, UserId};
use mindsp_realtime::limit::TokenBucket;
use mindsp_realtime::queue::Queue;
use mindsp_realtime::typing::{Start, Typing};
use mindsp_realtime::{CloseReason, Connection, Delivery, close, hub::event_frame};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::AppState;
use crate::error::ApiError;
use crate::upgrade::{NotWebSocket, Socket, Upgrade};

/// Limits and timings of the WebSocket endpoint.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Browser origins allowed to open a socket (`scheme://host[:port]`), or `*` for
    /// any. Empty: only the server's own origin (same `Host`). Requests without an
    /// `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Largest client message (and frame), in bytes; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Events queued per connection before the client counts as too slow (4008).
    pub queue_capacity: usize,
    /// Commands per second a connection may send on average (`rate_limited` beyond).
    pub rate_per_sec: u32,
    /// Commands a connection may send in a burst.
    pub rate_burst: u32,
    /// How often the server pings.
    pub ping_interval: Duration,
    /// A connection silent (not even a pong) for this long is closed (4002).
    pub idle_timeout: Duration,
    /// At most one `typing start` relayed per conversation and connection per this.
    pub typing_throttle: Duration,
    /// A `typing start` not refreshed within this expires: `typing stop` is sent.
    pub typing_ttl: Duration,
    /// Most conversations in one `resume`.
    pub max_resume_conversations: usize,
    /// Most messages one `resume` replays in one conversation; further behind, the
    /// client gets a `resync` event and reads the history over HTTP instead (a long
    /// replay would hold up the connection's live events until it is cut as too slow).
    pub max_resume_messages: i64,
    /// How long a close frame may take to go out before the socket is dropped.
    pub close_timeout: Duration,
    /// Bytes the writer gathers before writing to the socket within a batch of events
    /// (it writes at the end of every batch anyway). The buffer is handed back once the
    /// socket took it all (`upgrade::Buffered`), so an idle connection holds none
    /// whatever this is. 0 writes each frame at once: one system call per frame (twice
    /// as many to busy group connections, `benches/RESULTS.md`).
    pub write_buffer_bytes: usize,
    /// Most WebSocket sockets this node holds, from their upgrade until they are closed
    /// (closing handshake included); beyond, upgrades are refused with 503 `server_full`
    /// before any socket is opened (a load balancer tries another node). The default,
    /// [`default_max_connections`], keeps room under the process's open-file limit for
    /// everything else.
    pub max_connections: usize,
    /// Most connections one user keeps on this node; one more closes their oldest with
    /// 4009 (see `Hub::limit_per_user`).
    pub max_connections_per_user: usize,
}

/// Open files kept for everything but WebSockets when [`default_max_connections`] sizes
/// the cap: database and Redis connections, the SQLite files, REST clients.
const RESERVED_FILES: u64 = 1024;

/// The default [`WsConfig::max_connections`]: the process's open-file limit (each
/// connection is a socket) less [`RESERVED_FILES`], or half of it when that is small.
/// The server raises the limit to its maximum first (`raise_open_file_limit`).
pub fn default_max_connections() -> usize {
    crate::open_files_less(RESERVED_FILES, |soft| soft / 2)
}

/// Raises this process's soft open-file limit to its hard limit (many systems start
/// programs at 1,024, far below what a node holding connections needs). Returns the
/// limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_message_bytes: 64 * 1024,
            queue_capacity: 256,
            rate_per_sec: 20,
            rate_burst: 40,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            typing_throttle: Duration::from_secs(2),
            typing_ttl: Duration::from_secs(5),
            max_resume_conversations: 1000,
            max_resume_messages: 500,
            close_timeout: Duration::from_secs(5),
            write_buffer_bytes: 2 * 1024,
            max_connections: default_max_connections(),
            max_connections_per_user: 16,
        }
    }
}

/// Longest request id, in bytes.
const MAX_ID_BYTES: usize = 64;
/// Longest token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 4096;
/// Most conversations one connection may show as typing at once.
const MAX_TYPING: usize = 32;
/// Cursors of a `resume` that cost as much as one command (each is a read of the store
/// or more): a resume of the 1,000 allowed costs 40, a burst.
const RESUME_CURSORS_PER_COMMAND: usize = 25;
/// Replies queued from the reader to the writer.
const REPLY_QUEUE: usize = 64;
/// Bytes read from the socket at once. Commands are a few hundred bytes. Every idle
/// connection holds this much (1 KiB cost about 0.5 KiB more per connection,
/// `benches/RESULTS.md`); a longer command grows the buffer for good (tungstenite
/// never shrinks it), up to the largest command that connection sent.
const READ_BUFFER: usize = 512;
/// Longest wait for the last writes of a closing connection (the answer to a client's
/// close, then the end of the stream).
const LAST_WRITE: Duration = Duration::from_secs(1);
/// Events the writer sends in one batch before flushing.
const BATCH: usize = 64;
/// Longest frame sent: a longer text goes out as a fragmented message (RFC 6455, section
/// 5.4), which WebSocket clients reassemble. tungstenite keeps, on every connection, a
/// buffer the size of the largest frame it ever wrote there: a message of 3,840 bytes
/// left about 4 KiB on each member's connection (`benches/RESULTS.md`), and a group's
/// `conversation_updated` lists every member (about 150 bytes each).
const MAX_FRAME: usize = 512;
/// Messages a connection holds while it waits for their predecessors to arrive live.
const HELD: usize = 64;
/// Conversations a connection remembers its user left (the oldest forgotten first).
const LEFT_KEPT: usize = 256;
/// Turns a connection gives the tasks publishing those predecessors before it reads
/// the missing messages from the store.
const GAP_TURNS: usize = 2;
/// Sent once a client caught up after typing or presence events were skipped for it.
const EVENTS_SKIPPED: &str = r#"{"v":1,"type":"events_skipped","events":["typing","presence"]}"#;

/// What a connection's task needs of the application. Every connection holds one
/// pointer to it, where a copy of `AppState` cost each one 416 bytes.
pub(crate) struct Shared {
    /// `last_seen` kept in the store, written in batches.
    pub(crate) last_seen: Arc<crate::last_seen::LastSeen>,
    pub(crate) messaging: mindsp_core::Messaging,
    pub(crate) tokens: crate::auth::Tokens,
    pub(crate) realtime: mindsp_realtime::Realtime,
    pub(crate) ws: WsConfig,
    /// One permit per socket this node may hold ([`WsConfig::max_connections`]), taken
    /// before the upgrade and given back once the socket is closed.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
    /// The commands running to their end on tasks of their own (socket and REST), which
    /// a stop waits for before the broker closes ([`crate::AppState::finish_commands`]).
    pub(crate) commands: tokio_util::task::TaskTracker,
}

// ---- before the upgrade ---------------------------------------------------------------

/// `GET /ws`
pub(crate) async fn handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<Upgrade, NotWebSocket>,
) -> Response {
    let state = state.sockets.clone();
    match accept(&state, &headers, query.as_deref()).await {
        Ok((actor, expires, checked, slot)) => {
            let upgrade = match upgrade {
                Ok(u) => u,
                Err(_) => {
                    return ApiError::http(
                        StatusCode::BAD_REQUEST,
                        "websocket_required",
                        "this route only accepts WebSocket upgrades",
                    )
                    .into_response();
                }
            };
            let max = state.ws.max_message_bytes;
            // tungstenite hands every frame straight to `Buffered`, which gathers them
            // (its own buffer would keep the capacity of the largest burst).
            let config = WebSocketConfig::default()
                .max_message_size(Some(max))
                .max_frame_size(Some(max))
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(0);
            let threshold = state.ws.write_buffer_bytes;
            upgrade.on_upgrade(config, threshold, move |socket| async move {
                // Held until the socket is gone, closing handshake included.
                let _slot = slot;
                run(state, actor, expires, checked, socket).await;
            })
        }
        Err(e) => e.into_response(),
    }
}

/// The actor, the token's expiry, when the account was checked, and the connection's
/// slot of an upgrade that may go on.
async fn accept(
    state: &Shared,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<
    (
        Actor,
        i64,
        mindsp_realtime::Checked,
        tokio::sync::OwnedSemaphorePermit,
    ),
    ApiError,
> {
    let unavailable =
        |code, message| ApiError::http(StatusCode::SERVICE_UNAVAILABLE, code, message);
    check_origin(&state.ws.allowed_origins, headers)?;
    let token = token(headers, query)?;
    // Before the account is read: a full node should cost a refused client little.
    let slot = state.slots.clone().try_acquire_owned().map_err(|_| {
        unavailable(
            "server_full",
            "this server holds all the connections it may: connect again later or elsewhere",
        )
    })?;
    // Before the read: a deactivation or password change that the read might not see
    // closes the connection once registered (`Hub::register_checked`).
    let at = std::time::Instant::now();
    let (actor, expires, password) = authenticate(state, &token).await?;
    let checked = mindsp_realtime::Checked { at, password };
    if state.realtime.hub().is_closing() {
        return Err(unavailable(
            "shutting_down",
            "this server is shutting down: connect again",
        ));
    }
    Ok((actor, expires, checked, slot))
}

fn check_origin(allowed: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let forbidden = || {
        ApiError::http(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not open a WebSocket here",
        )
    };
    let origin = origin
        .to_str()
        .map_err(|_| forbidden())?
        .trim_end_matches('/');
    let ok = if allowed.is_empty() {
        // Same origin only: the host the browser connected to.
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        host.is_some_and(|h| origin == format!("http://{h}") || origin == format!("https://{h}"))
    } else {
        origin_listed(allowed, origin)
    };
    if ok { Ok(()) } else { Err(forbidden()) }
}

/// Whether the browser origin `origin` is in `allowed` (`*` allows any), ignoring case
/// and a trailing `/`. Shared by the WebSocket check and the API's CORS.
pub(crate) fn origin_listed(allowed: &[String], origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

fn token(headers: &HeaderMap, query: Option<&str>) -> Result<String, ApiError> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "token" || found.is_some() {
            return Err(ApiError::bad_request(
                "invalid_query_string",
                "the only query parameter is `token`, once",
            ));
        }
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .map_err(|_| {
                ApiError::unauthorized("invalid_token", "the access token is not valid")
            })?;
        found = Some(v.into_owned());
    }
    if found.is_none()
        && let Some(h) = headers.get(header::AUTHORIZATION)
    {
        found = h
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
    }
    let token = found.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::unauthorized(
            "unauthorized",
            "missing token: use ?token=<access token> or Authorization: Bearer",
        )
    })?;
    if token.len() > MAX_TOKEN_BYTES {
        return Err(ApiError::unauthorized(
            "invalid_token",
            "the access token is not valid",
        ));
    }
    Ok(token)
}

/// The actor of a valid token for an active user, the token's expiry (seconds since
/// the epoch), and the password it is for (`User::password_mark`).
async fn authenticate(state: &Shared, token: &str) -> Result<(Actor, i64, i64), ApiError> {
    let (claims, user) = crate::auth::user_of(&state.tokens, &state.messaging, token).await?;
    let mark = user.password_mark();
    // A token from before the `pwd` claim, issued in the second of the last change, may
    // predate it (its issue time is in whole seconds): taken as for the password
    // before, so that the change's close reaches it.
    let ambiguous = claims.pwd.is_none() && mark > 0 && claims.iat == mark.div_euclid(1000);
    Ok((
        Actor {
            tenant_id: user.tenant_id,
            user_id: user.id,
            role: user.role,
        },
        claims.exp,
        if ambiguous { mark - 1 } else { mark },
    ))
}

// ---- one connection -------------------------------------------------------------------

/// What the reader hands the writer. Small, because the queue it goes through holds
/// room for several of them once used.
enum Out {
    /// A frame to send as is.
    Frame(String),
    /// Set cursors and replay from the store, then acknowledge.
    Resume(Box<(Value, Vec<(ConversationId, i64)>)>),
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The client closed or vanished.
    Gone,
}

const _: () = assert!(
    std::mem::size_of::<Out>() <= 32,
    "keep Out small: see its comment"
);

/// Replies the reader hands the writer, at most [`REPLY_QUEUE`] at a time. Both halves
/// run in the connection's one task; a [`Queue`] holds memory only while it holds
/// replies (a tokio channel here cost every idle connection about 1.5 KiB). Also whether
/// the reader is handling a frame, whose answer the writer waits for before a close.
struct Handoff(Queue<Out>, AtomicBool);

impl Handoff {
    fn new() -> Self {
        Self(Queue::new(0), AtomicBool::new(false))
    }

    /// The reader starts (true) or ends (false) handling a frame.
    fn busy(&self, busy: bool) {
        self.1.store(busy, Ordering::Relaxed);
    }

    fn is_busy(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }

    /// A reply if one is queued.
    fn try_recv(&self) -> Option<Out> {
        self.0.try_pop()
    }

    /// Queues `out` once there is room for it.
    async fn send(&self, out: Out) {
        self.0.push(out, REPLY_QUEUE).await;
    }

    /// The next reply, once there is one. Cancel-safe.
    async fn recv(&self) -> Out {
        self.0.pop().await
    }
}

async fn run(
    state: Arc<Shared>,
    actor: Actor,
    expires: i64,
    checked: mindsp_realtime::Checked,
    socket: Box<Socket>,
) {
    // Every connection holds this function's future for its whole life, so what lives
    // across its awaits is kept small: a value moved into an async function, or kept
    // across several of its awaits, has a place of its own in the future for good. The
    // socket comes boxed, the opening's future is boxed, and so is the socket reunited
    // at the end (the connection's task went from 3.7 to 2.3 KB, `benches/RESULTS.md`).
    let realtime = state.realtime.clone();
    let Some(mut conn) = Box::pin(realtime.open(
        actor.tenant_id,
        actor.user_id,
        checked,
        watchers(&state, actor, false),
    ))
    .await
    else {
        let (mut sink, _) = socket.split();
        let _ = sink
            .send(close_message(
                close::SERVICE_RESTART,
                CloseReason::Shutdown.text(),
            ))
            .await;
        return;
    };
    tracing::debug!(user = %actor.user_id, conn = conn.id, "websocket open");
    let (sink, stream) = (*socket).split();
    let handoff = Handoff::new();
    let config = &state.ws;
    let mut reader = Reader {
        state: &state,
        actor,
        stream,
        out: &handoff,
        expires: expiry_instant(expires),
        typing: Typing::new(config.typing_throttle, config.typing_ttl, MAX_TYPING),
        bucket: TokenBucket::new(config.rate_per_sec, config.rate_burst),
        last_heard: Instant::now(),
        password: conn.password(),
        closed: conn.closed.clone(),
    };
    let mut writer = Writer {
        state: &state,
        actor,
        sink,
        replies: &handoff,
        closed: conn.closed.clone(),
        cursors: PerConversation::default(),
        floors: PerConversation::default(),
        held: Vec::new(),
        left: Vec::new(),
        stuck: false,
    };
    tokio::select! {
        () = writer.run(&mut conn) => {}
        () = reader.run() => {}
    }
    // One socket again. tungstenite writes its answer to a client's close into
    // `Buffered` and, the handshake being over, never flushes the stream: flush both now
    // (briefly: a client that does not read gets no longer). A client that did not even
    // take our close frame gets nothing more: its socket goes now, and its slot with it.
    let stuck = writer.stuck;
    let mut socket = reader
        .stream
        .reunite(writer.sink)
        .ok()
        .filter(|_| !stuck)
        .map(Box::new);
    let linger = state.ws.close_timeout.min(LAST_WRITE);
    if let Some(s) = socket.as_mut() {
        let _ = tokio::time::timeout(linger, async {
            let _ = SinkExt::flush(s).await;
            let _ = s.get_mut().flush().await;
        })
        .await;
    }
    // Whoever was typing stops.
    for (conv, audience) in reader.typing.drain() {
        Box::pin(publish_typing(
            &state,
            actor,
            conv,
            audience,
            TypingState::Stop,
        ))
        .await;
    }
    tracing::debug!(user = %actor.user_id, conn = conn.id, "websocket closed");
    if let Some(seen) = Box::pin(realtime.close(conn, watchers(&state, actor, true))).await {
        state.last_seen.note(actor.tenant_id, actor.user_id, seen);
    }
    // After a close frame of ours, keep the socket until the client answers it (or
    // for the close timeout), so it reads our code rather than a reset.
    let Some(mut socket) = socket else { return };
    let _ = Box::pin(tokio::time::timeout(state.ws.close_timeout, async {
        while let Some(Ok(m)) = socket.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    }))
    .await;
    let _ = tokio::time::timeout(linger, socket.get_mut().shutdown()).await;
}

/// Users checked per read by [`check_accounts_after_losses`].
const ACCOUNT_CHECK_CHUNK: usize = 500;

/// After each loss of events on their way to this node (`Hub::events_lost`: its link to
/// the other nodes broke), closes the connections of users who are no longer active
/// (4003) or whose connections were opened for a password changed since the check
/// before (4010), since a deactivation or a password change may have been among the
/// lost events. One read per tenant with connections here (per [`ACCOUNT_CHECK_CHUNK`]
/// users), not one per connection, plus one per user whose password changed. Needs
/// a tokio runtime (none: nothing is started); ends with the state.
pub(crate) fn check_accounts_after_losses(shared: &Arc<Shared>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let mut losses = shared.realtime.hub().losses();
    let shared = Arc::downgrade(shared);
    runtime.spawn(async move {
        // A password change before this was either delivered or seen by the check
        // before (which read the store after it committed). Changes are stamped by the
        // clock of the node that made them: allow for a difference.
        let mut since = chrono::Utc::now() - CLOCK_MARGIN;
        while losses.changed().await.is_ok() {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let started = chrono::Utc::now() - CLOCK_MARGIN;
            // Moved on only once every account was read: a check the store failed
            // leaves its changes to the next one.
            let mut all_read = true;
            let hub = shared.realtime.hub();
            for (tenant, users) in hub.local_users() {
                for users in users.chunks(ACCOUNT_CHECK_CHUNK) {
                    let Some(to_close) = accounts_to_close(&shared, tenant, users, since).await
                    else {
                        all_read = false;
                        continue;
                    };
                    for (user, change) in to_close {
                        tracing::info!(user = %user, ?change, "account changed while events were lost: its connections close");
                        match change {
                            AccountChange::Deactivated => {
                                hub.close_user(tenant, user, CloseReason::Deactivated);
                            }
                            AccountChange::Password(mark) => {
                                hub.password_changed(tenant, user, mark);
                            }
                        }
                    }
                }
            }
            if all_read {
                since = started;
            }
        }
    });
}

/// How far apart the clocks of two nodes may be, for [`check_accounts_after_losses`].
/// Too much only closes a few more connections (their clients reconnect).
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Why [`check_accounts_after_losses`] closes a user's connections.
#[derive(Debug, Clone, Copy)]
enum AccountChange {
    /// No longer active: all of them.
    Deactivated,
    /// The password changed, to the one of this mark (`User::password_mark`): those
    /// opened for an older one.
    Password(i64),
}

/// Of `users`, those no longer active and those whose password changed at or after
/// `since`, with what changed; the store is tried a few times (a second apart). `None`
/// when it cannot say (logged: the connections are kept).
async fn accounts_to_close(
    shared: &Shared,
    tenant: TenantId,
    users: &[UserId],
    since: chrono::DateTime<chrono::Utc>,
) -> Option<Vec<(UserId, AccountChange)>> {
    for attempt in 1..=ACCOUNT_CHECK_ATTEMPTS {
        let read = async {
            let mut tx = shared.messaging.store().read(tenant).await?;
            let active: HashSet<UserId> = tx.active_users_among(users).await?.into_iter().collect();
            let mut out: Vec<_> = users
                .iter()
                .filter(|u| !active.contains(u))
                .map(|u| (*u, AccountChange::Deactivated))
                .collect();
            // Few (those who changed it since the last loss): read one by one for the
            // password each now has (one deactivated since the read above: as such).
            for id in tx.password_changed_among(users, since).await? {
                if !active.contains(&id) {
                    continue;
                }
                out.push(match tx.user(id).await?.filter(|u| u.active) {
                    Some(user) => (id, AccountChange::Password(user.password_mark())),
                    None => (id, AccountChange::Deactivated),
                });
            }
            Ok::<_, Error>(out)
        };
        match read.await {
            Ok(out) => return Some(out),
            Err(e) if attempt < ACCOUNT_CHECK_ATTEMPTS => {
                tracing::warn!(error = %e, tenant = %tenant, "cannot check accounts after lost events; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, tenant = %tenant, "cannot check accounts after lost events; connections kept");
            }
        }
    }
    None
}

/// Reads of the store [`accounts_to_close`] tries before giving up.
const ACCOUNT_CHECK_ATTEMPTS: u32 = 3;

/// Who is told when `actor` comes online or goes `offline`: the people who share a
/// conversation with them. If the store cannot say (logged): nobody for an online (a
/// slow store during a mass reconnection must not turn each into an event for the
/// whole tenant), the whole tenant for an offline (never told, it would show them
/// online for good).
async fn watchers(state: &Shared, actor: Actor, offline: bool) -> Audience {
    match state
        .messaging
        .contacts(actor.tenant_id, actor.user_id)
        .await
    {
        Ok(users) => Audience::Users(users),
        Err(e) if offline => {
            tracing::warn!(error = %e, user = %actor.user_id, "contacts unreadable: offline told to the whole tenant");
            Audience::Tenant
        }
        Err(e) => {
            tracing::warn!(error = %e, user = %actor.user_id, "contacts unreadable: online not announced");
            Audience::Users(Vec::new())
        }
    }
}

/// `text` as a fragmented text message: frames of at most `max` bytes (at least 4),
/// split between characters.
fn fragments(text: &str, max: usize) -> Vec<Frame> {
    let bytes = Bytes::copy_from_slice(text.as_bytes());
    let mut frames = Vec::with_capacity(text.len().div_ceil(max));
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + max).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let opcode = if start == 0 {
            Data::Text
        } else {
            Data::Continue
        };
        frames.push(Frame::message(
            bytes.slice(start..end),
            OpCode::Data(opcode),
            end == text.len(),
        ));
        start = end;
    }
    frames
}

/// Where live delivery of a conversation started on a connection that had no cursor
/// for it: messages below arrive afterwards only when published out of order (each
/// message is published once, though a publish that timed out may also come back
/// through Redis), and go out as they come; a later `resume` replays only what is
/// still missing below.
struct Floor {
    /// The first message seen live, lowered while the ones just before it arrive.
    seq: i64,
    /// Messages further below already sent (at most [`HELD`]; beyond, a `resume` could
    /// send one again).
    early: Vec<i64>,
}

impl Floor {
    fn at(seq: i64) -> Self {
        Self {
            seq,
            early: Vec::new(),
        }
    }

    /// Records `seq` (below the floor) as sent; false if it was already.
    fn take(&mut self, seq: i64) -> bool {
        if self.early.contains(&seq) {
            return false;
        }
        if seq == self.seq - 1 {
            self.seq = seq;
            while let Some(i) = self.early.iter().position(|s| *s == self.seq - 1) {
                self.seq = self.early.swap_remove(i);
            }
        } else if self.early.len() < HELD {
            self.early.push(seq);
        }
        true
    }
}

/// A small map keyed by conversation, for what a connection keeps per conversation: a
/// vector sorted by conversation. Most connections follow a handful of conversations,
/// and every idle connection of a node keeps one of these: a hash map took about 330
/// bytes for a first conversation in both maps, this 24 (a cursor) and 48 (a floor),
/// since the first entries are allocated one at a time.
struct PerConversation<V>(Vec<(ConversationId, V)>);

impl<V> Default for PerConversation<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> PerConversation<V> {
    /// Entries allocated one by one up to this many, then as a vector grows.
    const ONE_BY_ONE: usize = 4;

    fn find(&self, conv: &ConversationId) -> Result<usize, usize> {
        self.0.binary_search_by(|(c, _)| c.cmp(conv))
    }

    fn get(&self, conv: &ConversationId) -> Option<&V> {
        self.find(conv).ok().map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, conv: &ConversationId) -> Option<&mut V> {
        self.find(conv).ok().map(|i| &mut self.0[i].1)
    }

    fn insert_at(&mut self, i: usize, conv: ConversationId, value: V) -> &mut V {
        if self.0.len() == self.0.capacity() && self.0.len() < Self::ONE_BY_ONE {
            self.0.reserve_exact(1);
        }
        self.0.insert(i, (conv, value));
        &mut self.0[i].1
    }

    /// Sets `conv`'s value; the one it replaces.
    fn insert(&mut self, conv: ConversationId, value: V) -> Option<V> {
        match self.find(&conv) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.insert_at(i, conv, value);
                None
            }
        }
    }

    /// `conv`'s value, set to `value` first when it has none.
    fn get_or_insert(&mut self, conv: ConversationId, value: V) -> &mut V {
        match self.find(&conv) {
            Ok(i) => &mut self.0[i].1,
            Err(i) => self.insert_at(i, conv, value),
        }
    }

    fn remove(&mut self, conv: &ConversationId) -> Option<V> {
        self.find(conv).ok().map(|i| self.0.remove(i).1)
    }
}

/// How a replay from the store ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Everything asked for went out (what the store has of it).
    Done,
    /// The user cannot see the conversation (any more); its cursor is gone.
    NotMember,
    /// The store could not be read; the cursor is at the last message sent.
    Failed,
}

/// Tells the client to read `from_seq`..`last_seq` of `conv` over HTTP.
fn resync_frame(conv: ConversationId, from_seq: i64, last_seq: i64) -> String {
    json!({
        "v": 1,
        "type": "resync",
        "conversation_id": conv,
        "from_seq": from_seq,
        "last_seq": last_seq,
    })
    .to_string()
}

/// A `new_message` held until its predecessors are sent (see [`Writer::deliver`]).
struct Held {
    conv: ConversationId,
    seq: i64,
    delivery: Arc<Delivery>,
}

/// A token expiry (seconds since the epoch) as a deadline on the monotonic clock.
fn expiry_instant(exp: i64) -> Instant {
    let left = exp - chrono::Utc::now().timestamp();
    Instant::now() + Duration::from_secs(left.max(0) as u64)
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    }))
}

async fn publish_typing(
    state: &Shared,
    actor: Actor,
    conv: ConversationId,
    audience: Vec<mindsp_core::UserId>,
    typing: TypingState,
) {
    if audience.is_empty() {
        return;
    }
    state
        .realtime
        .publish(Envelope::to_users(
            actor.tenant_id,
            audience,
            Event::Typing {
                conversation_id: conv,
                user_id: actor.user_id,
                state: typing,
            },
        ))
        .await;
}

// ---- reader ---------------------------------------------------------------------------

struct Reader<'a> {
    state: &'a Shared,
    actor: Actor,
    stream: SplitStream<Socket>,
    out: &'a Handoff,
    expires: Instant,
    typing: Typing,
    bucket: TokenBucket,
    last_heard: Instant,
    /// The password this socket's token is for, in the hub (a refresh may move it).
    password: mindsp_realtime::PasswordMark,
    /// Set once the hub asks to close this connection: nothing more it sends is done.
    closed: mindsp_realtime::CloseSignal,
}

/// A client command. Unknown fields are refused.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Send {
        conversation_id: ConversationId,
        content: String,
        idempotency_key: Option<String>,
        #[serde(default)]
        mentions: Vec<UserId>,
    },
    Typing {
        conversation_id: ConversationId,
        state: TypingState,
    },
    MarkRead {
        conversation_id: ConversationId,
        seq: Option<i64>,
    },
    Resume {
        cursors: HashMap<ConversationId, i64>,
    },
    RefreshToken {
        token: String,
    },
    Presence {
        conversation_id: ConversationId,
    },
    Ping {},
}

const COMMANDS: &[&str] = &[
    "send",
    "typing",
    "mark_read",
    "resume",
    "refresh_token",
    "presence",
    "ping",
];

/// Runs `work` (a command that commits, then publishes) on a task of its own, so that it
/// runs to its end even if this connection closes meanwhile: dropped between its commit
/// and its publication, a message would be stored but told to nobody live, and its
/// mention e-mails never queued.
async fn to_completion<T: Send + 'static>(
    commands: &tokio_util::task::TaskTracker,
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    commands
        .spawn(work)
        .await
        .unwrap_or_else(|e| Err(Error::Storage(format!("a command's task failed: {e}"))))
}

/// The `id` of a frame, and nothing else of it.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<Value>,
}

/// Whether `id` may identify a command: a string of 1 to [`MAX_ID_BYTES`] bytes or an
/// integer.
fn valid_id(id: &Value) -> bool {
    match id {
        Value::String(s) => !s.is_empty() && s.len() <= MAX_ID_BYTES,
        Value::Number(n) => n.is_u64() || n.is_i64(),
        _ => false,
    }
}

/// An error answered in an `error` frame.
struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        let message = match &e {
            Error::Storage(_) => {
                tracing::error!(error = %e, "internal error on a websocket command");
                "internal error".to_owned()
            }
            _ => e.to_string(),
        };
        Self {
            code: e.code(),
            message,
        }
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Core(e) => e.into(),
            ApiError::Http { code, message, .. } => Self { code, message },
        }
    }
}

fn ack(id: &Value, mut body: Value) -> String {
    body["v"] = json!(1);
    body["type"] = json!("ack");
    body["id"] = id.clone();
    body.to_string()
}

fn error_frame(id: &Value, r: &Refusal) -> String {
    json!({"v": 1, "type": "error", "id": id, "code": r.code, "message": r.message}).to_string()
}

impl Reader<'_> {
    /// Reads until the connection must end, tells the writer how, then waits for the
    /// writer to finish (it never returns first).
    async fn run(&mut self) {
        let end = self.read().await;
        self.out.send(end).await;
        std::future::pending::<()>().await;
    }

    async fn read(&mut self) -> Out {
        let idle = self.state.ws.idle_timeout;
        loop {
            let next_deadline = [
                Some(self.expires),
                Some(self.last_heard + idle),
                self.typing.next_expiry(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.expires);
            tokio::select! {
                frame = self.stream.next() => {
                    self.last_heard = Instant::now();
                    match frame {
                        None => return Out::Gone,
                        Some(Err(e)) => return read_error(e),
                        // Once the hub has asked to close (deactivation, password
                        // change, stop...), nothing more from this client is carried
                        // out while the writer sends the last answers and the close;
                        // nor once the token has expired, even if the frame won the
                        // race with the expiry's timer.
                        Some(Ok(Message::Text(_) | Message::Binary(_))) if self.closed.get().is_some() => {}
                        Some(Ok(Message::Text(_) | Message::Binary(_))) if Instant::now() >= self.expires => {
                            return Out::Close(close::TOKEN_EXPIRED, "token expired");
                        }
                        Some(Ok(Message::Text(text))) => {
                            self.out.busy(true);
                            let reply = Box::pin(self.frame(text.as_str())).await;
                            if let Some(reply) = reply {
                                self.out.send(Out::Frame(reply)).await;
                            }
                            self.out.busy(false);
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let reply = if self.bucket.take(Instant::now()) {
                                let r = Refusal::new("unsupported_frame", "frames are JSON text; binary frames are not accepted");
                                error_frame(&Value::Null, &r)
                            } else {
                                self.rate_limited(&Value::Null)
                            };
                            self.out.send(Out::Frame(reply)).await;
                        }
                        Some(Ok(Message::Close(_))) => return Out::Gone,
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    }
                }
                // One timer for the three deadlines (a timer is ~100 bytes of every
                // idle connection's task).
                () = sleep_until(next_deadline) => {
                    let now = Instant::now();
                    if now >= self.expires {
                        return Out::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    if now >= self.last_heard + idle {
                        return Out::Close(close::IDLE, "idle: no pong received");
                    }
                    for (conv, audience) in self.typing.expired(now) {
                        Box::pin(publish_typing(self.state, self.actor, conv, audience, TypingState::Stop)).await;
                    }
                }
            }
        }
    }

    /// The answer to a frame beyond the rate limit.
    fn rate_limited(&self, id: &Value) -> String {
        let wait = self.bucket.wait().as_millis();
        let r = Refusal::new(
            "rate_limited",
            format!("too many commands: slow down (retry in {wait} ms)"),
        );
        error_frame(id, &r)
    }

    /// Handles one text frame; the reply to send, if any.
    async fn frame(&mut self, text: &str) -> Option<String> {
        if !self.bucket.take(Instant::now()) {
            // Refused without building the frame (it may be 64 KiB): only its `id` is
            // looked for, to be answered with.
            let id = serde_json::from_str::<IdOnly>(text)
                .ok()
                .and_then(|f| f.id)
                .filter(valid_id)
                .unwrap_or(Value::Null);
            return Some(self.rate_limited(&id));
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let r = Refusal::new("malformed_json", format!("the frame is not JSON: {e}"));
                return Some(error_frame(&Value::Null, &r));
            }
        };
        let Value::Object(mut map) = value else {
            let r = Refusal::new("invalid_frame", "a frame is a JSON object");
            return Some(error_frame(&Value::Null, &r));
        };
        let id = map.remove("id").unwrap_or(Value::Null);
        let id_ok = valid_id(&id);
        if id.is_null() {
            let r = Refusal::new("missing_id", "a command needs an `id` (string or integer)");
            return Some(error_frame(&Value::Null, &r));
        }
        if !id_ok {
            let r = Refusal::new(
                "invalid_id",
                format!("`id` is a string of 1 to {MAX_ID_BYTES} bytes or an integer"),
            );
            return Some(error_frame(&Value::Null, &r));
        }
        match map.remove("v") {
            None => {}
            Some(v) if v == json!(1) => {}
            Some(_) => {
                let r = Refusal::new("unsupported_version", "this server speaks version 1");
                return Some(error_frame(&id, &r));
            }
        }
        match map.get("type") {
            Some(Value::String(t)) if COMMANDS.contains(&t.as_str()) => {}
            Some(Value::String(t)) => {
                let shown: String = t.chars().take(40).collect();
                let r = Refusal::new(
                    "unknown_type",
                    format!(
                        "unknown command type {shown:?}; expected one of {}",
                        COMMANDS.join(", ")
                    ),
                );
                return Some(error_frame(&id, &r));
            }
            _ => {
                let r = Refusal::new("invalid_frame", "a command needs a `type` string");
                return Some(error_frame(&id, &r));
            }
        }
        let command: Command = match serde_json::from_value(Value::Object(map)) {
            Ok(c) => c,
            Err(e) => {
                return Some(error_frame(
                    &id,
                    &Refusal::new("invalid_frame", e.to_string()),
                ));
            }
        };
        match self.command(&id, command).await {
            Ok(Some(body)) => Some(ack(&id, body)),
            // Answered by the writer (resume).
            Ok(None) => None,
            Err(r) => Some(error_frame(&id, &r)),
        }
    }

    async fn command(&mut self, id: &Value, command: Command) -> Result<Option<Value>, Refusal> {
        let messaging = &self.state.messaging;
        let actor = &self.actor;
        match command {
            Command::Send {
                conversation_id,
                content,
                idempotency_key,
                mentions,
            } => {
                let (messaging, actor) = (messaging.clone(), *actor);
                let appended = to_completion(&self.state.commands, async move {
                    messaging
                        .send_with_mentions(
                            &actor,
                            conversation_id,
                            &content,
                            idempotency_key,
                            &mentions,
                        )
                        .await
                })
                .await?;
                Ok(Some(json!({
                    "message": appended.message(),
                    "created": appended.created(),
                })))
            }
            Command::MarkRead {
                conversation_id,
                seq,
            } => {
                let (messaging, actor) = (messaging.clone(), *actor);
                let marker = to_completion(&self.state.commands, async move {
                    messaging.mark_read(&actor, conversation_id, seq).await
                })
                .await?;
                Ok(Some(json!({ "last_read_seq": marker })))
            }
            Command::Typing {
                conversation_id,
                state: TypingState::Start,
            } => {
                let now = Instant::now();
                match self.typing.start(conversation_id, now) {
                    Start::Refresh => {}
                    Start::Refused => {
                        return Err(Refusal::new(
                            "too_many_typing",
                            format!("typing in at most {MAX_TYPING} conversations at once"),
                        ));
                    }
                    Start::Relay => {
                        let (_, members) = messaging.conversation(actor, conversation_id).await?;
                        let audience: Vec<_> = members
                            .into_iter()
                            .map(|m| m.user_id)
                            .filter(|u| *u != actor.user_id)
                            .collect();
                        self.typing.relayed(conversation_id, audience.clone(), now);
                        publish_typing(
                            self.state,
                            *actor,
                            conversation_id,
                            audience,
                            TypingState::Start,
                        )
                        .await;
                    }
                }
                Ok(Some(json!({})))
            }
            Command::Typing {
                conversation_id,
                state: TypingState::Stop,
            } => {
                if let Some(audience) = self.typing.stop(conversation_id) {
                    publish_typing(
                        self.state,
                        *actor,
                        conversation_id,
                        audience,
                        TypingState::Stop,
                    )
                    .await;
                }
                Ok(Some(json!({})))
            }
            Command::Presence { conversation_id } => Ok(Some(
                crate::api::members_presence(
                    messaging,
                    &self.state.realtime,
                    actor,
                    conversation_id,
                )
                .await?,
            )),
            Command::RefreshToken { token } => {
                if token.len() > MAX_TOKEN_BYTES {
                    return Err(Refusal::new(
                        "invalid_token",
                        "the access token is not valid",
                    ));
                }
                let (who, expires, password) = authenticate(self.state, &token).await?;
                if who.user_id != actor.user_id || who.tenant_id != actor.tenant_id {
                    return Err(Refusal::new(
                        "token_mismatch",
                        "the new token is for another user",
                    ));
                }
                self.expires = expiry_instant(expires);
                // A token for a password set since this socket opened: a late close
                // for that change spares it now.
                self.password.set(password);
                let at = chrono::DateTime::from_timestamp(expires, 0);
                Ok(Some(json!({ "expires_at": at })))
            }
            Command::Resume { cursors } => {
                let max = self.state.ws.max_resume_conversations;
                if cursors.len() > max {
                    return Err(Refusal::new(
                        "too_many_cursors",
                        format!("resume at most {max} conversations at once"),
                    ));
                }
                if cursors.values().any(|s| *s < 0) {
                    return Err(Refusal::new(
                        "invalid_cursor",
                        "cursors are sequence numbers ≥ 0",
                    ));
                }
                // Each cursor costs the store a read or more: a resume is charged a
                // command per RESUME_CURSORS_PER_COMMAND cursors beyond its first, as
                // debt if need be (a reconnecting client is never refused its resume;
                // its next commands wait).
                let extra = cursors.len().saturating_sub(1) / RESUME_CURSORS_PER_COMMAND;
                self.bucket.charge(Instant::now(), extra as u32);
                // In conversation order: each goes in at the end of the writer's
                // per-conversation state rather than in its middle.
                let mut cursors: Vec<_> = cursors.into_iter().collect();
                cursors.sort_unstable_by_key(|(conv, _)| *conv);
                self.out
                    .send(Out::Resume(Box::new((id.clone(), cursors))))
                    .await;
                Ok(None)
            }
            Command::Ping {} => Ok(Some(json!({}))),
        }
    }
}

fn read_error(e: tokio_tungstenite::tungstenite::Error) -> Out {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e {
        WsError::Capacity(_) => Out::Close(close::MESSAGE_TOO_BIG, "message too big"),
        WsError::Utf8(_) => Out::Close(close::INVALID_DATA, "a text frame is not UTF-8"),
        WsError::Protocol(_) => Out::Close(close::PROTOCOL_ERROR, "websocket protocol error"),
        _ => Out::Gone,
    }
}

// ---- writer ---------------------------------------------------------------------------

struct Writer<'a> {
    state: &'a Shared,
    actor: Actor,
    sink: SplitSink<Socket, Message>,
    replies: &'a Handoff,
    closed: mindsp_realtime::CloseSignal,
    /// Per conversation, the last `seq` delivered on this connection.
    cursors: PerConversation<i64>,
    /// Per conversation without a resume cursor, where live delivery started (see
    /// [`Floor`]).
    floors: PerConversation<Floor>,
    /// Messages that arrived ahead of the next one expected in their conversation,
    /// held until the end of the batch (at most [`HELD`]).
    held: Vec<Held>,
    /// Conversations this user was told they left: their events published late (by a
    /// command whose audience was read before the removal) are not sent, unless the
    /// store says the user is a member again.
    left: Vec<ConversationId>,
    /// Our close frame could not be written within the close timeout: the client does
    /// not read, so it will not answer it either.
    stuck: bool,
}

/// Why writing stopped.
enum Stop {
    /// The hub asked to close.
    Hub(CloseReason),
    /// The socket failed.
    Broken,
}

impl Writer<'_> {
    async fn run(&mut self, conn: &mut Connection) {
        let period = self.state.ws.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        let mut next_ping = Instant::now() + period;
        // Whether the last turn left events queued (see below).
        let mut behind = false;
        let stop = loop {
            if let Some(reason) = self.closed.get() {
                break Stop::Hub(reason);
            }
            // The select below is biased: a connection whose queue never empties would
            // never reach its ping branch, and a client that only listens answers
            // nothing but pings: it would be closed as silent. So while the writer is
            // behind, it looks at the clock itself (only then: a turn that emptied the
            // queue waits in the select, where the ping branch is polled).
            if behind && Instant::now() >= next_ping {
                ping.reset();
                next_ping = Instant::now() + period;
                if let Err(stop) = self.send(Message::Ping(Default::default())).await {
                    break stop;
                }
            }
            // Biased, and the close signal polled last: the check above already saw
            // any close, and a branch that is ready at once leaves the others unpolled,
            // so a busy connection does not register (and unregister) its wake-up on
            // the close signal for every event.
            let step = tokio::select! {
                biased;
                out = self.replies.recv() => match out {
                    // A command's answer usually has company: a `send` has just queued
                    // its own `new_message` for this connection (the sender's other
                    // devices see it there). One write carries both.
                    Out::Frame(f) => match self.closed.get() {
                        // The close was asked in the same turn: this answer was due
                        // before it, and goes out first (`last_answers` sends the
                        // rest), unless the client reads nothing anyway.
                        Some(reason) => {
                            Box::pin(self.closing(reason, Some(f))).await;
                            return;
                        }
                        None => match self.feed_text(&f).await {
                            Ok(()) => Box::pin(self.deliver_batch(None, conn)).await,
                            Err(stop) => Err(stop),
                        },
                    },
                    Out::Resume(resume) => {
                        let (id, cursors) = *resume;
                        Box::pin(self.resume(id, cursors)).await
                    }
                    Out::Close(code, reason) => {
                        Box::pin(self.close(code, reason)).await;
                        return;
                    }
                    Out::Gone => {
                        let t = self.state.ws.close_timeout;
                        let _ = tokio::time::timeout(t, self.sink.close()).await;
                        return;
                    }
                },
                d = conn.events.recv() => Box::pin(self.deliver_batch(Some(d), conn)).await,
                _ = ping.tick() => {
                    next_ping = Instant::now() + period;
                    self.send(Message::Ping(Default::default())).await
                }
                () = self.closed.asked() => continue,
            };
            if let Err(stop) = step {
                break stop;
            }
            behind = !conn.events.is_empty();
        };
        if let Stop::Hub(reason) = stop {
            Box::pin(self.closing(reason, None)).await;
        }
    }

    /// The node's close: the last answers (`first` among them: taken from the queue
    /// already), unless the client is too slow to take them, then the close frame.
    async fn closing(&mut self, reason: CloseReason, first: Option<String>) {
        if reason != CloseReason::TooSlow {
            self.last_answers(first).await;
        }
        self.close(reason.code(), reason.text()).await;
    }

    /// Before a close of the node's (not for a client too slow to take more): the
    /// answers the reader queued, and that of the command it is handling (a `send`
    /// committing), within the close timeout. A client told its message is stored need
    /// not send it again. The reader goes on meanwhile: both run in this task's select.
    async fn last_answers(&mut self, first: Option<String>) {
        let limit = self.state.ws.close_timeout;
        let _ = tokio::time::timeout(limit, async {
            if let Some(text) = first
                && !self.feed_due(text).await
            {
                return;
            }
            loop {
                match self.replies.try_recv() {
                    Some(Out::Frame(text)) => {
                        if !self.feed_due(text).await {
                            return;
                        }
                    }
                    Some(_) => {}
                    None if self.replies.is_busy() => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    None => return,
                }
            }
        })
        .await;
    }

    /// Buffers an answer due before a close, whatever the close signal says (in
    /// fragments when long); false when the socket failed.
    async fn feed_due(&mut self, text: String) -> bool {
        let frames = if text.len() <= MAX_FRAME {
            vec![Message::text(text)]
        } else {
            let frames = fragments(&text, MAX_FRAME);
            frames.into_iter().map(Message::Frame).collect()
        };
        for frame in frames {
            if self.sink.feed(frame).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Sends a frame and flushes, unless the hub asks to close first.
    async fn send(&mut self, message: Message) -> Result<(), Stop> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Buffers a frame (writing out what exceeds the buffer), unless the hub asks to
    /// close first. A client that does not read blocks this; the hub then fills its
    /// queue and asks to close.
    async fn feed(&mut self, message: Message) -> Result<(), Stop> {
        if let Some(reason) = self.closed.get() {
            return Err(Stop::Hub(reason));
        }
        // The socket first: it usually takes the frame at once, and the close signal
        // is then never polled (see `run`).
        tokio::select! {
            biased;
            r = self.sink.feed(message) => r.map_err(|_| Stop::Broken),
            () = self.closed.asked() => Err(self.stop()),
        }
    }

    /// Buffers a text frame, split into fragments of at most [`MAX_FRAME`] bytes when
    /// longer (see there).
    async fn feed_text(&mut self, text: &str) -> Result<(), Stop> {
        if text.len() <= MAX_FRAME {
            return self.feed(Message::text(text)).await;
        }
        for frame in fragments(text, MAX_FRAME) {
            self.feed(Message::Frame(frame)).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        tokio::select! {
            biased;
            r = self.sink.flush() => r.map_err(|_| Stop::Broken),
            () = self.closed.asked() => Err(self.stop()),
        }
    }

    /// Why writing stops once the hub asked to close.
    fn stop(&self) -> Stop {
        self.closed.get().map_or(Stop::Broken, Stop::Hub)
    }

    /// Delivers `first` and whatever else is already queued (up to a batch), then
    /// flushes once: with what was fed before, all in one write to the socket.
    async fn deliver_batch(
        &mut self,
        first: Option<Arc<Delivery>>,
        conn: &mut Connection,
    ) -> Result<(), Stop> {
        let mut room = BATCH;
        if let Some(first) = first {
            self.deliver(&first).await?;
            room -= 1;
        }
        self.deliver_queued(conn, room).await?;
        // A message held for a gap usually has its predecessor published a moment later
        // by another task (the commits of one batch are published in any order): give
        // that task a turn and take what it queued, rather than have every member's
        // connection read the store. What is still missing then comes from the store.
        for _ in 0..GAP_TURNS {
            if self.held.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
            self.deliver_queued(conn, BATCH).await?;
        }
        self.fill_held(None).await?;
        // Typing or presence skipped while this client was behind: now that it has
        // caught up, it should ask for presence again and clear typing indicators.
        if conn.events.is_empty() && conn.take_skipped() {
            self.feed_text(EVENTS_SKIPPED).await?;
        }
        self.flush().await
    }

    /// Delivers up to `room` events already queued.
    async fn deliver_queued(&mut self, conn: &mut Connection, room: usize) -> Result<(), Stop> {
        for _ in 0..room {
            match conn.events.try_recv() {
                Ok(d) => self.deliver(&d).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let t = self.state.ws.close_timeout;
        let sent = tokio::time::timeout(t, async {
            self.sink.send(close_message(code, reason)).await?;
            self.sink.close().await
        })
        .await;
        self.stuck = sent.is_err();
    }

    /// Sends an event from the hub, keeping each conversation's messages in order,
    /// without gap or duplicate.
    async fn deliver(&mut self, d: &Arc<Delivery>) -> Result<(), Stop> {
        if let Event::NewMessage {
            conversation_id, ..
        }
        | Event::MessageRead {
            conversation_id, ..
        }
        | Event::Typing {
            conversation_id, ..
        } = &d.envelope.event
            && self.left.contains(conversation_id)
        {
            // Published late (its audience read before the removal), or the user is a
            // member again (added back, that change's event still on its way): the
            // store says which.
            let conv = *conversation_id;
            match self.state.messaging.conversation(&self.actor, conv).await {
                Ok(_) => self.left.retain(|c| *c != conv),
                Err(_) => return Ok(()),
            }
        }
        match &d.envelope.event {
            Event::NewMessage {
                conversation_id,
                message,
            } => {
                let conv = *conversation_id;
                match self.cursors.get(&conv).copied() {
                    // First message seen live in this conversation: start there.
                    None => {
                        self.floors.insert(conv, Floor::at(message.seq));
                    }
                    // Older than where this connection started (published out of
                    // order): sent once, and remembered so that neither a second copy
                    // nor a `resume` sends it again.
                    Some(_) if self.floors.get(&conv).is_some_and(|f| message.seq < f.seq) => {
                        let floor = self.floors.get_mut(&conv).expect("just seen");
                        if !floor.take(message.seq) {
                            return Ok(());
                        }
                        return self.feed_text(d.frame()).await;
                    }
                    Some(c) if message.seq <= c => return Ok(()),
                    Some(c) if message.seq == c + 1 => {}
                    // Ahead of the next one expected (published out of order, or its
                    // predecessors lost): held until they arrive or are read from the
                    // store, at the end of the batch, or now if too many are held.
                    Some(_) => {
                        if self.held.len() >= HELD {
                            self.fill_held(None).await?;
                        }
                        match self.cursors.get(&conv).copied() {
                            Some(c) if message.seq == c + 1 => {}
                            Some(c) if message.seq > c => {
                                self.held.push(Held {
                                    conv,
                                    seq: message.seq,
                                    delivery: d.clone(),
                                });
                                return Ok(());
                            }
                            // Sent meanwhile, or the conversation is no longer visible.
                            _ => return Ok(()),
                        }
                    }
                }
                self.cursors.insert(conv, message.seq);
                self.feed_text(d.frame()).await?;
                self.release_held(conv).await
            }
            Event::ConversationUpdated {
                conversation_id,
                removed,
                ..
            } => {
                let me = self.actor.user_id;
                // A change listing the user again clears nothing: it may be older than
                // the removal, published after it. The store decides (above).
                if removed.contains(&me) {
                    self.cursors.remove(conversation_id);
                    self.floors.remove(conversation_id);
                    self.held.retain(|h| h.conv != *conversation_id);
                    if !self.left.contains(conversation_id) {
                        if self.left.len() == LEFT_KEPT {
                            self.left.remove(0);
                        }
                        self.left.push(*conversation_id);
                    }
                }
                self.feed_text(d.frame()).await
            }
            // A read marker or a mention may name a held message: that goes out first.
            Event::MessageRead {
                conversation_id, ..
            } if !self.held.is_empty() => {
                self.fill_held(Some(*conversation_id)).await?;
                self.feed_text(d.frame()).await
            }
            // So may a notification; and a client told to catch up does so from what it
            // has, held messages included.
            Event::Notification { .. } | Event::EventsSkipped { .. } if !self.held.is_empty() => {
                self.fill_held(None).await?;
                self.feed_text(d.frame()).await
            }
            Event::AccountDeactivated { .. } | Event::PasswordChanged { .. } => Ok(()),
            _ => self.feed_text(d.frame()).await,
        }
    }

    /// Sends the held messages of `conv` that now follow its cursor, in order; drops
    /// those at or below it (already sent) and all of them if the cursor is gone (the
    /// user left the conversation).
    async fn release_held(&mut self, conv: ConversationId) -> Result<(), Stop> {
        while !self.held.is_empty() {
            let cursor = self.cursors.get(&conv).copied();
            self.held
                .retain(|h| h.conv != conv || cursor.is_some_and(|at| h.seq > at));
            let Some(at) = cursor else { break };
            let Some(i) = self
                .held
                .iter()
                .position(|h| h.conv == conv && h.seq == at + 1)
            else {
                break;
            };
            let held = self.held.swap_remove(i);
            self.cursors.insert(conv, at + 1);
            self.feed_text(held.delivery.frame()).await?;
        }
        Ok(())
    }

    /// Sends every held message (of conversation `only`, when given), each after what
    /// precedes it read from the store.
    async fn fill_held(&mut self, only: Option<ConversationId>) -> Result<(), Stop> {
        while let Some(conv) = self
            .held
            .iter()
            .map(|h| h.conv)
            .find(|c| only.is_none_or(|o| o == *c))
        {
            let first = self.held.iter().filter(|h| h.conv == conv).map(|h| h.seq);
            let first = first.min().expect("one held message of conv");
            if let Some(at) = self.cursors.get(&conv).copied()
                && first > at + 1
            {
                match self.replay(conv, at, Some(first - 1), &[]).await? {
                    Replay::NotMember => {}
                    outcome => {
                        // The store could not be read: the client reads the gap over
                        // HTTP rather than never get it.
                        if outcome == Replay::Failed {
                            let reached = self.cursors.get(&conv).copied().unwrap_or(at);
                            self.feed_text(&resync_frame(conv, reached, first - 1))
                                .await?;
                        }
                        // The live message goes out even if the store lacked some
                        // before it.
                        let at = self.cursors.get_or_insert(conv, first - 1);
                        *at = (*at).max(first - 1);
                    }
                }
            }
            self.release_held(conv).await?;
        }
        Ok(())
    }

    /// Sends the stored messages after `from` (up to `to` when given) that this
    /// connection has not delivered, moving the cursor; those in `sent` were delivered
    /// already, out of order.
    async fn replay(
        &mut self,
        conv: ConversationId,
        from: i64,
        to: Option<i64>,
        sent: &[i64],
    ) -> Result<Replay, Stop> {
        let page = self.state.messaging.limits().max_page_size;
        let mut after = from;
        loop {
            let messages = match self
                .state
                .messaging
                .history(&self.actor, conv, SeqWindow::After(after), Some(page))
                .await
            {
                Ok(m) => m,
                Err(Error::NotFound(_)) => {
                    self.cursors.remove(&conv);
                    return Ok(Replay::NotMember);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read history to replay; the client is told to resync");
                    return Ok(Replay::Failed);
                }
            };
            let full = messages.len() as u32 == page;
            for m in messages {
                if to.is_some_and(|t| m.seq > t) {
                    return Ok(Replay::Done);
                }
                after = m.seq;
                if sent.contains(&m.seq) {
                    let at = self.cursors.get_or_insert(conv, m.seq);
                    *at = (*at).max(m.seq);
                    continue;
                }
                self.send_stored(conv, m).await?;
            }
            if !full || to.is_some_and(|t| after >= t) {
                return Ok(Replay::Done);
            }
        }
    }

    async fn send_stored(&mut self, conv: ConversationId, m: StoredMessage) -> Result<(), Stop> {
        if self.cursors.get(&conv).is_some_and(|c| m.seq <= *c) {
            return Ok(());
        }
        self.cursors.insert(conv, m.seq);
        let frame = event_frame(&Event::NewMessage {
            conversation_id: conv,
            message: m,
        });
        self.feed_text(&frame).await
    }

    /// Sets the cursors, replays everything after them, then acknowledges. Live events
    /// queued meanwhile go through [`Writer::deliver`] afterwards, whose cursors drop
    /// what the replay already sent.
    async fn resume(&mut self, id: Value, cursors: Vec<(ConversationId, i64)>) -> Result<(), Stop> {
        let mut not_found = Vec::new();
        let mut resync = Vec::new();
        let mut failed = Vec::new();
        let mut replayed = 0usize;
        for (conv, seq) in cursors {
            let last = match self.state.messaging.conversation(&self.actor, conv).await {
                // A member (again, if a removal was the last word heard here).
                Ok((c, _)) => {
                    self.left.retain(|gone| *gone != conv);
                    c.last_seq
                }
                Err(Error::NotFound(_)) => {
                    not_found.push(conv);
                    continue;
                }
                // Nothing changed for it: the client resumes it again later.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a conversation to resume");
                    failed.push(conv);
                    continue;
                }
            };
            // Messages of this conversation already delivered live on this connection,
            // before the resume arrived and after its cursor: from the floor up to the
            // connection's cursor.
            let live = self
                .floors
                .remove(&conv)
                .zip(self.cursors.get(&conv).copied())
                .filter(|&(_, at)| at > seq);
            if seq > last {
                // Ahead of the store (a client's mistake, a store restored from a
                // backup): taken as at the newest message (or the newest sent live, if
                // the read lagged), so that live ones are not dropped as already sent,
                // and the client reads it again over HTTP.
                let at = live.map_or(last, |(_, at)| at.max(last));
                self.cursors.insert(conv, at);
                self.feed_text(&resync_frame(conv, 0, last)).await?;
                resync.push(conv);
                continue;
            }
            if last - seq > self.state.ws.max_resume_messages {
                // Too far behind to replay here: live events go on from the newest
                // message (or the newest already sent live), and the client reads what
                // is between over HTTP.
                let at = live.map_or(last, |(_, at)| at.max(last));
                self.cursors.insert(conv, at);
                self.feed_text(&resync_frame(conv, seq, last)).await?;
                resync.push(conv);
                continue;
            }
            self.cursors.insert(conv, seq);
            // Replay what the client lacks: everything after its cursor, or, when some
            // were already sent live, only those before them (the rest follow live, as
            // they would have); never one it already has.
            let outcome = match &live {
                Some((floor, _)) if floor.seq <= seq + 1 => Replay::Done,
                Some((floor, _)) => {
                    self.replay(conv, seq, Some(floor.seq - 1), &floor.early)
                        .await?
                }
                None => self.replay(conv, seq, None, &[]).await?,
            };
            match outcome {
                Replay::Done => {}
                Replay::NotMember => {
                    not_found.push(conv);
                    continue;
                }
                // The store failed midway: the rest is read over HTTP, as for a
                // conversation too far behind, and live events go on.
                Replay::Failed => {
                    let reached = self.cursors.get(&conv).copied().unwrap_or(seq);
                    let to = live.as_ref().map_or(last, |(floor, _)| floor.seq - 1);
                    self.feed_text(&resync_frame(conv, reached, to)).await?;
                    resync.push(conv);
                    let at = live.as_ref().map_or(last, |&(_, at)| at);
                    self.cursors.insert(conv, at.max(reached));
                    continue;
                }
            }
            let reached = self.cursors.get(&conv).copied().unwrap_or(seq);
            replayed += (reached - seq) as usize;
            if let Some((floor, at)) = live {
                // Those sent live below the floor were not replayed.
                replayed -= floor
                    .early
                    .iter()
                    .filter(|&&e| e > seq && e <= reached)
                    .count();
                self.cursors.insert(conv, at);
            }
        }
        let body = json!({
            "replayed": replayed,
            "not_found": not_found,
            "resync": resync,
            "failed": failed,
        });
        self.feed_text(&ack(&id, body)).await?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages below the floor are sent once: the one just below lowers it (and takes
    /// the ones already sent below that with it), others are remembered.
    #[test]
    fn a_floor_remembers_what_went_out_below_it() {
        let mut f = Floor::at(20);
        assert!(f.take(17));
        assert!(f.take(15));
        assert!(!f.take(17), "a second copy");
        assert_eq!((f.seq, f.early.as_slice()), (20, &[17, 15][..]));
        assert!(f.take(19));
        assert!(f.take(18));
        assert_eq!((f.seq, f.early.as_slice()), (17, &[15][..]));
        assert!(f.take(16));
        assert_eq!((f.seq, f.early.is_empty()), (15, true));
        for seq in (0..14).rev().step_by(2) {
            assert!(f.take(seq));
        }
        assert!(f.early.len() <= HELD);
    }

    /// The per-conversation map against a `BTreeMap`, over inserts, replacements,
    /// lookups and removals in a scrambled order; its first entries take exactly their
    /// room.
    #[test]
    fn the_per_conversation_map_acts_as_a_map() {
        let ids: Vec<ConversationId> = (0..40).map(|_| ConversationId::new()).collect();
        let mut map = PerConversation::default();
        let mut model = std::collections::BTreeMap::new();
        for step in 0..400usize {
            let conv = ids[(step * 7 + step / 3) % ids.len()];
            match step % 5 {
                0 | 1 => assert_eq!(map.insert(conv, step), model.insert(conv, step)),
                2 => assert_eq!(
                    *map.get_or_insert(conv, step),
                    *model.entry(conv).or_insert(step)
                ),
                3 => assert_eq!(map.remove(&conv), model.remove(&conv)),
                _ => {
                    if let Some(v) = map.get_mut(&conv) {
                        *v += 1;
                    }
                    if let Some(v) = model.get_mut(&conv) {
                        *v += 1;
                    }
                }
            }
            assert!(
                ids.iter().all(|c| map.get(c) == model.get(c)),
                "step {step}"
            );
            let kept: Vec<_> = map.0.iter().map(|(c, v)| (*c, *v)).collect();
            let want: Vec<_> = model.iter().map(|(c, v)| (*c, *v)).collect();
            assert_eq!(kept, want, "step {step}");
        }
        let mut small = PerConversation::default();
        for (n, conv) in ids.iter().take(4).enumerate() {
            small.insert(*conv, 0i64);
            assert_eq!(small.0.capacity(), n + 1);
        }
    }

    #[test]
    fn long_texts_go_out_in_fragments_split_between_characters() {
        // Two-byte characters after one byte: every MAX_FRAME-th byte is inside one.
        let text = "a".to_owned() + &"é".repeat(MAX_FRAME) + "fin";
        let frames = fragments(&text, MAX_FRAME);
        assert_eq!(frames.len(), 3, "two full fragments and a short one");
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let first = i == 0;
            let last = i == frames.len() - 1;
            assert_eq!(f.header().is_final, last);
            let kind = if first { Data::Text } else { Data::Continue };
            assert_eq!(f.header().opcode, OpCode::Data(kind));
            assert!(f.payload().len() <= MAX_FRAME);
            std::str::from_utf8(f.payload()).expect("whole characters in each fragment");
            joined.extend_from_slice(f.payload());
        }
        assert_eq!(joined, text.as_bytes());
        // One byte over: a second fragment of that byte.
        let frames = fragments(&"a".repeat(MAX_FRAME + 1), MAX_FRAME);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].payload().len(), MAX_FRAME);
        assert_eq!(frames[1].payload(), b"a");
    }
}
