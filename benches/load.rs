//! Real-time load generator (issue 3, "Speed and scale"): the release `mindsp-server`
//! binary on a fresh SQLite file, or several of them on a fresh PostgreSQL database
//! sharing one Redis, driven over real WebSockets on loopback.
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/tmp/mindsp-target
//! cargo build --release -p mindsp-server
//! cargo bench -p mindsp-benches --bench load
//! # PostgreSQL + Redis, two nodes:
//! MINDSP_LOAD_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! MINDSP_LOAD_REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo bench -p mindsp-benches --bench load
//! ```
//!
//! Mode (printed at the top): SQLite, one node, unless both `MINDSP_LOAD_POSTGRES_URL`
//! and `MINDSP_LOAD_REDIS_URL` are set. Then the bench creates a database
//! `mindsp_load_<uuid>` through the first URL (a role that may `CREATE DATABASE`;
//! the nodes connect to it as the same role, so the tables live in its `public`
//! schema as `serve --database-url` sets no schema), populates it through
//! `PgStore`, and starts `MINDSP_LOAD_NODES` (2) nodes on it, each with `--redis-url`
//! and the run's own `--redis-prefix` `{mindsp-load-<uuid>}:rt:` (job queue: `sql`,
//! the default, in that database). Active and idle client `i` connects to node
//! `i % nodes`, so a message reaches the members on other nodes only through Redis;
//! each step prints how many deliveries crossed nodes. Server CPU and RSS are sums
//! over the nodes; PostgreSQL CPU is that of every process named `postgres` (children
//! reaped included, so exited backends count; also the run's database's backends
//! alone, since other work on the machine shows in the first) and Redis CPU that of
//! `redis-server`, from `/proc/*/stat` over the same window, with the CPU per
//! delivery of the nodes and of nodes + PostgreSQL + Redis. At the end the nodes are
//! stopped, the database is dropped (`WITH (FORCE)`) and the run's Redis keys deleted
//! (`SCAN MATCH prefix*`, `DEL`), even when the run failed.
//!
//! The server binary is `MINDSP_LOAD_SERVER` if set, else
//! `$CARGO_TARGET_DIR/release/mindsp-server`, else `target/release/mindsp-server`; the
//! bench does not build it. Build it from the same tree just before: the bench writes
//! the database with the store library, and each side refuses the other's migrations
//! if they differ. It is started with `serve` as an operator would (job
//! worker included, messages persisted, `synchronous=NORMAL`), with three changes: the
//! per-connection command rate limit is lifted (`--ws-rate`/`--ws-burst` 10,000),
//! because one generated client sends for a whole user's day in seconds; the token
//! secret is given (`MINDSP_JWT_SECRET`) so that the bench mints its own tokens; and
//! the connection caps are lifted (`--ws-max-connections`, `MINDSP_MAX_CONNECTIONS`; their
//! defaults keep 1,024 and 256 of the open-file limit for the rest), so the idle scenario
//! meets the open-file limit itself.
//!
//! Setup shortcuts (before the server starts, through the store library on the same
//! file): users are inserted directly, all with the *same* argon2 hash computed once
//! (hashing is deliberately slow; logging in would cost the same per user), and tokens
//! are signed with the server's own code and secret instead of logging in.
//!
//! Scenarios, in this order:
//! - (c) idle: `MINDSP_LOAD_IDLE` (10,000) authenticated connections that only answer
//!   pings, in tenants of `MINDSP_LOAD_IDLE_TENANT` (1,000) users, in groups of
//!   `MINDSP_LOAD_IDLE_GROUP` (0: none; presence goes to the people who share a
//!   conversation, so groups give each connect someone to tell); server RSS is read
//!   before, at half and at all connections (`/proc/<pid>/status`); with groups, again
//!   after one long message (3,840 bytes) in each group. Then closed.
//! - (a) `MINDSP_LOAD_CLIENTS` (1,000) clients in conversations of `MINDSP_LOAD_SMALL`
//!   (10), offered rates `MINDSP_LOAD_SMALL_RATES` (500,1000,2000,5000,10000 messages/s);
//! - (b) the same clients in groups of `MINDSP_LOAD_GROUP` (100), offered rates
//!   `MINDSP_LOAD_GROUP_RATES` (50,100,200,500,1000 messages/s).
//!
//! Each step lasts `MINDSP_LOAD_STEP_SECS` (10) and is open loop: message `i` has a
//! scheduled send time `start + i / rate`, written into its content with the step and
//! `i`; latency is receive time minus scheduled time, so a stall anywhere (generator,
//! kernel, server) shows. A message is delivered to every member's connection, the
//! sender's own included (its other devices), so one message is S deliveries; each is
//! counted, and a step ends when all arrived or `MINDSP_LOAD_DRAIN_SECS` (10) after the
//! last send. Stepping stops after a step with p99 above 50 ms or a loss. Server CPU is
//! utime + stime of `/proc/<pid>/stat` over the step.
//!
//! Clients bind to 127.0.0.2, 127.0.0.3, ... (`MINDSP_LOAD_SOURCES`, 8) so that no
//! source address runs out of ephemeral ports. Both processes need one descriptor per
//! connection: `ulimit -n` bounds the idle scenario. All traffic stays on 127.0.0.0/8
//! (give PostgreSQL and Redis URLs on it too); the bench stops the servers (SIGTERM,
//! then SIGKILL) and removes its files.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use mindsp_benches::{clock_ticks, cpu_time};
use mindsp_core::model::{NewUser, Role, User};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, Limits, Messaging};
use mindsp_server::auth::{Tokens, hash_password};
use mindsp_store::postgres::{PgConfig, PgStore};
use mindsp_store::sqlite::{SqliteConfig, SqliteStore};
use sqlx::Connection;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// p99 above which stepping up stops.
const P99_LIMIT_MS: f64 = 50.0;
/// Latency histograms per step, sharded by client to keep locks uncontended.
const SHARDS: usize = 16;
/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 128;
/// How long opening one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// What every message says after its measurement fields.
/// The idle scenario's long message, repeated 60 times.
const LONG: &str = "Feu de broussailles, secteur Sainte-Victoire : renfort demande. ";
const TEXT: &str = "Départ VSAV pour un secours à personne, CIS Aix";
const PASSWORD: &str = "Motdepasse-bench-42";

