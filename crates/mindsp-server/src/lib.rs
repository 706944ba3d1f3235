//! MindSP reference server: the REST API as an axum [`Router`] an embedder can mount
//! in their own application, plus the pieces the `mindsp-server` binary assembles
//! (configuration, CLI, demo data, graceful shutdown).
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let store = mindsp_store::open("sqlite://mindsp.db").await?;
//! let state = mindsp_server::AppState::new(store, &mindsp_server::HttpConfig::with_secret(b"a secret of at least thirty-two bytes!!"));
//! let app = axum::Router::new().nest("/chat", mindsp_server::router(state));
//! # Ok(()) }
//! ```
//!
//! [`AppState::new`] monitors the job queue in the store's own database (SQLite or
//! PostgreSQL); [`AppState::with_queue`] takes another one (Redis, say). Running the
//! jobs is separate: see [`workers`].

pub mod api;
pub mod auth;
pub mod cli;
pub mod demo;
pub mod error;
pub mod extract;
pub(crate) mod last_seen;
pub mod notifications;
pub mod passwords;
pub mod rates;
mod stall;
mod upgrade;
pub mod workers;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use mindsp_core::jobs::JobQueue;
use mindsp_core::notify::{Notifier, NotifyConfig};
use mindsp_core::ports::Store;
use mindsp_core::training::{Training, TrainingConfig};
use mindsp_core::{Limits, Messaging};
use mindsp_realtime::Realtime;
use tokio::net::TcpListener;

use crate::auth::Tokens;
use crate::error::ApiError;

/// HTTP-facing settings of the API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Secret that signs access tokens (HS256); at least 32 bytes.
    pub jwt_secret: Vec<u8>,
    /// Access token lifetime.
    pub token_ttl: Duration,
    /// Largest request body in bytes; larger bodies get 413 `payload_too_large`.
    pub max_body_bytes: usize,
    /// Longest time one request may take, its body included; beyond, 408
    /// `request_timeout` (a body that trickles in would otherwise hold its connection
    /// for as long as the client likes).
    pub request_timeout: Duration,
    /// Content, page and name bounds enforced by the core.
    pub limits: Limits,
    /// WebSocket limits and timings.
    pub ws: ws::WsConfig,
    /// Notification types, limits and e-mail defaults.
    pub notify: NotifyConfig,
    /// Training-session limits and default reminder lead times.
    pub training: TrainingConfig,
    /// Password hashing at once, and failed logins per account (`passwords`).
    pub passwords: passwords::PasswordLimits,
    /// Requests that may change something, per user and node (`rates`).
    pub write_rate: rates::WriteRate,
}

