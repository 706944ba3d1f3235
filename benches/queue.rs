//! Job queue benchmarks, per backend:
//!
//! 1. `enqueue`: jobs enqueued in batches of 1,000 (`enqueue_batch`).
//! 2. `process`: no-op jobs run by the worker runtime at concurrency 1, 10 and 100,
//!    from the first reservation to the last acknowledgement.
//! 3. `delayed`: 100,000 jobs scheduled over 20 s (5,000 due per second, below what a
//!    worker sustains); lateness of each start behind its run-at time (p50/p99/max).
//! 4. `recovery`: a worker that leased a job and stopped renewing (what a killed
//!    process leaves behind); delay until a live worker with the *default* settings
//!    runs it again.
//!
//! `cargo bench -p mindsp-benches --bench queue` runs SQLite; set
//! `MINDSP_BENCH_POSTGRES_URL` and/or `MINDSP_BENCH_REDIS_URL` for the others.
//! `MINDSP_BENCH_JOBS` sets the number of jobs per throughput run (default 100,000),
//! `MINDSP_BENCH_DELAYED` the number of delayed jobs (default 100,000),
//! `MINDSP_BENCH_ONLY` a comma list among enqueue, process, delayed, recovery;
//! `MINDSP_BENCH_SKIP_SQLITE=1` leaves SQLite out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hdrhistogram::Histogram;
use mindsp_core::jobs::{Job, JobQueue, JobScope, NewJob};
use mindsp_core::ports::Store;
use mindsp_queue::worker::{Handler, JobError, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::Notify;

/// What a run leaves in the shared services, removed at the end: every Redis key
/// prefix and PostgreSQL schema it made. (Millions of leftover keys slow the next runs'
/// Redis down: creating a job hash cost 5 µs instead of 1.8 µs.)
enum Leftover {
    Redis(Arc<mindsp_queue::redis::RedisQueue>),
    Schema { url: String, schema: String },
}

static LEFTOVERS: std::sync::Mutex<Vec<Leftover>> = std::sync::Mutex::new(Vec::new());

fn leave(what: Leftover) {
    LEFTOVERS.lock().expect("leftovers lock").push(what);
}

async fn clean_up() {
    let all = std::mem::take(&mut *LEFTOVERS.lock().expect("leftovers lock"));
    let (mut keys, mut schemas) = (0, 0);
    for what in all {
        match what {
            Leftover::Redis(queue) => match queue.purge().await {
                Ok(n) => keys += n,
                Err(e) => eprintln!("could not delete a run's Redis keys: {e}"),
            },
            Leftover::Schema { url, schema } => {
                use sqlx::Connection;
                let dropped = match sqlx::PgConnection::connect(&url).await {
                    Ok(mut c) => sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut c)
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                };
                match dropped {
                    Ok(()) => schemas += 1,
                    Err(e) => eprintln!("could not drop schema {schema}: {e}"),
                }
            }
        }
    }
    if keys + schemas > 0 {
        println!("clean-up: {keys} Redis keys deleted, {schemas} PostgreSQL schemas dropped");
    }
}