struct Config {
    server: PathBuf,
    clients: usize,
    small: usize,
    group: usize,
    small_rates: Vec<u64>,
    group_rates: Vec<u64>,
    step_secs: u64,
    drain_secs: u64,
    idle: usize,
    idle_tenant: usize,
    /// Idle users per group (0: none), so that presence has someone to tell.
    idle_group: usize,
    sources: u8,
    /// PostgreSQL + Redis with several nodes, when both URLs are given; else SQLite.
    services: Option<Services>,
    /// Server processes: `MINDSP_LOAD_NODES` (2) with PostgreSQL + Redis, 1 on SQLite.
    nodes: usize,
}

/// The shared services of the scaled profile.
struct Services {
    /// Where the bench creates (and drops) its database: `MINDSP_LOAD_POSTGRES_URL`.
    postgres_url: String,
    /// `MINDSP_LOAD_REDIS_URL`.
    redis_url: String,
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let server = match std::env::var_os("MINDSP_LOAD_SERVER") {
            Some(p) => PathBuf::from(p),
            None => {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
                target.join("release/mindsp-server")
            }
        };
        if !server.is_file() {
            bail!(
                "no server binary at {}: run `cargo build --release -p mindsp-server` (same CARGO_TARGET_DIR) or set MINDSP_LOAD_SERVER",
                server.display()
            );
        }
        let services = match (
            std::env::var("MINDSP_LOAD_POSTGRES_URL"),
            std::env::var("MINDSP_LOAD_REDIS_URL"),
        ) {
            (Ok(pg), Ok(redis)) if !pg.trim().is_empty() && !redis.trim().is_empty() => {
                Some(Services {
                    postgres_url: pg.trim().to_owned(),
                    redis_url: redis.trim().to_owned(),
                })
            }
            _ => None,
        };
        let nodes = if services.is_some() {
            env_or("MINDSP_LOAD_NODES", 2)
        } else {
            1
        };
        let cfg = Self {
            server,
            clients: env_or("MINDSP_LOAD_CLIENTS", 1000),
            small: env_or("MINDSP_LOAD_SMALL", 10),
            group: env_or("MINDSP_LOAD_GROUP", 100),
            small_rates: rates("MINDSP_LOAD_SMALL_RATES", &[500, 1000, 2000, 5000, 10_000])?,
            group_rates: rates("MINDSP_LOAD_GROUP_RATES", &[50, 100, 200, 500, 1000])?,
            step_secs: env_or("MINDSP_LOAD_STEP_SECS", 10),
            drain_secs: env_or("MINDSP_LOAD_DRAIN_SECS", 10),
            idle: env_or("MINDSP_LOAD_IDLE", 10_000),
            idle_tenant: env_or("MINDSP_LOAD_IDLE_TENANT", 1000),
            idle_group: env_or("MINDSP_LOAD_IDLE_GROUP", 0),
            sources: env_or("MINDSP_LOAD_SOURCES", 8),
            services,
            nodes,
        };
        if cfg.small < 2 || cfg.group < 2 || cfg.clients < cfg.group.max(cfg.small) {
            bail!("need conversations of at least 2 and at least one group's worth of clients");
        }
        if cfg.small > 500 || cfg.group > 500 {
            bail!("a group has at most 500 members");
        }
        if !(1..=250).contains(&cfg.sources) || cfg.idle_tenant == 0 || cfg.step_secs == 0 {
            bail!("MINDSP_LOAD_SOURCES is 1 to 250; tenant size and step length at least 1");
        }
        if !(1..=16).contains(&cfg.nodes) {
            bail!("MINDSP_LOAD_NODES is 1 to 16");
        }
        Ok(cfg)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rates(name: &str, default: &[u64]) -> anyhow::Result<Vec<u64>> {
    let Ok(v) = std::env::var(name) else {
        return Ok(default.to_vec());
    };
    v.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|r| *r > 0)
                .with_context(|| format!("{name}: {s:?} is not a positive rate"))
        })
        .collect()
}

// ---- measurement ----------------------------------------------------------------------

/// What the clients record for one step.
struct StepStats {
    members: u16,
    /// Deliveries seen per message of the step.
    counts: Vec<AtomicU16>,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    /// With several nodes: the node of each message's sender, and the deliveries made
    /// to a client of another node (through Redis).
    sender_node: Vec<u8>,
    across: AtomicU64,
    /// Latest receive time, µs since [`Shared::base`].
    last_us: AtomicU64,
    latency_us: Vec<Mutex<Histogram<u64>>>,
}

impl StepStats {
    /// `messages` sent over `convs` as [`run_step`] sends them, to clients spread over
    /// `nodes` nodes as [`connect_all`] spreads them.
    fn new(messages: usize, members: usize, convs: &[Conv], nodes: usize) -> Self {
        let sender_node = if nodes > 1 {
            (0..messages)
                .map(|i| (sender(convs, i) % nodes) as u8)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            members: members as u16,
            counts: (0..messages).map(|_| AtomicU16::new(0)).collect(),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            sender_node,
            across: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            latency_us: (0..SHARDS)
                .map(|_| Mutex::new(Histogram::new(3).expect("histogram")))
                .collect(),
        }
    }

