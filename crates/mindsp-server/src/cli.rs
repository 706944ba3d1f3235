//! The `mindsp-server` command line: `serve` (the default), `worker`, `migrate`,
//! `create-tenant`, `create-user`. Every flag has a `MINDSP_*` environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mindsp_core::Limits;
use mindsp_core::jobs::JobQueue;
use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::service::create_user_in;
use mindsp_queue::worker::{WorkerConfig, WorkerHandle};

use crate::workers::{
    MailSettings, MailTransport, NotifyServices, WorkerSettings, parse_mailbox, start_worker,
};
use crate::{
    AppState, ConnectionLimits, HttpConfig, auth, default_max_connections, demo, router,
    serve_with, shutdown_signal,
};
use mindsp_core::notify::{Notifier, NotifyConfig};
use mindsp_core::reminders::check_offsets;
use mindsp_core::training::{Training, TrainingConfig};

/// MindSP: real-time messaging for fire and rescue services.
#[derive(Debug, Parser)]
#[command(
    name = "mindsp-server",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Database: `sqlite://FILE` (embedded default), `sqlite::memory:` or `postgres://...`.
    #[arg(
        long,
        env = "MINDSP_DATABASE_URL",
        default_value = "sqlite://mindsp.db",
        global = true
    )]
    pub database_url: String,

    /// Log filter, e.g. `info` or `mindsp_server=debug,tower_http=debug`.
    #[arg(long, env = "MINDSP_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Log format.
    #[arg(long, env = "MINDSP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    serve: ServeArgs,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
// Parsed once at start-up: the size of `Serve` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default), with a job worker unless `--no-workers`.
    Serve(ServeArgs),
    /// Run only the job worker (no HTTP listener) until SIGTERM or SIGINT.
    Worker(WorkerArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Create a tenant (a fire department).
    CreateTenant {
        /// Short handle used at login, e.g. `sdis83`.
        #[arg(long)]
        slug: String,
        /// Display name, e.g. "SDIS 83 — Var".
        #[arg(long)]
        name: String,
    },
    /// Create a user in a tenant.
    CreateUser {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Login e-mail.
        #[arg(long)]
        email: String,
        /// Name shown to others.
        #[arg(long)]
        name: String,
        /// admin, officer or member.
        #[arg(long, default_value = "member")]
        role: String,
        /// Password (prefer the environment variable: flags are visible to `ps`).
        #[arg(long, env = "MINDSP_USER_PASSWORD", hide_env_values = true)]
        password: String,
    },
}

/// Settings of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "MINDSP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Secret signing access tokens (≥ 32 bytes). Without it, the embedded profile
    /// generates one and keeps it beside the database file; PostgreSQL requires it.
    #[arg(long, env = "MINDSP_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Access token lifetime in seconds.
    #[arg(long, env = "MINDSP_TOKEN_TTL_SECS", default_value_t = 12 * 3600)]
    pub token_ttl_secs: u64,

    /// Largest request body in bytes.
    #[arg(long, env = "MINDSP_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// REST requests that may change something, per second per user and node, on
    /// average (429 `rate_limited` beyond).
    #[arg(long, env = "MINDSP_REST_RATE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rest_rate: u32,

    /// Such requests per user in a burst.
    #[arg(long, env = "MINDSP_REST_BURST", default_value_t = 40,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rest_burst: u32,

    /// Connections served at once, HTTP and WebSocket; beyond, new ones wait until one
    /// closes. Default: the open-file limit, raised to its maximum at start, less 256
    /// kept for the database and the rest (or three quarters of it when small).
    #[arg(long, env = "MINDSP_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub max_connections: Option<u32>,

    /// Longest message in characters.
    #[arg(long, env = "MINDSP_MAX_MESSAGE_CHARS", default_value_t = 4000)]
    pub max_message_chars: usize,

    /// Largest page size for lists and history.
    #[arg(long, env = "MINDSP_MAX_PAGE_SIZE", default_value_t = 100)]
    pub max_page_size: u32,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT; then running
    /// jobs get as long, and unfinished ones are given back to the queue.
    #[arg(long, env = "MINDSP_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Create the demo tenant `sdis13` (admin@sdis13.fr / Password123!) if absent.
    #[arg(long, env = "MINDSP_DEMO")]
    pub demo: bool,

    /// Run no job worker in this process (same as `--workers 0`): jobs wait for a
    /// `mindsp-server worker` elsewhere.
    #[arg(long)]
    pub no_workers: bool,

    /// Default reminder lead times of a training session, in minutes,
    /// comma-separated (24 h and 1 h before the start).
    #[arg(
        long,
        env = "MINDSP_FMPA_REMINDERS",
        default_value = "1440,60",
        value_delimiter = ','
    )]
    pub fmpa_reminders: Vec<i64>,

    #[command(flatten)]
    pub jobs: JobArgs,

    #[command(flatten)]
    pub ws: WsArgs,

    #[command(flatten)]
    pub realtime: RealtimeArgs,
}