impl HttpConfig {
    /// Defaults with the given token secret.
    pub fn with_secret(secret: &[u8]) -> Self {
        Self {
            jwt_secret: secret.to_vec(),
            token_ttl: Duration::from_secs(12 * 3600),
            max_body_bytes: 64 * 1024,
            request_timeout: REQUEST_TIMEOUT,
            limits: Limits::default(),
            ws: ws::WsConfig::default(),
            notify: NotifyConfig::default(),
            training: TrainingConfig::default(),
            passwords: passwords::PasswordLimits::default(),
            write_rate: rates::WriteRate::default(),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The messaging service over the configured store.
    pub messaging: Messaging,
    /// Token issuer and verifier.
    pub tokens: Tokens,
    /// The job queue the monitoring routes (`/api/admin/jobs...`) look at. `None` when
    /// the store has no SQL queue and none was given: those routes then answer 503
    /// `queue_unavailable`.
    pub jobs: Option<Arc<dyn JobQueue>>,
    /// This node's live connections, presence and broker; `messaging` publishes
    /// through it.
    pub realtime: Realtime,
    /// Notifications: stored, pushed through `realtime`, e-mailed through `jobs`.
    pub notifier: Notifier,
    /// Training sessions (FMPA), notifying through `notifier`.
    pub training: Training,
    /// What every WebSocket connection needs, shared (see `ws::Shared`).
    sockets: Arc<ws::Shared>,
    passwords: Arc<passwords::Passwords>,
    writes: Arc<rates::WriteRates>,
    max_body_bytes: usize,
    request_timeout: Duration,
}

impl AppState {
    /// Wires the service over a store, with the job queue in the store's own database
    /// when it has one (the SQLite and PostgreSQL stores do).
    pub fn new(store: Arc<dyn Store>, config: &HttpConfig) -> Self {
        let jobs = mindsp_queue::sql_queue(store.as_ref()).ok();
        Self::build(store, jobs, config)
    }

    /// Wires the service over a store and a job queue of the caller's choice.
    pub fn with_queue(store: Arc<dyn Store>, jobs: Arc<dyn JobQueue>, config: &HttpConfig) -> Self {
        Self::build(store, Some(jobs), config)
    }

    fn build(store: Arc<dyn Store>, jobs: Option<Arc<dyn JobQueue>>, config: &HttpConfig) -> Self {
        let realtime = Realtime::in_process(config.ws.queue_capacity);
        Self::assemble(store, jobs, realtime, config)
    }

    /// Wires the service over a store, a job queue (if any) and a real-time stack of
    /// the caller's choice (another broker, say), whose hub it limits to
    /// `config.ws.max_connections_per_user` connections per user. Called within a tokio
    /// runtime, it also starts the task that closes the connections of deactivated users
    /// after events were lost on their way to this node (see `Hub::events_lost`).
    pub fn assemble(
        store: Arc<dyn Store>,
        jobs: Option<Arc<dyn JobQueue>>,
        realtime: Realtime,
        config: &HttpConfig,
    ) -> Self {
        let mut notifier = Notifier::new(store.clone(), config.notify.clone())
            .with_publisher(realtime.publisher());
        if let Some(q) = &jobs {
            notifier = notifier.with_queue(q.clone());
        }
        let training = Training::new(
            store.clone(),
            notifier.clone(),
            jobs.clone(),
            config.training.clone(),
        );
        let messaging = Messaging::new(store, config.limits.clone())
            .with_publisher(realtime.publisher())
            .with_notifier(notifier.clone());
        let tokens = Tokens::new(&config.jwt_secret, config.token_ttl);
        realtime
            .hub()
            .limit_per_user(config.ws.max_connections_per_user);
        let sockets = Arc::new(ws::Shared {
            last_seen: last_seen::LastSeen::follow(messaging.store().clone(), &realtime),
            messaging: messaging.clone(),
            tokens: tokens.clone(),
            realtime: realtime.clone(),
            ws: config.ws.clone(),
            commands: tokio_util::task::TaskTracker::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(
                config
                    .ws
                    .max_connections
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        });
        ws::check_accounts_after_losses(&sockets);
        Self {
            sockets,
            messaging,
            notifier,
            training,
            tokens,
            jobs,
            realtime,
            passwords: Arc::new(passwords::Passwords::new(config.passwords.clone())),
            writes: Arc::new(rates::WriteRates::new(config.write_rate)),
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout,
        }
    }

    /// Starts closing every WebSocket with 1012 (reconnect elsewhere) and refuses new
    /// ones, leaving presence to the other nodes (`Realtime::shutdown`); then waits, at
    /// most `grace`, until they are gone. True when all are.
    pub async fn close_websockets(&self, grace: Duration) -> bool {
        self.note_connected_as_seen();
        self.realtime.shutdown().await;
        let drained = self.realtime.hub().drained(grace).await;
        self.sockets.last_seen.flush_at_stop().await;
        drained
    }

    /// Waits, at most `grace`, for the commands still running to their end on tasks of
    /// their own (a `send` whose socket closed, a REST change whose client left or got
    /// 408) to commit and publish: call it before [`Realtime::stopped`], which closes
    /// the broker (with Redis, a publication after it would reach no other node, and
    /// the node would already be marked as stopped cleanly, so no `events_lost` either).
    /// True when none is left.
    pub async fn finish_commands(&self, grace: Duration) -> bool {
        let commands = &self.sockets.commands;
        commands.close();
        tokio::time::timeout(grace, commands.wait()).await.is_ok()
    }

    /// How many commands are running to their end on tasks of their own now (see
    /// [`AppState::finish_commands`]).
    pub fn commands_running(&self) -> usize {
        self.sockets.commands.len()
    }

    /// The users connected here are seen now: at a shutdown, their sockets close without
    /// a word to presence (it is left to the nodes that stay), and the store would
    /// otherwise keep an older `last_seen` for those who do not come back. Written with
    /// the rest by [`AppState::close_websockets`].
    pub fn note_connected_as_seen(&self) {
        let now = mindsp_core::model::now();
        for (tenant, users) in self.realtime.hub().local_users() {
            for user in users {
                self.sockets.last_seen.note(tenant, user, now);
            }
        }
    }
}

/// The API routes (`/api/...`, `/ws` and `/healthz`), ready to serve or to nest.
pub fn router(state: AppState) -> Router {
    use api::*;
    let api = Router::new()
        .route("/auth/login", post(login))
        .route("/me", get(me))
        .route("/me/password", post(change_password))
        .route("/users", get(list_users))
        .route("/admin/users", post(create_user))
        .route("/admin/users/{id}", axum::routing::patch(update_user))
        .route(
            "/conversations",
            get(list_conversations).post(create_conversation),
        )
        .route(
            "/conversations/{id}",
            get(get_conversation).patch(rename_conversation),
        )
        .route("/conversations/{id}/members", post(add_members))
        .route("/conversations/{id}/presence", get(conversation_presence))
        .route(
            "/conversations/{id}/members/{user_id}",
            axum::routing::patch(set_member_role).delete(remove_member),
        )
        .route("/conversations/{id}/leave", post(leave))
        .route("/conversations/{id}/messages", get(history).post(send))
        .route("/conversations/{id}/read", post(mark_read))
        .route("/conversations/{id}/search", get(search_conversation))
        .route("/search", get(search_all))
        .route("/notifications", get(notifications::list))
        .route(
            "/notifications/unread-count",
            get(notifications::unread_count),
        )
        .route("/notifications/read-all", post(notifications::read_all))
        .route(
            "/notifications/preferences",
            get(notifications::get_preferences).put(notifications::put_preferences),
        )
        .route(
            "/notifications/{id}",
            axum::routing::delete(notifications::delete),
        )
        .route("/notifications/{id}/read", post(notifications::mark_read))
        .route("/admin/notifications", post(notifications::broadcast))
        .route(
            "/admin/notifications/preferences",
            get(notifications::get_tenant_preferences).put(notifications::put_tenant_preferences),
        )
        .route(
            "/fmpa",
            get(notifications::list_sessions).post(notifications::create_session),
        )
        .route(
            "/fmpa/{id}",
            get(notifications::get_session).patch(notifications::update_session),
        )
        .route("/fmpa/{id}/cancel", post(notifications::cancel_session))
        .route("/fmpa/{id}/respond", post(notifications::respond))
        .route("/admin/jobs", get(list_jobs))
        .route("/admin/jobs/stats", get(job_stats))
        .route("/admin/jobs/{id}", get(get_job))
        .route("/admin/jobs/{id}/retry", post(retry_job))
        .route("/admin/jobs/{id}/discard", post(discard_job))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .nest("/api", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            (state.max_body_bytes, state.sockets.commands.clone()),
            to_completion,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.request_timeout,
            request_deadline,
        ))
        .layer(
            // One INFO line per request (method, path, status, latency); bodies and
            // headers are never logged, so tokens and passwords stay out of the logs.
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(
                    tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
                )
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                ),
        );
    if let Some(cors) = cors(&state.sockets.ws.allowed_origins) {
        app = app.layer(cors);
    }
    // After the trace layer: its spans show the URI, and `/ws?token=` carries a
    // token. The socket checks `Origin` itself (see `ws`), so no CORS there.
    app.route("/ws", get(ws::handler))
        // The other routes got theirs before the layers (above): set only here, it would
        // reach them outside the layers, and CORS preflights (OPTIONS) would miss CORS.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// How long a browser may reuse a CORS preflight answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// CORS for the API: pages served from the allowed browser origins (the list the
/// WebSocket checks, `*` for any) may call it with a bearer token, and read its
/// answers, errors included. No cookies are involved, so no credentials mode. With no
/// list, no CORS headers: only the server's own pages, which need none.
fn cors(allowed: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if allowed.is_empty() {
        return None;
    }
    let origin = if allowed.iter().any(|a| a == "*") {
        AllowOrigin::any()
    } else {
        let allowed = allowed.to_vec();
        AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin
                .to_str()
                .is_ok_and(|o| ws::origin_listed(&allowed, o))
        })
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            // A page of another origin reads how long to wait after a 429 or a 503.
            .expose_headers([header::RETRY_AFTER])
            .max_age(CORS_MAX_AGE),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

/// Answers 408 `request_timeout` to a request not answered within `limit` (see
/// [`HttpConfig::request_timeout`]). The request's work stops there; a body not read to
/// its end then closes the connection.
async fn request_deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => axum::response::IntoResponse::into_response(ApiError::http(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long (a body sent too slowly?)",
        )),
    }
}