    fn latency(&self) -> Histogram<u64> {
        let mut all = Histogram::<u64>::new(3).expect("histogram");
        for h in &self.latency_us {
            all.add(&*h.lock().expect("histogram lock"))
                .expect("same histogram shape");
        }
        all
    }
}

/// State every client task shares.
struct Shared {
    base: Instant,
    /// Server nodes; active client `i` is connected to node `i % nodes`.
    nodes: usize,
    steps: Vec<StepStats>,
    /// `error` frames received (a send refused counts as lost too).
    errors: AtomicU64,
    /// Connections the server closed, and connections that broke.
    closed: AtomicU64,
    /// Deliveries of the idle scenario's long message ([`LONG`]).
    long_delivered: AtomicU64,
    /// The first few errors and close codes, to print.
    notes: Mutex<Vec<String>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn note(&self, what: String) {
        let mut notes = self.notes.lock().expect("notes lock");
        if notes.len() < 8 {
            notes.push(what);
        }
    }

    /// One text frame received by client `shard`.
    fn on_text(&self, shard: usize, text: &str) {
        if !text.starts_with(r#"{"v":1,"type":"new_message""#) {
            if text.contains(r#""type":"error""#) {
                self.errors.fetch_add(1, Relaxed);
                self.note(format!("error frame: {}", truncate(text, 200)));
            }
            return;
        }
        let now = self.now_us();
        let Some(at) = text.find(r#""content":""#) else {
            return;
        };
        if text[at + 11..].starts_with(&LONG[..20]) {
            self.long_delivered.fetch_add(1, Relaxed);
            return;
        }
        let mut fields = text[at + 11..].splitn(4, ' ');
        let mut next = || fields.next().and_then(|f| f.parse::<u64>().ok());
        let (Some(step), Some(i), Some(scheduled)) = (next(), next(), next()) else {
            return;
        };
        let Some(st) = self.steps.get(step as usize) else {
            return;
        };
        let Some(count) = st.counts.get(i as usize) else {
            return;
        };
        if count.fetch_add(1, Relaxed) >= st.members {
            st.duplicates.fetch_add(1, Relaxed);
            return;
        }
        st.delivered.fetch_add(1, Relaxed);
        if let Some(&from) = st.sender_node.get(i as usize)
            && usize::from(from) != shard % self.nodes
        {
            st.across.fetch_add(1, Relaxed);
        }
        st.last_us.fetch_max(now, Relaxed);
        let _ = st.latency_us[shard % SHARDS]
            .lock()
            .expect("histogram lock")
            .record(now.saturating_sub(scheduled).max(1));
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Busy and total jiffies of the whole machine, from `/proc/stat`.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU time of every process named `postgres` (the postmaster, its backends and
/// helpers) and `redis-server`, by pid, from `/proc/*/stat`. Children's reaped time
/// (cutime + cstime) is counted too, so a backend that exits within a window still
/// counts: its time lands in the postmaster's. On a shared machine that includes others'
/// PostgreSQL work, so the backends connected to the run's `database` (process title
/// `postgres: ... USER DATABASE HOST(PORT) ...`) are also counted apart, without
/// children.
#[derive(Default)]
struct ServiceCpu {
    postgres: HashMap<u32, Duration>,
    postgres_db: HashMap<u32, Duration>,
    redis: HashMap<u32, Duration>,
}

/// PostgreSQL and Redis CPU over a window.
struct ServiceUse {
    /// Every process named `postgres`.
    postgres: Duration,
    /// The backends of the run's database alone.
    postgres_db: Duration,
    redis: Duration,
}

impl ServiceCpu {
    fn read(database: &str) -> Self {
        let mut out = Self::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let map = match &stat[open + 1..close] {
                "postgres" => &mut out.postgres,
                "redis-server" => &mut out.redis,
                _ => continue,
            };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // utime, stime, cutime, cstime: fields 14 to 17, the state being field 3.
            let ticks = |range: std::ops::RangeInclusive<usize>| {
                let t: u64 = range
                    .filter_map(|n| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()))
                    .sum();
                Duration::from_secs_f64(t as f64 / clock_ticks())
            };
            map.insert(pid, ticks(14..=17));
            if &stat[open + 1..close] == "postgres"
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&format!(" {database} ")))
            {
                out.postgres_db.insert(pid, ticks(14..=15));
            }
        }
        out
    }

    /// PostgreSQL and Redis CPU used between `before` and now.
    fn since(before: &Self, database: &str) -> ServiceUse {
        let now = Self::read(database);
        let delta = |now: &HashMap<u32, Duration>, before: &HashMap<u32, Duration>| {
            now.iter()
                .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or_default()))
                .sum()
        };
        ServiceUse {
            postgres: delta(&now.postgres, &before.postgres),
            postgres_db: delta(&now.postgres_db, &before.postgres_db),
            redis: delta(&now.redis, &before.redis),
        }
    }
}

/// CPU usage over a window, for the server nodes, the generator and the machine, and
/// with PostgreSQL + Redis, for those.
struct CpuWindow {
    at: Instant,
    server: Duration,
    generator: Duration,
    machine: (u64, u64),
    services: Option<ServiceCpu>,
}

/// What a [`CpuWindow`] measured.
struct CpuUse {
    /// All nodes together.
    server: Duration,
    generator: Duration,
    elapsed: Duration,
    /// Busy cores of the machine (everything on it).
    busy: f64,
    /// PostgreSQL and Redis, with those.
    services: Option<ServiceUse>,
}