/// Real time across nodes: without `--redis-url`, one node (in-process fan-out and
/// presence).
#[derive(Debug, Clone, Args)]
pub struct RealtimeArgs {
    /// Redis shared by every node for real-time fan-out (pub/sub) and presence:
    /// `redis://[user:password@]host[:port][/db]` (`rediss://` for TLS). Unset: this
    /// node alone.
    #[arg(long, env = "MINDSP_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Prefix of the real-time channel and presence keys (the same on every node).
    #[arg(long, env = "MINDSP_REDIS_PREFIX", default_value = "{mindsp}:rt:")]
    pub redis_prefix: String,

    /// Seconds between a node's presence heartbeats (and sweeps of dead nodes).
    #[arg(long, env = "MINDSP_PRESENCE_HEARTBEAT_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub presence_heartbeat_secs: u64,

    /// Seconds without a heartbeat after which a node counts as dead and its users turn
    /// offline (the same on every node; more than the heartbeat).
    #[arg(long, env = "MINDSP_PRESENCE_WINDOW_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub presence_window_secs: u64,

    /// Seconds between two resyncs of a node's presence in Redis with the connections
    /// it holds (what drifted, such as a command that reached Redis out of order after
    /// a network fault, is put right within this long).
    #[arg(long, env = "MINDSP_PRESENCE_RESYNC_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub presence_resync_secs: u64,
}

impl RealtimeArgs {
    /// The real-time stack these settings name.
    async fn open(&self, queue_capacity: usize) -> anyhow::Result<mindsp_realtime::Realtime> {
        let Some(url) = self
            .redis_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return Ok(mindsp_realtime::Realtime::in_process(queue_capacity));
        };
        open_redis_realtime(self, url, queue_capacity).await
    }
}

#[cfg(feature = "redis")]
async fn open_redis_realtime(
    args: &RealtimeArgs,
    url: &str,
    queue_capacity: usize,
) -> anyhow::Result<mindsp_realtime::Realtime> {
    let prefix = &args.redis_prefix;
    if prefix.is_empty()
        || prefix.len() > MAX_QUEUE_PREFIX_LEN
        || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        bail!(
            "MINDSP_REDIS_PREFIX has 1 to {MAX_QUEUE_PREFIX_LEN} bytes, without spaces or control characters"
        );
    }
    if args.presence_window_secs <= args.presence_heartbeat_secs {
        bail!("MINDSP_PRESENCE_WINDOW_SECS must be longer than MINDSP_PRESENCE_HEARTBEAT_SECS");
    }
    let mut config = mindsp_realtime::redis::RedisConfig::new(url);
    config.prefix = prefix.clone();
    config.heartbeat = Duration::from_secs(args.presence_heartbeat_secs);
    config.window = Duration::from_secs(args.presence_window_secs);
    config.resync = Duration::from_secs(args.presence_resync_secs);
    let realtime = mindsp_realtime::Realtime::redis(&config, queue_capacity)
        .await
        .with_context(|| format!("cannot connect to Redis at {}", redact(url)))?;
    tracing::info!(redis = %redact(url), prefix = %prefix, "real time through Redis");
    Ok(realtime)
}

