//! The binary as an operator runs it: `serve --demo` on a fresh SQLite file, a login as
//! the demo administrator, a conversation read over real HTTP, then SIGTERM; the
//! `create-tenant` / `create-user` commands; and `worker`, which sends queued e-mail.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin() -> Command {
    configured(Command::new(env!("CARGO_BIN_EXE_mindsp-server")))
}

/// The binary started by `sh` with the soft open-file limit at `soft` (as many systems
/// start programs at 1,024).
fn bin_with_open_files(soft: u32) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_mindsp-server"));
    configured(c)
}

fn configured(mut c: Command) -> Command {
    c.env_remove("MINDSP_JWT_SECRET")
        .env_remove("MINDSP_DATABASE_URL")
        .env("MINDSP_LOG", "info");
    c
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mindsp-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `serve` on an ephemeral port and waits for its "listening" line.
fn start(db: &Path, extra: &[&str]) -> Server {
    start_command(bin(), db, extra)
}

fn start_command(mut command: Command, db: &Path, extra: &[&str]) -> Server {
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}", db.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mindsp-server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("addr=") {
                let addr = line[i + 5..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server printed its address");
    Server {
        child,
        base: format!("http://{addr}"),
    }
}

/// Logs in as the demo administrator; returns the access token.
async fn demo_login(http: &reqwest::Client, base: &str) -> String {
    let v: Value = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"tenant": "sdis13", "email": "admin@sdis13.fr", "password": "Password123!"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn serve_demo_login_read_and_stop_on_sigterm() {
    let dir = temp_dir();
    let db = dir.join("mindsp.db");
    let mut server = start(&db, &["--demo"]);
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/healthz", server.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let token = demo_login(&http, &server.base).await;
    let list: Value = http
        .get(format!("{}/api/conversations", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let convs = list["conversations"].as_array().unwrap();
    assert!(convs.len() >= 2, "{list}");
    let id = convs[0]["id"].as_str().unwrap();
    let page: Value = http
        .get(format!("{}/api/conversations/{id}/messages", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!page["messages"].as_array().unwrap().is_empty(), "{page}");
    let users: Value = http
        .get(format!("{}/api/users", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users["users"].as_array().unwrap().len(), 13);

    // 30 training sessions over the coming weeks, each with a team invited; the
    // invitees were notified.
    let sessions: Value = http
        .get(format!("{}/api/fmpa?limit=100", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sessions = sessions["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 30, "{sessions:?}");
    let kinds: std::collections::HashSet<&str> =
        sessions.iter().filter_map(|s| s["kind"].as_str()).collect();
    assert!(kinds.len() >= 7, "{kinds:?}");
    let first = sessions[0]["id"].as_str().unwrap();
    let details: Value = http
        .get(format!("{}/api/fmpa/{first}", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        details["session"]["invitees"].as_array().unwrap().len() >= 5,
        "{details}"
    );

    // The secret was generated once and kept beside the database.
    let secret_file = dir.join("mindsp.db.jwt-secret");
    assert!(secret_file.exists());

    // SIGTERM: a clean exit.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_exit(&mut server.child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));

    // A restart reuses the secret: the old token still works; the demo is not duplicated.
    let server = start(&db, &["--demo"]);
    let r = http
        .get(format!("{}/api/users", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let users: Value = r.json().await.unwrap();
    assert_eq!(users["users"].as_array().unwrap().len(), 13);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn create_tenant_and_user_then_log_in() {
    let dir = temp_dir();
    let db = dir.join("ops.db");
    let url = format!("sqlite://{}", db.display());
    // One administration command against the database; `(succeeded, stderr)`.
    let admin_cmd = |args: &[&str]| {
        let out = bin()
            .args(args)
            .args(["--database-url", &url])
            .env("MINDSP_USER_PASSWORD", "Toulon-83-secours")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // `migrate` prepares an empty database and exits; running it twice is harmless.
    for _ in 0..2 {
        let (ok, err) = admin_cmd(&["migrate"]);
        assert!(ok, "{err}");
    }
    assert!(db.exists());
    let (ok, err) = admin_cmd(&[
        "create-tenant",
        "--slug",
        "sdis83",
        "--name",
        "SDIS 83 — Var",
    ]);
    assert!(ok, "{err}");
    let (ok, err) = admin_cmd(&[
        "create-user",
        "--tenant",
        "sdis83",
        "--email",
        "chef@sdis83.fr",
        "--name",
        "Cne Chef",
        "--role",
        "admin",
    ]);
    assert!(ok, "{err}");
    // Refusals exit non-zero with a message.
    let (ok, err) = admin_cmd(&[
        "create-user",
        "--tenant",
        "sdis00",
        "--email",
        "x@x.fr",
        "--name",
        "X",
    ]);
    assert!(!ok);
    assert!(err.contains("no tenant"), "{err}");

    let server = start(&db, &[]);
    let r = reqwest::Client::new()
        .post(format!("{}/api/auth/login", server.base))
        .json(&json!({"tenant": "sdis83", "email": "chef@sdis83.fr", "password": "Toulon-83-secours"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// Nothing acknowledged is lost: clients send concurrently, the server is killed with
/// SIGKILL mid-stream, and after a restart every message that was answered 201 is
/// there with the same sequence number, with no gap and no duplicate.
#[tokio::test]
async fn acknowledged_messages_survive_sigkill() {
    let dir = temp_dir();
    let db = dir.join("kill.db");
    // One user sends them all: the REST write rate is lifted.
    let lifted = ["--rest-rate", "100000", "--rest-burst", "100000"];
    let mut server = start(&db, &[&["--demo"], &lifted[..]].concat());
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let token = demo_login(&http, &base).await;
    let conv: Value = http
        .post(format!("{base}/api/conversations"))
        .bearer_auth(&token)
        .json(&json!({"kind": "group", "name": "Test de coupure", "member_ids": []}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv = conv["conversation"]["id"].as_str().unwrap().to_owned();

    // Eight senders, each until the server stops answering (bounded by count too).
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
    let mut senders = Vec::new();
    for s in 0..8 {
        let (http, base, token, conv, acked) = (
            http.clone(),
            base.clone(),
            token.clone(),
            conv.clone(),
            acked.clone(),
        );
        senders.push(tokio::spawn(async move {
            for i in 0..5000 {
                let key = format!("s{s}-m{i}");
                let r = http
                    .post(format!("{base}/api/conversations/{conv}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"content": format!("message {key}"), "idempotency_key": key}))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                if r.status() != 201 {
                    return;
                }
                let Ok(body) = r.json::<Value>().await else {
                    return;
                };
                let seq = body["message"]["seq"].as_i64().unwrap();
                acked.lock().unwrap().push((key, seq));
            }
        }));
    }
    // Kill once a few hundred messages are acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "server too slow to acknowledge"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Restart on the same file and read the whole history.
    let server = start(&db, &[]);
    let base = server.base.clone();
    let token = demo_login(&http, &base).await;
    let mut stored = std::collections::HashMap::new();
    let mut after = 0;
    loop {
        let page: Value = http
            .get(format!(
                "{base}/api/conversations/{conv}/messages?after={after}&limit=100"
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let msgs = page["messages"].as_array().unwrap();
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            let seq = m["seq"].as_i64().unwrap();
            assert_eq!(seq, after + 1, "gap-free history");
            after = seq;
            let key = m["idempotency_key"].as_str().unwrap().to_owned();
            assert!(stored.insert(key, seq).is_none(), "no duplicate");
        }
    }
    for (key, seq) in &acked {
        assert_eq!(
            stored.get(key),
            Some(seq),
            "acknowledged message {key} lost or moved"
        );
    }
    eprintln!(
        "{} acknowledged before SIGKILL, {} stored (committed but unanswered: {})",
        acked.len(),
        stored.len(),
        stored.len() - acked.len()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// The scaled profile's worker process: `mindsp-server worker` (no HTTP listener) takes
/// an e-mail job enqueued beforehand through the library, writes the e-mail into
/// `--mail-dir`, and exits 0 on SIGTERM, the job recorded as done.
#[tokio::test]
async fn worker_delivers_a_queued_email_into_the_mail_dir_and_stops_on_sigterm() {
    use mindsp_core::jobs::{JobScope, JobState};
    use mindsp_core::mail::{Email, Mailbox};
    use mindsp_queue::mail::EmailJob;

    let dir = temp_dir();
    let url = format!("sqlite://{}", dir.join("jobs.db").display());
    let outbox = dir.join("outbox");
    let email = Email {
        to: Mailbox {
            name: Some("Adjudant Sébastien Giraud".into()),
            address: "sebastien.giraud@sdis83.fr".into(),
        },
        subject: "Rappel : garde au CIS Fréjus samedi".into(),
        text: "Bonjour,\nVotre garde commence samedi à 7 h 00.".into(),
        html: Some("<p>Bonjour,</p><p>Votre garde commence samedi à 7 h 00.</p>".into()),
        message_id: None,
    };
    let id = {
        let store = mindsp_store::open(&url).await.unwrap();
        let queue = mindsp_queue::sql_queue(store.as_ref()).unwrap();
        queue
            .enqueue(&EmailJob::new(email.clone()).to_job())
            .await
            .unwrap()
            .id()
    };

    let mut child = bin()
        .args([
            "worker",
            "--database-url",
            &url,
            "--workers",
            "2",
            "--mail-dir",
        ])
        .arg(&outbox)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mindsp-server worker");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let eml = loop {
        let found = std::fs::read_dir(&outbox).ok().and_then(|entries| {
            entries
                .map_while(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "eml"))
        });
        if let Some(path) = found {
            break path;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no .eml file appeared; log:\n{}",
            log.lock().unwrap()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("worker exited ({status}); log:\n{}", log.lock().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let raw = std::fs::read(&eml).unwrap();
    let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(parsed.subject(), Some(email.subject.as_str()));
    let to = parsed.to().and_then(|t| t.first()).unwrap();
    assert_eq!(to.address(), Some("sebastien.giraud@sdis83.fr"));
    let from = parsed.from().and_then(|f| f.first()).unwrap();
    assert_eq!(
        from.address(),
        Some("no-reply@localhost"),
        "the default sender"
    );

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", log.lock().unwrap());
    let log = log.lock().unwrap().clone();
    assert!(log.contains("job worker started"), "{log}");
    assert!(!log.contains("listening"), "no HTTP listener: {log}");

    // The job was marked done before the worker stopped.
    let store = mindsp_store::open(&url).await.unwrap();
    let queue = mindsp_queue::sql_queue(store.as_ref()).unwrap();
    let job = queue.job(JobScope::All, id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// A node holds one socket per connection: started with a low soft open-file limit, it
/// raises it to the hard one (the upgrade cap derived from it is checked in `cli.rs`'s
/// unit tests).
#[tokio::test]
async fn serve_raises_its_open_file_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = open_files(&limits).1;
    if hard <= 256 {
        eprintln!("skipped: the hard open-file limit is {hard}, nothing to raise");
        return;
    }
    let dir = temp_dir();
    let server = start_command(bin_with_open_files(256), &dir.join("mindsp.db"), &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id()))
        .expect("the server's limits");
    assert_eq!(open_files(&limits), (hard, hard), "{limits}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// (soft, hard) of "Max open files" in a `/proc/<pid>/limits`.
fn open_files(limits: &str) -> (u64, u64) {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut n = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().expect("a number"));
    (n.next().unwrap(), n.next().unwrap())
}

/// Reminder lead times are configurable, and a bad value stops the server at start
/// with a message naming the setting, before it listens.
#[test]
fn bad_default_reminder_lead_times_are_refused_at_start() {
    let dir = temp_dir();
    let db = dir.join("mindsp.db");
    for bad in ["0", "1440,-5", "99999999"] {
        let out = bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(format!("sqlite://{}", db.display()))
            .args(["--fmpa-reminders", bad])
            .output()
            .expect("run mindsp-server");
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("MINDSP_FMPA_REMINDERS"), "{bad}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