impl CpuWindow {
    fn start(nodes: &Nodes) -> Self {
        Self {
            at: Instant::now(),
            server: nodes.cpu(),
            generator: cpu_time("self"),
            machine: machine_jiffies(),
            services: nodes.database.as_deref().map(ServiceCpu::read),
        }
    }

    fn end(&self, nodes: &Nodes) -> CpuUse {
        let (busy, total) = machine_jiffies();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy = (busy - self.machine.0) as f64 / (total - self.machine.1).max(1) as f64;
        CpuUse {
            server: nodes.cpu().saturating_sub(self.server),
            generator: cpu_time("self").saturating_sub(self.generator),
            elapsed: self.at.elapsed(),
            busy: busy * cores,
            services: self
                .services
                .as_ref()
                .zip(nodes.database.as_deref())
                .map(|(before, db)| ServiceCpu::since(before, db)),
        }
    }
}

// ---- the server processes -------------------------------------------------------------

/// Where the data lives: a SQLite file, or a PostgreSQL database made for the run with
/// a Redis key prefix of its own.
enum Backend {
    Sqlite {
        db: PathBuf,
    },
    Postgres {
        /// The URL given, to create and drop the database through.
        admin_url: String,
        name: String,
        /// The run's database.
        url: String,
        redis_url: String,
        /// `--redis-prefix` of every node: unique per run.
        prefix: String,
    },
}

impl Backend {
    /// SQLite in `dir`, or a fresh PostgreSQL database with `cfg.services`.
    async fn create(cfg: &Config, dir: &Path) -> anyhow::Result<Self> {
        let Some(services) = &cfg.services else {
            return Ok(Self::Sqlite {
                db: dir.join("load.db"),
            });
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("mindsp_load_{id}");
        let mut url = url::Url::parse(&services.postgres_url)
            .context("MINDSP_LOAD_POSTGRES_URL is not a URL")?;
        url.set_path(&format!("/{name}"));
        let mut conn = sqlx::PgConnection::connect(&services.postgres_url)
            .await
            .context("cannot connect to MINDSP_LOAD_POSTGRES_URL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        conn.close().await?;
        Ok(Self::Postgres {
            admin_url: services.postgres_url.clone(),
            name,
            url: url.to_string(),
            redis_url: services.redis_url.clone(),
            prefix: format!("{{mindsp-load-{id}}}:rt:"),
        })
    }

    fn describe(&self, nodes: usize) -> String {
        match self {
            Self::Sqlite { .. } => "SQLite file, one node".into(),
            Self::Postgres { name, prefix, .. } => format!(
                "PostgreSQL + Redis, {nodes} nodes (database {name}, Redis prefix {prefix}, job queue sql)"
            ),
        }
    }

    fn database_url(&self) -> String {
        match self {
            Self::Sqlite { db } => format!("sqlite://{}", db.display()),
            Self::Postgres { url, .. } => url.clone(),
        }
    }

    /// Drops the database and deletes the run's Redis keys (nothing to do for SQLite:
    /// the caller removes the directory).
    async fn clean_up(&self) {
        let Self::Postgres {
            admin_url,
            name,
            redis_url,
            prefix,
            ..
        } = self
        else {
            return;
        };
        let dropped = async {
            let mut conn = sqlx::PgConnection::connect(admin_url).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await?;
            conn.close().await
        }
        .await;
        match dropped {
            Ok(()) => println!("clean-up: database {name} dropped"),
            Err(e) => println!("clean-up: DROP DATABASE {name} failed: {e}"),
        }
        match delete_keys(redis_url, prefix).await {
            Ok(n) => println!("clean-up: {n} Redis keys under {prefix} deleted"),
            Err(e) => println!("clean-up: deleting the Redis keys under {prefix} failed: {e:#}"),
        }
    }
}

/// Deletes every key under `prefix`. The job queue's `purge` does exactly that for any
/// prefix (a `SCAN` page by page, then `DEL`), so the run's real-time keys go the same way.
async fn delete_keys(redis_url: &str, prefix: &str) -> anyhow::Result<u64> {
    let keys = mindsp_queue::redis::RedisQueue::connect(redis_url, prefix).await?;
    let deleted = keys.purge().await?;
    let _ = keys.close().await;
    Ok(deleted)
}

struct ServerProc {
    child: tokio::process::Child,
    pid: String,
    addr: SocketAddr,
    log: PathBuf,
}

impl ServerProc {
    async fn start(
        cfg: &Config,
        backend: &Backend,
        secret: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let out = std::fs::File::create(&log)?;
        let mut command = tokio::process::Command::new(&cfg.server);
        command
            .arg("serve")
            .arg("--database-url")
            .arg(backend.database_url())
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--log", "warn", "--ws-rate", "10000", "--ws-burst", "10000"])
            .args(["--ws-max-connections", "100000000"])
            // By its variable: a server from before the setting ignores it.
            .env("MINDSP_MAX_CONNECTIONS", "100000000");
        if let Backend::Postgres {
            redis_url, prefix, ..
        } = backend
        {
            command
                .args(["--redis-url", redis_url])
                .args(["--redis-prefix", prefix]);
        }
        let mut child = command
            .env("MINDSP_JWT_SECRET", secret)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", cfg.server.display()))?;
        let pid = child.id().context("server exited at once")?.to_string();
        let ready = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("server exited with {status}: {}", text.trim());
            }
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if ready.elapsed() > Duration::from_secs(30) {
                bail!("server not listening after 30 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            pid,
            addr,
            log,
        })
    }

    /// SIGTERM, then SIGKILL if it has not stopped within 30 s.
    async fn stop(mut self, name: &str) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid])
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => println!("{name} stopped: {}", status?),
            Err(_) => {
                self.child.kill().await?;
                println!("{name} did not stop within 30 s of SIGTERM: killed");
            }
        }
        Ok(())
    }
}