#[cfg(not(feature = "redis"))]
async fn open_redis_realtime(
    _args: &RealtimeArgs,
    _url: &str,
    _queue_capacity: usize,
) -> anyhow::Result<mindsp_realtime::Realtime> {
    bail!("this build has no Redis support (cargo feature `redis`)")
}

/// WebSocket (`/ws`) limits; see `docs/PROTOCOL.md`.
#[derive(Debug, Clone, Args)]
pub struct WsArgs {
    /// Browser origins whose pages may open a WebSocket and call the REST API (CORS),
    /// comma-separated (`https://chat.sdis13.fr`), or `*`. Empty: the server's own
    /// origin only. WebSocket clients sending no `Origin` (not browsers) are always
    /// allowed.
    #[arg(long, env = "MINDSP_WS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub ws_allowed_origins: Vec<String>,

    /// Largest WebSocket message from a client, in bytes (closed with 1009 beyond).
    #[arg(long, env = "MINDSP_WS_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub ws_max_message_bytes: u32,

    /// Events queued per connection; a client that lets it fill is cut off (4008).
    /// At least 2: typing and presence may take half of it, never all.
    #[arg(long, env = "MINDSP_WS_QUEUE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(2..=65_536))]
    pub ws_queue: u32,

    /// Commands per second per connection, on average (`rate_limited` beyond).
    #[arg(long, env = "MINDSP_WS_RATE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub ws_rate: u32,

    /// Commands per connection in a burst.
    #[arg(long, env = "MINDSP_WS_BURST", default_value_t = 40,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub ws_burst: u32,

    /// Seconds between server pings.
    #[arg(long, env = "MINDSP_WS_PING_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ws_ping_secs: u64,

    /// Seconds without any frame (pongs included) before a connection is closed (4002).
    #[arg(long, env = "MINDSP_WS_IDLE_SECS", default_value_t = 75,
          value_parser = clap::value_parser!(u64).range(2..=7200))]
    pub ws_idle_secs: u64,

    /// Milliseconds a `typing start` lasts without a refresh before `typing stop` is sent.
    #[arg(long, env = "MINDSP_WS_TYPING_TTL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub ws_typing_ttl_ms: u64,

    /// Bytes a connection gathers before writing to its socket within a batch of events
    /// (the buffer is released once written out, so idle connections hold none); 0
    /// writes each frame at once, with more system calls when many events go to one
    /// connection.
    #[arg(long, env = "MINDSP_WS_WRITE_BUFFER", default_value_t = 2 * 1024,
          value_parser = clap::value_parser!(u32).range(0..=1024 * 1024))]
    pub ws_write_buffer: u32,

    /// Most messages one `resume` replays per conversation; further behind, the client
    /// gets `resync` and reads the history over HTTP.
    #[arg(long, env = "MINDSP_WS_MAX_RESUME_MESSAGES", default_value_t = 500,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub ws_max_resume_messages: i64,

    /// Most WebSocket connections this node holds (503 `server_full` beyond). Default:
    /// the open-file limit, raised to its maximum at start, less 1,024 kept for the
    /// rest (or half of it when small).
    #[arg(long, env = "MINDSP_WS_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub ws_max_connections: Option<u32>,

    /// Most WebSocket connections one user keeps on this node; one more closes their
    /// oldest (4009).
    #[arg(long, env = "MINDSP_WS_MAX_CONNECTIONS_PER_USER", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub ws_max_connections_per_user: u32,
}

impl ServeArgs {
    fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self
                .max_connections
                .map_or_else(default_max_connections, |n| n as usize),
            ..ConnectionLimits::default()
        }
    }
}