/// Runs each request that may change something (not `GET`, `HEAD`, `OPTIONS`) on a task
/// of its own, to its end even when its client goes or its deadline passes
/// ([`request_deadline`] answers meanwhile): the service publishes what it commits after
/// the commit, and a request dropped in between would leave a message stored but told
/// to nobody live, or its mention e-mails never queued. Reads stay cancellable: a client
/// that gives up on a search stops its work. The body is read first, here, under the
/// deadline: what runs to its end never waits for the client (a body that stops coming
/// is dropped with its connection at the deadline).
async fn to_completion(
    axum::extract::State((limit, commands)): axum::extract::State<(
        usize,
        tokio_util::task::TaskTracker,
    )>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::Method;
    use axum::response::IntoResponse;
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) if over_limit(&e) => {
            return ApiError::http(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body exceeds the configured limit",
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::bad_request("bad_request", "the request body could not be read")
                .into_response();
        }
    };
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    match commands.spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "a request's task failed");
            axum::response::IntoResponse::into_response(ApiError::Core(
                mindsp_core::Error::Storage("a request's task failed".to_owned()),
            ))
        }
    }
}

/// Whether reading a body failed because it exceeded its limit.
fn over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

async fn not_found() -> ApiError {
    ApiError::http(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// A route asked with a method it does not take: our error body (axum's own answer has
/// none); axum adds the `Allow` header.
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::http(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route does not take {method}"),
    )
}

/// The default [`HttpConfig::request_timeout`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a client has to send a request's headers, counted from the moment its
/// connection is ready for one: a connection that never speaks, or stays idle this long
/// between two requests, is closed. Phones that lose their signal leave such
/// connections behind, and without this each would hold a socket for good. Upgraded
/// connections (`/ws`) are not concerned: they have pings and their own idle timeout.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write to a client may find no room before its connection is dropped: the
/// client reads nothing (see the `stall` module). WebSockets included: a phone whose app
/// froze while its system still answers would otherwise hold its connection, and its
/// slot on the node, for good.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Open files a node keeps for itself (database, its files, Redis, logs) out of its
/// open-file limit: connections from clients may not take them.
const FILES_KEPT: u64 = 256;

/// The default [`ConnectionLimits::max_connections`]: the open-file limit less
/// [`FILES_KEPT`], or three quarters of it when small. The WebSocket cap
/// (`WsConfig::max_connections`) keeps more back, so REST still has room when every
/// WebSocket slot is taken.
pub fn default_max_connections() -> usize {
    open_files_less(FILES_KEPT, |soft| soft / 4 * 3)
}

/// The process's open-file limit less `kept`, or `small(limit)` when that is more;
/// 10,000 when the limit cannot be read.
pub(crate) fn open_files_less(kept: u64, small: impl FnOnce(u64) -> u64) -> usize {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _)) => {
            let cap = soft.saturating_sub(kept).max(small(soft));
            // An unlimited limit would be more than a semaphore holds.
            usize::try_from(cap)
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS)
        }
        Err(_) => 10_000,
    }
}