/// The server processes of the run (one on SQLite).
struct Nodes {
    procs: Vec<ServerProc>,
    /// PostgreSQL + Redis: the run's database; their CPU is measured too.
    database: Option<String>,
}

impl Nodes {
    async fn start(
        cfg: &Config,
        backend: &Backend,
        secret: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut procs = Vec::with_capacity(cfg.nodes);
        for n in 0..cfg.nodes {
            let log = match backend {
                Backend::Sqlite { db } => db.with_extension("server.log"),
                Backend::Postgres { .. } => dir.join(format!("node{n}.server.log")),
            };
            procs.push(ServerProc::start(cfg, backend, secret, log).await?);
        }
        Ok(Self {
            procs,
            database: match backend {
                Backend::Sqlite { .. } => None,
                Backend::Postgres { name, .. } => Some(name.clone()),
            },
        })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.procs.iter().map(|p| p.addr).collect()
    }

    /// CPU time of all nodes.
    fn cpu(&self) -> Duration {
        self.procs.iter().map(|p| cpu_time(&p.pid)).sum()
    }

    /// Resident memory of all nodes, in KiB.
    fn rss_kib(&self) -> u64 {
        self.procs.iter().map(|p| rss_kib(&p.pid)).sum()
    }

    fn name(&self, n: usize) -> String {
        if self.procs.len() == 1 {
            "server".into()
        } else {
            format!("node {n}")
        }
    }

    /// Stops every node; the first failure is returned once all were tried.
    async fn stop(self) -> anyhow::Result<()> {
        let mut result = Ok(());
        let names: Vec<_> = (0..self.procs.len()).map(|n| self.name(n)).collect();
        for (p, name) in self.procs.into_iter().zip(names) {
            let stopped = p.stop(&name).await;
            if result.is_ok() {
                result = stopped;
            }
        }
        result
    }
}

// ---- data set-up ----------------------------------------------------------------------

/// A conversation and its members (indexes into the active clients).
struct Conv {
    id: String,
    members: Vec<usize>,
}

struct Population {
    active: Vec<String>,
    small: Vec<Conv>,
    groups: Vec<Conv>,
    idle: Vec<String>,
    /// The idle users' groups (`MINDSP_LOAD_IDLE_GROUP`), members by index in `idle`.
    idle_groups: Vec<Conv>,
}

/// Opens the backend's store with the library, populates it and closes it.
async fn populate_backend(
    cfg: &Config,
    backend: &Backend,
    secret: &str,
) -> anyhow::Result<Population> {
    match backend {
        Backend::Sqlite { db } => {
            let sqlite = SqliteStore::open(SqliteConfig::file(db.display().to_string())).await?;
            let pop = populate(cfg, Arc::new(sqlite.clone()), secret).await;
            sqlite.close().await;
            pop
        }
        Backend::Postgres { url, .. } => {
            let pg = PgStore::open(PgConfig::new(url.clone())).await?;
            let pop = populate(cfg, Arc::new(pg.clone()), secret).await;
            pg.close().await;
            pop
        }
    }
}

async fn populate(cfg: &Config, store: Arc<dyn Store>, secret: &str) -> anyhow::Result<Population> {
    let started = Instant::now();
    let hash = hash_password(PASSWORD)?;
    let tokens = Tokens::new(secret.as_bytes(), Duration::from_secs(12 * 3600));
    let mint = |u: &User| tokens.issue(u).map_err(|e| anyhow::anyhow!("{e:?}"));

    let people = users(&store, "charge", cfg.clients, &hash).await?;
    let active = people.iter().map(&mint).collect::<anyhow::Result<_>>()?;
    let svc = Messaging::new(store.clone(), Limits::default());
    let small = conversations(&svc, &people, cfg.small, "Garde").await?;
    let groups = conversations(&svc, &people, cfg.group, "Groupement").await?;

    let mut idle = Vec::with_capacity(cfg.idle);
    let mut idle_groups = Vec::new();
    let mut t = 0;
    while idle.len() < cfg.idle {
        let n = cfg.idle_tenant.min(cfg.idle - idle.len());
        let tenant = users(&store, &format!("veille{t}"), n, &hash).await?;
        if cfg.idle_group > 1 {
            let base = idle.len();
            for c in conversations(&svc, &tenant, cfg.idle_group, "Veille").await? {
                idle_groups.push(Conv {
                    id: c.id,
                    members: c.members.iter().map(|m| base + m).collect(),
                });
            }
        }
        for u in &tenant {
            idle.push(mint(u)?);
        }
        t += 1;
    }
    drop((svc, store));
    println!(
        "set-up: {} active users, {} conversations of {}, {} groups of {}, {} idle users in {} tenants, in {:.1} s",
        cfg.clients,
        small.len(),
        cfg.small,
        groups.len(),
        cfg.group,
        cfg.idle,
        t,
        started.elapsed().as_secs_f64()
    );
    Ok(Population {
        active,
        small,
        groups,
        idle,
        idle_groups,
    })
}

/// Consecutive blocks of `size` people, each one group conversation.
async fn conversations(
    svc: &Messaging,
    people: &[User],
    size: usize,
    label: &str,
) -> anyhow::Result<Vec<Conv>> {
    let mut out = Vec::new();
    for (k, chunk) in people.chunks_exact(size).enumerate() {
        let owner = Actor {
            tenant_id: chunk[0].tenant_id,
            user_id: chunk[0].id,
            role: Role::Member,
        };
        let others: Vec<_> = chunk[1..].iter().map(|u| u.id).collect();
        let conv = svc
            .create_group(&owner, &format!("{label} {k}"), &others)
            .await?;
        out.push(Conv {
            id: conv.id.0.to_string(),
            members: (k * size..(k + 1) * size).collect(),
        });
    }
    Ok(out)
}