impl WsArgs {
    fn config(&self) -> crate::ws::WsConfig {
        let ttl = Duration::from_millis(self.ws_typing_ttl_ms);
        crate::ws::WsConfig {
            allowed_origins: self
                .ws_allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            max_message_bytes: self.ws_max_message_bytes as usize,
            queue_capacity: self.ws_queue as usize,
            rate_per_sec: self.ws_rate,
            rate_burst: self.ws_burst,
            ping_interval: Duration::from_secs(self.ws_ping_secs),
            idle_timeout: Duration::from_secs(self.ws_idle_secs),
            typing_throttle: (ttl * 2 / 5).max(Duration::from_millis(50)),
            typing_ttl: ttl,
            max_resume_messages: self.ws_max_resume_messages,
            write_buffer_bytes: self.ws_write_buffer as usize,
            max_connections: self
                .ws_max_connections
                .map_or_else(crate::ws::default_max_connections, |n| n as usize),
            max_connections_per_user: self.ws_max_connections_per_user as usize,
            ..crate::ws::WsConfig::default()
        }
    }
}

/// Settings of `worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Seconds running jobs get to finish after SIGTERM/SIGINT; unfinished ones are
    /// given back to the queue.
    #[arg(long, env = "MINDSP_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    #[command(flatten)]
    pub jobs: JobArgs,

    /// With `--redis-url`, reminders are pushed live to users connected to any node,
    /// and the unread digest skips users online on any node.
    #[command(flatten)]
    pub realtime: RealtimeArgs,
}

/// Longest Redis key prefix accepted for the queue.
const MAX_QUEUE_PREFIX_LEN: usize = 64;

/// The job queue, e-mail and worker settings `serve` and `worker` share.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Job queue: `sql` (tables in the database of `--database-url`) or
    /// `redis://[user:password@]host[:port]` (`rediss://` for TLS).
    #[arg(
        long,
        env = "MINDSP_QUEUE_URL",
        default_value = "sql",
        hide_env_values = true
    )]
    pub queue_url: String,

    /// Key prefix of a Redis queue (every node of a deployment uses the same one).
    #[arg(long, env = "MINDSP_QUEUE_PREFIX", default_value = "{mindsp}:q:")]
    pub queue_prefix: String,

    /// SMTP server for e-mail: `smtp://[user:password@]host[:port][?tls=none|starttls]`
    /// or `smtps://...` (implicit TLS). Percent-encode special characters of the password.
    #[arg(
        long,
        env = "MINDSP_SMTP_URL",
        hide_env_values = true,
        conflicts_with = "mail_dir"
    )]
    pub smtp_url: Option<String>,

    /// Sender of every e-mail: `Name <address>` or `address`.
    #[arg(
        long,
        env = "MINDSP_MAIL_FROM",
        default_value = "MindSP <no-reply@localhost>"
    )]
    pub mail_from: String,

    /// Write e-mail as `.eml` files into this directory instead of sending it. Without
    /// this nor `--smtp-url`: `<database file>.mail/` beside a SQLite file, else
    /// `./mail-outbox`.
    #[arg(long, env = "MINDSP_MAIL_DIR")]
    pub mail_dir: Option<PathBuf>,

    /// Jobs of each queue (`default`, `email`) a worker runs at once; 0 runs no worker
    /// in `serve`.
    #[arg(long, env = "MINDSP_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(0..=crate::workers::MAX_CONCURRENCY as i64))]
    pub workers: u16,

    /// Job lease in seconds: the jobs of a worker that died run again within about
    /// this long. Live workers renew their leases every third of it.
    #[arg(long, env = "MINDSP_JOB_LEASE_SECS",
          default_value_t = WorkerConfig::default().lease.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub job_lease_secs: u64,

    /// Days finished jobs (succeeded, dead, cancelled) are kept for monitoring; 0 keeps
    /// them forever.
    #[arg(long, env = "MINDSP_JOB_RETENTION_DAYS",
          default_value_t = WorkerConfig::default().retention.map_or(0, |d| d.as_secs() / 86_400),
          value_parser = clap::value_parser!(u64).range(0..=3650))]
    pub job_retention_days: u64,

    /// Seconds a user's oldest unread message waits, while they stay offline, before
    /// they get one digest e-mail of what they have not read.
    #[arg(long, env = "MINDSP_DIGEST_DELAY_SECS", default_value_t = 15 * 60,
          value_parser = clap::value_parser!(u64).range(1..=7 * 86_400))]
    pub digest_delay_secs: u64,

    /// The address users reach the server at; links in e-mails start with it.
    #[arg(
        long,
        env = "MINDSP_PUBLIC_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub public_url: String,
}

