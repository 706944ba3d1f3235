//! Storage benchmarks for the foundation:
//!
//! 1. `append`: message appends with 32 concurrent senders across 1,000 conversations,
//!    through the core service (membership check, sequence, idempotency, commit).
//! 2. `history`: pages of 50 messages at random positions of a 1,000,000-message
//!    conversation (p50/p99/max).
//! 3. `search`: first ranked page over those 1,000,000 messages, for a selective word
//!    (500 matches) and a common one (250,000 matches).
//!
//! `cargo bench -p mindsp-benches --bench store` runs SQLite; with
//! `MINDSP_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1/mindsp_bench` it runs
//! PostgreSQL too. `MINDSP_BENCH_MESSAGES` sets the conversation size (default 1,000,000),
//! `MINDSP_BENCH_APPENDS` the number of appends (default 200,000),
//! `MINDSP_BENCH_SENDERS` the number of concurrent senders (default 32), and
//! `MINDSP_BENCH_ONLY` (`sqlite` or `postgres`) runs one backend alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mindsp_core::model::{NewUser, Role, SeqWindow};
use mindsp_core::ports::Store;
use mindsp_core::{Actor, ConversationId, Limits, Messaging};

const CONVERSATIONS: usize = 1000;
const USERS: usize = 64;

/// The sentences the big conversation is made of; « intervention » is in a quarter of
/// them, « ammoniac » is added to one message in 2,000.
const SENTENCES: [&str; 16] = [
    "Intervention terminée, retour au centre",
    "Départ du VSAV pour un secours à personne",
    "Le FPT est disponible après vérification",
    "Manœuvre échelle prévue jeudi à 14 h",
    "Fin d'intervention sur le feu de broussailles",
    "Relève de la garde à 7 h demain matin",
    "Contrôle des ARI effectué ce matin",
    "Compte rendu d'intervention envoyé au CODIS",
    "Formation secours routier samedi au plateau",
    "Le CCF part en renfort sur le massif",
    "Point de situation à 18 h au CTA",
    "Nouvelle intervention pour une fuite de gaz",
    "Réunion de centre reportée à vendredi",
    "Pensez à déclarer vos disponibilités",
    "Le VSR rentre de maintenance",
    "Exercice incendie urbain avec les SPV",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let messages: i64 = env_or("MINDSP_BENCH_MESSAGES", 1_000_000);
    let appends: usize = env_or("MINDSP_BENCH_APPENDS", 200_000);
    let only: String = env_or("MINDSP_BENCH_ONLY", String::new());
    let dir = std::env::temp_dir().join(format!("mindsp-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;

    if only.is_empty() || only == "sqlite" {
        println!("## SQLite (file, WAL, synchronous=NORMAL)");
        let url = format!("sqlite://{}", dir.join("append.db").display());
        bench_append(mindsp_store::open(&url).await?, appends).await?;
        let url = format!("sqlite://{}", dir.join("big.db").display());
        let store = mindsp_store::open(&url).await?;
        let (svc, actor, conv) =
            big_conversation(store.clone(), messages, Backend::Sqlite(&url)).await?;
        bench_reads(&svc, &actor, conv, messages).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    if only == "sqlite" {
        return Ok(());
    }
    if let Ok(base) = std::env::var("MINDSP_BENCH_POSTGRES_URL") {
        println!("\n## PostgreSQL");
        bench_append(pg(&base).await?.0, appends).await?;
        let (store, pool, schema) = pg(&base).await?;
        let (svc, actor, conv) = big_conversation(store, messages, Backend::Postgres(pool)).await?;
        // What autovacuum would do after such a load. The serving role does not own
        // the tables (ANALYZE would skip them), so as the connecting role.
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&base).await?;
        sqlx::query(&format!("SET search_path TO {schema}"))
            .execute(&mut conn)
            .await?;
        sqlx::query("ANALYZE").execute(&mut conn).await?;
        bench_reads(&svc, &actor, conv, messages).await?;
    } else {
        println!("\n(PostgreSQL skipped: MINDSP_BENCH_POSTGRES_URL not set)");
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A store in a fresh schema, its serving pool, and the schema's name.
async fn pg(base: &str) -> anyhow::Result<(Arc<dyn Store>, sqlx::PgPool, String)> {
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let mut config = mindsp_store::postgres::PgConfig::new(base);
    config.schema = Some(schema.clone());
    config.max_connections = 40;
    let store = mindsp_store::postgres::PgStore::open(config).await?;
    let pool = store.pool().clone();
    Ok((Arc::new(store), pool, schema))
}

async fn users(store: &Arc<dyn Store>, n: usize) -> anyhow::Result<Vec<Actor>> {
    let t = store
        .create_tenant(&format!("bench{}", uuid::Uuid::new_v4().simple()), "Bench")
        .await?;
    let mut tx = store.begin(t.id).await?;
    let mut out = Vec::new();
    for i in 0..n {
        let u = tx
            .insert_user(&NewUser {
                email: format!("u{i}@bench.fr"),
                display_name: format!("Sapeur {i}"),
                role: Role::Member,
                password_hash: String::new(),
            })
            .await?;
        out.push(Actor {
            tenant_id: t.id,
            user_id: u.id,
            role: Role::Member,
        });
    }
    tx.commit().await?;
    Ok(out)
}

async fn bench_append(store: Arc<dyn Store>, total: usize) -> anyhow::Result<()> {
    let senders: usize = env_or("MINDSP_BENCH_SENDERS", 32);
    let svc = Messaging::new(store.clone(), Limits::default());
    let people = users(&store, USERS).await?;
    let mut convs = Vec::new();
    for c in 0..CONVERSATIONS {
        let owner = people[c % USERS];
        let other = people[(c + 1) % USERS].user_id;
        convs.push((
            svc.create_group(&owner, &format!("conv {c}"), &[other])
                .await?
                .id,
            c,
        ));
    }
    let convs = Arc::new(convs);
    let per_task = total / senders;
    let cpu_before = thread_cpu();
    let io_before = written_bytes();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..senders {
        let (svc, convs, people) = (svc.clone(), convs.clone(), people.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            for i in 0..per_task {
                let (conv, c) = convs[(t * 31 + i * 7) % CONVERSATIONS];
                let sender = people[(c + i % 2) % USERS];
                let began = Instant::now();
                svc.send(
                    &sender,
                    conv,
                    SENTENCES[i % SENTENCES.len()],
                    Some(format!("{t}-{i}")),
                )
                .await
                .expect("append");
                hist.record(began.elapsed().as_micros() as u64).unwrap();
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await?)?;
    }
    let elapsed = start.elapsed();
    let done = per_task * senders;
    println!(
        "append: {done} messages, {senders} senders, {CONVERSATIONS} conversations: {:.0} messages/s (latency p50 {} µs, p99 {} µs, max {} µs)",
        done as f64 / elapsed.as_secs_f64(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    report_cpu(&cpu_before, &thread_cpu(), done);
    if let (Some(before), Some(after)) = (io_before, written_bytes()) {
        println!(
            "append writes per message: {:.1} KiB passed to write calls, {:.1} KiB sent to the disk",
            (after.0 - before.0) as f64 / done as f64 / 1024.0,
            (after.1 - before.1) as f64 / done as f64 / 1024.0
        );
    }
    Ok(())
}

/// Bytes this process passed to write calls and bytes it caused to be sent to storage
/// (`wchar` and `write_bytes` of `/proc/self/io`; Linux only). Appends on SQLite are
/// bound by what the WAL and its checkpoints write, so bytes per append show what a
/// change to the schema or the pragmas costs the disk, whatever the machine's speed.
fn written_bytes() -> Option<(u64, u64)> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((field("wchar:")?, field("write_bytes:")?))
}

/// CPU time (user, system; seconds) and name of each thread of this process, from
/// `/proc` (Linux; empty elsewhere). On a machine shared with other work, CPU time per
/// append is steadier than appends per second.
fn thread_cpu() -> std::collections::HashMap<u32, (String, f64, f64)> {
    const TICK: f64 = 0.01; // USER_HZ is 100 on Linux.
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (name) state ppid ...": utime and stime are the 12th and 13th fields
        // after the name.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Ok(tid), Some(user), Some(sys)) = (stat[..open].trim().parse(), tick(11), tick(12))
        {
            let name = stat[open + 1..close].to_owned();
            out.insert(tid, (name, user * TICK, sys * TICK));
        }
    }
    out
}

/// Prints the process's CPU time per append and that of its busiest thread (for SQLite,
/// the writer connection's).
fn report_cpu(
    before: &std::collections::HashMap<u32, (String, f64, f64)>,
    after: &std::collections::HashMap<u32, (String, f64, f64)>,
    done: usize,
) {
    if after.is_empty() || done == 0 {
        return;
    }
    let per = |s: f64| s * 1e6 / done as f64;
    let mut total = 0.0;
    let mut busiest = (String::new(), 0.0, 0.0);
    for (tid, (name, user, sys)) in after {
        let (u0, s0) = before.get(tid).map_or((0.0, 0.0), |b| (b.1, b.2));
        let (u, s) = (user - u0, sys - s0);
        total += u + s;
        if u + s > busiest.1 + busiest.2 {
            busiest = (name.clone(), u, s);
        }
    }
    println!(
        "append CPU per message: process {:.0} µs; busiest thread ({}) {:.0} µs (user {:.0}, system {:.0})",
        per(total),
        busiest.0,
        per(busiest.1 + busiest.2),
        per(busiest.1),
        per(busiest.2)
    );
}

enum Backend<'a> {
    Sqlite(&'a str),
    Postgres(sqlx::PgPool),
}

/// One conversation holding `n` messages, loaded in bulk by SQL that goes through the
/// same tables, triggers and indexes as normal appends, then indexed for search.
async fn big_conversation(
    store: Arc<dyn Store>,
    n: i64,
    backend: Backend<'_>,
) -> anyhow::Result<(Messaging, Actor, ConversationId)> {
    let svc = Messaging::new(store.clone(), Limits::default());
    let people = users(&store, 2).await?;
    let conv = svc
        .create_group(&people[0], "Grande conversation", &[people[1].user_id])
        .await?;
    let started = Instant::now();
    let cases: String = SENTENCES
        .iter()
        .enumerate()
        .map(|(i, s)| format!(" WHEN {i} THEN '{}'", s.replace('\'', "''")))
        .collect();
    let content = format!(
        "(CASE i % 16{cases} END) || CASE WHEN i % 2000 = 0 THEN ' : fuite d''ammoniac signalée' ELSE '' END"
    );
    const CHUNK: i64 = 100_000;
    match backend {
        Backend::Sqlite(url) => {
            let pool = sqlx::SqlitePool::connect(url).await?;
            let mut from = 1;
            while from <= n {
                let to = (from + CHUNK - 1).min(n);
                sqlx::query(&format!(
                    "WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM s WHERE i < ?2)
                     INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, idempotency_key, created_at)
                     SELECT randomblob(16), ?3, ?4, ?5, i, {content}, NULL, ?6 + i FROM s"
                ))
                .bind(from)
                .bind(to)
                .bind(conv.tenant_id.0)
                .bind(conv.id.0)
                .bind(people[0].user_id.0)
                .bind(1_700_000_000_000i64)
                .execute(&pool)
                .await?;
                from = to + 1;
            }
            sqlx::query("PRAGMA optimize").execute(&pool).await?;
            pool.close().await;
        }
        Backend::Postgres(pg) => {
            // The store's own pool runs under row-level security: set the tenant.
            let mut from = 1;
            while from <= n {
                let to = (from + CHUNK - 1).min(n);
                let mut tx = pg.begin().await?;
                sqlx::query("SELECT set_config('mindsp.tenant_id', $1, true)")
                    .bind(conv.tenant_id.0.to_string())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&format!(
                    "INSERT INTO messages (id, tenant_id, conversation_id, sender_id, seq, content, idempotency_key, created_at)
                     SELECT gen_random_uuid(), $3, $4, $5, i, {content}, NULL, to_timestamp(1700000000 + i)
                       FROM generate_series($1::bigint, $2::bigint) AS s(i)"
                ))
                .bind(from)
                .bind(to)
                .bind(conv.tenant_id.0)
                .bind(conv.id.0)
                .bind(people[0].user_id.0)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE conversations SET last_seq = $1 WHERE id = $2")
                    .bind(to)
                    .bind(conv.id.0)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                from = to + 1;
            }
        }
    }
    println!(
        "loaded a conversation of {n} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Both backends leave full-text indexing to a background step (a search first
    // indexes what is missing on SQLite, and matches it on the fly on PostgreSQL); after
    // a bulk load, finish it before measuring searches.
    let started = Instant::now();
    if let Some(s) = store
        .as_any()
        .downcast_ref::<mindsp_store::postgres::PgStore>()
    {
        s.index_search().await?;
    }
    if let Some(s) = store
        .as_any()
        .downcast_ref::<mindsp_store::sqlite::SqliteStore>()
    {
        s.index_search().await?;
    }
    println!(
        "indexed them for search in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((svc, people[1], conv.id))
}

async fn bench_reads(
    svc: &Messaging,
    actor: &Actor,
    conv: ConversationId,
    n: i64,
) -> anyhow::Result<()> {
    // History pages at pseudo-random positions (a fixed LCG: same positions every run).
    let mut hist = Histogram::<u64>::new(3)?;
    let mut x: u64 = 42;
    for _ in 0..5000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let before = 51 + (x >> 33) as i64 % (n - 50);
        let began = Instant::now();
        let page = svc
            .history(actor, conv, SeqWindow::Before(before), Some(50))
            .await?;
        hist.record(began.elapsed().as_micros() as u64)?;
        assert_eq!(page.len(), 50);
    }
    report("history page of 50", &hist);

    for (label, query, samples) in [
        (
            "search, selective (« ammoniac », 500 matches)",
            "ammoniac",
            200,
        ),
        (
            "search, common (« intervention », 250,000 matches)",
            "intervention",
            20,
        ),
    ] {
        let mut hist = Histogram::<u64>::new(3)?;
        for _ in 0..samples {
            let began = Instant::now();
            let hits = svc.search(actor, query, None, 0, Some(20)).await?;
            hist.record(began.elapsed().as_micros() as u64)?;
            assert_eq!(hits.len(), 20);
        }
        report(label, &hist);
    }
    Ok(())
}

fn report(label: &str, hist: &Histogram<u64>) {
    let ms = |v: u64| Duration::from_micros(v).as_secs_f64() * 1000.0;
    println!(
        "{label}: n={} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hist.len(),
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
}