/// A tenant of `n` members sharing one password hash (a bench shortcut).
async fn users(
    store: &Arc<dyn Store>,
    slug: &str,
    n: usize,
    hash: &str,
) -> anyhow::Result<Vec<User>> {
    let t = store.create_tenant(slug, &format!("SDIS {slug}")).await?;
    let mut tx = store.begin(t.id).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(
            tx.insert_user(&NewUser {
                email: format!("sp{i}@{slug}.fr"),
                display_name: format!("Sapeur {i}"),
                role: Role::Member,
                password_hash: hash.to_owned(),
            })
            .await?,
        );
    }
    tx.commit().await?;
    Ok(out)
}

// ---- clients --------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// A connected client: frames to send go through `tx`; its task reads everything.
struct Client {
    tx: mpsc::UnboundedSender<String>,
    task: JoinHandle<()>,
}

async fn connect(server: SocketAddr, source: Ipv4Addr, token: &str) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .with_context(|| format!("bind {source}"))?;
    let stream = socket.connect(server).await.context("connect")?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}/ws?token={token}");
    // Small buffers, as the server's own: the default read buffer is 128 KiB, eagerly.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .context("upgrade")?;
    Ok(ws)
}

fn source(cfg: &Config, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % cfg.sources as usize) as u8)
}

fn spawn_client(mut ws: Ws, shared: Arc<Shared>, shard: usize) -> Client {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(frame) = out else { break };
                    let mut ok = ws.feed(Message::text(frame)).await.is_ok();
                    while ok && let Ok(frame) = rx.try_recv() {
                        ok = ws.feed(Message::text(frame)).await.is_ok();
                    }
                    if !ok || ws.flush().await.is_err() {
                        shared.closed.fetch_add(1, Relaxed);
                        shared.note("a client could not write".into());
                        return;
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => shared.on_text(shard, text.as_str()),
                    Some(Ok(Message::Close(frame))) => {
                        shared.closed.fetch_add(1, Relaxed);
                        shared.note(format!("closed by the server: {frame:?}"));
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        shared.closed.fetch_add(1, Relaxed);
                        shared.note(format!("connection broken: {e}"));
                        return;
                    }
                    None => {
                        shared.closed.fetch_add(1, Relaxed);
                        shared.note("connection ended".into());
                        return;
                    }
                },
            }
        }
        // Asked to stop: close and read until the server's close (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = ws.close(None).await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    });
    Client { tx, task }
}

/// Opens connections for `tokens[i]`, numbered from `first`, until all are open or one
/// fails; returns the clients opened and the first failure. Connection `n` goes to
/// `servers[n % servers.len()]`.
async fn connect_all(
    cfg: &Config,
    servers: &[SocketAddr],
    shared: &Arc<Shared>,
    tokens: &[String],
    first: usize,
) -> (Vec<Client>, Option<anyhow::Error>) {
    let mut clients = Vec::with_capacity(tokens.len());
    let mut opening = futures::stream::iter(tokens.iter().enumerate())
        .map(|(k, token)| {
            let src = source(cfg, first + k);
            let server = servers[(first + k) % servers.len()];
            async move {
                let opened = tokio::time::timeout(CONNECT_TIMEOUT, connect(server, src, token))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
                    });
                (k, opened)
            }
        })
        .buffered(CONNECT_CONCURRENCY);
    while let Some((k, result)) = opening.next().await {
        match result {
            Ok(ws) => clients.push(spawn_client(ws, shared.clone(), first + k)),
            Err(e) => {
                return (
                    clients,
                    Some(e.context(format!("connection {}", first + k + 1))),
                );
            }
        }
    }
    (clients, None)
}

/// Closes the clients and waits (bounded) for their tasks.
async fn close_all(clients: Vec<Client>) {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            drop(c.tx);
            c.task
        })
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await;
}

// ---- scenarios ------------------------------------------------------------------------

/// The client that sends message `i` of a step across `convs`: conversations take
/// turns, and within one its members do.
fn sender(convs: &[Conv], i: usize) -> usize {
    let conv = &convs[i % convs.len()];
    conv.members[(i / convs.len()) % conv.members.len()]
}