impl JobArgs {
    fn worker_settings(&self) -> WorkerSettings {
        WorkerSettings {
            digest_delay: Duration::from_secs(self.digest_delay_secs),
            public_url: self.public_url.trim().trim_end_matches('/').to_owned(),
            concurrency: usize::from(self.workers),
            lease: Duration::from_secs(self.job_lease_secs),
            retention: (self.job_retention_days > 0)
                .then(|| Duration::from_secs(self.job_retention_days * 86_400)),
            ..WorkerSettings::default()
        }
    }
}

/// Parses the command line and runs it.
pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let store = mindsp_store::open(&cli.database_url)
        .await
        .with_context(|| format!("cannot open database {}", redact(&cli.database_url)))?;
    match cli.command {
        None => run_serve(store, &cli.database_url, cli.serve).await,
        Some(Command::Serve(args)) => run_serve(store, &cli.database_url, args).await,
        Some(Command::Worker(args)) => run_worker(store, &cli.database_url, args).await,
        Some(Command::Migrate) => {
            tracing::info!("migrations are up to date");
            Ok(())
        }
        Some(Command::CreateTenant { slug, name }) => {
            let slug = slug.trim().to_lowercase();
            if slug.is_empty()
                || slug.len() > 64
                || !slug.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                bail!("a slug is 1 to 64 lowercase letters, digits or dashes");
            }
            let t = store.create_tenant(&slug, name.trim()).await?;
            println!("{}", serde_json::to_string(&t)?);
            Ok(())
        }
        Some(Command::CreateUser {
            tenant,
            email,
            name,
            role,
            password,
        }) => {
            let t = store
                .tenant_by_slug(&tenant)
                .await?
                .with_context(|| format!("no tenant with slug {tenant:?}"))?;
            auth::check_new_password(&password)?;
            let new = NewUser {
                email,
                display_name: name,
                role: Role::parse(&role)?,
                password_hash: auth::hash_password_blocking(password).await?,
            };
            let mut tx = store.begin(t.id).await?;
            let user = create_user_in(tx.as_mut(), new, &Limits::default()).await?;
            tx.commit().await?;
            println!("{}", serde_json::to_string(&user)?);
            Ok(())
        }
    }
}