/// Limits of the connections [`serve_with`] accepts.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// See [`HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// See [`WRITE_TIMEOUT`].
    pub write_timeout: Duration,
    /// Connections open at once, upgraded WebSockets included. Beyond, new ones wait in
    /// the listener's backlog until one closes: running out of open files would also
    /// stop the node from reaching its database.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: HEADER_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish for at most `grace` before returning. Every accepted connection gets
/// `TCP_NODELAY` ([`no_delay`]) and the default [`ConnectionLimits`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    serve_with(listener, app, shutdown, grace, ConnectionLimits::default()).await
}

/// [`serve`] with other connection limits.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    // `true` once the shutdown began; every connection task holds a receiver, so that
    // `closed()` on the sender tells when the last one ended.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let (began, grace_starts) = tokio::sync::oneshot::channel::<()>();
    let served = async move {
        accept_until(&listener, &app, &stop, shutdown, limits).await;
        // Refuse new connections at once (a load balancer tries another node) rather
        // than leave them queued, unanswered, while the others finish.
        drop(listener);
        let _ = stopping.send(true);
        let _ = began.send(());
        drop(stop);
        stopping.closed().await;
    };
    let deadline = async move {
        if grace_starts.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = served => Ok(()),
        () = deadline => {
            tracing::warn!(?grace, "shutdown grace period over; requests still running end with the process");
            Ok(())
        }
    }
}

