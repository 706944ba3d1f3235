//! The job queue in Redis, through `fred`.
//!
//! Every change of state is one Lua script run by `EVALSHA` (loaded once when the queue
//! connects, sent again with `EVAL` if the server answers `NOSCRIPT`), so a job moves
//! from one set to the next atomically: no job is lost or handed to two healthy workers.
//! A batch (`enqueue_batch`, `reserve` of many, `complete` of many) is one script call.
//! The clock is the caller's: each call sends its time in milliseconds.
//!
//! # Keys
//!
//! Every key starts with the configured prefix, `{mindsp}:q:` unless told otherwise.
//! The braces are a Redis Cluster *hash tag*: only the text between them picks the hash
//! slot, so all keys of one queue live in one slot and the scripts may touch any of
//! them. A custom prefix should keep a `{...}` part for the same reason. Below, `P` is
//! the prefix, `S` a scope (the tenant's UUID, or `-` for jobs of no tenant), `Q` a
//! queue name.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P j:<id>` | hash | one job (fields below) |
//! | `P r:Q` | sorted set | due jobs, score `(100 - priority) * 2^42 + run_at`: the lowest score is the highest priority, then the earliest run-at, then (equal scores) the smallest id |
//! | `P d:Q` | sorted set | jobs waiting for their run-at time (scheduled or retrying), score run-at |
//! | `P l:Q` | sorted set | leased (running) jobs, score lease expiry |
//! | `P lt` | hash | job id → `<token>\|Q\|<tenant>` of every running job, so `complete` reads a batch of leases in one call instead of one job hash each |
//! | `P i:S:<state>` | sorted set | the jobs of a scope in a state, score last change: the listing index (running jobs are listed from `P l:Q` instead, as few as the workers' concurrency) |
//! | `P u:S` | hash | unique key → the pending job holding it |
//! | `P c:all`, `P c:<tenant>` | hash | counters, field `Q\|<state>` |
//! | `P tp:all:<minute>`, `P tp:<tenant>:<minute>` | hash | `s` succeeded and `f` failed attempts in a minute; expire after [`THROUGHPUT_RETENTION_MINUTES`] |
//! | `P ticks` | sorted set | claimed schedule firings, member `<fire_at>\|<schedule>`, score fire-at |
//! | `P queues`, `P scopes` | sets | the queue names and scopes ever used |
//!
//! A job hash keeps few fields, so each script touches little: `d` is a JSON document
//! of what changes only when a unique job is replaced (`{"c": created, "m": max
//! attempts, "pr": priority, "k": kind, "q": queue, "t": tenant, "u": unique key, "p":
//! payload}`, in that order, so a script reads `c` and `m` with an anchored pattern
//! instead of decoding the payload); beside it `s` state, `r` run-at, `up` last change,
//! `q` queue, and only when they are not empty or zero `t` tenant, `pr` priority, `u`
//! unique key, `a` attempts, `e` last error, `tk` lease token. A final job's finishing
//! time is its last change.
//!
//! Times are milliseconds since the epoch. Stored states are those of [`JobState`],
//! where `ready` means "in `P r:Q`": a due job moves from `P d:Q` to `P r:Q` when a
//! `reserve`, `counts` or `list` call notices it (at most [`PROMOTE_LIMIT`] per call),
//! which is when a scheduled job becomes ready in the counters. A job is reported
//! `Ready` when it is stored ready, or stored scheduled with its run-at time passed.
//!
//! Monitoring never scans all jobs: counts are counters kept by the scripts, throughput
//! per-minute counters, and a listing is a merge of ranges of the `P i:S:<state>` sets
//! (one per state for a tenant; one per scope and state for all tenants).
//!
//! # Calls
//!
//! Each argument costs the client, the server's parser and Lua alike, so the scripts
//! take few: a job to enqueue is two (`id|tenant|queue|priority|run_at|score|policy|key`
//! and its document), a lease one (`<id>:<token>`). A reservation sends one random
//! version-4 UUID; the n-th job it leases gets that UUID with n added to its low 48
//! bits as its token, so polling for many jobs costs no more than polling for one.
//! A script whose connection drops before it answers is not sent again (it may have
//! run): the caller gets a storage error, as with any backend whose commit outcome is
//! unknown.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::bytes_utils::Str;
use fred::clients::Pool;
use fred::error::Error as RedisError;
use fred::interfaces::{ClientLike, HashesInterface, KeysInterface, LuaInterface};
use fred::types::config::{Config, ReconnectPolicy};
use fred::types::{Builder, Key, Value};
use mindsp_core::error::{Error, Result};
use mindsp_core::ids::{JobId, TenantId};
use mindsp_core::jobs::*;
use mindsp_core::model::now;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The key prefix used unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "{mindsp}:q:";
/// Most jobs sent to Redis in one script call by [`JobQueue::enqueue_batch`]; a larger
/// batch is stored in several calls, each atomic on its own.
pub const ENQUEUE_CHUNK: usize = 5_000;
/// Most jobs one [`JobQueue::reserve`] call leases.
pub const MAX_RESERVE: u32 = 1_000;
/// Most due jobs one call moves from waiting to ready.
pub const PROMOTE_LIMIT: u32 = 10_000;
/// Most expired leases one `reserve` call recovers.
pub const RECOVER_LIMIT: u32 = 1_000;
/// Largest page [`JobQueue::list`] answers.
pub const MAX_LIST_LIMIT: u32 = 1_000;
/// How long per-minute throughput counters are kept.
pub const THROUGHPUT_RETENTION_MINUTES: u32 = 7 * 24 * 60;
/// Most index entries one `list` script call examines; `list` calls again from where it
/// stopped, so Redis is never blocked long by a sparse filter.
const LIST_EXAMINE: u32 = 2_000;
/// Most finished jobs one `prune` script call deletes (it calls again until done).
const PRUNE_CHUNK: u32 = 5_000;
/// Longest lease accepted; longer ones are cut to it.
const MAX_LEASE_MS: i64 = 366 * 24 * 3_600 * 1_000;

/// How to reach Redis and where to keep the keys.
#[derive(Debug, Clone)]
pub struct RedisQueueConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`, `redis-cluster://` as
    /// `fred` understands them).
    pub url: String,
    /// Prefix of every key; keep a `{hash tag}` in it for Redis Cluster.
    pub prefix: String,
    /// Connections to open (commands are pipelined on each).
    pub pool_size: usize,
    /// How long a command may wait for its answer.
    pub command_timeout: Duration,
}

impl RedisQueueConfig {
    /// The defaults for `url`: prefix [`DEFAULT_PREFIX`], one connection, 10 s timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            pool_size: 1,
            command_timeout: Duration::from_secs(10),
        }
    }

    /// Uses `prefix` for the keys.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// The durable job queue in Redis. Cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct RedisQueue {
    pool: Pool,
    prefix: Str,
    /// The key named to Redis in every script call: it routes the call to the prefix's
    /// slot in a cluster. The scripts derive every other key from the prefix.
    anchor: Key,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &&*self.prefix)
            .finish_non_exhaustive()
    }
}

fn redis_err(e: RedisError) -> Error {
    Error::Storage(format!("redis: {e}"))
}

fn bad_reply(what: &str) -> Error {
    Error::Storage(format!("redis: unexpected reply to {what}"))
}