enum Backend {
    Sqlite(std::path::PathBuf),
    Postgres(String),
    Redis(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "SQLite (file, WAL)",
            Backend::Postgres(_) => "PostgreSQL",
            Backend::Redis(_) => "Redis",
        }
    }

    /// A fresh queue (a new file, schema or key prefix), with the store whose
    /// database it lives in: a SQLite store checkpoints its log only while it is open.
    async fn open(&self) -> anyhow::Result<(Option<Arc<dyn Store>>, Arc<dyn JobQueue>)> {
        let fresh = uuid::Uuid::new_v4().simple();
        Ok(match self {
            Backend::Sqlite(dir) => {
                let path = dir.join(format!("{fresh}.db"));
                let store = mindsp_store::open(&format!("sqlite://{}", path.display())).await?;
                let queue = mindsp_queue::sql_queue(&*store)?;
                (Some(store), queue)
            }
            Backend::Postgres(url) => {
                let mut config = mindsp_store::postgres::PgConfig::new(url);
                let schema = format!("qbench_{fresh}");
                config.schema = Some(schema.clone());
                leave(Leftover::Schema {
                    url: url.clone(),
                    schema,
                });
                let store = mindsp_store::postgres::PgStore::open(config).await?;
                let queue = Arc::new(mindsp_queue::postgres::PgQueue::new(&store));
                (Some(Arc::new(store) as Arc<dyn Store>), queue)
            }
            Backend::Redis(url) => {
                let queue = Arc::new(
                    mindsp_queue::redis::RedisQueue::connect(
                        url,
                        &format!("{{mindsp-bench-{fresh}}}:"),
                    )
                    .await?,
                );
                leave(Leftover::Redis(queue.clone()));
                (None, queue)
            }
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = env_or("MINDSP_BENCH_JOBS", 100_000);
    let delayed: usize = env_or("MINDSP_BENCH_DELAYED", 100_000);
    let only = std::env::var("MINDSP_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    let dir = std::env::temp_dir().join(format!("mindsp-qbench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;

    let mut backends = Vec::new();
    if std::env::var_os("MINDSP_BENCH_SKIP_SQLITE").is_none() {
        backends.push(Backend::Sqlite(dir.clone()));
    }
    if let Ok(url) = std::env::var("MINDSP_BENCH_POSTGRES_URL") {
        backends.push(Backend::Postgres(url));
    }
    if let Ok(url) = std::env::var("MINDSP_BENCH_REDIS_URL") {
        backends.push(Backend::Redis(url));
    }

    let result = run(&backends, jobs, delayed, &want).await;
    clean_up().await;
    let _ = std::fs::remove_dir_all(dir);
    result
}

async fn run(
    backends: &[Backend],
    jobs: usize,
    delayed: usize,
    want: &dyn Fn(&str) -> bool,
) -> anyhow::Result<()> {
    for backend in backends {
        println!("## {}", backend.name());
        if want("enqueue") {
            let (_store, queue) = backend.open().await?;
            enqueue(queue, jobs).await?;
        }
        if want("process") {
            for concurrency in [1, 10, 100] {
                let (_store, queue) = backend.open().await?;
                process(queue, jobs, concurrency).await?;
            }
        }
        if want("delayed") {
            let (_store, queue) = backend.open().await?;
            delayed_lateness(queue, delayed).await?;
        }
        if want("recovery") {
            let (_store, queue) = backend.open().await?;
            recovery(queue).await?;
        }
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn batch(n: usize, kind: &str) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::new(kind, json!({ "user": i, "template": "fmpa_reminder" })))
        .collect()
}

async fn enqueue(queue: Arc<dyn JobQueue>, jobs: usize) -> anyhow::Result<()> {
    let batches: Vec<Vec<NewJob>> = (0..jobs.div_ceil(1000))
        .map(|_| batch(1000, "bench.noop"))
        .collect();
    let start = Instant::now();
    for b in &batches {
        queue.enqueue_batch(b).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "enqueue: {} jobs in batches of 1,000 in {secs:.2} s = {:.0} jobs/s",
        batches.len() * 1000,
        (batches.len() * 1000) as f64 / secs
    );
    Ok(())
}

/// Counts runs; wakes the bench when `target` is reached.
struct Count {
    runs: AtomicUsize,
    target: usize,
    done: Notify,
}

#[async_trait]
impl Handler for Count {
    async fn run(&self, _job: &Job) -> Result<(), JobError> {
        if self.runs.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
        Ok(())
    }
}

async fn process(queue: Arc<dyn JobQueue>, jobs: usize, concurrency: usize) -> anyhow::Result<()> {
    let jobs = if concurrency == 1 { jobs / 2 } else { jobs };
    for chunk in batch(jobs, "bench.noop").chunks(1000) {
        queue.enqueue_batch(chunk).await?;
    }
    let count = Arc::new(Count {
        runs: AtomicUsize::new(0),
        target: jobs,
        done: Notify::new(),
    });
    let config = WorkerConfig {
        concurrency,
        prefetch: concurrency.max(64),
        retention: None,
        ..WorkerConfig::default()
    };
    let start = Instant::now();
    let worker = Worker::builder(queue.clone(), config)
        .handle("bench.noop", count.clone())
        .start();
    count.done.notified().await;
    worker.shutdown(Duration::from_secs(30)).await;
    let secs = start.elapsed().as_secs_f64();
    let succeeded: u64 = queue
        .counts(JobScope::All)
        .await?
        .iter()
        .map(|c| c.succeeded)
        .sum();
    anyhow::ensure!(
        succeeded == jobs as u64,
        "{succeeded} of {jobs} acknowledged"
    );
    println!(
        "process: {jobs} no-op jobs at concurrency {concurrency} in {secs:.2} s = {:.0} jobs/s",
        jobs as f64 / secs
    );
    Ok(())
}

/// Records how late each job started.
struct Lateness {
    hist: std::sync::Mutex<Histogram<u64>>,
    runs: AtomicUsize,
    target: usize,
    done: Notify,
}

#[async_trait]
impl Handler for Lateness {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let late = (chrono::Utc::now() - job.run_at)
            .num_microseconds()
            .unwrap_or(0)
            .max(0);
        self.hist.lock().unwrap().record(late as u64).ok();
        if self.runs.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
        Ok(())
    }
}

async fn delayed_lateness(queue: Arc<dyn JobQueue>, n: usize) -> anyhow::Result<()> {
    let spread = Duration::from_secs(20);
    let lead = Duration::from_secs(5);
    let base = chrono::Utc::now() + chrono::Duration::from_std(lead)?;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| {
            let offset = spread.as_micros() as i64 * i as i64 / n as i64;
            NewJob::new("bench.delayed", json!({ "i": i }))
                .run_at(base + chrono::Duration::microseconds(offset))
        })
        .collect();
    let start = Instant::now();
    for chunk in jobs.chunks(1000) {
        queue.enqueue_batch(chunk).await?;
    }
    anyhow::ensure!(
        start.elapsed() < lead,
        "scheduling took longer than the lead time"
    );
    let handler = Arc::new(Lateness {
        hist: std::sync::Mutex::new(Histogram::new(3)?),
        runs: AtomicUsize::new(0),
        target: n,
        done: Notify::new(),
    });
    let worker = Worker::builder(
        queue.clone(),
        WorkerConfig {
            concurrency: 100,
            retention: None,
            ..WorkerConfig::default()
        },
    )
    .handle("bench.delayed", handler.clone())
    .start();
    handler.done.notified().await;
    worker.shutdown(Duration::from_secs(30)).await;
    let h = handler.hist.lock().unwrap();
    println!(
        "delayed: {n} jobs due over {} s; start lateness p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        spread.as_secs(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    Ok(())
}

async fn recovery(queue: Arc<dyn JobQueue>) -> anyhow::Result<()> {
    let defaults = WorkerConfig::default();
    let mut delays = Vec::new();
    for _ in 0..3 {
        queue
            .enqueue(&NewJob::new("bench.recover", json!({})))
            .await?;
        // The dead worker: takes the job with the default lease and is never heard of again.
        let leased = queue.reserve("default", 1, defaults.lease).await?;
        anyhow::ensure!(leased.len() == 1, "nothing to lease");
        let died = Instant::now();
        let count = Arc::new(Count {
            runs: AtomicUsize::new(0),
            target: 1,
            done: Notify::new(),
        });
        let worker = Worker::builder(queue.clone(), WorkerConfig::default())
            .handle("bench.recover", count.clone())
            .start();
        count.done.notified().await;
        delays.push(died.elapsed());
        worker.shutdown(Duration::from_secs(5)).await;
    }
    println!(
        "recovery: jobs of a dead worker ran again after {} (default lease {} s, poll {} ms)",
        delays
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        defaults.lease.as_secs(),
        defaults.poll_interval.as_millis()
    );
    Ok(())
}