/// Accepts connections and serves each on a task of its own until `shutdown` resolves;
/// they are then asked to finish (`stop` turns true).
async fn accept_until(
    listener: &TcpListener,
    app: &Router,
    stop: &tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send,
    limits: ConnectionLimits,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let most = limits
        .max_connections
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    let places = Arc::new(tokio::sync::Semaphore::new(most));
    let mut full_since: Option<std::time::Instant> = None;
    loop {
        // A place first: beyond the cap, new connections wait in the backlog.
        let place = match places.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                if full_since.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    full_since = Some(std::time::Instant::now());
                    tracing::warn!(
                        max = limits.max_connections,
                        "connection cap reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    p = places.clone().acquire_owned() => match p {
                        Ok(place) => place,
                        Err(_) => return,
                    },
                    () = shutdown.as_mut() => return,
                }
            }
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.as_mut() => return,
        };
        let mut tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::error!(error = %e, "cannot accept a connection");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.as_mut() => return,
                }
            }
        };
        no_delay(&mut tcp);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let io = stall::WriteDeadline::new(tcp, limits.write_timeout).holding(place);
            let conn = builder
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let mut asked = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !asked => {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
}

/// Errors of one connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Turns off Nagle's algorithm on an accepted connection. WebSocket events are small
/// writes, often several in a row to one client; with Nagle each one after the first
/// waited for the client's acknowledgement, which a client may delay by up to 40 ms:
/// under load about one delivery in seven took 20–50 ms more (`benches/RESULTS.md`).
pub fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
    }
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is first
/// polled: a signal arriving in between is not missed (and does not kill the process
/// with the default action). Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            let int = async {
                match int {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            let term = async {
                match term {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = int => tracing::info!("SIGINT received, shutting down"),
                () = term => tracing::info!("SIGTERM received, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("ctrl-c received, shutting down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `serve` does to each accepted connection: Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_connections_send_small_frames_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr);
        let (accepted, _client) = tokio::join!(listener.accept(), client);
        let (mut tcp, _) = accepted.unwrap();
        assert!(!tcp.nodelay().unwrap(), "Nagle is on by default");
        no_delay(&mut tcp);
        assert!(tcp.nodelay().unwrap());
    }
}