async fn run_serve(
    store: Arc<dyn Store>,
    database_url: &str,
    args: ServeArgs,
) -> anyhow::Result<()> {
    let secret = jwt_secret(database_url, args.jwt_secret.as_deref())?;
    // Before the connection cap is derived from it.
    let open_files = crate::ws::raise_open_file_limit()
        .inspect_err(|e| tracing::warn!(error = %e, "cannot raise the open-file limit"))
        .ok();
    let demo_created = args.demo && demo::seed(store.clone()).await?;
    if demo_created {
        tracing::info!(
            tenant = demo::DEMO_TENANT,
            admin = demo::DEMO_ADMIN_EMAIL,
            password = demo::DEMO_PASSWORD,
            "demo data created"
        );
    }
    let config = HttpConfig {
        jwt_secret: secret,
        token_ttl: Duration::from_secs(args.token_ttl_secs),
        max_body_bytes: args.max_body_bytes,
        request_timeout: crate::REQUEST_TIMEOUT,
        limits: Limits {
            max_message_chars: args.max_message_chars,
            max_page_size: args.max_page_size,
            default_page_size: args.max_page_size.min(50),
            ..Limits::default()
        },
        ws: args.ws.config(),
        notify: NotifyConfig::default(),
        training: TrainingConfig {
            default_offsets: check_offsets(&args.fmpa_reminders)
                .context("invalid MINDSP_FMPA_REMINDERS")?,
            ..TrainingConfig::default()
        },
        passwords: crate::passwords::PasswordLimits::default(),
        write_rate: crate::rates::WriteRate {
            per_sec: args.rest_rate,
            burst: args.rest_burst,
        },
    };
    tracing::info!(
        open_files,
        max = config.ws.max_connections,
        per_user = config.ws.max_connections_per_user,
        "WebSocket connections"
    );
    // Installed before any job runs, so an early SIGTERM still stops gracefully.
    let shutdown = shutdown_signal();
    let queue = open_queue(&args.jobs, store.as_ref()).await?;
    let realtime = args.realtime.open(config.ws.queue_capacity).await?;
    let state = AppState::assemble(store.clone(), Some(queue.clone()), realtime, &config);
    if demo_created {
        let n = demo::seed_sessions(store, &state.training).await?;
        tracing::info!(sessions = n, "demo training sessions created");
    }
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let worker = if args.no_workers || args.jobs.workers == 0 {
        tracing::info!("no job worker in this process; run `mindsp-server worker` elsewhere");
        None
    } else {
        Some(start_jobs(
            database_url,
            &args.jobs,
            queue,
            NotifyServices {
                store: state.messaging.store().clone(),
                notifier: state.notifier.clone(),
                training: state.training.clone(),
                online: Arc::new(state.realtime.clone()),
            },
            true,
        )?)
    };
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    tracing::info!(addr = %listener.local_addr()?, "listening");
    // WebSockets are told to reconnect elsewhere (1012) as soon as the signal comes,
    // and presence is left to the other nodes from then on.
    let signalled = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let signalled = signalled.clone();
        let state = state.clone();
        async move {
            shutdown.await;
            let _ = signalled.set(std::time::Instant::now());
            // Before their sockets close without a word to presence.
            state.note_connected_as_seen();
            state.realtime.shutdown().await;
        }
    };
    let served = serve_with(listener, app, shutdown, grace, args.connection_limits()).await;
    // The WebSockets were told at the signal: they share the requests' grace period, and
    // so do the commands cut off from their clients.
    let left = || {
        signalled
            .get()
            .map_or(grace, |at| grace.saturating_sub(at.elapsed()))
    };
    if !state.close_websockets(left()).await {
        tracing::warn!("some WebSockets did not close within the grace period");
    }
    // HTTP first: in-flight requests finish (and may still enqueue jobs). Then the
    // worker: running jobs get the same grace, the rest go back to the queue. Meanwhile
    // commands cut off from their clients publish what they committed, before the broker
    // closes.
    let jobs = async {
        if let Some(worker) = worker {
            worker.shutdown(grace).await;
        }
    };
    let ((), finished) = tokio::join!(jobs, state.finish_commands(left()));
    if !finished {
        tracing::warn!("some commands were still running at the end of the grace period");
    }
    // Nothing more will be published: a clean stop, not a death, to the other nodes.
    state.realtime.stopped().await;
    // What a sweep that was under way noted meanwhile (bounded: the store may be away).
    state.sockets.last_seen.flush_at_stop().await;
    served?;
    tracing::info!("stopped");
    Ok(())
}

