//! The `mindsp-server` command line: `serve` (the default), `migrate`,
//! `create-tenant`, `create-user`. Every flag has a `MINDSP_*` environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mindsp_core::Limits;
use mindsp_core::model::{NewUser, Role};
use mindsp_core::ports::Store;
use mindsp_core::service::create_user_in;

use crate::{AppState, HttpConfig, auth, demo, router, serve, shutdown_signal};

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
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(ServeArgs),
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

    /// Longest message in characters.
    #[arg(long, env = "MINDSP_MAX_MESSAGE_CHARS", default_value_t = 4000)]
    pub max_message_chars: usize,

    /// Largest page size for lists and history.
    #[arg(long, env = "MINDSP_MAX_PAGE_SIZE", default_value_t = 100)]
    pub max_page_size: u32,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "MINDSP_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Create the demo tenant `sdis13` (admin@sdis13.fr / Password123!) if absent.
    #[arg(long, env = "MINDSP_DEMO")]
    pub demo: bool,
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
    if args.demo && demo::seed(store.clone()).await? {
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
        limits: Limits {
            max_message_chars: args.max_message_chars,
            max_page_size: args.max_page_size,
            default_page_size: args.max_page_size.min(50),
            ..Limits::default()
        },
    };
    let app = router(AppState::new(store, &config));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    serve(
        listener,
        app,
        shutdown_signal(),
        Duration::from_secs(args.shutdown_grace_secs),
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
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