impl RedisQueue {
    /// Connects to `url` and keeps the keys under `prefix` (empty: [`DEFAULT_PREFIX`]).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let mut config = RedisQueueConfig::new(url);
        if !prefix.is_empty() {
            config.prefix = prefix.to_owned();
        }
        Self::connect_with(config).await
    }

    /// Connects as `config` says and loads the scripts.
    pub async fn connect_with(config: RedisQueueConfig) -> Result<Self> {
        let redis_config = Config::from_url(&config.url).map_err(redis_err)?;
        let mut builder = Builder::from_config(redis_config);
        let timeout = config.command_timeout;
        builder
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                // A script whose connection closed before it answered may have run:
                // sending it again could store a batch twice or lease jobs nobody
                // receives. The caller gets the error and decides.
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let pool = builder
            .build_pool(config.pool_size.max(1))
            .map_err(redis_err)?;
        pool.init().await.map_err(redis_err)?;
        Self::with_pool(pool, &config.prefix).await
    }

    /// A queue on connections the caller set up and initialised, keys under `prefix`.
    pub async fn with_pool(pool: Pool, prefix: &str) -> Result<Self> {
        let scripts = Scripts::load(&pool).await?;
        let prefix = Str::from(prefix);
        let anchor = Key::from(format!("{}queues", &*prefix));
        Ok(Self {
            pool,
            prefix,
            anchor,
            scripts: Arc::new(scripts),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The connections, e.g. to share them with other Redis users.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Closes the connections.
    pub async fn close(&self) -> Result<()> {
        self.pool.quit().await.map_err(redis_err)
    }

    /// Deletes every key under the prefix: all jobs, counters and claims of this queue.
    /// For tests and decommissioning, while nothing else uses the prefix: it walks the
    /// keyspace page by page with `SCAN` (never blocking the server for long), so it is
    /// not atomic. Answers how many keys were deleted.
    pub async fn purge(&self) -> Result<u64> {
        let mut pattern = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let mut cursor = String::from("0");
        let mut deleted = 0;
        loop {
            let page: Value = self
                .pool
                .scan_page(cursor.clone(), pattern.clone(), Some(1_000), None)
                .await
                .map_err(redis_err)?;
            let mut page = array(page);
            let (Some(keys), Some(next)) = (page.pop(), page.pop()) else {
                return Err(bad_reply("SCAN"));
            };
            cursor = text(&next).ok_or_else(|| bad_reply("SCAN"))?.into_owned();
            let keys: Vec<Key> = array(keys)
                .into_iter()
                .filter_map(Value::into_string)
                .map(Key::from)
                .collect();
            if !keys.is_empty() {
                let n: i64 = self.pool.unlink(keys).await.map_err(redis_err)?;
                deleted += n.max(0) as u64;
            }
            if cursor == "0" {
                return Ok(deleted);
            }
        }
    }

    /// The first two arguments of every script: the prefix and the time.
    fn args(&self, now_ms: i64, extra: usize) -> Vec<Value> {
        let mut v = Vec::with_capacity(2 + extra);
        v.push(Value::String(self.prefix.clone()));
        v.push(Value::Integer(now_ms));
        v
    }

    async fn call(&self, script: &Script, args: Vec<Value>) -> Result<Value> {
        let again = args.clone();
        self.call_with(script, move || Ok(again), args).await
    }

    /// Runs `script` with `args`; if the server has lost it (restart, `SCRIPT FLUSH`,
    /// failover), runs its source with `EVAL` (which caches it again) and arguments
    /// from `rebuild`. Big argument lists are rebuilt rather than kept for that case.
    async fn call_with(
        &self,
        script: &Script,
        rebuild: impl FnOnce() -> Result<Vec<Value>> + Send,
        args: Vec<Value>,
    ) -> Result<Value> {
        let keys = vec![self.anchor.clone()];
        let first = self
            .pool
            .evalsha::<Value, _, _, _>(script.sha.clone(), keys.clone(), args)
            .await;
        match first {
            Err(e) if e.details().starts_with("NOSCRIPT") => self
                .pool
                .eval::<Value, _, _, _>(script.src.clone(), keys, rebuild()?)
                .await
                .map_err(redis_err),
            other => other.map_err(redis_err),
        }
    }

    /// Stores up to [`ENQUEUE_CHUNK`] validated jobs, with a tick claim if given.
    /// `None` when the tick was already claimed.
    async fn enqueue_chunk(
        &self,
        jobs: &[NewJob],
        claim: Option<(String, i64)>,
    ) -> Result<Option<Vec<Enqueued>>> {
        let at = ms(now());
        let ids: Vec<JobId> = jobs.iter().map(|_| JobId::new()).collect();
        let build = || self.enqueue_args(at, jobs, &ids, claim.as_ref());
        let args = build()?;
        let reply = array(self.call_with(&self.scripts.enqueue, build, args).await?);
        let Some(codes) = reply.first().and_then(text) else {
            // Only a tick whose firing was already claimed answers nothing.
            return Ok(None);
        };
        if codes.len() != jobs.len() {
            return Err(bad_reply("enqueue"));
        }
        // One letter per job; the holder's id follows for each kept or replaced one.
        let mut holders = reply[1..].iter();
        let mut holder = || {
            holders
                .next()
                .and_then(parse_id)
                .ok_or_else(|| bad_reply("enqueue"))
        };
        codes
            .bytes()
            .zip(ids)
            .map(|(code, id)| {
                Ok(match code {
                    b'c' => Enqueued::Created(id),
                    b'k' => Enqueued::Kept(holder()?),
                    b'r' => Enqueued::Replaced(holder()?),
                    _ => return Err(bad_reply("enqueue")),
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn enqueue_args(
        &self,
        at: i64,
        jobs: &[NewJob],
        ids: &[JobId],
        claim: Option<&(String, i64)>,
    ) -> Result<Vec<Value>> {
        let mut args = self.args(at, 2 + jobs.len() * 2);
        match claim {
            Some((member, score)) => {
                args.push(Value::from(member.as_str()));
                args.push(Value::Integer(*score));
            }
            None => {
                args.push(Value::from(""));
                args.push(Value::Integer(0));
            }
        }
        for (job, id) in jobs.iter().zip(ids) {
            let data = serde_json::to_string(&DataOut {
                c: at,
                m: job.max_attempts,
                pr: job.priority,
                k: &job.kind,
                q: &job.queue,
                t: job.tenant,
                u: job.unique_key.as_deref(),
                p: &job.payload,
            })
            .map_err(|e| Error::invalid("invalid_payload", e.to_string()))?;
            let run_at = job.run_at.map(ms).unwrap_or(at);
            // Its score in the set it waits in: ready or delayed.
            let score = if run_at <= at {
                ready_score(job.priority, run_at)
            } else {
                run_at.to_string()
            };
            // One text per job (fewer arguments make a faster call): the unique key
            // comes last as it may hold any character; names cannot hold '|'.
            let head = format!(
                "{id}|{}|{}|{}|{run_at}|{score}|{}|{}",
                tenant_str(job.tenant),
                job.queue,
                job.priority,
                match job.on_duplicate {
                    OnDuplicate::Keep => 'k',
                    OnDuplicate::Replace => 'r',
                },
                job.unique_key.as_deref().unwrap_or(""),
            );
            args.push(Value::from(head));
            args.push(Value::from(data));
        }
        Ok(args)
    }

    /// Cancel, discard or cancel-unique, by `mode`.
    async fn drop_job(&self, mode: &str, scope: String, target: String) -> Result<bool> {
        let mut args = self.args(ms(now()), 3);
        args.push(Value::from(mode));
        args.push(Value::from(scope));
        args.push(Value::from(target));
        let v = self.call(&self.scripts.drop, args).await?;
        Ok(int(&v) == Some(1))
    }
}

/// The `d` field of a job hash as written. The order of the fields matters: the
/// scripts read `c` and `m` at the start of the text.
#[derive(Serialize)]
struct DataOut<'a> {
    c: i64,
    m: u32,
    pr: i16,
    k: &'a str,
    q: &'a str,
    t: Option<TenantId>,
    u: Option<&'a str>,
    p: &'a serde_json::Value,
}

/// The `d` field of a job hash as read.
#[derive(Deserialize)]
struct DataIn {
    c: i64,
    m: u32,
    pr: i16,
    k: String,
    q: String,
    t: Option<TenantId>,
    u: Option<String>,
    p: serde_json::Value,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or(if v < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// The score of a due job in `P r:Q`: higher priority first, then earlier run-at. Both
/// parts fit in the 53 bits a double holds exactly.
fn ready_score(priority: i16, run_at: i64) -> String {
    const RUN_AT_BITS: u32 = 42;
    let run_at = run_at.clamp(0, (1 << RUN_AT_BITS) - 1);
    let rank = i64::from(MAX_PRIORITY) - i64::from(priority.clamp(-MAX_PRIORITY, MAX_PRIORITY));
    ((rank << RUN_AT_BITS) + run_at).to_string()
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis())
        .unwrap_or(i64::MAX)
        .min(MAX_LEASE_MS)
}

fn tenant_str(t: Option<TenantId>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// The scope argument of the scripts: `*` for every tenant.
fn scope_str(scope: JobScope) -> String {
    match scope {
        JobScope::All => "*".to_owned(),
        JobScope::Tenant(t) => t.to_string(),
    }
}

/// The scope part of counter keys: `all` for every tenant.
fn counter_scope(scope: JobScope) -> String {
    match scope {
        JobScope::All => "all".to_owned(),
        JobScope::Tenant(t) => t.to_string(),
    }
}

/// A reply as a list; nil (what an empty Lua table may become) is an empty list.
fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Null => Vec::new(),
        v => v.into_array(),
    }
}

fn text(v: &Value) -> Option<Cow<'_, str>> {
    v.as_str()
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Double(f) => Some(*f as i64),
        v => v.as_i64(),
    }
}

fn parse_id(v: &Value) -> Option<JobId> {
    text(v).and_then(|s| Uuid::parse_str(&s).ok()).map(JobId)
}

/// Fields of a job hash a script answers for a job, after its id.
const FIELDS: [&str; 6] = ["d", "s", "r", "a", "e", "up"];
/// One job in a script's answer: its id, then [`FIELDS`].
const RECORD: usize = 1 + FIELDS.len();
/// One job in the answer of `reserve`: its id, `d`, `r`, `a`, `e` (it is running, and
/// changed now).
const LEASED: usize = 5;

/// A job from its id and the values of [`FIELDS`]; `at` tells scheduled from ready.
fn parse_job(id: JobId, f: &[Value], at: i64) -> Result<Job> {
    let corrupt = |what: &str| Error::Storage(format!("redis: job {id} has a bad {what}"));
    let data = text(&f[0]).ok_or_else(|| corrupt("document"))?;
    let data: DataIn = serde_json::from_str(&data).map_err(|_| corrupt("document"))?;
    let stored = text(&f[1]).ok_or_else(|| corrupt("state"))?;
    let run_at = int(&f[2]).ok_or_else(|| corrupt("run-at"))?;
    let state = match JobState::parse(&stored).ok_or_else(|| corrupt("state"))? {
        JobState::Scheduled if run_at <= at => JobState::Ready,
        s => s,
    };
    let updated_at = from_ms(int(&f[5]).ok_or_else(|| corrupt("update time"))?);
    Ok(Job {
        id,
        tenant: data.t,
        kind: data.k,
        queue: data.q,
        payload: data.p,
        priority: data.pr,
        state,
        run_at: from_ms(run_at),
        attempts: u32::try_from(int(&f[3]).unwrap_or(0).max(0)).unwrap_or(u32::MAX),
        max_attempts: data.m,
        unique_key: data.u,
        last_error: text(&f[4]).map(Cow::into_owned),
        created_at: from_ms(data.c),
        updated_at,
        finished_at: state.is_final().then_some(updated_at),
    })
}

/// Jobs from a flat list of records.
fn parse_records(values: &[Value], at: i64, what: &str) -> Result<Vec<Job>> {
    if !values.len().is_multiple_of(RECORD) {
        return Err(bad_reply(what));
    }
    values
        .chunks_exact(RECORD)
        .map(|rec| {
            let id = parse_id(&rec[0]).ok_or_else(|| bad_reply(what))?;
            parse_job(id, &rec[1..], at)
        })
        .collect()
}

#[async_trait]
impl JobQueue for RedisQueue {
    async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        job.validate()?;
        let out = self
            .enqueue_chunk(std::slice::from_ref(job), None)
            .await?
            .ok_or_else(|| bad_reply("enqueue"))?;
        out.into_iter().next().ok_or_else(|| bad_reply("enqueue"))
    }

    async fn enqueue_batch(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        for job in jobs {
            job.validate()?;
        }
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            out.extend(
                self.enqueue_chunk(chunk, None)
                    .await?
                    .ok_or_else(|| bad_reply("enqueue"))?,
            );
        }
        Ok(out)
    }

    async fn reserve(&self, queue: &str, max: u32, lease: Duration) -> Result<Vec<Lease>> {
        let max = max.min(MAX_RESERVE) as usize;
        if max == 0 {
            return Ok(Vec::new());
        }
        let at = ms(now());
        let lease_ms = duration_ms(lease);
        // The n-th job leased gets the token `base + n` (in its low 48 bits): fresh and
        // random per call, unique within it, and one argument instead of `max`.
        let base = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut args = self.args(at, 4);
        args.push(Value::from(queue));
        args.push(Value::Integer(lease_ms));
        args.push(Value::Integer(max as i64));
        args.push(Value::from(base.to_string()));
        let reply = array(self.call(&self.scripts.reserve, args).await?);
        let expires_at = from_ms(at.saturating_add(lease_ms));
        if !reply.len().is_multiple_of(LEASED) || reply.len() / LEASED > max {
            return Err(bad_reply("reserve"));
        }
        reply
            .chunks_exact(LEASED)
            .enumerate()
            .map(|(n, rec)| {
                let id = parse_id(&rec[0]).ok_or_else(|| bad_reply("reserve"))?;
                let running = Value::from("running");
                let updated = Value::Integer(at);
                let fields = [
                    rec[1].clone(),
                    running,
                    rec[2].clone(),
                    rec[3].clone(),
                    rec[4].clone(),
                    updated,
                ];
                Ok(Lease {
                    job: parse_job(id, &fields, at)?,
                    token: nth_token(base, n as u64 + 1),
                    expires_at,
                })
            })
            .collect()
    }

    async fn next_due(&self, queue: &str) -> Result<Option<DateTime<Utc>>> {
        let mut args = self.args(ms(now()), 1);
        args.push(Value::from(queue));
        let v = self.call(&self.scripts.next_due, args).await?;
        Ok(int(&v).map(from_ms))
    }

    async fn renew(&self, leases: &[LeaseRef], lease: Duration) -> Result<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = self.args(ms(now()), 1 + leases.len());
        args.push(Value::Integer(duration_ms(lease)));
        push_leases(&mut args, leases);
        let reply = array(self.call(&self.scripts.renew, args).await?);
        if reply.len() != leases.len() {
            return Err(bad_reply("renew"));
        }
        Ok(reply.iter().map(|v| int(v) == Some(1)).collect())
    }

    async fn complete(&self, leases: &[LeaseRef]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let at = ms(now());
        let build = || {
            let mut args = self.args(at, leases.len());
            push_leases(&mut args, leases);
            Ok(args)
        };
        let args = build()?;
        let v = self.call_with(&self.scripts.complete, build, args).await?;
        int(&v)
            .map(|n| n.max(0) as u64)
            .ok_or_else(|| bad_reply("complete"))
    }

    async fn fail(
        &self,
        lease: &LeaseRef,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<JobState>> {
        let mut args = self.args(ms(now()), 3);
        push_leases(&mut args, std::slice::from_ref(lease));
        args.push(Value::from(clip_error(error)));
        args.push(match retry_at {
            Some(t) => Value::Integer(ms(t)),
            None => Value::from(""),
        });
        let v = self.call(&self.scripts.fail, args).await?;
        match text(&v) {
            None => Ok(None),
            Some(s) => JobState::parse(&s)
                .map(Some)
                .ok_or_else(|| bad_reply("fail")),
        }
    }

    async fn release(&self, leases: &[LeaseRef]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let mut args = self.args(ms(now()), leases.len());
        push_leases(&mut args, leases);
        let v = self.call(&self.scripts.release, args).await?;
        int(&v)
            .map(|n| n.max(0) as u64)
            .ok_or_else(|| bad_reply("release"))
    }

    async fn job(&self, scope: JobScope, id: JobId) -> Result<Option<Job>> {
        let key = format!("{}j:{id}", &*self.prefix);
        let values: Value = self
            .pool
            .hmget(key, FIELDS.to_vec())
            .await
            .map_err(redis_err)?;
        let values = array(values);
        if values.len() != FIELDS.len() {
            return Err(bad_reply("HMGET"));
        }
        if values[1].is_null() {
            return Ok(None);
        }
        let job = parse_job(id, &values, ms(now()))?;
        Ok(scope.covers(job.tenant).then_some(job))
    }

    async fn cancel(&self, scope: JobScope, id: JobId) -> Result<bool> {
        self.drop_job("c", scope_str(scope), id.to_string()).await
    }

    async fn cancel_unique(&self, tenant: Option<TenantId>, key: &str) -> Result<bool> {
        self.drop_job("u", tenant_str(tenant), key.to_owned()).await
    }

    async fn enqueue_tick(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        job: &NewJob,
    ) -> Result<bool> {
        job.validate()?;
        let fire = ms(fire_at);
        let claim = (format!("{fire}|{schedule}"), fire);
        Ok(self
            .enqueue_chunk(std::slice::from_ref(job), Some(claim))
            .await?
            .is_some())
    }

    async fn counts(&self, scope: JobScope) -> Result<Vec<QueueCounts>> {
        let mut args = self.args(ms(now()), 1);
        args.push(Value::from(counter_scope(scope)));
        let reply = array(self.call(&self.scripts.counts, args).await?);
        let mut by_queue: BTreeMap<String, QueueCounts> = BTreeMap::new();
        for pair in reply.chunks_exact(2) {
            let field = text(&pair[0]).ok_or_else(|| bad_reply("counts"))?;
            let n = int(&pair[1]).ok_or_else(|| bad_reply("counts"))?;
            let Some((queue, state)) = field.rsplit_once('|') else {
                return Err(bad_reply("counts"));
            };
            let state = JobState::parse(state).ok_or_else(|| bad_reply("counts"))?;
            if n <= 0 {
                continue;
            }
            by_queue
                .entry(queue.to_owned())
                .or_insert_with(|| QueueCounts {
                    queue: queue.to_owned(),
                    ..Default::default()
                })
                .add(state, n as u64);
        }
        Ok(by_queue.into_values().collect())
    }

    async fn throughput(&self, scope: JobScope, minutes: u32) -> Result<Vec<MinuteStat>> {
        let minutes = i64::from(minutes.max(1));
        let current = ms(now()).div_euclid(60_000);
        let first = current - (minutes - 1);
        let mut stats: Vec<MinuteStat> = (0..minutes)
            .map(|i| MinuteStat {
                minute: from_ms((first + i) * 60_000),
                succeeded: 0,
                failed: 0,
            })
            .collect();
        // Older minutes have expired; ask only for the retained ones.
        let asked = minutes.min(i64::from(THROUGHPUT_RETENTION_MINUTES));
        let mut args = self.args(0, 3);
        args.push(Value::from(counter_scope(scope)));
        args.push(Value::Integer(current - (asked - 1)));
        args.push(Value::Integer(asked));
        let reply = array(self.call(&self.scripts.throughput, args).await?);
        if reply.len() != 2 * asked as usize {
            return Err(bad_reply("throughput"));
        }
        let offset = (minutes - asked) as usize;
        for (stat, pair) in stats[offset..].iter_mut().zip(reply.chunks_exact(2)) {
            stat.succeeded = int(&pair[0]).unwrap_or(0).max(0) as u64;
            stat.failed = int(&pair[1]).unwrap_or(0).max(0) as u64;
        }
        Ok(stats)
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let limit = filter.limit.min(MAX_LIST_LIMIT);
        let mut out: Vec<Job> = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let mut cursor = filter.before.map(|(t, id)| (ms(t), id.to_string()));
        loop {
            let at = ms(now());
            let mut args = self.args(at, 7);
            args.push(Value::from(scope_str(filter.scope)));
            args.push(Value::from(
                filter.state.map(JobState::as_str).unwrap_or(""),
            ));
            args.push(Value::from(filter.queue.as_deref().unwrap_or("")));
            match &cursor {
                Some((t, id)) => {
                    args.push(Value::from(t.to_string()));
                    args.push(Value::from(id.as_str()));
                }
                None => {
                    args.push(Value::from(""));
                    args.push(Value::from(""));
                }
            }
            args.push(Value::Integer(i64::from(limit) - out.len() as i64));
            args.push(Value::Integer(LIST_EXAMINE.into()));
            let reply = array(self.call(&self.scripts.list, args).await?);
            if reply.len() < 3 {
                return Err(bad_reply("list"));
            }
            let done = int(&reply[0]) == Some(1);
            let last = int(&reply[1]).zip(text(&reply[2]).map(Cow::into_owned));
            for job in parse_records(&reply[3..], at, "list")? {
                // A scheduled job may have come due between the index and the clock.
                if filter.state.is_none_or(|s| s == job.state) {
                    out.push(job);
                }
            }
            if done || out.len() >= limit as usize {
                break;
            }
            match last {
                Some(last) => cursor = Some(last),
                None => break,
            }
        }
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn retry(&self, scope: JobScope, id: JobId) -> Result<bool> {
        let mut args = self.args(ms(now()), 2);
        args.push(Value::from(scope_str(scope)));
        args.push(Value::from(id.to_string()));
        let v = self.call(&self.scripts.retry, args).await?;
        match int(&v) {
            Some(1) => Ok(true),
            Some(-1) => Err(Error::conflict(
                "unique_key_held",
                "another pending job holds this job's unique key",
            )),
            Some(_) => Ok(false),
            None => Err(bad_reply("retry")),
        }
    }

    async fn discard(&self, scope: JobScope, id: JobId) -> Result<bool> {
        self.drop_job("d", scope_str(scope), id.to_string()).await
    }

    async fn prune(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut args = self.args(ms(now()), 2);
            args.push(Value::Integer(ms(before)));
            args.push(Value::Integer(PRUNE_CHUNK.into()));
            let reply = array(self.call(&self.scripts.prune, args).await?);
            let (Some(n), Some(more)) = (reply.first().and_then(int), reply.get(1).and_then(int))
            else {
                return Err(bad_reply("prune"));
            };
            total += n.max(0) as u64;
            if more == 0 {
                return Ok(total);
            }
        }
    }
}

/// One argument per lease: `<id>:<token>`, both in the 36-character UUID form.
fn push_leases(args: &mut Vec<Value>, leases: &[LeaseRef]) {
    for l in leases {
        let mut text = String::with_capacity(73);
        text.push_str(l.id.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        text.push(':');
        text.push_str(
            l.token
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer()),
        );
        args.push(Value::from(text));
    }
}

/// The token of the `n`-th job a reservation leases (from 1): `base` with `n` added to
/// its low 48 bits, as the reserve script computes it.
fn nth_token(base: Uuid, n: u64) -> Uuid {
    const LOW: u128 = (1 << 48) - 1;
    let b = base.as_u128();
    Uuid::from_u128((b & !LOW) | ((b & LOW).wrapping_add(u128::from(n)) & LOW))
}

/// One script: its source (helpers included) and its SHA-1 as the server computed it.
struct Script {
    src: Str,
    sha: Str,
}

struct Scripts {
    enqueue: Script,
    reserve: Script,
    complete: Script,
    fail: Script,
    renew: Script,
    release: Script,
    drop: Script,
    retry: Script,
    counts: Script,
    throughput: Script,
    list: Script,
    next_due: Script,
    prune: Script,
}

impl Scripts {
    async fn load(pool: &Pool) -> Result<Self> {
        async fn one(pool: &Pool, body: &str) -> Result<Script> {
            let src = Str::from(script_source(body));
            let sha: String = pool.script_load(src.clone()).await.map_err(redis_err)?;
            Ok(Script {
                src,
                sha: Str::from(sha),
            })
        }
        Ok(Self {
            enqueue: one(pool, ENQUEUE).await?,
            reserve: one(pool, RESERVE).await?,
            complete: one(pool, COMPLETE).await?,
            fail: one(pool, FAIL).await?,
            renew: one(pool, RENEW).await?,
            release: one(pool, RELEASE).await?,
            drop: one(pool, DROP).await?,
            retry: one(pool, RETRY).await?,
            counts: one(pool, COUNTS).await?,
            throughput: one(pool, THROUGHPUT).await?,
            list: one(pool, LIST).await?,
            next_due: one(pool, NEXT_DUE).await?,
            prune: one(pool, PRUNE).await?,
        })
    }
}

// ---- Lua -------------------------------------------------------------------------------
//
// Every script gets KEYS[1] = `P queues` (for routing only), ARGV[1] = the prefix and
// ARGV[2] = the caller's time in ms. Writes to sets and counters that nothing later in
// the same script reads are gathered and sent at the end (`flush`): one ZADD or ZREM per
// key and one HINCRBY per counter, which keeps batches cheap. Key names are built once
// per call and kept in small tables.

/// What every script starts with.
const BASE: &str = r#"
local P = ARGV[1]
local NOW_S = ARGV[2]
local NOW = tonumber(NOW_S)
"#;

/// Helpers, each with the names it defines, in order: a helper uses only those before
/// it. A script gets those its body names, and what they name in turn (see
/// [`script_source`]), since defining a Lua function costs time on every call.
const HELPERS: &[(&[&str], &str)] = &[
    (
        &["rscore"],
        r#"
local function rscore(pr, r)
  local RB = 4398046511104
  if r < 0 then r = 0 elseif r >= RB then r = RB - 1 end
  return (100 - pr) * RB + r
end
"#,
    ),
    (
        &["pending"],
        r#"
local function pending(st) return st == 'scheduled' or st == 'ready' or st == 'retrying' end
"#,
    ),
    (
        &["jk"],
        r#"
local function jk(id) return P .. 'j:' .. id end
"#,
    ),
    (
        &["istr"],
        r#"
-- Small integers as strings: Lua numbers given to redis.call are formatted slowly.
local IS = {}
local function istr(n)
  local s = IS[n]
  if not s then s = string.format('%d', n); IS[n] = s end
  return s
end
"#,
    ),
    (
        &["sc"],
        r#"
local function sc(t) if t == '' then return '-' end return t end
"#,
    ),
    (
        &["max_of"],
        r#"
-- The max attempts in a job's document.
local function max_of(d) return tonumber(string.match(d, '^{"c":%-?%d+,"m":(%d+)')) end
"#,
    ),
    (
        &["key"],
        r#"
local KC = {}
-- P .. kind .. name, built once per call.
local function key(kind, name)
  local m = KC[kind]
  if not m then m = {}; KC[kind] = m end
  local k = m[name]
  if not k then k = P .. kind .. name; m[name] = k end
  return k
end
"#,
    ),
    (
        &["ik"],
        r#"
local IK = {}
-- The index set of tenant `t` ('' for none) and state `st`.
local function ik(t, st)
  local m = IK[t]
  if not m then m = {}; IK[t] = m end
  local k = m[st]
  if not k then k = P .. 'i:' .. sc(t) .. ':' .. st; m[st] = k end
  return k
end
"#,
    ),
    (
        &["uk"],
        r#"
local function uk(t) return key('u:', sc(t)) end
"#,
    ),
    (
        &["push", "ZA", "ZR"],
        r#"
local ZA, ZR = {}, {}
local function push(tab, k, a, b)
  local l = tab[k]
  if not l then l = {}; tab[k] = l end
  l[#l + 1] = a
  if b ~= nil then l[#l + 1] = b end
end
"#,
    ),
    (
        &["count", "CN"],
        r#"
local CN = {}
local function count(t, q, st, d)
  local a = CN[t]
  if not a then a = {}; CN[t] = a end
  local b = a[q]
  if not b then b = {}; a[q] = b end
  b[st] = (b[st] or 0) + d
end
"#,
    ),
    (
        &["move"],
        r#"
local function move(t, q, from, to)
  count(t, q, from, -1)
  count(t, q, to, 1)
end
"#,
    ),
    (
        &["tput", "TPN"],
        r#"
local TPN = {}
local function tput(t, field)
  local a = TPN[t]
  if not a then a = {s = 0, f = 0}; TPN[t] = a end
  a[field] = a[field] + 1
end
"#,
    ),
    (
        &["run"],
        r#"
local function run(cmd, k, l, step)
  local n = #l
  local i = 1
  while i <= n do
    local j = i + step - 1
    if j > n then j = n end
    redis.call(cmd, k, unpack(l, i, j))
    i = j + 1
  end
end
"#,
    ),
    (
        &["flush"],
        r#"
-- Sends the gathered writes: set members, counters, throughput.
local function flush()
  for k, l in pairs(ZR) do run('ZREM', k, l, 4000) end
  for k, l in pairs(ZA) do run('ZADD', k, l, 4000) end
  for t, a in pairs(CN) do
    for q, b in pairs(a) do
      for st, d in pairs(b) do
        if d ~= 0 then
          local f = q .. '|' .. st
          redis.call('HINCRBY', P .. 'c:all', f, d)
          if t ~= '' then redis.call('HINCRBY', P .. 'c:' .. t, f, d) end
        end
      end
    end
  end
  local minute = string.format('%d', math.floor(NOW / 60000))
  local all = {s = 0, f = 0}
  for t, a in pairs(TPN) do
    all.s = all.s + a.s
    all.f = all.f + a.f
    if t ~= '' then
      local k = P .. 'tp:' .. t .. ':' .. minute
      if a.s > 0 then redis.call('HINCRBY', k, 's', a.s) end
      if a.f > 0 then redis.call('HINCRBY', k, 'f', a.f) end
      redis.call('EXPIRE', k, TP_TTL)
    end
  end
  if all.s + all.f > 0 then
    local k = P .. 'tp:all:' .. minute
    if all.s > 0 then redis.call('HINCRBY', k, 's', all.s) end
    if all.f > 0 then redis.call('HINCRBY', k, 'f', all.f) end
    redis.call('EXPIRE', k, TP_TTL)
  end
  ZA, ZR, CN, TPN = {}, {}, {}, {}
end
"#,
    ),
    (
        &["holder"],
        r#"
-- The pending job other than `id` holding unique key `u` in `t`'s scope, if any.
local function holder(t, u, id)
  local h = redis.call('HGET', uk(t), u)
  if h and h ~= id and pending(redis.call('HGET', jk(h), 's')) then return h end
  return nil
end
"#,
    ),
    (
        &["take"],
        r#"
-- Takes key `u` for `id` going back to pending; answers the other holder instead if
-- there is one.
local function take(t, u, id)
  if not u then return nil end
  local h = holder(t, u, id)
  if h then return h end
  redis.call('HSET', uk(t), u, id)
  return nil
end
"#,
    ),
    (
        &["drop_key"],
        r#"
local function drop_key(t, u, id)
  if u and redis.call('HGET', uk(t), u) == id then redis.call('HDEL', uk(t), u) end
end
"#,
    ),
    (
        &["place"],
        r#"
-- Puts a pending job where it waits: ready now, or delayed; `z` is its score there if
-- known. Answers the stored state.
local function place(id, q, pr, r, z)
  if r <= NOW then
    redis.call('ZADD', key('r:', q), z or rscore(pr, r), id)
    return 'ready'
  end
  redis.call('ZADD', key('d:', q), z or r, id)
  return 'scheduled'
end
"#,
    ),
    (
        &["unplace"],
        r#"
local function unplace(id, q)
  redis.call('ZREM', key('r:', q), id)
  redis.call('ZREM', key('d:', q), id)
end
"#,
    ),
    (
        &["supersede"],
        r#"
-- A running job whose key another pending job took ends cancelled.
local function supersede(id, t, q, other)
  redis.call('HSET', jk(id), 's', 'cancelled', 'e', 'superseded by job ' .. other,
    'up', NOW_S)
  redis.call('ZADD', ik(t, 'cancelled'), NOW_S, id)
  move(t, q, 'running', 'cancelled')
end
"#,
    ),
    (
        &["promote"],
        r#"
-- Moves up to `limit` jobs of `q` whose run-at time has come from delayed to ready.
local function promote(q, limit)
  local dk = key('d:', q)
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', NOW, 'LIMIT', 0, limit)
  if #due == 0 then return 0 end
  local rk = key('r:', q)
  for _, id in ipairs(due) do
    local j = redis.call('HMGET', jk(id), 's', 'pr', 'r', 't', 'up')
    if j[1] == 'scheduled' or j[1] == 'retrying' then
      redis.call('ZADD', rk, rscore(tonumber(j[2] or 0), tonumber(j[3])), id)
      if j[1] == 'scheduled' then
        local t = j[4] or ''
        redis.call('HSET', jk(id), 's', 'ready')
        redis.call('ZREM', ik(t, 'scheduled'), id)
        redis.call('ZADD', ik(t, 'ready'), j[5], id)
        move(t, q, 'scheduled', 'ready')
      end
    end
  end
  run('ZREM', dk, due, 4000)
  return #due
end
"#,
    ),
    (
        &["promote_all"],
        r#"
local function promote_all(only, limit)
  if only ~= '' then return promote(only, limit) end
  local n = 0
  for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
    if n >= limit then break end
    n = n + promote(q, limit - n)
  end
  return n
end
"#,
    ),
];

/// The source of a script: [`BASE`], the [`HELPERS`] it needs, its body.
fn script_source(body: &str) -> String {
    fn mentions(text: &str, name: &str) -> bool {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        text.match_indices(name).any(|(i, _)| {
            !text[..i].chars().next_back().is_some_and(ident)
                && !text[i + name.len()..].chars().next().is_some_and(ident)
        })
    }
    let mut needed = body.to_owned();
    let mut parts = Vec::new();
    for (names, code) in HELPERS.iter().rev() {
        if names.iter().any(|n| mentions(&needed, n)) {
            parts.push(*code);
            needed.push_str(code);
        }
    }
    let mut src = String::from(BASE);
    src.push_str(&format!(
        "local PROMOTE_LIMIT = {PROMOTE_LIMIT}\nlocal RECOVER_LIMIT = {RECOVER_LIMIT}\n\
         local TP_TTL = {}\n",
        (u64::from(THROUGHPUT_RETENTION_MINUTES) + 60) * 60
    ));
    src.extend(parts.into_iter().rev());
    src.push_str(body);
    src
}

/// ARGV[3], ARGV[4]: a tick claim (member, score) or ''; then 2 values per job:
/// `id|tenant|queue|priority|run-at|score|policy|unique key` (the score in the ready or
/// delayed set, as the run-at time says; policy `k` keep, `r` replace) and the document.
/// Answers a text with one letter per job (`c` created, `k` kept, `r` replaced) then the
/// holder's id for each `k` and `r`; nothing when the tick was claimed before.
const ENQUEUE: &str = r#"
if ARGV[3] ~= '' then
  if redis.call('ZADD', P .. 'ticks', 'NX', ARGV[4], ARGV[3]) == 0 then return {} end
end
local codes, out = {}, {''}
local queues, scopes = {}, {}
for i = 5, #ARGV, 2 do
  local id, t, q, prs, rs, z, pol, u = string.match(ARGV[i],
    '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  local d = ARGV[i + 1]
  local pr, r = tonumber(prs), tonumber(rs)
  queues[q] = true
  scopes[t] = true
  local h = nil
  if u ~= '' then h = holder(t, u, id) end
  if h and pol == 'k' then
    codes[#codes + 1] = 'k'
    out[#out + 1] = h
  elseif h then
    -- Replace: the new document keeps the holder's creation time.
    local k = jk(h)
    local o = redis.call('HMGET', k, 's', 'q', 'd')
    local c = string.match(o[3], '^{"c":(%-?%d+)')
    d = '{"c":' .. c .. string.sub(d, #string.match(d, '^{"c":%-?%d+') + 1)
    unplace(h, o[2])
    local st = place(h, q, pr, r, z)
    redis.call('HSET', k, 'd', d, 'q', q, 'pr', prs, 'r', rs, 's', st, 'up', NOW_S)
    redis.call('HDEL', k, 'a', 'e')
    redis.call('ZREM', ik(t, o[1]), h)
    redis.call('ZADD', ik(t, st), NOW_S, h)
    count(t, o[2], o[1], -1)
    count(t, q, st, 1)
    codes[#codes + 1] = 'r'
    out[#out + 1] = h
  else
    local k = jk(id)
    local st = 'scheduled'
    if r <= NOW then st = 'ready' end
    if u == '' and pr == 0 then
      if t == '' then
        redis.call('HSET', k, 'd', d, 's', st, 'r', rs, 'up', NOW_S, 'q', q)
      else
        redis.call('HSET', k, 'd', d, 's', st, 'r', rs, 'up', NOW_S, 'q', q, 't', t)
      end
    else
      local f = {'d', d, 's', st, 'r', rs, 'up', NOW_S, 'q', q}
      if t ~= '' then f[#f + 1] = 't'; f[#f + 1] = t end
      if pr ~= 0 then f[#f + 1] = 'pr'; f[#f + 1] = prs end
      if u ~= '' then f[#f + 1] = 'u'; f[#f + 1] = u end
      redis.call('HSET', k, unpack(f))
    end
    if u ~= '' then
      -- Written at once: a later job of this batch may find it by its key.
      redis.call('HSET', uk(t), u, id)
      place(id, q, pr, r, z)
      redis.call('ZADD', ik(t, st), NOW_S, id)
    else
      if st == 'ready' then
        push(ZA, key('r:', q), z, id)
      else
        push(ZA, key('d:', q), z, id)
      end
      push(ZA, ik(t, st), NOW_S, id)
    end
    count(t, q, st, 1)
    codes[#codes + 1] = 'c'
  end
end
for q in pairs(queues) do redis.call('SADD', P .. 'queues', q) end
for t in pairs(scopes) do redis.call('SADD', P .. 'scopes', sc(t)) end
flush()
out[1] = table.concat(codes)
return out
"#;

/// ARGV[3] queue, ARGV[4] lease ms, ARGV[5] most jobs, ARGV[6] a random UUID: the n-th
/// job leased gets it with n added to its low 48 bits as its token. Recovers expired
/// leases, promotes due jobs, leases the best ready ones. Answers (id, d, r, a, e) per
/// job.
const RESERVE: &str = r#"
local q = ARGV[3]
local exp = string.format('%d', NOW + tonumber(ARGV[4]))
local max = tonumber(ARGV[5])
local tbase, tlow = string.sub(ARGV[6], 1, 24), tonumber(string.sub(ARGV[6], 25), 16)
local rk, lk = key('r:', q), key('l:', q)
local lost = redis.call('ZRANGEBYSCORE', lk, '-inf', NOW, 'LIMIT', 0, RECOVER_LIMIT)
for _, id in ipairs(lost) do
  local k = jk(id)
  local j = redis.call('HMGET', k, 's', 'a', 't', 'u', 'pr', 'r', 'd')
  redis.call('ZREM', lk, id)
  if j[1] == 'running' then
    redis.call('HDEL', P .. 'lt', id)
    local a, m, t = tonumber(j[2] or 0), max_of(j[7]), j[3] or ''
    local of = string.format('%d of %d', a, m)
    if a >= m then
      redis.call('HSET', k, 's', 'dead', 'e', 'worker lost: lease expired on attempt ' .. of,
        'up', NOW_S)
      redis.call('ZADD', ik(t, 'dead'), NOW_S, id)
      move(t, q, 'running', 'dead')
    else
      local other = take(t, j[4] or nil, id)
      if other then
        supersede(id, t, q, other)
      else
        redis.call('HSET', k, 's', 'ready',
          'e', 'lease expired on attempt ' .. of .. '; the job runs again', 'up', NOW_S)
        redis.call('ZADD', rk, rscore(tonumber(j[5] or 0), tonumber(j[6])), id)
        redis.call('ZADD', ik(t, 'ready'), NOW_S, id)
        move(t, q, 'running', 'ready')
      end
    end
  end
end
promote(q, PROMOTE_LIMIT)
local out, held = {}, {}
local popped = redis.call('ZPOPMIN', rk, max)
local n = 0
for i = 1, #popped, 2 do
  local id = popped[i]
  local k = jk(id)
  local j = redis.call('HMGET', k, 'd', 's', 'a', 't', 'u', 'r', 'e')
  local st = j[2]
  if pending(st) then
    n = n + 1
    local a = istr(tonumber(j[3] or 0) + 1)
    local t = j[4] or ''
    local tok = tbase .. string.format('%012x', (tlow + n) % 281474976710656)
    redis.call('HSET', k, 's', 'running', 'a', a, 'tk', tok, 'up', NOW_S)
    if j[5] then drop_key(t, j[5], id) end
    push(ZR, ik(t, st), id)
    push(ZA, lk, exp, id)
    held[#held + 1] = id
    held[#held + 1] = tok .. '|' .. q .. '|' .. t
    move(t, q, st, 'running')
    out[#out + 1] = id
    out[#out + 1] = j[1]
    out[#out + 1] = j[6]
    out[#out + 1] = a
    out[#out + 1] = j[7]
  end
end
run('HSET', P .. 'lt', held, 4000)
flush()
return out
"#;

/// `<id>:<token>` per lease. Answers how many were marked succeeded. The leases are
/// read from `P lt` in one call per 4,000 (a job hash is only written).
const COMPLETE: &str = r#"
local n = 0
local ltk = P .. 'lt'
local gone, done = {}, {}
for first = 3, #ARGV, 4000 do
  local last = first + 3999
  if last > #ARGV then last = #ARGV end
  local ids = {}
  for i = first, last do ids[#ids + 1] = string.sub(ARGV[i], 1, 36) end
  local held = redis.call('HMGET', ltk, unpack(ids))
  for x = 1, #ids do
    local id, h = ids[x], held[x]
    if h and not done[id] and string.sub(h, 1, 36) == string.sub(ARGV[first + x - 1], 38) then
      done[id] = true
      local q, t = string.match(h, '^([^|]*)|(.*)$', 38)
      redis.call('HSET', jk(id), 's', 'succeeded', 'up', NOW_S)
      gone[#gone + 1] = id
      push(ZR, key('l:', q), id)
      push(ZA, ik(t, 'succeeded'), NOW_S, id)
      move(t, q, 'running', 'succeeded')
      tput(t, 's')
      n = n + 1
    end
  end
end
run('HDEL', ltk, gone, 4000)
flush()
return n
"#;

/// ARGV[3] `<id>:<token>`, ARGV[4] error, ARGV[5] retry-at or ''.
/// Answers the new state, or nil when the lease is not held.
const FAIL: &str = r#"
local id = string.sub(ARGV[3], 1, 36)
local k = jk(id)
local j = redis.call('HMGET', k, 's', 'tk', 't', 'q', 'u', 'pr')
if j[1] ~= 'running' or j[2] ~= string.sub(ARGV[3], 38) then return false end
local t, q = j[3] or '', j[4]
redis.call('ZREM', key('l:', q), id)
redis.call('HDEL', P .. 'lt', id)
tput(t, 'f')
local st
if ARGV[5] == '' then
  st = 'dead'
  redis.call('HSET', k, 's', st, 'e', ARGV[4], 'up', NOW_S)
  redis.call('ZADD', ik(t, st), NOW_S, id)
  move(t, q, 'running', st)
else
  local other = take(t, j[5] or nil, id)
  if other then
    st = 'cancelled'
    supersede(id, t, q, other)
  else
    st = 'retrying'
    local r = tonumber(ARGV[5])
    redis.call('HSET', k, 's', st, 'e', ARGV[4], 'r', ARGV[5], 'up', NOW_S)
    if r <= NOW then
      redis.call('ZADD', key('r:', q), rscore(tonumber(j[6] or 0), r), id)
    else
      redis.call('ZADD', key('d:', q), ARGV[5], id)
    end
    redis.call('ZADD', ik(t, st), NOW_S, id)
    move(t, q, 'running', st)
  end
end
flush()
return st
"#;

/// ARGV[3] lease ms, then `<id>:<token>` per lease. Answers 1 or 0 per lease.
const RENEW: &str = r#"
local exp = string.format('%d', NOW + tonumber(ARGV[3]))
local out = {}
for i = 4, #ARGV do
  local id = string.sub(ARGV[i], 1, 36)
  local j = redis.call('HMGET', jk(id), 's', 'tk', 'q')
  if j[1] == 'running' and j[2] == string.sub(ARGV[i], 38) then
    redis.call('ZADD', key('l:', j[3]), 'XX', exp, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// `<id>:<token>` per lease. Gives the jobs back, due now, the attempt not counted (or
/// cancelled when superseded). Answers how many.
const RELEASE: &str = r#"
local n = 0
for i = 3, #ARGV do
  local id = string.sub(ARGV[i], 1, 36)
  local k = jk(id)
  local j = redis.call('HMGET', k, 's', 'tk', 't', 'q', 'u', 'pr', 'a', 'r')
  if j[1] == 'running' and j[2] == string.sub(ARGV[i], 38) then
    local t, q = j[3] or '', j[4]
    redis.call('ZREM', key('l:', q), id)
    redis.call('HDEL', P .. 'lt', id)
    local other = take(t, j[5] or nil, id)
    if other then
      supersede(id, t, q, other)
    else
      local a = tonumber(j[7] or 0) - 1
      if a < 0 then a = 0 end
      local r = tonumber(j[8])
      if r > NOW then r = NOW end
      redis.call('HSET', k, 's', 'ready', 'a', a, 'r', string.format('%d', r), 'up', NOW_S)
      redis.call('ZADD', key('r:', q), rscore(tonumber(j[6] or 0), r), id)
      redis.call('ZADD', ik(t, 'ready'), NOW_S, id)
      move(t, q, 'running', 'ready')
    end
    n = n + 1
  end
end
flush()
return n
"#;

/// ARGV[3] mode (`c` cancel, `d` discard, `u` cancel by unique key), ARGV[4] scope
/// (`*`, a tenant, or for `u` the tenant or ''), ARGV[5] id or unique key. Answers 1 if
/// a job was cancelled.
const DROP: &str = r#"
local mode, scope = ARGV[3], ARGV[4]
local id = ARGV[5]
if mode == 'u' then
  id = redis.call('HGET', uk(scope), ARGV[5])
  if not id then return 0 end
end
local k = jk(id)
local j = redis.call('HMGET', k, 's', 't', 'q', 'u')
local st, t, q = j[1], j[2] or '', j[3]
if not st then return 0 end
if scope ~= '*' and t ~= scope then return 0 end
if not (pending(st) or (mode == 'd' and st == 'dead')) then return 0 end
unplace(id, q)
if j[4] then drop_key(t, j[4], id) end
redis.call('HSET', k, 's', 'cancelled', 'up', NOW_S)
redis.call('ZREM', ik(t, st), id)
redis.call('ZADD', ik(t, 'cancelled'), NOW_S, id)
move(t, q, st, 'cancelled')
flush()
return 1
"#;

/// ARGV[3] scope, ARGV[4] id. Answers 1 (due now, attempts reset), 0 (no such job in a
/// dead, retrying or cancelled state), -1 (another pending job holds its unique key).
const RETRY: &str = r#"
local id = ARGV[4]
local k = jk(id)
local j = redis.call('HMGET', k, 's', 't', 'q', 'u', 'pr')
local st, t, q = j[1], j[2] or '', j[3]
if not st then return 0 end
if ARGV[3] ~= '*' and t ~= ARGV[3] then return 0 end
if not (st == 'dead' or st == 'retrying' or st == 'cancelled') then return 0 end
if j[4] and take(t, j[4], id) then return -1 end
unplace(id, q)
redis.call('HSET', k, 's', 'ready', 'r', NOW_S, 'up', NOW_S)
redis.call('HDEL', k, 'a')
redis.call('ZADD', key('r:', q), rscore(tonumber(j[5] or 0), NOW), id)
redis.call('ZREM', ik(t, st), id)
redis.call('ZADD', ik(t, 'ready'), NOW_S, id)
move(t, q, st, 'ready')
flush()
return 1
"#;

/// ARGV[3] `all` or a tenant. Promotes due jobs, answers the counters hash.
const COUNTS: &str = r#"
promote_all('', PROMOTE_LIMIT)
flush()
return redis.call('HGETALL', P .. 'c:' .. ARGV[3])
"#;

/// ARGV[3] `all` or a tenant, ARGV[4] first minute, ARGV[5] how many minutes.
/// Answers (succeeded, failed) per minute.
const THROUGHPUT: &str = r#"
local first, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local base = P .. 'tp:' .. ARGV[3] .. ':'
local out = {}
for i = 0, n - 1 do
  local v = redis.call('HMGET', base .. string.format('%d', first + i), 's', 'f')
  out[#out + 1] = v[1]
  out[#out + 1] = v[2]
end
return out
"#;

/// ARGV[3] queue. Answers a time in ms, or nil.
const NEXT_DUE: &str = r#"
local q = ARGV[3]
if redis.call('ZCARD', key('r:', q)) > 0 then return NOW end
local best = false
local d = redis.call('ZRANGE', key('d:', q), 0, 0, 'WITHSCORES')
if d[2] then best = tonumber(d[2]) end
local l = redis.call('ZRANGE', key('l:', q), 0, 0, 'WITHSCORES')
if l[2] and (not best or tonumber(l[2]) < best) then best = tonumber(l[2]) end
return best
"#;

/// ARGV[3] scope (`*` or a tenant), ARGV[4] state ('' any), ARGV[5] queue ('' any),
/// ARGV[6], ARGV[7] cursor (updated ms, id) or '', ARGV[8] limit, ARGV[9] most entries
/// to examine. Merges the index sets newest first from just after the cursor. Answers
/// (done, last examined ms, last examined id) then records; `done` is 0 when it stopped
/// at the examine limit.
const LIST: &str = r#"
local scope, want, wq = ARGV[3], ARGV[4], ARGV[5]
local cs, cid = nil, ARGV[7]
if ARGV[6] ~= '' then cs = tonumber(ARGV[6]) end
local limit, cap = tonumber(ARGV[8]), tonumber(ARGV[9])
if want == '' or want == 'ready' or want == 'scheduled' then
  promote_all(wq, PROMOTE_LIMIT)
  flush()
end
local function newer(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end
local states
if want == '' then
  states = {'scheduled', 'ready', 'retrying', 'succeeded', 'dead', 'cancelled', 'running'}
else
  states = {want}
end
local scopes
if scope == '*' then scopes = redis.call('SMEMBERS', P .. 'scopes') else scopes = {scope} end
local CH = limit + 1
if CH > 100 then CH = 100 end
local src = {}
for _, st in ipairs(states) do
  if st == 'running' then
    local buf = {}
    local queues
    if wq ~= '' then queues = {wq} else queues = redis.call('SMEMBERS', P .. 'queues') end
    for _, q in ipairs(queues) do
      for _, id in ipairs(redis.call('ZRANGE', key('l:', q), 0, -1)) do
        local j = redis.call('HMGET', jk(id), 't', 'up')
        local t = j[1] or ''
        if j[2] and (scope == '*' or t == scope) then
          local s = tonumber(j[2])
          if not cs or s < cs or (s == cs and id < cid) then buf[#buf + 1] = {s, id} end
        end
      end
    end
    table.sort(buf, newer)
    src[#src + 1] = {buf = buf, bi = 1, done = true}
  else
    for _, s in ipairs(scopes) do
      local k = P .. 'i:' .. s .. ':' .. st
      if redis.call('EXISTS', k) == 1 then
        local pos = 0
        if cs then
          -- First rank (newest first) after the cursor: past every newer score, then a
          -- binary search among the entries of the cursor's score, ordered by id.
          local lo = redis.call('ZCOUNT', k, '(' .. ARGV[6], '+inf')
          local hi = lo + redis.call('ZCOUNT', k, ARGV[6], ARGV[6])
          while lo < hi do
            local mid = math.floor((lo + hi) / 2)
            local m = redis.call('ZRANGE', k, mid, mid, 'REV')[1]
            if m < cid then hi = mid else lo = mid + 1 end
          end
          pos = lo
        end
        src[#src + 1] = {key = k, pos = pos, buf = {}, bi = 1, done = false}
      end
    end
  end
end
local function head(s)
  if s.bi > #s.buf then
    if s.done then return nil end
    local r = redis.call('ZRANGE', s.key, s.pos, s.pos + CH - 1, 'REV', 'WITHSCORES')
    s.pos = s.pos + CH
    if #r < 2 * CH then s.done = true end
    s.buf = {}
    s.bi = 1
    for i = 1, #r, 2 do s.buf[#s.buf + 1] = {tonumber(r[i + 1]), r[i]} end
    if #s.buf == 0 then return nil end
  end
  return s.buf[s.bi]
end
local out = {0, '', ''}
local got, seen, last, exhausted = 0, 0, nil, false
while got < limit and seen < cap do
  local best, bh = nil, nil
  for _, s in ipairs(src) do
    local h = head(s)
    if h and (not bh or newer(h, bh)) then
      best = s
      bh = h
    end
  end
  if not best then
    exhausted = true
    break
  end
  best.bi = best.bi + 1
  seen = seen + 1
  last = bh
  local j = redis.call('HMGET', jk(bh[2]), 'd', 's', 'r', 'a', 'e', 'up', 'q')
  if j[2] and (wq == '' or j[7] == wq) then
    got = got + 1
    out[#out + 1] = bh[2]
    for x = 1, 6 do out[#out + 1] = j[x] end
  end
end
if exhausted or got >= limit then out[1] = 1 end
if last then
  out[2] = last[1]
  out[3] = last[2]
end
return out
"#;

/// ARGV[3] before (ms), ARGV[4] most jobs to delete. Deletes finished jobs whose last
/// change (their finishing) is older, then tick claims. Answers (deleted, more).
const PRUNE: &str = r#"
local before, lim = ARGV[3], tonumber(ARGV[4])
local n, deleted, more = 0, 0, 0
for _, s in ipairs(redis.call('SMEMBERS', P .. 'scopes')) do
  for _, st in ipairs({'succeeded', 'dead', 'cancelled'}) do
    if n >= lim then
      more = 1
      break
    end
    local k = P .. 'i:' .. s .. ':' .. st
    local ids = redis.call('ZRANGEBYSCORE', k, '-inf', '(' .. before, 'LIMIT', 0, lim - n)
    if #ids > 0 then
      for _, id in ipairs(ids) do
        local jkey = jk(id)
        local j = redis.call('HMGET', jkey, 's', 't', 'q')
        if j[1] == st then
          redis.call('DEL', jkey)
          count(j[2] or '', j[3], st, -1)
          deleted = deleted + 1
        end
        n = n + 1
      end
      run('ZREM', k, ids, 4000)
    end
  end
end
if more == 0 then redis.call('ZREMRANGEBYSCORE', P .. 'ticks', '-inf', '(' .. before) end
flush()
return {deleted, more}
"#;