async fn run_worker(
    store: Arc<dyn Store>,
    database_url: &str,
    args: WorkerArgs,
) -> anyhow::Result<()> {
    if args.jobs.workers == 0 {
        bail!("the worker command needs --workers of at least 1");
    }
    // Installed before any job runs, so an early SIGTERM still stops gracefully.
    let shutdown = shutdown_signal();
    let queue = open_queue(&args.jobs, store.as_ref()).await?;
    // Reminders it runs are pushed through the same broker as the HTTP nodes'.
    let realtime = args.realtime.open(1).await?;
    let node = realtime.clone();
    // This process sweeps dead nodes too: it keeps the `last_seen` of their users.
    let last_seen = crate::last_seen::LastSeen::follow(store.clone(), &realtime);
    let notifier = Notifier::new(store.clone(), NotifyConfig::default())
        .with_publisher(realtime.publisher())
        .with_queue(queue.clone());
    let training = Training::new(
        store.clone(),
        notifier.clone(),
        Some(queue.clone()),
        TrainingConfig::default(),
    );
    let services = NotifyServices {
        store,
        notifier,
        training,
        online: Arc::new(realtime),
    };
    // Without Redis this process cannot tell who is connected to the HTTP nodes: it
    // would e-mail digests to users who are online. It leaves the sweep to others.
    let digest = args
        .realtime
        .redis_url
        .as_deref()
        .is_some_and(|u| !u.trim().is_empty());
    if !digest {
        tracing::warn!(
            "no MINDSP_REDIS_URL: this worker cannot see who is online and does not schedule the unread-message digest"
        );
    }
    let worker = start_jobs(database_url, &args.jobs, queue, services, digest)?;
    shutdown.await;
    worker
        .shutdown(Duration::from_secs(args.shutdown_grace_secs))
        .await;
    // A presence node too (with Redis): it stops cleanly, and says so.
    node.shutdown().await;
    node.stopped().await;
    last_seen.flush_at_stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the queue `--queue-url` names.
async fn open_queue(args: &JobArgs, store: &dyn Store) -> anyhow::Result<Arc<dyn JobQueue>> {
    let url = args.queue_url.trim();
    let shown = redact(url);
    let queue = if url.is_empty() || url == "sql" {
        mindsp_queue::sql_queue(store)?
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        let prefix = &args.queue_prefix;
        if prefix.is_empty()
            || prefix.len() > MAX_QUEUE_PREFIX_LEN
            || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            bail!(
                "MINDSP_QUEUE_PREFIX has 1 to {MAX_QUEUE_PREFIX_LEN} bytes, without spaces or control characters"
            );
        }
        mindsp_queue::open(url, store, prefix)
            .await
            .with_context(|| format!("cannot open the job queue at {shown}"))?
    } else {
        bail!("unsupported MINDSP_QUEUE_URL {shown}: expected sql or redis://...");
    };
    tracing::info!(queue = %shown, "job queue open");
    Ok(queue)
}

/// Builds the mailer and starts a worker on `queue`.
fn start_jobs(
    database_url: &str,
    args: &JobArgs,
    queue: Arc<dyn JobQueue>,
    services: NotifyServices,
    digest: bool,
) -> anyhow::Result<WorkerHandle> {
    let settings = mail_settings(database_url, args)?;
    let built = settings.build().context("invalid e-mail settings")?;
    tracing::info!(mail = %built.description, from = %args.mail_from.trim(), "e-mail configured");
    if let Some(smtp) = built.smtp {
        // A start-up check, for the operator's benefit only: e-mail jobs retry anyway.
        tokio::spawn(async move {
            match smtp.check().await {
                Ok(()) => tracing::info!("SMTP server reachable"),
                Err(e) => {
                    tracing::warn!(error = %e, "SMTP server not reachable now; e-mail jobs will retry")
                }
            }
        });
    }
    let mut settings = args.worker_settings();
    if !digest {
        settings.digest_schedule = None;
    }
    let worker = start_worker(queue, built.mailer, &settings, Some(services))?;
    tracing::info!(
        queues = "default,email",
        concurrency = settings.concurrency,
        lease_secs = settings.lease.as_secs(),
        "job worker started"
    );
    Ok(worker)
}

/// Where e-mail goes: SMTP, the given directory, or a default directory.
fn mail_settings(database_url: &str, args: &JobArgs) -> anyhow::Result<MailSettings> {
    let from = parse_mailbox(&args.mail_from).context("invalid MINDSP_MAIL_FROM")?;
    let transport = match (&args.smtp_url, &args.mail_dir) {
        (Some(url), _) => MailTransport::Smtp(url.trim().to_owned()),
        (None, Some(dir)) => MailTransport::Dir(dir.clone()),
        (None, None) => {
            let dir = match mindsp_store::DatabaseUrl::parse(database_url)? {
                mindsp_store::DatabaseUrl::SqliteFile(path) => mail_dir_beside(Path::new(path)),
                _ => {
                    tracing::warn!(
                        "no MINDSP_SMTP_URL nor MINDSP_MAIL_DIR: e-mail is written into ./mail-outbox, not sent"
                    );
                    PathBuf::from("mail-outbox")
                }
            };
            MailTransport::Dir(dir)
        }
    };
    Ok(MailSettings { transport, from })
}

fn mail_dir_beside(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".mail");
    db.with_file_name(name)
}