async fn idle_scenario(
    cfg: &Config,
    nodes: &Nodes,
    shared: &Arc<Shared>,
    tokens: &[String],
    groups: &[Conv],
) -> anyhow::Result<()> {
    if tokens.is_empty() {
        return Ok(());
    }
    println!(
        "\n## (c) idle connections: {} in tenants of {}",
        tokens.len(),
        cfg.idle_tenant
    );
    let rss0 = nodes.rss_kib();
    let gen0 = rss_kib("self");
    let half = tokens.len() / 2;
    let mut clients = Vec::new();
    let mut points = Vec::new();
    let mut failure = None;
    let started = Instant::now();
    let cpu = CpuWindow::start(nodes);
    let addrs = nodes.addrs();
    for (from, to) in [(0, half), (half, tokens.len())] {
        let (more, err) = connect_all(cfg, &addrs, shared, &tokens[from..to], from).await;
        clients.extend(more);
        // Let the presence announcements settle before reading memory.
        tokio::time::sleep(Duration::from_secs(3)).await;
        points.push((clients.len(), nodes.rss_kib()));
        if err.is_some() {
            failure = err;
            break;
        }
    }
    let used = cpu.end(nodes);
    let connected = clients.len();
    let per_conn = |d: Duration| d.as_secs_f64() * 1e6 / connected.max(1) as f64;
    println!(
        "connected {connected} of {} in {:.1} s ({:.0} µs of server CPU per connection, presence announcements included)",
        tokens.len(),
        started.elapsed().as_secs_f64(),
        per_conn(used.server)
    );
    if let Some(s) = &used.services {
        println!(
            "  postgres {:.0} µs (this database's backends {:.0} µs), redis {:.0} µs of CPU per connection",
            per_conn(s.postgres),
            per_conn(s.postgres_db),
            per_conn(s.redis)
        );
    }
    if let Some(e) = &failure {
        println!("stopped by: {e:#}");
    }
    println!("server RSS: {rss0} KiB before any connection");
    let mut prev = (0, rss0);
    for (n, rss) in &points {
        println!(
            "  {n} connections: {rss} KiB, {:.2} KiB per connection overall, {:.2} KiB per connection since the previous point",
            (*rss as f64 - rss0 as f64) / (*n).max(1) as f64,
            (*rss as f64 - prev.1 as f64) / (n - prev.0).max(1) as f64
        );
        prev = (*n, *rss);
    }
    println!(
        "generator RSS: {:.2} KiB per connection",
        (rss_kib("self") as f64 - gen0 as f64) / connected.max(1) as f64
    );
    if failure.is_none() && !groups.is_empty() {
        // One long message in every group (3,840 characters, the most a message holds
        // is 4,000): each member's connection writes about 4 KiB once.
        let long = LONG.repeat(60);
        for (k, g) in groups.iter().enumerate() {
            let frame = format!(
                r#"{{"v":1,"type":"send","id":{k},"conversation_id":"{}","content":"{long}"}}"#,
                g.id
            );
            let _ = clients[g.members[0]].tx.send(frame);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = nodes.rss_kib();
        let expected: usize = groups.iter().map(|g| g.members.len()).sum();
        println!(
            "after one message of {} bytes in each of the {} groups ({} of {expected} deliveries seen): {rss} KiB, {:.2} KiB per connection overall",
            long.len(),
            groups.len(),
            shared.long_delivered.load(Relaxed),
            (rss as f64 - rss0 as f64) / connected.max(1) as f64
        );
    }
    let closed = shared.closed.load(Relaxed);
    if closed > 0 {
        println!("{closed} connections closed during the scenario");
    }
    close_all(clients).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

struct Outcome {
    p99_ms: f64,
    lost: u64,
}

/// One step: `rate` messages/s for `cfg.step_secs` across `convs`, senders taking turns.
async fn run_step(
    cfg: &Config,
    nodes: &Nodes,
    shared: &Arc<Shared>,
    step: usize,
    clients: &[Client],
    convs: &[Conv],
    rate: u64,
) -> Outcome {
    let st = &shared.steps[step];
    let messages = st.counts.len();
    let members = st.members as u64;
    let expected = messages as u64 * members;
    let errors0 = shared.errors.load(Relaxed);
    let closed0 = shared.closed.load(Relaxed);
    let cpu = CpuWindow::start(nodes);
    let start = shared.now_us() + 20_000;
    let scheduled = |i: usize| start + i as u64 * 1_000_000 / rate;
    let mut i = 0;
    while i < messages {
        let now = shared.now_us();
        while i < messages && scheduled(i) <= now {
            let conv = &convs[i % convs.len()];
            let at = scheduled(i);
            let frame = format!(
                r#"{{"v":1,"type":"send","id":{i},"conversation_id":"{}","content":"{step} {i} {at} {TEXT}","idempotency_key":"{step}-{i}"}}"#,
                conv.id
            );
            // A dead client's message is simply never delivered: counted as lost.
            let _ = clients[sender(convs, i)].tx.send(frame);
            i += 1;
        }
        if i < messages {
            let wake = shared.base + Duration::from_micros(scheduled(i));
            tokio::time::sleep_until(wake.into()).await;
        }
    }
    let deadline = scheduled(messages - 1) + cfg.drain_secs * 1_000_000;
    while st.delivered.load(Relaxed) < expected && shared.now_us() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let used = cpu.end(nodes);
    let (server_cpu, gen_cpu, busy) = (used.server, used.generator, used.busy);
    let delivered = st.delivered.load(Relaxed);
    let span = st.last_us.load(Relaxed).saturating_sub(start).max(1) as f64 / 1e6;
    let hist = st.latency();
    let ms = |v: u64| v as f64 / 1000.0;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / delivered.max(1) as f64;
    let lost = expected - delivered;
    println!(
        "{rate} msg/s offered ({} deliveries/s), {messages} messages: delivered {delivered}/{expected} in {span:.2} s = {:.0} deliveries/s ({:.0} msg/s); lost {lost}, duplicates {}, error frames {}, connections closed {}",
        rate * members,
        delivered as f64 / span,
        delivered as f64 / span / members as f64,
        st.duplicates.load(Relaxed),
        shared.errors.load(Relaxed) - errors0,
        shared.closed.load(Relaxed) - closed0,
    );
    println!(
        "  latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.9)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.value_at_quantile(0.999)),
        ms(hist.max()),
    );
    println!(
        "  server CPU {:.2} s = {:.2} µs/delivery ({:.0} µs/message); generator {:.2} µs/delivery; machine busy {:.2} of {} cores",
        server_cpu.as_secs_f64(),
        per(server_cpu),
        per(server_cpu) * members as f64,
        per(gen_cpu),
        busy,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    if let Some(s) = &used.services {
        println!(
            "  postgres CPU {:.2} s (this database's backends {:.2} s), redis CPU {:.2} s; per delivery: nodes {:.2} µs, nodes + postgres + redis {:.2} µs",
            s.postgres.as_secs_f64(),
            s.postgres_db.as_secs_f64(),
            s.redis.as_secs_f64(),
            per(server_cpu),
            per(server_cpu + s.postgres + s.redis),
        );
    }
    if shared.nodes > 1 {
        println!(
            "  across nodes: {} of the {delivered} deliveries reached a client on another node than the sender's",
            st.across.load(Relaxed)
        );
    }
    Outcome {
        p99_ms: ms(hist.value_at_quantile(0.99)),
        lost,
    }
}

async fn load_scenario(
    cfg: &Config,
    nodes: &Nodes,
    shared: &Arc<Shared>,
    clients: &[Client],
    convs: &[Conv],
    steps: std::ops::Range<usize>,
    rates: &[u64],
) {
    for (step, rate) in steps.zip(rates) {
        let outcome = run_step(cfg, nodes, shared, step, clients, convs, *rate).await;
        if outcome.p99_ms > P99_LIMIT_MS || outcome.lost > 0 {
            println!("  stepping stops: p99 above {P99_LIMIT_MS} ms or a loss");
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Let a backlog of the last step finish before anything else is measured.
    let st = shared.steps.iter().map(|s| &s.delivered);
    let total = || st.clone().map(|d| d.load(Relaxed)).sum::<u64>();
    for _ in 0..60 {
        let before = total();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if total() == before {
            break;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let dir = std::env::temp_dir().join(format!("mindsp-load-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let result = match Backend::create(&cfg, &dir).await {
        Ok(backend) => {
            let result = run(&cfg, &dir, &backend).await;
            backend.clean_up().await;
            result
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(cfg: &Config, dir: &Path, backend: &Backend) -> anyhow::Result<()> {
    println!(
        "# load: server {}, load average {}",
        cfg.server.display(),
        load_average()
    );
    println!("# mode: {}", backend.describe(cfg.nodes));
    if cfg.nodes > 1 {
        println!(
            "# client i connects to node i % {}; server CPU and RSS are sums over the nodes",
            cfg.nodes
        );
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let pop = populate_backend(cfg, backend, &secret).await?;

    let mut steps = Vec::new();
    for r in &cfg.small_rates {
        let messages = (r * cfg.step_secs) as usize;
        steps.push(StepStats::new(messages, cfg.small, &pop.small, cfg.nodes));
    }
    for r in &cfg.group_rates {
        let messages = (r * cfg.step_secs) as usize;
        steps.push(StepStats::new(messages, cfg.group, &pop.groups, cfg.nodes));
    }
    let shared = Arc::new(Shared {
        base: Instant::now(),
        nodes: cfg.nodes,
        steps,
        errors: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        long_delivered: AtomicU64::new(0),
        notes: Mutex::new(Vec::new()),
    });

    let nodes = Nodes::start(cfg, backend, &secret, dir).await?;
    let outcome = scenarios(cfg, &nodes, &shared, &pop).await;
    let logs: Vec<_> = nodes.procs.iter().map(|p| p.log.clone()).collect();
    nodes.stop().await?;
    let notes = shared.notes.lock().expect("notes lock").clone();
    if !notes.is_empty() {
        println!("first problems seen: {notes:#?}");
    }
    for (n, log) in logs.iter().enumerate() {
        let Ok(text) = std::fs::read_to_string(log) else {
            continue;
        };
        if outcome.is_err() {
            println!(
                "server log (tail): {}",
                &text[text.len().saturating_sub(2000)..]
            );
        } else if cfg.nodes > 1 {
            // The nodes log at `warn`: anything there is worth a look.
            let lines: Vec<&str> = text.lines().collect();
            println!("node {n} log: {} lines", lines.len());
            for line in lines.iter().take(5) {
                println!("  {}", truncate(line, 300));
            }
        }
    }
    println!("load average at the end: {}", load_average());
    outcome
}

async fn scenarios(
    cfg: &Config,
    nodes: &Nodes,
    shared: &Arc<Shared>,
    pop: &Population,
) -> anyhow::Result<()> {
    let cpu = CpuWindow::start(nodes);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu.end(nodes);
    let share = |d: Duration| d.as_secs_f64() * 100.0 / used.elapsed.as_secs_f64();
    println!(
        "server idle: {:.1} % of a core, RSS {} KiB; machine busy {:.2} cores before the bench starts",
        share(used.server),
        nodes.rss_kib(),
        used.busy
    );
    if let Some(s) = &used.services {
        println!(
            "postgres idle: {:.1} % of a core (this database's backends {:.1} %), redis {:.1} %",
            share(s.postgres),
            share(s.postgres_db),
            share(s.redis)
        );
    }

    idle_scenario(cfg, nodes, shared, &pop.idle, &pop.idle_groups).await?;

    let started = Instant::now();
    let (clients, err) = connect_all(cfg, &nodes.addrs(), shared, &pop.active, 0).await;
    if let Some(e) = err {
        close_all(clients).await;
        return Err(e.context("opening the active clients"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "\n{} active clients connected in {:.1} s over {} source addresses",
        clients.len(),
        started.elapsed().as_secs_f64(),
        cfg.sources
    );
    let small_steps = 0..cfg.small_rates.len();
    let group_steps = small_steps.end..small_steps.end + cfg.group_rates.len();
    println!(
        "\n## (a) conversations of {}, {} clients, {} s per step",
        cfg.small, cfg.clients, cfg.step_secs
    );
    load_scenario(
        cfg,
        nodes,
        shared,
        &clients,
        &pop.small,
        small_steps,
        &cfg.small_rates,
    )
    .await;
    println!(
        "\n## (b) groups of {}, {} clients, {} s per step",
        cfg.group, cfg.clients, cfg.step_secs
    );
    load_scenario(
        cfg,
        nodes,
        shared,
        &clients,
        &pop.groups,
        group_steps,
        &cfg.group_rates,
    )
    .await;
    close_all(clients).await;
    Ok(())
}
