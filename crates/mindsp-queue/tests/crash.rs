//! A worker *process* killed with SIGKILL while 1,000 jobs are in flight: after a new
//! worker process starts, every job completes. The test prints how many ran twice
//! (at-least-once delivery allows it; the figure shows how many).
//!
//! The worker processes are this test binary run again with `MINDSP_CRASH_CHILD` set:
//! the `child_worker` case (ignored otherwise) then serves the queue until killed.
//! Each backend runs when its URL is set (SQLite always).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mindsp_core::JobId;
use mindsp_core::jobs::*;
use mindsp_queue::worker::{Handler, JobError, Worker, WorkerConfig};
use serde_json::json;

const JOBS: usize = 1_000;
const KIND: &str = "test.crash";

/// Opens the queue a spec names: `sqlite:<file>`, `postgres:<url>#<schema>`,
/// `redis:<url>#<prefix>`.
async fn open(spec: &str) -> Arc<dyn JobQueue> {
    let (kind, rest) = spec.split_once(':').unwrap();
    match kind {
        "sqlite" => {
            let store = mindsp_store::sqlite::SqliteStore::open(
                mindsp_store::sqlite::SqliteConfig::file(rest),
            )
            .await
            .unwrap();
            Arc::new(mindsp_queue::sqlite::SqliteQueue::new(&store))
        }
        "postgres" => {
            let (url, schema) = rest.split_once('#').unwrap();
            let mut config = mindsp_store::postgres::PgConfig::new(url);
            config.schema = Some(schema.to_owned());
            let store = mindsp_store::postgres::PgStore::open(config).await.unwrap();
            Arc::new(mindsp_queue::postgres::PgQueue::new(&store))
        }
        "redis" => {
            let (url, prefix) = rest.split_once('#').unwrap();
            Arc::new(
                mindsp_queue::redis::RedisQueue::connect(url, prefix)
                    .await
                    .unwrap(),
            )
        }
        other => panic!("unknown backend {other}"),
    }
}

/// Appends the id of every job it finishes to a file, one line each. A line is
/// written before the job is acknowledged, so a kill between the two shows as a
/// second run, never as a missing one.
struct Record {
    log: std::sync::Mutex<std::fs::File>,
}

#[async_trait]
impl Handler for Record {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let mut log = self.log.lock().unwrap();
        writeln!(log, "{}", job.id).map_err(|e| JobError::Retry(e.to_string()))?;
        Ok(())
    }
}

/// The worker process. Serves until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the crash tests"]
async fn child_worker() {
    let Ok(spec) = std::env::var("MINDSP_CRASH_CHILD") else {
        return;
    };
    let log_path = std::env::var("MINDSP_CRASH_LOG").unwrap();
    let queue = open(&spec).await;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let config = WorkerConfig {
        concurrency: 100,
        prefetch: 100,
        // Short, so the test does not wait for the default; the default's bound is
        // measured in the benchmarks.
        lease: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    let _worker = Worker::builder(queue, config)
        .handle(
            KIND,
            Arc::new(Record {
                log: std::sync::Mutex::new(log),
            }),
        )
        .start();
    println!("worker ready");
    tokio::time::sleep(Duration::from_secs(300)).await;
    panic!("the crash test never stopped this worker");
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(spec: &str, log: &Path) -> Killed {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["child_worker", "--exact", "--ignored", "--nocapture"])
        .env("MINDSP_CRASH_CHILD", spec)
        .env("MINDSP_CRASH_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Killed(child)
}

fn runs(log: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(log) {
        for line in text.lines().filter(|l| !l.is_empty()) {
            *out.entry(line.to_owned()).or_default() += 1;
        }
    }
    out
}

async fn crash_and_recover(name: &str, spec: String, dir: PathBuf) {
    let queue = open(&spec).await;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| NewJob::new(KIND, json!({ "i": i })))
        .collect();
    let ids: Vec<JobId> = queue
        .enqueue_batch(&jobs)
        .await
        .unwrap()
        .iter()
        .map(Enqueued::id)
        .collect();
    let log = dir.join("runs.log");

    // First worker: killed once a fifth of the jobs are done, with up to 200 leased.
    let first = spawn_worker(&spec, &log);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while runs(&log).len() < JOBS / 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: the first worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut first = first;
    // Child::kill sends SIGKILL on Unix: no chance to give anything back.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let running = queue
        .counts(JobScope::All)
        .await
        .unwrap()
        .iter()
        .map(|c| c.running)
        .sum::<u64>();
    let done_before = runs(&log).len();
    assert!(
        done_before < JOBS,
        "{name}: the kill came too late to prove anything"
    );

    // Second worker: picks up everything, including the jobs of the dead one once
    // their leases expire.
    let _second = spawn_worker(&spec, &log);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let counts = queue.counts(JobScope::All).await.unwrap();
        let succeeded: u64 = counts.iter().map(|c| c.succeeded).sum();
        if succeeded == JOBS as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: only {succeeded} of {JOBS} jobs completed: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runs = runs(&log);
    for id in &ids {
        assert!(
            runs.contains_key(&id.to_string()),
            "{name}: job {id} never ran"
        );
    }
    let twice = runs.values().filter(|n| **n > 1).count();
    println!(
        "{name}: killed with {running} jobs leased and {done_before} done; \
         all {JOBS} completed after restart; {twice} ran twice"
    );
    eprintln!(
        "{name}: killed with {running} jobs leased and {done_before} done; \
         all {JOBS} completed after restart; {twice} ran twice"
    );
    // Only a job leased when the worker died can have run twice.
    assert!(
        twice <= running as usize,
        "{name}: {twice} reruns for {running} leased"
    );
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mindsp-crash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_worker_killed_mid_flight() {
    let dir = temp_dir();
    let spec = format!("sqlite:{}", dir.join("queue.db").display());
    crash_and_recover("sqlite", spec, dir.clone()).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_worker_killed_mid_flight() {
    let Ok(url) = std::env::var("MINDSP_TEST_POSTGRES_URL") else {
        eprintln!("skipped: MINDSP_TEST_POSTGRES_URL is not set, PostgreSQL case not run");
        return;
    };
    let schema = format!("crash_{}", uuid::Uuid::new_v4().simple());
    let dir = temp_dir();
    crash_and_recover("postgres", format!("postgres:{url}#{schema}"), dir.clone()).await;
    let _ = std::fs::remove_dir_all(dir);
    use sqlx::Connection;
    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut c)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_killed_mid_flight() {
    let Ok(url) = std::env::var("MINDSP_TEST_REDIS_URL") else {
        eprintln!("skipped: MINDSP_TEST_REDIS_URL is not set, Redis case not run");
        return;
    };
    let prefix = format!("{{mindsp-crash-{}}}:", uuid::Uuid::new_v4().simple());
    let dir = temp_dir();
    crash_and_recover("redis", format!("redis:{url}#{prefix}"), dir.clone()).await;
    let _ = std::fs::remove_dir_all(dir);
    // The run's keys, so that runs do not pile them up in a shared Redis.
    let queue = mindsp_queue::redis::RedisQueue::connect(&url, &prefix)
        .await
        .expect("connect to redis");
    assert!(queue.purge().await.expect("purge") > 0);
}