/// The token secret: given, or generated once and kept beside a SQLite file.
fn jwt_secret(database_url: &str, given: Option<&str>) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = given {
        if s.len() < 32 {
            bail!("MINDSP_JWT_SECRET must be at least 32 bytes");
        }
        return Ok(s.as_bytes().to_vec());
    }
    let path = match mindsp_store::DatabaseUrl::parse(database_url)? {
        mindsp_store::DatabaseUrl::SqliteFile(path) => secret_path(Path::new(path)),
        mindsp_store::DatabaseUrl::SqliteMemory => {
            tracing::warn!("in-memory database: using a random token secret for this run only");
            return Ok(random_secret().into_bytes());
        }
        mindsp_store::DatabaseUrl::Postgres(_) => bail!(
            "set MINDSP_JWT_SECRET (≥ 32 bytes): every node of a PostgreSQL deployment must share it"
        ),
    };
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_owned();
        if s.len() >= 32 {
            return Ok(s.into_bytes());
        }
    }
    let secret = random_secret();
    write_private(&path, &secret)
        .with_context(|| format!("cannot write token secret to {}", path.display()))?;
    tracing::info!(
        path = %path.display(),
        "generated a token secret and stored it beside the database; set MINDSP_JWT_SECRET to choose your own"
    );
    Ok(secret.into_bytes())
}

fn secret_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".jwt-secret");
    db.with_file_name(name)
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(content.as_bytes())
}

/// Hides a password in a database URL before logging it.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    fn ws_config(args: &[&str]) -> Result<crate::ws::WsConfig, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Some(Command::Serve(serve)) => Ok(serve.ws.config()),
            _ => panic!("not serve"),
        }
    }

    #[test]
    fn the_write_buffer_setting_reaches_the_websocket_config() {
        // (The environment variable, where set, would rightly win over the default.)
        if std::env::var_os("MINDSP_WS_WRITE_BUFFER").is_none() {
            let default = ws_config(&["mindsp-server", "serve"]).unwrap();
            assert_eq!(default.write_buffer_bytes, 2048);
        }
        let eager = ws_config(&["mindsp-server", "serve", "--ws-write-buffer", "0"]).unwrap();
        assert_eq!(eager.write_buffer_bytes, 0);
        let err = ws_config(&["mindsp-server", "serve", "--ws-write-buffer", "2000000"])
            .expect_err("above 1 MiB is refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn the_connection_caps_reach_the_configs() {
        let set = ws_config(&[
            "mindsp-server",
            "serve",
            "--ws-max-connections",
            "5000",
            "--ws-max-connections-per-user",
            "3",
        ])
        .unwrap();
        assert_eq!(
            (set.max_connections, set.max_connections_per_user),
            (5000, 3)
        );
        if std::env::var_os("MINDSP_WS_MAX_CONNECTIONS").is_none() {
            let default = ws_config(&["mindsp-server", "serve"]).unwrap();
            assert_eq!(
                default.max_connections,
                crate::ws::default_max_connections()
            );
            let (soft, _) = rlimit::Resource::NOFILE.get().unwrap();
            assert!((default.max_connections as u64) < soft, "room is kept");
            assert!(default.max_connections as u64 >= soft / 2);
        }
        let limits = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Some(Command::Serve(serve)) => serve.connection_limits(),
            _ => panic!("not serve"),
        };
        let set = limits(&["mindsp-server", "serve", "--max-connections", "7"]);
        assert_eq!(set.max_connections, 7);
        if std::env::var_os("MINDSP_MAX_CONNECTIONS").is_none() {
            let default = limits(&["mindsp-server", "serve"]).max_connections;
            let (soft, _) = rlimit::Resource::NOFILE.get().unwrap();
            assert!((default as u64) < soft, "room is kept");
            assert!(
                default > crate::ws::default_max_connections(),
                "and left to REST"
            );
        }
        for bad in [
            ["--ws-max-connections", "0"],
            ["--ws-max-connections-per-user", "0"],
            ["--max-connections", "0"],
        ] {
            let args = ["mindsp-server", "serve", bad[0], bad[1]];
            let err = ws_config(&args).expect_err("zero is refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        }
    }
}
